//! The IO shell of the data path: ONE tokio task owning one UDP socket, the WireGuard
//! [`Peers`], the relay client and the userspace [`Stack`]s. Packets never pass through a
//! channel: flow bytes go to and from the [`TcpFlow`]/[`UdpFlow`] handles the stack gives,
//! and only control (add a site, new access, status) reaches the task as a message.
//!
//! ```text
//!            ┌──────────────────────── endpoint task ─────────────────────────┐
//!  UDP ─recv─►  relay frame? ─► relays (Bind/Bound, Ping/Pong)                 │
//!            │  Data{ch}/WireGuard ─► Peers::handle_datagram ─► Stack::handle  │◄─► TcpFlow /
//!  UDP ◄send─┤  relay header ◄─ Peers::encapsulate ◄─ Stack::poll_packet       │    UdpFlow
//!            │  timers: min(Peers, relays, stacks' poll_timeout); stack waker  │
//!            └─────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Two roles:
//! - [`ClientEndpoint`] (`warren`): one WireGuard peer (the site's agent) and one client-mode
//!   [`Stack`] per site, whose local address is the device's tunnel address; packets go
//!   through the relay [`ClientRelays`] chose for the site.
//! - [`AgentEndpoint`] (`warren-agent`): one peer per device that may reach the site, one
//!   accept-mode [`Stack`]; bindings to every relay it is told about ([`AgentRelays`]);
//!   every new flow is checked ([`admission`]) and the target dialled from the host.
//!
//! # Admission (agent)
//! A new flow is admitted only if its packets came from a known peer (WireGuard), their
//! source is that peer's tunnel address ([`Sources::Only`], checked on every packet), a grant
//! of the device allows the protocol, destination and port, and the access is still valid
//! (`valid_until` not passed: fail closed, logged once loudly). When access changes, every
//! open flow is checked again (without the validity: an agent that hears from no node keeps
//! open flows until access says otherwise) and the ones no longer allowed are aborted at
//! once: TCP gets a RST, the client's reads fail.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::ReusableBoxFuture;
use tracing::Instrument;
use warren_proto::relay::{self as wire, Frame, DATA_HEADER, INNER_MTU};
use warren_proto::tunnel::{DeviceAccess, Dial, FlowProto};
use warren_proto::Name;

use crate::direct::{
    Direct, DirectEvent, DirectStats, DirectStatus, DirectTransmit, Role as PathRole,
};
use crate::relays::{
    AgentBindingStatus, AgentRelays, ClientRelays, RelayEvent, RelayStatus, TicketError,
};
use crate::stack::{
    ConfigError, FlowId, Proto, Stack, StackConfig, StackError, StackEvent, StackStats, TcpFlow,
    UdpFlow,
};
use crate::wg::{
    DropStats, Path, PeerConfig, PeerId, PeerKey, Peers, Received, SecretKey, Sources, Transmit,
    MAX_DATAGRAM,
};

/// Datagrams read per wake-up before the stack is polled (a batch: one `poll` for many).
const RECV_BATCH: usize = 64;
/// How often our direct-path candidates are gathered again (host addresses, the
/// reflexive addresses relays report): a new network is noticed this fast.
const CANDIDATES_EVERY: Duration = Duration::from_secs(1);
/// The most often a summary of refused flows is logged at INFO.
const REFUSAL_SUMMARY: Duration = Duration::from_secs(10);
/// Bytes of kernel buffer asked for each way on the endpoint's socket. The default
/// (about 200 KiB) overflows under a burst of one TCP window of full-size packets, and
/// every datagram lost there costs smoltcp a recovery (it does not use SACK).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Asks the kernel for [`SOCKET_BUFFER`] bytes each way on `socket` (it may give less:
/// `net.core.rmem_max` / `wmem_max` cap it). Best effort; what was granted is logged at
/// DEBUG.
pub fn tune_socket(socket: &UdpSocket) {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let _ = setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER);
    let _ = setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER);
    tracing::debug!(
        rcvbuf = getsockopt(socket, sockopt::RcvBuf).ok(),
        sndbuf = getsockopt(socket, sockopt::SndBuf).ok(),
        "endpoint socket buffers"
    );
}

/// The endpoint's settings. Every field has its unit.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// The inner MTU (bytes of an IP packet inside WireGuard); both ends must agree.
    /// [`INNER_MTU`] (1408) by default: what fits a relayed packet in a 1500-byte path.
    pub mtu: usize,
    /// Most flows per stack at once. 1024 by default.
    pub max_flows: usize,
    /// Agent: how long dialling a target may take before the flow is refused (RST).
    /// 10 s by default.
    pub dial_timeout: Duration,
    /// A UDP flow idle this long either way is closed. 60 s by default.
    pub udp_idle_timeout: Duration,
    /// Bytes buffered each way between the stack and a TCP flow handle, and the TCP
    /// windows. 1 MiB by default.
    pub tcp_buffer: usize,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            mtu: INNER_MTU,
            max_flows: 1024,
            dial_timeout: Duration::from_secs(10),
            udp_idle_timeout: Duration::from_secs(60),
            tcp_buffer: 1 << 20,
        }
    }
}

impl EndpointConfig {
    /// Checks every field (through the stack configuration it makes).
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.dial_timeout.is_zero() {
            return Err(ConfigError {
                field: "dial_timeout",
                expected: "more than 0",
                got: format!("{:?}", self.dial_timeout),
            });
        }
        if self.mtu > INNER_MTU {
            return Err(ConfigError {
                field: "mtu",
                expected: "at most 1408 bytes (relay::INNER_MTU)",
                got: self.mtu.to_string(),
            });
        }
        self.stack(StackConfig::accept()).validate()?;
        Ok(self)
    }

    fn stack(&self, base: StackConfig) -> StackConfig {
        StackConfig {
            mtu: self.mtu,
            max_flows: self.max_flows,
            tcp_rx_buffer: self.tcp_buffer,
            tcp_tx_buffer: self.tcp_buffer,
            flow_buffer: self.tcp_buffer,
            idle_timeout: self.udp_idle_timeout,
            ..base
        }
    }
}

