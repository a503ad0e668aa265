//! Elections and leader contact in a three-node cluster: who stands, when, and what a node
//! says about its leader and its membership afterwards.
//!
//! Real `Cluster`s on real sled files in a temporary directory, wired by an in-memory
//! network ([`Mesh`]) that can cut links per kind of RPC. A cut link or a killed node gets
//! no answer until the caller's timeout, as a QUIC connection to a killed peer does.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use warren_consensus::cluster::{Cluster, ClusterConfig};
use warren_consensus::quic::RpcHandler;
use warren_consensus::registry::{AnyEntity, Command};
use warren_consensus::storage::Store;
use warren_consensus::transport::{
    BoxFuture, MembershipChange, Rpc, RpcReply, Transport, TransportError,
};
use warren_consensus::types::{Actor, ClusterNode, Request};
use warren_proto::registry::{NodeId, Site};
use warren_proto::Name;

/// Which RPCs a cut link loses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Lose {
    /// Replication and heartbeats only.
    AppendEntries,
    /// Everything.
    All,
}

/// The in-memory network between the nodes of one test.
#[derive(Default)]
struct Mesh {
    nodes: Mutex<BTreeMap<NodeId, Cluster>>,
    /// (from, to, what is lost).
    cuts: Mutex<HashSet<(NodeId, NodeId, Lose)>>,
    /// Nodes that answer nothing and send nothing (killed).
    down: Mutex<HashSet<NodeId>>,
}

impl Mesh {
    fn cut(&self, from: u64, to: u64, lose: Lose) {
        self.cuts
            .lock()
            .unwrap()
            .insert((NodeId(from), NodeId(to), lose));
    }

    fn heal(&self) {
        self.cuts.lock().unwrap().clear();
    }

    fn lost(&self, from: NodeId, to: NodeId, rpc: &Rpc) -> bool {
        let down = self.down.lock().unwrap();
        if down.contains(&from) || down.contains(&to) {
            return true;
        }
        let cuts = self.cuts.lock().unwrap();
        cuts.contains(&(from, to, Lose::All))
            || (matches!(rpc, Rpc::AppendEntries(_))
                && cuts.contains(&(from, to, Lose::AppendEntries)))
    }
}

/// One node's end of the mesh.
struct Link {
    mesh: Arc<Mesh>,
    from: NodeId,
}

impl Transport for Link {
    fn call<'a>(
        &'a self,
        target: NodeId,
        _node: &'a ClusterNode,
        rpc: Rpc,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<RpcReply, TransportError>> {
        Box::pin(async move {
            let to = self.mesh.nodes.lock().unwrap().get(&target).cloned();
            match to {
                Some(to) if !self.mesh.lost(self.from, target, &rpc) => tokio::time::timeout(
                    timeout,
                    to.handle(
                        warren_consensus::pki::NodeCert {
                            cluster_id: 1,
                            id: self.from,
                            role: warren_proto::registry::NodeRole::Voter,
                        },
                        rpc,
                    ),
                )
                .await
                .map_err(|_| TransportError::Timeout(timeout)),
                _ => {
                    tokio::time::sleep(timeout).await;
                    Err(TransportError::Timeout(timeout))
                }
            }
        })
    }
}

struct Three {
    mesh: Arc<Mesh>,
    _dir: tempfile::TempDir,
    _stores: Vec<Store>,
}

impl Three {
    async fn start(config: ClusterConfig) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let mesh = Arc::new(Mesh::default());
        let mut stores = Vec::new();
        let mut voters = BTreeMap::new();
        for i in 1..=3 {
            let id = NodeId(i);
            let log = Store::open(&dir.path().join(format!("n{i}/log"))).expect("log");
            let state = Store::open(&dir.path().join(format!("n{i}/state"))).expect("state");
            let link = Arc::new(Link {
                mesh: mesh.clone(),
                from: id,
            });
            let cluster = Cluster::start(id, &log, &state, link, config.clone())
                .await
                .expect("start");
            mesh.nodes.lock().unwrap().insert(id, cluster);
            stores.extend([log, state]);
            voters.insert(
                id,
                ClusterNode {
                    name: format!("n{i}"),
                    addr: format!("n{i}"),
                },
            );
        }
        Self::node_of(&mesh, 1)
            .initialize_with(voters)
            .await
            .expect("initialize");
        let three = Self {
            mesh,
            _dir: dir,
            _stores: stores,
        };
        three.wait_leader(None, Duration::from_secs(10)).await;
        three
    }

    fn node_of(mesh: &Mesh, i: u64) -> Cluster {
        mesh.nodes.lock().unwrap()[&NodeId(i)].clone()
    }

    fn node(&self, i: u64) -> Cluster {
        Self::node_of(&self.mesh, i)
    }

    /// The leader all running nodes agree on, other than `not`.
    async fn wait_leader(&self, not: Option<u64>, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let down = self.mesh.down.lock().unwrap().clone();
            let views: Vec<Option<NodeId>> = (1..=3)
                .filter(|i| !down.contains(&NodeId(*i)))
                .map(|i| self.node(i).leader())
                .collect();
            if let Some(Some(l)) = views.first() {
                if views.iter().all(|v| *v == Some(*l)) && Some(l.0) != not {
                    return l.0;
                }
            }
            assert!(Instant::now() < deadline, "no leader agreed on: {views:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn term(&self, i: u64) -> u64 {
        self.node(i).raft().metrics().borrow().current_term
    }

    async fn shutdown(&self) {
        for i in 1..=3 {
            self.node(i).shutdown().await;
        }
    }
}

