//! The `sessions` actor: while this node leads the Raft cluster, it rotates the assertion
//! signing key on its schedule and refreshes the identity provider tokens of sessions
//! before they expire, ending a session when its provider refuses (continuous
//! verification). Sign-in itself (OIDC state, nonce, PKCE, the callback) is request work:
//! it runs in the proxy's request tasks (`proxy::auth`), not here.
//!
//! ```text
//!  Cluster ─registry watch──► SessionsActor ──handle_*(…, now)──► SessionsCore
//!  Raft ─server metrics─────►    │   ▲ timer: poll_timeout()        │ poll_action()
//!   (leadership)                 │   └──────────────────────────────┘
//!                                ├─ RotateSigningKey ─► new key + Raft write   (task)
//!                                ├─ Refresh ─► Proxy::refresh_session (task; at most
//!                                │             MAX_REFRESHING at once) ─► Refreshed msg
//!                                ├─ Abandon ─► abort a refresh that took too long
//!                                ├─ Record / Revoke ─► RefreshSession / RevokeSession (task)
//!                                └─ Scan ─► the registry's sessions, fed back to the core
//! ```
//!
//! Rotation and refreshes never wait for each other: every one is its own task, and a slow
//! or dead provider costs one refresh slot for at most [`REFRESH_TIMEOUT`]. A panic in
//! the actor or in one of its tasks fails the actor: the supervisor restarts it (a fresh
//! core rescans the registry), and the node's health shows it while it is down.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use warren_consensus::cluster::Cluster;
use warren_consensus::registry::{Command, Registry};
use warren_consensus::types::{Actor as Who, Request as RaftRequest};
use warren_proto::session::{Session, SessionId};
use warren_proto::Secret;

use crate::actors::ChildSpec;
use crate::proxy::sign::Signer;
use crate::proxy::{unix_now, Proxy};
use crate::shell::Timer;

/// Refresh provider tokens this long before they expire, in seconds (half their lifetime
/// for tokens that live less than twice this).
pub const REFRESH_AHEAD: u64 = 30;
/// Most refreshes in flight at once.
pub const MAX_REFRESHING: usize = 8;
/// A refresh still unanswered after this many seconds is abandoned (and retried later).
pub const REFRESH_TIMEOUT: u64 = 20;
/// Wait after a session's first failed refresh, in seconds; doubles with each further
/// failure up to [`RETRY_MAX`].
pub const RETRY_FIRST: u64 = 5;
/// Longest wait between two tries at refreshing a session, in seconds.
pub const RETRY_MAX: u64 = 300;
/// After a rotation was written (or failed), how long to wait for the new key to show in
/// the registry before rotating again, in seconds.
pub const ROTATE_RETRY: u64 = 10;
/// Least time between two scans of the registry's sessions, in seconds.
pub const SCAN_GAP: u64 = 2;

/// One try at refreshing a session, so that the answer to an abandoned try is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attempt(pub u64);

/// What the core needs to know about one session of the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionFacts {
    /// The session.
    pub id: SessionId,
    /// When it was opened (seconds since the epoch): when its first tokens were issued.
    pub created_at: u64,
    /// When it ends (seconds since the epoch).
    pub expires_at: u64,
    /// When its provider tokens expire (seconds since the epoch), if they do.
    pub token_expires_at: Option<u64>,
    /// Whether it holds a refresh token.
    pub refreshable: bool,
}

impl SessionFacts {
    /// The facts of `s`.
    pub fn of(s: &Session) -> Self {
        Self {
            id: s.id,
            created_at: s.created_at,
            expires_at: s.expires_at,
            token_expires_at: s.token_expires_at,
            refreshable: s.refresh_token.is_some(),
        }
    }
}

/// New provider tokens of a session (what `RefreshSession` records).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// The new refresh token, if the provider rotated it.
    pub refresh_token: Option<Secret>,
    /// When the new tokens expire (seconds since the epoch).
    pub token_expires_at: Option<u64>,
    /// Groups as the provider now lists them.
    pub groups: Vec<String>,
}

/// How a refresh at the identity provider went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The provider issued new tokens.
    Refreshed(Tokens),
    /// The provider refused the refresh token (an OAuth error response): the user is no
    /// longer signed in there, so the session ends.
    Refused(String),
    /// The provider could not be asked or gave no usable answer (discovery, network, a
    /// bad response, the session or its provider gone): try again later.
    Failed(String),
}

/// What the [`SessionsCore`] asks its shell to do.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionsAction {
    /// Generate a signing key and propose it (`Command::RotateSigningKey`), then report
    /// with [`SessionsCore::handle_rotated`].
    RotateSigningKey,
    /// Refresh the session's provider tokens and report with
    /// [`SessionsCore::handle_refreshed`].
    Refresh {
        /// The session.
        id: SessionId,
        /// The try, to name in the report.
        attempt: Attempt,
    },
    /// Stop the refresh `attempt` of `id`: it took longer than [`REFRESH_TIMEOUT`].
    Abandon {
        /// The session.
        id: SessionId,
        /// The try.
        attempt: Attempt,
    },
    /// Record the new tokens (`Command::RefreshSession`).
    Record {
        /// The session.
        id: SessionId,
        /// Its new tokens.
        tokens: Tokens,
    },
    /// End the session (`Command::RevokeSession`): its provider refused to refresh it.
    Revoke {
        /// The session.
        id: SessionId,
    },
    /// Read the registry's sessions and give them to
    /// [`SessionsCore::handle_sessions`] (they changed since the last scan).
    Scan,
}

