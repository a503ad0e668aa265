//! A NAT model for the direct-path simulation: mapping and filtering behaviour
//! (endpoint-independent, address-dependent, address-and-port-dependent, as RFC 4787
//! names them), a mapping timeout refreshed by outbound traffic only (RFC 4787 requires no
//! more), hairpinning and loss, and a scenario runner ([`run`]) that drives the real sans-IO path code
//! (`warren_net::direct::Direct`, client and agent, and the coordinator's
//! `warren_proto::coordinator::Pairing`) through it in virtual time.
//!
//! ```text
//!  client 10.0.0.2:40000 ─ NAT A (public 192.0.2.1) ─┐            ┌─ relay R1 198.51.100.1:7401
//!                                                   ├─ internet ─┤  (the coordinator)
//!  agent 10.1.0.2:51820 ── NAT B (public 203.0.113.1)┘            └─ relay R2 198.51.100.2:7401
//!  (same LAN: both behind NAT A, agent at 10.0.0.3)
//! ```
//!
//! # When a direct path exists (the oracle, independent of the code under test)
//! - Same LAN: always (host addresses).
//! - Otherwise, when for one side X (and Y the other): Y's probe, sent from Y's mapping
//!   towards X to X's reflexive address r (X's mapping towards the relay), passes X's
//!   filter, and X's answer, sent from X's mapping towards Y, passes Y's filter. Then
//!   the answer's source (peer-reflexive when X's mapping depends on the remote) is the
//!   path. X's filter lets the probe in if it is endpoint-independent; address-dependent
//!   if X's mapping is endpoint-independent (X probed Y's IP from r); address-and-port-
//!   dependent if both mappings are (X probed exactly where Y's probe came from). Y's
//!   filter lets the answer in unless it is address-and-port-dependent and X's mapping
//!   is not endpoint-independent (the answer then comes from a port Y never sent to).
//! - So: easy × easy (endpoint-independent mappings, any filtering) yes; hard × hard
//!   behind address-and-port filters no; a hard side meets an easy one behind a port
//!   forward (endpoint-independent filtering) yes; no port guessing anywhere.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use warren_net::direct::{Direct, DirectTransmit, Fault, Role};
use warren_net::relays::AGENT_KEEPALIVE;
use warren_net::wg::SecretKey;
use warren_proto::coordinator::{Pairing, Side};
use warren_proto::relay::Frame;

/// How a NAT picks the public port of an outbound flow, or which inbound it lets in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependence {
    /// The same whatever the remote ("easy").
    Independent,
    /// Per remote IP.
    Address,
    /// Per remote IP and port ("hard" as a mapping; conntrack's default as a filter).
    AddressAndPort,
}

/// One NAT's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatKind {
    /// Mapping behaviour.
    pub mapping: Dependence,
    /// Filtering behaviour.
    pub filtering: Dependence,
    /// A mapping idle this long is gone.
    pub timeout: Duration,
    /// Whether a packet from inside to the public address comes back in.
    pub hairpin: bool,
}

/// A NAT's state.
#[derive(Debug)]
struct Nat {
    kind: NatKind,
    public: Ipv4Addr,
    /// (internal, mapping key) → public port, last outbound.
    maps: HashMap<(SocketAddr, Option<SocketAddr>), (u16, Instant)>,
    /// public port → (internal, remotes sent to).
    ports: HashMap<u16, (SocketAddr, HashSet<SocketAddr>)>,
    next_port: u16,
}

impl Nat {
    fn new(kind: NatKind, public: Ipv4Addr, seed: u16) -> Self {
        Self {
            kind,
            public,
            maps: HashMap::new(),
            ports: HashMap::new(),
            next_port: 20000 + seed % 1000 * 10,
        }
    }

    fn key(&self, remote: SocketAddr) -> Option<SocketAddr> {
        match self.kind.mapping {
            Dependence::Independent => None,
            Dependence::Address => Some(SocketAddr::new(remote.ip(), 0)),
            Dependence::AddressAndPort => Some(remote),
        }
    }

