//! Direct paths between a client and a site's agent, sans-IO: candidates, the rendezvous
//! through the coordinator ([`warren_proto::coordinator`]), authenticated probes, the
//! choice of path, keepalives and the fall back to the relay.
//!
//! ```text
//!  client (Controlling)                    coordinator                agent (Controlled)
//!   relay bound ─► Call{round Rc, cands} ────► ───────────────────────► answer: new round Ra
//!                                          ◄── Answer{Ra, answers Rc, cands} ◄──
//!   Go{agent's offer} ◄──────────────────── both at once ─────────────► Go{client's offer}
//!   probe every agent candidate,                                       probe every client
//!   every 200 ms for 5 s ───────── Probe{round Ra, tx} ──────────────►  candidate the same
//!   first ack: traffic moves there ◄──── ProbeAck{tx} (from where the probe landed)
//!   heartbeat every 500 ms; 3 unanswered ─► back to the relay; a new round after a backoff
//!   (5 s, doubling to 60 s; 5 s again after a path held 30 s)
//! ```
//!
//! Every rendezvous message may be lost. A client with no Go sends its Call again each
//! second (3 times a round); so does a client that has its Go but has heard nothing from
//! the agent a second later (the agent's Go may be the one lost, and an agent behind a
//! filtering NAT that never probes is never reached). The agent answers a Call it has
//! answered with the same Answer, and the coordinator sends both Gos again.
//!
//! The client decides (it is the controlling side); the agent answers probes, probes back
//! while a round runs (so its own NAT opens towards the client), and otherwise sends
//! WireGuard wherever the client's packets last came from: a path change needs no message.
//! While the client's probes reach it, the agent also probes the client candidates that
//! answered it in the round every [`AGENT_KEEPALIVE`]: behind a NAT that maps per
//! destination, the address the client sends to is the agent's mapping towards one of
//! them, which only the agent's own traffic there keeps open (the simulation's NAT
//! refreshes by outbound traffic only, and found a path dying after 30 s without this).
//!
//! # Authentication
//! Every offer, probe and ack carries a tag: BLAKE2s-MAC (16 bytes) keyed by BLAKE2s over
//! the X25519 secret of the two WireGuard keys, so only the holder of either key makes
//! one, and the relays that carry offers cannot forge them. A probe must carry the
//! receiver's current (or previous) round, and its transaction number is accepted once: a
//! recorded probe played again later, or in the same round, is counted and ignored. An
//! ack is accepted only for a transaction outstanding to the IP it came from (the port
//! may differ: a NAT that maps per destination answers from a new one), once.
//!
//! # Path MTU
//! Probes and acks are padded to [`PROBE_SIZE`], the largest datagram WireGuard sends
//! directly: a path that would drop full-size data (a small MTU whose ICMP is filtered)
//! never answers a probe, so it is never chosen, instead of stalling silently.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{Digest as _, Mac as _};
use blake2::{Blake2s256, Blake2sMac};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use warren_proto::relay::{Frame, Offer, PunchKind, INNER_MTU, MAX_CANDIDATES, TAG_LEN};

use crate::wg::{PeerKey, SecretKey};

