//! Relay-only nodes: `warren-node relay`, a node an operator runs far away (perhaps one
//! who is not you) that carries client↔agent WireGuard ciphertext and nothing else.
//!
//! ```text
//!  enrollment (once)                               any voter
//!   RegisterRelay{token, name, relay addr, CSR} ─► the token's role is `relay`? RegisterNode
//!                                                  (role relay, never a member) + its relay
//!   ◄── Registered{id, role relay, cert, CA}       address; the CSR signed `…/node/<id>/relay`
//!
//!  running                                         any voter or learner (ALPN warren-relay-feed/1)
//!   every FEED_INTERVAL: Feed? (mTLS, relay cert) ─► still a relay node in the registry?
//!   ◄── Feed{ticket public keys, holders, relays, nodes}    else Revoked: the node stops
//!   RelayActor + CoordinatorActor, as on any node, on what the feed said last
//! ```
//!
//! What it holds: its own key and certificate (role `relay`, which every member refuses for
//! Raft, forwarding and plaintext relay streams), the CA certificate (no key), and the
//! last feed in memory: the public halves of the ticket keys, which relays hold which sites
//! and the relay addresses of the cluster. No registry, no user data, no secrets of others.
//! Each relay session is admitted by a ticket the cluster signed, as on every relay.
//!
//! Revocation: `warren admin node delete <name>` removes the node's record. The feed then
//! answers Revoked and the node stops relaying and exits; members stop listing it to
//! clients and agents, and their relays forget the bindings it made to them (the sessions
//! through it end even if it kept running).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use arc_swap::ArcSwap;
use ractor::Actor;
use serde::{Deserialize, Serialize};
use warren_consensus::cluster::Cluster;
use warren_consensus::pki::{self, ClusterCa, CLUSTER_SERVER_NAME};
use warren_consensus::quic::{read_message, request, resolve, write_message};
use warren_proto::identity::Peer;
use warren_proto::registry::{NodeId, NodeRole};
use warren_proto::relay::ALPN_RELAY_FEED;
use warren_proto::token::JoinToken;
use warren_proto::Name;

use crate::actors::{Supervisor, SupervisorArgs};
use crate::datadir::DataDir;
use crate::join::{JoinReply, JoinRequest};
use crate::relay::{Coordinate, DeviceBound, RelayView, TicketKeys};

/// How often a relay-only node asks for its feed (and so how soon it learns it was revoked).
pub const FEED_INTERVAL: Duration = Duration::from_secs(2);
/// How long one feed request (connecting included) may take before the next node is tried.
const FEED_TIMEOUT: Duration = Duration::from_secs(5);
/// A relay-only node without a feed for this long says so (it goes on with the last one:
/// tickets are verified with keys it has, and a ticket's lifetime bounds what it admits).
const STALE_WARNING: Duration = Duration::from_secs(30);
/// Largest feed accepted, bytes.
const MAX_FEED: usize = 4 << 20;
/// Largest feed request accepted, bytes.
const MAX_FEED_REQUEST: usize = 1024;
/// Largest join answer accepted, bytes.
const MAX_JOIN_REPLY: usize = 64 << 10;
/// The file naming a relay-only node in its data directory.
pub const RELAY_FILE: &str = "relay.json";

/// A relay-only node's request on the feed.
#[derive(Debug, Serialize, Deserialize)]
pub enum FeedRequest {
    /// What relaying needs now.
    Feed,
}

/// The answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum FeedReply {
    /// What relaying needs now.
    Feed(Feed),
    /// The node is no longer a relay of this cluster: stop.
    Revoked(String),
}

/// What a relay-only node gets of the cluster: exactly what relaying needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feed {
    /// The public halves of the ticket signing keys, by `kid`.
    pub keys: Vec<(String, Vec<u8>)>,
    /// The relay addresses of the nodes holding each site's tunnel (where a client's
    /// binding goes on to, one hop).
    pub holders: Vec<(Name, Vec<SocketAddr>)>,
    /// Every relay address of the cluster (a Bind from one is a hop).
    pub relays: Vec<SocketAddr>,
    /// The cluster addresses of the members, to ask for the feed when one is gone.
    pub nodes: Vec<String>,
}

/// What a relay-only node's data directory says about it (`relay.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayFile {
    /// The cluster (32 hex digits).
    pub cluster_id: String,
    /// Its id in the registry (also in its certificate).
    pub node_id: u64,
    /// Its name.
    pub name: Name,
    /// The relay address clients and agents are told (UDP).
    pub relay: SocketAddr,
    /// Cluster addresses to ask for the feed, the last list the cluster gave first.
    pub peers: Vec<String>,
}

