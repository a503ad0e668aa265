//! The registry: the replicated state, the commands that change it, and their apply.
//!
//! [`Registry::apply_entry`] is pure and deterministic: the same log gives the same
//! registry on every node. It never reads a clock (times come with the [`Request`]) or a
//! random source (ids and secrets are chosen by the submitting node). Every command is
//! validated before it changes anything, so a command either applies whole or returns a
//! typed [`RegistryError`] and leaves the registry as it was.
//!
//! "As it was" means every table, including what only time retires: expired sessions,
//! used one-time codes, attempts, share links, site tokens and ACME answers are forgotten
//! only by a command that succeeds, after its checks passed, at the time the request
//! carries. A refused request records only bookkeeping, as every applied request does:
//! the entry's log id and the digest, the count of applied requests, and its reply among
//! the remembered ones, so that a retry of it gets the same refusal and can never apply
//! later (a request id is answered once). A retried request changes nothing but that
//! bookkeeping either.
//!
//! The maps are persistent (`imbl`), so a clone is O(1): the state machine publishes a clone
//! after every batch, and multi-entity commands (`apply` of a manifest) work on a clone that
//! replaces the original only when every step succeeded.
//!
//! The state machine persists the registry as Raft snapshots (this whole struct, bincode
//! encoded) and rebuilds it after a restart by replaying the log since the last one.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use imbl::{OrdMap, Vector};
use openraft::EntryPayload;
use serde::{Deserialize, Serialize};
use warren_proto::api::{ApplyReport, Change, ChangeAction, Manifest, MemberRole, Scope};
use warren_proto::certificate::Certificate;
use warren_proto::registry::{
    Device, Entity, FieldError, IdentityProvider, Kind, Node, NodeId, NodeRole, Policy,
    PrivateAddress, ProviderSide, Resource, ResourceSide, Role, Route, Site, User, WgKey,
};
use warren_proto::session::{user_name_from_email, ProxyKeys, Session, SessionId, ShareLink, Via};
use warren_proto::token::{ApiKey, KeyId, SecretHash};
use warren_proto::Name;

use crate::format::{self, Format, ReadError};
use crate::types::{
    Actor, Entry, LogId, Proposal, Replies, Reply, Request, RequestId, StoredMembership,
};

/// How many replies the registry remembers for deduplicating retried writes.
pub const DEDUP_WINDOW: usize = 8192;
/// Most (client, key) pairs whose attempts the registry counts; beyond, the pair that
/// expires first is forgotten (an attacker filling the table wins back a few tries at one
/// secret for every 100 000 writes, where refusing new pairs would lock everyone out).
pub const MAX_ATTEMPT_RECORDS: usize = 100_000;
/// Longest subject (`sub` claim) a sign-in may carry, in bytes (OpenID Connect Core 2:
/// at most 255 ASCII characters).
pub const MAX_SUBJECT: usize = 255;
/// Longest attempt key, in bytes.
pub const MAX_ATTEMPT_KEY: usize = 256;
/// Longest an e-mailed sign-in code may stay valid, in seconds: a used code is remembered
/// until it expires.
pub const MAX_EMAIL_CODE_TTL: u64 = 86_400;

/// An account at an identity provider: the provider's name and the ID token's `sub`,
/// which the provider never reassigns (unlike an e-mail address).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProviderSubject {
    /// The identity provider (its name in the registry).
    pub idp: Name,
    /// The `sub` claim of its ID tokens.
    pub subject: String,
}

/// Whose tries at a guessable secret are counted together: a client address and what it
/// tries (e.g. `pin:<resource>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AttemptKey {
    /// The client address (the caller may have reduced it to a prefix, e.g. an IPv6 /64).
    pub client: IpAddr,
    /// What is tried.
    pub key: String,
}

/// The tries counted for one [`AttemptKey`]: each failed or still unresolved one, until it
/// leaves the window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// `(counts until, reservation id)`, seconds since the Unix epoch, oldest first.
    pub tries: Vec<(u64, u128)>,
}

impl AttemptRecord {
    /// How many tries count at `now` (seconds since the Unix epoch).
    pub fn counted(&self, now: u64) -> usize {
        self.live(now).count()
    }

    /// Seconds from `now` until the oldest try still counted stops counting (0 if none).
    pub fn retry_after(&self, now: u64) -> u64 {
        self.live(now)
            .map(|t| t.0)
            .min()
            .map_or(0, |until| until.saturating_sub(now).max(1))
    }

    /// When the last try stops counting.
    fn expires_at(&self) -> u64 {
        self.tries.iter().map(|t| t.0).max().unwrap_or(0)
    }

    /// The tries that still count at `now`.
    fn live(&self, now: u64) -> impl Iterator<Item = &(u64, u128)> {
        self.tries.iter().filter(move |t| t.0 > now)
    }
}

/// A stored admin API key: the hash of its secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Unique name.
    pub name: Name,
    /// Public id (inside the key).
    pub id: KeyId,
    /// SHA-256 of the secret.
    pub hash: SecretHash,
    /// What the key may do.
    pub scope: Scope,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Raft log index of the last change.
    pub revision: u64,
}

/// A stored join token: the hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// Token id (inside the token).
    pub id: u64,
    /// SHA-256 of the secret.
    pub hash: SecretHash,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Raft log index of the last change.
    pub revision: u64,
    /// What a node admitted with it may be (never `Relay`: relay-only nodes enroll
    /// differently).
    pub role: NodeRole,
}

/// A stored one-time site enrollment token: the hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteTokenRecord {
    /// Token id (inside the token).
    pub id: u64,
    /// The site it enrolls an agent for.
    pub site: Name,
    /// SHA-256 of the secret.
    pub hash: SecretHash,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// End of validity, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Cluster-wide ACME state: the account, which node may order now, pending HTTP-01
/// answers (so whichever node the CA reaches can answer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeState {
    /// The ACME account's credentials (JSON), once created.
    pub account: Option<warren_proto::Secret>,
    /// The node holding the ordering lease, and until when (seconds since the epoch).
    pub lease: Option<(u64, u64)>,
    /// HTTP-01 challenge token -> (key authorization, expiry).
    pub challenges: OrdMap<String, (String, u64)>,
}

/// Any declarative entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnyEntity {
    /// A user.
    User(User),
    /// A role.
    Role(Role),
    /// An identity provider.
    IdentityProvider(IdentityProvider),
    /// A site.
    Site(Site),
    /// A resource.
    Resource(Resource),
    /// A policy.
    Policy(Policy),
    /// A TLS certificate.
    Certificate(Certificate),
}

impl AnyEntity {
    /// The kind of the entity.
    pub fn kind(&self) -> Kind {
        match self {
            AnyEntity::User(_) => Kind::User,
            AnyEntity::Role(_) => Kind::Role,
            AnyEntity::IdentityProvider(_) => Kind::IdentityProvider,
            AnyEntity::Site(_) => Kind::Site,
            AnyEntity::Resource(_) => Kind::Resource,
            AnyEntity::Policy(_) => Kind::Policy,
            AnyEntity::Certificate(_) => Kind::Certificate,
        }
    }

    /// The entity's name.
    pub fn name(&self) -> &Name {
        match self {
            AnyEntity::User(e) => e.name(),
            AnyEntity::Role(e) => e.name(),
            AnyEntity::IdentityProvider(e) => e.name(),
            AnyEntity::Site(e) => e.name(),
            AnyEntity::Resource(e) => e.name(),
            AnyEntity::Policy(e) => e.name(),
            AnyEntity::Certificate(e) => e.name(),
        }
    }
}

/// A change to the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// First command of a new cluster: its id, first node, first admin key and join token.
    Bootstrap {
        /// Random cluster id.
        cluster_id: u128,
        /// The first node (id 1).
        node: Node,
        /// The bootstrap admin key.
        api_key: ApiKeyRecord,
        /// The first join token.
        join_token: JoinTokenRecord,
    },
    /// Create an entity; fails if the name is taken.
    Create(AnyEntity),
    /// Replace an entity; a non-zero `revision` in it must match the stored one.
    Update(AnyEntity),
    /// Delete an entity; a non-zero `revision` must match the stored one.
    Delete {
        /// Kind of entity.
        kind: Kind,
        /// Its name.
        name: Name,
        /// Precondition (0 for none).
        revision: u64,
    },
    /// Make the declarative kinds match a manifest, all or nothing.
    Apply {
        /// The wanted state.
        manifest: Manifest,
        /// Delete unnamed entities of the kinds the manifest lists.
        prune: bool,
    },
    /// Store a new API key.
    CreateApiKey(ApiKeyRecord),
    /// Revoke (delete) an API key.
    RevokeApiKey {
        /// Its name.
        name: Name,
    },
    /// Store a new join token.
    CreateJoinToken(JoinTokenRecord),
    /// Revoke a join token.
    RevokeJoinToken {
        /// Its id.
        id: u64,
    },
    /// Record a joining node and give it an id (it becomes a member separately).
    RegisterNode {
        /// Node name.
        name: Name,
        /// Cluster address.
        cluster_addr: String,
        /// Admin API address.
        admin_addr: String,
        /// Region label.
        region: String,
        /// What it may be: the role of the join token it presented.
        role: NodeRole,
    },
    /// Change a node's region.
    UpdateNode {
        /// Node name.
        name: Name,
        /// New region.
        region: String,
        /// Precondition (0 for none).
        revision: u64,
    },
    /// Forget a node that is no longer a member.
    DeleteNode {
        /// Node name.
        name: Name,
    },
    /// Record a sign-in and store the session for its user: the user linked to this
    /// provider account (`session.idp`, `subject`) if there is one; else the user with the
    /// e-mail address, linked now, if the provider verified the address and that user has
    /// no linked account yet; else, if no user has the address, a new user named after it,
    /// linked now, holding the address only if it is verified (an unverified one would
    /// squat it: its real owner could then never sign in with it). Refused for a disabled
    /// user, and when the address belongs to a user this account may not take over
    /// ([`RegistryError::EmailBelongsToAnotherUser`]). The session records whether the
    /// address is verified.
    SignIn {
        /// The new session (its `user` is set by the registry).
        session: Session,
        /// Display name from the provider, for a user created now.
        display_name: Option<String>,
        /// The ID token's `sub` claim.
        subject: String,
        /// Whether the address is verified: the ID token's `email_verified` claim (absent
        /// means false), or the provider's `trust_email`.
        email_verified: bool,
    },
    /// New tokens from the provider for a session.
    RefreshSession {
        /// The session.
        id: SessionId,
        /// The new refresh token, if the provider rotated it.
        refresh_token: Option<warren_proto::Secret>,
        /// When the new tokens expire.
        token_expires_at: Option<u64>,
        /// Groups as the provider now lists them.
        groups: Vec<String>,
    },
    /// End a session (sign-out, revocation, refused refresh).
    RevokeSession {
        /// The session.
        id: SessionId,
    },
    /// Mark a one-time sign-in handoff code as used; refused if it already was.
    ConsumeHandoff {
        /// The code's random id.
        id: u128,
        /// When the code expires (it is forgotten after).
        expires_at: u64,
    },
    /// Store the proxy's keys unless the cluster already has some (the first node wins).
    EnsureProxyKeys(ProxyKeys),
    /// Store a one-time site enrollment token.
    CreateSiteToken(SiteTokenRecord),
    /// Use up a site token (an agent enrolled with it); refused if it is gone or expired.
    ConsumeSiteToken {
        /// Its id.
        id: u64,
    },
    /// Take (or renew, or with `until` 0 release) the ACME ordering lease for `node`;
    /// refused while another node holds an unexpired one.
    AcmeLease {
        /// The node.
        node: u64,
        /// Until when.
        until: u64,
    },
    /// Store the ACME account unless one is stored already (the first wins).
    AcmeAccount(warren_proto::Secret),
    /// Publish an HTTP-01 answer.
    AcmeChallenge {
        /// The challenge token.
        token: String,
        /// The key authorization to answer with.
        key_authorization: String,
        /// When to forget it.
        expires_at: u64,
    },
    /// Withdraw an HTTP-01 answer.
    AcmeChallengeDone {
        /// The challenge token.
        token: String,
    },
    /// Store a session opened without single sign-on (PIN, passcode, e-mail code, share
    /// link), good for one resource.
    CreateSession(Session),
    /// Store a share link.
    CreateShareLink(ShareLink),
    /// Delete a share link (sessions it opened stay until they expire or are revoked).
    RevokeShareLink {
        /// Its id.
        id: u64,
    },
    /// Add a new signing key (the newest signs) and drop all but the two newest.
    RotateSigningKey(warren_proto::session::SigningKey),
    /// Count one try at a guessable secret (PIN, passcode, e-mailed code) before it is
    /// checked; refused with [`RegistryError::TooManyAttempts`] when `limit` tries of
    /// `client` at `key` already count. A try counts for `window` seconds from the
    /// request's time unless released.
    ReserveAttempt {
        /// Whose tries.
        attempt: AttemptKey,
        /// Random id of this try, to release it.
        id: u128,
        /// Most tries that may count at once (1 to 1000).
        limit: u32,
        /// How long a try counts, in seconds (1 to 86 400).
        window: u64,
    },
    /// The try `id` succeeded: it no longer counts (successful users behind one address are
    /// never locked out by their own tries). Releasing an unknown try does nothing.
    ReleaseAttempt {
        /// Whose tries.
        attempt: AttemptKey,
        /// The id given to [`Command::ReserveAttempt`].
        id: u128,
    },
    /// Use up a one-time code e-mailed to open `resource` (the code form sealed its id and
    /// expiry); refused if the code expired, was used already or would outlive
    /// [`MAX_EMAIL_CODE_TTL`], or the resource no longer exists.
    ConsumeEmailCode {
        /// The code's random id.
        id: u128,
        /// When the code expires (it is forgotten after).
        expires_at: u64,
        /// The resource the code opens.
        resource: Name,
    },
    /// Register the machine a user signed in on with the `warren` client (format 2). The
    /// owner must exist and not be disabled; `session`, if given, must be a live session
    /// of the owner at the request's time. A key already registered to the same owner is
    /// the same machine signing in again: that device keeps its name and address and gets
    /// the new session, OS, last-seen time and address (idempotent). A key registered to
    /// another user is refused ([`RegistryError::DeviceKeyTaken`]), and so is a name
    /// another device has. A new device gets the next address of
    /// [`warren_proto::registry::DEVICE_POOL`], never one given before. Its times are the
    /// request's `at`.
    RegisterDevice {
        /// The device's name, unique across the cluster.
        name: Name,
        /// The user it belongs to (from the verified session, never from the client).
        owner: Name,
        /// Its WireGuard public key.
        public_key: WgKey,
        /// Operating system, free text.
        os: String,
        /// The client session it registers with.
        session: Option<SessionId>,
        /// The public address the client called from.
        address: Option<IpAddr>,
    },
    /// Record that a device was seen (format 2): its last-seen time becomes the request's
    /// `at`, and its last address `address` when one is given.
    TouchDevice {
        /// The device.
        name: Name,
        /// The public address it called from.
        address: Option<IpAddr>,
    },
    /// Record a site agent's WireGuard public key (format 2), as the agent announced it on
    /// its tunnel (the node holding the tunnel writes it; the agent's certificate named the
    /// site). Client devices reach the site's agent with it.
    SetSiteKey {
        /// The site.
        site: Name,
        /// The agent's static public key.
        key: WgKey,
    },
    /// Record where a node's relay listens (format 2), as the node itself says at start.
    SetNodeRelay {
        /// The node.
        node: Name,
        /// `ip:port` (UDP) clients and agents reach its relay on.
        relay: String,
    },
    /// `command` (a `Create`, `Update` or `Apply`) with the [side
    /// fields](warren_proto::registry::side_field) of the entities it carries (format 3),
    /// which the binary encoding of `command` leaves out. Applied as `command` with `side`
    /// put back on its entities; [`Request::new`](crate::types::Request::new) wraps every
    /// command whose entities have a side field set, so callers never build this.
    WithSide {
        /// The command.
        command: Box<Command>,
        /// Its entities' side fields, by kind and name.
        side: Side,
    },
    /// Name the cluster (format 3): the title its sign-in and error pages show. `None`
    /// clears it (the pages then say "Warren").
    SetClusterTitle {
        /// 1 to 64 characters, no control characters.
        title: Option<String>,
    },
    /// [`Command::RegisterNode`] as joins send it from format 3 on: a registration by a
    /// name whose previous registration never became a member keeps that id, so a join
    /// that failed after registering (the node could not be reached, say) burns no id. An
    /// id that was ever in a membership since it was registered is never given again: a
    /// Raft voter that lost its state must not come back under the same id.
    RegisterJoiningNode {
        /// Unique name.
        name: Name,
        /// `host:port` for the cluster transport.
        cluster_addr: String,
        /// `host:port` of its admin API.
        admin_addr: String,
        /// Region label.
        region: String,
        /// What the join token admits it as.
        role: NodeRole,
    },
    // Keep `Annotate` LAST: it exists only in `format-next` builds, so a variant after it
    // would have another index (another encoding) in those builds than in normal ones. New
    // commands go above this comment (and into `format::command_format`).
    /// Test only (`format-next` builds): a harmless command of a format no release has,
    /// accepted and otherwise ignored, to test that a cluster refuses it until every member
    /// reads it.
    #[cfg(feature = "format-next")]
    Annotate {
        /// Free text.
        note: String,
    },
}

/// A successful command's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The entity as stored after a create or update.
    Entity(AnyEntity),
    /// The entity is gone; other entities changed with it (a user leaves its roles).
    Deleted {
        /// Follow-on changes.
        cascaded: Vec<Change>,
    },
    /// The API key as stored.
    ApiKey(ApiKeyRecord),
    /// The join token as stored.
    JoinToken(JoinTokenRecord),
    /// The node as stored.
    Node(Node),
    /// What an apply changed.
    Applied(ApplyReport),
    /// An agent enrolled for this site.
    SiteEnrolled {
        /// The site.
        site: Name,
    },
    /// A sign-in was recorded for this user.
    SignedIn {
        /// The user (found or created).
        user: Name,
        /// Whether the user was created by this sign-in.
        created: bool,
    },
    /// Nothing to report.
    Done,
    /// The device as stored after a registration or a touch.
    Device(Device),
    /// Format 3: an [`Outcome::Entity`] whose side fields are set, as the registry keeps
    /// and sends it (the entity's binary encoding leaves them out, so they travel beside
    /// it). [`Cluster::write`](crate::cluster::Cluster::write) answers with the
    /// `Outcome::Entity` again.
    SidedEntity {
        /// The entity, side fields at their defaults.
        entity: AnyEntity,
        /// Its side fields.
        side: Side,
    },
}

impl Outcome {
    /// An [`Outcome::Entity`] with side fields set as an [`Outcome::SidedEntity`].
    fn sided(self) -> Outcome {
        let Outcome::Entity(e) = self else {
            return self;
        };
        match Command::Create(e).with_side() {
            Command::WithSide { command, side } => match *command {
                Command::Create(entity) => Outcome::SidedEntity { entity, side },
                other => unreachable!("with_side wraps what it is given: {other:?}"),
            },
            Command::Create(e) => Outcome::Entity(e),
            other => unreachable!("with_side returns a Create or WithSide: {other:?}"),
        }
    }

    /// An [`Outcome::SidedEntity`] as the [`Outcome::Entity`] it stands for.
    pub fn unsided(self) -> Outcome {
        let Outcome::SidedEntity { entity, side } = self else {
            return self;
        };
        match (Command::WithSide {
            command: Box::new(Command::Create(entity)),
            side,
        })
        .effective()
        .into_owned()
        {
            Command::Create(e) => Outcome::Entity(e),
            other => unreachable!("effective unwraps what it is given: {other:?}"),
        }
    }
}

/// Why a command was refused. The registry is unchanged when one is returned (only the
/// bookkeeping of applied requests records it; see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RegistryError {
    /// A field has a bad value; the caller's fault.
    #[error("{kind} {name:?}: {field}: {reason}")]
    Invalid {
        /// Kind of entity.
        kind: Kind,
        /// Its name (may be empty when the name itself is bad).
        name: String,
        /// Offending field.
        field: String,
        /// What was expected.
        reason: String,
    },
    /// A field names an entity that does not exist; the caller's fault.
    #[error("{kind} {name:?}: {field} refers to {target_kind} {target:?}, which does not exist")]
    UnknownReference {
        /// Kind of the referring entity.
        kind: Kind,
        /// Its name.
        name: Name,
        /// Field holding the reference.
        field: String,
        /// Kind referred to.
        target_kind: Kind,
        /// Name referred to.
        target: Name,
    },
    /// The name, or a value that must be unique, is taken; the caller's fault.
    #[error("{kind} {name:?} {detail}")]
    AlreadyExists {
        /// Kind of entity.
        kind: Kind,
        /// Its name.
        name: String,
        /// The field that must be unique (`name` for the name itself).
        field: String,
        /// Sentence end: "already exists", or what holds the value.
        detail: String,
    },
    /// No such entity; the caller's fault.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// Kind of entity.
        kind: Kind,
        /// Its name.
        name: String,
    },
    /// Another entity still refers to this one; the caller must change that one first.
    #[error("{kind} {name:?} is in use: {by_kind} {by_name:?} refers to it in {field}")]
    InUse {
        /// Kind of entity.
        kind: Kind,
        /// Its name.
        name: Name,
        /// Kind of the referring entity.
        by_kind: Kind,
        /// Name of the referring entity.
        by_name: Name,
        /// Field of the referring entity.
        field: String,
    },
    /// The entity changed since the revision the caller based its change on.
    #[error(
        "{kind} {name:?} is at revision {actual}, not {expected}: it changed since it was read"
    )]
    RevisionConflict {
        /// Kind of entity.
        kind: Kind,
        /// Its name.
        name: Name,
        /// Revision the caller expected.
        expected: u64,
        /// Revision stored.
        actual: u64,
    },
    /// The API key that sent the write was revoked before the write applied.
    #[error("the API key was revoked")]
    Unauthorized,
    /// The API key that sent the write may not write.
    #[error("this API key is read-only")]
    Forbidden,
    /// The command does not fit the cluster's state (e.g. deleting a node that is a member).
    #[error("{message}")]
    Conflict {
        /// What is in the way.
        message: String,
    },
    /// A sign-in's e-mail address belongs to a user this provider account may not take
    /// over: the provider did not verify the address, or the user is linked to another
    /// provider account already. The signer's problem (an admin can delete or re-address
    /// the user); nothing was changed.
    #[error("the e-mail address belongs to user {user:?}, which this sign-in may not take over")]
    EmailBelongsToAnotherUser {
        /// The user holding the address.
        user: Name,
    },
    /// The user a sign-in is for is disabled; nothing was changed.
    #[error("user {user:?} is disabled")]
    UserDisabled {
        /// The user.
        user: Name,
    },
    /// Too many tries at a guessable secret from this client: it must wait. The client's
    /// fault; nothing was counted.
    #[error("too many attempts; try again in {retry_after} s")]
    TooManyAttempts {
        /// Seconds until the oldest counted try leaves the window.
        retry_after: u64,
    },
    /// A device registration presented a WireGuard key that another user's device has.
    /// The registrant's fault (a copied or forged key); which device holds it is not said.
    #[error("this WireGuard public key belongs to another user's device")]
    DeviceKeyTaken,
    /// The session a device registration names is not a live session of the device's
    /// owner (it ended, was revoked, or is someone else's); the caller must sign in again.
    #[error("session {session} is not a live session of user {owner:?}")]
    SessionNotLive {
        /// The session named.
        session: SessionId,
        /// The device's owner.
        owner: Name,
    },
    /// Every address of a pool the cluster allocates from was given out (addresses are
    /// never reused). The operator's problem: delete unused entities will not help.
    #[error("no address is left in {pool}")]
    PoolExhausted {
        /// The pool, like `100.64.0.0/10`.
        pool: String,
    },
    /// A first sign-in through a provider with `auto_create: false` matched no user (no
    /// linked account, no user with its verified e-mail address): an admin must add the
    /// user first. Nothing was changed.
    #[error("no user matches this sign-in, and provider {provider:?} does not create users")]
    NotInvited {
        /// The provider signed in with.
        provider: Name,
    },
}

