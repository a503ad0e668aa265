//! Which way leads to a site, without I/O: the tunnels this node holds to each site's
//! agents, what each tunnel's agent last said about its targets, and which peers said they
//! hold a tunnel to which site ([`SiteTable`]).
//!
//! The node splits the table between two actors, each the only writer of one half, which
//! it publishes as an immutable snapshot after every change; request and stream tasks put
//! the two snapshots side by side in a [`SiteView`] and ask it the way:
//!
//! ```text
//!   Tunnels actor (node)                        LocalTunnels<T> (here)
//!   ──────────────────────────────────          ─────────────────────────────────
//!   an agent passed its checks       ────────►  add(site, conn) -> TunnelId
//!   its control stream: a report     ────────►  handle_health(id, report)
//!   the tunnel ended, or its actor failed ───►  remove(id)
//!
//!   Gossip actor (node)                         Holdings (here)
//!   ──────────────────────────────────          ─────────────────────────────────
//!   a peer's `Held` (sender from its cert) ──►  handle_held(peer, sites, now)
//!   the timer fired                  ────────►  handle_timeout(now)
//!   re-arm the one timer             ◄────────  poll_timeout()
//!
//!   request / stream tasks ── SiteView::new(&local, &peers) ──► routes(site, now),
//!                                                  connected(site, now), target_ok, held
//! ```
//!
//! The rules the table keeps (checked after every step of its property test):
//! - A site is listed only while this node holds at least one tunnel to it; tunnels of a
//!   site are kept newest first, each with an id the table gave it and never gives again.
//! - Target health is kept per tunnel, as that tunnel's agent last reported it: a report
//!   replaces the tunnel's previous one (an agent reports every target it checks, each
//!   round), and the reports go away with the tunnel. A target is down only if at least one
//!   of the site's tunnels reported on it and every one that did says it fails; a target
//!   no tunnel reported on is up (only targets with a health check are reported). So a
//!   target only a closed tunnel called down is up again, and two agents of one site that
//!   disagree keep the target in use (the one that can reach it serves it).
//! - A peer's announcement replaces what it said before entirely and counts for
//!   [`HELD_TTL`] from when it was heard; an empty announcement, or one in this node's own
//!   name, leaves nothing. Expired holdings are never routes, and
//!   [`Holdings::handle_timeout`] drops them at the time [`Holdings::poll_timeout`] names.
//! - Routes to a site are this node's tunnels, newest first, then the peers that hold
//!   it, most recently heard first (a peer that died stops refreshing its word, so it
//!   sorts last within a second), never this node itself.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use crate::registry::{NodeId, Target};
use crate::Name;

/// How long a peer's word that it holds a site counts. Peers announce every second, so
/// three announcements in a row can be lost before a live holder is forgotten.
pub const HELD_TTL: Duration = Duration::from_millis(3500);

/// One tunnel this node holds, named by the [`LocalTunnels`] that holds it (ids are never
/// given twice by one table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TunnelId(pub u64);

impl fmt::Display for TunnelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A way to a site's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<T> {
    /// A tunnel this node holds, and its handle (the node's QUIC connection).
    Tunnel(TunnelId, T),
    /// A peer node that said it holds one.
    Peer(NodeId),
}

/// One agent tunnel this node holds, with what its agent last reported.
#[derive(Debug, Clone)]
pub struct Tunnel<T> {
    id: TunnelId,
    handle: T,
    health: BTreeMap<Target, bool>,
}

impl<T> Tunnel<T> {
    /// The tunnel's id.
    pub fn id(&self) -> TunnelId {
        self.id
    }

    /// The tunnel's handle (the node's QUIC connection to the agent).
    pub fn handle(&self) -> &T {
        &self.handle
    }

    /// What this tunnel's agent last said about `target`, if it said anything.
    pub fn health(&self, target: &Target) -> Option<bool> {
        self.health.get(target).copied()
    }
}