/// Signing-key rotation and session refreshes as a state machine, without I/O.
///
/// Time is seconds since the Unix epoch: everything it compares is a registry time in that
/// unit (key ages, token and session expiry), and its own timers are in the same unit.
///
/// Calling order: [`handle_leadership`](Self::handle_leadership) whenever leadership may
/// have changed (before anything else, with every input, is fine);
/// [`handle_signing_key`](Self::handle_signing_key) and
/// [`handle_sessions_changed`](Self::handle_sessions_changed) for each registry the cluster
/// applies; [`handle_sessions`](Self::handle_sessions) when asked to
/// ([`SessionsAction::Scan`]); [`handle_refreshed`](Self::handle_refreshed) and
/// [`handle_rotated`](Self::handle_rotated) when the work it asked for ends;
/// [`handle_timeout`](Self::handle_timeout) when [`poll_timeout`](Self::poll_timeout)
/// passes. After each call, drain [`poll_action`](Self::poll_action) and perform every
/// action in order.
///
/// A session is due for a refresh when its tokens expire within [`REFRESH_AHEAD`] (or
/// within half their lifetime, for tokens that live less than twice that: refreshing
/// 4-second tokens 30 s ahead would mean refreshing back to back), it holds a refresh
/// token, and it has not ended. The registry's sessions are scanned at most every
/// [`SCAN_GAP`] and only when they changed, on the leader (or while its refreshes are out).
///
/// Only the leader rotates and starts refreshes. When leadership is lost, refreshes in
/// flight are let finish (each within its timeout) and their answers recorded: the write
/// goes to the new leader, and a provider that rotates refresh tokens has already
/// invalidated the old one, so dropping new tokens would end the session at its next
/// refresh. A refusal is acted on only if the session's tokens did not change meanwhile
/// (someone else refreshed it, and the refusal is of an old refresh token).
pub struct SessionsCore {
    rotation: u64,
    leader: bool,
    /// Creation time of the newest signing key; `None` while the cluster has none.
    newest_key: Option<u64>,
    rotate: Rotate,
    sessions: HashMap<SessionId, Tracked>,
    /// Sessions waiting for their next refresh, by when it is due.
    queue: BTreeSet<(u64, SessionId)>,
    in_flight: HashMap<SessionId, InFlight>,
    next_attempt: u64,
    /// Whether the registry's sessions changed since the last scan (or were never scanned).
    stale: bool,
    last_scan: Option<u64>,
    actions: VecDeque<SessionsAction>,
}

/// Where rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rotate {
    /// Rotate when the newest key is old enough.
    Idle,
    /// A rotation is being written; `newest` was the newest key when it was asked for.
    Writing { newest: Option<u64> },
    /// Written (or failed): rotate again only at `until` if the new key has not shown.
    Wait { until: u64 },
}

/// A refreshable session as the core follows it.
#[derive(Debug, Clone)]
struct Tracked {
    expires_at: u64,
    token_expires_at: u64,
    /// When its current tokens were issued (as near as the core knows).
    issued_at: u64,
    /// The expiry of tokens this core recorded that the registry does not show yet.
    recorded: Option<u64>,
    failures: u32,
    /// No try before this (after a failure).
    retry_at: u64,
    /// Its key in the queue, if queued.
    queued: Option<u64>,
}

impl Tracked {
    /// When its next refresh is due.
    fn due(&self) -> u64 {
        let life = self.token_expires_at.saturating_sub(self.issued_at);
        let by_tokens = self
            .token_expires_at
            .saturating_sub(REFRESH_AHEAD.min(life / 2))
            .max(self.issued_at + 1);
        by_tokens.max(self.retry_at)
    }
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    attempt: Attempt,
    deadline: u64,
    /// The token expiry it started from, to tell whether someone else refreshed meanwhile.
    token_expires_at: u64,
}

impl SessionsCore {
    /// A core that rotates keys older than `rotation`, not leader yet, knowing no session.
    pub fn new(rotation: Duration) -> Self {
        Self {
            rotation: rotation.as_secs().max(1),
            leader: false,
            newest_key: None,
            rotate: Rotate::Idle,
            sessions: HashMap::new(),
            queue: BTreeSet::new(),
            in_flight: HashMap::new(),
            next_attempt: 0,
            stale: true,
            last_scan: None,
            actions: VecDeque::new(),
        }
    }

    /// Whether this node leads the cluster now.
    pub fn handle_leadership(&mut self, leader: bool, now: u64) {
        if leader != self.leader {
            self.leader = leader;
            self.drive(now);
        }
    }

    /// The registry's newest signing key was created at `newest` (`None`: no keys yet).
    pub fn handle_signing_key(&mut self, newest: Option<u64>, now: u64) {
        if newest != self.newest_key {
            self.newest_key = newest;
            if let Rotate::Wait { .. } = self.rotate {
                self.rotate = Rotate::Idle;
            }
        }
        self.drive(now);
    }

