//! The relay: WireGuard packets between client devices and site agents that cannot reach
//! each other directly, over plain UDP ([`warren_proto::relay`]). The relay sees only
//! ciphertext and never looks up the registry per packet: a binding is admitted once, by a
//! ticket the cluster signed ([`TicketKeys`]), and after that a Data frame costs one hash
//! lookup and a 4-byte rewrite in place.
//!
//! ```text
//!  RelayActor (the tree's child `relay`)
//!    │ spawns, and fails when it ends ──► relay task: recv_from ─► RelayCore::handle ─► send_to
//!    │                                       ▲ every 250 ms: keys, holdings, expiry
//!    └─ restart: the same socket (bound once, in Listeners), a fresh core
//! ```
//!
//! A client's binding names a site. If an agent of that site is bound here, the relay
//! splices the two with a channel each way. If not, and a peer node holds the site, the
//! relay binds onward to that peer's relay once (one hop, with the client's ticket, as if it
//! were the client) and splices the client's channel to the peer's.
//!
//! Every table is bounded ([`MAX_CHANNELS`]); bindings not used for [`BINDING_LIFETIME`]
//! are forgotten. A frame that is malformed, oversized, from an address its channel was
//! not bound from, or carries a bad ticket is dropped and counted, never answered
//! (except a refused Bind with a valid frame, which gets a Refused so a client can say why).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rand::Rng as _;
use ring::signature::{EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use warren_proto::relay::{
    data_channel, Frame, Holder, PunchKind, Refusal, SignedTicket, Ticket, MAX_DATAGRAM,
};
use warren_proto::session::SigningKey;
use warren_proto::Name;

use crate::actors::ChildSpec;

/// Seconds without traffic after which a binding is forgotten (told to binders in Bound).
pub const BINDING_LIFETIME: Duration = Duration::from_secs(30);
/// Most channels (both directions count) one relay holds.
pub const MAX_CHANNELS: usize = 65_536;
/// Most agent bindings one relay holds.
pub const MAX_AGENTS: usize = 16_384;
/// How often the relay task refreshes its keys and holdings and forgets idle bindings.
pub const TICK: Duration = Duration::from_millis(250);
/// Bytes of kernel buffer the relay asks for each way on its socket. The default (about
/// 200 KiB, some 150 full-size datagrams) overflows under one TCP window of a fast flow,
/// and each datagram lost there costs the endpoints' TCP a recovery.
pub const SOCKET_BUFFER: usize = 4 << 20;
/// Datagrams read per wake-up of the relay task before it looks at its timer again.
const RECV_BATCH: usize = 64;

/// Asks the kernel for [`SOCKET_BUFFER`] bytes each way on the relay's socket (capped by
/// `net.core.rmem_max`/`wmem_max`; a smaller grant is logged, with the sysctl to raise).
pub fn tune_socket(socket: &std::net::UdpSocket) {
    let s = socket2::SockRef::from(socket);
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    let (rcv, snd) = (
        s.recv_buffer_size().unwrap_or(0),
        s.send_buffer_size().unwrap_or(0),
    );
    // Linux reports twice what it grants (the doubling covers its bookkeeping).
    if rcv < 2 * SOCKET_BUFFER || snd < 2 * SOCKET_BUFFER {
        tracing::warn!(
            rcvbuf = rcv,
            sndbuf = snd,
            "the relay's socket buffers are smaller than the {} MiB asked for: fast flows will lose packets here; raise net.core.rmem_max and net.core.wmem_max",
            SOCKET_BUFFER >> 20
        );
    }
}

/// The public keys that verify tickets, by `kid`.
#[derive(Clone, Default)]
pub struct TicketKeys {
    keys: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|(k, _)| k.as_str()).collect();
        write!(f, "TicketKeys({kids:?})")
    }
}

impl TicketKeys {
    /// The public halves of the cluster's signing keys (unloadable ones skipped).
    pub fn from_signing_keys(keys: &[SigningKey]) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let keys = keys
            .iter()
            .filter_map(|k| {
                let der = URL_SAFE_NO_PAD.decode(k.pkcs8.expose()).ok()?;
                let pair = EcdsaKeyPair::from_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    &der,
                    &rng,
                )
                .ok()?;
                Some((k.kid.clone(), pair.public_key().as_ref().to_vec()))
            })
            .collect();
        Self { keys }
    }

    /// The public keys as they are sent to relay-only nodes: (`kid`, SEC1 point).
    pub fn public(&self) -> &[(String, Vec<u8>)] {
        &self.keys
    }

    /// Keys received from the cluster (a relay-only node's feed).
    pub fn from_public(keys: Vec<(String, Vec<u8>)>) -> Self {
        Self { keys }
    }

    /// Whether no key is known (then every ticket is refused).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks an encoded [`SignedTicket`]: known key, valid signature, not expired.
    pub fn verify(&self, encoded: &[u8], now_unix: u64) -> Result<Ticket, Refusal> {
        let signed = SignedTicket::decode(encoded).ok_or(Refusal::BadTicket)?;
        let (_, point) = self
            .keys
            .iter()
            .find(|(kid, _)| *kid == signed.kid)
            .ok_or(Refusal::BadTicket)?;
        UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(&SignedTicket::signed_bytes(&signed.body), &signed.signature)
            .map_err(|_| Refusal::BadTicket)?;
        let ticket = Ticket::decode(&signed.body).ok_or(Refusal::BadTicket)?;
        if ticket.expires_at <= now_unix {
            return Err(Refusal::Expired);
        }
        Ok(ticket)
    }
}

/// Signs a ticket with the newest of the cluster's signing keys.
pub fn sign_ticket(keys: &[SigningKey], ticket: &Ticket) -> Option<SignedTicket> {
    let newest = keys.last()?;
    let rng = ring::rand::SystemRandom::new();
    let der = URL_SAFE_NO_PAD.decode(newest.pkcs8.expose()).ok()?;
    let pair = EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &der,
        &rng,
    )
    .ok()?;
    let body = ticket.encode();
    let signature = pair
        .sign(&rng, &SignedTicket::signed_bytes(&body))
        .ok()?
        .as_ref()
        .to_vec();
    Some(SignedTicket {
        kid: newest.kid.clone(),
        body,
        signature,
    })
}

/// Why a datagram was dropped: the label of `warren_relay_dropped_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Not a relay frame, or malformed.
    Malformed,
    /// Longer than the relay accepts.
    Oversized,
    /// Data on a channel not bound from its sender's address.
    UnknownChannel,
    /// A Bind whose ticket did not verify (or expired, or names another site).
    BadTicket,
    /// No room for another binding.
    Full,
    /// A frame only a relay sends (Pong, Bound, Refused) from someone not asked.
    Unexpected,
    /// A Bind this relay has already seen (its nonce, with a valid ticket): a replay.
    Replayed,
}

impl Dropped {
    const ALL: [Dropped; 7] = [
        Dropped::Malformed,
        Dropped::Oversized,
        Dropped::UnknownChannel,
        Dropped::BadTicket,
        Dropped::Full,
        Dropped::Unexpected,
        Dropped::Replayed,
    ];

    fn label(self) -> &'static str {
        match self {
            Dropped::Malformed => "malformed",
            Dropped::Oversized => "oversized",
            Dropped::UnknownChannel => "unknown_channel",
            Dropped::BadTicket => "bad_ticket",
            Dropped::Full => "full",
            Dropped::Unexpected => "unexpected",
            Dropped::Replayed => "replayed",
        }
    }
}

/// Counters of a relay, read by `/metrics`.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Data frames forwarded.
    pub forwarded: AtomicU64,
    /// Bytes of forwarded Data frames.
    pub forwarded_bytes: AtomicU64,
    /// Bindings admitted (clients and agents, refreshes included).
    pub bound: AtomicU64,
    /// Bindings refused (with a Refused answer).
    pub refused: AtomicU64,
    dropped: [AtomicU64; Dropped::ALL.len()],
    /// Channels held now.
    pub channels: AtomicU64,
    /// Agent bindings held now.
    pub agents: AtomicU64,
    /// Punch frames taken (coordinated here, or passed on).
    pub punches: AtomicU64,
}

impl RelayStats {
    fn count(&self, why: Dropped) {
        self.dropped[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many datagrams were dropped for `why`.
    pub fn dropped(&self, why: Dropped) -> u64 {
        self.dropped[why as usize].load(Ordering::Relaxed)
    }

    /// Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, kind, value) in [
            (
                "warren_relay_forwarded_total",
                "counter",
                load(&self.forwarded),
            ),
            (
                "warren_relay_forwarded_bytes_total",
                "counter",
                load(&self.forwarded_bytes),
            ),
            ("warren_relay_bound_total", "counter", load(&self.bound)),
            ("warren_relay_refused_total", "counter", load(&self.refused)),
            ("warren_relay_channels", "gauge", load(&self.channels)),
            ("warren_relay_agents", "gauge", load(&self.agents)),
            ("warren_relay_punches_total", "counter", load(&self.punches)),
        ] {
            let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {value}");
        }
        let _ = writeln!(out, "# TYPE warren_relay_dropped_total counter");
        for why in Dropped::ALL {
            let _ = writeln!(
                out,
                "warren_relay_dropped_total{{reason=\"{}\"}} {}",
                why.label(),
                self.dropped(why)
            );
        }
    }
}

