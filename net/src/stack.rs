//! The userspace TCP/IP stack (smoltcp, IP medium) that turns the IP packets inside WireGuard
//! into flows, and flows into IP packets.
//!
//! ```text
//!          shell (one task: UDP socket + WireGuard + this Stack)
//!   decrypted IP ──handle_packet──► ┌───────────────────────────┐ ──poll_event──► NewFlow / Closed
//!                                   │ Stack (sans-IO)           │
//!   encrypt+send ◄──poll_packet──── │  parse → admission gate   │ ◄──admit_*/refuse/abort
//!                                   │  smoltcp Interface (TCP)  │
//!   sleep until ◄──poll_timeout──── │  own UDP / ICMP echo      │
//!                                   └───────┬────────▲──────────┘
//!                      bounded buffers,     │        │ waker(): handles notify the shell
//!                      one mutex per flow   ▼        │
//!                                   TcpFlow (AsyncRead + AsyncWrite) / UdpFlow (send/recv)
//! ```
//!
//! Two modes:
//! - [`Mode::Client`] (`warren connect`): one local tunnel address; flows are opened with
//!   [`Stack::connect_tcp`] / [`Stack::open_udp`]. Inbound packets for no flow get a RST (TCP)
//!   or are dropped.
//! - [`Mode::Accept`] (the agent): any destination address (smoltcp any-IP). The first packet
//!   of every new flow (TCP SYN, first UDP datagram of a 5-tuple, ICMP echo request of a new
//!   identifier) is held back and surfaced as [`StackEvent::NewFlow`]; smoltcp never sees it
//!   until the owner calls [`Stack::admit_tcp`] / [`Stack::admit_udp`] / [`Stack::admit_icmp`]
//!   or [`Stack::refuse`]. Admitting a TCP flow creates a socket listening on exactly that
//!   destination and replays the held SYN into it at once, so two clients (or two source
//!   ports) racing to the same destination each get their own socket.
//!
//! Refusal: a refused TCP flow gets a RST (the client's connect fails at once with "connection
//! refused"; no ICMP unreachable is sent, it would say less); a refused UDP or ICMP flow is
//! dropped silently and its 5-tuple remembered for
//! [`StackConfig::idle_timeout`] so that later datagrams raise no new event.
//!
//! ICMP echo: in accept mode an echo request is a flow of its own (source, destination,
//! identifier). Once admitted, **the stack answers it** on the destination's behalf: the reply
//! says the device may reach that address and measures the path to the agent, not that the
//! target is up. Client mode drops inbound ICMP.
//!
//! # TCP: what smoltcp 0.14 offers and lacks
//! Each TCP flow is a smoltcp socket with CUBIC congestion control (feature
//! `socket-tcp-cubic`), Nagle off (interactive sessions), window scaling (from the
//! receive buffer: [`StackConfig::tcp_rx_buffer`]), keep-alive and a silence timeout, and a
//! 32-hole reassembly buffer (feature `assembler-max-segment-count-32`). smoltcp **sends**
//! SACK blocks but ignores those it **receives**: after a loss it retransmits only the first
//! unacknowledged segment per three duplicate ACKs (one hole per round trip, NewReno-like),
//! and a retransmission timeout resends the whole window (go-back-N). It has no RACK, no
//! PRR, no pacing, no TCP timestamps unless a clock callback is given (none here: the stack
//! reads no clock), and it finds a packet's socket by a linear scan over all sockets, so cost
//! per packet grows with the number of open TCP flows. Lossy paths with a large window are
//! where this hurts most.
//!
//! # Not handled
//! IP fragments, IPv6 extension headers, protocols other than TCP/UDP/ICMP(v6) echo: dropped
//! and counted in [`StackStats::unsupported`]. UDP datagrams are never fragmented:
//! [`UdpFlow::send`] refuses payloads larger than the inner MTU allows.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as SmolDuration, Instant as SmolInstant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use tokio::sync::Notify;

mod flow;
mod packet;
#[cfg(test)]
mod tests;

pub use flow::{TcpFlow, UdpFlow};

use flow::{lock, Bridge, TcpShared, UdpShared};
use packet::{OutQueue, Parsed, Phy, Reject, L4};

/// Which side of the tunnel the stack is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The client: packets come from and go to this one tunnel address; flows are opened
    /// locally.
    Client {
        /// The device's tunnel address (e.g. 100.64.0.7).
        local: IpAddr,
    },
    /// The agent: packets to any address are accepted, and each new flow waits for the
    /// owner's admission.
    Accept,
}

/// The stack's configuration. Build it with [`StackConfig::client`] or
/// [`StackConfig::accept`] (or `Default`, which is accept mode) and change fields as needed;
/// [`Stack::new`] validates it.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Client or accept mode.
    pub mode: Mode,
    /// The inner MTU in bytes: the largest IP packet sent or accepted (larger inbound packets
    /// are dropped, counted in [`StackStats::oversized`]). Both ends of a tunnel must agree.
    /// 1280 by default; at least 1280 (IPv6's minimum), at most 65535.
    pub mtu: usize,
    /// Most flows at once, pending admission or open. Beyond it new TCP flows are reset (and
    /// counted in [`StackStats::refused_full`]), new UDP/ICMP flows dropped. 1024 by default.
    pub max_flows: usize,
    /// Bytes of each TCP socket's receive buffer: the most the stack advertises as window
    /// (window scaling follows from it). 1 MiB by default (about 80 ms at 100 Mbit/s);
    /// at least 4096.
    pub tcp_rx_buffer: usize,
    /// Bytes of each TCP socket's send buffer: the most unacknowledged data in flight.
    /// 1 MiB by default; at least 4096.
    pub tcp_tx_buffer: usize,
    /// Bytes buffered each way between a TCP socket and its [`TcpFlow`] handle; a full buffer
    /// makes writes wait and shrinks the window advertised to the peer. 256 KiB by default;
    /// at least 4096.
    pub flow_buffer: usize,
    /// Datagrams queued each way per UDP flow; more inbound ones are dropped (and counted in
    /// [`StackStats::udp_dropped`]), [`UdpFlow::send`] waits. 256 by default; at least 1.
    pub udp_queue: usize,
    /// A UDP or ICMP flow with no datagram either way for this long is closed; a refused one
    /// is remembered this long. 120 s by default; at least 1 s.
    pub idle_timeout: Duration,
    /// A TCP connection whose peer sends nothing for this long (while data or a handshake is
    /// outstanding, or across keep-alives) is closed with `TimedOut`. 60 s by default; at
    /// least 1 s and more than [`StackConfig::tcp_keep_alive`].
    pub tcp_timeout: Duration,
    /// Interval of TCP keep-alives on an idle connection. 20 s by default.
    pub tcp_keep_alive: Duration,
    /// Seed for initial sequence numbers and local ports; `None` draws one at random.
    pub seed: Option<u64>,
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Accept,
            mtu: 1280,
            max_flows: 1024,
            tcp_rx_buffer: 1 << 20,
            tcp_tx_buffer: 1 << 20,
            flow_buffer: 256 << 10,
            udp_queue: 256,
            idle_timeout: Duration::from_secs(120),
            tcp_timeout: Duration::from_secs(60),
            tcp_keep_alive: Duration::from_secs(20),
            seed: None,
        }
    }
}

