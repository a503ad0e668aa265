//! A three-node cluster of real processes on loopback: replication, failover, catch-up,
//! snapshots, restarts, learners and membership changes.

use std::time::Duration;

use anyhow::Context as _;
use reqwest::{Method, StatusCode};
use serde_json::json;
use warren_tests::{phase, Cluster};

fn user(name: &str) -> serde_json::Value {
    json!({"name": name, "email": format!("{name}@example.com")})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_follower_is_read_back_from_every_node() -> anyhow::Result<()> {
    phase!("start three nodes: init + two joins");
    let c = Cluster::start(3).await?;
    let leader = c.leader(0).await?;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    phase!("write through follower {}", c.nodes[follower].name);
    let created = c.api(follower).post_ok("/v1/users", &user("alice")).await?;
    assert_eq!(created["name"], "alice");
    phase!("read it back from every node");
    for i in 0..3 {
        let got = c.api(i).get_ok("/v1/users/alice").await?;
        assert_eq!(
            got["email"], "alice@example.com",
            "node {}",
            c.nodes[i].name
        );
        assert_eq!(got["revision"], created["revision"]);
    }
    phase!("status from every node agrees on leader and membership");
    for i in 0..3 {
        let s = c.api(i).get_ok("/v1/cluster").await?;
        assert_eq!(s["leader"], c.nodes[leader].name.as_str());
        let members = s["members"].as_array().unwrap();
        assert_eq!(members.len(), 3);
        for m in members {
            assert_eq!(m["role"], "voter");
            assert_eq!(m["reachable"], true, "{m}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_another_and_the_old_one_catches_up() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    let old = c.leader(0).await?;
    let survivor = (0..3).find(|i| *i != old).unwrap();
    c.api(survivor)
        .post_ok("/v1/sites", &json!({"name": "before"}))
        .await?;

    phase!(
        "a client writes and reads back through follower {} while the leader {} is SIGKILLed",
        c.nodes[survivor].name,
        c.nodes[old].name
    );
    let api = c.api(survivor);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let stop = stop.clone();
        async move {
            // Each write and its read-back: whether both succeeded and how long they took.
            let mut answered = Vec::new();
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let name = format!("during-{i}");
                let start = std::time::Instant::now();
                let wrote = api
                    .send(Method::POST, "/v1/sites", &json!({ "name": name }))
                    .await;
                let read = api.get(&format!("/v1/sites/{name}")).await;
                let ok = matches!(wrote, Ok((StatusCode::CREATED, _)))
                    && matches!(read, Ok((StatusCode::OK, _)));
                answered.push((name, ok, start.elapsed(), format!("{wrote:?} / {read:?}")));
            }
            answered
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.nodes[old].kill9();
    let new = c
        .wait_leader(survivor, Some(old), Duration::from_secs(10))
        .await?;
    assert_ne!(new, old);
    phase!(
        "{} leads; a few more writes through {}",
        c.nodes[new].name,
        c.nodes[survivor].name
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let answered = writer.await?;
    // The write in flight at the dead leader is sent again to the new one as soon as it
    // is elected: the client sees it succeed, not wait out the request timeout (5 s) for
    // a 503.
    for (name, ok, took, what) in &answered {
        assert!(*ok, "{name} failed across the failover: {what}");
        assert!(
            *took < Duration::from_secs(4),
            "{name} took {took:?} across the failover: {what}"
        );
    }
    let slowest = answered.iter().map(|(_, _, took, _)| *took).max();
    let during: Vec<String> = answered.into_iter().map(|(name, ..)| name).collect();
    phase!(
        "{} writes through the failover, all answered (slowest with its read-back: {slowest:?})",
        during.len()
    );
    c.api(survivor)
        .post_ok("/v1/sites", &json!({"name": "after"}))
        .await?;

    phase!("more writes while {} is down", c.nodes[old].name);
    for i in 0..20 {
        c.api(survivor)
            .post_ok("/v1/sites", &json!({"name": format!("down-{i}")}))
            .await?;
    }

    phase!("restart {} from its data dir", c.nodes[old].name);
    c.nodes[old].run()?;
    c.api(old).wait_healthy(Duration::from_secs(30)).await?;
    let sites = c.api(old).names("/v1/sites").await?;
    assert!(sites.contains(&"before".to_owned()) && sites.contains(&"after".to_owned()));
    for name in &during {
        assert!(sites.contains(name), "{name} was acknowledged and is gone");
    }
    assert_eq!(sites.len(), 22 + during.len(), "{sites:?}");
    phase!("its own log has caught up with the leader's");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.api(survivor).get_ok("/v1/cluster").await?;
        let applied: Vec<_> = s["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["last_applied"].as_u64())
            .collect();
        if applied.iter().all(|a| a.is_some() && *a == applied[0]) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not caught up: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joining_after_compaction_is_brought_up_to_date_by_snapshot() -> anyhow::Result<()> {
    let mut c = Cluster::start_with_env(1, &[("WARREN_SNAPSHOT_WRITES", "20")]).await?;
    phase!(
        "writes on a one-node cluster that snapshots after a few dozen, until its log is compacted"
    );
    // The snapshot policy looks every 250 ms and spaces snapshots by the registry's size,
    // so how many writes it takes varies; keep writing until the log start moved.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut written = 0;
    let purged = loop {
        for _ in 0..50 {
            c.api(0)
                .post_ok("/v1/sites", &json!({"name": format!("s{written}")}))
                .await?;
            written += 1;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s = c.api(0).get_ok("/v1/cluster").await?;
        let purged = s["members"][0]["purged_index"].as_u64().unwrap_or(0);
        if purged > 100 {
            break purged;
        }
        assert!(
            std::time::Instant::now() < deadline && written < 3000,
            "the log was not compacted: {s}"
        );
    };

    phase!("join n2: the entries it needs are gone from the log");
    let n2 = c.add_node(false).await?;
    let s = c.api(n2).get_ok("/v1/cluster").await?;
    let me = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "n2")
        .unwrap()
        .clone();
    let snapshot = me["snapshot_index"].as_u64().unwrap_or(0);
    assert!(
        snapshot >= purged,
        "n2 has no snapshot covering the purged log: {me}"
    );
    assert_eq!(c.api(n2).names("/v1/sites").await?.len(), written);
    phase!("and it keeps up with new writes");
    c.api(n2)
        .post_ok("/v1/sites", &json!({"name": "late"}))
        .await?;
    assert!(c
        .api(0)
        .names("/v1/sites")
        .await?
        .contains(&"late".to_owned()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_stopping_and_killing_all_nodes() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    phase!("acknowledged writes through every node");
    let mut acked = Vec::new();
    for i in 0..30 {
        let name = format!("u{i}");
        c.api(i % 3).post_ok("/v1/users", &user(&name)).await?;
        acked.push(name);
    }
    phase!("SIGTERM all three: each exits cleanly");
    for n in &mut c.nodes {
        let status = n.terminate()?;
        assert!(status.success(), "{} exited with {status}", n.name);
    }
    phase!("start all three");
    for n in &mut c.nodes {
        n.run()?;
    }
    c.api(0).wait_healthy(Duration::from_secs(30)).await?;
    let users = c.api(1).names("/v1/users").await?;
    for name in &acked {
        assert!(users.contains(name), "{name} lost after a clean restart");
    }

    phase!("writes in flight while all three are SIGKILLed");
    let api = c.api(2);
    let writer = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..10_000 {
            let name = format!("k{i}");
            match api.send(Method::POST, "/v1/users", &user(&name)).await {
                Ok((StatusCode::CREATED, _)) => acked.push(name),
                _ => break,
            }
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    for n in &mut c.nodes {
        n.kill9();
    }
    let killed_acked = writer.await?;
    assert!(
        !killed_acked.is_empty(),
        "no write was acknowledged before the kill"
    );
    phase!(
        "{} writes were acknowledged before the kill; restart all three",
        killed_acked.len()
    );
    for n in &mut c.nodes {
        n.run()?;
    }
    c.api(0).wait_healthy(Duration::from_secs(30)).await?;
    let users = c.api(0).names("/v1/users").await?;
    for name in acked.iter().chain(&killed_acked) {
        assert!(
            users.contains(name),
            "{name} was acknowledged and then lost"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_replicates_and_losing_it_never_blocks_writes() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    phase!("join n4 as a learner");
    let l = c.add_node(true).await?;
    c.api(0)
        .post_ok("/v1/sites", &json!({"name": "replicated"}))
        .await?;
    assert!(c
        .api(l)
        .names("/v1/sites")
        .await?
        .contains(&"replicated".to_owned()));
    let node = c.api(0).get_ok("/v1/nodes/n4").await?;
    assert_eq!(node["role"], "learner");
    let s = c.api(l).get_ok("/v1/cluster").await?;
    let me = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "n4")
        .unwrap()
        .clone();
    assert_eq!(me["state"], "learner", "{me}");
    assert!(
        c.api(0).get_ok("/v1/cluster").await?["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "voter")
            .count()
            == 3
    );

    phase!("SIGKILL the learner; writes go on");
    c.nodes[l].kill9();
    for i in 0..10 {
        c.api(i % 3)
            .post_ok("/v1/sites", &json!({"name": format!("w{i}")}))
            .await?;
    }

    phase!("restart the learner and promote it with the CLI");
    c.nodes[l].run()?;
    let (ok, out, err) = c.warren(1, &["cluster", "promote", "n4"]);
    assert!(ok, "{out}{err}");
    assert_eq!(c.api(0).get_ok("/v1/nodes/n4").await?["role"], "voter");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_voter_leaves_a_working_cluster() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    let leader = c.leader(0).await?;
    let victim = (0..3).find(|i| *i != leader).unwrap();
    let name = c.nodes[victim].name.clone();
    let asker = (0..3).find(|i| *i != victim).unwrap();
    phase!("remove voter {name} with the CLI");
    let (ok, out, err) = c.warren(asker, &["cluster", "remove", &name]);
    assert!(ok, "{out}{err}");
    let node = c.api(asker).get_ok(&format!("/v1/nodes/{name}")).await?;
    assert_eq!(node["role"], "none");
    phase!("{name} learns that it was removed and says so");
    // It may never receive the entry that removes it (the leader stops replicating to it):
    // it has to find out from its peers once its leader falls silent.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let health = loop {
        let (s, health) = c.api(victim).get("/v1/health").await?;
        let reason = health["reason"].as_str().unwrap_or_default();
        if s == StatusCode::SERVICE_UNAVAILABLE && reason.contains("removed from the cluster") {
            break health;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} does not know it was removed: {s} {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    phase!("{name}'s health: {health}");
    let s = c.api(victim).get_ok("/v1/cluster").await?;
    let me = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name.as_str())
        .unwrap()
        .clone();
    assert_eq!(me["state"], "removed", "{me}");
    phase!("stop it: two voters still make a quorum of two");
    c.nodes[victim].kill9();
    c.api(asker)
        .post_ok("/v1/sites", &json!({"name": "two-voters"}))
        .await?;
    phase!("the removed node can be forgotten");
    let (s, _) = c
        .api(asker)
        .raw(Method::DELETE, &format!("/v1/nodes/{name}"), None)
        .await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(c.api(asker).names("/v1/nodes").await?.len(), 2);
    phase!("a member cannot be forgotten");
    let member = c.nodes[leader].name.clone();
    let (s, v) = c
        .api(asker)
        .raw(Method::DELETE, &format!("/v1/nodes/{member}"), None)
        .await?;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_any_moment_loses_nothing_acknowledged_and_the_node_restarts(
) -> anyhow::Result<()> {
    let mut c = Cluster::start(1).await?;
    let mut acked: Vec<String> = Vec::new();
    // Kill points spread over the first second of a write stream, different every round.
    for (round, delay_ms) in [37u64, 260, 90, 540, 5, 410].into_iter().enumerate() {
        phase!("round {round}: SIGKILL {delay_ms} ms into a write stream");
        let api = c.api(0);
        let writer = tokio::spawn(async move {
            let mut done = Vec::new();
            for i in 0..100_000 {
                let name = format!("r{round}-{i}");
                match api
                    .send(Method::POST, "/v1/sites", &json!({"name": name}))
                    .await
                {
                    Ok((StatusCode::CREATED, _)) => done.push(name),
                    _ => break,
                }
            }
            done
        });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        c.nodes[0].kill9();
        acked.extend(writer.await?);
        c.nodes[0].run()?;
        c.api(0).wait_healthy(Duration::from_secs(30)).await?;
        let sites = c.api(0).names("/v1/sites").await?;
        for name in &acked {
            assert!(
                sites.contains(name),
                "{name} was acknowledged and then lost (round {round})"
            );
        }
    }
    phase!("{} acknowledged writes survived six kills", acked.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_name_the_leader_and_answer_without_quorum() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    let leader = c.leader(0).await?;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let leader_id = c
        .api(follower)
        .get_ok(&format!("/v1/nodes/{}", c.nodes[leader].name))
        .await?["id"]
        .as_u64()
        .context("the leader's id")?;
    let text = c.metrics_text(follower).await?;
    let value = |t: &str, n: &str| {
        warren_tests::metric_value(t, n).with_context(|| format!("{n} in:\n{t}"))
    };
    phase!("a follower's metrics name the real leader; its applied index moves with writes");
    assert_eq!(value(&text, "warren_raft_leader_id")?, leader_id);
    assert_eq!(value(&text, "warren_raft_is_leader")?, 0);
    assert_eq!(
        value(&c.metrics_text(leader).await?, "warren_raft_is_leader")?,
        1
    );
    let applied = value(&text, "warren_raft_applied_index")?;
    for i in 0..3 {
        c.api(leader)
            .post_ok("/v1/sites", &json!({"name": format!("m{i}")}))
            .await?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while value(
        &c.metrics_text(follower).await?,
        "warren_raft_applied_index",
    )? < applied + 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the applied index did not move"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    phase!("the leader killed: the follower counts the new leader's election");
    let changes = value(
        &c.metrics_text(follower).await?,
        "warren_raft_leader_changes_total",
    )?;
    assert!(changes >= 1, "the first leader counts");
    c.nodes[leader].kill9();
    let new_leader = c
        .wait_leader(follower, Some(leader), Duration::from_secs(20))
        .await?;
    let after = value(
        &c.metrics_text(follower).await?,
        "warren_raft_leader_changes_total",
    )?;
    assert!(after > changes, "{changes} -> {after}");
    assert_eq!(
        value(&c.metrics_text(follower).await?, "warren_raft_leader_id")?,
        c.api(follower)
            .get_ok(&format!("/v1/nodes/{}", c.nodes[new_leader].name))
            .await?["id"]
            .as_u64()
            .context("the new leader's id")?
    );

    phase!("without quorum (two nodes killed) the survivor still answers /metrics");
    // The survivor is the one that is not the leader (a leader left alone may go on
    // believing it leads for a while).
    let survivor = (0..3)
        .find(|i| *i != leader && *i != new_leader)
        .expect("a third node");
    c.nodes[new_leader].kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // metrics_text gives up after 5 s: a scrape that waited for a quorum would fail.
    let text = c.metrics_text(survivor).await?;
    assert!(value(&text, "warren_raft_term")? >= 1);
    assert_eq!(value(&text, "warren_raft_is_leader")?, 0);
    Ok(())
}