/// The size of every probe and ack: the largest WireGuard datagram sent direct (the inner
/// MTU plus WireGuard's 32 bytes).
pub const PROBE_SIZE: usize = INNER_MTU + 32;
/// How often each candidate is probed while a round runs.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// How long a round probes after Go.
pub const PUNCH_WINDOW: Duration = Duration::from_secs(5);
/// How long to wait for the Go after a Call before sending it again...
pub const CALL_RETRY: Duration = Duration::from_secs(1);
/// ...and how many times it is sent per round.
pub const CALL_ATTEMPTS: u32 = 3;
/// How often the path in use is probed (the keepalive of its NAT mappings, too).
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// Heartbeats in a row without an ack after which the path is given up.
pub const MISSED_HEARTBEATS: u32 = 3;
/// The first wait before another round after one found nothing or a path died; doubled
/// up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_secs(5);
/// The longest wait between rounds.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often an agent that the client reaches directly probes the client candidates that
/// answered it in the last round: the NAT mappings the client sends to are the agent's
/// towards those candidates, and a NAT may refresh a mapping only by what goes out of it.
pub const AGENT_KEEPALIVE: Duration = Duration::from_secs(2);
/// How long after the client's last probe the agent still keeps those mappings.
pub const KEEPALIVE_HOLD: Duration = Duration::from_secs(3);
/// A direct path that held this long resets the backoff.
pub const STABLE: Duration = Duration::from_secs(30);
/// Another candidate replaces the one in use only if its RTT is below this fraction...
pub const UPGRADE_RATIO: f64 = 0.7;
/// Transactions remembered (outstanding probes; seen probes).
const MAX_TX: usize = 1024;
/// How long a probe's transaction is remembered as seen.
const SEEN_FOR: Duration = Duration::from_secs(30);
/// Call rounds an agent remembers (to tell a replayed Call).
const MAX_CALLS: usize = 16;

/// A deliberate defect of the probe scheduler, for the simulation's planted-bug control
/// (a checker that passes with it planted checks nothing). Never set in the product.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// None: the real scheduler.
    #[default]
    None,
    /// The agent answers probes but never probes back during a round (its NAT then
    /// never opens towards the client).
    ControlledNeverProbes,
    /// The client stops heartbeating once direct (a dead path is never noticed).
    NoHeartbeat,
}

/// Which end of the pairing this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The client: calls, chooses the path, heartbeats.
    Controlling,
    /// The agent: answers, probes back during a round, follows the client.
    Controlled,
}

/// The MAC key of a pairing. Debug never prints it.
#[derive(Clone)]
pub struct PairKey([u8; 32]);

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairKey(..)")
    }
}

impl PairKey {
    /// The key between our secret and `peer`; `None` if `peer` is a low-order key.
    pub fn new(secret: &SecretKey, peer: &PeerKey) -> Option<Self> {
        let shared = secret.shared(peer)?;
        let me = secret.public_key();
        let (a, b) = if me.0 <= peer.0 {
            (me.0, peer.0)
        } else {
            (peer.0, me.0)
        };
        let mut h = Blake2s256::new();
        h.update(b"warren direct paths v1");
        h.update(shared);
        h.update(a);
        h.update(b);
        Some(Self(h.finalize().into()))
    }

    fn tag(&self, msg: &[u8]) -> [u8; TAG_LEN] {
        let mut m = <Blake2sMac<U16> as blake2::digest::KeyInit>::new_from_slice(&self.0)
            .expect("32-byte key");
        m.update(msg);
        m.finalize().into_bytes().into()
    }

    fn verify(&self, msg: &[u8], tag: &[u8; TAG_LEN]) -> bool {
        let mut m = <Blake2sMac<U16> as blake2::digest::KeyInit>::new_from_slice(&self.0)
            .expect("32-byte key");
        m.update(msg);
        m.verify_slice(tag).is_ok()
    }
}

/// What the shell must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectTransmit {
    /// A probe or ack, straight to this address on the WireGuard socket.
    Direct {
        /// Where.
        to: SocketAddr,
        /// The datagram ([`PROBE_SIZE`] bytes).
        datagram: Vec<u8>,
    },
    /// A Punch for the coordinator, on the relay path of this peer (the shell wraps it
    /// in a [`Frame::Punch`] with the path's channel).
    Punch {
        /// Call or Answer.
        kind: PunchKind,
        /// The encoded offer.
        body: Vec<u8>,
    },
}

/// What changed, for the shell and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectEvent {
    /// Traffic goes straight to `addr` from now on.
    Direct {
        /// The peer's address.
        addr: SocketAddr,
        /// The probe's round trip.
        rtt: Duration,
    },
    /// Traffic goes back to the relay.
    Relayed {
        /// Why.
        reason: &'static str,
    },
}

