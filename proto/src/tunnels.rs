//! The agent's tunnels, without I/O: which nodes a `warren-agent` keeps tunnels to, when it
//! dials them and which tunnel it moves ([`TunnelSet`]), and what each tunnel's control
//! stream means ([`Control`]).
//!
//! The agent's driver task (`agent/src/tunnel.rs`) owns one [`TunnelSet`], feeds it what its
//! tunnel and probe tasks report, does what it asks and sleeps until it wants the time:
//!
//! ```text
//!   driver task (agent)                                   TunnelSet (here)
//!   ─────────────────────────────────────────             ─────────────────────────────
//!   tunnel task: handshake done, Hello sent  ──────────►  handle_dialed(addr, rtt, now)
//!   tunnel task: no tunnel                   ──────────►  handle_dial_failed(addr, now)
//!   tunnel task: the tunnel ended            ──────────►  handle_closed(addr, how, now)
//!   probe task: handshake time, or none      ──────────►  handle_probe(addr, rtt, now)
//!   a node's SiteConfig: the cluster's nodes ──────────►  handle_learned(nodes, now)
//!   the timer fired                          ──────────►  handle_timeout(now)
//!   spawn a tunnel task / a probe / close    ◄──────────  poll_action(): Dial, Probe, Close
//!   log it                                   ◄──────────  poll_event(): Learned, Forgot
//!   re-arm the one timer                     ◄──────────  poll_timeout()
//! ```
//!
//! Node addresses are the strings the operator and the cluster give (`host:port`); this
//! module never resolves them.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use crate::tunnel::{PeerProtocol, SiteConfig, ToAgent, Unknowns};

/// How many tunnels an agent keeps (dialling or up).
pub const TUNNELS: usize = 2;
/// The wait after a node's first failure, before jitter; it doubles with every further one.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// The longest wait before dialling a node again, before jitter.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A tunnel that stayed up longer than this was a good one: its node's failures start over.
pub const LONG_LIVED: Duration = Duration::from_secs(10);
/// How often the nodes without a tunnel are measured, to move a tunnel to a closer one.
pub const REBALANCE_EVERY: Duration = Duration::from_secs(15);
/// A node replaces the slowest tunnel when its handshake takes less than this share of that
/// tunnel's (so measurement noise never moves tunnels back and forth).
pub const CLOSER: f64 = 0.7;
/// ...and at least this much less: on one LAN or host every node answers within a
/// millisecond, and a ratio of two such times is noise (tunnels moved every round,
/// taking the agent's relay binding with them).
pub const MIN_GAIN: Duration = Duration::from_millis(5);
/// The most nodes the set knows (seeds included); a longer list from a node is cut, so a
/// wrong configuration cannot make the agent probe thousands of addresses.
pub const MAX_NODES: usize = 64;

/// The wait before dialling a node again after its `failures`-th failure, before jitter:
/// 500 ms · 2^failures, capped at [`MAX_BACKOFF`]. The actual wait is 50% to 100% of it.
pub fn backoff_base(failures: u32) -> Duration {
    // 2^6 · 500 ms is already over the cap: stop doubling there, so nothing overflows.
    (BACKOFF_BASE * 2u32.pow(failures.min(6))).min(MAX_BACKOFF)
}

/// Whether `addr` looks like a node address (`host:port`, port 1 to 65535, no whitespace).
/// Entries of a node list that do not are ignored.
pub fn is_node_address(addr: &str) -> bool {
    // 253 (the longest DNS name) + brackets + ":" + port.
    if addr.len() > 262 || addr.chars().any(char::is_whitespace) {
        return false;
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
}

/// Which nodes the agent keeps tunnels to, when it dials them and which tunnel it moves.
///
/// # Policy
///
/// - It keeps [`TUNNELS`] tunnels (counting the ones being dialled). A node is dialled when
///   a slot is free and its retry time has passed; among several, the one with the fewest
///   failures first (so never-tried before failed), then the closest (the shortest
///   handshake measured, unmeasured counting as closest), then the order it became known
///   (seeds first, in the order given).
/// - A node is never dialled twice at once, and never probed while it is being dialled or
///   carries a tunnel (it may be dialled while its probe is out: a probe holds no slot).
/// - A failed dial, and a tunnel that ends, count a failure and wait
///   [`backoff_base`]`(failures)` with 50–100% jitter (so agents do not dial in lockstep);
///   a tunnel that lived over [`LONG_LIVED`] first resets the count, so a node that was fine
///   for a while is retried within a second.
/// - Every [`REBALANCE_EVERY`] the idle nodes whose retry time has passed are probed (a
///   handshake, timed by the driver). When every slot carries a tunnel and a probed node's
///   handshake is under [`CLOSER`] times that of the slowest tunnel and at least
///   [`MIN_GAIN`] shorter, that tunnel is closed
///   ([`Action::Close`]) and the closer node dialled at once, if it is still idle, past its
///   retry time and still a node of the cluster; at most one move per round. A
///   tunnel closed this way was healthy: its node keeps no failure and may be dialled again
///   at once (say, if the closer node then fails).
/// - A node that refused this build's Hello (it predates protocol negotiation, see
///   [`crate::tunnel`]) is greeted with a [`crate::tunnel::LegacyHello`] on its next dial
///   only: once a tunnel with it ends, the next dial tries the Hello again (the node may
///   have been upgraded). A dial that fails before reaching it keeps that memory.
/// - Node lists ([`TunnelSet::handle_learned`]): unknown nodes are added and may be
///   dialled at once. A node that was learned and is absent from the latest list is
///   forgotten ([`Event::Forgot`]) as soon as it carries no tunnel, dial or probe: the
///   cluster removed it. Until then it is never dialled or moved to; its live tunnel is not
///   cut (it still works; it ends when the node goes, or moves to a closer node). Seeds
///   (the operator's `--node` addresses) are never forgotten. A list that flaps (two nodes
///   at different registry versions) costs a forgotten node its failure count.
///
/// # Calling order
///
/// 1. [`TunnelSet::new`] with the seeds; it already queues the first dials.
/// 2. Drain [`TunnelSet::poll_action`] and perform every action; drain
///    [`TunnelSet::poll_event`].
/// 3. Wait for the first of: a task's report, a new node list, [`TunnelSet::poll_timeout`].
/// 4. Call the matching `handle_*` with the current time (never earlier than the last one),
///    then go to 2. Timers due by `now` fire in any `handle_*`, not only in
///    [`TunnelSet::handle_timeout`].
///
/// Every [`Action::Dial`] gets exactly one [`TunnelSet::handle_dialed`] or
/// [`TunnelSet::handle_dial_failed`]; every tunnel reported dialled gets exactly one
/// [`TunnelSet::handle_closed`], also after an [`Action::Close`]; every [`Action::Probe`]
/// gets exactly one [`TunnelSet::handle_probe`]. Reports that match nothing outstanding are
/// ignored.
#[derive(Debug)]
pub struct TunnelSet {
    /// Seeds first, then learned nodes, in the order they became known (the tie-break).
    nodes: Vec<Node>,
    rng: StdRng,
    next_round: Instant,
    /// Whether this rebalance round already moved a tunnel.
    moved: bool,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
}

/// What the set asks of its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Dial `addr` and keep a tunnel there; report [`TunnelSet::handle_dialed`] once the
    /// handshake is done and the first control message sent (its duration: the handshake
    /// alone), or [`TunnelSet::handle_dial_failed`].
    Dial {
        /// The node.
        addr: String,
        /// Greet with a [`crate::tunnel::LegacyHello`] instead of this build's Hello.
        legacy_hello: bool,
    },
    /// Time a handshake with `addr` and close it; report [`TunnelSet::handle_probe`].
    Probe {
        /// The node.
        addr: String,
    },
    /// Close the tunnel to `addr` (a QUIC close with [`CloseReason::message`]); report
    /// [`TunnelSet::handle_closed`] when it has ended.
    Close {
        /// The node.
        addr: String,
        /// Why.
        reason: CloseReason,
    },
}

/// Why the set closes a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Another node answers clearly faster; it is dialled at the same time.
    Closer {
        /// The closer node.
        to: String,
    },
}

impl CloseReason {
    /// The reason sent with the QUIC close (the node may log it).
    pub fn message(&self) -> &'static str {
        match self {
            Self::Closer { .. } => "moving to a closer node",
        }
    }
}