    /// The rotation asked for ended, written or not: either way, rotate again only if the
    /// new key has not shown in the registry [`ROTATE_RETRY`] later (a failed write may have
    /// been applied all the same).
    pub fn handle_rotated(&mut self, now: u64) {
        if let Rotate::Writing { newest } = self.rotate {
            self.rotate = if newest == self.newest_key {
                Rotate::Wait {
                    until: now + ROTATE_RETRY,
                }
            } else {
                Rotate::Idle
            };
        }
        self.drive(now);
    }

    /// The registry's sessions changed: scan them again, soon.
    pub fn handle_sessions_changed(&mut self, now: u64) {
        self.stale = true;
        self.drive(now);
    }

    /// Every session of the registry (as asked by [`SessionsAction::Scan`]).
    pub fn handle_sessions(&mut self, sessions: impl IntoIterator<Item = SessionFacts>, now: u64) {
        self.stale = false;
        self.last_scan = Some(now);
        let mut old = std::mem::take(&mut self.sessions);
        self.queue.clear();
        for f in sessions {
            let (true, Some(tokens_at)) = (f.refreshable, f.token_expires_at) else {
                continue;
            };
            let t = match old.remove(&f.id) {
                Some(mut t) => {
                    t.expires_at = f.expires_at;
                    match t.recorded {
                        // Our own write, not applied here yet: keep what we recorded.
                        Some(ours) if tokens_at < ours => {}
                        _ => {
                            t.recorded = None;
                            if tokens_at != t.token_expires_at {
                                // Refreshed elsewhere: its tokens are about this new.
                                t.token_expires_at = tokens_at;
                                t.issued_at = now;
                            }
                        }
                    }
                    t.queued = None;
                    t
                }
                None => Tracked {
                    expires_at: f.expires_at,
                    token_expires_at: tokens_at,
                    issued_at: f.created_at.min(tokens_at),
                    recorded: None,
                    failures: 0,
                    retry_at: 0,
                    queued: None,
                },
            };
            self.sessions.insert(f.id, t);
            self.enqueue(f.id);
        }
        self.drive(now);
    }

