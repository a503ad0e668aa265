//! Sites: the tunnels agents keep to this node, their enrollment, and the way to a site's
//! target from any node (a QUIC stream to the agent, here or one hop away on the node that
//! holds a tunnel).
//!
//! Which node holds which site is soft state, not Raft: every node tells its peers the sites
//! it holds every second over `warren-relay/1`, and forgets what it was told after
//! [`HELD_TTL`]. Data streams never pass through an actor: the tunnel table is an `ArcSwap`.

mod agent;
mod enroll;
mod relay;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use warren_consensus::cluster::Cluster;
use warren_consensus::pki::{ClusterCa, CLUSTER_SERVER_NAME};
use warren_proto::registry::Target;
use warren_proto::tunnel::io::{read_frame, write_frame};
use warren_proto::tunnel::{Open, Opened, Protocol, MAX_HEADER};
use warren_proto::Name;

pub use self::agent::AgentService;
pub use self::enroll::EnrollService;
pub use self::relay::RelayService;

/// How long a peer's word that it holds a site counts.
pub const HELD_TTL: Duration = Duration::from_millis(3500);
/// How long opening a stream to a target may take (agent dial included).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A data stream to a target: bytes both ways.
pub type SiteStream = tokio::io::Join<quinn::RecvStream, quinn::SendStream>;

/// Why a stream to a site's target could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    /// No node holds a tunnel to the site.
    #[error("site {0} is not connected (no agent tunnel)")]
    NotConnected(Name),
    /// The agent could not reach the target.
    #[error("the agent could not reach the target: {0}")]
    Refused(String),
    /// The tunnel or the relay failed.
    #[error("the tunnel failed: {0}")]
    Failed(String),
}

/// Buffer size of each direction when splicing a stream (bulk transfers move in large
/// chunks instead of tokio's default 8 KiB).
pub const COPY_BUF: usize = 64 * 1024;

/// How long a route to a site gets before the next one is tried alongside.
const HEAD_START: Duration = Duration::from_millis(300);

/// A way to a site's agent.
enum Route {
    /// A tunnel this node holds.
    Tunnel(quinn::Connection),
    /// A peer node that holds one.
    Peer(u64),
}

/// One agent connection.
#[derive(Clone)]
struct Tunnel {
    id: u64,
    conn: quinn::Connection,
}

/// Tunnels, peers' holdings and target health.
pub struct Sites {
    cluster: Cluster,
    ca: ClusterCa,
    cluster_id: u128,
    endpoint: quinn::Endpoint,
    relay_client: quinn::ClientConfig,
    local: ArcSwap<HashMap<Name, Vec<Tunnel>>>,
    local_update: Mutex<()>,
    remote: ArcSwap<HashMap<Name, Vec<(u64, Instant)>>>,
    remote_update: Mutex<()>,
    health: ArcSwap<HashMap<(Name, Target), bool>>,
    health_update: Mutex<()>,
    peers: Mutex<HashMap<u64, quinn::Connection>>,
}

impl std::fmt::Debug for Sites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sites")
            .field("held", &self.held())
            .finish_non_exhaustive()
    }
}

impl Sites {
    /// The site service of a node; starts telling peers what it holds.
    pub fn start(
        cluster: Cluster,
        ca: ClusterCa,
        cluster_id: u128,
        endpoint: quinn::Endpoint,
        relay_client: quinn::ClientConfig,
    ) -> Arc<Self> {
        let sites = Arc::new(Self {
            cluster,
            ca,
            cluster_id,
            endpoint,
            relay_client,
            local: ArcSwap::from_pointee(HashMap::new()),
            local_update: Mutex::new(()),
            remote: ArcSwap::from_pointee(HashMap::new()),
            remote_update: Mutex::new(()),
            health: ArcSwap::from_pointee(HashMap::new()),
            health_update: Mutex::new(()),
            peers: Mutex::new(HashMap::new()),
        });
        tokio::spawn(relay::announce(Arc::downgrade(&sites)));
        sites
    }

    /// Sites this node holds a tunnel to.
    pub fn held(&self) -> Vec<Name> {
        let mut v: Vec<Name> = self.local.load().keys().cloned().collect();
        v.sort();
        v
    }

    /// Whether any node (this one or a peer, as last told) holds a tunnel to `site`.
    pub fn connected(&self, site: &Name) -> bool {
        self.local.load().contains_key(site) || !self.holders(site).is_empty()
    }

