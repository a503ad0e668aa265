//! The supervision tree.
//!
//! [`Supervisor`] starts its children from a list of [`ChildSpec`]s (the node composes it,
//! `crate::node`) and restarts any that fails, logging why and counting it
//! (`warren_actor_restarts_total` in `/metrics`). While a child is down the node's health
//! says so ([`TreeHealth`], `GET /v1/health` answers 503). More than [`MAX_RESTARTS`]
//! restarts within [`RESTART_WINDOW`] stop the node: something is wrong that a restart
//! does not fix, and `warren-node` exits loudly rather than limp.
//!
//! - [`ClusterActor`] serializes membership changes made through this node and computes
//!   whether the node is serving ([`Serving`]), logging each change.
//! - [`Listener`] runs an accept loop (the QUIC endpoint, the proxy or the admin API) as a
//!   task and fails when the loop ends unexpectedly, so the supervisor starts a new one.
//! - The other children (proxy configuration, L4 ports, sessions, certificates, tunnels,
//!   gossip) live in their own modules and are started through their `ChildSpec`.
//!
//! Sockets, Raft, storage and every [`Published`](crate::publish::Published) snapshot are
//! created before the tree and outlive restarts.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr,
    SupervisionEvent,
};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use warren_consensus::cluster::{Cluster, ClusterError};
use warren_consensus::transport::MembershipChange;
use warren_consensus::types::ClusterNode;
use warren_proto::api::MemberRole;
use warren_proto::registry::NodeId;

use crate::admin::AdminState;
use crate::join::JoinService;
use crate::publish::Published;
use crate::serving::{Serving, SERVING_TICK};

/// Restarts allowed within [`RESTART_WINDOW`].
pub const MAX_RESTARTS: usize = 5;
/// Window over which restarts are counted.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// A membership change requested through this node.
#[derive(Debug, Clone)]
pub enum MemberOp {
    /// Add a node as a learner, then promote it if `role` is voter.
    Add {
        /// Node id.
        id: NodeId,
        /// How to reach it.
        node: ClusterNode,
        /// Voter or learner.
        role: MemberRole,
    },
    /// Learner to voter.
    Promote(NodeId),
    /// Out of the membership.
    Remove(NodeId),
}

/// Messages of the [`ClusterActor`].
pub enum ClusterMsg {
    /// Carry out a membership change; one at a time per node.
    Membership(MemberOp, RpcReplyPort<Result<(), ClusterError>>),
    /// Periodic check of leader contact.
    Tick,
    /// Fail on purpose, to exercise the supervision tree (used by its tests).
    Crash,
}

/// The current [`ClusterActor`], whichever incarnation is alive.
#[derive(Clone)]
pub struct Members {
    rx: watch::Receiver<Option<ActorRef<ClusterMsg>>>,
    /// Keeps the channel open when the handle made it itself ([`Members::from_actor`]).
    _own: Option<Arc<watch::Sender<Option<ActorRef<ClusterMsg>>>>>,
}

impl Members {
    /// Carries out a membership change through the cluster actor.
    pub async fn change(&self, op: MemberOp) -> Result<(), ClusterError> {
        let actor = self.rx.borrow().clone().ok_or(ClusterError::ShuttingDown)?;
        match actor
            .call(|reply| ClusterMsg::Membership(op, reply), None)
            .await
        {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            _ => Err(ClusterError::Membership(
                "the cluster actor stopped before the change completed; check the cluster status"
                    .into(),
            )),
        }
    }

    /// A handle that follows whichever actor `current` names (the tree sets it on every
    /// start of the [`ClusterActor`]).
    pub fn following(current: &watch::Sender<Option<ActorRef<ClusterMsg>>>) -> Self {
        Self {
            rx: current.subscribe(),
            _own: None,
        }
    }

    /// A handle to one given actor (tests, tools).
    pub fn from_actor(actor: ActorRef<ClusterMsg>) -> Self {
        let (tx, rx) = watch::channel(Some(actor));
        Self {
            rx,
            _own: Some(Arc::new(tx)),
        }
    }

    /// The live actor, if any.
    pub fn actor(&self) -> Option<ActorRef<ClusterMsg>> {
        self.rx.borrow().clone()
    }
}

/// Owns membership changes and the node's serving state.
#[derive(Clone)]
pub struct ClusterActor;