/// The tunnels this node holds, per site, and their agents' health reports: the half of
/// the table the node's `Tunnels` actor owns.
///
/// Calling order: [`add`](Self::add) when an agent's tunnel is taken over (the returned id
/// names it from then on), [`handle_health`](Self::handle_health) for each report on its
/// control stream, [`remove`](Self::remove) when it ends. Unknown ids are ignored (a
/// report that raced the tunnel's end).
#[derive(Debug, Clone)]
pub struct LocalTunnels<T> {
    /// Newest first; never an empty list.
    sites: BTreeMap<Name, Vec<Tunnel<T>>>,
    /// Which site each live tunnel belongs to.
    index: BTreeMap<TunnelId, Name>,
    /// The last id given.
    last_id: u64,
}

impl<T> Default for LocalTunnels<T> {
    fn default() -> Self {
        Self {
            sites: BTreeMap::new(),
            index: BTreeMap::new(),
            last_id: 0,
        }
    }
}

impl<T> LocalTunnels<T> {
    /// No tunnels.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a new tunnel to `site`'s agent; it becomes the site's first route.
    pub fn add(&mut self, site: Name, handle: T) -> TunnelId {
        self.last_id += 1;
        let id = TunnelId(self.last_id);
        let tunnel = Tunnel {
            id,
            handle,
            health: BTreeMap::new(),
        };
        self.sites
            .entry(site.clone())
            .or_default()
            .insert(0, tunnel);
        self.index.insert(id, site);
        id
    }

    /// Forgets tunnel `id` and everything its agent reported; a site left without a tunnel
    /// disappears. Returns the site and the handle, if the tunnel was there.
    pub fn remove(&mut self, id: TunnelId) -> Option<(Name, T)> {
        let site = self.index.remove(&id)?;
        let tunnels = self.sites.get_mut(&site)?;
        let at = tunnels.iter().position(|t| t.id == id)?;
        let tunnel = tunnels.remove(at);
        if tunnels.is_empty() {
            self.sites.remove(&site);
        }
        Some((site, tunnel.handle))
    }

    /// Tunnel `id`'s agent reported the health of the targets it checks: the report
    /// replaces its previous one (a target listed twice counts as its last entry). Returns
    /// whether anything changed.
    pub fn handle_health(&mut self, id: TunnelId, report: Vec<(Target, bool)>) -> bool {
        let Some(site) = self.index.get(&id) else {
            return false;
        };
        let Some(tunnel) = self
            .sites
            .get_mut(site)
            .and_then(|v| v.iter_mut().find(|t| t.id == id))
        else {
            return false;
        };
        let health: BTreeMap<Target, bool> = report.into_iter().collect();
        if tunnel.health == health {
            return false;
        }
        tunnel.health = health;
        true
    }

    /// The site tunnel `id` leads to, while it is held.
    pub fn site(&self, id: TunnelId) -> Option<&Name> {
        self.index.get(&id)
    }

    /// The tunnels to `site`, newest first (none if this node holds none).
    pub fn tunnels(&self, site: &Name) -> &[Tunnel<T>] {
        self.sites.get(site).map_or(&[], Vec::as_slice)
    }

    /// Every tunnel with its site, by site name, newest first within a site.
    pub fn iter(&self) -> impl Iterator<Item = (&Name, &Tunnel<T>)> {
        self.sites
            .iter()
            .flat_map(|(site, v)| v.iter().map(move |t| (site, t)))
    }

    /// Whether this node holds a tunnel to `site`.
    pub fn holds(&self, site: &Name) -> bool {
        self.sites.contains_key(site)
    }

    /// Sites this node holds a tunnel to, sorted.
    pub fn held(&self) -> Vec<Name> {
        self.sites.keys().cloned().collect()
    }

