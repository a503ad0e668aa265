//! Sites: the tunnels agents keep to this node, their enrollment, and the way to a site's
//! target from any node (a QUIC stream to the agent, here or one hop away on the node that
//! holds a tunnel).
//!
//! Two actors of the node's supervision tree own the site table
//! ([`warren_proto::sites`]), each one half, and publish it; everything else reads:
//!
//! ```text
//!  accept loop ─ warren-agent/1 ─► AgentService::serve: site certificate, hello
//!                                    │ Connected(connection, control stream)
//!                                    ▼
//!  Supervisor ─► Tunnels ── spawn_linked ──► AgentTunnel, one per agent: config out on
//!                 │ owns LocalTunnels          │ every registry change, health in (tasks it
//!                 │ ◄── Health(id, report) ────┘ owns); its end is a supervision event
//!                 └─ publish ─► Published<LocalTunnels<Connection>> ◄──┐
//!                                        ▲ held()                      │ load()
//!  Supervisor ─► Gossip ─────────────────┘                             ├─ Sites::open,
//!                 │ owns Holdings (TTLs) and the peer connections      │  relay_stream,
//!                 │ ◄── Held(peer, by its certificate) ── RelayService │  connected,
//!                 │ every second: tell every peer what this node holds │  target_ok, held
//!                 └─ publish ─► Published<Peers> ◄─────────────────────┘
//! ```
//!
//! Which node holds which site is soft state, not Raft: every node tells its peers the
//! sites it holds every second over `warren-relay/1` and forgets what it was told after
//! [`HELD_TTL`]. Data streams never pass through an actor: `open` and `relay_stream` read
//! the two snapshots (one atomic load each) and nothing else.
//!
//! Peer connections (to relay streams and to announce) are cached in the `Gossip`
//! snapshot, so a stream through a peer takes no lock either. `Gossip` is their only
//! writer: it dials peers to announce, and a request that finds no live connection dials
//! one itself and hands it to `Gossip` to keep. Two requests that miss at once may both
//! dial; `Gossip` keeps the first live connection and the other serves its request only.
//!
//! When `Tunnels` restarts its children go with it: every agent connection it held is
//! closed (the agents redial at once) and it starts from an empty table. When `Gossip`
//! restarts it forgets what peers said; they say it again within a second.

mod agent;
mod enroll;
mod gossip;
mod relay;
pub mod stats;
mod tunnels;
pub use self::tunnels::AgentInfo;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use ractor::ActorRef;
use tokio::sync::watch;
use warren_consensus::cluster::Cluster;
use warren_consensus::pki::{ClusterCa, CLUSTER_SERVER_NAME};
use warren_consensus::registry::Registry;
use warren_proto::registry::{NodeId, Target};
use warren_proto::sites::{LocalTunnels, Route, SiteView};
use warren_proto::tunnel::io::{read_frame, write_frame};
use warren_proto::tunnel::{Open, Opened, Protocol, MAX_HEADER};
use warren_proto::Name;

use crate::actors::ChildSpec;
use crate::publish::Published;

pub use self::agent::{site_config, AgentService};
pub use self::enroll::EnrollService;
pub use self::gossip::{GossipActor, GossipArgs, GossipMsg, Peers};
pub use self::relay::RelayService;
pub use self::tunnels::{Handover, TunnelsActor, TunnelsArgs, TunnelsMsg};
pub use warren_proto::sites::HELD_TTL;

/// How long opening a stream to a target may take (agent dial included).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A data stream to a target: bytes both ways, counted into the site's [`stats`].
pub type SiteStream =
    tokio::io::Join<stats::Counted<quinn::RecvStream>, stats::Counted<quinn::SendStream>>;

/// A stream to a target as QUIC opened it.
type RawStream = (quinn::RecvStream, quinn::SendStream);

/// The tunnels this node holds, as the `Tunnels` actor publishes them.
pub type Tunnels = LocalTunnels<quinn::Connection>;

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

/// Close code of an agent connection whose tunnel the node could not keep (its actor
/// failed, or the tunnel table restarted): the agent dials again.
const CLOSE_TUNNEL_LOST: u32 = 5;

/// The live incarnation of an actor of the tree, for the services that message it
/// (one atomic load; empty while it restarts).
pub struct Current<M>(ArcSwapOption<ActorRef<M>>);

