//! Golden fixtures: the bytes of every stored format this build reads, decoded and compared
//! with the values built here, so that a change to a stored layout (a field added to a
//! struct in a command or in the registry, a variant moved, a dependency's serde layout)
//! fails here instead of on a node's data directory.
//!
//! `tests/fixtures/format-<n>/` holds what format `n` stores:
//! - `log/<Command variant>.bin`: a sealed log entry (as the log store keeps it in sled)
//!   with one request of that command; `log/_blank.bin`, `log/_membership.bin`;
//! - `snapshot.bin`: snapshot data (as stored and sent to a lagging follower) of a registry
//!   with every table populated;
//! - `meta/vote.bin`, `meta/log-id.bin`: sealed Raft metadata.
//!
//! A build reads the fixtures of every format up to its own and refuses newer ones by name
//! (a normal build meets `format-4/`, written by a `format-next` build). A snapshot is
//! stored for each format whose registry layout differs (`format-1/` to `format-3/`), of the
//! registry made by the commands that format carries.
//!
//! To (re)write the fixtures of the formats this build writes:
//!
//! ```text
//! WARREN_WRITE_FIXTURES=1 cargo test -p warren-consensus --test formats
//! WARREN_WRITE_FIXTURES=1 cargo test -p warren-consensus --features format-next --test formats
//! ```
//!
//! Only rewrite a format's fixtures while no release has written it; once one has, a layout
//! change is a new format (see `warren_consensus::format`) and these files stay. `format-4/`
//! is the test-only format of `format-next` builds (`Command::Annotate`, always the last
//! variant): rewrite it with the second command whenever a command is added, and move it
//! one further whenever a real format is added.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use openraft::{CommittedLeaderId, EntryPayload, Membership, Vote};
use serde_json::json;
use warren_consensus::format::{self, Format, ReadError};
use warren_consensus::log_store::unseal_entry;
use warren_consensus::registry::{
    AnyEntity, ApiKeyRecord, AttemptKey, Command, JoinTokenRecord, Registry, SiteTokenRecord,
};
use warren_consensus::state_machine::{decode_registry, encode_registry};
use warren_consensus::storage::{seal, seal_as, unseal};
use warren_consensus::types::{Actor, Entry, LogId, Proposal, Request, RequestId};
use warren_proto::api::{Manifest, Scope};
use warren_proto::registry::{Kind, Node, NodeId, NodeRole, WgKey};
use warren_proto::session::{ProxyKeys, Session, SessionId, ShareLink, SigningKey, Via};
use warren_proto::token::{KeyId, SecretHash};
use warren_proto::{Name, Secret};

/// The serde name of `command`'s variant ([`Command::name`], exhaustive: a new command
/// fails the fixture test until it has a fixture below).
fn variant(command: &Command) -> &'static str {
    command.name()
}

fn name(s: &str) -> Name {
    Name::new(s).expect("name")
}

const T: u64 = 1_700_000_000;

/// A test-only certificate and key for `fixture.example` (self-signed, valid until 2126).
const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBpjCCAU2gAwIBAgIUHlzSKkQQap/LyYh1jeQDEAohUjMwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPZml4dHVyZS5leGFtcGxlMCAXDTI2MTIwMTE2MDIwNFoYDzIx
MjYxMTA3MTYwMjA0WjAaMRgwFgYDVQQDDA9maXh0dXJlLmV4YW1wbGUwWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAASxwejQ8pSiaP1nPsXmii6CrZP7ia0xXlYIV2C3
kJLI0x2XpRxLIliLnGOu9xAhlv1/2ivcDR5vy5Th7qxqIB91o28wbTAdBgNVHQ4E
FgQUS4WRq1xK7r6Wu61LYxpo9bbSMQ8wHwYDVR0jBBgwFoAUS4WRq1xK7r6Wu61L
Yxpo9bbSMQ8wDwYDVR0TAQH/BAUwAwEB/zAaBgNVHREEEzARgg9maXh0dXJlLmV4
YW1wbGUwCgYIKoZIzj0EAwIDRwAwRAIgAS4YT8Ebapq4ovDF8lOqaTjGJtEe8BCv
3Y3aTJW1YQ8CIEHVuSQ60+hRSLrFyGHdYhA2AhmJJYg3JF4TVcwe8YKG
-----END CERTIFICATE-----
";
const KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgVhBsL2Um7NzS8qnx
YPAW5XsNoWhS4CMd9sauzaWLCJChRANCAASxwejQ8pSiaP1nPsXmii6CrZP7ia0x
XlYIV2C3kJLI0x2XpRxLIliLnGOu9xAhlv1/2ivcDR5vy5Th7qxqIB91
-----END PRIVATE KEY-----
";

