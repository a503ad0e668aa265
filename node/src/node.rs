//! A node's lifecycle: `init` a new cluster, `join` an existing one, `run` from a data
//! directory. All three end up with a [`RunningNode`] serving until shutdown.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use ractor::{Actor, ActorRef};
use warren_consensus::cluster::Cluster;
use warren_consensus::pki::{self, ClusterCa};
use warren_consensus::quic::QuicTransport;
use warren_consensus::registry::{ApiKeyRecord, Command, JoinTokenRecord};
use warren_consensus::storage::{OpenError, Store};
use warren_consensus::types::{Actor as Who, ClusterNode, Request};
use warren_proto::api::Scope;
use warren_proto::registry::{Node, NodeId, NodeRole};
use warren_proto::token::{ApiKey, JoinToken};
use warren_proto::Name;

use crate::actors::{
    ChildSpec, ClusterActor, Listener, ListenerKind, Supervisor, SupervisorArgs, SupervisorMsg,
};
use crate::datadir::{DataDir, NodeFile};
use crate::settings::Settings;

/// A node that is up: Raft running, endpoints accepting, supervision tree alive.
pub struct RunningNode {
    /// The data directory.
    pub dir: DataDir,
    /// Who this node is.
    pub file: NodeFile,
    /// The cluster handle.
    pub cluster: Cluster,
    /// The cluster CA.
    pub ca: ClusterCa,
    endpoint: quinn::Endpoint,
    supervisor: ActorRef<SupervisorMsg>,
    supervisor_done: tokio::task::JoinHandle<()>,
    drain: crate::conn::Drain,
    dbs: [Store; 2],
    /// Where the HTTPS proxy listens.
    pub https_addr: SocketAddr,
    /// The proxy.
    pub proxy: Arc<crate::proxy::Proxy>,
    _l4: Arc<crate::l4::L4>,
}

/// The sockets a node serves on, bound by the caller and handed in (the binary binds its
/// flags' addresses, a test binds `127.0.0.1:0`): nothing races for a port between choosing
/// it and listening on it.
pub struct Listeners {
    /// Cluster QUIC (UDP): Raft, joins, agent tunnels, relays.
    pub cluster: std::net::UdpSocket,
    /// The admin API (TCP).
    pub admin: TcpListener,
    /// The HTTPS proxy (TCP).
    pub https: TcpListener,
    /// Plain HTTP: ACME challenges and redirects (TCP).
    pub http: TcpListener,
    /// The relay for client devices and agents (UDP); none when it is off.
    pub relay: Option<std::net::UdpSocket>,
}

impl Listeners {
    /// Binds the cluster and admin addresses and the proxy's addresses from `settings`.
    pub fn bind(cluster_addr: &str, admin_addr: &str, settings: &Settings) -> anyhow::Result<Self> {
        let cluster = resolve_listen(cluster_addr, "--cluster-addr")?;
        let admin = resolve_listen(admin_addr, "--admin-addr")?;
        let cluster = std::net::UdpSocket::bind(cluster)
            .with_context(|| format!("--cluster-addr: cannot listen on {cluster} (UDP)"))?;
        let admin = crate::proxy::bind(admin, "admin")?;
        let https = crate::proxy::bind(
            resolve_listen(&settings.https_addr, "--https-addr")?,
            "HTTPS proxy",
        )?;
        let http = crate::proxy::bind(
            resolve_listen(&settings.http_addr, "--http-addr")?,
            "HTTP redirect",
        )?;
        let relay = match settings.relay_listen(cluster.local_addr()?)? {
            None => None,
            Some(addr) => match std::net::UdpSocket::bind(addr) {
                Ok(s) => Some(s),
                Err(e) if settings.relay_listen.is_some() => {
                    return Err(anyhow::anyhow!(
                        "--relay-listen: cannot listen on {addr} (UDP): {e}"
                    ))
                }
                Err(e) => {
                    tracing::error!("the relay cannot listen on {addr} (UDP): {e}; this node relays nothing for client devices (set --relay-listen)");
                    None
                }
            },
        };
        Ok(Self {
            cluster,
            admin,
            https,
            http,
            relay,
        })
    }

