//! The `proxy_config` actor: follows the registry and publishes what the proxy's request
//! tasks read ([`ProxyState`]: routes, compiled policies, certificates, cookie sealer,
//! assertion signer), owns the active health checks of web targets, and asks the cluster
//! for proxy keys while it has none.
//!
//! ```text
//!  Cluster ─registry watch─► ProxyConfigActor ──handle_registry(reg, now)──► ProxyConfigCore
//!                               │   ▲ timer: poll_timeout()                  │ poll_action()
//!                               │   └────────────────────────────────────────┘
//!                               ├─ Publish ─► Published<ProxyState> ◄─ load() ─ request tasks
//!                               ├─ StartCheck / StopCheck ─► health check tasks (owned, reaped)
//!                               └─ ProposeKeys ─► a Raft write (off the mailbox)
//! ```
//!
//! A panic in the actor or in one of its health checks fails the actor: the supervisor
//! restarts it (a fresh core rebuilds everything from the current registry), the node's
//! health shows it while it is down, and request tasks keep reading the last snapshot.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use warren_consensus::cluster::Cluster;
use warren_consensus::registry::{Command, Registry};
use warren_consensus::types::{Actor as Who, Request as RaftRequest};
use warren_proto::session::ProxyKeys;
use warren_proto::{Name, Secret};

use super::seal::Sealer;
use super::sign::Signer;
use super::state::{build_config, config_changed, Pool, ProxyState};
use super::Body;
use crate::actors::ChildSpec;
use crate::publish::Published;
use crate::shell::Timer;

/// How long after asking for proxy keys the core asks again (the proposal may have been
/// lost while there was no leader).
pub const ASK_KEYS_AGAIN: Duration = Duration::from_secs(2);

/// A pool with an active health check, named by its address while the core holds it.
pub type PoolKey = usize;

/// What the [`ProxyConfigCore`] asks its shell to do.
pub enum ConfigAction {
    /// Make this the state request tasks read.
    Publish(Arc<ProxyState>),
    /// Log a configuration problem (a resource refused, a certificate that does not load).
    Problem(String),
    /// Propose new proxy keys to the cluster (it has none).
    ProposeKeys,
    /// Start the active health check of a pool.
    StartCheck(PoolKey, Arc<Pool>),
    /// Stop the health check of a pool that is gone or replaced.
    StopCheck(PoolKey),
}

impl std::fmt::Debug for ConfigAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Publish(_) => f.write_str("Publish"),
            Self::Problem(p) => write!(f, "Problem({p:?})"),
            Self::ProposeKeys => f.write_str("ProposeKeys"),
            Self::StartCheck(k, _) => write!(f, "StartCheck({k:#x})"),
            Self::StopCheck(k) => write!(f, "StopCheck({k:#x})"),
        }
    }
}

/// The proxy's configuration as a state machine, without I/O.
///
/// Calling order: [`handle_registry`](Self::handle_registry) for each registry the
/// cluster applies (the first one too), [`handle_timeout`](Self::handle_timeout) when
/// [`poll_timeout`](Self::poll_timeout) passes; after each call, drain
/// [`poll_action`](Self::poll_action) and perform every action in order.
#[derive(Default)]
pub struct ProxyConfigCore {
    pools: HashMap<Name, Arc<Pool>>,
    checked: HashMap<PoolKey, Arc<Pool>>,
    last: Option<Arc<ProxyState>>,
    last_keys: Option<ProxyKeys>,
    /// When keys were last asked for, while the cluster has none.
    asked_keys_at: Option<Instant>,
    needs_keys: bool,
    actions: VecDeque<ConfigAction>,
}