fn entity(kind: Kind, v: serde_json::Value) -> AnyEntity {
    let e = |r: Result<AnyEntity, serde_json::Error>| r.expect("entity JSON");
    match kind {
        Kind::User => e(serde_json::from_value(v).map(AnyEntity::User)),
        Kind::Role => e(serde_json::from_value(v).map(AnyEntity::Role)),
        Kind::IdentityProvider => e(serde_json::from_value(v).map(AnyEntity::IdentityProvider)),
        Kind::Site => e(serde_json::from_value(v).map(AnyEntity::Site)),
        Kind::Resource => e(serde_json::from_value(v).map(AnyEntity::Resource)),
        Kind::Policy => e(serde_json::from_value(v).map(AnyEntity::Policy)),
        Kind::Certificate => e(serde_json::from_value(v).map(AnyEntity::Certificate)),
        Kind::ApiKey | Kind::Node | Kind::JoinToken | Kind::Device => {
            panic!("not an entity: {kind:?}")
        }
    }
}

fn user() -> AnyEntity {
    entity(
        Kind::User,
        json!({"name": "alice", "email": "alice@example.com", "display_name": "Alice"}),
    )
}

fn resource() -> AnyEntity {
    entity(
        Kind::Resource,
        json!({"name": "app", "site": "lab", "route": {"http": {"domain": "app.example"}},
               "targets": ["10.0.0.5:8080"], "policies": ["admins"]}),
    )
}

fn session(id: u128, via: Via) -> Session {
    Session {
        id: SessionId(id),
        user: name("alice"),
        idp: name("corp"),
        email: "alice@example.com".into(),
        email_verified: true,
        groups: vec!["admins".into()],
        created_at: T,
        expires_at: T + 3600,
        refresh_token: Some(Secret::new("refresh")),
        token_expires_at: Some(T + 600),
        id_token: Some(Secret::new("id-token")),
        via,
        resource: (via != Via::Sso).then(|| name("app")),
        claims: r#"{"name":"Alice"}"#.into(),
    }
}

fn node(id: u64) -> Node {
    Node {
        id: NodeId(id),
        name: name(&format!("n{id}")),
        cluster_addr: format!("127.0.0.1:740{id}"),
        admin_addr: format!("127.0.0.1:744{id}"),
        region: "eu".into(),
        revision: 0,
        role: NodeRole::Voter,
    }
}

fn attempt() -> AttemptKey {
    AttemptKey {
        client: "192.0.2.7".parse().expect("address"),
        key: "pin:app".into(),
    }
}