    /// The addresses of node `dir` (its `node.json`).
    pub fn for_dir(dir: &DataDir, settings: &Settings) -> anyhow::Result<Self> {
        let file = dir.require_ready()?;
        Self::bind(&file.cluster_addr, &file.admin_addr, settings)
    }

    /// The addresses of a node about to be created.
    pub fn for_spec(spec: &NodeSpec, settings: &Settings) -> anyhow::Result<Self> {
        Self::bind(&spec.cluster_addr, &spec.admin_addr, settings)
    }

    /// Everything on `127.0.0.1`, on ports the system picks (tests).
    pub fn loopback() -> anyhow::Result<Self> {
        let any = |what| crate::proxy::bind(SocketAddr::from(([127, 0, 0, 1], 0)), what);
        Ok(Self {
            cluster: std::net::UdpSocket::bind("127.0.0.1:0")?,
            admin: any("admin")?,
            https: any("HTTPS proxy")?,
            http: any("HTTP redirect")?,
            relay: Some(std::net::UdpSocket::bind("127.0.0.1:0")?),
        })
    }
}

impl RunningNode {
    /// Loads the identity, takes the listeners, opens storage, starts Raft and the
    /// supervision tree.
    pub async fn start(
        dir: DataDir,
        file: NodeFile,
        settings: &Settings,
        listeners: Listeners,
    ) -> anyhow::Result<Self> {
        let config = settings.cluster()?;
        let cluster_id = file.cluster_id()?;
        let ca = dir.ca()?;
        let identity = dir.identity(&ca)?;
        match identity.peer() {
            pki::Peer::Node(me) if me.cluster_id == cluster_id && me.id == file.node_id() => {
                tracing::debug!("this node's certificate names it {me}");
            }
            pki::Peer::Node(me) => anyhow::bail!(
                "{}: the certificate names {me} of cluster {:032x}, but this data directory is node {} of cluster {cluster_id:032x}",
                dir.path("node.pem").display(),
                me.cluster_id,
                file.node_id()
            ),
            _ => anyhow::bail!(
                "{}: the certificate carries no node identity (it was issued by a version before identities were written into certificates); peers refuse it. Join this node again (`warren-node join`) with a new data directory",
                dir.path("node.pem").display()
            ),
        }
        let Listeners {
            cluster: cluster_socket,
            admin: admin_listener,
            https: https_listener,
            http: http_listener,
            relay: relay_socket,
        } = listeners;
        let cluster_addr = cluster_socket.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let https_addr = https_listener.local_addr()?;
        let mut proxy_settings = settings.proxy(https_addr.port())?;
        if settings.acme_directory.is_none() && !settings.no_ca_web_certs && ca.key_pem().is_some()
        {
            proxy_settings.ca_certs = Some(ca.clone());
        }
        let server_config = pki::quic_server_config(&ca, &identity)?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            cluster_socket,
            Arc::new(quinn::TokioRuntime),
        )
        .with_context(|| format!("cannot serve QUIC on {cluster_addr} (UDP)"))?;
        let transport = Arc::new(QuicTransport::new(
            endpoint.clone(),
            pki::quic_client_config(&ca, &identity)?,
            cluster_id,
        ));

        let log_db = open_db(&dir.raft_log())?;
        let state_db = open_db(&dir.raft_state())?;
        let cluster = Cluster::start(
            file.node_id(),
            &log_db,
            &state_db,
            transport.clone(),
            config,
        )
        .await
        .context("starting Raft")?;
        crate::miss::LeaderChecks::configure(&cluster, settings.leader_checks()?);
        let registry_cluster = cluster.registry().cluster_id();
        if registry_cluster != 0 && registry_cluster != cluster_id {
            bail!(
                "the registry in {} belongs to cluster {registry_cluster:032x} but node.json says {cluster_id:032x}: this data directory is damaged",
                dir.root().display()
            );
        }

