//! The `certs` actor: ACME certificates for the domains of web resources, ordered by one
//! node at a time under a lease held in Raft. It runs on every node when ACME is
//! configured; the protocol I/O (account, orders, HTTP-01 answers) is in [`crate::acme`].
//!
//! ```text
//!  timer ─► CertsActor ──handle_timeout(&registry, now)──► CertsCore
//!             │   ▲ poll_timeout(): the next check          │ poll_action()
//!             │   └─────────────────────────────────────────┘
//!             ├─ TakeLease ─► AcmeLease { me, until } (task) ─► Leased msg
//!             ├─ Order ─► account, then one order per domain (task) ─► Ordered msgs, OrderEnded
//!             ├─ Abandon ─► abort the order task (its lease is about to run out)
//!             └─ ReleaseLease ─► AcmeLease { me, until: 0 } (task)
//! ```
//!
//! Every node checks every [`CHECK_EVERY`] seconds which resource domains lack a
//! certificate valid for long enough. A node that finds some, and sees no live lease of
//! another node, writes the lease; the registry grants it to one node only. That node
//! orders; a domain whose order failed waits [`RETRY_AFTER`] before it is tried again. A
//! panic in the actor or its tasks fails the actor and the supervisor restarts it; a lease
//! it held runs out on its own (or the new incarnation takes it again).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt as _;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::{AbortHandle, JoinSet};
use warren_consensus::cluster::Cluster;
use warren_consensus::registry::{Command, Registry};
use warren_proto::registry::NodeId;

use crate::acme::{self, domains_needing_certs, AcmeSettings};
use crate::actors::ChildSpec;
use crate::proxy::unix_now;
use crate::sessions::panic_text;
use crate::shell::Timer;

/// How often every node looks for domains that need a certificate, in seconds.
pub const CHECK_EVERY: u64 = 3;
/// How long a lease lets its holder order, in seconds; another node may take over after.
pub const LEASE: u64 = 300;
/// An order still running this many seconds before its lease ends is abandoned, so that
/// two nodes never order at once.
pub const LEASE_MARGIN: u64 = 30;
/// Wait after a failed order of a domain before ordering it again, in seconds.
pub const RETRY_AFTER: u64 = 60;

/// One round of ordering under one lease, so that reports of an abandoned round are
/// ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round(pub u64);

/// What the [`CertsCore`] asks its shell to do.
#[derive(Debug, PartialEq, Eq)]
pub enum CertsAction {
    /// Write `Command::AcmeLease { node: me, until }`; report with
    /// [`CertsCore::handle_leased`].
    TakeLease {
        /// The round.
        round: Round,
        /// Until when (seconds since the epoch).
        until: u64,
    },
    /// Order certificates for `domains` (the account first); report each domain with
    /// [`CertsCore::handle_ordered`], then the end with [`CertsCore::handle_round_ended`].
    Order {
        /// The round.
        round: Round,
        /// The domains, in order.
        domains: Vec<String>,
    },
    /// Stop the round's ordering: its lease is about to run out.
    Abandon {
        /// The round.
        round: Round,
    },
    /// Give the lease back (`Command::AcmeLease { node: me, until: 0 }`).
    ReleaseLease,
}

/// When and what to order, as a state machine without I/O.
///
/// Time is seconds since the Unix epoch, as the registry's lease and certificate dates.
///
/// Calling order: [`handle_timeout`](Self::handle_timeout) with the current registry when
/// [`poll_timeout`](Self::poll_timeout) passes (the first time at once);
/// [`handle_leased`](Self::handle_leased), [`handle_ordered`](Self::handle_ordered) and
/// [`handle_round_ended`](Self::handle_round_ended) as the work it asked for reports. After
/// each call, drain [`poll_action`](Self::poll_action) and perform every action in order.
pub struct CertsCore {
    me: NodeId,
    renew_before: Duration,
    /// Hosts to keep a certificate for besides the resources' domains (the auth host).
    also: Vec<String>,
    next_check: u64,
    /// Domains whose order failed, and when they may be ordered again.
    failed: HashMap<String, u64>,
    phase: Phase,
    next_round: u64,
    actions: VecDeque<CertsAction>,
}

#[derive(Debug)]
enum Phase {
    Idle,
    /// The lease is being written.
    Leasing {
        round: Round,
        domains: Vec<String>,
        until: u64,
    },
    /// Under the lease: ordering; `pending` have not reported yet.
    Ordering {
        round: Round,
        pending: BTreeSet<String>,
        deadline: u64,
    },
}