impl ClusterActor {
    /// The tree's child `cluster`: on every start it becomes the actor `current` names.
    pub fn child(
        cluster: Cluster,
        serving: Serving,
        current: Arc<watch::Sender<Option<ActorRef<ClusterMsg>>>>,
    ) -> ChildSpec {
        ChildSpec::new("cluster", move |sup| {
            let args = (cluster.clone(), serving.clone());
            let current = current.clone();
            async move {
                current.send_replace(None);
                let (actor, _) = Actor::spawn_linked(None, ClusterActor, args, sup).await?;
                current.send_replace(Some(actor.clone()));
                Ok(actor.get_cell())
            }
        })
    }
}

/// State of the [`ClusterActor`].
pub struct ClusterState {
    cluster: Cluster,
    busy: Arc<Semaphore>,
    serving: Serving,
    was_serving: Option<bool>,
    ticker: JoinHandle<()>,
}

impl Actor for ClusterActor {
    type Msg = ClusterMsg;
    type State = ClusterState;
    type Arguments = (Cluster, Serving);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (cluster, serving): (Cluster, Serving),
    ) -> Result<Self::State, ActorProcessingErr> {
        // The first answer at once: the proxy and health read it from the start.
        serving.set(cluster.serving(), Instant::now());
        let ticker = myself.send_interval(SERVING_TICK, || ClusterMsg::Tick);
        Ok(ClusterState {
            cluster,
            busy: Arc::new(Semaphore::new(1)),
            serving,
            was_serving: None,
            ticker,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker.abort();
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ClusterMsg::Membership(op, reply) => {
                let Ok(permit) = state.busy.clone().try_acquire_owned() else {
                    let _ = reply.send(Err(ClusterError::Membership(
                        "another membership change through this node is in progress; try again when it is done".into(),
                    )));
                    return Ok(());
                };
                // A change can take a while (a learner catching up): do it off the mailbox.
                let cluster = state.cluster.clone();
                tokio::spawn(async move {
                    let result = apply_member_op(&cluster, op).await;
                    drop(permit);
                    let _ = reply.send(result);
                });
            }
            ClusterMsg::Tick => {
                let now = state.cluster.serving();
                let ok = now.is_ok();
                if state.was_serving != Some(ok) {
                    match (&now, state.was_serving) {
                        (Ok(()), _) => {
                            tracing::info!("in contact with the cluster leader; serving")
                        }
                        (Err(why), Some(true)) => tracing::warn!(
                            "lost contact with the cluster leader, failing closed: {why}"
                        ),
                        (Err(why), _) => tracing::info!("not serving yet: {why}"),
                    }
                    state.was_serving = Some(ok);
                }
                state.serving.set(now, Instant::now());
            }
            ClusterMsg::Crash => return Err("crash requested".into()),
        }
        Ok(())
    }
}

async fn apply_member_op(cluster: &Cluster, op: MemberOp) -> Result<(), ClusterError> {
    match op {
        MemberOp::Add { id, node, role } => {
            cluster
                .change_membership(MembershipChange::AddLearner(id, node))
                .await?;
            if role == MemberRole::Voter {
                cluster
                    .change_membership(MembershipChange::Promote(id))
                    .await?;
            }
            Ok(())
        }
        MemberOp::Promote(id) => {
            cluster
                .change_membership(MembershipChange::Promote(id))
                .await
        }
        MemberOp::Remove(id) => {
            cluster
                .change_membership(MembershipChange::Remove(id))
                .await
        }
    }
}

/// Runs one accept loop as a task; fails when the loop ends so the supervisor restarts it.
#[derive(Clone)]
pub struct Listener;

/// What a [`Listener`] runs.
#[derive(Clone)]
pub enum ListenerKind {
    /// The QUIC endpoint.
    Rpc {
        /// The endpoint.
        endpoint: quinn::Endpoint,
        /// The cluster.
        cluster: Cluster,
        /// This cluster's id.
        cluster_id: u128,
        /// The join service.
        join: Arc<JoinService>,
        /// The site services (enrollment, agent tunnels, relayed streams).
        sites: Arc<crate::sites::Sites>,
        /// The relay-only nodes' feed.
        feed: Arc<crate::relay_only::FeedService>,
    },
    /// The HTTPS proxy and its HTTP redirect.
    Proxy {
        /// The proxy.
        proxy: Arc<crate::proxy::Proxy>,
        /// The bound HTTPS listener.
        https: Arc<std::net::TcpListener>,
        /// The bound HTTP listener.
        http: Arc<std::net::TcpListener>,
        /// Stops accepting and drains connections at shutdown.
        drain: crate::conn::Drain,
    },
    /// The admin API.
    Admin {
        /// The bound TCP listener.
        listener: Arc<std::net::TcpListener>,
        /// TLS for it.
        tls: Arc<rustls::ServerConfig>,
        /// Handler state.
        state: AdminState,
        /// Stops accepting and drains connections at shutdown.
        drain: crate::conn::Drain,
    },
}