/// Where a Data frame arriving on a channel goes.
#[derive(Debug, Clone, Copy)]
struct Dest {
    to: SocketAddr,
    channel: u32,
    last: Instant,
    /// Set on both directions of a binding whose client is an endpoint (not a peer relay):
    /// this node coordinates the pairing's hole punching.
    leg: Option<Leg>,
}

/// Which direction of a coordinated binding a route is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leg {
    /// From the client, towards the agent (or the peer relay that holds it).
    FromClient,
    /// Towards the client.
    ToClient,
}

/// A Punch for the coordinator of one pairing (see [`crate::coordinator`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordinate {
    /// The pairing: the client's address and channel here.
    pub client: (SocketAddr, u32),
    /// Where frames for the agent go, and the channel to put on them.
    pub agent: (SocketAddr, u32),
    /// Call (from the client) or Answer (from the agent's side).
    pub kind: PunchKind,
    /// The offer's sender as the first relay saw it.
    pub observed: Option<SocketAddr>,
    /// The encoded offer.
    pub body: Vec<u8>,
}

#[derive(Debug, Clone)]
struct AgentBinding {
    addr: SocketAddr,
    last: Instant,
}

/// A client binding's key: the client's address, the site, and for a Bind a peer relay
/// sent on, that relay's channel of its client (0 for a client's own Bind): a relay keeps
/// one binding per client of a peer, never one per peer and site.
type ClientKey = (SocketAddr, Name, u32);

/// A client binding, by [`ClientKey`].
#[derive(Debug, Clone)]
struct ClientBinding {
    /// The channel the client sends on.
    channel: u32,
    /// Where its frames go: the agent, or the peer relay of a hop.
    upstream: SocketAddr,
    /// The channel the upstream sends back on (the key of the reverse direction).
    back: u32,
    /// The signed ticket of the client's last Bind: what a move of the binding to another
    /// upstream is asked with (the client's channel stays, so the client never notices).
    ticket: Arc<[u8]>,
    /// When a move to a peer's relay was last asked for (one at a time, retried after
    /// [`MOVE_RETRY`]).
    moving: Option<Instant>,
}

/// A Bind this relay sent onward to a peer relay, awaiting its Bound.
#[derive(Debug, Clone)]
struct PendingHop {
    /// This relay's own move of an existing binding ([`RelayCore::handle_tick`]): the
    /// answer goes to no one, the client keeps its channel.
    moves: bool,
    /// The client's signed ticket (kept by the binding it makes).
    ticket: Arc<[u8]>,
    /// The client's channel here (its binding's, or allocated for the one this makes).
    channel: u32,
    client: SocketAddr,
    /// Whether the client is an endpoint (this node then coordinates its pairing).
    coordinates: bool,
    client_nonce: u64,
    site: Name,
    peer: SocketAddr,
    sent: Instant,
}

/// What the relay shell must do with a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Out {
    /// Send the (rewritten in place) datagram on to this address.
    Forward(SocketAddr),
    /// Send these bytes to this address.
    Send(SocketAddr, Vec<u8>),
    /// Hand this to the pairing's coordinator.
    Coordinate(Coordinate),
    /// Nothing (dropped and counted, or absorbed).
    Nothing,
}

/// The relay's tables, without I/O.
///
/// Calling order: [`handle`](Self::handle) for each datagram received (with the ticket
/// keys and the peers holding each site as of now), [`handle_tick`](Self::handle_tick)
/// every [`TICK`]. Time arrives as arguments: `now` for idleness, `unix` for tickets.
#[derive(Debug)]
pub struct RelayCore {
    /// By (sender, channel): a channel is only honoured from the address it was bound from.
    routes: HashMap<(SocketAddr, u32), Dest>,
    /// Channels this relay allocated (clients' and agents'), to keep them unique.
    allocated: HashMap<u32, SocketAddr>,
    clients: HashMap<ClientKey, ClientBinding>,
    agents: HashMap<Name, Vec<AgentBinding>>,
    pending: HashMap<u64, PendingHop>,
    /// Nonces of the Binds honoured, until their ticket expires (Unix s), oldest first: a
    /// Bind is honoured once.
    nonces: std::collections::HashSet<u64>,
    nonce_order: std::collections::VecDeque<(u64, u64)>,
    /// Devices newly bound here (device, site, from), for [`poll_event`](Self::poll_event).
    events: Vec<DeviceBound>,
    /// Client bindings forgotten, for the coordinator.
    gone: Vec<(SocketAddr, u32)>,
    /// Datagrams this relay sends of its own accord (moves of bindings), for
    /// [`poll_transmit`](Self::poll_transmit).
    outbox: Vec<(SocketAddr, Vec<u8>)>,
    stats: Arc<RelayStats>,
}

/// A device made a new binding on this relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBound {
    /// The device its ticket names.
    pub device: Name,
    /// The site.
    pub site: Name,
    /// Where its datagrams come from.
    pub from: SocketAddr,
}

/// Most Bind nonces remembered (the oldest are forgotten first).
pub const MAX_NONCES: usize = 65_536;
/// How long an agent binding outlives this node's tunnel to its site. An agent binds only
/// to the relays of the nodes it holds a tunnel to, so once the tunnel is gone (the agent
/// moved it) the binding is stale however recently it was refreshed: after this grace
/// (a Bind racing the tunnel's registration) it is forgotten and the clients spliced to
/// it follow the site to where it is now.
pub const AGENT_GRACE: Duration = Duration::from_secs(2);
/// How long a move of a client binding to a peer's relay waits for its answer before it
/// is asked again.
pub const MOVE_RETRY: Duration = Duration::from_secs(1);

/// What the relay knows of the cluster when it handles a datagram.
pub struct Context<'a> {
    /// Ticket verification keys.
    pub keys: &'a TicketKeys,
    /// The relay addresses of peer nodes holding a tunnel to a site.
    pub peers_holding: &'a (dyn Fn(&Name) -> Vec<SocketAddr> + Sync),
    /// This relay's own addresses (never a hop target).
    pub me: &'a [SocketAddr],
    /// Now, seconds since the Unix epoch (ticket expiry).
    pub unix: u64,
    /// Whether an address is a node's relay (a Bind from it is one sent on).
    pub is_relay: &'a (dyn Fn(SocketAddr) -> bool + Sync),
    /// The sites this node holds a tunnel to; `None` on a relay-only node (it holds no
    /// tunnel: its agent bindings live by their refreshes alone).
    pub held: Option<&'a (dyn Fn(&Name) -> bool + Sync)>,
}

impl RelayCore {
    /// Empty tables counting into `stats`.
    pub fn new(stats: Arc<RelayStats>) -> Self {
        Self {
            routes: HashMap::new(),
            allocated: HashMap::new(),
            clients: HashMap::new(),
            agents: HashMap::new(),
            pending: HashMap::new(),
            nonces: std::collections::HashSet::new(),
            nonce_order: std::collections::VecDeque::new(),
            events: Vec::new(),
            gone: Vec::new(),
            outbox: Vec::new(),
            stats,
        }
    }