impl<M> Current<M> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self(ArcSwapOption::empty()))
    }

    /// The live actor, if one runs.
    pub fn actor(&self) -> Option<ActorRef<M>> {
        self.0.load_full().map(|a| (*a).clone())
    }

    pub(crate) fn set(&self, actor: Option<ActorRef<M>>) {
        self.0.store(actor.map(Arc::new));
    }
}

/// The site service of a node: what the data path reads, and the handles of the two actors
/// that write it.
pub struct Sites {
    cluster: Cluster,
    ca: ClusterCa,
    cluster_id: u128,
    dialer: Arc<Dialer>,
    local: Arc<Published<Tunnels>>,
    peers: Arc<Published<Peers>>,
    tunnels: Arc<Current<TunnelsMsg>>,
    gossip: Arc<Current<GossipMsg>>,
    access: Arc<std::sync::OnceLock<Arc<crate::access::AccessShell>>>,
    agents: Arc<tunnels::AgentBook>,
    stats: stats::Stats,
}

impl std::fmt::Debug for Sites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sites")
            .field("held", &self.held())
            .finish_non_exhaustive()
    }
}

impl Sites {
    /// The site service of a node. Its snapshots exist from now on (empty); the actors that
    /// fill them are started by the tree, from [`Sites::children`].
    pub fn start(
        cluster: Cluster,
        ca: ClusterCa,
        cluster_id: u128,
        endpoint: quinn::Endpoint,
        relay_client: quinn::ClientConfig,
    ) -> Arc<Self> {
        let me = cluster.id();
        Arc::new(Self {
            dialer: Arc::new(Dialer::new(
                cluster.subscribe(),
                cluster_id,
                endpoint,
                relay_client,
            )),
            cluster,
            ca,
            cluster_id,
            local: Published::new(Tunnels::new()),
            peers: Published::new(Peers::new(me)),
            tunnels: Current::new(),
            gossip: Current::new(),
            access: Arc::new(std::sync::OnceLock::new()),
            agents: Arc::default(),
            stats: stats::Stats::default(),
        })
    }

    /// Appends the per-site stream and byte counters (of sites that still exist).
    pub fn render_stats(&self, out: &mut String) {
        let reg = self.cluster.registry();
        self.stats
            .render(out, |site| reg.sites().contains_key(site));
    }

    /// `raw`, counting its bytes (and one opened stream) into `site`'s counters.
    fn counted(&self, site: &Name, (recv, send): RawStream) -> SiteStream {
        let s = self.stats.of(site);
        s.opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::io::join(
            stats::Counted::new(recv, s.from_site.clone()),
            stats::Counted::new(send, s.to_site.clone()),
        )
    }

    /// The tree's children `tunnels` and `gossip`, to start before the listeners.
    pub fn children(&self) -> [ChildSpec; 2] {
        [
            TunnelsActor::child(
                TunnelsArgs {
                    registry: self.cluster.subscribe(),
                    local: self.local.clone(),
                    access: self.access.clone(),
                    agents: self.agents.clone(),
                },
                self.tunnels.clone(),
            ),
            GossipActor::child(
                GossipArgs {
                    me: self.cluster.id(),
                    registry: self.cluster.subscribe(),
                    local: self.local.clone(),
                    peers: self.peers.clone(),
                    dialer: self.dialer.clone(),
                },
                self.gossip.clone(),
            ),
        ]
    }

    /// Sets up client access for the tunnels started from now on (once, at start).
    pub fn set_access(&self, access: Arc<crate::access::AccessShell>) {
        let _ = self.access.set(access);
    }

    /// Client access, if set up.
    pub fn access(&self) -> Option<&Arc<crate::access::AccessShell>> {
        self.access.get()
    }

    /// The peers that last said they hold a tunnel to `site`.
    pub fn holders(&self, site: &Name) -> Vec<NodeId> {
        self.peers.load().holdings.holders(site, Instant::now())
    }

    /// Peers' holdings: every site any live peer holds, with the peers.
    pub fn peer_holdings(&self) -> Vec<(NodeId, Vec<Name>)> {
        let now = Instant::now();
        self.peers
            .load()
            .holdings
            .peers(now)
            .map(|(id, sites)| (id, sites.iter().cloned().collect()))
            .collect()
    }

    /// The agents of `site` connected to this node, and when its last one left here.
    pub fn agents(&self, site: &Name) -> (Vec<tunnels::AgentInfo>, Option<u64>) {
        self.agents.of(site)
    }

    /// Sites this node holds a tunnel to.
    pub fn held(&self) -> Vec<Name> {
        self.local.load().held()
    }