/// The cluster's side: serves the feed to relay-only nodes still in the registry.
pub struct FeedService {
    /// The cluster (the local replica is read).
    pub cluster: Cluster,
    /// This cluster.
    pub cluster_id: u128,
    /// The tunnels held here and at peers.
    pub sites: Arc<crate::sites::Sites>,
    /// This node's relay address, when it runs one.
    pub relay: Option<SocketAddr>,
}

impl warren_consensus::quic::OtherAlpn for FeedService {
    fn alpn(&self) -> &'static [u8] {
        ALPN_RELAY_FEED
    }

    fn serve(
        self: Arc<Self>,
        conn: quinn::Connection,
    ) -> warren_consensus::transport::BoxFuture<'static, ()> {
        Box::pin(self.serve_feed(conn))
    }
}

impl FeedService {
    async fn serve_feed(self: Arc<Self>, conn: quinn::Connection) {
        let who = match pki::peer_node(&conn) {
            Ok(n) if n.cluster_id == self.cluster_id && n.role == NodeRole::Relay => n,
            Ok(n) => {
                tracing::warn!(peer = %conn.remote_address(), "refused the relay feed to {n}: only relay-only nodes of this cluster get it");
                conn.close(1u32.into(), b"not a relay-only node of this cluster");
                return;
            }
            Err(why) => {
                tracing::warn!(peer = %conn.remote_address(), "refused the relay feed: {why}");
                conn.close(1u32.into(), b"no node certificate");
                return;
            }
        };
        loop {
            let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                return;
            };
            let reply = match read_message::<FeedRequest>(&mut recv, MAX_FEED_REQUEST).await {
                Ok(FeedRequest::Feed) => self.feed(who.id),
                Err(_) => return,
            };
            // Revoked or not, the connection stays until the relay closes it: closing it
            // here could lose the answer in flight.
            if write_message(&mut send, &reply).await.is_err() {
                return;
            }
        }
    }

    /// The feed for relay-only node `id`, from the local replica.
    pub fn feed(&self, id: NodeId) -> FeedReply {
        let reg = self.cluster.registry();
        match reg.node_by_id(id) {
            Some(n) if n.role == NodeRole::Relay => {}
            _ => {
                return FeedReply::Revoked(format!(
                    "node {id} is no longer a relay of this cluster (an admin removed it)"
                ))
            }
        }
        let keys = reg
            .proxy_keys()
            .map(|k| TicketKeys::from_signing_keys(&k.signing_keys))
            .unwrap_or_default()
            .public()
            .to_vec();
        let mut holders = crate::access::peer_relays(&reg, &self.sites);
        if let Some(me) = self.relay {
            for site in self.sites.held() {
                let list = holders.entry(site).or_default();
                if !list.contains(&me) {
                    list.push(me);
                }
            }
        }
        FeedReply::Feed(Feed {
            keys,
            holders: holders.into_iter().collect(),
            relays: crate::access::all_relays(&reg),
            nodes: reg
                .member_grade_nodes()
                .map(|n| n.cluster_addr.clone())
                .collect(),
        })
    }
}

/// `warren-node relay` the first time: how to enroll.
pub struct Enrollment {
    /// The node's name.
    pub name: Name,
    /// A cluster address of any voter.
    pub peer: String,
    /// A join token made with `--role relay`.
    pub token: JoinToken,
    /// Region label.
    pub region: String,
}

/// Where the relay listens and what it tells, from the settings (and, after enrollment,
/// the relay file): `--relay-listen` (default `0.0.0.0:<public port>`, or `0.0.0.0:7401`)
/// and `--relay-public` (default: the listening address, which must then be a specific one).
fn addresses(
    settings: &crate::Settings,
    stored: Option<SocketAddr>,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let public: Option<SocketAddr> = match settings.relay_public.as_deref() {
        Some(p) => Some(p.parse().map_err(|_| {
            anyhow::anyhow!("invalid setting --relay-public {p:?}: expected ip:port")
        })?),
        None => stored,
    };
    let listen: SocketAddr = match settings.relay_listen.as_deref() {
        Some("off") => bail!("--relay-listen off: a relay-only node is its relay"),
        Some(a) => a.parse().map_err(|_| {
            anyhow::anyhow!("invalid setting --relay-listen {a:?}: expected ip:port")
        })?,
        None => SocketAddr::new(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
            public.map_or(7401, |p| p.port()),
        ),
    };
    let public = match public {
        Some(p) => p,
        None if listen.ip().is_unspecified() || listen.port() == 0 => bail!(
            "say where clients and agents reach this relay: --relay-public ip:port (it listens on {listen})"
        ),
        None => listen,
    };
    Ok((listen, public))
}

