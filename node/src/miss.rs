//! Leader reads for ids this node does not know: API keys, join tokens and ACME challenge
//! tokens that anyone can send without being authenticated.
//!
//! A known id is answered from this node's replica and never comes here. An id this
//! replica does not know may have been created a moment ago through another node and not
//! have reached it yet, so it is worth one read index on the leader; but anyone can send
//! made-up ids by the thousand, and each read costs the leader a heartbeat round to a
//! quorum. So, per kind of id:
//!
//! ```text
//!   id unknown to this replica
//!     │
//!   missed on the leader within miss_ttl? ──── yes: unknown (no leader read)
//!     │ no
//!   a leader read for it in flight? ────────── yes: wait for it, then this replica again
//!     │ no
//!   a token left in the bucket? ────────────── no: unknown (counted; logged ≤ every 10 s)
//!     │ yes
//!   read index on the leader, then this replica again; a miss is remembered for miss_ttl
//! ```
//!
//! After a read the id is remembered whatever the answer: if the leader knew it, this
//! replica knows it now too and is asked first from then on.
//!
//! The decisions are made by [`Misses`], which takes the time as an argument and does no
//! I/O; [`recheck`] is the shell that asks the leader. There is one [`LeaderChecks`] per
//! node (per [`Cluster`] handle), found from the handle with [`LeaderChecks::of`], so the
//! admin API, the HTTP listener (ACME) and the join service share its buckets without
//! passing it around.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::hash::{BuildHasher as _, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use warren_consensus::cluster::{Cluster, ClusterError};
use warren_consensus::registry::Registry;

/// A kind of id checked here; each kind has its own bucket and remembered misses, so
/// made-up API keys cannot use up the leader reads that ACME validation or a joining node
/// needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The id of an API key (`wrn_<id>_…`) sent to the admin API.
    ApiKey,
    /// The id of a join token (`wjt1_…`) sent to the join service.
    JoinToken,
    /// An ACME HTTP-01 challenge token asked for on the HTTP port.
    AcmeChallenge,
}

impl Kind {
    /// Every kind, in the order of their counters.
    pub const ALL: [Kind; 3] = [Kind::ApiKey, Kind::JoinToken, Kind::AcmeChallenge];

    fn index(self) -> usize {
        self as usize
    }

    /// The kind's label in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Kind::ApiKey => "api_key",
            Kind::JoinToken => "join_token",
            Kind::AcmeChallenge => "acme_challenge",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Kind::ApiKey => "API keys",
            Kind::JoinToken => "join tokens",
            Kind::AcmeChallenge => "ACME challenge tokens",
        }
    }
}

/// How many leader reads unknown ids may cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLimits {
    /// Leader reads per second for each kind of id, and as many at once after a quiet
    /// second (the bucket's size).
    pub reads_per_second: u32,
    /// How long an id the leader did not know either is answered as unknown without
    /// asking again.
    pub miss_ttl: Duration,
    /// Most misses remembered for each kind (the oldest are forgotten first).
    pub max_misses: usize,
}

impl Default for CheckLimits {
    fn default() -> Self {
        Self {
            reads_per_second: 20,
            miss_ttl: Duration::from_secs(2),
            max_misses: 4096,
        }
    }
}

/// A [`CheckLimits`] field that is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct LimitsError {
    /// The field at fault.
    pub field: &'static str,
    /// What was expected.
    pub reason: &'static str,
}

impl CheckLimits {
    /// The limits, if every field is in range.
    pub fn validate(self) -> Result<Self, LimitsError> {
        if self.reads_per_second == 0 {
            // Zero would refuse every key created through another node until it arrives.
            return Err(LimitsError {
                field: "reads_per_second",
                reason: "expected at least 1",
            });
        }
        if self.max_misses == 0 {
            return Err(LimitsError {
                field: "max_misses",
                reason: "expected at least 1",
            });
        }
        Ok(self)
    }
}

/// What to do with an id this replica does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Ask the leader, then report with [`Misses::handle_answer`].
    Ask,
    /// A read for the same id is in flight: wait for it and look again.
    Wait,
    /// The leader did not know it a moment ago: unknown.
    RecentMiss,
    /// Over the rate of leader reads: unknown.
    Limited,
}