/// How a tunnel ended, as the driver saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The connection or its control stream ended, either side, any reason (including
    /// an [`Action::Close`]).
    Lost,
    /// The node closed the connection with [`crate::tunnel::CLOSE_BAD_HELLO`] before
    /// sending anything: it predates negotiation and refused this build's Hello.
    HelloRefused,
}

/// What the set tells its driver, to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A node list named a node the set did not know; it may be dialled now.
    Learned {
        /// The node.
        addr: String,
    },
    /// A learned node left the cluster's list and has nothing outstanding: never dialled
    /// again unless a later list names it.
    Forgot {
        /// The node.
        addr: String,
    },
}

/// Where a node's tunnel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelState {
    /// No tunnel: dialled once its retry time has passed and a slot is free.
    Idle,
    /// Asked to dial, not yet told how it went. Counts as a tunnel.
    Dialing,
    /// Carries a tunnel.
    Up {
        /// When it came up.
        since: Instant,
    },
    /// Asked to close (to move to a closer node), not yet told it ended. Does not count as
    /// a tunnel: the closer node is dialled meanwhile.
    Closing,
}

/// One node, as the set sees it (for logs, status output and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus<'a> {
    /// Its address.
    pub addr: &'a str,
    /// Its tunnel.
    pub state: TunnelState,
    /// A probe is outstanding.
    pub probing: bool,
    /// The last handshake time measured (tunnel or probe).
    pub rtt: Option<Duration>,
    /// Failures since the last long-lived tunnel or move.
    pub failures: u32,
    /// Not dialled before this (meaningful when idle).
    pub retry_at: Instant,
    /// Given by the operator: never forgotten.
    pub seed: bool,
    /// Named by the latest node list.
    pub listed: bool,
    /// Its next dial greets with a legacy hello.
    pub legacy_hello: bool,
}

#[derive(Debug)]
struct Node {
    addr: String,
    seed: bool,
    listed: bool,
    state: TunnelState,
    probing: bool,
    rtt: Option<Duration>,
    failures: u32,
    retry_at: Instant,
    legacy_hello: bool,
}

impl Node {
    fn new(addr: String, seed: bool, now: Instant) -> Self {
        Self {
            addr,
            seed,
            listed: !seed,
            state: TunnelState::Idle,
            probing: false,
            rtt: None,
            failures: 0,
            retry_at: now,
            legacy_hello: false,
        }
    }

    /// A seed, or named by the latest list: it may be dialled, probed, moved to.
    fn wanted(&self) -> bool {
        self.seed || self.listed
    }

    /// The cluster dropped it and nothing about it is outstanding.
    fn gone(&self) -> bool {
        !self.wanted() && self.state == TunnelState::Idle && !self.probing
    }

    fn status(&self) -> NodeStatus<'_> {
        NodeStatus {
            addr: &self.addr,
            state: self.state,
            probing: self.probing,
            rtt: self.rtt,
            failures: self.failures,
            retry_at: self.retry_at,
            seed: self.seed,
            listed: self.listed,
            legacy_hello: self.legacy_hello,
        }
    }
}

impl TunnelSet {
    /// A set that starts from `seeds` (duplicates dropped) at `now` and queues their first
    /// dials. `rng_seed` drives the jitter: the same seed and inputs give the same actions.
    pub fn new(seeds: impl IntoIterator<Item = String>, rng_seed: u64, now: Instant) -> Self {
        let mut set = Self {
            nodes: Vec::new(),
            rng: StdRng::seed_from_u64(rng_seed),
            next_round: now + REBALANCE_EVERY,
            moved: false,
            actions: VecDeque::new(),
            events: VecDeque::new(),
        };
        for addr in seeds {
            if set.index(&addr).is_none() {
                set.nodes.push(Node::new(addr, true, now));
            }
        }
        set.step(now);
        set
    }

    /// The timer from [`TunnelSet::poll_timeout`] fired (or any time: nothing happens early).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.step(now);
    }

    /// The tunnel to `addr` is up; its handshake took `handshake`.
    pub fn handle_dialed(&mut self, addr: &str, handshake: Duration, now: Instant) {
        if let Some(n) = self.node_mut(addr) {
            if n.state == TunnelState::Dialing {
                n.state = TunnelState::Up { since: now };
                n.rtt = Some(handshake);
            }
        }
        self.step(now);
    }

    /// The tunnel to `addr` measures `rtt` now (its connection's path RTT). A tunnel's
    /// handshake is timed once, when it is dialled, often under the load of a start; without
    /// a fresh figure a probe of an idle node would be compared with that stale one and move
    /// a tunnel for nothing (each move also moves the agent's relay binding).
    pub fn handle_tunnel_rtt(&mut self, addr: &str, rtt: Duration) {
        if let Some(n) = self.node_mut(addr) {
            if matches!(n.state, TunnelState::Up { .. }) {
                n.rtt = Some(rtt);
            }
        }
    }

    /// Dialling `addr` gave no tunnel.
    pub fn handle_dial_failed(&mut self, addr: &str, now: Instant) {
        if let Some(i) = self.index(addr) {
            if self.nodes[i].state == TunnelState::Dialing {
                self.nodes[i].state = TunnelState::Idle;
                self.fail(i, now);
                self.forget_if_gone(i);
            }
        }
        self.step(now);
    }

    /// The tunnel to `addr` ended, `how`.
    pub fn handle_closed(&mut self, addr: &str, how: Closed, now: Instant) {
        if let Some(i) = self.index(addr) {
            let n = &mut self.nodes[i];
            match n.state {
                TunnelState::Up { since } => {
                    if now.saturating_duration_since(since) > LONG_LIVED {
                        n.failures = 0;
                    }
                    n.state = TunnelState::Idle;
                    self.fail(i, now);
                }
                TunnelState::Closing => {
                    // Closed on purpose, and it was healthy: nothing to back off from.
                    n.state = TunnelState::Idle;
                    n.failures = 0;
                    n.retry_at = now;
                }
                TunnelState::Idle | TunnelState::Dialing => return self.step(now),
            }
            self.nodes[i].legacy_hello = how == Closed::HelloRefused;
            self.forget_if_gone(i);
        }
        self.step(now);
    }

    /// The probe of `addr` took `handshake`, or got no answer (`None`).
    pub fn handle_probe(&mut self, addr: &str, handshake: Option<Duration>, now: Instant) {
        if let Some(i) = self.index(addr) {
            if self.nodes[i].probing {
                self.nodes[i].probing = false;
                if let Some(rtt) = handshake {
                    self.nodes[i].rtt = Some(rtt);
                    // Not before its retry time: it may have been dialled, and failed,
                    // while the probe was out.
                    let n = &self.nodes[i];
                    if n.state == TunnelState::Idle && n.retry_at <= now && n.wanted() {
                        self.consider_move(i, rtt);
                    }
                }
                self.forget_if_gone(i);
            }
        }
        self.step(now);
    }

    /// A node sent the cluster's node list (its [`SiteConfig::nodes`]). Entries that are no
    /// node address are ignored, and the set stops learning at [`MAX_NODES`].
    pub fn handle_learned(&mut self, nodes: &[String], now: Instant) {
        let listed: HashSet<&str> = nodes
            .iter()
            .map(String::as_str)
            .filter(|a| is_node_address(a))
            .collect();
        for n in &mut self.nodes {
            n.listed = listed.contains(n.addr.as_str());
        }
        // Forget first, so the room they leave goes to the new ones.
        let mut i = 0;
        while i < self.nodes.len() {
            if !self.forget_if_gone(i) {
                i += 1;
            }
        }
        for addr in nodes {
            if self.nodes.len() >= MAX_NODES {
                break;
            }
            if listed.contains(addr.as_str()) && self.index(addr).is_none() {
                self.nodes.push(Node::new(addr.clone(), false, now));
                self.events.push_back(Event::Learned { addr: addr.clone() });
            }
        }
        self.step(now);
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next thing to log, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`TunnelSet::handle_timeout`]: the next rebalance round, or the next
    /// retry time when a slot is free. Always `Some` (rebalancing never stops); strictly
    /// after the last `now` once the actions are drained.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut at = self.next_round;
        if self.tunnels() < TUNNELS {
            for n in &self.nodes {
                if n.state == TunnelState::Idle && n.wanted() {
                    at = at.min(n.retry_at);
                }
            }
        }
        Some(at)
    }

    /// How many tunnels are up or being dialled.
    pub fn tunnels(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| matches!(n.state, TunnelState::Dialing | TunnelState::Up { .. }))
            .count()
    }

    /// Every node the set knows, seeds first.
    pub fn nodes(&self) -> impl Iterator<Item = NodeStatus<'_>> {
        self.nodes.iter().map(Node::status)
    }

    /// The node at `addr`, if the set knows it.
    pub fn node(&self, addr: &str) -> Option<NodeStatus<'_>> {
        self.index(addr).map(|i| self.nodes[i].status())
    }

    fn index(&self, addr: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr == addr)
    }

    fn node_mut(&mut self, addr: &str) -> Option<&mut Node> {
        self.nodes.iter_mut().find(|n| n.addr == addr)
    }

    /// Counts a failure of node `i` and sets its retry time.
    fn fail(&mut self, i: usize, now: Instant) {
        let n = &mut self.nodes[i];
        n.failures = n.failures.saturating_add(1);
        let base = backoff_base(n.failures);
        n.retry_at = now + base.mul_f64(self.rng.gen_range(0.5..=1.0));
    }

    /// Forgets node `i` if the cluster dropped it and nothing is outstanding; true if it did.
    fn forget_if_gone(&mut self, i: usize) -> bool {
        if !self.nodes[i].gone() {
            return false;
        }
        let n = self.nodes.remove(i);
        self.events.push_back(Event::Forgot { addr: n.addr });
        true
    }

    /// Fires what is due: dials into free slots, then the rebalance round (so a node a slot
    /// needs is dialled rather than probed).
    fn step(&mut self, now: Instant) {
        self.dial_ready(now);
        if now >= self.next_round {
            self.next_round = now + REBALANCE_EVERY;
            self.moved = false;
            for n in &mut self.nodes {
                if n.state == TunnelState::Idle && !n.probing && n.retry_at <= now && n.wanted() {
                    n.probing = true;
                    self.actions.push_back(Action::Probe {
                        addr: n.addr.clone(),
                    });
                }
            }
        }
    }

    fn dial_ready(&mut self, now: Instant) {
        let free = TUNNELS.saturating_sub(self.tunnels());
        if free == 0 {
            return;
        }
        let mut ready: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                let n = &self.nodes[i];
                n.state == TunnelState::Idle && n.retry_at <= now && n.wanted()
            })
            .collect();
        // Stable: equal keys keep the order the nodes became known.
        ready.sort_by_key(|&i| {
            let n = &self.nodes[i];
            (n.failures, n.rtt.unwrap_or(Duration::ZERO))
        });
        for i in ready.into_iter().take(free) {
            self.dial(i);
        }
    }

    fn dial(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.state = TunnelState::Dialing;
        self.actions.push_back(Action::Dial {
            addr: n.addr.clone(),
            legacy_hello: n.legacy_hello,
        });
    }

    /// Idle node `i` answered a probe in `rtt`: moves the slowest tunnel to it if it is
    /// clearly closer and every slot carries a tunnel.
    fn consider_move(&mut self, i: usize, rtt: Duration) {
        if self.moved {
            return;
        }
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| matches!(self.nodes[j].state, TunnelState::Up { .. }))
            .collect();
        if up.len() < TUNNELS {
            return;
        }
        let Some(slowest) = up.into_iter().max_by_key(|&j| self.nodes[j].rtt) else {
            return;
        };
        let Some(slowest_rtt) = self.nodes[slowest].rtt else {
            return;
        };
        if rtt.as_secs_f64() >= slowest_rtt.as_secs_f64() * CLOSER
            || slowest_rtt.saturating_sub(rtt) < MIN_GAIN
        {
            return;
        }
        self.moved = true;
        self.nodes[slowest].state = TunnelState::Closing;
        self.actions.push_back(Action::Close {
            addr: self.nodes[slowest].addr.clone(),
            reason: CloseReason::Closer {
                to: self.nodes[i].addr.clone(),
            },
        });
        self.dial(i);
    }
}