/// Enrolls through a voter and writes the data directory; returns the relay file.
pub async fn enroll(
    dir: &DataDir,
    how: &Enrollment,
    settings: &crate::Settings,
) -> anyhow::Result<RelayFile> {
    let (_, public) = addresses(settings, None)?;
    let peer = resolve(&how.peer)
        .await
        .map_err(|e| anyhow::anyhow!("--peer: {e}"))?;
    dir.begin_create()?;
    let (key_pem, csr_pem) = pki::node_key_and_csr(how.name.as_str())?;
    let endpoint =
        quinn::Endpoint::client(unspecified_for(peer)).context("opening a QUIC socket")?;
    let conn = endpoint
        .connect_with(
            pki::join_client_config(how.token.ca_fingerprint)?,
            peer,
            CLUSTER_SERVER_NAME,
        )
        .context("connecting to the peer")?;
    let conn = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {} within 10 s", how.peer))?
        .map_err(|e| anyhow::anyhow!("cannot reach {}: {e}", how.peer))?;
    let reply: JoinReply = request(
        &conn,
        &JoinRequest::RegisterRelay {
            token: how.token.reveal(),
            name: how.name.clone(),
            relay: public.to_string(),
            region: how.region.clone(),
            csr_pem,
        },
        MAX_JOIN_REPLY,
    )
    .await
    .map_err(|e| anyhow::anyhow!("enrolling with {}: {e}", how.peer))?;
    conn.close(0u32.into(), b"enrolled");
    endpoint.wait_idle().await;
    let (node_id, cluster_id, cert_pem, ca_pem) = match reply {
        JoinReply::Registered {
            node_id,
            role: NodeRole::Relay,
            cluster_id,
            cert_pem,
            ca_pem,
            ca_key_pem: None,
        } => (node_id, cluster_id, cert_pem, ca_pem),
        JoinReply::Registered { role, .. } => {
            bail!(
                "{} registered this node as a {role}, not relay-only: refusing",
                how.peer
            )
        }
        JoinReply::Refused(why) => bail!("{} refused the enrollment: {why}", how.peer),
        JoinReply::Admitted { .. } => bail!("{} answered out of turn", how.peer),
    };
    if cluster_id != how.token.cluster_id {
        bail!("{} answered for another cluster than the token's", how.peer);
    }
    let ca = ClusterCa::from_pem(&ca_pem, None)?;
    if ca.fingerprint() != how.token.ca_fingerprint {
        bail!("{} sent a CA that does not match the join token", how.peer);
    }
    dir.write("ca.pem", ca_pem.as_bytes(), false)?;
    dir.write("node.pem", cert_pem.as_bytes(), false)?;
    dir.write("node.key", key_pem.as_bytes(), true)?;
    let file = RelayFile {
        cluster_id: format!("{cluster_id:032x}"),
        node_id,
        name: how.name.clone(),
        relay: public,
        peers: vec![how.peer.clone()],
    };
    dir.write(RELAY_FILE, &serde_json::to_vec_pretty(&file)?, false)?;
    dir.finish_create()?;
    tracing::info!(node_id, relay = %public, "enrolled as a relay-only node");
    Ok(file)
}

fn unspecified_for(peer: SocketAddr) -> SocketAddr {
    if peer.is_ipv6() {
        "[::]:0".parse().expect("valid")
    } else {
        "0.0.0.0:0".parse().expect("valid")
    }
}

/// Reads the relay file, if the directory holds a relay-only node.
pub fn relay_file(dir: &DataDir) -> anyhow::Result<Option<RelayFile>> {
    let path = dir.path(RELAY_FILE);
    if !path.exists() || dir.path(".incomplete").exists() {
        return Ok(None);
    }
    let text = dir.read(RELAY_FILE)?;
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!("{} is damaged", path.display())
    })?))
}

/// What the relay task reads, as the feed said last.
#[derive(Default)]
struct FeedState {
    keys: TicketKeys,
    holders: HashMap<Name, Vec<SocketAddr>>,
    relays: Vec<SocketAddr>,
}

struct FeedView {
    state: ArcSwap<FeedState>,
    coordinator: Arc<crate::coordinator::Coordinator>,
}

impl RelayView for FeedView {
    fn keys(&self) -> TicketKeys {
        self.state.load().keys.clone()
    }

    fn holders(&self) -> HashMap<Name, Vec<SocketAddr>> {
        self.state.load().holders.clone()
    }

