//! Node-to-node RPC: the messages, the [`Transport`] trait that carries them, and the
//! openraft network built on it.
//!
//! One request, one reply. The QUIC transport ([`crate::quic`]) sends each on its own
//! stream; a simulation can implement [`Transport`] over a simulated network instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, Snapshot, SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};
use warren_proto::registry::NodeId;

use crate::format::{self, Format};
use crate::types::{ClusterNode, LogId, Reply, Request, TypeConfig};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum Rpc {
    /// Raft log replication and heartbeats.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft election.
    Vote(VoteRequest<NodeId>),
    /// A whole snapshot, for a follower too far behind the log.
    Snapshot {
        /// The leader's vote.
        vote: Vote<NodeId>,
        /// What the snapshot covers.
        meta: SnapshotMeta<NodeId, ClusterNode>,
        /// The encoded registry.
        data: Vec<u8>,
    },
    /// A client write forwarded to the leader.
    Write(Request),
    /// Read index: the leader confirms it still leads and answers the index a linearizable
    /// read must wait for.
    ReadIndex,
    /// The receiving node's own view of itself (for cluster status).
    Status,
    /// A membership change forwarded to the leader.
    Membership(MembershipChange),
    /// Pre-vote: asked by a node that has not heard from a leader before it stands for
    /// election (and by a learner in the same position), to learn whether the receiver has
    /// heard from one lately and what membership it has applied. Last in the enum, so the
    /// other variants keep their encoding.
    PreVote,
}

impl Rpc {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Rpc::AppendEntries(_) => "append-entries",
            Rpc::Vote(_) => "vote",
            Rpc::Snapshot { .. } => "snapshot",
            Rpc::Write(_) => "write",
            Rpc::ReadIndex => "read-index",
            Rpc::Status => "status",
            Rpc::Membership(_) => "membership",
            Rpc::PreVote => "pre-vote",
        }
    }

    /// The format a receiver must read to decode this request (see [`crate::format`]).
    pub fn format(&self) -> Format {
        match self {
            Rpc::AppendEntries(req) => format::entries_format(&req.entries),
            Rpc::Write(req) => format::request_format(req),
            // Snapshot data carries its own format.
            Rpc::Snapshot { data, .. } => {
                crate::state_machine::snapshot_format(data).unwrap_or(Format::CURRENT)
            }
            Rpc::Vote(_) | Rpc::ReadIndex | Rpc::Status | Rpc::Membership(_) | Rpc::PreVote => {
                Format::V1
            }
        }
    }
}

/// A membership change, carried out by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add (or re-add) a node as a learner; wait until it has caught up.
    AddLearner(NodeId, ClusterNode),
    /// Make a learner a voter.
    Promote(NodeId),
    /// Take a node out of the membership entirely.
    Remove(NodeId),
}

/// The reply to an [`Rpc`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcReply {
    /// To [`Rpc::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To [`Rpc::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To [`Rpc::Snapshot`].
    Snapshot(Result<SnapshotResponse<NodeId>, Fatal<NodeId>>),
    /// To [`Rpc::Write`]: the state machine's reply.
    Write(Result<Reply, ForwardError>),
    /// To [`Rpc::ReadIndex`]: the log index to wait for.
    ReadIndex(Result<u64, ForwardError>),
    /// To [`Rpc::Status`].
    Status(NodeStatus),
    /// To [`Rpc::Membership`].
    Membership(Result<(), ForwardError>),
    /// The request was refused before it was looked at (wrong cluster, malformed).
    Refused(String),
    /// To [`Rpc::PreVote`]. Last in the enum, so the other variants keep their encoding.
    PreVote(PreVoteReply),
    /// The request needs a format newer than the receiver reads; it was not decoded. Last
    /// in the enum, so the other variants keep their encoding.
    TooNew {
        /// The format the request needed.
        needs: Format,
        /// The newest the receiver reads.
        reads: Format,
    },
}

impl RpcReply {
    /// The format a receiver must read to decode this reply.
    pub fn format(&self) -> Format {
        match self {
            RpcReply::AppendEntries(_)
            | RpcReply::Vote(_)
            | RpcReply::Snapshot(_)
            | RpcReply::Write(_)
            | RpcReply::ReadIndex(_)
            | RpcReply::Status(_)
            | RpcReply::Membership(_)
            | RpcReply::Refused(_)
            | RpcReply::PreVote(_)
            | RpcReply::TooNew { .. } => Format::V1,
        }
    }
}