/// Checks a cluster title: 1 to 64 characters, not all spaces, no control characters.
pub fn check_title(t: &str) -> Result<(), &'static str> {
    if t.trim().is_empty() || t.chars().count() > 64 || t.chars().any(char::is_control) {
        return Err("a title is 1 to 64 characters, not all spaces, with no control characters");
    }
    Ok(())
}

impl RegistryError {
    fn invalid(kind: Kind, name: &str, e: FieldError) -> Self {
        RegistryError::Invalid {
            kind,
            name: name.to_owned(),
            field: e.field,
            reason: e.reason,
        }
    }
}

/// The replicated registry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Registry {
    cluster_id: u128,
    next_node_id: u64,
    users: OrdMap<Name, User>,
    roles: OrdMap<Name, Role>,
    identity_providers: OrdMap<Name, IdentityProvider>,
    sites: OrdMap<Name, Site>,
    resources: OrdMap<Name, Resource>,
    policies: OrdMap<Name, Policy>,
    api_keys: OrdMap<Name, ApiKeyRecord>,
    join_tokens: OrdMap<u64, JoinTokenRecord>,
    nodes: OrdMap<Name, Node>,
    certificates: OrdMap<Name, Certificate>,
    sessions: OrdMap<SessionId, Session>,
    session_expiry: imbl::OrdSet<(u64, SessionId)>,
    /// Used one-time codes, `(expires_at, id)`: sign-in handoffs and e-mailed codes (both
    /// ids are 128 random bits), each kept until it expires.
    used_handoffs: imbl::OrdSet<(u64, u128)>,
    proxy_keys: Option<ProxyKeys>,
    share_links: OrdMap<u64, ShareLink>,
    site_tokens: OrdMap<u64, SiteTokenRecord>,
    acme: AcmeState,
    /// Provider accounts -> the user they sign in as. Beside `users`, not in `User`, so a
    /// manifest's `apply` never touches it; a deleted user's links go with it.
    identities: OrdMap<ProviderSubject, Name>,
    /// Counted tries at guessable secrets, cluster-wide.
    attempts: OrdMap<AttemptKey, AttemptRecord>,
    /// `(expires_at, key)` of every record in `attempts`, to forget them in order.
    attempt_expiry: imbl::OrdSet<(u64, AttemptKey)>,
    // Arc'd: entries are cloned whenever a shared tree node is copied on write.
    dedup: OrdMap<RequestId, Arc<(u64, Reply)>>,
    dedup_order: Vector<(u64, RequestId)>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    applied_requests: u64,
    digest: u64,
    /// What format 2 added. It stays the last field: format 1's layout is then a prefix of
    /// the registry's (bincode writes a struct as its fields one after another), which is
    /// how format-1 snapshots are read and how a registry holding nothing of format 2 is
    /// still written as format 1 (see [`Registry::encode_snapshot`]).
    since_v2: SinceV2,
    /// What format 3 added, after format 2's fields for the same reason.
    since_v3: SinceV3,
    #[serde(skip)]
    keys_by_id: OrdMap<KeyId, Name>,
    #[serde(skip)]
    nodes_by_id: OrdMap<NodeId, Name>,
    #[serde(skip)]
    devices_by_key: OrdMap<WgKey, Name>,
}

/// The registry's fields that format 2 brought (see `Registry::since_v2`). Format 3 would
/// add a `SinceV3` after it, the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SinceV2 {
    /// Devices by name.
    devices: OrdMap<Name, Device>,
    /// Offset in [`DEVICE_POOL`] of the last device address given (0: none yet).
    last_device_address: u32,
    /// Offset in [`VIRTUAL_POOL`] of the last virtual address given (0: none yet).
    last_virtual_address: u32,
    /// Site agents' WireGuard public keys.
    site_keys: OrdMap<Name, WgKey>,
    /// Nodes' relay addresses (`ip:port`, UDP).
    node_relays: OrdMap<Name, String>,
    /// The newest format of any request applied (refused ones too: their replies are
    /// remembered): a snapshot needs at least this format. Bookkeeping, like the digest.
    highest_format: Format,
}

/// The registry's fields that format 3 brought (see `Registry::since_v3`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SinceV3 {
    /// The cluster's title ([`Command::SetClusterTitle`]).
    title: Option<String>,
    /// Side fields of identity providers, by name. Filled only while a snapshot is
    /// written and read: in memory they live on the entities.
    provider_sides: OrdMap<Name, ProviderSide>,
    /// Side fields of resources, the same way.
    resource_sides: OrdMap<Name, ResourceSide>,
    /// Ids given by [`Command::RegisterJoiningNode`] that no membership has held since:
    /// the ones a registration by the same name may take again. Only format-3 commands
    /// add to it, and every membership entry takes its ids out, so replaying the log and
    /// installing a snapshot of any format agree on it.
    unadmitted: imbl::OrdSet<NodeId>,
}

/// The [side fields](warren_proto::registry::side_field) of the entities a command carries
/// (see [`Command::WithSide`]): only those that are not the default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    /// Identity providers' side fields, by name.
    pub providers: Vec<(Name, ProviderSide)>,
    /// Resources' side fields, by name.
    pub resources: Vec<(Name, ResourceSide)>,
}

impl Side {
    fn is_empty(&self) -> bool {
        self.providers.is_empty() && self.resources.is_empty()
    }
}

/// 100.64.0.0/10: the first address and the number of addresses.
const DEVICE_POOL: (u32, u32) = (0x6440_0000, 1 << 22);
/// 100.100.0.0/16, inside [`DEVICE_POOL`].
const VIRTUAL_POOL: (u32, u32) = (0x6464_0000, 1 << 16);

/// The address after offset `last` of a pool of `size` addresses starting at `base`,
/// skipping the network address (offset 0) and the offsets in `skip`; `None` when the pool
/// is used up.
fn next_in_pool(base: u32, size: u32, last: u32, skip: Option<(u32, u32)>) -> Option<u32> {
    let mut next = last.checked_add(1)?;
    if let Some((from, len)) = skip {
        if (from..from + len).contains(&next) {
            next = from + len;
        }
    }
    (next < size)
        .then_some(next)
        .filter(|_| base.checked_add(next).is_some())
}

/// Access to one declarative entity's table, for the generic create/update/delete.
pub trait Table: Entity {
    /// The table.
    fn table(r: &Registry) -> &OrdMap<Name, Self>;
    /// The table, mutably.
    fn table_mut(r: &mut Registry) -> &mut OrdMap<Name, Self>;
    /// Wraps into [`AnyEntity`].
    fn wrap(self) -> AnyEntity;
    /// Checks values that must be unique across the table (other than the name).
    fn check_unique(&self, _r: &Registry) -> Result<(), RegistryError> {
        Ok(())
    }
    /// Sets what the cluster decides rather than the caller (after every check passed, just
    /// before the entity is stored; `current` is the stored version of an update). May
    /// take from the registry's counters; fails before it changes anything.
    fn settle(&mut self, _current: Option<&Self>, _r: &mut Registry) -> Result<(), RegistryError> {
        Ok(())
    }
}

macro_rules! table {
    ($ty:ty, $field:ident, $variant:ident) => {
        impl Table for $ty {
            fn table(r: &Registry) -> &OrdMap<Name, Self> {
                &r.$field
            }
            fn table_mut(r: &mut Registry) -> &mut OrdMap<Name, Self> {
                &mut r.$field
            }
            fn wrap(self) -> AnyEntity {
                AnyEntity::$variant(self)
            }
        }
    };
    ($ty:ty, $field:ident, $variant:ident, unique = $check:path) => {
        impl Table for $ty {
            fn table(r: &Registry) -> &OrdMap<Name, Self> {
                &r.$field
            }
            fn table_mut(r: &mut Registry) -> &mut OrdMap<Name, Self> {
                &mut r.$field
            }
            fn wrap(self) -> AnyEntity {
                AnyEntity::$variant(self)
            }
            fn check_unique(&self, r: &Registry) -> Result<(), RegistryError> {
                $check(self, r)
            }
        }
    };
}

table!(User, users, User, unique = unique_email);
table!(Role, roles, Role);
table!(IdentityProvider, identity_providers, IdentityProvider);
table!(Site, sites, Site);
impl Table for Resource {
    fn table(r: &Registry) -> &OrdMap<Name, Self> {
        &r.resources
    }
    fn table_mut(r: &mut Registry) -> &mut OrdMap<Name, Self> {
        &mut r.resources
    }
    fn wrap(self) -> AnyEntity {
        AnyEntity::Resource(self)
    }
    fn check_unique(&self, r: &Registry) -> Result<(), RegistryError> {
        unique_route(self, r)?;
        unique_alias(self, r)
    }
    fn settle(&mut self, current: Option<&Self>, r: &mut Registry) -> Result<(), RegistryError> {
        settle_virtual_address(self, current, r)
    }
}
table!(Policy, policies, Policy);
table!(Certificate, certificates, Certificate);

fn unique_email(u: &User, r: &Registry) -> Result<(), RegistryError> {
    let Some(email) = &u.email else {
        return Ok(());
    };
    let taken = r.users.values().find(|other| {
        other.name != u.name
            && other
                .email
                .as_deref()
                .is_some_and(|e| e.eq_ignore_ascii_case(email))
    });
    match taken {
        Some(other) => Err(RegistryError::AlreadyExists {
            kind: Kind::User,
            name: u.name.to_string(),
            field: "email".into(),
            detail: format!(
                "cannot use {email:?}: user {:?} has it",
                other.name.as_str()
            ),
        }),
        None => Ok(()),
    }
}

/// A private resource's virtual address: kept from the stored version while the address
/// stays a DNS name, a new one from the pool when it becomes one, none otherwise (a value
/// the caller sent is never kept).
fn settle_virtual_address(
    res: &mut Resource,
    current: Option<&Resource>,
    r: &mut Registry,
) -> Result<(), RegistryError> {
    let Route::Private {
        address,
        virtual_address,
        ..
    } = &mut res.route
    else {
        return Ok(());
    };
    if !matches!(address, PrivateAddress::Dns(_)) {
        *virtual_address = None;
        return Ok(());
    }
    let kept = current.and_then(|c| match &c.route {
        Route::Private {
            address: PrivateAddress::Dns(_),
            virtual_address,
            ..
        } => *virtual_address,
        _ => None,
    });
    if let Some(kept) = kept {
        *virtual_address = Some(kept);
        return Ok(());
    }
    let (base, size) = VIRTUAL_POOL;
    let offset =
        next_in_pool(base, size, r.since_v2.last_virtual_address, None).ok_or_else(|| {
            RegistryError::PoolExhausted {
                pool: warren_proto::registry::VIRTUAL_POOL.into(),
            }
        })?;
    r.since_v2.last_virtual_address = offset;
    *virtual_address = Some(Ipv4Addr::from(base + offset));
    Ok(())
}

/// A private resource's alias is unique among aliases and resource names (clients look a
/// resource up by either).
fn unique_alias(res: &Resource, r: &Registry) -> Result<(), RegistryError> {
    let taken = |what: &str, other: &Name| RegistryError::AlreadyExists {
        kind: Kind::Resource,
        name: res.name.to_string(),
        field: "route.private.alias".into(),
        detail: format!(
            "cannot use this alias: resource {:?} {what}",
            other.as_str()
        ),
    };
    if let Some(alias) = res.alias() {
        for other in r.resources.values().filter(|o| o.name != res.name) {
            if other.alias() == Some(alias) {
                return Err(taken("has it", &other.name));
            }
            if other.name.as_str() == alias {
                return Err(taken("is named so", &other.name));
            }
        }
    }
    let named = r
        .resources
        .values()
        .find(|o| o.name != res.name && o.alias() == Some(res.name.as_str()));
    match named {
        Some(other) => Err(RegistryError::AlreadyExists {
            kind: Kind::Resource,
            name: res.name.to_string(),
            field: "name".into(),
            detail: format!(
                "cannot use this name: resource {:?} has it as its alias",
                other.name.as_str()
            ),
        }),
        None => Ok(()),
    }
}

fn route_key(route: &Route) -> (u8, String, u16) {
    match route {
        Route::Http {
            domain,
            path_prefix,
        } => {
            let prefix = path_prefix.as_deref().unwrap_or("/");
            (0, format!("{domain}{prefix}"), 0)
        }
        Route::Tcp { port } => (1, String::new(), *port),
        Route::Udp { port } => (2, String::new(), *port),
        // Private resources may share addresses: never compared (see `unique_route`).
        Route::Private { .. } => (3, String::new(), 0),
    }
}

fn unique_route(res: &Resource, r: &Registry) -> Result<(), RegistryError> {
    if res.is_private() {
        return Ok(());
    }
    let key = route_key(&res.route);
    let taken = r
        .resources
        .values()
        .find(|other| other.name != res.name && route_key(&other.route) == key);
    match taken {
        Some(other) => {
            let (field, what) = match &res.route {
                Route::Http { .. } => ("route.http", "domain and path prefix"),
                Route::Tcp { .. } => ("route.tcp.port", "TCP port"),
                Route::Udp { .. } => ("route.udp.port", "UDP port"),
                Route::Private { .. } => ("route.private", "address"),
            };
            Err(RegistryError::AlreadyExists {
                kind: Kind::Resource,
                name: res.name.to_string(),
                field: field.into(),
                detail: format!(
                    "cannot use this {what}: resource {:?} has it",
                    other.name.as_str()
                ),
            })
        }
        None => Ok(()),
    }
}

impl Registry {
    /// Stored certificates.
    pub fn certificates(&self) -> &OrdMap<Name, Certificate> {
        &self.certificates
    }

    /// Live sessions (some may have expired since the last write purged them: check
    /// `expires_at`).
    pub fn sessions(&self) -> &OrdMap<SessionId, Session> {
        &self.sessions
    }

    /// ACME state.
    pub fn acme(&self) -> &AcmeState {
        &self.acme
    }

    /// Unused site enrollment tokens.
    pub fn site_tokens(&self) -> &OrdMap<u64, SiteTokenRecord> {
        &self.site_tokens
    }

    /// Share links.
    pub fn share_links(&self) -> &OrdMap<u64, ShareLink> {
        &self.share_links
    }

    /// Provider accounts and the users they sign in as.
    pub fn identities(&self) -> &OrdMap<ProviderSubject, Name> {
        &self.identities
    }

    /// Counted tries at guessable secrets (some may have left their window since the last
    /// write purged them).
    pub fn attempts(&self) -> &OrdMap<AttemptKey, AttemptRecord> {
        &self.attempts
    }

    /// The proxy's keys, once a node created them.
    pub fn proxy_keys(&self) -> Option<&ProxyKeys> {
        self.proxy_keys.as_ref()
    }

    /// The cluster's id (0 before bootstrap).
    pub fn cluster_id(&self) -> u128 {
        self.cluster_id
    }

    /// The last log entry applied.
    pub fn last_applied(&self) -> Option<LogId> {
        self.last_applied
    }

    /// A running digest of every entry applied so far (log ids, request ids, membership):
    /// two replicas at the same applied index have applied the same sequence exactly when
    /// their digests are equal.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// How many writes were applied since the cluster began (retries included).
    pub fn applied_requests(&self) -> u64 {
        self.applied_requests
    }

    /// The reply a write with this request id got when it was applied, if it is among the
    /// last writes remembered for deduplication.
    pub fn remembered_reply(&self, id: RequestId) -> Option<&Reply> {
        self.dedup.get(&id).map(|seen| &seen.1)
    }

    /// Whether every write ever applied is still remembered (none has left the
    /// deduplication window), so that a request id not remembered was never applied.
    pub fn remembers_every_write(&self) -> bool {
        self.applied_requests <= DEDUP_WINDOW as u64
    }

    /// How many entities the registry holds: what a snapshot costs, roughly.
    pub fn size(&self) -> usize {
        self.users.len()
            + self.roles.len()
            + self.identity_providers.len()
            + self.sites.len()
            + self.resources.len()
            + self.policies.len()
            + self.api_keys.len()
            + self.join_tokens.len()
            + self.nodes.len()
            + self.identities.len()
            + self.attempts.len()
            + self.dedup.len()
            + self.since_v2.devices.len()
    }

    /// The membership as of the last applied entry.
    pub fn membership(&self) -> &StoredMembership {
        &self.membership
    }

    /// Users by name.
    pub fn users(&self) -> &OrdMap<Name, User> {
        &self.users
    }

    /// Roles by name.
    pub fn roles(&self) -> &OrdMap<Name, Role> {
        &self.roles
    }

    /// Identity providers by name.
    pub fn identity_providers(&self) -> &OrdMap<Name, IdentityProvider> {
        &self.identity_providers
    }

    /// Sites by name.
    pub fn sites(&self) -> &OrdMap<Name, Site> {
        &self.sites
    }

    /// Resources by name.
    pub fn resources(&self) -> &OrdMap<Name, Resource> {
        &self.resources
    }

    /// Policies by name.
    pub fn policies(&self) -> &OrdMap<Name, Policy> {
        &self.policies
    }

    /// API keys by name.
    pub fn api_keys(&self) -> &OrdMap<Name, ApiKeyRecord> {
        &self.api_keys
    }

    /// Join tokens by id.
    pub fn join_tokens(&self) -> &OrdMap<u64, JoinTokenRecord> {
        &self.join_tokens
    }

    /// Nodes by name.
    pub fn nodes(&self) -> &OrdMap<Name, Node> {
        &self.nodes
    }

