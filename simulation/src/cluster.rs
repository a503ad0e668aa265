//! A Warren cluster inside a turmoil simulation, faults, clients, and the checks.
//!
//! ```text
//!  driver (this thread)                 turmoil hosts n1..nN (simulated network, clock)
//!  ─────────────────────                ───────────────────────────────────────────────
//!  fault schedule (seeded) ──crash/power cut/partition/loss/──────►  real Cluster:
//!                             delay/membership                       openraft + registry
//!  invariants after every step ◄──metrics, registry digests, logs──   + sled + QUIC
//!  linearizability check ◄──history── client workers on every node
//!  power back: lose_unsynced_tail ──────────────────────────────►  data dir of a host
//!  on the log, then restart                                          that is down
//! ```
//!
//! A crash stops a node's process: what it wrote stays in its files, as the operating
//! system would keep it. A power loss takes what the disk had not been asked to keep too:
//! before the node restarts, its log is cut back to the last log id the log store recorded
//! as synced, and its vote to the last vote it recorded
//! (`warren_consensus::log_store::lose_unsynced_tail`). Half of all crashes are power
//! losses, and power cuts take several nodes down at once (the leader and a quorum, or the
//! whole rack) right after a write was answered; the old leader comes back last, so that
//! the others can elect a leader from what they kept. Storage that reports entries durable
//! only once they are synced loses nothing this way that a peer or a client was told;
//! storage that acknowledges first (`PlantedBug::AckBeforeSync`) loses committed entries,
//! which the checks see as lost acknowledged writes, a history that is not linearizable,
//! or state machines that applied different entries at the same index.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use openraft::ServerState;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use warren_consensus::cluster::{Cluster, ClusterConfig, ClusterError, PlantedBug};
use warren_consensus::log_store::StorageIo;
use warren_consensus::pki::{self, ClusterCa, NodeIdentity};
use warren_consensus::quic::{QuicTransport, RpcHandler};
use warren_consensus::registry::{encode, AnyEntity, Command, Outcome, RegistryError};
use warren_consensus::storage::Store;
use warren_consensus::transport::{BoxFuture, MembershipChange, Rpc, RpcReply};
use warren_consensus::types::{Actor, ClusterNode, Proposal, Request, RequestId};
use warren_proto::registry::{Kind, NodeId, Site};
use warren_proto::Name;

use crate::checker;
use crate::history::{History, Op, Out, Record};
use crate::net::SimUdp;

const PORT: u16 = 7400;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed of every random choice the simulation makes.
    pub seed: u64,
    /// Voting members.
    pub voters: usize,
    /// Learners (added after start).
    pub learners: usize,
    /// Length of the phase with faults, in simulated seconds.
    pub fault_seconds: u64,
    /// Longest the cluster may take to recover after the faults heal, in simulated seconds.
    pub liveness_seconds: u64,
    /// Client workers per node.
    pub workers_per_node: usize,
    /// Keys the clients work on (fewer keys, more contention).
    pub keys: usize,
    /// A deliberate bug, to check that the checkers catch it.
    pub planted_bug: Option<PlantedBug>,
    /// Which faults happen.
    pub faults: Faults,
}

/// Which kinds of fault the schedule may draw.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Crash a node and restart it later from its data.
    pub crashes: bool,
    /// Power losses: half the crashes are power losses (the node's log loses what it had
    /// not synced), and power cuts take a quorum (the leader and followers holding its
    /// last entry) or every node (the rack) down at once, right after a write was answered.
    pub power_loss: bool,
    /// Partitions: majority/minority, isolated leader, one-way.
    pub partitions: bool,
    /// Message loss and delay.
    pub lossy_links: bool,
    /// Remove, re-add and promote members.
    pub membership: bool,
}

impl Faults {
    /// Every kind.
    pub const ALL: Faults = Faults {
        crashes: true,
        power_loss: true,
        partitions: true,
        lossy_links: true,
        membership: true,
    };
}

impl SimConfig {
    /// Three voters and a learner, every fault.
    pub fn three(seed: u64) -> Self {
        Self {
            seed,
            voters: 3,
            learners: 1,
            fault_seconds: 30,
            liveness_seconds: 40,
            workers_per_node: 2,
            keys: 3,
            planted_bug: None,
            faults: Faults::ALL,
        }
    }

    /// Five voters and a learner, every fault.
    pub fn five(seed: u64) -> Self {
        Self {
            voters: 5,
            ..Self::three(seed)
        }
    }
}

/// What a run saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Simulated steps (1 ms each).
    pub steps: u64,
    /// Operations invoked.
    pub ops: usize,
    /// Operations that completed with an answer.
    pub completed: usize,
    /// Faults injected.
    pub faults: Vec<String>,
    /// Leader elections seen (distinct terms with a leader).
    pub terms_with_leader: usize,
    /// Violations of Raft safety, linearizability or liveness; empty if the run passed.
    pub violations: Vec<String>,
    /// Membership changes carried out, with their results.
    pub membership: Vec<String>,
    /// Nodes crashed right after installing a snapshot.
    pub snapshot_install_crashes: usize,
    /// Nodes restarted after a power loss.
    pub power_losses: usize,
    /// Log entries those power losses took (entries the logs held but had not synced).
    pub entries_lost_to_power_loss: u64,
    /// Unanswered writes whose fate the log settled (applied, when and with what result;
    /// or never applied), so the linearizability check need not consider both.
    pub unanswered_settled: usize,
}

/// Everything the hosts and the driver share.
struct Shared {
    dir: PathBuf,
    cluster_id: u128,
    ca: ClusterCa,
    identities: Vec<NodeIdentity>,
    nodes: Mutex<Vec<(NodeId, SocketAddr)>>,
    voters: usize,
    config: ClusterConfig,
    live: Mutex<BTreeMap<NodeId, Cluster>>,
    history: History,
    ops: Mutex<StdRng>,
    keys: usize,
    clients_stop: AtomicBool,
    admin: Mutex<VecDeque<(MembershipChange, u32)>>,
    /// The node carrying out a membership change now, and the change (re-queued if that
    /// node crashes mid-way).
    admin_holder: Mutex<Option<(NodeId, (MembershipChange, u32))>>,
    admin_log: Mutex<Vec<String>>,
    workers_per_node: usize,
    /// Nodes to crash as soon as they have installed a snapshot from the leader.
    snapshot_trap: Mutex<BTreeSet<NodeId>>,
    /// Nodes the trap caught, for the driver to crash.
    trapped: Mutex<Vec<NodeId>>,
}

