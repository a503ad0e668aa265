//! The relay client, sans-IO: bindings to node relays ([`warren_proto::relay`]), and for a
//! client the choice of relay per site by measured RTT.
//!
//! ```text
//!  client (ClientRelays)                       agent (AgentRelays)
//!   Ping every 1 s to every relay a site lists   Bind{agent ticket} to every relay it is
//!   ─► RTT (smoothed), alive while answering     told about, again every 10 s (keepalive:
//!   lowest RTT per site, sticky; Bind{ticket,    the relay's binding and the NAT stay open)
//!   site} to it ─► Bound{channel C}: the path
//!   (relay, C) WireGuard packets go on
//! ```
//!
//! Stickiness: a site moves to another relay only when that one's RTT has been below 70 % of
//! the current one's and at least 10 ms lower for [`SWITCH_DWELL`] (3 s), or when the current one stops answering
//! ([`MISSED_PINGS`] pings in a row, about 3 s) or refuses the binding. The old binding's
//! path stays in use until the new one is bound, so a move for a better RTT loses nothing.
//!
//! Neither type reads the clock, spawns or touches a socket: frames come in through
//! `handle_frame`, datagrams to send come out of `poll_transmit`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use warren_proto::relay::{Frame, Refusal, MAX_TICKET};

use crate::wg::Path;

/// How often each relay is pinged.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Pings in a row without an answer after which a relay counts as gone.
pub const MISSED_PINGS: u32 = 3;
/// How often a binding is made again while it holds (the agent's keepalive, a client's
/// refresh), unless the relay's lifetime asks for more often.
pub const REBIND_INTERVAL: Duration = Duration::from_secs(10);
/// How often an agent pings each relay it is bound to, between its Binds: the keepalive of
/// the NAT mapping the relay reaches it through. Anything the relay sends the agent (a
/// client's packets, a Punch) comes in through that mapping, and a NAT that forgets idle
/// UDP mappings after a few seconds would otherwise cut it between two Binds. A Ping costs
/// the relay no ticket check and no state.
pub const AGENT_KEEPALIVE: Duration = Duration::from_secs(2);
/// The first retry of an unanswered Bind; doubled up to [`REBIND_INTERVAL`].
pub const BIND_RETRY: Duration = Duration::from_secs(1);
/// How long a relay that refused a site's binding is not asked again for it (unless the
/// ticket changes).
pub const REFUSED_BACKOFF: Duration = Duration::from_secs(10);
/// A better relay must have an RTT below this fraction of the current one's...
pub const SWITCH_RATIO: f64 = 0.7;
/// ...and be at least this much faster...
pub const SWITCH_MARGIN: Duration = Duration::from_millis(10);
/// ...for at least this long (a few pings in a row), so one fast answer moves nothing.
pub const SWITCH_DWELL: Duration = Duration::from_secs(3);

/// Something the shell may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// A binding holds: for a client, `site`'s packets go on (`relay`, `channel`) from now
    /// on (a new path: worth a WireGuard handshake if there is no session yet). For an
    /// agent, `site` is empty.
    Bound {
        /// The site ("" for an agent).
        site: String,
        /// The relay.
        relay: SocketAddr,
        /// The channel it gave.
        channel: u32,
    },
    /// A relay refused a binding. [`Refusal::Expired`] and [`Refusal::BadTicket`] want a
    /// new ticket.
    Refused {
        /// The site ("" for an agent).
        site: String,
        /// The relay.
        relay: SocketAddr,
        /// Why.
        reason: Refusal,
    },
    /// A relay stopped answering pings (client only).
    Lost {
        /// The relay.
        relay: SocketAddr,
    },
}

/// Why a ticket was not taken (the caller's doing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Longer than a Bind frame carries.
    #[error("relay ticket longer than {MAX_TICKET} bytes")]
    TooLong,
    /// A site name longer than 255 bytes.
    #[error("site name longer than 255 bytes")]
    SiteTooLong,
}

/// What a client knows of one relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayStatus {
    /// Its address.
    pub relay: SocketAddr,
    /// Smoothed RTT of its pings, once one was answered.
    pub rtt: Option<Duration>,
    /// Whether it answers.
    pub alive: bool,
    /// Our address as it sees us (from its last pong).
    pub observed: Option<SocketAddr>,
}

/// A client's relay for one site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteRelayStatus {
    /// The relay the site's packets go through (bound), if any yet.
    pub relay: Option<SocketAddr>,
    /// Its RTT.
    pub rtt: Option<Duration>,
    /// The path (relay, channel).
    pub path: Option<Path>,
    /// The relay being moved to, while its binding is under way.
    pub moving_to: Option<SocketAddr>,
}

