//! Public TCP and UDP ports: a TCP or UDP resource listens on its port on every node, checks
//! each new connection (or, for UDP, each new client address) against the resource's
//! policies (source address; deny by default), and forwards it to a target, directly or
//! through the site's tunnel. Open flows are checked again whenever the registry changes,
//! and cut when no longer allowed. A UDP flow ends after [`UDP_IDLE`] without traffic.
//!
//! TCP connections and UDP flows of all ports together are bounded (`--l4-max-connections`):
//! past the limit a new TCP connection is closed at once and a new UDP client's datagrams
//! are dropped, counted and logged at most every 10 s per port, until flows end.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use warren_consensus::registry::Registry;
use warren_proto::access::{decide, CompiledPolicy, Decision, Facts};
use warren_proto::registry::{Resource, Route};
use warren_proto::tunnel::io::{write_datagram, DatagramReader};
use warren_proto::tunnel::{Protocol, MAX_DATAGRAM};
use warren_proto::Name;

use crate::actors::ChildSpec;
use crate::conn::{ConnGate, ConnStats, RefusalLog};
use crate::proxy::{unix_now, Proxy};
use crate::shell::Timer;

/// A UDP flow ends after this long without a datagram either way.
pub const UDP_IDLE: Duration = Duration::from_secs(60);

/// The transport of a resource port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// A resource port: transport and number.
pub type PortKey = (Proto, u16);

/// What became of the flows of the TCP and UDP resource ports (a UDP flow is a client
/// address), for `/metrics`.
#[derive(Debug, Default)]
pub struct FlowCounters {
    /// By transport (TCP, UDP) and [`FLOW_RESULTS`].
    counts: [[std::sync::atomic::AtomicU64; FLOW_RESULTS.len()]; 2],
    /// Flows open now, by transport.
    open: [std::sync::atomic::AtomicI64; 2],
}

/// What became of a flow; its label is [`FLOW_RESULTS`] at its index.
#[derive(Debug, Clone, Copy)]
enum FlowResult {
    /// Admitted by a policy, and a target answered.
    Allowed,
    /// Refused at the start.
    Denied,
    /// Ended because access was withdrawn while it was open.
    Cut,
    /// Allowed, but no target answered.
    NoTarget,
    /// Refused by `--l4-max-connections` (or the per-port UDP flow bound).
    OverLimit,
}

/// The labels of [`FlowResult`], in its order.
pub const FLOW_RESULTS: [&str; 5] = ["allowed", "denied", "cut", "no_target", "over_limit"];

impl FlowCounters {
    fn count(&self, proto: Proto, result: FlowResult) {
        self.counts[proto as usize][result as usize]
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn opened(&self, proto: Proto) {
        self.count(proto, FlowResult::Allowed);
        self.open[proto as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn closed(&self, proto: Proto) {
        self.open[proto as usize].fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        use std::sync::atomic::Ordering::Relaxed;
        out.push_str("# HELP warren_l4_flows_total Flows of TCP and UDP resource ports on this node (a UDP flow is a client address), by result.\n# TYPE warren_l4_flows_total counter\n");
        for (p, name) in [(Proto::Tcp, "tcp"), (Proto::Udp, "udp")] {
            for (i, result) in FLOW_RESULTS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "warren_l4_flows_total{{proto=\"{name}\",result=\"{result}\"}} {}",
                    self.counts[p as usize][i].load(Relaxed)
                );
            }
        }
        out.push_str("# HELP warren_l4_flows_open TCP connections and UDP flows of resource ports open now.\n# TYPE warren_l4_flows_open gauge\n");
        for (p, name) in [(Proto::Tcp, "tcp"), (Proto::Udp, "udp")] {
            let _ = writeln!(
                out,
                "warren_l4_flows_open{{proto=\"{name}\"}} {}",
                self.open[p as usize].load(Relaxed).max(0)
            );
        }
    }
}

/// How long after a failed bind the port is tried again.
pub const REBIND_AFTER: Duration = Duration::from_secs(5);

/// What the [`L4Core`] asks its shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4Action {
    /// Bind the port and serve it for the resource; report with
    /// [`L4Core::handle_bound`].
    Listen(PortKey, Name),
    /// Stop serving the port (the resource is gone, or the port now belongs to another).
    Close(PortKey, Name),
}