/// A member that does not read a format a request needs: the leader refuses a write of a
/// newer format until every member (voters and learners) has said it reads it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{}", self.describe())]
pub struct FormatLag {
    /// The member that lags.
    pub node: NodeId,
    /// Its name, as the membership knows it (empty if unknown).
    pub name: String,
    /// The newest format it said it reads; `None` if it has not said (it has not answered
    /// since this node started, or since it reconnected).
    pub reads: Option<Format>,
    /// The format the request needs.
    pub needs: Format,
}

impl FormatLag {
    fn describe(&self) -> String {
        let who = if self.name.is_empty() {
            format!("node {}", self.node)
        } else {
            format!("node {} ({})", self.node, self.name)
        };
        match self.reads {
            Some(reads) => format!(
                "{who} reads formats up to {reads} and this request needs format {}: upgrade {who} first",
                self.needs
            ),
            None => format!(
                "{who} has not yet said which formats it reads (is it up?) and this request needs format {}: try again once it answers",
                self.needs
            ),
        }
    }
}

/// What a node answers a pre-vote with: facts, not a decision; the asker decides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteReply {
    /// Milliseconds since the receiver last heard from a leader (on a leader: since a quorum
    /// last acknowledged it); `None` if never. A node that heard from a leader within the
    /// leader lease refuses to vote, so an election now would only disturb that leader.
    pub leader_contact_ms: Option<u64>,
    /// The receiver's last log entry: it votes only for a candidate whose log is at least
    /// as far, so a node behind it cannot win its vote and should not stand.
    pub last_log_id: Option<LogId>,
    /// The membership the receiver has applied (so it is committed), if any.
    pub applied_membership: Option<AppliedMembership>,
}

/// A committed membership as one node applied it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedMembership {
    /// Log index of the membership entry.
    pub index: u64,
    /// Every member, voters and learners.
    pub members: std::collections::BTreeSet<NodeId>,
}

/// Why the leader did not carry out a forwarded request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ForwardError {
    /// The receiver is not (or no longer) the leader; try this one instead.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader the receiver knows of.
        leader: Option<NodeId>,
    },
    /// The leader could not do it (lost quorum, shutting down, refused change).
    #[error("{0}")]
    Failed(String),
    /// A member does not read the format the request needs; nothing was done. Last in the
    /// enum, so the other variants keep their encoding.
    #[error("{0}")]
    Unsupported(FormatLag),
}

/// A node's own view of its Raft state, for cluster status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Its id.
    pub id: NodeId,
    /// `leader`, `follower`, `learner`, `candidate`, `shutdown`, `stopped` (Raft failed) or
    /// `removed` (no longer a member).
    pub state: String,
    /// Current term.
    pub term: u64,
    /// Leader it follows.
    pub leader: Option<NodeId>,
    /// Index of the last log entry.
    pub last_log_index: Option<u64>,
    /// Index of the last applied entry.
    pub last_applied: Option<u64>,
    /// Index covered by its snapshot.
    pub snapshot_index: Option<u64>,
    /// Index up to which its log was purged.
    pub purged_index: Option<u64>,
    /// Milliseconds since it last heard from its leader (on the leader: from a quorum).
    pub leader_contact_ms: Option<u64>,
    /// Digest of everything it applied (see `Registry::digest`).
    pub applied_digest: u64,
    /// The newest stored/wire format it reads (see [`crate::format`]).
    pub format: Format,
}

/// Why an RPC did not get a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No connection could be made (down, refused, TLS failure); the message says which.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// No reply within the deadline.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The peer answered with something that is not a reply, or refused the request.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer does not read the format the request needs (an older build); nothing was
    /// done.
    #[error("{0}")]
    Unsupported(FormatLag),
}