        let sites = crate::sites::Sites::start(
            cluster.clone(),
            ca.clone(),
            cluster_id,
            endpoint.clone(),
            pki::quic_client_config_for(&ca, &identity, warren_proto::tunnel::ALPN_RELAY)?,
        );
        let serving = crate::serving::Serving::new();
        let proxy = crate::proxy::Proxy::start(
            cluster.clone(),
            proxy_settings,
            sites.clone(),
            serving.clone(),
        )?;
        let l4 = crate::l4::L4::new(settings.l4_addr()?, settings.l4_max_connections()?);
        let acme = settings.acme()?;
        let tree = crate::publish::Published::new(crate::actors::TreeHealth::default());
        let cluster_actor = Arc::new(tokio::sync::watch::Sender::new(None));
        let members = crate::actors::Members::following(&cluster_actor);
        let https_listener = Arc::new(https_listener);
        let http_listener = Arc::new(http_listener);
        let admin_listener = Arc::new(admin_listener);
        let admin_tls = Arc::new(pki::https_server_config(&identity)?);
        let drain = crate::conn::Drain::new();
        let admin = crate::admin::AdminState::new(
            cluster.clone(),
            transport.clone(),
            ca.clone(),
            file.name.clone(),
            cluster_id,
            members.clone(),
            proxy.clone(),
            serving.clone(),
            tree.clone(),
            crate::admin::OwnPorts {
                l4_ip: settings.l4_addr()?,
                tcp: vec![
                    (admin_addr, "this node's admin API"),
                    (https_addr, "this node's HTTPS proxy"),
                    (http_listener.local_addr()?, "this node's HTTP redirect"),
                ],
                udp: std::iter::once((cluster_addr, "this node's cluster address (QUIC)"))
                    .chain(
                        relay_socket
                            .as_ref()
                            .and_then(|r| r.local_addr().ok())
                            .map(|a| (a, "this node's relay")),
                    )
                    .collect(),
            },
        );
        let join = Arc::new(crate::join::JoinService {
            cluster: cluster.clone(),
            ca: ca.clone(),
            cluster_id,
            members,
        });
        let mut children = vec![ClusterActor::child(
            cluster.clone(),
            serving.clone(),
            cluster_actor,
        )];
        // The actors that own the node's soft state go before the listeners that read what
        // they publish.
        children.push(proxy.config_child());
        children.push(crate::sessions::SessionsActor::child(proxy.clone()));
        if let Some(settings) = acme {
            children.push(crate::certs::CertsActor::child(crate::certs::CertsArgs {
                cluster: cluster.clone(),
                settings,
            }));
        }
        let mut relay_public = None;
        if let Some(socket) = relay_socket {
            let bound = socket.local_addr()?;
            let public = match settings.relay_public.as_deref() {
                Some(p) => p.parse().map_err(|_| {
                    anyhow::anyhow!("invalid setting --relay-public {p:?}: expected ip:port")
                })?,
                None if bound.ip().is_unspecified() => SocketAddr::new(
                    resolve_listen(&file.cluster_addr, "--cluster-addr")?.ip(),
                    bound.port(),
                ),
                None => bound,
            };
            socket.set_nonblocking(true)?;
            crate::relay::tune_socket(&socket);
            let socket = Arc::new(tokio::net::UdpSocket::from_std(socket)?);
            let stats = Arc::new(crate::relay::RelayStats::default());
            let devices = crate::devices::Devices::new(cluster.clone());
            children.push(devices.child());
            let coordinator = crate::coordinator::Coordinator::new(socket.clone());
            children.push(coordinator.child());
            sites.set_access(Arc::new(crate::access::AccessShell {
                settings: crate::access::AccessSettings {
                    relay_public: public,
                    valid_for: std::time::Duration::from_secs(settings.leader_loss_bound_s),
                },
                serving: serving.clone(),
                cluster: cluster.clone(),
                relay: stats.clone(),
                cli_client_id: settings.cli_client_id.clone(),
                devices: devices.clone(),
                coordinator: coordinator.clone(),
            }));
            children.push(crate::relay::RelayActor::child(crate::relay::RelayArgs {
                socket,
                me: vec![public, bound],
                view: Arc::new(crate::access::NodeRelayView {
                    cluster: cluster.clone(),
                    sites: sites.clone(),
                    devices,
                    coordinator,
                }),
                stats,
            }));
            crate::access::record_relay(cluster.clone(), file.name.clone(), public);
            relay_public = Some(public);
            tracing::info!(relay = %public, listen = %bound, "relay for client devices and agents");
        }
        let feed = Arc::new(crate::relay_only::FeedService {
            cluster: cluster.clone(),
            cluster_id,
            sites: sites.clone(),
            relay: relay_public,
        });
        children.extend(sites.children());
        children.push(l4.child(proxy.clone()));
        children.extend([
            ChildSpec::actor("rpc", Listener, {
                let (endpoint, cluster, sites) = (endpoint.clone(), cluster.clone(), sites.clone());
                move || ListenerKind::Rpc {
                    endpoint: endpoint.clone(),
                    cluster: cluster.clone(),
                    cluster_id,
                    join: join.clone(),
                    sites: sites.clone(),
                    feed: feed.clone(),
                }
            }),
            ChildSpec::actor("admin", Listener, {
                let drain = drain.clone();
                move || ListenerKind::Admin {
                    listener: admin_listener.clone(),
                    tls: admin_tls.clone(),
                    state: admin.clone(),
                    drain: drain.clone(),
                }
            }),
            ChildSpec::actor("proxy", Listener, {
                let (proxy, drain) = (proxy.clone(), drain.clone());
                move || ListenerKind::Proxy {
                    proxy: proxy.clone(),
                    https: https_listener.clone(),
                    http: http_listener.clone(),
                    drain: drain.clone(),
                }
            }),
        ]);
        let args = SupervisorArgs {
            children,
            health: tree,
        };
        let (supervisor, supervisor_done) =
            // Unnamed: ractor names are process-global, and a process may run several nodes (tests).
            Actor::spawn(None, Supervisor, args)
                .await
                .context("starting the supervision tree")?;
        tracing::info!(
            node = %file.name,
            id = file.node_id,
            cluster = %file.cluster_id,
            cluster_addr = %cluster_addr,
            admin_addr = %admin_addr,
            https_addr = %https_addr,
            "node started"
        );
        Ok(Self {
            dir,
            file,
            cluster,
            ca,
            endpoint,
            supervisor,
            supervisor_done,
            drain,
            dbs: [log_db, state_db],
            https_addr,
            proxy,
            _l4: l4,
        })
    }

    /// The root of the supervision tree.
    pub fn supervisor(&self) -> &ActorRef<SupervisorMsg> {
        &self.supervisor
    }

    /// Serves until `shutdown` resolves, the supervision tree gives up or Raft stops, then
    /// stops cleanly: listeners first, then Raft, then storage is synced.
    ///
    /// When Raft stopped on its own (a storage failure such as a full disk, or a bug inside
    /// it), the node keeps answering health (503, with why) for [`RAFT_STOPPED_GRACE`] and
    /// then returns [`RaftStopped`]: `warren-node` starts it again from its data directory.
    pub async fn serve_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let mut done = self.supervisor_done;
        let mut shutdown = std::pin::pin!(shutdown);
        let stop = tokio::select! {
            () = &mut shutdown => Stop::Asked,
            _ = &mut done => Stop::Tree,
            why = self.cluster.failed() => Stop::Raft(why),
        };
        match &stop {
            Stop::Asked => tracing::info!("shutting down"),
            Stop::Tree => tracing::error!("the supervision tree stopped; shutting down"),
            Stop::Raft(why) => {
                tracing::error!(
                    "{why}: this node cannot serve; it restarts in {} s",
                    RAFT_STOPPED_GRACE.as_secs()
                );
                tokio::select! {
                    () = tokio::time::sleep(RAFT_STOPPED_GRACE) => {}
                    () = &mut shutdown => {}
                }
            }
        }
        // Listeners stop accepting; open proxy and admin connections finish what they are
        // doing (up to the grace period) while Raft and the actors still serve them.
        let left = self.drain.drain(SHUTDOWN_GRACE).await;
        if left > 0 {
            tracing::info!("{left} connections still open after {SHUTDOWN_GRACE:?}; closing them");
        }
        self.supervisor.stop(Some("shutdown".into()));
        let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
        self.endpoint.close(0u32.into(), b"shutting down");
        self.cluster.shutdown().await;
        for db in &self.dbs {
            let synced = db.sync();
            if let (Err(e), Stop::Asked) = (synced, &stop) {
                return Err(anyhow::anyhow!(e).context("syncing storage"));
            }
        }
        match stop {
            Stop::Asked => Ok(()),
            Stop::Tree => {
                bail!("the node stopped because a part of it failed repeatedly (see the log)")
            }
            Stop::Raft(why) => Err(RaftStopped(why).into()),
        }
    }
}

