//! The `gossip` actor: which peer holds which site (soft state with TTLs, never Raft), the
//! connections to peers, and telling every peer every second what this node holds.
//!
//! ```text
//!  RelayService ── Held(peer by its certificate, sites) ──► GossipActor ─► Holdings
//!  Sites::peer ─── Dialed(peer, connection) ──────────────►   │   ▲ timer: poll_timeout()
//!  every second ── Announce ──────────────────────────────►   │   └──────────────────────
//!                      spawned sends (one per peer) ◄─────────┤ (never awaited in handle)
//!                      Published<Peers> ◄─ publish ───────────┘ ◄─ load() ─ data path
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use warren_consensus::registry::Registry;
use warren_proto::registry::NodeId;
use warren_proto::sites::Holdings;
use warren_proto::tunnel::io::write_frame;
use warren_proto::tunnel::Held;
use warren_proto::Name;

use super::{Current, Dialer, Tunnels};
use crate::actors::ChildSpec;
use crate::publish::Published;
use crate::shell::Timer;

/// How often this node tells every peer what it holds.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// How long one announcement to one peer may take, dial included (a later one replaces it).
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(3);

/// What the `gossip` actor publishes: peers' holdings, and the live connections to peers
/// (the data path relays streams over them).
#[derive(Debug, Clone)]
pub struct Peers {
    /// Which peer said it holds which site, and when.
    pub holdings: Holdings,
    conns: BTreeMap<NodeId, quinn::Connection>,
}

impl Peers {
    /// Nothing known yet, on node `me`.
    pub fn new(me: NodeId) -> Self {
        Self {
            holdings: Holdings::new(me),
            conns: BTreeMap::new(),
        }
    }

    /// A live connection to peer `id`, if one is kept.
    pub fn conn(&self, id: NodeId) -> Option<&quinn::Connection> {
        self.conns.get(&id).filter(|c| c.close_reason().is_none())
    }
}

/// Messages of the [`GossipActor`].
pub enum GossipMsg {
    /// A peer's announcement; the sender is the node its connection's certificate names.
    Held(NodeId, Vec<Name>),
    /// A connection to a peer that someone dialed (checked to be that peer): keep it if
    /// there is no live one.
    Dialed(NodeId, quinn::Connection),
    /// Time to tell every peer what this node holds.
    Announce,
    /// The holdings' timer passed.
    Timeout,
    /// Panic on purpose, to exercise the supervision tree (its tests).
    Crash,
}

/// What the [`GossipActor`] is started with (again after a failure).
#[derive(Clone)]
pub struct GossipArgs {
    /// This node.
    pub me: NodeId,
    /// The applied registry (the peers to announce to).
    pub registry: watch::Receiver<Arc<Registry>>,
    /// What this node holds (the `tunnels` actor publishes it).
    pub local: Arc<Published<Tunnels>>,
    /// Where this actor publishes.
    pub peers: Arc<Published<Peers>>,
    /// Dials peers.
    pub dialer: Arc<Dialer>,
}

/// Owns [`Holdings`] and the peer connections; announces this node's.
#[derive(Clone)]
pub struct GossipActor;

impl GossipActor {
    /// The tree's child `gossip`: on every start it becomes the actor `current` names.
    pub fn child(args: GossipArgs, current: Arc<Current<GossipMsg>>) -> ChildSpec {
        ChildSpec::new("gossip", move |sup| {
            let args = args.clone();
            let current = current.clone();
            async move {
                current.set(None);
                let (actor, _) = Actor::spawn_linked(None, GossipActor, args, sup).await?;
                current.set(Some(actor.clone()));
                Ok(actor.get_cell())
            }
        })
    }
}

/// State of the [`GossipActor`].
pub struct GossipState {
    args: GossipArgs,
    holdings: Holdings,
    conns: BTreeMap<NodeId, quinn::Connection>,
    /// Announcements under way; a peer whose last one has not finished is skipped.
    sends: JoinSet<()>,
    sending: HashMap<NodeId, AbortHandle>,
    ticker: JoinHandle<()>,
    timer: Timer<GossipMsg, Instant>,
}

impl Drop for GossipState {
    // Also on a panic, where `post_stop` does not run.
    fn drop(&mut self) {
        self.ticker.abort();
        self.timer.cancel();
    }
}