impl Decision {
    const ALL: [Decision; 4] = [
        Decision::Ask,
        Decision::Wait,
        Decision::RecentMiss,
        Decision::Limited,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn label(self) -> &'static str {
        match self {
            Decision::Ask => "leader_read",
            Decision::Wait => "joined_read",
            Decision::RecentMiss => "recent_miss",
            Decision::Limited => "rate_limited",
        }
    }
}

/// A line to log: ids of `kind` answered as unknown over the limit since the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitedReport {
    /// Which kind.
    pub kind: Kind,
    /// How many since the last report.
    pub refused: u64,
}

/// The decisions for unknown ids, without I/O. Ids are 64-bit hashes (see
/// [`LeaderChecks`]).
///
/// Calling order: [`Misses::handle_unknown`] for each id this replica does not know; after
/// [`Decision::Ask`], exactly one [`Misses::handle_answer`] for that id (also when the
/// read failed); then drain [`Misses::poll_report`].
#[derive(Debug)]
pub struct Misses {
    limits: CheckLimits,
    kinds: [PerKind; 3],
}

#[derive(Debug)]
struct PerKind {
    /// Leader reads left, at `refilled`.
    tokens: f64,
    refilled: Option<Instant>,
    /// Ids the leader did not know, until when.
    recent: HashMap<u64, Instant>,
    /// `recent` in insertion order, to forget the oldest (an entry whose time no longer
    /// matches `recent` was renewed and is skipped).
    order: VecDeque<(u64, Instant)>,
    asking: HashSet<u64>,
    /// Refused over the limit and not reported yet.
    unreported: u64,
    reported: Option<Instant>,
}

/// How often a kind over its limit is logged.
const REPORT_EVERY: Duration = Duration::from_secs(10);

impl Misses {
    /// Empty, with full buckets.
    pub fn new(limits: CheckLimits) -> Self {
        let full = f64::from(limits.reads_per_second);
        let kind = || PerKind {
            tokens: full,
            refilled: None,
            recent: HashMap::new(),
            order: VecDeque::new(),
            asking: HashSet::new(),
            unreported: 0,
            reported: None,
        };
        Self {
            limits,
            kinds: [kind(), kind(), kind()],
        }
    }

    /// Takes new limits (buckets keep their tokens, capped to the new size).
    pub fn set_limits(&mut self, limits: CheckLimits) {
        let full = f64::from(limits.reads_per_second);
        for k in &mut self.kinds {
            k.tokens = k.tokens.min(full);
        }
        self.limits = limits;
    }

    /// The limits in force.
    pub fn limits(&self) -> &CheckLimits {
        &self.limits
    }

    /// Decides what to do with `id`, which this replica does not know, at `now`.
    pub fn handle_unknown(&mut self, kind: Kind, id: u64, now: Instant) -> Decision {
        let rate = f64::from(self.limits.reads_per_second);
        let k = &mut self.kinds[kind.index()];
        if k.recent.get(&id).is_some_and(|until| *until > now) {
            return Decision::RecentMiss;
        }
        if k.asking.contains(&id) {
            return Decision::Wait;
        }
        if let Some(then) = k.refilled {
            let elapsed = now.saturating_duration_since(then).as_secs_f64();
            k.tokens = (k.tokens + elapsed * rate).min(rate);
        }
        k.refilled = Some(now);
        if k.tokens < 1.0 {
            k.unreported += 1;
            return Decision::Limited;
        }
        k.tokens -= 1.0;
        k.asking.insert(id);
        Decision::Ask
    }

    /// The read for `id` after [`Decision::Ask`] is over: `read` says whether it
    /// succeeded (a failed one is not remembered, so the id is asked again).
    pub fn handle_answer(&mut self, kind: Kind, id: u64, read: bool, now: Instant) {
        let max = self.limits.max_misses;
        let until = now + self.limits.miss_ttl;
        let k = &mut self.kinds[kind.index()];
        k.asking.remove(&id);
        if !read {
            return;
        }
        while let Some(&(old, old_until)) = k.order.front() {
            if old_until > now && k.order.len() < max {
                break;
            }
            k.order.pop_front();
            if k.recent.get(&old) == Some(&old_until) {
                k.recent.remove(&old);
            }
        }
        k.recent.insert(id, until);
        k.order.push_back((id, until));
    }