impl StackConfig {
    /// Client mode with `local` as the tunnel address, other fields at their defaults.
    pub fn client(local: IpAddr) -> Self {
        Self {
            mode: Mode::Client { local },
            ..Self::default()
        }
    }

    /// Accept mode, other fields at their defaults.
    pub fn accept() -> Self {
        Self::default()
    }

    /// Checks every field, naming the first one out of range.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let check = |ok: bool, field: &'static str, expected: &'static str, got: String| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError {
                    field,
                    expected,
                    got,
                })
            }
        };
        if let Mode::Client { local } = self.mode {
            check(
                !(local.is_unspecified() || local.is_multicast()),
                "mode.local",
                "a unicast address",
                local.to_string(),
            )?;
        }
        check(
            (1280..=65535).contains(&self.mtu),
            "mtu",
            "1280..=65535 bytes",
            self.mtu.to_string(),
        )?;
        check(
            self.max_flows >= 1,
            "max_flows",
            "at least 1",
            self.max_flows.to_string(),
        )?;
        for (field, value) in [
            ("tcp_rx_buffer", self.tcp_rx_buffer),
            ("tcp_tx_buffer", self.tcp_tx_buffer),
            ("flow_buffer", self.flow_buffer),
        ] {
            check(
                (4096..=1 << 30).contains(&value),
                field,
                "4096..=1073741824 bytes",
                value.to_string(),
            )?;
        }
        check(
            self.udp_queue >= 1,
            "udp_queue",
            "at least 1 datagram",
            self.udp_queue.to_string(),
        )?;
        check(
            self.idle_timeout >= Duration::from_secs(1),
            "idle_timeout",
            "at least 1 s",
            format!("{:?}", self.idle_timeout),
        )?;
        check(
            self.tcp_timeout >= Duration::from_secs(1) && self.tcp_timeout > self.tcp_keep_alive,
            "tcp_timeout",
            "at least 1 s and more than tcp_keep_alive",
            format!("{:?}", self.tcp_timeout),
        )?;
        Ok(self)
    }
}

/// A [`StackConfig`] field out of range (the caller's fault); nothing was created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stack config: {field}: expected {expected}, got {got}")]
pub struct ConfigError {
    /// The field's name, e.g. `mtu`.
    pub field: &'static str,
    /// What the field must be.
    pub expected: &'static str,
    /// What it was.
    pub got: String,
}

/// A flow's id, unique for the life of its stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u64);

impl std::fmt::Display for FlowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "flow-{}", self.0)
    }
}

/// A flow's transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP or ICMPv6 echo (ping); the ports of its endpoints are the echo identifier.
    Icmp,
}

/// Something the owner must know about; drain with [`Stack::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StackEvent {
    /// Accept mode: a flow waits for [`Stack::admit_tcp`] / [`Stack::admit_udp`] /
    /// [`Stack::admit_icmp`] or [`Stack::refuse`]. Until then its packets are held (TCP: the
    /// latest SYN; UDP/ICMP: up to [`StackConfig::udp_queue`] datagrams).
    NewFlow {
        /// The flow.
        id: FlowId,
        /// Its protocol.
        proto: Proto,
        /// The client's endpoint (its tunnel address).
        src: SocketAddr,
        /// The endpoint the client asked for.
        dst: SocketAddr,
    },
    /// A flow that was open (connected, admitted) is gone; its id will not be seen again.
    Closed {
        /// The flow.
        id: FlowId,
        /// Why.
        why: CloseReason,
    },
}

/// Why a flow closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides finished (TCP FIN both ways; UDP handle dropped).
    Finished,
    /// The peer reset the connection (or refused it, for a client-mode connect).
    Reset,
    /// The peer went silent for [`StackConfig::tcp_timeout`].
    TimedOut,
    /// No datagram either way for [`StackConfig::idle_timeout`] (UDP, ICMP).
    Idle,
    /// [`Stack::abort`] cut it.
    Aborted,
}

/// Whether a flow waits for admission or is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowStatus {
    /// Waiting for the owner's decision (accept mode).
    Pending,
    /// Admitted or connected.
    Open,
}

/// One flow, as [`Stack::flows`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowInfo {
    /// The flow.
    pub id: FlowId,
    /// Its protocol.
    pub proto: Proto,
    /// The initiator's endpoint.
    pub src: SocketAddr,
    /// The responder's endpoint.
    pub dst: SocketAddr,
    /// Pending or open.
    pub status: FlowStatus,
    /// Payload bytes this stack sent to the peer for the flow's handle.
    pub bytes_sent: u64,
    /// Payload bytes this stack received from the peer for the flow's handle.
    pub bytes_received: u64,
}

/// Counters since the stack was made, and the current flow counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StackStats {
    /// Packets given to [`Stack::handle_packet`].
    pub packets_in: u64,
    /// Packets handed out by [`Stack::poll_packet`] (or queued for it).
    pub packets_out: u64,
    /// Inbound packets that were not well-formed IP/TCP/UDP/ICMP: dropped.
    pub malformed: u64,
    /// Inbound packets of a kind the stack does not handle (fragments, IPv6 extension
    /// headers, other protocols, ICMP other than echo requests): dropped.
    pub unsupported: u64,
    /// Inbound packets longer than [`StackConfig::mtu`]: dropped.
    pub oversized: u64,
    /// Client mode: inbound packets to an address other than the tunnel address: dropped.
    pub misdirected: u64,
    /// Inbound packets for no flow and not starting one (answered by RST for TCP,
    /// dropped otherwise), including datagrams of refused UDP/ICMP flows.
    pub no_flow: u64,
    /// Flows refused by the owner ([`Stack::refuse`]).
    pub refused: u64,
    /// New flows refused because [`StackConfig::max_flows`] were open or pending.
    pub refused_full: u64,
    /// Inbound UDP/ICMP datagrams dropped because the flow's queue was full.
    pub udp_dropped: u64,
    /// Flows aborted ([`Stack::abort`]).
    pub aborted: u64,
    /// Flows open now.
    pub open_flows: usize,
    /// Flows waiting for admission now.
    pub pending_flows: usize,
}

