//! The hole-punch coordinator: one actor per client↔site pairing on the node the client is
//! bound to, under the tree's child `coordinator`, each owning a sans-IO
//! [`Pairing`](warren_proto::coordinator::Pairing).
//!
//! ```text
//!  relay task: Punch on a coordinated binding ─ Coordinate ─► CoordinatorActor (child `coordinator`)
//!             (a few per round, never data)                     │ spawn_linked, one per pairing
//!                                                               ▼ (client address, channel)
//!                                               PairingActor ─ Pairing (sans-IO)
//!                                                ├─ Call: on to the agent's side
//!                                                ├─ Answer to the Call held: Go to both at once
//!                                                └─ quiet for PAIRING_IDLE, or the client's
//!                                                   binding gone: stop (forgotten)
//! ```
//!
//! The pairing actor sends its frames on the relay's socket itself. It learns nothing the
//! relay does not see already (addresses), and cannot forge an offer: their tags belong to
//! the client's and the agent's keys.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::net::UdpSocket;
use warren_proto::coordinator::{Pairing, PunchOut, Side};
use warren_proto::relay::{Frame, PunchKind};

use crate::actors::ChildSpec;
use crate::relay::Coordinate;
use crate::sites::Current;

/// Most pairings one node coordinates at once; Calls of further pairings are dropped
/// (counted).
pub const MAX_PAIRINGS: usize = 65_536;
/// How often a pairing looks at its idleness.
pub const TICK: Duration = Duration::from_secs(10);

type Key = (SocketAddr, u32);

/// Messages of the [`CoordinatorActor`].
pub enum CoordinatorMsg {
    /// A Punch for a pairing.
    Punch(Coordinate),
    /// A client binding is gone.
    Gone(Key),
}