/// Valid commands of format 1 that, in order from an empty registry, fill every table
/// format 1 has.
fn populate_v1() -> Vec<Command> {
    vec![
        Command::Bootstrap {
            cluster_id: 0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
            node: node(1),
            api_key: ApiKeyRecord {
                name: name("bootstrap"),
                id: KeyId(7),
                hash: SecretHash([1; 32]),
                scope: Scope::Admin,
                created_at: T,
                revision: 0,
            },
            join_token: JoinTokenRecord {
                id: 1,
                hash: SecretHash([2; 32]),
                created_at: T,
                revision: 0,
                role: NodeRole::Voter,
            },
        },
        Command::Create(user()),
        Command::Create(entity(
            Kind::Role,
            json!({"name": "admins", "description": "Admins", "members": ["alice"]}),
        )),
        Command::Create(entity(
            Kind::IdentityProvider,
            json!({"name": "corp", "issuer": "https://idp.example", "client_id": "warren",
                   "client_secret": "s3cret", "scopes": ["groups"], "groups_claim": "groups"}),
        )),
        Command::Create(entity(
            Kind::Site,
            json!({"name": "lab", "description": "The lab"}),
        )),
        Command::Create(entity(
            Kind::Policy,
            json!({"name": "admins", "allow": {"group": "admins"},
                   "deny": {"source_cidr": "10.9.0.0/16"}}),
        )),
        Command::Create(resource()),
        Command::Create(entity(
            Kind::Certificate,
            json!({"name": "fixture", "cert_pem": CERT_PEM, "key_pem": KEY_PEM}),
        )),
        Command::CreateApiKey(ApiKeyRecord {
            name: name("reader"),
            id: KeyId(8),
            hash: SecretHash([3; 32]),
            scope: Scope::ReadOnly,
            created_at: T,
            revision: 0,
        }),
        Command::CreateJoinToken(JoinTokenRecord {
            id: 2,
            hash: SecretHash([4; 32]),
            created_at: T,
            revision: 0,
            role: NodeRole::Learner,
        }),
        Command::RegisterNode {
            name: name("n2"),
            cluster_addr: "127.0.0.1:7402".into(),
            admin_addr: "127.0.0.1:7442".into(),
            region: "us".into(),
            role: NodeRole::Learner,
        },
        Command::SignIn {
            session: session(11, Via::Sso),
            display_name: Some("Alice".into()),
            subject: "sub-alice".into(),
            email_verified: true,
        },
        Command::CreateSession(session(12, Via::Pin)),
        Command::ConsumeHandoff {
            id: 13,
            expires_at: T + 60,
        },
        Command::EnsureProxyKeys(ProxyKeys {
            cookie_key: Secret::new("cookie-key"),
            signing_keys: vec![SigningKey {
                kid: "k1".into(),
                pkcs8: Secret::new("pkcs8-1"),
                created_at: T,
            }],
        }),
        Command::RotateSigningKey(SigningKey {
            kid: "k2".into(),
            pkcs8: Secret::new("pkcs8-2"),
            created_at: T,
        }),
        Command::CreateSiteToken(SiteTokenRecord {
            id: 21,
            site: name("lab"),
            hash: SecretHash([5; 32]),
            created_at: T,
            expires_at: T + 3600,
        }),
        Command::CreateShareLink(ShareLink {
            id: 31,
            resource: name("app"),
            hash: SecretHash([6; 32]),
            created_at: T,
            expires_at: T + 3600,
        }),
        Command::AcmeAccount(Secret::new(r#"{"id":"acct"}"#)),
        Command::AcmeLease {
            node: 1,
            until: T + 600,
        },
        Command::AcmeChallenge {
            token: "tok".into(),
            key_authorization: "tok.thumb".into(),
            expires_at: T + 600,
        },
        Command::ReserveAttempt {
            attempt: attempt(),
            id: 41,
            limit: 5,
            window: 300,
        },
        Command::ConsumeEmailCode {
            id: 51,
            expires_at: T + 600,
            resource: name("app"),
        },
    ]
}

/// Valid commands of format 2 that, after [`populate_v1`], fill the tables format 2 added.
fn populate_v2() -> Vec<Command> {
    vec![
        Command::Create(entity(
            Kind::Policy,
            json!({"name": "laptops", "allow": {"and": [{"group": "admins"}, {"device": "alice-laptop"}]}}),
        )),
        Command::Create(entity(
            Kind::Resource,
            json!({"name": "db", "site": "lab", "policies": ["laptops"],
                   "route": {"private": {"address": "db.lab.internal", "ports": "5432,8000-8100",
                                         "protocols": ["tcp"], "alias": "pg"}}}),
        )),
        Command::RegisterDevice {
            name: name("alice-laptop"),
            owner: name("alice"),
            public_key: WgKey([9; 32]),
            os: "linux".into(),
            session: Some(SessionId(11)),
            address: Some("198.51.100.7".parse().expect("address")),
        },
        Command::SetSiteKey {
            site: name("lab"),
            key: WgKey([5; 32]),
        },
        Command::SetNodeRelay {
            node: name("n2"),
            relay: "127.0.0.1:7401".into(),
        },
    ]
}

/// Valid commands of format 3 that, after [`populate_v2`], fill what format 3 added: side
/// fields (wrapped as `Request::new` wraps them) and the title.
fn populate_v3() -> Vec<Command> {
    vec![
        Command::Create(entity(
            Kind::IdentityProvider,
            json!({"name": "staff", "issuer": "https://staff.example", "client_id": "warren",
                   "display_name": "Acme staff", "auto_create": false,
                   "post_logout_redirect": true}),
        ))
        .with_side(),
        Command::Create(entity(
            Kind::Resource,
            json!({"name": "wiki", "route": {"http": {"domain": "app.example", "path_prefix": "/wiki"}},
                   "targets": ["10.0.0.6:80"], "policies": ["admins"],
                   "http": {"prefix_rewrite": "/"}}),
        ))
        .with_side(),
        Command::SetClusterTitle {
            title: Some("Acme access".into()),
        },
        Command::RegisterJoiningNode {
            name: name("n3"),
            cluster_addr: "127.0.0.1:7403".into(),
            admin_addr: "127.0.0.1:7443".into(),
            region: "ap".into(),
            role: NodeRole::Learner,
        },
    ]
}

/// Every table filled: [`populate_v1`], then [`populate_v2`], then [`populate_v3`] (so a
/// registry of the first parts alone is written in the older format).
fn populate() -> Vec<Command> {
    let mut all = populate_v1();
    all.extend(populate_v2());
    all.extend(populate_v3());
    all
}

/// One command of every variant (values need not apply; they must only be distinct).
fn one_of_each() -> Vec<Command> {
    // Format 1's first, in the order their fixtures were written (a fixture's bytes hold
    // its log index), then each newer format's.
    let mut all = populate_v1();
    all.extend([
        Command::Update(entity(
            Kind::User,
            json!({"name": "alice", "email": "alice@example.org", "revision": 2}),
        )),
        Command::Delete {
            kind: Kind::Site,
            name: name("lab"),
            revision: 5,
        },
        Command::Apply {
            manifest: Manifest {
                users: Some(vec![match user() {
                    AnyEntity::User(u) => u,
                    _ => unreachable!(),
                }]),
                sites: Some(Vec::new()),
                ..Manifest::default()
            },
            prune: true,
        },
        Command::RevokeApiKey {
            name: name("reader"),
        },
        Command::RevokeJoinToken { id: 2 },
        Command::UpdateNode {
            name: name("n2"),
            region: "ap".into(),
            revision: 9,
        },
        Command::DeleteNode { name: name("n2") },
        Command::RefreshSession {
            id: SessionId(11),
            refresh_token: Some(Secret::new("refresh-2")),
            token_expires_at: Some(T + 1200),
            groups: vec!["admins".into(), "ops".into()],
        },
        Command::RevokeSession { id: SessionId(12) },
        Command::ConsumeSiteToken { id: 21 },
        Command::AcmeChallengeDone {
            token: "tok".into(),
        },
        Command::RevokeShareLink { id: 31 },
        Command::ReleaseAttempt {
            attempt: attempt(),
            id: 41,
        },
    ]);
    all.extend(populate_v2());
    all.push(Command::TouchDevice {
        name: name("alice-laptop"),
        address: Some("2001:db8::7".parse().expect("address")),
    });
    all.extend(populate_v3());
    #[cfg(feature = "format-next")]
    all.push(Command::Annotate {
        note: "a note".into(),
    });
    // `populate` creates several entities; one `Create` fixture is enough.
    let mut seen = BTreeSet::new();
    all.retain(|c| seen.insert(variant(c)));
    all
}

fn entry(index: u64, payload: EntryPayload<warren_consensus::types::TypeConfig>) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(3, NodeId(1)), index),
        payload,
    }
}