    /// The refresh `attempt` of `id` ended with `outcome`.
    pub fn handle_refreshed(
        &mut self,
        id: SessionId,
        attempt: Attempt,
        outcome: RefreshOutcome,
        now: u64,
    ) {
        let Some(flight) = self.in_flight.get(&id).copied() else {
            return;
        };
        if flight.attempt != attempt {
            return;
        }
        self.in_flight.remove(&id);
        match outcome {
            RefreshOutcome::Refreshed(tokens) => {
                if let Some(t) = self.sessions.get_mut(&id) {
                    t.failures = 0;
                    t.retry_at = 0;
                    match tokens.token_expires_at {
                        Some(at) => {
                            t.token_expires_at = at;
                            t.issued_at = now;
                            t.recorded = Some(at);
                            self.enqueue(id);
                        }
                        // Tokens that do not expire need no refresh.
                        None => {
                            self.sessions.remove(&id);
                        }
                    }
                    self.actions
                        .push_back(SessionsAction::Record { id, tokens });
                }
            }
            RefreshOutcome::Refused(_) => {
                let unchanged = self
                    .sessions
                    .get(&id)
                    .is_some_and(|t| t.token_expires_at == flight.token_expires_at);
                if unchanged {
                    self.actions.push_back(SessionsAction::Revoke { id });
                    // Should the revocation not be written, try again later, not at once.
                    self.fail(id, now);
                } else {
                    self.enqueue(id);
                }
            }
            RefreshOutcome::Failed(_) => self.fail(id, now),
        }
        self.drive(now);
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: u64) {
        self.drive(now);
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<SessionsAction> {
        self.actions.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut next = self.in_flight.values().map(|f| f.deadline).min();
        let mut at = |t: u64| next = Some(next.map_or(t, |n| n.min(t)));
        if self.wants_scan() {
            at(self.last_scan.map_or(0, |t| t + SCAN_GAP));
        }
        if self.leader {
            if let Some(due) = self.rotation_due() {
                at(due);
            }
            if self.in_flight.len() < MAX_REFRESHING {
                if let Some((due, _)) = self.queue.first() {
                    at(*due);
                }
            }
        }
        next
    }

    /// Refreshes in flight (for tests and metrics).
    pub fn refreshing(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether the sessions should be scanned again (they changed, and this node acts on
    /// them: it leads, or answers of refreshes it started are still to come).
    fn wants_scan(&self) -> bool {
        self.stale && (self.leader || !self.in_flight.is_empty())
    }

    /// When rotation is due next, if it can happen at all.
    fn rotation_due(&self) -> Option<u64> {
        let by_age = self.newest_key? + self.rotation;
        match self.rotate {
            Rotate::Idle => Some(by_age),
            Rotate::Writing { .. } => None,
            Rotate::Wait { until } => Some(by_age.max(until)),
        }
    }

    /// Does whatever is due at `now`.
    fn drive(&mut self, now: u64) {
        let mut late: Vec<(SessionId, InFlight)> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(id, f)| (*id, *f))
            .collect();
        late.sort_by_key(|(id, _)| *id);
        for (id, f) in late {
            self.in_flight.remove(&id);
            self.actions.push_back(SessionsAction::Abandon {
                id,
                attempt: f.attempt,
            });
            self.fail(id, now);
        }
        if self.wants_scan() && self.last_scan.is_none_or(|t| now >= t + SCAN_GAP) {
            // Set again when the scan arrives; cleared now so it is asked for once.
            self.stale = false;
            self.last_scan = Some(now);
            self.actions.push_back(SessionsAction::Scan);
        }
        if !self.leader {
            return;
        }
        if self.rotation_due().is_some_and(|due| due <= now) {
            self.rotate = Rotate::Writing {
                newest: self.newest_key,
            };
            self.actions.push_back(SessionsAction::RotateSigningKey);
        }
        while self.in_flight.len() < MAX_REFRESHING {
            let Some(&(due, id)) = self.queue.first() else {
                break;
            };
            if due > now {
                break;
            }
            self.queue.pop_first();
            let Some(t) = self.sessions.get_mut(&id) else {
                continue;
            };
            t.queued = None;
            if t.expires_at <= now {
                // Over: the registry forgets it; nothing to refresh.
                continue;
            }
            t.recorded = None;
            let attempt = Attempt(self.next_attempt);
            self.next_attempt += 1;
            self.in_flight.insert(
                id,
                InFlight {
                    attempt,
                    deadline: now + REFRESH_TIMEOUT,
                    token_expires_at: t.token_expires_at,
                },
            );
            self.actions
                .push_back(SessionsAction::Refresh { id, attempt });
        }
    }

    /// A try at refreshing `id` failed: back off.
    fn fail(&mut self, id: SessionId, now: u64) {
        let Some(t) = self.sessions.get_mut(&id) else {
            return;
        };
        t.failures = t.failures.saturating_add(1);
        let wait = RETRY_FIRST
            .saturating_mul(1 << (t.failures - 1).min(16))
            .min(RETRY_MAX);
        t.retry_at = now + wait;
        self.enqueue(id);
    }

    /// (Re)queues `id` for its next refresh, unless one is in flight.
    fn enqueue(&mut self, id: SessionId) {
        if self.in_flight.contains_key(&id) {
            return;
        }
        let Some(t) = self.sessions.get_mut(&id) else {
            return;
        };
        if let Some(old) = t.queued.take() {
            self.queue.remove(&(old, id));
        }
        let due = t.due();
        t.queued = Some(due);
        self.queue.insert((due, id));
    }
}

/// Messages of the [`SessionsActor`].
pub enum SessionsMsg {
    /// The cluster applied a new registry.
    Changed,
    /// This node's Raft role may have changed.
    Leadership,
    /// The core's timer passed.
    Timeout,
    /// A refresh ended.
    Refreshed {
        /// The session.
        id: SessionId,
        /// The try.
        attempt: Attempt,
        /// How it went.
        outcome: RefreshOutcome,
    },
    /// A rotation was written, or failed.
    Rotated(Result<(), String>),
    /// One of the actor's tasks panicked: fail the actor.
    TaskPanicked(String),
    /// Panic on purpose, to exercise the supervision tree (its tests).
    Crash,
}

/// Owns a [`SessionsCore`] and performs what it asks.
#[derive(Clone)]
pub struct SessionsActor;

impl SessionsActor {
    /// The tree's child `sessions`.
    pub fn child(proxy: Arc<Proxy>) -> ChildSpec {
        ChildSpec::actor("sessions", SessionsActor, move || proxy.clone())
    }
}

/// State of the [`SessionsActor`].
pub struct SessionsState {
    proxy: Arc<Proxy>,
    core: SessionsCore,
    /// The registry of the last scan (to tell whether its sessions changed since).
    scanned: Arc<Registry>,
    tasks: JoinSet<()>,
    refreshing: HashMap<SessionId, (Attempt, AbortHandle)>,
    followers: [JoinHandle<()>; 2],
    timer: Timer<SessionsMsg, u64>,
}

impl SessionsState {
    fn cluster(&self) -> &Cluster {
        self.proxy.cluster()
    }

    /// Runs `work` as a task the actor owns; what it returns is sent to the actor, and a
    /// panic fails the actor.
    fn spawn<F>(&mut self, myself: &ActorRef<SessionsMsg>, work: F) -> AbortHandle
    where
        F: std::future::Future<Output = Option<SessionsMsg>> + Send + 'static,
    {
        let me = myself.clone();
        self.tasks.spawn(async move {
            let msg = match AssertUnwindSafe(work).catch_unwind().await {
                Ok(Some(msg)) => msg,
                Ok(None) => return,
                Err(panic) => SessionsMsg::TaskPanicked(panic_text(&*panic)),
            };
            let _ = me.cast(msg);
        })
    }
}

impl Actor for SessionsActor {
    type Msg = SessionsMsg;
    type State = SessionsState;
    type Arguments = Arc<Proxy>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        proxy: Arc<Proxy>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let cluster = proxy.cluster().clone();
        // Registry changes arrive as messages; several in a row coalesce (the handler reads
        // the current registry, not the one that woke it).
        let mut rx = cluster.subscribe();
        let me = myself.clone();
        let registry = tokio::spawn(async move {
            rx.borrow_and_update();
            if me.cast(SessionsMsg::Changed).is_err() {
                return;
            }
            while rx.changed().await.is_ok() {
                if me.cast(SessionsMsg::Changed).is_err() {
                    return;
                }
            }
        });
        // Raft's server metrics change with its role and leader only (not with every entry).
        let mut rx = cluster.raft().server_metrics();
        let me = myself.clone();
        let leadership = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if me.cast(SessionsMsg::Leadership).is_err() {
                    return;
                }
            }
        });
        Ok(SessionsState {
            core: SessionsCore::new(proxy.signing_key_rotation()),
            proxy,
            scanned: Arc::new(Registry::default()),
            tasks: JoinSet::new(),
            refreshing: HashMap::new(),
            followers: [registry, leadership],
            timer: Timer::new(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for f in &state.followers {
            f.abort();
        }
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
                    return Err(format!("a sessions task panicked: {e}").into());
                }
            }
        }
        let cluster = state.cluster();
        let leader = cluster.leader() == Some(cluster.id());
        state.core.handle_leadership(leader, now);
        match msg {
            SessionsMsg::Changed => {
                let reg = state.cluster().registry();
                let newest = reg
                    .proxy_keys()
                    .and_then(|k| k.signing_keys.last())
                    .map(|k| k.created_at);
                state.core.handle_signing_key(newest, now);
                if !reg.sessions().ptr_eq(state.scanned.sessions()) {
                    state.core.handle_sessions_changed(now);
                }
            }
            SessionsMsg::Leadership => {}
            SessionsMsg::Timeout => {
                state.timer.fired();
                state.core.handle_timeout(now);
            }
            SessionsMsg::Refreshed {
                id,
                attempt,
                outcome,
            } => {
                if state
                    .refreshing
                    .get(&id)
                    .is_some_and(|(a, _)| *a == attempt)
                {
                    state.refreshing.remove(&id);
                }
                match &outcome {
                    RefreshOutcome::Refreshed(_) => {}
                    RefreshOutcome::Refused(why) => tracing::warn!(
                        session = ?id,
                        "the identity provider refused to refresh the session's tokens ({why})"
                    ),
                    RefreshOutcome::Failed(why) => tracing::warn!(
                        session = ?id,
                        "refreshing provider tokens failed, will retry: {why}"
                    ),
                }
                state.core.handle_refreshed(id, attempt, outcome, now);
            }
            SessionsMsg::Rotated(result) => {
                if let Err(e) = &result {
                    tracing::warn!("rotating the signing key: {e}");
                }
                state.core.handle_rotated(now);
            }
            SessionsMsg::TaskPanicked(why) => {
                return Err(format!("a sessions task panicked: {why}").into())
            }
            SessionsMsg::Crash => panic!("crash requested"),
        }
        while let Some(action) = state.core.poll_action() {
            perform(&myself, state, action, now);
        }
        rearm(&myself, state, now);
        Ok(())
    }
}