impl Actor for GossipActor {
    type Msg = GossipMsg;
    type State = GossipState;
    type Arguments = GossipArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: GossipArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // A new incarnation starts from nothing; peers say it all again within a second.
        args.peers.publish(Arc::new(Peers::new(args.me)));
        let ticker = myself.send_interval(ANNOUNCE_EVERY, || GossipMsg::Announce);
        Ok(GossipState {
            holdings: Holdings::new(args.me),
            args,
            conns: BTreeMap::new(),
            sends: JoinSet::new(),
            sending: HashMap::new(),
            ticker,
            timer: Timer::new(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.sends.abort_all();
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
            GossipMsg::Held(from, sites) => {
                // A node removed from the cluster may still hold a valid certificate: its
                // word leads nowhere (it cannot be dialed), so it is not taken.
                if state.args.registry.borrow().node_by_id(from).is_none() {
                    tracing::debug!(peer = %from, "ignoring what a node outside the registry holds");
                    return Ok(());
                }
                let changed = state.holdings.handle_held(from, sites, now);
                publish(state, changed);
            }
            GossipMsg::Dialed(id, conn) => {
                let live = state
                    .conns
                    .get(&id)
                    .is_some_and(|c| c.close_reason().is_none());
                if !live && id != state.args.me {
                    state.conns.insert(id, conn);
                    publish(state, false);
                }
            }
            GossipMsg::Announce => announce(&myself, state)?,
            GossipMsg::Timeout => {
                state.timer.fired();
                if state.holdings.handle_timeout(now) {
                    publish(state, true);
                }
            }
            GossipMsg::Crash => panic!("crash requested"),
        }
        rearm(&myself, state);
        Ok(())
    }
}

/// Publishes the current holdings and connections; `wake` when a site's reachability
/// changed (a refresh that only moves a time wakes nobody).
fn publish(state: &GossipState, wake: bool) {
    let snapshot = Arc::new(Peers {
        holdings: state.holdings.clone(),
        conns: state.conns.clone(),
    });
    if wake {
        state.args.peers.publish(snapshot);
    } else {
        state.args.peers.refresh(snapshot);
    }
}

/// Tells every peer of the registry what this node holds, each in a task of its own.
fn announce(
    myself: &ActorRef<GossipMsg>,
    state: &mut GossipState,
) -> Result<(), ActorProcessingErr> {
    while let Some(ended) = state.sends.try_join_next() {
        if let Err(e) = ended {
            if e.is_panic() {
                return Err(format!("an announcement panicked: {e}").into());
            }
        }
    }
    state.sending.retain(|_, h| !h.is_finished());
    let me = state.args.me;
    let peers: Vec<NodeId> = state
        .args
        .registry
        .borrow()
        .member_grade_nodes()
        .map(|n| n.id)
        .filter(|id| *id != me)
        .collect();
    // Connections to nodes that left the cluster are closed; dead ones are dropped (the
    // next announcement dials again).
    let before = state.conns.len();
    state.conns.retain(|id, c| {
        if c.close_reason().is_some() {
            return false;
        }
        if !peers.contains(id) {
            c.close(0u32.into(), b"not a member of the cluster");
            return false;
        }
        true
    });
    if state.conns.len() != before {
        publish(state, false);
    }
    let held = Held {
        sites: state.args.local.load().held(),
    };
    for peer in peers {
        if state.sending.contains_key(&peer) {
            continue;
        }
        let conn = state
            .conns
            .get(&peer)
            .filter(|c| c.close_reason().is_none())
            .cloned();
        let dialer = state.args.dialer.clone();
        let held = held.clone();
        let gossip = myself.clone();
        let send = async move {
            let conn = match conn {
                Some(c) => c,
                None => {
                    let c = dialer.dial(peer).await?;
                    let _ = gossip.cast(GossipMsg::Dialed(peer, c.clone()));
                    c
                }
            };
            let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
            write_frame(&mut s, &held)
                .await
                .map_err(|e| e.to_string())?;
            let _ = s.finish();
            Ok::<(), String>(())
        };
        let handle = state.sends.spawn(async move {
            let why = match tokio::time::timeout(ANNOUNCE_TIMEOUT, send).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(_) => "no answer in time".to_owned(),
            };
            tracing::debug!(%peer, "cannot tell a peer what this node holds: {why}");
        });
        state.sending.insert(peer, handle);
    }
    Ok(())
}

