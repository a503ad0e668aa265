//! The supervision tree restarts a crashed child and the node keeps working.

use std::time::Duration;

use ractor::rpc::CallResult;
use warren_node::actors::{ClusterMsg, SupervisorMsg};
use warren_node::datadir::DataDir;
use warren_node::node::NodeSpec;
use warren_node::{Listeners, Settings};
use warren_proto::Name;

/// A one-node cluster on sockets bound here on `127.0.0.1:0` (nothing races for a port).
async fn solo(tmp: &tempfile::TempDir) -> warren_node::RunningNode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let spec = NodeSpec {
        name: Name::new("solo").unwrap(),
        cluster_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        region: String::new(),
    };
    let (node, _) = warren_node::init(
        DataDir::new(tmp.path().join("d")),
        spec,
        &Settings::default(),
        Listeners::loopback().unwrap(),
    )
    .await
    .unwrap();
    node
}

async fn child(node: &warren_node::RunningNode, name: &'static str) -> Option<ractor::ActorCell> {
    match node
        .supervisor()
        .call(|r| SupervisorMsg::Child(name, r), None)
        .await
        .unwrap()
    {
        CallResult::Success(c) => c,
        _ => panic!("no answer from the supervisor"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_cluster_actor_is_restarted() {
    let tmp = tempfile::tempdir().unwrap();
    let node = solo(&tmp).await;

    let first = child(&node, "cluster").await.expect("a cluster actor runs");
    first.send_message(ClusterMsg::Crash).unwrap();

    let mut second = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Some(a) = child(&node, "cluster")
            .await
            .filter(|a| a.get_id() != first.get_id())
        {
            second = Some(a);
            break;
        }
    }
    let second: ractor::ActorRef<ClusterMsg> =
        second.expect("the cluster actor was not restarted").into();
    let restarts = match node
        .supervisor()
        .call(SupervisorMsg::Restarts, None)
        .await
        .unwrap()
    {
        CallResult::Success(n) => n,
        _ => panic!("no answer"),
    };
    assert_eq!(restarts, 1);
    // The new incarnation serves: a membership change on an unknown node is refused by
    // the leader, which proves the message went through it to Raft and back.
    let members = warren_node::actors::Members::from_actor(second);
    let err = members
        .change(warren_node::actors::MemberOp::Promote(
            warren_proto::registry::NodeId(9),
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a learner"), "{err}");
    node.serve_until(async {}).await.unwrap();
}

/// The proxy's configuration follows the registry again after its actor panicked: a
/// resource created after the crash is routed (before, a panic in the loop that followed
/// the registry froze the proxy's configuration while the node reported healthy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_configuration_follows_the_registry_after_its_actor_panicked() {
    use warren_consensus::registry::{AnyEntity, Command};
    use warren_consensus::types::{Actor as Who, Request};
    use warren_node::proxy::config::ProxyConfigMsg;
    use warren_proto::registry::{Resource, Route};

    let tmp = tempfile::tempdir().unwrap();
    let node = solo(&tmp).await;
    let first = child(&node, "proxy_config")
        .await
        .expect("proxy_config runs");
    first.send_message(ProxyConfigMsg::Crash).unwrap();
    let mut back = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if child(&node, "proxy_config")
            .await
            .is_some_and(|c| c.get_id() != first.get_id())
        {
            back = true;
            break;
        }
    }
    assert!(back, "proxy_config was not restarted");

    let resource = Resource {
        name: Name::new("wiki").unwrap(),
        site: None,
        route: Route::Http {
            domain: "wiki.example.test".into(),
            path_prefix: None,
        },
        targets: vec!["127.0.0.1:9".parse().unwrap()],
        policies: Vec::new(),
        http: Default::default(),
        revision: 0,
    };
    node.cluster
        .write(Request::new(
            Who::System,
            Command::Create(AnyEntity::Resource(resource)),
        ))
        .await
        .unwrap()
        .unwrap();
    let mut routed = false;
    for _ in 0..100 {
        if node
            .proxy
            .state()
            .config
            .route("wiki.example.test", "/")
            .is_some()
        {
            routed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(routed, "the new resource never reached the proxy");
    node.serve_until(async {}).await.unwrap();
}