    /// A line to log, if a kind was refused over its limit and was not reported within
    /// the last 10 s.
    pub fn poll_report(&mut self, now: Instant) -> Option<LimitedReport> {
        for kind in Kind::ALL {
            let k = &mut self.kinds[kind.index()];
            if k.unreported == 0
                || k.reported
                    .is_some_and(|t| now.saturating_duration_since(t) < REPORT_EVERY)
            {
                continue;
            }
            let refused = std::mem::take(&mut k.unreported);
            k.reported = Some(now);
            return Some(LimitedReport { kind, refused });
        }
        None
    }

    /// Misses remembered for `kind` now (expired ones included until they are pushed out).
    pub fn remembered(&self, kind: Kind) -> usize {
        self.kinds[kind.index()].recent.len()
    }
}

/// Looks an id up again after this node's replica did not know it (it may have been
/// created a moment ago through another node): returns the registry to look in, fresh from
/// a read index on the leader when the node's [`Misses`] allows one or after a read for
/// the same id that was in flight, else this replica as it is (and the caller answers
/// "unknown" without the leader).
///
/// A read that joined one in flight, or a miss remembered, may not see an id created a
/// moment after that read began: ids are random and made by the cluster, so only someone
/// who guessed one before it existed can be in that position.
pub async fn recheck<I: Hash>(
    cluster: &Cluster,
    kind: Kind,
    id: I,
) -> Result<Arc<Registry>, ClusterError> {
    LeaderChecks::of(cluster).recheck(cluster, kind, id).await
}

/// The counters of the node `cluster` is the handle of, in the Prometheus text format,
/// with its read-index count.
pub fn render(cluster: &Cluster) -> String {
    LeaderChecks::of(cluster).render(cluster)
}

/// The [`Misses`] of one node and its counters.
pub struct LeaderChecks {
    hasher: RandomState,
    state: Mutex<State>,
    /// By kind, then by decision.
    counts: [[AtomicU64; 4]; 3],
}

struct State {
    misses: Misses,
    /// Reads in flight, by kind and id: closed when the read is over.
    in_flight: HashMap<(Kind, u64), watch::Receiver<()>>,
}

/// Every node's checks in this process (one in a real deployment), each with a receiver of
/// its registry to tell which [`Cluster`] handle it belongs to.
type Nodes = Mutex<Vec<(watch::Receiver<Arc<Registry>>, Arc<LeaderChecks>)>>;

fn nodes() -> &'static Nodes {
    static NODES: OnceLock<Nodes> = OnceLock::new();
    NODES.get_or_init(Nodes::default)
}

impl LeaderChecks {
    /// The checks of the node `cluster` is the handle of, made on first use (with default
    /// limits until [`LeaderChecks::configure`]).
    pub fn of(cluster: &Cluster) -> Arc<Self> {
        let rx = cluster.subscribe();
        let mut nodes = nodes().lock().expect("leader checks lock");
        // A node that stopped (a restart in this process) leaves its entry behind.
        nodes.retain(|(other, _)| other.has_changed().is_ok());
        if let Some((_, checks)) = nodes.iter().find(|(other, _)| other.same_channel(&rx)) {
            return checks.clone();
        }
        let checks = Arc::new(Self::new(CheckLimits::default()));
        nodes.push((rx, checks.clone()));
        checks
    }

    /// Sets the limits of the checks of the node `cluster` is the handle of.
    pub fn configure(cluster: &Cluster, limits: CheckLimits) {
        Self::of(cluster)
            .state
            .lock()
            .expect("leader checks lock")
            .misses
            .set_limits(limits);
    }

    fn new(limits: CheckLimits) -> Self {
        Self {
            hasher: RandomState::new(),
            state: Mutex::new(State {
                misses: Misses::new(limits),
                in_flight: HashMap::new(),
            }),
            counts: Default::default(),
        }
    }