/// Which resource ports this node listens on, as a state machine without I/O.
///
/// Calling order: [`handle_registry`](Self::handle_registry) for each registry applied,
/// [`handle_bound`](Self::handle_bound) with the result of every `Listen`,
/// [`handle_ended`](Self::handle_ended) when a port's task ends on its own,
/// [`handle_timeout`](Self::handle_timeout) when [`poll_timeout`](Self::poll_timeout)
/// passes; after each call drain [`poll_action`](Self::poll_action).
#[derive(Debug, Default)]
pub struct L4Core {
    wanted: HashMap<PortKey, Name>,
    /// Ports being bound or served, and for whom.
    open: HashMap<PortKey, Name>,
    /// Ports whose bind failed, and when to try again.
    failed: HashMap<PortKey, Instant>,
    actions: VecDeque<L4Action>,
}

impl L4Core {
    /// A core that listens on nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The registry changed: listen on exactly the ports of its TCP and UDP resources.
    pub fn handle_registry(&mut self, reg: &Registry, now: Instant) {
        self.wanted = reg
            .resources()
            .values()
            .filter_map(|r| match r.route {
                Route::Tcp { port } => Some(((Proto::Tcp, port), r.name.clone())),
                Route::Udp { port } => Some(((Proto::Udp, port), r.name.clone())),
                // Private resources are reached through WireGuard, never a public port.
                Route::Http { .. } | Route::Private { .. } => None,
            })
            .collect();
        self.failed.retain(|key, _| self.wanted.contains_key(key));
        self.reconcile(now);
    }

    /// The outcome of a `Listen`.
    pub fn handle_bound(&mut self, key: PortKey, ok: bool, now: Instant) {
        if !ok {
            self.open.remove(&key);
            self.failed.insert(key, now + REBIND_AFTER);
        }
    }

    /// A port's task ended by itself (it should not): serve it again at once.
    pub fn handle_ended(&mut self, key: PortKey, now: Instant) {
        self.open.remove(&key);
        self.reconcile(now);
    }

    /// Time passed: retry failed binds that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.reconcile(now);
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<L4Action> {
        self.actions.pop_front()
    }

    /// When a failed bind is to be tried again.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.failed.values().min().copied()
    }

    fn reconcile(&mut self, now: Instant) {
        let mut stale: Vec<(PortKey, Name)> = self
            .open
            .iter()
            .filter(|(key, name)| self.wanted.get(key) != Some(name))
            .map(|(k, n)| (*k, n.clone()))
            .collect();
        stale.sort();
        for (key, name) in stale {
            self.open.remove(&key);
            self.actions.push_back(L4Action::Close(key, name));
        }
        let mut new: Vec<(PortKey, Name)> = self
            .wanted
            .iter()
            .filter(|(key, _)| !self.open.contains_key(key))
            .filter(|(key, _)| self.failed.get(key).is_none_or(|at| *at <= now))
            .map(|(k, n)| (*k, n.clone()))
            .collect();
        new.sort();
        for (key, name) in new {
            self.failed.remove(&key);
            self.open.insert(key, name.clone());
            self.actions.push_back(L4Action::Listen(key, name));
        }
    }
}

/// The connection bound of the TCP and UDP resource ports, shared by every flow; created
/// before the supervision tree so that flows keep their places across restarts.
pub struct L4 {
    /// TCP connections and UDP flows open at once, over every port.
    gate: ConnGate,
    connections: Arc<ConnStats>,
    ip: IpAddr,
}

impl L4 {
    /// Ports on `ip`, with at most `max_connections` TCP connections and UDP flows open
    /// at once.
    pub fn new(ip: IpAddr, max_connections: usize) -> Arc<Self> {
        let connections = Arc::new(ConnStats::default());
        Arc::new(Self {
            gate: ConnGate::new(max_connections, connections.clone()),
            connections,
            ip,
        })
    }

    /// Counters of the TCP connections and UDP flows open and refused.
    pub fn connections(&self) -> &ConnStats {
        &self.connections
    }

    /// The tree's child `l4` that listens on the resource ports.
    pub fn child(self: &Arc<Self>, proxy: Arc<Proxy>) -> ChildSpec {
        let l4 = self.clone();
        ChildSpec::actor("l4", L4Actor, move || (l4.clone(), proxy.clone()))
    }
}

/// Messages of the [`L4Actor`].
pub enum L4Msg {
    /// The cluster applied a new registry.
    Changed,
    /// The core's timer passed.
    Timeout,
    /// Look for port tasks that ended (a panic fails the actor).
    Reap,
    /// Panic on purpose (supervision tests).
    Crash,
}

