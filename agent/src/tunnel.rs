//! Tunnels to the cluster. One driver task ([`run`]) owns the [`TunnelSet`], which decides
//! which nodes to dial, when, and which tunnel to move; the driver feeds it what the other
//! tasks report and does what it asks. Tunnel tasks serve the streams nodes open; the
//! health loop checks the targets and every tunnel reports the results. No lock guards the
//! tunnel choice: only the driver touches it.
//!
//! Shutdown: the endpoint closes every connection (tunnels, dials and probes under way)
//! with [`SHUTDOWN_REASON`], waits a bounded time for the nodes to see it, and aborts the
//! tasks.
//!
//! ```text
//!        shutdown ─────────┐
//!   ┌─ driver (run) ───────▼───────────────────────────┐
//!   │  TunnelSet ◄── handle_* ◄── Report (mpsc) ◄──────┼─── tunnel tasks: dial, Hello,
//!   │     │                                            │      control stream, health
//!   │     │ poll_action: Dial ──► spawn a tunnel task ─┼─►    reporter, stream acceptor
//!   │     │              Probe ─► spawn a probe task ──┼─►  probe tasks: timed handshake
//!   │     │              Close ─► conn.close(reason)   │
//!   │     │ poll_timeout ──► sleep until               │
//!   │     ◄── handle_learned ◄── config (watch) ◄──────┼─── control streams: SiteConfig
//!   └──────────────────────────────────────────────────┘
//!   config (watch, latest SiteConfig) ──► serve_stream (which targets), health loop
//!   health loop ──► health (broadcast) ──► every tunnel's reporter
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;
use warren_proto::registry::Target;
use warren_proto::tunnel::io::{
    read_frame, read_message, write_datagram, write_frame, write_message, DatagramReader,
};
use warren_proto::tunnel::{
    AgentWireGuard, FromAgent, Hello, LegacyHello, Open, Opened, PeerProtocol, Protocol,
    SiteConfig, ToAgent, CLOSE_BAD_HELLO, MAX_CONTROL, MAX_DATAGRAM, MAX_HEADER,
};
use warren_proto::tunnels::{
    Action, CloseReason, Closed, Control, ControlEvent, Event, TunnelSet, TunnelState,
};
use warren_proto::Name;

use crate::access::{AccessMsg, ClosedOnDrop, TunnelId};
use crate::enroll::Identity;
use crate::tls;

/// Client access, when on: the endpoint (handed to the access task), the channel the
/// tunnels report what their nodes say on, and the key to announce.
pub(crate) struct AccessHook {
    endpoint: warren_net::endpoint::AgentEndpoint,
    public_key: [u8; 32],
}

impl AccessHook {
    pub(crate) fn new(endpoint: warren_net::endpoint::AgentEndpoint, public_key: [u8; 32]) -> Self {
        Self {
            endpoint,
            public_key,
        }
    }
}

/// Keeps tunnels as `id`, starting from `seeds`, until `shutdown` completes; then closes
/// every connection with [`SHUTDOWN_REASON`] and waits (bounded) for the closes to go out.
pub(crate) async fn run(
    id: &Identity,
    seeds: Vec<String>,
    access: Option<AccessHook>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let client = id.tunnel_config()?;
    let mut endpoint = quinn::Endpoint::client("[::]:0".parse()?)
        .or_else(|_| quinn::Endpoint::client("0.0.0.0:0".parse().expect("valid address")))
        .context("opening a UDP socket for the tunnels")?;
    endpoint.set_default_client_config(client);
    let (access_tx, access_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        site: id.site.clone(),
        endpoint,
        config: watch::channel(None).0,
        health: broadcast::channel(16).0,
        access: access.as_ref().map(|a| Access {
            tx: access_tx,
            public_key: a.public_key,
        }),
        next_tunnel: AtomicU64::new(1),
    });
    let (reports, mut rx) = mpsc::unbounded_channel();
    let mut driver = Driver {
        set: TunnelSet::new(seeds, rand::random(), Instant::now()),
        conns: HashMap::new(),
        tasks: JoinSet::new(),
        reports,
        shared: shared.clone(),
    };
    driver.tasks.spawn(health_loop(shared.clone()));
    if let Some(a) = access {
        driver
            .tasks
            .spawn(crate::access::run(a.endpoint, access_rx));
    }
    let mut config = shared.config.subscribe();
    tokio::pin!(shutdown);
    loop {
        driver.perform();
        let wake = driver.set.poll_timeout();
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut shutdown => break,
            Some(report) = rx.recv() => driver.on_report(report),
            Ok(()) = config.changed() => {
                let nodes = config
                    .borrow_and_update()
                    .as_ref()
                    .map(|c| c.nodes.clone())
                    .unwrap_or_default();
                driver.set.handle_learned(&nodes, Instant::now());
            }
            () = sleep => driver.set.handle_timeout(Instant::now()),
            Some(joined) = driver.tasks.join_next() => {
                if let Err(e) = joined {
                    if e.is_panic() {
                        tracing::error!("an agent task panicked: {e}");
                    }
                }
            }
        }
    }
    tracing::info!(
        tunnels = driver.conns.len(),
        "closing the tunnels: the agent is shutting down"
    );
    // Closes the tunnels, and the dials and probes under way, each with the reason.
    shared
        .endpoint
        .close(0u32.into(), SHUTDOWN_REASON.as_bytes());
    if tokio::time::timeout(CLOSE_TIMEOUT, shared.endpoint.wait_idle())
        .await
        .is_err()
    {
        tracing::debug!("some nodes did not acknowledge the close within {CLOSE_TIMEOUT:?}");
    }
    driver.tasks.shutdown().await;
    Ok(())
}