    /// The public source of a datagram from `internal` to `remote`.
    fn outbound(&mut self, internal: SocketAddr, remote: SocketAddr, now: Instant) -> SocketAddr {
        let key = (internal, self.key(remote));
        let timeout = self.kind.timeout;
        let port = match self.maps.get_mut(&key) {
            Some((p, last)) if now.duration_since(*last) < timeout => {
                *last = now;
                *p
            }
            _ => {
                self.next_port += 1;
                let p = self.next_port;
                self.maps.insert(key, (p, now));
                self.ports.insert(p, (internal, HashSet::new()));
                p
            }
        };
        if let Some((_, sent)) = self.ports.get_mut(&port) {
            sent.insert(remote);
        }
        SocketAddr::new(IpAddr::V4(self.public), port)
    }

    /// Where a datagram from `from` to our public `port` goes inside, if it may.
    fn inbound(&self, port: u16, from: SocketAddr, now: Instant) -> Option<SocketAddr> {
        let (internal, sent) = self.ports.get(&port)?;
        let live = self
            .maps
            .values()
            .any(|(p, last)| *p == port && now.duration_since(*last) < self.kind.timeout);
        if !live {
            return None;
        }
        let ok = match self.kind.filtering {
            Dependence::Independent => true,
            Dependence::Address => sent.iter().any(|s| s.ip() == from.ip()),
            Dependence::AddressAndPort => sent.contains(&from),
        };
        ok.then_some(*internal)
    }
}

/// One scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// The client's NAT.
    pub client: NatKind,
    /// The agent's NAT (ignored on the same LAN).
    pub agent: NatKind,
    /// Client and agent behind the one client NAT.
    pub same_lan: bool,
    /// Chance a datagram is lost, per mille.
    pub loss_per_mille: u32,
    /// Cut the direct path (between the two NATs) at this time, for this long.
    pub cut: Option<(Duration, Duration)>,
    /// Virtual time to run.
    pub length: Duration,
    /// A defect planted in the path code (the checker's control).
    pub fault: Fault,
}

/// What a run saw.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Whether the client's path is direct at the end.
    pub direct_at_end: bool,
    /// When the path first went direct.
    pub first_direct: Option<Duration>,
    /// After the first direct path, the longest time back on the relay (a span still open
    /// at the end counts to the end).
    pub longest_relayed: Duration,
    /// The longest time data sent on the direct path went undelivered.
    pub longest_black_hole: Duration,
}

/// The oracle: whether a direct path exists (see the module documentation).
pub fn direct_exists(s: &Scenario) -> bool {
    if s.same_lan {
        return true;
    }
    let eim = |k: &NatKind| k.mapping == Dependence::Independent;
    // Y probes X's reflexive address r (X's mapping towards the relay) from q, its own
    // mapping towards X; X answers from x, its mapping towards Y.
    let reach = |x: &NatKind, y: &NatKind| {
        // X's filter lets the probe in at r: X sent to Y's address from r only if X's
        // mapping is the same for every remote, and to q exactly only if Y's is too.
        let probe_in = match x.filtering {
            Dependence::Independent => true,
            Dependence::Address => eim(x),
            Dependence::AddressAndPort => eim(x) && eim(y),
        };
        // Y's filter lets the answer in at q: Y sent to r, the answer comes from x,
        // which is r only if X's mapping is the same for every remote.
        let answer_in = match y.filtering {
            Dependence::Independent | Dependence::Address => true,
            Dependence::AddressAndPort => eim(x),
        };
        probe_in && answer_in
    };
    reach(&s.client, &s.agent) || reach(&s.agent, &s.client)
}

const CLIENT_HOST: &str = "10.0.0.2:40000";
const AGENT_HOST: &str = "10.1.0.2:51820";
const AGENT_LAN: &str = "10.0.0.3:51820";
const RELAYS: [&str; 2] = ["198.51.100.1:7401", "198.51.100.2:7401"];
const LATENCY: Duration = Duration::from_millis(10);
const DATA_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, PartialEq, Eq)]
struct Datagram {
    at: Instant,
    seq: u64,
    /// Public source, public destination.
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
    /// Test data (not a frame).
    data: Option<bool>,
    /// Sent from behind NAT A (a packet to its public address is then a hairpin).
    inside_a: bool,
}

impl Ord for Datagram {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

impl PartialOrd for Datagram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a constant address")
}