/// Messages of a [`Listener`].
pub enum ListenerMsg {
    /// The accept loop ended.
    Ended(String),
}

impl Actor for Listener {
    type Msg = ListenerMsg;
    type State = JoinHandle<()>;
    type Arguments = ListenerKind;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        kind: ListenerKind,
    ) -> Result<Self::State, ActorProcessingErr> {
        let task = match kind {
            ListenerKind::Rpc {
                endpoint,
                cluster,
                cluster_id,
                join,
                sites,
                feed,
            } => tokio::spawn(async move {
                use warren_consensus::quic::OtherAlpn;
                let handler: Arc<dyn warren_consensus::quic::RpcHandler> = Arc::new(cluster);
                let others: Vec<Arc<dyn OtherAlpn>> = vec![
                    join,
                    Arc::new(crate::sites::EnrollService {
                        sites: sites.clone(),
                    }),
                    Arc::new(crate::sites::AgentService {
                        sites: sites.clone(),
                    }),
                    Arc::new(crate::sites::RelayService { sites }),
                    feed,
                ];
                warren_consensus::quic::accept_loop(endpoint, cluster_id, handler, others).await;
                let _ = myself.cast(ListenerMsg::Ended("the QUIC endpoint closed".into()));
            }),
            ListenerKind::Proxy {
                proxy,
                https,
                http,
                drain,
            } => {
                let https = tokio::net::TcpListener::from_std(https.try_clone()?)?;
                let http = tokio::net::TcpListener::from_std(http.try_clone()?)?;
                tokio::spawn(async move {
                    let why = tokio::select! {
                        why = proxy.clone().serve_https(https, drain.clone()) => why,
                        why = proxy.serve_http(http, drain) => why,
                    };
                    let _ = myself.cast(ListenerMsg::Ended(why));
                })
            }
            ListenerKind::Admin {
                listener,
                tls,
                state,
                drain,
            } => {
                let listener = tokio::net::TcpListener::from_std(listener.try_clone()?)?;
                tokio::spawn(async move {
                    let why = crate::admin::serve(listener, tls, state, drain).await;
                    let _ = myself.cast(ListenerMsg::Ended(why));
                })
            }
        };
        Ok(task)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        task: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        task.abort();
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        _task: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let ListenerMsg::Ended(why) = msg;
        Err(why.into())
    }
}

/// How to start one child of the tree, and again after it failed.
#[derive(Clone)]
pub struct ChildSpec {
    /// The child's name in logs, health and metrics (`proxy_config`, `tunnels`, …).
    pub name: &'static str,
    start: Arc<dyn Fn(ActorCell) -> BoxFuture<'static, Result<ActorCell, SpawnErr>> + Send + Sync>,
}