impl ProxyConfigCore {
    /// A core that has seen no registry yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The cluster applied `reg`: rebuild what changed and publish.
    pub fn handle_registry(&mut self, reg: Arc<Registry>, now: Instant) {
        let config = match &self.last {
            Some(old) if !config_changed(&old.registry, &reg) => old.config.clone(),
            _ => {
                let config = build_config(&reg, &mut self.pools);
                for problem in &config.problems {
                    self.actions
                        .push_back(ConfigAction::Problem(problem.to_string()));
                }
                self.sync_checks();
                Arc::new(config)
            }
        };
        let keys = reg.proxy_keys().cloned();
        let (sealer, signer) = match &self.last {
            Some(old) if keys == self.last_keys => (old.sealer.clone(), old.signer.clone()),
            _ => match &keys {
                Some(k) => (
                    Sealer::from_b64(k.cookie_key.expose()).map(Arc::new),
                    Signer::from_keys(&k.signing_keys).map(Arc::new),
                ),
                None => (None, None),
            },
        };
        self.needs_keys = keys.is_none() && reg.cluster_id() != 0;
        if !self.needs_keys {
            self.asked_keys_at = None;
        }
        self.last_keys = keys;
        let title = match &self.last {
            Some(old) if old.title.as_deref() == reg.title() => old.title.clone(),
            _ => reg.title().map(Arc::from),
        };
        let state = Arc::new(ProxyState {
            registry: reg,
            config,
            sealer,
            signer,
            title,
        });
        self.last = Some(state.clone());
        self.actions.push_back(ConfigAction::Publish(state));
        self.handle_timeout(now);
    }

    /// Time passed: ask for keys again if they are still missing.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.needs_keys && self.asked_keys_at.is_none_or(|t| now >= t + ASK_KEYS_AGAIN) {
            self.asked_keys_at = Some(now);
            self.actions.push_back(ConfigAction::ProposeKeys);
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<ConfigAction> {
        self.actions.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.needs_keys {
            self.asked_keys_at.map(|t| t + ASK_KEYS_AGAIN)
        } else {
            None
        }
    }

    /// Health checks for exactly the current pools that have one.
    fn sync_checks(&mut self) {
        let wanted: HashMap<PoolKey, &Arc<Pool>> = self
            .pools
            .values()
            .filter(|p| p.check.is_some())
            .map(|p| (Arc::as_ptr(p) as PoolKey, p))
            .collect();
        let gone: Vec<PoolKey> = self
            .checked
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for k in gone {
            self.checked.remove(&k);
            self.actions.push_back(ConfigAction::StopCheck(k));
        }
        let mut new: Vec<(PoolKey, Arc<Pool>)> = wanted
            .into_iter()
            .filter(|(k, _)| !self.checked.contains_key(k))
            .map(|(k, p)| (k, p.clone()))
            .collect();
        new.sort_by_key(|(k, _)| *k);
        for (k, p) in new {
            self.checked.insert(k, p.clone());
            self.actions.push_back(ConfigAction::StartCheck(k, p));
        }
    }
}

/// Messages of the [`ProxyConfigActor`].
pub enum ProxyConfigMsg {
    /// The cluster applied a new registry.
    Changed,
    /// The core's timer passed.
    Timeout,
    /// Look for health checks that ended (a panic fails the actor).
    Reap,
    /// Panic on purpose, to exercise the supervision tree (its tests).
    Crash,
}

/// Owns a [`ProxyConfigCore`] and performs what it asks.
#[derive(Clone)]
pub struct ProxyConfigActor;

/// What the [`ProxyConfigActor`] is started with (again after a failure).
#[derive(Clone)]
pub struct ProxyConfigArgs {
    /// The cluster (its registry watch, and where key proposals go).
    pub cluster: Cluster,
    /// Where the state is published.
    pub state: Arc<Published<ProxyState>>,
    /// The HTTP client of health checks.
    pub client: Client<HttpConnector, Body>,
    /// The node's serving state: when it changes the state is published again, so that
    /// open connections re-check at once.
    pub serving: crate::serving::Serving,
}

impl ProxyConfigActor {
    /// The tree's child `proxy_config`.
    pub fn child(args: ProxyConfigArgs) -> ChildSpec {
        ChildSpec::actor("proxy_config", ProxyConfigActor, move || args.clone())
    }
}

/// State of the [`ProxyConfigActor`].
pub struct ProxyConfigState {
    args: ProxyConfigArgs,
    core: ProxyConfigCore,
    checks: JoinSet<()>,
    check_handles: HashMap<PoolKey, AbortHandle>,
    follower: JoinHandle<()>,
    reaper: JoinHandle<()>,
    timer: Timer<ProxyConfigMsg, Instant>,
}