fn request(i: u64, command: Command) -> Request {
    Request {
        id: RequestId(1000 + u128::from(i)),
        at: T,
        actor: if i.is_multiple_of(2) {
            Actor::System
        } else {
            Actor::ApiKey(KeyId(7))
        },
        command,
    }
}

fn membership() -> Membership<NodeId, warren_consensus::types::ClusterNode> {
    let node = |i: u64| warren_consensus::types::ClusterNode {
        name: format!("n{i}"),
        addr: format!("127.0.0.1:740{i}"),
    };
    Membership::new(
        vec![BTreeSet::from([NodeId(1)])],
        BTreeMap::from([(NodeId(1), node(1)), (NodeId(2), node(2))]),
    )
}

/// The log entries of the fixtures, by file name, with the format each is stored in.
fn log_entries() -> Vec<(String, Format, Entry)> {
    let mut out = vec![
        (
            "_blank".to_owned(),
            Format::V1,
            entry(1, EntryPayload::Blank),
        ),
        (
            "_membership".to_owned(),
            Format::V1,
            entry(2, EntryPayload::Membership(membership())),
        ),
    ];
    for (i, command) in (3..).zip(one_of_each()) {
        let name = variant(&command).to_owned();
        let e = entry(i, EntryPayload::Normal(Proposal(vec![request(i, command)])));
        out.push((name, format::entry_format(&e), e));
    }
    out
}

