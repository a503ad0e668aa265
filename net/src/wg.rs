//! WireGuard peers, sans-IO: one static key of ours, a set of peers keyed by their static
//! public keys, each a `boringtun::noise::Tunn`.
//!
//! ```text
//!  datagram ─► handle_datagram ─► Received::Packet{peer, src, packet}  (decrypted IP)
//!                   │                        or Received::Handled   (handshake, keepalive)
//!                   └─► poll_transmit: handshake answers, queued packets, cookie replies
//!  IP packet ─► encapsulate(peer, packet, out) ─► Sealed{len, path}    (written into `out`)
//!  now ─► handle_timeout ─► poll_transmit: retransmits, rekeys, keepalives
//! ```
//!
//! Which peer a datagram belongs to comes from the datagram itself, never from where it
//! came from: a handshake initiation is opened with our static key
//! (`parse_handshake_anon`) to learn the initiator's static key, every other message
//! names our session index. A path (relay address and channel) is remembered for a peer
//! only after one of its datagrams authenticated.
//!
//! # Clocks
//! boringtun reads the real monotonic clock inside `Tunn` (handshake ages, rekey and
//! keepalive timers, replay of handshake timestamps); it cannot be given ours. The `now`
//! passed here drives everything else: when [`Peers::handle_timeout`] ticks the tunnels
//! ([`Peers::poll_timeout`]), when the shared handshake rate limiter resets, and the
//! `last_received` instants in [`PeerStats`]. A test with a fake clock therefore controls
//! when timers are looked at, not when boringtun thinks they are due.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// The largest datagram looked at; anything longer is dropped and counted. The same cap as
/// the relay's, so one receive buffer of this size serves both.
pub const MAX_DATAGRAM: usize = warren_proto::relay::MAX_DATAGRAM;
/// Bytes WireGuard adds to an IP packet (header 16, tag 16).
pub const OVERHEAD: usize = 32;
/// The smallest `out` buffer [`Peers::encapsulate`] accepts, whatever the packet: a
/// handshake initiation (148 bytes) may be written instead of the packet.
pub const MIN_OUT: usize = 148;
/// How often the tunnels' timers are looked at (boringtun asks for about every 250 ms).
pub const TICK: Duration = Duration::from_millis(250);
/// Handshake initiations per second, across all peers, before the shared rate limiter
/// answers with cookies instead of doing the Diffie-Hellman.
pub const HANDSHAKES_PER_SECOND: u64 = 100;

/// A WireGuard static public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(pub [u8; 32]);

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerKey({self})")
    }
}

impl fmt::Display for PeerKey {
    /// The first 8 hex digits: enough to tell keys apart in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Our WireGuard static secret. Debug never prints it.
#[derive(Clone)]
pub struct SecretKey(StaticSecret);

impl SecretKey {
    /// A new random key (from the OS).
    pub fn generate() -> Self {
        let mut b = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
        Self::from_bytes(b)
    }

    /// A key from its 32 bytes (as stored).
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(StaticSecret::from(b))
    }

    /// The 32 bytes, to store (0600).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public key that goes with it.
    pub fn public_key(&self) -> PeerKey {
        PeerKey(PublicKey::from(&self.0).to_bytes())
    }

    /// The X25519 secret shared with `peer`; `None` for a key of low order (whose secret
    /// anyone could compute).
    pub(crate) fn shared(&self, peer: &PeerKey) -> Option<[u8; 32]> {
        let s = self.0.diffie_hellman(&PublicKey::from(peer.0));
        s.was_contributory().then(|| s.to_bytes())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public_key())
    }
}

/// Where a datagram came from or goes to: a UDP address and, when relayed, the relay
/// channel to put in the Data header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Path {
    /// The UDP address (a relay's, or the peer's own when direct).
    pub remote: SocketAddr,
    /// The relay channel; `None` when direct.
    pub channel: Option<u32>,
}

/// Which source addresses a peer's decrypted packets may carry (WireGuard's allowed IPs,
/// for what Warren needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sources {
    /// Any (the client's view of a site's agent: packets come from every resource).
    Any,
    /// Exactly this one (the agent's view of a device: its tunnel address).
    Only(IpAddr),
}

impl Sources {
    fn allows(self, src: IpAddr) -> bool {
        match self {
            Sources::Any => true,
            Sources::Only(ip) => ip == src,
        }
    }
}

/// A peer to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its static public key.
    pub key: PeerKey,
    /// The sources its packets may carry.
    pub sources: Sources,
    /// WireGuard persistent keepalive, seconds; `None` for none.
    pub keepalive: Option<u16>,
}

/// A peer's handle for the per-packet calls: our session index for it (24 bits), so the
/// data path finds it with one lookup. Stable while the peer is in the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(u32);

