//! The `tunnels` actor: the agent tunnels this node holds and what their agents report,
//! with one child actor per tunnel.
//!
//! ```text
//!  AgentService::serve ── Connected(handover) ──► TunnelsActor ─► LocalTunnels (add/remove,
//!                                                   │   ▲          handle_health)
//!                                   spawn_linked ───┤   │ Health(id, report)
//!                                                   ▼   │ its end / failure: supervision event
//!                                              AgentTunnel (one per agent)
//!                                                 ├─ task: config out on every registry change
//!                                                 ├─ task: health reports in
//!                                                 └─ the connection's end
//!  TunnelsActor ─ publish ─► Published<LocalTunnels<Connection>> ◄─ load() ─ data path, gossip
//! ```
//!
//! A child that fails or ends takes only its own tunnel with it: the connection is closed
//! (the agent dials again) and the tunnel and its health leave the table. When
//! `TunnelsActor` itself stops or fails its children go with it (ractor stops the children
//! of an actor that ends): every connection is closed and the next incarnation starts from
//! an empty table, which agents fill again as they redial.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use warren_consensus::registry::Registry;
use warren_proto::registry::Target;
use warren_proto::sites::TunnelId;
use warren_proto::tunnel::io::{read_message, write_message};
use warren_proto::tunnel::{FromAgent, Hello, PeerProtocol, ToAgent, Unknowns, MAX_CONTROL};
use warren_proto::Name;

use super::{site_config, Current, Tunnels, CLOSE_TUNNEL_LOST};
use crate::actors::ChildSpec;
use crate::publish::Published;

/// An agent connection that passed its checks (site certificate, hello), with its control
/// stream, for the `tunnels` actor to take over.
pub struct Handover {
    /// The site its certificate names.
    pub site: Name,
    /// The connection.
    pub conn: quinn::Connection,
    /// The control stream, node to agent.
    pub send: quinn::SendStream,
    /// The control stream, agent to node (the hello already read).
    pub recv: quinn::RecvStream,
    /// What the agent said it speaks.
    pub agent: PeerProtocol,
}

/// Messages of the [`TunnelsActor`].
pub enum TunnelsMsg {
    /// Take over an agent's tunnel.
    Connected(Box<Handover>),
    /// A tunnel's agent reported its targets' health (from the tunnel's child).
    Health(TunnelId, Vec<(Target, bool)>),
    /// Make the child of this tunnel panic, to exercise supervision (its tests).
    CrashTunnel(TunnelId),
    /// Panic on purpose, to exercise the supervision tree (its tests).
    Crash,
}

/// What the [`TunnelsActor`] is started with (again after a failure).
#[derive(Clone)]
pub struct TunnelsArgs {
    /// The applied registry (each tunnel pushes its site's configuration from it).
    pub registry: watch::Receiver<Arc<Registry>>,
    /// Where the table is published.
    pub local: Arc<Published<Tunnels>>,
    /// Client access (grants and relay tickets for agents), once the node set it up.
    pub access: Arc<std::sync::OnceLock<Arc<crate::access::AccessShell>>>,
    /// Who is connected, for `site status` (written on connect and disconnect only).
    pub agents: Arc<AgentBook>,
}

/// An agent connected to this node, as `site status` shows it.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// Its site (from its certificate).
    pub site: Name,
    /// Where its tunnel comes from, as this node sees it.
    pub remote: std::net::SocketAddr,
    /// The software it said it runs (informative: a peer can say anything).
    pub software: String,
    /// When it connected, seconds since the Unix epoch.
    pub since: u64,
}

/// The agents connected to this node, and when each site's last one left.
#[derive(Debug, Default)]
pub struct AgentBook(std::sync::Mutex<AgentBookInner>);

#[derive(Debug, Default)]
struct AgentBookInner {
    live: HashMap<TunnelId, AgentInfo>,
    last_seen: HashMap<Name, u64>,
}