/// Counters of one pairing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectStats {
    /// Rounds started (Calls made, or Calls answered).
    pub rounds: u64,
    /// Probes sent (heartbeats included).
    pub probes_sent: u64,
    /// Acks accepted.
    pub acks: u64,
    /// Probes, acks or offers whose tag did not verify (or not from the peer): ignored.
    pub forged: u64,
    /// Probes or acks seen before, of a round gone, or answering nothing sent: ignored.
    pub replayed: u64,
    /// Times a direct path was taken.
    pub upgrades: u64,
    /// Times traffic went back to the relay.
    pub fallbacks: u64,
}

/// What one pairing is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectStatus {
    /// The direct path in use, if any.
    pub direct: Option<SocketAddr>,
    /// Its RTT (smoothed).
    pub rtt: Option<Duration>,
    /// Our candidates.
    pub local: Vec<SocketAddr>,
    /// The peer's (offered, observed by a relay, and seen probing us).
    pub remote: Vec<SocketAddr>,
    /// "direct", "probing", "calling", "relayed".
    pub state: &'static str,
    /// When the next round starts, while relayed.
    pub next_round_in: Option<Duration>,
    /// The counters.
    pub stats: DirectStats,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for the relay path, or for the next round.
    Idle { next: Option<Instant> },
    /// A Call sent, no Go yet.
    Calling { attempts: u32, resend: Instant },
    /// Probing until `until`. A client that has heard nothing from the agent by `recall`
    /// sends its Call again (the agent's Go may have been lost: it would never probe);
    /// `calls` counts the Calls of this round.
    Probing {
        until: Instant,
        next: Instant,
        recall: Option<(u32, Instant)>,
    },
}

#[derive(Debug, Clone, Copy)]
struct Best {
    addr: SocketAddr,
    rtt: Duration,
    last_ack: Instant,
    since: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Outstanding {
    tx: u64,
    to: SocketAddr,
    sent: Instant,
}

/// The direct path logic of one client↔agent pairing. See the module documentation.
///
/// # Calling order
/// - [`Direct::set_local`] when our candidates change (a new network recovers this way);
///   [`Direct::relay_ready`] once the relay path to the peer is bound (client).
/// - Each Punch received from the relay: [`Direct::handle_punch`]; each Probe or ProbeAck
///   from the peer's key: [`Direct::handle_probe`], [`Direct::handle_ack`].
/// - When [`Direct::poll_timeout`] passes: [`Direct::handle_timeout`].
/// - After any call: drain [`Direct::poll_transmit`] and [`Direct::poll_event`];
///   [`Direct::path`] is where WireGuard goes (the relay when `None`).
#[derive(Debug)]
pub struct Direct {
    role: Role,
    me: [u8; 32],
    peer: PeerKey,
    key: PairKey,
    rng: StdRng,
    round: u64,
    prev_round: u64,
    peer_round: Option<u64>,
    local: Vec<SocketAddr>,
    remote: Vec<SocketAddr>,
    phase: Phase,
    best: Option<Best>,
    next_heartbeat: Option<Instant>,
    missed: u32,
    backoff: Duration,
    relay_ready: bool,
    outstanding: VecDeque<Outstanding>,
    seen: HashSet<u64>,
    seen_order: VecDeque<(u64, Instant)>,
    calls_answered: VecDeque<u64>,
    /// The Call body sent this round (resent as is).
    call: Option<Vec<u8>>,
    /// Agent: the last Answer made, for the Call it answers (sent again if that Call
    /// comes again).
    last_answer: Option<(u64, Vec<u8>)>,
    out: VecDeque<DirectTransmit>,
    events: VecDeque<DirectEvent>,
    stats: DirectStats,
    fault: Fault,
    /// Agent: the client candidates its probes were answered from this round...
    keep: Vec<SocketAddr>,
    /// ...the last probe from the client, and when to probe them next.
    heard_direct: Option<Instant>,
    next_keepalive: Option<Instant>,
}

/// Why a Punch, probe or ack was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// The tag did not verify, or it is not from the peer.
    Forged,
    /// Seen before, stale, or answering nothing.
    Replayed,
    /// Not what this role takes (a Go for an agent with no Call, a Call for a client).
    Unexpected,
}