/// What a datagram was.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'b> {
    /// A decrypted IP packet from `peer`, in the caller's buffer.
    Packet {
        /// Who sent it.
        peer: PeerId,
        /// Its source address (checked against the peer's [`Sources`]).
        src: IpAddr,
        /// The IP packet.
        packet: &'b [u8],
    },
    /// A handshake message, cookie or keepalive: anything to answer is in
    /// [`Peers::poll_transmit`].
    Handled {
        /// Who it was from, when known.
        peer: Option<PeerId>,
    },
}

/// Why a datagram was dropped. Whoever sent it may be an attacker: it is counted, never
/// answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    /// Longer than [`MAX_DATAGRAM`] (the sender's doing).
    #[error("oversized datagram")]
    Oversized,
    /// Not a WireGuard message: wrong type, wrong length (the sender's doing).
    #[error("malformed datagram")]
    Malformed,
    /// A handshake initiation whose MAC1 is not for our key, or that does not open with
    /// our key (the sender does not know us).
    #[error("handshake not for us")]
    NotForUs,
    /// A handshake initiation from a static key that is not one of our peers.
    #[error("handshake from an unknown key")]
    UnknownKey,
    /// A message naming a session index we do not have (an old or removed peer, or
    /// garbage).
    #[error("unknown session")]
    UnknownSession,
    /// A data packet already received, or too old for the replay window.
    #[error("replayed packet")]
    Replayed,
    /// Does not authenticate (tampered, or a session that has ended).
    #[error("packet does not authenticate")]
    BadAuth,
    /// Decrypted, but its source address is not one the peer may use.
    #[error("spoofed source address")]
    Spoofed,
    /// Refused by the rate limiter while under load, with no address to send a cookie to.
    #[error("under load")]
    UnderLoad,
}

/// Why a packet could not be sealed (the caller's doing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// No such peer (removed).
    #[error("no such peer")]
    UnknownPeer,
    /// `out` is shorter than the packet plus [`OVERHEAD`], or than [`MIN_OUT`].
    #[error("output buffer too small: {need} bytes needed")]
    BufferTooSmall {
        /// The size it must have.
        need: usize,
    },
    /// boringtun could not write a handshake initiation.
    #[error("handshake initiation failed")]
    Handshake,
}

/// A sealed datagram in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// Bytes written at the start of `out`.
    pub len: usize,
    /// The peer's last authenticated path, if any.
    pub path: Option<Path>,
}

/// A datagram to send, made by the peers themselves (rare: handshakes, keepalives, cookie
/// replies, packets that waited for a handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The peer it is for; `None` for a cookie reply to an initiator not yet known.
    pub peer: Option<PeerId>,
    /// Where to send it: the path the datagram it answers came on, or the peer's last
    /// authenticated path. `None`: the caller decides (a client's relay to the site).
    pub path: Option<Path>,
    /// The WireGuard message.
    pub packet: Vec<u8>,
}

/// A peer's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStats {
    /// Its key.
    pub key: PeerKey,
    /// Time since the current session's handshake (boringtun's clock); `None` before one.
    pub handshake_age: Option<Duration>,
    /// IP bytes sent to it.
    pub tx_bytes: u64,
    /// IP bytes received from it.
    pub rx_bytes: u64,
    /// Where its last authenticated datagram came from.
    pub last_path: Option<Path>,
    /// When that was (our clock).
    pub last_received: Option<Instant>,
}

/// Dropped datagrams, by reason, over the life of the [`Peers`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropStats {
    /// [`DropReason::Oversized`].
    pub oversized: u64,
    /// [`DropReason::Malformed`].
    pub malformed: u64,
    /// [`DropReason::NotForUs`].
    pub not_for_us: u64,
    /// [`DropReason::UnknownKey`].
    pub unknown_key: u64,
    /// [`DropReason::UnknownSession`].
    pub unknown_session: u64,
    /// [`DropReason::Replayed`].
    pub replayed: u64,
    /// [`DropReason::BadAuth`].
    pub bad_auth: u64,
    /// [`DropReason::Spoofed`].
    pub spoofed: u64,
    /// [`DropReason::UnderLoad`].
    pub under_load: u64,
    /// Cookie replies sent under load (not drops; counted here with them).
    pub cookies_sent: u64,
}