/// Runs `s` with randomness from `seed`.
pub fn run(s: &Scenario, seed: u64) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let key = |rng: &mut StdRng| SecretKey::from_bytes(rng.gen());
    let (ck, ak) = (key(&mut rng), key(&mut rng));
    let mut client = Direct::new(Role::Controlling, &ck, ak.public_key(), rng.gen())
        .expect("random keys are not low-order");
    let mut agent = Direct::new(Role::Controlled, &ak, ck.public_key(), rng.gen())
        .expect("random keys are not low-order");
    agent.plant(s.fault);
    client.plant(s.fault);
    let t0 = Instant::now();
    let mut nat_a = Nat::new(s.client, Ipv4Addr::new(192, 0, 2, 1), rng.gen());
    let mut nat_b = Nat::new(s.agent, Ipv4Addr::new(203, 0, 113, 1), rng.gen());
    let (c_host, a_host) = (
        addr(CLIENT_HOST),
        addr(if s.same_lan { AGENT_LAN } else { AGENT_HOST }),
    );
    let relays = RELAYS.map(addr);
    // Candidates: host, and what each relay sees (the mappings towards them).
    let mut c_local = vec![c_host];
    for r in relays {
        c_local.push(nat_a.outbound(c_host, r, t0));
    }
    client.set_local(c_local, t0);
    agent.set_local(vec![a_host], t0);
    // The client pings its relays every second (as the product does): the mappings
    // towards them stay open, and what they report is its reflexive candidates.
    let mut next_ping = t0 + Duration::from_secs(1);
    let mut next_keepalive = t0 + AGENT_KEEPALIVE;
    let mut pairing = Pairing::new(t0);
    let mut queue: BinaryHeap<Datagram> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut now = t0;
    let end = t0 + s.length;
    let mut next_data = t0;
    let mut first_direct = None;
    let mut relayed_since: Option<Instant> = None;
    let mut longest_relayed = Duration::ZERO;
    let mut undelivered_since: Option<Instant> = None;
    let mut longest = Duration::ZERO;
    let mut agent_reply_to: Option<SocketAddr> = None;
    client.relay_ready(t0);
    let cut = |t: Instant| {
        s.cut
            .is_some_and(|(at, len)| t >= t0 + at && t < t0 + at + len)
    };
    let lost = |rng: &mut StdRng| rng.gen_range(0..1000) < s.loss_per_mille;
    while now < end {
        // Whatever the two ends want to send.
        for (is_client, d) in [(true, &mut client), (false, &mut agent)] {
            while let Some(t) = d.poll_transmit() {
                match t {
                    DirectTransmit::Punch { body, .. } => {
                        // Over the relay (its delivery not modelled beyond latency); the
                        // relay stamps where it came from: the sender's mapping towards it.
                        let outs = if is_client {
                            let seen = nat_a.outbound(c_host, relays[0], now);
                            pairing
                                .handle_call(Some(seen), &body, now)
                                .into_iter()
                                .collect::<Vec<_>>()
                        } else {
                            let nat = if s.same_lan { &mut nat_a } else { &mut nat_b };
                            let seen = nat.outbound(a_host, relays[0], now);
                            pairing.handle_answer(Some(seen), &body, now)
                        };
                        for o in outs {
                            let f = Frame::Punch {
                                channel: 1,
                                kind: o.kind,
                                observed: o.observed,
                                body: &o.body,
                            }
                            .to_vec();
                            let to = match o.to {
                                Side::Client => c_host,
                                Side::Agent => a_host,
                            };
                            seq += 1;
                            queue.push(Datagram {
                                at: now + LATENCY * 2,
                                seq,
                                from: relays[0],
                                to,
                                bytes: f,
                                data: None,
                                inside_a: false,
                            });
                        }
                    }
                    DirectTransmit::Direct { to, datagram } => {
                        let (nat, host) = if is_client || s.same_lan {
                            (&mut nat_a, if is_client { c_host } else { a_host })
                        } else {
                            (&mut nat_b, a_host)
                        };
                        let from = if to.ip().to_string().starts_with("10.") {
                            host
                        } else {
                            nat.outbound(host, to, now)
                        };
                        seq += 1;
                        queue.push(Datagram {
                            at: now + LATENCY,
                            seq,
                            from,
                            to,
                            bytes: datagram,
                            data: None,
                            inside_a: is_client || s.same_lan,
                        });
                    }
                }
            }
        }
        match (client.path(), relayed_since) {
            (Some(_), Some(since)) => {
                longest_relayed = longest_relayed.max(now - since);
                relayed_since = None;
            }
            (None, None) if first_direct.is_some() => relayed_since = Some(now),
            _ => {}
        }
        if first_direct.is_none() && client.path().is_some() {
            first_direct = Some(now - t0);
        }
        if now >= next_ping {
            next_ping = now + Duration::from_secs(1);
            let mut c_local = vec![c_host];
            for r in relays {
                c_local.push(nat_a.outbound(c_host, r, now));
            }
            client.set_local(c_local, now);
        }
        // The agent pings its relays every AGENT_KEEPALIVE between its Binds (as the product
        // does): its mappings towards them, its reflexive candidates, stay open.
        if now >= next_keepalive {
            next_keepalive = now + AGENT_KEEPALIVE;
            let nat = if s.same_lan { &mut nat_a } else { &mut nat_b };
            for r in relays {
                nat.outbound(a_host, r, now);
            }
        }
        // Test data from the client, on its path.
        if now >= next_data {
            next_data = now + DATA_EVERY;
            if let Some(to) = client.path() {
                let from = if to.ip().to_string().starts_with("10.") {
                    c_host
                } else {
                    nat_a.outbound(c_host, to, now)
                };
                seq += 1;
                queue.push(Datagram {
                    at: now + LATENCY,
                    seq,
                    from,
                    to,
                    bytes: Vec::new(),
                    data: Some(true),
                    inside_a: true,
                });
                let since = *undelivered_since.get_or_insert(now);
                longest = longest.max(now - since);
            } else {
                undelivered_since = None;
                agent_reply_to = None;
            }
        }
        // The next event.
        let next = [
            queue.peek().map(|d| d.at),
            client.poll_timeout(),
            agent.poll_timeout(),
            Some(next_data),
            Some(next_ping),
            Some(next_keepalive),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(end)
        .max(now);
        now = next;
        while queue.peek().is_some_and(|d| d.at <= now) {
            let d = queue.pop().expect("peeked");
            if lost(&mut rng) {
                continue;
            }
            // Between the NATs' public sides: the cut.
            let public = |a: SocketAddr| !a.ip().to_string().starts_with("10.");
            if d.from != relays[0] && public(d.from) && public(d.to) && cut(now) {
                continue;
            }
            // Into the receiver.
            let (inside, to_client) = if d.from == relays[0] {
                (Some(d.to), d.to == c_host)
            } else if !public(d.to) {
                // A host address: only on the same LAN.
                let same = s.same_lan && !public(d.from);
                (same.then_some(d.to), d.to == c_host)
            } else if d.to.ip() == IpAddr::V4(nat_a.public) {
                if d.inside_a && !nat_a.kind.hairpin {
                    (None, false)
                } else {
                    let i = nat_a.inbound(d.to.port(), d.from, now);
                    (i, i == Some(c_host))
                }
            } else if d.to.ip() == IpAddr::V4(nat_b.public) && !s.same_lan {
                (nat_b.inbound(d.to.port(), d.from, now), false)
            } else {
                (None, false)
            };
            let Some(inside) = inside else {
                continue;
            };
            if d.data.is_some() {
                if !to_client && inside == a_host {
                    undelivered_since = None;
                    agent_reply_to = Some(d.from);
                }
                continue;
            }
            let Ok(f) = Frame::decode(&d.bytes) else {
                continue;
            };
            let target = if to_client { &mut client } else { &mut agent };
            let _ = match f {
                Frame::Punch {
                    kind,
                    observed,
                    body,
                    ..
                } => target.handle_punch(kind, observed, body, now),
                Frame::Probe { .. } => target.handle_probe(d.from, &f, now),
                Frame::ProbeAck { .. } => target.handle_ack(d.from, &f, now),
                _ => Ok(()),
            };
        }
        for d in [&mut client, &mut agent] {
            if d.poll_timeout().is_some_and(|t| now >= t) {
                d.handle_timeout(now);
            }
            while d.poll_event().is_some() {}
        }
    }
    let _ = agent_reply_to;
    Outcome {
        direct_at_end: client.path().is_some(),
        first_direct,
        longest_relayed: relayed_since.map_or(longest_relayed, |s| longest_relayed.max(end - s)),
        longest_black_hole: longest,
    }
}