    /// The nodes that may be members (voter- and learner-grade): every node but the
    /// relay-only ones, which serve no cluster or client API and hold no tunnel.
    pub fn member_grade_nodes(&self) -> impl Iterator<Item = &Node> + '_ {
        self.nodes.values().filter(|n| n.role != NodeRole::Relay)
    }

    /// Every node's relay address as recorded (`ip:port`), with the node.
    pub fn node_relays(&self) -> impl Iterator<Item = (&Node, &str)> + '_ {
        self.nodes
            .values()
            .filter_map(|n| Some((n, self.node_relay(&n.name)?)))
    }

    /// The WireGuard public key site `site`'s agent announced.
    pub fn site_key(&self, site: &Name) -> Option<&WgKey> {
        self.since_v2.site_keys.get(site)
    }

    /// Where node `node`'s relay listens, as it said.
    pub fn node_relay(&self, node: &Name) -> Option<&str> {
        self.since_v2.node_relays.get(node).map(String::as_str)
    }

    /// The cluster's title ([`Command::SetClusterTitle`]), if one was set.
    pub fn title(&self) -> Option<&str> {
        self.since_v3.title.as_deref()
    }

    /// Devices by name.
    pub fn devices(&self) -> &OrdMap<Name, Device> {
        &self.since_v2.devices
    }

    /// The device with this WireGuard public key.
    pub fn device_by_key(&self, key: &WgKey) -> Option<&Device> {
        self.devices_by_key
            .get(key)
            .and_then(|n| self.since_v2.devices.get(n))
    }

    /// The devices of `owner`, by name (a scan: listing one user's devices is rare).
    pub fn devices_of<'a>(&'a self, owner: &'a Name) -> impl Iterator<Item = &'a Device> + 'a {
        self.since_v2
            .devices
            .values()
            .filter(move |d| d.owner == *owner)
    }

    /// A node by id.
    pub fn node_by_id(&self, id: NodeId) -> Option<&Node> {
        self.nodes_by_id.get(&id).and_then(|n| self.nodes.get(n))
    }

    /// A node's place in the membership.
    pub fn member_role(&self, id: NodeId) -> MemberRole {
        let m = self.membership.membership();
        if m.voter_ids().any(|v| v == id) {
            MemberRole::Voter
        } else if m.learner_ids().any(|l| l == id) {
            MemberRole::Learner
        } else {
            MemberRole::None
        }
    }

    /// The stored key record if `key` is a valid, unrevoked API key.
    pub fn authenticate(&self, key: &ApiKey) -> Option<&ApiKeyRecord> {
        let name = self.keys_by_id.get(&key.id)?;
        let record = self.api_keys.get(name)?;
        record.hash.matches(key.secret()).then_some(record)
    }

    /// Whether a join token with this id and secret is valid.
    pub fn join_token_valid(&self, id: u64, secret: &[u8; 32]) -> bool {
        self.join_token(id, secret).is_some()
    }

    /// The stored join token with this id, if `secret` is its secret.
    pub fn join_token(&self, id: u64, secret: &[u8; 32]) -> Option<&JoinTokenRecord> {
        self.join_tokens.get(&id).filter(|t| t.hash.matches(secret))
    }

    /// An entity by kind and name, as [`AnyEntity`] (declarative kinds only).
    pub fn entity(&self, kind: Kind, name: &Name) -> Option<AnyEntity> {
        match kind {
            Kind::User => self.users.get(name).cloned().map(AnyEntity::User),
            Kind::Role => self.roles.get(name).cloned().map(AnyEntity::Role),
            Kind::IdentityProvider => self
                .identity_providers
                .get(name)
                .cloned()
                .map(AnyEntity::IdentityProvider),
            Kind::Site => self.sites.get(name).cloned().map(AnyEntity::Site),
            Kind::Resource => self.resources.get(name).cloned().map(AnyEntity::Resource),
            Kind::Policy => self.policies.get(name).cloned().map(AnyEntity::Policy),
            Kind::Certificate => self
                .certificates
                .get(name)
                .cloned()
                .map(AnyEntity::Certificate),
            Kind::ApiKey | Kind::Node | Kind::JoinToken | Kind::Device => None,
        }
    }

    fn exists(&self, kind: Kind, name: &Name) -> bool {
        match kind {
            Kind::User => self.users.contains_key(name),
            Kind::Role => self.roles.contains_key(name),
            Kind::IdentityProvider => self.identity_providers.contains_key(name),
            Kind::Site => self.sites.contains_key(name),
            Kind::Resource => self.resources.contains_key(name),
            Kind::Policy => self.policies.contains_key(name),
            Kind::ApiKey => self.api_keys.contains_key(name),
            Kind::Node => self.nodes.contains_key(name),
            Kind::Certificate => self.certificates.contains_key(name),
            Kind::Device => self.since_v2.devices.contains_key(name),
            Kind::JoinToken => false,
        }
    }

    /// Applies one log entry: bookkeeping for blank and membership entries, every request
    /// of a normal one. Returns the replies for the clients (none for bookkeeping entries).
    pub fn apply_entry(&mut self, entry: &Entry) -> Replies {
        self.last_applied = Some(entry.log_id);
        self.digest = digest_entry(self.digest, entry);
        match &entry.payload {
            EntryPayload::Blank => Vec::new(),
            EntryPayload::Membership(m) => {
                for (id, _) in m.nodes() {
                    self.since_v3.unadmitted.remove(id);
                }
                for id in m.voter_ids() {
                    self.since_v3.unadmitted.remove(&id);
                }
                self.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                Vec::new()
            }
            EntryPayload::Normal(Proposal(reqs)) => reqs
                .iter()
                .map(|req| self.apply_request(entry.log_id.index, req))
                .collect(),
        }
    }

    /// Applies a request at log index `index`, answering a retried request with the reply
    /// it got the first time. A refusal is remembered like a success (see the module
    /// docs): the registry's tables are as they were.
    pub fn apply_request(&mut self, index: u64, req: &Request) -> Reply {
        self.applied_requests += 1;
        let needs = format::request_format(req);
        if needs > self.since_v2.highest_format {
            self.since_v2.highest_format = needs;
        }
        if let Some(seen) = self.dedup.get(&req.id) {
            return seen.1.clone();
        }
        let reply = match req.command.effective() {
            std::borrow::Cow::Borrowed(_) => self
                .authorize(req)
                .and_then(|()| self.apply_command(index, req)),
            std::borrow::Cow::Owned(command) => {
                let req = Request {
                    id: req.id,
                    at: req.at,
                    actor: req.actor,
                    command,
                };
                self.authorize(&req)
                    .and_then(|()| self.apply_command(index, &req))
            }
        };
        let reply = reply.map(Outcome::sided);
        self.remember(index, req.id, reply.clone());
        reply
    }

    fn authorize(&self, req: &Request) -> Result<(), RegistryError> {
        match req.actor {
            Actor::System => Ok(()),
            Actor::ApiKey(id) => {
                if cluster_only(&req.command) {
                    return Err(RegistryError::Forbidden);
                }
                let record = self
                    .keys_by_id
                    .get(&id)
                    .and_then(|n| self.api_keys.get(n))
                    .ok_or(RegistryError::Unauthorized)?;
                match record.scope {
                    Scope::Admin => Ok(()),
                    Scope::ReadOnly => Err(RegistryError::Forbidden),
                }
            }
        }
    }

    fn remember(&mut self, index: u64, id: RequestId, reply: Reply) {
        self.dedup.insert(id, Arc::new((index, reply)));
        self.dedup_order.push_back((index, id));
        while self.dedup_order.len() > DEDUP_WINDOW {
            if let Some((_, old)) = self.dedup_order.pop_front() {
                self.dedup.remove(&old);
            }
        }
    }

    /// Applies a command. Every command checks everything before it changes anything, so
    /// an error leaves the registry as it was; the multi-step ones (bootstrap, manifest)
    /// work on an O(1) clone that replaces the registry only when all steps succeeded.
    fn apply_command(&mut self, index: u64, req: &Request) -> Result<Outcome, RegistryError> {
        if matches!(
            req.command,
            Command::Bootstrap { .. } | Command::Apply { .. }
        ) {
            let mut next = self.clone();
            let outcome = next.apply_checked(index, req)?;
            *self = next;
            return Ok(outcome);
        }
        self.apply_checked(index, req)
    }

    fn apply_checked(&mut self, index: u64, req: &Request) -> Result<Outcome, RegistryError> {
        match &req.command {
            Command::Bootstrap {
                cluster_id,
                node,
                api_key,
                join_token,
            } => {
                if self.cluster_id != 0 {
                    return Err(RegistryError::Conflict {
                        message: "the cluster is already bootstrapped".into(),
                    });
                }
                self.cluster_id = *cluster_id;
                self.next_node_id = node.id.0 + 1;
                let mut node = node.clone();
                node.revision = index;
                self.insert_node(node);
                self.insert_api_key(api_key.clone(), index)?;
                self.insert_join_token(join_token.clone(), index);
                Ok(Outcome::Done)
            }
            Command::Create(e) => self.create_any(e.clone(), index).map(Outcome::Entity),
            Command::Update(e) => self
                .update_any(e.clone(), index)
                .map(|(e, _)| Outcome::Entity(e)),
            Command::Delete {
                kind,
                name,
                revision,
            } => self
                .delete(*kind, name, *revision, index)
                .map(|cascaded| Outcome::Deleted { cascaded }),
            Command::Apply { manifest, prune } => self
                .apply_manifest(manifest, *prune, index)
                .map(Outcome::Applied),
            Command::CreateApiKey(record) => {
                let mut record = record.clone();
                record.created_at = req.at;
                self.insert_api_key(record, index).map(Outcome::ApiKey)
            }
            Command::RevokeApiKey { name } => self.revoke_api_key(name).map(|()| Outcome::Done),
            Command::CreateJoinToken(record) => {
                let mut record = record.clone();
                record.created_at = req.at;
                if self.join_tokens.contains_key(&record.id) {
                    return Err(RegistryError::AlreadyExists {
                        kind: Kind::JoinToken,
                        name: format!("{:016x}", record.id),
                        field: "id".into(),
                        detail: "already exists".into(),
                    });
                }
                Ok(Outcome::JoinToken(self.insert_join_token(record, index)))
            }
            Command::RevokeJoinToken { id } => {
                if self.join_tokens.remove(id).is_none() {
                    return Err(RegistryError::NotFound {
                        kind: Kind::JoinToken,
                        name: format!("{id:016x}"),
                    });
                }
                Ok(Outcome::Done)
            }
            Command::RegisterNode {
                name,
                cluster_addr,
                admin_addr,
                region,
                role,
            }
            | Command::RegisterJoiningNode {
                name,
                cluster_addr,
                admin_addr,
                region,
                role,
            } => self
                .register_node(
                    NodeRegistration {
                        name,
                        cluster_addr,
                        admin_addr,
                        region,
                        role: *role,
                    },
                    index,
                    matches!(req.command, Command::RegisterJoiningNode { .. }),
                )
                .map(Outcome::Node),
            Command::UpdateNode {
                name,
                region,
                revision,
            } => {
                let mut node = self
                    .nodes
                    .get(name)
                    .cloned()
                    .ok_or(RegistryError::NotFound {
                        kind: Kind::Node,
                        name: name.to_string(),
                    })?;
                if *revision != 0 && *revision != node.revision {
                    return Err(RegistryError::RevisionConflict {
                        kind: Kind::Node,
                        name: name.clone(),
                        expected: *revision,
                        actual: node.revision,
                    });
                }
                node.region = region.clone();
                node.validate()
                    .map_err(|e| RegistryError::invalid(Kind::Node, name.as_str(), e))?;
                node.revision = index;
                self.insert_node(node.clone());
                Ok(Outcome::Node(node))
            }
            Command::DeleteNode { name } => {
                let node = self.nodes.get(name).ok_or(RegistryError::NotFound {
                    kind: Kind::Node,
                    name: name.to_string(),
                })?;
                if self.member_role(node.id) != MemberRole::None {
                    return Err(RegistryError::Conflict {
                        message: format!(
                            "node {:?} is a member of the cluster; remove it from the membership first",
                            name.as_str()
                        ),
                    });
                }
                let id = node.id;
                self.nodes.remove(name);
                self.nodes_by_id.remove(&id);
                self.since_v3.unadmitted.remove(&id);
                Ok(Outcome::Done)
            }
            Command::SignIn {
                session,
                display_name,
                subject,
                email_verified,
            } => {
                let identity = ProviderSubject {
                    idp: session.idp.clone(),
                    subject: subject.clone(),
                };
                self.sign_in(
                    session.clone(),
                    display_name.clone(),
                    identity,
                    *email_verified,
                    index,
                    req.at,
                )
            }
            Command::RefreshSession {
                id,
                refresh_token,
                token_expires_at,
                groups,
            } => {
                let mut session =
                    self.sessions
                        .get(id)
                        .cloned()
                        .ok_or_else(|| RegistryError::NotFound {
                            kind: Kind::User,
                            name: format!("session {id}"),
                        })?;
                if refresh_token.is_some() {
                    session.refresh_token = refresh_token.clone();
                }
                session.token_expires_at = *token_expires_at;
                session.groups = groups.clone();
                self.sessions.insert(*id, session);
                Ok(Outcome::Done)
            }
            Command::RevokeSession { id } => {
                let session = self
                    .sessions
                    .remove(id)
                    .ok_or_else(|| RegistryError::NotFound {
                        kind: Kind::User,
                        name: format!("session {id}"),
                    })?;
                self.session_expiry.remove(&(session.expires_at, *id));
                Ok(Outcome::Done)
            }
            Command::ConsumeHandoff { id, expires_at } => self
                .consume_code(*id, *expires_at, req.at, "this sign-in link")
                .map(|()| Outcome::Done),
            Command::EnsureProxyKeys(keys) => {
                if self.proxy_keys.is_none() {
                    self.proxy_keys = Some(keys.clone());
                }
                Ok(Outcome::Done)
            }
            Command::CreateSession(session) => {
                self.create_session(session, req.at).map(|()| Outcome::Done)
            }
            Command::AcmeLease { node, until } => {
                if let Some((holder, held_until)) = self.acme.lease {
                    if holder != *node && held_until > req.at {
                        return Err(RegistryError::Conflict {
                            message: format!("node {holder} holds the ACME lease"),
                        });
                    }
                }
                self.acme.lease = (*until > req.at).then_some((*node, *until));
                Ok(Outcome::Done)
            }
            Command::AcmeAccount(credentials) => {
                if self.acme.account.is_none() {
                    self.acme.account = Some(credentials.clone());
                }
                Ok(Outcome::Done)
            }
            Command::AcmeChallenge {
                token,
                key_authorization,
                expires_at,
            } => {
                if token.len() > 256 || key_authorization.len() > 512 {
                    return Err(RegistryError::Conflict {
                        message: "challenge too long".into(),
                    });
                }
                let now = req.at;
                forget_where(&mut self.acme.challenges, |(_, exp)| *exp <= now);
                self.acme
                    .challenges
                    .insert(token.clone(), (key_authorization.clone(), *expires_at));
                Ok(Outcome::Done)
            }
            Command::AcmeChallengeDone { token } => {
                self.acme.challenges.remove(token);
                Ok(Outcome::Done)
            }
            Command::CreateSiteToken(record) => {
                if !self.sites.contains_key(&record.site) {
                    return Err(RegistryError::NotFound {
                        kind: Kind::Site,
                        name: record.site.to_string(),
                    });
                }
                if self.site_tokens.contains_key(&record.id) {
                    return Err(RegistryError::AlreadyExists {
                        kind: Kind::Site,
                        name: format!("token {:016x}", record.id),
                        field: "id".into(),
                        detail: "already exists".into(),
                    });
                }
                forget_where(&mut self.site_tokens, |t| t.expires_at < req.at);
                let mut record = record.clone();
                record.created_at = req.at;
                self.site_tokens.insert(record.id, record);
                Ok(Outcome::Done)
            }
            Command::ConsumeSiteToken { id } => {
                let token = self
                    .site_tokens
                    .get(id)
                    .cloned()
                    .ok_or(RegistryError::Conflict {
                        message: "the site token is unknown or was already used".into(),
                    })?;
                if token.expires_at < req.at {
                    return Err(RegistryError::Conflict {
                        message: "the site token has expired".into(),
                    });
                }
                if !self.sites.contains_key(&token.site) {
                    return Err(RegistryError::Conflict {
                        message: format!("site {:?} no longer exists", token.site.as_str()),
                    });
                }
                self.site_tokens.remove(id);
                Ok(Outcome::SiteEnrolled { site: token.site })
            }
            Command::CreateShareLink(link) => {
                if !self.resources.contains_key(&link.resource) {
                    return Err(RegistryError::NotFound {
                        kind: Kind::Resource,
                        name: link.resource.to_string(),
                    });
                }
                if self.share_links.contains_key(&link.id) {
                    return Err(RegistryError::AlreadyExists {
                        kind: Kind::Resource,
                        name: format!("share link {:016x}", link.id),
                        field: "id".into(),
                        detail: "already exists".into(),
                    });
                }
                let mut link = link.clone();
                link.created_at = req.at;
                // Forget links that expired.
                forget_where(&mut self.share_links, |l| l.expires_at < req.at);
                self.share_links.insert(link.id, link);
                Ok(Outcome::Done)
            }
            Command::RevokeShareLink { id } => self
                .share_links
                .remove(id)
                .map(|_| Outcome::Done)
                .ok_or_else(|| RegistryError::NotFound {
                    kind: Kind::Resource,
                    name: format!("share link {id:016x}"),
                }),
            Command::RotateSigningKey(key) => {
                let keys = self.proxy_keys.as_mut().ok_or(RegistryError::Conflict {
                    message: "the cluster has no proxy keys yet".into(),
                })?;
                keys.signing_keys.push(key.clone());
                let excess = keys.signing_keys.len().saturating_sub(2);
                keys.signing_keys.drain(..excess);
                Ok(Outcome::Done)
            }
            Command::ReserveAttempt {
                attempt,
                id,
                limit,
                window,
            } => self
                .reserve_attempt(attempt, *id, *limit, *window, req.at)
                .map(|()| Outcome::Done),
            Command::ReleaseAttempt { attempt, id } => {
                self.release_attempt(attempt, *id);
                Ok(Outcome::Done)
            }
            Command::ConsumeEmailCode {
                id,
                expires_at,
                resource,
            } => {
                if !self.resources.contains_key(resource) {
                    return Err(RegistryError::NotFound {
                        kind: Kind::Resource,
                        name: resource.to_string(),
                    });
                }
                if *expires_at > req.at.saturating_add(MAX_EMAIL_CODE_TTL) {
                    return Err(RegistryError::Conflict {
                        message: format!(
                            "an e-mail code is valid for at most {MAX_EMAIL_CODE_TTL} s"
                        ),
                    });
                }
                self.consume_code(*id, *expires_at, req.at, "this code")
                    .map(|()| Outcome::Done)
            }
            Command::RegisterDevice {
                name,
                owner,
                public_key,
                os,
                session,
                address,
            } => self
                .register_device(
                    DeviceRegistration {
                        name,
                        owner,
                        public_key: *public_key,
                        os,
                        session: *session,
                        address: *address,
                    },
                    index,
                    req.at,
                )
                .map(Outcome::Device),
            Command::TouchDevice { name, address } => {
                let mut device = self.since_v2.devices.get(name).cloned().ok_or_else(|| {
                    RegistryError::NotFound {
                        kind: Kind::Device,
                        name: name.to_string(),
                    }
                })?;
                device.last_seen = req.at;
                if address.is_some() {
                    device.last_address = *address;
                }
                device.revision = index;
                self.since_v2.devices.insert(name.clone(), device.clone());
                Ok(Outcome::Device(device))
            }
            Command::SetSiteKey { site, key } => {
                if !self.sites.contains_key(site) {
                    return Err(RegistryError::NotFound {
                        kind: Kind::Site,
                        name: site.to_string(),
                    });
                }
                self.since_v2.site_keys.insert(site.clone(), *key);
                Ok(Outcome::Done)
            }
            Command::SetNodeRelay { node, relay } => {
                if !self.nodes.contains_key(node) {
                    return Err(RegistryError::NotFound {
                        kind: Kind::Node,
                        name: node.to_string(),
                    });
                }
                if relay.parse::<std::net::SocketAddr>().is_err() {
                    return Err(RegistryError::Invalid {
                        kind: Kind::Node,
                        name: node.to_string(),
                        field: "relay".into(),
                        reason: format!("expected ip:port, got {relay:?}"),
                    });
                }
                self.since_v2
                    .node_relays
                    .insert(node.clone(), relay.clone());
                Ok(Outcome::Done)
            }
            // `effective` unwrapped it; what is left is a nested one, which nothing builds.
            Command::WithSide { .. } => Err(RegistryError::Conflict {
                message: "a command with side fields cannot carry another one".into(),
            }),
            Command::SetClusterTitle { title } => {
                if let Some(t) = title {
                    check_title(t).map_err(|reason| RegistryError::Invalid {
                        kind: Kind::Node,
                        name: String::new(),
                        field: "title".into(),
                        reason: reason.into(),
                    })?;
                }
                self.since_v3.title = title.clone();
                Ok(Outcome::Done)
            }
            #[cfg(feature = "format-next")]
            Command::Annotate { .. } => Ok(Outcome::Done),
        }
    }

    /// Registers a device or signs the same machine in again; see
    /// [`Command::RegisterDevice`].
    fn register_device(
        &mut self,
        reg: DeviceRegistration<'_>,
        index: u64,
        now: u64,
    ) -> Result<Device, RegistryError> {
        let user = self
            .users
            .get(reg.owner)
            .ok_or_else(|| RegistryError::NotFound {
                kind: Kind::User,
                name: reg.owner.to_string(),
            })?;
        if user.disabled {
            return Err(RegistryError::UserDisabled {
                user: user.name.clone(),
            });
        }
        if let Some(id) = reg.session {
            let live = self
                .sessions
                .get(&id)
                .is_some_and(|s| s.user == *reg.owner && s.expires_at >= now);
            if !live {
                return Err(RegistryError::SessionNotLive {
                    session: id,
                    owner: reg.owner.clone(),
                });
            }
        }
        let invalid = |e: FieldError| RegistryError::invalid(Kind::Device, reg.name.as_str(), e);
        warren_proto::registry::check_text(reg.os, Device::MAX_OS)
            .map_err(|e| invalid(e.within("os")))?;
        if let Some(existing) = self.device_by_key(&reg.public_key) {
            if existing.owner != *reg.owner {
                return Err(RegistryError::DeviceKeyTaken);
            }
            // The same machine signing in again keeps its name and address.
            let mut device = existing.clone();
            device.os = reg.os.to_owned();
            device.session = reg.session;
            device.last_seen = now;
            device.last_address = reg.address.or(device.last_address);
            device.revision = index;
            self.since_v2
                .devices
                .insert(device.name.clone(), device.clone());
            return Ok(device);
        }
        if self.since_v2.devices.contains_key(reg.name) {
            return Err(RegistryError::AlreadyExists {
                kind: Kind::Device,
                name: reg.name.to_string(),
                field: "name".into(),
                detail: "already exists".into(),
            });
        }
        let (base, size) = DEVICE_POOL;
        let offset = next_in_pool(
            base,
            size,
            self.since_v2.last_device_address,
            Some((VIRTUAL_POOL.0 - base, VIRTUAL_POOL.1)),
        )
        .ok_or_else(|| RegistryError::PoolExhausted {
            pool: warren_proto::registry::DEVICE_POOL.into(),
        })?;
        let device = Device {
            name: reg.name.clone(),
            owner: reg.owner.clone(),
            public_key: reg.public_key,
            os: reg.os.to_owned(),
            address: Ipv4Addr::from(base + offset),
            session: reg.session,
            created_at: now,
            last_seen: now,
            last_address: reg.address,
            revision: index,
        };
        self.since_v2.last_device_address = offset;
        self.devices_by_key
            .insert(device.public_key, device.name.clone());
        self.since_v2
            .devices
            .insert(device.name.clone(), device.clone());
        Ok(device)
    }

    /// Counts a try unless `limit` tries already count; see [`Command::ReserveAttempt`].
    fn reserve_attempt(
        &mut self,
        attempt: &AttemptKey,
        id: u128,
        limit: u32,
        window: u64,
        now: u64,
    ) -> Result<(), RegistryError> {
        if attempt.key.is_empty() || attempt.key.len() > MAX_ATTEMPT_KEY {
            return Err(RegistryError::Conflict {
                message: format!("an attempt key has 1 to {MAX_ATTEMPT_KEY} bytes"),
            });
        }
        if !(1..=1000).contains(&limit) || !(1..=86_400).contains(&window) {
            return Err(RegistryError::Conflict {
                message: "an attempt limit is 1 to 1000 tries within 1 s to 1 day".into(),
            });
        }
        let mut record = self.attempts.get(attempt).cloned().unwrap_or_default();
        if record.counted(now) >= limit as usize {
            return Err(RegistryError::TooManyAttempts {
                retry_after: record.retry_after(now),
            });
        }
        self.forget_attempts(now);
        if let Some(old) = self.attempts.get(attempt) {
            self.attempt_expiry
                .remove(&(old.expires_at(), attempt.clone()));
        } else if self.attempts.len() >= MAX_ATTEMPT_RECORDS {
            if let Some(first) = self.attempt_expiry.get_min().cloned() {
                self.attempt_expiry.remove(&first);
                self.attempts.remove(&first.1);
            }
        }
        record.tries.retain(|t| t.0 > now);
        record.tries.push((now.saturating_add(window), id));
        self.attempt_expiry
            .insert((record.expires_at(), attempt.clone()));
        self.attempts.insert(attempt.clone(), record);
        Ok(())
    }

    /// Stops counting the try `id`; see [`Command::ReleaseAttempt`].
    fn release_attempt(&mut self, attempt: &AttemptKey, id: u128) {
        let Some(mut record) = self.attempts.get(attempt).cloned() else {
            return;
        };
        let Some(i) = record.tries.iter().position(|t| t.1 == id) else {
            return;
        };
        self.attempt_expiry
            .remove(&(record.expires_at(), attempt.clone()));
        record.tries.remove(i);
        if record.tries.is_empty() {
            self.attempts.remove(attempt);
        } else {
            self.attempt_expiry
                .insert((record.expires_at(), attempt.clone()));
            self.attempts.insert(attempt.clone(), record);
        }
    }

    /// Forgets attempt records whose every try left its window before `now`.
    fn forget_attempts(&mut self, now: u64) {
        while let Some(first) = self.attempt_expiry.get_min().cloned() {
            if first.0 > now {
                break;
            }
            self.attempt_expiry.remove(&first);
            self.attempts.remove(&first.1);
        }
    }

    /// Marks the one-time code `id` (a sign-in handoff or an e-mailed code, `what` in the
    /// refusal) used; refused if it expired before `now` or was used already. A used code
    /// is remembered until it expires: it could not be used after anyway.
    fn consume_code(
        &mut self,
        id: u128,
        expires_at: u64,
        now: u64,
        what: &str,
    ) -> Result<(), RegistryError> {
        if expires_at < now {
            return Err(RegistryError::Conflict {
                message: format!("{what} has expired"),
            });
        }
        if self.used_handoffs.contains(&(expires_at, id)) {
            return Err(RegistryError::Conflict {
                message: format!("{what} was already used"),
            });
        }
        while let Some(first) = self.used_handoffs.get_min().copied() {
            if first.0 >= now {
                break;
            }
            self.used_handoffs.remove(&first);
        }
        self.used_handoffs.insert((expires_at, id));
        Ok(())
    }

    /// Stores a session opened without single sign-on; see [`Command::CreateSession`].
    fn create_session(&mut self, session: &Session, now: u64) -> Result<(), RegistryError> {
        let Some(resource) = &session.resource else {
            return Err(RegistryError::Conflict {
                message: "a session without single sign-on names its resource".into(),
            });
        };
        if session.via == Via::Sso || !self.resources.contains_key(resource) {
            return Err(RegistryError::Conflict {
                message: format!("resource {:?} does not exist", resource.as_str()),
            });
        }
        if self.session_live(session.id, now) {
            return Err(RegistryError::AlreadyExists {
                kind: Kind::User,
                name: format!("session {}", session.id),
                field: "id".into(),
                detail: "already exists".into(),
            });
        }
        self.expire_sessions(now);
        self.session_expiry.insert((session.expires_at, session.id));
        self.sessions.insert(session.id, session.clone());
        Ok(())
    }

    /// Whether the session `id` is stored and has not ended before `now` (one that ended is
    /// only waiting for the next successful session write to forget it, and its id is
    /// free).
    fn session_live(&self, id: SessionId, now: u64) -> bool {
        self.sessions.get(&id).is_some_and(|s| s.expires_at >= now)
    }

    /// Forgets sessions that ended before `now`. Only a command that stores a session calls
    /// it, once its checks have passed.
    fn expire_sessions(&mut self, now: u64) {
        while let Some(first) = self.session_expiry.get_min().copied() {
            if first.0 >= now {
                break;
            }
            self.session_expiry.remove(&first);
            self.sessions.remove(&first.1);
        }
    }

    fn sign_in(
        &mut self,
        mut session: Session,
        display_name: Option<String>,
        identity: ProviderSubject,
        email_verified: bool,
        index: u64,
        now: u64,
    ) -> Result<Outcome, RegistryError> {
        if self.session_live(session.id, now) {
            return Err(RegistryError::AlreadyExists {
                kind: Kind::User,
                name: format!("session {}", session.id),
                field: "id".into(),
                detail: "already exists".into(),
            });
        }
        if identity.subject.is_empty() || identity.subject.len() > MAX_SUBJECT {
            return Err(RegistryError::Invalid {
                kind: Kind::User,
                name: String::new(),
                field: "subject".into(),
                reason: format!("the ID token's sub claim has 1 to {MAX_SUBJECT} bytes"),
            });
        }
        let linked = self
            .identities
            .get(&identity)
            .and_then(|n| self.users.get(n))
            .cloned();
        let (user, created) = match linked {
            Some(u) if u.disabled => return Err(RegistryError::UserDisabled { user: u.name }),
            Some(u) => (u.name, false),
            None => match self.user_by_email(&session.email).cloned() {
                // An unverified address proves nothing, and a user already linked to an
                // account belongs to that account: neither is taken over by e-mail.
                Some(u) if !email_verified || self.has_identity(&u.name) => {
                    return Err(RegistryError::EmailBelongsToAnotherUser { user: u.name })
                }
                Some(u) if u.disabled => return Err(RegistryError::UserDisabled { user: u.name }),
                Some(u) => (u.name, false),
                None if !self
                    .identity_providers
                    .get(&session.idp)
                    .is_none_or(|p| p.auto_create) =>
                {
                    return Err(RegistryError::NotInvited {
                        provider: session.idp.clone(),
                    })
                }
                None => (
                    self.provision_user(&session.email, email_verified, display_name, index)?,
                    true,
                ),
            },
        };
        // Every check passed (and a user made now is the last thing that could fail).
        self.expire_sessions(now);
        self.identities.insert(identity, user.clone());
        session.user = user.clone();
        session.email_verified = email_verified;
        self.session_expiry.insert((session.expires_at, session.id));
        self.sessions.insert(session.id, session);
        Ok(Outcome::SignedIn { user, created })
    }

    /// The user with this e-mail address (compared case-insensitively).
    fn user_by_email(&self, email: &str) -> Option<&User> {
        self.users.values().find(|u| {
            u.email
                .as_deref()
                .is_some_and(|e| e.eq_ignore_ascii_case(email))
        })
    }

    /// Whether any provider account is linked to `user`.
    fn has_identity(&self, user: &Name) -> bool {
        self.identities.values().any(|u| u == user)
    }

    /// Creates a user for a first sign-in with `email`, named after the address; the user
    /// holds the address only if it is `verified`.
    fn provision_user(
        &mut self,
        email: &str,
        verified: bool,
        display_name: Option<String>,
        index: u64,
    ) -> Result<Name, RegistryError> {
        let mut base = user_name_from_email(email);
        if !verified {
            // Never the name the address's owner would get: a policy on `user: dave` must
            // not let in whoever claimed dave's address unverified first.
            const MARK: &str = "-unverified";
            base.truncate(Name::MAX_LEN - 4 - MARK.len());
            base.push_str(MARK);
        }
        let name = (1..=1000)
            .map(|i| {
                if i == 1 {
                    base.clone()
                } else {
                    format!("{base}-{i}")
                }
            })
            .filter_map(|n| Name::new(n).ok())
            .find(|n| !self.users.contains_key(n))
            .ok_or_else(|| RegistryError::Conflict {
                message: "no free user name for this e-mail address".into(),
            })?;
        let mut user = User {
            name: name.clone(),
            email: verified.then(|| email.to_owned()),
            display_name: display_name
                .filter(|d| warren_proto::registry::check_text(d, 256).is_ok()),
            disabled: false,
            revision: 0,
        };
        user.validate()
            .map_err(|e| RegistryError::invalid(Kind::User, name.as_str(), e))?;
        user.revision = index;
        self.users.insert(name.clone(), user);
        Ok(name)
    }

    fn insert_node(&mut self, node: Node) {
        self.nodes_by_id.insert(node.id, node.name.clone());
        self.nodes.insert(node.name.clone(), node);
    }

    fn insert_api_key(
        &mut self,
        mut record: ApiKeyRecord,
        index: u64,
    ) -> Result<ApiKeyRecord, RegistryError> {
        if self.api_keys.contains_key(&record.name) {
            return Err(RegistryError::AlreadyExists {
                kind: Kind::ApiKey,
                name: record.name.to_string(),
                field: "name".into(),
                detail: "already exists".into(),
            });
        }
        if self.keys_by_id.contains_key(&record.id) {
            return Err(RegistryError::AlreadyExists {
                kind: Kind::ApiKey,
                name: record.name.to_string(),
                field: "id".into(),
                detail: "has an id already in use; create it again".into(),
            });
        }
        record.revision = index;
        self.keys_by_id.insert(record.id, record.name.clone());
        self.api_keys.insert(record.name.clone(), record.clone());
        Ok(record)
    }

    fn revoke_api_key(&mut self, name: &Name) -> Result<(), RegistryError> {
        let record = self.api_keys.get(name).ok_or(RegistryError::NotFound {
            kind: Kind::ApiKey,
            name: name.to_string(),
        })?;
        let admins = self
            .api_keys
            .values()
            .filter(|k| k.scope == Scope::Admin)
            .count();
        if record.scope == Scope::Admin && admins == 1 {
            return Err(RegistryError::Conflict {
                message: format!(
                    "API key {:?} is the last admin key; create another admin key before revoking it",
                    name.as_str()
                ),
            });
        }
        let id = record.id;
        self.api_keys.remove(name);
        self.keys_by_id.remove(&id);
        Ok(())
    }

    fn insert_join_token(&mut self, mut record: JoinTokenRecord, index: u64) -> JoinTokenRecord {
        record.revision = index;
        self.join_tokens.insert(record.id, record.clone());
        record
    }

    fn register_node(
        &mut self,
        r: NodeRegistration<'_>,
        index: u64,
        keep_unadmitted_id: bool,
    ) -> Result<Node, RegistryError> {
        let NodeRegistration {
            name,
            cluster_addr,
            admin_addr,
            region,
            role,
        } = r;
        let kept = self
            .nodes
            .get(name)
            .map(|old| old.id)
            .filter(|id| keep_unadmitted_id && self.since_v3.unadmitted.contains(id));
        let node = Node {
            id: kept.unwrap_or(NodeId(self.next_node_id)),
            name: name.clone(),
            cluster_addr: cluster_addr.to_owned(),
            admin_addr: admin_addr.to_owned(),
            region: region.to_owned(),
            revision: index,
            role,
        };
        node.validate()
            .map_err(|e| RegistryError::invalid(Kind::Node, name.as_str(), e))?;
        if let Some(old) = self.nodes.get(name) {
            if self.member_role(old.id) != MemberRole::None {
                return Err(RegistryError::AlreadyExists {
                    kind: Kind::Node,
                    name: name.to_string(),
                    field: "name".into(),
                    detail:
                        "is already a member of the cluster; pick another name or remove it first"
                            .into(),
                });
            }
        }
        if let Some(other) = self
            .nodes
            .values()
            .find(|n| n.name != *name && n.cluster_addr == cluster_addr)
        {
            if self.member_role(other.id) != MemberRole::None {
                return Err(RegistryError::AlreadyExists {
                    kind: Kind::Node,
                    name: name.to_string(),
                    field: "cluster_addr".into(),
                    detail: format!(
                        "cannot use cluster address {cluster_addr}: member node {:?} has it",
                        other.name.as_str()
                    ),
                });
            }
        }
        if let Some(old) = self.nodes.get(name) {
            self.nodes_by_id.remove(&old.id);
            self.since_v3.unadmitted.remove(&old.id);
        }
        if kept.is_none() {
            self.next_node_id += 1;
        }
        if keep_unadmitted_id {
            self.since_v3.unadmitted.insert(node.id);
        }
        self.insert_node(node.clone());
        Ok(node)
    }

    fn check_refs<E: Entity>(&self, e: &E) -> Result<(), RegistryError> {
        for r in e.references() {
            if !self.exists(r.kind, &r.name) {
                return Err(RegistryError::UnknownReference {
                    kind: E::KIND,
                    name: e.name().clone(),
                    field: r.field,
                    target_kind: r.kind,
                    target: r.name,
                });
            }
        }
        Ok(())
    }

    /// Entities that refer to `(kind, name)`: `(their kind, their name, field)`.
    fn referrers(&self, kind: Kind, name: &Name) -> Vec<(Kind, Name, String)> {
        let mut out = Vec::new();
        let mut scan = |k: Kind, n: &Name, refs: Vec<warren_proto::registry::Reference>| {
            for r in refs {
                if r.kind == kind && r.name == *name {
                    out.push((k, n.clone(), r.field));
                }
            }
        };
        if kind == Kind::User {
            for role in self.roles.values() {
                scan(Kind::Role, &role.name, role.references());
            }
        }
        if matches!(kind, Kind::Site | Kind::Policy) {
            for res in self.resources.values() {
                scan(Kind::Resource, &res.name, res.references());
            }
        }
        out
    }

    fn create<E: Table>(&mut self, mut e: E, index: u64) -> Result<E, RegistryError> {
        if e.revision() != 0 {
            return Err(RegistryError::Invalid {
                kind: E::KIND,
                name: e.name().to_string(),
                field: "revision".into(),
                reason: "the revision is set by the cluster; leave it out when creating".into(),
            });
        }
        e.validate()
            .map_err(|f| RegistryError::invalid(E::KIND, e.name().as_str(), f))?;
        if E::table(self).contains_key(e.name()) {
            return Err(RegistryError::AlreadyExists {
                kind: E::KIND,
                name: e.name().to_string(),
                field: "name".into(),
                detail: "already exists".into(),
            });
        }
        self.check_refs(&e)?;
        e.check_unique(self)?;
        e.settle(None, self)?;
        e.set_revision(index);
        E::table_mut(self).insert(e.name().clone(), e.clone());
        Ok(e)
    }

    /// Replaces an entity. Returns it as stored and whether anything changed.
    fn update<E: Table>(&mut self, mut e: E, index: u64) -> Result<(E, bool), RegistryError> {
        let current =
            E::table(self)
                .get(e.name())
                .cloned()
                .ok_or_else(|| RegistryError::NotFound {
                    kind: E::KIND,
                    name: e.name().to_string(),
                })?;
        if e.revision() != 0 && e.revision() != current.revision() {
            return Err(RegistryError::RevisionConflict {
                kind: E::KIND,
                name: e.name().clone(),
                expected: e.revision(),
                actual: current.revision(),
            });
        }
        e.validate()
            .map_err(|f| RegistryError::invalid(E::KIND, e.name().as_str(), f))?;
        self.check_refs(&e)?;
        e.check_unique(self)?;
        e.settle(Some(&current), self)?;
        if current.same_content(&e) {
            return Ok((current, false));
        }
        e.set_revision(index);
        E::table_mut(self).insert(e.name().clone(), e.clone());
        Ok((e, true))
    }

    fn create_any(&mut self, e: AnyEntity, index: u64) -> Result<AnyEntity, RegistryError> {
        Ok(match e {
            AnyEntity::User(e) => self.create(e, index)?.wrap(),
            AnyEntity::Role(e) => self.create(e, index)?.wrap(),
            AnyEntity::IdentityProvider(e) => self.create(e, index)?.wrap(),
            AnyEntity::Site(e) => self.create(e, index)?.wrap(),
            AnyEntity::Resource(e) => self.create(e, index)?.wrap(),
            AnyEntity::Policy(e) => self.create(e, index)?.wrap(),
            AnyEntity::Certificate(e) => self.create(e, index)?.wrap(),
        })
    }

    fn update_any(&mut self, e: AnyEntity, index: u64) -> Result<(AnyEntity, bool), RegistryError> {
        fn w<E: Table>(r: (E, bool)) -> (AnyEntity, bool) {
            (r.0.wrap(), r.1)
        }
        Ok(match e {
            AnyEntity::User(e) => w(self.update(e, index)?),
            AnyEntity::Role(e) => w(self.update(e, index)?),
            AnyEntity::IdentityProvider(e) => w(self.update(e, index)?),
            AnyEntity::Site(e) => w(self.update(e, index)?),
            AnyEntity::Resource(e) => w(self.update(e, index)?),
            AnyEntity::Policy(e) => w(self.update(e, index)?),
            AnyEntity::Certificate(e) => w(self.update(e, index)?),
        })
    }

    fn delete(
        &mut self,
        kind: Kind,
        name: &Name,
        revision: u64,
        index: u64,
    ) -> Result<Vec<Change>, RegistryError> {
        let not_found = || RegistryError::NotFound {
            kind,
            name: name.to_string(),
        };
        let current = match kind {
            Kind::User => self.users.get(name).map(|e| e.revision),
            Kind::Role => self.roles.get(name).map(|e| e.revision),
            Kind::IdentityProvider => self.identity_providers.get(name).map(|e| e.revision),
            Kind::Site => self.sites.get(name).map(|e| e.revision),
            Kind::Resource => self.resources.get(name).map(|e| e.revision),
            Kind::Policy => self.policies.get(name).map(|e| e.revision),
            Kind::Certificate => self.certificates.get(name).map(|e| e.revision),
            Kind::Device => self.since_v2.devices.get(name).map(|e| e.revision),
            Kind::ApiKey | Kind::Node | Kind::JoinToken => {
                return Err(RegistryError::Conflict {
                    message: format!("a {kind} is not deleted with this command"),
                })
            }
        }
        .ok_or_else(not_found)?;
        if revision != 0 && revision != current {
            return Err(RegistryError::RevisionConflict {
                kind,
                name: name.clone(),
                expected: revision,
                actual: current,
            });
        }
        let referrers = self.referrers(kind, name);
        // A user leaving the registry leaves its roles (what admins expect); any other
        // reference blocks the delete. Check all before changing anything.
        let cascades = |k: Kind| kind == Kind::User && k == Kind::Role;
        if let Some((by_kind, by_name, field)) = referrers.iter().find(|(k, _, _)| !cascades(*k)) {
            return Err(RegistryError::InUse {
                kind,
                name: name.clone(),
                by_kind: *by_kind,
                by_name: by_name.clone(),
                field: field.clone(),
            });
        }
        let mut cascaded = Vec::new();
        for (by_kind, by_name, _) in referrers {
            if cascades(by_kind) {
                if let Some(mut role) = self.roles.get(&by_name).cloned() {
                    role.members.remove(name);
                    role.revision = index;
                    self.roles.insert(by_name.clone(), role);
                    cascaded.push(Change {
                        action: ChangeAction::Update,
                        kind: Kind::Role,
                        name: by_name,
                        fields: vec!["members".into()],
                    });
                }
            }
        }
        match kind {
            Kind::User => {
                self.users.remove(name);
                self.forget_identities_of(name);
                // A user's devices go with it.
                let devices: Vec<Name> = self.devices_of(name).map(|d| d.name.clone()).collect();
                for device in devices {
                    self.remove_device(&device);
                    cascaded.push(Change {
                        action: ChangeAction::Delete,
                        kind: Kind::Device,
                        name: device,
                        fields: Vec::new(),
                    });
                }
            }
            Kind::Device => self.remove_device(name),
            Kind::Role => drop(self.roles.remove(name)),
            Kind::IdentityProvider => drop(self.identity_providers.remove(name)),
            Kind::Site => drop(self.sites.remove(name)),
            Kind::Resource => drop(self.resources.remove(name)),
            Kind::Policy => drop(self.policies.remove(name)),
            Kind::Certificate => drop(self.certificates.remove(name)),
            Kind::ApiKey | Kind::Node | Kind::JoinToken => {}
        }
        Ok(cascaded)
    }

    fn remove_device(&mut self, name: &Name) {
        if let Some(d) = self.since_v2.devices.remove(name) {
            self.devices_by_key.remove(&d.public_key);
        }
    }

    /// Forgets the provider accounts linked to `user`.
    fn forget_identities_of(&mut self, user: &Name) {
        let linked: Vec<ProviderSubject> = self
            .identities
            .iter()
            .filter(|(_, u)| *u == user)
            .map(|(k, _)| k.clone())
            .collect();
        for k in linked {
            self.identities.remove(&k);
        }
    }

    /// What applying `manifest` would change, without changing anything.
    pub fn plan_manifest(
        &self,
        manifest: &Manifest,
        prune: bool,
    ) -> Result<ApplyReport, RegistryError> {
        let mut scratch = self.clone();
        let next_index = self.last_applied.map_or(1, |l| l.index + 1);
        let mut report = scratch.apply_manifest(manifest, prune, next_index)?;
        report.dry_run = true;
        Ok(report)
    }

    fn apply_manifest(
        &mut self,
        m: &Manifest,
        prune: bool,
        index: u64,
    ) -> Result<ApplyReport, RegistryError> {
        fn section<T>(s: &Option<Vec<T>>) -> &[T] {
            s.as_deref().unwrap_or_default()
        }
        let mut report = ApplyReport::default();
        // Referenced kinds first, so a manifest can create a site and its resources at once.
        self.sync(section(&m.sites), index, &mut report)?;
        self.sync(section(&m.users), index, &mut report)?;
        self.sync(section(&m.policies), index, &mut report)?;
        self.sync(section(&m.roles), index, &mut report)?;
        self.sync(section(&m.identity_providers), index, &mut report)?;
        self.sync(section(&m.resources), index, &mut report)?;
        if prune {
            // Referring kinds first, so nothing is deleted while still referred to.
            let kinds = m.kinds();
            self.prune(&kinds, section(&m.resources), index, &mut report)?;
            self.prune(&kinds, section(&m.roles), index, &mut report)?;
            self.prune(&kinds, section(&m.identity_providers), index, &mut report)?;
            self.prune(&kinds, section(&m.policies), index, &mut report)?;
            self.prune(&kinds, section(&m.users), index, &mut report)?;
            self.prune(&kinds, section(&m.sites), index, &mut report)?;
        }
        Ok(report)
    }

    fn sync<E: Table>(
        &mut self,
        wanted: &[E],
        index: u64,
        report: &mut ApplyReport,
    ) -> Result<(), RegistryError> {
        let mut seen = BTreeSet::new();
        for e in wanted {
            if !seen.insert(e.name().clone()) {
                return Err(RegistryError::AlreadyExists {
                    kind: E::KIND,
                    name: e.name().to_string(),
                    field: "name".into(),
                    detail: "is listed twice in the manifest".into(),
                });
            }
            let mut e = e.clone();
            // A manifest says what should be, not which revision it was read at.
            e.set_revision(0);
            match E::table(self).get(e.name()).cloned() {
                None => {
                    self.create(e.clone(), index)?;
                    report.changes.push(Change {
                        action: ChangeAction::Create,
                        kind: E::KIND,
                        name: e.name().clone(),
                        fields: Vec::new(),
                    });
                }
                Some(current) => {
                    let (_, changed) = self.update(e.clone(), index)?;
                    if changed {
                        report.changes.push(Change {
                            action: ChangeAction::Update,
                            kind: E::KIND,
                            name: e.name().clone(),
                            fields: changed_fields(&current, &e),
                        });
                    } else {
                        report.unchanged += 1;
                    }
                }
            }
        }
        Ok(())
    }

    fn prune<E: Table>(
        &mut self,
        kinds: &[Kind],
        wanted: &[E],
        index: u64,
        report: &mut ApplyReport,
    ) -> Result<(), RegistryError> {
        if !kinds.contains(&E::KIND) {
            return Ok(());
        }
        let keep: BTreeSet<&Name> = wanted.iter().map(|e| e.name()).collect();
        let gone: Vec<Name> = E::table(self)
            .keys()
            .filter(|n| !keep.contains(n))
            .cloned()
            .collect();
        for name in gone {
            let cascaded = self.delete(E::KIND, &name, 0, index)?;
            report.changes.push(Change {
                action: ChangeAction::Delete,
                kind: E::KIND,
                name,
                fields: Vec::new(),
            });
            report.changes.extend(cascaded);
        }
        Ok(())
    }

    /// Rebuilds the indexes that are derived from the tables (after loading or decoding).
    pub fn rebuild_indexes(&mut self) {
        self.keys_by_id = self
            .api_keys
            .values()
            .map(|k| (k.id, k.name.clone()))
            .collect();
        self.nodes_by_id = self
            .nodes
            .values()
            .map(|n| (n.id, n.name.clone()))
            .collect();
        self.devices_by_key = self
            .since_v2
            .devices
            .values()
            .map(|d| (d.public_key, d.name.clone()))
            .collect();
    }

    /// The oldest format a snapshot of this registry can be written in: format 1 until a
    /// request of a newer format was applied (only those bring what an older format cannot
    /// carry: devices, private resources, device criteria, side fields, a title, their
    /// replies).
    pub fn snapshot_format(&self) -> Format {
        self.since_v2.highest_format.max(Format::V1)
    }

    /// The registry encoded for a snapshot, in [`Registry::snapshot_format`], and that
    /// format.
    pub fn encode_snapshot(&self) -> Result<(Format, Vec<u8>), CodecError> {
        let format = self.snapshot_format();
        if format >= Format::V3 {
            // The side fields, which the entities' binary encoding leaves out, go in the
            // format-3 tail (an O(1) copy of the registry carries them there).
            let mut copy = self.clone();
            copy.since_v3.provider_sides = self
                .identity_providers
                .values()
                .filter(|p| p.side() != ProviderSide::default())
                .map(|p| (p.name.clone(), p.side()))
                .collect();
            copy.since_v3.resource_sides = self
                .resources
                .values()
                .filter(|r| r.side() != ResourceSide::default())
                .map(|r| (r.name.clone(), r.side()))
                .collect();
            return Ok((format, encode("snapshot", &copy)?));
        }
        let sided = self
            .identity_providers
            .values()
            .any(|p| p.side() != ProviderSide::default())
            || self
                .resources
                .values()
                .any(|r| r.side() != ResourceSide::default());
        let mut raw = encode("snapshot", self)?;
        // Formats 1 and 2 are the same bytes without the (default) tails they lack.
        let tail3 = encode("snapshot", &SinceV3::default())?;
        if sided || self.since_v3 != SinceV3::default() || !raw.ends_with(&tail3) {
            return Err(CodecError::Corrupt(
                "a registry of format 1 or 2 holds format-3 state",
            ));
        }
        raw.truncate(raw.len() - tail3.len());
        if format == Format::V1 {
            let tail2 = encode("snapshot", &SinceV2::default())?;
            if self.since_v2 != SinceV2::default() || !raw.ends_with(&tail2) {
                return Err(CodecError::Corrupt(
                    "a registry of format 1 holds format-2 state",
                ));
            }
            raw.truncate(raw.len() - tail2.len());
        }
        Ok((format, raw))
    }

    /// Decodes what [`Registry::encode_snapshot`] wrote in `format` (already checked to be
    /// one this build reads). Indexes are left for [`Registry::rebuild_indexes`].
    pub fn decode_snapshot(format: Format, raw: &[u8]) -> Result<Registry, ReadError> {
        format::check("the snapshot", format)?;
        let mut whole = raw.to_vec();
        if format == Format::V1 {
            whole.extend(encode("snapshot", &SinceV2::default())?);
        }
        if format < Format::V3 {
            whole.extend(encode("snapshot", &SinceV3::default())?);
        }
        // Format 3 and later (the test-only format after it added only a command) as is.
        let mut reg: Registry = decode("snapshot", &whole)?;
        for (name, side) in std::mem::take(&mut reg.since_v3.provider_sides) {
            if let Some(p) = reg.identity_providers.get_mut(&name) {
                p.set_side(side);
            }
        }
        for (name, side) in std::mem::take(&mut reg.since_v3.resource_sides) {
            if let Some(r) = reg.resources.get_mut(&name) {
                r.set_side(side);
            }
        }
        Ok(reg)
    }
}