/// How long open proxy and admin connections get to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long a node whose Raft stopped keeps answering health before it restarts.
pub const RAFT_STOPPED_GRACE: Duration = Duration::from_secs(2);

enum Stop {
    Asked,
    Tree,
    Raft(String),
}

/// The node stopped because its Raft stopped on its own; starting it again from its data
/// directory is the way to recover (a storage error leaves sled unusable in this process).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RaftStopped(pub String);

fn open_db(path: &std::path::Path) -> anyhow::Result<Store> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    Store::open(path).map_err(|e| match e {
        OpenError::InUse(p, io) => {
            anyhow::anyhow!(
                "{} is in use by another warren-node process: {io}",
                p.display()
            )
        }
        other => anyhow::anyhow!("{other}"),
    })
}

fn resolve_listen(addr: &str, flag: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs as _;
    addr.to_socket_addrs()
        .with_context(|| format!("{flag} {addr:?}: expected host:port"))?
        .next()
        .with_context(|| format!("{flag} {addr:?}: the name has no address"))
}

/// Host part of `host:port`, for certificate names.
pub fn host_of(addr: &str) -> String {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

/// Where and as whom a new node listens.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Node name.
    pub name: Name,
    /// Cluster (QUIC) address.
    pub cluster_addr: String,
    /// Admin API address.
    pub admin_addr: String,
    /// Region label.
    pub region: String,
}