fn perform(
    myself: &ActorRef<SessionsMsg>,
    state: &mut SessionsState,
    action: SessionsAction,
    now: u64,
) {
    match action {
        SessionsAction::Scan => {
            let reg = state.cluster().registry();
            state
                .core
                .handle_sessions(reg.sessions().values().map(SessionFacts::of), now);
            state.scanned = reg;
        }
        SessionsAction::RotateSigningKey => {
            tracing::info!("rotating the assertion signing key");
            let cluster = state.cluster().clone();
            state.spawn(myself, async move {
                // Key generation draws randomness: here, not in the core.
                let cmd = Command::RotateSigningKey(Signer::generate(unix_now()));
                Some(SessionsMsg::Rotated(write(&cluster, cmd).await))
            });
        }
        SessionsAction::Refresh { id, attempt } => {
            let reg = state.cluster().registry();
            let found = reg.sessions().get(&id).and_then(|s| {
                let idp = reg.identity_providers().get(&s.idp)?;
                Some((s.clone(), idp.clone()))
            });
            let proxy = state.proxy.clone();
            let handle = state.spawn(myself, async move {
                let outcome = match found {
                    Some((session, idp)) => proxy.refresh_session(&idp, &session).await,
                    None => RefreshOutcome::Failed(
                        "the session or its identity provider is gone".into(),
                    ),
                };
                Some(SessionsMsg::Refreshed {
                    id,
                    attempt,
                    outcome,
                })
            });
            state.refreshing.insert(id, (attempt, handle));
        }
        SessionsAction::Abandon { id, attempt } => {
            if let Some((a, handle)) = state.refreshing.remove(&id) {
                if a == attempt {
                    handle.abort();
                } else {
                    state.refreshing.insert(id, (a, handle));
                }
            }
            tracing::warn!(
                session = ?id,
                "the identity provider did not answer a refresh within {REFRESH_TIMEOUT} s; will retry"
            );
        }
        SessionsAction::Record { id, tokens } => {
            let cluster = state.cluster().clone();
            state.spawn(myself, async move {
                let cmd = Command::RefreshSession {
                    id,
                    refresh_token: tokens.refresh_token,
                    token_expires_at: tokens.token_expires_at,
                    groups: tokens.groups,
                };
                match write(&cluster, cmd).await {
                    Ok(()) => tracing::info!(session = ?id, "refreshed provider tokens"),
                    Err(e) => tracing::warn!(session = ?id, "recording a refresh: {e}"),
                }
                None
            });
        }
        SessionsAction::Revoke { id } => {
            tracing::warn!(session = ?id, "the identity provider refused to refresh; ending the session");
            let cluster = state.cluster().clone();
            state.spawn(myself, async move {
                if let Err(e) = write(&cluster, Command::RevokeSession { id }).await {
                    tracing::warn!(session = ?id, "ending a session: {e}");
                }
                None
            });
        }
    }
}

