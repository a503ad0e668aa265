//! The log store keeps its promises: nothing is acknowledged before it is synced, and a log
//! that comes back shorter or damaged is noticed, not used as if it were whole.
//!
//! A real single-node `Cluster` on real sled files in a temporary directory; the checks
//! read what is on disk (the durable record file), as a restarted node would.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use warren_consensus::cluster::{Cluster, ClusterConfig, PlantedBug};
use warren_consensus::log_store::StorageIo;
use warren_consensus::registry::{AnyEntity, Command};
use warren_consensus::storage::{RecordFile, Store};
use warren_consensus::transport::{BoxFuture, Rpc, RpcReply, Transport, TransportError};
use warren_consensus::types::{Actor, ClusterNode, Request};
use warren_proto::registry::{NodeId, Site};
use warren_proto::Name;

/// A single voter needs nobody.
struct Nowhere;

impl Transport for Nowhere {
    fn call<'a>(
        &'a self,
        _target: NodeId,
        _node: &'a ClusterNode,
        _rpc: Rpc,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<RpcReply, TransportError>> {
        Box::pin(async {
            Err(TransportError::Unreachable(
                "no network in this test".into(),
            ))
        })
    }
}

struct Node {
    cluster: Cluster,
    log: Store,
    _state: Store,
}

async fn start(dir: &std::path::Path, config: ClusterConfig) -> Node {
    let log = Store::open(&dir.join("log")).expect("open log");
    let state = Store::open(&dir.join("state")).expect("open state");
    let cluster = Cluster::start(NodeId(1), &log, &state, Arc::new(Nowhere), config)
        .await
        .expect("start");
    if !cluster.raft().is_initialized().await.expect("initialized?") {
        cluster
            .initialize_with(BTreeMap::from([(
                NodeId(1),
                ClusterNode {
                    name: "n1".into(),
                    addr: "127.0.0.1:1".into(),
                },
            )]))
            .await
            .expect("initialize");
    }
    Node {
        cluster,
        log,
        _state: state,
    }
}

fn site(i: usize) -> Request {
    Request::new(
        Actor::System,
        Command::Create(AnyEntity::Site(Site {
            name: Name::new(format!("site-{i}")).expect("name"),
            description: "x".repeat(100),
            revision: 0,
        })),
    )
}

fn config(bug: Option<PlantedBug>) -> ClusterConfig {
    ClusterConfig {
        planted_bug: bug,
        ..ClusterConfig::default()
    }
}

/// Writes one at a time; after each acknowledgement, reads the durable record from disk
/// and returns how many acknowledged writes it did not cover yet.
async fn uncovered_acks(bug: Option<PlantedBug>) -> usize {
    let dir = tempfile::tempdir().expect("dir");
    let node = start(dir.path(), config(bug)).await;
    let mut uncovered = 0;
    for i in 0..40 {
        let syncs = node.log.syncs();
        let reply = node.cluster.write(site(i)).await.expect("write");
        reply.expect("applied");
        let applied = node
            .cluster
            .registry()
            .last_applied()
            .expect("applied index");
        let record = RecordFile::read(&dir.path().join("log"))
            .expect("record readable")
            .expect("record exists");
        if record.last < Some(applied) {
            uncovered += 1;
        }
        if bug.is_none() {
            assert!(
                node.log.syncs() > syncs,
                "write {i} acknowledged without a sync"
            );
        }
    }
    node.cluster.shutdown().await;
    uncovered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_is_on_disk_before_the_acknowledgement() {
    assert_eq!(uncovered_acks(None).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_catches_a_store_that_acknowledges_before_it_syncs() {
    assert!(uncovered_acks(Some(PlantedBug::AckBeforeSync)).await > 0);
}

/// Writes `n` sites, stops the node and returns the log index of the last one.
async fn write_and_stop(dir: &std::path::Path, n: usize) -> u64 {
    let node = start(dir, config(None)).await;
    for i in 0..n {
        node.cluster
            .write(site(i))
            .await
            .expect("write")
            .expect("applied");
    }
    let last = node
        .cluster
        .registry()
        .last_applied()
        .expect("applied")
        .index;
    node.cluster.shutdown().await;
    drop(node);
    last
}

/// Opens the stopped node's log with sled directly and changes it.
fn tamper(dir: &std::path::Path, f: impl FnOnce(&sled::Tree)) {
    // The stopped node's storage threads may hold the lock a moment longer.
    let mut store = None;
    for _ in 0..200 {
        if let Ok(s) = Store::open(&dir.join("log")) {
            store = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let store = store.expect("open the stopped node's log");
    let log = store.db().open_tree("log").expect("log tree");
    f(&log);
    store.sync().expect("sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_lost_its_tail_is_reported_and_the_lone_voter_refuses_to_start() {
    let dir = tempfile::tempdir().expect("dir");
    let last = write_and_stop(dir.path(), 30).await;
    // What sled does when it finds a damaged page on start: everything after it is gone.
    tamper(dir.path(), |log| {
        for i in last - 10..=last {
            log.remove(i.to_be_bytes()).expect("remove");
        }
    });
    let log = Store::open(&dir.path().join("log")).expect("log");
    let state = Store::open(&dir.path().join("state")).expect("state");
    let err = Cluster::start(NodeId(1), &log, &state, Arc::new(Nowhere), config(None))
        .await
        .err()
        .expect("a lone voter that lost acknowledged entries must not start");
    let msg = format!("{err:#}");
    assert!(msg.contains("storage damaged"), "{msg}");
    assert!(msg.contains(&format!("index {last}")), "{msg}");
    assert!(msg.contains("backup"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_entry_is_found_on_open_and_the_log_is_cut_there() {
    let dir = tempfile::tempdir().expect("dir");
    let last = write_and_stop(dir.path(), 30).await;
    let victim = last - 5;
    tamper(dir.path(), |log| {
        let mut v = log
            .get(victim.to_be_bytes())
            .expect("get")
            .expect("entry")
            .to_vec();
        let mid = v.len() / 2;
        v[mid] ^= 0x40;
        log.insert(victim.to_be_bytes(), v).expect("insert");
    });
    let log = Store::open(&dir.path().join("log")).expect("log");
    let options = warren_consensus::log_store::LogOptions {
        io: StorageIo::Background,
        ..Default::default()
    };
    let store = warren_consensus::log_store::LogStore::open(&log, options).expect("open");
    let damage = store.damage().expect("the log is behind what was durable");
    assert_eq!(damage.recovered.map(|l| l.index), Some(victim - 1));
    assert_eq!(damage.acknowledged.index, last);
    let text = damage.to_string();
    assert!(
        text.contains(&format!("entry {victim} is damaged")),
        "{text}"
    );
}