impl NodeSpec {
    /// The spec as served by `listeners` (bound already, so a join does not register a
    /// node that then cannot listen): an address given with port 0 is recorded with the
    /// port the system picked. Checks the fields.
    pub fn bound_to(mut self, listeners: &Listeners) -> anyhow::Result<Self> {
        fn with_port(addr: &str, bound: SocketAddr) -> String {
            match addr.rsplit_once(':') {
                Some((host, "0")) => format!("{host}:{}", bound.port()),
                _ => addr.to_owned(),
            }
        }
        self.cluster_addr = with_port(&self.cluster_addr, listeners.cluster.local_addr()?);
        self.admin_addr = with_port(&self.admin_addr, listeners.admin.local_addr()?);
        self.validate_fields()?;
        Ok(self)
    }

    /// The `node.json` of this node as node `node_id` of cluster `cluster_id`.
    pub fn node_file(&self, cluster_id: u128, node_id: u64) -> NodeFile {
        NodeFile {
            format: NodeFile::FORMAT,
            cluster_id: format!("{cluster_id:032x}"),
            node_id,
            name: self.name.clone(),
            cluster_addr: self.cluster_addr.clone(),
            admin_addr: self.admin_addr.clone(),
            region: self.region.clone(),
        }
    }

    fn validate_fields(&self) -> anyhow::Result<()> {
        let probe = Node {
            id: NodeId(0),
            name: self.name.clone(),
            cluster_addr: self.cluster_addr.clone(),
            admin_addr: self.admin_addr.clone(),
            region: self.region.clone(),
            revision: 0,
            role: NodeRole::Voter,
        };
        probe.validate().map_err(|e| {
            let flag = match e.field.as_str() {
                "cluster_addr" => "--cluster-addr",
                "admin_addr" => "--admin-addr",
                "region" => "--region",
                other => other,
            };
            anyhow::anyhow!("{flag}: {}", e.reason)
        })
    }
}

/// What `init` prints once.
#[derive(Debug)]
pub struct InitOutput {
    /// The bootstrap admin API key (`wrn_…`).
    pub admin_key: String,
    /// The first join token (`wjt1_…`).
    pub join_token: String,
}

