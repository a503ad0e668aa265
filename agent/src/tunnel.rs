//! Tunnels to the cluster: keeps two, serves the streams nodes open on them, checks the
//! targets and reports their health.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, watch};
use warren_proto::registry::Target;
use warren_proto::tunnel::io::{
    read_frame, read_message, write_datagram, write_frame, write_message, DatagramReader,
};
use warren_proto::tunnel::{
    FromAgent, Hello, LegacyHello, Open, Opened, PeerProtocol, Protocol, SiteConfig, ToAgent,
    Unknowns, CLOSE_BAD_HELLO, MAX_CONTROL, MAX_DATAGRAM, MAX_HEADER,
};
use warren_proto::Name;

use crate::enroll::Identity;
use crate::tls;

/// How many tunnels the agent keeps.
const TUNNELS: usize = 2;
/// Buffer size of each direction when splicing a stream to a target.
const COPY_BUF: usize = 64 * 1024;
/// Longest wait before dialling a node again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct Candidate {
    addr: String,
    rtt: Option<Duration>,
    failures: u32,
    retry_at: Instant,
    connected: bool,
    /// The node refused this build's Hello (it predates negotiation): greet it with a
    /// [`LegacyHello`] on the next dial.
    legacy_hello: bool,
}

struct Shared {
    site: Name,
    endpoint: quinn::Endpoint,
    config: watch::Sender<Option<SiteConfig>>,
    health: broadcast::Sender<Vec<(Target, bool)>>,
    candidates: Mutex<Vec<Candidate>>,
    /// Live tunnels by node address.
    live: Mutex<HashMap<String, quinn::Connection>>,
}

/// How often the agent measures the nodes it has no tunnel to.
const REBALANCE_EVERY: Duration = Duration::from_secs(15);
/// A node replaces the slowest tunnel when its handshake takes less than this share of it.
const CLOSER: f64 = 0.7;

/// Keeps tunnels until the process is killed.
pub async fn run(id: Identity, seeds: Vec<String>) -> anyhow::Result<()> {
    let client = id.tunnel_config()?;
    let mut endpoint = quinn::Endpoint::client("[::]:0".parse()?)
        .or_else(|_| quinn::Endpoint::client("0.0.0.0:0".parse().expect("valid address")))?;
    endpoint.set_default_client_config(client);
    let now = Instant::now();
    let shared = Arc::new(Shared {
        site: id.site.clone(),
        endpoint,
        config: watch::channel(None).0,
        health: broadcast::channel(16).0,
        candidates: Mutex::new(
            seeds
                .into_iter()
                .map(|addr| Candidate {
                    addr,
                    rtt: None,
                    failures: 0,
                    retry_at: now,
                    connected: false,
                    legacy_hello: false,
                })
                .collect(),
        ),
        live: Mutex::new(HashMap::new()),
    });
    tokio::spawn(health_loop(shared.clone()));
    tokio::spawn(rebalance(shared.clone()));
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let dial: Vec<String> = {
            let mut c = shared.candidates.lock().expect("candidates lock");
            let live = c.iter().filter(|c| c.connected).count();
            let now = Instant::now();
            let mut ready: Vec<&mut Candidate> = c
                .iter_mut()
                .filter(|c| !c.connected && c.retry_at <= now)
                .collect();
            // Closest first (measured handshake time); never-tried ones before failed ones.
            ready.sort_by_key(|c| (c.failures, c.rtt.unwrap_or(Duration::ZERO)));
            ready
                .into_iter()
                .take(TUNNELS.saturating_sub(live))
                .map(|c| {
                    c.connected = true;
                    c.addr.clone()
                })
                .collect()
        };
        for addr in dial {
            tokio::spawn(tunnel(shared.clone(), addr));
        }
    }
}

fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(500) * 2u32.saturating_pow(failures.min(6));
    let base = base.min(MAX_BACKOFF);
    // Jitter: 50% to 100% of the base, so agents do not dial in lockstep.
    base.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