    /// Whether any node (this one or a peer, as last told) holds a tunnel to `site`.
    pub fn connected(&self, site: &Name) -> bool {
        let (local, peers) = (self.local.load(), self.peers.load());
        SiteView::new(&local, &peers.holdings).connected(site, Instant::now())
    }

    /// Whether this node's agents say `target` passes its check (unknown: yes); see
    /// [`warren_proto::sites`] for how the reports of several agents of a site combine.
    pub fn target_ok(&self, site: &Name, target: &Target) -> bool {
        self.local.load().target_ok(site, target)
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
        let opened = self.open_raw(site, target, protocol).await;
        match opened {
            Ok(raw) => Ok(self.counted(site, raw)),
            Err(e) => {
                self.stats
                    .of(site)
                    .failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(e)
            }
        }
    }

    async fn open_raw(
        &self,
        site: &Name,
        target: &Target,
        protocol: Protocol,
    ) -> Result<RawStream, OpenError> {
        use futures::stream::{FuturesUnordered, StreamExt as _};
        let header = Open {
            site: site.clone(),
            target: target.clone(),
            protocol,
        };
        let routes = {
            let (local, peers) = (self.local.load(), self.peers.load());
            SiteView::new(&local, &peers.holdings).routes(site, Instant::now())
        };
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

    async fn try_route(
        &self,
        route: Route<quinn::Connection>,
        header: &Open,
    ) -> Result<RawStream, OpenError> {
        let conn = match route {
            Route::Tunnel(_, c) => c,
            Route::Peer(id) => self.peer(id).await.map_err(OpenError::Failed)?,
        };
        open_on(&conn, header).await
    }

    /// A connection to peer node `id`: the one `Gossip` keeps, else a new one, handed to
    /// `Gossip` to keep.
    async fn peer(&self, id: NodeId) -> Result<quinn::Connection, String> {
        if let Some(c) = self.peers.load().conn(id) {
            return Ok(c.clone());
        }
        let conn = self.dialer.dial(id).await?;
        if let Some(gossip) = self.gossip.actor() {
            let _ = gossip.cast(GossipMsg::Dialed(id, conn.clone()));
        }
        Ok(conn)
    }
}

/// Dials peer nodes on `warren-relay/1` and checks that the right node answered.
pub struct Dialer {
    registry: watch::Receiver<Arc<Registry>>,
    cluster_id: u128,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
}

impl Dialer {
    /// A dialer from `endpoint` with `client` (the relay ALPN and this node's identity),
    /// finding nodes in `registry`.
    pub fn new(
        registry: watch::Receiver<Arc<Registry>>,
        cluster_id: u128,
        endpoint: quinn::Endpoint,
        client: quinn::ClientConfig,
    ) -> Self {
        Self {
            registry,
            cluster_id,
            endpoint,
            client,
        }
    }

    /// A new connection to node `id`, at the address the registry has for it.
    pub async fn dial(&self, id: NodeId) -> Result<quinn::Connection, String> {
        let addr = {
            let reg = self.registry.borrow();
            let node = reg
                .node_by_id(id)
                .ok_or_else(|| format!("node {id} is not in the registry"))?;
            node.cluster_addr.clone()
        };
        let sock = warren_consensus::quic::resolve(&addr)
            .await
            .map_err(|e| e.to_string())?;
        let conn = self
            .endpoint
            .connect_with(self.client.clone(), sock, CLUSTER_SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(Duration::from_secs(3), conn)
            .await
            .map_err(|_| format!("node {id}: no answer"))?
            .map_err(|e| e.to_string())?;
        // The address may belong to another node by now (or answer for one): data for
        // node `id` goes only to the holder of node `id`'s certificate.
        if let Err(why) = warren_consensus::quic::check_dialed_node(&conn, self.cluster_id, id) {
            conn.close(1u32.into(), b"not the node dialed");
            return Err(format!("node {id} at {addr}: {why}"));
        }
        Ok(conn)
    }
}

/// Opens a data stream on `conn` (to an agent, or to a relaying node) and waits for the
/// far end to say whether the target answered.
async fn open_on(conn: &quinn::Connection, header: &Open) -> Result<RawStream, OpenError> {
    let attempt = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| OpenError::Failed(e.to_string()))?;
        write_frame(&mut send, header)
            .await
            .map_err(|e| OpenError::Failed(e.to_string()))?;
        match read_frame::<_, Opened>(&mut recv, MAX_HEADER).await {
            Ok(Some(Opened::Ok)) => Ok((recv, send)),
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
