//! The supervision tree.
//!
//! [`Supervisor`] starts three children and restarts any that fails, logging why; more than
//! [`MAX_RESTARTS`] restarts within [`RESTART_WINDOW`] stop the node (something is wrong
//! that a restart does not fix).
//!
//! - [`ClusterActor`] serializes membership changes made through this node and watches
//!   whether the node is in contact with a leader, logging each change.
//! - [`Listener`] runs an accept loop (the QUIC endpoint or the admin API) as a task and
//!   fails when the loop ends unexpectedly, so the supervisor starts a new one.
//!
//! Sockets, Raft and storage are created before the tree and outlive restarts.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use warren_consensus::cluster::{Cluster, ClusterError};
use warren_consensus::pki::{ClusterCa, NodeIdentity};
use warren_consensus::quic::QuicTransport;
use warren_consensus::transport::MembershipChange;
use warren_consensus::types::ClusterNode;
use warren_proto::api::MemberRole;
use warren_proto::registry::NodeId;
use warren_proto::Name;

use crate::admin::AdminState;
use crate::join::JoinService;

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

/// Owns membership changes and the leader-contact watch.
pub struct ClusterActor;

/// State of the [`ClusterActor`].
pub struct ClusterState {
    cluster: Cluster,
    busy: Arc<Semaphore>,
    serving: Option<bool>,
    ticker: JoinHandle<()>,
}