async fn tunnel(shared: Arc<Shared>, addr: String) {
    let started = Instant::now();
    let legacy_hello = {
        let c = shared.candidates.lock().expect("candidates lock");
        c.iter().any(|c| c.addr == addr && c.legacy_hello)
    };
    let result = serve_tunnel(&shared, &addr, legacy_hello).await;
    let lived = started.elapsed();
    let mut c = shared.candidates.lock().expect("candidates lock");
    if let Some(cand) = c.iter_mut().find(|c| c.addr == addr) {
        cand.connected = false;
        // Only right after a refusal: once a tunnel with an old node ends, this build's
        // Hello is tried again (the node may have been upgraded meanwhile).
        cand.legacy_hello = result.as_ref().is_err_and(|e| e.is::<HelloRefused>());
        if lived > Duration::from_secs(10) {
            cand.failures = 0;
        }
        cand.failures += 1;
        let wait = backoff(cand.failures);
        cand.retry_at = Instant::now() + wait;
        match &result {
            Ok(()) => tracing::warn!(node = %addr, "tunnel closed; dialling again in {wait:?}"),
            Err(e) => {
                tracing::warn!(node = %addr, "tunnel failed: {e:#}; dialling again in {wait:?}")
            }
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

/// The agent's side of the control stream, without I/O: the tunnel task reads each
/// message from the node, hands it to [`Control::handle`] and does what it returns; it
/// asks [`Control::node`] before sending anything.
#[derive(Debug)]
struct Control {
    /// What the node speaks: protocol 0 (only the oldest messages) until its Hello.
    node: PeerProtocol,
    unknowns: Unknowns,
}

/// What a message from the node asks of the tunnel task.
#[derive(Debug, PartialEq)]
enum ControlEvent {
    /// Use this configuration.
    Config(SiteConfig),
    /// The node said what it speaks (now in [`Control::node`]).
    NodeHello,
    /// A message this build does not know, skipped; `first`: the first on this stream.
    Skipped { tag: u32, first: bool },
}

impl Control {
    fn new() -> Self {
        Self {
            node: PeerProtocol::legacy(String::new()),
            unknowns: Unknowns::default(),
        }
    }

    fn handle(&mut self, msg: ToAgent) -> ControlEvent {
        match msg {
            ToAgent::Config(config) => ControlEvent::Config(config),
            ToAgent::Hello(hello) => {
                self.node = PeerProtocol::from_hello(hello);
                ControlEvent::NodeHello
            }
            ToAgent::Unknown { tag } => ControlEvent::Skipped {
                tag,
                first: self.unknowns.note(),
            },
        }
    }
}

async fn serve_tunnel(shared: &Arc<Shared>, addr: &str, legacy_hello: bool) -> anyhow::Result<()> {
    let sock = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{addr} has no address"))?;
    let t0 = Instant::now();
    let connecting = shared.endpoint.connect(sock, tls::SERVER_NAME)?;
    let conn = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 5 s"))??;
    let rtt = t0.elapsed();
    let (mut send, mut recv) = conn.open_bi().await?;
    if legacy_hello {
        let hello = LegacyHello {
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        write_frame(&mut send, &hello).await?;
    } else {
        write_message(&mut send, &FromAgent::Hello(Hello::ours())).await?;
    }
    {
        let mut c = shared.candidates.lock().expect("candidates lock");
        if let Some(cand) = c.iter_mut().find(|c| c.addr == addr) {
            cand.rtt = Some(rtt);
        }
    }
    tracing::info!(node = %addr, site = %shared.site, handshake_ms = rtt.as_millis() as u64, "tunnel up");
    shared
        .live
        .lock()
        .expect("live lock")
        .insert(addr.to_owned(), conn.clone());
    let (node_tx, node_rx) = watch::channel(PeerProtocol::legacy(String::new()));
    let heard = AtomicBool::new(false);
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
                match control.handle(msg) {
                    ControlEvent::Config(config) => {
                        learn_nodes(&shared, &config.nodes);
                        tracing::info!(targets = config.targets.len(), "configuration received");
                        shared.config.send_replace(Some(config));
                    }
                    ControlEvent::NodeHello => {
                        let node = &control.node;
                        tracing::info!(protocol = node.version, version = %node.software, features = ?node.features, "node hello");
                        node_tx.send_replace(node.clone());
                    }
                    ControlEvent::Skipped { tag, first: true } => {
                        tracing::info!(tag, "skipping a message this agent does not know (a newer node); later ones are logged at debug");
                    }
                    ControlEvent::Skipped { tag, first: false } => {
                        tracing::debug!(
                            tag,
                            skipped = control.unknowns.count(),
                            "skipping an unknown message"
                        );
                    }
                }
            }
        }
    };
    let reporter = {
        let mut rx = shared.health.subscribe();
        async move {
            loop {
                match rx.recv().await {
                    Ok(report) => {
                        let msg = FromAgent::Health(report);
                        if node_rx.borrow().accepts(&msg) {
                            write_message(&mut send, &msg).await?;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return anyhow::Ok(()),
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
    shared.live.lock().expect("live lock").remove(addr);
    let refused = !legacy_hello
        && !heard.load(Ordering::Relaxed)
        && conn.close_reason().is_some_and(|r| is_hello_refusal(&r));
    conn.close(0u32.into(), b"agent closing");
    if refused {
        return Err(HelloRefused.into());
    }
    why
}

/// Keeps the tunnels on the closest nodes: measures the handshake time to nodes without a
/// tunnel now and then, and when one is clearly closer than the slowest tunnel, closes that
/// tunnel (the dialler then picks the closer node). A node that comes back after a restart
/// gets its tunnel back this way when it is the closer one.
async fn rebalance(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(REBALANCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let idle: Vec<String> = {
            let c = shared.candidates.lock().expect("candidates lock");
            c.iter()
                .filter(|c| !c.connected && c.retry_at <= Instant::now())
                .map(|c| c.addr.clone())
                .collect()
        };
        for addr in idle {
            let Some(rtt) = probe(&shared, &addr).await else {
                continue;
            };
            let slowest = {
                let mut c = shared.candidates.lock().expect("candidates lock");
                if let Some(cand) = c.iter_mut().find(|c| c.addr == addr) {
                    cand.rtt = Some(rtt);
                }
                c.iter()
                    .filter(|c| c.connected)
                    .filter_map(|c| c.rtt.map(|r| (c.addr.clone(), r)))
                    .max_by_key(|(_, r)| *r)
            };
            let live = shared.live.lock().expect("live lock").len();
            if let Some((worst, worst_rtt)) = slowest {
                if live >= TUNNELS && rtt.as_secs_f64() < worst_rtt.as_secs_f64() * CLOSER {
                    tracing::info!(from = %worst, to = %addr, "moving a tunnel to a closer node");
                    if let Some(conn) = shared.live.lock().expect("live lock").get(&worst) {
                        conn.close(0u32.into(), b"moving to a closer node");
                    }
                    break;
                }
            }
        }
    }
}

/// The handshake time to `addr`, or `None` if it does not answer.
async fn probe(shared: &Shared, addr: &str) -> Option<Duration> {
    let sock = tokio::net::lookup_host(addr).await.ok()?.next()?;
    let t0 = Instant::now();
    let connecting = shared.endpoint.connect(sock, tls::SERVER_NAME).ok()?;
    let conn = tokio::time::timeout(Duration::from_secs(3), connecting)
        .await
        .ok()?
        .ok()?;
    let rtt = t0.elapsed();
    conn.close(0u32.into(), b"probe");
    Some(rtt)
}

fn learn_nodes(shared: &Shared, nodes: &[String]) {
    let mut c = shared.candidates.lock().expect("candidates lock");
    for n in nodes {
        if !c.iter().any(|x| &x.addr == n) {
            tracing::info!(node = %n, "learned a node");
            c.push(Candidate {
                addr: n.clone(),
                rtt: None,
                failures: 0,
                retry_at: Instant::now(),
                connected: false,
                legacy_hello: false,
            });
        }
    }
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

    use tokio::io::AsyncWriteExt as _;
    use tokio::net::UdpSocket;
    use warren_proto::tunnel::{TargetSpec, PROTOCOL_VERSION};

    use super::*;

    fn config() -> SiteConfig {
        SiteConfig {
            site: Name::new("hq").unwrap(),
            targets: vec![TargetSpec {
                target: "127.0.0.1:5432".parse().unwrap(),
                check: None,
            }],
            nodes: vec!["127.0.0.1:7000".into()],
        }
    }

    #[test]
    fn the_node_counts_as_protocol_0_until_its_hello() {
        let mut control = Control::new();
        assert_eq!(control.node.version, 0);
        assert!(!control.node.accepts(&FromAgent::Hello(Hello::ours())));
        assert!(control.node.accepts(&FromAgent::Health(Vec::new())));
        assert_eq!(
            control.handle(ToAgent::Hello(Hello::ours())),
            ControlEvent::NodeHello
        );
        assert_eq!(control.node.version, PROTOCOL_VERSION);
        assert_eq!(
            control.handle(ToAgent::Config(config())),
            ControlEvent::Config(config())
        );
    }

    #[test]
    fn unknown_messages_are_skipped_and_only_the_first_is_flagged() {
        let mut control = Control::new();
        assert_eq!(
            control.handle(ToAgent::Unknown { tag: 40 }),
            ControlEvent::Skipped {
                tag: 40,
                first: true
            }
        );
        assert_eq!(
            control.handle(ToAgent::Unknown { tag: 41 }),
            ControlEvent::Skipped {
                tag: 41,
                first: false
            }
        );
        assert_eq!(control.unknowns.count(), 2);
        // The stream goes on.
        assert_eq!(
            control.handle(ToAgent::Config(config())),
            ControlEvent::Config(config())
        );
    }

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

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        for failures in 0..20 {
            let base = (Duration::from_millis(500) * 2u32.pow(failures.min(6))).min(MAX_BACKOFF);
            let b = backoff(failures);
            assert!(b >= base / 2 && b <= base, "{failures}: {b:?}");
        }
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
