//! The openraft type configuration and the request/reply that travel through the log.

use std::fmt;

use serde::{Deserialize, Serialize};
use warren_proto::registry::NodeId;
use warren_proto::token::KeyId;

use crate::registry::{Command, Outcome, RegistryError};

openraft::declare_raft_types!(
    /// Warren's Raft types: registry commands in, registry replies out, snapshots as bytes.
    pub TypeConfig:
        D = Proposal,
        R = Replies,
        NodeId = NodeId,
        Node = ClusterNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Vec<u8>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft instance type.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// The membership as stored with the state.
pub type StoredMembership = openraft::StoredMembership<NodeId, ClusterNode>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// Storage errors.
pub type StorageError = openraft::StorageError<NodeId>;

/// What Raft knows about a node: enough to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNode {
    /// Node name, for logs.
    pub name: String,
    /// `host:port` of its cluster (QUIC) endpoint.
    pub addr: String,
}

impl fmt::Display for ClusterNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// Identifies a write so that a retry (after a leader change, or by a client with an
/// idempotency key) is applied once and answered with the first reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(pub u128);

impl RequestId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

/// Who asks for a write. The state machine checks API keys again when it applies the write,
/// so a key revoked a moment earlier cannot sneak a write in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Actor {
    /// The cluster itself: bootstrap, joins, membership bookkeeping.
    System,
    /// A holder of this admin API key.
    ApiKey(KeyId),
}

/// A write: the payload of a normal Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Deduplication id.
    pub id: RequestId,
    /// When it was submitted, seconds since the Unix epoch (from the submitting node's clock;
    /// apply never reads a clock).
    pub at: u64,
    /// Who asks.
    pub actor: Actor,
    /// What to do.
    pub command: Command,
}

impl Request {
    /// A request with a fresh id, stamped with the current time. A command whose entities
    /// have side fields set is wrapped in [`Command::WithSide`], which carries them.
    pub fn new(actor: Actor, command: Command) -> Self {
        let command = command.with_side();
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self {
            id: RequestId::random(),
            at,
            actor,
            command,
        }
    }
}

/// The reply to a write, as the state machine produced it.
pub type Reply = Result<Outcome, RegistryError>;

/// The payload of a normal log entry: writes that arrived together at the leader, applied
/// in order. Batching is what lets one log append (one fsync on each node) carry many
/// concurrent writes; openraft 0.9 flushes the leader's log once per entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal(pub Vec<Request>);

/// The replies to a [`Proposal`], one per request, in order.
pub type Replies = Vec<Reply>;