/// A failed endpoint call (the caller's doing unless the variant says otherwise).
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The endpoint's task has ended (its socket failed, or every handle was dropped).
    #[error("the endpoint has stopped")]
    Stopped,
    /// No site of that name was added.
    #[error("no site {0}")]
    UnknownSite(String),
    /// The stack refused the flow (too many, bad destination).
    #[error(transparent)]
    Stack(#[from] StackError),
    /// A ticket or site name too long for a Bind.
    #[error(transparent)]
    Ticket(#[from] TicketError),
    /// A bad [`EndpointConfig`].
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The socket's local address could not be read.
    #[error("endpoint socket: {0}")]
    Socket(io::Error),
    /// A handshake initiation could not be made.
    #[error("WireGuard handshake: {0}")]
    Handshake(String),
}

/// Makes endpoints: [`Endpoint::client`] or [`Endpoint::agent`].
#[derive(Debug)]
pub struct Endpoint;

impl Endpoint {
    /// Starts a client endpoint on `socket` (a task on the current runtime) for the device
    /// with tunnel address `device_addr`.
    pub fn client(
        socket: UdpSocket,
        secret: SecretKey,
        device_addr: Ipv4Addr,
        config: EndpointConfig,
    ) -> Result<ClientEndpoint, EndpointError> {
        let config = config.validate()?;
        let local = socket.local_addr().map_err(EndpointError::Socket)?;
        tune_socket(&socket);
        let public_key = secret.public_key();
        let (tx, rx) = mpsc::unbounded_channel();
        let core = Core::new(
            socket,
            &secret,
            config,
            Role::Client(ClientRole {
                device_addr,
                relays: ClientRelays::new(),
                sites: HashMap::new(),
            }),
        );
        let task = tokio::spawn(core.run(rx).instrument(tracing::info_span!("wg-client")));
        Ok(ClientEndpoint {
            cmds: tx,
            local,
            public_key,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }

    /// Starts an agent endpoint on `socket` (a task on the current runtime). It admits
    /// nothing until [`AgentEndpoint::set_access`].
    pub fn agent(
        socket: UdpSocket,
        secret: SecretKey,
        config: EndpointConfig,
    ) -> Result<AgentEndpoint, EndpointError> {
        let config = config.validate()?;
        let local = socket.local_addr().map_err(EndpointError::Socket)?;
        tune_socket(&socket);
        let public_key = secret.public_key();
        let (tx, rx) = mpsc::unbounded_channel();
        let stack = Stack::new(config.stack(StackConfig::accept()), Instant::now())?;
        let (dial_tx, dial_rx) = mpsc::unbounded_channel();
        let mut core = Core::new(
            socket,
            &secret,
            config,
            Role::Agent(Box::new(AgentRole {
                waker: Waker::new(stack.waker()),
                stack,
                relays: AgentRelays::new(),
                devices: HashMap::new(),
                by_addr: HashMap::new(),
                valid_until: None,
                last_word: None,
                stale_logged: false,
                flows: HashMap::new(),
                dial_tx,
                stats: AgentFlowStats::default(),
                direct: HashMap::new(),
                refused_since_summary: 0,
                summary_due: None,
            })),
        );
        core.dial_rx = Some(dial_rx);
        let task = tokio::spawn(core.run(rx).instrument(tracing::info_span!("wg-agent")));
        Ok(AgentEndpoint {
            cmds: tx,
            local,
            public_key,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }
}

/// A site a client reaches: its agent's key, the relays to reach it through, the ticket
/// to bind with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SitePeer {
    /// The site's name.
    pub site: String,
    /// The agent's WireGuard public key.
    pub agent_key: PeerKey,
    /// Relays that reach the site (node relay addresses).
    pub relays: Vec<SocketAddr>,
    /// The device's relay ticket (encoded `SignedTicket`).
    pub ticket: Vec<u8>,
}

/// The client's endpoint: cheap to clone; the task stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct ClientEndpoint {
    cmds: mpsc::UnboundedSender<Command>,
    local: SocketAddr,
    public_key: PeerKey,
    _task: Arc<AbortOnDrop>,
}

/// What a client endpoint is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStatus {
    /// Our WireGuard public key.
    pub public_key: PeerKey,
    /// The UDP socket's local address.
    pub local_addr: SocketAddr,
    /// Per site.
    pub sites: Vec<SiteStatus>,
    /// Every relay pinged.
    pub relays: Vec<RelayStatus>,
    /// WireGuard datagrams dropped, by reason.
    pub drops: DropStats,
    /// Other datagrams dropped (relay frames not expected, no path to send on).
    pub other_drops: ShellDrops,
    /// Our direct-path candidates now.
    pub candidates: Vec<SocketAddr>,
    /// How our NAT maps, as the relays' answers show it.
    pub mapping: Mapping,
}

/// How the NAT in front of an endpoint maps its socket, judged from the addresses several
/// relays see it at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Fewer than two relays answered.
    Unknown,
    /// No NAT: a relay sees the socket's own address.
    None,
    /// Every relay sees the same public address and port ("easy"): a direct path can be
    /// punched with any peer that can send to it.
    EndpointIndependent,
    /// Relays see different ports ("hard", symmetric): a direct path needs the peer to
    /// be reachable unsolicited.
    EndpointDependent,
}

impl Mapping {
    /// For people and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Mapping::Unknown => "unknown",
            Mapping::None => "none",
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::EndpointDependent => "endpoint-dependent",
        }
    }

    /// Judged from the addresses relays report for a socket whose local addresses are
    /// `local`.
    pub fn judge(observed: &[SocketAddr], local: &[SocketAddr]) -> Self {
        if observed.iter().any(|o| local.contains(o)) {
            return Mapping::None;
        }
        if observed.len() < 2 {
            return Mapping::Unknown;
        }
        if observed.windows(2).all(|w| w[0] == w[1]) {
            Mapping::EndpointIndependent
        } else {
            Mapping::EndpointDependent
        }
    }
}

/// One site of a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteStatus {
    /// The site.
    pub site: String,
    /// The relay in use (bound).
    pub relay: Option<SocketAddr>,
    /// Its RTT.
    pub rtt: Option<Duration>,
    /// Time since the WireGuard handshake with the agent; `None` before one.
    pub handshake_age: Option<Duration>,
    /// IP bytes sent to the agent.
    pub tx_bytes: u64,
    /// IP bytes received from it.
    pub rx_bytes: u64,
    /// Flows open through it.
    pub open_flows: usize,
    /// The site's stack counters.
    pub stack: StackStats,
    /// The direct path: in use or not, candidates, counters.
    pub direct: Option<DirectStatus>,
}

impl ShellDrops {
    /// The counters by name.
    pub fn by_reason(&self) -> [(&'static str, u64); 4] {
        [
            ("relay_frames", self.relay_frames),
            ("no_path", self.no_path),
            ("no_route", self.no_route),
            ("send_errors", self.send_errors),
        ]
    }
}

/// Datagrams the shell itself dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShellDrops {
    /// Relay frames that were malformed, unexpected or answered nothing we asked.
    pub relay_frames: u64,
    /// Packets with no path to send them on yet (client: no relay bound for the site;
    /// agent: a device never heard from).
    pub no_path: u64,
    /// Agent: outbound packets to an address that is no device's.
    pub no_route: u64,
    /// Datagrams whose send failed.
    pub send_errors: u64,
}

impl ClientEndpoint {
    /// Our WireGuard public key.
    pub fn public_key(&self) -> PeerKey {
        self.public_key
    }

    /// The UDP socket's local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Adds a site, or updates its relays and ticket (a different agent key replaces the
    /// site: its flows end).
    pub async fn add_site(&self, site: SitePeer) -> Result<(), EndpointError> {
        self.ask(|reply| Command::AddSite(site, reply)).await?
    }

    /// Replaces a site's relay ticket and the relays it may use (a relay no longer
    /// listed, such as a revoked relay-only node, is moved off as soon as another answers).
    pub async fn update_ticket(
        &self,
        site: &str,
        relays: Vec<SocketAddr>,
        ticket: Vec<u8>,
    ) -> Result<(), EndpointError> {
        let site = site.to_owned();
        self.ask(|reply| Command::UpdateTicket(site, relays, ticket, reply))
            .await?
    }

    /// Forgets a site: its flows end.
    pub async fn remove_site(&self, site: &str) -> Result<(), EndpointError> {
        let site = site.to_owned();
        self.ask(|reply| Command::RemoveSite(site, reply)).await?
    }

    /// Starts a new WireGuard handshake with `site`'s agent now, whatever the timers say
    /// (the agent may have forgotten the session: it drops a device whose grants went away,
    /// and a session it no longer has is silence until boringtun gives up on it, 15 s).
    pub async fn rekey(&self, site: &str) -> Result<(), EndpointError> {
        let site = site.to_owned();
        self.ask(|reply| Command::Rekey(site, reply)).await?
    }

    /// Opens a TCP connection to `dst` through `site`'s agent. The handshake runs when the
    /// flow is used; [`TcpFlow::established`] says whether the agent admitted it (a refusal
    /// is `ConnectionRefused`).
    pub async fn connect_tcp(&self, site: &str, dst: SocketAddr) -> Result<TcpFlow, EndpointError> {
        let site = site.to_owned();
        self.ask(|reply| Command::ConnectTcp(site, dst, reply))
            .await?
    }

    /// Opens a UDP flow to `dst` through `site`'s agent.
    pub async fn open_udp(&self, site: &str, dst: SocketAddr) -> Result<UdpFlow, EndpointError> {
        let site = site.to_owned();
        self.ask(|reply| Command::OpenUdp(site, dst, reply)).await?
    }

