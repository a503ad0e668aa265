//! Public TCP ports: a TCP resource listens on its port on every node, checks each new
//! connection against the resource's policies (source address; deny by default), and
//! splices it to a target, directly or through the site's tunnel. Open connections are
//! checked again whenever the registry changes, and cut when no longer allowed.

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

/// The listeners of TCP resources.
pub struct L4 {
    listeners: Mutex<HashMap<u16, (Name, JoinHandle<()>)>>,
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
        let wanted: HashMap<u16, Name> = reg
            .resources()
            .values()
            .filter_map(|r| match r.route {
                Route::Tcp { port } => Some((port, r.name.clone())),
                _ => None,
            })
            .collect();
        {
            let mut listeners = me.listeners.lock().expect("l4 lock");
            listeners.retain(|port, (name, task)| {
                let keep = wanted.get(port) == Some(name) && !task.is_finished();
                if !keep {
                    task.abort();
                    tracing::info!(port, resource = %name, "TCP resource port closed");
                }
                keep
            });
            for (port, name) in &wanted {
                if listeners.contains_key(port) {
                    continue;
                }
                let addr = SocketAddr::new(ip, *port);
                match std::net::TcpListener::bind(addr).and_then(|l| {
                    l.set_nonblocking(true)?;
                    TcpListener::from_std(l)
                }) {
                    Ok(listener) => {
                        tracing::info!(%addr, resource = %name, "TCP resource listening");
                        let task = tokio::spawn(accept(listener, name.clone(), proxy.clone()));
                        listeners.insert(*port, (name.clone(), task));
                    }
                    Err(e) => {
                        tracing::warn!(%addr, resource = %name, "cannot listen for a TCP resource: {e}")
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
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
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