/// A failed call on the stack (the caller's fault unless the variant says otherwise);
/// the stack is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StackError {
    /// The call belongs to the other mode (e.g. `connect_tcp` on an accept-mode stack).
    #[error("not available in this stack's mode")]
    WrongMode,
    /// No flow with this id (never existed, or already closed).
    #[error("no flow {0}")]
    UnknownFlow(FlowId),
    /// The flow is not waiting for admission (already admitted), or not of the protocol the
    /// call admits.
    #[error("{id} is not a pending {expected:?} flow")]
    NotPending {
        /// The flow.
        id: FlowId,
        /// The protocol the call admits.
        expected: Proto,
    },
    /// [`StackConfig::max_flows`] flows are open or pending.
    #[error("too many flows (at most {max})")]
    TooManyFlows {
        /// The limit.
        max: usize,
    },
    /// The destination is unspecified, multicast, of port 0, or of an address family the
    /// client's tunnel address is not.
    #[error("cannot reach {0} from this stack")]
    BadDestination(SocketAddr),
    /// Every local port toward this destination is in use.
    #[error("no free local port toward {0}")]
    PortsExhausted(SocketAddr),
    /// The client's held SYN could not be replayed (the client's fault: smoltcp rejected
    /// the segment); the flow is gone.
    #[error("{0}: the client's SYN was not accepted")]
    BadSyn(FlowId),
}

/// The userspace TCP/IP stack: sans-IO, owned by one task.
///
/// # Calling order
/// The owner (the IO shell) loops:
/// 1. For each decrypted inbound IP packet: [`handle_packet`](Self::handle_packet).
/// 2. [`poll`](Self::poll): runs smoltcp's timers and output, and moves bytes between the
///    sockets and the flow handles. Call it after any batch of `handle_packet`, after any
///    `connect_tcp` / `open_udp` / `admit_*` / `refuse` / `abort`, when
///    [`waker`](Self::waker) fires (a handle has data or was dropped), and at
///    [`poll_timeout`](Self::poll_timeout).
/// 3. Drain [`poll_packet`](Self::poll_packet) (encrypt and send each packet) and
///    [`poll_event`](Self::poll_event) (accept mode: decide every `NewFlow` with
///    `admit_*`/`refuse`, then `poll` again).
/// 4. Sleep until [`poll_timeout`](Self::poll_timeout), a new datagram, or the waker.
///
/// The stack never reads the clock: every `now` comes from the owner and must not go
/// backwards; calls without a `now` use the latest one given.
pub struct Stack {
    config: StackConfig,
    iface: Interface,
    sockets: SocketSet<'static>,
    out: OutQueue,
    /// `now` given to `new`: smoltcp's clock counts from it.
    epoch: Instant,
    /// The latest `now` given.
    now: Instant,
    flows: HashMap<FlowId, Flow>,
    by_key: HashMap<FlowKey, FlowId>,
    next_id: u64,
    events: VecDeque<StackEvent>,
    bridge: Arc<Bridge>,
    /// Flows that received a packet since the last `poll`.
    touched: Vec<FlowId>,
    /// The dirty list swapped out of the bridge (kept for its allocation).
    spare: Vec<FlowId>,
    /// Sockets aborted since the last `poll`: removed once their RST is out.
    reap: Vec<SocketHandle>,
    /// Refused UDP/ICMP 5-tuples and when they are forgotten.
    tombstones: HashMap<FlowKey, Instant>,
    /// When smoltcp wanted to be polled, as last asked; a `poll` at or after it looks at
    /// every TCP flow (a timer may have closed one).
    timer: Option<Instant>,
    /// When the next UDP/ICMP flow may be idle, or a tombstone expires.
    next_idle: Option<Instant>,
    next_port: u16,
    stats: StackStats,
}

/// Where a flow's packets are found: the stack's own endpoint and the peer's (for ICMP, the
/// ports are the echo identifier).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: Proto,
    ours: SocketAddr,
    theirs: SocketAddr,
}

struct Flow {
    key: FlowKey,
    src: SocketAddr,
    dst: SocketAddr,
    state: FlowState,
    bytes_sent: u64,
    bytes_received: u64,
    /// When the peer last sent something for this flow.
    last_heard: Instant,
    /// On `touched`.
    touched: bool,
}

enum FlowState {
    /// Accept mode, TCP: the latest SYN, replayed on admission.
    PendingTcp {
        syn: Vec<u8>,
    },
    /// Accept mode, UDP payloads or ICMP echo messages, delivered on admission.
    PendingDatagrams {
        datagrams: VecDeque<Vec<u8>>,
    },
    Tcp(TcpEntry),
    Udp {
        shared: Arc<UdpShared>,
    },
    /// Admitted ICMP echo: the stack answers.
    Echo,
}

struct TcpEntry {
    handle: SocketHandle,
    shared: Arc<TcpShared>,
    /// `close()` was called on the socket.
    fin_queued: bool,
    /// The peer's FIN arrived.
    peer_fin: bool,
    established: bool,
    /// One past the highest sequence number sent (see `fix_pure_acks`).
    snd_max: Option<u32>,
    /// The peer's latest acknowledgement number and window in bytes.
    peer_ack: Option<u32>,
    peer_window: u32,
    /// The peer's window scale (from its SYN).
    peer_shift: u8,
}

/// Ephemeral ports for client-mode flows (IANA dynamic range).
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