/// The coordinator of this node: the handle the relay reports to.
pub struct Coordinator {
    socket: Arc<UdpSocket>,
    current: Arc<Current<CoordinatorMsg>>,
    /// Pairings coordinated now.
    pub pairings: AtomicU64,
    /// Rounds coordinated (Go pairs sent).
    pub rounds: AtomicU64,
    /// Punches dropped (no coordinator running, too many pairings, no Call to answer).
    pub dropped: AtomicU64,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("pairings", &self.pairings)
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// The service, sending on the relay's `socket`, before its actor starts.
    pub fn new(socket: Arc<UdpSocket>) -> Arc<Self> {
        Arc::new(Self {
            socket,
            current: Current::new(),
            pairings: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    /// The tree's child `coordinator`.
    pub fn child(self: &Arc<Self>) -> ChildSpec {
        let me = self.clone();
        ChildSpec::new("coordinator", move |sup| {
            let me = me.clone();
            async move {
                me.current.set(None);
                let (actor, _) =
                    Actor::spawn_linked(None, CoordinatorActor, me.clone(), sup).await?;
                me.current.set(Some(actor.clone()));
                Ok(actor.get_cell())
            }
        })
    }

    /// A Punch from the relay; returns at once.
    pub fn punch(&self, c: Coordinate) {
        let sent = self
            .current
            .actor()
            .is_some_and(|a| a.cast(CoordinatorMsg::Punch(c)).is_ok());
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A client binding is gone.
    pub fn gone(&self, key: Key) {
        if let Some(a) = self.current.actor() {
            let _ = a.cast(CoordinatorMsg::Gone(key));
        }
    }

    /// Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# TYPE warren_punch_pairings gauge\nwarren_punch_pairings {}\n# TYPE warren_punch_rounds_total counter\nwarren_punch_rounds_total {}\n# TYPE warren_punch_dropped_total counter\nwarren_punch_dropped_total {}",
            self.pairings.load(Ordering::Relaxed),
            self.rounds.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed)
        );
    }
}

/// The tree's child `coordinator`: one linked [`PairingActor`] per pairing.
pub struct CoordinatorActor;

/// State of the [`CoordinatorActor`].
pub struct CoordinatorState {
    service: Arc<Coordinator>,
    by_key: HashMap<Key, ActorRef<PairingMsg>>,
    by_id: HashMap<ActorId, Key>,
}

impl CoordinatorState {
    fn gauge(&self) {
        self.service
            .pairings
            .store(self.by_key.len() as u64, Ordering::Relaxed);
    }
}

impl Actor for CoordinatorActor {
    type Msg = CoordinatorMsg;
    type State = CoordinatorState;
    type Arguments = Arc<Coordinator>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        service: Arc<Coordinator>,
    ) -> Result<Self::State, ActorProcessingErr> {
        service.pairings.store(0, Ordering::Relaxed);
        Ok(CoordinatorState {
            service,
            by_key: HashMap::new(),
            by_id: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CoordinatorMsg::Punch(c) => {
                let child = match state.by_key.get(&c.client) {
                    Some(a) => a.clone(),
                    // Only a Call starts a pairing.
                    None if c.kind != PunchKind::Call || state.by_key.len() >= MAX_PAIRINGS => {
                        state.service.dropped.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    None => {
                        let args = PairingArgs {
                            client: c.client,
                            service: state.service.clone(),
                        };
                        let child =
                            match Actor::spawn_linked(None, PairingActor, args, myself.get_cell())
                                .await
                            {
                                Ok((a, _)) => a,
                                Err(e) => {
                                    tracing::warn!("cannot start a pairing's coordinator: {e}");
                                    state.service.dropped.fetch_add(1, Ordering::Relaxed);
                                    return Ok(());
                                }
                            };
                        state.by_id.insert(child.get_id(), c.client);
                        state.by_key.insert(c.client, child.clone());
                        state.gauge();
                        child
                    }
                };
                let _ = child.cast(PairingMsg::Punch(c));
            }
            CoordinatorMsg::Gone(key) => {
                if let Some(a) = state.by_key.get(&key) {
                    a.stop(Some("the client's binding is gone".into()));
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let cell = match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                tracing::warn!("a pairing's coordinator failed: {err}");
                cell
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => cell,
            _ => return Ok(()),
        };
        if let Some(key) = state.by_id.remove(&cell.get_id()) {
            state.by_key.remove(&key);
            state.gauge();
        }
        Ok(())
    }
}

/// Messages of a [`PairingActor`].
pub enum PairingMsg {
    /// A Call or Answer.
    Punch(Coordinate),
    /// Look at idleness.
    Tick,
}

/// Arguments of a [`PairingActor`].
pub struct PairingArgs {
    client: Key,
    service: Arc<Coordinator>,
}

/// One pairing (see the module docs).
pub struct PairingActor;

/// State of a [`PairingActor`].
pub struct PairingState {
    core: Pairing,
    client: Key,
    service: Arc<Coordinator>,
    ticker: tokio::task::JoinHandle<()>,
}

impl Drop for PairingState {
    fn drop(&mut self) {
        self.ticker.abort();
    }
}

impl Actor for PairingActor {
    type Msg = PairingMsg;
    type State = PairingState;
    type Arguments = PairingArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: PairingArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let ticker = myself.send_interval(TICK, || PairingMsg::Tick);
        Ok(PairingState {
            core: Pairing::new(Instant::now()),
            client: args.client,
            service: args.service,
            ticker,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        match msg {
            PairingMsg::Punch(c) => {
                let outs: Vec<PunchOut> = match c.kind {
                    PunchKind::Call => state
                        .core
                        .handle_call(c.observed, &c.body, now)
                        .into_iter()
                        .collect(),
                    PunchKind::Answer => state.core.handle_answer(c.observed, &c.body, now),
                    PunchKind::Go => Vec::new(),
                };
                if c.kind == PunchKind::Answer {
                    if outs.is_empty() {
                        state.service.dropped.fetch_add(1, Ordering::Relaxed);
                    } else {
                        state.service.rounds.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(client = %state.client.0, "hole punch: go");
                    }
                }
                for o in outs {
                    let (to, channel) = match o.to {
                        Side::Client => state.client,
                        Side::Agent => c.agent,
                    };
                    let frame = Frame::Punch {
                        channel,
                        kind: o.kind,
                        observed: o.observed,
                        body: &o.body,
                    }
                    .to_vec();
                    if let Err(e) = state.service.socket.send_to(&frame, to).await {
                        tracing::debug!(%to, "sending a punch: {e}");
                    }
                }
            }
            PairingMsg::Tick => {
                if state.core.is_idle(now) {
                    myself.stop(Some("idle".into()));
                }
            }
        }
        Ok(())
    }
}