/// A registry with every table populated, as a state machine would have applied it.
fn registry() -> Registry {
    let reg = registry_of(populate());
    let empty: Vec<&str> = [
        ("users", reg.users().is_empty()),
        ("roles", reg.roles().is_empty()),
        ("identity providers", reg.identity_providers().is_empty()),
        ("sites", reg.sites().is_empty()),
        ("resources", reg.resources().is_empty()),
        ("policies", reg.policies().is_empty()),
        ("api keys", reg.api_keys().is_empty()),
        ("join tokens", reg.join_tokens().is_empty()),
        ("nodes", reg.nodes().is_empty()),
        ("certificates", reg.certificates().is_empty()),
        ("sessions", reg.sessions().is_empty()),
        ("share links", reg.share_links().is_empty()),
        ("site tokens", reg.site_tokens().is_empty()),
        ("identities", reg.identities().is_empty()),
        ("attempts", reg.attempts().is_empty()),
        ("proxy keys", reg.proxy_keys().is_none()),
        ("acme account", reg.acme().account.is_none()),
        ("acme lease", reg.acme().lease.is_none()),
        ("acme challenges", reg.acme().challenges.is_empty()),
        ("devices", reg.devices().is_empty()),
        ("title", reg.title().is_none()),
        (
            "provider side fields",
            reg.identity_providers()
                .values()
                .all(|p| p.display_name.is_none()),
        ),
        (
            "resource side fields",
            reg.resources()
                .values()
                .all(|r| r.http.prefix_rewrite.is_none()),
        ),
    ]
    .into_iter()
    .filter_map(|(t, e)| e.then_some(t))
    .collect();
    assert!(empty.is_empty(), "tables left empty: {empty:?}");
    reg
}

/// The registry as a build of `format` would have made it from [`populate`]: the commands
/// that format carries (the newer ones come last).
fn registry_in(format: Format) -> Registry {
    registry_of(
        populate()
            .into_iter()
            .filter(|c| format::command_format(c) <= format)
            .collect(),
    )
}

/// The registry after `commands`, each in an entry of its own.
fn registry_of(commands: Vec<Command>) -> Registry {
    let mut reg = Registry::default();
    let mut index = 0;
    let mut next = |payload| {
        index += 1;
        entry(index, payload)
    };
    let replies = reg.apply_entry(&next(EntryPayload::Blank));
    assert!(replies.is_empty());
    reg.apply_entry(&next(EntryPayload::Membership(membership())));
    for (i, command) in (0..).zip(commands) {
        let what = variant(&command);
        let req = Request {
            actor: Actor::System,
            ..request(i, command)
        };
        let e = next(EntryPayload::Normal(Proposal(vec![req])));
        let reply = reg.apply_entry(&e).remove(0);
        assert!(reply.is_ok(), "{what}: {reply:?}");
    }
    reg.rebuild_indexes();
    reg
}

fn vote() -> Vote<NodeId> {
    let mut v = Vote::new(3, NodeId(2));
    v.commit();
    v
}