/// The agent's side of one tunnel's control stream, without I/O: the tunnel task reads
/// each message from the node, hands it to [`Control::handle_message`] and does what the
/// returned [`ControlEvent`] says; before sending anything it asks [`Control::node`]
/// whether the node understands it ([`PeerProtocol::accepts`]).
#[derive(Debug)]
pub struct Control {
    /// What the node speaks: protocol 0 (only the oldest messages) until its Hello.
    node: PeerProtocol,
    unknowns: Unknowns,
}

/// What a message from the node asks of the tunnel task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// Use this configuration (targets, and the cluster's nodes for
    /// [`TunnelSet::handle_learned`]).
    Config(SiteConfig),
    /// The node said what it speaks (now in [`Control::node`]).
    NodeHello,
    /// Who may reach what behind the site, from this node.
    Access(crate::tunnel::AccessConfig),
    /// The node is still serving: its access configuration holds for this long.
    Heartbeat {
        /// Milliseconds.
        valid_for_ms: u64,
    },
    /// The cluster's relay-only nodes, to bind to as well.
    Relays(Vec<String>),
    /// A message this build does not know (from a newer node), skipped.
    Skipped {
        /// Its tag.
        tag: u32,
        /// The first skipped on this stream (log it loudly; later ones quietly).
        first: bool,
    },
}

impl Default for Control {
    fn default() -> Self {
        Self::new()
    }
}

impl Control {
    /// A control stream on which the node has said nothing yet.
    pub fn new() -> Self {
        Self {
            node: PeerProtocol::legacy(String::new()),
            unknowns: Unknowns::default(),
        }
    }

    /// One message from the node.
    pub fn handle_message(&mut self, msg: ToAgent) -> ControlEvent {
        match msg {
            ToAgent::Config(config) => ControlEvent::Config(config),
            ToAgent::Hello(hello) => {
                self.node = PeerProtocol::from_hello(hello);
                ControlEvent::NodeHello
            }
            ToAgent::Access(access) => ControlEvent::Access(access),
            ToAgent::Heartbeat { valid_for_ms } => ControlEvent::Heartbeat { valid_for_ms },
            ToAgent::Relays(r) => ControlEvent::Relays(r),
            ToAgent::Unknown { tag } => ControlEvent::Skipped {
                tag,
                first: self.unknowns.note(),
            },
        }
    }

    /// What the node speaks, as far as it said.
    pub fn node(&self) -> &PeerProtocol {
        &self.node
    }

    /// How many unknown messages were skipped.
    pub fn skipped(&self) -> u64 {
        self.unknowns.count()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::tunnel::{FromAgent, Hello, TargetSpec, PROTOCOL_VERSION};
    use crate::Name;

    const MS: Duration = Duration::from_millis(1);

    fn s(addr: &str) -> String {
        addr.to_owned()
    }

    /// How an in-memory node answers a dial or a probe.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Answer {
        /// The handshake takes this long.
        Up(Duration),
        /// No tunnel (no answer, refused, unreachable).
        Fail,
        /// No answer yet: stays outstanding until the test completes it.
        Hang,
    }

    /// A [`TunnelSet`], a fake clock and in-memory nodes that answer its actions at once
    /// (or never, with [`Answer::Hang`]); every action and event is logged with its time.
    struct Harness {
        set: TunnelSet,
        start: Instant,
        now: Instant,
        dial: HashMap<String, Answer>,
        probe: HashMap<String, Answer>,
        log: Vec<(Duration, Action)>,
        events: Vec<Event>,
        pending_dials: Vec<String>,
        pending_probes: Vec<String>,
    }

    impl Harness {
        fn new(seeds: &[&str], rng_seed: u64) -> Self {
            let start = Instant::now();
            let mut h = Self {
                set: TunnelSet::new(seeds.iter().map(|a| s(a)), rng_seed, start),
                start,
                now: start,
                dial: HashMap::new(),
                probe: HashMap::new(),
                log: Vec::new(),
                events: Vec::new(),
                pending_dials: Vec::new(),
                pending_probes: Vec::new(),
            };
            h.settle();
            h
        }

        /// Sets how `addr` answers dials and probes from now on (and answers none so far).
        fn answers(&mut self, addr: &str, dial: Answer, probe: Answer) {
            self.dial.insert(s(addr), dial);
            self.probe.insert(s(addr), probe);
        }

