//! [`Cluster`]: what the rest of a node uses to read and change the registry.
//!
//! - Writes go to the leader. On a follower they are forwarded over the [`Transport`]; if
//!   the leader changes or the forward fails, they are retried (with the same request id,
//!   so the state machine applies them once) until the request deadline.
//! - Linearizable reads use the read index: the leader confirms its leadership with a
//!   quorum and names a log index; this node waits until it has applied that index and
//!   reads its own replica.
//! - Membership changes are carried out by the leader and forwarded like writes.
//! - Elections are started by this node's own timer, after a pre-vote: it stands only if
//!   a quorum of the voters has not heard from a leader lately either and has no longer
//!   log, so a node that merely missed heartbeats does not depose a healthy leader. The
//!   same answers tell a node that the cluster removed it; it then serves nothing.
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
use warren_proto::registry::{NodeId, NodeRole};

use crate::format::{self, Format};
use crate::log_store::{DamageProbe, LogOptions, LogStore, StorageIo};
use crate::pki::NodeCert;
use crate::proposer::Proposer;
use crate::quic::RpcHandler;
use crate::registry::{Command, Registry};
use crate::state_machine::StateMachine;
use crate::storage::Store;
use crate::transport::{
    AppliedMembership, BoxFuture, FormatLag, ForwardError, MembershipChange, Network, NodeStatus,
    PreVoteReply, Rpc, RpcReply, Transport, TransportError,
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
    /// The write needs a format that a member (or the leader) does not read yet; nothing
    /// was done. The operator upgrades that node first.
    #[error("refused: {0}")]
    Unsupported(FormatLag),
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
    /// The index of a committed membership that leaves this node out, once another node
    /// has shown it one (see [`Cluster::removed_at`]); written by the election timer.
    removed_at: Arc<Mutex<Option<u64>>>,
    /// Read-index requests this node answered as leader (its own and forwarded ones).
    read_index_served: std::sync::atomic::AtomicU64,
    /// Leaders this node has seen take office (a new leader, or the same one in a new term).
    leader_changes: Arc<std::sync::atomic::AtomicU64>,
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
        let canvass = Canvass::new(me, transport.clone(), &config);
        tokio::spawn(election_timer(
            raft.clone(),
            me,
            last_leader_contact.clone(),
            config.election_timeout_min..config.election_timeout_max,
            probe.clone(),
            canvass.clone(),
        ));
        let failed = Arc::new(Mutex::new(None));
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let leader_changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        tokio::spawn(watch_core(
            raft.clone(),
            probe.clone(),
            failed.clone(),
            stopping.clone(),
            leader_changes.clone(),
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
                removed_at: canvass.removed_at,
                read_index_served: std::sync::atomic::AtomicU64::new(0),
                leader_changes,
            }),
        })
    }

    /// How many times this node has seen a leader take office since it started (the first
    /// leader it learns of counts: a node that just started saw one election).
    pub fn leader_changes(&self) -> u64 {
        self.inner
            .leader_changes
            .load(std::sync::atomic::Ordering::Relaxed)
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

    /// How many read-index requests this node has answered as leader since it started
    /// (its own linearizable reads and those forwarded by other nodes): each cost the
    /// leader a heartbeat round to a quorum.
    pub fn read_index_served(&self) -> u64 {
        self.inner
            .read_index_served
            .load(std::sync::atomic::Ordering::Relaxed)
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
            return refresh_leader_contact(&m, &self.inner.last_leader_contact);
        }
        self.inner
            .last_leader_contact
            .lock()
            .expect("contact lock")
            .map(|t| t.elapsed())
    }

    /// `Some(index)` once this node knows it was removed from the cluster: another node
    /// has applied (so the cluster committed) a membership at log `index` that leaves it
    /// out, and this node holds no later membership (being added again brings one, and
    /// ends this). A removed node stands for no election and serves nothing.
    pub fn removed_at(&self) -> Option<u64> {
        let own = own_membership_index(&self.inner.raft.metrics().borrow());
        still_removed(*self.inner.removed_at.lock().expect("removed lock"), own)
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
        if let Some(at) = self.removed_at() {
            return Err(removed_reason(at));
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

    /// How long one forward of a write or read index may wait for the leader's answer
    /// before it is sent again (to whoever leads by then): a few election timeouts, time
    /// enough for a live leader to commit, short against the request timeout. A QUIC
    /// connection to a killed peer fails only by its idle timeout, and this node may go on
    /// believing in a dead leader until it hears of the next one.
    fn forward_attempt(&self) -> Duration {
        self.inner.config.election_timeout_max * 4
    }

    /// Runs an operation on the leader: locally when this node leads, else as an RPC to
    /// the leader, retried until `timeout` when the leader changes, is unreachable, says
    /// it no longer leads, or has not answered within `attempt` (the operation must be
    /// safe to repeat then). `outcome` tells the caller what a timeout means.
    #[allow(clippy::too_many_arguments)]
    async fn on_leader<'a, T>(
        &'a self,
        timeout: Duration,
        attempt: Duration,
        outcome: &'static str,
        retry_failures: bool,
        local: impl Fn() -> BoxFuture<'a, Result<T, ForwardError>>,
        remote: impl Fn() -> Rpc,
        unpack: fn(RpcReply) -> Option<Result<T, ForwardError>>,
    ) -> Result<T, ClusterError> {
        let deadline = Instant::now() + timeout;
        // Once the request went out, running out of time leaves its outcome unknown, even
        // if no leader is known at the end.
        let mut sent = false;
        loop {
            if let Some(why) = self.failure() {
                return Err(ClusterError::Stopped(why));
            }
            let leader = match self.wait_for_leader(deadline).await {
                Err(ClusterError::NoLeader(_)) if sent => return Err(self.timeout_error(outcome)),
                leader => leader?,
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.timeout_error(outcome));
            }
            let answer = if leader == self.inner.me {
                sent = true;
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
                sent = true;
                let call =
                    self.inner
                        .transport
                        .call(leader, &node, remote(), remaining.min(attempt));
                // A leader that dies mid-call never answers: go to the next one as soon as
                // it is elected. (Writes carry a request id, so a repeat applies once.)
                let result = tokio::select! {
                    r = call => r,
                    () = self.leader_change(leader, remaining) => continue,
                };
                match result {
                    Ok(reply) => unpack(reply)
                        .unwrap_or_else(|| Err(ForwardError::Failed("unexpected reply".into()))),
                    // The leader is an older build: asking again would not change that.
                    Err(TransportError::Unsupported(lag)) => {
                        return Err(ClusterError::Unsupported(lag))
                    }
                    // No answer within the attempt: ask again, whoever leads by then, until
                    // the deadline (the top of the loop ends it).
                    Err(e @ TransportError::Timeout(_)) => {
                        tracing::debug!(%leader, "the leader did not answer: {e}");
                        continue;
                    }
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
                Err(ForwardError::Unsupported(lag)) => return Err(ClusterError::Unsupported(lag)),
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
        let reply = self.write_committed(req).await?;
        Ok(reply.map(crate::registry::Outcome::unsided))
    }

    async fn write_committed(&self, req: Request) -> Result<Reply, ClusterError> {
        self.on_leader(
            self.inner.config.request_timeout,
            self.forward_attempt(),
            "the write may or may not have been applied",
            true,
            || Box::pin(self.propose_on_leader(req.clone())),
            || Rpc::Write(req.clone()),
            |reply| match reply {
                RpcReply::Write(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    /// Proposes a write on this node, the leader, once the format gate lets it through.
    async fn propose_on_leader(&self, req: Request) -> Result<Reply, ForwardError> {
        self.format_gate(format::request_format(&req))
            .map_err(ForwardError::Unsupported)?;
        self.inner.proposer.propose(req).await
    }

    /// The leader's format gate: a request that needs a format newer than format 1 goes
    /// into the log only once this node and every member (voters and learners, of every
    /// configuration in force) has said, in its latest reply on the current connection,
    /// that it reads that format. Otherwise a member could not decode the entry: it would
    /// stop following the cluster. The first member that lags is named.
    pub fn format_gate(&self, needs: Format) -> Result<(), FormatLag> {
        if needs <= Format::V1 {
            return Ok(());
        }
        let me = self.inner.me;
        let metrics = self.inner.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let name = |id: NodeId| membership.get_node(&id).map(|n| n.name.clone());
        if Format::CURRENT < needs {
            return Err(FormatLag {
                node: me,
                name: name(me).unwrap_or_default(),
                reads: Some(Format::CURRENT),
                needs,
            });
        }
        // A member known to read only older formats is named before one that has not
        // answered yet (which may well read it).
        let lagging = membership
            .nodes()
            .filter(|(id, _)| **id != me)
            .map(|(id, node)| (self.inner.transport.peer_format(*id), *id, node))
            .filter(|(reads, _, _)| reads.is_none_or(|r| r < needs))
            .max_by_key(|(reads, _, _)| reads.is_some());
        match lagging {
            Some((reads, node, n)) => Err(FormatLag {
                node,
                name: n.name.clone(),
                reads,
                needs,
            }),
            None => Ok(()),
        }
    }

    /// Waits until this node's replica reflects every write committed before the call.
    pub async fn barrier(&self) -> Result<(), ClusterError> {
        let start = Instant::now();
        let index = self
            .on_leader(
                self.inner.config.request_timeout,
                self.forward_attempt(),
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
            Ok((read, _)) => {
                self.inner
                    .read_index_served
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(read.map_or(0, |l| l.index))
            }
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
        // One attempt for the whole timeout: adding a learner waits for it to catch up,
        // and promoting twice is refused ("already a voter").
        self.on_leader(
            self.inner.config.membership_timeout,
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
                if let Some(node) = self.registry().node_by_id(id) {
                    if node.role != NodeRole::Voter {
                        return Err(ForwardError::Failed(format!(
                            "node {} joined with a {} token and can never vote; join it again with a voter token (`warren admin join-token create --role voter`)",
                            node.name, node.role
                        )));
                    }
                }
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
            _ if self.removed_at().is_some() => "removed",
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
            format: Format::CURRENT,
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

    /// What this node answers a pre-vote with.
    fn pre_vote_reply(&self) -> PreVoteReply {
        let registry = self.registry();
        let applied = registry.membership();
        PreVoteReply {
            leader_contact_ms: self.leader_contact().map(|d| d.as_millis() as u64),
            last_log_id: self.inner.raft.data_metrics().borrow().last_log,
            applied_membership: applied.log_id().map(|at| AppliedMembership {
                index: at.index,
                members: applied.membership().nodes().map(|(id, _)| *id).collect(),
            }),
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
///
/// Before it stands, a voter asks the others (pre-vote, see [`Canvass`]) and stands only if
/// a quorum has not heard from a leader for a leader lease either: openraft 0.9 has no
/// pre-vote, and a candidate whose votes are all refused still raises its term, which
/// deposes a healthy leader as soon as they next talk. On shared, busy CPUs a follower
/// misses heartbeats that its peers got; without this each such stall was an election.
/// The same answers tell a node (voter or learner) that it was removed from the cluster.
async fn election_timer(
    raft: Raft,
    me: NodeId,
    last_leader_contact: Arc<Mutex<Option<Instant>>>,
    timeouts: std::ops::Range<Duration>,
    probe: DamageProbe,
    canvass: Canvass,
) {
    use rand::Rng;
    let draw = || rand::thread_rng().gen_range(timeouts.clone());
    let spread = timeouts.end - timeouts.start;
    let heard = || *last_leader_contact.lock().expect("contact lock");
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
        let due = since + wait;
        tokio::select! {
            () = tokio::time::sleep_until(due) => {
                if leader {
                    refresh_leader_contact(&raft.metrics().borrow(), &last_leader_contact);
                }
                if Instant::now() > due + canvass.heartbeat {
                    // Woken this late, the process was stalled (a busy CPU): heartbeats that
                    // arrived meanwhile may still be queued behind this timer.
                    tokio::time::sleep(canvass.heartbeat).await;
                }
                let started = Instant::now();
                timeout = draw();
                if let Some(at) = heard().filter(|at| *at > since) {
                    since = at;
                } else {
                    let verdict = if lone_voter {
                        Verdict::STAND
                    } else if leader || canvass.removed_at(&raft).is_some() {
                        Verdict::WAIT
                    } else {
                        canvass.round(&raft).await
                    };
                    // A leader heard from while the others were asked wins over their answers.
                    let silent = heard().filter(|at| *at > since).is_none();
                    tracing::trace!(%me, ?verdict, silent, "election timer");
                    let stand = !leader && voter && verdict.stand && silent;
                    if stand && probe.damage().is_none() && raft.trigger().elect().await.is_err() {
                        // A damaged node does not stand: its log lacks entries it acknowledged.
                        return;
                    }
                    // From when this round began: a round that waited for a dead peer's
                    // answer does not delay the next one. Peers that refused only because
                    // they heard from a leader lately will support once their lease runs
                    // out: ask again then, and a random part of the spread of timeouts
                    // after (so that two nodes that lost the same leader do not stand at
                    // once, splitting the vote).
                    since = heard().map_or(started, |at| at.max(started));
                    if let Some(after) = verdict.retry_after.filter(|_| silent) {
                        let jitter = rand::thread_rng().gen_range(Duration::ZERO..spread);
                        timeout = after.max(started.elapsed()) + jitter;
                    }
                }
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

/// What the election timer needs to ask the other members before it stands (pre-vote), and
/// where it records what their answers say about this node's membership. Cheap to clone.
#[derive(Clone)]
struct Canvass {
    me: NodeId,
    transport: Arc<dyn Transport>,
    /// Shared with [`Cluster::removed_at`].
    removed_at: Arc<Mutex<Option<u64>>>,
    /// openraft's leader lease: a node that heard from a leader more recently refuses
    /// every vote, so the pre-vote asks for no less.
    lease: Duration,
    heartbeat: Duration,
    /// How long a round waits for the answers, as long as openraft waits for a vote: a
    /// peer that answers later counts as against.
    ask_timeout: Duration,
}

impl Canvass {
    fn new(me: NodeId, transport: Arc<dyn Transport>, config: &ClusterConfig) -> Self {
        Self {
            me,
            transport,
            removed_at: Arc::new(Mutex::new(None)),
            // openraft's lease is `election_timeout_max` (`EngineConfig::new`).
            lease: config.election_timeout_max,
            heartbeat: config.heartbeat,
            // openraft's vote RPC timeout (`RaftCore::send_vote`).
            ask_timeout: config.election_timeout_min,
        }
    }

    fn removed_at(&self, raft: &Raft) -> Option<u64> {
        let own = own_membership_index(&raft.metrics().borrow());
        still_removed(*self.removed_at.lock().expect("removed lock"), own)
    }

    /// Asks every other member of this node's membership for a pre-vote: whether a quorum
    /// of the voters (this node included) supports an election. Learns from the answers
    /// whether this node was removed (then it does not stand). Returns as soon as the
    /// answers decide, or once asking again later is the better bet: when the answers so
    /// far only lack voters whose lease runs out before the others have answered (a killed
    /// peer never answers; the next round, when the lease is over, needs it no more).
    async fn round(&self, raft: &Raft) -> Verdict {
        use futures::stream::{FuturesUnordered, StreamExt};
        let (membership, own) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            (
                m.membership_config.membership().clone(),
                own_membership_index(&m),
            )
        };
        let mine = raft.data_metrics().borrow().last_log;
        let mut tally = Tally::new(membership.get_joint_config().clone(), self.me);
        let mut evidence = Evidence::default();
        // When the voters that refused because of a recent leader will support.
        let mut lease_left = None;
        let mut asks: FuturesUnordered<_> = membership
            .nodes()
            .filter(|(id, _)| **id != self.me)
            .map(|(id, node)| async move {
                let answer = self
                    .transport
                    .call(*id, node, Rpc::PreVote, self.ask_timeout)
                    .await;
                (*id, answer)
            })
            .collect();
        let started = Instant::now();
        let mut cutoff = started + self.ask_timeout;
        while let Ok(Some((id, answer))) = tokio::time::timeout_at(cutoff, asks.next()).await {
            let supports = match answer {
                Ok(RpcReply::PreVote(reply)) => {
                    if let Some(applied) = &reply.applied_membership {
                        evidence.add(self.me, own, applied);
                    }
                    // A voter whose log is further than this node's refuses its vote
                    // whatever the term (openraft does not even take up the higher term
                    // then): standing would only raise terms, and the node that can win
                    // would have to outbid them.
                    let log_ok = mine >= reply.last_log_id;
                    let ago = reply.leader_contact_ms.map(Duration::from_millis);
                    let lease_over = ago.is_none_or(|ago| ago > self.lease);
                    if let Some(ago) = ago.filter(|_| log_ok && !lease_over && tally.is_voter(id)) {
                        let left = self.lease.saturating_sub(ago) + self.heartbeat;
                        lease_left = lease_left.max(Some(left));
                    }
                    log_ok && lease_over
                }
                // A node without pre-vote refuses the request as malformed: the vote itself
                // decides, as it did before pre-vote.
                Err(TransportError::Protocol(_)) => true,
                Ok(_) | Err(_) => false,
            };
            tracing::trace!(peer = %id, supports, "pre-vote");
            tally.record(id, supports);
            if tally.outcome().is_some() {
                break;
            }
            if let Some(left) = lease_left {
                cutoff = cutoff.min(started + left);
            }
        }
        if let Some(at) = evidence.removed_at() {
            let mut removed = self.removed_at.lock().expect("removed lock");
            if *removed < Some(at) {
                tracing::warn!("{}", removed_reason(at));
                *removed = Some(at);
            }
            return Verdict::WAIT;
        }
        Verdict {
            stand: tally.outcome() == Some(true),
            retry_after: lease_left,
        }
    }
}

/// What a pre-vote round decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verdict {
    /// A quorum supports an election.
    stand: bool,
    /// When voters that refused because they heard from a leader lately will support (the
    /// latest of them), if any did.
    retry_after: Option<Duration>,
}

impl Verdict {
    const STAND: Self = Self {
        stand: true,
        retry_after: None,
    };
    const WAIT: Self = Self {
        stand: false,
        retry_after: None,
    };
}

/// The answers to one pre-vote round, and what they decide.
#[derive(Debug)]
struct Tally {
    /// The voter sets (two during a joint membership change), each needing a majority.
    configs: Vec<BTreeSet<NodeId>>,
    support: BTreeSet<NodeId>,
    against: BTreeSet<NodeId>,
}

impl Tally {
    /// A round asked by `me`, which supports itself.
    fn new(configs: Vec<BTreeSet<NodeId>>, me: NodeId) -> Self {
        Self {
            configs,
            support: BTreeSet::from([me]),
            against: BTreeSet::new(),
        }
    }

    /// Whether `id` votes in any of the voter sets.
    fn is_voter(&self, id: NodeId) -> bool {
        self.configs.iter().any(|c| c.contains(&id))
    }

    /// `from` answered (no answer counts as against).
    fn record(&mut self, from: NodeId, supports: bool) {
        if supports {
            self.support.insert(from);
        } else {
            self.against.insert(from);
        }
    }

    /// `Some(true)` once the supporters are a majority of every voter set, `Some(false)`
    /// once that cannot happen whatever the others answer, `None` while it depends on them.
    fn outcome(&self) -> Option<bool> {
        if self.configs.is_empty() {
            return Some(false);
        }
        let majority = |config: &BTreeSet<NodeId>, count: usize| count * 2 > config.len();
        if self
            .configs
            .iter()
            .all(|c| majority(c, c.intersection(&self.support).count()))
        {
            return Some(true);
        }
        let open = |c: &BTreeSet<NodeId>| c.difference(&self.against).count();
        if self.configs.iter().any(|c| !majority(c, open(c))) {
            return Some(false);
        }
        None
    }
}

/// What the memberships other nodes have applied say about this node's.
#[derive(Debug, Default, PartialEq, Eq)]
struct Evidence {
    /// The latest applied membership that leaves this node out and is no older than its
    /// own.
    without: Option<u64>,
    /// The latest applied membership that has this node.
    with: Option<u64>,
}

impl Evidence {
    /// Adds one node's applied membership, as seen by `me` whose own is at index `own`.
    fn add(&mut self, me: NodeId, own: Option<u64>, applied: &AppliedMembership) {
        if applied.members.contains(&me) {
            self.with = self.with.max(Some(applied.index));
        } else if Some(applied.index) >= own {
            self.without = self.without.max(Some(applied.index));
        }
    }

    /// The index of the membership that removed this node, if the answers show one: a
    /// node that lags and has not yet applied this node's admission is outweighed by one
    /// that has.
    fn removed_at(&self) -> Option<u64> {
        self.without.filter(|w| Some(*w) > self.with)
    }
}

/// Whether a removal learned at `learned` still holds for a node whose own membership is at
/// index `own`: a later membership of its own means it was added again.
fn still_removed(learned: Option<u64>, own: Option<u64>) -> Option<u64> {
    learned.filter(|at| own <= Some(*at))
}

fn own_membership_index(m: &openraft::RaftMetrics<NodeId, ClusterNode>) -> Option<u64> {
    m.membership_config.log_id().map(|l| l.index)
}

fn removed_reason(at: u64) -> String {
    format!(
        "this node was removed from the cluster (membership at log index {at}); \
         it serves nothing: delete its data directory to join again"
    )
}

/// On a leader: how long since a quorum last acknowledged it (a lone voter is its own
/// quorum), recorded as its leader contact, so that a leader that steps down counts as in
/// contact until then, not since before it led (which would fail it closed until the next
/// leader's first heartbeat).
fn refresh_leader_contact(
    m: &openraft::RaftMetrics<NodeId, ClusterNode>,
    contact: &Mutex<Option<Instant>>,
) -> Option<Duration> {
    let voters = m.membership_config.membership().voter_ids().count();
    let ago = if voters == 1 {
        Some(Duration::ZERO)
    } else {
        m.millis_since_quorum_ack.map(Duration::from_millis)
    }?;
    if let Some(at) = Instant::now().checked_sub(ago) {
        let mut contact = contact.lock().expect("contact lock");
        if *contact < Some(at) {
            *contact = Some(at);
        }
    }
    Some(ago)
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
            "the stored Raft snapshot is damaged or lost: the log was compacted up to index {} after a snapshot covering it was stored, but the snapshot found covers only up to {} (sled drops damaged blobs when it opens; see its warnings above)",
            state.last_purged_log_id.map_or(0, |l| l.index),
            applied.map_or(0, |l| l.index)
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
    leader_changes: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut metrics = raft.metrics();
    let mut damaged = probe.damage().is_some();
    // The (term, leader) last counted.
    let mut office: Option<(u64, NodeId)> = None;
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
        let seen = {
            let m = metrics.borrow();
            m.current_leader.map(|l| (m.current_term, l))
        };
        if let Some(seen) = seen {
            if office != Some(seen) {
                office = Some(seen);
                leader_changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
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

/// Whether a node with certificate `from` may send `rpc`, judged by its certificate's role
/// (and, for requests only a leader serves, by being a `member` of the Raft membership and
/// by the registry `registry` knowing it with that role):
/// only voter-grade nodes stand, lead, change the membership or admit nodes and sites;
/// learner-grade nodes replicate, read and forward ordinary writes; relay-only nodes take
/// no part (they are refused at the connection already).
pub fn permitted(
    from: &NodeCert,
    rpc: &Rpc,
    registry: &Registry,
    member: bool,
) -> Result<(), String> {
    let voter_only = match rpc {
        Rpc::AppendEntries(_) | Rpc::Vote(_) | Rpc::Snapshot { .. } | Rpc::Membership(_) => true,
        Rpc::Write(req) => admits(&req.command),
        Rpc::ReadIndex | Rpc::Status | Rpc::PreVote => false,
    };
    if from.role == NodeRole::Relay || (voter_only && from.role != NodeRole::Voter) {
        return Err(format!(
            "{from} may not send {} (only voter-grade nodes may)",
            rpc.name()
        ));
    }
    if matches!(rpc, Rpc::Write(_) | Rpc::Membership(_) | Rpc::ReadIndex) && !member {
        // A removed node keeps its certificate; it no longer speaks for the cluster.
        return Err(format!(
            "{from} is not a member of the cluster (removed?) and may not send {}",
            rpc.name()
        ));
    }
    if matches!(rpc, Rpc::Write(_) | Rpc::Membership(_)) {
        // The leader has applied every registration: a node it does not know (forgotten) or
        // knows with another role (registered again since) does not speak for the cluster.
        if let Some(node) = registry.node_by_id(from.id) {
            if node.role != from.role {
                return Err(format!(
                    "{from}: the registry knows node {} as {}",
                    from.id, node.role
                ));
            }
        } else if registry.cluster_id() != 0 {
            return Err(format!("{from} is not registered in this cluster"));
        }
    }
    Ok(())
}

/// Commands that let someone new in: only voter-grade nodes (which hold the CA key and sign
/// the certificates these go with) submit them. An exhaustive match: a new command must be
/// placed on one side or the other.
fn admits(command: &Command) -> bool {
    match command {
        Command::Bootstrap { .. }
        | Command::RegisterNode { .. }
        | Command::ConsumeSiteToken { .. } => true,
        Command::WithSide { command, .. } => admits(command),
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
        | Command::SignIn { .. }
        | Command::RefreshSession { .. }
        | Command::RevokeSession { .. }
        | Command::ConsumeHandoff { .. }
        | Command::EnsureProxyKeys(_)
        | Command::CreateSiteToken(_)
        | Command::AcmeLease { .. }
        | Command::AcmeAccount(_)
        | Command::AcmeChallenge { .. }
        | Command::AcmeChallengeDone { .. }
        | Command::CreateSession(_)
        | Command::CreateShareLink(_)
        | Command::RevokeShareLink { .. }
        | Command::RotateSigningKey(_)
        | Command::ReserveAttempt { .. }
        | Command::ReleaseAttempt { .. }
        | Command::ConsumeEmailCode { .. }
        | Command::RegisterDevice { .. }
        | Command::TouchDevice { .. }
        | Command::SetSiteKey { .. }
        | Command::SetNodeRelay { .. } => false,
        #[cfg(feature = "format-next")]
        Command::Annotate { .. } => false,
    }
}

impl RpcHandler for Cluster {
    fn handle(&self, from: NodeCert, rpc: Rpc) -> BoxFuture<'_, RpcReply> {
        Box::pin(async move {
            tracing::trace!(%from, rpc = rpc.name(), "rpc");
            // Only requests a leader serves look at the membership (not the hot
            // AppendEntries path).
            let member = !matches!(rpc, Rpc::Write(_) | Rpc::Membership(_) | Rpc::ReadIndex)
                || self
                    .inner
                    .raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .nodes()
                    .any(|(id, _)| *id == from.id);
            if let Err(why) = permitted(&from, &rpc, &self.registry(), member) {
                tracing::warn!("refused an RPC: {why}");
                return RpcReply::Refused(why);
            }
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
                Rpc::Write(req) => RpcReply::Write(self.propose_on_leader(req).await),
                Rpc::ReadIndex => RpcReply::ReadIndex(self.read_index_on_leader().await),
                Rpc::Status => RpcReply::Status(self.local_status()),
                Rpc::Membership(change) => {
                    RpcReply::Membership(self.membership_on_leader(change).await)
                }
                Rpc::PreVote => RpcReply::PreVote(self.pre_vote_reply()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> BTreeSet<NodeId> {
        v.iter().map(|i| NodeId(*i)).collect()
    }

    fn cert(id: u64, role: NodeRole) -> NodeCert {
        NodeCert {
            cluster_id: 9,
            id: NodeId(id),
            role,
        }
    }

    fn write(command: Command) -> Rpc {
        Rpc::Write(Request::new(crate::types::Actor::System, command))
    }

    /// A registry of cluster 9 with node 1 (voter-grade) and node 2 (learner-grade).
    fn registry() -> Registry {
        use warren_proto::registry::Node;
        let mut r = Registry::default();
        let node = |id: u64, role| Node {
            id: NodeId(id),
            name: warren_proto::Name::new(format!("n{id}")).unwrap(),
            cluster_addr: format!("127.0.0.1:{}", 7400 + id),
            admin_addr: format!("127.0.0.1:{}", 7500 + id),
            region: String::new(),
            revision: 0,
            role,
        };
        let bootstrap = Command::Bootstrap {
            cluster_id: 9,
            node: node(1, NodeRole::Voter),
            api_key: crate::registry::ApiKeyRecord {
                name: warren_proto::Name::new("bootstrap").unwrap(),
                id: warren_proto::token::KeyId(1),
                hash: warren_proto::token::SecretHash([1; 32]),
                scope: warren_proto::api::Scope::Admin,
                created_at: 0,
                revision: 0,
            },
            join_token: crate::registry::JoinTokenRecord {
                id: 1,
                hash: warren_proto::token::SecretHash([2; 32]),
                created_at: 0,
                revision: 0,
                role: NodeRole::Voter,
            },
        };
        let apply = |r: &mut Registry, i: u64, c: Command| {
            let reply = r.apply_request(i, &Request::new(crate::types::Actor::System, c));
            assert!(reply.is_ok(), "{reply:?}");
        };
        apply(&mut r, 1, bootstrap);
        apply(
            &mut r,
            2,
            Command::RegisterNode {
                name: warren_proto::Name::new("n2").unwrap(),
                cluster_addr: "127.0.0.1:7402".into(),
                admin_addr: "127.0.0.1:7502".into(),
                region: String::new(),
                role: NodeRole::Learner,
            },
        );
        r
    }

    #[test]
    fn only_voter_grade_nodes_lead_change_membership_or_admit() {
        let reg = registry();
        let voter = cert(1, NodeRole::Voter);
        let learner = cert(2, NodeRole::Learner);
        let relay = cert(3, NodeRole::Relay);
        let register = || {
            write(Command::RegisterNode {
                name: warren_proto::Name::new("n9").unwrap(),
                cluster_addr: "127.0.0.1:7409".into(),
                admin_addr: "127.0.0.1:7509".into(),
                region: String::new(),
                role: NodeRole::Voter,
            })
        };
        let ordinary = || write(Command::RevokeJoinToken { id: 5 });
        let membership = || Rpc::Membership(MembershipChange::Remove(NodeId(1)));
        let vote = || {
            Rpc::Vote(openraft::raft::VoteRequest::new(
                openraft::Vote::new(3, NodeId(2)),
                None,
            ))
        };

        for rpc in [register(), ordinary(), membership(), vote(), Rpc::ReadIndex] {
            assert_eq!(
                permitted(&voter, &rpc, &reg, true),
                Ok(()),
                "{}",
                rpc.name()
            );
        }
        for rpc in [ordinary(), Rpc::ReadIndex, Rpc::Status, Rpc::PreVote] {
            assert_eq!(
                permitted(&learner, &rpc, &reg, true),
                Ok(()),
                "{}",
                rpc.name()
            );
        }
        for rpc in [register(), membership(), vote()] {
            let e = permitted(&learner, &rpc, &reg, true).unwrap_err();
            assert!(e.contains("only voter-grade"), "{}: {e}", rpc.name());
        }
        for rpc in [ordinary(), Rpc::Status, Rpc::PreVote] {
            assert!(
                permitted(&relay, &rpc, &reg, true).is_err(),
                "{}",
                rpc.name()
            );
        }
        // A certificate whose role the registry does not confirm (node 2 with a voter
        // certificate: issued before it registered again) does not write.
        let e = permitted(&cert(2, NodeRole::Voter), &register(), &reg, true).unwrap_err();
        assert!(e.contains("knows node 2 as learner"), "{e}");
        // Nor does a node the registry does not know (forgotten).
        let e = permitted(&cert(7, NodeRole::Voter), &ordinary(), &reg, true).unwrap_err();
        assert!(e.contains("not registered"), "{e}");
        // Nor does a node removed from the membership (it keeps its certificate).
        for rpc in [ordinary(), membership(), Rpc::ReadIndex] {
            let e = permitted(&voter, &rpc, &reg, false).unwrap_err();
            assert!(e.contains("not a member"), "{}: {e}", rpc.name());
        }
        // Raft itself does not depend on the registry (a lagging replica must still hear
        // a leader that joined after its registry was written).
        assert_eq!(
            permitted(&cert(7, NodeRole::Voter), &vote(), &reg, false),
            Ok(())
        );
    }

    #[test]
    fn a_pre_vote_needs_a_majority_of_every_voter_set() {
        // Three voters, the leader (1) killed: one survivor's support makes two of three.
        let mut t = Tally::new(vec![ids(&[1, 2, 3])], NodeId(2));
        assert_eq!(t.outcome(), None);
        t.record(NodeId(3), true);
        assert_eq!(t.outcome(), Some(true));

        // A peer that still hears the leader refuses; with the leader unanswered it is open
        // until the leader answers too.
        let mut t = Tally::new(vec![ids(&[1, 2, 3])], NodeId(2));
        t.record(NodeId(3), false);
        assert_eq!(t.outcome(), None);
        t.record(NodeId(1), false);
        assert_eq!(t.outcome(), Some(false));

        // Joint: both sets need a majority.
        let mut t = Tally::new(vec![ids(&[1, 2, 3]), ids(&[1, 3])], NodeId(2));
        t.record(NodeId(3), true);
        assert_eq!(t.outcome(), None, "{t:?}");
        t.record(NodeId(1), true);
        assert_eq!(t.outcome(), Some(true));
        let mut t = Tally::new(vec![ids(&[1, 2, 3]), ids(&[1, 3])], NodeId(2));
        t.record(NodeId(1), false);
        assert_eq!(t.outcome(), Some(false), "{t:?}");

        // No membership: nothing to stand for.
        assert_eq!(Tally::new(vec![], NodeId(1)).outcome(), Some(false));
    }

    #[test]
    fn a_committed_membership_without_this_node_and_not_older_than_its_own_removes_it() {
        let applied = |index, members: &[u64]| AppliedMembership {
            index,
            members: ids(members),
        };
        // Node 2 holds the joint membership at 10; the cluster applied 11 without it.
        let mut e = Evidence::default();
        e.add(NodeId(2), Some(10), &applied(11, &[1, 3]));
        assert_eq!(e.removed_at(), Some(11));
        // A peer that lags (still at the joint membership) does not outweigh that.
        e.add(NodeId(2), Some(10), &applied(10, &[1, 2, 3]));
        assert_eq!(e.removed_at(), Some(11));
        // One that applied its re-admission does.
        e.add(NodeId(2), Some(10), &applied(15, &[1, 2, 3]));
        assert_eq!(e.removed_at(), None);

        // A membership older than this node's own says nothing (it joined since).
        let mut e = Evidence::default();
        e.add(NodeId(4), Some(20), &applied(12, &[1, 2, 3]));
        assert_eq!(e.removed_at(), None);

        // Learned removals hold until this node has a later membership of its own.
        assert_eq!(still_removed(Some(11), Some(10)), Some(11));
        assert_eq!(still_removed(Some(11), Some(11)), Some(11));
        assert_eq!(still_removed(Some(11), Some(12)), None);
        assert_eq!(still_removed(None, Some(10)), None);
    }

    #[test]
    fn a_leader_counts_its_quorum_acknowledgement_as_its_leader_contact() {
        let mut m = openraft::RaftMetrics::<NodeId, ClusterNode>::new_initial(NodeId(1));
        m.state = ServerState::Leader;
        m.membership_config = Arc::new(crate::types::StoredMembership::new(
            None,
            openraft::Membership::new(vec![ids(&[1, 2, 3])], None),
        ));
        m.millis_since_quorum_ack = Some(40);
        // It last heard from a leader long before it led.
        let long_ago = Instant::now().checked_sub(Duration::from_secs(60));
        let contact = Mutex::new(long_ago);
        assert_eq!(
            refresh_leader_contact(&m, &contact),
            Some(Duration::from_millis(40))
        );
        let at = contact.lock().unwrap().expect("recorded");
        // Stepping down now, it counts as in contact 40 ms ago, not a minute ago.
        assert!(at.elapsed() < Duration::from_secs(1), "{:?}", at.elapsed());

        // Without an acknowledgement yet it records nothing.
        m.millis_since_quorum_ack = None;
        let contact = Mutex::new(long_ago);
        assert_eq!(refresh_leader_contact(&m, &contact), None);
        assert_eq!(*contact.lock().unwrap(), long_ago);
    }
}