fn site(name: &str) -> Request {
    Request::new(
        Actor::System,
        Command::Create(AnyEntity::Site(Site {
            name: Name::new(name).expect("name"),
            description: String::new(),
            revision: 0,
        })),
    )
}

fn others(of: u64) -> impl Iterator<Item = u64> {
    (1..=3).filter(move |i| *i != of)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_misses_heartbeats_its_peers_get_does_not_depose_the_leader() {
    let c = Three::start(ClusterConfig::default()).await;
    let leader = c.wait_leader(None, Duration::from_secs(10)).await;
    let deaf = others(leader).next().unwrap();
    let term = c.term(leader);

    // What a stalled process or a lossy link looks like from the follower: no heartbeats
    // for many election timeouts, while the other follower hears the leader.
    c.mesh.cut(leader, deaf, Lose::AppendEntries);
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.mesh.heal();
    tokio::time::sleep(Duration::from_secs(1)).await;

    assert_eq!(c.wait_leader(None, Duration::from_secs(5)).await, leader);
    assert_eq!(
        c.term(leader),
        term,
        "the leader was deposed: the follower that missed heartbeats stood for election"
    );
    assert_eq!(c.term(deaf), term, "the follower raised its term");
    c.node(deaf)
        .write(site("after"))
        .await
        .expect("write")
        .expect("applied");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_steps_down_still_counts_as_in_contact() {
    let config = ClusterConfig {
        leader_loss_bound: Duration::from_millis(1500),
        ..ClusterConfig::default()
    };
    let c = Three::start(config).await;
    let old = c.wait_leader(None, Duration::from_secs(10)).await;
    // Leading for longer than the bound: the contact it had before it led is stale.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(c.node(old).serving().is_ok());

    // Another node takes over, and its heartbeats do not reach the old leader, so only
    // what the old leader knew while it led says whether it is in contact.
    let new = others(old).next().unwrap();
    c.mesh.cut(new, old, Lose::AppendEntries);
    c.node(new).raft().trigger().elect().await.expect("elect");
    let mut metrics = c.node(old).raft().metrics();
    tokio::time::timeout(
        Duration::from_secs(5),
        metrics.wait_for(|m| m.state != openraft::ServerState::Leader),
    )
    .await
    .expect("the old leader stepped down")
    .expect("metrics");
    let serving = c.node(old).serving();
    assert!(
        serving.is_ok(),
        "the leader that just stepped down fails closed: {serving:?}"
    );
    c.mesh.heal();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_learns_it_from_its_peers_and_stops_standing() {
    let c = Three::start(ClusterConfig::default()).await;
    let leader = c.wait_leader(None, Duration::from_secs(10)).await;
    let victim = others(leader).next().unwrap();
    c.node(leader)
        .change_membership(MembershipChange::Remove(NodeId(victim)))
        .await
        .expect("remove");

    let deadline = Instant::now() + Duration::from_secs(10);
    let at = loop {
        if let Some(at) = c.node(victim).removed_at() {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "the removed node does not know: {:?}",
            c.node(victim).local_status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let why = c
        .node(victim)
        .serving()
        .expect_err("a removed node serves nothing");
    assert!(why.contains("removed from the cluster"), "{why}");
    assert!(why.contains(&format!("log index {at}")), "{why}");
    assert_eq!(c.node(victim).local_status().state, "removed");

    // It stands for no election: its term stays.
    let term = c.term(victim);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.term(victim), term);
    assert!(c.node(leader).serving().is_ok());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_forwarded_to_a_leader_that_dies_goes_to_the_next_one() {
    let c = Three::start(ClusterConfig::default()).await;
    let old = c.wait_leader(None, Duration::from_secs(10)).await;
    let through = others(old).next().unwrap();
    c.node(through)
        .write(site("before"))
        .await
        .expect("write")
        .expect("applied");

    // Killed: it answers nothing from now on, and a forward to it hangs.
    c.mesh.down.lock().unwrap().insert(NodeId(old));
    let started = Instant::now();
    let reply = c.node(through).write(site("across")).await;
    let took = started.elapsed();
    assert!(reply.is_ok(), "{reply:?} after {took:?}");
    reply.unwrap().expect("applied");
    assert!(
        took < Duration::from_secs(4),
        "the write waited {took:?} (the request timeout is 5 s)"
    );
    let new = c.wait_leader(Some(old), Duration::from_secs(5)).await;
    let read = c.node(through).read().await.expect("read");
    assert!(read.sites().contains_key(&Name::new("across").unwrap()));
    assert!(c.node(new).serving().is_ok());
    c.mesh.down.lock().unwrap().clear();
    c.shutdown().await;
}
