//! Trust between nodes, on real binaries: the join token (chosen by the admin) decides what a
//! node may be, a learner-grade node never gets the CA key, never votes and admits nobody,
//! and a node holding a learner certificate cannot make the cluster do what only voters may,
//! even talking Raft RPC to the leader directly with its own (real) certificate.

use std::time::Duration;

use serde_json::json;
use warren_consensus::pki::{self, ClusterCa, NodeIdentity};
use warren_consensus::quic::QuicTransport;
use warren_consensus::registry::Command;
use warren_consensus::transport::{MembershipChange, Rpc, RpcReply, Transport};
use warren_consensus::types::{Actor, ClusterNode, Request};
use warren_proto::registry::{NodeId, NodeRole};
use warren_proto::Name;
use warren_tests::{phase, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_join_token_decides_what_a_node_may_be() -> anyhow::Result<()> {
    let mut c = Cluster::start(1).await?;

    phase!("an admin creates a learner token");
    let (ok, out, err) = c.warren(0, &["join-token", "create", "--role", "learner"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("created learner join token"), "{out}");
    let learner_token = regex::Regex::new(r"wjt1_[A-Za-z0-9_-]+")?
        .find(&out)
        .expect("a token in the output")
        .as_str()
        .to_owned();
    let tokens = c.api(0).get_ok("/v1/join-tokens").await?;
    let roles: Vec<&str> = tokens["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "learner").count(),
        1,
        "{tokens}"
    );
    phase!("a relay token makes no member, and a member token no relay-only node");
    let (ok, out, err) = c.warren(0, &["join-token", "create", "--role", "relay"]);
    assert!(ok && out.contains("created relay join token"), "{out}{err}");
    let relay_token = regex::Regex::new(r"wjt1_[A-Za-z0-9_-]+")?
        .find(&out)
        .expect("a token in the output")
        .as_str()
        .to_owned();
    let mut intruder = c.new_node("joins-as-member");
    let e = intruder.join_expect_failure(&c.nodes[0].cluster_addr, &relay_token)?;
    assert!(
        e.contains("relay-only node: run `warren-node relay`"),
        "{e}"
    );
    let relay_dir = tempfile::tempdir()?;
    let mut relay = std::process::Command::new(&warren_tests::bins().node);
    relay
        .args([
            "--relay-listen",
            "127.0.0.1:0",
            "--relay-public",
            "127.0.0.1:9",
        ])
        .arg("relay")
        .arg("--data-dir")
        .arg(relay_dir.path().join("r"))
        .args(["--name", "relay-with-learner-token", "--peer"])
        .arg(&c.nodes[0].cluster_addr)
        .args(["--token", &learner_token]);
    let (ok, _, err) = warren_tests::access::output(relay, Duration::from_secs(30))?;
    assert!(
        !ok && err.contains("admits a learner, not a relay-only node"),
        "{err}"
    );
    let nodes = c.api(0).names("/v1/nodes").await?;
    assert_eq!(nodes, ["n1"], "a refused join registered a node");

    phase!("n2 joins with it without asking to be a learner: it is one");
    let l = c.add_node_with(&learner_token, false).await?;
    assert!(
        !c.nodes[l].dir.join("ca.key").exists(),
        "a learner-grade node was given the CA key"
    );
    let n2 = c.api(0).get_ok("/v1/nodes/n2").await?;
    assert_eq!(n2["grade"], "learner", "{n2}");
    assert_eq!(n2["role"], "learner", "{n2}");

    phase!("it replicates and forwards ordinary writes");
    c.api(l)
        .post_ok("/v1/sites", &json!({"name": "via-learner"}))
        .await?;
    assert!(c
        .api(0)
        .names("/v1/sites")
        .await?
        .contains(&"via-learner".to_owned()));

    phase!("it can never be promoted");
    let (ok, out, err) = c.warren(0, &["cluster", "promote", "n2"]);
    assert!(!ok, "a learner-grade node was promoted: {out}");
    assert!(err.contains("can never vote"), "{err}");
    assert_eq!(c.api(0).get_ok("/v1/nodes/n2").await?["role"], "learner");

    phase!("nobody joins through it, even with a voter token");
    let mut n3 = c.new_node("n3");
    let e = n3.join_expect_failure(&c.nodes[l].cluster_addr, &c.join_token)?;
    assert!(e.contains("learner-grade"), "{e}");

    phase!("its own certificate cannot make the leader admit or change membership");
    let ca_pem = std::fs::read_to_string(c.ca())?;
    let ca = ClusterCa::from_pem(&ca_pem, None)?;
    let me = NodeIdentity::from_pem(
        &std::fs::read_to_string(c.nodes[l].dir.join("node.pem"))?,
        &std::fs::read_to_string(c.nodes[l].dir.join("node.key"))?,
        &ca,
    )?;
    let cluster_id = u128::from_str_radix(&c.cluster_id_hex()?, 16)?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let t = QuicTransport::new(
        endpoint.clone(),
        pki::quic_client_config(&ca, &me)?,
        cluster_id,
    );
    let leader = ClusterNode {
        name: "n1".into(),
        addr: c.nodes[0].cluster_addr.clone(),
    };
    let register = Rpc::Write(Request::new(
        Actor::System,
        Command::RegisterNode {
            name: Name::new("intruder")?,
            cluster_addr: "127.0.0.1:9".into(),
            admin_addr: "127.0.0.1:10".into(),
            region: String::new(),
            role: NodeRole::Voter,
        },
    ));
    let add = Rpc::Membership(MembershipChange::AddLearner(
        NodeId(99),
        ClusterNode {
            name: "intruder".into(),
            addr: "127.0.0.1:9".into(),
        },
    ));
    for rpc in [register, add] {
        let what = rpc.name();
        let r = t
            .call(NodeId(1), &leader, rpc, Duration::from_secs(5))
            .await;
        let e = r.expect_err(what).to_string();
        assert!(e.contains("only voter-grade"), "{what}: {e}");
    }
    let nodes = c.api(0).names("/v1/nodes").await?;
    assert!(!nodes.contains(&"intruder".to_owned()), "{nodes:?}");
    // An ordinary read-index from it is served: it is a member.
    let r = t
        .call(NodeId(1), &leader, Rpc::ReadIndex, Duration::from_secs(5))
        .await?;
    assert!(matches!(r, RpcReply::ReadIndex(Ok(_))), "{r:?}");
    // The relay-only nodes' feed is theirs: a member's certificate gets nothing.
    let conn = endpoint
        .connect_with(
            pki::quic_client_config_for(&ca, &me, warren_proto::relay::ALPN_RELAY_FEED)?,
            c.nodes[0].cluster_addr.parse()?,
            pki::CLUSTER_SERVER_NAME,
        )?
        .await?;
    /// The feed request's shape (`warren_node::relay_only::FeedRequest`).
    #[derive(serde::Serialize)]
    enum FeedRequest {
        Feed,
    }
    let fed: Result<serde::de::IgnoredAny, _> =
        warren_consensus::quic::request(&conn, &FeedRequest::Feed, 1 << 20).await;
    assert!(fed.is_err(), "the relay feed answered a learner");
    // Closed with the reason (an answer would have failed to decode, differently).
    let why = format!("{:?}", conn.closed().await);
    assert!(why.contains("not a relay-only node"), "{why}");
    endpoint.close(0u32.into(), b"done");

    phase!("the refusals are in the leader's log");
    assert!(
        c.nodes[0].log().contains("may not send write"),
        "{}",
        c.nodes[0].log_tail()
    );

    phase!(
        "a join that fails (its proxy port is taken) burns no node id: the retry gets the next one"
    );
    let ids = |v: &serde_json::Value| -> Vec<(String, u64)> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["name"].as_str().unwrap().to_owned(),
                    n["id"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let before = ids(&c.api(0).get_ok("/v1/nodes").await?);
    let next = before.iter().map(|(_, id)| *id).max().unwrap_or(0) + 1;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut n5 = c.new_node("n5");
    let free = std::mem::replace(&mut n5.https_addr, taken.local_addr()?.to_string());
    let e = n5.join_expect_failure(&c.nodes[0].cluster_addr, &c.join_token)?;
    assert!(e.contains("Address already in use"), "{e}");
    // Checked before registering; a failure after it keeps the id for the retry
    // (`Command::RegisterJoiningNode`, tested in the registry).
    assert_eq!(
        ids(&c.api(0).get_ok("/v1/nodes").await?),
        before,
        "the failed join registered nothing"
    );
    drop(taken);
    n5.https_addr = free;
    let _ = std::fs::remove_dir_all(&n5.dir);
    n5.join(&c.nodes[0].cluster_addr, &c.join_token, true)?;
    let after = ids(&c.api(0).get_ok("/v1/nodes").await?);
    assert!(
        after.contains(&("n5".to_owned(), next)),
        "the retried join kept id {next}: {after:?}"
    );
    c.nodes.push(n5);
    Ok(())
}