/// A client's relays: pings, the choice per site, one binding per site.
///
/// # Calling order
/// 1. [`ClientRelays::set_site`] for each site (again when its relays or ticket change),
///    [`ClientRelays::remove_site`].
/// 2. Every relay control frame received (Pong, Bound, Refused): [`ClientRelays::handle_frame`].
///    Data frames do not come here: they go straight to WireGuard with
///    [`ClientRelays::path`]'s counterpart on the way out.
/// 3. When [`ClientRelays::poll_timeout`] passes: [`ClientRelays::handle_timeout`].
/// 4. After any of these: drain [`ClientRelays::poll_transmit`] and
///    [`ClientRelays::poll_event`].
#[derive(Debug, Default)]
pub struct ClientRelays {
    probes: HashMap<SocketAddr, Probe>,
    sites: BTreeMap<String, Site>,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<RelayEvent>,
}

#[derive(Debug)]
struct Site {
    relays: Vec<SocketAddr>,
    ticket: Vec<u8>,
    /// The bound binding packets go on.
    active: Option<Binding>,
    /// A binding to the relay being moved to.
    pending: Option<Binding>,
    refused: HashMap<SocketAddr, Instant>,
    /// A relay clearly faster than the current one, since when.
    better: Option<(SocketAddr, Instant)>,
}

impl ClientRelays {
    /// No sites yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a site or updates its relays and ticket. New relays are pinged at once; a new
    /// ticket is used from the next Bind on (at once for a binding that was refused).
    pub fn set_site(
        &mut self,
        site: &str,
        relays: Vec<SocketAddr>,
        ticket: Vec<u8>,
        now: Instant,
    ) -> Result<(), TicketError> {
        if ticket.len() > MAX_TICKET {
            return Err(TicketError::TooLong);
        }
        if site.len() > 255 {
            return Err(TicketError::SiteTooLong);
        }
        let s = self.sites.entry(site.to_owned()).or_insert_with(|| Site {
            relays: vec![],
            ticket: vec![],
            active: None,
            pending: None,
            refused: HashMap::new(),
            better: None,
        });
        if s.ticket != ticket {
            s.refused.clear();
            for b in s.active.iter_mut().chain(s.pending.iter_mut()) {
                if b.refused {
                    b.refused = false;
                    b.next_send = now;
                }
            }
        }
        s.ticket = ticket;
        s.relays = relays;
        self.sync_probes(now);
        self.reselect(site, now);
        Ok(())
    }

    /// Forgets a site (relays no other site lists stop being pinged).
    pub fn remove_site(&mut self, site: &str, now: Instant) {
        self.sites.remove(site);
        self.sync_probes(now);
    }

    /// Where `site`'s WireGuard packets go now.
    pub fn path(&self, site: &str) -> Option<Path> {
        self.sites.get(site)?.active.as_ref()?.path()
    }

    /// The relay in use for `site`.
    pub fn site_status(&self, site: &str) -> Option<SiteRelayStatus> {
        let s = self.sites.get(site)?;
        let relay = s
            .active
            .as_ref()
            .filter(|b| b.channel.is_some())
            .map(|b| b.relay);
        Some(SiteRelayStatus {
            relay,
            rtt: relay.and_then(|r| self.probes.get(&r)?.srtt),
            path: s.active.as_ref().and_then(Binding::path),
            moving_to: s.pending.as_ref().map(|b| b.relay),
        })
    }