impl ChildSpec {
    /// A child started by `start`, which is given the supervisor to link to.
    pub fn new<F, Fut>(name: &'static str, start: F) -> Self
    where
        F: Fn(ActorCell) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<ActorCell, SpawnErr>> + Send + 'static,
    {
        Self {
            name,
            start: Arc::new(move |sup| Box::pin(start(sup))),
        }
    }

    /// A child that is actor `actor`, started (again) with `args()`.
    pub fn actor<A, F>(name: &'static str, actor: A, args: F) -> Self
    where
        A: Actor + Clone,
        F: Fn() -> A::Arguments + Send + Sync + 'static,
    {
        Self::new(name, move |sup| {
            let actor = actor.clone();
            let args = args();
            async move {
                let (r, _) = Actor::spawn_linked(None, actor, args, sup).await?;
                Ok(r.get_cell())
            }
        })
    }
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ChildSpec").field(&self.name).finish()
    }
}

/// What the tree reports about itself: children that are down, restarts so far.
#[derive(Debug, Clone, Default)]
pub struct TreeHealth {
    /// Children that failed and are not running again yet, with why they failed.
    pub down: Vec<(&'static str, String)>,
    /// Restarts per child since the node started (every child listed, zero included).
    pub restarts: Vec<(&'static str, u64)>,
}

impl TreeHealth {
    /// `Ok` if every child runs, else which one does not and why.
    pub fn check(&self) -> Result<(), String> {
        match self.down.first() {
            None => Ok(()),
            Some((name, why)) => Err(format!("{name} is down ({why}); restarting it")),
        }
    }

    /// The tree's counters in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP warren_actor_restarts_total Restarts of each actor of the node's supervision tree after a failure.\n# TYPE warren_actor_restarts_total counter\n",
        );
        for (name, n) in &self.restarts {
            out.push_str(&format!(
                "warren_actor_restarts_total{{actor=\"{name}\"}} {n}\n"
            ));
        }
        out.push_str("# HELP warren_actor_up Whether each actor of the supervision tree runs (1) or is down (0).\n# TYPE warren_actor_up gauge\n");
        for (name, _) in &self.restarts {
            let up = !self.down.iter().any(|(d, _)| d == name);
            out.push_str(&format!(
                "warren_actor_up{{actor=\"{name}\"}} {}\n",
                u8::from(up)
            ));
        }
        out
    }
}

/// Everything the tree needs, created before it.
pub struct SupervisorArgs {
    /// The children, in start order.
    pub children: Vec<ChildSpec>,
    /// Where the tree reports on itself.
    pub health: Arc<Published<TreeHealth>>,
}

/// The root of the tree.
pub struct Supervisor;

/// State of the [`Supervisor`].
pub struct SupervisorState {
    specs: Vec<ChildSpec>,
    running: HashMap<ActorId, (usize, ActorCell)>,
    down: HashMap<usize, String>,
    restarts: Vec<u64>,
    recent: VecDeque<Instant>,
    health: Arc<Published<TreeHealth>>,
}

/// Messages of the [`Supervisor`].
pub enum SupervisorMsg {
    /// How many times children were restarted so far.
    Restarts(RpcReplyPort<usize>),
    /// The live child called this, if it runs (tests send it messages, such as a crash).
    Child(&'static str, RpcReplyPort<Option<ActorCell>>),
    /// Try again to start a child whose start failed.
    Retry(usize),
}

/// Waits between failed attempts to start a child again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

impl SupervisorState {
    fn publish(&self) {
        let mut down: Vec<(&'static str, String)> = self
            .down
            .iter()
            .map(|(i, why)| (self.specs[*i].name, why.clone()))
            .collect();
        down.sort();
        self.health.publish(Arc::new(TreeHealth {
            down,
            restarts: self
                .specs
                .iter()
                .zip(&self.restarts)
                .map(|(s, n)| (s.name, *n))
                .collect(),
        }));
    }

    /// Starts child `i`; on failure it stays down and is tried again shortly.
    async fn start(&mut self, myself: &ActorRef<SupervisorMsg>, i: usize) {
        let spec = &self.specs[i];
        match (spec.start)(myself.get_cell()).await {
            Ok(cell) => {
                self.running.insert(cell.get_id(), (i, cell));
                self.down.remove(&i);
            }
            Err(e) => {
                tracing::error!(
                    child = spec.name,
                    "{} could not start: {e}; trying again in {RETRY_AFTER:?}",
                    spec.name
                );
                self.down.insert(i, format!("could not start: {e}"));
                myself.send_after(RETRY_AFTER, move || SupervisorMsg::Retry(i));
            }
        }
        self.publish();
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let n = args.children.len();
        let mut state = SupervisorState {
            specs: args.children,
            running: HashMap::new(),
            down: HashMap::new(),
            restarts: vec![0; n],
            recent: VecDeque::new(),
            health: args.health,
        };
        // At start a child that cannot start stops the node: it is a bad configuration or
        // environment, not a transient failure.
        for i in 0..n {
            let spec = state.specs[i].clone();
            let cell = (spec.start)(myself.get_cell())
                .await
                .map_err(|e| format!("starting {}: {e}", spec.name))?;
            state.running.insert(cell.get_id(), (i, cell));
        }
        state.publish();
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Last started first: listeners go before what they read from.
        let mut cells: Vec<(usize, ActorCell)> = state.running.drain().map(|(_, c)| c).collect();
        cells.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (_, cell) in cells {
            cell.stop(Some("node shutting down".into()));
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restarts(reply) => {
                let _ = reply.send(state.restarts.iter().sum::<u64>() as usize);
            }
            SupervisorMsg::Child(name, reply) => {
                let cell = state
                    .running
                    .values()
                    .find(|(i, _)| state.specs[*i].name == name)
                    .map(|(_, c)| c.clone());
                let _ = reply.send(cell);
            }
            SupervisorMsg::Retry(i) => {
                if state.down.contains_key(&i) && !state.running.values().any(|(j, _)| *j == i) {
                    state.start(&myself, i).await;
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        let Some((i, _)) = state.running.remove(&cell.get_id()) else {
            return Ok(());
        };
        let name = state.specs[i].name;
        let now = Instant::now();
        while state
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            state.recent.pop_front();
        }
        state.down.insert(i, why.clone());
        state.publish();
        if state.recent.len() >= MAX_RESTARTS {
            tracing::error!(child = name, "{name} failed again ({why}) after {MAX_RESTARTS} restarts within {RESTART_WINDOW:?}; stopping the node");
            myself.stop(Some(format!("{name} keeps failing: {why}")));
            return Ok(());
        }
        state.recent.push_back(now);
        state.restarts[i] += 1;
        tracing::error!(child = name, "{name} failed: {why}; restarting it");
        state.start(&myself, i).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use ractor::rpc::CallResult;

    use super::*;

    /// A child that fails to start while `refusals` is above zero, and fails on `Crash`.
    #[derive(Clone)]
    struct Flaky {
        refusals: Arc<AtomicUsize>,
    }

    enum FlakyMsg {
        Crash,
    }

    impl Actor for Flaky {
        type Msg = FlakyMsg;
        type State = ();
        type Arguments = ();

        async fn pre_start(
            &self,
            _myself: ActorRef<Self::Msg>,
            (): (),
        ) -> Result<(), ActorProcessingErr> {
            let left = self.refusals.load(Ordering::SeqCst);
            if left > 0 {
                self.refusals.store(left - 1, Ordering::SeqCst);
                return Err("not yet".into());
            }
            Ok(())
        }

        async fn handle(
            &self,
            _myself: ActorRef<Self::Msg>,
            msg: FlakyMsg,
            _state: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            match msg {
                FlakyMsg::Crash => panic!("crash requested"),
            }
        }
    }

    async fn child(sup: &ActorRef<SupervisorMsg>, name: &'static str) -> Option<ActorCell> {
        match sup.call(|r| SupervisorMsg::Child(name, r), None).await {
            Ok(CallResult::Success(c)) => c,
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_panicking_child_is_restarted_counted_and_shown_down_until_it_runs_again() {
        let refusals = Arc::new(AtomicUsize::new(0));
        let flaky = Flaky {
            refusals: refusals.clone(),
        };
        let steady = Flaky {
            refusals: Arc::new(AtomicUsize::new(0)),
        };
        let health = Published::new(TreeHealth::default());
        let args = SupervisorArgs {
            children: vec![
                ChildSpec::actor("flaky", flaky, || ()),
                ChildSpec::actor("steady", steady, || ()),
            ],
            health: health.clone(),
        };
        let (sup, done) = Actor::spawn(None, Supervisor, args).await.unwrap();
        assert!(health.load().check().is_ok());
        let first = child(&sup, "flaky").await.expect("flaky runs");

        // It panics, and its next two starts fail: it is down (and says why) until the
        // supervisor's retries get it running again.
        refusals.store(2, Ordering::SeqCst);
        let mut changes = health.subscribe();
        first.send_message(FlakyMsg::Crash).unwrap();
        let down = loop {
            changes.changed().await.unwrap();
            let h = health.load_full();
            if !h.down.is_empty() {
                break h;
            }
        };
        let why = down.check().unwrap_err();
        assert!(why.starts_with("flaky is down"), "{why}");
        assert!(down.render().contains("warren_actor_up{actor=\"flaky\"} 0"));
        assert!(down
            .render()
            .contains("warren_actor_up{actor=\"steady\"} 1"));

        let mut back = None;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(c) = child(&sup, "flaky").await {
                back = Some(c);
                break;
            }
        }
        let back = back.expect("flaky was not started again");
        assert_ne!(back.get_id(), first.get_id());
        let h = health.load_full();
        assert!(h.check().is_ok(), "{:?}", h.down);
        assert_eq!(
            h.restarts,
            [("flaky", 1), ("steady", 0)],
            "one restart counted, however many start attempts it took"
        );
        assert!(h
            .render()
            .contains("warren_actor_restarts_total{actor=\"flaky\"} 1"));
        // The other child was never touched.
        assert!(child(&sup, "steady").await.is_some());
        sup.stop(None);
        done.await.unwrap();
    }

    #[tokio::test]
    async fn a_child_that_keeps_failing_stops_the_tree() {
        let flaky = Flaky {
            refusals: Arc::new(AtomicUsize::new(0)),
        };
        let args = SupervisorArgs {
            children: vec![ChildSpec::actor("flaky", flaky, || ())],
            health: Published::new(TreeHealth::default()),
        };
        let (sup, done) = Actor::spawn(None, Supervisor, args).await.unwrap();
        for _ in 0..=MAX_RESTARTS {
            let Some(c) = child(&sup, "flaky").await else {
                break;
            };
            c.send_message(FlakyMsg::Crash).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .expect("the tree gave up")
            .unwrap();
    }
}