/// The reason every connection is closed with when the agent shuts down.
pub(crate) const SHUTDOWN_REASON: &str = "agent shutting down";
/// Buffer size of each direction when splicing a stream to a target.
const COPY_BUF: usize = 64 * 1024;
/// The longest a dial may take: resolving the name, then the QUIC handshake.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest shutdown waits for the nodes to acknowledge the closes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// What the tasks share. Written only by the tasks that own each channel's sending side
/// (the control streams, the health loop); the tunnel choice is not in here.
struct Shared {
    site: Name,
    endpoint: quinn::Endpoint,
    /// The latest configuration a node pushed.
    config: watch::Sender<Option<SiteConfig>>,
    /// Every round's health results, for every tunnel's reporter.
    health: broadcast::Sender<Vec<(Target, bool)>>,
    /// Client access, when on.
    access: Option<Access>,
    /// The next tunnel's id (for the access task: each tunnel's access is its own).
    next_tunnel: AtomicU64,
}

/// What a tunnel needs of client access.
struct Access {
    tx: mpsc::UnboundedSender<AccessMsg>,
    public_key: [u8; 32],
}

/// The task that owns the [`TunnelSet`], and what it needs to perform its actions.
struct Driver {
    set: TunnelSet,
    /// The tunnels up, to close on [`Action::Close`].
    conns: HashMap<String, quinn::Connection>,
    /// Tunnel and probe tasks and the health loop, aborted when the driver returns.
    tasks: JoinSet<()>,
    reports: mpsc::UnboundedSender<Report>,
    shared: Arc<Shared>,
}

/// What a tunnel or probe task tells the driver. Every dial ends in exactly one
/// `DialFailed` or `Closed` (after its `Dialed`), every probe in one `Probed`, even if the
/// task panics ([`ReportOnDrop`]).
#[derive(Debug)]
enum Report {
    /// The handshake is done and the first control message sent.
    Dialed {
        addr: String,
        handshake: Duration,
        conn: quinn::Connection,
    },
    /// No tunnel.
    DialFailed { addr: String, error: anyhow::Error },
    /// The tunnel ended; `error`: why, when it was not the node closing the control
    /// stream.
    Closed {
        addr: String,
        how: Closed,
        error: Option<anyhow::Error>,
    },
    /// A probe's handshake time, or none.
    Probed {
        addr: String,
        handshake: Option<Duration>,
    },
}

impl Driver {
    /// Performs every action the set asks for, and logs its events.
    fn perform(&mut self) {
        while let Some(action) = self.set.poll_action() {
            match action {
                Action::Dial { addr, legacy_hello } => {
                    tracing::debug!(node = %addr, legacy_hello, "dialling");
                    let task = tunnel(
                        self.shared.clone(),
                        addr,
                        legacy_hello,
                        self.reports.clone(),
                    );
                    self.tasks.spawn(task);
                }
                Action::Probe { addr } => {
                    let task = probe(self.shared.clone(), addr, self.reports.clone());
                    self.tasks.spawn(task);
                }
                Action::Close { addr, reason } => {
                    let CloseReason::Closer { to } = &reason;
                    tracing::info!(from = %addr, to = %to, "moving a tunnel to a closer node");
                    if let Some(conn) = self.conns.get(&addr) {
                        conn.close(0u32.into(), reason.message().as_bytes());
                    }
                }
            }
        }
        while let Some(event) = self.set.poll_event() {
            match event {
                Event::Learned { addr } => tracing::info!(node = %addr, "learned a node"),
                Event::Forgot { addr } => {
                    tracing::info!(node = %addr, "forgot a node the cluster no longer lists")
                }
            }
        }
    }