    fn relays(&self) -> Vec<SocketAddr> {
        self.state.load().relays.clone()
    }

    fn held(&self) -> Option<Vec<Name>> {
        None
    }

    // No registry here: who is bound where is the cluster's to learn from its own relays,
    // never from a relay-only node.
    fn device_bound(&self, _bound: DeviceBound) {}

    fn coordinate(&self, punch: Coordinate) {
        self.coordinator.punch(punch);
    }

    fn pairing_gone(&self, client: (SocketAddr, u32)) {
        self.coordinator.gone(client);
    }
}

/// A running relay-only node.
pub struct RelayNode {
    /// What its data directory says.
    pub file: RelayFile,
    /// Where its relay listens.
    pub listen: SocketAddr,
    dir: DataDir,
    feed: FeedClient,
    supervisor: ractor::ActorRef<crate::actors::SupervisorMsg>,
    done: tokio::task::JoinHandle<()>,
}

struct FeedClient {
    cluster_id: u128,
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    view: Arc<FeedView>,
    conn: Option<quinn::Connection>,
}

impl RelayNode {
    /// Starts the relay-only node stored in `dir` (enrolled already).
    pub async fn start(dir: DataDir, settings: &crate::Settings) -> anyhow::Result<Self> {
        let file = relay_file(&dir)?.with_context(|| {
            format!(
                "{} holds no relay-only node: enroll one with `warren-node relay --data-dir {} --peer <cluster addr> --token <join token made with --role relay> --name <name>`",
                dir.root().display(),
                dir.root().display()
            )
        })?;
        let cluster_id = u128::from_str_radix(&file.cluster_id, 16)
            .context("relay.json: cluster_id is not a hex number")?;
        let ca = dir.ca()?;
        let identity = dir.identity(&ca)?;
        match identity.peer() {
            Peer::Node(n) if n.role == NodeRole::Relay && n.cluster_id == cluster_id => {}
            other => bail!(
                "{}: the certificate is not this cluster's relay-only node certificate ({other:?})",
                dir.path("node.pem").display()
            ),
        }
        let (listen, public) = addresses(settings, Some(file.relay))?;
        let socket = std::net::UdpSocket::bind(listen)
            .with_context(|| format!("the relay cannot listen on {listen} (UDP)"))?;
        let bound = socket.local_addr()?;
        socket.set_nonblocking(true)?;
        crate::relay::tune_socket(&socket);
        let socket = Arc::new(tokio::net::UdpSocket::from_std(socket)?);
        let stats = Arc::new(crate::relay::RelayStats::default());
        let coordinator = crate::coordinator::Coordinator::new(socket.clone());
        let view = Arc::new(FeedView {
            state: ArcSwap::from_pointee(FeedState::default()),
            coordinator: coordinator.clone(),
        });
        let mut feed = FeedClient {
            cluster_id,
            endpoint: quinn::Endpoint::client("0.0.0.0:0".parse().expect("valid"))
                .context("opening a QUIC socket")?,
            config: pki::quic_client_config_for(&ca, &identity, ALPN_RELAY_FEED)?,
            view: view.clone(),
            conn: None,
        };
        // The first feed before serving: without keys every Bind would be refused.
        let mut peers = file.peers.clone();
        match feed.fetch(&peers).await {
            Fetched::Feed(f) => peers = merge_peers(&f.nodes, &peers),
            Fetched::Revoked(why) => bail!(
                "the cluster says: {why}. This relay-only node is revoked; enroll it again with a new join token and a new data directory"
            ),
            Fetched::Unreachable(why) => {
                tracing::warn!("no cluster node answered the relay feed ({why}); relaying begins once one does")
            }
        }
        let children = vec![
            coordinator.child(),
            crate::relay::RelayActor::child(crate::relay::RelayArgs {
                socket,
                me: vec![public, bound],
                view,
                stats,
            }),
        ];
        let health = crate::publish::Published::new(crate::actors::TreeHealth::default());
        let (supervisor, done) =
            Actor::spawn(None, Supervisor, SupervisorArgs { children, health })
                .await
                .context("starting the supervision tree")?;
        let mut file = file;
        file.peers = peers;
        tracing::info!(node = %file.name, id = file.node_id, relay = %public, listen = %bound, "relay-only node started");
        Ok(Self {
            file,
            listen: bound,
            dir,
            feed,
            supervisor,
            done,
        })
    }