    /// The next datagram this relay sends of its own accord (after a tick).
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.outbox.pop()
    }

    /// The next device binding made since the last call, if any (at most one per new
    /// binding, never per packet).
    pub fn poll_event(&mut self) -> Option<DeviceBound> {
        self.events.pop()
    }

    /// Remembers a Bind's nonce until `expires_at`; `false` when it was seen already.
    fn first_use(&mut self, nonce: u64, expires_at: u64, unix: u64) -> bool {
        // Tickets are signed with one lifetime, so insertion order is close to expiry order.
        while let Some(&(old, at)) = self.nonce_order.front() {
            if at > unix {
                break;
            }
            self.nonce_order.pop_front();
            self.nonces.remove(&old);
        }
        if self.nonces.contains(&nonce) {
            return false;
        }
        if self.nonces.len() >= MAX_NONCES {
            if let Some((old, _)) = self.nonce_order.pop_front() {
                self.nonces.remove(&old);
            }
        }
        self.nonces.insert(nonce);
        self.nonce_order.push_back((nonce, expires_at));
        true
    }

    /// One datagram from `from`. A Data frame is rewritten in place (its channel becomes
    /// the far side's) and [`Out::Forward`]ed.
    pub fn handle(
        &mut self,
        from: SocketAddr,
        datagram: &mut [u8],
        now: Instant,
        cx: &Context<'_>,
    ) -> Out {
        // The per-packet path first: no decode beyond the header.
        if let Some(channel) = data_channel(datagram) {
            if datagram.len() > MAX_DATAGRAM {
                self.stats.count(Dropped::Oversized);
                return Out::Nothing;
            }
            let Some(dest) = self.routes.get_mut(&(from, channel)) else {
                self.stats.count(Dropped::UnknownChannel);
                return Out::Nothing;
            };
            dest.last = now;
            let (to, out_channel) = (dest.to, dest.channel);
            datagram[1..5].copy_from_slice(&out_channel.to_be_bytes());
            self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
            self.stats
                .forwarded_bytes
                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
            return Out::Forward(to);
        }
        let frame = match Frame::decode(datagram) {
            Ok(f) => f,
            Err(warren_proto::relay::FrameError::Oversized) => {
                self.stats.count(Dropped::Oversized);
                return Out::Nothing;
            }
            Err(_) => {
                self.stats.count(Dropped::Malformed);
                return Out::Nothing;
            }
        };
        match frame {
            Frame::Ping { nonce } => Out::Send(
                from,
                Frame::Pong {
                    nonce,
                    observed: from,
                }
                .to_vec(),
            ),
            Frame::Bind {
                nonce,
                ticket,
                site,
                via,
            } => self.bind(from, nonce, ticket, site, via, now, cx),
            Frame::Bound {
                nonce,
                channel,
                lifetime: _,
            } => self.hop_bound(from, nonce, channel, now),
            Frame::Refused { nonce, reason } => {
                let Some(p) = self.pending.remove(&nonce).filter(|p| p.peer == from) else {
                    self.stats.count(Dropped::Unexpected);
                    return Out::Nothing;
                };
                self.release(p.client, p.channel);
                if p.moves {
                    // This relay's own move: retried at a later tick, the client's binding
                    // stays as it is meanwhile.
                    return Out::Nothing;
                }
                Out::Send(
                    p.client,
                    Frame::Refused {
                        nonce: p.client_nonce,
                        reason,
                    }
                    .to_vec(),
                )
            }
            Frame::Punch {
                channel,
                kind,
                observed,
                body,
            } => self.punch(from, channel, kind, observed, body, now, cx),
            Frame::Pong { .. }
            | Frame::Data { .. }
            | Frame::Probe { .. }
            | Frame::ProbeAck { .. } => {
                self.stats.count(Dropped::Unexpected);
                Out::Nothing
            }
        }
    }

    /// A Punch on a channel: to the coordinator when this node coordinates the pairing
    /// (a Call from its client, an Answer towards it), else on like Data. The first relay
    /// to get it from an endpoint writes in where it came from.
    #[allow(clippy::too_many_arguments)]
    fn punch(
        &mut self,
        from: SocketAddr,
        channel: u32,
        kind: PunchKind,
        observed: Option<SocketAddr>,
        body: &[u8],
        now: Instant,
        cx: &Context<'_>,
    ) -> Out {
        let Some(dest) = self.routes.get(&(from, channel)).copied() else {
            self.stats.count(Dropped::UnknownChannel);
            return Out::Nothing;
        };
        let observed = observed.or_else(|| (!(cx.is_relay)(from)).then_some(from));
        self.stats.punches.fetch_add(1, Ordering::Relaxed);
        match (dest.leg, kind) {
            (Some(Leg::FromClient), PunchKind::Call) => Out::Coordinate(Coordinate {
                client: (from, channel),
                agent: (dest.to, dest.channel),
                kind,
                observed,
                body: body.to_vec(),
            }),
            (Some(Leg::ToClient), PunchKind::Answer) => {
                let client = (dest.to, dest.channel);
                let Some(up) = self.routes.get(&client).copied() else {
                    self.stats.count(Dropped::UnknownChannel);
                    return Out::Nothing;
                };
                Out::Coordinate(Coordinate {
                    client,
                    agent: (up.to, up.channel),
                    kind,
                    observed,
                    body: body.to_vec(),
                })
            }
            // Go comes only from a coordinator; a Call from the agent's side or an Answer
            // from the client is nobody's.
            (Some(_), _) => {
                self.stats.count(Dropped::Unexpected);
                Out::Nothing
            }
            (None, _) => {
                if let Some(d) = self.routes.get_mut(&(from, channel)) {
                    d.last = now;
                }
                Out::Send(
                    dest.to,
                    Frame::Punch {
                        channel: dest.channel,
                        kind,
                        observed,
                        body,
                    }
                    .to_vec(),
                )
            }
        }
    }

    /// The next pairing forgotten (its client binding gone), for the coordinator.
    pub fn poll_gone(&mut self) -> Option<(SocketAddr, u32)> {
        self.gone.pop()
    }

    fn refuse(&self, to: SocketAddr, nonce: u64, reason: Refusal) -> Out {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        Out::Send(to, Frame::Refused { nonce, reason }.to_vec())
    }

    fn bound(&self, to: SocketAddr, nonce: u64, channel: u32) -> Out {
        self.stats.bound.fetch_add(1, Ordering::Relaxed);
        Out::Send(
            to,
            Frame::Bound {
                nonce,
                channel,
                lifetime: BINDING_LIFETIME.as_secs() as u16,
            }
            .to_vec(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn bind(
        &mut self,
        from: SocketAddr,
        nonce: u64,
        ticket: &[u8],
        site: &str,
        via: Option<u32>,
        now: Instant,
        cx: &Context<'_>,
    ) -> Out {
        let raw = ticket;
        let ticket = match cx.keys.verify(raw, cx.unix) {
            Ok(t) => t,
            Err(reason) => {
                self.stats.count(Dropped::BadTicket);
                return self.refuse(from, nonce, reason);
            }
        };
        // Verified first, so only a ticket holder can fill the table of nonces.
        if !self.first_use(nonce, ticket.expires_at, cx.unix) {
            self.stats.count(Dropped::Replayed);
            return Out::Nothing;
        }
        match ticket.holder {
            Holder::Agent { site } => {
                let bindings = self.agents.entry(site).or_default();
                if let Some(b) = bindings.iter_mut().find(|b| b.addr == from) {
                    b.last = now;
                } else {
                    if self.stats.agents.load(Ordering::Relaxed) as usize >= MAX_AGENTS {
                        self.stats.count(Dropped::Full);
                        return self.refuse(from, nonce, Refusal::Full);
                    }
                    bindings.push(AgentBinding {
                        addr: from,
                        last: now,
                    });
                    self.stats.agents.fetch_add(1, Ordering::Relaxed);
                }
                self.bound(from, nonce, 0)
            }
            Holder::Device { device, sites, .. } => {
                let Some(site) = sites.into_iter().find(|s| s.as_str() == site) else {
                    self.stats.count(Dropped::BadTicket);
                    return self.refuse(from, nonce, Refusal::WrongSite);
                };
                // A Bind a peer relay sent on for its client is that relay's report.
                let from_peer = (cx.is_relay)(from);
                // Only a peer relay names its client's channel.
                let via = if from_peer { via.unwrap_or(0) } else { 0 };
                if !from_peer && !self.clients.contains_key(&(from, site.clone(), 0)) {
                    self.events.push(DeviceBound {
                        device,
                        site: site.clone(),
                        from,
                    });
                }
                self.bind_client((from, site, via), nonce, raw, now, cx)
            }
        }
    }

    fn bind_client(
        &mut self,
        key: ClientKey,
        nonce: u64,
        raw_ticket: &[u8],
        now: Instant,
        cx: &Context<'_>,
    ) -> Out {
        let (from, site) = (key.0, key.1.clone());
        if let Some(b) = self.clients.get_mut(&key) {
            if *b.ticket != *raw_ticket {
                b.ticket = raw_ticket.into();
            }
        }
        if let Some(agent) = self.live_agent(&site, now) {
            if let Some(existing) = self.clients.get(&key).cloned() {
                if existing.upstream != agent {
                    // The agent is here now: the binding follows it, on the same channel.
                    let a = self.allocate(agent);
                    self.resplice(&key, agent, a, now);
                }
                self.touch(from, existing.channel, now);
                return self.bound(from, nonce, existing.channel);
            }
            if self.routes.len() + 2 > MAX_CHANNELS {
                self.stats.count(Dropped::Full);
                return self.refuse(from, nonce, Refusal::Full);
            }
            let c = self.allocate(from);
            let a = self.allocate(agent);
            let coordinates = !(cx.is_relay)(from);
            self.routes.insert(
                (from, c),
                Dest {
                    to: agent,
                    channel: a,
                    last: now,
                    leg: coordinates.then_some(Leg::FromClient),
                },
            );
            self.routes.insert(
                (agent, a),
                Dest {
                    to: from,
                    channel: c,
                    last: now,
                    leg: coordinates.then_some(Leg::ToClient),
                },
            );
            self.clients.insert(
                key,
                ClientBinding {
                    channel: c,
                    upstream: agent,
                    back: a,
                    ticket: raw_ticket.into(),
                    moving: None,
                },
            );
            self.sync_gauges();
            return self.bound(from, nonce, c);
        }
        // One hop: a peer that holds the site. Never a second: a Bind a relay sent on
        // finds the agent here or nowhere (stale holdings must not make a loop).
        if (cx.is_relay)(from) {
            return self.refuse(from, nonce, Refusal::SiteUnreachable);
        }
        let Some(peer) = (cx.peers_holding)(&site)
            .into_iter()
            .find(|p| !cx.me.contains(p))
        else {
            return self.refuse(from, nonce, Refusal::SiteUnreachable);
        };
        if self.pending.len() >= MAX_CHANNELS / 4 || self.routes.len() + 2 > MAX_CHANNELS {
            self.stats.count(Dropped::Full);
            return self.refuse(from, nonce, Refusal::Full);
        }
        let channel = self.clients.get(&key).map(|b| b.channel);
        self.hop(peer, from, nonce, site, raw_ticket, channel, false, now, cx)
    }

    /// Sends a client's Bind on to `peer` (a fresh nonce: the peer honours each once),
    /// naming the client's channel here (`channel`, of its binding; allocated now for a new
    /// one) so that the peer keeps this client's binding apart from others'.
    #[allow(clippy::too_many_arguments)]
    fn hop(
        &mut self,
        peer: SocketAddr,
        client: SocketAddr,
        client_nonce: u64,
        site: Name,
        raw_ticket: &[u8],
        channel: Option<u32>,
        moves: bool,
        now: Instant,
        cx: &Context<'_>,
    ) -> Out {
        let channel = channel.unwrap_or_else(|| self.allocate(client));
        let hop_nonce: u64 = rand::thread_rng().gen();
        let onward = Frame::Bind {
            nonce: hop_nonce,
            ticket: raw_ticket,
            site: site.as_str(),
            via: Some(channel),
        }
        .to_vec();
        self.pending.insert(
            hop_nonce,
            PendingHop {
                moves,
                ticket: raw_ticket.into(),
                channel,
                client,
                coordinates: !(cx.is_relay)(client),
                client_nonce,
                site,
                peer,
                sent: now,
            },
        );
        Out::Send(peer, onward)
    }

    /// The newest live agent binding of `site` here, if any.
    fn live_agent(&self, site: &Name, now: Instant) -> Option<SocketAddr> {
        self.agents.get(site).and_then(|b| {
            b.iter()
                .filter(|b| now.duration_since(b.last) < BINDING_LIFETIME)
                .max_by_key(|b| b.last)
                .map(|b| b.addr)
        })
    }

    /// Points an existing client binding at a new upstream (`back`: the channel the
    /// upstream sends back on), keeping the client's channel and its coordination: the
    /// client's next datagram simply goes the new way.
    fn resplice(&mut self, key: &ClientKey, upstream: SocketAddr, back: u32, now: Instant) {
        let Some(b) = self.clients.get_mut(key) else {
            return;
        };
        let (old_up, old_back, c) = (b.upstream, b.back, b.channel);
        b.upstream = upstream;
        b.back = back;
        b.moving = None;
        self.routes.remove(&(old_up, old_back));
        if self.allocated.get(&old_back) == Some(&old_up) {
            self.allocated.remove(&old_back);
        }
        let leg = self.routes.get(&(key.0, c)).and_then(|d| d.leg);
        self.routes.insert(
            (key.0, c),
            Dest {
                to: upstream,
                channel: back,
                last: now,
                leg,
            },
        );
        self.routes.insert(
            (upstream, back),
            Dest {
                to: key.0,
                channel: c,
                last: now,
                leg: leg.map(|_| Leg::ToClient),
            },
        );
        self.sync_gauges();
    }

    /// The answer of a peer relay to a Bind sent onward.
    fn hop_bound(&mut self, from: SocketAddr, nonce: u64, peer_channel: u32, now: Instant) -> Out {
        let Some(p) = self.pending.remove(&nonce).filter(|p| p.peer == from) else {
            self.stats.count(Dropped::Unexpected);
            return Out::Nothing;
        };
        let key = (p.client, p.site.clone(), 0);
        if let Some(existing) = self.clients.get(&key).cloned() {
            self.release(p.client, p.channel);
            if existing.upstream != from || existing.back != peer_channel {
                self.resplice(&key, from, peer_channel, now);
            }
            self.touch(p.client, existing.channel, now);
            if p.moves {
                return Out::Nothing;
            }
            return self.bound(p.client, p.client_nonce, existing.channel);
        }
        if p.moves {
            // The binding went meanwhile.
            self.release(p.client, p.channel);
            return Out::Nothing;
        }
        if self.routes.len() + 2 > MAX_CHANNELS {
            self.release(p.client, p.channel);
            self.stats.count(Dropped::Full);
            return self.refuse(p.client, p.client_nonce, Refusal::Full);
        }
        let c = p.channel;
        self.routes.insert(
            (p.client, c),
            Dest {
                to: from,
                channel: peer_channel,
                last: now,
                leg: p.coordinates.then_some(Leg::FromClient),
            },
        );
        self.routes.insert(
            (from, peer_channel),
            Dest {
                to: p.client,
                channel: c,
                last: now,
                leg: p.coordinates.then_some(Leg::ToClient),
            },
        );
        self.clients.insert(
            key,
            ClientBinding {
                channel: c,
                upstream: from,
                back: peer_channel,
                ticket: p.ticket,
                moving: None,
            },
        );
        self.sync_gauges();
        self.bound(p.client, p.client_nonce, c)
    }

    /// Frees `channel`, allocated for `client`'s hop, unless a route of it uses it.
    fn release(&mut self, client: SocketAddr, channel: u32) {
        if self.allocated.get(&channel) == Some(&client)
            && !self.routes.contains_key(&(client, channel))
        {
            self.allocated.remove(&channel);
        }
    }

    fn touch(&mut self, from: SocketAddr, channel: u32, now: Instant) {
        if let Some(d) = self.routes.get_mut(&(from, channel)) {
            d.last = now;
        }
    }

    fn allocate(&mut self, owner: SocketAddr) -> u32 {
        let mut rng = rand::thread_rng();
        loop {
            let c: u32 = rng.gen();
            if c != 0 && !self.allocated.contains_key(&c) {
                self.allocated.insert(c, owner);
                return c;
            }
        }
    }

    fn unbind_client(&mut self, key: &ClientKey) {
        if let Some(b) = self.clients.remove(key) {
            if self.gone.len() < MAX_CHANNELS {
                self.gone.push((key.0, b.channel));
            }
            self.routes.remove(&(key.0, b.channel));
            self.routes.remove(&(b.upstream, b.back));
            self.allocated.remove(&b.channel);
            if self.allocated.get(&b.back) == Some(&b.upstream) {
                self.allocated.remove(&b.back);
            }
        }
        self.sync_gauges();
    }

    /// Forgets every binding made through `relay`, a relay no longer of the cluster (a
    /// revoked relay-only node): the sessions through it end here, whatever it does.
    pub fn forget_relay(&mut self, relay: SocketAddr) {
        let through: Vec<ClientKey> = self
            .clients
            .iter()
            .filter(|(k, b)| k.0 == relay || b.upstream == relay)
            .map(|(k, _)| k.clone())
            .collect();
        for k in through {
            self.unbind_client(&k);
        }
        self.pending
            .retain(|_, p| p.peer != relay && p.client != relay);
        self.sync_gauges();
    }

    /// Forgets bindings idle for [`BINDING_LIFETIME`], agent bindings of sites this node no
    /// longer holds a tunnel to ([`AGENT_GRACE`]) and hops never answered; then moves the
    /// client bindings whose upstream is no longer where their site is (see
    /// [`follow_sites`](Self::follow_sites)).
    pub fn handle_tick(&mut self, now: Instant, cx: &Context<'_>) {
        let idle = |last: Instant| now.duration_since(last) >= BINDING_LIFETIME;
        let stale: Vec<ClientKey> = self
            .clients
            .iter()
            .filter(|(k, b)| {
                // A binding lives while either direction carries traffic.
                let up = self.routes.get(&(k.0, b.channel)).map(|d| d.last);
                let down = self.routes.get(&(b.upstream, b.back)).map(|d| d.last);
                up.into_iter().chain(down).all(idle)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.unbind_client(&k);
        }
        for (site, bindings) in self.agents.iter_mut() {
            let held = cx.held.is_none_or(|held| held(site));
            bindings
                .retain(|b| !idle(b.last) && (held || now.duration_since(b.last) < AGENT_GRACE));
        }
        self.agents.retain(|_, b| !b.is_empty());
        let expired: Vec<(SocketAddr, u32)> = self
            .pending
            .values()
            .filter(|p| now.duration_since(p.sent) >= Duration::from_secs(5))
            .map(|p| (p.client, p.channel))
            .collect();
        self.pending
            .retain(|_, p| now.duration_since(p.sent) < Duration::from_secs(5));
        for (client, channel) in expired {
            self.release(client, channel);
        }
        self.follow_sites(now, cx);
        self.sync_gauges();
    }

    /// Moves every client binding (a client's, not a peer relay's) whose upstream is gone
    /// from where its site is: spliced to an agent that is no longer bound here, or sent on
    /// to a peer that no longer holds the site (or while an agent is bound here now). The
    /// binding goes to the agent here if there is one, else one hop to a peer that holds
    /// the site (asked with the client's own ticket; the answer re-splices it). The client's
    /// channel stays: its WireGuard session goes on over the new way without a new Bind.
    /// An agent moves its tunnels between nodes (to a closer one, or when one fails), and
    /// relayed sessions must not notice.
    fn follow_sites(&mut self, now: Instant, cx: &Context<'_>) {
        let mut moves: Vec<(ClientKey, SocketAddr)> = Vec::new();
        // Where each site is, looked up once per site and tick, not once per binding: the
        // agent bound here, and the peers that hold it.
        let mut sites: HashMap<&Name, (Option<SocketAddr>, Vec<SocketAddr>)> = HashMap::new();
        for (key, b) in &self.clients {
            if (cx.is_relay)(key.0) || b.moving.is_some_and(|t| now.duration_since(t) < MOVE_RETRY)
            {
                continue;
            }
            let (here, peers) = sites
                .entry(&key.1)
                .or_insert_with(|| (self.live_agent(&key.1, now), (cx.peers_holding)(&key.1)));
            let fine = if (cx.is_relay)(b.upstream) {
                here.is_none() && peers.contains(&b.upstream)
            } else {
                self.agents
                    .get(&key.1)
                    .is_some_and(|a| a.iter().any(|a| a.addr == b.upstream))
            };
            if fine {
                continue;
            }
            let to = here.or_else(|| peers.iter().copied().find(|p| !cx.me.contains(p)));
            if let Some(to) = to.filter(|to| *to != b.upstream) {
                moves.push((key.clone(), to));
            }
        }
        for (key, to) in moves {
            if !(cx.is_relay)(to) {
                tracing::debug!(client = %key.0, site = %key.1, agent = %to, "a relayed session follows its site's agent here");
                let a = self.allocate(to);
                self.resplice(&key, to, a, now);
                continue;
            }
            if self.pending.len() >= MAX_CHANNELS / 4 {
                break;
            }
            let Some(b) = self.clients.get_mut(&key) else {
                continue;
            };
            b.moving = Some(now);
            let (ticket, channel) = (b.ticket.clone(), b.channel);
            tracing::debug!(client = %key.0, site = %key.1, relay = %to, "a relayed session follows its site to a peer's relay");
            if let Out::Send(peer, bytes) = self.hop(
                to,
                key.0,
                0,
                key.1.clone(),
                &ticket,
                Some(channel),
                true,
                now,
                cx,
            ) {
                self.outbox.push((peer, bytes));
            }
        }
    }

    fn sync_gauges(&self) {
        self.stats
            .channels
            .store(self.routes.len() as u64, Ordering::Relaxed);
        self.stats.agents.store(
            self.agents.values().map(|b| b.len() as u64).sum(),
            Ordering::Relaxed,
        );
    }

    /// Whether an agent of `site` is bound here now.
    pub fn has_agent(&self, site: &Name, now: Instant) -> bool {
        self.agents.get(site).is_some_and(|b| {
            b.iter()
                .any(|b| now.duration_since(b.last) < BINDING_LIFETIME)
        })
    }
}

/// What the relay reads of the rest of the node, refreshed every [`TICK`].
pub trait RelayView: Send + Sync + 'static {
    /// The cluster's ticket keys now.
    fn keys(&self) -> TicketKeys;
    /// Relay addresses of the peers holding a tunnel to each site, as last heard.
    fn holders(&self) -> HashMap<Name, Vec<SocketAddr>>;
    /// The relay addresses of every node of the cluster.
    fn relays(&self) -> Vec<SocketAddr>;
    /// The sites this node holds a tunnel to now; `None` for a relay-only node (which
    /// holds none: the agents bound to it were sent by the nodes that do).
    fn held(&self) -> Option<Vec<Name>>;
    /// A device made a new binding here (reported once per binding, off the data path).
    fn device_bound(&self, bound: DeviceBound);
    /// A Punch for the coordinator of its pairing (a few per round, never data).
    fn coordinate(&self, punch: Coordinate);
    /// A client binding is gone: its pairing may be forgotten.
    fn pairing_gone(&self, client: (SocketAddr, u32));
}

/// What the relay task knows of the node, read from its [`RelayView`] every [`TICK`].
struct Known {
    keys: TicketKeys,
    holders: HashMap<Name, Vec<SocketAddr>>,
    relays: Vec<SocketAddr>,
    held: Option<std::collections::HashSet<Name>>,
    unix: u64,
}

impl Known {
    fn read(view: &dyn RelayView) -> Self {
        Self {
            keys: view.keys(),
            holders: view.holders(),
            relays: view.relays(),
            held: view.held().map(|h| h.into_iter().collect()),
            unix: crate::proxy::unix_now(),
        }
    }

    /// Runs `f` with this knowledge as a [`Context`].
    fn with<R>(&self, me: &[SocketAddr], f: impl FnOnce(&Context<'_>) -> R) -> R {
        let holding = |site: &Name| self.holders.get(site).cloned().unwrap_or_default();
        let is_relay = |a: SocketAddr| self.relays.contains(&a);
        let holds = |s: &Name| self.held.as_ref().is_some_and(|h| h.contains(s));
        f(&Context {
            keys: &self.keys,
            peers_holding: &holding,
            me,
            unix: self.unix,
            is_relay: &is_relay,
            held: self.held.is_some().then_some(&holds),
        })
    }
}

/// Serves the relay on `socket` until the task is aborted.
pub async fn serve(
    socket: Arc<UdpSocket>,
    me: Vec<SocketAddr>,
    view: Arc<dyn RelayView>,
    stats: Arc<RelayStats>,
) {
    let mut core = RelayCore::new(stats);
    let mut known = Known::read(&*view);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One buffer, reused: a datagram is rewritten in place and sent on from it.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let mut next = Some(r);
                let mut batch = 0;
                while let Some(r) = next.take() {
                batch += 1;
                let (n, from) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        // ICMP errors surface here on Linux (a peer went away): not fatal.
                        tracing::trace!("relay recv: {e}");
                        break;
                    }
                };
                let out =
                    known.with(&me, |cx| core.handle(from, &mut buf[..n], Instant::now(), cx));
                while let Some(b) = core.poll_event() {
                    view.device_bound(b);
                }
                match out {
                    Out::Coordinate(c) => view.coordinate(c),
                    Out::Forward(to) => {
                        let _ = socket.send_to(&buf[..n], to).await;
                    }
                    Out::Send(to, bytes) => {
                        let _ = socket.send_to(&bytes, to).await;
                    }
                    Out::Nothing => {}
                }
                // What else is queued, without another trip through the runtime.
                if batch < RECV_BATCH {
                    match socket.try_recv_from(&mut buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        r => next = Some(r),
                    }
                }
                }
            }
            _ = tick.tick() => {
                let mut now = Known::read(&*view);
                // An empty list (a replica not caught up, a revoked relay-only node's
                // cleared feed) says nothing about who left.
                if now.relays.is_empty() {
                    now.relays = std::mem::take(&mut known.relays);
                } else {
                    for gone in known.relays.iter().filter(|r| !now.relays.contains(r)) {
                        tracing::info!(relay = %gone, "a relay left the cluster: the bindings through it are forgotten");
                        core.forget_relay(*gone);
                    }
                }
                known = now;
                known.with(&me, |cx| core.handle_tick(Instant::now(), cx));
                while let Some((to, bytes)) = core.poll_transmit() {
                    let _ = socket.send_to(&bytes, to).await;
                }
                while let Some(g) = core.poll_gone() {
                    view.pairing_gone(g);
                }
            }
        }
    }
}