/// Owns the resource ports: an [`L4Core`] and the task serving each port. Flows (one task
/// per TCP connection or UDP client) are not its children: a restart of the actor rebinds
/// the ports and leaves open flows alone.
#[derive(Clone)]
pub struct L4Actor;

/// State of the [`L4Actor`].
pub struct L4State {
    l4: Arc<L4>,
    proxy: Arc<Proxy>,
    core: L4Core,
    tasks: JoinSet<PortKey>,
    ports: HashMap<PortKey, AbortHandle>,
    follower: JoinHandle<()>,
    reaper: JoinHandle<()>,
    timer: Timer<L4Msg, Instant>,
}

impl Actor for L4Actor {
    type Msg = L4Msg;
    type State = L4State;
    type Arguments = (Arc<L4>, Arc<Proxy>);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (l4, proxy): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let follower = crate::shell::follow(
            vec![Box::new(proxy.cluster().subscribe())],
            myself.clone(),
            || L4Msg::Changed,
        );
        let reaper = myself.send_interval(Duration::from_secs(1), || L4Msg::Reap);
        Ok(L4State {
            l4,
            proxy,
            core: L4Core::new(),
            tasks: JoinSet::new(),
            ports: HashMap::new(),
            follower,
            reaper,
            timer: Timer::new(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.follower.abort();
        state.reaper.abort();
        state.timer.cancel();
        state.tasks.abort_all();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        match msg {
            L4Msg::Changed => {
                let reg = state.proxy.cluster().registry();
                state.core.handle_registry(&reg, now);
            }
            L4Msg::Timeout => {
                state.timer.fired();
                state.core.handle_timeout(now);
            }
            L4Msg::Reap => {
                while let Some(ended) = state.tasks.try_join_next() {
                    match ended {
                        Ok(key) => {
                            tracing::warn!(port = key.1, proto = ?key.0, "a resource port stopped serving; listening again");
                            state.ports.remove(&key);
                            state.core.handle_ended(key, now);
                        }
                        Err(e) if e.is_panic() => {
                            return Err(format!("a resource port's task panicked: {e}").into())
                        }
                        Err(_) => {}
                    }
                }
            }
            L4Msg::Crash => panic!("crash requested"),
        }
        while let Some(action) = state.core.poll_action() {
            perform(state, action, now);
        }
        let wanted = state.core.poll_timeout();
        state.timer.set(
            &myself,
            wanted.map(|at| (at, at.saturating_duration_since(now))),
            || L4Msg::Timeout,
        );
        Ok(())
    }
}

fn perform(state: &mut L4State, action: L4Action, now: Instant) {
    match action {
        L4Action::Close(key, name) => {
            if let Some(h) = state.ports.remove(&key) {
                h.abort();
            }
            tracing::info!(port = key.1, proto = ?key.0, resource = %name, "resource port closed");
        }
        L4Action::Listen(key, name) => {
            let addr = SocketAddr::new(state.l4.ip, key.1);
            let (proxy, gate) = (state.proxy.clone(), state.l4.gate.clone());
            let served = match key.0 {
                Proto::Tcp => std::net::TcpListener::bind(addr)
                    .and_then(|l| {
                        l.set_nonblocking(true)?;
                        TcpListener::from_std(l)
                    })
                    .map(|l| {
                        let name = name.clone();
                        state.tasks.spawn(async move {
                            accept(l, name, proxy, gate).await;
                            key
                        })
                    }),
                Proto::Udp => std::net::UdpSocket::bind(addr)
                    .and_then(|s| {
                        s.set_nonblocking(true)?;
                        tokio::net::UdpSocket::from_std(s)
                    })
                    .map(|s| {
                        let name = name.clone();
                        state.tasks.spawn(async move {
                            udp_serve(s, name, proxy, gate).await;
                            key
                        })
                    }),
            };
            match served {
                Ok(handle) => {
                    tracing::info!(%addr, proto = ?key.0, resource = %name, "resource listening");
                    state.ports.insert(key, handle);
                    state.core.handle_bound(key, true, now);
                }
                Err(e) => {
                    tracing::warn!(%addr, proto = ?key.0, resource = %name, "cannot listen for a resource (trying again in {} s): {e}", REBIND_AFTER.as_secs());
                    state.core.handle_bound(key, false, now);
                }
            }
        }
    }
}

/// Names the limit in the log line when it is reached.
const L4_LIMIT_SETTING: &str = "--l4-max-connections";

async fn accept(listener: TcpListener, name: Name, proxy: Arc<Proxy>, gate: ConnGate) {
    let port = listener.local_addr().map_or(0, |a| a.port());
    let span = tracing::info_span!("l4", port, resource = %name);
    let mut refusals = RefusalLog::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                span.in_scope(|| tracing::warn!("TCP resource accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(admitted) = gate.admit() else {
            proxy.l4_flows.count(Proto::Tcp, FlowResult::OverLimit);
            span.in_scope(|| refusals.refused("TCP resource", gate.limit(), L4_LIMIT_SETTING));
            // Closed at once, as the HTTPS listeners do: a queued client would hold its
            // socket and learn nothing. (After the log line, so that whoever sees the close
            // finds the reason logged.)
            drop(stream);
            continue;
        };
        // The connection keeps its place until it ends.
        tokio::spawn(flow(stream, peer, name.clone(), proxy.clone()).map(move |()| drop(admitted)));
    }
}

/// Whether `peer` may use `res` now, and why.
fn allowed(proxy: &Proxy, reg: &Registry, name: &Name, peer: IpAddr) -> (bool, String) {
    if let Some(why) = proxy.fail_closed() {
        return (false, format!("fail closed: {why}"));
    }
    let Some(res) = reg.resources().get(name) else {
        return (false, "resource deleted".into());
    };
    let mut compiled = Vec::new();
    for p in &res.policies {
        match reg.policies().get(p).map(CompiledPolicy::compile) {
            Some(Ok(c)) => compiled.push(c),
            _ => return (false, format!("policy {p} is missing or broken")),
        }
    }
    let facts = Facts {
        identity: None,
        source: peer,
        method: None,
        path: None,
        device: None,
        now: unix_now() as i64,
    };
    let d = decide(&compiled, &facts);
    (matches!(d, Decision::Allow { .. }), d.reason())
}

async fn connect(proxy: &Proxy, res: &Resource) -> Result<Box<dyn Stream>, String> {
    let start: usize = rand::random();
    let n = res.targets.len();
    let mut last = String::from("no target");
    for i in 0..n {
        let t = &res.targets[(start + i) % n];
        match &res.site {
            Some(site) => {
                if !proxy.sites().target_ok(site, t) {
                    continue;
                }
                match proxy.sites().open(site, t, Protocol::Tcp).await {
                    Ok(s) => return Ok(Box::new(s)),
                    Err(e) => last = e.to_string(),
                }
            }
            None => {
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    TcpStream::connect((t.host.as_str(), t.port)),
                )
                .await
                {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        return Ok(Box::new(s));
                    }
                    Ok(Err(e)) => last = format!("{t}: {e}"),
                    Err(_) => last = format!("{t}: no answer"),
                }
            }
        }
    }
    Err(last)
}