        /// Performs every action the set asks for, answering as the nodes are set to.
        fn settle(&mut self) {
            while let Some(action) = self.set.poll_action() {
                self.log.push((self.now - self.start, action.clone()));
                match action {
                    Action::Dial { addr, .. } => {
                        match self.dial.get(&addr).copied().unwrap_or(Answer::Hang) {
                            Answer::Up(rtt) => self.set.handle_dialed(&addr, rtt, self.now),
                            Answer::Fail => self.set.handle_dial_failed(&addr, self.now),
                            Answer::Hang => self.pending_dials.push(addr),
                        }
                    }
                    Action::Probe { addr } => {
                        match self.probe.get(&addr).copied().unwrap_or(Answer::Hang) {
                            Answer::Up(rtt) => self.set.handle_probe(&addr, Some(rtt), self.now),
                            Answer::Fail => self.set.handle_probe(&addr, None, self.now),
                            Answer::Hang => self.pending_probes.push(addr),
                        }
                    }
                    Action::Close { addr, .. } => {
                        self.set.handle_closed(&addr, Closed::Lost, self.now)
                    }
                }
            }
            while let Some(e) = self.set.poll_event() {
                self.events.push(e);
            }
        }

        /// Lets `d` pass, firing the set's timer whenever it is due, as the driver does.
        fn advance(&mut self, d: Duration) {
            let until = self.now + d;
            while let Some(at) = self.set.poll_timeout() {
                if at > until {
                    break;
                }
                assert!(at > self.now, "the timer must not fire in the past");
                self.now = at;
                self.set.handle_timeout(self.now);
                self.settle();
            }
            self.now = until;
        }

        /// The node at `addr` ends its tunnel.
        fn close(&mut self, addr: &str, how: Closed) {
            self.set.handle_closed(addr, how, self.now);
            self.settle();
        }

        fn learn(&mut self, nodes: &[&str]) {
            let nodes: Vec<String> = nodes.iter().map(|a| s(a)).collect();
            self.set.handle_learned(&nodes, self.now);
            self.settle();
        }

        /// Every dial so far: when, where, with a legacy hello.
        fn dials(&self) -> Vec<(Duration, String, bool)> {
            self.log
                .iter()
                .filter_map(|(t, a)| match a {
                    Action::Dial { addr, legacy_hello } => Some((*t, addr.clone(), *legacy_hello)),
                    _ => None,
                })
                .collect()
        }

        fn dialled(&self) -> Vec<String> {
            self.dials().into_iter().map(|(_, a, _)| a).collect()
        }

        fn probed_since(&self, from: usize) -> Vec<String> {
            self.log[from..]
                .iter()
                .filter_map(|(_, a)| match a {
                    Action::Probe { addr } => Some(addr.clone()),
                    _ => None,
                })
                .collect()
        }

        fn closes(&self) -> Vec<Action> {
            self.log
                .iter()
                .filter(|(_, a)| matches!(a, Action::Close { .. }))
                .map(|(_, a)| a.clone())
                .collect()
        }

        fn state(&self, addr: &str) -> TunnelState {
            self.set.node(addr).expect("a known node").state
        }

        fn up(&self) -> Vec<String> {
            let mut up: Vec<String> = self
                .set
                .nodes()
                .filter(|n| matches!(n.state, TunnelState::Up { .. }))
                .map(|n| n.addr.to_owned())
                .collect();
            up.sort();
            up
        }
    }

    #[test]
    fn the_first_two_seeds_are_dialled_at_once_and_no_more() {
        let mut h = Harness::new(&["a:1", "b:1", "c:1"], 1);
        assert_eq!(h.dialled(), ["a:1", "b:1"]);
        assert!(h
            .dials()
            .iter()
            .all(|(t, _, legacy)| t.is_zero() && !legacy));
        assert_eq!(h.set.tunnels(), 2);
        // Hanging dials hold their slots: nothing else is dialled, nothing probed, and no
        // dial is repeated, however long they take.
        h.advance(Duration::from_secs(120));
        assert_eq!(h.dialled(), ["a:1", "b:1"]);
        assert_eq!(h.probed_since(0), ["c:1"], "only the idle node is probed");
    }

    #[test]
    fn duplicate_seeds_are_one_node() {
        let h = Harness::new(&["a:1", "a:1", "b:1"], 1);
        assert_eq!(h.dialled(), ["a:1", "b:1"]);
        assert_eq!(h.set.nodes().count(), 2);
    }

    #[test]
    fn a_never_tried_node_goes_before_a_failed_one() {
        let mut h = Harness::new(&["c:1", "d:1", "a:1", "b:1"], 1);
        // c fails (a takes its slot); d and a come up.
        h.set.handle_dial_failed("c:1", h.now);
        h.set.handle_dialed("d:1", 10 * MS, h.now);
        h.set.handle_dialed("a:1", 10 * MS, h.now);
        h.settle();
        assert_eq!(h.dialled(), ["c:1", "d:1", "a:1"]);
        // Later c's wait is over, but b (never tried) gets the slot a leaves, although c
        // came first.
        h.advance(Duration::from_secs(5));
        h.close("a:1", Closed::Lost);
        assert_eq!(h.dialled(), ["c:1", "d:1", "a:1", "b:1"]);
        assert_eq!(h.set.node("c:1").unwrap().failures, 1);
    }

    #[test]
    fn among_equally_failed_nodes_the_closest_is_dialled_first() {
        let mut h = Harness::new(&["a:1", "b:1", "c:1", "d:1"], 1);
        h.set.handle_dialed("a:1", 40 * MS, h.now);
        h.set.handle_dialed("b:1", 30 * MS, h.now);
        h.settle();
        // Measured at the round, neither clearly closer than the slowest tunnel (28 ms).
        h.answers("c:1", Answer::Hang, Answer::Up(35 * MS));
        h.answers("d:1", Answer::Hang, Answer::Up(29 * MS));
        h.advance(REBALANCE_EVERY);
        assert!(h.closes().is_empty());
        // Both tunnels drop after a good while: d (29 ms) then c (35 ms) take the slots.
        h.advance(Duration::from_secs(1));
        h.close("a:1", Closed::Lost);
        h.close("b:1", Closed::Lost);
        assert_eq!(h.dialled()[2..], [s("d:1"), s("c:1")]);
    }

