//! Tunnels to the cluster: keeps two, serves the streams nodes open on them, checks the
//! targets and reports their health.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, watch};
use warren_proto::registry::Target;
use warren_proto::tunnel::io::{read_frame, write_frame};
use warren_proto::tunnel::{
    FromAgent, Hello, Open, Opened, Protocol, SiteConfig, ToAgent, MAX_CONTROL, MAX_HEADER,
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
    let result = serve_tunnel(&shared, &addr).await;
    let lived = started.elapsed();
    let mut c = shared.candidates.lock().expect("candidates lock");
    if let Some(cand) = c.iter_mut().find(|c| c.addr == addr) {
        cand.connected = false;
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

async fn serve_tunnel(shared: &Arc<Shared>, addr: &str) -> anyhow::Result<()> {
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
    write_frame(
        &mut send,
        &Hello {
            version: env!("CARGO_PKG_VERSION").to_owned(),
        },
    )
    .await?;
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
    let reader = {
        let shared = shared.clone();
        async move {
            loop {
                match read_frame::<_, ToAgent>(&mut recv, MAX_CONTROL).await {
                    Ok(Some(ToAgent::Config(config))) => {
                        learn_nodes(&shared, &config.nodes);
                        tracing::info!(targets = config.targets.len(), "configuration received");
                        shared.config.send_replace(Some(config));
                    }
                    Ok(None) => return anyhow::Ok(()),
                    Err(e) => anyhow::bail!("control stream: {e}"),
                }
            }
        }
    };
    let reporter = {
        let mut rx = shared.health.subscribe();
        async move {
            loop {
                match rx.recv().await {
                    Ok(report) => write_frame(&mut send, &FromAgent::Health(report)).await?,
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
    conn.close(0u32.into(), b"agent closing");
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
async fn serve_udp(target: Target, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    use warren_proto::tunnel::io::{read_datagram, write_datagram};
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
    let mut from_node = vec![0u8; 65_535];
    let mut from_target = vec![0u8; 65_535];
    let idle_for = Duration::from_secs(60);
    let idle = tokio::time::sleep(idle_for);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            n = read_datagram(&mut recv, &mut from_node) => {
                let Ok(Some(n)) = n else { return };
                let _ = socket.send(&from_node[..n]).await;
                idle.as_mut().reset(tokio::time::Instant::now() + idle_for);
            }
            n = socket.recv(&mut from_target) => {
                let Ok(n) = n else { return };
                if write_datagram(&mut send, &from_target[..n]).await.is_err() {
                    return;
                }
                idle.as_mut().reset(tokio::time::Instant::now() + idle_for);
            }
            _ = &mut idle => return,
        }
    }
}