impl Stack {
    /// A stack with no flows. Fails only on an invalid config.
    pub fn new(config: StackConfig, now: Instant) -> Result<Self, ConfigError> {
        let config = config.validate()?;
        let seed = config.seed.unwrap_or_else(rand::random);
        let mut out = OutQueue::new();
        let mut phy = Phy {
            rx: None,
            out: &mut out,
            mtu: config.mtu,
        };
        let mut iface_config = IfaceConfig::new(HardwareAddress::Ip);
        iface_config.random_seed = seed;
        let mut iface = Interface::new(iface_config, &mut phy, SmolInstant::ZERO);
        match config.mode {
            Mode::Client { local } => {
                let prefix = if local.is_ipv4() { 32 } else { 128 };
                iface.update_ip_addrs(|addrs| {
                    // One address never overflows the interface's table.
                    let _ = addrs.push(IpCidr::new(IpAddress::from(local), prefix));
                });
            }
            Mode::Accept => iface.set_any_ip(true),
        }
        // With the IP medium the gateway is never resolved: any route makes every
        // destination reachable, and there is one peer anyway.
        let routes = iface.routes_mut();
        let _ = routes.add_default_ipv4_route(Ipv4Addr::new(192, 0, 2, 1));
        let _ = routes.add_default_ipv6_route(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        let span = EPHEMERAL.end() - EPHEMERAL.start() + 1;
        let next_port = EPHEMERAL.start() + (seed % u64::from(span)) as u16;
        Ok(Self {
            config,
            iface,
            sockets: SocketSet::new(Vec::new()),
            out,
            epoch: now,
            now,
            flows: HashMap::new(),
            by_key: HashMap::new(),
            next_id: 1,
            events: VecDeque::new(),
            bridge: Arc::default(),
            touched: Vec::new(),
            spare: Vec::new(),
            reap: Vec::new(),
            tombstones: HashMap::new(),
            timer: None,
            next_idle: None,
            next_port,
            stats: StackStats::default(),
        })
    }

    /// The stack's mode.
    pub fn mode(&self) -> &Mode {
        &self.config.mode
    }

    /// Takes one decrypted inbound IP packet. Malformed, unsupported, oversized or
    /// misdirected input is dropped and counted in [`StackStats`]; nothing here panics on
    /// any input. Call [`poll`](Self::poll) after a batch.
    pub fn handle_packet(&mut self, packet: &[u8], now: Instant) {
        self.advance(now);
        self.stats.packets_in += 1;
        let parsed = match packet::parse(packet, self.config.mtu) {
            Ok(parsed) => parsed,
            Err(reject) => {
                let counter = match reject {
                    Reject::Malformed => &mut self.stats.malformed,
                    Reject::Unsupported => &mut self.stats.unsupported,
                    Reject::Oversized => &mut self.stats.oversized,
                };
                *counter += 1;
                tracing::trace!(?reject, len = packet.len(), "dropped inbound packet");
                return;
            }
        };
        if let Mode::Client { local } = self.config.mode {
            if parsed.dst != local {
                self.stats.misdirected += 1;
                return;
            }
        }
        match parsed.l4 {
            L4::Tcp { .. } => self.ingress_tcp(&parsed, packet),
            L4::Udp { .. } | L4::Echo { .. } => self.ingress_datagram(&parsed),
        }
    }

    /// Runs smoltcp (timers, retransmissions, output) and moves bytes between sockets and
    /// flow handles. Cheap when nothing happened.
    pub fn poll(&mut self, now: Instant) {
        self.advance(now);
        let mut ids = std::mem::take(&mut self.spare);
        std::mem::swap(&mut ids, &mut *lock(&self.bridge.dirty));
        ids.append(&mut self.touched);
        for id in ids.drain(..) {
            self.service(id);
        }
        self.spare = ids;

        let timer_due = self.timer.is_some_and(|at| now >= at);
        self.egress();
        if timer_due {
            // A timer may have closed a socket (timeout) or sent what frees room: look at
            // every TCP flow.
            self.timer = None;
            let tcp: Vec<FlowId> = self
                .flows
                .iter()
                .filter(|(_, flow)| matches!(flow.state, FlowState::Tcp(_)))
                .map(|(id, _)| *id)
                .collect();
            for id in tcp {
                self.service(id);
            }
            self.egress();
        }
        for handle in self.reap.drain(..) {
            self.sockets.remove(handle);
        }
        if self.next_idle.is_some_and(|at| now >= at) {
            self.expire_idle();
        }
    }

    /// The next outbound IP packet, if any. The buffer comes from a shared arena: drop it
    /// soon (after encrypting) so that its memory is reused.
    pub fn poll_packet(&mut self) -> Option<BytesMut> {
        self.out.pop()
    }

    /// When [`poll`](Self::poll) must be called next if nothing else happens (`None`: not
    /// until a packet, a call or the waker). A time at or before `now` means at once.
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        self.advance(now);
        let smol = self
            .iface
            .poll_at(self.smol_now(), &self.sockets)
            .map(|at| self.epoch + Duration::from_micros(at.total_micros().max(0) as u64));
        self.timer = smol;
        let pending_work = !self.reap.is_empty() || !self.touched.is_empty();
        let soon = pending_work.then_some(self.now);
        [smol, self.next_idle, soon].into_iter().flatten().min()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<StackEvent> {
        self.events.pop_front()
    }

    /// Notified whenever a flow handle has data to send, made room, shut down or was
    /// dropped: the owner then calls [`poll`](Self::poll). Holds one permit, so a wake-up
    /// between two `notified()` calls is not lost.
    pub fn waker(&self) -> Arc<Notify> {
        self.bridge.notify.clone()
    }

    /// Client mode: opens a TCP connection to `dst`. The SYN leaves on the next
    /// [`poll`](Self::poll); [`TcpFlow::established`] says when (or whether) it was
    /// accepted. Writes before that are buffered.
    pub fn connect_tcp(&mut self, dst: SocketAddr, now: Instant) -> Result<TcpFlow, StackError> {
        self.advance(now);
        let local = self.client_local(dst)?;
        let ours = self.free_port(Proto::Tcp, local, dst)?;
        let mut socket = self.new_tcp_socket();
        let remote = IpEndpoint::new(IpAddress::from(dst.ip()), dst.port());
        let local_endpoint = IpListenEndpoint {
            addr: Some(IpAddress::from(local)),
            port: ours.port(),
        };
        socket
            .connect(self.iface.context(), remote, local_endpoint)
            .map_err(|_| StackError::BadDestination(dst))?;
        let handle = self.sockets.add(socket);
        let shared = TcpShared::new(self.config.flow_buffer, self.config.flow_buffer);
        let key = FlowKey {
            proto: Proto::Tcp,
            ours,
            theirs: dst,
        };
        let id = self.insert(
            key,
            ours,
            dst,
            FlowState::Tcp(TcpEntry {
                handle,
                shared: shared.clone(),
                fin_queued: false,
                peer_fin: false,
                established: false,
                snd_max: None,
                peer_ack: None,
                peer_window: 0,
                peer_shift: 0,
            }),
        );
        tracing::trace!(%id, %dst, "connecting");
        Ok(TcpFlow::new(id, ours, dst, shared, self.bridge.clone()))
    }

    /// Client mode: opens a UDP flow to `dst` from a fresh local port.
    pub fn open_udp(&mut self, dst: SocketAddr, now: Instant) -> Result<UdpFlow, StackError> {
        self.advance(now);
        let local = self.client_local(dst)?;
        let ours = self.free_port(Proto::Udp, local, dst)?;
        let shared = UdpShared::new(self.config.udp_queue, self.max_udp_payload(dst.ip()));
        let key = FlowKey {
            proto: Proto::Udp,
            ours,
            theirs: dst,
        };
        let id = self.insert(
            key,
            ours,
            dst,
            FlowState::Udp {
                shared: shared.clone(),
            },
        );
        self.arm_idle(now);
        Ok(UdpFlow::new(id, ours, dst, shared, self.bridge.clone()))
    }

    /// Accept mode: admits a pending TCP flow. The held SYN is replayed into a socket bound
    /// to exactly the flow's destination, and the SYN-ACK leaves on the next
    /// [`poll`](Self::poll). The owner dials the target first or after; bytes from the client
    /// are buffered (up to the window) until the handle is read. If the dial fails, call
    /// [`abort`](Self::abort) (the client sees a reset); dropping the handle would instead
    /// close gracefully, and the client would see a connection that opens and ends at once.
    pub fn admit_tcp(&mut self, id: FlowId) -> Result<TcpFlow, StackError> {
        let flow = self.flows.get_mut(&id).ok_or(StackError::UnknownFlow(id))?;
        let FlowState::PendingTcp { syn } = &mut flow.state else {
            return Err(StackError::NotPending {
                id,
                expected: Proto::Tcp,
            });
        };
        let syn = std::mem::take(syn);
        let (src, dst) = (flow.src, flow.dst);
        let mut socket = self.new_tcp_socket();
        let endpoint = IpListenEndpoint {
            addr: Some(IpAddress::from(dst.ip())),
            port: dst.port(),
        };
        if socket.listen(endpoint).is_err() {
            self.forget(id);
            return Err(StackError::BadSyn(id));
        }
        let handle = self.sockets.add(socket);
        // Replayed now, while no other socket listens on this endpoint, so that this SYN and
        // no other lands in this socket.
        self.feed(&syn);
        let socket = self.sockets.get::<tcp::Socket<'static>>(handle);
        if socket.state() != tcp::State::SynReceived {
            self.sockets.remove(handle);
            self.forget(id);
            return Err(StackError::BadSyn(id));
        }
        let shared = TcpShared::new(self.config.flow_buffer, self.config.flow_buffer);
        let peer_shift = match packet::parse(&syn, self.config.mtu) {
            Ok(Parsed {
                l4: L4::Tcp { wscale, .. },
                ..
            }) => wscale.unwrap_or(0),
            _ => 0,
        };
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.state = FlowState::Tcp(TcpEntry {
                handle,
                shared: shared.clone(),
                fin_queued: false,
                peer_fin: false,
                established: false,
                snd_max: None,
                peer_ack: None,
                peer_window: 0,
                peer_shift,
            });
        }
        tracing::trace!(%id, "admitted tcp");
        Ok(TcpFlow::new(id, src, dst, shared, self.bridge.clone()))
    }