/// Runs `f` when dropped (a flow's end, however the task ends).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// A byte stream both ways.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

async fn flow(mut client: TcpStream, peer: SocketAddr, name: Name, proxy: Arc<Proxy>) {
    let _ = client.set_nodelay(true);
    let mut rx = proxy.cluster().subscribe();
    let reg = rx.borrow_and_update().clone();
    let (ok, why) = allowed(&proxy, &reg, &name, peer.ip());
    tracing::info!(target: "warren::access", resource = %name, client = %peer, decision = if ok { "allow" } else { "deny" }, reason = %why, "TCP connection");
    let counters = &proxy.l4_flows;
    if !ok {
        counters.count(Proto::Tcp, FlowResult::Denied);
        return;
    }
    let Some(res) = reg.resources().get(&name).cloned() else {
        return;
    };
    let mut upstream = match connect(&proxy, &res).await {
        Ok(s) => s,
        Err(e) => {
            counters.count(Proto::Tcp, FlowResult::NoTarget);
            tracing::warn!(resource = %name, "TCP resource: no target reachable: {e}");
            return;
        }
    };
    counters.opened(Proto::Tcp);
    let _open = scopeguard(|| counters.closed(Proto::Tcp));
    let mut recheck = tokio::time::interval(Duration::from_secs(1));
    let copy = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        crate::sites::COPY_BUF,
        crate::sites::COPY_BUF,
    );
    tokio::pin!(copy);
    loop {
        tokio::select! {
            _ = &mut copy => return,
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = recheck.tick() => {}
        }
        let reg = rx.borrow_and_update().clone();
        let (ok, why) = allowed(&proxy, &reg, &name, peer.ip());
        if !ok {
            counters.count(Proto::Tcp, FlowResult::Cut);
            tracing::info!(target: "warren::access", resource = %name, client = %peer, decision = "deny", reason = %why, "TCP connection cut: no longer allowed");
            return;
        }
    }
}