impl Shared {
    fn cluster_node(&self, id: NodeId) -> ClusterNode {
        let addr = self.nodes.lock().expect("nodes")[(id.0 - 1) as usize].1;
        ClusterNode {
            name: format!("n{}", id.0),
            addr: addr.to_string(),
        }
    }

    /// Queues a membership change for the admin workers.
    fn queue_change(&self, change: MembershipChange) {
        self.admin.lock().expect("admin").push_back((change, 0));
    }

    fn next_op(&self, node: NodeId) -> (Op, Duration) {
        let mut rng = self.ops.lock().expect("ops rng");
        let key = format!("k{}", rng.gen_range(0..self.keys));
        let value = format!("v{}-{}", node.0, rng.gen::<u32>());
        let op = match rng.gen_range(0..10) {
            0..=1 => Op::Create(key, value),
            2..=3 => Op::Update(key, value),
            4 => Op::Delete(key),
            _ => Op::Read(key),
        };
        (op, Duration::from_millis(rng.gen_range(5..80)))
    }
}

fn site(name: &str, description: &str) -> AnyEntity {
    AnyEntity::Site(Site {
        name: Name::new(name).expect("valid key"),
        description: description.to_owned(),
        revision: 0,
    })
}

/// What a client sees of a registry reply.
fn out_of(reply: &Result<Outcome, RegistryError>) -> Out {
    match reply {
        Ok(Outcome::Entity(_) | Outcome::Deleted { .. } | Outcome::Done) => Out::Ok,
        Err(RegistryError::AlreadyExists { .. }) => Out::Exists,
        Err(RegistryError::NotFound { .. }) => Out::NotFound,
        other => panic!("unexpected registry reply {other:?}"),
    }
}

/// Runs one operation against a node's cluster handle; writes carry request id `id`.
async fn execute(cluster: &Cluster, op: &Op, id: RequestId) -> Out {
    let command = match op {
        Op::Read(k) => {
            return match cluster.read().await {
                Ok(reg) => Out::Value(
                    reg.sites()
                        .get(&Name::new(k.as_str()).expect("key"))
                        .map(|s| s.description.clone()),
                ),
                Err(_) => Out::Failed,
            }
        }
        Op::Create(k, v) => Command::Create(site(k, v)),
        Op::Update(k, v) => Command::Update(site(k, v)),
        Op::Delete(k) => Command::Delete {
            kind: Kind::Site,
            name: Name::new(k.as_str()).expect("key"),
            revision: 0,
        },
    };
    let request = Request {
        id,
        ..Request::new(Actor::System, command)
    };
    match cluster.write(request).await {
        Ok(reply) => out_of(&reply),
        // Whether a write that got no answer happened is unknown: it may commit later.
        Err(
            ClusterError::NoLeader(_)
            | ClusterError::Timeout { .. }
            | ClusterError::ShuttingDown
            | ClusterError::Stopped(_),
        ) => Out::Unknown,
        Err(ClusterError::Membership(e)) => panic!("a write failed as a membership change: {e}"),
        // Every simulated node is one build, and its writes are all of format 1.
        Err(ClusterError::Unsupported(lag)) => panic!("a format-1 write was refused: {lag}"),
    }
}

async fn client_worker(shared: Arc<Shared>, cluster: Cluster, node: NodeId) {
    loop {
        let (op, think) = shared.next_op(node);
        tokio::time::sleep(think).await;
        if shared.clients_stop.load(Ordering::SeqCst) {
            return;
        }
        let request = RequestId::random();
        let id = shared
            .history
            .invoke(node.0, op.clone(), (!op.is_read()).then_some(request.0));
        let out = execute(&cluster, &op, request).await;
        shared.history.complete(id, out);
    }
}

/// Carries out queued membership changes, one at a time cluster-wide and in order, as an
/// operator would: a change that fails (another change in progress, no leader) is retried.
async fn admin_worker(shared: Arc<Shared>, cluster: Cluster, node: NodeId) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (change, attempt) = {
            let mut holder = shared.admin_holder.lock().expect("admin holder");
            if holder.is_some() {
                continue;
            }
            let Some(next) = shared.admin.lock().expect("admin").pop_front() else {
                continue;
            };
            *holder = Some((node, next.clone()));
            next
        };
        let result = admin_change(&shared, &cluster, &change).await;
        shared.admin_log.lock().expect("admin log").push(format!(
            "via n{} (attempt {attempt}): {change:?} -> {result:?}",
            node.0
        ));
        if result.is_err() && attempt < 30 {
            shared
                .admin
                .lock()
                .expect("admin")
                .push_front((change, attempt + 1));
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        *shared.admin_holder.lock().expect("admin holder") = None;
    }
}

async fn admin_change(
    shared: &Shared,
    cluster: &Cluster,
    change: &MembershipChange,
) -> Result<(), ClusterError> {
    let MembershipChange::Promote(id) = change else {
        return cluster.change_membership(change.clone()).await;
    };
    // "Make it a voter again", as an operator would after the node came back: only the
    // steps still missing. This node's view must be current first: a removed node still
    // believes in the membership it last saw.
    cluster.barrier().await?;
    let membership = cluster
        .raft()
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone();
    if membership.voter_ids().any(|v| v == *id) {
        return Ok(());
    }
    if !membership.learner_ids().any(|l| l == *id) {
        cluster
            .change_membership(MembershipChange::AddLearner(*id, shared.cluster_node(*id)))
            .await?;
    }
    cluster.change_membership(change.clone()).await
}

/// The node's RPC handler, with a trap: a node armed for it stops (is crashed by the
/// driver before it answers) right after it has installed a snapshot, so the leader never
/// hears that the install happened and the node restarts from what the install wrote.
struct SnapshotTrap {
    cluster: Cluster,
    shared: Arc<Shared>,
    id: NodeId,
}