/// One timer, for the holdings' next expiry.
fn rearm(myself: &ActorRef<GossipMsg>, state: &mut GossipState) {
    let wanted = state.holdings.poll_timeout();
    state.timer.set(
        myself,
        wanted.map(|at| (at, at.saturating_duration_since(Instant::now()))),
        || GossipMsg::Timeout,
    );
}

#[cfg(test)]
mod tests {
    use warren_consensus::registry::Command;
    use warren_consensus::types::{Actor as Who, Request, RequestId};
    use warren_proto::registry::NodeRole;

    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    /// Waits for the next publish and returns the snapshot.
    async fn next(peers: &Published<Peers>, rx: &mut watch::Receiver<u64>) -> Arc<Peers> {
        tokio::time::timeout(Duration::from_secs(30), rx.changed())
            .await
            .expect("a publish")
            .unwrap();
        peers.load_full()
    }

    fn registry_with_nodes(names: &[&str]) -> Registry {
        let mut reg = Registry::default();
        for (i, n) in names.iter().enumerate() {
            let req = Request {
                id: RequestId(i as u128 + 1),
                at: 1_700_000_000,
                actor: Who::System,
                command: Command::RegisterNode {
                    name: name(n),
                    cluster_addr: "127.0.0.1:9".into(),
                    admin_addr: "127.0.0.1:9".into(),
                    region: String::new(),
                    role: NodeRole::Voter,
                },
            };
            reg.apply_request(i as u64 + 1, &req).unwrap();
        }
        reg
    }

    #[tokio::test]
    async fn a_holding_disappears_when_its_ttl_passes_and_a_restart_forgets_all() {
        let reg = registry_with_nodes(&["n1", "n2", "n3"]);
        let ids: Vec<NodeId> = reg.nodes().values().map(|n| n.id).collect();
        let (me, two, three) = (ids[0], ids[1], ids[2]);
        let (_tx, registry) = watch::channel(Arc::new(reg));
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        // Peers are dialed at an address where nothing answers; that only fails quietly.
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert.der().clone()).unwrap();
        let client = quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
        let args = GossipArgs {
            me,
            registry: registry.clone(),
            local: Published::new(Tunnels::new()),
            peers: Published::new(Peers::new(me)),
            dialer: Arc::new(Dialer::new(registry, 0, endpoint, client)),
        };
        let peers = args.peers.clone();
        let mut rx = peers.subscribe();
        let (actor, done) = Actor::spawn(None, GossipActor, args.clone()).await.unwrap();
        next(&peers, &mut rx).await;

        let hq = name("hq");
        let t0 = Instant::now();
        actor.cast(GossipMsg::Held(two, vec![hq.clone()])).unwrap();
        let snap = next(&peers, &mut rx).await;
        assert_eq!(snap.holdings.holders(&hq, t0), vec![two]);

        // Nothing more is heard: the actor's own timer drops the holding at its expiry.
        let snap = next(&peers, &mut rx).await;
        assert!(
            snap.holdings.holders(&hq, t0).is_empty(),
            "dropped, not only expired"
        );
        assert_eq!(snap.holdings.poll_timeout(), None);

        // A node outside the registry is not taken at its word.
        actor
            .cast(GossipMsg::Held(NodeId(99), vec![hq.clone()]))
            .unwrap();
        // A crash ends the actor; a new one starts from nothing.
        actor
            .cast(GossipMsg::Held(three, vec![hq.clone()]))
            .unwrap();
        let snap = next(&peers, &mut rx).await;
        assert_eq!(snap.holdings.holders(&hq, Instant::now()), vec![three]);
        actor.cast(GossipMsg::Crash).unwrap();
        assert!(done.await.is_ok());
        let (again, _) = Actor::spawn(None, GossipActor, args).await.unwrap();
        let snap = next(&peers, &mut rx).await;
        assert!(snap.holdings.holders(&hq, Instant::now()).is_empty());
        again.stop(None);
    }
}