    /// Accept mode: admits a pending UDP flow; the held datagrams are the first ones
    /// [`UdpFlow::recv`] returns.
    pub fn admit_udp(&mut self, id: FlowId) -> Result<UdpFlow, StackError> {
        let max_payload = {
            let flow = self.flows.get(&id).ok_or(StackError::UnknownFlow(id))?;
            self.max_udp_payload(flow.dst.ip())
        };
        let queue = self.config.udp_queue;
        let flow = self.flows.get_mut(&id).ok_or(StackError::UnknownFlow(id))?;
        let (FlowState::PendingDatagrams { datagrams }, Proto::Udp) =
            (&mut flow.state, flow.key.proto)
        else {
            return Err(StackError::NotPending {
                id,
                expected: Proto::Udp,
            });
        };
        let shared = UdpShared::new(queue, max_payload);
        lock(&shared.state).rx = std::mem::take(datagrams);
        let (src, dst) = (flow.src, flow.dst);
        flow.state = FlowState::Udp {
            shared: shared.clone(),
        };
        let now = self.now;
        self.arm_idle(now);
        Ok(UdpFlow::new(id, src, dst, shared, self.bridge.clone()))
    }

    /// Accept mode: admits a pending ICMP echo flow: the stack answers its held and later
    /// echo requests itself (see the module docs).
    pub fn admit_icmp(&mut self, id: FlowId) -> Result<(), StackError> {
        let flow = self.flows.get_mut(&id).ok_or(StackError::UnknownFlow(id))?;
        let (FlowState::PendingDatagrams { datagrams }, Proto::Icmp) =
            (&mut flow.state, flow.key.proto)
        else {
            return Err(StackError::NotPending {
                id,
                expected: Proto::Icmp,
            });
        };
        let held = std::mem::take(datagrams);
        flow.state = FlowState::Echo;
        let (ours, theirs) = (flow.key.ours.ip(), flow.key.theirs.ip());
        for request in held {
            flow.bytes_sent += request.len() as u64;
            self.out.push_echo_reply(ours, theirs, &request);
        }
        let now = self.now;
        self.arm_idle(now);
        Ok(())
    }

    /// Accept mode: refuses a pending flow. TCP: the client gets a RST on the next
    /// [`poll_packet`](Self::poll_packet); UDP/ICMP: its datagrams are dropped, now and for
    /// [`StackConfig::idle_timeout`]. An open flow is [aborted](Self::abort) instead; an
    /// unknown id is ignored.
    pub fn refuse(&mut self, id: FlowId) {
        let Some(flow) = self.flows.get(&id) else {
            return;
        };
        match &flow.state {
            FlowState::PendingTcp { syn } => {
                let syn = syn.clone();
                self.forget(id);
                // No socket listens on its endpoint: smoltcp answers with a RST.
                self.feed(&syn);
            }
            FlowState::PendingDatagrams { .. } => {
                let key = flow.key;
                self.forget(id);
                self.tombstone(key);
            }
            _ => return self.abort(id),
        }
        self.stats.refused += 1;
        tracing::trace!(%id, "refused");
    }