impl AgentBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, AgentBookInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connected(&self, id: TunnelId, info: AgentInfo) {
        self.lock().live.insert(id, info);
    }

    fn gone(&self, id: TunnelId) {
        let mut b = self.lock();
        if let Some(a) = b.live.remove(&id) {
            b.last_seen.insert(a.site, crate::proxy::unix_now());
        }
    }

    /// The agents of `site` connected here, and when one last left (if none is here).
    pub fn of(&self, site: &Name) -> (Vec<AgentInfo>, Option<u64>) {
        let b = self.lock();
        let live: Vec<AgentInfo> = b
            .live
            .values()
            .filter(|a| &a.site == site)
            .cloned()
            .collect();
        let last = if live.is_empty() {
            b.last_seen.get(site).copied()
        } else {
            None
        };
        (live, last)
    }
}

/// Owns the [`Tunnels`] table and one `AgentTunnel` child per tunnel.
#[derive(Clone)]
pub struct TunnelsActor;

impl TunnelsActor {
    /// The tree's child `tunnels`: on every start it becomes the actor `current` names.
    pub fn child(args: TunnelsArgs, current: Arc<Current<TunnelsMsg>>) -> ChildSpec {
        ChildSpec::new("tunnels", move |sup| {
            let args = args.clone();
            let current = current.clone();
            async move {
                current.set(None);
                let (actor, _) = Actor::spawn_linked(None, TunnelsActor, args, sup).await?;
                current.set(Some(actor.clone()));
                Ok(actor.get_cell())
            }
        })
    }
}

/// State of the [`TunnelsActor`].
pub struct TunnelsState {
    args: TunnelsArgs,
    core: Tunnels,
    children: HashMap<ActorId, (TunnelId, ActorRef<AgentTunnelMsg>)>,
}

impl TunnelsState {
    /// Closes every tunnel (the agents redial) and forgets it.
    fn close_all(&mut self, why: &str) {
        let ids: Vec<TunnelId> = self.core.iter().map(|(_, t)| t.id()).collect();
        for id in ids {
            if let Some((site, conn)) = self.core.remove(id) {
                self.args.agents.gone(id);
                conn.close(CLOSE_TUNNEL_LOST.into(), why.as_bytes());
                tracing::info!(%site, remote = %conn.remote_address(), tunnel = %id, "agent disconnected: {why}");
            }
        }
        self.children.clear();
    }
}

impl Drop for TunnelsState {
    // Also after a panic, where `post_stop` does not run.
    fn drop(&mut self) {
        self.close_all("the node's tunnel table restarted; dial again");
    }
}