impl CertsCore {
    /// The core of node `me`, renewing certificates `renew_before` they expire; `also`
    /// names hosts that need one besides the resources' domains (the auth host).
    pub fn new(me: NodeId, renew_before: Duration, also: Vec<String>) -> Self {
        Self {
            me,
            renew_before,
            also,
            next_check: 0,
            failed: HashMap::new(),
            phase: Phase::Idle,
            next_round: 0,
            actions: VecDeque::new(),
        }
    }

    /// Time passed; `reg` is the registry now.
    pub fn handle_timeout(&mut self, reg: &Registry, now: u64) {
        if let Phase::Ordering {
            round, deadline, ..
        } = &self.phase
        {
            if *deadline <= now {
                let round = *round;
                self.actions.push_back(CertsAction::Abandon { round });
                self.end_round(now);
            }
        }
        if matches!(self.phase, Phase::Idle) && now >= self.next_check {
            self.next_check = now + CHECK_EVERY;
            self.check(reg, now);
        }
    }

    /// The lease of `round` was written (`granted`), or refused or failed.
    pub fn handle_leased(&mut self, round: Round, granted: bool, now: u64) {
        let Phase::Leasing {
            round: r,
            domains,
            until,
        } = &mut self.phase
        else {
            return;
        };
        if *r != round {
            return;
        }
        if !granted {
            self.phase = Phase::Idle;
            self.next_check = self.next_check.max(now + CHECK_EVERY);
            return;
        }
        let domains = std::mem::take(domains);
        let deadline = until.saturating_sub(LEASE_MARGIN);
        self.phase = Phase::Ordering {
            round,
            pending: domains.iter().cloned().collect(),
            deadline,
        };
        self.actions
            .push_back(CertsAction::Order { round, domains });
    }

    /// The order of `domain` in `round` succeeded (`ok`: the certificate is stored) or
    /// failed.
    pub fn handle_ordered(&mut self, round: Round, domain: &str, ok: bool, now: u64) {
        let Phase::Ordering {
            round: r, pending, ..
        } = &mut self.phase
        else {
            return;
        };
        if *r != round || !pending.remove(domain) {
            return;
        }
        if ok {
            self.failed.remove(domain);
        } else {
            self.failed.insert(domain.to_owned(), now + RETRY_AFTER);
        }
    }