    /// Cuts a flow now (revocation): TCP sends a RST on the next [`poll`](Self::poll) and
    /// the handle's reads and writes fail with `ConnectionReset`; a UDP flow closes (its
    /// handle fails likewise); an ICMP flow stops being answered. A pending flow is
    /// [refused](Self::refuse). Emits [`StackEvent::Closed`] with
    /// [`CloseReason::Aborted`]. An unknown id is ignored.
    pub fn abort(&mut self, id: FlowId) {
        let Some(flow) = self.flows.get(&id) else {
            return;
        };
        match &flow.state {
            FlowState::PendingTcp { .. } | FlowState::PendingDatagrams { .. } => {
                return self.refuse(id);
            }
            FlowState::Tcp(entry) => {
                let handle = entry.handle;
                let mut st = lock(&entry.shared.state);
                st.rx.clear();
                st.fail(io::ErrorKind::ConnectionReset);
                drop(st);
                self.sockets.get_mut::<tcp::Socket<'static>>(handle).abort();
                self.reap.push(handle);
            }
            FlowState::Udp { shared } => {
                let mut st = lock(&shared.state);
                st.rx.clear();
                st.fail(io::ErrorKind::ConnectionReset);
            }
            FlowState::Echo => {}
        }
        self.forget(id);
        self.stats.aborted += 1;
        self.events.push_back(StackEvent::Closed {
            id,
            why: CloseReason::Aborted,
        });
        tracing::trace!(%id, "aborted");
    }

    /// Every flow, pending or open.
    pub fn flows(&self) -> impl Iterator<Item = FlowInfo> + '_ {
        self.flows.iter().map(|(id, flow)| FlowInfo {
            id: *id,
            proto: flow.key.proto,
            src: flow.src,
            dst: flow.dst,
            status: match flow.state {
                FlowState::PendingTcp { .. } | FlowState::PendingDatagrams { .. } => {
                    FlowStatus::Pending
                }
                _ => FlowStatus::Open,
            },
            bytes_sent: flow.bytes_sent,
            bytes_received: flow.bytes_received,
        })
    }

    /// Counters and current flow counts.
    pub fn stats(&self) -> StackStats {
        let pending = self
            .flows
            .values()
            .filter(|flow| {
                matches!(
                    flow.state,
                    FlowState::PendingTcp { .. } | FlowState::PendingDatagrams { .. }
                )
            })
            .count();
        StackStats {
            packets_out: self.out.sent,
            open_flows: self.flows.len() - pending,
            pending_flows: pending,
            ..self.stats.clone()
        }
    }
}

// Inbound.
impl Stack {
    fn ingress_tcp(&mut self, parsed: &Parsed<'_>, packet: &[u8]) {
        let L4::Tcp {
            src_port,
            dst_port,
            syn,
            ack,
            rst,
            ack_number,
            window,
            wscale,
        } = parsed.l4
        else {
            return;
        };
        let key = FlowKey {
            proto: Proto::Tcp,
            ours: SocketAddr::new(parsed.dst, dst_port),
            theirs: SocketAddr::new(parsed.src, src_port),
        };
        if let Some(&id) = self.by_key.get(&key) {
            let Some(flow) = self.flows.get_mut(&id) else {
                return;
            };
            flow.last_heard = self.now;
            match &mut flow.state {
                // A retransmitted SYN while the owner decides: keep the latest.
                FlowState::PendingTcp { syn: held } if syn && !ack && !rst => {
                    held.clear();
                    held.extend_from_slice(packet);
                }
                FlowState::Tcp(entry) => {
                    if syn {
                        entry.peer_shift = wscale.unwrap_or(0);
                    }
                    if ack && !rst && entry.peer_ack.is_none_or(|seen| !seq_lt(ack_number, seen)) {
                        entry.peer_ack = Some(ack_number);
                        // The window of a SYN is never scaled.
                        let shift = if syn { 0 } else { entry.peer_shift };
                        entry.peer_window = u32::from(window) << shift;
                    }
                    if !flow.touched {
                        flow.touched = true;
                        self.touched.push(id);
                    }
                    self.feed(packet);
                }
                _ => {}
            }
            return;
        }
        let opens = syn && !ack && !rst;
        if self.config.mode != Mode::Accept || !opens {
            // smoltcp answers a segment for no socket with a RST (and a RST with nothing).
            self.stats.no_flow += 1;
            self.feed(packet);
            return;
        }
        if self.flows.len() >= self.config.max_flows {
            self.stats.refused_full += 1;
            self.feed(packet);
            return;
        }
        let id = self.insert(
            key,
            key.theirs,
            key.ours,
            FlowState::PendingTcp {
                syn: packet.to_vec(),
            },
        );
        self.events.push_back(StackEvent::NewFlow {
            id,
            proto: Proto::Tcp,
            src: key.theirs,
            dst: key.ours,
        });
    }

    fn ingress_datagram(&mut self, parsed: &Parsed<'_>) {
        let (key, datagram) = match parsed.l4 {
            L4::Udp {
                src_port,
                dst_port,
                payload,
            } => (
                FlowKey {
                    proto: Proto::Udp,
                    ours: SocketAddr::new(parsed.dst, dst_port),
                    theirs: SocketAddr::new(parsed.src, src_port),
                },
                payload,
            ),
            L4::Echo { ident, message } => {
                if self.config.mode != Mode::Accept {
                    self.stats.unsupported += 1;
                    return;
                }
                (
                    FlowKey {
                        proto: Proto::Icmp,
                        ours: SocketAddr::new(parsed.dst, ident),
                        theirs: SocketAddr::new(parsed.src, ident),
                    },
                    message,
                )
            }
            L4::Tcp { .. } => return,
        };
        let now = self.now;
        let limit = self.config.udp_queue;
        if let Some(&id) = self.by_key.get(&key) {
            let Some(flow) = self.flows.get_mut(&id) else {
                return;
            };
            flow.last_heard = now;
            match &mut flow.state {
                FlowState::PendingDatagrams { datagrams } => {
                    if datagrams.len() < limit {
                        datagrams.push_back(datagram.to_vec());
                    } else {
                        self.stats.udp_dropped += 1;
                    }
                }
                FlowState::Udp { shared } => {
                    let mut st = lock(&shared.state);
                    if st.rx.len() < st.limit {
                        st.rx.push_back(datagram.to_vec());
                        flow.bytes_received += datagram.len() as u64;
                        if let Some(waker) = st.read_waker.take() {
                            waker.wake();
                        }
                    } else {
                        self.stats.udp_dropped += 1;
                    }
                }
                FlowState::Echo => {
                    flow.bytes_received += datagram.len() as u64;
                    flow.bytes_sent += datagram.len() as u64;
                    self.out
                        .push_echo_reply(key.ours.ip(), key.theirs.ip(), datagram);
                }
                FlowState::PendingTcp { .. } | FlowState::Tcp(_) => {}
            }
            return;
        }
        if self.config.mode != Mode::Accept {
            self.stats.no_flow += 1;
            return;
        }
        if let Some(&until) = self.tombstones.get(&key) {
            if now < until {
                self.stats.no_flow += 1;
                return;
            }
            self.tombstones.remove(&key);
        }
        if self.flows.len() >= self.config.max_flows {
            self.stats.refused_full += 1;
            return;
        }
        let id = self.insert(
            key,
            key.theirs,
            key.ours,
            FlowState::PendingDatagrams {
                datagrams: VecDeque::from([datagram.to_vec()]),
            },
        );
        self.events.push_back(StackEvent::NewFlow {
            id,
            proto: key.proto,
            src: key.theirs,
            dst: key.ours,
        });
    }