    /// [`recheck`] for this node.
    async fn recheck<I: Hash>(
        &self,
        cluster: &Cluster,
        kind: Kind,
        id: I,
    ) -> Result<Arc<Registry>, ClusterError> {
        let id = self.hasher.hash_one(id);
        let (decision, wait) = {
            let mut st = self.state.lock().expect("leader checks lock");
            let now = Instant::now();
            let decision = st.misses.handle_unknown(kind, id, now);
            let wait = match decision {
                Decision::Ask => {
                    let (tx, rx) = watch::channel(());
                    st.in_flight.insert((kind, id), rx);
                    Some(Err(tx))
                }
                Decision::Wait => st.in_flight.get(&(kind, id)).cloned().map(Ok),
                Decision::RecentMiss | Decision::Limited => None,
            };
            if let Some(r) = st.misses.poll_report(now) {
                let rate = st.misses.limits().reads_per_second;
                tracing::warn!(
                    kind = r.kind.label(),
                    refused = r.refused,
                    "{} this node does not know: {} answered as unknown without asking the leader since the last report (over --unknown-id-leader-reads-per-s {rate})",
                    r.kind.what(),
                    r.refused
                );
            }
            (decision, wait)
        };
        self.counts[kind.index()][decision.index()].fetch_add(1, Ordering::Relaxed);
        match wait {
            Some(Err(tx)) => {
                // Ends the entry even if this request is dropped while the leader answers.
                let mut asking = Asking {
                    checks: self,
                    kind,
                    id,
                    read: false,
                    _tx: tx,
                };
                let registry = cluster.read().await?;
                asking.read = true;
                Ok(registry)
            }
            Some(Ok(mut rx)) => {
                // Closed (an error) when the read is over, whatever its outcome.
                let _ = rx.changed().await;
                Ok(cluster.registry())
            }
            None => Ok(cluster.registry()),
        }
    }

    /// The counters in the Prometheus text format, with the node's read-index count.
    pub fn render(&self, cluster: &Cluster) -> String {
        let mut out = String::new();
        out.push_str("# HELP warren_read_index_served_total Read-index requests this node answered as leader (its own linearizable reads and forwarded ones).\n");
        out.push_str("# TYPE warren_read_index_served_total counter\n");
        let _ = writeln!(
            out,
            "warren_read_index_served_total {}",
            cluster.read_index_served()
        );
        out.push_str("# HELP warren_unknown_id_checks_total Ids this node's replica did not know (API keys, join tokens, ACME challenge tokens), by what was done: leader_read, joined_read (waited for one in flight), recent_miss, rate_limited.\n");
        out.push_str("# TYPE warren_unknown_id_checks_total counter\n");
        for kind in Kind::ALL {
            for d in Decision::ALL {
                let _ = writeln!(
                    out,
                    "warren_unknown_id_checks_total{{kind=\"{}\",outcome=\"{}\"}} {}",
                    kind.label(),
                    d.label(),
                    self.counts[kind.index()][d.index()].load(Ordering::Relaxed)
                );
            }
        }
        out
    }
}