    /// Every relay pinged.
    pub fn relays(&self) -> impl Iterator<Item = RelayStatus> + '_ {
        self.probes.iter().map(|(&relay, p)| RelayStatus {
            relay,
            rtt: p.srtt,
            alive: p.alive(),
            observed: p.observed,
        })
    }

    /// A relay control frame from `from`. Frames from unknown addresses, with unknown
    /// nonces, or of kinds a client never gets are ignored (returns false: count them).
    pub fn handle_frame(&mut self, from: SocketAddr, frame: &Frame<'_>, now: Instant) -> bool {
        match *frame {
            Frame::Pong { nonce, observed } => {
                let Some(p) = self.probes.get_mut(&from) else {
                    return false;
                };
                if !p.pong(nonce, observed, now) {
                    return false;
                }
                let sites: Vec<String> = self.sites.keys().cloned().collect();
                for s in sites {
                    self.reselect(&s, now);
                }
                true
            }
            Frame::Bound {
                nonce,
                channel,
                lifetime,
            } => {
                let Some((site, pending)) = self.binding_by_nonce(from, nonce) else {
                    return false;
                };
                if let Some(p) = self.probes.get_mut(&from) {
                    p.heard();
                }
                let s = self.sites.get_mut(&site).expect("found above");
                let b = if pending {
                    s.pending.as_mut()
                } else {
                    s.active.as_mut()
                }
                .expect("found above");
                let changed = b.bound(channel, lifetime, now);
                if pending {
                    s.active = s.pending.take();
                }
                if changed || pending {
                    self.events.push_back(RelayEvent::Bound {
                        site,
                        relay: from,
                        channel,
                    });
                }
                true
            }
            Frame::Refused { nonce, reason } => {
                let Some((site, pending)) = self.binding_by_nonce(from, nonce) else {
                    return false;
                };
                let s = self.sites.get_mut(&site).expect("found above");
                s.refused.insert(from, now + REFUSED_BACKOFF);
                let b = if pending {
                    s.pending.as_mut()
                } else {
                    s.active.as_mut()
                }
                .expect("found above");
                b.refuse(now);
                if pending {
                    s.pending = None;
                }
                self.events.push_back(RelayEvent::Refused {
                    site: site.clone(),
                    relay: from,
                    reason,
                });
                self.reselect(&site, now);
                true
            }
            _ => false,
        }
    }

    /// Sends pings and Binds that are due, notices relays that stopped answering and moves
    /// sites off them.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (&addr, p) in &mut self.probes {
            if now < p.next_ping {
                continue;
            }
            let was_alive = p.alive();
            let nonce = p.ping(now);
            if was_alive && !p.alive() {
                self.events.push_back(RelayEvent::Lost { relay: addr });
            }
            self.transmits
                .push_back((addr, Frame::Ping { nonce }.to_vec()));
        }
        let sites: Vec<String> = self.sites.keys().cloned().collect();
        for name in sites {
            self.reselect(&name, now);
            let s = self.sites.get_mut(&name).expect("listed above");
            s.refused.retain(|_, until| *until > now);
            for b in s.active.iter_mut().chain(s.pending.iter_mut()) {
                if now >= b.next_send {
                    b.send(&s.ticket, &name, now, &mut self.transmits);
                }
            }
        }
    }

    /// When [`ClientRelays::handle_timeout`] wants to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let pings = self.probes.values().map(|p| p.next_ping);
        let binds = self
            .sites
            .values()
            .flat_map(|s| s.active.iter().chain(s.pending.iter()))
            .filter(|b| !b.refused)
            .map(|b| b.next_send);
        pings.chain(binds).min()
    }

    /// The next datagram to send: (relay, frame).
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }

    fn sync_probes(&mut self, now: Instant) {
        let wanted: Vec<SocketAddr> = self
            .sites
            .values()
            .flat_map(|s| s.relays.iter().copied())
            .collect();
        self.probes.retain(|a, _| wanted.contains(a));
        for a in wanted {
            self.probes.entry(a).or_insert_with(|| Probe::new(now));
        }
    }

    fn binding_by_nonce(&self, from: SocketAddr, nonce: u64) -> Option<(String, bool)> {
        self.sites.iter().find_map(|(name, s)| {
            if s.pending.as_ref().is_some_and(|b| b.answers(from, nonce)) {
                Some((name.clone(), true))
            } else if s.active.as_ref().is_some_and(|b| b.answers(from, nonce)) {
                Some((name.clone(), false))
            } else {
                None
            }
        })
    }

    /// The one decision: which relay `site` should be on, and start moving there.
    fn reselect(&mut self, name: &str, now: Instant) {
        let Some(s) = self.sites.get_mut(name) else {
            return;
        };
        let usable = |a: &SocketAddr| {
            s.relays.contains(a)
                && s.refused.get(a).is_none_or(|until| *until <= now)
                && self
                    .probes
                    .get(a)
                    .is_some_and(|p| p.alive() && p.srtt.is_some())
        };
        let best = s
            .relays
            .iter()
            .filter(|a| usable(a))
            .min_by_key(|a| self.probes[*a].srtt)
            .copied();
        let target = s.pending.as_ref().or(s.active.as_ref()).map(|b| b.relay);
        let choice = match (target, best) {
            (_, None) => return,
            (None, Some(b)) => b,
            (Some(cur), Some(b)) if cur == b => return,
            (Some(cur), Some(b)) if !usable(&cur) => b,
            (Some(cur), Some(b)) => {
                let (Some(c), Some(n)) = (self.probes[&cur].srtt, self.probes[&b].srtt) else {
                    return;
                };
                if n.as_secs_f64() < c.as_secs_f64() * SWITCH_RATIO && c - n >= SWITCH_MARGIN {
                    match s.better {
                        Some((r, since)) if r == b && now.duration_since(since) >= SWITCH_DWELL => {
                            b
                        }
                        Some((r, _)) if r == b => return,
                        _ => {
                            s.better = Some((b, now));
                            return;
                        }
                    }
                } else {
                    s.better = None;
                    return;
                }
            }
        };
        s.better = None;
        if s.active.as_ref().is_some_and(|b| b.relay == choice) {
            s.pending = None;
            return;
        }
        tracing::debug!(site = name, relay = %choice, "relay: binding");
        let mut b = Binding::new(choice, now);
        b.send(&s.ticket, name, now, &mut self.transmits);
        if s.active.as_ref().is_some_and(|a| a.path().is_some()) {
            s.pending = Some(b);
        } else {
            s.active = Some(b);
            s.pending = None;
        }
    }
}