    /// What the endpoint is doing.
    pub async fn status(&self) -> Result<EndpointStatus, EndpointError> {
        self.ask(Command::ClientStatus).await
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, EndpointError> {
        ask(&self.cmds, make).await
    }
}

/// The agent's endpoint: cheap to clone; the task stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct AgentEndpoint {
    cmds: mpsc::UnboundedSender<Command>,
    local: SocketAddr,
    public_key: PeerKey,
    _task: Arc<AbortOnDrop>,
}

/// What an agent endpoint is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// Our WireGuard public key.
    pub public_key: PeerKey,
    /// The UDP socket's local address.
    pub local_addr: SocketAddr,
    /// Whether new flows are admitted now (access valid).
    pub admitting: bool,
    /// Devices that may reach the site.
    pub devices: Vec<DeviceStatus>,
    /// Bindings to relays.
    pub relays: Vec<AgentBindingStatus>,
    /// WireGuard datagrams dropped, by reason.
    pub drops: DropStats,
    /// Other datagrams dropped.
    pub other_drops: ShellDrops,
    /// Flow decisions.
    pub flows: AgentFlowStats,
    /// The stack's counters.
    pub stack: StackStats,
    /// Direct-path counters, summed over devices (forged and replayed probes among them).
    pub direct: DirectStats,
}

/// One device, as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    /// The device.
    pub device: Name,
    /// Its owner.
    pub user: Name,
    /// Its key.
    pub key: PeerKey,
    /// Its tunnel address.
    pub address: Ipv4Addr,
    /// Time since its handshake; `None` before one.
    pub handshake_age: Option<Duration>,
    /// IP bytes sent to it.
    pub tx_bytes: u64,
    /// IP bytes received from it.
    pub rx_bytes: u64,
    /// Where it was last heard (a relay channel, or its own address when direct).
    pub last_path: Option<Path>,
    /// Its flows open now.
    pub open_flows: usize,
}

/// The agent's flow decisions since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentFlowStats {
    /// Flows admitted (TCP once the target answered).
    pub admitted: u64,
    /// Refused: no grant allows it.
    pub refused_no_grant: u64,
    /// Refused: no word from any node for longer than the access is valid.
    pub refused_stale: u64,
    /// Refused: its source is no device's (cannot happen past WireGuard's source check;
    /// counted in case).
    pub refused_unknown_source: u64,
    /// TCP flows whose target could not be dialled (RST to the client).
    pub dial_failed: u64,
    /// Open flows cut because access no longer allowed them.
    pub revoked: u64,
}

impl AgentEndpoint {
    /// Our WireGuard public key.
    pub fn public_key(&self) -> PeerKey {
        self.public_key
    }

    /// The UDP socket's local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The devices that may reach the site, the relays to bind to (each with the ticket
    /// to bind with), and until when new flows may be admitted on this. Every open flow is
    /// checked again at once; those no longer allowed are cut. Returns once applied.
    pub async fn set_access(
        &self,
        devices: Vec<DeviceAccess>,
        relays: Vec<(SocketAddr, Vec<u8>)>,
        valid_until: Instant,
    ) -> Result<(), EndpointError> {
        ask(&self.cmds, |reply| Command::SetAccess {
            devices,
            relays,
            valid_until,
            reply,
        })
        .await?
    }

    /// A node was heard from: new flows may be admitted until `valid_until`.
    pub fn heartbeat(&self, valid_until: Instant) -> Result<(), EndpointError> {
        self.cmds
            .send(Command::Heartbeat(valid_until))
            .map_err(|_| EndpointError::Stopped)
    }

    /// What the endpoint is doing.
    pub async fn status(&self) -> Result<AgentStatus, EndpointError> {
        ask(&self.cmds, Command::AgentStatus).await
    }
}

async fn ask<T>(
    cmds: &mpsc::UnboundedSender<Command>,
    make: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Result<T, EndpointError> {
    let (tx, rx) = oneshot::channel();
    cmds.send(make(tx)).map_err(|_| EndpointError::Stopped)?;
    rx.await.map_err(|_| EndpointError::Stopped)
}

#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Reply<T> = oneshot::Sender<T>;

enum Command {
    AddSite(SitePeer, Reply<Result<(), EndpointError>>),
    UpdateTicket(
        String,
        Vec<SocketAddr>,
        Vec<u8>,
        Reply<Result<(), EndpointError>>,
    ),
    RemoveSite(String, Reply<Result<(), EndpointError>>),
    Rekey(String, Reply<Result<(), EndpointError>>),
    ConnectTcp(String, SocketAddr, Reply<Result<TcpFlow, EndpointError>>),
    OpenUdp(String, SocketAddr, Reply<Result<UdpFlow, EndpointError>>),
    ClientStatus(Reply<EndpointStatus>),
    SetAccess {
        devices: Vec<DeviceAccess>,
        relays: Vec<(SocketAddr, Vec<u8>)>,
        valid_until: Instant,
        reply: Reply<Result<(), EndpointError>>,
    },
    Heartbeat(Instant),
    AgentStatus(Reply<AgentStatus>),
}

/// Why the agent refuses a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowRefusal {
    /// Its source is no device's.
    UnknownSource,
    /// No grant of the device allows it.
    NoGrant,
    /// The access has not been confirmed by a node for too long (fail closed).
    Stale,
}

/// Where an admitted flow is dialled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// This address.
    Address(SocketAddr),
    /// What this name resolves to, at this port.
    Name(String, u16),
}

/// The admission decision for a new flow, pure: the device whose tunnel address `src`
/// is, the grant that allows (`proto`, `dst`), and whether access is still valid at `now`.
pub fn admission(
    device: Option<&DeviceAccess>,
    valid_until: Option<Instant>,
    now: Instant,
    proto: Proto,
    src: SocketAddr,
    dst: SocketAddr,
) -> Result<Target, FlowRefusal> {
    let Some(device) = device.filter(|d| IpAddr::V4(d.address) == src.ip()) else {
        return Err(FlowRefusal::UnknownSource);
    };
    if valid_until.is_none_or(|v| now >= v) {
        return Err(FlowRefusal::Stale);
    }
    allowed(device, proto, dst).ok_or(FlowRefusal::NoGrant)
}

/// Whether `device` may reach `dst` over `proto` (without the validity check), and where.
fn allowed(device: &DeviceAccess, proto: Proto, dst: SocketAddr) -> Option<Target> {
    let fp = match proto {
        Proto::Tcp => FlowProto::Tcp,
        Proto::Udp => FlowProto::Udp,
        Proto::Icmp => FlowProto::Icmp,
    };
    device
        .grants
        .iter()
        .find_map(|g| g.allows(fp, dst.ip(), dst.port()))
        .map(|d| match d {
            Dial::Address(ip) => Target::Address(SocketAddr::new(ip, dst.port())),
            Dial::Name(n) => Target::Name(n.to_owned(), dst.port()),
        })
}

// The task.

struct Core {
    io: Io,
    peers: Peers,
    secret: SecretKey,
    /// Our direct-path candidates, gathered every [`CANDIDATES_EVERY`].
    candidates: Vec<SocketAddr>,
    candidates_due: Instant,
    config: EndpointConfig,
    role: Role,
    plain: Box<[u8]>,
    drops: ShellDrops,
    /// Agent: dial results from the dialling tasks.
    dial_rx: Option<mpsc::UnboundedReceiver<(FlowId, io::Result<TcpStream>)>>,
    /// Datagrams of the direct-path logic to send (a buffer kept between flushes).
    direct_out: Vec<(SocketAddr, Vec<u8>)>,
}

struct Io {
    socket: UdpSocket,
    rx: Box<[u8]>,
    /// Room for a relay header in front of the WireGuard packet.
    tx: Box<[u8]>,
}