impl RpcHandler for SnapshotTrap {
    fn handle(&self, from: pki::NodeCert, rpc: Rpc) -> BoxFuture<'_, RpcReply> {
        Box::pin(async move {
            let snapshot = matches!(rpc, Rpc::Snapshot { .. });
            let reply = self.cluster.handle(from, rpc).await;
            if snapshot
                && self
                    .shared
                    .snapshot_trap
                    .lock()
                    .expect("trap")
                    .remove(&self.id)
            {
                self.shared.trapped.lock().expect("trapped").push(self.id);
                // The driver crashes this node at the end of the step; the ack never leaves.
                std::future::pending::<()>().await;
            }
            reply
        })
    }
}

fn open_db(path: PathBuf) -> Result<Store, warren_consensus::storage::OpenError> {
    // After a crash the previous incarnation's storage threads may hold the lock a moment.
    let mut last = None;
    for _ in 0..200 {
        match Store::open(&path) {
            Ok(db) => return Ok(db),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(last.expect("tried"))
}

async fn node_main(shared: Arc<Shared>, index: usize) -> turmoil::Result {
    let id = NodeId(index as u64 + 1);
    let dir = shared.dir.join(format!("n{}", id.0));
    let log_db = open_db(dir.join("log"))?;
    let state_db = open_db(dir.join("state"))?;
    let socket = SimUdp::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT)).await?;
    let identity = &shared.identities[index];
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(pki::quic_server_config(&shared.ca, identity)?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let transport = Arc::new(QuicTransport::new(
        endpoint.clone(),
        pki::quic_client_config(&shared.ca, identity)?,
        shared.cluster_id,
    ));
    let cluster = Cluster::start(id, &log_db, &state_db, transport, shared.config.clone()).await?;
    if index == 0 && !cluster.raft().is_initialized().await? {
        let voters: BTreeMap<NodeId, ClusterNode> = (1..=shared.voters as u64)
            .map(|v| (NodeId(v), shared.cluster_node(NodeId(v))))
            .collect();
        cluster.initialize_with(voters).await?;
    }
    let handler: Arc<dyn RpcHandler> = Arc::new(SnapshotTrap {
        cluster: cluster.clone(),
        shared: shared.clone(),
        id,
    });
    tokio::spawn(warren_consensus::quic::accept_loop(
        endpoint,
        shared.cluster_id,
        handler,
        Vec::new(),
    ));
    shared
        .live
        .lock()
        .expect("live")
        .insert(id, cluster.clone());
    for _ in 0..shared.workers_per_node {
        tokio::spawn(client_worker(shared.clone(), cluster.clone(), id));
    }
    tokio::spawn(admin_worker(shared.clone(), cluster.clone(), id));
    std::future::pending::<()>().await;
    Ok(())
}

/// Raft safety state carried across steps.
#[derive(Default)]
struct Invariants {
    leader_of_term: BTreeMap<u64, NodeId>,
    digest_at: BTreeMap<u64, (u64, NodeId)>,
    /// Committed entries: index -> (term, contents hash, where first seen, highest term any
    /// node had when it was first seen). The entry was committed in a term no higher than
    /// that, so every leader of a later term must hold it (Raft's leader completeness).
    committed: BTreeMap<u64, (u64, u64, NodeId, u64)>,
    violations: Vec<String>,
    /// Violations already reported: a broken invariant stays broken for many steps.
    reported: BTreeSet<String>,
}

fn payload_hash(e: &warren_consensus::types::Entry) -> u64 {
    let bytes = encode("entry", &e.payload).unwrap_or_default();
    // FNV-1a: stable and dependency-free.
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl Invariants {
    fn flag(&mut self, violation: String) {
        if self.reported.insert(violation.clone()) {
            self.violations.push(violation);
        }
    }

    /// Cheap checks, after every step: one leader per term; replicas at the same applied
    /// index applied the same sequence.
    fn step(&mut self, live: &BTreeMap<NodeId, Cluster>) {
        for (id, c) in live {
            let (state, term) = {
                let m = c.raft().metrics();
                let m = m.borrow();
                (m.state, m.current_term)
            };
            if state == ServerState::Leader {
                let prev = *self.leader_of_term.entry(term).or_insert(*id);
                if prev != *id {
                    self.flag(format!(
                        "two leaders in term {term}: n{} and n{}",
                        prev.0, id.0
                    ));
                }
            }
            let reg = c.registry();
            if let Some(applied) = reg.last_applied() {
                let (digest, first) = *self
                    .digest_at
                    .entry(applied.index)
                    .or_insert((reg.digest(), *id));
                if digest != reg.digest() {
                    self.flag(format!(
                        "state machines diverged: at index {} n{} and n{} applied different sequences",
                        applied.index, first.0, id.0
                    ));
                }
            }
        }
    }

    /// Log checks, every so often: committed entries never change or disappear from a
    /// leader's log; two logs that agree on an entry's term agree on its contents.
    fn logs(&mut self, live: &BTreeMap<NodeId, Cluster>) {
        let mut logs: BTreeMap<NodeId, BTreeMap<u64, (u64, u64)>> = BTreeMap::new();
        let highest_term = live
            .values()
            .map(|c| c.raft().metrics().borrow().current_term)
            .max()
            .unwrap_or(0);
        for (id, c) in live {
            let m = c.raft().metrics().borrow().clone();
            let from = m.purged.map_or(0, |p| p.index + 1);
            let to = m.last_log_index.map_or(0, |l| l + 1);
            let Ok(entries) = c.log_entries(from..to) else {
                continue;
            };
            let log: BTreeMap<u64, (u64, u64)> = entries
                .iter()
                .map(|e| (e.log_id.index, (e.log_id.leader_id.term, payload_hash(e))))
                .collect();
            let applied = m.last_applied.map_or(0, |a| a.index);
            for (index, (term, hash)) in log.range(..=applied) {
                let (t, h, first, _) =
                    *self
                        .committed
                        .entry(*index)
                        .or_insert((*term, *hash, *id, highest_term));
                if (t, h) != (*term, *hash) {
                    self.flag(format!(
                        "committed entry {index} differs: n{} has term {t}, n{} has term {term} (or other contents)",
                        first.0, id.0
                    ));
                }
            }
            if m.state == ServerState::Leader {
                let mut lacking = Vec::new();
                for (index, (t, h, first, seen_in)) in self.committed.range(from..) {
                    if m.current_term <= *seen_in {
                        // Perhaps a deposed leader that has not noticed yet.
                        continue;
                    }
                    match log.get(index) {
                        Some((term, hash)) if (term, hash) == (t, h) => {}
                        _ => lacking.push(format!(
                            "leader n{} of term {} lacks committed entry {index} (seen on n{} by term {seen_in})",
                            id.0, m.current_term, first.0
                        )),
                    }
                }
                for v in lacking {
                    self.flag(v);
                }
            }
            logs.insert(*id, log);
        }
        let ids: Vec<NodeId> = logs.keys().copied().collect();
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                for (index, (term, hash)) in &logs[a] {
                    if let Some((t2, h2)) = logs[b].get(index) {
                        if term == t2 && hash != h2 {
                            self.flag(format!(
                                "log matching broken: n{} and n{} hold different entries {index} of term {term}",
                                a.0, b.0
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// When each write was first seen applied by some node, from the log.
#[derive(Default)]
struct Applied {
    scanned_to: u64,
    first_seen: HashMap<u128, u64>,
}

impl Applied {
    /// Reads the entries the most advanced node applied since the last look. Entries already
    /// compacted away are skipped: their writes stay "no answer" in the history.
    fn observe(&mut self, live: &BTreeMap<NodeId, Cluster>, history: &History) {
        let Some((c, applied)) = live
            .values()
            .filter_map(|c| c.registry().last_applied().map(|a| (c, a.index)))
            .max_by_key(|(_, a)| *a)
        else {
            return;
        };
        if applied <= self.scanned_to {
            return;
        }
        let purged = c
            .raft()
            .metrics()
            .borrow()
            .purged
            .map_or(0, |p| p.index + 1);
        let from = (self.scanned_to + 1).max(purged);
        if let Ok(entries) = c.log_entries(from..applied + 1) {
            let now = history.tick();
            for e in entries {
                if let openraft::EntryPayload::Normal(Proposal(reqs)) = &e.payload {
                    for r in reqs {
                        self.first_seen.entry(r.id.0).or_insert(now);
                    }
                }
            }
            self.scanned_to = applied;
        }
    }

    /// Settles what can be known about writes that got no answer, and checks the answers
    /// writes did get against what the log applied. A write applied at all was applied
    /// between its invocation and the moment it was first seen applied, with the reply the
    /// registry remembers; a write the registry never applied (and would remember if it had)
    /// has had no effect so far, which is the same as taking effect after everything else:
    /// it is left out.
    fn settle(
        &self,
        records: Vec<Record>,
        live: &BTreeMap<NodeId, Cluster>,
        violations: &mut Vec<String>,
    ) -> Vec<Record> {
        let Some(reg) = live
            .values()
            .map(|c| c.registry())
            .max_by_key(|r| r.last_applied().map(|a| a.index))
        else {
            return records;
        };
        let complete = reg.remembers_every_write();
        records
            .into_iter()
            .filter_map(|mut r| {
                let Some(id) = r.request else { return Some(r) };
                let reply = reg.remembered_reply(RequestId(id)).map(out_of);
                match (&r.completed, reply) {
                    (Some((_, out)), Some(applied)) if *out != Out::Unknown && *out != applied => {
                        violations.push(format!(
                            "{r} was answered {out:?}, but the log applied it as {applied:?}"
                        ));
                    }
                    (Some((_, out)), None) if *out != Out::Unknown && complete => {
                        violations.push(format!(
                            "{r} was answered {out:?}, but the log never applied it"
                        ));
                    }
                    (Some((_, Out::Unknown)) | None, Some(applied)) => {
                        if let Some(t) = self.first_seen.get(&id) {
                            r.completed = Some((*t, applied));
                        }
                    }
                    (Some((_, Out::Unknown)) | None, None) if complete => return None,
                    _ => {}
                }
                Some(r)
            })
            .collect()
    }
}

/// One scheduled fault and how it ends.
#[derive(Debug, Clone)]
enum Fault {
    Crash(usize),
    /// Crash the leader while it has entries appended but not yet applied.
    CrashLeaderMidWrite,
    /// Crash a node long enough for the log it needs to be compacted away, then crash it
    /// again right after it installed the snapshot it gets instead.
    CrashInSnapshotInstall(usize),
    Partition(Vec<usize>, Vec<usize>),
    IsolateLeader,
    LeaderDeaf,
    Loss(f64),
    Delay(u64),
    RemoveAndReadd(usize),
    /// Cut the power of several nodes at once, the first moment (within 3 s) a write has
    /// just been answered (see `outage_targets`).
    PowerCut(Outage),
}

/// Which nodes a power cut takes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// The leader and just enough of the voters holding what it applied for a quorum.
    Quorum,
    /// Every node (a rack).
    Rack,
}

/// How a node went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Its process died; the files keep everything it wrote.
    Process,
    /// Its machine lost power; the log loses what it had not synced.
    Power,
}

/// Runs one simulation. Returns the report; `report.violations` is empty when it passed.
pub fn run(cfg: &SimConfig) -> anyhow::Result<Report> {
    let total = cfg.voters + cfg.learners;
    let work = tempfile::Builder::new().prefix("warren-sim-").tempdir()?;
    let cluster_id = u128::from(cfg.seed) + 1;
    let ca = ClusterCa::generate(cluster_id)?;
    let mut identities = Vec::new();
    for i in 1..=total {
        let (key, csr) = pki::node_key_and_csr(&format!("n{i}"))?;
        // Every node is voter-grade: the simulation promotes its learners.
        let who = pki::NodeCert {
            cluster_id,
            id: NodeId(i as u64),
            role: warren_proto::registry::NodeRole::Voter,
        };
        let cert = ca
            .sign_node(&csr, who, &format!("n{i}"), &[])?
            .expect("fresh CA has its key");
        identities.push(NodeIdentity::from_pem(&cert, &key, &ca)?);
    }
    let config = ClusterConfig {
        snapshot_writes: 20,
        request_timeout: Duration::from_secs(3),
        membership_timeout: Duration::from_secs(10),
        planted_bug: cfg.planted_bug,
        storage_io: StorageIo::Inline,
        ..ClusterConfig::default()
    };
    let shared = Arc::new(Shared {
        dir: work.path().to_path_buf(),
        cluster_id,
        ca,
        identities,
        nodes: Mutex::new(Vec::new()),
        voters: cfg.voters,
        config,
        live: Mutex::new(BTreeMap::new()),
        history: History::default(),
        ops: Mutex::new(StdRng::seed_from_u64(cfg.seed ^ 0x5eed)),
        keys: cfg.keys,
        clients_stop: AtomicBool::new(false),
        admin: Mutex::new(VecDeque::new()),
        admin_holder: Mutex::new(None),
        admin_log: Mutex::new(Vec::new()),
        workers_per_node: cfg.workers_per_node,
        snapshot_trap: Mutex::new(BTreeSet::new()),
        trapped: Mutex::new(Vec::new()),
    });

    let mut sim = turmoil::Builder::new()
        .rng_seed(cfg.seed)
        .tick_duration(Duration::from_millis(1))
        .simulation_duration(Duration::from_secs(24 * 3600))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(5))
        .build();
    let names: Vec<String> = (1..=total).map(|i| format!("n{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let shared = shared.clone();
        sim.host(name.as_str(), move || node_main(shared.clone(), i));
    }
    {
        let mut nodes = shared.nodes.lock().expect("nodes");
        for (i, name) in names.iter().enumerate() {
            nodes.push((
                NodeId(i as u64 + 1),
                SocketAddr::new(sim.lookup(name.as_str()), PORT),
            ));
        }
    }

    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut report = Report::default();
    let mut inv = Invariants::default();
    let ms = |s: u64| s * 1000;

    // Learners join once the cluster is up.
    let learners_at = 1500u64;
    // Fault schedule: a fault every 1.5–4 s of the fault phase, each healed 0.5–5 s later.
    let mut schedule: BTreeMap<u64, Vec<Fault>> = BTreeMap::new();
    let mut heal_at: BTreeMap<u64, Vec<Fault>> = BTreeMap::new();
    let mut t = 3000u64;
    while t < ms(cfg.fault_seconds) {
        let mut kinds = Vec::new();
        if cfg.faults.crashes {
            kinds.extend([0, 7, 8]);
        }
        if cfg.faults.partitions {
            kinds.extend([1, 2, 3]);
        }
        if cfg.faults.lossy_links {
            kinds.extend([4, 5]);
        }
        if cfg.faults.membership {
            kinds.push(6);
        }
        if cfg.faults.power_loss {
            kinds.extend([9, 10]);
        }
        if kinds.is_empty() {
            break;
        }
        let fault = match kinds[rng.gen_range(0..kinds.len())] {
            0 => Fault::Crash(rng.gen_range(0..total)),
            7 => Fault::CrashLeaderMidWrite,
            8 => Fault::CrashInSnapshotInstall(rng.gen_range(0..total)),
            1 => {
                // Majority / minority split of the voters; learners fall on either side.
                let mut all: Vec<usize> = (0..total).collect();
                all.shuffle(&mut rng);
                let cut = rng.gen_range(1..=total / 2);
                let (a, b) = all.split_at(cut);
                Fault::Partition(a.to_vec(), b.to_vec())
            }
            2 => Fault::IsolateLeader,
            3 => Fault::LeaderDeaf,
            4 => Fault::Loss(rng.gen_range(0.02..0.2)),
            5 => Fault::Delay(rng.gen_range(20..150)),
            6 => Fault::RemoveAndReadd(rng.gen_range(0..cfg.voters)),
            9 => Fault::PowerCut(Outage::Quorum),
            _ => Fault::PowerCut(Outage::Rack),
        };
        // A node that is to need a snapshot stays down until the log it needs is gone.
        let down = if matches!(fault, Fault::CrashInSnapshotInstall(_)) {
            5000..8000
        } else {
            500..5000
        };
        schedule.entry(t).or_default().push(fault.clone());
        heal_at
            .entry(t + rng.gen_range(down))
            .or_default()
            .push(fault);
        t += rng.gen_range(1500..4000);
    }

    // Nodes that are down, and how they went down.
    let mut crashed: BTreeMap<usize, Stop> = BTreeMap::new();
    let power_loss = cfg.faults.power_loss;
    let stop_of = |rng: &mut StdRng| {
        if power_loss && rng.gen_bool(0.5) {
            Stop::Power
        } else {
            Stop::Process
        }
    };
    let mut links = Links {
        names: &names,
        cut: Vec::new(),
    };
    let leader_index = |shared: &Shared| -> Option<usize> {
        let live = shared.live.lock().expect("live");
        live.iter()
            .find(|(_, c)| c.raft().metrics().borrow().state == ServerState::Leader)
            .map(|(id, _)| (id.0 - 1) as usize)
    };

    let fault_end = ms(cfg.fault_seconds);
    let mut step: u64 = 0;
    let mut healed_at: Option<u64> = None;
    let mut probe: Option<u64> = None;
    let mut stopped_at: Option<u64> = None;
    let mut leader_crash_until: Option<(u64, Stop)> = None;
    let mut power_cut: Option<(u64, Outage)> = None;
    let mut answered_writes = 0;
    let mut applied = Applied::default();
    loop {
        sim.step()
            .map_err(|e| anyhow::anyhow!("simulation step failed: {e}"))?;
        step += 1;
        {
            let live = shared.live.lock().expect("live");
            inv.step(&live);
            applied.observe(&live, &shared.history);
            if step.is_multiple_of(250) {
                inv.logs(&live);
            }
        }
        if step == learners_at {
            for l in cfg.voters..total {
                let id = NodeId(l as u64 + 1);
                shared.queue_change(MembershipChange::AddLearner(id, shared.cluster_node(id)));
            }
        }
        let trapped: Vec<NodeId> = std::mem::take(&mut *shared.trapped.lock().expect("trapped"));
        for id in trapped {
            let i = (id.0 - 1) as usize;
            if !crashed.contains_key(&i) {
                let stop = stop_of(&mut rng);
                crash(&mut sim, &shared, &names, &mut crashed, i, stop);
                report.snapshot_install_crashes += 1;
                report.faults.push(format!(
                    "{step} ms: {} right after it installed a snapshot, before its ack",
                    stop.describe(i)
                ));
                heal_at
                    .entry(step + rng.gen_range(300..2000))
                    .or_default()
                    .push(Fault::Crash(i));
            }
        }
        let answered = shared.history.answered_writes();
        let fresh = answered > answered_writes;
        answered_writes = answered;
        if let Some((until, outage)) = power_cut {
            let late = step >= until;
            let targets = outage_targets(&shared.live.lock().expect("live"), outage, fresh, late);
            if let Some((leader, mut nodes)) = targets {
                if outage == Outage::Rack {
                    // Nodes starting up (not serving yet) lose power too.
                    nodes = (0..total).filter(|i| !crashed.contains_key(i)).collect();
                }
                for &i in &nodes {
                    crash(&mut sim, &shared, &names, &mut crashed, i, Stop::Power);
                }
                // The others come back first and have time to elect a leader among
                // themselves: whatever they acknowledged must be in what they kept, even
                // if the old leader's log holds more.
                let back = (step + rng.gen_range(500..5000)).min(fault_end.saturating_sub(2600));
                for &i in &nodes {
                    let at = if Some(i) == leader {
                        back + rng.gen_range(1500..2500)
                    } else {
                        back + rng.gen_range(0..300)
                    };
                    heal_at.entry(at).or_default().push(Fault::Crash(i));
                }
                report.faults.push(format!(
                    "{step} ms: power cut ({}) of {:?}{}{}",
                    match outage {
                        Outage::Quorum => "the leader and a quorum",
                        Outage::Rack => "the rack",
                    },
                    plus1(&nodes),
                    if late {
                        ""
                    } else {
                        ", right after a write was answered"
                    },
                    leader.map_or_else(String::new, |l| format!("; leader n{} back last", l + 1))
                ));
                power_cut = None;
            } else if late {
                power_cut = None;
            }
        }
        if let Some((until, stop)) = leader_crash_until {
            // The leader, caught with entries appended but not applied yet.
            let target = {
                let live = shared.live.lock().expect("live");
                live.iter()
                    .find(|(_, c)| {
                        let m = c.raft().metrics();
                        let m = m.borrow();
                        m.state == ServerState::Leader
                            && (step >= until || m.last_log_index > m.last_applied.map(|a| a.index))
                    })
                    .map(|(id, _)| (id.0 - 1) as usize)
            };
            if let Some(l) = target {
                crash(&mut sim, &shared, &names, &mut crashed, l, stop);
                report.faults.push(format!(
                    "{step} ms: {} (the leader) mid-write",
                    stop.describe(l)
                ));
                heal_at
                    .entry(step + rng.gen_range(500..5000))
                    .or_default()
                    .push(Fault::Crash(l));
                leader_crash_until = None;
            } else if step >= until {
                leader_crash_until = None;
            }
        }
        if let Some(faults) = schedule.remove(&step) {
            for f in faults {
                let fired = match f {
                    Fault::Crash(i) if !crashed.contains_key(&i) => {
                        let stop = stop_of(&mut rng);
                        crash(&mut sim, &shared, &names, &mut crashed, i, stop);
                        format!("{step} ms: {}", stop.describe(i))
                    }
                    Fault::CrashLeaderMidWrite => {
                        leader_crash_until = Some((step + 1000, stop_of(&mut rng)));
                        continue;
                    }
                    Fault::PowerCut(outage) => {
                        // Its nodes come back, the old leader last, before everything
                        // heals (and restarts at once).
                        let until = (step + 3000).min(fault_end.saturating_sub(3100));
                        if until > step {
                            power_cut = Some((until, outage));
                        }
                        continue;
                    }
                    Fault::CrashInSnapshotInstall(i) if !crashed.contains_key(&i) => {
                        let stop = stop_of(&mut rng);
                        crash(&mut sim, &shared, &names, &mut crashed, i, stop);
                        shared
                            .snapshot_trap
                            .lock()
                            .expect("trap")
                            .insert(NodeId(i as u64 + 1));
                        format!("{step} ms: {} until it needs a snapshot", stop.describe(i))
                    }
                    Fault::IsolateLeader | Fault::LeaderDeaf => {
                        let Some(l) = leader_index(&shared) else {
                            continue;
                        };
                        let others: Vec<usize> = (0..total).filter(|o| *o != l).collect();
                        if matches!(f, Fault::IsolateLeader) {
                            links.cut(&mut sim, &[l], &others, false);
                            format!("{step} ms: isolate leader n{}", l + 1)
                        } else {
                            links.cut(&mut sim, &others, &[l], true);
                            format!("{step} ms: leader n{} hears nobody (one-way)", l + 1)
                        }
                    }
                    Fault::Partition(a, b) => {
                        links.cut(&mut sim, &a, &b, false);
                        format!("{step} ms: partition {:?} | {:?}", plus1(&a), plus1(&b))
                    }
                    Fault::Loss(p) => {
                        links.set_loss(&mut sim, p);
                        format!("{step} ms: links drop messages at {:.0}%", p * 100.0)
                    }
                    Fault::Delay(d) => {
                        sim.set_max_message_latency(Duration::from_millis(d));
                        format!("{step} ms: messages delayed up to {d} ms")
                    }
                    Fault::RemoveAndReadd(v) => {
                        let id = NodeId(v as u64 + 1);
                        shared.queue_change(MembershipChange::Remove(id));
                        format!("{step} ms: remove voter n{}", v + 1)
                    }
                    Fault::Crash(_) | Fault::CrashInSnapshotInstall(_) => continue,
                };
                report.faults.push(fired);
            }
        }
        if let Some(faults) = heal_at.remove(&step) {
            for f in faults {
                match f {
                    Fault::Crash(i) | Fault::CrashInSnapshotInstall(i) => {
                        if let Some(stop) = crashed.remove(&i) {
                            restart(&mut sim, &shared, &names, i, stop, step, &mut report)?;
                        }
                    }
                    Fault::Loss(_) => links.set_loss(&mut sim, 0.0),
                    Fault::Delay(_) => sim.set_max_message_latency(Duration::from_millis(5)),
                    // Their nodes come back as `Crash` faults scheduled when they fired.
                    Fault::CrashLeaderMidWrite | Fault::PowerCut(_) => {}
                    Fault::RemoveAndReadd(v) => {
                        let id = NodeId(v as u64 + 1);
                        shared.queue_change(MembershipChange::Promote(id));
                        report
                            .faults
                            .push(format!("{step} ms: make n{} a voter again", v + 1));
                    }
                    Fault::IsolateLeader | Fault::LeaderDeaf | Fault::Partition(..) => {
                        links.repair_all(&mut sim);
                    }
                }
            }
        }
        if step == fault_end {
            // Heal everything: the liveness phase starts.
            links.repair_all(&mut sim);
            links.set_loss(&mut sim, 0.0);
            sim.set_max_message_latency(Duration::from_millis(5));
            for (i, stop) in std::mem::take(&mut crashed) {
                restart(&mut sim, &shared, &names, i, stop, step, &mut report)?;
            }
            heal_at.clear();
            schedule.clear();
            leader_crash_until = None;
            power_cut = None;
            shared.snapshot_trap.lock().expect("trap").clear();
            // Every voter back in the membership.
            for v in 0..cfg.voters {
                let id = NodeId(v as u64 + 1);
                shared.queue_change(MembershipChange::Promote(id));
            }
            report.faults.push(format!("{step} ms: heal everything"));
            healed_at = Some(step);
        }
        if let Some(h) = healed_at {
            // Liveness, in two parts. Progress: a write invoked a second after healing gets
            // an answer. Then, with the clients stopped, every node converges on the same
            // applied index and digest.
            if probe.is_none() && step == h + 1000 {
                probe = Some(shared.history.now());
            }
            if let Some(p) = probe {
                if stopped_at.is_none() && shared.history.answered_write_since(p) {
                    shared.clients_stop.store(true, Ordering::SeqCst);
                    stopped_at = Some(step);
                }
            }
            if stopped_at.is_some() {
                let live = shared.live.lock().expect("live");
                let states: BTreeSet<(Option<u64>, u64)> = live
                    .values()
                    .map(|c| {
                        let reg = c.registry();
                        (reg.last_applied().map(|l| l.index), reg.digest())
                    })
                    .collect();
                if live.len() == total && states.len() == 1 {
                    break;
                }
            }
            if step > h + ms(cfg.liveness_seconds) {
                let nodes: Vec<String> = shared
                    .live
                    .lock()
                    .expect("live")
                    .iter()
                    .map(|(id, c)| {
                        let m = c.raft().metrics().borrow().clone();
                        let voters: Vec<u64> = m.membership_config.membership().voter_ids().map(|v| v.0).collect();
                        let learners: Vec<u64> = m.membership_config.membership().learner_ids().map(|v| v.0).collect();
                        format!(
                            "n{}: {:?} term {} leader {:?} last log {:?} applied {:?} digest {:016x} sees voters {voters:?} learners {learners:?}",
                            id.0,
                            m.state,
                            m.current_term,
                            m.current_leader.map(|l| l.0),
                            m.last_log_index,
                            m.last_applied.map(|l| l.index),
                            c.registry().digest()
                        )
                    })
                    .collect();
                report.violations.push(format!(
                    "{}: {} s after every fault healed; nodes: {}",
                    if stopped_at.is_none() {
                        "no progress (no new write answered)"
                    } else {
                        "no convergence"
                    },
                    cfg.liveness_seconds,
                    nodes.join("; ")
                ));
                break;
            }
        }
    }
    shared.clients_stop.store(true, Ordering::SeqCst);
    // Let operations in flight finish (or time out) before judging the history.
    for _ in 0..(shared.config.request_timeout.as_millis() as u64 + 500) {
        sim.step()
            .map_err(|e| anyhow::anyhow!("simulation step failed: {e}"))?;
        step += 1;
        let live = shared.live.lock().expect("live");
        inv.step(&live);
        applied.observe(&live, &shared.history);
    }
    inv.logs(&shared.live.lock().expect("live"));

    let answered = |records: &[Record]| {
        records
            .iter()
            .filter(|r| matches!(r.completed, Some((_, ref o)) if *o != Out::Unknown))
            .count()
    };
    let mut records = shared.history.records();
    report.steps = step;
    report.ops = records.len();
    report.completed = answered(&records);
    // Only a converged cluster's registry tells which unanswered writes were applied.
    if report.violations.is_empty() {
        records = applied.settle(
            records,
            &shared.live.lock().expect("live"),
            &mut report.violations,
        );
        report.unanswered_settled =
            answered(&records) + (report.ops - records.len()) - report.completed;
    }
    report.terms_with_leader = inv.leader_of_term.len();
    report.violations.append(&mut inv.violations);
    if let Err(v) = checker::check(&records) {
        report.violations.push(v.to_string());
    }
    report.membership = shared.admin_log.lock().expect("admin log").clone();
    drop(sim);
    shared.live.lock().expect("live").clear();
    Ok(report)
}

/// The simulated links between the hosts, and which of them a partition has cut.
struct Links<'a> {
    names: &'a [String],
    /// Cut (from, to) pairs; both directions unless the cut was one-way.
    cut: Vec<(usize, usize)>,
}

impl Links<'_> {
    /// Cuts every link between a host in `a` and one in `b`; `one_way` cuts only the
    /// direction from `a` to `b`.
    fn cut(&mut self, sim: &mut turmoil::Sim<'_>, a: &[usize], b: &[usize], one_way: bool) {
        for &x in a {
            for &y in b {
                let (from, to) = (self.names[x].as_str(), self.names[y].as_str());
                if one_way {
                    sim.partition_oneway(from, to);
                } else {
                    sim.partition(from, to);
                }
                self.cut.push((x, y));
            }
        }
    }

    /// Repairs every cut link. Overlapping partitions heal together.
    fn repair_all(&mut self, sim: &mut turmoil::Sim<'_>) {
        for (a, b) in self.cut.drain(..) {
            sim.repair(self.names[a].as_str(), self.names[b].as_str());
        }
    }

    /// Makes every link drop messages with probability `p`.
    fn set_loss(&self, sim: &mut turmoil::Sim<'_>, p: f64) {
        for (i, a) in self.names.iter().enumerate() {
            for b in &self.names[i + 1..] {
                sim.set_link_fail_rate(a.as_str(), b.as_str(), p);
            }
        }
    }
}

/// Crashes node `i`: its process state is gone, its data dir stays (with what a power
/// loss takes from it taken when it restarts: see [`restart`]).
fn crash(
    sim: &mut turmoil::Sim<'_>,
    shared: &Shared,
    names: &[String],
    crashed: &mut BTreeMap<usize, Stop>,
    i: usize,
    stop: Stop,
) {
    // Let go of the driver's handle first: the node's last references must drop inside
    // turmoil's world, or its UDP port stays bound.
    let id = NodeId(i as u64 + 1);
    drop(shared.live.lock().expect("live").remove(&id));
    sim.crash(names[i].as_str());
    // A membership change it was carrying out goes back in the queue.
    let mut holder = shared.admin_holder.lock().expect("admin holder");
    if holder.as_ref().is_some_and(|(n, _)| *n == id) {
        let (_, op) = holder.take().expect("checked");
        shared.admin.lock().expect("admin").push_front(op);
    }
    crashed.insert(i, stop);
}

/// Restarts node `i`, which went down as `stop` says: after a power loss its log first
/// loses what it had not synced (the host's tasks, and with them its stores, are gone).
fn restart(
    sim: &mut turmoil::Sim<'_>,
    shared: &Shared,
    names: &[String],
    i: usize,
    stop: Stop,
    step: u64,
    report: &mut Report,
) -> anyhow::Result<()> {
    let what = match stop {
        Stop::Process => String::new(),
        Stop::Power => {
            let (lost, kept) =
                lose_unsynced_tail(&shared.dir.join(format!("n{}", i + 1)).join("log"))
                    .with_context(|| format!("power loss on n{}", i + 1))?;
            report.power_losses += 1;
            report.entries_lost_to_power_loss += lost;
            let end = kept.map_or_else(|| "is empty".to_owned(), |k| format!("ends at {k}"));
            format!(" after power loss: its log lost {lost} unsynced entries and {end}")
        }
    };
    sim.bounce(names[i].as_str());
    report
        .faults
        .push(format!("{step} ms: restart n{}{what}", i + 1));
    Ok(())
}

/// What a power cut does to a stopped node's log in `dir`: the entries after the last one
/// it synced (and recorded) are gone. Returns how many entries went and the last index
/// left.
fn lose_unsynced_tail(dir: &Path) -> anyhow::Result<(u64, Option<u64>)> {
    let store = open_db(dir.to_owned())?;
    // The log store's layout (see `warren_consensus::log_store`): tree `log`, big-endian
    // index keys. Read only to report what was lost.
    let log = store.db().open_tree("log")?;
    let before = log.len();
    warren_consensus::log_store::lose_unsynced_tail(&store)?;
    let last = log
        .last()?
        .and_then(|(k, _)| <[u8; 8]>::try_from(k.as_ref()).ok())
        .map(u64::from_be_bytes);
    Ok(((before - log.len()) as u64, last))
}

/// The nodes (indexes) a power cut takes down now, or `None` to wait for a better moment:
/// a write was answered in this step (`fresh`), and a quorum of the voters holds the entry
/// the leader applied last as its own last entry, none having received anything since.
/// That entry is then acknowledged, and it is what storage that reports entries durable
/// before it syncs them would lose. When `late` the cut happens whatever the moment (with
/// no leader, only a rack cut does). Returns the leader too, if there is one.
fn outage_targets(
    live: &BTreeMap<NodeId, Cluster>,
    outage: Outage,
    fresh: bool,
    late: bool,
) -> Option<(Option<usize>, Vec<usize>)> {
    let index = |id: &NodeId| (id.0 - 1) as usize;
    let leader = live.iter().find_map(|(id, c)| {
        let m = c.raft().metrics().borrow().clone();
        (m.state == ServerState::Leader).then_some((*id, m))
    });
    let Some((leader, m)) = leader else {
        return (late && outage == Outage::Rack).then(|| (None, live.keys().map(index).collect()));
    };
    if !late && !fresh {
        return None;
    }
    let applied = m.last_applied.map(|a| a.index);
    let membership = m.membership_config.membership();
    let voters = membership.voter_ids().count();
    let leader_votes = usize::from(membership.voter_ids().any(|v| v == leader));
    let need = (voters / 2 + 1).saturating_sub(leader_votes);
    // Followers whose last entry is the applied one first, then the most advanced.
    let mut followers: Vec<(bool, Option<u64>, NodeId)> = membership
        .voter_ids()
        .filter(|v| *v != leader)
        .filter_map(|v| {
            let last = live.get(&v)?.raft().metrics().borrow().last_log_index;
            Some((last == applied, last, v))
        })
        .collect();
    followers.sort_by(|a, b| b.cmp(a));
    let exposed = followers.iter().filter(|f| f.0).count();
    let ahead = followers.iter().any(|f| f.1 > applied);
    if !late && (ahead || exposed < need) {
        return None;
    }
    let nodes = match outage {
        Outage::Rack => live.keys().map(index).collect(),
        Outage::Quorum => std::iter::once(index(&leader))
            .chain(followers.iter().take(need).map(|f| index(&f.2)))
            .collect(),
    };
    Some((Some(index(&leader)), nodes))
}

impl Stop {
    /// How node `i` went down, for the fault list.
    fn describe(self, i: usize) -> String {
        match self {
            Stop::Process => format!("crash n{}", i + 1),
            Stop::Power => format!("power loss on n{}", i + 1),
        }
    }
}

fn plus1(v: &[usize]) -> Vec<usize> {
    v.iter().map(|i| i + 1).collect()
}
