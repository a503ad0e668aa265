//! [`Cluster`]: what the rest of a node uses to read and change the registry.
//!
//! - Writes go to the leader. On a follower they are forwarded over the [`Transport`]; if
//!   the leader changes or the forward fails, they are retried (with the same request id,
//!   so the state machine applies them once) until the request deadline.
//! - Linearizable reads use the read index: the leader confirms its leadership with a
//!   quorum and names a log index; this node waits until it has applied that index and
//!   reads its own replica.
//! - Membership changes are carried out by the leader and forwarded like writes.
//! - The handle also serves the RPCs other nodes send ([`RpcHandler`]).
//!
//! ```text
//!   write(req) ──leader?──yes──► raft.client_write ──► reply after commit + apply
//!                   │no
//!                   └──► Rpc::Write to leader ──(leader changed / failed)──► retry
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock, not std's: under a simulation (turmoil) only tokio's time is simulated.
use tokio::time::Instant;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use tokio::sync::watch;
use warren_proto::registry::NodeId;

use crate::log_store::{DamageProbe, LogOptions, LogStore, StorageIo};
use crate::proposer::Proposer;
use crate::quic::RpcHandler;
use crate::registry::Registry;
use crate::state_machine::StateMachine;
use crate::storage::Store;
use crate::transport::{
    BoxFuture, ForwardError, MembershipChange, Network, NodeStatus, Rpc, RpcReply, Transport,
    TransportError,
};
use crate::types::{ClusterNode, Raft, Reply, Request};

/// Consensus settings. Every duration is wall-clock time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// How often the leader sends heartbeats.
    pub heartbeat: Duration,
    /// Shortest election timeout; a follower that hears nothing for a random time between
    /// this and `election_timeout_max` starts an election.
    pub election_timeout_min: Duration,
    /// Longest election timeout.
    pub election_timeout_max: Duration,
    /// Build a snapshot (and compact the log) once at least this many writes were applied
    /// since the last one, and at least as many as the registry had entities then: a
    /// snapshot costs time proportional to the registry, so this keeps its cost per write
    /// bounded.
    pub snapshot_writes: u64,
    /// How long a write or linearizable read may take before it is answered with "no quorum".
    pub request_timeout: Duration,
    /// How long a membership change (which waits for a learner to catch up) may take.
    pub membership_timeout: Duration,
    /// A node that has not heard from a leader (or, as leader, from a quorum) for longer than
    /// this reports itself unhealthy and stops granting access.
    pub leader_loss_bound: Duration,
    /// Test only: plants a known bug, so the simulation can prove that its checker catches
    /// one. `None` everywhere else; no flag or setting of `warren-node` sets it.
    pub planted_bug: Option<PlantedBug>,
    /// Where blocking storage work runs; `Inline` only under a simulated clock.
    pub storage_io: StorageIo,
}

/// A deliberate bug, for proving that the simulation's checkers can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Linearizable reads skip the read index and serve this node's replica as it is.
    StaleReads,
    /// A write is acknowledged as soon as it is handed to Raft, before it is committed.
    EarlyAck,
    /// The log store reports entries durable before it syncs them (it syncs them with the
    /// next batch), so a power cut can take back what a quorum acknowledged.
    AckBeforeSync,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(300),
            election_timeout_max: Duration::from_millis(500),
            snapshot_writes: 5000,
            request_timeout: Duration::from_secs(5),
            membership_timeout: Duration::from_secs(60),
            leader_loss_bound: Duration::from_secs(15),
            planted_bug: None,
            storage_io: StorageIo::Background,
        }
    }
}

/// A consensus setting that does not make sense; the operator's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The setting.
    pub field: &'static str,
    /// What is expected.
    pub reason: String,
}