/// One timer, for the core's next deadline.
fn rearm(myself: &ActorRef<SessionsMsg>, state: &mut SessionsState, now: u64) {
    let wanted = state.core.poll_timeout();
    state.timer.set(
        myself,
        wanted.map(|at| (at, Duration::from_secs(at.saturating_sub(now)))),
        || SessionsMsg::Timeout,
    );
}

/// Commits `command` as the system.
async fn write(cluster: &Cluster, command: Command) -> Result<(), String> {
    match cluster.write(RaftRequest::new(Who::System, command)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// What a panic said, if it said it with a string.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3600;
    const ROTATION: u64 = 24 * HOUR;
    const T0: u64 = 1_700_000_000;

    fn sid(n: u128) -> SessionId {
        SessionId(n)
    }

    fn drain(core: &mut SessionsCore) -> Vec<SessionsAction> {
        std::iter::from_fn(|| core.poll_action()).collect()
    }

    /// A session opened at `created` whose tokens expire at `tokens`, lasting a day.
    fn facts(n: u128, created: u64, tokens: u64) -> SessionFacts {
        SessionFacts {
            id: sid(n),
            created_at: created,
            expires_at: created + 24 * HOUR,
            token_expires_at: Some(tokens),
            refreshable: true,
        }
    }

    fn tokens(expires: u64) -> Tokens {
        Tokens {
            refresh_token: Some(Secret::new("rt2")),
            token_expires_at: Some(expires),
            groups: vec!["dev".into()],
        }
    }

    /// A session whose tokens of an hour are due for a refresh at [`T0`].
    fn due_now(n: u128) -> SessionFacts {
        facts(n, T0 - HOUR, T0 + 10)
    }

    /// A leader core that has scanned `sessions` at `now` and has a key made at `key`.
    fn leader(sessions: &[SessionFacts], key: u64, now: u64) -> SessionsCore {
        let mut core = SessionsCore::new(Duration::from_secs(ROTATION));
        core.handle_leadership(true, now);
        assert_eq!(drain(&mut core), [SessionsAction::Scan]);
        core.handle_sessions(sessions.iter().copied(), now);
        core.handle_signing_key(Some(key), now);
        core
    }

    fn refreshes(actions: &[SessionsAction]) -> Vec<SessionId> {
        actions
            .iter()
            .filter_map(|a| match a {
                SessionsAction::Refresh { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    fn attempt_of(actions: &[SessionsAction], want: SessionId) -> Attempt {
        actions
            .iter()
            .find_map(|a| match a {
                SessionsAction::Refresh { id, attempt } if *id == want => Some(*attempt),
                _ => None,
            })
            .expect("a refresh of that session")
    }

    #[test]
    fn a_session_is_refreshed_ahead_of_its_token_expiry_and_recorded() {
        // Tokens of an hour, issued at sign-in: due 30 s before they expire.
        let mut core = leader(&[facts(1, T0, T0 + HOUR)], T0, T0);
        assert_eq!(drain(&mut core), []);
        assert_eq!(core.poll_timeout(), Some(T0 + HOUR - REFRESH_AHEAD));
        let now = T0 + HOUR - REFRESH_AHEAD;
        core.handle_timeout(now);
        let actions = drain(&mut core);
        let attempt = attempt_of(&actions, sid(1));
        assert_eq!(
            actions,
            [SessionsAction::Refresh {
                id: sid(1),
                attempt
            }]
        );
        // Only its timeout is pending while it is in flight.
        assert_eq!(core.poll_timeout(), Some(now + REFRESH_TIMEOUT));
        let fresh = tokens(now + 2 + HOUR);
        core.handle_refreshed(
            sid(1),
            attempt,
            RefreshOutcome::Refreshed(fresh.clone()),
            now + 2,
        );
        assert_eq!(
            drain(&mut core),
            [SessionsAction::Record {
                id: sid(1),
                tokens: fresh
            }]
        );
        assert_eq!(core.poll_timeout(), Some(now + 2 + HOUR - REFRESH_AHEAD));
    }

    #[test]
    fn short_lived_tokens_are_refreshed_at_half_their_life_not_back_to_back() {
        // Tokens of 4 s: due 2 s after they were issued, again and again.
        let mut core = leader(&[facts(1, T0, T0 + 4)], T0, T0);
        assert_eq!(core.poll_timeout(), Some(T0 + 2));
        core.handle_timeout(T0 + 2);
        let a = attempt_of(&drain(&mut core), sid(1));
        core.handle_refreshed(sid(1), a, RefreshOutcome::Refreshed(tokens(T0 + 7)), T0 + 3);
        assert!(matches!(
            drain(&mut core)[..],
            [SessionsAction::Record { .. }]
        ));
        assert_eq!(core.poll_timeout(), Some(T0 + 5));
        // A scan before the write is applied shows the old expiry: the core keeps its own.
        core.handle_sessions_changed(T0 + 4);
        assert_eq!(drain(&mut core), [SessionsAction::Scan]);
        core.handle_sessions([facts(1, T0, T0 + 4)], T0 + 4);
        assert_eq!(drain(&mut core), []);
        assert_eq!(core.poll_timeout(), Some(T0 + 5));
    }

    #[test]
    fn rotation_happens_on_time_while_refreshes_are_stuck() {
        // Ten sessions due at once, a key a second short of its rotation age.
        let due: Vec<SessionFacts> = (1..=10).map(due_now).collect();
        let mut core = leader(&due, T0 + 1 - ROTATION, T0);
        let started = refreshes(&drain(&mut core));
        assert_eq!(started.len(), MAX_REFRESHING);
        // The providers never answer; the key comes of age a second later.
        assert_eq!(core.poll_timeout(), Some(T0 + 1));
        core.handle_timeout(T0 + 1);
        assert_eq!(drain(&mut core), [SessionsAction::RotateSigningKey]);
        assert_eq!(core.refreshing(), MAX_REFRESHING);
        // Written: the new key shows in the registry; the next rotation is a period later.
        core.handle_rotated(T0 + 1);
        core.handle_signing_key(Some(T0 + 1), T0 + 1);
        assert_eq!(drain(&mut core), []);
        assert_eq!(core.poll_timeout(), Some(T0 + REFRESH_TIMEOUT));
    }

    #[test]
    fn a_failed_rotation_is_tried_again_after_a_pause_not_at_once() {
        let mut core = leader(&[], T0 - ROTATION, T0);
        assert_eq!(drain(&mut core), [SessionsAction::RotateSigningKey]);
        // Nothing more while it is being written.
        assert_eq!(core.poll_timeout(), None);
        core.handle_timeout(T0 + 1);
        assert_eq!(drain(&mut core), []);
        core.handle_rotated(T0 + 1);
        assert_eq!(drain(&mut core), []);
        assert_eq!(core.poll_timeout(), Some(T0 + 1 + ROTATE_RETRY));
        core.handle_timeout(T0 + 1 + ROTATE_RETRY);
        assert_eq!(drain(&mut core), [SessionsAction::RotateSigningKey]);
    }

    #[test]
    fn no_more_than_the_bound_refresh_at_once_and_a_freed_slot_is_used() {
        let due: Vec<SessionFacts> = (1..=20).map(due_now).collect();
        let mut core = leader(&due, T0, T0);
        let first = drain(&mut core);
        let started = refreshes(&first);
        assert_eq!(started.len(), MAX_REFRESHING);
        // Still full: nothing more, however often asked.
        core.handle_timeout(T0 + 1);
        assert_eq!(drain(&mut core), []);
        // One answers: exactly one more starts.
        let a = attempt_of(&first, started[0]);
        core.handle_refreshed(
            started[0],
            a,
            RefreshOutcome::Refreshed(tokens(T0 + 2 + HOUR)),
            T0 + 2,
        );
        let next = drain(&mut core);
        assert!(matches!(next[0], SessionsAction::Record { .. }));
        let more = refreshes(&next);
        assert_eq!(more.len(), 1);
        assert!(!started.contains(&more[0]));
        assert_eq!(core.refreshing(), MAX_REFRESHING);
    }

    #[test]
    fn one_refresh_per_session_at_a_time_and_late_answers_are_ignored() {
        let mut core = leader(&[due_now(1)], T0, T0);
        let a = attempt_of(&drain(&mut core), sid(1));
        // The registry changes meanwhile: a rescan does not start a second refresh.
        core.handle_sessions_changed(T0 + 5);
        assert_eq!(drain(&mut core), [SessionsAction::Scan]);
        core.handle_sessions([due_now(1)], T0 + 5);
        assert_eq!(drain(&mut core), []);
        // It times out: abandoned, and not retried before its backoff.
        core.handle_timeout(T0 + REFRESH_TIMEOUT);
        assert_eq!(
            drain(&mut core),
            [SessionsAction::Abandon {
                id: sid(1),
                attempt: a
            }]
        );
        // The abandoned try's answer comes in late: ignored.
        core.handle_refreshed(
            sid(1),
            a,
            RefreshOutcome::Refused("invalid_grant".into()),
            T0 + REFRESH_TIMEOUT + 1,
        );
        assert_eq!(drain(&mut core), []);
        assert_eq!(
            core.poll_timeout(),
            Some(T0 + REFRESH_TIMEOUT + RETRY_FIRST)
        );
    }

    #[test]
    fn failures_back_off_per_session_doubling_up_to_the_cap() {
        let mut core = leader(&[due_now(1), facts(2, T0, T0 + HOUR)], T0, T0);
        let mut now = T0;
        let mut a = attempt_of(&drain(&mut core), sid(1));
        let mut waits = Vec::new();
        for _ in 0..9 {
            core.handle_refreshed(sid(1), a, RefreshOutcome::Failed("timeout".into()), now);
            assert_eq!(drain(&mut core), []);
            let next = core.poll_timeout().unwrap();
            waits.push(next - now);
            // Nothing before the backoff ends.
            core.handle_timeout(next - 1);
            assert_eq!(drain(&mut core), []);
            now = next;
            core.handle_timeout(now);
            a = attempt_of(&drain(&mut core), sid(1));
        }
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        // A success resets it.
        core.handle_refreshed(
            sid(1),
            a,
            RefreshOutcome::Refreshed(tokens(now + HOUR)),
            now,
        );
        assert!(matches!(
            drain(&mut core)[..],
            [SessionsAction::Record { .. }]
        ));
    }

    #[test]
    fn a_refusal_revokes_the_session() {
        let mut core = leader(&[due_now(1)], T0, T0);
        let a = attempt_of(&drain(&mut core), sid(1));
        core.handle_refreshed(
            sid(1),
            a,
            RefreshOutcome::Refused("invalid_grant".into()),
            T0 + 1,
        );
        assert_eq!(drain(&mut core), [SessionsAction::Revoke { id: sid(1) }]);
        // Gone from the registry: never refreshed again.
        core.handle_sessions_changed(T0 + 3);
        assert_eq!(drain(&mut core), [SessionsAction::Scan]);
        core.handle_sessions([], T0 + 3);
        assert_eq!(drain(&mut core), []);
        assert_eq!(core.poll_timeout(), Some(T0 + ROTATION));
    }

    #[test]
    fn a_refusal_of_tokens_refreshed_elsewhere_meanwhile_does_not_revoke() {
        let mut core = leader(&[due_now(1)], T0, T0);
        let a = attempt_of(&drain(&mut core), sid(1));
        // Another leader refreshed it while this one's try was out.
        core.handle_sessions_changed(T0 + 2);
        drain(&mut core);
        core.handle_sessions([facts(1, T0 - HOUR, T0 + 2 + HOUR)], T0 + 2);
        assert_eq!(drain(&mut core), []);
        core.handle_refreshed(
            sid(1),
            a,
            RefreshOutcome::Refused("invalid_grant".into()),
            T0 + 3,
        );
        assert_eq!(drain(&mut core), []);
        assert_eq!(core.poll_timeout(), Some(T0 + 2 + HOUR - REFRESH_AHEAD));
    }

    #[test]
    fn nothing_happens_while_not_leader() {
        let mut core = SessionsCore::new(Duration::from_secs(ROTATION));
        // An overdue key and changed sessions: a follower does not even scan them.
        core.handle_signing_key(Some(T0 - 2 * ROTATION), T0);
        core.handle_sessions_changed(T0);
        core.handle_timeout(T0 + 10);
        assert_eq!(drain(&mut core), []);
        assert_eq!(core.poll_timeout(), None);
        // Elected: the overdue key, a scan, and both due sessions at once.
        core.handle_leadership(true, T0 + 11);
        assert_eq!(
            drain(&mut core),
            [SessionsAction::Scan, SessionsAction::RotateSigningKey]
        );
        core.handle_sessions([facts(1, T0 - 100, T0), facts(2, T0, T0 + 5)], T0 + 11);
        assert_eq!(refreshes(&drain(&mut core)), [sid(1), sid(2)]);
    }

    #[test]
    fn leadership_lost_mid_refresh_lets_it_finish_and_starts_nothing_new() {
        let due: Vec<SessionFacts> = (1..=3).map(due_now).collect();
        let mut core = leader(&due, T0, T0);
        let first = drain(&mut core);
        core.handle_leadership(false, T0 + 1);
        assert_eq!(drain(&mut core), []);
        // Answers still count: new tokens are recorded, a refusal revokes.
        let a1 = attempt_of(&first, sid(1));
        let a2 = attempt_of(&first, sid(2));
        let fresh = tokens(T0 + 2 + HOUR);
        core.handle_refreshed(sid(1), a1, RefreshOutcome::Refreshed(fresh.clone()), T0 + 2);
        core.handle_refreshed(sid(2), a2, RefreshOutcome::Refused("no".into()), T0 + 2);
        assert_eq!(
            drain(&mut core),
            [
                SessionsAction::Record {
                    id: sid(1),
                    tokens: fresh
                },
                SessionsAction::Revoke { id: sid(2) }
            ]
        );
        // The third never answers: abandoned at its timeout, not retried while a follower.
        assert_eq!(core.poll_timeout(), Some(T0 + REFRESH_TIMEOUT));
        core.handle_timeout(T0 + REFRESH_TIMEOUT);
        let a3 = attempt_of(&first, sid(3));
        assert_eq!(
            drain(&mut core),
            [SessionsAction::Abandon {
                id: sid(3),
                attempt: a3
            }]
        );
        core.handle_timeout(T0 + 10 * REFRESH_TIMEOUT);
        assert_eq!(drain(&mut core), []);
        assert_eq!(core.poll_timeout(), None);
    }

    #[test]
    fn sessions_without_refresh_tokens_or_over_are_left_alone() {
        let no_refresh = SessionFacts {
            refreshable: false,
            ..facts(1, T0, T0 + 10)
        };
        let no_expiry = SessionFacts {
            token_expires_at: None,
            ..facts(2, T0, T0 + 10)
        };
        let over = SessionFacts {
            expires_at: T0 + 5,
            ..facts(3, T0 - HOUR, T0 + 10)
        };
        let mut core = leader(&[no_refresh, no_expiry, over], T0 + 100, T0 + 6);
        assert_eq!(drain(&mut core), []);
        assert_eq!(core.poll_timeout(), Some(T0 + 100 + ROTATION));
    }

    #[test]
    fn registry_changes_are_scanned_at_most_every_scan_gap() {
        let mut core = leader(&[], T0, T0);
        core.handle_sessions_changed(T0);
        assert_eq!(drain(&mut core), []);
        core.handle_sessions_changed(T0 + 1);
        assert_eq!(drain(&mut core), []);
        assert_eq!(core.poll_timeout(), Some(T0 + SCAN_GAP));
        core.handle_timeout(T0 + SCAN_GAP);
        assert_eq!(drain(&mut core), [SessionsAction::Scan]);
        core.handle_sessions([], T0 + SCAN_GAP);
        assert_eq!(core.poll_timeout(), Some(T0 + ROTATION));
    }
}
