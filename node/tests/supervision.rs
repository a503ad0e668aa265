//! The supervision tree restarts a crashed child and the node keeps working.

use std::time::Duration;

use ractor::rpc::CallResult;
use warren_node::actors::{ClusterMsg, SupervisorMsg};
use warren_node::datadir::DataDir;
use warren_node::node::NodeSpec;
use warren_node::Settings;
use warren_proto::Name;

fn free_port() -> u16 {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    tcp.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_cluster_actor_is_restarted() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let spec = NodeSpec {
        name: Name::new("solo").unwrap(),
        cluster_addr: format!("127.0.0.1:{}", free_port()),
        admin_addr: format!("127.0.0.1:{}", free_port()),
        region: String::new(),
    };
    let (node, _) = warren_node::init(
        DataDir::new(tmp.path().join("d")),
        spec,
        &Settings::default(),
    )
    .await
    .unwrap();

    let ask_actor = || async {
        match node
            .supervisor()
            .call(SupervisorMsg::ClusterActor, None)
            .await
            .unwrap()
        {
            CallResult::Success(a) => a,
            _ => panic!("no answer from the supervisor"),
        }
    };
    let first = ask_actor().await.expect("a cluster actor runs");
    first.cast(ClusterMsg::Crash).unwrap();

    let mut second = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Some(a) = ask_actor().await.filter(|a| a.get_id() != first.get_id()) {
            second = Some(a);
            break;
        }
    }
    let second = second.expect("the cluster actor was not restarted");
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