    /// Hands one packet to smoltcp now (its reply, if any, goes to the outbound queue).
    fn feed(&mut self, packet: &[u8]) {
        let start = self.out.len();
        let now = self.smol_now();
        let mut phy = Phy {
            rx: Some(packet),
            out: &mut self.out,
            mtu: self.config.mtu,
        };
        self.iface
            .poll_ingress_single(now, &mut phy, &mut self.sockets);
        self.fix_pure_acks(start);
    }
}

// Flows and sockets.
impl Stack {
    fn advance(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn smol_now(&self) -> SmolInstant {
        let micros = self.now.saturating_duration_since(self.epoch).as_micros();
        SmolInstant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    fn egress(&mut self) {
        let start = self.out.len();
        let now = self.smol_now();
        let mut phy = Phy {
            rx: None,
            out: &mut self.out,
            mtu: self.config.mtu,
        };
        while self.iface.poll_egress(now, &mut phy, &mut self.sockets)
            != smoltcp::iface::PollResult::None
        {}
        self.fix_pure_acks(start);
    }

    /// Works around a smoltcp 0.14 sender bug: after a retransmission timeout it rewinds
    /// its next sequence number to the first unacknowledged byte, and its pure ACKs carry
    /// that rewound number (after a zero-window probe, one past the peer's window). A
    /// receiver that already has those bytes finds the ACK outside its window and drops it
    /// unread (RFC 9293's acceptability test, which smoltcp applies strictly), so two
    /// smoltcp stacks sending both ways after losses ignore each other's ACKs until the
    /// connection times out. Linux sends pure ACKs at the highest sequence number sent,
    /// within the peer's window; so does this: outbound segments raise the flow's highest
    /// sequence number, inbound ones tell the peer's window, and every pure ACK gets
    /// `min(highest sent, peer's window end)`.
    fn fix_pure_acks(&mut self, start: usize) {
        for packet in self.out.since(start) {
            let Some(segment) = packet::outbound_segment(packet) else {
                continue;
            };
            let key = FlowKey {
                proto: Proto::Tcp,
                ours: segment.ours,
                theirs: segment.theirs,
            };
            let Some(FlowState::Tcp(entry)) = self
                .by_key
                .get(&key)
                .and_then(|id| self.flows.get_mut(id))
                .map(|flow| &mut flow.state)
            else {
                continue;
            };
            let end = segment.seq.wrapping_add(segment.len);
            if !segment.pure_ack {
                if entry.snd_max.is_none_or(|max| seq_lt(max, end)) {
                    entry.snd_max = Some(end);
                }
                continue;
            }
            let (Some(max), Some(peer_ack)) = (entry.snd_max, entry.peer_ack) else {
                continue;
            };
            let window_end = peer_ack.wrapping_add(entry.peer_window);
            let seq = if seq_lt(window_end, max) {
                window_end
            } else {
                max
            };
            if seq != segment.seq {
                packet::set_seq(packet, seq);
            }
        }
    }

    fn new_tcp_socket(&self) -> tcp::Socket<'static> {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.config.tcp_rx_buffer]),
            tcp::SocketBuffer::new(vec![0; self.config.tcp_tx_buffer]),
        );
        // Interactive sessions (ssh) must not wait for a full segment; the stack batches
        // bulk writes anyway by moving everything buffered at each poll.
        socket.set_nagle_enabled(false);
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
        socket.set_timeout(Some(smol_duration(self.config.tcp_timeout)));
        socket.set_keep_alive(Some(smol_duration(self.config.tcp_keep_alive)));
        socket
    }

    fn insert(
        &mut self,
        key: FlowKey,
        src: SocketAddr,
        dst: SocketAddr,
        state: FlowState,
    ) -> FlowId {
        let id = FlowId(self.next_id);
        self.next_id += 1;
        self.by_key.insert(key, id);
        self.flows.insert(
            id,
            Flow {
                key,
                src,
                dst,
                state,
                bytes_sent: 0,
                bytes_received: 0,
                last_heard: self.now,
                touched: false,
            },
        );
        id
    }

    /// Removes a flow from the tables (its socket, if any, is the caller's business).
    fn forget(&mut self, id: FlowId) -> Option<Flow> {
        let flow = self.flows.remove(&id)?;
        if self.by_key.get(&flow.key) == Some(&id) {
            self.by_key.remove(&flow.key);
        }
        Some(flow)
    }

    fn close(&mut self, id: FlowId, why: CloseReason) {
        let Some(flow) = self.forget(id) else {
            return;
        };
        if let FlowState::Tcp(entry) = flow.state {
            self.sockets.remove(entry.handle);
        }
        tracing::trace!(%id, ?why, "closed");
        self.events.push_back(StackEvent::Closed { id, why });
    }

    fn client_local(&self, dst: SocketAddr) -> Result<IpAddr, StackError> {
        let Mode::Client { local } = self.config.mode else {
            return Err(StackError::WrongMode);
        };
        let ip = dst.ip();
        if ip.is_unspecified()
            || ip.is_multicast()
            || dst.port() == 0
            || ip.is_ipv4() != local.is_ipv4()
        {
            return Err(StackError::BadDestination(dst));
        }
        if self.flows.len() >= self.config.max_flows {
            return Err(StackError::TooManyFlows {
                max: self.config.max_flows,
            });
        }
        Ok(local)
    }