    fn on_report(&mut self, report: Report) {
        let now = Instant::now();
        match report {
            Report::Dialed {
                addr,
                handshake,
                conn,
            } => {
                if self.set.node(&addr).map(|n| n.state) != Some(TunnelState::Dialing) {
                    // Cannot happen with one report per dial; never keep a tunnel the set
                    // does not count.
                    conn.close(0u32.into(), b"not wanted");
                    return;
                }
                tracing::info!(
                    node = %addr, site = %self.shared.site,
                    handshake_ms = handshake.as_millis() as u64, "tunnel up"
                );
                self.conns.insert(addr.clone(), conn);
                self.set.handle_dialed(&addr, handshake, now);
            }
            Report::DialFailed { addr, error } => {
                self.set.handle_dial_failed(&addr, now);
                tracing::warn!(node = %addr, "tunnel failed: {error:#}; {}", self.next_dial(&addr, now));
            }
            Report::Closed { addr, how, error } => {
                self.conns.remove(&addr);
                let moved = self.set.node(&addr).map(|n| n.state) == Some(TunnelState::Closing);
                self.set.handle_closed(&addr, how, now);
                let next = self.next_dial(&addr, now);
                match error {
                    _ if moved => {
                        tracing::info!(node = %addr, "tunnel closed: moved to a closer node")
                    }
                    None => tracing::warn!(node = %addr, "tunnel closed; {next}"),
                    Some(e) => tracing::warn!(node = %addr, "tunnel failed: {e:#}; {next}"),
                }
            }
            Report::Probed { addr, handshake } => {
                tracing::debug!(node = %addr, ?handshake, "probed");
                // Compared with what the tunnels measure now, not with their first handshake.
                for (tunnel, conn) in &self.conns {
                    self.set.handle_tunnel_rtt(tunnel, conn.rtt());
                }
                self.set.handle_probe(&addr, handshake, now);
            }
        }
    }

    /// When `addr` is dialled next, for the log.
    fn next_dial(&self, addr: &str, now: Instant) -> String {
        match self.set.node(addr) {
            None => "not dialling it again: the cluster no longer lists it".to_owned(),
            Some(n) if n.state == TunnelState::Dialing => "dialling again now".to_owned(),
            Some(n) => format!(
                "dialling again in {:?}",
                n.retry_at.saturating_duration_since(now)
            ),
        }
    }
}

/// Sends a task's last report when it is dropped: when the task ends, and also if it
/// panics or is aborted, so the driver never waits for a report that will not come.
struct ReportOnDrop {
    reports: mpsc::UnboundedSender<Report>,
    last: Option<Report>,
}

impl ReportOnDrop {
    fn new(reports: mpsc::UnboundedSender<Report>, last: Report) -> Self {
        Self {
            reports,
            last: Some(last),
        }
    }

    /// The report to send from now on.
    fn set(&mut self, last: Report) {
        self.last = Some(last);
    }
}

impl Drop for ReportOnDrop {
    fn drop(&mut self) {
        if let Some(last) = self.last.take() {
            // The driver is gone only at shutdown, when nobody waits for this.
            let _ = self.reports.send(last);
        }
    }
}

/// One tunnel: dial, serve until it ends, report each step.
async fn tunnel(
    shared: Arc<Shared>,
    addr: String,
    legacy_hello: bool,
    reports: mpsc::UnboundedSender<Report>,
) {
    let ended_early = || anyhow::anyhow!("the tunnel task ended early");
    let mut last = ReportOnDrop::new(
        reports.clone(),
        Report::DialFailed {
            addr: addr.clone(),
            error: ended_early(),
        },
    );
    let (conn, handshake, send, recv) = match dial(&shared, &addr, legacy_hello).await {
        Ok(dialed) => dialed,
        Err(error) => {
            last.set(Report::DialFailed { addr, error });
            return;
        }
    };
    last.set(Report::Closed {
        addr: addr.clone(),
        how: Closed::Lost,
        error: Some(ended_early()),
    });
    let _ = reports.send(Report::Dialed {
        addr: addr.clone(),
        handshake,
        conn: conn.clone(),
    });
    let (how, error) = serve_tunnel(&shared, &conn, send, recv, legacy_hello).await;
    last.set(Report::Closed { addr, how, error });
}

/// Resolves `addr`, completes the handshake and sends the first control message.
async fn dial(
    shared: &Shared,
    addr: &str,
    legacy_hello: bool,
) -> anyhow::Result<(
    quinn::Connection,
    Duration,
    quinn::SendStream,
    quinn::RecvStream,
)> {
    let sock = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| anyhow::anyhow!("cannot resolve {addr} within {DIAL_TIMEOUT:?}"))?
        .map_err(|e| anyhow::anyhow!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{addr} has no address"))?;
    let t0 = Instant::now();
    let connecting = shared.endpoint.connect(sock, tls::SERVER_NAME)?;
    let conn = tokio::time::timeout(DIAL_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {DIAL_TIMEOUT:?}"))??;
    let handshake = t0.elapsed();
    let greet = async {
        let (mut send, recv) = conn.open_bi().await?;
        if legacy_hello {
            let hello = LegacyHello {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            };
            write_frame(&mut send, &hello).await?;
        } else {
            write_message(&mut send, &FromAgent::Hello(Hello::ours())).await?;
        }
        anyhow::Ok((send, recv))
    };
    match greet.await {
        Ok((send, recv)) => Ok((conn, handshake, send, recv)),
        Err(e) => {
            conn.close(0u32.into(), b"agent closing");
            Err(e)
        }
    }
}

/// The node closed the connection over this build's Hello: it predates negotiation.
#[derive(Debug)]
struct HelloRefused;

impl std::fmt::Display for HelloRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the node refused this agent's hello (it predates protocol negotiation)")
    }
}