/// Serves a UDP resource's port: one flow per client address, each with its own path to a
/// target (a tunnel stream or a connected socket).
async fn udp_serve(sock: tokio::net::UdpSocket, name: Name, proxy: Arc<Proxy>, gate: ConnGate) {
    use tokio::sync::mpsc;
    let port = sock.local_addr().map_or(0, |a| a.port());
    let span = tracing::info_span!("l4", port, resource = %name);
    let mut refusals = RefusalLog::default();
    let sock = Arc::new(sock);
    let mut flows: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<SocketAddr>();
    let mut buf = vec![0u8; 65_535];
    loop {
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let Ok((n, peer)) = r else { continue };
                if let Some(tx) = flows.get(&peer) {
                    // A full queue drops the datagram, as a congested network would.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(buf[..n].to_vec()) {
                        flows.remove(&peer);
                    }
                    continue;
                }
                let reg = proxy.cluster().registry();
                let (ok, why) = allowed(&proxy, &reg, &name, peer.ip());
                tracing::info!(target: "warren::access", resource = %name, client = %peer, decision = if ok { "allow" } else { "deny" }, reason = %why, "UDP flow");
                if !ok {
                    proxy.l4_flows.count(Proto::Udp, FlowResult::Denied);
                    continue;
                }
                if flows.len() >= 10_000 {
                    proxy.l4_flows.count(Proto::Udp, FlowResult::OverLimit);
                    continue;
                }
                let Some(admitted) = gate.admit() else {
                    proxy.l4_flows.count(Proto::Udp, FlowResult::OverLimit);
                    span.in_scope(|| refusals.refused("UDP resource", gate.limit(), L4_LIMIT_SETTING));
                    continue;
                };
                let (tx, rx) = mpsc::channel(256);
                let _ = tx.try_send(buf[..n].to_vec());
                flows.insert(peer, tx);
                let flow = udp_flow(sock.clone(), peer, rx, name.clone(), proxy.clone(), done_tx.clone());
                // The flow keeps its place until it ends.
                tokio::spawn(flow.map(move |()| drop(admitted)));
            }
            Some(peer) = done_rx.recv() => {
                flows.remove(&peer);
            }
        }
    }
}

/// Where a UDP flow's datagrams go: a data stream through the site's tunnel (its two
/// halves, datagrams framed on it) or a connected socket to the target.
enum UdpUpstream<R, W> {
    Tunnel {
        recv: R,
        send: W,
        reader: DatagramReader,
    },
    Socket {
        socket: tokio::net::UdpSocket,
        buf: Vec<u8>,
    },
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> UdpUpstream<R, W> {
    /// The next datagram from the target; `None` once the upstream is gone. Cancel safe (a
    /// `select!` branch that loses drops no datagram and no part of one).
    async fn recv(&mut self) -> Option<&[u8]> {
        match self {
            Self::Tunnel { recv, reader, .. } => match reader.read_next(recv).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!("UDP flow: the tunnel stream failed: {e}");
                    None
                }
            },
            Self::Socket { socket, buf } => {
                let n = socket.recv(buf).await.ok()?;
                Some(&buf[..n])
            }
        }
    }

    /// Sends a client's datagram towards the target; false once the upstream is gone.
    async fn send(&mut self, d: &[u8]) -> bool {
        match self {
            Self::Tunnel { send, .. } => write_datagram(send, d).await.is_ok(),
            Self::Socket { socket, .. } => socket.send(d).await.is_ok(),
        }
    }
}

/// The upstream of a UDP flow through a site: a [`crate::sites::SiteStream`]'s halves.
type SiteUpstream = UdpUpstream<
    crate::sites::stats::Counted<quinn::RecvStream>,
    crate::sites::stats::Counted<quinn::SendStream>,
>;

async fn udp_upstream(proxy: &Proxy, res: &Resource) -> Option<SiteUpstream> {
    let start: usize = rand::random();
    let n = res.targets.len();
    for i in 0..n {
        let t = &res.targets[(start + i) % n];
        match &res.site {
            Some(site) => {
                if let Ok(s) = proxy.sites().open(site, t, Protocol::Udp).await {
                    let (recv, send) = s.into_inner();
                    return Some(UdpUpstream::Tunnel {
                        recv,
                        send,
                        reader: DatagramReader::new(),
                    });
                }
            }
            None => {
                let socket = async {
                    let addr = tokio::net::lookup_host((t.host.as_str(), t.port))
                        .await
                        .ok()?
                        .next()?;
                    let bind = if addr.is_ipv4() {
                        "0.0.0.0:0"
                    } else {
                        "[::]:0"
                    };
                    let s = tokio::net::UdpSocket::bind(bind).await.ok()?;
                    s.connect(addr).await.ok()?;
                    Some(s)
                }
                .await;
                if let Some(socket) = socket {
                    return Some(UdpUpstream::Socket {
                        socket,
                        buf: vec![0; MAX_DATAGRAM],
                    });
                }
            }
        }
    }
    None
}