/// The fields of [`Command::RegisterNode`] and [`Command::RegisterJoiningNode`], borrowed.
struct NodeRegistration<'a> {
    name: &'a Name,
    cluster_addr: &'a str,
    admin_addr: &'a str,
    region: &'a str,
    role: NodeRole,
}

/// The fields of [`Command::RegisterDevice`], borrowed.
struct DeviceRegistration<'a> {
    name: &'a Name,
    owner: &'a Name,
    public_key: WgKey,
    os: &'a str,
    session: Option<SessionId>,
    address: Option<IpAddr>,
}

/// Removes the entries of `map` whose value matches `expired` (time-limited records: ACME
/// answers, site tokens, share links).
fn forget_where<K: Ord + Clone, V: Clone>(map: &mut OrdMap<K, V>, expired: impl Fn(&V) -> bool) {
    let gone: Vec<K> = map
        .iter()
        .filter(|(_, v)| expired(v))
        .map(|(k, _)| k.clone())
        .collect();
    for k in gone {
        map.remove(&k);
    }
}

/// Folds one entry into a running digest (splitmix64 mixing; stable across versions).
fn digest_entry(prev: u64, entry: &Entry) -> u64 {
    fn mix(h: u64, v: u64) -> u64 {
        let mut z = h ^ v.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let mut h = mix(prev, entry.log_id.index);
    h = mix(h, entry.log_id.leader_id.term);
    match &entry.payload {
        EntryPayload::Blank => mix(h, 1),
        EntryPayload::Membership(m) => {
            let mut h = mix(h, 2);
            for config in m.get_joint_config() {
                h = mix(h, u64::MAX);
                for v in config {
                    h = mix(h, v.0);
                }
            }
            for l in m.learner_ids() {
                h = mix(h, l.0 | 1 << 63);
            }
            h
        }
        EntryPayload::Normal(Proposal(reqs)) => {
            let mut h = mix(h, 3);
            for r in reqs {
                h = mix(h, r.id.0 as u64);
                h = mix(h, (r.id.0 >> 64) as u64);
            }
            h
        }
    }
}

/// Top-level fields that differ between two versions of an entity (revision aside).
fn changed_fields<E: Entity>(a: &E, b: &E) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return Vec::new();
    };
    a.iter()
        .filter(|(k, v)| k.as_str() != "revision" && b.get(k.as_str()) != Some(v))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Why stored registry data could not be read back: storage corruption or a bug.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A value did not encode.
    #[error("encoding {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The bincode error.
        source: bincode::error::EncodeError,
    },
    /// A value did not decode.
    #[error("decoding {what}: {source}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The bincode error.
        source: bincode::error::DecodeError,
    },
    /// Stored data is damaged.
    #[error("corrupt data: {0}")]
    Corrupt(&'static str),
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a value with the storage codec (bincode, standard configuration).
pub fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(v, bincode_config())
        .map_err(|source| CodecError::Encode { what, source })
}

