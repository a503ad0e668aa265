//! Bodies of the admin API (HTTPS JSON under `/v1`), shared by the node that serves it and
//! the client that calls it.
//!
//! ```text
//! GET    /v1/health                          no key needed; 503 when this node fails closed
//! GET    /v1/<kind>                          list        kind: users roles identity-providers
//! POST   /v1/<kind>                          create            sites resources policies
//! GET    /v1/<kind>/<name>                   get
//! PATCH  /v1/<kind>/<name>                   update (JSON merge patch; "revision" = precondition)
//! DELETE /v1/<kind>/<name>                   delete
//! GET    /v1/nodes[/<name>], PATCH, DELETE   nodes (they are created by `warren-node join`)
//! GET    /v1/api-keys[/<name>], POST, DELETE API keys (DELETE revokes)
//! POST   /v1/join-tokens, GET, DELETE        join tokens for new nodes
//! GET    /v1/cluster                         cluster status
//! POST   /v1/cluster/members                 add a known node as voter or learner
//! POST   /v1/cluster/members/<name>/promote  learner -> voter
//! DELETE /v1/cluster/members/<name>          remove from the Raft membership
//! POST   /v1/apply                           make the registry match a manifest
//! ```
//!
//! Every error is an [`ErrorBody`] with a machine-readable [`ErrorCode`].

use serde::{Deserialize, Serialize};

use crate::registry::{IdentityProvider, Kind, Policy, Resource, Role, Site, User};
use crate::Name;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ApiError,
}

/// An error: a stable code for scripts, a sentence for people, and the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// What happened and what was expected.
    pub message: String,
    /// The offending field (a path like `route.http.domain`), when one is at fault.
    #[serde(default)]
    pub field: Option<String>,
}

/// Machine-readable error codes, each with the HTTP status it is sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not valid JSON or does not have the expected shape.
    InvalidJson,
    /// 400: a field has a value that is not allowed.
    InvalidField,
    /// 400: a field names an entity that does not exist.
    UnknownReference,
    /// 401: no API key, a malformed one, or one that is unknown or revoked.
    Unauthorized,
    /// 403: the API key may not do this (a read-only key writing).
    Forbidden,
    /// 404: no such entity or route.
    NotFound,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 409: an entity with this name (or this unique value) already exists.
    AlreadyExists,
    /// 409: the entity is still referred to by another one.
    InUse,
    /// 409: the entity changed since the revision the request was based on.
    RevisionConflict,
    /// 409: the request cannot be done in the cluster's current state.
    Conflict,
    /// 413: the body is larger than the API accepts.
    PayloadTooLarge,
    /// 503: the cluster has no quorum or no leader; nothing was changed, or (for a write that
    /// timed out) the outcome is unknown and the message says so.
    NoQuorum,
    /// 503: this node is starting, stopping, or cut off from the cluster.
    Unavailable,
    /// 500: a bug or a storage failure on the node.
    Internal,
}

impl ErrorCode {
    /// The HTTP status code sent with this error.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidJson | ErrorCode::InvalidField | ErrorCode::UnknownReference => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::AlreadyExists
            | ErrorCode::InUse
            | ErrorCode::RevisionConflict
            | ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::NoQuorum | ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

/// A list response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct List<T> {
    /// The entities, sorted by name.
    pub items: Vec<T>,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Everything.
    #[default]
    Admin,
    /// Reads only; writes are answered with 403.
    ReadOnly,
}

/// An API key as the API shows it: never the secret or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyView {
    /// Unique name.
    pub name: Name,
    /// The public id inside the key (`wrn_<id>_…`).
    pub key_id: String,
    /// What the key may do.
    pub scope: Scope,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Raft log index of the last change.
    pub revision: u64,
}

/// Body of `POST /v1/api-keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// Unique name for the key.
    pub name: Name,
    /// What the key may do; `admin` when left out.
    #[serde(default)]
    pub scope: Scope,
}

/// Answer to `POST /v1/api-keys`: the only time the key is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedApiKey {
    /// The stored key.
    pub api_key: ApiKeyView,
    /// The key to give to the user of the API (`wrn_…`).
    pub key: String,
}

/// An identity provider as the API shows it: the client secret is never returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityProviderView {
    /// Unique name.
    pub name: Name,
    /// Issuer URL.
    pub issuer: String,
    /// OAuth client id.
    pub client_id: String,
    /// Whether a client secret is stored.
    pub client_secret_set: bool,
    /// Extra scopes.
    pub scopes: Vec<String>,
    /// Claim that lists groups.
    pub groups_claim: Option<String>,
    /// Whether the provider's e-mail addresses count as verified without `email_verified`.
    pub trust_email: bool,
    /// What the sign-in page calls it.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Whether a first sign-in creates a user.
    #[serde(default = "yes")]
    pub auto_create: bool,
    /// Whether sign-out asks the provider to send the browser back.
    #[serde(default)]
    pub post_logout_redirect: bool,
    /// Raft log index of the last change.
    pub revision: u64,
}