    /// Whether `target` behind `site` is up, by the rule in the [module docs](self): down
    /// only if some tunnel of the site reported on it and none of those says it passes.
    pub fn target_ok(&self, site: &Name, target: &Target) -> bool {
        let mut reported = false;
        for t in self.tunnels(site) {
            match t.health(target) {
                Some(true) => return true,
                Some(false) => reported = true,
                None => {}
            }
        }
        !reported
    }

    /// How many tunnels this node holds.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether this node holds no tunnel.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

/// Which peers said they hold a tunnel to which site, with the time each was heard: the
/// half of the table the node's `Gossip` actor owns.
///
/// Calling order: [`handle_held`](Self::handle_held) for each peer's announcement (the
/// sender named by its connection's certificate), [`handle_timeout`](Self::handle_timeout)
/// when [`poll_timeout`](Self::poll_timeout) passes. Queries take `now` and never answer
/// with an expired holding, even before `handle_timeout` dropped it.
#[derive(Debug, Clone)]
pub struct Holdings {
    me: NodeId,
    /// Never this node, never an empty set.
    peers: BTreeMap<NodeId, Holding>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Holding {
    sites: BTreeSet<Name>,
    heard: Instant,
}

impl Holding {
    fn until(&self) -> Instant {
        self.heard + HELD_TTL
    }

    fn live(&self, now: Instant) -> bool {
        now < self.until()
    }
}

impl Holdings {
    /// Nothing heard yet, on node `me` (whose own name in an announcement is ignored).
    pub fn new(me: NodeId) -> Self {
        Self {
            me,
            peers: BTreeMap::new(),
        }
    }

    /// The node this table belongs to.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Peer `from` said at `now` that it holds tunnels to `sites` (and to no other): that
    /// replaces whatever it said before. Returns whether the live holdings changed (a peer
    /// repeating itself only refreshes the time, which reorders routes but changes no
    /// site's reachability).
    pub fn handle_held(
        &mut self,
        from: NodeId,
        sites: impl IntoIterator<Item = Name>,
        now: Instant,
    ) -> bool {
        if from == self.me {
            return false;
        }
        let before = self.live_sites(from, now).cloned();
        let sites: BTreeSet<Name> = sites.into_iter().collect();
        if sites.is_empty() {
            self.peers.remove(&from);
        } else {
            self.peers.insert(from, Holding { sites, heard: now });
        }
        before.as_ref() != self.live_sites(from, now)
    }

    /// Drops every holding that expired by `now`. Returns whether any was dropped (a site
    /// may have become unreachable through peers at that moment).
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        let before = self.peers.len();
        self.peers.retain(|_, h| h.live(now));
        self.peers.len() != before
    }

    /// When the next holding expires, if any is held.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers.values().map(Holding::until).min()
    }

    /// Peers that hold `site` at `now`, the most recently heard first (ties by node id).
    pub fn holders(&self, site: &Name, now: Instant) -> Vec<NodeId> {
        let mut v: Vec<(Instant, NodeId)> = self
            .peers
            .iter()
            .filter(|(_, h)| h.live(now) && h.sites.contains(site))
            .map(|(n, h)| (h.heard, *n))
            .collect();
        v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        v.into_iter().map(|(_, n)| n).collect()
    }

    /// Whether any peer holds `site` at `now`.
    pub fn held_by_any(&self, site: &Name, now: Instant) -> bool {
        self.peers
            .values()
            .any(|h| h.live(now) && h.sites.contains(site))
    }

    /// Peers with a live holding at `now`, by id, with their sites.
    pub fn peers(&self, now: Instant) -> impl Iterator<Item = (NodeId, &BTreeSet<Name>)> {
        self.peers
            .iter()
            .filter(move |(_, h)| h.live(now))
            .map(|(n, h)| (*n, &h.sites))
    }

    fn live_sites(&self, node: NodeId, now: Instant) -> Option<&BTreeSet<Name>> {
        self.peers
            .get(&node)
            .filter(|h| h.live(now))
            .map(|h| &h.sites)
    }
}