/// An agent's bindings: one to every relay it was told about, made again every
/// [`REBIND_INTERVAL`], with a Ping every [`AGENT_KEEPALIVE`] in between.
///
/// # Calling order
/// 1. [`AgentRelays::set_relays`] whenever the set of (relay, ticket) changes.
/// 2. Every relay control frame received: [`AgentRelays::handle_frame`].
/// 3. When [`AgentRelays::poll_timeout`] passes: [`AgentRelays::handle_timeout`].
/// 4. After any of these: drain [`AgentRelays::poll_transmit`] and
///    [`AgentRelays::poll_event`].
#[derive(Debug, Default)]
pub struct AgentRelays {
    bindings: Vec<(Binding, Vec<u8>)>,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<RelayEvent>,
}

/// One of an agent's bindings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentBindingStatus {
    /// The relay.
    pub relay: SocketAddr,
    /// The channel it gave, while bound.
    pub channel: Option<u32>,
    /// When it last answered a Bind.
    pub last_bound: Option<Instant>,
    /// Whether its last answer was a refusal.
    pub refused: bool,
}

impl AgentRelays {
    /// No relays yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The relays to be bound to, each with the ticket to bind with. New ones are bound at
    /// once; a changed ticket is used at once; missing ones are forgotten.
    pub fn set_relays(
        &mut self,
        relays: Vec<(SocketAddr, Vec<u8>)>,
        now: Instant,
    ) -> Result<(), TicketError> {
        if relays.iter().any(|(_, t)| t.len() > MAX_TICKET) {
            return Err(TicketError::TooLong);
        }
        self.bindings
            .retain(|(b, _)| relays.iter().any(|(a, _)| *a == b.relay));
        for (addr, ticket) in relays {
            match self.bindings.iter_mut().find(|(b, _)| b.relay == addr) {
                Some((b, t)) if *t != ticket => {
                    *t = ticket;
                    b.send(t, "", now, &mut self.transmits);
                }
                Some(_) => {}
                None => {
                    let mut b = Binding::new(addr, now);
                    b.send(&ticket, "", now, &mut self.transmits);
                    self.bindings.push((b, ticket));
                }
            }
        }
        Ok(())
    }

    /// A relay control frame from `from` (Bound, Refused, the Pong to a keepalive);
    /// anything else, or an unknown nonce, is ignored (returns false: count it).
    pub fn handle_frame(&mut self, from: SocketAddr, frame: &Frame<'_>, now: Instant) -> bool {
        let nonce = match *frame {
            Frame::Bound { nonce, .. } | Frame::Refused { nonce, .. } => nonce,
            // A keepalive's answer: it did its work on the way (the NAT saw both ways).
            Frame::Pong { .. } => return self.is_relay(from),
            _ => return false,
        };
        let Some((b, _)) = self
            .bindings
            .iter_mut()
            .find(|(b, _)| b.answers(from, nonce))
        else {
            return false;
        };
        match *frame {
            Frame::Bound {
                channel, lifetime, ..
            } if b.bound(channel, lifetime, now) => {
                self.events.push_back(RelayEvent::Bound {
                    site: String::new(),
                    relay: from,
                    channel,
                });
            }
            Frame::Refused { reason, .. } => {
                b.refuse(now);
                // An agent has nowhere else to go: ask again later (a node may come to
                // hold its tunnel, or send a new ticket).
                b.next_send = now + REFUSED_BACKOFF;
                b.refused = false;
                self.events.push_back(RelayEvent::Refused {
                    site: String::new(),
                    relay: from,
                    reason,
                });
            }
            _ => {}
        }
        true
    }

    /// Sends the Binds and keepalive Pings that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (b, t) in &mut self.bindings {
            if now >= b.next_send {
                b.send(t, "", now, &mut self.transmits);
            }
            if b.channel.is_some() && now >= b.next_keepalive {
                b.next_keepalive = now + AGENT_KEEPALIVE;
                let ping = Frame::Ping {
                    nonce: rand::random(),
                };
                self.transmits.push_back((b.relay, ping.to_vec()));
            }
        }
    }

    /// When [`AgentRelays::handle_timeout`] wants to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.bindings
            .iter()
            .flat_map(|(b, _)| {
                std::iter::once(b.next_send).chain(b.channel.map(|_| b.next_keepalive))
            })
            .min()
    }

    /// The next datagram to send: (relay, frame).
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }

    /// Every binding.
    pub fn bindings(&self) -> impl Iterator<Item = AgentBindingStatus> + '_ {
        self.bindings.iter().map(|(b, _)| AgentBindingStatus {
            relay: b.relay,
            channel: b.channel,
            last_bound: b.last_bound,
            refused: b.was_refused,
        })
    }

    /// Whether `addr` is one of our relays (Data from anywhere else is not relayed).
    pub fn is_relay(&self, addr: SocketAddr) -> bool {
        self.bindings.iter().any(|(b, _)| b.relay == addr)
    }
}