fn yes() -> bool {
    true
}

impl From<&IdentityProvider> for IdentityProviderView {
    fn from(p: &IdentityProvider) -> Self {
        Self {
            name: p.name.clone(),
            issuer: p.issuer.clone(),
            client_id: p.client_id.clone(),
            client_secret_set: !p.client_secret.is_empty(),
            scopes: p.scopes.clone(),
            groups_claim: p.groups_claim.clone(),
            trust_email: p.trust_email,
            display_name: p.display_name.clone(),
            auto_create: p.auto_create,
            post_logout_redirect: p.post_logout_redirect,
            revision: p.revision,
        }
    }
}

/// A certificate as the API shows it: the private key is never returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateView {
    /// Unique name.
    pub name: Name,
    /// DNS names it serves.
    pub domains: Vec<String>,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
    /// Start of validity, seconds since the Unix epoch.
    #[serde(default)]
    pub not_before: i64,
    /// `acme` for the certificates the cluster ordered (named `acme.<domain>`), `uploaded`
    /// for the others.
    #[serde(default)]
    pub source: String,
    /// The PEM chain (public).
    pub cert_pem: String,
    /// Raft log index of the last change.
    pub revision: u64,
}

impl From<&crate::certificate::Certificate> for CertificateView {
    fn from(c: &crate::certificate::Certificate) -> Self {
        let info = c.info().ok();
        Self {
            name: c.name.clone(),
            domains: info.as_ref().map(|i| i.domains.clone()).unwrap_or_default(),
            not_after: info.as_ref().map(|i| i.not_after).unwrap_or(0),
            not_before: info.map(|i| i.not_before).unwrap_or(0),
            source: if c.name.as_str().starts_with("acme.") {
                "acme"
            } else {
                "uploaded"
            }
            .into(),
            cert_pem: c.cert_pem.clone(),
            revision: c.revision,
        }
    }
}

/// A node's place in the Raft membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    /// Votes in elections and counts towards quorum.
    Voter,
    /// Replicates everything, never votes.
    Learner,
    /// Known to the registry but not in the membership.
    None,
}

/// A node as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Raft node id.
    pub id: u64,
    /// Unique name.
    pub name: Name,
    /// Cluster (QUIC) address.
    pub cluster_addr: String,
    /// Admin API address.
    pub admin_addr: String,
    /// Region label.
    pub region: String,
    /// Voter, learner or none, from the Raft membership.
    pub role: MemberRole,
    /// The most it may be (from its join token, written into its certificate): a
    /// `learner` grade node never votes or holds the CA key.
    pub grade: crate::registry::NodeRole,
    /// Raft log index of the last change.
    pub revision: u64,
}

/// Body of `PATCH /v1/nodes/<name>`: the only field of a node an admin changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateNode {
    /// New region label.
    pub region: String,
    /// Precondition: the revision the change is based on (0 for none).
    #[serde(default)]
    pub revision: u64,
}

/// Body of `POST /v1/cluster/members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    /// A node known to the registry (it ran `warren-node join` once).
    pub node: Name,
    /// `voter` or `learner`.
    pub role: MemberRole,
}

/// Answer to `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The cluster's id (hex).
    pub cluster_id: String,
    /// The node that answered.
    pub answered_by: Name,
    /// Current leader, as the answering node knows it.
    pub leader: Option<Name>,
    /// Current term, as the answering node knows it.
    pub term: u64,
    /// Whether the membership is in the middle of a change (joint consensus).
    pub joint: bool,
    /// Every node in the registry or the membership.
    pub members: Vec<MemberStatus>,
}

/// One node in [`ClusterStatus`]. Fields other than the first five come from asking the
/// node itself and are empty when it did not answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Raft node id.
    pub id: u64,
    /// Node name.
    pub name: Name,
    /// Cluster address.
    pub cluster_addr: String,
    /// Admin API address.
    pub admin_addr: String,
    /// Voter, learner or none.
    pub role: MemberRole,
    /// Whether the answering node reached it just now.
    pub reachable: bool,
    /// Why it was not reached.
    pub error: Option<String>,
    /// Round trip from the answering node, in microseconds.
    pub rtt_us: Option<u64>,
    /// `leader`, `follower`, `learner`, `candidate`, `stopped` (its Raft failed) or `removed`
    /// (it learned that the cluster removed it), as the node says.
    pub state: Option<String>,
    /// The node's current term.
    pub term: Option<u64>,
    /// Index of the last entry in its log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to its registry.
    pub last_applied: Option<u64>,
    /// Last index covered by its current snapshot.
    pub snapshot_index: Option<u64>,
    /// Last index removed from its log by compaction.
    pub purged_index: Option<u64>,
    /// Milliseconds since it last heard from a leader (or, on the leader, from a quorum).
    pub leader_contact_ms: Option<u64>,
    /// Digest of every entry it applied (hex); members at the same `last_applied` must
    /// agree on it, or their registries diverged.
    pub applied_digest: Option<String>,
    /// The newest stored and node-to-node format it reads: during a rolling upgrade, a
    /// command of a newer format is refused until every member reads it.
    #[serde(default)]
    pub format: Option<u16>,
}