async fn udp_flow(
    sock: Arc<tokio::net::UdpSocket>,
    peer: SocketAddr,
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    name: Name,
    proxy: Arc<Proxy>,
    done: tokio::sync::mpsc::UnboundedSender<SocketAddr>,
) {
    let res = proxy.cluster().registry().resources().get(&name).cloned();
    let upstream = match &res {
        Some(res) => udp_upstream(&proxy, res).await,
        None => None,
    };
    let counters = &proxy.l4_flows;
    let Some(upstream) = upstream else {
        counters.count(Proto::Udp, FlowResult::NoTarget);
        tracing::warn!(resource = %name, "UDP resource: no target reachable");
        let _ = done.send(peer);
        return;
    };
    counters.opened(Proto::Udp);
    let _open = scopeguard(|| counters.closed(Proto::Udp));
    let end = udp_loop(
        upstream,
        rx,
        ClientAddr { sock, peer },
        proxy.cluster().subscribe(),
        UDP_RECHECK,
        || allowed(&proxy, &proxy.cluster().registry(), &name, peer.ip()).0,
    )
    .await;
    if end == FlowEnd::Denied {
        counters.count(Proto::Udp, FlowResult::Cut);
        tracing::info!(target: "warren::access", resource = %name, client = %peer, decision = "deny", "UDP flow cut: no longer allowed");
    } else {
        tracing::debug!(resource = %name, client = %peer, "UDP flow ended: {end:?}");
    }
    let _ = done.send(peer);
}

/// Where a UDP flow's replies go.
trait ToClient {
    /// Sends one datagram to the client (a lost one is lost, as on any network).
    fn deliver(&mut self, d: &[u8]) -> impl std::future::Future<Output = ()> + Send;
}

/// A client's address on the resource's port.
struct ClientAddr {
    sock: Arc<tokio::net::UdpSocket>,
    peer: SocketAddr,
}

impl ToClient for ClientAddr {
    async fn deliver(&mut self, d: &[u8]) {
        let _ = self.sock.send_to(d, self.peer).await;
    }
}

/// How often an open UDP flow's client is checked against the policies again (besides on
/// every registry change).
const UDP_RECHECK: Duration = Duration::from_secs(1);

/// Why a UDP flow's loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowEnd {
    /// The client's queue closed (the port's listener went away).
    ClientGone,
    /// The tunnel stream or the target socket failed or ended.
    UpstreamGone,
    /// [`UDP_IDLE`] passed without a datagram either way.
    Idle,
    /// The client is no longer allowed.
    Denied,
}