/// Decodes a value written by [`encode`].
pub fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    b: &[u8],
) -> Result<T, CodecError> {
    bincode::serde::decode_from_slice(b, bincode_config())
        .map(|(v, _)| v)
        .map_err(|source| CodecError::Decode { what, source })
}

impl Command {
    /// The name of the command's variant, as serde spells it (for logs and tests). No `_`
    /// arm: a new variant does not compile until it is named here, and the registry's
    /// property test and the format fixtures fail until they cover it.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Bootstrap { .. } => "Bootstrap",
            Command::Create(_) => "Create",
            Command::Update(_) => "Update",
            Command::Delete { .. } => "Delete",
            Command::Apply { .. } => "Apply",
            Command::CreateApiKey(_) => "CreateApiKey",
            Command::RevokeApiKey { .. } => "RevokeApiKey",
            Command::CreateJoinToken(_) => "CreateJoinToken",
            Command::RevokeJoinToken { .. } => "RevokeJoinToken",
            Command::RegisterNode { .. } => "RegisterNode",
            Command::UpdateNode { .. } => "UpdateNode",
            Command::DeleteNode { .. } => "DeleteNode",
            Command::SignIn { .. } => "SignIn",
            Command::RefreshSession { .. } => "RefreshSession",
            Command::RevokeSession { .. } => "RevokeSession",
            Command::ConsumeHandoff { .. } => "ConsumeHandoff",
            Command::EnsureProxyKeys(_) => "EnsureProxyKeys",
            Command::CreateSiteToken(_) => "CreateSiteToken",
            Command::ConsumeSiteToken { .. } => "ConsumeSiteToken",
            Command::AcmeLease { .. } => "AcmeLease",
            Command::AcmeAccount(_) => "AcmeAccount",
            Command::AcmeChallenge { .. } => "AcmeChallenge",
            Command::AcmeChallengeDone { .. } => "AcmeChallengeDone",
            Command::CreateSession(_) => "CreateSession",
            Command::CreateShareLink(_) => "CreateShareLink",
            Command::RevokeShareLink { .. } => "RevokeShareLink",
            Command::RotateSigningKey(_) => "RotateSigningKey",
            Command::ReserveAttempt { .. } => "ReserveAttempt",
            Command::ReleaseAttempt { .. } => "ReleaseAttempt",
            Command::ConsumeEmailCode { .. } => "ConsumeEmailCode",
            Command::RegisterDevice { .. } => "RegisterDevice",
            Command::TouchDevice { .. } => "TouchDevice",
            Command::SetSiteKey { .. } => "SetSiteKey",
            Command::SetNodeRelay { .. } => "SetNodeRelay",
            Command::WithSide { .. } => "WithSide",
            Command::SetClusterTitle { .. } => "SetClusterTitle",
            Command::RegisterJoiningNode { .. } => "RegisterJoiningNode",
            #[cfg(feature = "format-next")]
            Command::Annotate { .. } => "Annotate",
        }
    }

    /// The command, wrapped in [`Command::WithSide`] when an entity it carries has a side
    /// field that is not the default (which its binary encoding would lose).
    pub fn with_side(mut self) -> Command {
        if matches!(self, Command::WithSide { .. }) {
            return self;
        }
        let mut side = Side::default();
        self.each_sided(
            |p| {
                let s = p.side();
                if s != ProviderSide::default() {
                    side.providers.push((p.name.clone(), s));
                }
            },
            |r| {
                let s = r.side();
                if s != ResourceSide::default() {
                    side.resources.push((r.name.clone(), s));
                }
            },
        );
        if side.is_empty() {
            self
        } else {
            // The entities keep their defaults (what their encoding carries), so that the
            // command is the same value in memory as decoded.
            self.each_sided(
                |p| p.set_side(ProviderSide::default()),
                |r| r.set_side(ResourceSide::default()),
            );
            Command::WithSide {
                command: Box::new(self),
                side,
            }
        }
    }

    /// Calls `p` on every identity provider and `r` on every resource the command carries.
    fn each_sided(
        &mut self,
        mut p: impl FnMut(&mut IdentityProvider),
        mut r: impl FnMut(&mut Resource),
    ) {
        match self {
            Command::Create(e) | Command::Update(e) => match e {
                AnyEntity::IdentityProvider(x) => p(x),
                AnyEntity::Resource(x) => r(x),
                _ => {}
            },
            Command::Apply { manifest, .. } => {
                manifest.identity_providers.iter_mut().flatten().for_each(p);
                manifest.resources.iter_mut().flatten().for_each(r);
            }
            _ => {}
        }
    }

    /// Whether an entity the command carries has a side field set.
    fn has_side(&self) -> bool {
        let p = |p: &IdentityProvider| p.side() != ProviderSide::default();
        let r = |r: &Resource| r.side() != ResourceSide::default();
        match self {
            Command::Create(e) | Command::Update(e) => match e {
                AnyEntity::IdentityProvider(x) => p(x),
                AnyEntity::Resource(x) => r(x),
                _ => false,
            },
            Command::Apply { manifest, .. } => {
                manifest.identity_providers.iter().flatten().any(p)
                    || manifest.resources.iter().flatten().any(r)
            }
            _ => false,
        }
    }

    /// The command as it is applied: a [`Command::WithSide`] unwrapped with its side
    /// fields put back on its entities; a plain command with every side field at its
    /// default (what its binary encoding carries), so that a request applied straight
    /// from memory (the leader's) does exactly what its decoded copy does on a follower.
    /// Borrowed when nothing changes.
    fn effective(&self) -> std::borrow::Cow<'_, Command> {
        use std::borrow::Cow;
        match self {
            Command::WithSide { command, side } => {
                let mut inner = (**command).clone();
                if matches!(inner, Command::WithSide { .. }) {
                    // Never built (`with_side` does not nest); refused by `apply_checked`.
                    return Cow::Owned(inner);
                }
                fn find<S: Clone + Default>(list: &[(Name, S)], name: &Name) -> S {
                    list.iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, s)| s.clone())
                        .unwrap_or_default()
                }
                inner.each_sided(
                    |p| p.set_side(find(&side.providers, &p.name)),
                    |r| r.set_side(find(&side.resources, &r.name)),
                );
                Cow::Owned(inner)
            }
            plain if plain.has_side() => {
                let mut plain = plain.clone();
                plain.each_sided(
                    |p| p.set_side(ProviderSide::default()),
                    |r| r.set_side(ResourceSide::default()),
                );
                Cow::Owned(plain)
            }
            plain => Cow::Borrowed(plain),
        }
    }
}