/// Creates a new one-node cluster in `dir` and starts it.
pub async fn init(
    dir: DataDir,
    spec: NodeSpec,
    settings: &Settings,
    listeners: Listeners,
) -> anyhow::Result<(RunningNode, InitOutput)> {
    let spec = spec.bound_to(&listeners)?;
    settings.cluster()?;
    dir.begin_create()?;
    let cluster_id = loop {
        let id: u128 = rand::random();
        if id != 0 {
            break id;
        }
    };
    let ca = ClusterCa::generate(cluster_id)?;
    let (key_pem, csr) = pki::node_key_and_csr(spec.name.as_str())?;
    let hosts = vec![host_of(&spec.cluster_addr), host_of(&spec.admin_addr)];
    let me = pki::NodeCert {
        cluster_id,
        id: NodeId(1),
        role: NodeRole::Voter,
    };
    let cert = ca
        .sign_node(&csr, me, spec.name.as_str(), &hosts)?
        .context("a freshly generated CA has its key")?;
    dir.write("ca.pem", ca.cert_pem().as_bytes(), false)?;
    dir.write("ca.key", ca.key_pem().unwrap_or_default().as_bytes(), true)?;
    dir.write("node.pem", cert.as_bytes(), false)?;
    dir.write("node.key", key_pem.as_bytes(), true)?;
    let file = spec.node_file(cluster_id, 1);
    dir.write_node_file(&file)?;

    let node = RunningNode::start(dir.clone(), file, settings, listeners).await?;
    node.cluster
        .initialize(ClusterNode {
            name: spec.name.to_string(),
            addr: spec.cluster_addr.clone(),
        })
        .await
        .context("initializing Raft")?;

    let mut rng = rand::rngs::OsRng;
    let api_key = ApiKey::generate(&mut rng);
    let join_token = JoinToken::generate(cluster_id, ca.fingerprint(), &mut rng);
    let bootstrap = Command::Bootstrap {
        cluster_id,
        node: Node {
            id: NodeId(1),
            name: spec.name.clone(),
            cluster_addr: spec.cluster_addr.clone(),
            admin_addr: spec.admin_addr.clone(),
            region: spec.region.clone(),
            revision: 0,
            role: NodeRole::Voter,
        },
        api_key: ApiKeyRecord {
            name: Name::new("bootstrap").expect("valid name"),
            id: api_key.id,
            hash: api_key.hash(),
            scope: Scope::Admin,
            created_at: 0,
            revision: 0,
        },
        join_token: JoinTokenRecord {
            id: join_token.token_id,
            hash: join_token.hash(),
            created_at: 0,
            revision: 0,
            role: NodeRole::Voter,
        },
    };
    node.cluster
        .write(Request::new(Who::System, bootstrap))
        .await
        .context("bootstrapping the registry")?
        .map_err(|e| anyhow::anyhow!("bootstrapping the registry: {e}"))?;
    dir.write(
        "admin.key",
        format!("{}\n", api_key.reveal()).as_bytes(),
        true,
    )?;
    dir.finish_create()?;
    let out = InitOutput {
        admin_key: api_key.reveal(),
        join_token: join_token.reveal(),
    };
    Ok((node, out))
}

/// Starts the node in `dir` on `listeners` ([`Listeners::for_dir`] binds its addresses).
pub async fn run(
    dir: DataDir,
    settings: &Settings,
    listeners: Listeners,
) -> anyhow::Result<RunningNode> {
    let file = dir.require_ready()?;
    RunningNode::start(dir, file, settings, listeners).await
}

/// Runs the node in `dir` on `listeners` until `shutdown` resolves, then drains and stops
/// (the whole life of a node, for embedding and tests).
pub async fn serve(
    dir: DataDir,
    listeners: Listeners,
    settings: &Settings,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run(dir, settings, listeners)
        .await?
        .serve_until(shutdown)
        .await
}

/// Joins the cluster that `token` belongs to through `peer`. The token decides what the
/// node may be; with `learner` a voter-grade node starts as a non-voting member. Returns
/// the node and whether it is a voter now.
pub async fn join(
    dir: DataDir,
    spec: NodeSpec,
    peer: &str,
    token: &str,
    learner: bool,
    settings: &Settings,
    listeners: Listeners,
) -> anyhow::Result<(RunningNode, bool)> {
    let spec = spec.bound_to(&listeners)?;
    settings.cluster()?;
    let token = JoinToken::parse(token).map_err(|e| anyhow::anyhow!("--token: {e}"))?;
    crate::join::join(dir, spec, peer, &token, learner, settings, listeners).await
}