impl DropStats {
    /// The counters by name (cookie replies excluded: they are not drops).
    pub fn by_reason(&self) -> [(&'static str, u64); 9] {
        [
            ("oversized", self.oversized),
            ("malformed", self.malformed),
            ("not_for_us", self.not_for_us),
            ("unknown_key", self.unknown_key),
            ("unknown_session", self.unknown_session),
            ("replayed", self.replayed),
            ("bad_auth", self.bad_auth),
            ("spoofed", self.spoofed),
            ("under_load", self.under_load),
        ]
    }

    fn count(&mut self, d: DropReason) {
        let c = match d {
            DropReason::Oversized => &mut self.oversized,
            DropReason::Malformed => &mut self.malformed,
            DropReason::NotForUs => &mut self.not_for_us,
            DropReason::UnknownKey => &mut self.unknown_key,
            DropReason::UnknownSession => &mut self.unknown_session,
            DropReason::Replayed => &mut self.replayed,
            DropReason::BadAuth => &mut self.bad_auth,
            DropReason::Spoofed => &mut self.spoofed,
            DropReason::UnderLoad => &mut self.under_load,
        };
        *c += 1;
    }

    /// Every drop, whatever the reason.
    pub fn total(&self) -> u64 {
        self.oversized
            + self.malformed
            + self.not_for_us
            + self.unknown_key
            + self.unknown_session
            + self.replayed
            + self.bad_auth
            + self.spoofed
            + self.under_load
    }
}

/// A set of WireGuard peers behind one static key.
///
/// # Calling order
/// 1. [`Peers::new`], then [`Peers::add_peer`] / [`Peers::set_peers`] as the set changes
///    (any time; a replaced peer keeps its session, a removed one stops decrypting at once).
/// 2. For each datagram received that is not a relay control frame: [`Peers::handle_datagram`]
///    with a buffer of at least [`MAX_DATAGRAM`] bytes; a [`Received::Packet`] borrows it.
/// 3. For each IP packet to send: [`Peers::encapsulate`] into `out` (leave room in front of
///    `out` for a relay header by passing a sub-slice: nothing is copied).
/// 4. When [`Peers::poll_timeout`] passes: [`Peers::handle_timeout`].
/// 5. After any of 2-4: drain [`Peers::poll_transmit`] and send each.
///
/// Never reads the clock itself, except inside boringtun (see the module page).
pub struct Peers {
    secret: StaticSecret,
    public: PublicKey,
    /// By our session index (`PeerId`): the data path's lookup.
    peers: HashMap<u32, Peer>,
    by_key: HashMap<PeerKey, u32>,
    next_index: u32,
    /// Checks MAC1 and load before the Diffie-Hellman that tells who an initiator is.
    limiter: Arc<RateLimiter>,
    limiter_reset: Option<Instant>,
    next_tick: Option<Instant>,
    transmits: VecDeque<Transmit>,
    drops: DropStats,
    scratch: Box<[u8; MAX_DATAGRAM]>,
}

struct Peer {
    key: PeerKey,
    tunn: Tunn,
    sources: Sources,
    keepalive: Option<u16>,
    last_path: Option<Path>,
    last_received: Option<Instant>,
}

impl Peers {
    /// An empty set with our static secret.
    pub fn new(secret: &SecretKey, _now: Instant) -> Self {
        let secret = secret.0.clone();
        let public = PublicKey::from(&secret);
        Self {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SECOND)),
            secret,
            public,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            next_index: rand::random::<u32>() & 0x00ff_ffff,
            limiter_reset: None,
            next_tick: None,
            transmits: VecDeque::new(),
            drops: DropStats::default(),
            scratch: Box::new([0; MAX_DATAGRAM]),
        }
    }

    /// Our public key.
    pub fn public_key(&self) -> PeerKey {
        PeerKey(self.public.to_bytes())
    }

    /// Adds a peer, or updates one with the same key (its session is kept unless its
    /// keepalive changed). Returns its id.
    pub fn add_peer(&mut self, config: PeerConfig, now: Instant) -> PeerId {
        if let Some(&index) = self.by_key.get(&config.key) {
            let peer = self.peers.get_mut(&index).expect("by_key and peers agree");
            peer.sources = config.sources;
            if peer.keepalive == config.keepalive {
                return PeerId(index);
            }
            self.remove_peer(&config.key);
        }
        let index = self.free_index();
        let tunn = Tunn::new(
            self.secret.clone(),
            PublicKey::from(config.key.0),
            None,
            config.keepalive,
            index,
            None,
        );
        self.peers.insert(
            index,
            Peer {
                key: config.key,
                tunn,
                sources: config.sources,
                keepalive: config.keepalive,
                last_path: None,
                last_received: None,
            },
        );
        self.by_key.insert(config.key, index);
        self.next_tick.get_or_insert(now + TICK);
        PeerId(index)
    }

    /// Removes a peer: its datagrams are dropped from now on. Whether it was there.
    pub fn remove_peer(&mut self, key: &PeerKey) -> bool {
        let Some(index) = self.by_key.remove(key) else {
            return false;
        };
        self.peers.remove(&index);
        self.transmits.retain(|t| t.peer != Some(PeerId(index)));
        true
    }

    /// Makes the set exactly `configs`: peers not in it are removed, the others added or
    /// updated as by [`Peers::add_peer`].
    pub fn set_peers(&mut self, configs: impl IntoIterator<Item = PeerConfig>, now: Instant) {
        let configs: Vec<PeerConfig> = configs.into_iter().collect();
        let gone: Vec<PeerKey> = self
            .by_key
            .keys()
            .filter(|k| !configs.iter().any(|c| c.key == **k))
            .copied()
            .collect();
        for key in gone {
            self.remove_peer(&key);
        }
        for c in configs {
            self.add_peer(c, now);
        }
    }

    /// The id of the peer with this key.
    pub fn id(&self, key: &PeerKey) -> Option<PeerId> {
        self.by_key.get(key).map(|&i| PeerId(i))
    }

    /// The key of the peer with this id.
    pub fn key(&self, peer: PeerId) -> Option<PeerKey> {
        self.peers.get(&peer.0).map(|p| p.key)
    }

    /// The sources the peer may use.
    pub fn sources(&self, peer: PeerId) -> Option<Sources> {
        self.peers.get(&peer.0).map(|p| p.sources)
    }

    /// How many peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Handles one received datagram. `buf` must hold [`MAX_DATAGRAM`] bytes; a decrypted
    /// packet is written at its start. Anything to send back goes to
    /// [`Peers::poll_transmit`]. A drop is counted in [`Peers::drops`].
    pub fn handle_datagram<'b>(
        &mut self,
        path: Path,
        datagram: &[u8],
        now: Instant,
        buf: &'b mut [u8],
    ) -> Result<Received<'b>, DropReason> {
        let r = self.handle_datagram_inner(path, datagram, now, buf);
        match r {
            Ok(Inner::Packet { peer, src, len }) => Ok(Received::Packet {
                peer,
                src,
                packet: &buf[..len],
            }),
            Ok(Inner::Handled { peer }) => Ok(Received::Handled { peer }),
            Err(d) => {
                self.drops.count(d);
                tracing::trace!(reason = %d, "wireguard datagram dropped");
                Err(d)
            }
        }
    }

    fn handle_datagram_inner(
        &mut self,
        path: Path,
        datagram: &[u8],
        now: Instant,
        buf: &mut [u8],
    ) -> Result<Inner, DropReason> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(DropReason::Oversized);
        }
        let packet = Tunn::parse_incoming_packet(datagram).map_err(|_| DropReason::Malformed)?;
        let index = match packet {
            Packet::HandshakeInit(ref init) => {
                // Also here, not only on the tick: with no peers there is no tick, and the
                // count must not grow forever.
                self.reset_limiter(now);
                let mut cookie = [0u8; 64];
                match self
                    .limiter
                    .verify_packet(Some(path.remote.ip()), datagram, &mut cookie)
                {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(reply)) => {
                        // Under load, a MAC1-valid initiation gets a cookie before we spend
                        // a Diffie-Hellman on it, as WireGuard specifies: MAC1 proves the
                        // sender knows our public key.
                        self.drops.cookies_sent += 1;
                        self.transmits.push_back(Transmit {
                            peer: None,
                            path: Some(path),
                            packet: reply.to_vec(),
                        });
                        return Ok(Inner::Handled { peer: None });
                    }
                    Err(TunnResult::Err(WireGuardError::UnderLoad)) => {
                        return Err(DropReason::UnderLoad)
                    }
                    Err(_) => return Err(DropReason::NotForUs),
                }
                let half = parse_handshake_anon(&self.secret, &self.public, init)
                    .map_err(|_| DropReason::NotForUs)?;
                *self
                    .by_key
                    .get(&PeerKey(half.peer_static_public))
                    .ok_or(DropReason::UnknownKey)?
            }
            Packet::HandshakeResponse(ref r) => r.receiver_idx >> 8,
            Packet::PacketCookieReply(ref c) => c.receiver_idx >> 8,
            Packet::PacketData(ref d) => d.receiver_idx >> 8,
        };
        let peer = self
            .peers
            .get_mut(&index)
            .ok_or(DropReason::UnknownSession)?;
        let id = PeerId(index);
        let (src, len) = match peer.tunn.decapsulate(Some(path.remote.ip()), datagram, buf) {
            TunnResult::WriteToTunnelV4(p, ip) => (IpAddr::V4(ip), p.len()),
            TunnResult::WriteToTunnelV6(p, ip) => (IpAddr::V6(ip), p.len()),
            TunnResult::Done => {
                peer.heard(path, now);
                return Ok(Inner::Handled { peer: Some(id) });
            }
            TunnResult::WriteToNetwork(p) => {
                peer.heard(path, now);
                self.transmits.push_back(Transmit {
                    peer: Some(id),
                    path: Some(path),
                    packet: p.to_vec(),
                });
                // Packets that waited for this handshake, per boringtun's contract.
                while let TunnResult::WriteToNetwork(p) =
                    peer.tunn.decapsulate(None, &[], &mut self.scratch[..])
                {
                    self.transmits.push_back(Transmit {
                        peer: Some(id),
                        path: Some(path),
                        packet: p.to_vec(),
                    });
                }
                return Ok(Inner::Handled { peer: Some(id) });
            }
            TunnResult::Err(e) => return Err(classify(e)),
        };
        if !peer.sources.allows(src) {
            return Err(DropReason::Spoofed);
        }
        peer.heard(path, now);
        Ok(Inner::Packet { peer: id, src, len })
    }

    /// Seals one IP packet for `peer` into `out` (at least `packet.len() + OVERHEAD` and
    /// [`MIN_OUT`] bytes). With no session yet, boringtun keeps the packet and a handshake
    /// initiation is written instead (it is sent after the handshake); `Ok(None)` when
    /// there is nothing to send now (a handshake is already under way).
    pub fn encapsulate(
        &mut self,
        peer: PeerId,
        packet: &[u8],
        out: &mut [u8],
    ) -> Result<Option<Sealed>, SealError> {
        let need = (packet.len() + OVERHEAD).max(MIN_OUT);
        if out.len() < need {
            return Err(SealError::BufferTooSmall { need });
        }
        let peer = self.peers.get_mut(&peer.0).ok_or(SealError::UnknownPeer)?;
        match peer.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(p) => Ok(Some(Sealed {
                len: p.len(),
                path: peer.last_path,
            })),
            TunnResult::Done => Ok(None),
            _ => Err(SealError::Handshake),
        }
    }

    /// Starts a new handshake with `peer` now, even if one is under way (after a path
    /// change, so the first packet need not wait for a retransmission). The initiation is
    /// in [`Peers::poll_transmit`].
    pub fn rekey(&mut self, peer: PeerId) -> Result<(), SealError> {
        let p = self.peers.get_mut(&peer.0).ok_or(SealError::UnknownPeer)?;
        match p
            .tunn
            .format_handshake_initiation(&mut self.scratch[..], true)
        {
            TunnResult::WriteToNetwork(b) => {
                self.transmits.push_back(Transmit {
                    peer: Some(peer),
                    path: p.last_path,
                    packet: b.to_vec(),
                });
                Ok(())
            }
            _ => Err(SealError::Handshake),
        }
    }

    /// Looks at every tunnel's timers when [`Peers::poll_timeout`] has passed: handshake
    /// retransmissions, rekeys, keepalives go to [`Peers::poll_transmit`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.reset_limiter(now);
        if self.next_tick.is_some_and(|t| now < t) {
            return;
        }
        for (&index, peer) in &mut self.peers {
            match peer.tunn.update_timers(&mut self.scratch[..]) {
                TunnResult::WriteToNetwork(p) => self.transmits.push_back(Transmit {
                    peer: Some(PeerId(index)),
                    path: peer.last_path,
                    packet: p.to_vec(),
                }),
                TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
                TunnResult::Err(e) => {
                    tracing::trace!(peer = %peer.key, error = ?e, "wireguard timers")
                }
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
        self.next_tick = (!self.peers.is_empty()).then_some(now + TICK);
    }

    /// When to call [`Peers::handle_timeout`] next; `None` with no peers.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// A peer's numbers.
    pub fn stats(&self, peer: PeerId) -> Option<PeerStats> {
        self.peers.get(&peer.0).map(Peer::stats)
    }

    /// Every peer's numbers.
    pub fn all_stats(&self) -> impl Iterator<Item = (PeerId, PeerStats)> + '_ {
        self.peers.iter().map(|(&i, p)| (PeerId(i), p.stats()))
    }

    /// Datagrams dropped so far, by reason.
    pub fn drops(&self) -> DropStats {
        self.drops
    }

    /// The shared rate limiter counts handshakes per second of our clock.
    fn reset_limiter(&mut self, now: Instant) {
        if self.limiter_reset.is_none_or(|t| now >= t) {
            self.limiter.reset_count();
            self.limiter_reset = Some(now + Duration::from_secs(1));
        }
    }

    fn free_index(&mut self) -> u32 {
        loop {
            let i = self.next_index;
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if !self.peers.contains_key(&i) {
                return i;
            }
        }
    }
}

