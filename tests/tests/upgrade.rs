//! A rolling upgrade of a three-node cluster between two builds, one node at a time on its
//! own data directory: build A is `warren-node` as it is, build B is `warren-node-next`
//! (`--features format-next`: one more stored/wire format, with a test command,
//! `POST /v1/test/annotate`). Needs `warren-node-next` next to the other binaries
//! (`scripts/test` builds it; the test says how if it is missing).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::json;
use warren_tests::upstream::Upstream;
use warren_tests::{next_node_binary, phase, port_of, web_client, Api, Cluster};

/// The newest format of the build under test (build A).
const A: u16 = warren_consensus::format::Format::CURRENT.0;
/// The test-only format of the `format-next` build (build B), one past it.
const B: u16 = A + 1;

/// Writes users through `api` until `stop`; returns each failure.
fn writer(api: Api, prefix: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) {
            let name = format!("{prefix}-{i}");
            match api
                .send(Method::POST, "/v1/users", &json!({ "name": name }))
                .await
            {
                Ok((StatusCode::CREATED, _)) => {}
                other => failures.push(format!("{name}: {other:?}")),
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        failures
    })
}

/// Every node's users, read linearizably through that node, must be the same list.
async fn reads_agree(c: &Cluster) -> anyhow::Result<usize> {
    let first = c.api(0).names("/v1/users").await?;
    for i in 1..c.nodes.len() {
        let other = c.api(i).names("/v1/users").await?;
        anyhow::ensure!(
            other == first,
            "{} and {} list different users",
            c.nodes[0].name,
            c.nodes[i].name
        );
    }
    Ok(first.len())
}