/// The tree's child `relay`: runs [`serve`] as its task and fails when the task ends (a
/// panic included), so the supervisor starts it again on the same socket.
#[derive(Clone)]
pub struct RelayActor;

/// Arguments of the [`RelayActor`].
#[derive(Clone)]
pub struct RelayArgs {
    /// The relay's socket (bound once).
    pub socket: Arc<UdpSocket>,
    /// This relay's own addresses (its public one).
    pub me: Vec<SocketAddr>,
    /// The node as the relay sees it.
    pub view: Arc<dyn RelayView>,
    /// Its counters.
    pub stats: Arc<RelayStats>,
}

/// Messages of the [`RelayActor`].
pub enum RelayMsg {
    /// Check the task is alive.
    Reap,
}

/// State of the [`RelayActor`].
pub struct RelayState {
    task: JoinHandle<()>,
    reaper: JoinHandle<()>,
}

impl std::ops::Drop for RelayState {
    fn drop(&mut self) {
        self.task.abort();
        self.reaper.abort();
    }
}

impl RelayActor {
    /// The child spec.
    pub fn child(args: RelayArgs) -> ChildSpec {
        ChildSpec::actor("relay", RelayActor, move || args.clone())
    }
}

impl Actor for RelayActor {
    type Msg = RelayMsg;
    type State = RelayState;
    type Arguments = RelayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RelayArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let task = tokio::spawn(serve(args.socket, args.me, args.view, args.stats));
        let reaper = myself.send_interval(Duration::from_secs(1), || RelayMsg::Reap);
        Ok(RelayState { task, reaper })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RelayMsg::Reap => {
                if state.task.is_finished() {
                    return Err("the relay task ended".into());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::sign::Signer;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    struct World {
        keys: Vec<SigningKey>,
        tk: TicketKeys,
        core: RelayCore,
        stats: Arc<RelayStats>,
        now: Instant,
        nonce: u64,
    }

    const UNIX: u64 = 1_000_000;

    impl World {
        fn new() -> Self {
            let keys = vec![Signer::generate(1)];
            let tk = TicketKeys::from_signing_keys(&keys);
            let stats = Arc::new(RelayStats::default());
            Self {
                keys,
                tk,
                core: RelayCore::new(stats.clone()),
                stats,
                now: Instant::now(),
                nonce: 100,
            }
        }

        fn ticket(&self, holder: Holder, expires_at: u64) -> Vec<u8> {
            sign_ticket(
                &self.keys,
                &Ticket {
                    version: 1,
                    holder,
                    expires_at,
                },
            )
            .unwrap()
            .encode()
        }

        fn device(&self, sites: &[&str]) -> Vec<u8> {
            self.ticket(
                Holder::Device {
                    device: name("laptop"),
                    key: [1; 32],
                    sites: sites.iter().map(|s| name(s)).collect(),
                },
                UNIX + 60,
            )
        }

        /// An agent of site-a bound here, and the client spliced to it: the world, the
        /// agent's and the client's tickets, the client's channel.
        fn spliced() -> (World, Vec<u8>, Vec<u8>, u32) {
            let mut w = World::new();
            let at = w.agent("site-a");
            w.bind(AGENT, &at, "");
            let dt = w.device(&["site-a"]);
            let Frame::Bound { channel: c, .. } = w.bind(CLIENT, &dt, "site-a") else {
                panic!()
            };
            (w, at, dt, c)
        }

        fn agent(&self, site: &str) -> Vec<u8> {
            self.ticket(Holder::Agent { site: name(site) }, UNIX + 60)
        }

        /// Runs `f` on the relay with a context in which `peers` hold every site and this
        /// node holds `held` (`None`: a relay-only node).
        fn with_cx<R>(
            &mut self,
            peers: &[SocketAddr],
            held: Option<&[&str]>,
            f: impl FnOnce(&mut RelayCore, &Context<'_>, Instant) -> R,
        ) -> R {
            let peers = peers.to_vec();
            let holding = move |_: &Name| peers.clone();
            let holds = |s: &Name| held.is_some_and(|h| h.contains(&s.as_str()));
            let cx = Context {
                keys: &self.tk,
                peers_holding: &holding,
                me: &[],
                unix: UNIX,
                is_relay: &|a: SocketAddr| a.port() == 7401,
                held: held.is_some().then_some(&holds),
            };
            f(&mut self.core, &cx, self.now)
        }

        fn send(&mut self, from: &str, mut d: Vec<u8>, peers: &[SocketAddr]) -> (Out, Vec<u8>) {
            let out = self.with_cx(peers, None, |core, cx, now| {
                core.handle(from.parse().unwrap(), &mut d, now, cx)
            });
            (out, d)
        }

        /// A tick: `peers` hold every site; `held`, the sites this node holds (`None`: a
        /// relay-only node). What the relay sent of its own accord.
        fn tick(
            &mut self,
            peers: &[SocketAddr],
            held: Option<&[&str]>,
        ) -> Vec<(SocketAddr, Vec<u8>)> {
            self.with_cx(peers, held, |core, cx, now| core.handle_tick(now, cx));
            std::iter::from_fn(|| self.core.poll_transmit()).collect()
        }

        /// The client binds to site-a with `ticket`; no agent is here, so the Bind goes on
        /// to `peer`, which answers with `peer_channel`. The client's channel here, and the
        /// channel the Bind sent on named.
        fn bind_through(
            &mut self,
            peer: &str,
            ticket: &[u8],
            peer_channel: u32,
        ) -> (u32, Option<u32>) {
            self.nonce += 1;
            let (out, _) = self.send(
                CLIENT,
                bind_frame(self.nonce, ticket, "site-a", None),
                &[peer.parse().unwrap()],
            );
            let Out::Send(to, onward) = out else {
                panic!("{out:?}")
            };
            assert_eq!(to, peer.parse().unwrap());
            let Frame::Bind { nonce, via, .. } = Frame::decode(&onward).unwrap() else {
                panic!()
            };
            let (out, _) = self.send(peer, bound_frame(nonce, peer_channel), &[]);
            let Out::Send(to, b) = out else {
                panic!("{out:?}")
            };
            assert_eq!(to, CLIENT.parse().unwrap());
            let Frame::Bound { channel, .. } = Frame::decode(&b).unwrap() else {
                panic!()
            };
            (channel, via)
        }

        fn bind(&mut self, from: &str, ticket: &[u8], site: &str) -> Frame<'static> {
            self.nonce += 1;
            let (out, _) = self.send(from, bind_frame(self.nonce, ticket, site, None), &[]);
            let Out::Send(to, b) = out else {
                panic!("no answer: {out:?}")
            };
            assert_eq!(to, from.parse().unwrap());
            match Frame::decode(&b).unwrap() {
                Frame::Bound {
                    nonce,
                    channel,
                    lifetime,
                } => Frame::Bound {
                    nonce,
                    channel,
                    lifetime,
                },
                Frame::Refused { nonce, reason } => Frame::Refused { nonce, reason },
                f => panic!("{f:?}"),
            }
        }
    }

    fn bound_frame(nonce: u64, channel: u32) -> Vec<u8> {
        Frame::Bound {
            nonce,
            channel,
            lifetime: 30,
        }
        .to_vec()
    }

    fn bind_frame(nonce: u64, ticket: &[u8], site: &str, via: Option<u32>) -> Vec<u8> {
        Frame::Bind {
            nonce,
            ticket,
            site,
            via,
        }
        .to_vec()
    }

    fn data(channel: u32, payload: &[u8]) -> Vec<u8> {
        Frame::Data { channel, payload }.to_vec()
    }

    const CLIENT: &str = "198.51.100.7:40000";
    const AGENT: &str = "203.0.113.5:51820";

    #[test]
    fn a_client_and_an_agent_are_spliced_both_ways() {
        let mut w = World::new();
        let at = w.agent("site-a");
        assert!(matches!(w.bind(AGENT, &at, ""), Frame::Bound { .. }));
        let dt = w.device(&["site-a"]);
        let Frame::Bound { channel: c, .. } = w.bind(CLIENT, &dt, "site-a") else {
            panic!()
        };
        let (out, fwd) = w.send(CLIENT, data(c, b"\x01hello"), &[]);
        assert_eq!(out, Out::Forward(AGENT.parse().unwrap()));
        let a = data_channel(&fwd).unwrap();
        assert_ne!(a, c);
        let (out, back) = w.send(AGENT, data(a, b"\x02back"), &[]);
        assert_eq!(out, Out::Forward(CLIENT.parse().unwrap()));
        assert_eq!(data_channel(&back), Some(c));
        assert_eq!(&back[5..], b"\x02back");
        // A refresh keeps the channel.
        let Frame::Bound { channel: c2, .. } = w.bind(CLIENT, &dt, "site-a") else {
            panic!()
        };
        assert_eq!(c2, c);
        assert_eq!(w.stats.forwarded.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_channel_is_honoured_only_from_the_address_it_was_bound_from() {
        let (mut w, _, _, c) = World::spliced();
        let (out, _) = w.send("192.0.2.66:1234", data(c, b"\x01forged"), &[]);
        assert_eq!(out, Out::Nothing);
        let (out, _) = w.send(CLIENT, data(c ^ 1, b"\x01guess"), &[]);
        assert_eq!(out, Out::Nothing);
        assert_eq!(w.stats.dropped(Dropped::UnknownChannel), 2);
    }

    #[test]
    fn bad_expired_and_misdirected_tickets_are_refused_and_bind_nothing() {
        let mut w = World::new();
        let at = w.agent("site-a");
        w.bind(AGENT, &at, "");
        // Another cluster's key.
        let other = World::new();
        let forged = other.device(&["site-a"]);
        assert!(matches!(
            w.bind(CLIENT, &forged, "site-a"),
            Frame::Refused {
                reason: Refusal::BadTicket,
                ..
            }
        ));
        // A signature over other bytes.
        let mut t = SignedTicket::decode(&w.device(&["site-a"])).unwrap();
        t.body = Ticket {
            version: 1,
            holder: Holder::Agent {
                site: name("site-a"),
            },
            expires_at: UNIX + 60,
        }
        .encode();
        assert!(matches!(
            w.bind(CLIENT, &t.encode(), ""),
            Frame::Refused {
                reason: Refusal::BadTicket,
                ..
            }
        ));
        let expired = w.ticket(
            Holder::Device {
                device: name("laptop"),
                key: [1; 32],
                sites: vec![name("site-a")],
            },
            UNIX - 1,
        );
        assert!(matches!(
            w.bind(CLIENT, &expired, "site-a"),
            Frame::Refused {
                reason: Refusal::Expired,
                ..
            }
        ));
        let elsewhere = w.device(&["site-b"]);
        assert!(matches!(
            w.bind(CLIENT, &elsewhere, "site-a"),
            Frame::Refused {
                reason: Refusal::WrongSite,
                ..
            }
        ));
        assert_eq!(w.stats.channels.load(Ordering::Relaxed), 0);
        assert_eq!(w.stats.dropped(Dropped::BadTicket), 4);
    }

    #[test]
    fn garbage_and_oversized_datagrams_are_counted_and_unanswered() {
        let mut w = World::new();
        for d in [
            vec![],
            vec![1, 0, 0, 0],
            vec![0xA2, 1, 2],
            vec![0xA5; MAX_DATAGRAM + 1],
        ] {
            let (out, _) = w.send(CLIENT, d, &[]);
            assert_eq!(out, Out::Nothing);
        }
        assert_eq!(w.stats.dropped(Dropped::Malformed), 3);
        assert_eq!(w.stats.dropped(Dropped::Oversized), 1);
        let mut text = String::new();
        w.stats.render(&mut text);
        assert!(
            text.contains("warren_relay_dropped_total{reason=\"malformed\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE warren_relay_channels gauge\nwarren_relay_channels 0\n"),
            "{text}"
        );
    }

    #[test]
    fn a_site_held_by_a_peer_is_reached_in_one_hop() {
        let mut w = World::new();
        let peer: SocketAddr = "10.0.0.2:7401".parse().unwrap();
        let dt = w.device(&["site-a"]);
        let (out, _) = w.send(CLIENT, bind_frame(5, &dt, "site-a", None), &[peer]);
        let Out::Send(to, onward) = out else { panic!() };
        assert_eq!(to, peer);
        let Frame::Bind {
            nonce: hop, ticket, ..
        } = Frame::decode(&onward).unwrap()
        else {
            panic!()
        };
        assert_eq!(ticket, &dt[..]);
        // The peer's answer comes back to the client as this relay's own channel.
        let (out, _) = w.send("10.0.0.2:7401", bound_frame(hop, 77), &[]);
        let Out::Send(to, b) = out else { panic!() };
        assert_eq!(to, CLIENT.parse().unwrap());
        let Frame::Bound {
            nonce: 5,
            channel: c,
            ..
        } = Frame::decode(&b).unwrap()
        else {
            panic!()
        };
        let (out, fwd) = w.send(CLIENT, data(c, b"\x01x"), &[]);
        assert_eq!(out, Out::Forward(peer));
        assert_eq!(data_channel(&fwd), Some(77));
        let (out, back) = w.send("10.0.0.2:7401", data(77, b"\x02y"), &[]);
        assert_eq!(out, Out::Forward(CLIENT.parse().unwrap()));
        assert_eq!(data_channel(&back), Some(c));
        // A Bound nobody asked for is dropped.
        let (out, _) = w.send("10.0.0.9:7401", bound_frame(1, 1), &[]);
        assert_eq!(out, Out::Nothing);
    }

    #[test]
    fn a_replayed_bind_is_dropped_and_counted_and_a_new_binding_is_reported_once() {
        let mut w = World::new();
        let at = w.agent("site-a");
        assert!(matches!(w.bind(AGENT, &at, "site-a"), Frame::Bound { .. }));
        let dt = w.device(&["site-a"]);
        let bind = bind_frame(42, &dt, "site-a", None);
        let (out, _) = w.send(CLIENT, bind.clone(), &[]);
        assert!(matches!(out, Out::Send(..)), "{out:?}");
        assert_eq!(
            w.core.poll_event(),
            Some(DeviceBound {
                device: name("laptop"),
                site: name("site-a"),
                from: CLIENT.parse().unwrap(),
            })
        );
        assert_eq!(w.core.poll_event(), None);
        // The same datagram again, from the client or from anyone else: nothing.
        for from in [CLIENT, "198.51.100.9:1234"] {
            let (out, _) = w.send(from, bind.clone(), &[]);
            assert_eq!(out, Out::Nothing, "a replay from {from}");
        }
        assert_eq!(w.stats.dropped(Dropped::Replayed), 2);
        // A refresh (a new nonce) is honoured and reports nothing new.
        assert!(matches!(w.bind(CLIENT, &dt, "site-a"), Frame::Bound { .. }));
        assert_eq!(w.core.poll_event(), None);
        // A Bind a peer relay sends on is that relay's report, not this one's.
        assert!(matches!(
            w.bind("10.0.0.2:7401", &dt, "site-a"),
            Frame::Bound { .. }
        ));
        assert_eq!(w.core.poll_event(), None);
    }

    #[test]
    fn a_bind_sent_on_by_a_relay_is_never_sent_on_again() {
        let mut w = World::new();
        let dt = w.device(&["site-a"]);
        let bind = |nonce| bind_frame(nonce, &dt, "site-a", None);
        // No agent here, a peer "holds" the site: a client's Bind goes on one hop...
        let peer: SocketAddr = "10.0.0.3:7401".parse().unwrap();
        let (out, _) = w.send(CLIENT, bind(1), &[peer]);
        assert!(matches!(out, Out::Send(to, _) if to == peer), "{out:?}");
        // ...but one from a relay is refused, not sent on (stale holdings make no loop).
        let (out, _) = w.send("10.0.0.2:7401", bind(2), &[peer]);
        let Out::Send(to, b) = out else {
            panic!("{out:?}")
        };
        assert_eq!(to, "10.0.0.2:7401".parse().unwrap());
        assert!(matches!(
            Frame::decode(&b).unwrap(),
            Frame::Refused {
                reason: Refusal::SiteUnreachable,
                ..
            }
        ));
    }

    #[test]
    fn the_bindings_through_a_relay_that_left_end_and_others_stay() {
        let mut w = World::new();
        let at = w.agent("site-a");
        w.bind(AGENT, &at, "");
        let dt = w.device(&["site-a"]);
        let relay = "10.0.0.2:7401";
        let Frame::Bound { channel: hop, .. } = w.bind(relay, &dt, "site-a") else {
            panic!()
        };
        let Frame::Bound {
            channel: direct, ..
        } = w.bind(CLIENT, &dt, "site-a")
        else {
            panic!()
        };
        w.core.forget_relay(relay.parse().unwrap());
        let (out, _) = w.send(relay, data(hop, b"\x01late"), &[]);
        assert_eq!(out, Out::Nothing, "the revoked relay's channel is gone");
        let (out, _) = w.send(CLIENT, data(direct, b"\x01still"), &[]);
        assert_eq!(out, Out::Forward(AGENT.parse().unwrap()));
    }

    #[test]
    fn idle_bindings_are_forgotten() {
        let (mut w, _, _, c) = World::spliced();
        w.now += BINDING_LIFETIME + Duration::from_secs(1);
        w.tick(&[], None);
        let (out, _) = w.send(CLIENT, data(c, b"\x01late"), &[]);
        assert_eq!(out, Out::Nothing);
        assert_eq!(w.stats.channels.load(Ordering::Relaxed), 0);
        assert!(!w.core.has_agent(&name("site-a"), w.now));
    }

    const PEER: &str = "10.0.0.2:7401";
    const OTHER_PEER: &str = "10.0.0.3:7401";

    /// The peer's side of a move: the Bind it got (sent with the client's ticket), answered
    /// with `channel`.
    fn answer_move(
        w: &mut World,
        sent: &[(SocketAddr, Vec<u8>)],
        to: &str,
        ticket: &[u8],
        client: u32,
        channel: u32,
    ) {
        assert_eq!(sent.len(), 1, "one Bind: {sent:?}");
        assert_eq!(sent[0].0, to.parse().unwrap());
        let Frame::Bind {
            nonce,
            ticket: t,
            site,
            via,
        } = Frame::decode(&sent[0].1).unwrap()
        else {
            panic!("{:?}", sent[0])
        };
        assert_eq!((t, site), (ticket, "site-a"));
        assert_eq!(via, Some(client), "the hop names the client's channel here");
        let (out, _) = w.send(to, bound_frame(nonce, channel), &[]);
        assert_eq!(
            out,
            Out::Nothing,
            "the client is not told: its channel stays"
        );
    }

    #[test]
    fn a_relayed_session_follows_its_agent_to_a_peer_on_the_same_channel() {
        let (mut w, at, dt, c) = World::spliced();
        let (_, fwd) = w.send(CLIENT, data(c, b"\x01a"), &[]);
        let a = data_channel(&fwd).unwrap();
        // While this node holds the site's tunnel, or within the grace: nothing moves.
        w.now += Duration::from_secs(5);
        assert!(w
            .tick(&[PEER.parse().unwrap()], Some(&["site-a"]))
            .is_empty());
        let (out, _) = w.send(CLIENT, data(c, b"\x01b"), &[]);
        assert_eq!(out, Out::Forward(AGENT.parse().unwrap()));
        // The agent moved its tunnel to the peer: its binding here is stale at once,
        // however recently refreshed (past the grace).
        w.bind(AGENT, &at, "");
        w.now += AGENT_GRACE - Duration::from_millis(100);
        assert!(w.tick(&[PEER.parse().unwrap()], Some(&[])).is_empty());
        w.now += Duration::from_millis(200);
        let sent = w.tick(&[PEER.parse().unwrap()], Some(&[]));
        assert!(!w.core.has_agent(&name("site-a"), w.now));
        answer_move(&mut w, &sent, PEER, &dt, c, 77);
        // The client's channel goes to the peer now, and the peer's comes back on it.
        let (out, fwd) = w.send(CLIENT, data(c, b"\x01c"), &[]);
        assert_eq!(out, Out::Forward(PEER.parse().unwrap()));
        assert_eq!(data_channel(&fwd), Some(77));
        let (out, back) = w.send(PEER, data(77, b"\x02d"), &[]);
        assert_eq!(out, Out::Forward(CLIENT.parse().unwrap()));
        assert_eq!(data_channel(&back), Some(c));
        // The old agent side of the splice is gone.
        let (out, _) = w.send(AGENT, data(a, b"\x02late"), &[]);
        assert_eq!(out, Out::Nothing);
        // Settled: no more moves, and a refresh keeps the channel (one hop, same answer).
        w.now += Duration::from_secs(2);
        assert!(w.tick(&[PEER.parse().unwrap()], Some(&[])).is_empty());
        assert_eq!(w.bind_through(PEER, &dt, 77), (c, Some(c)));
        assert_eq!(w.stats.channels.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_session_sent_on_follows_its_site_to_an_agent_here_or_to_a_peer_that_holds_it() {
        let mut w = World::new();
        let dt = w.device(&["site-a"]);
        // No agent here: one hop to the peer.
        let (c, _) = w.bind_through(PEER, &dt, 77);
        // The peer stops holding the site, another does: the session goes there.
        let sent = w.tick(&[OTHER_PEER.parse().unwrap()], Some(&[]));
        answer_move(&mut w, &sent, OTHER_PEER, &dt, c, 88);
        let (out, fwd) = w.send(CLIENT, data(c, b"\x01x"), &[]);
        assert_eq!(out, Out::Forward(OTHER_PEER.parse().unwrap()));
        assert_eq!(data_channel(&fwd), Some(88));
        let (out, _) = w.send(PEER, data(77, b"\x02late"), &[]);
        assert_eq!(out, Out::Nothing, "the first peer's channel is forgotten");
        // The agent comes here: the session is spliced to it, still on the client's channel.
        let at = w.agent("site-a");
        w.bind(AGENT, &at, "");
        assert!(w
            .tick(&[OTHER_PEER.parse().unwrap()], Some(&["site-a"]))
            .is_empty());
        let (out, fwd) = w.send(CLIENT, data(c, b"\x01y"), &[]);
        assert_eq!(out, Out::Forward(AGENT.parse().unwrap()));
        let a = data_channel(&fwd).unwrap();
        let (out, back) = w.send(AGENT, data(a, b"\x02z"), &[]);
        assert_eq!(out, Out::Forward(CLIENT.parse().unwrap()));
        assert_eq!(data_channel(&back), Some(c));
        assert_eq!(w.stats.channels.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_refused_or_unanswered_move_leaves_the_session_and_is_asked_again() {
        let (mut w, _, dt, c) = World::spliced();
        // No one else holds the site: the stale agent binding goes, the session waits.
        w.now += AGENT_GRACE;
        assert!(w.tick(&[], Some(&[])).is_empty());
        let peer = [PEER.parse().unwrap()];
        let sent = w.tick(&peer, Some(&[]));
        assert_eq!(sent.len(), 1);
        let Frame::Bind { nonce, .. } = Frame::decode(&sent[0].1).unwrap() else {
            panic!()
        };
        let (out, _) = w.send(
            PEER,
            Frame::Refused {
                nonce,
                reason: Refusal::SiteUnreachable,
            }
            .to_vec(),
            &[],
        );
        assert_eq!(
            out,
            Out::Nothing,
            "the client is not told of the relay's own move"
        );
        assert!(
            w.tick(&peer, Some(&[])).is_empty(),
            "not again before MOVE_RETRY"
        );
        w.now += MOVE_RETRY;
        let sent = w.tick(&peer, Some(&[]));
        answer_move(&mut w, &sent, PEER, &dt, c, 99);
        let (out, fwd) = w.send(CLIENT, data(c, b"\x01x"), &[]);
        assert_eq!(out, Out::Forward(PEER.parse().unwrap()));
        assert_eq!(data_channel(&fwd), Some(99));
    }

    #[test]
    fn a_relay_only_node_keeps_agent_bindings_while_they_are_refreshed() {
        let (mut w, _, _, c) = World::spliced();
        w.now += Duration::from_secs(10);
        assert!(w.tick(&[PEER.parse().unwrap()], None).is_empty());
        assert!(w.core.has_agent(&name("site-a"), w.now));
        let (out, _) = w.send(CLIENT, data(c, b"\x01x"), &[]);
        assert_eq!(out, Out::Forward(AGENT.parse().unwrap()));
    }

    #[test]
    fn a_peer_keeps_the_clients_one_relay_sends_on_apart() {
        let mut w = World::new();
        let at = w.agent("site-a");
        w.bind(AGENT, &at, "");
        let dt = w.device(&["site-a"]);
        let hop = |w: &mut World, via: u32| {
            w.nonce += 1;
            let (out, _) = w.send(PEER, bind_frame(w.nonce, &dt, "site-a", Some(via)), &[]);
            let Out::Send(_, b) = out else {
                panic!("{out:?}")
            };
            let Frame::Bound { channel, .. } = Frame::decode(&b).unwrap() else {
                panic!()
            };
            channel
        };
        // Two clients of the peer (two devices, or one device from two addresses).
        let (one, two) = (hop(&mut w, 1), hop(&mut w, 2));
        assert_ne!(one, two, "one binding per client of the peer");
        assert_eq!(hop(&mut w, 1), one, "a refresh keeps its channel");
        // The agent's answers on each go back to the peer on that client's channel.
        for c in [one, two] {
            let (_, fwd) = w.send(PEER, data(c, b"\x01up"), &[]);
            let a = data_channel(&fwd).unwrap();
            let (out, back) = w.send(AGENT, data(a, b"\x02down"), &[]);
            assert_eq!(out, Out::Forward(PEER.parse().unwrap()));
            assert_eq!(data_channel(&back), Some(c));
        }
        // An endpoint cannot name a channel: its `via` is ignored.
        w.nonce += 1;
        let (out, _) = w.send(CLIENT, bind_frame(w.nonce, &dt, "site-a", Some(1)), &[]);
        assert!(matches!(out, Out::Send(..)));
        assert!(w
            .core
            .clients
            .contains_key(&(CLIENT.parse().unwrap(), name("site-a"), 0)));
    }

    #[test]
    fn a_bind_sent_on_names_the_clients_channel_here() {
        let mut w = World::new();
        let dt = w.device(&["site-a"]);
        let (c, via) = w.bind_through(PEER, &dt, 5);
        assert_eq!(via, Some(c));
    }
}