/// This node's tunnels and its peers' holdings side by side: the questions the data path
/// asks. The node builds one per request from the two published snapshots.
#[derive(Debug)]
pub struct SiteView<'a, T> {
    /// Tunnels this node holds.
    pub local: &'a LocalTunnels<T>,
    /// What peers said they hold.
    pub peers: &'a Holdings,
}

impl<'a, T: Clone> SiteView<'a, T> {
    /// The view of these two halves.
    pub fn new(local: &'a LocalTunnels<T>, peers: &'a Holdings) -> Self {
        Self { local, peers }
    }

    /// The ways to `site` at `now`, in the order to try them: this node's tunnels newest
    /// first, then peers that hold it, most recently heard first; never this node.
    pub fn routes(&self, site: &Name, now: Instant) -> Vec<Route<T>> {
        let mut v: Vec<Route<T>> = self
            .local
            .tunnels(site)
            .iter()
            .map(|t| Route::Tunnel(t.id, t.handle.clone()))
            .collect();
        v.extend(self.peers.holders(site, now).into_iter().map(Route::Peer));
        v
    }

    /// Whether any node (this one, or a peer as last heard) holds a tunnel to `site`.
    pub fn connected(&self, site: &Name, now: Instant) -> bool {
        self.local.holds(site) || self.peers.held_by_any(site, now)
    }

    /// Whether `target` behind `site` is up as this node's tunnels say (unknown: yes;
    /// health travels only on tunnels, so a site reached through a peer is always up).
    pub fn target_ok(&self, site: &Name, target: &Target) -> bool {
        self.local.target_ok(site, target)
    }

    /// Sites this node holds a tunnel to, sorted.
    pub fn held(&self) -> Vec<Name> {
        self.local.held()
    }
}

/// The whole table in one place, for callers that own both halves (tests, tools); the
/// node keeps the halves in two actors and reads them through a [`SiteView`].
#[derive(Debug, Clone)]
pub struct SiteTable<T> {
    /// Tunnels this node holds.
    pub local: LocalTunnels<T>,
    /// What peers said they hold.
    pub peers: Holdings,
}

impl<T: Clone> SiteTable<T> {
    /// An empty table on node `me`.
    pub fn new(me: NodeId) -> Self {
        Self {
            local: LocalTunnels::new(),
            peers: Holdings::new(me),
        }
    }

    /// Both halves, to ask.
    pub fn view(&self) -> SiteView<'_, T> {
        SiteView::new(&self.local, &self.peers)
    }

    /// See [`SiteView::routes`].
    pub fn routes(&self, site: &Name, now: Instant) -> Vec<Route<T>> {
        self.view().routes(site, now)
    }

    /// See [`SiteView::connected`].
    pub fn connected(&self, site: &Name, now: Instant) -> bool {
        self.view().connected(site, now)
    }

    /// See [`SiteView::target_ok`].
    pub fn target_ok(&self, site: &Name, target: &Target) -> bool {
        self.view().target_ok(site, target)
    }

    /// See [`SiteView::held`].
    pub fn held(&self) -> Vec<Name> {
        self.view().held()
    }

    /// See [`Holdings::poll_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers.poll_timeout()
    }

    /// See [`Holdings::handle_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        self.peers.handle_timeout(now)
    }
}