enum Role {
    Client(ClientRole),
    Agent(Box<AgentRole>),
}

struct ClientRole {
    device_addr: Ipv4Addr,
    relays: ClientRelays,
    sites: HashMap<PeerId, ClientSite>,
}

struct ClientSite {
    name: String,
    key: PeerKey,
    stack: Stack,
    waker: Waker,
    /// Where packets go now: the direct path when there is one, else the relay's.
    path: Option<Path>,
    /// The relay path, as [`ClientRelays::path`] last said.
    relay_path: Option<Path>,
    /// The direct path logic (none for a low-order agent key, which cannot be paired).
    direct: Option<Direct>,
}

impl ClientSite {
    fn refresh_path(&mut self) {
        self.path = self
            .direct
            .as_ref()
            .and_then(Direct::path)
            .map(|remote| Path {
                remote,
                channel: None,
            })
            .or(self.relay_path);
    }
}

/// The agent's direct-path logic for one device.
struct AgentDirect {
    direct: Direct,
    /// The relay path its last Call came on (where the Answer goes).
    punch_path: Option<Path>,
}

struct AgentRole {
    stack: Stack,
    waker: Waker,
    relays: AgentRelays,
    devices: HashMap<PeerKey, DeviceAccess>,
    /// Tunnel address → peer: where an outbound packet goes, and whose a new flow is.
    by_addr: HashMap<Ipv4Addr, (PeerId, PeerKey)>,
    valid_until: Option<Instant>,
    last_word: Option<Instant>,
    stale_logged: bool,
    flows: HashMap<FlowId, AgentFlow>,
    dial_tx: mpsc::UnboundedSender<(FlowId, io::Result<TcpStream>)>,
    stats: AgentFlowStats,
    direct: HashMap<PeerKey, AgentDirect>,
    refused_since_summary: u64,
    summary_due: Option<Instant>,
}

struct AgentFlow {
    device: PeerKey,
    proto: Proto,
    src: SocketAddr,
    dst: SocketAddr,
    /// The dial or copy task (none for ICMP, answered by the stack).
    task: Option<JoinHandle<()>>,
    dialing: bool,
}

/// A site's direct-path events: its path follows, and the change is logged.
fn client_events(s: &mut ClientSite) {
    let Some(d) = &mut s.direct else {
        return;
    };
    let mut changed = false;
    while let Some(e) = d.poll_event() {
        changed = true;
        match e {
            DirectEvent::Direct { addr, rtt } => {
                tracing::info!(site = %s.name, %addr, rtt_ms = rtt.as_secs_f64() * 1000.0, "direct path to the site's agent");
            }
            DirectEvent::Relayed { reason } => {
                tracing::info!(site = %s.name, reason, "back to the relay");
            }
        }
    }
    if changed {
        s.refresh_path();
    }
}

/// This host's addresses with the socket's port (every non-loopback IPv4 interface when
/// the socket is bound to all of them), as direct-path candidates.
fn host_candidates(local: SocketAddr) -> Vec<SocketAddr> {
    if !local.ip().is_unspecified() {
        return if local.ip().is_loopback() {
            Vec::new()
        } else {
            vec![local]
        };
    }
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<SocketAddr> = addrs
        .filter_map(|i| {
            let ip = i.address?.as_sockaddr_in()?.ip();
            (!ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified())
                .then(|| SocketAddr::new(IpAddr::V4(ip), local.port()))
        })
        .collect();
    out.sort();
    out.dedup();
    out.truncate(warren_proto::relay::MAX_CANDIDATES / 2);
    out
}

/// A stack's waker, awaited without allocating after the first time.
struct Waker {
    notify: Arc<Notify>,
    fut: ReusableBoxFuture<'static, ()>,
}

async fn notified(n: Arc<Notify>) {
    n.notified().await
}

impl Waker {
    fn new(notify: Arc<Notify>) -> Self {
        let fut = ReusableBoxFuture::new(notified(notify.clone()));
        Self { notify, fut }
    }

    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let r = self.fut.poll(cx);
        if r.is_ready() {
            self.fut.set(notified(self.notify.clone()));
        }
        r
    }
}

enum Wake {
    Cmd(Command),
    Recv(io::Result<(usize, SocketAddr)>),
    Dialed(FlowId, io::Result<TcpStream>),
    Stack,
    Timer,
}

impl Core {
    fn new(socket: UdpSocket, secret: &SecretKey, config: EndpointConfig, role: Role) -> Self {
        let now = Instant::now();
        Core {
            io: Io {
                socket,
                rx: vec![0; 65536].into_boxed_slice(),
                tx: vec![0; DATA_HEADER + MAX_DATAGRAM].into_boxed_slice(),
            },
            peers: Peers::new(secret, now),
            secret: secret.clone(),
            candidates: Vec::new(),
            candidates_due: now,
            config,
            role,
            plain: vec![0; MAX_DATAGRAM].into_boxed_slice(),
            drops: ShellDrops::default(),
            dial_rx: None,
            direct_out: Vec::new(),
        }
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Command>) {
        loop {
            let now = Instant::now();
            let deadline = self.poll_timeout(now);
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            let Core {
                io, role, dial_rx, ..
            } = &mut self;
            let wake = tokio::select! {
                biased;
                c = cmds.recv() => match c {
                    Some(c) => Wake::Cmd(c),
                    None => break,
                },
                Some((id, r)) = async {
                    match dial_rx {
                        Some(d) => d.recv().await,
                        None => std::future::pending().await,
                    }
                } => Wake::Dialed(id, r),
                r = io.socket.recv_from(&mut io.rx) => Wake::Recv(r),
                () = poll_fn(|cx| role.poll_wakers(cx)) => Wake::Stack,
                () = sleep => Wake::Timer,
            };
            let now = Instant::now();
            match wake {
                Wake::Cmd(c) => self.command(c, now).await,
                Wake::Recv(Ok((n, from))) => {
                    self.datagram(n, from, now);
                    for _ in 1..RECV_BATCH {
                        match self.io.socket.try_recv_from(&mut self.io.rx) {
                            Ok((n, from)) => self.datagram(n, from, now),
                            Err(_) => break,
                        }
                    }
                }
                Wake::Recv(Err(e)) => {
                    // ICMP errors for an earlier send show up here on some systems; the
                    // socket itself is fine.
                    tracing::trace!(error = %e, "recv");
                }
                Wake::Dialed(id, r) => self.dialed(id, r),
                Wake::Stack | Wake::Timer => {}
            }
            self.timers(now);
            self.flush(now).await;
        }
        tracing::debug!("endpoint stopped");
    }

    fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        let mut t = self
            .peers
            .poll_timeout()
            .map(|p| p.min(self.candidates_due));
        let mut min = |x: Option<Instant>| {
            t = match (t, x) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        match &mut self.role {
            Role::Client(c) => {
                min(c.relays.poll_timeout());
                for s in c.sites.values_mut() {
                    min(s.stack.poll_timeout(now));
                    min(s.direct.as_ref().and_then(Direct::poll_timeout));
                }
            }
            Role::Agent(a) => {
                min(a.relays.poll_timeout());
                min(a.stack.poll_timeout(now));
                min(a.summary_due);
                for d in a.direct.values() {
                    min(d.direct.poll_timeout());
                }
            }
        }
        Some(t.map_or(self.candidates_due, |t| t.min(self.candidates_due)))
    }

