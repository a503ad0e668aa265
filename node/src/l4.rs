//! Public TCP and UDP ports: a TCP or UDP resource listens on its port on every node, checks
//! each new connection (or, for UDP, each new client address) against the resource's
//! policies (source address; deny by default), and forwards it to a target, directly or
//! through the site's tunnel. Open flows are checked again whenever the registry changes,
//! and cut when no longer allowed. A UDP flow ends after [`UDP_IDLE`] without traffic.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use warren_consensus::registry::Registry;
use warren_proto::access::{decide, CompiledPolicy, Decision, Facts};
use warren_proto::registry::{Resource, Route};
use warren_proto::tunnel::Protocol;
use warren_proto::Name;

use crate::proxy::{unix_now, Proxy};

/// A UDP flow ends after this long without a datagram either way.
pub const UDP_IDLE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Proto {
    Tcp,
    Udp,
}

/// A resource's port: whose it is and the task serving it.
type Listening = (Name, JoinHandle<()>);

/// The listeners of TCP and UDP resources.
pub struct L4 {
    listeners: Mutex<HashMap<(Proto, u16), Listening>>,
    follower: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for L4 {
    fn drop(&mut self) {
        if let Some(f) = self.follower.lock().expect("l4 lock").take() {
            f.abort();
        }
        for (_, (_, task)) in self.listeners.lock().expect("l4 lock").drain() {
            task.abort();
        }
    }
}

impl L4 {
    /// Starts following the registry: a listener on `ip` for every TCP resource.
    pub fn start(proxy: Arc<Proxy>, ip: IpAddr) -> Arc<Self> {
        let l4 = Arc::new(Self {
            listeners: Mutex::new(HashMap::new()),
            follower: Mutex::new(None),
        });
        let task = tokio::spawn(follow(Arc::downgrade(&l4), proxy, ip));
        *l4.follower.lock().expect("l4 lock") = Some(task);
        l4
    }
}

async fn follow(l4: Weak<L4>, proxy: Arc<Proxy>, ip: IpAddr) {
    let mut rx = proxy.cluster().subscribe();
    loop {
        let reg = rx.borrow_and_update().clone();
        let Some(me) = l4.upgrade() else { return };
        let wanted: HashMap<(Proto, u16), Name> = reg
            .resources()
            .values()
            .filter_map(|r| match r.route {
                Route::Tcp { port } => Some(((Proto::Tcp, port), r.name.clone())),
                Route::Udp { port } => Some(((Proto::Udp, port), r.name.clone())),
                Route::Http { .. } => None,
            })
            .collect();
        {
            let mut listeners = me.listeners.lock().expect("l4 lock");
            listeners.retain(|key, (name, task)| {
                let keep = wanted.get(key) == Some(name) && !task.is_finished();
                if !keep {
                    task.abort();
                    tracing::info!(port = key.1, proto = ?key.0, resource = %name, "resource port closed");
                }
                keep
            });
            for (key, name) in &wanted {
                if listeners.contains_key(key) {
                    continue;
                }
                let addr = SocketAddr::new(ip, key.1);
                let task = match key.0 {
                    Proto::Tcp => std::net::TcpListener::bind(addr)
                        .and_then(|l| {
                            l.set_nonblocking(true)?;
                            TcpListener::from_std(l)
                        })
                        .map(|l| tokio::spawn(accept(l, name.clone(), proxy.clone()))),
                    Proto::Udp => std::net::UdpSocket::bind(addr)
                        .and_then(|s| {
                            s.set_nonblocking(true)?;
                            tokio::net::UdpSocket::from_std(s)
                        })
                        .map(|s| tokio::spawn(udp_serve(s, name.clone(), proxy.clone()))),
                };
                match task {
                    Ok(task) => {
                        tracing::info!(%addr, proto = ?key.0, resource = %name, "resource listening");
                        listeners.insert(*key, (name.clone(), task));
                    }
                    Err(e) => {
                        tracing::warn!(%addr, proto = ?key.0, resource = %name, "cannot listen for a resource: {e}")
                    }
                }
            }
        }
        drop(me);
        // Also retry failed binds now and then.
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.changed()).await;
    }
}