#[cfg(test)]
impl<T> LocalTunnels<T> {
    /// The structural rules: no empty site, the index names exactly the tunnels held and
    /// their sites, newest (highest id) first, no id above the last one given.
    fn check_invariants(&self) -> Result<(), String> {
        let mut seen = 0;
        for (site, v) in &self.sites {
            if v.is_empty() {
                return Err(format!("site {site} is listed without a tunnel"));
            }
            if !v.windows(2).all(|w| w[0].id > w[1].id) {
                return Err(format!("tunnels of {site} are not newest first"));
            }
            for t in v {
                seen += 1;
                if self.index.get(&t.id) != Some(site) {
                    return Err(format!("tunnel {} of {site} is not indexed there", t.id));
                }
                if t.id.0 > self.last_id {
                    return Err(format!("tunnel {} is newer than the last id", t.id));
                }
            }
        }
        if seen != self.index.len() {
            return Err(format!("{} tunnels indexed, {seen} held", self.index.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
impl Holdings {
    fn check_invariants(&self) -> Result<(), String> {
        if self.peers.contains_key(&self.me) {
            return Err("this node's own holding is kept".into());
        }
        if let Some((n, _)) = self.peers.iter().find(|(_, h)| h.sites.is_empty()) {
            return Err(format!("peer {n} is kept with no site"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn target(s: &str) -> Target {
        s.parse().unwrap()
    }

    const ME: NodeId = NodeId(1);

    #[test]
    fn routes_are_local_tunnels_newest_first_then_peers_most_recently_heard_first() {
        let t0 = Instant::now();
        let hq = name("hq");
        let mut table = SiteTable::<&str>::new(ME);
        assert!(table.routes(&hq, t0).is_empty());
        assert!(!table.connected(&hq, t0));

        let a = table.local.add(hq.clone(), "a");
        let b = table.local.add(hq.clone(), "b");
        assert!(table.peers.handle_held(NodeId(2), [hq.clone()], t0));
        assert!(table
            .peers
            .handle_held(NodeId(3), [hq.clone()], t0 + Duration::from_millis(500)));
        // This node's own name in an announcement counts for nothing.
        assert!(!table.peers.handle_held(ME, [hq.clone()], t0));
        let now = t0 + Duration::from_secs(1);
        assert_eq!(
            table.routes(&hq, now),
            vec![
                Route::Tunnel(b, "b"),
                Route::Tunnel(a, "a"),
                Route::Peer(NodeId(3)),
                Route::Peer(NodeId(2)),
            ]
        );
        assert!(table.connected(&hq, now));
        assert_eq!(table.held(), vec![hq.clone()]);

        // Node 2 speaks again: now it is the most recently heard.
        assert!(!table.peers.handle_held(NodeId(2), [hq.clone()], now));
        assert_eq!(
            table.routes(&hq, now)[2..],
            [Route::Peer(NodeId(2)), Route::Peer(NodeId(3))]
        );
    }

    #[test]
    fn a_site_without_tunnels_disappears_and_ids_are_not_reused() {
        let hq = name("hq");
        let mut local = LocalTunnels::new();
        let a = local.add(hq.clone(), 1u8);
        assert_eq!(local.site(a), Some(&hq));
        assert_eq!(local.remove(a), Some((hq.clone(), 1)));
        assert_eq!(local.remove(a), None, "removing twice does nothing");
        assert!(!local.holds(&hq));
        assert!(local.held().is_empty() && local.is_empty());
        let b = local.add(hq.clone(), 2);
        assert_ne!(a, b);
        assert!(!local.handle_health(a, vec![(target("10.0.0.1:80"), false)]));
        local.check_invariants().unwrap();
    }

    #[test]
    fn health_is_kept_per_tunnel_and_goes_away_with_it() {
        let hq = name("hq");
        let web = target("10.0.0.1:80");
        let db = target("10.0.0.2:5432");
        let mut local = LocalTunnels::new();
        let a = local.add(hq.clone(), "a");
        let b = local.add(hq.clone(), "b");
        assert!(local.target_ok(&hq, &web), "unknown is up");

        // Tunnel a says web is down; b has said nothing about it.
        assert!(local.handle_health(a, vec![(web.clone(), false), (db.clone(), true)]));
        assert!(!local.handle_health(a, vec![(web.clone(), false), (db.clone(), true)]));
        assert!(!local.target_ok(&hq, &web));
        assert!(local.target_ok(&hq, &db));

        // b's agent reaches web: the site can serve it.
        assert!(local.handle_health(b, vec![(web.clone(), true)]));
        assert!(local.target_ok(&hq, &web));
        assert!(local.handle_health(b, vec![(web.clone(), false)]));
        assert!(!local.target_ok(&hq, &web));

        // a's report replaces its previous one: db is no longer reported by a.
        assert!(local.handle_health(a, vec![(web.clone(), false)]));
        assert_eq!(local.tunnels(&hq)[1].health(&db), None);

        // Tunnels end: what they said goes with them.
        local.remove(b);
        assert!(!local.target_ok(&hq, &web), "a still says down");
        local.remove(a);
        assert!(local.target_ok(&hq, &web));
        assert!(local.target_ok(&name("other"), &web));
        local.check_invariants().unwrap();
    }

    #[test]
    fn holdings_expire_and_a_new_announcement_replaces_the_old() {
        let t0 = Instant::now();
        let hq = name("hq");
        let lab = name("lab");
        let mut peers = Holdings::new(ME);
        assert_eq!(peers.poll_timeout(), None);
        assert!(peers.handle_held(NodeId(2), [hq.clone(), lab.clone()], t0));
        assert_eq!(peers.holders(&lab, t0), vec![NodeId(2)]);

        // Node 2 now holds only hq: lab is gone at once, not when the old word expires.
        let t1 = t0 + Duration::from_secs(1);
        assert!(peers.handle_held(NodeId(2), [hq.clone()], t1));
        assert!(peers.holders(&lab, t1).is_empty());
        assert_eq!(peers.poll_timeout(), Some(t1 + HELD_TTL));

        // Past the TTL it no longer counts, even before the timeout is handled.
        let late = t1 + HELD_TTL;
        assert!(!peers.held_by_any(&hq, late));
        assert!(peers.holders(&hq, late).is_empty());
        assert!(!peers.handle_timeout(late - Duration::from_millis(1)));
        assert!(peers.handle_timeout(late));
        assert_eq!(peers.poll_timeout(), None);
        assert!(!peers.handle_timeout(late));

        // An empty announcement leaves nothing.
        assert!(peers.handle_held(NodeId(3), [hq.clone()], late));
        assert!(peers.handle_held(NodeId(3), [], late));
        assert_eq!(peers.poll_timeout(), None);
        peers.check_invariants().unwrap();
    }

    #[test]
    fn a_repeated_announcement_only_refreshes_unless_it_had_expired() {
        let t0 = Instant::now();
        let hq = name("hq");
        let mut peers = Holdings::new(ME);
        assert!(peers.handle_held(NodeId(2), [hq.clone()], t0));
        assert!(!peers.handle_held(NodeId(2), [hq.clone(), hq.clone()], t0));
        // Expired but not dropped yet: hearing it again makes the site reachable again.
        assert!(peers.handle_held(NodeId(2), [hq.clone()], t0 + HELD_TTL));
        // Expired and announcing nothing: nothing visible changes.
        assert!(!peers.handle_held(NodeId(2), [], t0 + HELD_TTL * 3));
    }

    // ---- the reference model ----

    const SITES: [&str; 3] = ["hq", "lab", "edge"];
    const TARGETS: [&str; 3] = ["10.0.0.1:80", "10.0.0.2:443", "db.internal:5432"];
    /// Nodes 1 (this one) to 4.
    const NODES: u64 = 4;

    #[derive(Debug, Clone)]
    enum Op {
        Add(usize),
        /// Removes the n-th live tunnel (modulo their number).
        Remove(usize),
        /// An id the table never gave (or gave and took back).
        RemoveUnknown(u64),
        /// A report on the n-th live tunnel.
        Health(usize, Vec<(usize, bool)>),
        Held(u64, Vec<usize>),
        Advance(u64),
        /// To the next expiry the model knows, give or take a millisecond (the edges).
        ToExpiry(i8),
        Timeout,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..SITES.len()).prop_map(Op::Add),
            2 => any::<usize>().prop_map(Op::Remove),
            1 => (0u64..40).prop_map(Op::RemoveUnknown),
            3 => (any::<usize>(), prop::collection::vec((0..TARGETS.len(), any::<bool>()), 0..5))
                .prop_map(|(i, r)| Op::Health(i, r)),
            3 => (1..=NODES, prop::collection::vec(0..SITES.len(), 0..4))
                .prop_map(|(n, s)| Op::Held(n, s)),
            3 => (0u64..2500).prop_map(Op::Advance),
            2 => (-1i8..=1).prop_map(Op::ToExpiry),
            1 => Just(Op::Timeout),
        ]
    }

    /// A tunnel in the model: id, site, handle, its last report as sent.
    type ModelTunnel = (TunnelId, Name, u32, Vec<(Target, bool)>);

    /// Brute force over vectors in arrival order.
    struct Model {
        /// Oldest first.
        tunnels: Vec<ModelTunnel>,
        /// Arrival order.
        held: Vec<(NodeId, Vec<Name>, Instant)>,
    }

    impl Model {
        fn live(&self, now: Instant) -> Vec<(NodeId, Name)> {
            let mut v: Vec<(NodeId, Name)> = self
                .held
                .iter()
                .filter(|(_, _, at)| now < *at + HELD_TTL)
                .flat_map(|(n, s, _)| s.iter().map(move |s| (*n, s.clone())))
                .collect();
            v.sort();
            v.dedup();
            v
        }

        fn routes(&self, site: &Name, now: Instant) -> Vec<Route<u32>> {
            let mut v: Vec<Route<u32>> = self
                .tunnels
                .iter()
                .rev()
                .filter(|t| t.1 == *site)
                .map(|t| Route::Tunnel(t.0, t.2))
                .collect();
            let mut peers: Vec<&(NodeId, Vec<Name>, Instant)> = self
                .held
                .iter()
                .filter(|(n, s, at)| *n != ME && s.contains(site) && now < *at + HELD_TTL)
                .collect();
            peers.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
            v.extend(peers.into_iter().map(|p| Route::Peer(p.0)));
            v
        }

        fn target_ok(&self, site: &Name, target: &Target) -> bool {
            let said: Vec<bool> = self
                .tunnels
                .iter()
                .filter(|t| t.1 == *site)
                .filter_map(|t| t.3.iter().rev().find(|(x, _)| x == target).map(|r| r.1))
                .collect();
            said.is_empty() || said.contains(&true)
        }

        fn next_expiry(&self) -> Option<Instant> {
            self.held.iter().map(|h| h.2 + HELD_TTL).min()
        }

        fn held(&self) -> Vec<Name> {
            let mut v: Vec<Name> = self.tunnels.iter().map(|t| t.1.clone()).collect();
            v.sort();
            v.dedup();
            v
        }
    }

    struct Sim {
        table: SiteTable<u32>,
        model: Model,
        now: Instant,
        handles: u32,
    }

    impl Sim {
        fn new() -> Self {
            Self {
                table: SiteTable::new(ME),
                model: Model {
                    tunnels: Vec::new(),
                    held: Vec::new(),
                },
                now: Instant::now(),
                handles: 0,
            }
        }

        fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
            let now = self.now;
            match op {
                Op::Add(s) => {
                    self.handles += 1;
                    let site = name(SITES[*s]);
                    let id = self.table.local.add(site.clone(), self.handles);
                    prop_assert!(
                        self.model.tunnels.iter().all(|t| t.0 < id),
                        "ids grow and are never reused"
                    );
                    self.model
                        .tunnels
                        .push((id, site, self.handles, Vec::new()));
                }
                Op::Remove(i) => {
                    if self.model.tunnels.is_empty() {
                        return Ok(());
                    }
                    let (id, site, handle, _) =
                        self.model.tunnels.remove(i % self.model.tunnels.len());
                    prop_assert_eq!(self.table.local.remove(id), Some((site, handle)));
                }
                Op::RemoveUnknown(raw) => {
                    let id = TunnelId(*raw);
                    if let Some(at) = self.model.tunnels.iter().position(|t| t.0 == id) {
                        let (_, site, handle, _) = self.model.tunnels.remove(at);
                        prop_assert_eq!(self.table.local.remove(id), Some((site, handle)));
                    } else {
                        prop_assert_eq!(self.table.local.remove(id), None);
                    }
                }
                Op::Health(i, report) => {
                    if self.model.tunnels.is_empty() {
                        return Ok(());
                    }
                    let n = self.model.tunnels.len();
                    let t = &mut self.model.tunnels[i % n];
                    let report: Vec<(Target, bool)> = report
                        .iter()
                        .map(|(x, ok)| (target(TARGETS[*x]), *ok))
                        .collect();
                    let norm = |r: &[(Target, bool)]| -> BTreeMap<Target, bool> {
                        r.iter().cloned().collect()
                    };
                    let changed = norm(&t.3) != norm(&report);
                    t.3 = report.clone();
                    prop_assert_eq!(self.table.local.handle_health(t.0, report), changed);
                }
                Op::Held(n, sites) => {
                    let node = NodeId(*n);
                    let sites: Vec<Name> = sites.iter().map(|s| name(SITES[*s])).collect();
                    let before = self.model.live(now);
                    self.model.held.retain(|h| h.0 != node);
                    if node != ME && !sites.is_empty() {
                        self.model.held.push((node, sites.clone(), now));
                    }
                    let changed = before != self.model.live(now);
                    prop_assert_eq!(self.table.peers.handle_held(node, sites, now), changed);
                }
                Op::Advance(ms) => self.now += Duration::from_millis(*ms),
                Op::ToExpiry(offset) => {
                    let Some(at) = self.model.next_expiry() else {
                        return Ok(());
                    };
                    let edge = Duration::from_millis(1);
                    let at = match offset {
                        -1 => at - edge,
                        0 => at,
                        _ => at + edge,
                    };
                    self.now = self.now.max(at);
                }
                Op::Timeout => {
                    let before = self.model.held.len();
                    self.model.held.retain(|h| now < h.2 + HELD_TTL);
                    let dropped = self.model.held.len() != before;
                    prop_assert_eq!(self.table.handle_timeout(now), dropped);
                    prop_assert!(self.table.poll_timeout().is_none_or(|t| t > now));
                }
            }
            self.check()
        }

        fn check(&self) -> Result<(), TestCaseError> {
            let now = self.now;
            self.table
                .local
                .check_invariants()
                .map_err(TestCaseError::fail)?;
            self.table
                .peers
                .check_invariants()
                .map_err(TestCaseError::fail)?;
            prop_assert_eq!(self.table.held(), self.model.held());
            prop_assert_eq!(self.table.local.len(), self.model.tunnels.len());
            for s in SITES {
                let site = name(s);
                let routes = self.table.routes(&site, now);
                prop_assert_eq!(&routes, &self.model.routes(&site, now), "routes to {}", s);
                prop_assert!(!routes.contains(&Route::Peer(ME)), "never this node");
                prop_assert_eq!(self.table.connected(&site, now), !routes.is_empty());
                for t in TARGETS {
                    let t = target(t);
                    prop_assert_eq!(
                        self.table.target_ok(&site, &t),
                        self.model.target_ok(&site, &t),
                        "health of {} at {}",
                        t,
                        s
                    );
                }
            }
            prop_assert_eq!(self.table.poll_timeout(), self.model.next_expiry());
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Random tunnels coming and going, health reports, peers' announcements and time
        /// against a brute-force model: routes, connectivity, target health, held sites and
        /// the next expiry agree after every step, and the table's rules hold. A failure is
        /// replayable from the ops proptest prints (no other randomness).
        #[test]
        fn the_site_table_follows_its_model(ops in prop::collection::vec(op(), 1..150)) {
            let mut sim = Sim::new();
            for op in &ops {
                sim.step(op)?;
            }
        }
    }
}
