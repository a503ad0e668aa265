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

use crate::log_store::{LogStore, StorageIo};
use crate::proposer::Proposer;
use crate::quic::RpcHandler;
use crate::registry::Registry;
use crate::state_machine::StateMachine;
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
}

impl Cluster {
    /// Opens the log in `log_db` and the state machine in `state_db`, and starts Raft as
    /// node `me`. Two sled databases, because a sled flush writes everything pending: a
    /// large snapshot in the log's database would stall every log flush behind it.
    pub async fn start(
        me: NodeId,
        log_db: &sled::Db,
        state_db: &sled::Db,
        transport: Arc<dyn Transport>,
        config: ClusterConfig,
    ) -> Result<Self, anyhow::Error> {
        let mut log = LogStore::open(log_db, config.storage_io)?;
        let reader = openraft::storage::RaftLogStorage::get_log_reader(&mut log).await;
        let (sm, registry) = StateMachine::open(state_db, config.storage_io)?;
        let raft = Raft::new(
            me,
            Arc::new(config.raft_config()?),
            Network::new(transport.clone()),
            log,
            sm,
        )
        .await?;
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
            }),
        })
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

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
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
                } else if !leader && voter && raft.trigger().elect().await.is_err() {
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
                Rpc::Vote(req) => RpcReply::Vote(raft.vote(req).await),
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