    /// Relays until `shutdown`, the tree stops, or the cluster revokes the node (an error).
    pub async fn serve_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut tick = tokio::time::interval(FEED_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_feed = Instant::now();
        let mut warned = Instant::now();
        let outcome = loop {
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                _ = &mut self.done => break Err(anyhow::anyhow!("the supervision tree stopped")),
                _ = tick.tick() => {}
            }
            let fetched = self.feed.fetch(&self.file.peers).await;
            tracing::debug!(feed = ?fetched, "relay feed");
            match fetched {
                Fetched::Feed(f) => {
                    last_feed = Instant::now();
                    let peers = merge_peers(&f.nodes, &self.file.peers);
                    if peers != self.file.peers {
                        self.file.peers = peers;
                        if let Err(e) = serde_json::to_vec_pretty(&self.file)
                            .map_err(anyhow::Error::from)
                            .and_then(|j| self.dir.write(RELAY_FILE, &j, false))
                        {
                            tracing::warn!("cannot record the cluster's nodes in {RELAY_FILE}: {e:#}");
                        }
                    }
                }
                Fetched::Revoked(why) => {
                    break Err(anyhow::anyhow!(
                        "the cluster says: {why}. This relay-only node stops relaying now; enroll it again with a new join token to serve again"
                    ))
                }
                Fetched::Unreachable(why) => {
                    if last_feed.elapsed() >= STALE_WARNING && warned.elapsed() >= STALE_WARNING {
                        warned = Instant::now();
                        tracing::error!(
                            "no feed from the cluster for {} s ({why}): relaying on what it said last",
                            last_feed.elapsed().as_secs()
                        );
                    }
                }
            }
        };
        self.supervisor.stop(Some("shutdown".into()));
        let _ = tokio::time::timeout(Duration::from_secs(5), self.done).await;
        self.feed.endpoint.close(0u32.into(), b"stopping");
        outcome
    }
}

#[derive(Debug)]
enum Fetched {
    Feed(Feed),
    Revoked(String),
    Unreachable(String),
}

/// The cluster's list first, then what was known before (deduplicated).
fn merge_peers(nodes: &[String], known: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in nodes.iter().chain(known) {
        if !out.contains(p) {
            out.push(p.clone());
        }
    }
    out.truncate(16);
    out
}

impl FeedClient {
    /// One feed: on the open connection, else from each peer in turn.
    async fn fetch(&mut self, peers: &[String]) -> Fetched {
        let mut why = String::from("no cluster address known");
        if let Some(conn) = self.conn.clone() {
            match self.ask(&conn).await {
                Ok(r) => return self.take(r),
                Err(e) => {
                    why = e;
                    self.conn = None;
                }
            }
        }
        for p in peers {
            let conn = match self.connect(p).await {
                Ok(c) => c,
                Err(e) => {
                    why = format!("{p}: {e}");
                    continue;
                }
            };
            match self.ask(&conn).await {
                Ok(r) => {
                    self.conn = Some(conn);
                    return self.take(r);
                }
                Err(e) => why = format!("{p}: {e}"),
            }
        }
        Fetched::Unreachable(why)
    }

    fn take(&mut self, reply: FeedReply) -> Fetched {
        match reply {
            FeedReply::Feed(f) => {
                self.view.state.store(Arc::new(FeedState {
                    keys: TicketKeys::from_public(f.keys.clone()),
                    holders: f.holders.iter().cloned().collect(),
                    relays: f.relays.clone(),
                }));
                Fetched::Feed(f)
            }
            FeedReply::Revoked(why) => {
                // Nothing more is admitted from here on, whatever else happens.
                self.view.state.store(Arc::new(FeedState::default()));
                Fetched::Revoked(why)
            }
        }
    }

    async fn connect(&self, peer: &str) -> Result<quinn::Connection, String> {
        let addr = resolve(peer).await.map_err(|e| e.to_string())?;
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), addr, CLUSTER_SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(FEED_TIMEOUT, connecting)
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| e.to_string())?;
        // Any certificate of the cluster CA passes TLS; the feed comes from members only
        // (another relay-only node must not feed this one).
        match pki::peer_node(&conn) {
            Ok(n) if n.cluster_id == self.cluster_id && n.role != NodeRole::Relay => Ok(conn),
            Ok(n) => {
                conn.close(1u32.into(), b"not a member");
                Err(format!("{n} is not a member of this cluster"))
            }
            Err(why) => Err(why.to_owned()),
        }
    }

    async fn ask(&self, conn: &quinn::Connection) -> Result<FeedReply, String> {
        tokio::time::timeout(FEED_TIMEOUT, request(conn, &FeedRequest::Feed, MAX_FEED))
            .await
            .map_err(|_| "no feed within 5 s".to_owned())?
            .map_err(|e| e.to_string())
    }
}