impl Direct {
    /// A pairing with `peer`; `None` if `peer` is a low-order key. `seed` makes rounds and
    /// transactions (the simulation passes its own; the shell a random one).
    pub fn new(role: Role, secret: &SecretKey, peer: PeerKey, seed: u64) -> Option<Self> {
        let key = PairKey::new(secret, &peer)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let round = rng.gen();
        Some(Self {
            role,
            me: secret.public_key().0,
            peer,
            key,
            rng,
            round,
            prev_round: round,
            peer_round: None,
            local: Vec::new(),
            remote: Vec::new(),
            phase: Phase::Idle { next: None },
            best: None,
            next_heartbeat: None,
            missed: 0,
            backoff: BACKOFF_MIN,
            relay_ready: false,
            outstanding: VecDeque::new(),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            calls_answered: VecDeque::new(),
            call: None,
            last_answer: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            stats: DirectStats::default(),
            fault: Fault::None,
            keep: Vec::new(),
            heard_direct: None,
            next_keepalive: None,
        })
    }

    /// Plants a defect (the simulation's control; see [`Fault`]).
    #[doc(hidden)]
    pub fn plant(&mut self, fault: Fault) {
        self.fault = fault;
    }

    /// The peer.
    pub fn peer(&self) -> PeerKey {
        self.peer
    }

    /// Where WireGuard packets to the peer go: this address directly, or the relay.
    pub fn path(&self) -> Option<SocketAddr> {
        self.best.map(|b| b.addr)
    }

    /// Our candidates (host addresses with the socket's port, reflexive addresses the
    /// relays saw). A change starts a new round at once (client): a new network
    /// recovers without waiting for the backoff.
    pub fn set_local(&mut self, mut candidates: Vec<SocketAddr>, now: Instant) {
        candidates.sort();
        candidates.dedup();
        candidates.truncate(MAX_CANDIDATES);
        if candidates == self.local {
            return;
        }
        let first = self.local.is_empty();
        self.local = candidates;
        if self.role == Role::Controlling && !first {
            self.backoff = BACKOFF_MIN;
            if !matches!(self.phase, Phase::Calling { .. }) {
                self.phase = Phase::Idle { next: Some(now) };
            }
        }
    }

    /// The relay path to the peer is bound: a Call can go (client). Idempotent.
    pub fn relay_ready(&mut self, now: Instant) {
        if self.relay_ready || self.role != Role::Controlling {
            return;
        }
        self.relay_ready = true;
        if let Phase::Idle { next: None } = self.phase {
            self.phase = Phase::Idle { next: Some(now) };
        }
    }

    /// The relay path is gone (client): no Call until it is back.
    pub fn relay_lost(&mut self) {
        self.relay_ready = false;
    }

    /// Starts a round now (client), whatever the backoff says.
    pub fn punch_now(&mut self, now: Instant) {
        if self.role == Role::Controlling && !matches!(self.phase, Phase::Calling { .. }) {
            self.phase = Phase::Idle { next: Some(now) };
        }
    }

    fn offer(&self, answers: u64) -> Vec<u8> {
        let mut o = Offer {
            from: self.me,
            round: self.round,
            answers,
            candidates: self.local.clone(),
            tag: [0; TAG_LEN],
        };
        let mut msg = vec![b'O'];
        o.encode_untagged(&mut msg);
        o.tag = self.key.tag(&msg);
        o.encode()
    }