    fn free_port(
        &mut self,
        proto: Proto,
        local: IpAddr,
        dst: SocketAddr,
    ) -> Result<SocketAddr, StackError> {
        let span = u32::from(EPHEMERAL.end() - EPHEMERAL.start()) + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port == *EPHEMERAL.end() {
                *EPHEMERAL.start()
            } else {
                port + 1
            };
            let ours = SocketAddr::new(local, port);
            let key = FlowKey {
                proto,
                ours,
                theirs: dst,
            };
            if !self.by_key.contains_key(&key) {
                return Ok(ours);
            }
        }
        Err(StackError::PortsExhausted(dst))
    }

    fn max_udp_payload(&self, ip: IpAddr) -> usize {
        let headers = if ip.is_ipv4() { 20 + 8 } else { 40 + 8 };
        self.config.mtu - headers
    }

    fn tombstone(&mut self, key: FlowKey) {
        if self.tombstones.len() >= self.config.max_flows {
            let now = self.now;
            self.tombstones.retain(|_, until| *until > now);
            if self.tombstones.len() >= self.config.max_flows {
                return;
            }
        }
        self.tombstones
            .insert(key, self.now + self.config.idle_timeout);
        let now = self.now;
        self.arm_idle(now);
    }

    fn arm_idle(&mut self, now: Instant) {
        let at = now + self.config.idle_timeout;
        self.next_idle = Some(self.next_idle.map_or(at, |next| next.min(at)));
    }

    /// Closes UDP/ICMP flows idle for `idle_timeout`, forgets expired tombstones, and finds
    /// when to look again.
    fn expire_idle(&mut self) {
        let now = self.now;
        let timeout = self.config.idle_timeout;
        self.tombstones.retain(|_, until| *until > now);
        let mut next = self.tombstones.values().min().copied();
        let mut idle = Vec::new();
        for (id, flow) in &self.flows {
            if !matches!(flow.state, FlowState::Udp { .. } | FlowState::Echo) {
                continue;
            }
            let at = flow.last_heard + timeout;
            if at <= now {
                idle.push(*id);
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        for id in idle {
            if let Some(FlowState::Udp { shared }) = self.flows.get(&id).map(|flow| &flow.state) {
                lock(&shared.state).fail(io::ErrorKind::TimedOut);
            }
            self.close(id, CloseReason::Idle);
        }
        self.next_idle = next;
    }

    /// Moves what can move between a flow's socket and its handle, and notices its end.
    fn service(&mut self, id: FlowId) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        flow.touched = false;
        match &mut flow.state {
            FlowState::Tcp(entry) => {
                let socket = self.sockets.get_mut::<tcp::Socket<'static>>(entry.handle);
                let mut st = lock(&entry.shared.state);
                st.queued = false;

                // Handle → socket.
                let mut moved = 0;
                while !st.tx.is_empty() && socket.can_send() {
                    let n = socket
                        .send(|room| {
                            let n = st.tx.dequeue_slice(room);
                            (n, n)
                        })
                        .unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    moved += n;
                }
                if moved > 0 {
                    flow.bytes_sent += moved as u64;
                    if let Some(waker) = st.write_waker.take() {
                        waker.wake();
                    }
                }
                let state = socket.state();
                if (st.write_shut || st.dropped)
                    && st.tx.is_empty()
                    && !entry.fin_queued
                    && !matches!(state, tcp::State::SynSent | tcp::State::Listen)
                {
                    socket.close();
                    entry.fin_queued = true;
                }

                // Socket → handle.
                let mut moved = 0;
                while socket.can_recv() && (st.dropped || st.rx.window() > 0) {
                    let n = socket
                        .recv(|data| {
                            // A dropped handle reads nothing more: discard.
                            let n = if st.dropped {
                                data.len()
                            } else {
                                st.rx.enqueue_slice(data)
                            };
                            (n, n)
                        })
                        .unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    moved += n;
                }
                st.rx_blocked = socket.can_recv();
                let state = socket.state();
                use tcp::State as S;
                if matches!(state, S::CloseWait | S::LastAck | S::Closing | S::TimeWait) {
                    entry.peer_fin = true;
                }
                if !matches!(state, S::Listen | S::SynSent | S::SynReceived | S::Closed) {
                    entry.established = true;
                }
                let mut wake_read = moved > 0;
                if moved > 0 {
                    flow.bytes_received += moved as u64;
                }
                if entry.established && !st.established {
                    st.established = true;
                    if let Some(waker) = st.connect_waker.take() {
                        waker.wake();
                    }
                }
                if entry.peer_fin && !socket.can_recv() && !st.eof {
                    st.eof = true;
                    wake_read = true;
                }
                if wake_read {
                    if let Some(waker) = st.read_waker.take() {
                        waker.wake();
                    }
                }
                let why = match state {
                    // The socket keeps bytes the handle has not taken yet, in any state.
                    S::TimeWait | S::Closed if entry.peer_fin && st.rx_blocked => return,
                    S::TimeWait => CloseReason::Finished,
                    S::Closed if entry.peer_fin && entry.fin_queued => CloseReason::Finished,
                    S::Closed => {
                        let silent = self.now.saturating_duration_since(flow.last_heard)
                            >= self.config.tcp_timeout;
                        let (why, kind) = if silent {
                            (CloseReason::TimedOut, io::ErrorKind::TimedOut)
                        } else if !entry.established {
                            (CloseReason::Reset, io::ErrorKind::ConnectionRefused)
                        } else {
                            (CloseReason::Reset, io::ErrorKind::ConnectionReset)
                        };
                        st.fail(kind);
                        why
                    }
                    _ => return,
                };
                st.closed = true;
                st.wake_all();
                drop(st);
                self.close(id, why);
            }
            FlowState::Udp { shared } => {
                let mut st = lock(&shared.state);
                st.queued = false;
                let mut sent = false;
                while let Some(datagram) = st.tx.pop_front() {
                    flow.bytes_sent += datagram.len() as u64;
                    self.out.push_udp(flow.key.ours, flow.key.theirs, &datagram);
                    sent = true;
                }
                if sent {
                    // Sending counts as activity: the flow is not idle.
                    flow.last_heard = self.now;
                    if let Some(waker) = st.write_waker.take() {
                        waker.wake();
                    }
                }
                if st.dropped {
                    drop(st);
                    self.close(id, CloseReason::Finished);
                }
            }
            FlowState::PendingTcp { .. } | FlowState::PendingDatagrams { .. } | FlowState::Echo => {
            }
        }
    }
}

/// `a` before `b` in sequence space.
fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn smol_duration(duration: Duration) -> SmolDuration {
    SmolDuration::from_micros(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX))
}