impl fmt::Debug for Peers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peers")
            .field("public", &self.public_key())
            .field("peers", &self.peers.len())
            .field("drops", &self.drops)
            .finish_non_exhaustive()
    }
}

enum Inner {
    Packet {
        peer: PeerId,
        src: IpAddr,
        len: usize,
    },
    Handled {
        peer: Option<PeerId>,
    },
}

impl Peer {
    fn heard(&mut self, path: Path, now: Instant) {
        self.last_path = Some(path);
        self.last_received = Some(now);
    }

    fn stats(&self) -> PeerStats {
        let (handshake_age, tx, rx, _, _) = self.tunn.stats();
        PeerStats {
            key: self.key,
            handshake_age,
            tx_bytes: tx as u64,
            rx_bytes: rx as u64,
            last_path: self.last_path,
            last_received: self.last_received,
        }
    }
}

fn classify(e: WireGuardError) -> DropReason {
    match e {
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => DropReason::Replayed,
        WireGuardError::InvalidAeadTag
        | WireGuardError::InvalidMac
        | WireGuardError::WrongKey
        | WireGuardError::InvalidTai64nTimestamp
        | WireGuardError::WrongTai64nTimestamp => DropReason::BadAuth,
        WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => DropReason::UnknownSession,
        WireGuardError::UnderLoad => DropReason::UnderLoad,
        _ => DropReason::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    const TARGET_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);

    fn path(port: u16) -> Path {
        Path {
            remote: SocketAddr::from(([192, 0, 2, 1], port)),
            channel: Some(u32::from(port)),
        }
    }

    /// A minimal IPv4 packet (boringtun checks version, length and source only).
    fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let len = 20 + payload.len();
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[20..].copy_from_slice(payload);
        p
    }

    /// A client (one peer: the agent) and an agent (one peer: the device), datagrams
    /// passed by hand.
    struct Pair {
        client: Peers,
        agent: Peers,
        agent_id: PeerId,
        device_id: PeerId,
        device_key: PeerKey,
        now: Instant,
    }

    impl Pair {
        fn new() -> Self {
            let now = Instant::now();
            let ck = SecretKey::generate();
            let ak = SecretKey::generate();
            let mut client = Peers::new(&ck, now);
            let mut agent = Peers::new(&ak, now);
            let agent_id = client.add_peer(
                PeerConfig {
                    key: ak.public_key(),
                    sources: Sources::Any,
                    keepalive: None,
                },
                now,
            );
            let device_id = agent.add_peer(
                PeerConfig {
                    key: ck.public_key(),
                    sources: Sources::Only(CLIENT_IP.into()),
                    keepalive: None,
                },
                now,
            );
            Pair {
                client,
                agent,
                agent_id,
                device_id,
                device_key: ck.public_key(),
                now,
            }
        }

        /// Client seals a packet to the agent: the datagram.
        fn seal_to_agent(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
            let mut out = [0u8; MAX_DATAGRAM];
            self.client
                .encapsulate(self.agent_id, packet, &mut out)
                .unwrap()
                .map(|s| out[..s.len].to_vec())
        }

        fn seal_to_client(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
            let mut out = [0u8; MAX_DATAGRAM];
            self.agent
                .encapsulate(self.device_id, packet, &mut out)
                .unwrap()
                .map(|s| out[..s.len].to_vec())
        }

        /// Delivers to the agent; the decrypted packet if any.
        fn deliver_to_agent(&mut self, d: &[u8]) -> Result<Option<Vec<u8>>, DropReason> {
            let mut buf = [0u8; MAX_DATAGRAM];
            Ok(
                match self.agent.handle_datagram(path(1), d, self.now, &mut buf)? {
                    Received::Packet { peer, packet, .. } => {
                        assert_eq!(peer, self.device_id);
                        Some(packet.to_vec())
                    }
                    Received::Handled { .. } => None,
                },
            )
        }

        fn deliver_to_client(&mut self, d: &[u8]) -> Result<Option<Vec<u8>>, DropReason> {
            let mut buf = [0u8; MAX_DATAGRAM];
            Ok(
                match self
                    .client
                    .handle_datagram(path(2), d, self.now, &mut buf)?
                {
                    Received::Packet { peer, packet, .. } => {
                        assert_eq!(peer, self.agent_id);
                        Some(packet.to_vec())
                    }
                    Received::Handled { .. } => None,
                },
            )
        }

        /// Passes transmits both ways until both are quiet; decrypted packets collected.
        fn pump(&mut self) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
            let (mut at_agent, mut at_client) = (vec![], vec![]);
            loop {
                let mut moved = false;
                while let Some(t) = self.client.poll_transmit() {
                    moved = true;
                    at_agent.extend(self.deliver_to_agent(&t.packet).unwrap());
                }
                while let Some(t) = self.agent.poll_transmit() {
                    moved = true;
                    assert_eq!(t.path, Some(path(1)), "answers go where we heard the peer");
                    at_client.extend(self.deliver_to_client(&t.packet).unwrap());
                }
                if !moved {
                    return (at_agent, at_client);
                }
            }
        }

        /// Handshake with a first packet: returns once it arrived.
        fn connect(&mut self) {
            let first = ipv4(CLIENT_IP, TARGET_IP, b"first");
            let init = self.seal_to_agent(&first).expect("an initiation");
            assert!(self.deliver_to_agent(&init).unwrap().is_none());
            let (at_agent, _) = self.pump();
            assert_eq!(
                at_agent,
                vec![first],
                "the queued packet follows the handshake"
            );
        }
    }

    #[test]
    fn handshake_then_data_both_ways() {
        let mut p = Pair::new();
        p.connect();
        let up = ipv4(CLIENT_IP, TARGET_IP, b"hello agent");
        let d = p.seal_to_agent(&up).unwrap();
        assert_eq!(p.deliver_to_agent(&d).unwrap(), Some(up.clone()));
        let down = ipv4(TARGET_IP, CLIENT_IP, b"hello client");
        let d = p.seal_to_client(&down).unwrap();
        assert_eq!(p.deliver_to_client(&d).unwrap(), Some(down.clone()));

        let s = p.agent.stats(p.device_id).unwrap();
        assert_eq!(s.key, p.device_key);
        assert!(s.handshake_age.is_some());
        assert_eq!(s.last_path, Some(path(1)));
        assert_eq!(s.rx_bytes as usize, 2 * 20 + 5 + 11);
        assert_eq!(s.tx_bytes as usize, down.len());
        assert_eq!(p.agent.drops().total(), 0);
        assert_eq!(p.client.drops().total(), 0);
    }

    #[test]
    fn an_unknown_key_gets_no_answer_at_all() {
        let mut p = Pair::new();
        let stranger = SecretKey::generate();
        let mut s = Peers::new(&stranger, p.now);
        let id = s.add_peer(
            PeerConfig {
                key: p.agent.public_key(),
                sources: Sources::Any,
                keepalive: None,
            },
            p.now,
        );
        let mut out = [0u8; MAX_DATAGRAM];
        let sealed = s
            .encapsulate(id, &ipv4(CLIENT_IP, TARGET_IP, b"x"), &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(
            p.deliver_to_agent(&out[..sealed.len]),
            Err(DropReason::UnknownKey)
        );
        assert_eq!(p.agent.poll_transmit(), None);
        assert_eq!(p.agent.drops().unknown_key, 1);

        // An initiation for someone else's key does not even get that far.
        let other = SecretKey::generate();
        let mut s = Peers::new(&stranger, p.now);
        let id = s.add_peer(
            PeerConfig {
                key: other.public_key(),
                sources: Sources::Any,
                keepalive: None,
            },
            p.now,
        );
        let sealed = s.encapsulate(id, &[], &mut out).unwrap().unwrap();
        assert_eq!(
            p.deliver_to_agent(&out[..sealed.len]),
            Err(DropReason::NotForUs)
        );
        assert_eq!(p.agent.poll_transmit(), None);
    }

    #[test]
    fn a_replayed_data_packet_is_dropped() {
        let mut p = Pair::new();
        p.connect();
        let up = ipv4(CLIENT_IP, TARGET_IP, b"once");
        let d = p.seal_to_agent(&up).unwrap();
        assert_eq!(p.deliver_to_agent(&d).unwrap(), Some(up));
        assert_eq!(p.deliver_to_agent(&d), Err(DropReason::Replayed));
        assert_eq!(p.agent.drops().replayed, 1);
        // The replayed handshake initiation is refused too (its timestamp is old).
        let mut p = Pair::new();
        let init = p.seal_to_agent(&[]).unwrap();
        p.deliver_to_agent(&init).unwrap();
        p.pump();
        assert_eq!(p.deliver_to_agent(&init), Err(DropReason::BadAuth));
    }

    #[test]
    fn garbage_truncated_and_oversized_datagrams_are_counted() {
        let mut p = Pair::new();
        p.connect();
        let up = ipv4(CLIENT_IP, TARGET_IP, b"payload");
        let d = p.seal_to_agent(&up).unwrap();

        assert_eq!(p.deliver_to_agent(&[]), Err(DropReason::Malformed));
        assert_eq!(
            p.deliver_to_agent(&[9, 9, 9, 9, 9]),
            Err(DropReason::Malformed)
        );
        assert_eq!(p.deliver_to_agent(&d[..20]), Err(DropReason::Malformed));
        let mut tampered = d.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(p.deliver_to_agent(&tampered), Err(DropReason::BadAuth));
        let mut wrong_index = d.clone();
        wrong_index[4..8].copy_from_slice(&0xffff_ff00u32.to_le_bytes());
        assert_eq!(
            p.deliver_to_agent(&wrong_index),
            Err(DropReason::UnknownSession)
        );
        let mut big = d.clone();
        big.resize(MAX_DATAGRAM + 1, 0);
        assert_eq!(p.deliver_to_agent(&big), Err(DropReason::Oversized));
        // Random bytes with each message type: errors, never panics, never answers.
        let mut seed = 0x9e37_79b9_u64;
        for i in 0..5000u64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = [148, 92, 64, 32, 48, (seed % 200) as usize][(i % 6) as usize];
            let mut b: Vec<u8> = (0..len).map(|j| (seed >> (j % 8 * 8)) as u8).collect();
            if len >= 4 {
                b[..4].copy_from_slice(&(1 + (i % 4) as u32).to_le_bytes());
            }
            assert!(p.deliver_to_agent(&b).is_err());
        }
        assert_eq!(p.agent.poll_transmit(), None);
        let drops = p.agent.drops();
        assert_eq!(drops.oversized, 1);
        assert!(drops.malformed >= 3 && drops.bad_auth >= 1);
        // The real packet still goes through.
        assert_eq!(p.deliver_to_agent(&d).unwrap(), Some(up));
    }

    #[test]
    fn a_spoofed_source_is_dropped() {
        let mut p = Pair::new();
        p.connect();
        let spoofed = ipv4(Ipv4Addr::new(100, 64, 0, 9), TARGET_IP, b"not me");
        let d = p.seal_to_agent(&spoofed).unwrap();
        assert_eq!(p.deliver_to_agent(&d), Err(DropReason::Spoofed));
        assert_eq!(p.agent.drops().spoofed, 1);
    }

    #[test]
    fn a_removed_peer_stops_decrypting_at_once() {
        let mut p = Pair::new();
        p.connect();
        let up = ipv4(CLIENT_IP, TARGET_IP, b"before");
        let d1 = p.seal_to_agent(&up).unwrap();
        let d2 = p.seal_to_agent(&up).unwrap();
        assert_eq!(p.deliver_to_agent(&d1).unwrap(), Some(up.clone()));
        assert!(p.agent.remove_peer(&p.device_key));
        assert_eq!(p.deliver_to_agent(&d2), Err(DropReason::UnknownSession));
        // And a new handshake from it is refused as an unknown key.
        p.client.rekey(p.agent_id).unwrap();
        let init = p.client.poll_transmit().unwrap();
        assert_eq!(
            p.deliver_to_agent(&init.packet),
            Err(DropReason::UnknownKey)
        );
        assert_eq!(p.agent.poll_transmit(), None);
        // set_peers with the device again: a fresh session works.
        p.agent.set_peers(
            [PeerConfig {
                key: p.device_key,
                sources: Sources::Only(CLIENT_IP.into()),
                keepalive: None,
            }],
            p.now,
        );
        p.device_id = p.agent.id(&p.device_key).unwrap();
        p.client.rekey(p.agent_id).unwrap();
        p.pump();
        let d = p.seal_to_agent(&up).unwrap();
        assert_eq!(p.deliver_to_agent(&d).unwrap(), Some(up));
    }

    #[test]
    fn a_replaced_peer_keeps_its_session() {
        let mut p = Pair::new();
        p.connect();
        let id = p.agent.add_peer(
            PeerConfig {
                key: p.device_key,
                sources: Sources::Only(CLIENT_IP.into()),
                keepalive: None,
            },
            p.now,
        );
        assert_eq!(id, p.device_id);
        let up = ipv4(CLIENT_IP, TARGET_IP, b"still here");
        let d = p.seal_to_agent(&up).unwrap();
        assert_eq!(p.deliver_to_agent(&d).unwrap(), Some(up));
    }

    #[test]
    fn a_rekey_switches_sessions_without_losing_packets_in_flight() {
        let mut p = Pair::new();
        p.connect();
        let up = ipv4(CLIENT_IP, TARGET_IP, b"in flight");
        let in_flight = p.seal_to_agent(&up).unwrap();
        p.client.rekey(p.agent_id).unwrap();
        p.pump();
        // Sealed under the old session, arriving after the new one: still decrypts.
        assert_eq!(p.deliver_to_agent(&in_flight).unwrap(), Some(up.clone()));
        let d = p.seal_to_agent(&up).unwrap();
        assert_ne!(d[4..8], in_flight[4..8], "a new receiver index");
        assert_eq!(p.deliver_to_agent(&d).unwrap(), Some(up));
        let down = ipv4(TARGET_IP, CLIENT_IP, b"back");
        let d = p.seal_to_client(&down).unwrap();
        assert_eq!(p.deliver_to_client(&d).unwrap(), Some(down));
    }

    #[test]
    fn timers_are_looked_at_on_our_clock() {
        let mut p = Pair::new();
        assert_eq!(p.client.poll_timeout(), Some(p.now + TICK));
        // Before the tick: nothing looked at.
        p.client.handle_timeout(p.now);
        assert_eq!(p.client.poll_timeout(), Some(p.now + TICK));
        p.client.handle_timeout(p.now + TICK);
        assert_eq!(p.client.poll_timeout(), Some(p.now + 2 * TICK));
        p.client.remove_peer(&p.agent.public_key());
        p.client.handle_timeout(p.now + 2 * TICK);
        assert_eq!(p.client.poll_timeout(), None);
    }

    /// boringtun's own timers read the real clock: a lost initiation is sent again after
    /// REKEY_TIMEOUT (5 s) of real time, when our tick looks.
    #[test]
    fn a_lost_initiation_is_retransmitted_after_the_rekey_timeout() {
        let mut p = Pair::new();
        let lost = p.seal_to_agent(&ipv4(CLIENT_IP, TARGET_IP, b"x")).unwrap();
        drop(lost);
        let mut now = p.now;
        let start = Instant::now();
        let retransmit = loop {
            now += TICK;
            p.client.handle_timeout(now);
            if let Some(t) = p.client.poll_transmit() {
                break t;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no retransmission"
            );
            std::thread::sleep(TICK);
        };
        assert_eq!(retransmit.peer, Some(p.agent_id));
        p.deliver_to_agent(&retransmit.packet).unwrap();
        let (at_agent, _) = p.pump();
        assert_eq!(at_agent.len(), 1, "the queued packet arrives");
    }
}