/// Moves a UDP flow's datagrams both ways until one side goes, it idles, or
/// `still_allowed` (asked on every change seen on `changes` and every `recheck`) says no.
/// Every branch of its `select!` is cancel safe, so none of them losing a race to another
/// (the recheck tick included) loses or splits a datagram.
async fn udp_loop<R, W, T>(
    mut upstream: UdpUpstream<R, W>,
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    mut to_client: impl ToClient,
    mut changes: tokio::sync::watch::Receiver<T>,
    recheck: Duration,
    still_allowed: impl Fn() -> bool,
) -> FlowEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut recheck = tokio::time::interval(recheck);
    let idle = tokio::time::sleep(UDP_IDLE);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            d = rx.recv() => {
                let Some(d) = d else { return FlowEnd::ClientGone };
                if !upstream.send(&d).await {
                    return FlowEnd::UpstreamGone;
                }
                idle.as_mut().reset(tokio::time::Instant::now() + UDP_IDLE);
            }
            d = upstream.recv() => {
                let Some(d) = d else { return FlowEnd::UpstreamGone };
                to_client.deliver(d).await;
                idle.as_mut().reset(tokio::time::Instant::now() + UDP_IDLE);
            }
            () = &mut idle => return FlowEnd::Idle,
            changed = changes.changed() => {
                if changed.is_err() {
                    return FlowEnd::ClientGone;
                }
                if !still_allowed() {
                    return FlowEnd::Denied;
                }
            }
            _ = recheck.tick() => {
                if !still_allowed() {
                    return FlowEnd::Denied;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::io::{AsyncWriteExt as _, DuplexStream, ReadHalf, WriteHalf};
    use warren_proto::tunnel::io::{write_datagram, DatagramReader};

    use super::*;

    /// Datagram `i` of a direction: its number, then a length that varies.
    fn datagram(dir: u8, i: u32) -> Vec<u8> {
        let mut d = vec![dir];
        d.extend_from_slice(&i.to_be_bytes());
        d.extend((0..(i * 7919) % 1400).map(|b| (b as u8) ^ dir));
        d
    }

    type Upstream = UdpUpstream<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>;

    impl ToClient for tokio::sync::mpsc::UnboundedSender<Vec<u8>> {
        async fn deliver(&mut self, d: &[u8]) {
            let _ = self.send(d.to_vec());
        }
    }

    /// A client that is never answered.
    struct Nobody;

    impl ToClient for Nobody {
        async fn deliver(&mut self, _: &[u8]) {}
    }

    /// Heavy traffic both ways through a tunnel stream (a small pipe, so datagrams arrive
    /// in pieces) while the policy recheck ticks every millisecond: every datagram arrives
    /// whole and in order, each way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_udp_flow_keeps_every_datagram_while_the_recheck_ticks() {
        const N: u32 = 20_000;
        let (node_end, agent_end) = tokio::io::duplex(300);
        let (recv, send) = tokio::io::split(node_end);
        let upstream: Upstream = UdpUpstream::Tunnel {
            recv,
            send,
            reader: DatagramReader::new(),
        };
        let (client_tx, client_rx) = tokio::sync::mpsc::channel(256);
        let (_registry, changes) = tokio::sync::watch::channel(());
        let (to_client_tx, mut to_client_rx) = tokio::sync::mpsc::unbounded_channel();
        let checks = Arc::new(AtomicU32::new(0));
        let flow = {
            let checks = checks.clone();
            tokio::spawn(udp_loop(
                upstream,
                client_rx,
                to_client_tx,
                changes,
                Duration::from_millis(1),
                move || {
                    checks.fetch_add(1, Ordering::Relaxed);
                    true
                },
            ))
        };

        // The agent's end: reads what the client sent, and sends the target's datagrams.
        let (mut agent_recv, mut agent_send) = tokio::io::split(agent_end);
        let agent_reads = tokio::spawn(async move {
            let mut reader = DatagramReader::new();
            for i in 0..N {
                let d = reader.read_next(&mut agent_recv).await.unwrap();
                assert_eq!(d, Some(&datagram(1, i)[..]), "client datagram {i}");
            }
        });
        let agent_writes = tokio::spawn(async move {
            for i in 0..N {
                write_datagram(&mut agent_send, &datagram(2, i))
                    .await
                    .unwrap();
                if i % 1000 == 0 {
                    agent_send.flush().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            agent_send
        });
        let client = tokio::spawn(async move {
            for i in 0..N {
                client_tx.send(datagram(1, i)).await.unwrap();
                if i % 1000 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            client_tx
        });
        for i in 0..N {
            let d = tokio::time::timeout(Duration::from_secs(30), to_client_rx.recv())
                .await
                .expect("the flow stalled")
                .expect("the flow ended early");
            assert!(d == datagram(2, i), "target datagram {i} was changed");
        }
        agent_reads.await.unwrap();
        let _agent_send = agent_writes.await.unwrap();
        let checks_seen = checks.load(Ordering::Relaxed);
        assert!(checks_seen > 1, "the recheck ticked {checks_seen} times");

        // The client's queue closing ends the flow.
        drop(client.await.unwrap());
        assert_eq!(flow.await.unwrap(), FlowEnd::ClientGone);
    }

    #[tokio::test]
    async fn a_udp_flow_is_cut_when_the_recheck_says_no() {
        let (node_end, _agent_end) = tokio::io::duplex(300);
        let (recv, send) = tokio::io::split(node_end);
        let upstream: Upstream = UdpUpstream::Tunnel {
            recv,
            send,
            reader: DatagramReader::new(),
        };
        let (_client_tx, client_rx) = tokio::sync::mpsc::channel(1);
        let (_registry, changes) = tokio::sync::watch::channel(());
        let allowed = AtomicU32::new(3);
        let end = udp_loop(
            upstream,
            client_rx,
            Nobody,
            changes,
            Duration::from_millis(1),
            || allowed.fetch_sub(1, Ordering::Relaxed) > 1,
        )
        .await;
        assert_eq!(end, FlowEnd::Denied);
    }

    #[tokio::test]
    async fn a_udp_flow_ends_when_its_tunnel_stream_ends() {
        let (node_end, agent_end) = tokio::io::duplex(300);
        let (recv, send) = tokio::io::split(node_end);
        let upstream: Upstream = UdpUpstream::Tunnel {
            recv,
            send,
            reader: DatagramReader::new(),
        };
        drop(agent_end);
        let (_client_tx, client_rx) = tokio::sync::mpsc::channel(1);
        let (_registry, changes) = tokio::sync::watch::channel(());
        let end = udp_loop(
            upstream,
            client_rx,
            Nobody,
            changes,
            Duration::from_secs(1),
            || true,
        )
        .await;
        assert_eq!(end, FlowEnd::UpstreamGone);
    }
}

#[cfg(test)]
mod core_tests {
    use super::*;
    use crate::testing::{name, resource, with_resources};

    fn registry(resources: &[(&str, Route)]) -> Registry {
        with_resources(resources.iter().map(|(n, r)| resource(n, r.clone())))
    }

    fn drain(core: &mut L4Core) -> Vec<L4Action> {
        std::iter::from_fn(|| core.poll_action()).collect()
    }

    #[test]
    fn ports_follow_the_resources() {
        let mut core = L4Core::new();
        let t0 = Instant::now();
        let tcp = (Proto::Tcp, 5000);
        let udp = (Proto::Udp, 5001);
        core.handle_registry(
            &registry(&[
                ("db", Route::Tcp { port: 5000 }),
                ("dns", Route::Udp { port: 5001 }),
            ]),
            t0,
        );
        assert_eq!(
            drain(&mut core),
            [
                L4Action::Listen(tcp, name("db")),
                L4Action::Listen(udp, name("dns"))
            ]
        );
        core.handle_bound(tcp, true, t0);
        core.handle_bound(udp, true, t0);
        // The same registry again: nothing to do.
        core.handle_registry(
            &registry(&[
                ("db", Route::Tcp { port: 5000 }),
                ("dns", Route::Udp { port: 5001 }),
            ]),
            t0,
        );
        assert_eq!(drain(&mut core), []);
        // A port that passes to another resource is closed, then served for the new one.
        core.handle_registry(
            &registry(&[
                ("db2", Route::Tcp { port: 5000 }),
                ("dns", Route::Udp { port: 5001 }),
            ]),
            t0,
        );
        assert_eq!(
            drain(&mut core),
            [
                L4Action::Close(tcp, name("db")),
                L4Action::Listen(tcp, name("db2"))
            ]
        );
        // A deleted resource's port closes.
        core.handle_registry(&registry(&[("db2", Route::Tcp { port: 5000 })]), t0);
        assert_eq!(drain(&mut core), [L4Action::Close(udp, name("dns"))]);
        assert_eq!(core.poll_timeout(), None);
    }

    #[test]
    fn a_failed_bind_is_retried_later_and_an_ended_port_at_once() {
        let mut core = L4Core::new();
        let t0 = Instant::now();
        let key = (Proto::Tcp, 6000);
        let reg = registry(&[("db", Route::Tcp { port: 6000 })]);
        core.handle_registry(&reg, t0);
        assert_eq!(drain(&mut core), [L4Action::Listen(key, name("db"))]);
        core.handle_bound(key, false, t0);
        assert_eq!(core.poll_timeout(), Some(t0 + REBIND_AFTER));
        // A registry change before the retry time does not retry early.
        core.handle_registry(&reg, t0 + Duration::from_secs(1));
        assert_eq!(drain(&mut core), []);
        core.handle_timeout(t0 + REBIND_AFTER);
        assert_eq!(drain(&mut core), [L4Action::Listen(key, name("db"))]);
        core.handle_bound(key, true, t0 + REBIND_AFTER);
        assert_eq!(core.poll_timeout(), None);
        // The port's task ended by itself: served again at once.
        core.handle_ended(key, t0 + REBIND_AFTER);
        assert_eq!(drain(&mut core), [L4Action::Listen(key, name("db"))]);
        // A resource deleted while its bind was failing is not retried.
        core.handle_bound(key, false, t0 + REBIND_AFTER);
        core.handle_registry(&registry(&[]), t0 + REBIND_AFTER);
        assert_eq!(drain(&mut core), []);
        assert_eq!(core.poll_timeout(), None);
    }
}