/// Every node's HTTPS proxy serves the public web resource `app.localhost` from the
/// upstream.
async fn web_served(c: &Cluster, web: &reqwest::Client) -> anyhow::Result<()> {
    for n in &c.nodes {
        let url = format!("https://app.localhost:{}/upgrade", port_of(&n.https_addr));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let last = match web.get(&url).send().await {
                Ok(r) if r.status() == StatusCode::OK => {
                    let echo: serde_json::Value = r.json().await?;
                    anyhow::ensure!(echo["upstream"] == "app", "{}: {echo}", n.name);
                    break;
                }
                Ok(r) => r.status().to_string(),
                Err(e) => format!("{e:#}"),
            };
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not serve {url}: {last}",
                n.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// The newest format each member says it reads, as node `asked`'s cluster status shows it.
async fn formats(c: &Cluster, asked: usize) -> anyhow::Result<Vec<(String, u64)>> {
    let status = c.api(asked).get_ok("/v1/cluster").await?;
    Ok(status["members"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_owned(),
                m["format"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_upgraded_one_node_at_a_time_keeps_serving_and_takes_the_new_command_only_when_all_read_it(
) -> anyhow::Result<()> {
    let next = next_node_binary()?;
    phase!("start three nodes on build A");
    let mut c = Cluster::start(3).await?;
    c.api(0)
        .post_ok("/v1/users", &json!({"name": "before"}))
        .await?;
    reads_agree(&c).await?;
    let up = Upstream::start("app").await?;
    let (cert, key) = warren_tests::certs::self_signed(&["app.localhost"]);
    c.api(0)
        .post_ok(
            "/v1/certificates",
            &json!({"name": "app", "cert_pem": cert, "key_pem": key}),
        )
        .await?;
    c.api(0)
        .post_ok(
            "/v1/resources",
            &json!({"name": "app", "route": {"http": {"domain": "app.localhost"}},
                    "targets": [up.addr.to_string()], "http": {"public": true}}),
        )
        .await?;
    let web = web_client(&cert, &["app.localhost"], Duration::from_secs(5)).build()?;
    web_served(&c, &web).await?;
    let all = |f: u64| -> Vec<(String, u64)> { (1..=3).map(|i| (format!("n{i}"), f)).collect() };
    assert_eq!(
        formats(&c, 0).await?,
        all(A.into()),
        "cluster status shows each member's format"
    );

    // Followers first, the leader last: the last step also moves the leadership.
    let leader = c.leader(0).await?;
    let mut order: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    order.push(leader);
    let mut on_a: Vec<usize> = (0..3).collect();
    for (step, &i) in order.iter().enumerate() {
        let name = c.nodes[i].name.clone();
        let through = (0..3).find(|j| *j != i).expect("another node");
        phase!(
            "step {}: {name} to build B, writes through {} meanwhile",
            step + 1,
            c.nodes[through].name
        );
        if on_a == [i] && c.leader(through).await? == i {
            phase!(
                "step {}: {name}, the last on build A, restarts on A: a node on B leads",
                step + 1
            );
            c.nodes[i].terminate()?;
            let new = c
                .wait_leader(through, Some(i), Duration::from_secs(20))
                .await?;
            c.nodes[i].run()?;
            c.api(i).wait_healthy(Duration::from_secs(30)).await?;
            phase!(
                "step {}: the leader {} (build B) refuses the new command while {name} is on A",
                step + 1,
                c.nodes[new].name
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (status, body) = c
                    .api(new)
                    .send(
                        Method::POST,
                        "/v1/test/annotate",
                        &json!({"note": "too early"}),
                    )
                    .await?;
                assert_eq!(status, StatusCode::CONFLICT, "{body}");
                let message = body["error"]["message"].as_str().unwrap_or_default();
                if message.contains(&format!("({name}) reads formats up to {A}")) {
                    phase!("step {}: {message}", step + 1);
                    break;
                }
                // Until the leader has heard from the restarted node on its new connection.
                assert!(message.contains("has not yet said"), "{body}");
                assert!(Instant::now() < deadline, "{body}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writes = writer(c.api(through), format!("step{}", step + 1), stop.clone());
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.nodes[i].terminate()?;
        c.nodes[i].binary = Some(next.clone());
        c.nodes[i].run()?;
        c.api(i).wait_healthy(Duration::from_secs(30)).await?;
        on_a.retain(|j| *j != i);
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
        let failures = writes.await?;
        assert!(
            failures.is_empty(),
            "writes failed while {name} was replaced: {failures:#?}"
        );
        let users = reads_agree(&c).await?;
        web_served(&c, &web).await?;
        phase!(
            "step {}: every node lists the same {users} users and serves the web resource",
            step + 1
        );

        if on_a.is_empty() {
            break;
        }
        phase!(
            "step {}: the new command is refused while a node is on build A",
            step + 1
        );
        let lagging: Vec<&str> = on_a.iter().map(|j| c.nodes[*j].name.as_str()).collect();
        let (status, body) = c
            .api(i)
            .send(
                Method::POST,
                "/v1/test/annotate",
                &json!({"note": "too early"}),
            )
            .await?;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        phase!("step {}: {message}", step + 1);
        assert!(
            message.contains(&format!("reads formats up to {A}"))
                && message.contains(&format!("needs format {B}"))
                && lagging.iter().any(|n| message.contains(&format!("({n})"))),
            "the refusal should name a node on build A ({lagging:?}): {body}"
        );
    }

    phase!("all on build B: the new command is taken and replicates");
    // The leader may not have heard from a restarted node on its new connection yet.
    let api = c.api(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = api
            .send(
                Method::POST,
                "/v1/test/annotate",
                &json!({"note": "all upgraded"}),
            )
            .await?;
        if status.is_success() {
            break;
        }
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("has not yet said"), "{body}");
        assert!(Instant::now() < deadline, "still refused: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(formats(&c, 1).await?, all(B.into()));
    c.api(1)
        .post_ok("/v1/users", &json!({"name": "after"}))
        .await?;
    reads_agree(&c).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = c.api(0).get_ok("/v1/cluster").await?;
        let members = status["members"].as_array().cloned().unwrap_or_default();
        let applied: Vec<_> = members
            .iter()
            .map(|m| (m["last_applied"].clone(), m["applied_digest"].clone()))
            .collect();
        if applied.len() == 3 && applied.iter().all(|a| *a == applied[0] && !a.0.is_null()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the members did not apply the same log: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let back = 2;
    let name = c.nodes[back].name.clone();
    phase!("{name} back on build A: its log holds the new entry, so it refuses to start");
    c.nodes[back].terminate()?;
    c.nodes[back].binary = None;
    let (status, log) = c.nodes[back].run_expecting_exit(Duration::from_secs(30))?;
    assert!(!status.success(), "{log}");
    let refusal = regex::Regex::new(&format!(
        r"log entry \d+ is format {B}, this build reads up to {A}: upgrade this node"
    ))?;
    assert!(refusal.is_match(&log), "{log}");
    phase!("{name} on build B again catches up");
    c.nodes[back].binary = Some(next.clone());
    c.nodes[back].run()?;
    c.api(back).wait_healthy(Duration::from_secs(30)).await?;
    reads_agree(&c).await?;
    web_served(&c, &web).await?;
    Ok(())
}