impl Actor for TunnelsActor {
    type Msg = TunnelsMsg;
    type State = TunnelsState;
    type Arguments = TunnelsArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: TunnelsArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // The last incarnation's tunnels were closed with it: start from none.
        args.local.publish(Arc::new(Tunnels::new()));
        Ok(TunnelsState {
            args,
            core: Tunnels::new(),
            children: HashMap::new(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.close_all("the node's tunnel table stopped; dial again");
        state.args.local.publish(Arc::new(Tunnels::new()));
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TunnelsMsg::Connected(h) => {
                let Handover {
                    site,
                    conn,
                    send,
                    recv,
                    agent,
                } = *h;
                let remote = conn.remote_address();
                let id = state.core.add(site.clone(), conn.clone());
                state.args.agents.connected(
                    id,
                    AgentInfo {
                        site: site.clone(),
                        remote,
                        software: agent.software.chars().take(64).collect(),
                        since: crate::proxy::unix_now(),
                    },
                );
                tracing::info!(
                    %site, %remote, tunnel = %id, protocol = agent.version,
                    version = %agent.software, features = ?agent.features, "agent connected"
                );
                let args = AgentTunnelArgs {
                    id,
                    site: site.clone(),
                    conn: conn.clone(),
                    send,
                    recv,
                    agent,
                    registry: state.args.registry.clone(),
                    access: state.args.access.get().cloned(),
                    parent: myself.clone(),
                };
                // Starting a child only spawns its tasks: nothing here waits on the agent.
                match Actor::spawn_linked(None, AgentTunnel, args, myself.get_cell()).await {
                    Ok((child, _)) => {
                        state.children.insert(child.get_id(), (id, child));
                    }
                    Err(e) => {
                        state.core.remove(id);
                        state.args.agents.gone(id);
                        conn.close(
                            CLOSE_TUNNEL_LOST.into(),
                            b"the node could not take the tunnel; dial again",
                        );
                        tracing::warn!(%site, %remote, tunnel = %id, "agent disconnected: could not start its tunnel: {e}");
                        return Ok(());
                    }
                }
                publish(state);
            }
            TunnelsMsg::Health(id, report) => {
                if state.core.handle_health(id, report) {
                    publish(state);
                }
            }
            TunnelsMsg::CrashTunnel(id) => {
                if let Some((_, child)) = state.children.values().find(|(t, _)| *t == id) {
                    let _ = child.cast(AgentTunnelMsg::Crash);
                }
            }
            TunnelsMsg::Crash => panic!("crash requested"),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A child's end is its tunnel's end, never this actor's.
        let (cell, why, failed) = match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                (cell, format!("its tunnel failed on the node: {err}"), true)
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell,
                reason.unwrap_or_else(|| "control stream ended".into()),
                false,
            ),
            _ => return Ok(()),
        };
        let Some((id, _)) = state.children.remove(&cell.get_id()) else {
            return Ok(());
        };
        let Some((site, conn)) = state.core.remove(id) else {
            return Ok(());
        };
        state.args.agents.gone(id);
        if failed {
            conn.close(
                CLOSE_TUNNEL_LOST.into(),
                b"the node lost this tunnel; dial again",
            );
            tracing::warn!(%site, remote = %conn.remote_address(), tunnel = %id, "agent disconnected: {why}");
        } else {
            tracing::info!(%site, remote = %conn.remote_address(), tunnel = %id, "agent disconnected: {why}");
        }
        publish(state);
        Ok(())
    }
}

fn publish(state: &TunnelsState) {
    state.args.local.publish(Arc::new(state.core.clone()));
}

/// One agent's tunnel: owns its control stream (the site's configuration out, health
/// reports in) and tells the [`TunnelsActor`] what the agent reports. It stops when the
/// tunnel ends; its parent learns that from supervision.
struct AgentTunnel;

struct AgentTunnelArgs {
    id: TunnelId,
    site: Name,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    agent: PeerProtocol,
    registry: watch::Receiver<Arc<Registry>>,
    access: Option<Arc<crate::access::AccessShell>>,
    parent: ActorRef<TunnelsMsg>,
}

enum AgentTunnelMsg {
    /// The agent reported.
    Health(Vec<(Target, bool)>),
    /// The control stream or the connection ended, and why.
    Ended(String),
    /// Panic on purpose (tests).
    Crash,
}

struct AgentTunnelState {
    id: TunnelId,
    conn: quinn::Connection,
    parent: ActorRef<TunnelsMsg>,
    control: JoinHandle<()>,
}

impl Drop for AgentTunnelState {
    // A child stopped by its parent's end, or that panicked, gets no `post_stop`: its
    // connection closes here, so the agent redials.
    fn drop(&mut self) {
        self.control.abort();
        self.conn.close(
            CLOSE_TUNNEL_LOST.into(),
            b"the node lost this tunnel; dial again",
        );
    }
}

impl Actor for AgentTunnel {
    type Msg = AgentTunnelMsg;
    type State = AgentTunnelState;
    type Arguments = AgentTunnelArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: AgentTunnelArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let AgentTunnelArgs {
            id,
            site,
            conn,
            send,
            recv,
            agent,
            registry,
            access,
            parent,
        } = args;
        let control = tokio::spawn(control(
            site,
            conn.clone(),
            send,
            recv,
            agent,
            registry,
            access,
            myself,
        ));
        Ok(AgentTunnelState {
            id,
            conn,
            parent,
            control,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.conn.close(0u32.into(), b"bye");
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AgentTunnelMsg::Health(report) => {
                let _ = state.parent.cast(TunnelsMsg::Health(state.id, report));
            }
            AgentTunnelMsg::Ended(why) => myself.stop(Some(why)),
            AgentTunnelMsg::Crash => panic!("crash requested"),
        }
        Ok(())
    }
}