    /// Our candidates: every address of this host (with the socket's port) and the
    /// addresses relays see us at.
    fn gather_candidates(&mut self, now: Instant) {
        self.candidates_due = now + CANDIDATES_EVERY;
        let Ok(local) = self.io.socket.local_addr() else {
            return;
        };
        let mut c = host_candidates(local);
        if let Role::Client(cl) = &self.role {
            c.extend(cl.relays.relays().filter_map(|r| r.observed));
        }
        c.sort();
        c.dedup();
        if c == self.candidates {
            return;
        }
        tracing::debug!(candidates = ?c, "direct-path candidates");
        self.candidates = c.clone();
        match &mut self.role {
            Role::Client(cl) => {
                for s in cl.sites.values_mut() {
                    if let Some(d) = &mut s.direct {
                        d.set_local(c.clone(), now);
                    }
                }
            }
            Role::Agent(a) => {
                for d in a.direct.values_mut() {
                    d.direct.set_local(c.clone(), now);
                }
            }
        }
    }

    fn timers(&mut self, now: Instant) {
        if self.peers.poll_timeout().is_some_and(|t| now >= t) {
            self.peers.handle_timeout(now);
        }
        if now >= self.candidates_due {
            self.gather_candidates(now);
        }
        match &mut self.role {
            Role::Client(c) => {
                if c.relays.poll_timeout().is_some_and(|t| now >= t) {
                    c.relays.handle_timeout(now);
                }
                for s in c.sites.values_mut() {
                    if let Some(d) = &mut s.direct {
                        if d.poll_timeout().is_some_and(|t| now >= t) {
                            d.handle_timeout(now);
                        }
                    }
                }
            }
            Role::Agent(a) => {
                if a.relays.poll_timeout().is_some_and(|t| now >= t) {
                    a.relays.handle_timeout(now);
                }
                for d in a.direct.values_mut() {
                    if d.direct.poll_timeout().is_some_and(|t| now >= t) {
                        d.direct.handle_timeout(now);
                    }
                }
                if a.summary_due.is_some_and(|t| now >= t) {
                    a.summary_due = None;
                    a.summarize_refusals(now);
                }
            }
        }
    }

    /// One received datagram, in `io.rx[..n]`.
    fn datagram(&mut self, n: usize, from: SocketAddr, now: Instant) {
        let d = &self.io.rx[..n];
        let (path, wg) = if wire::is_relay(d) {
            match wire::data_channel(d) {
                Some(ch) => (
                    Path {
                        remote: from,
                        channel: Some(ch),
                    },
                    &d[DATA_HEADER..],
                ),
                None => {
                    let handled = match Frame::decode(d) {
                        Ok(
                            f
                            @ (Frame::Punch { .. } | Frame::Probe { .. } | Frame::ProbeAck { .. }),
                        ) => self
                            .role
                            .direct_frame(from, &f, now, &self.secret, &self.candidates),
                        Ok(f) => match &mut self.role {
                            Role::Client(c) => c.relays.handle_frame(from, &f, now),
                            Role::Agent(a) => a.relays.handle_frame(from, &f, now),
                        },
                        Err(_) => false,
                    };
                    if !handled {
                        self.drops.relay_frames += 1;
                    }
                    return;
                }
            }
        } else {
            (
                Path {
                    remote: from,
                    channel: None,
                },
                d,
            )
        };
        let Ok(Received::Packet { peer, packet, .. }) =
            self.peers.handle_datagram(path, wg, now, &mut self.plain)
        else {
            return;
        };
        match &mut self.role {
            Role::Client(c) => {
                if let Some(s) = c.sites.get_mut(&peer) {
                    s.stack.handle_packet(packet, now);
                }
            }
            Role::Agent(a) => a.stack.handle_packet(packet, now),
        }
    }