/// Pings to one relay.
#[derive(Debug)]
struct Probe {
    srtt: Option<Duration>,
    /// Recent pings (nonce, sent), newest last: a late pong still counts.
    sent: VecDeque<(u64, Instant)>,
    unanswered: u32,
    next_ping: Instant,
    observed: Option<SocketAddr>,
}

impl Probe {
    fn new(now: Instant) -> Self {
        Probe {
            srtt: None,
            sent: VecDeque::new(),
            unanswered: 0,
            next_ping: now,
            observed: None,
        }
    }

    fn alive(&self) -> bool {
        self.unanswered <= MISSED_PINGS
    }

    fn ping(&mut self, now: Instant) -> u64 {
        let nonce = rand::random();
        if self.sent.len() > MISSED_PINGS as usize {
            self.sent.pop_front();
        }
        self.sent.push_back((nonce, now));
        self.unanswered += 1;
        self.next_ping = now + PING_INTERVAL;
        nonce
    }

    fn pong(&mut self, nonce: u64, observed: SocketAddr, now: Instant) -> bool {
        let Some(i) = self.sent.iter().position(|(n, _)| *n == nonce) else {
            return false;
        };
        let (_, sent) = self.sent.remove(i).expect("position found");
        let sample = now.saturating_duration_since(sent);
        // RFC 6298's smoothing (alpha 1/8).
        self.srtt = Some(match self.srtt {
            None => sample,
            Some(s) => (s * 7 + sample) / 8,
        });
        self.observed = Some(observed);
        self.heard();
        true
    }

    fn heard(&mut self) {
        self.unanswered = 0;
    }
}

/// One binding: Bind sent, answered, refreshed.
#[derive(Debug)]
struct Binding {
    relay: SocketAddr,
    /// The nonces of the last Binds sent (an answer to the one before the last counts).
    nonces: [u64; 2],
    channel: Option<u32>,
    next_send: Instant,
    retry: Duration,
    refresh: Duration,
    last_bound: Option<Instant>,
    /// Refused, waiting for a new ticket or a reselection.
    refused: bool,
    was_refused: bool,
    /// When the agent next pings this relay, while bound ([`AGENT_KEEPALIVE`]).
    next_keepalive: Instant,
}

impl Binding {
    fn new(relay: SocketAddr, now: Instant) -> Self {
        Binding {
            relay,
            nonces: [0; 2],
            channel: None,
            next_send: now,
            retry: BIND_RETRY,
            refresh: REBIND_INTERVAL,
            last_bound: None,
            refused: false,
            was_refused: false,
            next_keepalive: now + AGENT_KEEPALIVE,
        }
    }

    fn path(&self) -> Option<Path> {
        Some(Path {
            remote: self.relay,
            channel: Some(self.channel?),
        })
    }

    fn answers(&self, from: SocketAddr, nonce: u64) -> bool {
        from == self.relay && nonce != 0 && self.nonces.contains(&nonce)
    }

    fn send(
        &mut self,
        ticket: &[u8],
        site: &str,
        now: Instant,
        out: &mut VecDeque<(SocketAddr, Vec<u8>)>,
    ) {
        let nonce = rand::random::<u64>() | 1;
        self.nonces = [self.nonces[1], nonce];
        out.push_back((
            self.relay,
            Frame::Bind {
                nonce,
                ticket,
                site,
                via: None,
            }
            .to_vec(),
        ));
        // Until answered, retry sooner and sooner less often; the answer sets the refresh.
        self.next_send = now + self.retry;
        self.next_keepalive = now + AGENT_KEEPALIVE;
        self.retry = (self.retry * 2).min(self.refresh);
    }

    /// Whether the channel is new.
    fn bound(&mut self, channel: u32, lifetime: u16, now: Instant) -> bool {
        let changed = self.channel != Some(channel);
        self.channel = Some(channel);
        self.refused = false;
        self.was_refused = false;
        self.last_bound = Some(now);
        self.refresh = REBIND_INTERVAL.min(Duration::from_secs(u64::from(lifetime.max(2)) / 2));
        self.retry = BIND_RETRY;
        self.next_send = now + self.refresh;
        self.nonces = [0; 2];
        changed
    }