    fn open(&mut self, body: &[u8]) -> Result<Offer, Ignored> {
        let o = Offer::decode(body).ok_or(Ignored::Forged)?;
        let mut msg = vec![b'O'];
        o.encode_untagged(&mut msg);
        if o.from != self.peer.0 || !self.key.verify(&msg, &o.tag) {
            self.stats.forged += 1;
            return Err(Ignored::Forged);
        }
        Ok(o)
    }

    fn new_round(&mut self) {
        self.prev_round = self.round;
        self.round = self.rng.gen();
        self.stats.rounds += 1;
    }

    fn learn_remote(&mut self, offer: &Offer, observed: Option<SocketAddr>) {
        self.remote.clear();
        for c in offer.candidates.iter().chain(observed.iter()) {
            self.add_remote(*c);
        }
    }

    fn add_remote(&mut self, c: SocketAddr) -> bool {
        if self.remote.contains(&c) || self.remote.len() >= 2 * MAX_CANDIDATES {
            return false;
        }
        self.remote.push(c);
        true
    }

    fn start_probing(&mut self, now: Instant, recall: Option<(u32, Instant)>) {
        self.phase = Phase::Probing {
            until: now + PUNCH_WINDOW,
            next: now,
            recall,
        };
    }

    /// The peer is heard from this round: no need to Call again.
    fn heard(&mut self) {
        if let Phase::Probing { recall, .. } = &mut self.phase {
            *recall = None;
        }
    }

    /// A Punch from the relay path.
    pub fn handle_punch(
        &mut self,
        kind: PunchKind,
        observed: Option<SocketAddr>,
        body: &[u8],
        now: Instant,
    ) -> Result<(), Ignored> {
        match (self.role, kind) {
            (Role::Controlled, PunchKind::Call) => {
                let o = self.open(body)?;
                // The client sent its Call again: our Answer (or the Go) was lost on the
                // way. The same Answer again, so the round is not lost.
                if let Some((round, answer)) = &self.last_answer {
                    if *round == o.round {
                        self.out.push_back(DirectTransmit::Punch {
                            kind: PunchKind::Answer,
                            body: answer.clone(),
                        });
                        return Ok(());
                    }
                }
                if self.calls_answered.contains(&o.round) {
                    self.stats.replayed += 1;
                    return Err(Ignored::Replayed);
                }
                if self.calls_answered.len() >= MAX_CALLS {
                    self.calls_answered.pop_front();
                }
                self.calls_answered.push_back(o.round);
                self.new_round();
                self.peer_round = Some(o.round);
                self.learn_remote(&o, observed);
                let answer = self.offer(o.round);
                self.last_answer = Some((o.round, answer.clone()));
                self.out.push_back(DirectTransmit::Punch {
                    kind: PunchKind::Answer,
                    body: answer,
                });
                Ok(())
            }
            (Role::Controlled, PunchKind::Go) => {
                let o = self.open(body)?;
                // The Go carries the Call this agent answered last.
                if self.calls_answered.back() != Some(&o.round) {
                    self.stats.replayed += 1;
                    return Err(Ignored::Replayed);
                }
                self.peer_round = Some(o.round);
                self.learn_remote(&o, observed);
                self.keep.clear();
                self.start_probing(now, None);
                Ok(())
            }
            (Role::Controlling, PunchKind::Go) => {
                let o = self.open(body)?;
                let attempts = match self.phase {
                    Phase::Calling { attempts, .. } => attempts,
                    // The Go again, for a Call sent again while probing: already probing.
                    Phase::Probing { .. } if o.answers == self.round => return Ok(()),
                    _ => {
                        self.stats.replayed += 1;
                        return Err(Ignored::Replayed);
                    }
                };
                if o.answers != self.round {
                    self.stats.replayed += 1;
                    return Err(Ignored::Replayed);
                }
                self.peer_round = Some(o.round);
                self.learn_remote(&o, observed);
                self.start_probing(now, Some((attempts, now + CALL_RETRY)));
                Ok(())
            }
            _ => Err(Ignored::Unexpected),
        }
    }