/// The control stream of one tunnel until it, or the connection, ends; then tells the
/// tunnel's actor why.
#[allow(clippy::too_many_arguments)]
async fn control(
    site: Name,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    agent: PeerProtocol,
    registry: watch::Receiver<Arc<Registry>>,
    access: Option<Arc<crate::access::AccessShell>>,
    tunnel: ActorRef<AgentTunnelMsg>,
) {
    let access = access.filter(|_| agent.has(warren_proto::tunnel::FEATURE_ACCESS));
    let why = tokio::select! {
        why = push_config(&site, &conn, send, &agent, registry, access.clone()) => why,
        why = read_reports(&site, recv, &tunnel, access) => why,
        e = conn.closed() => e.to_string(),
    };
    let why = conn.close_reason().map_or(why, |r| r.to_string());
    let _ = tunnel.cast(AgentTunnelMsg::Ended(why));
}

/// Sends the node's hello, then the site's configuration whenever the registry changes it.
async fn push_config(
    site: &Name,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    agent: &PeerProtocol,
    mut registry: watch::Receiver<Arc<Registry>>,
    access: Option<Arc<crate::access::AccessShell>>,
) -> String {
    let hello = ToAgent::Hello(Hello::ours());
    if agent.accepts(&hello) {
        if let Err(e) = write_message(&mut send, &hello).await {
            return format!("sending the hello: {e}");
        }
    }
    let mut last = None;
    let mut grants = crate::access::AgentPush::default();
    let mut tick = tokio::time::interval(crate::access::HEARTBEAT);
    loop {
        let reg = registry.borrow_and_update().clone();
        let Some(config) = site_config(&reg, site) else {
            conn.close(2u32.into(), b"the site was deleted");
            return "the site was deleted".into();
        };
        if last.as_ref() != Some(&config) {
            let msg = ToAgent::Config(config.clone());
            if agent.accepts(&msg) {
                if let Err(e) = write_message(&mut send, &msg).await {
                    return format!("sending the configuration: {e}");
                }
            }
            last = Some(config);
        }
        if let Some(access) = &access {
            if let Some(msg) = grants.next(access, &reg, site) {
                if let Err(e) = write_message(&mut send, &msg).await {
                    return format!("sending access: {e}");
                }
            }
        }
        tokio::select! {
            r = registry.changed() => if r.is_err() {
                return "the node is shutting down".into();
            },
            _ = tick.tick() => {}
        }
    }
}