    /// Polls the stacks and sends everything there is to send, until nothing moves.
    async fn flush(&mut self, now: Instant) {
        loop {
            let mut moved = false;
            // Relay control.
            let relay_events: Vec<RelayEvent> = match &mut self.role {
                Role::Client(c) => {
                    while let Some((to, b)) = c.relays.poll_transmit() {
                        moved = true;
                        send_raw(&self.io.socket, &b, to, &mut self.drops).await;
                    }
                    std::iter::from_fn(|| c.relays.poll_event()).collect()
                }
                Role::Agent(a) => {
                    while let Some((to, b)) = a.relays.poll_transmit() {
                        moved = true;
                        send_raw(&self.io.socket, &b, to, &mut self.drops).await;
                    }
                    std::iter::from_fn(|| a.relays.poll_event()).collect()
                }
            };
            for e in relay_events {
                moved = true;
                self.relay_event(e, now);
            }
            // Direct-path probes and rendezvous.
            let mut direct_out = std::mem::take(&mut self.direct_out);
            self.role.direct_transmits(&mut direct_out);
            for (to, b) in direct_out.drain(..) {
                moved = true;
                send_raw(&self.io.socket, &b, to, &mut self.drops).await;
            }
            self.direct_out = direct_out;
            // WireGuard's own datagrams.
            while let Some(t) = self.peers.poll_transmit() {
                moved = true;
                self.send_transmit(t).await;
            }
            // The stacks.
            match &mut self.role {
                Role::Client(c) => {
                    for (&peer, s) in c.sites.iter_mut() {
                        s.stack.poll(now);
                        while let Some(p) = s.stack.poll_packet() {
                            moved = true;
                            seal_and_send(
                                &mut self.io,
                                &mut self.peers,
                                peer,
                                &p,
                                s.path,
                                &mut self.drops,
                            )
                            .await;
                        }
                        // Client-mode events (Closed) need nothing from us.
                        while s.stack.poll_event().is_some() {}
                    }
                }
                Role::Agent(a) => {
                    a.stack.poll(now);
                    while let Some(p) = a.stack.poll_packet() {
                        moved = true;
                        let Some(&(peer, _)) = ipv4_dst(&p).and_then(|d| a.by_addr.get(&d)) else {
                            self.drops.no_route += 1;
                            continue;
                        };
                        seal_and_send(
                            &mut self.io,
                            &mut self.peers,
                            peer,
                            &p,
                            None,
                            &mut self.drops,
                        )
                        .await;
                    }
                    while let Some(e) = a.stack.poll_event() {
                        moved = true;
                        a.stack_event(e, &self.config, now);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn relay_event(&mut self, e: RelayEvent, now: Instant) {
        match e {
            RelayEvent::Bound {
                site,
                relay,
                channel,
            } => {
                tracing::debug!(%site, %relay, channel, "relay bound");
                let Role::Client(c) = &mut self.role else {
                    return;
                };
                for (&peer, s) in c.sites.iter_mut() {
                    if s.name == site {
                        s.relay_path = c.relays.path(&site);
                        s.refresh_path();
                        if let Some(d) = &mut s.direct {
                            d.relay_ready(now);
                        }
                        // A new path and no session yet: the initiation boringtun sent had
                        // nowhere to go; send one now rather than after its 5 s retry.
                        if self
                            .peers
                            .stats(peer)
                            .is_some_and(|st| st.handshake_age.is_none())
                        {
                            let _ = self.peers.rekey(peer);
                        }
                    }
                }
            }
            RelayEvent::Refused {
                site,
                relay,
                reason,
            } => {
                tracing::info!(%site, %relay, reason = reason.describe(), "relay refused the binding");
            }
            RelayEvent::Lost { relay } => {
                tracing::info!(%relay, "relay stopped answering");
            }
        }
    }

    async fn send_transmit(&mut self, t: Transmit) {
        let path = match &self.role {
            Role::Client(c) => t
                .peer
                .and_then(|p| c.sites.get(&p))
                .and_then(|s| s.path)
                .or(t.path),
            Role::Agent(_) => t.path,
        };
        let Some(path) = path else {
            self.drops.no_path += 1;
            return;
        };
        let len = t.packet.len();
        self.io.tx[DATA_HEADER..DATA_HEADER + len].copy_from_slice(&t.packet);
        send_on(&self.io.socket, &mut self.io.tx, len, path, &mut self.drops).await;
    }

    fn dialed(&mut self, id: FlowId, r: io::Result<TcpStream>) {
        let Role::Agent(a) = &mut self.role else {
            return;
        };
        a.dialed(id, r);
    }

    async fn command(&mut self, c: Command, now: Instant) {
        match c {
            Command::AddSite(site, reply) => {
                let _ = reply.send(self.add_site(site, now));
            }
            Command::UpdateTicket(site, relays, ticket, reply) => {
                let r = match &mut self.role {
                    Role::Client(c) if c.sites.values().any(|s| s.name == site) => c
                        .relays
                        .set_site(&site, relays, ticket, now)
                        .map_err(EndpointError::from),
                    _ => Err(EndpointError::UnknownSite(site)),
                };
                let _ = reply.send(r);
            }
            Command::RemoveSite(site, reply) => {
                let _ = reply.send(self.remove_site(&site, now));
            }
            Command::Rekey(site, reply) => {
                let peer = match &self.role {
                    Role::Client(c) => c
                        .sites
                        .iter()
                        .find(|(_, s)| s.name == site)
                        .map(|(&p, _)| p),
                    Role::Agent(_) => None,
                };
                let r = match peer {
                    Some(p) => self
                        .peers
                        .rekey(p)
                        .map_err(|e| EndpointError::Handshake(e.to_string())),
                    None => Err(EndpointError::UnknownSite(site)),
                };
                let _ = reply.send(r);
            }
            Command::ConnectTcp(site, dst, reply) => {
                let r = self
                    .client_site(&site)
                    .and_then(|s| s.stack.connect_tcp(dst, now).map_err(EndpointError::from));
                let _ = reply.send(r);
            }
            Command::OpenUdp(site, dst, reply) => {
                let r = self
                    .client_site(&site)
                    .and_then(|s| s.stack.open_udp(dst, now).map_err(EndpointError::from));
                let _ = reply.send(r);
            }
            Command::ClientStatus(reply) => {
                if let Some(st) = self.client_status() {
                    let _ = reply.send(st);
                }
            }
            Command::SetAccess {
                devices,
                relays,
                valid_until,
                reply,
            } => {
                let r = self.set_access(devices, relays, valid_until, now).await;
                let _ = reply.send(r);
            }
            Command::Heartbeat(valid_until) => {
                if let Role::Agent(a) = &mut self.role {
                    a.heard(valid_until, now);
                }
            }
            Command::AgentStatus(reply) => {
                if let Some(st) = self.agent_status() {
                    let _ = reply.send(st);
                }
            }
        }
    }

    fn client_site(&mut self, name: &str) -> Result<&mut ClientSite, EndpointError> {
        match &mut self.role {
            Role::Client(c) => c
                .sites
                .values_mut()
                .find(|s| s.name == name)
                .ok_or_else(|| EndpointError::UnknownSite(name.to_owned())),
            Role::Agent(_) => Err(EndpointError::UnknownSite(name.to_owned())),
        }
    }

    fn add_site(&mut self, site: SitePeer, now: Instant) -> Result<(), EndpointError> {
        let Role::Client(c) = &mut self.role else {
            return Err(EndpointError::UnknownSite(site.site));
        };
        let existing = c.sites.iter().find(|(_, s)| s.name == site.site);
        if let Some((&peer, s)) = existing {
            if s.key == site.agent_key {
                c.relays
                    .set_site(&site.site, site.relays, site.ticket, now)?;
                let s = c.sites.get_mut(&peer).expect("found");
                s.relay_path = c.relays.path(&site.site);
                s.refresh_path();
                return Ok(());
            }
            let key = s.key;
            c.sites.remove(&peer);
            self.peers.remove_peer(&key);
        }
        c.relays
            .set_site(&site.site, site.relays, site.ticket, now)?;
        let stack = Stack::new(
            self.config
                .stack(StackConfig::client(IpAddr::V4(c.device_addr))),
            now,
        )?;
        let peer = self.peers.add_peer(
            PeerConfig {
                key: site.agent_key,
                sources: Sources::Any,
                keepalive: None,
            },
            now,
        );
        let mut direct = Direct::new(
            PathRole::Controlling,
            &self.secret,
            site.agent_key,
            rand::random(),
        );
        if let Some(d) = &mut direct {
            d.set_local(self.candidates.clone(), now);
        }
        let relay_path = c.relays.path(&site.site);
        c.sites.insert(
            peer,
            ClientSite {
                name: site.site.clone(),
                key: site.agent_key,
                waker: Waker::new(stack.waker()),
                stack,
                path: relay_path,
                relay_path,
                direct,
            },
        );
        Ok(())
    }

    fn remove_site(&mut self, name: &str, now: Instant) -> Result<(), EndpointError> {
        let Role::Client(c) = &mut self.role else {
            return Err(EndpointError::UnknownSite(name.to_owned()));
        };
        let Some((&peer, s)) = c.sites.iter().find(|(_, s)| s.name == name) else {
            return Err(EndpointError::UnknownSite(name.to_owned()));
        };
        let key = s.key;
        c.sites.remove(&peer);
        c.relays.remove_site(name, now);
        self.peers.remove_peer(&key);
        Ok(())
    }

    fn client_status(&mut self) -> Option<EndpointStatus> {
        let Role::Client(c) = &self.role else {
            return None;
        };
        let now = Instant::now();
        let mut sites: Vec<SiteStatus> = c
            .sites
            .iter()
            .map(|(&peer, s)| {
                let wg = self.peers.stats(peer);
                let relay = c.relays.site_status(&s.name);
                let stack = s.stack.stats();
                SiteStatus {
                    site: s.name.clone(),
                    relay: relay.and_then(|r| r.relay),
                    rtt: relay.and_then(|r| r.rtt),
                    handshake_age: wg.and_then(|w| w.handshake_age),
                    tx_bytes: wg.map_or(0, |w| w.tx_bytes),
                    rx_bytes: wg.map_or(0, |w| w.rx_bytes),
                    open_flows: stack.open_flows,
                    stack,
                    direct: s.direct.as_ref().map(|d| d.status(now)),
                }
            })
            .collect();
        sites.sort_by(|a, b| a.site.cmp(&b.site));
        let local: Vec<SocketAddr> = self
            .io
            .socket
            .local_addr()
            .map(host_candidates)
            .unwrap_or_default();
        let observed: Vec<SocketAddr> = c.relays.relays().filter_map(|r| r.observed).collect();
        Some(EndpointStatus {
            public_key: self.peers.public_key(),
            local_addr: self.io.socket.local_addr().ok()?,
            sites,
            relays: c.relays.relays().collect(),
            drops: self.peers.drops(),
            other_drops: self.drops,
            candidates: self.candidates.clone(),
            mapping: Mapping::judge(&observed, &local),
        })
    }

    fn agent_status(&mut self) -> Option<AgentStatus> {
        let Role::Agent(a) = &self.role else {
            return None;
        };
        let now = Instant::now();
        let mut devices: Vec<DeviceStatus> = a
            .devices
            .values()
            .map(|d| {
                let key = PeerKey(d.key);
                let wg = self.peers.id(&key).and_then(|p| self.peers.stats(p));
                DeviceStatus {
                    device: d.device.clone(),
                    user: d.user.clone(),
                    key,
                    address: d.address,
                    handshake_age: wg.and_then(|w| w.handshake_age),
                    tx_bytes: wg.map_or(0, |w| w.tx_bytes),
                    rx_bytes: wg.map_or(0, |w| w.rx_bytes),
                    last_path: wg.and_then(|w| w.last_path),
                    open_flows: a.flows.values().filter(|f| f.device == key).count(),
                }
            })
            .collect();
        devices.sort_by(|x, y| x.device.cmp(&y.device));
        Some(AgentStatus {
            public_key: self.peers.public_key(),
            local_addr: self.io.socket.local_addr().ok()?,
            admitting: a.valid_until.is_some_and(|v| now < v),
            devices,
            relays: a.relays.bindings().collect(),
            drops: self.peers.drops(),
            other_drops: self.drops,
            flows: a.stats,
            stack: a.stack.stats(),
            direct: a.direct.values().fold(DirectStats::default(), |mut t, d| {
                let s = d.direct.stats();
                t.rounds += s.rounds;
                t.probes_sent += s.probes_sent;
                t.acks += s.acks;
                t.forged += s.forged;
                t.replayed += s.replayed;
                t.upgrades += s.upgrades;
                t.fallbacks += s.fallbacks;
                t
            }),
        })
    }

    async fn set_access(
        &mut self,
        devices: Vec<DeviceAccess>,
        relays: Vec<(SocketAddr, Vec<u8>)>,
        valid_until: Instant,
        now: Instant,
    ) -> Result<(), EndpointError> {
        let Role::Agent(a) = &mut self.role else {
            return Err(EndpointError::UnknownSite(String::new()));
        };
        a.relays.set_relays(relays, now)?;
        a.devices = devices.into_iter().map(|d| (PeerKey(d.key), d)).collect();
        // A device's direct-path logic starts with its first Call (one X25519 per device
        // that punches, not per device granted).
        a.direct.retain(|k, _| a.devices.contains_key(k));
        a.heard(valid_until, now);
        a.recheck();
        // The RSTs of cut flows go out while their devices are still peers.
        self.flush(now).await;
        let Role::Agent(a) = &mut self.role else {
            unreachable!("checked above");
        };
        self.peers.set_peers(
            a.devices.values().map(|d| PeerConfig {
                key: PeerKey(d.key),
                sources: Sources::Only(IpAddr::V4(d.address)),
                keepalive: None,
            }),
            now,
        );
        a.by_addr = a
            .devices
            .values()
            .filter_map(|d| {
                let key = PeerKey(d.key);
                Some((d.address, (self.peers.id(&key)?, key)))
            })
            .collect();
        Ok(())
    }
}

impl Role {
    /// A Punch (from a relay), Probe or ProbeAck (from the peer): to the pairing's
    /// direct-path logic. `false` if nobody takes it (count it).
    fn direct_frame(
        &mut self,
        from: SocketAddr,
        f: &Frame<'_>,
        now: Instant,
        secret: &SecretKey,
        candidates: &[SocketAddr],
    ) -> bool {
        match (self, f) {
            (
                Role::Client(c),
                Frame::Punch {
                    channel,
                    kind,
                    observed,
                    body,
                },
            ) => {
                let on = Path {
                    remote: from,
                    channel: Some(*channel),
                };
                let Some(s) = c.sites.values_mut().find(|s| s.relay_path == Some(on)) else {
                    return false;
                };
                let r = s
                    .direct
                    .as_mut()
                    .map(|d| d.handle_punch(*kind, *observed, body, now));
                tracing::debug!(site = %s.name, ?kind, ?observed, result = ?r, "punch");
                client_events(s);
                matches!(r, Some(Ok(())))
            }
            (
                Role::Client(c),
                Frame::Probe { from: key, .. } | Frame::ProbeAck { from: key, .. },
            ) => {
                let Some(s) = c.sites.values_mut().find(|s| s.key.0 == *key) else {
                    return false;
                };
                let ok = s.direct.as_mut().is_some_and(|d| {
                    match f {
                        Frame::Probe { .. } => d.handle_probe(from, f, now),
                        _ => d.handle_ack(from, f, now),
                    }
                    .is_ok()
                });
                client_events(s);
                ok
            }
            (
                Role::Agent(a),
                Frame::Punch {
                    channel,
                    kind,
                    observed,
                    body,
                },
            ) => {
                if !a.relays.is_relay(from) {
                    return false;
                }
                let Some(offer) = warren_proto::relay::Offer::decode(body) else {
                    return false;
                };
                let key = PeerKey(offer.from);
                if !a.devices.contains_key(&key) {
                    return false;
                }
                let d = match a.direct.entry(key) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let Some(mut direct) =
                            Direct::new(PathRole::Controlled, secret, key, rand::random())
                        else {
                            return false;
                        };
                        direct.set_local(candidates.to_vec(), now);
                        e.insert(AgentDirect {
                            direct,
                            punch_path: None,
                        })
                    }
                };
                d.punch_path = Some(Path {
                    remote: from,
                    channel: Some(*channel),
                });
                let r = d.direct.handle_punch(*kind, *observed, body, now);
                tracing::debug!(device = %PeerKey(offer.from), ?kind, ?observed, result = ?r, "punch");
                r.is_ok()
            }
            (
                Role::Agent(a),
                Frame::Probe { from: key, .. } | Frame::ProbeAck { from: key, .. },
            ) => {
                let Some(d) = a.direct.get_mut(&PeerKey(*key)) else {
                    return false;
                };
                match f {
                    Frame::Probe { .. } => d.direct.handle_probe(from, f, now),
                    _ => d.direct.handle_ack(from, f, now),
                }
                .is_ok()
            }
            _ => false,
        }
    }

    /// Everything the direct-path logic has to send, as datagrams (a Punch wrapped for the
    /// relay path it belongs on).
    fn direct_transmits(&mut self, out: &mut Vec<(SocketAddr, Vec<u8>)>) {
        fn drain(d: &mut Direct, relay: Option<Path>, out: &mut Vec<(SocketAddr, Vec<u8>)>) {
            while let Some(t) = d.poll_transmit() {
                match t {
                    DirectTransmit::Direct { to, datagram } => out.push((to, datagram)),
                    DirectTransmit::Punch { kind, body } => {
                        let Some(Path {
                            remote,
                            channel: Some(channel),
                        }) = relay
                        else {
                            continue;
                        };
                        let frame = Frame::Punch {
                            channel,
                            kind,
                            observed: None,
                            body: &body,
                        };
                        out.push((remote, frame.to_vec()));
                    }
                }
            }
        }
        match self {
            Role::Client(c) => {
                for s in c.sites.values_mut() {
                    if let Some(d) = &mut s.direct {
                        drain(d, s.relay_path, out);
                    }
                    client_events(s);
                }
            }
            Role::Agent(a) => {
                for d in a.direct.values_mut() {
                    drain(&mut d.direct, d.punch_path, out);
                    while d.direct.poll_event().is_some() {}
                }
            }
        }
    }

    fn poll_wakers(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        match self {
            Role::Client(c) => {
                for s in c.sites.values_mut() {
                    if s.waker.poll(cx).is_ready() {
                        return Poll::Ready(());
                    }
                }
                Poll::Pending
            }
            Role::Agent(a) => a.waker.poll(cx),
        }
    }
}

impl AgentRole {
    fn heard(&mut self, valid_until: Instant, now: Instant) {
        if self.stale_logged && now < valid_until {
            tracing::info!("heard from a node again: admitting new flows");
        }
        self.stale_logged = false;
        self.valid_until = Some(valid_until);
        self.last_word = Some(now);
    }

    /// Every open or dialling flow checked against the current devices and grants; the
    /// ones no longer allowed are cut.
    fn recheck(&mut self) {
        let cut: Vec<FlowId> = self
            .flows
            .iter()
            .filter(|(_, f)| {
                let device = self
                    .devices
                    .get(&f.device)
                    .filter(|d| IpAddr::V4(d.address) == f.src.ip());
                device.and_then(|d| allowed(d, f.proto, f.dst)).is_none()
            })
            .map(|(&id, _)| id)
            .collect();
        for id in cut {
            let f = self.flows.remove(&id).expect("listed above");
            if let Some(t) = f.task {
                t.abort();
            }
            self.stack.abort(id);
            self.stats.revoked += 1;
            tracing::debug!(%id, src = %f.src, dst = %f.dst, "access withdrawn: flow cut");
        }
    }

    fn stack_event(&mut self, e: StackEvent, config: &EndpointConfig, now: Instant) {
        match e {
            StackEvent::NewFlow {
                id,
                proto,
                src,
                dst,
            } => self.new_flow(id, proto, src, dst, config, now),
            StackEvent::Closed { id, .. } => {
                self.flows.remove(&id);
            }
        }
    }

    fn new_flow(
        &mut self,
        id: FlowId,
        proto: Proto,
        src: SocketAddr,
        dst: SocketAddr,
        config: &EndpointConfig,
        now: Instant,
    ) {
        let owner = match src.ip() {
            IpAddr::V4(ip) => self.by_addr.get(&ip).map(|&(_, k)| k),
            IpAddr::V6(_) => None,
        };
        let device = owner.and_then(|k| self.devices.get(&k));
        let target = match admission(device, self.valid_until, now, proto, src, dst) {
            Ok(t) => t,
            Err(why) => {
                self.stack.refuse(id);
                self.refused(why, proto, src, dst, now);
                return;
            }
        };
        let device = owner.expect("admitted flows have a device");
        let task = match proto {
            Proto::Tcp => {
                let tx = self.dial_tx.clone();
                let timeout = config.dial_timeout;
                Some(tokio::spawn(async move {
                    let r = match tokio::time::timeout(timeout, dial_tcp(&target)).await {
                        Ok(r) => r,
                        Err(_) => Err(io::ErrorKind::TimedOut.into()),
                    };
                    let _ = tx.send((id, r));
                }))
            }
            Proto::Udp => match self.stack.admit_udp(id) {
                Ok(flow) => {
                    self.stats.admitted += 1;
                    Some(tokio::spawn(udp_flow(
                        flow,
                        target,
                        config.udp_idle_timeout,
                    )))
                }
                Err(e) => {
                    tracing::debug!(%id, error = %e, "udp flow vanished before admission");
                    return;
                }
            },
            Proto::Icmp => {
                if self.stack.admit_icmp(id).is_err() {
                    return;
                }
                self.stats.admitted += 1;
                None
            }
        };
        self.flows.insert(
            id,
            AgentFlow {
                device,
                proto,
                src,
                dst,
                task,
                dialing: proto == Proto::Tcp,
            },
        );
    }

    fn dialed(&mut self, id: FlowId, r: io::Result<TcpStream>) {
        let Some(f) = self.flows.get_mut(&id).filter(|f| f.dialing) else {
            // Cut (or gone) while dialling: the stream is dropped.
            return;
        };
        let stream = match r {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%id, dst = %f.dst, error = %e, "dial failed: flow refused");
                self.flows.remove(&id);
                self.stack.refuse(id);
                self.stats.dial_failed += 1;
                return;
            }
        };
        match self.stack.admit_tcp(id) {
            Ok(mut flow) => {
                f.dialing = false;
                self.stats.admitted += 1;
                let _ = stream.set_nodelay(true);
                f.task = Some(tokio::spawn(async move {
                    let mut stream = stream;
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut flow,
                        &mut stream,
                        64 << 10,
                        64 << 10,
                    )
                    .await;
                }));
            }
            Err(e) => {
                tracing::debug!(%id, error = %e, "tcp flow gone before admission");
                self.flows.remove(&id);
            }
        }
    }