impl Actor for ClusterActor {
    type Msg = ClusterMsg;
    type State = ClusterState;
    type Arguments = Cluster;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        cluster: Cluster,
    ) -> Result<Self::State, ActorProcessingErr> {
        let ticker = myself.send_interval(Duration::from_secs(1), || ClusterMsg::Tick);
        Ok(ClusterState {
            cluster,
            busy: Arc::new(Semaphore::new(1)),
            serving: None,
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
                if state.serving != Some(ok) {
                    match (&now, state.serving) {
                        (Ok(()), _) => {
                            tracing::info!("in contact with the cluster leader; serving")
                        }
                        (Err(why), Some(true)) => tracing::warn!(
                            "lost contact with the cluster leader, failing closed: {why}"
                        ),
                        (Err(why), _) => tracing::info!("not serving yet: {why}"),
                    }
                    state.serving = Some(ok);
                }
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
    },
    /// The HTTPS proxy and its HTTP redirect.
    Proxy {
        /// The proxy.
        proxy: Arc<crate::proxy::Proxy>,
        /// The bound HTTPS listener.
        https: Arc<std::net::TcpListener>,
        /// The bound HTTP listener.
        http: Arc<std::net::TcpListener>,
    },
    /// The admin API.
    Admin {
        /// The bound TCP listener.
        listener: Arc<std::net::TcpListener>,
        /// TLS for it.
        tls: Arc<rustls::ServerConfig>,
        /// Handler state.
        state: AdminState,
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
                ];
                warren_consensus::quic::accept_loop(endpoint, cluster_id, handler, others).await;
                let _ = myself.cast(ListenerMsg::Ended("the QUIC endpoint closed".into()));
            }),
            ListenerKind::Proxy { proxy, https, http } => {
                let https = tokio::net::TcpListener::from_std(https.try_clone()?)?;
                let http = tokio::net::TcpListener::from_std(http.try_clone()?)?;
                tokio::spawn(async move {
                    let why = tokio::select! {
                        why = proxy.clone().serve_https(https) => why,
                        why = proxy.serve_http(http) => why,
                    };
                    let _ = myself.cast(ListenerMsg::Ended(why));
                })
            }
            ListenerKind::Admin {
                listener,
                tls,
                state,
            } => {
                let listener = tokio::net::TcpListener::from_std(listener.try_clone()?)?;
                tokio::spawn(async move {
                    let why = crate::admin::serve(listener, tls, state).await;
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

/// Everything the tree needs, created before it.
#[derive(Clone)]
pub struct SupervisorArgs {
    /// The cluster handle.
    pub cluster: Cluster,
    /// The QUIC transport (for peer health in status).
    pub transport: Arc<QuicTransport>,
    /// The QUIC endpoint.
    pub endpoint: quinn::Endpoint,
    /// The cluster CA.
    pub ca: ClusterCa,
    /// This node's certificate and key.
    pub identity: NodeIdentity,
    /// The bound admin listener.
    pub admin_listener: Arc<std::net::TcpListener>,
    /// This node's name.
    pub node_name: Name,
    /// This cluster's id.
    pub cluster_id: u128,
    /// The proxy.
    pub proxy: Arc<crate::proxy::Proxy>,
    /// The site services.
    pub sites: Arc<crate::sites::Sites>,
    /// The bound HTTPS listener of the proxy.
    pub https_listener: Arc<std::net::TcpListener>,
    /// The bound HTTP listener of the proxy.
    pub http_listener: Arc<std::net::TcpListener>,
}

/// The root of the tree.
pub struct Supervisor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Child {
    Cluster,
    Rpc,
    Admin,
    Proxy,
}

/// State of the [`Supervisor`].
pub struct SupervisorState {
    args: SupervisorArgs,
    children: HashMap<ActorId, (Child, ActorCell)>,
    restarts: VecDeque<Instant>,
    cluster_actor: watch::Sender<Option<ActorRef<ClusterMsg>>>,
    tls: Arc<rustls::ServerConfig>,
}

impl SupervisorState {
    /// A handle that follows whichever cluster actor is alive.
    fn members(&self) -> Members {
        Members {
            rx: self.cluster_actor.subscribe(),
            _own: None,
        }
    }
}

/// Messages of the [`Supervisor`].
pub enum SupervisorMsg {
    /// How many times children were restarted so far.
    Restarts(RpcReplyPort<usize>),
    /// The live cluster actor.
    ClusterActor(RpcReplyPort<Option<ActorRef<ClusterMsg>>>),
}

impl Supervisor {
    async fn start_child(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        child: Child,
    ) -> Result<(), ActorProcessingErr> {
        let a = &state.args;
        let cell = match child {
            Child::Cluster => {
                let (actor, _) =
                    Actor::spawn_linked(None, ClusterActor, a.cluster.clone(), myself.get_cell())
                        .await?;
                state.cluster_actor.send_replace(Some(actor.clone()));
                actor.get_cell()
            }
            Child::Rpc => {
                let join = Arc::new(JoinService {
                    cluster: a.cluster.clone(),
                    ca: a.ca.clone(),
                    cluster_id: a.cluster_id,
                    members: state.members(),
                });
                let kind = ListenerKind::Rpc {
                    endpoint: a.endpoint.clone(),
                    cluster: a.cluster.clone(),
                    cluster_id: a.cluster_id,
                    join,
                    sites: a.sites.clone(),
                };
                let (actor, _) =
                    Actor::spawn_linked(None, Listener, kind, myself.get_cell()).await?;
                actor.get_cell()
            }
            Child::Proxy => {
                let kind = ListenerKind::Proxy {
                    proxy: a.proxy.clone(),
                    https: a.https_listener.clone(),
                    http: a.http_listener.clone(),
                };
                let (actor, _) =
                    Actor::spawn_linked(None, Listener, kind, myself.get_cell()).await?;
                actor.get_cell()
            }
            Child::Admin => {
                let admin = AdminState::new(
                    a.cluster.clone(),
                    a.transport.clone(),
                    a.ca.clone(),
                    a.node_name.clone(),
                    a.cluster_id,
                    state.members(),
                    a.proxy.clone(),
                );
                let kind = ListenerKind::Admin {
                    listener: a.admin_listener.clone(),
                    tls: state.tls.clone(),
                    state: admin,
                };
                let (actor, _) =
                    Actor::spawn_linked(None, Listener, kind, myself.get_cell()).await?;
                actor.get_cell()
            }
        };
        state.children.insert(cell.get_id(), (child, cell));
        Ok(())
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
        let tls = Arc::new(warren_consensus::pki::https_server_config(&args.identity)?);
        let (cluster_actor, _) = watch::channel(None);
        let mut state = SupervisorState {
            args,
            children: HashMap::new(),
            restarts: VecDeque::new(),
            cluster_actor,
            tls,
        };
        for child in [Child::Cluster, Child::Rpc, Child::Admin, Child::Proxy] {
            self.start_child(&myself, &mut state, child).await?;
        }
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.cluster_actor.send_replace(None);
        for (_, (_, cell)) in state.children.drain() {
            cell.stop(Some("node shutting down".into()));
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restarts(reply) => {
                let _ = reply.send(state.restarts.len());
            }
            SupervisorMsg::ClusterActor(reply) => {
                let _ = reply.send(state.cluster_actor.borrow().clone());
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
        let Some((child, _)) = state.children.remove(&cell.get_id()) else {
            return Ok(());
        };
        let now = Instant::now();
        while state
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            state.restarts.pop_front();
        }
        if state.restarts.len() >= MAX_RESTARTS {
            tracing::error!(?child, "{child:?} failed again ({why}) after {MAX_RESTARTS} restarts within {RESTART_WINDOW:?}; stopping the node");
            myself.stop(Some(format!("{child:?} keeps failing: {why}")));
            return Ok(());
        }
        state.restarts.push_back(now);
        tracing::error!(?child, "{child:?} failed: {why}; restarting it");
        if child == Child::Cluster {
            state.cluster_actor.send_replace(None);
        }
        self.start_child(&myself, state, child).await
    }
}