    /// Whether the agent last reported `target` as passing its check (unknown: yes).
    pub fn target_ok(&self, site: &Name, target: &Target) -> bool {
        self.health
            .load()
            .get(&(site.clone(), target.clone()))
            .copied()
            .unwrap_or(true)
    }

    fn add_tunnel(&self, site: &Name, t: Tunnel) {
        let _g = self.local_update.lock().expect("sites lock");
        let mut map = (**self.local.load()).clone();
        map.entry(site.clone()).or_default().insert(0, t);
        self.local.store(Arc::new(map));
    }

    fn remove_tunnel(&self, site: &Name, id: u64) {
        let _g = self.local_update.lock().expect("sites lock");
        let mut map = (**self.local.load()).clone();
        if let Some(v) = map.get_mut(site) {
            v.retain(|t| t.id != id);
            if v.is_empty() {
                map.remove(site);
            }
        }
        self.local.store(Arc::new(map));
    }

    fn set_health(&self, site: &Name, report: Vec<(Target, bool)>) {
        let _g = self.health_update.lock().expect("sites lock");
        let mut map = (**self.health.load()).clone();
        for (t, ok) in report {
            map.insert((site.clone(), t), ok);
        }
        self.health.store(Arc::new(map));
    }

    fn set_held_by(&self, node: u64, sites: Vec<Name>) {
        let _g = self.remote_update.lock().expect("sites lock");
        let now = Instant::now();
        let mut map: HashMap<Name, Vec<(u64, Instant)>> = (**self.remote.load()).clone();
        for v in map.values_mut() {
            v.retain(|(n, until)| *n != node && *until > now);
        }
        for s in sites {
            map.entry(s).or_default().push((node, now + HELD_TTL));
        }
        map.retain(|_, v| !v.is_empty());
        self.remote.store(Arc::new(map));
    }