    #[test]
    fn a_failing_node_backs_off_doubling_to_30_s_with_jitter() {
        let mut h = Harness::new(&["a:1"], 7);
        h.answers("a:1", Answer::Fail, Answer::Fail);
        h.set.handle_dial_failed("a:1", h.now);
        h.settle();
        h.advance(Duration::from_secs(400));
        let times: Vec<Duration> = h.dials().into_iter().map(|(t, _, _)| t).collect();
        assert!(times.len() > 15, "{times:?}");
        for (k, pair) in times.windows(2).enumerate() {
            let failures = u32::try_from(k + 1).unwrap();
            let base = backoff_base(failures);
            let wait = pair[1] - pair[0];
            assert!(
                wait >= base / 2 && wait <= base,
                "after failure {failures}: waited {wait:?}, base {base:?}"
            );
        }
        assert_eq!(backoff_base(1), Duration::from_secs(1));
        assert_eq!(backoff_base(5), Duration::from_secs(16));
        assert_eq!(backoff_base(6), MAX_BACKOFF);
        assert_eq!(backoff_base(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn jitter_replays_from_its_seed_and_differs_between_seeds() {
        let run = |seed| {
            let mut h = Harness::new(&["a:1"], seed);
            h.answers("a:1", Answer::Fail, Answer::Fail);
            h.set.handle_dial_failed("a:1", h.now);
            h.settle();
            h.advance(Duration::from_secs(120));
            h.dials()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn jitter_covers_half_to_all_of_the_base() {
        let mut set = TunnelSet::new([s("a:1")], 11, Instant::now());
        let now = Instant::now();
        let (mut low, mut high) = (Duration::MAX, Duration::ZERO);
        for _ in 0..2000 {
            set.fail(0, now);
            set.nodes[0].failures = 0;
            let wait = set.nodes[0].retry_at - now;
            low = low.min(wait);
            high = high.max(wait);
        }
        let base = backoff_base(1);
        assert!(low >= base / 2 && high <= base, "{low:?}..{high:?}");
        assert!(
            low < base * 11 / 20 && high > base * 19 / 20,
            "{low:?}..{high:?}"
        );
    }

    #[test]
    fn a_long_lived_tunnel_resets_the_failures_and_a_short_one_does_not() {
        let mut h = Harness::new(&["a:1"], 5);
        h.answers("a:1", Answer::Fail, Answer::Fail);
        h.set.handle_dial_failed("a:1", h.now);
        h.settle();
        h.advance(Duration::from_secs(100));
        let failures = h.set.node("a:1").unwrap().failures;
        assert!(failures >= 6, "{failures}");

        // Up for 2 s then lost: still backing off from where it was (about 30 s).
        h.answers("a:1", Answer::Up(10 * MS), Answer::Fail);
        let retry_at = h.set.node("a:1").unwrap().retry_at;
        h.advance(retry_at - h.now);
        assert!(matches!(h.state("a:1"), TunnelState::Up { .. }));
        h.advance(Duration::from_secs(2));
        h.close("a:1", Closed::Lost);
        let n = h.set.node("a:1").unwrap();
        assert_eq!(n.failures, failures + 1);
        assert!(n.retry_at - h.now >= MAX_BACKOFF / 2);

        // Up for 20 s then lost: dialled again within a second.
        h.advance(MAX_BACKOFF);
        assert!(matches!(h.state("a:1"), TunnelState::Up { .. }));
        h.advance(Duration::from_secs(20));
        h.close("a:1", Closed::Lost);
        let n = h.set.node("a:1").unwrap();
        assert_eq!(n.failures, 1);
        let wait = n.retry_at - h.now;
        assert!(wait >= Duration::from_millis(500) && wait <= Duration::from_secs(1));
    }

    #[test]
    fn a_closed_tunnel_is_dialled_again_once_its_wait_is_over() {
        let mut h = Harness::new(&["a:1", "b:1"], 2);
        h.answers("a:1", Answer::Up(10 * MS), Answer::Fail);
        h.answers("b:1", Answer::Up(10 * MS), Answer::Fail);
        h.set.handle_dialed("a:1", 10 * MS, h.now);
        h.set.handle_dialed("b:1", 10 * MS, h.now);
        h.settle();
        h.advance(Duration::from_secs(11));
        h.close("a:1", Closed::Lost);
        assert_eq!(h.state("a:1"), TunnelState::Idle);
        let retry_at = h.set.node("a:1").unwrap().retry_at;
        assert_eq!(
            h.set.poll_timeout(),
            Some(retry_at),
            "the timer is the retry"
        );
        h.advance(Duration::from_secs(1));
        let (at, addr, _) = h.dials().pop().unwrap();
        assert_eq!(addr, "a:1");
        assert_eq!(h.start + at, retry_at, "dialled exactly at its retry time");
        assert_eq!(h.up(), ["a:1", "b:1"]);
        assert_eq!(h.dialled().len(), 3);
    }

    #[test]
    fn a_node_being_dialled_is_neither_dialled_again_nor_probed() {
        let mut h = Harness::new(&["a:1", "b:1", "c:1"], 2);
        // a hangs; b fails over and over, so c takes its slot; a is never dialled twice.
        h.answers("b:1", Answer::Fail, Answer::Fail);
        h.answers("c:1", Answer::Fail, Answer::Fail);
        h.set.handle_dial_failed("b:1", h.now);
        h.settle();
        h.advance(Duration::from_secs(200));
        let a_dials = h.dialled().iter().filter(|a| *a == "a:1").count();
        assert_eq!(a_dials, 1);
        assert!(!h.probed_since(0).contains(&s("a:1")));
        // Its dial finally fails: it backs off like any other.
        h.set.handle_dial_failed("a:1", h.now);
        assert_eq!(h.set.node("a:1").unwrap().failures, 1);
    }

    #[test]
    fn the_round_probes_only_idle_nodes_past_their_retry_time() {
        let mut h = Harness::new(&["a:1", "b:1", "c:1", "d:1"], 2);
        h.set.handle_dialed("a:1", 10 * MS, h.now);
        h.settle();
        // b hangs in its dial; c failed recently (waits ~30 s); d is idle and ready.
        let c = h.set.index("c:1").unwrap();
        h.set.nodes[c].failures = 6;
        h.set.nodes[c].retry_at = h.now + Duration::from_secs(20);
        let before = h.log.len();
        h.advance(REBALANCE_EVERY);
        assert_eq!(h.probed_since(before), ["d:1"]);
        assert!(h.set.node("d:1").unwrap().probing);
        // An outstanding probe is not repeated at the next round.
        let before = h.log.len();
        h.advance(REBALANCE_EVERY);
        assert_eq!(h.probed_since(before), ["c:1"]);
    }

    #[test]
    fn the_slowest_tunnel_moves_only_to_a_clearly_closer_node() {
        let mut h = Harness::new(&["a:1", "b:1", "c:1", "d:1"], 2);
        h.set.handle_dialed("a:1", 40 * MS, h.now);
        h.set.handle_dialed("b:1", 30 * MS, h.now);
        h.settle();
        // 29 ms is not under 0.7 · 40 ms.
        h.answers("c:1", Answer::Up(29 * MS), Answer::Up(29 * MS));
        h.answers("d:1", Answer::Up(50 * MS), Answer::Up(50 * MS));
        h.advance(REBALANCE_EVERY);
        assert!(h.closes().is_empty());
        assert_eq!(h.up(), ["a:1", "b:1"]);

        // Now c answers in 20 ms: a (the slowest) moves to c, b stays.
        h.answers("c:1", Answer::Up(20 * MS), Answer::Up(20 * MS));
        h.advance(REBALANCE_EVERY);
        assert_eq!(
            h.closes(),
            [Action::Close {
                addr: s("a:1"),
                reason: CloseReason::Closer { to: s("c:1") }
            }]
        );
        assert_eq!(h.dialled().last().unwrap(), "c:1");
        assert_eq!(h.up(), ["b:1", "c:1"]);
        // The node left keeps no failure and could be dialled again at once.
        let a = h.set.node("a:1").unwrap();
        assert_eq!((a.failures, a.retry_at), (0, h.now));
    }

    #[test]
    fn sub_millisecond_differences_never_move_a_tunnel() {
        let us = Duration::from_micros(1);
        let mut h = Harness::new(&["a:1", "b:1", "c:1"], 2);
        h.set.handle_dialed("a:1", 900 * us, h.now);
        h.set.handle_dialed("b:1", 800 * us, h.now);
        h.settle();
        // Three times faster, but 0.6 ms is noise on one host.
        h.answers("c:1", Answer::Up(300 * us), Answer::Up(300 * us));
        for _ in 0..4 {
            h.advance(REBALANCE_EVERY);
        }
        assert!(h.closes().is_empty());
        assert_eq!(h.up(), ["a:1", "b:1"]);
    }

    #[test]
    fn a_slow_first_handshake_is_judged_by_what_the_tunnel_measures_now() {
        let mut h = Harness::new(&["a:1", "b:1", "c:1"], 2);
        // Dialled at start-up, under load: 8 ms and 2 ms.
        h.set.handle_dialed("a:1", 8 * MS, h.now);
        h.set.handle_dialed("b:1", 2 * MS, h.now);
        h.settle();
        // The tunnel to a measures 1 ms now; c answers a probe in 3 ms: no move.
        h.set.handle_tunnel_rtt("a:1", MS);
        h.answers("c:1", Answer::Up(3 * MS), Answer::Up(3 * MS));
        h.advance(REBALANCE_EVERY);
        assert!(h.closes().is_empty(), "{:?}", h.closes());
        assert_eq!(h.up(), ["a:1", "b:1"]);
        // A figure for a node without a tunnel changes nothing.
        h.set.handle_tunnel_rtt("c:1", 50 * MS);
        assert_eq!(h.set.node("c:1").unwrap().rtt, Some(3 * MS));
    }

    #[test]
    fn one_move_per_round_and_none_while_a_slot_is_dialling() {
        let mut h = Harness::new(&["a:1", "b:1", "c:1", "d:1"], 2);
        h.set.handle_dialed("a:1", 40 * MS, h.now);
        h.set.handle_dialed("b:1", 50 * MS, h.now);
        h.settle();
        h.advance(REBALANCE_EVERY - MS);
        h.answers("c:1", Answer::Up(5 * MS), Answer::Hang);
        h.answers("d:1", Answer::Up(5 * MS), Answer::Hang);
        h.advance(MS);
        assert_eq!(h.pending_probes, ["c:1", "d:1"]);
        h.set.handle_probe("c:1", Some(5 * MS), h.now);
        h.set.handle_probe("d:1", Some(5 * MS), h.now);
        h.settle();
        assert_eq!(h.closes().len(), 1, "{:?}", h.closes());
        assert_eq!(h.up(), ["a:1", "c:1"], "b, the slowest, moved to c");

        // A slot being dialled: no move, however close the probed node.
        let mut h = Harness::new(&["a:1", "b:1", "c:1"], 2);
        h.set.handle_dialed("a:1", 40 * MS, h.now);
        h.settle();
        h.answers("c:1", Answer::Hang, Answer::Up(MS));
        h.advance(REBALANCE_EVERY);
        assert!(h.closes().is_empty());
        assert_eq!(h.state("b:1"), TunnelState::Dialing);
    }

    #[test]
    fn no_move_to_a_node_that_failed_a_dial_while_its_probe_was_out() {
        let mut h = Harness::new(&["a:1", "b:1", "c:1", "d:1"], 2);
        h.set.handle_dialed("a:1", 40 * MS, h.now);
        h.set.handle_dialed("b:1", 50 * MS, h.now);
        h.settle();
        h.advance(REBALANCE_EVERY);
        assert_eq!(h.pending_probes, ["c:1", "d:1"]);
        // b drops; c takes the slot while its probe is out and fails; d takes it then.
        h.answers("c:1", Answer::Fail, Answer::Hang);
        h.answers("d:1", Answer::Up(50 * MS), Answer::Hang);
        h.close("b:1", Closed::Lost);
        assert_eq!(h.dialled()[2..], [s("c:1"), s("d:1")]);
        assert_eq!(h.up(), ["a:1", "d:1"]);
        assert!(h.set.node("c:1").unwrap().retry_at > h.now);
        // c's probe answers, clearly closer, but c is waiting for its retry time: no move.
        h.set.handle_probe("c:1", Some(MS), h.now);
        h.settle();
        assert!(h.closes().is_empty(), "{:?}", h.closes());
    }

    #[test]
    fn a_dropped_node_kept_for_its_probe_is_not_dialled_moved_to_or_waited_for() {
        // a and b carry tunnels; c is being probed when the cluster drops it.
        let dropped_while_probed = || {
            let mut h = Harness::new(&["a:1", "b:1"], 2);
            h.learn(&["a:1", "b:1", "c:1"]);
            h.set.handle_dialed("a:1", 40 * MS, h.now);
            h.set.handle_dialed("b:1", 50 * MS, h.now);
            h.settle();
            h.advance(REBALANCE_EVERY);
            assert_eq!(h.pending_probes, ["c:1"]);
            h.learn(&["a:1", "b:1"]);
            assert!(h.set.node("c:1").is_some(), "kept while its probe is out");
            h
        };
        // Its probe answers, clearly closer: no move; it is forgotten.
        let mut h = dropped_while_probed();
        h.set.handle_probe("c:1", Some(MS), h.now);
        h.settle();
        assert!(h.closes().is_empty(), "{:?}", h.closes());
        assert_eq!(h.events.last(), Some(&Event::Forgot { addr: s("c:1") }));
        // A slot frees first: c is not dialled, and the timer is not c's long-past retry
        // time.
        let mut h = dropped_while_probed();
        h.close("b:1", Closed::Lost);
        assert_eq!(h.dialled(), ["a:1", "b:1"]);
        assert!(h.set.poll_timeout().unwrap() > h.now);
    }

    #[test]
    fn learned_nodes_are_dialled_when_a_slot_is_free() {
        let mut h = Harness::new(&["a:1"], 2);
        h.set.handle_dialed("a:1", 10 * MS, h.now);
        h.settle();
        h.learn(&["a:1", "b:1", "c:1", "not an address", "d"]);
        assert_eq!(
            h.events,
            [
                Event::Learned { addr: s("b:1") },
                Event::Learned { addr: s("c:1") }
            ]
        );
        assert_eq!(h.dialled(), ["a:1", "b:1"]);
        // The same list again changes nothing.
        h.learn(&["a:1", "b:1", "c:1"]);
        assert_eq!(h.events.len(), 2);
        assert_eq!(h.set.nodes().count(), 3);
    }

    #[test]
    fn nodes_the_cluster_dropped_are_forgotten_once_idle_but_seeds_never() {
        let mut h = Harness::new(&["a:1"], 2);
        h.set.handle_dialed("a:1", 10 * MS, h.now);
        h.settle();
        h.learn(&["a:1", "b:1", "c:1"]);
        h.set.handle_dialed("b:1", 10 * MS, h.now);
        h.settle();
        h.events.clear();
        // Neither b (live) nor a (a seed) is forgotten; c (idle) is.
        h.learn(&[]);
        assert_eq!(h.events, [Event::Forgot { addr: s("c:1") }]);
        assert!(matches!(h.state("b:1"), TunnelState::Up { .. }));
        // b's tunnel ends: b is forgotten, never dialled again.
        h.close("b:1", Closed::Lost);
        assert_eq!(h.events.last(), Some(&Event::Forgot { addr: s("b:1") }));
        assert!(h.set.node("b:1").is_none());
        h.advance(Duration::from_secs(60));
        assert_eq!(h.dialled(), ["a:1", "b:1"]);
        assert!(h.set.node("a:1").is_some());
        // A later list brings b back as a new node.
        h.learn(&["b:1"]);
        assert_eq!(h.events.last(), Some(&Event::Learned { addr: s("b:1") }));
        assert_eq!(h.dialled().last().unwrap(), "b:1");
    }

    #[test]
    fn a_long_list_is_cut_at_max_nodes() {
        let mut h = Harness::new(&["a:1"], 2);
        let many: Vec<String> = (0..200).map(|i| format!("n{i}:1")).collect();
        h.set.handle_learned(&many, h.now);
        assert_eq!(h.set.nodes().count(), MAX_NODES);
    }

    #[test]
    fn a_legacy_hello_only_right_after_a_refusal() {
        let mut h = Harness::new(&["a:1"], 2);
        h.set.handle_dialed("a:1", 10 * MS, h.now);
        h.close("a:1", Closed::HelloRefused);
        assert!(h.set.node("a:1").unwrap().legacy_hello);
        // A dial that does not reach the node keeps the memory.
        h.answers("a:1", Answer::Fail, Answer::Fail);
        h.advance(Duration::from_secs(1));
        h.answers("a:1", Answer::Up(10 * MS), Answer::Fail);
        h.advance(Duration::from_secs(2));
        assert!(matches!(h.state("a:1"), TunnelState::Up { .. }));
        // That tunnel ends: the next dial tries this build's Hello again.
        h.close("a:1", Closed::Lost);
        h.advance(Duration::from_secs(10));
        let legacy: Vec<bool> = h.dials().into_iter().map(|(_, _, l)| l).collect();
        assert_eq!(legacy, [false, true, true, false]);
    }

    #[test]
    fn reports_that_match_nothing_outstanding_are_ignored() {
        let mut h = Harness::new(&["a:1", "b:1"], 2);
        h.set.handle_dialed("z:1", 10 * MS, h.now);
        h.set.handle_closed("a:1", Closed::Lost, h.now);
        h.set.handle_probe("a:1", Some(MS), h.now);
        h.set.handle_dial_failed("x:1", h.now);
        h.settle();
        assert_eq!(h.state("a:1"), TunnelState::Dialing);
        assert_eq!(h.set.node("a:1").unwrap().rtt, None);
        assert_eq!(h.dialled(), ["a:1", "b:1"]);
    }

    #[test]
    fn node_addresses() {
        for good in [
            "a:1",
            "127.0.0.1:7000",
            "[::1]:7000",
            "node-1.example.com:65535",
        ] {
            assert!(is_node_address(good), "{good}");
        }
        for bad in ["", "a", ":7000", "a:0", "a:65536", "a:x", "a b:1", "a:1 "] {
            assert!(!is_node_address(bad), "{bad:?}");
        }
    }

    fn config() -> SiteConfig {
        SiteConfig {
            site: Name::new("hq").unwrap(),
            targets: vec![TargetSpec {
                target: "127.0.0.1:5432".parse().unwrap(),
                check: None,
            }],
            nodes: vec!["127.0.0.1:7000".into()],
        }
    }

    #[test]
    fn the_node_counts_as_protocol_0_until_its_hello() {
        let mut control = Control::new();
        assert_eq!(control.node().version, 0);
        assert!(!control.node().accepts(&FromAgent::Hello(Hello::ours())));
        assert!(control.node().accepts(&FromAgent::Health(Vec::new())));
        assert_eq!(
            control.handle_message(ToAgent::Hello(Hello::ours())),
            ControlEvent::NodeHello
        );
        assert_eq!(control.node().version, PROTOCOL_VERSION);
        assert_eq!(
            control.handle_message(ToAgent::Config(config())),
            ControlEvent::Config(config())
        );
    }

    #[test]
    fn unknown_messages_are_skipped_and_only_the_first_is_flagged() {
        let mut control = Control::new();
        assert_eq!(
            control.handle_message(ToAgent::Unknown { tag: 40 }),
            ControlEvent::Skipped {
                tag: 40,
                first: true
            }
        );
        assert_eq!(
            control.handle_message(ToAgent::Unknown { tag: 41 }),
            ControlEvent::Skipped {
                tag: 41,
                first: false
            }
        );
        assert_eq!(control.skipped(), 2);
        // The stream goes on.
        assert_eq!(
            control.handle_message(ToAgent::Config(config())),
            ControlEvent::Config(config())
        );
    }

    // ---- Reference model ------------------------------------------------------------------

    /// The addresses the property test uses; the last is never a valid node address.
    const UNIVERSE: [&str; 6] = ["n0:1", "n1:1", "n2:1", "n3:1", "n4:1", "bad"];

    #[derive(Debug, Clone)]
    enum Op {
        /// Time passes (ms); the timer fires whenever due.
        Advance(u64),
        /// An outstanding dial ends: up with this handshake (ms), or failed.
        Dial(usize, Option<u64>),
        /// A tunnel (up, or asked to close) ends; refused: the node refused the Hello.
        Close(usize, bool),
        /// An outstanding probe ends: this handshake (ms), or no answer.
        Probe(usize, Option<u64>),
        /// A node list: the universe's members picked by the mask.
        Learn(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        let rtt = prop::option::weighted(0.8, prop::sample::select(vec![2u64, 5, 10, 20, 40, 80]));
        prop_oneof![
            3 => prop_oneof![0u64..1_000, 0u64..20_000].prop_map(Op::Advance),
            3 => (any::<usize>(), rtt.clone()).prop_map(|(i, r)| Op::Dial(i, r)),
            2 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(i, r)| Op::Close(i, r)),
            2 => (any::<usize>(), rtt).prop_map(|(i, r)| Op::Probe(i, r)),
            1 => any::<u8>().prop_map(Op::Learn),
        ]
    }

    /// What the model expects of one node.
    #[derive(Debug, Clone)]
    struct Expect {
        seed: bool,
        listed: bool,
        state: TunnelState,
        probing: bool,
        rtt: Option<Duration>,
        failures: u32,
        /// The retry time lies in this window (jitter).
        retry: (Instant, Instant),
        legacy: bool,
    }

    /// A much simpler account of the policy: per node what must hold, checked against
    /// every action the set asks for and its state after every step.
    struct Model {
        now: Instant,
        nodes: Vec<(String, Expect)>,
        next_round: Instant,
        moved: bool,
        /// The probe result just handed to the set, if it may move: (node, handshake,
        /// whether it must move when the node is clearly closer).
        probe_result: Option<(String, Duration, bool)>,
    }

    impl Model {
        fn get(&mut self, addr: &str) -> &mut Expect {
            &mut self
                .nodes
                .iter_mut()
                .find(|(a, _)| a == addr)
                .unwrap_or_else(|| panic!("the model does not know {addr}"))
                .1
        }

        fn tunnels(&self) -> usize {
            self.nodes
                .iter()
                .filter(|(_, e)| matches!(e.state, TunnelState::Dialing | TunnelState::Up { .. }))
                .count()
        }

        fn fail(&mut self, addr: &str) {
            let now = self.now;
            let e = self.get(addr);
            e.failures += 1;
            let base = backoff_base(e.failures);
            e.retry = (now + base / 2, now + base);
        }

        /// Removes the node if the cluster dropped it and nothing is outstanding.
        fn forget_if_gone(&mut self, addr: &str) -> Option<Event> {
            let e = self.get(addr);
            let gone = !e.seed && !e.listed && e.state == TunnelState::Idle && !e.probing;
            gone.then(|| {
                self.nodes.retain(|(a, _)| a != addr);
                Event::Forgot { addr: s(addr) }
            })
        }

        /// Checks one action the set asked for, and applies it.
        fn action(&mut self, action: &Action) -> Result<(), TestCaseError> {
            let now = self.now;
            match action {
                Action::Dial { addr, legacy_hello } => {
                    let e = self.get(addr).clone();
                    prop_assert_eq!(e.state, TunnelState::Idle, "dialled {} twice", addr);
                    prop_assert!(
                        now >= e.retry.0,
                        "dialled {} before its retry time: {:?} early, {:?}",
                        addr,
                        e.retry.0 - now,
                        e
                    );
                    prop_assert_eq!(*legacy_hello, e.legacy, "legacy hello for {}", addr);
                    prop_assert!(
                        e.seed || e.listed,
                        "dialled {}, dropped by the cluster",
                        addr
                    );
                    self.get(addr).state = TunnelState::Dialing;
                    prop_assert!(self.tunnels() <= TUNNELS, "over {} tunnels", TUNNELS);
                }
                Action::Probe { addr } => {
                    let e = self.get(addr).clone();
                    prop_assert_eq!(e.state, TunnelState::Idle, "probed {} while busy", addr);
                    prop_assert!(!e.probing, "probed {} twice", addr);
                    prop_assert!(
                        e.seed || e.listed,
                        "probed {}, dropped by the cluster",
                        addr
                    );
                    prop_assert!(now >= e.retry.0, "probed {} before its retry time", addr);
                    self.get(addr).probing = true;
                }
                Action::Close {
                    addr,
                    reason: CloseReason::Closer { to },
                } => {
                    let Some((probed, rtt, _)) = self.probe_result.take() else {
                        return Err(TestCaseError::fail("a move without a probe result"));
                    };
                    prop_assert_eq!(to, &probed);
                    prop_assert!(!self.moved, "two moves in one round");
                    let up: Vec<Duration> = self
                        .nodes
                        .iter()
                        .filter(|(_, e)| matches!(e.state, TunnelState::Up { .. }))
                        .filter_map(|(_, e)| e.rtt)
                        .collect();
                    prop_assert_eq!(up.len(), TUNNELS, "moved with a slot not up");
                    let slowest = up.iter().max().copied().unwrap_or_default();
                    let closed = self.get(addr).clone();
                    prop_assert!(
                        matches!(closed.state, TunnelState::Up { .. }),
                        "closed {} not up",
                        addr
                    );
                    prop_assert_eq!(closed.rtt, Some(slowest), "moved a tunnel not the slowest");
                    prop_assert!(rtt.as_secs_f64() < slowest.as_secs_f64() * CLOSER);
                    self.moved = true;
                    self.get(addr).state = TunnelState::Closing;
                }
            }
            Ok(())
        }

        /// After the set's actions for one input: a move it should have made, and the round.
        fn after_input(&mut self) -> Result<(), TestCaseError> {
            if let Some((probed, rtt, true)) = self.probe_result.take() {
                let up: Vec<Duration> = self
                    .nodes
                    .iter()
                    .filter(|(_, e)| matches!(e.state, TunnelState::Up { .. }))
                    .filter_map(|(_, e)| e.rtt)
                    .collect();
                let slowest = up.iter().max().copied().unwrap_or_default();
                prop_assert!(
                    self.moved
                        || up.len() < TUNNELS
                        || rtt.as_secs_f64() >= slowest.as_secs_f64() * CLOSER
                        || slowest.saturating_sub(rtt) < MIN_GAIN,
                    "{} answered in {:?}, the slowest tunnel takes {:?}: no move",
                    probed,
                    rtt,
                    slowest
                );
            }
            if self.now >= self.next_round {
                self.next_round = self.now + REBALANCE_EVERY;
                self.moved = false;
            }
            Ok(())
        }
    }

    /// The set under test, the model and the outstanding work, driven by [`Op`]s.
    struct Sim {
        set: TunnelSet,
        model: Model,
        dials: Vec<String>,
        probes: Vec<String>,
    }

    impl Sim {
        fn new(seeds: usize, rng_seed: u64) -> Result<Self, TestCaseError> {
            let now = Instant::now();
            let seeds: Vec<String> = UNIVERSE[..seeds].iter().map(|a| s(a)).collect();
            let expect = |seed| Expect {
                seed,
                listed: false,
                state: TunnelState::Idle,
                probing: false,
                rtt: None,
                failures: 0,
                retry: (now, now),
                legacy: false,
            };
            let mut sim = Self {
                set: TunnelSet::new(seeds.clone(), rng_seed, now),
                model: Model {
                    now,
                    nodes: seeds.into_iter().map(|a| (a, expect(true))).collect(),
                    next_round: now + REBALANCE_EVERY,
                    moved: false,
                    probe_result: None,
                },
                dials: Vec::new(),
                probes: Vec::new(),
            };
            sim.drain(Vec::new())?;
            Ok(sim)
        }

        /// Checks and records what the set asks for after one input; `events`: the ones
        /// the model expects from that input.
        fn drain(&mut self, expected: Vec<Event>) -> Result<(), TestCaseError> {
            let mut events = Vec::new();
            while let Some(e) = self.set.poll_event() {
                events.push(e);
            }
            prop_assert_eq!(events, expected);
            while let Some(action) = self.set.poll_action() {
                self.model.action(&action)?;
                match action {
                    Action::Dial { addr, .. } => self.dials.push(addr),
                    Action::Probe { addr } => self.probes.push(addr),
                    Action::Close { .. } => {}
                }
            }
            self.model.after_input()?;
            self.check()
        }

        /// The invariants, and the set's state against the model's.
        fn check(&self) -> Result<(), TestCaseError> {
            let now = self.model.now;
            prop_assert!(self.set.tunnels() <= TUNNELS);
            let mut dialing: Vec<&String> = self.dials.iter().collect();
            dialing.sort();
            dialing.dedup();
            prop_assert_eq!(
                dialing.len(),
                self.dials.len(),
                "a node dialled twice at once"
            );
            let known: Vec<&str> = self.set.nodes().map(|n| n.addr).collect();
            let expected: Vec<&str> = self.model.nodes.iter().map(|(a, _)| a.as_str()).collect();
            prop_assert_eq!(known, expected, "the nodes known");
            for (addr, e) in &self.model.nodes {
                let n = self.set.node(addr).expect("known");
                prop_assert_eq!(n.state, e.state, "{}", addr);
                prop_assert_eq!(n.probing, e.probing, "{}", addr);
                prop_assert_eq!(n.failures, e.failures, "{}", addr);
                prop_assert_eq!(n.legacy_hello, e.legacy, "{}", addr);
                prop_assert_eq!(n.rtt, e.rtt, "{}", addr);
                prop_assert_eq!(n.seed, e.seed, "{}", addr);
                if n.state == TunnelState::Idle {
                    prop_assert!(
                        n.retry_at >= e.retry.0 && n.retry_at <= e.retry.1,
                        "{} retries outside its backoff window",
                        addr
                    );
                    // Liveness: a dialable node waits only while every slot is taken.
                    prop_assert!(
                        n.retry_at > now || self.set.tunnels() == TUNNELS || !(e.seed || e.listed),
                        "{} is dialable and a slot is free",
                        addr
                    );
                }
            }
            let at = self.set.poll_timeout().expect("always a timer");
            prop_assert!(at > now, "the timer is in the past");
            prop_assert!(at <= self.model.next_round);
            Ok(())
        }

        fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
            match *op {
                Op::Advance(ms) => {
                    let until = self.model.now + Duration::from_millis(ms);
                    loop {
                        let at = self.set.poll_timeout().expect("always a timer");
                        if at > until {
                            break;
                        }
                        self.model.now = at;
                        self.set.handle_timeout(at);
                        self.drain(Vec::new())?;
                    }
                    self.model.now = until;
                }
                Op::Dial(i, result) => {
                    if self.dials.is_empty() {
                        return Ok(());
                    }
                    let addr = self.dials.remove(i % self.dials.len());
                    let now = self.model.now;
                    let mut expected = Vec::new();
                    match result {
                        Some(ms) => {
                            let rtt = Duration::from_millis(ms);
                            self.set.handle_dialed(&addr, rtt, now);
                            let e = self.model.get(&addr);
                            e.state = TunnelState::Up { since: now };
                            e.rtt = Some(rtt);
                        }
                        None => {
                            self.set.handle_dial_failed(&addr, now);
                            self.model.get(&addr).state = TunnelState::Idle;
                            self.model.fail(&addr);
                            expected.extend(self.model.forget_if_gone(&addr));
                        }
                    }
                    self.drain(expected)?;
                }
                Op::Close(i, refused) => {
                    let open: Vec<String> = self
                        .model
                        .nodes
                        .iter()
                        .filter(|(_, e)| {
                            matches!(e.state, TunnelState::Up { .. } | TunnelState::Closing)
                        })
                        .map(|(a, _)| a.clone())
                        .collect();
                    if open.is_empty() {
                        return Ok(());
                    }
                    let addr = &open[i % open.len()];
                    let how = if refused {
                        Closed::HelloRefused
                    } else {
                        Closed::Lost
                    };
                    let now = self.model.now;
                    self.set.handle_closed(addr, how, now);
                    let state = self.model.get(addr).state;
                    match state {
                        TunnelState::Up { since } => {
                            let e = self.model.get(addr);
                            if now - since > LONG_LIVED {
                                e.failures = 0;
                            }
                            e.state = TunnelState::Idle;
                            self.model.fail(addr);
                        }
                        _ => {
                            let e = self.model.get(addr);
                            e.state = TunnelState::Idle;
                            e.failures = 0;
                            e.retry = (now, now);
                        }
                    }
                    self.model.get(addr).legacy = refused;
                    let expected = self.model.forget_if_gone(addr).into_iter().collect();
                    self.drain(expected)?;
                }
                Op::Probe(i, result) => {
                    if self.probes.is_empty() {
                        return Ok(());
                    }
                    let addr = self.probes.remove(i % self.probes.len());
                    let rtt = result.map(Duration::from_millis);
                    let now = self.model.now;
                    self.set.handle_probe(&addr, rtt, now);
                    let e = self.model.get(&addr);
                    e.probing = false;
                    if let Some(rtt) = rtt {
                        e.rtt = Some(rtt);
                        // Within the jitter window the model cannot tell whether the set
                        // may move: it may, but need not.
                        if e.state == TunnelState::Idle && now >= e.retry.0 && (e.seed || e.listed)
                        {
                            let must = now >= e.retry.1;
                            self.model.probe_result = Some((addr.clone(), rtt, must));
                        }
                    }
                    let expected = self.model.forget_if_gone(&addr).into_iter().collect();
                    self.drain(expected)?;
                }
                Op::Learn(mask) => {
                    let list: Vec<String> = UNIVERSE
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| mask & (1 << i) != 0)
                        .map(|(_, a)| s(a))
                        .collect();
                    let now = self.model.now;
                    self.set.handle_learned(&list, now);
                    let listed: Vec<&String> = list.iter().filter(|a| is_node_address(a)).collect();
                    let mut expected = Vec::new();
                    let addrs: Vec<String> =
                        self.model.nodes.iter().map(|(a, _)| a.clone()).collect();
                    for addr in &addrs {
                        self.model.get(addr).listed = listed.contains(&addr);
                        expected.extend(self.model.forget_if_gone(addr));
                    }
                    for addr in listed {
                        if !self.model.nodes.iter().any(|(a, _)| a == addr) {
                            self.model.nodes.push((
                                addr.clone(),
                                Expect {
                                    seed: false,
                                    listed: true,
                                    state: TunnelState::Idle,
                                    probing: false,
                                    rtt: None,
                                    failures: 0,
                                    retry: (now, now),
                                    legacy: false,
                                },
                            ));
                            expected.push(Event::Learned { addr: addr.clone() });
                        }
                    }
                    self.drain(expected)?;
                }
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Random reports, node lists and time against the model: never more than two
        /// tunnels, no node dialled or probed twice at once, every dialable node dialled by
        /// its retry time when a slot is free, retry times inside the backoff window,
        /// failures, legacy hellos and moves exactly as the model says. Replayable: the
        /// jitter comes from `rng_seed`.
        #[test]
        fn the_tunnel_set_follows_its_model(
            seeds in 1usize..=3,
            rng_seed in any::<u64>(),
            ops in prop::collection::vec(op(), 1..120),
        ) {
            let mut sim = Sim::new(seeds, rng_seed)?;
            for op in &ops {
                sim.step(op)?;
            }
        }
    }
}