/// A leader read in flight: reports its outcome and closes its waiters when dropped.
struct Asking<'a> {
    checks: &'a LeaderChecks,
    kind: Kind,
    id: u64,
    read: bool,
    _tx: watch::Sender<()>,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        let mut st = self.checks.state.lock().expect("leader checks lock");
        st.in_flight.remove(&(self.kind, self.id));
        st.misses
            .handle_answer(self.kind, self.id, self.read, Instant::now());
        // `_tx` is dropped after this, which wakes the waiters.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: u32, max: usize) -> CheckLimits {
        CheckLimits {
            reads_per_second: rate,
            miss_ttl: Duration::from_secs(2),
            max_misses: max,
        }
    }

    #[test]
    fn a_burst_of_made_up_ids_costs_at_most_the_bucket_then_the_rate() {
        let mut m = Misses::new(limits(5, 100));
        let t0 = Instant::now();
        let mut asked = 0;
        for id in 0..1000 {
            if m.handle_unknown(Kind::ApiKey, id, t0) == Decision::Ask {
                asked += 1;
                m.handle_answer(Kind::ApiKey, id, true, t0);
            }
        }
        assert_eq!(asked, 5);
        // Another second lets five more through, not more.
        let t1 = t0 + Duration::from_secs(1);
        let asked = (1000..2000)
            .filter(|id| m.handle_unknown(Kind::ApiKey, *id, t1) == Decision::Ask)
            .count();
        assert_eq!(asked, 5);
    }

    #[test]
    fn kinds_have_their_own_buckets() {
        let mut m = Misses::new(limits(2, 100));
        let t = Instant::now();
        for id in 0..10 {
            m.handle_unknown(Kind::ApiKey, id, t);
        }
        assert_eq!(m.handle_unknown(Kind::ApiKey, 99, t), Decision::Limited);
        assert_eq!(m.handle_unknown(Kind::AcmeChallenge, 99, t), Decision::Ask);
        assert_eq!(m.handle_unknown(Kind::JoinToken, 99, t), Decision::Ask);
    }

    #[test]
    fn a_miss_is_remembered_for_the_ttl_only() {
        let mut m = Misses::new(limits(100, 100));
        let t = Instant::now();
        assert_eq!(m.handle_unknown(Kind::JoinToken, 7, t), Decision::Ask);
        m.handle_answer(Kind::JoinToken, 7, true, t);
        assert_eq!(
            m.handle_unknown(Kind::JoinToken, 7, t + Duration::from_millis(1999)),
            Decision::RecentMiss
        );
        assert_eq!(
            m.handle_unknown(Kind::JoinToken, 7, t + Duration::from_secs(2)),
            Decision::Ask
        );
    }

    #[test]
    fn a_failed_read_is_not_remembered() {
        let mut m = Misses::new(limits(100, 100));
        let t = Instant::now();
        m.handle_unknown(Kind::ApiKey, 2, t);
        m.handle_answer(Kind::ApiKey, 2, false, t);
        assert_eq!(m.handle_unknown(Kind::ApiKey, 2, t), Decision::Ask);
        assert_eq!(m.remembered(Kind::ApiKey), 0);
    }

    #[test]
    fn one_read_per_id_in_flight() {
        let mut m = Misses::new(limits(100, 100));
        let t = Instant::now();
        assert_eq!(m.handle_unknown(Kind::AcmeChallenge, 3, t), Decision::Ask);
        for _ in 0..50 {
            assert_eq!(m.handle_unknown(Kind::AcmeChallenge, 3, t), Decision::Wait);
        }
        m.handle_answer(Kind::AcmeChallenge, 3, false, t);
        assert_eq!(m.handle_unknown(Kind::AcmeChallenge, 3, t), Decision::Ask);
    }

    #[test]
    fn remembered_misses_are_bounded_oldest_first() {
        let mut m = Misses::new(limits(u32::MAX, 3));
        let t = Instant::now();
        for id in 0..10 {
            assert_eq!(m.handle_unknown(Kind::ApiKey, id, t), Decision::Ask);
            m.handle_answer(Kind::ApiKey, id, true, t);
            assert!(m.remembered(Kind::ApiKey) <= 3);
        }
        assert_eq!(m.handle_unknown(Kind::ApiKey, 9, t), Decision::RecentMiss);
        assert_eq!(m.handle_unknown(Kind::ApiKey, 0, t), Decision::Ask);
    }

    #[test]
    fn being_over_the_limit_is_reported_at_most_every_ten_seconds() {
        let mut m = Misses::new(limits(1, 100));
        let t = Instant::now();
        assert_eq!(m.poll_report(t), None);
        for id in 0..5 {
            m.handle_unknown(Kind::ApiKey, id, t);
        }
        assert_eq!(
            m.poll_report(t),
            Some(LimitedReport {
                kind: Kind::ApiKey,
                refused: 4
            })
        );
        m.handle_unknown(Kind::ApiKey, 10, t + Duration::from_millis(10));
        assert_eq!(m.poll_report(t + Duration::from_secs(9)), None);
        assert_eq!(
            m.poll_report(t + Duration::from_secs(10)),
            Some(LimitedReport {
                kind: Kind::ApiKey,
                refused: 1
            })
        );
        assert_eq!(m.poll_report(t + Duration::from_secs(30)), None);
    }

    #[test]
    fn limits_are_checked() {
        assert!(CheckLimits::default().validate().is_ok());
        let e = CheckLimits {
            reads_per_second: 0,
            ..CheckLimits::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "reads_per_second");
    }
}