/// Reads the agent's messages, passing health reports to the tunnel's actor.
async fn read_reports(
    site: &Name,
    mut recv: quinn::RecvStream,
    tunnel: &ActorRef<AgentTunnelMsg>,
    access: Option<Arc<crate::access::AccessShell>>,
) -> String {
    let mut unknowns = Unknowns::default();
    loop {
        match read_message::<_, FromAgent>(&mut recv, MAX_CONTROL).await {
            Ok(Some(FromAgent::Health(report))) => {
                if tunnel.cast(AgentTunnelMsg::Health(report)).is_err() {
                    return "the tunnel's actor stopped".into();
                }
            }
            Ok(Some(FromAgent::Hello(_))) => {
                tracing::debug!(%site, "ignoring a second hello from an agent");
            }
            Ok(Some(FromAgent::WireGuard(wg))) => {
                if let Some(access) = &access {
                    access.agent_key(site, wg.public_key);
                }
            }
            Ok(Some(FromAgent::Unknown { tag })) => {
                if unknowns.note() {
                    tracing::info!(%site, tag, "skipping a message this node does not know (a newer agent); later ones are logged at debug");
                } else {
                    tracing::debug!(%site, tag, skipped = unknowns.count(), "skipping an unknown message");
                }
            }
            Ok(None) => return "control stream ended".into(),
            Err(e) => {
                tracing::warn!(%site, "agent control stream: {e}");
                return format!("agent control stream: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use warren_consensus::registry::{AnyEntity, Command};
    use warren_consensus::types::{Actor as Who, Request, RequestId};
    use warren_proto::registry::Site;
    use warren_proto::tunnel::PeerProtocol;

    use super::*;

    /// How long the tests wait for something the actors do at once.
    const WAIT: Duration = Duration::from_secs(10);

    /// QUIC on 127.0.0.1 for the actors' tests: a server endpoint (the node) and a client
    /// endpoint (agents) that trusts it.
    struct TestNet {
        server: quinn::Endpoint,
        client: quinn::Endpoint,
    }

    impl TestNet {
        fn new() -> Self {
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
            let cert = rustls::pki_types::CertificateDer::from(ck.cert.der().to_vec());
            let key =
                rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
            let server_config =
                quinn::ServerConfig::with_single_cert(vec![cert.clone()], key).unwrap();
            let server =
                quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert).unwrap();
            let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            client.set_default_client_config(
                quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap(),
            );
            Self { server, client }
        }

        /// A new connection: (the agent's end, the node's end).
        async fn pair(&self) -> (quinn::Connection, quinn::Connection) {
            let addr = self.server.local_addr().unwrap();
            tokio::join!(
                async {
                    self.client
                        .connect(addr, "localhost")
                        .unwrap()
                        .await
                        .unwrap()
                },
                async { self.server.accept().await.unwrap().await.unwrap() },
            )
        }
    }

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn registry_with_site(site: &str) -> Registry {
        let mut reg = Registry::default();
        let req = Request {
            id: RequestId(1),
            at: 1_700_000_000,
            actor: Who::System,
            command: Command::Create(AnyEntity::Site(Site {
                name: name(site),
                description: String::new(),
                revision: 0,
            })),
        };
        reg.apply_request(1, &req).unwrap();
        reg
    }

    /// An agent: its connection and its end of the control stream.
    struct Agent {
        conn: quinn::Connection,
        send: quinn::SendStream,
        _recv: quinn::RecvStream,
    }

    /// Connects an agent of `site` and hands its tunnel to `tunnels`, as `AgentService`
    /// does after its checks.
    async fn connect(net: &TestNet, tunnels: &ActorRef<TunnelsMsg>, site: &str) -> Agent {
        let (agent, node) = net.pair().await;
        let (mut send, recv) = agent.open_bi().await.unwrap();
        // A stream shows up at the node once something is written on it.
        write_message(&mut send, &FromAgent::Health(Vec::new()))
            .await
            .unwrap();
        let (node_send, mut node_recv) = node.accept_bi().await.unwrap();
        let first: FromAgent = read_message(&mut node_recv, MAX_CONTROL)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first, FromAgent::Health(Vec::new()));
        tunnels
            .cast(TunnelsMsg::Connected(Box::new(Handover {
                site: name(site),
                conn: node,
                send: node_send,
                recv: node_recv,
                agent: PeerProtocol::legacy("test".into()),
            })))
            .unwrap();
        Agent {
            conn: agent,
            send,
            _recv: recv,
        }
    }

    /// Waits until the published table satisfies `ok`.
    async fn until(local: &Published<Tunnels>, ok: impl Fn(&Tunnels) -> bool) -> Arc<Tunnels> {
        let mut rx = local.subscribe();
        tokio::time::timeout(WAIT, async {
            loop {
                let t = local.load_full();
                if ok(&t) {
                    return t;
                }
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("the table got there")
    }

    /// The close code an agent saw.
    async fn closed_with(agent: &Agent) -> u64 {
        match tokio::time::timeout(WAIT, agent.conn.closed())
            .await
            .unwrap()
        {
            quinn::ConnectionError::ApplicationClosed(c) => c.error_code.into_inner(),
            other => panic!("closed otherwise: {other}"),
        }
    }

    fn start_args() -> (watch::Sender<Arc<Registry>>, TunnelsArgs) {
        let (tx, rx) = watch::channel(Arc::new(registry_with_site("hq")));
        let args = TunnelsArgs {
            registry: rx,
            local: Published::new(Tunnels::new()),
            access: Arc::new(std::sync::OnceLock::new()),
            agents: Arc::default(),
        };
        (tx, args)
    }

    #[tokio::test]
    async fn a_tunnel_that_ends_takes_its_health_with_it() {
        let net = TestNet::new();
        let (_tx, args) = start_args();
        let local = args.local.clone();
        let (tunnels, _) = Actor::spawn(None, TunnelsActor, args).await.unwrap();
        let hq = name("hq");
        let web: Target = "10.0.0.1:80".parse().unwrap();

        let mut a = connect(&net, &tunnels, "hq").await;
        let b = connect(&net, &tunnels, "hq").await;
        until(&local, |t| t.tunnels(&hq).len() == 2).await;

        // Agent a says web is down; b says nothing of it: down.
        write_message(&mut a.send, &FromAgent::Health(vec![(web.clone(), false)]))
            .await
            .unwrap();
        until(&local, |t| !t.target_ok(&hq, &web)).await;

        // a's agent goes away: its report goes with its tunnel, b's tunnel stays.
        a.conn.close(0u32.into(), b"agent stopping");
        let t = until(&local, |t| t.tunnels(&hq).len() == 1).await;
        assert!(t.target_ok(&hq, &web));
        assert_eq!(t.held(), vec![hq.clone()]);

        // The last one ends: the site leaves the table.
        b.conn.close(0u32.into(), b"agent stopping");
        until(&local, |t| t.is_empty() && t.held().is_empty()).await;
        tunnels.stop(None);
    }

    #[tokio::test]
    async fn a_failed_tunnel_ends_alone_and_a_restart_closes_every_tunnel() {
        let net = TestNet::new();
        let (_tx, args) = start_args();
        let local = args.local.clone();
        let (tunnels, done) = Actor::spawn(None, TunnelsActor, args.clone())
            .await
            .unwrap();
        let hq = name("hq");

        let a = connect(&net, &tunnels, "hq").await;
        let b = connect(&net, &tunnels, "hq").await;
        let t = until(&local, |t| t.tunnels(&hq).len() == 2).await;
        // Newest first: b's tunnel, then a's.
        let (id_b, id_a) = (t.tunnels(&hq)[0].id(), t.tunnels(&hq)[1].id());

        // a's child panics: a's connection is closed for it to redial, the table keeps b,
        // and the parent lives on.
        tunnels.cast(TunnelsMsg::CrashTunnel(id_a)).unwrap();
        assert_eq!(closed_with(&a).await, u64::from(CLOSE_TUNNEL_LOST));
        let t = until(&local, |t| t.len() == 1).await;
        assert_eq!(t.tunnels(&hq)[0].id(), id_b);
        assert!(b.conn.close_reason().is_none());

        // The parent panics: its children go with it and b is told to redial.
        tunnels.cast(TunnelsMsg::Crash).unwrap();
        assert!(tokio::time::timeout(WAIT, done).await.is_ok());
        assert_eq!(closed_with(&b).await, u64::from(CLOSE_TUNNEL_LOST));

        // The next incarnation starts from an empty table.
        let (again, _) = Actor::spawn(None, TunnelsActor, args).await.unwrap();
        until(&local, |t| t.is_empty()).await;
        let _c = connect(&net, &again, "hq").await;
        until(&local, |t| t.len() == 1).await;
        again.stop(None);
    }

    #[tokio::test]
    async fn a_deleted_site_closes_its_tunnel() {
        let net = TestNet::new();
        let (tx, args) = start_args();
        let local = args.local.clone();
        let (tunnels, _) = Actor::spawn(None, TunnelsActor, args).await.unwrap();
        let a = connect(&net, &tunnels, "hq").await;
        until(&local, |t| t.len() == 1).await;
        tx.send_replace(Arc::new(Registry::default()));
        assert_eq!(closed_with(&a).await, 2);
        until(&local, |t| t.is_empty()).await;
        tunnels.stop(None);
    }
}