    fn refused(
        &mut self,
        why: FlowRefusal,
        proto: Proto,
        src: SocketAddr,
        dst: SocketAddr,
        now: Instant,
    ) {
        match why {
            FlowRefusal::NoGrant => self.stats.refused_no_grant += 1,
            FlowRefusal::UnknownSource => self.stats.refused_unknown_source += 1,
            FlowRefusal::Stale => {
                self.stats.refused_stale += 1;
                if !self.stale_logged {
                    self.stale_logged = true;
                    let silent = self
                        .last_word
                        .map_or(0, |t| now.duration_since(t).as_secs());
                    tracing::warn!("no word from any node for {silent} s: admitting no new flow");
                }
            }
        }
        tracing::debug!(?why, ?proto, %src, %dst, "flow refused");
        self.refused_since_summary += 1;
        self.summary_due.get_or_insert(now + REFUSAL_SUMMARY);
    }

    fn summarize_refusals(&mut self, _now: Instant) {
        if self.refused_since_summary > 0 {
            tracing::info!(
                refused = self.refused_since_summary,
                no_grant = self.stats.refused_no_grant,
                stale = self.stats.refused_stale,
                "new flows refused in the last {} s (totals since start follow)",
                REFUSAL_SUMMARY.as_secs()
            );
        }
        self.refused_since_summary = 0;
    }
}