/// Carries RPCs between nodes.
pub trait Transport: Send + Sync + 'static {
    /// Sends `rpc` to `target` (reached at `node.addr`) and waits at most `timeout` for the
    /// reply.
    fn call<'a>(
        &'a self,
        target: NodeId,
        node: &'a ClusterNode,
        rpc: Rpc,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<RpcReply, TransportError>>;

    /// The newest format `peer` last said it reads (see [`crate::format`]), `None` if it has
    /// not said since the current connection to it was made. A transport that carries no
    /// versions links nodes of one build, so the default is this build's.
    fn peer_format(&self, peer: NodeId) -> Option<Format> {
        let _ = peer;
        Some(Format::CURRENT)
    }
}

/// openraft's network factory over a [`Transport`].
#[derive(Clone)]
pub struct Network {
    transport: Arc<dyn Transport>,
}

impl Network {
    /// A factory sending through `transport`.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Self { transport }
    }
}

/// openraft's connection to one peer.
pub struct PeerNetwork {
    transport: Arc<dyn Transport>,
    target: NodeId,
    node: ClusterNode,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &ClusterNode) -> Self::Network {
        PeerNetwork {
            transport: self.transport.clone(),
            target,
            node: node.clone(),
        }
    }
}

fn transport_error<E: std::error::Error>(e: TransportError) -> RPCError<NodeId, ClusterNode, E> {
    match e {
        TransportError::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected<E: std::error::Error>(reply: RpcReply) -> RPCError<NodeId, ClusterNode, E> {
    let e = TransportError::Protocol(format!("unexpected reply {reply:?}"));
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, ClusterNode, RaftError<NodeId>>>
    {
        let reply = self
            .transport
            .call(
                self.target,
                &self.node,
                Rpc::AppendEntries(rpc),
                option.hard_ttl(),
            )
            .await
            .map_err(transport_error)?;
        match reply {
            RpcReply::AppendEntries(Ok(r)) => Ok(r),
            RpcReply::AppendEntries(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, ClusterNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        // With `generic-snapshot-data` openraft sends snapshots through `full_snapshot`.
        let e = TransportError::Protocol("chunked snapshots are not used".into());
        Err(RPCError::Network(NetworkError::new(&e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, ClusterNode, RaftError<NodeId>>> {
        let reply = self
            .transport
            .call(self.target, &self.node, Rpc::Vote(rpc), option.hard_ttl())
            .await
            .map_err(transport_error)?;
        match reply {
            RpcReply::Vote(Ok(r)) => Ok(r),
            RpcReply::Vote(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(unexpected(other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let rpc = Rpc::Snapshot {
            vote,
            meta: snapshot.meta,
            data: *snapshot.snapshot,
        };
        let call = self
            .transport
            .call(self.target, &self.node, rpc, option.hard_ttl());
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = call => r,
        };
        match reply {
            Ok(RpcReply::Snapshot(Ok(r))) => Ok(r),
            Ok(RpcReply::Snapshot(Err(e))) => Err(StreamingError::RemoteError(RemoteError::new(
                self.target,
                e,
            ))),
            Ok(other) => {
                let e = TransportError::Protocol(format!("unexpected reply {other:?}"));
                Err(StreamingError::Network(NetworkError::new(&e)))
            }
            Err(e @ TransportError::Unreachable(_)) => {
                Err(StreamingError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => Err(StreamingError::Network(NetworkError::new(&e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Command;
    use crate::types::Actor;

    #[test]
    fn a_lagging_member_is_named_with_what_it_reads_and_what_is_needed() {
        let lag = FormatLag {
            node: NodeId(3),
            name: "n3".into(),
            reads: Some(Format::V1),
            needs: Format(2),
        };
        assert_eq!(
            lag.to_string(),
            "node 3 (n3) reads formats up to 1 and this request needs format 2: upgrade node 3 (n3) first"
        );
        let silent = FormatLag { reads: None, ..lag };
        assert!(
            silent
                .to_string()
                .starts_with("node 3 (n3) has not yet said"),
            "{silent}"
        );
    }

    #[test]
    fn a_request_needs_the_format_of_its_command() {
        let write = |command| Rpc::Write(Request::new(Actor::System, command));
        let revoke = write(Command::RevokeShareLink { id: 1 });
        assert_eq!(revoke.format(), Format::V1);
        assert_eq!(Rpc::Status.format(), Format::V1);
        #[cfg(feature = "format-next")]
        assert_eq!(
            write(Command::Annotate { note: "n".into() }).format(),
            Format::NEXT
        );
    }
}