fn log_id() -> LogId {
    LogId::new(CommittedLeaderId::new(3, NodeId(2)), 812)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn dir(format: Format) -> PathBuf {
    fixtures().join(format!("format-{format}"))
}

fn writing() -> bool {
    std::env::var("WARREN_WRITE_FIXTURES").is_ok_and(|v| v == "1")
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("fixture dir");
    std::fs::write(path, bytes).expect("writing a fixture");
    eprintln!("wrote {}", path.display());
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; write the fixtures with WARREN_WRITE_FIXTURES=1 (see the top of this file)",
            path.display()
        )
    })
}

/// The formats whose fixtures are in the tree.
fn stored_formats() -> Vec<Format> {
    let mut out: Vec<Format> = std::fs::read_dir(fixtures())
        .map(|d| {
            d.filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                Some(Format(name.strip_prefix("format-")?.parse().ok()?))
            })
            .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn every_command_variant_has_a_log_fixture() {
    let declared: BTreeSet<&str> = command_variants().into_iter().collect();
    let covered: BTreeSet<&str> = one_of_each().iter().map(variant).collect();
    assert_eq!(
        declared, covered,
        "every Command variant needs a fixture in one_of_each()"
    );
    // The variant only `format-next` builds have must stay last, or the variants after it
    // would be encoded differently by the two builds.
    #[cfg(feature = "format-next")]
    assert_eq!(command_variants().last(), Some(&"Annotate"));
}

#[test]
fn log_entries_of_every_stored_format_decode_to_the_values_built_here() {
    let entries = log_entries();
    if writing() {
        for (file, format, e) in &entries {
            let bytes = seal_as("log entry", *format, e).expect("seal");
            write(
                &dir(*format).join("log").join(format!("{file}.bin")),
                &bytes,
            );
        }
    }
    for (file, format, e) in &entries {
        let path = dir(*format).join("log").join(format!("{file}.bin"));
        let back = unseal_entry(e.log_id.index, &read(&path))
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        assert_eq!(&back, e, "{}", path.display());
    }
    // Files of formats this build reads that no value here stands for would be a command
    // that was dropped: every stored one must still decode.
    for format in stored_formats() {
        let Ok(files) = std::fs::read_dir(dir(format).join("log")) else {
            continue;
        };
        for f in files {
            let path = f.expect("fixture").path();
            let bytes = read(&path);
            let index = index_of(&path, &entries);
            match unseal_entry(index, &bytes) {
                Ok(_) => assert!(format.is_known(), "{} decoded", path.display()),
                Err(ReadError::TooNew { what, found, known }) => {
                    assert!(!format.is_known(), "{}", path.display());
                    assert_eq!((found, known), (format, Format::CURRENT));
                    assert_eq!(what, format!("log entry {index}"));
                }
                Err(e) => panic!("{}: {e}", path.display()),
            }
        }
    }
}

/// The log index a fixture file was written with (fixtures of newer formats than this
/// build: the index the newer build gave it, found by trying).
fn index_of(path: &Path, entries: &[(String, Format, Entry)]) -> u64 {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    entries
        .iter()
        .find(|(f, _, _)| f == stem)
        .map_or(3 + one_of_each().len() as u64, |(_, _, e)| e.log_id.index)
}

#[test]
fn a_snapshot_of_every_table_decodes_to_the_registry_built_here() {
    let reg = registry();
    assert_eq!(reg.snapshot_format(), Format::V3);
    if writing() {
        for r in [registry_in(Format::V1), registry_in(Format::V2), reg] {
            let data = encode_registry(&r).expect("encode");
            write(&dir(r.snapshot_format()).join("snapshot.bin"), &data);
        }
    }
    // Every stored snapshot decodes to the registry its format's build made, and that
    // registry is written again as the same bytes: the oldest format that carries it.
    let mut checked = Vec::new();
    for format in stored_formats().into_iter().filter(|f| f.is_known()) {
        let path = dir(format).join("snapshot.bin");
        if !path.exists() {
            continue;
        }
        let built = registry_in(format);
        let stored = read(&path);
        let mut back =
            decode_registry(&stored).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        back.rebuild_indexes();
        assert_eq!(
            format!("{back:?}"),
            format!("{built:?}"),
            "{}",
            path.display()
        );
        assert_eq!(back.digest(), built.digest());
        assert_eq!(
            encode_registry(&back).expect("encode"),
            stored,
            "{}: the registry no longer encodes to the stored snapshot: a layout changed",
            path.display()
        );
        checked.push(format);
    }
    assert!(
        [Format::V1, Format::V2, Format::V3]
            .iter()
            .all(|f| checked.contains(f)),
        "snapshots checked: {checked:?}"
    );
}

#[test]
fn raft_metadata_decodes_to_the_values_built_here() {
    let files: [(&str, Vec<u8>); 2] = [
        ("vote", seal("vote", &vote()).expect("seal")),
        ("log-id", seal("raft metadata", &log_id()).expect("seal")),
    ];
    if writing() {
        for (f, bytes) in &files {
            write(
                &dir(Format::V1).join("meta").join(format!("{f}.bin")),
                bytes,
            );
        }
    }
    let meta = dir(Format::V1).join("meta");
    let v: Vote<NodeId> = unseal("vote", &read(&meta.join("vote.bin"))).expect("vote");
    assert_eq!(v, vote());
    let l: LogId = unseal("raft metadata", &read(&meta.join("log-id.bin"))).expect("log id");
    assert_eq!(l, log_id());
}

/// The names of `Command`'s variants as serde sees them (its `Deserialize` hands them to
/// the deserializer).
fn command_variants() -> Vec<&'static str> {
    use serde::de::{self, Deserialize, Visitor};

    struct Names(Option<&'static [&'static str]>);
    struct Probe<'a>(&'a mut Names);

    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("only enums"))
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _name: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 .0 = Some(variants);
            Err(de::Error::custom("seen"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            struct identifier ignored_any
        }
    }

    let mut names = Names(None);
    let _ = Command::deserialize(Probe(&mut names));
    names.0.expect("Command is an enum").to_vec()
}