    /// Peers that said they hold `site`, the most recently heard from first (a node that
    /// died stops refreshing its word, so it sorts last within a second).
    fn holders(&self, site: &Name) -> Vec<u64> {
        let now = Instant::now();
        let me = self.cluster.id().0;
        let mut v: Vec<(u64, Instant)> = self
            .remote
            .load()
            .get(site)
            .map(|v| {
                v.iter()
                    .filter(|(n, until)| *until > now && *n != me)
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|(_, until)| std::cmp::Reverse(*until));
        v.into_iter().map(|(n, _)| n).collect()
    }

    /// Opens a stream to `target` behind `site`: through a tunnel this node holds, else
    /// through a peer that holds one. Routes are tried in order, each getting a head start
    /// of [`HEAD_START`] before the next one is tried alongside (a dead peer's connection
    /// only times out after seconds); the first that answers wins.
    pub async fn open(
        &self,
        site: &Name,
        target: &Target,
        protocol: Protocol,
    ) -> Result<SiteStream, OpenError> {
        use futures::stream::{FuturesUnordered, StreamExt as _};
        let header = Open {
            site: site.clone(),
            target: target.clone(),
            protocol,
        };
        let mut routes: Vec<Route> = self
            .local
            .load()
            .get(site)
            .map(|v| v.iter().map(|t| Route::Tunnel(t.conn.clone())).collect())
            .unwrap_or_default();
        routes.extend(self.holders(site).into_iter().map(Route::Peer));
        if routes.is_empty() {
            return Err(OpenError::NotConnected(site.clone()));
        }
        let mut pending = FuturesUnordered::new();
        let mut routes = routes.into_iter();
        let mut last = None;
        loop {
            if let Some(route) = routes.next() {
                pending.push(self.try_route(route, &header));
            }
            if pending.is_empty() {
                break;
            }
            let more = routes.len() > 0;
            let next = if more {
                tokio::time::timeout(HEAD_START, pending.next()).await.ok()
            } else {
                Some(pending.next().await)
            };
            match next {
                // Head start over: start the next route alongside.
                None => continue,
                Some(None) => break,
                Some(Some(Ok(s))) => return Ok(s),
                Some(Some(Err(e @ OpenError::Refused(_)))) => return Err(e),
                Some(Some(Err(e))) => last = Some(e),
            }
        }
        // Every route failed (tunnels going away, peers that no longer hold one): to the
        // user that is a site that is not connected, not a failing app.
        if let Some(e) = last {
            tracing::debug!(%site, "no route to the site worked: {e}");
        }
        Err(OpenError::NotConnected(site.clone()))
    }

    async fn try_route(&self, route: Route, header: &Open) -> Result<SiteStream, OpenError> {
        let conn = match route {
            Route::Tunnel(c) => c,
            Route::Peer(id) => self.peer(id).await.map_err(OpenError::Failed)?,
        };
        open_on(&conn, header).await
    }

    /// A connection to peer node `id` (cached while it lives).
    async fn peer(&self, id: u64) -> Result<quinn::Connection, String> {
        if let Some(c) = self.peers.lock().expect("peers lock").get(&id) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let reg = self.cluster.registry();
        let node = reg
            .node_by_id(warren_proto::registry::NodeId(id))
            .ok_or_else(|| format!("node {id} is not in the registry"))?;
        let addr = warren_consensus::quic::resolve(&node.cluster_addr)
            .await
            .map_err(|e| e.to_string())?;
        let conn = self
            .endpoint
            .connect_with(self.relay_client.clone(), addr, CLUSTER_SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(Duration::from_secs(3), conn)
            .await
            .map_err(|_| format!("node {id}: no answer"))?
            .map_err(|e| e.to_string())?;
        // The address may belong to another node by now (or answer for one): data for
        // node `id` goes only to the holder of node `id`'s certificate.
        if let Err(why) = warren_consensus::quic::check_dialed_node(
            &conn,
            self.cluster_id,
            warren_proto::registry::NodeId(id),
        ) {
            conn.close(1u32.into(), b"not the node dialed");
            return Err(format!("node {id} at {}: {why}", node.cluster_addr));
        }
        self.peers
            .lock()
            .expect("peers lock")
            .insert(id, conn.clone());
        Ok(conn)
    }
}

/// Opens a data stream on `conn` (to an agent, or to a relaying node) and waits for the
/// far end to say whether the target answered.
async fn open_on(conn: &quinn::Connection, header: &Open) -> Result<SiteStream, OpenError> {
    let attempt = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| OpenError::Failed(e.to_string()))?;
        write_frame(&mut send, header)
            .await
            .map_err(|e| OpenError::Failed(e.to_string()))?;
        match read_frame::<_, Opened>(&mut recv, MAX_HEADER).await {
            Ok(Some(Opened::Ok)) => Ok(tokio::io::join(recv, send)),
            Ok(Some(Opened::Refused(why))) => Err(OpenError::Refused(why)),
            Ok(None) => Err(OpenError::Failed(
                "the stream closed before an answer".into(),
            )),
            Err(e) => Err(OpenError::Failed(format!("reading the answer: {e}"))),
        }
    };
    tokio::time::timeout(OPEN_TIMEOUT, attempt)
        .await
        .map_err(|_| OpenError::Failed("no answer in time".into()))?
}

#[cfg(test)]
mod tests {
    use warren_proto::tunnel::io::read_frame;
    use warren_proto::tunnel::{encode_frame, FrameError, Open, MAX_HEADER};

    #[tokio::test]
    async fn oversized_truncated_and_malformed_headers_are_refused() {
        // A length over the limit is refused before anything is read or allocated.
        let mut oversized: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        assert!(matches!(
            read_frame::<_, Open>(&mut oversized, MAX_HEADER).await,
            Err(FrameError::TooLarge {
                max: MAX_HEADER,
                ..
            })
        ));
        // Shorter than it says.
        let mut truncated: &[u8] = &[0, 0, 0, 50, 1, 2, 3];
        assert!(matches!(
            read_frame::<_, Open>(&mut truncated, MAX_HEADER).await,
            Err(FrameError::Truncated)
        ));
        // Well framed, but not an Open (a target that does not parse).
        let garbage = encode_frame(&("hq", "not a target", 7u8));
        let mut garbage: &[u8] = &garbage;
        assert!(matches!(
            read_frame::<_, Open>(&mut garbage, MAX_HEADER).await,
            Err(FrameError::Malformed(_))
        ));
        // A clean end of stream is not an error.
        let mut empty: &[u8] = &[];
        assert!(read_frame::<_, Open>(&mut empty, MAX_HEADER)
            .await
            .unwrap()
            .is_none());
    }
}