impl Actor for ProxyConfigActor {
    type Msg = ProxyConfigMsg;
    type State = ProxyConfigState;
    type Arguments = ProxyConfigArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ProxyConfigArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Registry changes arrive as messages; several in a row coalesce into one rebuild
        // from the latest (the handler reads the current registry, not the one that woke it).
        let follower = crate::shell::follow(
            vec![
                Box::new(args.cluster.subscribe()),
                Box::new(args.serving.subscribe()),
            ],
            myself.clone(),
            || ProxyConfigMsg::Changed,
        );
        let reaper = myself.send_interval(Duration::from_secs(1), || ProxyConfigMsg::Reap);
        Ok(ProxyConfigState {
            args,
            core: ProxyConfigCore::new(),
            checks: JoinSet::new(),
            check_handles: HashMap::new(),
            follower,
            reaper,
            timer: Timer::new(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.follower.abort();
        state.reaper.abort();
        state.timer.cancel();
        state.checks.abort_all();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        match msg {
            ProxyConfigMsg::Changed => {
                let reg = state.args.cluster.registry();
                state.core.handle_registry(reg, now);
            }
            ProxyConfigMsg::Timeout => {
                state.timer.fired();
                state.core.handle_timeout(now);
            }
            ProxyConfigMsg::Reap => {
                while let Some(ended) = state.checks.try_join_next() {
                    if let Err(e) = ended {
                        if e.is_panic() {
                            return Err(format!("a health check panicked: {e}").into());
                        }
                    }
                }
            }
            ProxyConfigMsg::Crash => panic!("crash requested"),
        }
        while let Some(action) = state.core.poll_action() {
            perform(state, action);
        }
        rearm(&myself, state);
        Ok(())
    }
}

fn perform(state: &mut ProxyConfigState, action: ConfigAction) {
    match action {
        ConfigAction::Publish(s) => state.args.state.publish(s),
        ConfigAction::Problem(p) => tracing::warn!("proxy configuration: {p}"),
        ConfigAction::ProposeKeys => {
            let cluster = state.args.cluster.clone();
            // Off the mailbox: a write waits for a leader and a commit.
            tokio::spawn(async move {
                let keys = ProxyKeys {
                    cookie_key: Secret::new(Sealer::generate_key()),
                    signing_keys: vec![Signer::generate(super::unix_now())],
                };
                let req = RaftRequest::new(Who::System, Command::EnsureProxyKeys(keys));
                if let Err(e) = cluster.write(req).await {
                    tracing::debug!("proposing proxy keys: {e}");
                }
            });
        }
        ConfigAction::StartCheck(key, pool) => {
            let handle = state.checks.spawn(super::forward::health_loop(
                Arc::downgrade(&pool),
                state.args.client.clone(),
            ));
            state.check_handles.insert(key, handle);
        }
        ConfigAction::StopCheck(key) => {
            if let Some(h) = state.check_handles.remove(&key) {
                h.abort();
            }
        }
    }
}

/// One timer, for the core's next deadline.
fn rearm(myself: &ActorRef<ProxyConfigMsg>, state: &mut ProxyConfigState) {
    let wanted = state.core.poll_timeout();
    state.timer.set(
        myself,
        wanted.map(|at| (at, at.saturating_duration_since(Instant::now()))),
        || ProxyConfigMsg::Timeout,
    );
}

/// Pools by name, for tests.
#[cfg(test)]
fn checked_names(core: &ProxyConfigCore) -> std::collections::HashSet<String> {
    core.pools
        .iter()
        .filter(|(_, p)| core.checked.contains_key(&(Arc::as_ptr(p) as PoolKey)))
        .map(|(n, _)| n.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use warren_proto::registry::{HealthCheck, Route};

    use super::*;
    use crate::testing::{apply, bootstrap, resource, with_resources};

    fn drain(core: &mut ProxyConfigCore) -> Vec<ConfigAction> {
        std::iter::from_fn(|| core.poll_action()).collect()
    }

    fn web(n: &str, domain: &str, checked: bool) -> warren_proto::registry::Resource {
        let mut r = resource(
            n,
            Route::Http {
                domain: domain.into(),
                path_prefix: None,
            },
        );
        r.http.public = true;
        if checked {
            r.http.health_check = Some(HealthCheck {
                path: Some("/health".into()),
                interval_s: 5,
                failures: 3,
            });
        }
        r
    }

    #[test]
    fn an_uninitialised_registry_is_published_and_asks_for_nothing() {
        let mut core = ProxyConfigCore::new();
        core.handle_registry(Arc::new(Registry::default()), Instant::now());
        let actions = drain(&mut core);
        assert!(
            matches!(actions[..], [ConfigAction::Publish(_)]),
            "{actions:?}"
        );
        assert_eq!(core.poll_timeout(), None);
    }

    #[test]
    fn keys_are_asked_for_until_the_cluster_has_them_no_more_than_every_two_seconds() {
        let mut core = ProxyConfigCore::new();
        let t0 = Instant::now();
        let mut reg = Registry::default();
        apply(&mut reg, [bootstrap()]);
        core.handle_registry(Arc::new(reg.clone()), t0);
        let actions = drain(&mut core);
        assert!(
            matches!(
                actions[..],
                [ConfigAction::Publish(_), ConfigAction::ProposeKeys]
            ),
            "{actions:?}"
        );
        assert_eq!(core.poll_timeout(), Some(t0 + ASK_KEYS_AGAIN));
        // Other changes meanwhile publish but do not ask again early.
        core.handle_registry(Arc::new(reg.clone()), t0 + Duration::from_secs(1));
        assert!(matches!(drain(&mut core)[..], [ConfigAction::Publish(_)]));
        core.handle_timeout(t0 + ASK_KEYS_AGAIN);
        assert!(matches!(drain(&mut core)[..], [ConfigAction::ProposeKeys]));
        // Keys arrive: a sealer and signer are published, and nothing is asked any more.
        apply(
            &mut reg,
            [Command::EnsureProxyKeys(ProxyKeys {
                cookie_key: Secret::new(Sealer::generate_key()),
                signing_keys: vec![Signer::generate(1_700_000_000)],
            })],
        );
        core.handle_registry(Arc::new(reg), t0 + Duration::from_secs(3));
        match &drain(&mut core)[..] {
            [ConfigAction::Publish(s)] => {
                assert!(s.sealer.is_some() && s.signer.is_some());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(core.poll_timeout(), None);
    }

    #[test]
    fn health_checks_run_for_exactly_the_pools_that_have_one() {
        let mut core = ProxyConfigCore::new();
        let t0 = Instant::now();
        core.handle_registry(
            Arc::new(with_resources([
                web("a", "a.example", true),
                web("b", "b.example", false),
            ])),
            t0,
        );
        let started: Vec<PoolKey> = drain(&mut core)
            .into_iter()
            .filter_map(|a| match a {
                ConfigAction::StartCheck(k, _) => Some(k),
                _ => None,
            })
            .collect();
        assert_eq!(started.len(), 1);
        assert_eq!(checked_names(&core), ["a".to_owned()].into());
        // The same resources again: the checks keep running (health survives).
        core.handle_registry(
            Arc::new(with_resources([
                web("a", "a.example", true),
                web("b", "b.example", false),
            ])),
            t0,
        );
        assert!(!drain(&mut core)
            .iter()
            .any(|a| matches!(a, ConfigAction::StartCheck(..) | ConfigAction::StopCheck(_))));
        // `a` loses its check and `b` gains one: a's stops, b's starts.
        core.handle_registry(
            Arc::new(with_resources([
                web("a", "a.example", false),
                web("b", "b.example", true),
            ])),
            t0,
        );
        let actions = drain(&mut core);
        assert!(actions
            .iter()
            .any(|a| matches!(a, ConfigAction::StopCheck(k) if *k == started[0])));
        assert_eq!(
            actions
                .iter()
                .filter(|a| matches!(a, ConfigAction::StartCheck(..)))
                .count(),
            1
        );
        assert_eq!(checked_names(&core), ["b".to_owned()].into());
        // Everything deleted: no check left.
        core.handle_registry(Arc::new(with_resources([])), t0);
        assert!(drain(&mut core)
            .iter()
            .any(|a| matches!(a, ConfigAction::StopCheck(_))));
        assert!(checked_names(&core).is_empty());
    }
}