#[test]
fn a_log_entry_of_a_newer_format_stops_the_open_and_stays() {
    use warren_consensus::log_store::{LogOptions, LogStore, StorageIo};
    use warren_consensus::storage::Store;

    let tmp = tempfile::tempdir().expect("dir");
    let store = Store::open(tmp.path()).expect("store");
    let options = LogOptions {
        io: StorageIo::Inline,
        ..LogOptions::default()
    };
    drop(LogStore::open(&store, options).expect("open"));
    let newer = Format(Format::CURRENT.0 + 1);
    let bytes = seal_as("log entry", newer, &entry(1, EntryPayload::Blank)).expect("seal");
    let log = store.db().open_tree("log").expect("tree");
    log.insert(1u64.to_be_bytes(), bytes.clone())
        .expect("insert");
    let Err(e) = LogStore::open(&store, options) else {
        panic!("a log holding an entry of format {newer} opened");
    };
    assert_eq!(
        e.to_string(),
        format!(
            "log entry 1 is format {newer}, this build reads up to {}: upgrade this node",
            Format::CURRENT
        )
    );
    assert_eq!(
        log.get(1u64.to_be_bytes()).expect("get").as_deref(),
        Some(&bytes[..]),
        "the entry must not be cut as damage"
    );
}

#[test]
fn a_snapshot_of_a_newer_format_is_refused_by_name() {
    let mut data = encode_registry(&Registry::default()).expect("encode");
    let newer = Format(Format::CURRENT.0 + 1);
    data[6..8].copy_from_slice(&newer.0.to_le_bytes());
    match decode_registry(&data) {
        Err(e @ ReadError::TooNew { .. }) => assert_eq!(
            e.to_string(),
            format!(
                "the snapshot is format {newer}, this build reads up to {}: upgrade this node",
                Format::CURRENT
            )
        ),
        other => panic!("{other:?}"),
    }
    // Unversioned data (its uncompressed size first) is refused as such, not misread.
    let legacy = lz4_flex::compress_prepend_size(b"anything");
    assert!(matches!(
        decode_registry(&legacy),
        Err(ReadError::Unversioned { .. })
    ));
}