    fn refuse(&mut self, now: Instant) {
        self.channel = None;
        self.refused = true;
        self.was_refused = true;
        self.nonces = [0; 2];
        self.next_send = now + REFUSED_BACKOFF;
        self.retry = BIND_RETRY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, i], 7401))
    }

    const ME: SocketAddr = SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 7)),
        51820,
    );

    /// A fake network of relays with fixed RTTs (ms), each answering or not, driving a
    /// `ClientRelays` on a fake clock.
    struct Net {
        c: ClientRelays,
        now: Instant,
        rtt_ms: HashMap<SocketAddr, u64>,
        down: Vec<SocketAddr>,
        refuse: Vec<SocketAddr>,
        channel: u32,
        /// (deliver at, from, frame).
        inflight: Vec<(Instant, SocketAddr, Vec<u8>)>,
        binds: Vec<SocketAddr>,
        events: Vec<RelayEvent>,
    }

    impl Net {
        fn new(rtts: &[(u8, u64)]) -> Self {
            Net {
                c: ClientRelays::new(),
                now: Instant::now(),
                rtt_ms: rtts.iter().map(|&(i, r)| (addr(i), r)).collect(),
                down: vec![],
                refuse: vec![],
                channel: 100,
                inflight: vec![],
                binds: vec![],
                events: vec![],
            }
        }

        fn drain(&mut self) {
            while let Some((to, b)) = self.c.poll_transmit() {
                if self.down.contains(&to) {
                    continue;
                }
                let rtt = Duration::from_millis(self.rtt_ms[&to]);
                let answer = match Frame::decode(&b).unwrap() {
                    Frame::Ping { nonce } => Frame::Pong {
                        nonce,
                        observed: ME,
                    }
                    .to_vec(),
                    Frame::Bind { nonce, site, .. } => {
                        assert_eq!(site, "site-a");
                        self.binds.push(to);
                        if self.refuse.contains(&to) {
                            Frame::Refused {
                                nonce,
                                reason: Refusal::SiteUnreachable,
                            }
                            .to_vec()
                        } else {
                            self.channel += 1;
                            Frame::Bound {
                                nonce,
                                channel: self.channel,
                                lifetime: 30,
                            }
                            .to_vec()
                        }
                    }
                    f => panic!("a client sent {f:?}"),
                };
                self.inflight.push((self.now + rtt, to, answer));
            }
            while let Some(e) = self.c.poll_event() {
                self.events.push(e);
            }
        }

        /// Runs the fake clock for `d`, in 1 ms steps.
        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            self.drain();
            while self.now < end {
                self.now += Duration::from_millis(1);
                let due: Vec<_> = {
                    let now = self.now;
                    let (due, rest) = std::mem::take(&mut self.inflight)
                        .into_iter()
                        .partition(|(t, _, _)| *t <= now);
                    self.inflight = rest;
                    due
                };
                for (_, from, b) in due {
                    let f = Frame::decode(&b).unwrap();
                    self.c.handle_frame(from, &f, self.now);
                }
                if self.c.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.c.handle_timeout(self.now);
                }
                self.drain();
            }
        }

        fn relay(&self) -> Option<SocketAddr> {
            self.c.site_status("site-a").unwrap().relay
        }
    }

    fn start(rtts: &[(u8, u64)]) -> Net {
        let mut n = Net::new(rtts);
        let relays = rtts.iter().map(|&(i, _)| addr(i)).collect();
        n.c.set_site("site-a", relays, b"ticket".to_vec(), n.now)
            .unwrap();
        n
    }

    #[test]
    fn the_closest_relay_is_chosen_and_bound() {
        let mut n = start(&[(1, 40), (2, 12), (3, 80)]);
        n.run(Duration::from_millis(200));
        assert_eq!(n.relay(), Some(addr(2)));
        let st = n.c.site_status("site-a").unwrap();
        assert_eq!(st.rtt, Some(Duration::from_millis(12)));
        let path = n.c.path("site-a").unwrap();
        assert_eq!(path.remote, addr(2));
        assert!(matches!(
            n.events.as_slice(),
            [RelayEvent::Bound { site, relay, .. }] if site == "site-a" && *relay == addr(2)
        ));
        assert_eq!(n.binds, vec![addr(2)]);
        let seen: Vec<_> = n.c.relays().map(|r| r.observed).collect();
        assert!(seen.iter().all(|o| *o == Some(ME)));
    }

    #[test]
    fn small_improvements_do_not_move_a_site_big_ones_do() {
        let mut n = start(&[(1, 30), (2, 60)]);
        n.run(Duration::from_millis(100));
        assert_eq!(n.relay(), Some(addr(1)));
        // Relay 2 becomes a bit faster than 1: 25 vs 30 ms is under 30 % better.
        n.rtt_ms.insert(addr(2), 25);
        n.run(Duration::from_secs(60));
        assert_eq!(n.relay(), Some(addr(1)), "sticky");
        // 15 vs 30 ms: 50 % and 15 ms better, so move.
        n.rtt_ms.insert(addr(2), 15);
        n.run(Duration::from_secs(60));
        assert_eq!(n.relay(), Some(addr(2)));
        // 9 vs 15 ms: 40 % better but only 6 ms: stays.
        n.rtt_ms.insert(addr(1), 9);
        n.run(Duration::from_secs(60));
        assert_eq!(n.relay(), Some(addr(2)), "10 ms margin");
    }

    #[test]
    fn a_relay_that_stops_answering_is_left_after_three_missed_pings() {
        let mut n = start(&[(1, 10), (2, 50)]);
        n.run(Duration::from_millis(100));
        assert_eq!(n.relay(), Some(addr(1)));
        n.events.clear();
        n.down.push(addr(1));
        let t0 = n.now;
        while n.relay() != Some(addr(2)) {
            n.run(Duration::from_millis(100));
            assert!(n.now - t0 < Duration::from_secs(10), "no failover");
        }
        let took = n.now - t0;
        assert!(
            took >= Duration::from_secs(2) && took <= Duration::from_millis(4200),
            "{took:?}"
        );
        assert!(n.events.contains(&RelayEvent::Lost { relay: addr(1) }));
        assert_eq!(n.c.path("site-a").unwrap().remote, addr(2));
        // It comes back: not chosen again for a better RTT unless clearly better (10 vs 50
        // ms is), and then only once it has answered.
        n.down.clear();
        n.run(Duration::from_secs(5));
        assert_eq!(n.relay(), Some(addr(1)));
    }

    #[test]
    fn a_refused_binding_moves_the_site_and_a_new_ticket_retries() {
        let mut n = start(&[(1, 10), (2, 50)]);
        n.refuse.push(addr(1));
        n.run(Duration::from_millis(300));
        assert_eq!(n.relay(), Some(addr(2)));
        assert!(n.events.iter().any(|e| matches!(e,
            RelayEvent::Refused { relay, reason: Refusal::SiteUnreachable, .. } if *relay == addr(1))));
        // The refusal holds for a while; a new ticket lifts it, and relay 1 is better.
        n.refuse.clear();
        n.run(Duration::from_secs(2));
        assert_eq!(n.relay(), Some(addr(2)));
        n.c.set_site(
            "site-a",
            vec![addr(1), addr(2)],
            b"ticket-2".to_vec(),
            n.now,
        )
        .unwrap();
        // Clearly better, but a move waits until it has been so for SWITCH_DWELL.
        n.run(Duration::from_millis(300));
        assert_eq!(n.relay(), Some(addr(2)), "moved before the dwell");
        n.run(SWITCH_DWELL + Duration::from_secs(2));
        assert_eq!(n.relay(), Some(addr(1)));
    }

    #[test]
    fn bindings_are_refreshed_and_unanswered_binds_retried() {
        let mut n = start(&[(1, 10)]);
        n.run(Duration::from_secs(1));
        assert_eq!(n.binds.len(), 1);
        // Refreshed every 10 s (lifetime 30 s allows that).
        n.run(Duration::from_secs(21));
        assert_eq!(n.binds.len(), 3);
        assert!(n.c.path("site-a").is_some());
        // A new channel on refresh is taken, and said.
        let ch = n.c.path("site-a").unwrap().channel;
        assert_ne!(ch, Some(101));
    }

    #[test]
    fn frames_from_strangers_or_with_unknown_nonces_are_ignored() {
        let mut n = start(&[(1, 10)]);
        n.run(Duration::from_millis(50));
        let before = n.c.path("site-a");
        let bogus = [
            (
                addr(9),
                Frame::Bound {
                    nonce: 1,
                    channel: 7,
                    lifetime: 30,
                },
            ),
            (
                addr(1),
                Frame::Bound {
                    nonce: 12345,
                    channel: 7,
                    lifetime: 30,
                },
            ),
            (
                addr(1),
                Frame::Refused {
                    nonce: 12345,
                    reason: Refusal::Full,
                },
            ),
            (
                addr(1),
                Frame::Pong {
                    nonce: 5,
                    observed: ME,
                },
            ),
            (addr(1), Frame::Ping { nonce: 5 }),
        ];
        for (from, f) in bogus {
            assert!(!n.c.handle_frame(from, &f, n.now));
        }
        assert_eq!(n.c.path("site-a"), before);
    }

    #[test]
    fn removing_a_site_stops_its_pings() {
        let mut n = start(&[(1, 10)]);
        n.run(Duration::from_millis(50));
        n.c.remove_site("site-a", n.now);
        assert_eq!(n.c.poll_timeout(), None);
        assert_eq!(n.c.relays().count(), 0);
    }

    #[test]
    fn an_agent_binds_to_every_relay_and_keeps_binding() {
        let now = Instant::now();
        let mut a = AgentRelays::new();
        a.set_relays(
            vec![(addr(1), b"t1".to_vec()), (addr(2), b"t2".to_vec())],
            now,
        )
        .unwrap();
        let mut sent = vec![];
        while let Some((to, b)) = a.poll_transmit() {
            let Frame::Bind {
                nonce,
                ticket,
                site,
                ..
            } = Frame::decode(&b).unwrap()
            else {
                panic!()
            };
            assert_eq!(site, "");
            sent.push((to, nonce, ticket.to_vec()));
        }
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].2, b"t1");
        // Relay 1 binds, relay 2 stays silent: retried after 1 s, then 2 s.
        let (r1, n1, _) = sent[0].clone();
        assert!(a.handle_frame(
            r1,
            &Frame::Bound {
                nonce: n1,
                channel: 9,
                lifetime: 30
            },
            now
        ));
        assert_eq!(
            a.poll_event(),
            Some(RelayEvent::Bound {
                site: String::new(),
                relay: r1,
                channel: 9
            })
        );
        assert_eq!(a.poll_timeout(), Some(now + BIND_RETRY));
        a.handle_timeout(now + BIND_RETRY);
        let (to, _) = a.poll_transmit().unwrap();
        assert_eq!(to, addr(2));
        // Next: bound relay 1's keepalive (2 s), then relay 2's retry (3 s).
        assert_eq!(a.poll_timeout(), Some(now + AGENT_KEEPALIVE));
        a.handle_timeout(now + AGENT_KEEPALIVE);
        let (to, ping) = a.poll_transmit().unwrap();
        assert_eq!(to, addr(1));
        assert!(matches!(Frame::decode(&ping).unwrap(), Frame::Ping { .. }));
        assert_eq!(a.poll_timeout(), Some(now + BIND_RETRY + 2 * BIND_RETRY));
        // Relay 1 is bound again at 10 s.
        a.handle_timeout(now + REBIND_INTERVAL);
        let tos: Vec<_> = std::iter::from_fn(|| a.poll_transmit())
            .map(|(t, _)| t)
            .collect();
        assert!(tos.contains(&addr(1)));
        // A relay dropped from the set is forgotten; a refused one is asked again later.
        a.set_relays(vec![(addr(2), b"t2".to_vec())], now).unwrap();
        assert!(!a.is_relay(addr(1)));
        assert_eq!(a.bindings().count(), 1);
    }

    #[test]
    fn an_agent_pings_each_bound_relay_between_its_binds_to_keep_its_nat_mapping() {
        let now = Instant::now();
        let mut a = AgentRelays::new();
        a.set_relays(
            vec![(addr(1), b"t1".to_vec()), (addr(2), b"t2".to_vec())],
            now,
        )
        .unwrap();
        let binds: Vec<(SocketAddr, u64)> = std::iter::from_fn(|| a.poll_transmit())
            .map(|(to, b)| match Frame::decode(&b).unwrap() {
                Frame::Bind { nonce, .. } => (to, nonce),
                f => panic!("{f:?}"),
            })
            .collect();
        // Relay 1 answers; relay 2 never does.
        let bound = Frame::Bound {
            nonce: binds[0].1,
            channel: 9,
            lifetime: 30,
        };
        assert!(a.handle_frame(addr(1), &bound, now));
        // Over one Bind interval, relay 1 hears from the agent at least every
        // AGENT_KEEPALIVE; nothing keeps the unbound relay 2's mapping (it gets its retries).
        let mut last = now;
        let mut t = now;
        while t < now + REBIND_INTERVAL + AGENT_KEEPALIVE {
            t = a.poll_timeout().unwrap();
            a.handle_timeout(t);
            let sent: Vec<_> = std::iter::from_fn(|| a.poll_transmit()).collect();
            for (to, b) in sent {
                if to != addr(1) {
                    continue;
                }
                assert!(
                    t - last <= AGENT_KEEPALIVE,
                    "{:?} without a packet to relay 1",
                    t - last
                );
                last = t;
                if let Frame::Ping { nonce } = Frame::decode(&b).unwrap() {
                    let pong = Frame::Pong {
                        nonce,
                        observed: addr(9),
                    };
                    assert!(a.handle_frame(addr(1), &pong, t), "the Pong is the agent's");
                }
            }
        }
        assert!(last > now + REBIND_INTERVAL, "kept up past the next Bind");
        // A Pong from a stranger is not.
        let pong = Frame::Pong {
            nonce: 1,
            observed: addr(9),
        };
        assert!(!a.handle_frame(addr(7), &pong, t));
    }
}