/// A declarative description of registry entities, as `warren admin apply -f` reads it.
///
/// A section that is present (even empty) is *managed*: with `prune`, entities of that
/// kind that the section does not name are deleted. A missing section leaves its kind alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Users.
    #[serde(default)]
    pub users: Option<Vec<User>>,
    /// Roles.
    #[serde(default)]
    pub roles: Option<Vec<Role>>,
    /// Identity providers.
    #[serde(default)]
    pub identity_providers: Option<Vec<IdentityProvider>>,
    /// Sites.
    #[serde(default)]
    pub sites: Option<Vec<Site>>,
    /// Resources.
    #[serde(default)]
    pub resources: Option<Vec<Resource>>,
    /// Policies.
    #[serde(default)]
    pub policies: Option<Vec<Policy>>,
}

impl Manifest {
    /// The kinds whose section is present.
    pub fn kinds(&self) -> Vec<Kind> {
        let present = [
            (Kind::User, self.users.is_some()),
            (Kind::Role, self.roles.is_some()),
            (Kind::IdentityProvider, self.identity_providers.is_some()),
            (Kind::Site, self.sites.is_some()),
            (Kind::Resource, self.resources.is_some()),
            (Kind::Policy, self.policies.is_some()),
        ];
        present
            .into_iter()
            .filter(|(_, p)| *p)
            .map(|(k, _)| k)
            .collect()
    }
}

/// Body of `POST /v1/apply`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    /// The wanted state.
    pub manifest: Manifest,
    /// Also delete entities of the kinds the manifest lists that it does not name.
    #[serde(default)]
    pub prune: bool,
    /// Report what would change without changing anything.
    #[serde(default)]
    pub dry_run: bool,
}

/// What an apply did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Every change, in the order applied.
    pub changes: Vec<Change>,
    /// How many entities in the manifest already matched.
    pub unchanged: usize,
}

/// One change made by an apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Create, update or delete.
    pub action: ChangeAction,
    /// Kind of entity.
    pub kind: Kind,
    /// Its name.
    pub name: Name,
    /// For updates, the top-level fields that changed.
    #[serde(default)]
    pub fields: Vec<String>,
}

/// What an apply did to one entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeAction {
    /// Created.
    Create,
    /// Updated.
    Update,
    /// Deleted (with `prune`).
    Delete,
}

/// Body of `POST /v1/join-tokens` (optional: without one the token admits a voter).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinToken {
    /// What a node admitted with it may be: `voter` (the default: votes, holds the CA
    /// key, admits others), `learner` (a replica that never votes and never holds the
    /// CA key, for a node you trust less) or `relay` (a relay-only node, `warren-node
    /// relay`: no registry, no vote, ciphertext only, for a node someone else runs).
    #[serde(default)]
    pub role: Option<crate::registry::NodeRole>,
}

/// A join token as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenView {
    /// Token id (hex), as inside the token.
    pub id: String,
    /// What a node admitted with it may be.
    pub role: crate::registry::NodeRole,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Raft log index of the last change.
    pub revision: u64,
}

/// Answer to `POST /v1/join-tokens`: the only time the token is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedJoinToken {
    /// The stored token.
    pub join_token: JoinTokenView,
    /// The token to pass to `warren-node join --token`.
    pub token: String,
}

/// Answer to `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Whether this node is in contact with a leader recently enough to serve.
    pub ok: bool,
    /// This node's name.
    pub node: Name,
    /// The leader it knows of.
    pub leader: Option<Name>,
    /// Milliseconds since it last heard from a leader (or, on the leader, from a quorum).
    pub leader_contact_ms: Option<u64>,
    /// Why it is not ok.
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_refuses_unknown_sections() {
        let err = serde_norway::from_str::<Manifest>("userz: []\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `userz`"), "{err}");
    }

    #[test]
    fn error_codes_map_to_the_statuses_users_expect() {
        assert_eq!(ErrorCode::Unauthorized.http_status(), 401);
        assert_eq!(ErrorCode::Forbidden.http_status(), 403);
        assert_eq!(ErrorCode::AlreadyExists.http_status(), 409);
        assert_eq!(ErrorCode::NoQuorum.http_status(), 503);
        assert_eq!(
            serde_json::to_string(&ErrorCode::UnknownReference).unwrap(),
            "\"unknown_reference\""
        );
    }
}