    fn send_probe(&mut self, to: SocketAddr, now: Instant) {
        let Some(round) = self.peer_round else {
            return;
        };
        let tx: u64 = self.rng.gen();
        let mut f = Frame::Probe {
            from: self.me,
            round,
            tx,
            tag: [0; TAG_LEN],
        };
        let tag = self.key.tag(&f.to_vec());
        if let Frame::Probe { tag: t, .. } = &mut f {
            *t = tag;
        }
        let mut datagram = Vec::with_capacity(PROBE_SIZE);
        f.encode_padded(&mut datagram, PROBE_SIZE);
        if self.outstanding.len() >= MAX_TX {
            self.outstanding.pop_front();
        }
        self.outstanding
            .push_back(Outstanding { tx, to, sent: now });
        self.stats.probes_sent += 1;
        self.out.push_back(DirectTransmit::Direct { to, datagram });
    }

    /// A Probe from `from` (its sender key already matched to this pairing's peer).
    pub fn handle_probe(
        &mut self,
        from: SocketAddr,
        frame: &Frame<'_>,
        now: Instant,
    ) -> Result<(), Ignored> {
        let Frame::Probe {
            from: key,
            round,
            tx,
            tag,
        } = *frame
        else {
            return Err(Ignored::Unexpected);
        };
        let untagged = Frame::Probe {
            from: key,
            round,
            tx,
            tag: [0; TAG_LEN],
        }
        .to_vec();
        if key != self.peer.0 || !self.key.verify(&untagged, &tag) {
            self.stats.forged += 1;
            return Err(Ignored::Forged);
        }
        self.expire_seen(now);
        if (round != self.round && round != self.prev_round) || self.seen.contains(&tx) {
            self.stats.replayed += 1;
            return Err(Ignored::Replayed);
        }
        if self.seen.len() >= MAX_TX {
            if let Some((old, _)) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(tx);
        self.seen_order.push_back((tx, now));
        self.heard();
        if self.role == Role::Controlled {
            self.heard_direct = Some(now);
            self.next_keepalive.get_or_insert(now + AGENT_KEEPALIVE);
        }
        // The ack.
        let mut f = Frame::ProbeAck {
            from: self.me,
            tx,
            observed: from,
            tag: [0; TAG_LEN],
        };
        let t = self.key.tag(&f.to_vec());
        if let Frame::ProbeAck { tag, .. } = &mut f {
            *tag = t;
        }
        let mut datagram = Vec::with_capacity(PROBE_SIZE);
        f.encode_padded(&mut datagram, PROBE_SIZE);
        self.out
            .push_back(DirectTransmit::Direct { to: from, datagram });
        // A probe from an address not offered (the peer's NAT gave it another port): a
        // peer-reflexive candidate; the client checks it at once (the mapping is open now).
        if self.add_remote(from) && self.role == Role::Controlling && self.best.is_none() {
            self.send_probe(from, now);
        }
        Ok(())
    }

    /// A ProbeAck from `from`.
    pub fn handle_ack(
        &mut self,
        from: SocketAddr,
        frame: &Frame<'_>,
        now: Instant,
    ) -> Result<(), Ignored> {
        let Frame::ProbeAck {
            from: key,
            tx,
            observed,
            tag,
        } = *frame
        else {
            return Err(Ignored::Unexpected);
        };
        let untagged = Frame::ProbeAck {
            from: key,
            tx,
            observed,
            tag: [0; TAG_LEN],
        }
        .to_vec();
        if key != self.peer.0 || !self.key.verify(&untagged, &tag) {
            self.stats.forged += 1;
            return Err(Ignored::Forged);
        }
        // From the address probed, or another port of its IP: a NAT that maps per
        // destination answers from a new port, and what reached the peer is the
        // address probed (the transaction is random and tagged: nobody else knows it).
        let Some(i) = self
            .outstanding
            .iter()
            .position(|o| o.tx == tx && o.to.ip() == from.ip())
        else {
            self.stats.replayed += 1;
            return Err(Ignored::Replayed);
        };
        let o = self.outstanding.remove(i).expect("found above");
        let from = o.to;
        self.stats.acks += 1;
        self.heard();
        let rtt = now.saturating_duration_since(o.sent);
        if self.role == Role::Controlled {
            if !self.keep.contains(&from) && self.keep.len() < MAX_CANDIDATES {
                self.keep.push(from);
            }
            return Ok(());
        }
        match &mut self.best {
            Some(b) if b.addr == from => {
                b.last_ack = now;
                b.rtt = (b.rtt * 7 + rtt) / 8;
                self.missed = 0;
            }
            Some(b) if rtt.as_secs_f64() < b.rtt.as_secs_f64() * UPGRADE_RATIO => {
                *b = Best {
                    addr: from,
                    rtt,
                    last_ack: now,
                    since: now,
                };
                self.missed = 0;
                self.stats.upgrades += 1;
                self.events
                    .push_back(DirectEvent::Direct { addr: from, rtt });
            }
            Some(_) => {}
            None => {
                self.best = Some(Best {
                    addr: from,
                    rtt,
                    last_ack: now,
                    since: now,
                });
                self.missed = 0;
                self.next_heartbeat = Some(now + HEARTBEAT);
                self.stats.upgrades += 1;
                self.events
                    .push_back(DirectEvent::Direct { addr: from, rtt });
            }
        }
        Ok(())
    }

    fn expire_seen(&mut self, now: Instant) {
        while let Some(&(tx, at)) = self.seen_order.front() {
            if now.duration_since(at) < SEEN_FOR {
                break;
            }
            self.seen_order.pop_front();
            self.seen.remove(&tx);
        }
    }

    fn fall_back(&mut self, reason: &'static str, now: Instant) {
        if self.best.take().is_some() {
            self.stats.fallbacks += 1;
            self.events.push_back(DirectEvent::Relayed { reason });
        }
        self.next_heartbeat = None;
        self.missed = 0;
        self.phase = Phase::Idle {
            next: Some(now + self.backoff),
        };
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// The direct path is known to be broken (a WireGuard handshake over it failed):
    /// back to the relay now.
    pub fn path_failed(&mut self, now: Instant) {
        if self.best.is_some() {
            self.fall_back("the WireGuard handshake over it failed", now);
        }
    }

    /// The timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.outstanding
            .retain(|o| now.duration_since(o.sent) < PUNCH_WINDOW);
        match self.phase {
            Phase::Idle { next: Some(t) }
                if now >= t && self.relay_ready && self.role == Role::Controlling =>
            {
                self.new_round();
                let call = self.offer(0);
                self.call = Some(call.clone());
                self.out.push_back(DirectTransmit::Punch {
                    kind: PunchKind::Call,
                    body: call,
                });
                self.phase = Phase::Calling {
                    attempts: 1,
                    resend: now + CALL_RETRY,
                };
            }
            Phase::Calling { attempts, resend } if now >= resend => {
                if attempts < CALL_ATTEMPTS && self.relay_ready {
                    if let Some(call) = self.call.clone() {
                        self.out.push_back(DirectTransmit::Punch {
                            kind: PunchKind::Call,
                            body: call,
                        });
                    }
                    self.phase = Phase::Calling {
                        attempts: attempts + 1,
                        resend: now + CALL_RETRY,
                    };
                } else {
                    self.call = None;
                    self.phase = Phase::Idle {
                        next: Some(now + self.backoff),
                    };
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
            }
            Phase::Probing {
                until,
                next,
                mut recall,
            } if now >= next => {
                if now >= until {
                    self.call = None;
                    if self.role == Role::Controlling && self.best.is_none() {
                        self.phase = Phase::Idle {
                            next: Some(now + self.backoff),
                        };
                        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    } else {
                        self.phase = Phase::Idle { next: None };
                    }
                } else {
                    let silent =
                        self.role == Role::Controlled && self.fault == Fault::ControlledNeverProbes;
                    let targets: Vec<SocketAddr> = self
                        .remote
                        .iter()
                        .copied()
                        .filter(|a| Some(*a) != self.path() && !silent)
                        .collect();
                    for to in targets {
                        self.send_probe(to, now);
                    }
                    if let Some((calls, at)) = recall.filter(|&(_, at)| now >= at) {
                        recall = None;
                        if let (true, Some(call)) = (calls < CALL_ATTEMPTS, self.call.clone()) {
                            self.out.push_back(DirectTransmit::Punch {
                                kind: PunchKind::Call,
                                body: call,
                            });
                            recall = Some((calls + 1, at + CALL_RETRY));
                        }
                    }
                    self.phase = Phase::Probing {
                        until,
                        next: now + PROBE_INTERVAL,
                        recall,
                    };
                }
            }
            _ => {}
        }
        // The agent's mappings the client sends to.
        if self.next_keepalive.is_some_and(|t| now >= t) {
            let live = self
                .heard_direct
                .is_some_and(|h| now.duration_since(h) < KEEPALIVE_HOLD);
            let probing = matches!(self.phase, Phase::Probing { .. });
            if live && !probing && self.fault != Fault::ControlledNeverProbes {
                for to in self.keep.clone() {
                    self.send_probe(to, now);
                }
            }
            self.next_keepalive = live.then_some(now + AGENT_KEEPALIVE);
        }
        // The path in use.
        if let Some(b) = self.best {
            if now.duration_since(b.last_ack) >= HEARTBEAT * MISSED_HEARTBEATS + HEARTBEAT / 5
                && self.fault != Fault::NoHeartbeat
            {
                self.fall_back("the direct path stopped answering", now);
            } else {
                if now.duration_since(b.since) >= STABLE {
                    self.backoff = BACKOFF_MIN;
                }
                if self.next_heartbeat.is_some_and(|t| now >= t) && self.fault != Fault::NoHeartbeat
                {
                    self.send_probe(b.addr, now);
                    self.next_heartbeat = Some(now + HEARTBEAT);
                }
            }
        }
    }

    /// When [`Direct::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::Idle { next } if self.relay_ready => next,
            Phase::Idle { .. } => None,
            Phase::Calling { resend, .. } => Some(resend),
            Phase::Probing { next, .. } => Some(next),
        };
        let lost = self
            .best
            .filter(|_| self.fault != Fault::NoHeartbeat)
            .map(|b| b.last_ack + HEARTBEAT * MISSED_HEARTBEATS + HEARTBEAT / 5);
        let heartbeat = self
            .next_heartbeat
            .filter(|_| self.fault != Fault::NoHeartbeat);
        [phase, heartbeat, lost, self.next_keepalive]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<DirectTransmit> {
        self.out.pop_front()
    }

    /// The next change.
    pub fn poll_event(&mut self) -> Option<DirectEvent> {
        self.events.pop_front()
    }

    /// Its counters.
    pub fn stats(&self) -> DirectStats {
        self.stats
    }

    /// What it is doing.
    pub fn status(&self, now: Instant) -> DirectStatus {
        let (state, next) = match (self.best, self.phase) {
            (Some(_), _) => ("direct", None),
            (None, Phase::Probing { .. }) => ("probing", None),
            (None, Phase::Calling { .. }) => ("calling", None),
            (None, Phase::Idle { next }) => {
                ("relayed", next.map(|t| t.saturating_duration_since(now)))
            }
        };
        DirectStatus {
            direct: self.path(),
            rtt: self.best.map(|b| b.rtt),
            local: self.local.clone(),
            remote: self.remote.clone(),
            state,
            next_round_in: next,
            stats: self.stats,
        }
    }
}

#[cfg(test)]
mod tests;