impl ClusterConfig {
    /// Checks the settings against each other.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let err = |field, reason: &str| {
            Err(ConfigError {
                field,
                reason: reason.into(),
            })
        };
        if self.heartbeat.is_zero() {
            return err("heartbeat", "must be more than zero");
        }
        if self.election_timeout_min <= self.heartbeat * 2 {
            return err(
                "election_timeout_min",
                "must be more than twice the heartbeat",
            );
        }
        if self.election_timeout_max <= self.election_timeout_min {
            return err(
                "election_timeout_max",
                "must be more than election_timeout_min",
            );
        }
        if self.snapshot_writes < 10 {
            return err("snapshot_writes", "must be at least 10");
        }
        if self.request_timeout < self.election_timeout_max {
            return err("request_timeout", "must be at least election_timeout_max");
        }
        Ok(self)
    }

    fn raft_config(&self) -> Result<openraft::Config, anyhow::Error> {
        let config = openraft::Config {
            cluster_name: "warren".into(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election_timeout_min.as_millis() as u64,
            election_timeout_max: self.election_timeout_max.as_millis() as u64,
            // Snapshots are triggered by `snapshot_policy` below, by writes and registry size.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: self.snapshot_writes.min(1000),
            install_snapshot_timeout: 30_000,
            // Elections are started by `election_timer`: openraft 0.9 draws its random
            // election timeout once per process, so two voters whose timers happen to line
            // up stay lined up and split every vote, forever.
            enable_elect: false,
            ..Default::default()
        };
        Ok(config.validate()?)
    }
}

/// Why a cluster operation did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// No leader was known before the deadline; nothing was done.
    #[error("no leader is elected (waited {0:?}): the cluster has no quorum")]
    NoLeader(Duration),
    /// The operation reached the cluster but did not complete before the deadline. For a
    /// write the outcome is unknown: it may still commit.
    #[error("the cluster did not answer within {waited:?} (leader: {leader}); {outcome}")]
    Timeout {
        /// How long it waited.
        waited: Duration,
        /// The leader at the end, if any.
        leader: String,
        /// What the caller should assume.
        outcome: &'static str,
    },
    /// The leader refused a membership change.
    #[error("{0}")]
    Membership(String),
    /// This node is shutting down.
    #[error("this node is shutting down")]
    ShuttingDown,
    /// This node's Raft stopped (storage failed, or a bug); nothing was done. The node
    /// restarts it.
    #[error("this node cannot take part in the cluster: {0}")]
    Stopped(String),
}