impl std::error::Error for HelloRefused {}

/// Whether a connection closed this way is a node refusing the first control message.
fn is_hello_refusal(closed: &quinn::ConnectionError) -> bool {
    matches!(
        closed,
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == CLOSE_BAD_HELLO.into()
    )
}

/// Serves a tunnel that is up until it ends: reads the control stream, reports health,
/// accepts the streams the node opens. Returns how it ended, and why if not cleanly.
async fn serve_tunnel(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    legacy_hello: bool,
) -> (Closed, Option<anyhow::Error>) {
    let (node_tx, mut node_rx) = watch::channel(PeerProtocol::legacy(String::new()));
    let heard = AtomicBool::new(false);
    let tunnel_id = TunnelId(shared.next_tunnel.fetch_add(1, Ordering::Relaxed));
    // This tunnel's access goes away with it, however it ends.
    let _access_closed = shared
        .access
        .as_ref()
        .map(|a| ClosedOnDrop::new(a.tx.clone(), tunnel_id));
    let reader = {
        let shared = shared.clone();
        let heard = &heard;
        async move {
            let mut control = Control::new();
            loop {
                let msg = match read_message::<_, ToAgent>(&mut recv, MAX_CONTROL).await {
                    Ok(Some(msg)) => msg,
                    Ok(None) => return anyhow::Ok(()),
                    Err(e) => anyhow::bail!("control stream: {e}"),
                };
                heard.store(true, Ordering::Relaxed);
                match control.handle_message(msg) {
                    ControlEvent::Config(config) => {
                        tracing::info!(targets = config.targets.len(), "configuration received");
                        // The driver watches this too: the config's node list feeds the
                        // tunnel set.
                        shared.config.send_replace(Some(config));
                    }
                    ControlEvent::NodeHello => {
                        let node = control.node();
                        tracing::info!(protocol = node.version, version = %node.software, features = ?node.features, "node hello");
                        node_tx.send_replace(node.clone());
                    }
                    ControlEvent::Access(access) => match &shared.access {
                        Some(a) => {
                            tracing::debug!(
                                generation = access.generation,
                                devices = access.devices.len(),
                                "client access received"
                            );
                            let _ =
                                a.tx.send(AccessMsg::Access(tunnel_id, access, Instant::now()));
                        }
                        None => tracing::debug!("client access received, but it is off here"),
                    },
                    ControlEvent::Relays(relays) => {
                        tracing::debug!(?relays, "relay-only nodes named");
                        if let Some(a) = &shared.access {
                            let _ = a.tx.send(AccessMsg::Relays(tunnel_id, relays));
                        }
                    }
                    ControlEvent::Heartbeat { valid_for_ms } => {
                        if let Some(a) = &shared.access {
                            let _ = a.tx.send(AccessMsg::Heartbeat(
                                tunnel_id,
                                valid_for_ms,
                                Instant::now(),
                            ));
                        }
                    }
                    ControlEvent::Skipped { tag, first: true } => {
                        tracing::info!(tag, "skipping a message this agent does not know (a newer node); later ones are logged at debug");
                    }
                    ControlEvent::Skipped { tag, first: false } => {
                        tracing::debug!(
                            tag,
                            skipped = control.skipped(),
                            "skipping an unknown message"
                        );
                    }
                }
            }
        }
    };
    let reporter = {
        let mut rx = shared.health.subscribe();
        // Announced once the node's Hello says it knows client access.
        let mut announce = shared.access.as_ref().map(|a| {
            FromAgent::WireGuard(AgentWireGuard {
                public_key: a.public_key,
            })
        });
        async move {
            loop {
                if announce
                    .as_ref()
                    .is_some_and(|m| node_rx.borrow().accepts(m))
                {
                    let msg = announce.take().expect("checked above");
                    write_message(&mut send, &msg).await?;
                    tracing::debug!("announced the WireGuard key");
                }
                tokio::select! {
                    r = rx.recv() => match r {
                        Ok(report) => {
                            let msg = FromAgent::Health(report);
                            if node_rx.borrow().accepts(&msg) {
                                write_message(&mut send, &msg).await?;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return anyhow::Ok(()),
                    },
                    Ok(()) = node_rx.changed() => {}
                }
            }
        }
    };
    let acceptor = {
        let shared = shared.clone();
        let conn = conn.clone();
        async move {
            loop {
                let (send, recv) = conn.accept_bi().await?;
                tokio::spawn(serve_stream(shared.clone(), send, recv));
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        }
    };
    let why = tokio::select! {
        r = reader => r,
        r = reporter => r,
        r = acceptor => r,
    };
    let refused = !legacy_hello
        && !heard.load(Ordering::Relaxed)
        && conn.close_reason().is_some_and(|r| is_hello_refusal(&r));
    conn.close(0u32.into(), b"agent closing");
    if refused {
        return (Closed::HelloRefused, Some(HelloRefused.into()));
    }
    (Closed::Lost, why.err())
}

/// One probe: the handshake time to `addr`, or none if it does not answer.
async fn probe(shared: Arc<Shared>, addr: String, reports: mpsc::UnboundedSender<Report>) {
    let mut last = ReportOnDrop::new(
        reports,
        Report::Probed {
            addr: addr.clone(),
            handshake: None,
        },
    );
    let handshake = measure(&shared, &addr).await;
    last.set(Report::Probed { addr, handshake });
}

/// The handshake time to `addr`, or `None` if it does not answer.
async fn measure(shared: &Shared, addr: &str) -> Option<Duration> {
    let attempt = async {
        let sock = tokio::net::lookup_host(addr).await.ok()?.next()?;
        let t0 = Instant::now();
        let conn = shared
            .endpoint
            .connect(sock, tls::SERVER_NAME)
            .ok()?
            .await
            .ok()?;
        let rtt = t0.elapsed();
        conn.close(0u32.into(), b"probe");
        Some(rtt)
    };
    tokio::time::timeout(PROBE_TIMEOUT, attempt)
        .await
        .ok()
        .flatten()
}

/// One stream a node opened: dial the target it names (only one of this site's), splice.
async fn serve_stream(
    shared: Arc<Shared>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let header = match tokio::time::timeout(
        Duration::from_secs(10),
        read_frame::<_, Open>(&mut recv, MAX_HEADER),
    )
    .await
    {
        Ok(Ok(Some(h))) => h,
        Ok(Err(e)) => {
            tracing::warn!("refusing a stream with a bad header: {e}");
            let _ = write_frame(&mut send, &Opened::Refused(format!("bad header: {e}"))).await;
            return;
        }
        _ => return,
    };
    let refuse = |why: String| Opened::Refused(why);
    let known = shared
        .config
        .borrow()
        .as_ref()
        .is_some_and(|c| c.targets.iter().any(|t| t.target == header.target));
    let answer = if header.site != shared.site {
        Err(refuse(format!(
            "this agent serves site {}, not {}",
            shared.site, header.site
        )))
    } else if !known {
        Err(refuse(format!(
            "{} is not a target of site {}",
            header.target, shared.site
        )))
    } else if header.protocol == Protocol::Udp {
        return serve_udp(header.target, send, recv).await;
    } else {
        match tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect((header.target.host.as_str(), header.target.port)),
        )
        .await
        {
            Ok(Ok(tcp)) => Ok(tcp),
            Ok(Err(e)) => Err(refuse(format!("{}: {e}", header.target))),
            Err(_) => Err(refuse(format!("{}: no answer within 5 s", header.target))),
        }
    };
    match answer {
        Ok(mut tcp) => {
            let _ = tcp.set_nodelay(true);
            if write_frame(&mut send, &Opened::Ok).await.is_err() {
                return;
            }
            let mut tunnel = tokio::io::join(recv, send);
            let _ =
                tokio::io::copy_bidirectional_with_sizes(&mut tunnel, &mut tcp, COPY_BUF, COPY_BUF)
                    .await;
        }
        Err(refused) => {
            tracing::debug!(target = %header.target, "refused a stream: {refused:?}");
            let _ = write_frame(&mut send, &refused).await;
            let _ = send.finish();
        }
    }
}

/// Checks the configured targets on their intervals and reports all results every round.
async fn health_loop(shared: Arc<Shared>) {
    let mut last_run: HashMap<Target, Instant> = HashMap::new();
    let mut results: HashMap<Target, (bool, u32)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(config) = shared.config.borrow().clone() else {
            continue;
        };
        let now = Instant::now();
        for spec in &config.targets {
            let Some(check) = &spec.check else { continue };
            let due = last_run.get(&spec.target).is_none_or(|t| {
                now.duration_since(*t) >= Duration::from_secs(check.interval_s.into())
            });
            if !due {
                continue;
            }
            last_run.insert(spec.target.clone(), now);
            let ok = check_target(&spec.target, check.path.as_deref()).await;
            let entry = results.entry(spec.target.clone()).or_insert((true, 0));
            if ok {
                *entry = (true, 0);
            } else {
                entry.1 += 1;
                if entry.1 >= check.failures {
                    if entry.0 {
                        tracing::warn!(target = %spec.target, "target failed {} checks; reported unhealthy", entry.1);
                    }
                    entry.0 = false;
                }
            }
        }
        results.retain(|t, _| {
            config
                .targets
                .iter()
                .any(|s| s.target == *t && s.check.is_some())
        });
        let report: Vec<(Target, bool)> = results
            .iter()
            .map(|(t, (ok, _))| (t.clone(), *ok))
            .collect();
        if !report.is_empty() {
            let _ = shared.health.send(report);
        }
    }
}

async fn check_target(t: &Target, path: Option<&str>) -> bool {
    let attempt = async {
        let mut tcp = TcpStream::connect((t.host.as_str(), t.port)).await.ok()?;
        let Some(path) = path else { return Some(true) };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {t}\r\nUser-Agent: warren-agent-health-check\r\nConnection: close\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let n = tcp.read(&mut buf).await.ok()?;
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(status < 400)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

/// A UDP flow: datagrams framed on the stream, a connected socket to the target.
async fn serve_udp(target: Target, mut send: quinn::SendStream, recv: quinn::RecvStream) {
    let socket = async {
        let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| e.to_string())?
            .next()
            .ok_or_else(|| "no address".to_owned())?;
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let s = tokio::net::UdpSocket::bind(bind)
            .await
            .map_err(|e| e.to_string())?;
        s.connect(addr).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(s)
    }
    .await;
    let socket = match socket {
        Ok(s) => s,
        Err(e) => {
            let _ = write_frame(&mut send, &Opened::Refused(format!("{target}: {e}"))).await;
            return;
        }
    };
    if write_frame(&mut send, &Opened::Ok).await.is_err() {
        return;
    }
    splice_udp(&socket, recv, send, UDP_IDLE).await;
}

/// A UDP flow ends after this long without a datagram either way.
const UDP_IDLE: Duration = Duration::from_secs(60);

/// Moves datagrams between a data stream and a connected socket until either goes or
/// `idle_for` passes without traffic. Both `select!` branches are cancel safe: a datagram
/// half read from the stream when the socket wins stays in the reader.
async fn splice_udp<R, W>(
    socket: &tokio::net::UdpSocket,
    mut recv: R,
    mut send: W,
    idle_for: Duration,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut from_node = DatagramReader::new();
    let mut from_target = vec![0u8; MAX_DATAGRAM];
    let idle = tokio::time::sleep(idle_for);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            d = from_node.read_next(&mut recv) => {
                let d = match d {
                    Ok(Some(d)) => d,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!("UDP flow: the stream failed: {e}");
                        return;
                    }
                };
                let _ = socket.send(d).await;
                idle.as_mut().reset(tokio::time::Instant::now() + idle_for);
            }
            n = socket.recv(&mut from_target) => {
                let Ok(n) = n else { return };
                if write_datagram(&mut send, &from_target[..n]).await.is_err() {
                    return;
                }
                idle.as_mut().reset(tokio::time::Instant::now() + idle_for);
            }
            () = &mut idle => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject as _;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::UdpSocket;
    use tokio::sync::oneshot;
    use warren_proto::identity::NodeCert;
    use warren_proto::registry::{NodeId, NodeRole};
    use warren_proto::tunnel::io::read_frame_body;
    use warren_proto::tunnel::{TargetSpec, ALPN_AGENT};

    use super::*;

    #[test]
    fn only_a_close_with_the_hello_code_is_a_refused_hello() {
        let closed = |code: u32| {
            quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: code.into(),
                reason: b"expected a hello"[..].into(),
            })
        };
        assert!(is_hello_refusal(&closed(CLOSE_BAD_HELLO)));
        assert!(!is_hello_refusal(&closed(2)));
        assert!(!is_hello_refusal(&quinn::ConnectionError::TimedOut));
    }

    /// A cluster CA that certifies in-memory nodes and the agent's site.
    struct Ca {
        issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
        cluster_id: u128,
    }

    impl Ca {
        fn new() -> Self {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let key = rcgen::KeyPair::generate().unwrap();
            Self {
                issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
                cluster_id: 0x5eed,
            }
        }

        fn leaf(&self, params: rcgen::CertificateParams) -> (String, rcgen::KeyPair) {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key)
        }

        fn identity(&self) -> Identity {
            let params = rcgen::CertificateParams::new(vec!["site-hq".to_owned()]).unwrap();
            let (cert_pem, key) = self.leaf(params);
            Identity::from_parts(
                Name::new("hq").unwrap(),
                self.cluster_id,
                cert_pem,
                key.serialize_pem(),
                self.issuer.pem(),
            )
        }

        /// A QUIC server that the agent takes for voter `id` of the cluster.
        fn node_endpoint(&self, id: u64) -> quinn::Endpoint {
            let mut params =
                rcgen::CertificateParams::new(vec![tls::SERVER_NAME.to_owned()]).unwrap();
            let uri = NodeCert {
                cluster_id: self.cluster_id,
                id: NodeId(id),
                role: NodeRole::Voter,
            }
            .uri();
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.try_into().unwrap()));
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            let (cert_pem, key) = self.leaf(params);
            let cert =
                rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
            let key =
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
                    .unwrap();
            let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert, self.issuer.der().clone()], key)
            .unwrap();
            tls.alpn_protocols = vec![ALPN_AGENT.to_vec()];
            let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
            let config = quinn::ServerConfig::with_crypto(Arc::new(quic));
            quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap()
        }
    }

    /// What an in-memory node saw of one agent connection.
    #[derive(Debug, PartialEq)]
    enum Seen {
        /// The agent's first control message: a Hello (protocol 1 or later) or a legacy one.
        Hello { legacy: bool },
        /// The agent closed the connection with this reason.
        ClosedByAgent(String),
        /// The agent announced its WireGuard key.
        WireGuard([u8; 32]),
    }

    /// An in-memory node at `addr`: answers the agent's Hello (or, `old`, refuses it as a
    /// node from before negotiation does), pushes a config listing `nodes`, and reports
    /// what it sees.
    struct FakeNode {
        addr: String,
        seen: mpsc::UnboundedReceiver<Seen>,
    }

    impl FakeNode {
        fn start(ca: &Ca, id: u64, old: bool, nodes: Arc<std::sync::Mutex<Vec<String>>>) -> Self {
            Self::start_with_access(ca, id, old, nodes, None)
        }

        /// As `start`, and after the config sends `access` (if any) and reports the
        /// agent's WireGuard announcement.
        fn start_with_access(
            ca: &Ca,
            id: u64,
            old: bool,
            nodes: Arc<std::sync::Mutex<Vec<String>>>,
            access: Option<warren_proto::tunnel::AccessConfig>,
        ) -> Self {
            let endpoint = ca.node_endpoint(id);
            let addr = endpoint.local_addr().unwrap().to_string();
            let (tx, seen) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(incoming) = endpoint.accept().await {
                    let tx = tx.clone();
                    let nodes = nodes.clone();
                    let access = access.clone();
                    tokio::spawn(async move {
                        let Ok(conn) = incoming.await else { return };
                        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                            return;
                        };
                        let Ok(Some(body)) = read_frame_body(&mut recv, MAX_CONTROL).await else {
                            return;
                        };
                        let agent = PeerProtocol::from_agent_hello(&body).unwrap();
                        let legacy = agent.version == 0;
                        let _ = tx.send(Seen::Hello { legacy });
                        if old && !legacy {
                            conn.close(CLOSE_BAD_HELLO.into(), b"expected a hello");
                            return;
                        }
                        let hello = ToAgent::Hello(Hello::ours());
                        if agent.accepts(&hello) {
                            write_message(&mut send, &hello).await.unwrap();
                        }
                        let config = SiteConfig {
                            site: Name::new("hq").unwrap(),
                            targets: vec![TargetSpec {
                                target: "127.0.0.1:9".parse().unwrap(),
                                check: None,
                            }],
                            nodes: nodes.lock().unwrap().clone(),
                        };
                        write_message(&mut send, &ToAgent::Config(config))
                            .await
                            .unwrap();
                        if let Some(access) = access {
                            write_message(&mut send, &ToAgent::Access(access))
                                .await
                                .unwrap();
                            write_message(
                                &mut send,
                                &ToAgent::Heartbeat {
                                    valid_for_ms: 30_000,
                                },
                            )
                            .await
                            .unwrap();
                        }
                        let announcements = tx.clone();
                        tokio::spawn(async move {
                            while let Ok(Some(msg)) =
                                read_message::<_, FromAgent>(&mut recv, MAX_CONTROL).await
                            {
                                if let FromAgent::WireGuard(w) = msg {
                                    let _ = announcements.send(Seen::WireGuard(w.public_key));
                                }
                            }
                        });
                        if let quinn::ConnectionError::ApplicationClosed(c) = conn.closed().await {
                            let reason = String::from_utf8_lossy(&c.reason).into_owned();
                            let _ = tx.send(Seen::ClosedByAgent(reason));
                        }
                    });
                }
            });
            Self { addr, seen }
        }

        async fn next(&mut self) -> Seen {
            tokio::time::timeout(Duration::from_secs(10), self.seen.recv())
                .await
                .expect("the node saw nothing within 10 s")
                .expect("the node stopped")
        }
    }

    /// The agent dials its seed, learns the second node from the seed's config and dials
    /// it too; on shutdown it closes both tunnels with its reason and returns `Ok`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn learns_a_node_then_closes_every_tunnel_on_shutdown() {
        let ca = Ca::new();
        let nodes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut a = FakeNode::start(&ca, 1, false, nodes.clone());
        let mut b = FakeNode::start(&ca, 2, false, nodes.clone());
        *nodes.lock().unwrap() = vec![a.addr.clone(), b.addr.clone()];
        let (stop, stopped) = oneshot::channel::<()>();
        let config = crate::AgentConfig {
            nodes: vec![a.addr.clone()],
            ..Default::default()
        };
        let agent = tokio::spawn(crate::run(ca.identity(), config, async {
            let _ = stopped.await;
        }));
        assert_eq!(a.next().await, Seen::Hello { legacy: false });
        assert_eq!(
            b.next().await,
            Seen::Hello { legacy: false },
            "b was learned"
        );

        stop.send(()).unwrap();
        let ran = tokio::time::timeout(Duration::from_secs(10), agent)
            .await
            .expect("run returns after shutdown")
            .unwrap();
        assert!(ran.is_ok(), "{ran:?}");
        for node in [&mut a, &mut b] {
            assert_eq!(
                node.next().await,
                Seen::ClosedByAgent(SHUTDOWN_REASON.into())
            );
        }
    }

    /// A node from before negotiation closes the connection over the Hello; the agent's
    /// next dial greets it with a legacy hello, and that tunnel stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_old_node_is_greeted_the_old_way_after_it_refuses_the_hello() {
        let ca = Ca::new();
        let nodes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut old = FakeNode::start(&ca, 1, true, nodes.clone());
        nodes.lock().unwrap().push(old.addr.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let config = crate::AgentConfig {
            nodes: vec![old.addr.clone()],
            ..Default::default()
        };
        let agent = tokio::spawn(crate::run(ca.identity(), config, async {
            let _ = stopped.await;
        }));
        assert_eq!(old.next().await, Seen::Hello { legacy: false });
        assert_eq!(old.next().await, Seen::Hello { legacy: true });
        stop.send(()).unwrap();
        assert_eq!(
            old.next().await,
            Seen::ClosedByAgent(SHUTDOWN_REASON.into())
        );
        agent.await.unwrap().unwrap();
    }

    /// A node that knows client access is told the agent's WireGuard key; the relay it
    /// names in its access configuration is bound to with its ticket, from the agent's
    /// WireGuard socket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_with_access_gets_the_key_and_its_relay_a_binding() {
        let ca = Ca::new();
        let state = tempfile::tempdir().unwrap();
        let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let access = warren_proto::tunnel::AccessConfig {
            generation: 1,
            valid_for_ms: 30_000,
            relay_ticket: b"agent-ticket".to_vec(),
            relay: relay.local_addr().unwrap().to_string(),
            devices: vec![],
        };
        let nodes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut node = FakeNode::start_with_access(&ca, 1, false, nodes.clone(), Some(access));
        nodes.lock().unwrap().push(node.addr.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let config = crate::AgentConfig {
            nodes: vec![node.addr.clone()],
            wireguard: Some(crate::WireGuardConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                state_dir: state.path().to_owned(),
            }),
        };
        let agent = tokio::spawn(crate::run(ca.identity(), config, async {
            let _ = stopped.await;
        }));
        assert_eq!(node.next().await, Seen::Hello { legacy: false });
        let key = crate::access::load_or_create_key(state.path()).unwrap();
        assert_eq!(node.next().await, Seen::WireGuard(key.public_key().0));

        let mut buf = [0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), relay.recv_from(&mut buf))
            .await
            .expect("no bind at the relay")
            .unwrap();
        match warren_proto::relay::Frame::decode(&buf[..n]).unwrap() {
            warren_proto::relay::Frame::Bind { ticket, site, .. } => {
                assert_eq!(ticket, b"agent-ticket");
                assert_eq!(site, "");
            }
            f => panic!("expected a bind, got {f:?}"),
        }

        stop.send(()).unwrap();
        assert_eq!(
            node.next().await,
            Seen::ClosedByAgent(SHUTDOWN_REASON.into())
        );
        agent.await.unwrap().unwrap();
    }

    fn datagram(i: u32) -> Vec<u8> {
        let mut d = i.to_be_bytes().to_vec();
        d.extend((0..(i * 7919) % 1400).map(|b| b as u8));
        d
    }

    fn echo(d: &[u8]) -> Vec<u8> {
        let mut e = b"echo:".to_vec();
        e.extend_from_slice(d);
        e
    }

    /// Datagrams both ways through a small pipe (so they arrive in pieces, and the
    /// socket's branch often wins while one is half read): every echo arrives whole and in
    /// order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_udp_flow_keeps_every_datagram_both_ways() {
        const N: u32 = 5_000;
        const WINDOW: usize = 32;
        let target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let agent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        agent.connect(target.local_addr().unwrap()).await.unwrap();
        target.connect(agent.local_addr().unwrap()).await.unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok(n) = target.recv(&mut buf).await {
                let _ = target.send(&echo(&buf[..n])).await;
            }
        });
        let (agent_end, node_end) = tokio::io::duplex(300);
        let (recv, send) = tokio::io::split(agent_end);
        let flow = tokio::spawn(async move {
            splice_udp(&agent, recv, send, Duration::from_secs(60)).await;
        });

        let (mut node_recv, mut node_send) = tokio::io::split(node_end);
        // At most WINDOW datagrams in flight, so no socket buffer overflows on loopback.
        let window = Arc::new(tokio::sync::Semaphore::new(WINDOW));
        let writer = {
            let window = window.clone();
            tokio::spawn(async move {
                for i in 0..N {
                    window.acquire().await.unwrap().forget();
                    write_datagram(&mut node_send, &datagram(i)).await.unwrap();
                }
                node_send.flush().await.unwrap();
                node_send
            })
        };
        let mut reader = DatagramReader::new();
        for i in 0..N {
            let d = tokio::time::timeout(Duration::from_secs(10), reader.read_next(&mut node_recv))
                .await
                .expect("the flow stalled")
                .unwrap()
                .expect("the flow ended early");
            assert!(d == echo(&datagram(i)), "echo {i} was changed");
            window.add_permits(1);
        }
        // The node closing its end ends the flow.
        drop(writer.await.unwrap());
        drop(node_recv);
        tokio::time::timeout(Duration::from_secs(5), flow)
            .await
            .expect("the flow did not end")
            .unwrap();
    }
}