async fn accept(listener: TcpListener, name: Name, proxy: Arc<Proxy>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("TCP resource accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(flow(stream, peer, name.clone(), proxy.clone()));
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

/// A byte stream both ways.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

async fn flow(mut client: TcpStream, peer: SocketAddr, name: Name, proxy: Arc<Proxy>) {
    let _ = client.set_nodelay(true);
    let mut rx = proxy.cluster().subscribe();
    let reg = rx.borrow_and_update().clone();
    let (ok, why) = allowed(&proxy, &reg, &name, peer.ip());
    tracing::info!(target: "warren::access", resource = %name, client = %peer, decision = if ok { "allow" } else { "deny" }, reason = %why, "TCP connection");
    if !ok {
        return;
    }
    let Some(res) = reg.resources().get(&name).cloned() else {
        return;
    };
    let mut upstream = match connect(&proxy, &res).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(resource = %name, "TCP resource: no target reachable: {e}");
            return;
        }
    };
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
            tracing::info!(target: "warren::access", resource = %name, client = %peer, decision = "deny", reason = %why, "TCP connection cut: no longer allowed");
            return;
        }
    }
}

/// Serves a UDP resource's port: one flow per client address, each with its own path to a
/// target (a tunnel stream or a connected socket).
async fn udp_serve(sock: tokio::net::UdpSocket, name: Name, proxy: Arc<Proxy>) {
    use tokio::sync::mpsc;
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
                if !ok || flows.len() >= 10_000 {
                    continue;
                }
                let (tx, rx) = mpsc::channel(256);
                let _ = tx.try_send(buf[..n].to_vec());
                flows.insert(peer, tx);
                tokio::spawn(udp_flow(sock.clone(), peer, rx, name.clone(), proxy.clone(), done_tx.clone()));
            }
            Some(peer) = done_rx.recv() => {
                flows.remove(&peer);
            }
        }
    }
}

/// Where a UDP flow's datagrams go.
enum UdpUpstream {
    Tunnel(crate::sites::SiteStream),
    Socket(tokio::net::UdpSocket),
}

async fn udp_upstream(proxy: &Proxy, res: &Resource) -> Option<UdpUpstream> {
    let start: usize = rand::random();
    let n = res.targets.len();
    for i in 0..n {
        let t = &res.targets[(start + i) % n];
        match &res.site {
            Some(site) => {
                if let Ok(s) = proxy.sites().open(site, t, Protocol::Udp).await {
                    return Some(UdpUpstream::Tunnel(s));
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
                if let Some(s) = socket {
                    return Some(UdpUpstream::Socket(s));
                }
            }
        }
    }
    None
}

async fn udp_flow(
    sock: Arc<tokio::net::UdpSocket>,
    peer: SocketAddr,
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    name: Name,
    proxy: Arc<Proxy>,
    done: tokio::sync::mpsc::UnboundedSender<SocketAddr>,
) {
    use warren_proto::tunnel::io::{read_datagram, write_datagram};
    let res = proxy.cluster().registry().resources().get(&name).cloned();
    let upstream = match &res {
        Some(res) => udp_upstream(&proxy, res).await,
        None => None,
    };
    let Some(upstream) = upstream else {
        tracing::warn!(resource = %name, "UDP resource: no target reachable");
        let _ = done.send(peer);
        return;
    };
    let mut changes = proxy.cluster().subscribe();
    let mut recheck = tokio::time::interval(Duration::from_secs(1));
    let mut buf = vec![0u8; 65_535];
    let idle = tokio::time::sleep(UDP_IDLE);
    tokio::pin!(idle);
    let (mut tunnel, socket) = match upstream {
        UdpUpstream::Tunnel(s) => (Some(tokio::io::split(s)), None),
        UdpUpstream::Socket(s) => (None, Some(s)),
    };
    loop {
        let from_upstream = async {
            match (&mut tunnel, &socket) {
                (Some((r, _)), _) => read_datagram(r, &mut buf).await.ok().flatten(),
                (None, Some(s)) => s.recv(&mut buf).await.ok(),
                (None, None) => None,
            }
        };
        tokio::select! {
            d = rx.recv() => {
                let Some(d) = d else { break };
                let sent = match (&mut tunnel, &socket) {
                    (Some((_, w)), _) => write_datagram(w, &d).await.is_ok(),
                    (None, Some(s)) => s.send(&d).await.is_ok(),
                    (None, None) => false,
                };
                if !sent {
                    break;
                }
                idle.as_mut().reset(tokio::time::Instant::now() + UDP_IDLE);
            }
            n = from_upstream => {
                let Some(n) = n else { break };
                let _ = sock.send_to(&buf[..n], peer).await;
                idle.as_mut().reset(tokio::time::Instant::now() + UDP_IDLE);
            }
            _ = &mut idle => break,
            _ = changes.changed() => {
                if !allowed(&proxy, &proxy.cluster().registry(), &name, peer.ip()).0 { break; }
            }
            _ = recheck.tick() => {
                if !allowed(&proxy, &proxy.cluster().registry(), &name, peer.ip()).0 { break; }
            }
        }
    }
    let _ = done.send(peer);
}