/// The handle to this node's Raft instance and replicated registry. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    raft: Raft,
    log: crate::log_store::LogReader,
    proposer: Proposer,
    me: NodeId,
    transport: Arc<dyn Transport>,
    registry: watch::Receiver<Arc<Registry>>,
    config: ClusterConfig,
    last_leader_contact: Arc<Mutex<Option<Instant>>>,
    /// Whether this node's log is behind what it had made durable.
    probe: DamageProbe,
    /// Why Raft stopped, when it stopped without being asked to.
    failed: Arc<Mutex<Option<String>>>,
    /// Set by [`Cluster::shutdown`], so that stopping is not mistaken for failing.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Cluster {
    /// Opens the log in `log_store` and the state machine in `state_store`, and starts Raft
    /// as node `me`. Two sled databases, because a sled flush writes everything pending: a
    /// large snapshot in the log's database would stall every log flush behind it.
    ///
    /// Damaged storage is cut back to what is whole (see [`crate::log_store`]); if the
    /// log is then behind what this node had made durable, the node still starts but
    /// neither stands for election nor votes for a candidate behind that point, and
    /// [`Cluster::serving`] says why, until it has caught up from a leader.
    pub async fn start(
        me: NodeId,
        log_store: &Store,
        state_store: &Store,
        transport: Arc<dyn Transport>,
        config: ClusterConfig,
    ) -> Result<Self, anyhow::Error> {
        let options = LogOptions {
            io: config.storage_io,
            ack_before_sync: config.planted_bug == Some(PlantedBug::AckBeforeSync),
        };
        let mut log = LogStore::open(log_store, options)?;
        let (sm, registry) = StateMachine::open(state_store, config.storage_io)?;
        reconcile(&log, &sm)?;
        let probe = log.probe();
        if let Some(damage) = probe.damage() {
            tracing::error!("{damage}");
        }
        let reader = openraft::storage::RaftLogStorage::get_log_reader(&mut log).await;
        let raft = Raft::new(
            me,
            Arc::new(config.raft_config()?),
            Network::new(transport.clone()),
            log,
            sm,
        )
        .await?;
        if let Some(damage) = probe.damage() {
            // Asked of the core, which has loaded the membership by the time it answers.
            let lone = raft
                .with_raft_state(move |st| {
                    st.membership_state
                        .effective()
                        .membership()
                        .voter_ids()
                        .eq([me])
                })
                .await
                .unwrap_or(false);
            if lone {
                let _ = raft.shutdown().await;
                anyhow::bail!(
                    "{damage}. This node is the cluster's only voter, so no other node can give back what it lost: restore its data directory from a backup"
                );
            }
        }
        tokio::spawn(snapshot_policy(
            raft.clone(),
            registry.clone(),
            config.snapshot_writes,
        ));
        let last_leader_contact = Arc::new(Mutex::new(None));
        tokio::spawn(election_timer(
            raft.clone(),
            me,
            last_leader_contact.clone(),
            config.election_timeout_min..config.election_timeout_max,
            probe.clone(),
        ));
        let failed = Arc::new(Mutex::new(None));
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(watch_core(
            raft.clone(),
            probe.clone(),
            failed.clone(),
            stopping.clone(),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                log: reader,
                proposer: Proposer::start(raft.clone()),
                raft,
                me,
                transport,
                registry,
                config,
                last_leader_contact,
                probe,
                failed,
                stopping,
            }),
        })
    }

    /// Why this node's Raft stopped, if it stopped without being asked to (a storage
    /// failure such as a full disk, or a bug). The node cannot recover in place: it
    /// restarts.
    pub fn failure(&self) -> Option<String> {
        self.inner.failed.lock().expect("failed").clone()
    }

    /// Resolves when Raft stops without being asked to, with why.
    pub async fn failed(&self) -> String {
        loop {
            if let Some(why) = self.failure() {
                return why;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `Some` while this node's log is behind what it had made durable (storage damage it
    /// is repairing by catching up from a leader).
    pub fn damage(&self) -> Option<crate::log_store::Damage> {
        self.inner.probe.damage()
    }

    /// Makes this node the single voter of a new cluster.
    pub async fn initialize(&self, node: ClusterNode) -> Result<(), anyhow::Error> {
        self.initialize_with(BTreeMap::from([(self.inner.me, node)]))
            .await
    }

    /// Starts a new cluster with these voters (all must be running). The usual way is
    /// [`Cluster::initialize`] and joins; simulations start with every voter at once.
    pub async fn initialize_with(
        &self,
        voters: BTreeMap<NodeId, ClusterNode>,
    ) -> Result<(), anyhow::Error> {
        self.inner.raft.initialize(voters).await?;
        Ok(())
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.me
    }

    /// The settings.
    pub fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    /// The Raft instance.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The log entries in `range` this node holds (inspection, tests, simulation).
    pub fn log_entries(
        &self,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<crate::types::Entry>, crate::types::StorageError> {
        self.inner.log.entries(range)
    }

    /// The transport.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// The registry as this node last applied it (not linearizable: see [`Cluster::read`]).
    pub fn registry(&self) -> Arc<Registry> {
        self.inner.registry.borrow().clone()
    }

    /// A receiver of every newly applied registry.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Registry>> {
        self.inner.registry.clone()
    }

    /// The leader this node knows of (none once its Raft has stopped).
    pub fn leader(&self) -> Option<NodeId> {
        if self.failure().is_some() {
            return None;
        }
        self.inner.raft.metrics().borrow().current_leader
    }

    fn node_of(&self, id: NodeId) -> Option<ClusterNode> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
    }

    /// How long since this node last heard from a leader; on the leader, since a quorum
    /// last acknowledged it. `None` if never.
    pub fn leader_contact(&self) -> Option<Duration> {
        let m = self.inner.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            let voters = m.membership_config.membership().voter_ids().count();
            if voters == 1 {
                return Some(Duration::ZERO);
            }
            return m.millis_since_quorum_ack.map(Duration::from_millis);
        }
        self.inner
            .last_leader_contact
            .lock()
            .expect("contact lock")
            .map(|t| t.elapsed())
    }

    /// `Ok` if this node is in contact with a leader within the configured bound, else why
    /// not. Nodes that are not may not grant access.
    pub fn serving(&self) -> Result<(), String> {
        if let Some(why) = self.failure() {
            return Err(why);
        }
        if let Some(damage) = self.damage() {
            return Err(damage.to_string());
        }
        let bound = self.inner.config.leader_loss_bound;
        match self.leader_contact() {
            Some(d) if d <= bound => Ok(()),
            Some(d) => Err(format!(
                "no contact with a leader for {} ms (bound {} ms)",
                d.as_millis(),
                bound.as_millis()
            )),
            None => Err("has not heard from a leader since it started".into()),
        }
    }

    /// Waits until a leader is known, up to `deadline`.
    async fn wait_for_leader(&self, deadline: Instant) -> Result<NodeId, ClusterError> {
        let mut metrics = self.inner.raft.metrics();
        let waited = self.inner.config.request_timeout;
        let wait = async {
            metrics
                .wait_for(|m| m.current_leader.is_some() || m.state == ServerState::Shutdown)
                .await
                .map(|m| m.current_leader)
        };
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(Ok(leader)) => leader.ok_or(ClusterError::ShuttingDown),
            Ok(Err(_)) => Err(ClusterError::ShuttingDown),
            Err(_) => Err(ClusterError::NoLeader(waited)),
        }
    }

    /// Waits (briefly, up to `max`) for the leader to differ from `old`.
    async fn leader_change(&self, old: NodeId, max: Duration) {
        let mut metrics = self.inner.raft.metrics();
        let _ =
            tokio::time::timeout(max, metrics.wait_for(|m| m.current_leader != Some(old))).await;
    }

    fn timeout_error(&self, outcome: &'static str) -> ClusterError {
        ClusterError::Timeout {
            waited: self.inner.config.request_timeout,
            leader: self
                .leader()
                .and_then(|l| self.node_of(l))
                .map_or_else(|| "none".into(), |n| n.name),
            outcome,
        }
    }

    /// Runs an operation on the leader: locally when this node leads, else as an RPC to
    /// the leader, retried until `timeout` when the leader changes, is unreachable, or says
    /// it no longer leads. `outcome` tells the caller what a timeout means.
    async fn on_leader<'a, T>(
        &'a self,
        timeout: Duration,
        outcome: &'static str,
        retry_failures: bool,
        local: impl Fn() -> BoxFuture<'a, Result<T, ForwardError>>,
        remote: impl Fn() -> Rpc,
        unpack: fn(RpcReply) -> Option<Result<T, ForwardError>>,
    ) -> Result<T, ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(why) = self.failure() {
                return Err(ClusterError::Stopped(why));
            }
            let leader = self.wait_for_leader(deadline).await?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.timeout_error(outcome));
            }
            let answer = if leader == self.inner.me {
                match tokio::time::timeout(remaining, local()).await {
                    Ok(a) => a,
                    Err(_) => return Err(self.timeout_error(outcome)),
                }
            } else {
                let Some(node) = self.node_of(leader) else {
                    self.leader_change(leader, remaining.min(Duration::from_millis(100)))
                        .await;
                    continue;
                };
                let call = self
                    .inner
                    .transport
                    .call(leader, &node, remote(), remaining);
                // A leader that dies mid-call never answers: go to the next one as soon as
                // it is elected. (Writes carry a request id, so a repeat applies once.)
                let result = tokio::select! {
                    r = call => r,
                    () = self.leader_change(leader, remaining) => continue,
                };
                match result {
                    Ok(reply) => unpack(reply)
                        .unwrap_or_else(|| Err(ForwardError::Failed("unexpected reply".into()))),
                    Err(TransportError::Timeout(_)) => return Err(self.timeout_error(outcome)),
                    Err(e) => {
                        tracing::debug!(%leader, "calling the leader failed: {e}");
                        self.leader_change(leader, remaining.min(Duration::from_millis(100)))
                            .await;
                        continue;
                    }
                }
            };
            match answer {
                Ok(v) => return Ok(v),
                Err(ForwardError::NotLeader { .. }) => {
                    self.leader_change(leader, remaining.min(Duration::from_millis(200)))
                        .await;
                }
                Err(ForwardError::Failed(why)) if retry_failures => {
                    if self.inner.raft.metrics().borrow().state == ServerState::Shutdown {
                        return Err(ClusterError::ShuttingDown);
                    }
                    tracing::debug!(%leader, "the leader failed the request: {why}");
                    tokio::time::sleep(remaining.min(Duration::from_millis(50))).await;
                }
                Err(ForwardError::Failed(why)) => return Err(ClusterError::Membership(why)),
            }
        }
    }

    /// Commits a write through the leader and returns the state machine's reply.
    pub async fn write(&self, req: Request) -> Result<Reply, ClusterError> {
        if self.inner.config.planted_bug == Some(PlantedBug::EarlyAck) {
            let me = self.clone();
            tokio::spawn(async move { me.write_committed(req).await });
            return Ok(Ok(crate::registry::Outcome::Done));
        }
        self.write_committed(req).await
    }

    async fn write_committed(&self, req: Request) -> Result<Reply, ClusterError> {
        self.on_leader(
            self.inner.config.request_timeout,
            "the write may or may not have been applied",
            true,
            || Box::pin(self.inner.proposer.propose(req.clone())),
            || Rpc::Write(req.clone()),
            |reply| match reply {
                RpcReply::Write(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    /// Waits until this node's replica reflects every write committed before the call.
    pub async fn barrier(&self) -> Result<(), ClusterError> {
        let start = Instant::now();
        let index = self
            .on_leader(
                self.inner.config.request_timeout,
                "nothing was read",
                true,
                || Box::pin(self.read_index_on_leader()),
                || Rpc::ReadIndex,
                |reply| match reply {
                    RpcReply::ReadIndex(r) => Some(r),
                    _ => None,
                },
            )
            .await?;
        let remaining = self
            .inner
            .config
            .request_timeout
            .saturating_sub(start.elapsed());
        self.inner
            .raft
            .wait(Some(remaining))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map_err(|_| self.timeout_error("nothing was read"))?;
        Ok(())
    }

    /// A linearizable read of the registry: every write acknowledged before the call is in
    /// it.
    pub async fn read(&self) -> Result<Arc<Registry>, ClusterError> {
        if self.inner.config.planted_bug != Some(PlantedBug::StaleReads) {
            self.barrier().await?;
        }
        Ok(self.registry())
    }

    async fn read_index_on_leader(&self) -> Result<u64, ForwardError> {
        match self.inner.raft.get_read_log_id().await {
            Ok((read, _)) => Ok(read.map_or(0, |l| l.index)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(ForwardError::NotLeader {
                    leader: f.leader_id,
                })
            }
            Err(e) => Err(ForwardError::Failed(e.to_string())),
        }
    }

    /// Carries out a membership change on the leader (forwarding it there).
    pub async fn change_membership(&self, change: MembershipChange) -> Result<(), ClusterError> {
        self.on_leader(
            self.inner.config.membership_timeout,
            "the membership change may or may not have happened",
            false,
            || Box::pin(self.membership_on_leader(change.clone())),
            || Rpc::Membership(change.clone()),
            |reply| match reply {
                RpcReply::Membership(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn membership_on_leader(&self, change: MembershipChange) -> Result<(), ForwardError> {
        let raft = &self.inner.raft;
        let membership = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .clone();
        let is_voter = |id: NodeId| membership.voter_ids().any(|v| v == id);
        let is_learner = |id: NodeId| membership.learner_ids().any(|l| l == id);
        let result = match change {
            MembershipChange::AddLearner(id, node) => {
                if is_voter(id) {
                    return Err(ForwardError::Failed(format!(
                        "node {id} is already a voter"
                    )));
                }
                raft.add_learner(id, node, true).await.map(drop)
            }
            MembershipChange::Promote(id) => {
                if is_voter(id) {
                    return Err(ForwardError::Failed(format!(
                        "node {id} is already a voter"
                    )));
                }
                if !is_learner(id) {
                    return Err(ForwardError::Failed(format!(
                        "node {id} is not a learner; add it as a learner first"
                    )));
                }
                raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map(drop)
            }
            MembershipChange::Remove(id) => {
                if is_voter(id) {
                    if membership.voter_ids().count() == 1 {
                        return Err(ForwardError::Failed(
                            "cannot remove the last voter of the cluster".into(),
                        ));
                    }
                    raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                        .await
                        .map(drop)
                } else if is_learner(id) {
                    raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                        .await
                        .map(drop)
                } else {
                    // Already out (perhaps by an attempt whose answer was lost).
                    return Ok(());
                }
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ForwardError::NotLeader {
                    leader: f.leader_id,
                })
            }
            Err(e) => Err(ForwardError::Failed(e.to_string())),
        }
    }

    /// This node's own view of its Raft state.
    pub fn local_status(&self) -> NodeStatus {
        let m = self.inner.raft.metrics().borrow().clone();
        let is_learner = m
            .membership_config
            .membership()
            .learner_ids()
            .any(|l| l == m.id);
        let state = match m.state {
            _ if self.failure().is_some() => "stopped",
            ServerState::Leader => "leader",
            ServerState::Candidate => "candidate",
            ServerState::Shutdown => "shutdown",
            ServerState::Follower if is_learner => "learner",
            ServerState::Follower => "follower",
            ServerState::Learner => "learner",
        };
        NodeStatus {
            id: m.id,
            state: state.into(),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            leader_contact_ms: self.leader_contact().map(|d| d.as_millis() as u64),
            applied_digest: self.registry().digest(),
        }
    }

    /// Asks node `id` (at `node`) for its own status.
    pub async fn peer_status(
        &self,
        id: NodeId,
        node: &ClusterNode,
        timeout: Duration,
    ) -> Result<NodeStatus, TransportError> {
        if id == self.inner.me {
            return Ok(self.local_status());
        }
        match self
            .inner
            .transport
            .call(id, node, Rpc::Status, timeout)
            .await?
        {
            RpcReply::Status(s) => Ok(s),
            other => Err(TransportError::Protocol(format!(
                "unexpected reply {other:?}"
            ))),
        }
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        self.inner
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
    }

    fn saw_leader(&self) {
        *self.inner.last_leader_contact.lock().expect("contact lock") = Some(Instant::now());
    }
}

/// Starts an election when a voter has neither heard from a leader nor seen its vote change
/// for a random time in `timeouts`, drawn afresh after every such event as Raft requires
/// (a timeout drawn once per process lets two nodes with lined-up timers split the vote in
/// every term; the simulation found exactly that). A lone voter elects itself at once.
/// Ends when Raft stops.
async fn election_timer(
    raft: Raft,
    me: NodeId,
    last_leader_contact: Arc<Mutex<Option<Instant>>>,
    timeouts: std::ops::Range<Duration>,
    probe: DamageProbe,
) {
    use rand::Rng;
    let draw = || rand::thread_rng().gen_range(timeouts.clone());
    // Server metrics change with the vote, state, leader and membership only, not with
    // every write applied.
    let mut metrics = raft.server_metrics();
    let mut vote = metrics.borrow().vote;
    let mut since = Instant::now();
    let mut timeout = draw();
    loop {
        let (leader, voter, lone_voter) = {
            let m = metrics.borrow();
            let voters = m.membership_config.membership();
            (
                m.state == ServerState::Leader,
                voters.voter_ids().any(|v| v == me),
                voters.voter_ids().eq([me]),
            )
        };
        // A lone voter needs nobody's vote: it elects itself almost at once.
        let wait = if lone_voter {
            Duration::from_millis(20)
        } else {
            timeout
        };
        tokio::select! {
            () = tokio::time::sleep_until(since + wait) => {
                let contact = *last_leader_contact.lock().expect("contact lock");
                if let Some(at) = contact.filter(|at| *at > since) {
                    since = at;
                } else if !leader && voter && probe.damage().is_none() && raft.trigger().elect().await.is_err() {
                    // A damaged node does not stand: its log lacks entries it acknowledged.
                    return;
                } else {
                    since = Instant::now();
                }
                timeout = draw();
            }
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
                let now_vote = metrics.borrow_and_update().vote;
                if now_vote != vote {
                    vote = now_vote;
                    since = Instant::now();
                    timeout = draw();
                }
            }
        }
    }
}

/// Makes the log and the state machine agree after damage: a snapshot that is gone or
/// damaged takes the log with it (entries after it may build on state this node no longer
/// has), and a log that ends before the snapshot is re-based on it.
fn reconcile(log: &LogStore, sm: &StateMachine) -> Result<(), anyhow::Error> {
    if let Some(why) = sm.damaged_snapshot() {
        return log.reset(why);
    }
    let state = log.state()?;
    let applied = sm.last_applied();
    if state.last_purged_log_id > applied {
        let why = format!(
            "the snapshot (at {}) is older than the log's start (after {}): the entries between are in neither",
            applied.map_or(0, |l| l.index),
            state.last_purged_log_id.map_or(0, |l| l.index)
        );
        tracing::error!("{why}; the log is dropped and this node catches up from a leader");
        return log.reset(&why);
    }
    if let Some(applied) = applied.filter(|a| state.last_log_id < Some(*a)) {
        log.rebase(applied)?;
    }
    Ok(())
}

/// Watches Raft: records why its core stopped if it stopped without being asked to
/// (openraft quits its core on a storage error, and a panic inside it ends the task), and
/// says once when damaged storage has been repaired by catching up. Ends when Raft stops.
async fn watch_core(
    raft: Raft,
    probe: DamageProbe,
    failed: Arc<Mutex<Option<String>>>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut metrics = raft.metrics();
    let mut damaged = probe.damage().is_some();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ended = tokio::select! {
            changed = metrics.changed() => changed.is_err(),
            _ = tick.tick() => false,
        };
        if damaged && probe.damage().is_none() {
            damaged = false;
            tracing::info!("storage repaired: the log has caught up from the leader past everything this node had acknowledged; it votes again");
        }
        let stopped = match &metrics.borrow().running_state {
            Err(openraft::error::Fatal::Stopped) => Some(None),
            Err(fatal) => Some(Some(fatal.to_string())),
            Ok(()) => None,
        };
        let why = match (stopped, ended) {
            (Some(Some(fatal)), _) => Some(format!("Raft stopped: {fatal}")),
            (Some(None), _) | (None, true)
                if !stopping.load(std::sync::atomic::Ordering::SeqCst) =>
            {
                Some("Raft stopped unexpectedly (its core task ended; see the log above)".into())
            }
            (Some(None), _) | (None, true) => return,
            (None, false) => None,
        };
        if let Some(why) = why {
            tracing::error!("{why}");
            *failed.lock().expect("failed") = Some(why);
            return;
        }
    }
}

/// Triggers a snapshot once the writes applied since the last one reach both `min_writes`
/// and the registry's size at the last snapshot. A snapshot costs time in proportion to the
/// registry; spacing them by at least that many writes keeps the cost per write bounded
/// (at most about two entities encoded per write) however large the registry grows.
/// Ends when Raft stops.
async fn snapshot_policy(raft: Raft, registry: watch::Receiver<Arc<Registry>>, min_writes: u64) {
    let (mut at_last, mut size_at_last) = {
        let r = registry.borrow();
        (r.applied_requests(), r.size() as u64)
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if raft.metrics().borrow().state == ServerState::Shutdown {
            return;
        }
        let (applied, size) = {
            let r = registry.borrow();
            (r.applied_requests(), r.size() as u64)
        };
        if applied.saturating_sub(at_last) >= min_writes.max(size_at_last) {
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
            at_last = applied;
            size_at_last = size;
        }
    }
}

impl RpcHandler for Cluster {
    fn handle(&self, from: NodeId, rpc: Rpc) -> BoxFuture<'_, RpcReply> {
        Box::pin(async move {
            tracing::trace!(%from, rpc = rpc.name(), "rpc");
            let raft = &self.inner.raft;
            match rpc {
                Rpc::AppendEntries(req) => {
                    let res = raft.append_entries(req).await;
                    if matches!(
                        res,
                        Ok(openraft::raft::AppendEntriesResponse::Success
                            | openraft::raft::AppendEntriesResponse::PartialSuccess(_)
                            | openraft::raft::AppendEntriesResponse::Conflict)
                    ) {
                        self.saw_leader();
                    }
                    RpcReply::AppendEntries(res)
                }
                Rpc::Vote(req) => {
                    // A node whose log lost entries it had acknowledged judges a candidate
                    // against what it had, not what is left: otherwise it could elect a
                    // leader that lacks a committed entry.
                    if let Some(damage) = self.damage() {
                        if req.last_log_id < Some(damage.acknowledged) {
                            let vote = raft.metrics().borrow().vote;
                            tracing::info!(candidate = %req.vote, "vote refused: {damage}");
                            return RpcReply::Vote(Ok(openraft::raft::VoteResponse::new(
                                vote,
                                Some(damage.acknowledged),
                                false,
                            )));
                        }
                    }
                    RpcReply::Vote(raft.vote(req).await)
                }
                Rpc::Snapshot { vote, meta, data } => {
                    let snapshot = openraft::Snapshot {
                        meta,
                        snapshot: Box::new(data),
                    };
                    let res = raft.install_full_snapshot(vote, snapshot).await;
                    if res.is_ok() {
                        self.saw_leader();
                    }
                    RpcReply::Snapshot(res)
                }
                Rpc::Write(req) => RpcReply::Write(self.inner.proposer.propose(req).await),
                Rpc::ReadIndex => RpcReply::ReadIndex(self.read_index_on_leader().await),
                Rpc::Status => RpcReply::Status(self.local_status()),
                Rpc::Membership(change) => {
                    RpcReply::Membership(self.membership_on_leader(change).await)
                }
            }
        })
    }
}