async fn dial_tcp(target: &Target) -> io::Result<TcpStream> {
    match target {
        Target::Address(a) => TcpStream::connect(a).await,
        Target::Name(name, port) => TcpStream::connect((name.as_str(), *port)).await,
    }
}

async fn resolve(target: &Target) -> io::Result<SocketAddr> {
    match target {
        Target::Address(a) => Ok(*a),
        Target::Name(name, port) => tokio::net::lookup_host((name.as_str(), *port))
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "name resolves to nothing")),
    }
}

/// One admitted UDP flow: a socket of its own to the target, until idle.
async fn udp_flow(flow: UdpFlow, target: Target, idle: Duration) {
    let r: io::Result<()> = async {
        let to = resolve(&target).await?;
        let bind: SocketAddr = if to.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(bind).await?;
        sock.connect(to).await?;
        let mut up = vec![0u8; 65536];
        let mut down = vec![0u8; 65536];
        loop {
            tokio::select! {
                r = flow.recv(&mut up) => {
                    let n = r?;
                    sock.send(&up[..n]).await?;
                }
                r = sock.recv(&mut down) => {
                    let n = r?;
                    flow.send(&down[..n]).await?;
                }
                () = tokio::time::sleep(idle) => return Ok(()),
            }
        }
    }
    .await;
    if let Err(e) = r {
        tracing::debug!(id = %flow.id(), error = %e, "udp flow ended");
    }
}

fn ipv4_dst(p: &[u8]) -> Option<Ipv4Addr> {
    (p.len() >= 20 && p[0] >> 4 == 4).then(|| Ipv4Addr::new(p[16], p[17], p[18], p[19]))
}

/// Seals one IP packet for `peer` into `io.tx` after the relay header room and sends it on
/// `path` (or the peer's last path).
async fn seal_and_send(
    io: &mut Io,
    peers: &mut Peers,
    peer: PeerId,
    packet: &[u8],
    path: Option<Path>,
    drops: &mut ShellDrops,
) {
    let sealed = match peers.encapsulate(peer, packet, &mut io.tx[DATA_HEADER..]) {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            tracing::trace!(error = %e, "seal");
            return;
        }
    };
    let Some(path) = path.or(sealed.path) else {
        drops.no_path += 1;
        return;
    };
    send_on(&io.socket, &mut io.tx, sealed.len, path, drops).await;
}

/// Sends the WireGuard packet in `tx[DATA_HEADER..DATA_HEADER + len]` on `path`, writing the
/// relay header in front of it when relayed.
async fn send_on(
    socket: &UdpSocket,
    tx: &mut [u8],
    len: usize,
    path: Path,
    drops: &mut ShellDrops,
) {
    let datagram = match path.channel {
        Some(ch) => {
            wire::write_data_header(tx, ch);
            &tx[..DATA_HEADER + len]
        }
        None => &tx[DATA_HEADER..DATA_HEADER + len],
    };
    send_raw(socket, datagram, path.remote, drops).await;
}

async fn send_raw(socket: &UdpSocket, datagram: &[u8], to: SocketAddr, drops: &mut ShellDrops) {
    if let Err(e) = socket.send_to(datagram, to).await {
        drops.send_errors += 1;
        tracing::trace!(error = %e, %to, "send");
    }
}

#[cfg(test)]
mod tests;