/// Whether only the cluster itself (its nodes, as `Actor::System`) may send `command`, never
/// an API key. An exhaustive match: a new command must be placed on one side or the other.
fn cluster_only(command: &Command) -> bool {
    match command {
        Command::Bootstrap { .. }
        | Command::RegisterNode { .. }
        | Command::SignIn { .. }
        | Command::RefreshSession { .. }
        | Command::ConsumeHandoff { .. }
        | Command::EnsureProxyKeys(_)
        | Command::CreateSession(_)
        | Command::ConsumeSiteToken { .. }
        | Command::AcmeLease { .. }
        | Command::AcmeAccount(_)
        | Command::AcmeChallenge { .. }
        | Command::AcmeChallengeDone { .. }
        | Command::ReserveAttempt { .. }
        | Command::ReleaseAttempt { .. }
        | Command::ConsumeEmailCode { .. }
        | Command::RegisterDevice { .. }
        | Command::TouchDevice { .. }
        | Command::SetSiteKey { .. }
        | Command::SetNodeRelay { .. } => true,
        Command::WithSide { command, .. } => cluster_only(command),
        Command::RegisterJoiningNode { .. } => true,
        Command::SetClusterTitle { .. } => false,
        Command::Create(_)
        | Command::Update(_)
        | Command::Delete { .. }
        | Command::Apply { .. }
        | Command::CreateApiKey(_)
        | Command::RevokeApiKey { .. }
        | Command::CreateJoinToken(_)
        | Command::RevokeJoinToken { .. }
        | Command::UpdateNode { .. }
        | Command::DeleteNode { .. }
        | Command::RevokeSession { .. }
        | Command::CreateSiteToken(_)
        | Command::CreateShareLink(_)
        | Command::RevokeShareLink { .. }
        | Command::RotateSigningKey(_) => false,
        #[cfg(feature = "format-next")]
        Command::Annotate { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openraft::{CommittedLeaderId, EntryPayload};
    use proptest::prelude::*;
    use warren_proto::registry::Target;

    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    /// A registry fed log entries one by one, as the state machine does.
    struct Harness {
        reg: Registry,
        index: u64,
        admin: KeyId,
    }

    impl Harness {
        fn new() -> Self {
            let mut h = Self {
                reg: Registry::default(),
                index: 0,
                admin: KeyId(7),
            };
            let node = Node {
                id: NodeId(1),
                name: name("n1"),
                cluster_addr: "127.0.0.1:7400".into(),
                admin_addr: "127.0.0.1:7443".into(),
                region: String::new(),
                revision: 0,
                role: NodeRole::Voter,
            };
            let api_key = ApiKeyRecord {
                name: name("bootstrap"),
                id: h.admin,
                hash: SecretHash([1; 32]),
                scope: Scope::Admin,
                created_at: 0,
                revision: 0,
            };
            let join_token = JoinTokenRecord {
                id: 1,
                hash: SecretHash([2; 32]),
                created_at: 0,
                revision: 0,
                role: NodeRole::Voter,
            };
            h.system(Command::Bootstrap {
                cluster_id: 99,
                node,
                api_key,
                join_token,
            })
            .unwrap();
            h.index += 1;
            let membership = openraft::Membership::new(vec![BTreeSet::from([NodeId(1)])], None);
            let entry = Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, NodeId(1)), h.index),
                payload: EntryPayload::Membership(membership),
            };
            assert!(h.reg.apply_entry(&entry).is_empty());
            assert_eq!(h.reg.member_role(NodeId(1)), MemberRole::Voter);
            h
        }

        fn submit(&mut self, req: Request) -> Reply {
            self.index += 1;
            let entry = Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, NodeId(1)), self.index),
                payload: EntryPayload::Normal(Proposal(vec![req])),
            };
            self.reg.apply_entry(&entry).remove(0)
        }

        fn system(&mut self, command: Command) -> Reply {
            self.submit(Request {
                id: RequestId(u128::from(self.index) + 1_000_000),
                at: 1_700_000_000,
                actor: Actor::System,
                command,
            })
        }

        /// A command from the cluster itself, stamped `at`.
        fn system_at(&mut self, at: u64, command: Command) -> Reply {
            self.submit(Request {
                id: RequestId(u128::from(self.index) + 3_000_000),
                at,
                actor: Actor::System,
                command,
            })
        }

        fn admin(&mut self, command: Command) -> Reply {
            self.submit(Request {
                id: RequestId(u128::from(self.index) + 1),
                at: 1_700_000_000,
                actor: Actor::ApiKey(self.admin),
                command,
            })
        }

        /// Every entity table (no remembered replies, no metadata), for comparing states.
        fn tables(&self) -> Vec<String> {
            let r = &self.reg;
            vec![
                format!("{:?}", r.users),
                format!("{:?}", r.roles),
                format!("{:?}", r.identity_providers),
                format!("{:?}", r.sites),
                format!("{:?}", r.resources),
                format!("{:?}", r.policies),
                format!("{:?}", r.api_keys),
                format!("{:?}", r.nodes),
                format!("{:?}", r.join_tokens),
                format!("{:?}", r.identities),
                format!("{:?}", r.attempts),
                format!("{:?}", r.since_v2.devices),
            ]
        }

        /// A sign-in through provider `idp` as account `sub` with `email`.
        fn sign_in(&mut self, idp: &str, sub: &str, email: &str, verified: bool) -> Reply {
            let session = Session {
                id: SessionId(u128::from(self.index) + 77),
                user: name("pending"),
                idp: name(idp),
                email: email.into(),
                email_verified: false,
                groups: Vec::new(),
                created_at: 1_700_000_000,
                expires_at: 1_700_003_600,
                refresh_token: None,
                token_expires_at: None,
                id_token: None,
                via: Via::Sso,
                resource: None,
                claims: String::new(),
            };
            self.system(Command::SignIn {
                session,
                display_name: None,
                subject: sub.into(),
                email_verified: verified,
            })
        }

        /// A try at `key` from `client` at time `at`, counting for 300 s, at most 3.
        fn reserve(&mut self, client: &str, key: &str, id: u128, at: u64) -> Reply {
            let req = Request {
                id: RequestId(u128::from(self.index) + 2_000_000),
                at,
                actor: Actor::System,
                command: Command::ReserveAttempt {
                    attempt: attempt(client, key),
                    id,
                    limit: 3,
                    window: 300,
                },
            };
            self.submit(req)
        }

        /// The registry after a snapshot round trip, encoded again.
        fn snapshot_round_trip(&self) -> (Vec<u8>, Vec<u8>) {
            let (format, bytes) = self.reg.encode_snapshot().unwrap();
            let mut back = Registry::decode_snapshot(format, &bytes).unwrap();
            back.rebuild_indexes();
            let mut live = self.reg.clone();
            live.rebuild_indexes();
            assert!(
                format!("{back:?}") == format!("{live:?}"),
                "the snapshot round trip changed the registry"
            );
            (bytes, back.encode_snapshot().unwrap().1)
        }
    }

    fn attempt(client: &str, key: &str) -> AttemptKey {
        AttemptKey {
            client: client.parse().unwrap(),
            key: key.into(),
        }
    }

    fn signed_in(reply: Reply) -> (String, bool) {
        match reply {
            Ok(Outcome::SignedIn { user, created }) => (user.to_string(), created),
            other => panic!("expected a sign-in, got {other:?}"),
        }
    }

    fn site(n: &str) -> AnyEntity {
        AnyEntity::Site(Site {
            name: name(n),
            description: String::new(),
            revision: 0,
        })
    }

    fn user(n: &str, email: Option<&str>) -> AnyEntity {
        AnyEntity::User(User {
            name: name(n),
            email: email.map(str::to_owned),
            display_name: None,
            disabled: false,
            revision: 0,
        })
    }

    fn role(n: &str, members: &[&str]) -> AnyEntity {
        AnyEntity::Role(Role {
            name: name(n),
            description: String::new(),
            members: members.iter().map(|m| name(m)).collect(),
            revision: 0,
        })
    }

    fn resource(n: &str, site: Option<&str>, port: u16) -> Resource {
        Resource {
            name: name(n),
            site: site.map(name),
            route: Route::Tcp { port },
            targets: vec!["10.0.0.1:5432".parse::<Target>().unwrap()],
            policies: Vec::new(),
            http: Default::default(),
            revision: 0,
        }
    }

    #[test]
    fn duplicate_names_are_refused_and_change_nothing() {
        let mut h = Harness::new();
        h.admin(Command::Create(user("alice", Some("alice@example.com"))))
            .unwrap();
        let before = h.tables();
        let err = h.admin(Command::Create(user("alice", None))).unwrap_err();
        assert!(
            matches!(err, RegistryError::AlreadyExists { kind: Kind::User, ref field, .. } if field == "name")
        );
        let err = h
            .admin(Command::Create(user("alice2", Some("ALICE@example.com"))))
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::AlreadyExists { ref field, .. } if field == "email"),
            "{err}"
        );
        assert_eq!(h.tables(), before);
    }

    #[test]
    fn dangling_references_are_refused() {
        let mut h = Harness::new();
        let before = h.tables();
        let err = h
            .admin(Command::Create(AnyEntity::Resource(resource(
                "db",
                Some("nowhere"),
                5432,
            ))))
            .unwrap_err();
        assert_eq!(
            err,
            RegistryError::UnknownReference {
                kind: Kind::Resource,
                name: name("db"),
                field: "site".into(),
                target_kind: Kind::Site,
                target: name("nowhere"),
            }
        );
        assert!(
            err.to_string().contains("refers to site \"nowhere\""),
            "{err}"
        );
        let err = h
            .admin(Command::Create(role("ops", &["ghost"])))
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::UnknownReference { ref field, .. } if field == "members[0]")
        );
        assert_eq!(h.tables(), before);
    }

    #[test]
    fn an_entity_in_use_cannot_be_deleted_but_users_leave_their_roles() {
        let mut h = Harness::new();
        h.admin(Command::Create(site("hq"))).unwrap();
        h.admin(Command::Create(AnyEntity::Resource(resource(
            "db",
            Some("hq"),
            5432,
        ))))
        .unwrap();
        let err = h
            .admin(Command::Delete {
                kind: Kind::Site,
                name: name("hq"),
                revision: 0,
            })
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::InUse { by_kind: Kind::Resource, ref field, .. } if field == "site")
        );
        assert!(h.reg.sites().contains_key(&name("hq")));

        h.admin(Command::Create(user("bob", None))).unwrap();
        h.admin(Command::Create(role("ops", &["bob"]))).unwrap();
        let out = h
            .admin(Command::Delete {
                kind: Kind::User,
                name: name("bob"),
                revision: 0,
            })
            .unwrap();
        assert!(matches!(out, Outcome::Deleted { ref cascaded } if cascaded.len() == 1));
        assert!(h.reg.roles()[&name("ops")].members.is_empty());
    }

    #[test]
    fn ports_and_routes_are_unique() {
        let mut h = Harness::new();
        h.admin(Command::Create(AnyEntity::Resource(resource(
            "a", None, 5432,
        ))))
        .unwrap();
        let err = h
            .admin(Command::Create(AnyEntity::Resource(resource(
                "b", None, 5432,
            ))))
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::AlreadyExists { ref field, .. } if field == "route.tcp.port")
        );
        let mut udp = resource("c", None, 5432);
        udp.route = Route::Udp { port: 5432 };
        h.admin(Command::Create(AnyEntity::Resource(udp))).unwrap();
    }

    #[test]
    fn updates_check_the_revision_they_are_based_on() {
        let mut h = Harness::new();
        let Outcome::Entity(AnyEntity::User(u)) =
            h.admin(Command::Create(user("a", None))).unwrap()
        else {
            panic!("expected a user")
        };
        let mut stale = u.clone();
        stale.display_name = Some("A".into());
        let mut fresh = u.clone();
        fresh.disabled = true;
        h.admin(Command::Update(AnyEntity::User(fresh))).unwrap();
        let err = h
            .admin(Command::Update(AnyEntity::User(stale)))
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::RevisionConflict { expected, .. } if expected == u.revision)
        );
        assert!(h.reg.users()[&name("a")].disabled);
        assert_eq!(h.reg.users()[&name("a")].display_name, None);
    }

    #[test]
    fn a_retried_request_applies_once_and_gets_the_first_reply() {
        let mut h = Harness::new();
        let req = Request {
            id: RequestId(42),
            at: 0,
            actor: Actor::ApiKey(h.admin),
            command: Command::Create(user("once", None)),
        };
        let first = h.submit(req.clone());
        let second = h.submit(req);
        assert!(first.is_ok());
        assert_eq!(first, second);
    }

    #[test]
    fn revoked_and_read_only_keys_cannot_write() {
        let mut h = Harness::new();
        h.admin(Command::CreateApiKey(ApiKeyRecord {
            name: name("ro"),
            id: KeyId(8),
            hash: SecretHash([3; 32]),
            scope: Scope::ReadOnly,
            created_at: 0,
            revision: 0,
        }))
        .unwrap();
        let ro = h.submit(Request {
            id: RequestId(500),
            at: 0,
            actor: Actor::ApiKey(KeyId(8)),
            command: Command::Create(site("x")),
        });
        assert_eq!(ro, Err(RegistryError::Forbidden));
        let unknown = h.submit(Request {
            id: RequestId(501),
            at: 0,
            actor: Actor::ApiKey(KeyId(9)),
            command: Command::Create(site("x")),
        });
        assert_eq!(unknown, Err(RegistryError::Unauthorized));
        // The last admin key is protected; a second one makes revoking possible.
        let err = h
            .admin(Command::RevokeApiKey {
                name: name("bootstrap"),
            })
            .unwrap_err();
        assert!(matches!(err, RegistryError::Conflict { .. }));
        assert!(h.reg.sites().is_empty());
    }

    fn manifest(yaml_sites: &[&str], resources: Vec<Resource>) -> Manifest {
        Manifest {
            sites: Some(
                yaml_sites
                    .iter()
                    .map(|s| Site {
                        name: name(s),
                        description: String::new(),
                        revision: 0,
                    })
                    .collect(),
            ),
            resources: Some(resources),
            ..Manifest::default()
        }
    }

    #[test]
    fn apply_is_idempotent_and_all_or_nothing() {
        let mut h = Harness::new();
        let m = manifest(&["hq"], vec![resource("db", Some("hq"), 5432)]);
        let Outcome::Applied(report) = h
            .admin(Command::Apply {
                manifest: m.clone(),
                prune: false,
            })
            .unwrap()
        else {
            panic!("expected a report")
        };
        assert_eq!(report.changes.len(), 2);
        assert_eq!(report.changes[0].kind, Kind::Site, "referenced kinds first");

        let again = h.reg.plan_manifest(&m, false).unwrap();
        assert!(again.changes.is_empty());
        assert_eq!(again.unchanged, 2);

        let before = h.tables();
        let bad = manifest(
            &["hq", "branch"],
            vec![
                resource("db", Some("hq"), 5432),
                resource("web", Some("mars"), 80),
            ],
        );
        let err = h
            .admin(Command::Apply {
                manifest: bad,
                prune: false,
            })
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::UnknownReference { ref name, .. } if name.as_str() == "web")
        );
        assert_eq!(
            h.tables(),
            before,
            "the valid half of the manifest was not applied"
        );
    }

    #[test]
    fn prune_deletes_only_the_kinds_listed() {
        let mut h = Harness::new();
        h.admin(Command::Create(site("old"))).unwrap();
        h.admin(Command::Create(user("keep", None))).unwrap();
        let m = manifest(&["new"], vec![]);
        let plan = h.reg.plan_manifest(&m, true).unwrap();
        assert!(plan.dry_run);
        let actions: Vec<_> = plan
            .changes
            .iter()
            .map(|c| (c.action, c.name.to_string()))
            .collect();
        assert_eq!(
            actions,
            vec![
                (ChangeAction::Create, "new".into()),
                (ChangeAction::Delete, "old".into())
            ]
        );
        h.admin(Command::Apply {
            manifest: m,
            prune: true,
        })
        .unwrap();
        assert!(h.reg.users().contains_key(&name("keep")));
        assert!(!h.reg.sites().contains_key(&name("old")));
    }

    #[test]
    fn nodes_that_are_members_cannot_be_deleted() {
        let mut h = Harness::new();
        let Outcome::Node(n2) = h
            .system(Command::RegisterNode {
                name: name("n2"),
                cluster_addr: "127.0.0.1:7401".into(),
                admin_addr: "127.0.0.1:7444".into(),
                region: "eu".into(),
                role: NodeRole::Voter,
            })
            .unwrap()
        else {
            panic!("expected a node")
        };
        assert_eq!(n2.id, NodeId(2));
        let err = h
            .admin(Command::DeleteNode { name: name("n1") })
            .unwrap_err();
        assert!(err.to_string().contains("member"), "{err}");
        h.admin(Command::DeleteNode { name: name("n2") }).unwrap();
        let err = h
            .admin(Command::RegisterNode {
                name: name("n3"),
                cluster_addr: "127.0.0.1:7402".into(),
                admin_addr: "127.0.0.1:7445".into(),
                region: String::new(),
                role: NodeRole::Voter,
            })
            .unwrap_err();
        assert_eq!(
            err,
            RegistryError::Forbidden,
            "only the cluster registers nodes"
        );
    }

    #[test]
    fn a_verified_email_links_a_provisioned_user_once() {
        let mut h = Harness::new();
        h.admin(Command::Create(user("alice", Some("alice@example.com"))))
            .unwrap();
        assert_eq!(
            signed_in(h.sign_in("corp", "sub-a", "ALICE@example.com", true)),
            ("alice".into(), false)
        );
        let link = ProviderSubject {
            idp: name("corp"),
            subject: "sub-a".into(),
        };
        assert_eq!(h.reg.identities().get(&link), Some(&name("alice")));
        // The same account signs in again: the link decides, not a new lookup.
        assert_eq!(
            signed_in(h.sign_in("corp", "sub-a", "alice@example.com", true)),
            ("alice".into(), false)
        );
        assert_eq!(h.reg.identities().len(), 1);
    }

    #[test]
    fn an_unverified_email_never_takes_over_a_user() {
        let mut h = Harness::new();
        h.admin(Command::Create(user("alice", Some("alice@example.com"))))
            .unwrap();
        let before = h.tables();
        let sessions = h.reg.sessions().len();
        let err = h
            .sign_in("corp", "mallory", "alice@example.com", false)
            .unwrap_err();
        assert_eq!(
            err,
            RegistryError::EmailBelongsToAnotherUser {
                user: name("alice")
            }
        );
        assert_eq!(h.tables(), before, "nothing linked, nothing created");
        assert_eq!(h.reg.sessions().len(), sessions, "no session");
        // An unverified address nobody has makes a new user, named after it but without it.
        assert_eq!(
            signed_in(h.sign_in("corp", "newbie", "new@example.com", false)),
            ("new-unverified".into(), true)
        );
        assert_eq!(h.reg.users()[&name("new-unverified")].email, None);
    }

    #[test]
    fn an_unverified_first_sign_in_squats_no_address() {
        let mut h = Harness::new();
        // mallory's provider account claims dave's address, unverified: she gets a user of
        // her own, without the address, and a session that says it is unverified.
        assert_eq!(
            signed_in(h.sign_in("corp", "mallory", "dave@example.com", false)),
            ("dave-unverified".into(), true)
        );
        assert_eq!(h.reg.users()[&name("dave-unverified")].email, None);
        assert!(
            !h.reg.users().contains_key(&name("dave")),
            "the owner's name stays free"
        );
        let session = |h: &Harness, user: &str| {
            h.reg
                .sessions()
                .values()
                .find(|s| s.user.as_str() == user)
                .cloned()
                .expect("a session")
        };
        let s = session(&h, "dave-unverified");
        assert_eq!(
            s.email, "dave@example.com",
            "shown to her as the token said"
        );
        assert!(!s.email_verified);
        assert_eq!(s.verified_email(), None);
        // The real owner, verified, at the same or another provider: a user of their own,
        // holding the address.
        assert_eq!(
            signed_in(h.sign_in("social", "dave", "dave@example.com", true)),
            ("dave".into(), true)
        );
        assert_eq!(
            h.reg.users()[&name("dave")].email.as_deref(),
            Some("dave@example.com")
        );
        assert!(session(&h, "dave").email_verified);
        // mallory signs in again: still her own user, still unverified.
        assert_eq!(
            signed_in(h.sign_in("corp", "mallory", "dave@example.com", false)),
            ("dave-unverified".into(), false)
        );

        // Or an admin gives the address to a user after mallory signed in (her user does
        // not hold it), and the owner's verified sign-in links that user.
        let mut h = Harness::new();
        signed_in(h.sign_in("corp", "mallory", "dave@example.com", false));
        h.admin(Command::Create(user("d", Some("dave@example.com"))))
            .unwrap();
        assert_eq!(
            signed_in(h.sign_in("social", "dave", "dave@example.com", true)),
            ("d".into(), false)
        );
    }

    #[test]
    fn a_second_provider_with_the_same_verified_email_is_refused() {
        let mut h = Harness::new();
        // First sign-in creates the user and links it to the first provider.
        assert_eq!(
            signed_in(h.sign_in("corp", "sub-a", "alice@example.com", true)),
            ("alice".into(), true)
        );
        let before = h.tables();
        let err = h
            .sign_in("social", "other", "alice@example.com", true)
            .unwrap_err();
        assert_eq!(
            err,
            RegistryError::EmailBelongsToAnotherUser {
                user: name("alice")
            }
        );
        assert_eq!(h.tables(), before);
        // A second account at the same provider neither.
        assert!(h
            .sign_in("corp", "sub-b", "alice@example.com", true)
            .is_err());
    }

    #[test]
    fn a_known_subject_wins_even_when_its_email_changed() {
        let mut h = Harness::new();
        signed_in(h.sign_in("corp", "sub-a", "alice@example.com", true));
        h.admin(Command::Create(user("bob", Some("bob@example.com"))))
            .unwrap();
        // The account now claims bob's address (verified or not): it is still alice.
        for verified in [false, true] {
            assert_eq!(
                signed_in(h.sign_in("corp", "sub-a", "bob@example.com", verified)),
                ("alice".into(), false)
            );
        }
        assert_eq!(
            h.reg.users()[&name("alice")].email.as_deref(),
            Some("alice@example.com"),
            "the stored address is the admin's, not the token's"
        );
        let Outcome::Entity(AnyEntity::User(mut alice)) = h
            .admin(Command::Update(user("alice", Some("alice@example.com"))))
            .unwrap()
        else {
            panic!("expected a user")
        };
        alice.disabled = true;
        h.admin(Command::Update(AnyEntity::User(alice))).unwrap();
        assert_eq!(
            h.sign_in("corp", "sub-a", "alice@example.com", true),
            Err(RegistryError::UserDisabled {
                user: name("alice")
            })
        );
    }

    #[test]
    fn deleting_a_user_forgets_its_links_and_a_manifest_keeps_them() {
        let mut h = Harness::new();
        signed_in(h.sign_in("corp", "sub-a", "alice@example.com", true));
        let m = Manifest {
            users: Some(vec![User {
                name: name("alice"),
                email: Some("alice@example.com".into()),
                display_name: Some("Alice".into()),
                disabled: false,
                revision: 0,
            }]),
            ..Manifest::default()
        };
        h.admin(Command::Apply {
            manifest: m,
            prune: false,
        })
        .unwrap();
        assert_eq!(h.reg.identities().len(), 1, "apply leaves links alone");
        h.admin(Command::Delete {
            kind: Kind::User,
            name: name("alice"),
            revision: 0,
        })
        .unwrap();
        assert!(h.reg.identities().is_empty());
        // A user created again with the address is linked afresh by a verified sign-in,
        // from any provider: the old link is gone.
        h.admin(Command::Create(user("alice", Some("alice@example.com"))))
            .unwrap();
        assert_eq!(
            signed_in(h.sign_in("social", "x", "alice@example.com", true)),
            ("alice".into(), false)
        );
        assert!(h
            .sign_in("corp", "sub-a", "alice@example.com", true)
            .is_err());
    }

    #[test]
    fn attempts_are_limited_released_on_success_and_expire() {
        let mut h = Harness::new();
        let t = 1_700_000_000;
        let ip = "192.0.2.1";
        for id in 0..3 {
            h.reserve(ip, "pin:r", id, t).unwrap();
        }
        let before = h.tables();
        assert_eq!(
            h.reserve(ip, "pin:r", 9, t + 10),
            Err(RegistryError::TooManyAttempts { retry_after: 290 })
        );
        assert_eq!(h.tables(), before, "a refused try changes nothing");
        // Others are not affected.
        h.reserve(ip, "pin:other", 10, t).unwrap();
        h.reserve("192.0.2.2", "pin:r", 11, t).unwrap();
        // A released (successful) try stops counting.
        h.system(Command::ReleaseAttempt {
            attempt: attempt(ip, "pin:r"),
            id: 1,
        })
        .unwrap();
        h.reserve(ip, "pin:r", 12, t + 20).unwrap();
        assert!(h.reserve(ip, "pin:r", 13, t + 20).is_err());
        // Tries leave the window each at its own time: at t + 300 the two from t have
        // left, the one from t + 20 still counts.
        h.reserve(ip, "pin:r", 14, t + 300).unwrap();
        h.reserve(ip, "pin:r", 15, t + 300).unwrap();
        assert!(h.reserve(ip, "pin:r", 16, t + 300).is_err());
        // Records whose tries all expired are forgotten by the next write.
        h.reserve("192.0.2.3", "pin:r", 17, t + 1000).unwrap();
        let keys: Vec<String> = h
            .reg
            .attempts()
            .keys()
            .map(|k| format!("{} {}", k.client, k.key))
            .collect();
        assert_eq!(keys, vec!["192.0.2.3 pin:r".to_owned()]);
        assert_eq!(h.reg.attempt_expiry.len(), 1);
        // Releasing what is not counted does nothing.
        h.system(Command::ReleaseAttempt {
            attempt: attempt(ip, "pin:r"),
            id: 1,
        })
        .unwrap();
        let (a, b) = h.snapshot_round_trip();
        assert_eq!(a, b);
    }

    #[test]
    fn attempt_records_are_bounded() {
        let mut h = Harness::new();
        let t = 1_700_000_000;
        for i in 0..MAX_ATTEMPT_RECORDS as u32 + 5 {
            let ip = std::net::Ipv6Addr::from(u128::from(i)).to_string();
            h.reserve(&ip, "pin:r", u128::from(i), t + u64::from(i / 1000))
                .unwrap();
        }
        assert_eq!(h.reg.attempts().len(), MAX_ATTEMPT_RECORDS);
        assert_eq!(h.reg.attempt_expiry.len(), MAX_ATTEMPT_RECORDS);
        // The oldest went first.
        assert!(!h.reg.attempts().contains_key(&attempt("::", "pin:r")));
        assert!(h.reg.attempts().contains_key(&attempt("::5", "pin:r")));
    }

    #[test]
    fn only_the_cluster_counts_attempts_and_signs_in() {
        let mut h = Harness::new();
        let err = h
            .admin(Command::ReserveAttempt {
                attempt: attempt("192.0.2.1", "pin:r"),
                id: 1,
                limit: 3,
                window: 300,
            })
            .unwrap_err();
        assert_eq!(err, RegistryError::Forbidden);
        let err = h
            .admin(Command::ReleaseAttempt {
                attempt: attempt("192.0.2.1", "pin:r"),
                id: 1,
            })
            .unwrap_err();
        assert_eq!(err, RegistryError::Forbidden);
    }

    #[test]
    fn a_snapshot_rebuilds_the_same_registry() {
        let mut h = Harness::new();
        h.admin(Command::Create(site("hq"))).unwrap();
        h.admin(Command::Create(user("u", Some("u@example.com"))))
            .unwrap();
        h.admin(Command::Create(role("r", &["u"]))).unwrap();
        h.admin(Command::Delete {
            kind: Kind::User,
            name: name("u"),
            revision: 0,
        })
        .unwrap();
        let (before, after) = h.snapshot_round_trip();
        assert_eq!(before, after);
    }

    fn register(device: &str, owner: &str, key: u8) -> Command {
        Command::RegisterDevice {
            name: name(device),
            owner: name(owner),
            public_key: WgKey([key; 32]),
            os: "linux".into(),
            session: None,
            address: Some("198.51.100.7".parse().unwrap()),
        }
    }

    fn registered(reply: Reply) -> Device {
        match reply {
            Ok(Outcome::Device(d)) => d,
            other => panic!("expected a device, got {other:?}"),
        }
    }

    fn private(n: &str, address: &str, alias: Option<&str>) -> AnyEntity {
        AnyEntity::Resource(Resource {
            name: name(n),
            site: Some(name("hq")),
            route: Route::Private {
                address: address.parse().unwrap(),
                ports: Default::default(),
                protocols: warren_proto::registry::L4Protocol::default_set(),
                alias: alias.map(str::to_owned),
                virtual_address: Some(Ipv4Addr::new(1, 2, 3, 4)),
            },
            targets: Vec::new(),
            policies: Vec::new(),
            http: Default::default(),
            revision: 0,
        })
    }

    #[test]
    fn a_device_registers_once_and_the_same_key_signs_in_again() {
        let mut h = Harness::new();
        h.admin(Command::Create(user("alice", None))).unwrap();
        let d = registered(h.system(register("alice-laptop", "alice", 1)));
        assert_eq!(d.address, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!((d.created_at, d.last_seen), (1_700_000_000, 1_700_000_000));
        assert_eq!(h.reg.device_by_key(&WgKey([1; 32])), Some(&d));
        // The same machine again, under another name, later, from elsewhere: same device.
        let again = registered(h.system_at(
            1_700_000_500,
            Command::RegisterDevice {
                name: name("renamed"),
                owner: name("alice"),
                public_key: WgKey([1; 32]),
                os: "macos".into(),
                session: None,
                address: Some("203.0.113.9".parse().unwrap()),
            },
        ));
        assert_eq!(again.name, d.name);
        assert_eq!(again.address, d.address);
        assert_eq!(again.created_at, d.created_at);
        assert_eq!(again.last_seen, 1_700_000_500);
        assert_eq!(again.os, "macos");
        assert_eq!(again.last_address, Some("203.0.113.9".parse().unwrap()));
        assert_eq!(h.reg.devices().len(), 1);
        let phone = registered(h.system(register("alice-phone", "alice", 2)));
        assert_eq!(phone.address, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(h.reg.devices_of(&name("alice")).count(), 2);
        let touched = registered(h.system_at(
            1_700_000_900,
            Command::TouchDevice {
                name: name("alice-phone"),
                address: None,
            },
        ));
        assert_eq!(touched.last_seen, 1_700_000_900);
        assert_eq!(touched.last_address, phone.last_address);
    }

    #[test]
    fn a_device_key_or_name_of_someone_else_is_refused_and_changes_nothing() {
        let mut h = Harness::new();
        h.admin(Command::Create(user("alice", None))).unwrap();
        h.admin(Command::Create(user("mallory", None))).unwrap();
        h.system(register("alice-laptop", "alice", 1)).unwrap();
        let before = h.tables();
        assert_eq!(
            h.system(register("mallory-laptop", "mallory", 1)),
            Err(RegistryError::DeviceKeyTaken)
        );
        assert!(matches!(
            h.system(register("alice-laptop", "mallory", 3)),
            Err(RegistryError::AlreadyExists { kind: Kind::Device, field, .. }) if field == "name"
        ));
        assert!(matches!(
            h.system(register("ghost-laptop", "ghost", 4)),
            Err(RegistryError::NotFound {
                kind: Kind::User,
                ..
            })
        ));
        let mut os = register("m", "mallory", 5);
        if let Command::RegisterDevice { os, .. } = &mut os {
            *os = "x".repeat(65);
        }
        assert!(matches!(
            h.system(os),
            Err(RegistryError::Invalid { kind: Kind::Device, field, .. }) if field == "os"
        ));
        assert_eq!(h.tables(), before);
        assert_eq!(
            h.reg.device_by_key(&WgKey([1; 32])).unwrap().owner,
            name("alice")
        );
        // Only the cluster registers devices, never an API key.
        assert_eq!(
            h.admin(register("x", "alice", 6)),
            Err(RegistryError::Forbidden)
        );
    }

    #[test]
    fn a_disabled_owner_or_a_session_not_theirs_registers_nothing() {
        let mut h = Harness::new();
        signed_in(h.sign_in("corp", "s-alice", "alice@example.com", true));
        let alice_session = *h.reg.sessions().keys().next().unwrap();
        h.admin(Command::Create(user("bob", None))).unwrap();
        let with = |owner: &str, session| Command::RegisterDevice {
            name: name("d"),
            owner: name(owner),
            public_key: WgKey([1; 32]),
            os: String::new(),
            session: Some(session),
            address: None,
        };
        assert!(matches!(
            h.system(with("bob", alice_session)),
            Err(RegistryError::SessionNotLive { .. })
        ));
        assert!(matches!(
            h.system_at(1_800_000_000, with("alice", alice_session)),
            Err(RegistryError::SessionNotLive { .. })
        ));
        let d = registered(h.system(with("alice", alice_session)));
        assert_eq!(d.session, Some(alice_session));
        let mut bob = match h.reg.entity(Kind::User, &name("bob")) {
            Some(AnyEntity::User(u)) => u,
            other => panic!("{other:?}"),
        };
        bob.disabled = true;
        h.admin(Command::Update(AnyEntity::User(bob))).unwrap();
        assert!(matches!(
            h.system(register("bob-laptop", "bob", 2)),
            Err(RegistryError::UserDisabled { .. })
        ));
        // Revoking the session keeps the device (the data path checks the session).
        h.admin(Command::RevokeSession { id: alice_session })
            .unwrap();
        assert_eq!(h.reg.devices()[&name("d")].session, Some(alice_session));
    }

    #[test]
    fn device_addresses_are_never_reused_and_users_take_their_devices_along() {
        let mut h = Harness::new();
        h.admin(Command::Create(user("alice", None))).unwrap();
        h.admin(Command::Create(role("staff", &["alice"]))).unwrap();
        let a = registered(h.system(register("a", "alice", 1)));
        h.admin(Command::Delete {
            kind: Kind::Device,
            name: name("a"),
            revision: 0,
        })
        .unwrap();
        assert!(h.reg.device_by_key(&WgKey([1; 32])).is_none());
        let b = registered(h.system(register("a", "alice", 1)));
        assert_ne!(
            a.address, b.address,
            "a deleted device's address is not given again"
        );
        registered(h.system(register("c", "alice", 3)));
        let Ok(Outcome::Deleted { cascaded }) = h.admin(Command::Delete {
            kind: Kind::User,
            name: name("alice"),
            revision: 0,
        }) else {
            panic!("deleted")
        };
        let gone: Vec<_> = cascaded
            .iter()
            .filter(|c| c.kind == Kind::Device && c.action == ChangeAction::Delete)
            .map(|c| c.name.to_string())
            .collect();
        assert_eq!(gone, ["a", "c"]);
        assert!(h.reg.devices().is_empty());
        assert!(h.reg.device_by_key(&WgKey([3; 32])).is_none());
        assert!(matches!(
            h.admin(Command::Delete {
                kind: Kind::Device,
                name: name("a"),
                revision: 0
            }),
            Err(RegistryError::NotFound {
                kind: Kind::Device,
                ..
            })
        ));
    }

    #[test]
    fn pools_skip_the_network_address_and_the_virtual_pool() {
        let (base, size) = DEVICE_POOL;
        assert_eq!(next_in_pool(base, size, 0, None), Some(1));
        let skip = Some((VIRTUAL_POOL.0 - base, VIRTUAL_POOL.1));
        let before_virtual = VIRTUAL_POOL.0 - base - 1;
        let next = next_in_pool(base, size, before_virtual, skip).unwrap();
        assert_eq!(Ipv4Addr::from(base + next), Ipv4Addr::new(100, 101, 0, 0));
        assert_eq!(next_in_pool(base, size, size - 1, skip), None);
        let (vbase, vsize) = VIRTUAL_POOL;
        assert_eq!(
            Ipv4Addr::from(vbase + next_in_pool(vbase, vsize, 0, None).unwrap()),
            Ipv4Addr::new(100, 100, 0, 1)
        );
        assert_eq!(next_in_pool(vbase, vsize, vsize - 1, None), None);
    }

    #[test]
    fn dns_private_resources_get_a_virtual_address_kept_across_updates() {
        let mut h = Harness::new();
        h.admin(Command::Create(site("hq"))).unwrap();
        let Ok(Outcome::Entity(AnyEntity::Resource(db))) =
            h.admin(Command::Create(private("db", "db.internal", Some("pg"))))
        else {
            panic!("created")
        };
        assert_eq!(db.virtual_address(), Some(Ipv4Addr::new(100, 100, 0, 1)));
        // Two private resources may share an address; an IP address needs no virtual one.
        let Ok(Outcome::Entity(AnyEntity::Resource(ip))) =
            h.admin(Command::Create(private("ip", "10.0.0.5", None)))
        else {
            panic!("created")
        };
        assert_eq!(ip.virtual_address(), None, "a user-sent value is replaced");
        h.admin(Command::Create(private("ip2", "10.0.0.5", None)))
            .unwrap();
        // An update (a manifest's, without the address) keeps it and changes nothing.
        let manifest = Manifest {
            resources: Some(vec![match private("db", "db.internal", Some("pg")) {
                AnyEntity::Resource(r) => r,
                _ => unreachable!(),
            }]),
            ..Manifest::default()
        };
        let Ok(Outcome::Applied(report)) = h.admin(Command::Apply {
            manifest,
            prune: false,
        }) else {
            panic!("applied")
        };
        assert_eq!((report.changes.len(), report.unchanged), (0, 1));
        assert_eq!(
            h.reg.resources()[&name("db")].virtual_address(),
            db.virtual_address()
        );
        // To an IP and back: the old address is not given again.
        h.admin(Command::Update(private("db", "10.0.0.6", Some("pg"))))
            .unwrap();
        assert_eq!(h.reg.resources()[&name("db")].virtual_address(), None);
        h.admin(Command::Update(private("db", "db2.internal", Some("pg"))))
            .unwrap();
        assert_eq!(
            h.reg.resources()[&name("db")].virtual_address(),
            Some(Ipv4Addr::new(100, 100, 0, 2))
        );
    }

    #[test]
    fn aliases_are_unique_among_aliases_and_names() {
        let mut h = Harness::new();
        h.admin(Command::Create(site("hq"))).unwrap();
        h.admin(Command::Create(private("db", "10.0.0.5", Some("pg"))))
            .unwrap();
        let field = |r: Reply| match r {
            Err(RegistryError::AlreadyExists { field, .. }) => field,
            other => panic!("expected a taken value, got {other:?}"),
        };
        assert_eq!(
            field(h.admin(Command::Create(private("db2", "10.0.0.6", Some("pg"))))),
            "route.private.alias"
        );
        assert_eq!(
            field(h.admin(Command::Create(private("db3", "10.0.0.6", Some("db"))))),
            "route.private.alias"
        );
        assert_eq!(
            field(h.admin(Command::Create(private("pg", "10.0.0.6", None)))),
            "name"
        );
        // Its own name as its alias is fine.
        h.admin(Command::Create(private("ssh", "10.0.0.7", Some("ssh"))))
            .unwrap();
    }

    #[test]
    fn a_registry_is_written_as_format_1_until_a_format_2_request_applies() {
        let mut h = Harness::new();
        h.admin(Command::Create(user("alice", None))).unwrap();
        assert_eq!(h.reg.snapshot_format(), Format::V1);
        let (format, v1) = h.reg.encode_snapshot().unwrap();
        assert_eq!(format, Format::V1);
        let mut back = Registry::decode_snapshot(Format::V1, &v1).unwrap();
        back.rebuild_indexes();
        assert_eq!(format!("{back:?}"), format!("{:?}", h.reg));
        // Even a refused one: its reply (which names the device kind) is remembered.
        assert!(h.system(register("d", "nobody", 1)).is_err());
        assert_eq!(h.reg.snapshot_format(), Format::V2);
        h.system(register("d", "alice", 1)).unwrap();
        let (format, v2) = h.reg.encode_snapshot().unwrap();
        assert_eq!(format, Format::V2);
        let mut back = Registry::decode_snapshot(Format::V2, &v2).unwrap();
        back.rebuild_indexes();
        assert_eq!(back.device_by_key(&WgKey([1; 32])).unwrap().name, name("d"));
        assert_eq!(format!("{back:?}"), format!("{:?}", h.reg));
    }

    #[test]
    fn devices_survive_a_snapshot_and_a_replay_of_the_log() {
        let mut h = Harness::new();
        let mut log = Vec::new();
        let mut run = |h: &mut Harness, c: Command| {
            let req = Request {
                id: RequestId(u128::from(h.index) + 5_000_000),
                at: 1_700_000_000 + h.index,
                actor: Actor::System,
                command: c,
            };
            log.push(req.clone());
            h.submit(req)
        };
        run(&mut h, Command::Create(user("alice", None))).unwrap();
        run(&mut h, Command::Create(site("hq"))).unwrap();
        run(&mut h, register("a", "alice", 1)).unwrap();
        run(&mut h, register("b", "alice", 2)).unwrap();
        run(&mut h, Command::Create(private("db", "db.internal", None))).unwrap();
        run(
            &mut h,
            Command::Delete {
                kind: Kind::Device,
                name: name("a"),
                revision: 0,
            },
        )
        .unwrap();
        run(&mut h, register("c", "alice", 3)).unwrap();
        let (before, after) = h.snapshot_round_trip();
        assert_eq!(before, after);
        let mut replay = Harness::new();
        for req in log {
            replay.submit(req).unwrap();
        }
        assert_eq!(replay.tables(), h.tables());
        assert_eq!(
            replay.reg.devices()[&name("c")].address,
            Ipv4Addr::new(100, 64, 0, 3)
        );
        assert_eq!(
            replay.reg.device_by_key(&WgKey([3; 32])),
            h.reg.device_by_key(&WgKey([3; 32]))
        );
    }

    fn arb_name() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(str::to_owned)
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        prop_oneof![
            arb_name().prop_map(|n| Command::Create(site(&n))),
            (arb_name(), any::<bool>())
                .prop_map(|(n, e)| Command::Create(user(&n, e.then_some("x@y.z")))),
            (arb_name(), arb_name(), any::<bool>()).prop_map(|(idp, sub, verified)| {
                let session = Session {
                    id: SessionId(
                        u128::from(sub.as_bytes()[0]) << 8 | u128::from(idp.as_bytes()[0]),
                    ),
                    user: name("pending"),
                    idp: name(&idp),
                    email: "x@y.z".into(),
                    email_verified: false,
                    groups: Vec::new(),
                    created_at: 0,
                    expires_at: u64::MAX,
                    refresh_token: None,
                    token_expires_at: None,
                    id_token: None,
                    via: Via::Sso,
                    resource: None,
                    claims: String::new(),
                };
                Command::SignIn {
                    session,
                    display_name: None,
                    subject: sub,
                    email_verified: verified,
                }
            }),
            (arb_name(), prop::collection::vec(arb_name(), 0..3)).prop_map(|(n, m)| {
                let m: Vec<&str> = m.iter().map(String::as_str).collect();
                Command::Create(role(&n, &m))
            }),
            (arb_name(), prop::option::of(arb_name()), 1u16..4).prop_map(|(n, s, p)| {
                Command::Create(AnyEntity::Resource(resource(&n, s.as_deref(), p)))
            }),
            (arb_name(), prop::option::of(arb_name()), 1u16..4).prop_map(|(n, s, p)| {
                Command::Update(AnyEntity::Resource(resource(&n, s.as_deref(), p)))
            }),
            (
                prop::sample::select(vec![Kind::User, Kind::Role, Kind::Site, Kind::Resource]),
                arb_name()
            )
                .prop_map(|(kind, n)| Command::Delete {
                    kind,
                    name: name(&n),
                    revision: 0
                }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Any sequence of commands: no reference ever dangles, a refused command changes
        /// nothing, a snapshot round trip is exact, and apply is deterministic.
        #[test]
        fn registry_invariants_hold(cmds in prop::collection::vec(arb_command(), 1..40)) {
            let mut h = Harness::new();
            let mut twin = Harness::new();
            for cmd in cmds {
                let before = h.tables();
                let (reply, twin_reply) = if matches!(cmd, Command::SignIn { .. }) {
                    (h.system(cmd.clone()), twin.system(cmd))
                } else {
                    (h.admin(cmd.clone()), twin.admin(cmd))
                };
                prop_assert_eq!(&reply, &twin_reply);
                if reply.is_err() {
                    prop_assert_eq!(h.tables(), before);
                }
                for role in h.reg.roles().values() {
                    for m in &role.members {
                        prop_assert!(h.reg.users().contains_key(m));
                    }
                }
                for res in h.reg.resources().values() {
                    if let Some(s) = &res.site {
                        prop_assert!(h.reg.sites().contains_key(s));
                    }
                }
                for linked in h.reg.identities().values() {
                    prop_assert!(h.reg.users().contains_key(linked));
                }
                let mut emails: Vec<String> = h
                    .reg
                    .users()
                    .values()
                    .filter_map(|u| u.email.as_deref().map(str::to_ascii_lowercase))
                    .collect();
                let all = emails.len();
                emails.sort();
                emails.dedup();
                prop_assert_eq!(emails.len(), all, "an address belongs to one user");
            }
            let (before, after) = h.snapshot_round_trip();
            prop_assert_eq!(before, after);
        }
    }

    fn provider(name_: &str, auto_create: bool) -> Command {
        Command::Create(AnyEntity::IdentityProvider(IdentityProvider {
            name: name(name_),
            issuer: "https://idp.example.com".into(),
            client_id: "warren".into(),
            client_secret: warren_proto::Secret::new(""),
            scopes: Vec::new(),
            groups_claim: None,
            trust_email: false,
            revision: 0,
            display_name: Some("Acme staff".into()),
            auto_create,
            post_logout_redirect: false,
        }))
    }

    #[test]
    fn a_join_that_never_became_a_member_keeps_its_id_and_a_member_id_is_never_reused() {
        let mut h = Harness::new();
        let join = |n: &str, addr: &str| Command::RegisterJoiningNode {
            name: name(n),
            cluster_addr: addr.into(),
            admin_addr: "127.0.0.1:7443".into(),
            region: String::new(),
            role: NodeRole::Voter,
        };
        let id = |r: Reply| match r {
            Ok(Outcome::Node(n)) => n.id.0,
            other => panic!("{other:?}"),
        };
        let first = id(h.system(join("n2", "127.0.0.1:7402")));
        // The join failed after registering; the node tries again, from another port even.
        assert_eq!(id(h.system(join("n2", "127.0.0.1:7412"))), first);
        assert_eq!(id(h.system(join("n2", "127.0.0.1:7412"))), first);
        let other = id(h.system(join("n3", "127.0.0.1:7403")));
        assert_eq!(other, first + 1, "no id was burnt");
        // n2 becomes a member, then is removed: its id is never given again.
        let membership = |ids: &[u64]| {
            let nodes: BTreeMap<NodeId, crate::types::ClusterNode> = ids
                .iter()
                .map(|i| (NodeId(*i), crate::types::ClusterNode::default()))
                .collect();
            openraft::Membership::new(vec![[NodeId(1)].into_iter().collect()], nodes)
        };
        for ids in [&[1, first][..], &[1][..]] {
            h.index += 1;
            h.reg.apply_entry(&Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, NodeId(1)), h.index),
                payload: EntryPayload::Membership(membership(ids)),
            });
        }
        let again = id(h.system(join("n2", "127.0.0.1:7402")));
        assert!(
            again > other,
            "a former member's id {first} came back as {again}"
        );
        // The old command, which nodes of the previous format send, always takes a new id.
        let old = id(h.system(register_node("n3", "127.0.0.1:7403", "")));
        assert!(old > again);
        // The kept ids survive a snapshot.
        let (format, bytes) = h.reg.encode_snapshot().unwrap();
        let mut back = Registry::decode_snapshot(format, &bytes).unwrap();
        back.rebuild_indexes();
        h.reg = back;
        assert_eq!(id(h.system(join("n2", "127.0.0.1:7402"))), again);
    }

    #[test]
    fn a_provider_without_auto_create_signs_in_only_users_the_registry_has() {
        let mut h = Harness::new();
        h.admin(provider("staff", false).with_side()).unwrap();
        let stored = &h.reg.identity_providers()[&name("staff")];
        assert_eq!(stored.title(), "Acme staff");
        assert!(!stored.auto_create);
        // Nobody matches: refused, and no user appears.
        let users = h.reg.users().len();
        assert_eq!(
            h.sign_in("staff", "s-new", "new@example.com", true),
            Err(RegistryError::NotInvited {
                provider: name("staff")
            })
        );
        assert_eq!(h.reg.users().len(), users);
        // A user an admin added, by verified e-mail: signs in (and is linked).
        h.admin(Command::Create(AnyEntity::User(User {
            name: name("bob"),
            email: Some("bob@example.com".into()),
            display_name: None,
            disabled: false,
            revision: 0,
        })))
        .unwrap();
        assert_eq!(
            signed_in(h.sign_in("staff", "s-bob", "bob@example.com", true)),
            ("bob".to_owned(), false)
        );
        // ... and then by subject, whatever address the provider sends now.
        assert_eq!(
            signed_in(h.sign_in("staff", "s-bob", "robert@example.com", true)),
            ("bob".to_owned(), false)
        );
        // A plain update (no side fields) puts the provider back to creating users.
        let mut plain = match provider("staff", true) {
            Command::Create(e) => e,
            _ => unreachable!(),
        };
        set_any_revision(&mut plain, 0);
        h.admin(Command::Update(plain)).unwrap();
        let stored = &h.reg.identity_providers()[&name("staff")];
        assert_eq!((stored.title(), stored.auto_create), ("staff", true));
        assert!(
            signed_in(h.sign_in("staff", "s-new", "new@example.com", true)).1,
            "a user is created again"
        );
    }

    #[test]
    fn refused_session_and_code_writes_forget_nothing_expired() {
        let mut h = Harness::new();
        let t = 1_700_000_000;
        h.admin(Command::Create(AnyEntity::Resource(resource(
            "db", None, 5432,
        ))))
        .unwrap();
        // A session that ends at t + 3600 and a handoff code used at t that ends at t + 60.
        signed_in(h.sign_in("corp", "s1", "a@example.com", true));
        h.system_at(
            t,
            Command::ConsumeHandoff {
                id: 1,
                expires_at: t + 60,
            },
        )
        .unwrap();
        let later = t + 7200;
        let kept = |h: &Harness| (h.reg.sessions().len(), h.reg.used_handoffs.len());
        assert_eq!(kept(&h), (1, 1));
        let mut sso = h.reg.sessions().values().next().unwrap().clone();
        sso.id = SessionId(1234);
        let refused = [
            Command::SignIn {
                session: sso.clone(),
                display_name: None,
                subject: String::new(),
                email_verified: true,
            },
            Command::CreateSession(Session {
                resource: Some(name("db")),
                ..sso.clone()
            }),
            Command::ConsumeHandoff {
                id: 2,
                expires_at: later - 1,
            },
            Command::ConsumeEmailCode {
                id: 3,
                expires_at: later + 60,
                resource: name("nowhere"),
            },
        ];
        for command in refused {
            let what = command.name();
            assert!(h.system_at(later, command).is_err(), "{what}");
            assert_eq!(kept(&h), (1, 1), "a refused {what} forgot what expired");
        }
        // What succeeds forgets: a used code the codes that ended, a stored session the
        // sessions that did.
        h.system_at(
            later,
            Command::ConsumeHandoff {
                id: 2,
                expires_at: later + 60,
            },
        )
        .unwrap();
        assert_eq!(
            h.reg.used_handoffs.iter().copied().collect::<Vec<_>>(),
            vec![(later + 60, 2)]
        );
        let session = Session {
            via: Via::Pin,
            resource: Some(name("db")),
            expires_at: later + 60,
            ..sso
        };
        h.system_at(later, Command::CreateSession(session)).unwrap();
        assert_eq!(
            h.reg.sessions().keys().copied().collect::<Vec<_>>(),
            vec![SessionId(1234)]
        );
        assert_eq!(h.reg.session_expiry.len(), 1);
    }

    #[test]
    fn an_email_code_opens_its_resource_once() {
        let mut h = Harness::new();
        let t = 1_700_000_000;
        h.admin(Command::Create(AnyEntity::Resource(resource(
            "db", None, 5432,
        ))))
        .unwrap();
        let code = |id: u128, expires_at: u64, resource: &str| Command::ConsumeEmailCode {
            id,
            expires_at,
            resource: name(resource),
        };
        let conflict = |message: &str| {
            Err(RegistryError::Conflict {
                message: message.into(),
            })
        };
        assert_eq!(
            h.system_at(t, code(1, t + 600, "nowhere")),
            Err(RegistryError::NotFound {
                kind: Kind::Resource,
                name: "nowhere".into()
            })
        );
        assert_eq!(
            h.system_at(t, code(1, t - 1, "db")),
            conflict("this code has expired")
        );
        assert_eq!(
            h.system_at(t, code(1, t + MAX_EMAIL_CODE_TTL + 1, "db")),
            conflict("an e-mail code is valid for at most 86400 s")
        );
        assert_eq!(
            h.admin(code(1, t + 600, "db")),
            Err(RegistryError::Forbidden)
        );
        assert!(h.reg.used_handoffs.is_empty(), "refusals use nothing up");
        assert_eq!(h.system_at(t, code(1, t + 600, "db")), Ok(Outcome::Done));
        assert_eq!(
            h.system_at(t + 10, code(1, t + 600, "db")),
            conflict("this code was already used")
        );
        // Handoff links keep their own words.
        assert_eq!(
            h.system_at(
                t,
                Command::ConsumeHandoff {
                    id: 9,
                    expires_at: t - 1
                }
            ),
            conflict("this sign-in link has expired")
        );
    }

    // Every command, refused or not: the contract of `apply_request`.

    /// The variant names serde's derive gives `T` (its `VARIANTS`, in declaration order):
    /// the list of every command, read from the type itself rather than kept by hand.
    fn serde_variants<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
        struct Probe<'a>(&'a mut &'static [&'static str]);
        impl<'de> serde::Deserializer<'de> for Probe<'_> {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: serde::de::Visitor<'de>>(
                self,
                _: V,
            ) -> Result<V::Value, Self::Error> {
                Err(serde::de::Error::custom("only enums are probed"))
            }
            fn deserialize_enum<V: serde::de::Visitor<'de>>(
                self,
                _: &'static str,
                variants: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                *self.0 = variants;
                Err(serde::de::Error::custom("probed"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
                struct identifier ignored_any
            }
        }
        let mut variants: &'static [&'static str] = &[];
        let _ = T::deserialize(Probe(&mut variants));
        variants
    }

    /// splitmix64: seeded, and the same sequence on every platform and version.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }

        fn pick<T: Clone>(&mut self, items: &[T]) -> T {
            items[self.below(items.len() as u64) as usize].clone()
        }
    }

    /// A self-signed certificate and its key, made once.
    fn test_certificate() -> &'static (String, String) {
        static CERT: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
        CERT.get_or_init(|| {
            let c = rcgen::generate_simple_self_signed(vec!["app.example.com".to_owned()])
                .expect("a self-signed certificate");
            (c.cert.pem(), c.signing_key.serialize_pem())
        })
    }

    fn set_any_revision(e: &mut AnyEntity, revision: u64) {
        match e {
            AnyEntity::User(e) => e.set_revision(revision),
            AnyEntity::Role(e) => e.set_revision(revision),
            AnyEntity::IdentityProvider(e) => e.set_revision(revision),
            AnyEntity::Site(e) => e.set_revision(revision),
            AnyEntity::Resource(e) => e.set_revision(revision),
            AnyEntity::Policy(e) => e.set_revision(revision),
            AnyEntity::Certificate(e) => e.set_revision(revision),
        }
    }

    fn any_revision(e: &AnyEntity) -> u64 {
        match e {
            AnyEntity::User(e) => e.revision(),
            AnyEntity::Role(e) => e.revision(),
            AnyEntity::IdentityProvider(e) => e.revision(),
            AnyEntity::Site(e) => e.revision(),
            AnyEntity::Resource(e) => e.revision(),
            AnyEntity::Policy(e) => e.revision(),
            AnyEntity::Certificate(e) => e.revision(),
        }
    }

    /// A registration as the join handler submits it.
    fn register_node(n: &str, cluster_addr: &str, region: &str) -> Command {
        Command::RegisterNode {
            name: name(n),
            cluster_addr: cluster_addr.into(),
            admin_addr: "127.0.0.1:7443".into(),
            region: region.into(),
            role: NodeRole::Voter,
        }
    }

    const NAMES: [&str; 3] = ["a", "b", "c"];
    const EMAILS: [&str; 4] = [
        "a@example.com",
        "b@example.com",
        "x@example.com",
        "not mail",
    ];
    const KINDS: [Kind; 11] = [
        Kind::User,
        Kind::Role,
        Kind::IdentityProvider,
        Kind::Site,
        Kind::Resource,
        Kind::Policy,
        Kind::Certificate,
        Kind::ApiKey,
        Kind::Node,
        Kind::JoinToken,
        Kind::Device,
    ];

    /// Makes requests of every kind against a registry: drawn from small pools of names,
    /// ids and times so that they often meet what earlier ones made (and are accepted) and
    /// often do not (wrong revisions, unknown or taken names, expired or used codes and
    /// tokens, actors that may not send them).
    struct Fuzz {
        rng: Rng,
        /// The cluster's clock, seconds since the epoch: it moves on by jumps of up to
        /// hours, so that sessions, codes, tokens and tries expire.
        now: u64,
        /// A node, join token and key record as bootstrap makes them, to vary.
        node: Node,
        join_token: JoinTokenRecord,
        api_key: ApiKeyRecord,
    }

    impl Fuzz {
        fn new(seed: u64) -> Self {
            let h = Harness::new();
            Self {
                rng: Rng(seed),
                now: 1_700_000_000,
                node: h.reg.nodes()[&name("n1")].clone(),
                join_token: h.reg.join_tokens()[&1].clone(),
                api_key: h.reg.api_keys()[&name("bootstrap")].clone(),
            }
        }

        fn tick(&mut self) {
            self.now += match self.rng.below(100) {
                0 => 90_000,
                1..=2 => 4000,
                _ => self.rng.pick(&[0, 0, 0, 1, 10, 30, 60, 300, 900]),
            };
        }

        /// A time near now: before it (expired), at it, or after it.
        fn around(&mut self) -> u64 {
            let offset: i64 = self
                .rng
                .pick(&[-4000, -100, -1, 0, 1, 60, 300, 3600, 86_400]);
            self.now.saturating_add_signed(offset)
        }

        fn name(&mut self) -> Name {
            name(self.rng.pick(&NAMES))
        }

        fn names(&mut self) -> Vec<Name> {
            NAMES
                .iter()
                .filter(|_| self.rng.chance(40))
                .map(|n| name(n))
                .collect()
        }

        fn hash(&mut self) -> SecretHash {
            SecretHash([self.rng.below(3) as u8; 32])
        }

        fn request(&mut self, reg: &Registry, variant: &str) -> Request {
            let command = self.command(reg, variant);
            assert_eq!(
                command.name(),
                variant,
                "the generator made another variant"
            );
            let actor = match self.rng.below(20) {
                0..=11 => Actor::System,
                12..=16 => Actor::ApiKey(KeyId(7)),
                17 => Actor::ApiKey(KeyId(8)),
                18 => Actor::ApiKey(KeyId(9)),
                _ => Actor::ApiKey(KeyId(99)),
            };
            // A node whose clock is behind stamps an earlier time.
            let at = if self.rng.chance(10) {
                self.now - 120
            } else {
                self.now
            };
            Request {
                id: RequestId(u128::from(self.rng.next()) | 1 << 100),
                at,
                actor,
                command,
            }
        }

        fn entity(&mut self, kind: Kind, n: Name) -> AnyEntity {
            match kind {
                Kind::User => AnyEntity::User(User {
                    name: n,
                    email: self
                        .rng
                        .chance(70)
                        .then(|| self.rng.pick(&EMAILS).to_owned()),
                    display_name: None,
                    disabled: self.rng.chance(20),
                    revision: 0,
                }),
                Kind::Role => AnyEntity::Role(Role {
                    name: n,
                    description: String::new(),
                    members: self.names().into_iter().collect(),
                    revision: 0,
                }),
                Kind::IdentityProvider => AnyEntity::IdentityProvider(IdentityProvider {
                    name: n,
                    issuer: self
                        .rng
                        .pick(&["https://idp.example.com", "ftp://idp.example.com"])
                        .into(),
                    client_id: "warren".into(),
                    client_secret: warren_proto::Secret::new(""),
                    scopes: Vec::new(),
                    groups_claim: None,
                    trust_email: self.rng.chance(50),
                    revision: 0,
                    display_name: self
                        .rng
                        .chance(30)
                        .then(|| self.rng.pick(&["Corp", " "]).to_owned()),
                    auto_create: self.rng.chance(70),
                    post_logout_redirect: self.rng.chance(30),
                }),
                Kind::Site => AnyEntity::Site(Site {
                    name: n,
                    description: self.rng.pick(&["", "hq"]).into(),
                    revision: 0,
                }),
                Kind::Resource => {
                    let site = self.rng.chance(50).then(|| self.rng.pick(&NAMES));
                    let mut r = resource(n.as_str(), site, self.rng.below(3) as u16 + 1);
                    r.policies = self.names();
                    if self.rng.chance(30) {
                        r.route = Route::Http {
                            domain: "app.example.com".into(),
                            path_prefix: self.rng.chance(50).then(|| "/app".to_owned()),
                        };
                        r.targets = vec![Target {
                            host: "10.0.0.1".into(),
                            port: 80,
                        }];
                        if matches!(
                            r.route,
                            Route::Http {
                                path_prefix: Some(_),
                                ..
                            }
                        ) && self.rng.chance(50)
                        {
                            r.http.prefix_rewrite = Some("/".into());
                        }
                    }
                    AnyEntity::Resource(r)
                }
                Kind::Policy => AnyEntity::Policy(Policy {
                    name: n,
                    description: self.rng.pick(&["", "ops"]).into(),
                    allow: None,
                    deny: None,
                    revision: 0,
                }),
                Kind::Certificate | Kind::ApiKey | Kind::Node | Kind::JoinToken | Kind::Device => {
                    let (cert_pem, key_pem) = if self.rng.chance(60) {
                        test_certificate().clone()
                    } else {
                        ("not a certificate".to_owned(), "no key".to_owned())
                    };
                    AnyEntity::Certificate(Certificate {
                        name: n,
                        cert_pem,
                        key_pem: warren_proto::Secret::new(key_pem),
                        revision: 0,
                    })
                }
            }
        }

        /// 0 (no precondition), the stored revision, or a stale one.
        fn revision(&mut self, stored: Option<u64>) -> u64 {
            match (self.rng.below(3), stored) {
                (0, _) | (_, None) => 0,
                (1, Some(r)) => r,
                (_, Some(r)) => r.saturating_sub(1).max(1) + 1000,
            }
        }

        fn session(&mut self, via: Via, resource: Option<Name>) -> Session {
            Session {
                id: SessionId(u128::from(self.rng.below(4))),
                user: name("pending"),
                idp: name(self.rng.pick(&["corp", "social"])),
                email: self.rng.pick(&EMAILS).into(),
                email_verified: false,
                groups: Vec::new(),
                created_at: self.now,
                expires_at: self.around(),
                refresh_token: None,
                token_expires_at: None,
                id_token: None,
                via,
                resource,
                claims: String::new(),
            }
        }

        fn attempt(&mut self) -> AttemptKey {
            attempt(
                self.rng.pick(&["192.0.2.1", "2001:db8::1"]),
                self.rng.pick(&["pin:a", "code:b", ""]),
            )
        }

        fn command(&mut self, reg: &Registry, variant: &str) -> Command {
            match variant {
                "Bootstrap" => {
                    let mut node = self.node.clone();
                    node.name = name(self.rng.pick(&["n1", "n2"]));
                    let mut api_key = self.api_key.clone();
                    api_key.id = KeyId(self.rng.pick(&[7, 8]));
                    Command::Bootstrap {
                        cluster_id: 99,
                        node,
                        api_key,
                        join_token: self.join_token.clone(),
                    }
                }
                "Create" => {
                    let kind = self.rng.pick(&KINDS[..7]);
                    let n = self.name();
                    let mut e = self.entity(kind, n);
                    if self.rng.chance(10) {
                        set_any_revision(&mut e, 5);
                    }
                    Command::Create(e)
                }
                "Update" => {
                    let kind = self.rng.pick(&KINDS[..7]);
                    let n = self.name();
                    let stored = reg.entity(kind, &n);
                    let revision = self.revision(stored.as_ref().map(any_revision));
                    // The stored entity changed in one field, or a new one (a fresh draw).
                    let mut e = match stored {
                        Some(AnyEntity::User(mut u)) if self.rng.chance(70) => {
                            u.disabled = !u.disabled;
                            AnyEntity::User(u)
                        }
                        Some(AnyEntity::Site(mut s)) if self.rng.chance(70) => {
                            s.description.push('!');
                            AnyEntity::Site(s)
                        }
                        _ => self.entity(kind, n),
                    };
                    set_any_revision(&mut e, revision);
                    Command::Update(e)
                }
                "Delete" => {
                    let kind = self.rng.pick(&KINDS);
                    let n = self.name();
                    let stored = reg.entity(kind, &n).as_ref().map(any_revision);
                    Command::Delete {
                        kind,
                        name: n,
                        revision: self.revision(stored),
                    }
                }
                "Apply" => {
                    let section = |fuzz: &mut Self, kind: Kind| {
                        fuzz.rng.chance(60).then(|| {
                            (0..fuzz.rng.below(3))
                                .map(|_| {
                                    let n = fuzz.name();
                                    fuzz.entity(kind, n)
                                })
                                .collect::<Vec<_>>()
                        })
                    };
                    let sites = section(self, Kind::Site);
                    let users = section(self, Kind::User);
                    let roles = section(self, Kind::Role);
                    let resources = section(self, Kind::Resource);
                    fn only<T>(
                        s: Option<Vec<AnyEntity>>,
                        f: impl Fn(AnyEntity) -> Option<T>,
                    ) -> Option<Vec<T>> {
                        s.map(|v| v.into_iter().filter_map(f).collect())
                    }
                    Command::Apply {
                        manifest: Manifest {
                            sites: only(sites, |e| match e {
                                AnyEntity::Site(s) => Some(s),
                                _ => None,
                            }),
                            users: only(users, |e| match e {
                                AnyEntity::User(u) => Some(u),
                                _ => None,
                            }),
                            roles: only(roles, |e| match e {
                                AnyEntity::Role(r) => Some(r),
                                _ => None,
                            }),
                            resources: only(resources, |e| match e {
                                AnyEntity::Resource(r) => Some(r),
                                _ => None,
                            }),
                            ..Manifest::default()
                        },
                        prune: self.rng.chance(30),
                    }
                }
                "CreateApiKey" => Command::CreateApiKey(ApiKeyRecord {
                    name: name(self.rng.pick(&["bootstrap", "k2", "k3"])),
                    id: KeyId(self.rng.pick(&[7, 8, 9])),
                    hash: self.hash(),
                    scope: self.rng.pick(&[Scope::Admin, Scope::ReadOnly]),
                    created_at: 0,
                    revision: 0,
                }),
                "RevokeApiKey" => Command::RevokeApiKey {
                    name: name(self.rng.pick(&["bootstrap", "k2", "k3"])),
                },
                "CreateJoinToken" => {
                    let mut token = self.join_token.clone();
                    token.id = self.rng.below(3) + 1;
                    token.hash = self.hash();
                    Command::CreateJoinToken(token)
                }
                "RevokeJoinToken" => Command::RevokeJoinToken {
                    id: self.rng.below(3) + 1,
                },
                "RegisterNode" => register_node(
                    self.rng.pick(&["n1", "n2", "n3"]),
                    self.rng.pick(&[
                        "127.0.0.1:7400",
                        "127.0.0.1:7401",
                        "127.0.0.1:7402",
                        "nonsense",
                    ]),
                    self.rng.pick(&["", "eu"]),
                ),
                "RegisterJoiningNode" => {
                    let Command::RegisterNode {
                        name,
                        cluster_addr,
                        admin_addr,
                        region,
                        role,
                    } = self.command(reg, "RegisterNode")
                    else {
                        unreachable!("the RegisterNode generator makes a RegisterNode")
                    };
                    Command::RegisterJoiningNode {
                        name,
                        cluster_addr,
                        admin_addr,
                        region,
                        role,
                    }
                }
                "UpdateNode" => {
                    let n = name(self.rng.pick(&["n1", "n2", "n3"]));
                    let stored = reg.nodes().get(&n).map(|n| n.revision);
                    Command::UpdateNode {
                        name: n,
                        region: self.rng.pick(&["eu", "us", "x".repeat(64).as_str()]).into(),
                        revision: self.revision(stored),
                    }
                }
                "DeleteNode" => Command::DeleteNode {
                    name: name(self.rng.pick(&["n1", "n2", "n3"])),
                },
                "SignIn" => Command::SignIn {
                    session: self.session(Via::Sso, None),
                    display_name: None,
                    subject: self.rng.pick(&["s1", "s2", ""]).into(),
                    email_verified: self.rng.chance(60),
                },
                "RefreshSession" => Command::RefreshSession {
                    id: SessionId(u128::from(self.rng.below(4))),
                    refresh_token: self.rng.chance(50).then(|| warren_proto::Secret::new("rt")),
                    token_expires_at: Some(self.around()),
                    groups: vec!["ops".into()],
                },
                "RevokeSession" => Command::RevokeSession {
                    id: SessionId(u128::from(self.rng.below(4))),
                },
                "ConsumeHandoff" => Command::ConsumeHandoff {
                    id: u128::from(self.rng.below(3)),
                    expires_at: self.around(),
                },
                "EnsureProxyKeys" => Command::EnsureProxyKeys(ProxyKeys {
                    cookie_key: warren_proto::Secret::new(format!("key{}", self.rng.below(3))),
                    signing_keys: Vec::new(),
                }),
                "CreateSiteToken" => Command::CreateSiteToken(SiteTokenRecord {
                    id: self.rng.below(3),
                    site: self.name(),
                    hash: self.hash(),
                    created_at: 0,
                    // Often one that lives a day, so that some are still there to consume.
                    expires_at: if self.rng.chance(50) {
                        self.now + 86_400
                    } else {
                        self.around()
                    },
                }),
                "ConsumeSiteToken" => {
                    // Often one that exists and has not expired, so that some are accepted.
                    let stored: Vec<u64> = reg
                        .site_tokens()
                        .values()
                        .filter(|t| t.expires_at >= self.now)
                        .map(|t| t.id)
                        .collect();
                    let id = if !stored.is_empty() && self.rng.chance(50) {
                        self.rng.pick(&stored)
                    } else {
                        self.rng.below(3)
                    };
                    Command::ConsumeSiteToken { id }
                }
                "AcmeLease" => Command::AcmeLease {
                    node: self.rng.below(3) + 1,
                    until: if self.rng.chance(20) {
                        0
                    } else {
                        self.around()
                    },
                },
                "AcmeAccount" => Command::AcmeAccount(warren_proto::Secret::new(format!(
                    "{}",
                    self.rng.below(3)
                ))),
                "AcmeChallenge" => Command::AcmeChallenge {
                    token: self
                        .rng
                        .pick(&["t1", "t2", "t".repeat(300).as_str()])
                        .into(),
                    key_authorization: "ka".into(),
                    expires_at: self.around(),
                },
                "AcmeChallengeDone" => Command::AcmeChallengeDone {
                    token: self.rng.pick(&["t1", "t2"]).into(),
                },
                "CreateSession" => {
                    let via = self.rng.pick(&[
                        Via::Sso,
                        Via::Pin,
                        Via::Passcode,
                        Via::EmailCode,
                        Via::ShareLink,
                    ]);
                    let resource = self.rng.chance(90).then(|| self.name());
                    Command::CreateSession(self.session(via, resource))
                }
                "CreateShareLink" => Command::CreateShareLink(ShareLink {
                    id: self.rng.below(3),
                    resource: self.name(),
                    hash: self.hash(),
                    created_at: 0,
                    expires_at: if self.rng.chance(50) {
                        self.now + 86_400
                    } else {
                        self.around()
                    },
                }),
                "RevokeShareLink" => {
                    let stored: Vec<u64> = reg.share_links().keys().copied().collect();
                    let id = if !stored.is_empty() && self.rng.chance(50) {
                        self.rng.pick(&stored)
                    } else {
                        self.rng.below(3)
                    };
                    Command::RevokeShareLink { id }
                }
                "RotateSigningKey" => {
                    Command::RotateSigningKey(warren_proto::session::SigningKey {
                        kid: format!("k{}", self.rng.below(100)),
                        pkcs8: warren_proto::Secret::new("pkcs8"),
                        created_at: self.now,
                    })
                }
                "ReserveAttempt" => Command::ReserveAttempt {
                    attempt: self.attempt(),
                    id: u128::from(self.rng.below(4)),
                    limit: self.rng.pick(&[0, 1, 2, 3]),
                    window: self.rng.pick(&[0, 60, 600, 7200]),
                },
                "ReleaseAttempt" => Command::ReleaseAttempt {
                    attempt: self.attempt(),
                    id: u128::from(self.rng.below(4)),
                },
                "ConsumeEmailCode" => Command::ConsumeEmailCode {
                    id: u128::from(self.rng.below(3)),
                    expires_at: if self.rng.chance(10) {
                        self.now + MAX_EMAIL_CODE_TTL + 1
                    } else {
                        self.around()
                    },
                    resource: match reg.resources().keys().next() {
                        Some(r) if self.rng.chance(50) => r.clone(),
                        _ => self.name(),
                    },
                },
                "RegisterDevice" => {
                    // Mostly a user that exists, with one of its sessions (live or not) or
                    // none; sometimes anyone with any session.
                    let users: Vec<Name> = reg.users().keys().cloned().collect();
                    let owner = if !users.is_empty() && self.rng.chance(80) {
                        self.rng.pick(&users)
                    } else {
                        self.name()
                    };
                    let own: Vec<SessionId> = reg
                        .sessions()
                        .values()
                        .filter(|s| s.user == owner)
                        .map(|s| s.id)
                        .collect();
                    let session = match self.rng.below(10) {
                        0..=4 if !own.is_empty() => Some(self.rng.pick(&own)),
                        0..=6 => None,
                        _ => Some(SessionId(u128::from(self.rng.below(4)))),
                    };
                    Command::RegisterDevice {
                        name: name(self.rng.pick(&["laptop", "phone"])),
                        owner,
                        public_key: WgKey([self.rng.below(3) as u8; 32]),
                        os: self
                            .rng
                            .pick(&["linux", "macos", "x".repeat(65).as_str()])
                            .into(),
                        session,
                        address: self
                            .rng
                            .chance(50)
                            .then(|| "198.51.100.7".parse().expect("address")),
                    }
                }
                "TouchDevice" => Command::TouchDevice {
                    name: name(self.rng.pick(&["laptop", "phone", "tablet"])),
                    address: self
                        .rng
                        .chance(50)
                        .then(|| "2001:db8::7".parse().expect("address")),
                },
                "SetSiteKey" => Command::SetSiteKey {
                    site: name(self.rng.pick(&NAMES)),
                    key: WgKey([self.rng.pick(&[1u8, 2]); 32]),
                },
                "SetNodeRelay" => Command::SetNodeRelay {
                    node: name(self.rng.pick(&["n1", "n2", "n3", "gone"])),
                    relay: self
                        .rng
                        .pick(&["127.0.0.1:7401", "not an address"])
                        .to_string(),
                },
                "WithSide" => {
                    let inner = self.rng.pick(&["Create", "Update", "Apply"]);
                    let mut command = self.command(reg, inner);
                    if self.rng.chance(70) {
                        if let wrapped @ Command::WithSide { .. } = command.clone().with_side() {
                            return wrapped;
                        }
                    }
                    if self.rng.chance(10) {
                        command = Command::WithSide {
                            command: Box::new(command),
                            side: Side::default(),
                        };
                    }
                    let n = self.name();
                    Command::WithSide {
                        command: Box::new(command),
                        side: Side {
                            providers: vec![(
                                n.clone(),
                                ProviderSide {
                                    display_name: Some("Staff".into()),
                                    auto_create: false,
                                    post_logout_redirect: true,
                                },
                            )],
                            resources: vec![(
                                n,
                                ResourceSide {
                                    prefix_rewrite: Some("/v2".into()),
                                },
                            )],
                        },
                    }
                }
                "SetClusterTitle" => Command::SetClusterTitle {
                    title: self
                        .rng
                        .pick(&[Some("Acme"), Some(""), Some("a\nb"), None])
                        .map(str::to_owned),
                },
                #[cfg(feature = "format-next")]
                "Annotate" => Command::Annotate {
                    note: "upgrade test".into(),
                },
                other => panic!("the generator makes no Command::{other}: add it to Fuzz::command"),
            }
        }
    }

    /// The registry without its bookkeeping (applied index, digest, request count and
    /// remembered replies): what a refused command must leave as it was.
    fn tables_only(r: &Registry) -> Registry {
        let mut t = Registry {
            dedup: OrdMap::new(),
            dedup_order: Vector::new(),
            last_applied: None,
            digest: 0,
            applied_requests: 0,
            ..r.clone()
        };
        t.since_v2.highest_format = Format::V1;
        t
    }

    /// [`tables_only`], encoded (secrets included, which `Debug` redacts), with the
    /// indexes a snapshot leaves out.
    fn state(r: &Registry) -> (Vec<u8>, String) {
        (
            encode("registry", &tables_only(r)).unwrap(),
            format!(
                "{:?} {:?} {:?}",
                r.keys_by_id, r.nodes_by_id, r.devices_by_key
            ),
        )
    }

    /// The lines of [`tables_only`]'s `Debug` that differ, for a failure message.
    fn state_diff(a: &Registry, b: &Registry) -> String {
        let a = format!("{:#?}", tables_only(a));
        let b = format!("{:#?}", tables_only(b));
        let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
        let gone: Vec<&&str> = a.iter().filter(|l| !b.contains(l)).take(20).collect();
        let new: Vec<&&str> = b.iter().filter(|l| !a.contains(l)).take(20).collect();
        format!("lines gone: {gone:#?}\nlines new: {new:#?}")
    }

    /// Seeds, and commands per seed, of `a_refused_command_changes_nothing`.
    const SEEDS: u64 = 200;
    const STEPS: usize = 120;

    /// The contract of `apply_request`, for every command: a refused one leaves every table
    /// as it was (it only records its reply and moves the applied index); a retried one
    /// changes nothing and gets the first reply; the same log gives the same registry.
    /// Registries are reached by the generated commands that were accepted (one seed in
    /// eight starts before bootstrap). Replay one seed with `REGISTRY_SEED=<n>`.
    #[test]
    fn a_refused_command_changes_nothing() {
        let variants = serde_variants::<Command>();
        assert!(variants.len() > 20, "serde's variant list: {variants:?}");
        let seeds: Vec<u64> = match std::env::var("REGISTRY_SEED") {
            Ok(s) => vec![s.parse().expect("REGISTRY_SEED is a number")],
            Err(_) => (0..SEEDS).collect(),
        };
        // Variant -> (accepted, refused).
        let mut seen: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
        for seed in seeds {
            let mut fuzz = Fuzz::new(seed);
            let start = || {
                if seed % 8 == 0 {
                    Harness {
                        reg: Registry::default(),
                        index: 0,
                        admin: KeyId(7),
                    }
                } else {
                    Harness::new()
                }
            };
            let (mut h, mut twin) = (start(), start());
            let mut sent: Vec<Request> = Vec::new();
            for step in 0..STEPS {
                fuzz.tick();
                let retry = !sent.is_empty() && fuzz.rng.chance(10);
                let req = if retry {
                    fuzz.rng.pick(&sent)
                } else {
                    let variant = fuzz.rng.pick(variants);
                    fuzz.request(&h.reg, variant)
                };
                let variant = req.command.name();
                let before = h.reg.clone();
                let reply = h.submit(req.clone());
                let ctx = || format!("seed {seed}, step {step}: {req:?} -> {reply:?}");
                // The twin gets the request as a follower does: decoded from the log.
                let decoded: Request =
                    decode("request", &encode("request", &req).unwrap()).unwrap();
                assert_eq!(twin.submit(decoded), reply, "{}: replicas differ", ctx());
                if !retry {
                    let counts = seen.entry(variant).or_default();
                    match reply {
                        Ok(_) => counts.0 += 1,
                        Err(_) => counts.1 += 1,
                    }
                }
                if retry || reply.is_err() {
                    assert!(
                        state(&h.reg) == state(&before),
                        "{}: the registry changed\n{}",
                        ctx(),
                        state_diff(&before, &h.reg)
                    );
                }
                // What every applied request records, refused or not.
                assert_eq!(h.reg.remembered_reply(req.id), Some(&reply), "{}", ctx());
                assert_eq!(h.reg.applied_requests(), before.applied_requests() + 1);
                assert_eq!(h.reg.last_applied().map(|l| l.index), Some(h.index));
                sent.push(req);
            }
            assert!(
                state(&h.reg) == state(&twin.reg),
                "seed {seed}: replicas differ"
            );
            let (a, b) = h.snapshot_round_trip();
            assert_eq!(a, b, "seed {seed}: snapshot round trip");
        }
        if std::env::var("REGISTRY_SEED").is_err() {
            for v in variants {
                let (accepted, refused) = seen.get(v).copied().unwrap_or_default();
                assert!(
                    accepted > 0 && refused > 0,
                    "Command::{v} was accepted {accepted} and refused {refused} times: make \
                     the generator reach both"
                );
            }
        }
    }
}