    /// The ordering of `round` ended (each domain that did not report failed: the account
    /// could not be had, or the task stopped early).
    pub fn handle_round_ended(&mut self, round: Round, now: u64) {
        if matches!(self.phase, Phase::Ordering { round: r, .. } if r == round) {
            self.end_round(now);
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<CertsAction> {
        self.actions.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        match &self.phase {
            Phase::Idle => Some(self.next_check),
            // The lease write is bounded by the cluster's request timeout and reports.
            Phase::Leasing { .. } => None,
            Phase::Ordering { deadline, .. } => Some(*deadline),
        }
    }

    /// Looks for domains to order and, if there are and no other node holds the lease,
    /// asks for it.
    fn check(&mut self, reg: &Registry, now: u64) {
        self.failed.retain(|_, retry_at| *retry_at > now);
        let needed: Vec<String> = domains_needing_certs(reg, now, self.renew_before, &self.also)
            .into_iter()
            .filter(|d| !self.failed.contains_key(d))
            .collect();
        if needed.is_empty() {
            return;
        }
        if let Some((holder, until)) = reg.acme().lease {
            if holder != self.me.0 && until > now {
                return;
            }
        }
        let round = Round(self.next_round);
        self.next_round += 1;
        let until = now + LEASE;
        self.phase = Phase::Leasing {
            round,
            domains: needed,
            until,
        };
        self.actions
            .push_back(CertsAction::TakeLease { round, until });
    }

    /// The round is over: what did not report failed; the lease goes back.
    fn end_round(&mut self, now: u64) {
        if let Phase::Ordering { pending, .. } = std::mem::replace(&mut self.phase, Phase::Idle) {
            for d in pending {
                self.failed.insert(d, now + RETRY_AFTER);
            }
        }
        self.actions.push_back(CertsAction::ReleaseLease);
        // Time for the certificates just stored to reach this node's replica.
        self.next_check = self.next_check.max(now + CHECK_EVERY);
    }
}

/// Messages of the [`CertsActor`].
pub enum CertsMsg {
    /// The core's timer passed.
    Timeout,
    /// The lease write of a round ended.
    Leased(Round, bool),
    /// One domain of a round was ordered (`true`) or failed.
    Ordered(Round, String, bool),
    /// The ordering of a round ended.
    RoundEnded(Round),
    /// One of the actor's tasks panicked: fail the actor.
    TaskPanicked(String),
    /// Panic on purpose, to exercise the supervision tree (its tests).
    Crash,
}

/// Owns a [`CertsCore`] and performs what it asks.
#[derive(Clone)]
pub struct CertsActor;

/// What the [`CertsActor`] is started with (again after a failure).
#[derive(Clone)]
pub struct CertsArgs {
    /// The cluster (registry, lease and certificate writes).
    pub cluster: Cluster,
    /// The ACME settings.
    pub settings: AcmeSettings,
}

impl CertsActor {
    /// The tree's child `certs`.
    pub fn child(args: CertsArgs) -> ChildSpec {
        ChildSpec::actor("certs", CertsActor, move || args.clone())
    }
}

/// State of the [`CertsActor`].
pub struct CertsState {
    args: CertsArgs,
    core: CertsCore,
    tasks: JoinSet<()>,
    ordering: Option<(Round, AbortHandle)>,
    timer: Timer<CertsMsg, u64>,
}

impl CertsState {
    /// Runs `work` as a task the actor owns; what it returns is sent to the actor, and a
    /// panic fails the actor.
    fn spawn<F>(&mut self, myself: &ActorRef<CertsMsg>, work: F) -> AbortHandle
    where
        F: std::future::Future<Output = Option<CertsMsg>> + Send + 'static,
    {
        let me = myself.clone();
        self.tasks.spawn(async move {
            let msg = match AssertUnwindSafe(work).catch_unwind().await {
                Ok(Some(msg)) => msg,
                Ok(None) => return,
                Err(panic) => CertsMsg::TaskPanicked(panic_text(&*panic)),
            };
            let _ = me.cast(msg);
        })
    }
}

impl Actor for CertsActor {
    type Msg = CertsMsg;
    type State = CertsState;
    type Arguments = CertsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: CertsArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // The first check at once.
        myself.cast(CertsMsg::Timeout)?;
        Ok(CertsState {
            core: CertsCore::new(
                args.cluster.id(),
                args.settings.renew_before,
                args.settings.also.clone(),
            ),
            args,
            tasks: JoinSet::new(),
            ordering: None,
            timer: Timer::new(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.timer.cancel();
        state.tasks.abort_all();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = unix_now();
        while let Some(ended) = state.tasks.try_join_next() {
            if let Err(e) = ended {
                if e.is_panic() {
                    return Err(format!("a certs task panicked: {e}").into());
                }
            }
        }
        match msg {
            CertsMsg::Timeout => {
                state.timer.fired();
                let reg = state.args.cluster.registry();
                state.core.handle_timeout(&reg, now);
            }
            CertsMsg::Leased(round, granted) => state.core.handle_leased(round, granted, now),
            CertsMsg::Ordered(round, domain, ok) => {
                state.core.handle_ordered(round, &domain, ok, now)
            }
            CertsMsg::RoundEnded(round) => {
                if state.ordering.as_ref().is_some_and(|(r, _)| *r == round) {
                    state.ordering = None;
                }
                state.core.handle_round_ended(round, now);
            }
            CertsMsg::TaskPanicked(why) => {
                return Err(format!("a certs task panicked: {why}").into())
            }
            CertsMsg::Crash => panic!("crash requested"),
        }
        while let Some(action) = state.core.poll_action() {
            perform(&myself, state, action);
        }
        rearm(&myself, state, now);
        Ok(())
    }
}

fn perform(myself: &ActorRef<CertsMsg>, state: &mut CertsState, action: CertsAction) {
    let me = state.args.cluster.id().0;
    match action {
        CertsAction::TakeLease { round, until } => {
            let cluster = state.args.cluster.clone();
            state.spawn(myself, async move {
                let taken = acme::write(&cluster, Command::AcmeLease { node: me, until }).await;
                if let Err(e) = &taken {
                    tracing::debug!("taking the ACME lease: {e:#}");
                }
                Some(CertsMsg::Leased(round, taken.is_ok()))
            });
        }
        CertsAction::Order { round, domains } => {
            tracing::info!(?domains, "holding the ACME lease; ordering certificates");
            let (cluster, settings) = (state.args.cluster.clone(), state.args.settings.clone());
            let report = myself.clone();
            let handle = state.spawn(myself, async move {
                let account = match acme::account(&cluster, &settings).await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("ACME account (retry in a minute): {e:#}");
                        return Some(CertsMsg::RoundEnded(round));
                    }
                };
                for domain in domains {
                    let result = acme::order(&cluster, &account, &domain).await;
                    match &result {
                        Ok(()) => tracing::info!(%domain, "certificate issued and stored"),
                        Err(e) => tracing::warn!(
                            %domain,
                            "ACME order failed (retry in a minute): {e:#}"
                        ),
                    }
                    let _ = report.cast(CertsMsg::Ordered(round, domain, result.is_ok()));
                }
                Some(CertsMsg::RoundEnded(round))
            });
            state.ordering = Some((round, handle));
        }
        CertsAction::Abandon { round } => {
            tracing::warn!(
                "ACME orders still running as the lease nears its end; stopping them (retry in a minute)"
            );
            if let Some((r, handle)) = state.ordering.take() {
                if r == round {
                    handle.abort();
                } else {
                    state.ordering = Some((r, handle));
                }
            }
        }
        CertsAction::ReleaseLease => {
            let cluster = state.args.cluster.clone();
            state.spawn(myself, async move {
                let released =
                    acme::write(&cluster, Command::AcmeLease { node: me, until: 0 }).await;
                if let Err(e) = released {
                    tracing::debug!("giving the ACME lease back (it runs out on its own): {e:#}");
                }
                None
            });
        }
    }
}

/// One timer, for the core's next deadline.
fn rearm(myself: &ActorRef<CertsMsg>, state: &mut CertsState, now: u64) {
    let wanted = state.core.poll_timeout();
    state.timer.set(
        myself,
        wanted.map(|at| (at, Duration::from_secs(at.saturating_sub(now)))),
        || CertsMsg::Timeout,
    );
}

#[cfg(test)]
mod tests {
    use warren_consensus::registry::AnyEntity;
    use warren_consensus::types::{Actor as Who, Request, RequestId};
    use warren_proto::certificate::Certificate;
    use warren_proto::registry::{Resource, Route, Target};
    use warren_proto::{Name, Secret};

    use super::*;

    const T0: u64 = 1_700_000_000;
    const ME: NodeId = NodeId(1);
    const RENEW: Duration = Duration::from_secs(30 * 86_400);

    /// A registry written through its commands, as the cluster would.
    struct World {
        reg: Registry,
        index: u64,
    }

    impl World {
        /// Web resources for `domains`.
        fn with(domains: &[&str]) -> Self {
            let mut w = Self {
                reg: Registry::default(),
                index: 0,
            };
            for (i, d) in domains.iter().enumerate() {
                w.run(Command::Create(AnyEntity::Resource(Resource {
                    name: Name::new(format!("r{i}")).unwrap(),
                    site: None,
                    route: Route::Http {
                        domain: (*d).into(),
                        path_prefix: None,
                    },
                    targets: vec!["127.0.0.1:9".parse::<Target>().unwrap()],
                    policies: Vec::new(),
                    http: Default::default(),
                    revision: 0,
                })));
            }
            w
        }

        fn run(&mut self, command: Command) {
            self.index += 1;
            let req = Request {
                id: RequestId(u128::from(self.index)),
                at: T0,
                actor: Who::System,
                command,
            };
            let reply = self.reg.apply_request(self.index, &req);
            assert!(reply.is_ok(), "{:?}: {reply:?}", req.command);
        }

        fn lease(&mut self, node: u64, until: u64) {
            self.run(Command::AcmeLease { node, until });
        }

        /// A certificate for `domain` valid until `not_after` (a year, month and day).
        fn certificate(&mut self, domain: &str, not_after: (i32, u8, u8)) {
            let mut params = rcgen::CertificateParams::new(vec![domain.to_owned()]).unwrap();
            params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            self.run(Command::Create(AnyEntity::Certificate(Certificate {
                name: Name::new(format!("c{}", self.index)).unwrap(),
                cert_pem: cert.pem(),
                key_pem: Secret::new(key.serialize_pem()),
                revision: 0,
            })));
        }
    }

    fn drain(core: &mut CertsCore) -> Vec<CertsAction> {
        std::iter::from_fn(|| core.poll_action()).collect()
    }

    fn domains(d: &[&str]) -> Vec<String> {
        d.iter().map(|s| (*s).to_owned()).collect()
    }

    /// A core that checked `w` at `now`, took the lease and started ordering.
    fn ordering(w: &World, now: u64) -> (CertsCore, Round, Vec<String>) {
        let mut core = CertsCore::new(ME, RENEW, Vec::new());
        core.handle_timeout(&w.reg, now);
        let [CertsAction::TakeLease { round, until }] = drain(&mut core)[..] else {
            panic!("no lease asked for");
        };
        assert_eq!(until, now + LEASE);
        core.handle_leased(round, true, now);
        let actions = drain(&mut core);
        let [CertsAction::Order { round: r, domains }] = &actions[..] else {
            panic!("no order: {actions:?}");
        };
        assert_eq!(*r, round);
        (core, round, domains.clone())
    }

    #[test]
    fn the_auth_host_is_ordered_with_no_resource_and_not_while_covered() {
        let mut w = World::with(&[]);
        let mut core = CertsCore::new(ME, RENEW, domains(&["auth.example.test"]));
        core.handle_timeout(&w.reg, T0);
        let [CertsAction::TakeLease { round, .. }] = drain(&mut core)[..] else {
            panic!("the auth host needs a certificate, but no lease was asked for");
        };
        core.handle_leased(round, true, T0);
        let actions = drain(&mut core);
        let [CertsAction::Order { domains: d, .. }] = &actions[..] else {
            panic!("no order: {actions:?}");
        };
        assert_eq!(*d, domains(&["auth.example.test"]));
        // Once it has a certificate valid past the renewal window, nothing is ordered.
        w.certificate("auth.example.test", (2100, 1, 1));
        let mut core = CertsCore::new(ME, RENEW, domains(&["auth.example.test"]));
        core.handle_timeout(&w.reg, T0);
        assert_eq!(drain(&mut core), []);
    }

    #[test]
    fn domains_without_a_certificate_are_ordered_under_the_lease() {
        let w = World::with(&["b.example.test", "a.example.test", "*.wild.example.test"]);
        let (mut core, round, ordered) = ordering(&w, T0);
        // Wildcards cannot be had over HTTP-01; the others in order.
        assert_eq!(ordered, domains(&["a.example.test", "b.example.test"]));
        // While ordering, only the lease's deadline is pending.
        assert_eq!(core.poll_timeout(), Some(T0 + LEASE - LEASE_MARGIN));
        core.handle_ordered(round, "a.example.test", true, T0 + 5);
        core.handle_ordered(round, "b.example.test", true, T0 + 6);
        core.handle_round_ended(round, T0 + 6);
        assert_eq!(drain(&mut core), [CertsAction::ReleaseLease]);
        assert_eq!(core.poll_timeout(), Some(T0 + 6 + CHECK_EVERY));
    }

    #[test]
    fn another_nodes_live_lease_is_respected_and_an_expired_one_taken_over() {
        let mut w = World::with(&["a.example.test"]);
        w.lease(2, T0 + 100);
        let mut core = CertsCore::new(ME, RENEW, Vec::new());
        for t in [T0, T0 + 3, T0 + 99] {
            core.handle_timeout(&w.reg, t);
            assert_eq!(drain(&mut core), [], "at {t}");
        }
        assert_eq!(core.poll_timeout(), Some(T0 + 99 + CHECK_EVERY));
        // The lease ran out (its holder died): this node takes it.
        core.handle_timeout(&w.reg, T0 + 102);
        assert!(matches!(
            drain(&mut core)[..],
            [CertsAction::TakeLease { until, .. }] if until == T0 + 102 + LEASE
        ));
    }

    #[test]
    fn a_lease_refused_to_this_node_means_no_order() {
        let w = World::with(&["a.example.test"]);
        let mut core = CertsCore::new(ME, RENEW, Vec::new());
        core.handle_timeout(&w.reg, T0);
        let [CertsAction::TakeLease { round, .. }] = drain(&mut core)[..] else {
            panic!("no lease asked for");
        };
        // Another node's lease was applied first.
        core.handle_leased(round, false, T0 + 1);
        assert_eq!(drain(&mut core), []);
        assert_eq!(core.poll_timeout(), Some(T0 + 1 + CHECK_EVERY));
    }

    #[test]
    fn this_nodes_own_lease_does_not_stop_it() {
        let mut w = World::with(&["a.example.test"]);
        // Held by this node before its actor restarted.
        w.lease(ME.0, T0 + 200);
        let (_, _, ordered) = ordering(&w, T0);
        assert_eq!(ordered, domains(&["a.example.test"]));
    }

    #[test]
    fn a_failed_domain_waits_a_minute_the_others_do_not() {
        let w = World::with(&["a.example.test", "b.example.test"]);
        let (mut core, round, _) = ordering(&w, T0);
        core.handle_ordered(round, "a.example.test", false, T0 + 10);
        core.handle_ordered(round, "b.example.test", false, T0 + 20);
        core.handle_round_ended(round, T0 + 20);
        assert_eq!(drain(&mut core), [CertsAction::ReleaseLease]);
        // Both failed: nothing until a's minute is over, then a alone.
        for t in [T0 + 23, T0 + 50, T0 + 69] {
            core.handle_timeout(&w.reg, t);
            assert_eq!(drain(&mut core), [], "at {t}");
        }
        core.handle_timeout(&w.reg, T0 + 72);
        let [CertsAction::TakeLease { round, .. }] = drain(&mut core)[..] else {
            panic!("no lease asked for");
        };
        core.handle_leased(round, true, T0 + 72);
        assert!(matches!(
            &drain(&mut core)[..],
            [CertsAction::Order { domains, .. }] if *domains == ["a.example.test"]
        ));
    }

    #[test]
    fn an_account_failure_backs_off_every_domain_of_the_round() {
        let w = World::with(&["a.example.test"]);
        let (mut core, round, _) = ordering(&w, T0);
        // The task ended without reporting a domain (no account).
        core.handle_round_ended(round, T0 + 1);
        assert_eq!(drain(&mut core), [CertsAction::ReleaseLease]);
        core.handle_timeout(&w.reg, T0 + 4);
        assert_eq!(drain(&mut core), []);
        core.handle_timeout(&w.reg, T0 + 1 + RETRY_AFTER);
        assert!(matches!(
            drain(&mut core)[..],
            [CertsAction::TakeLease { .. }]
        ));
    }

    #[test]
    fn an_order_outliving_its_lease_is_abandoned_and_late_reports_ignored() {
        let w = World::with(&["a.example.test"]);
        let (mut core, round, _) = ordering(&w, T0);
        // Checks do not start a second round meanwhile.
        core.handle_timeout(&w.reg, T0 + 100);
        assert_eq!(drain(&mut core), []);
        let deadline = T0 + LEASE - LEASE_MARGIN;
        core.handle_timeout(&w.reg, deadline);
        assert_eq!(
            drain(&mut core),
            [CertsAction::Abandon { round }, CertsAction::ReleaseLease]
        );
        // A report of the abandoned round changes nothing.
        core.handle_ordered(round, "a.example.test", true, deadline + 1);
        core.handle_round_ended(round, deadline + 1);
        assert_eq!(drain(&mut core), []);
        core.handle_timeout(&w.reg, deadline + CHECK_EVERY);
        assert_eq!(drain(&mut core), [], "a is backed off");
    }

    #[test]
    fn nothing_is_ordered_when_nothing_is_needed() {
        let mut w = World::with(&["a.example.test", "*.wild.example.test"]);
        let mut core = CertsCore::new(ME, RENEW, Vec::new());
        // Covered until far in the future: nothing to do, no lease asked for.
        w.certificate("a.example.test", (2100, 1, 1));
        core.handle_timeout(&w.reg, T0);
        assert_eq!(drain(&mut core), []);
        assert_eq!(core.poll_timeout(), Some(T0 + CHECK_EVERY));
        // Within `renew_before` of its end: renewed.
        let mut w = World::with(&["a.example.test"]);
        w.certificate("a.example.test", (2023, 12, 1));
        core.handle_timeout(&w.reg, T0 + CHECK_EVERY);
        assert!(matches!(
            drain(&mut core)[..],
            [CertsAction::TakeLease { .. }]
        ));
        // No web resource at all.
        let mut core = CertsCore::new(ME, RENEW, Vec::new());
        core.handle_timeout(&World::with(&[]).reg, T0);
        assert_eq!(drain(&mut core), []);
    }
}
