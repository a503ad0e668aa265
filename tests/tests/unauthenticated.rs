//! What unauthenticated clients can make a node do, black box: made-up API keys, ACME
//! challenge tokens and join tokens are answered from the node's own replica and cost the
//! leader a bounded number of read-index rounds (`warren_read_index_served_total` on the
//! leader's `/metrics`), while a key or join token created a moment ago through another
//! node works at once; and TCP resource ports hold at most `--l4-max-connections`
//! connections, refusing more (and saying so in the log) until one closes.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use futures::StreamExt as _;
use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use warren_tests::{free_port, phase, Cluster, TestNode};

/// Leader reads per second per kind of id in the bound test
/// (`--unknown-id-leader-reads-per-s`).
const READS_PER_S: u64 = 2;
/// Kinds of id with a bucket of their own: API keys, join tokens, ACME challenge tokens.
const KINDS: u64 = 3;

fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system randomness");
    b
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A well-formed API key nobody has.
fn made_up_key() -> String {
    let id = u64::from_be_bytes(random_bytes::<8>());
    format!("wrn_{id:016x}_{}", b64(&random_bytes::<32>()))
}

/// `real` with its token id and secret replaced: the right cluster and CA, so it passes
/// every check a node can make without the registry.
fn forged_join_token(real: &str) -> anyhow::Result<String> {
    let body = real.strip_prefix("wjt1_").context("not a join token")?;
    let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(body)?;
    anyhow::ensure!(raw.len() > 48, "join token too short");
    // Cluster id (16 bytes) and CA fingerprint (32) stay; the rest is made up.
    let tail = raw.len() - 48;
    let mut fresh = vec![0u8; tail];
    for chunk in fresh.chunks_mut(32) {
        let r = random_bytes::<32>();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    raw[48..].copy_from_slice(&fresh);
    Ok(format!("wjt1_{}", b64(&raw)))
}

/// The value of the unlabelled metric `name` on node `i`'s `/metrics` (0 if absent).
async fn metric(c: &Cluster, i: usize, name: &str) -> anyhow::Result<u64> {
    let (status, _) = c.api(i).get("/v1/health").await?;
    anyhow::ensure!(status.is_success(), "{} is not healthy", c.nodes[i].name);
    let text = c.metrics_text(i).await?;
    Ok(warren_tests::metric_value(&text, name).unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_cost_the_leader_a_bounded_number_of_reads() -> anyhow::Result<()> {
    let rate = READS_PER_S.to_string();
    let c = Cluster::start_with_env(3, &[("WARREN_UNKNOWN_ID_LEADER_READS_PER_S", &rate)]).await?;
    let leader = c.leader(0).await?;
    let follower = (0..3).find(|i| *i != leader).context("a follower")?;
    let targets = [leader, follower];
    let before = metric(&c, leader, "warren_read_index_served_total").await?;
    let started = Instant::now();

    phase!("1200 admin requests (reads and writes) with made-up API keys, to the leader and a follower");
    let ca = std::fs::read(c.ca())?;
    let admin = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .build()?;
    let answers: Vec<anyhow::Result<StatusCode>> = futures::stream::iter(0..1200)
        .map(|i| {
            let url = format!("https://{}/v1/users", c.nodes[targets[i % 2]].admin_addr);
            let req = if i % 4 < 2 {
                admin.get(url)
            } else {
                let user = json!({"name": format!("u{i}"), "email": "u@example.com"});
                admin
                    .request(Method::POST, url)
                    .header("content-type", "application/json")
                    .body(user.to_string())
            };
            let req = req.bearer_auth(made_up_key());
            async move { Ok(req.send().await?.status()) }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for a in answers {
        assert_eq!(a?, StatusCode::UNAUTHORIZED);
    }

    phase!("1200 made-up ACME challenge tokens on the HTTP ports of the leader and a follower");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let answers: Vec<anyhow::Result<StatusCode>> = futures::stream::iter(0..1200)
        .map(|i| {
            let url = format!(
                "http://{}/.well-known/acme-challenge/{}",
                c.nodes[targets[i % 2]].http_addr,
                b64(&random_bytes::<32>())
            );
            let http = http.clone();
            async move { Ok(http.get(url).send().await?.status()) }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for a in answers {
        assert_eq!(a?, StatusCode::NOT_FOUND);
    }

    phase!("40 joins with forged join tokens (right cluster and CA), through the leader and a follower");
    let mut joins = Vec::new();
    for i in 0..40 {
        let token = forged_join_token(&c.join_token)?;
        let peer = c.nodes[targets[i % 2]].cluster_addr.clone();
        let mut node = TestNode::new(c.tmp.path(), &format!("forger{i}"), &[]);
        joins.push(tokio::task::spawn_blocking(move || {
            node.join_expect_failure(&peer, &token)
        }));
        if joins.len() == 8 {
            for j in joins.drain(..) {
                let err = j.await??;
                assert!(err.contains("unknown or revoked"), "{err}");
            }
        }
    }
    for j in joins {
        let err = j.await??;
        assert!(err.contains("unknown or revoked"), "{err}");
    }

    let took = started.elapsed();
    assert_eq!(
        c.leader(0).await?,
        leader,
        "the leader changed during the test"
    );
    let after = metric(&c, leader, "warren_read_index_served_total").await?;
    let reads = after - before;
    // Each kind's bucket: full at the start, refilled at the rate while this ran; plus the
    // two scrapes of /metrics and a little slack for the cluster's own reads.
    let bound = KINDS * READS_PER_S * (2 + took.as_secs()) + 5;
    phase!("2440 unauthenticated requests in {took:?} cost the leader {reads} read-index rounds (bound {bound})");
    assert!(
        reads <= bound,
        "2440 requests with made-up ids cost the leader {reads} read-index rounds in {took:?} (at most {bound} expected)"
    );
    let limited = metric(
        &c,
        follower,
        "warren_unknown_id_checks_total{kind=\"api_key\",outcome=\"rate_limited\"}",
    )
    .await?;
    assert!(
        limited > 0,
        "no API key was refused over the rate on the follower"
    );
    assert!(
        c.nodes[follower]
            .log()
            .contains("answered as unknown without asking the leader"),
        "the follower did not say it refused made-up API keys over the rate"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_or_join_token_created_through_another_node_works_at_once() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    let leader = c.leader(0).await?;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();

    phase!(
        "keys created through the leader are used at once on the followers, for reads and writes"
    );
    for i in 0..20 {
        let created = c
            .api(leader)
            .post_ok(
                "/v1/api-keys",
                &json!({"name": format!("fresh{i}"), "scope": "admin"}),
            )
            .await?;
        let key = created["key"].as_str().context("no key")?.to_owned();
        let read = c.api_with_key(followers[i % 2], &key);
        let (status, body) = read.get("/v1/users").await?;
        assert_eq!(status, StatusCode::OK, "read with a fresh key: {body}");
        let write = c.api_with_key(followers[(i + 1) % 2], &key);
        let user = json!({"name": format!("fresh{i}"), "email": format!("fresh{i}@example.com")});
        let (status, body) = write.send(Method::POST, "/v1/users", &user).await?;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "write with a fresh key: {body}"
        );
    }

    let mut rechecked = 0;
    for f in &followers {
        rechecked += metric(
            &c,
            *f,
            "warren_unknown_id_checks_total{kind=\"api_key\",outcome=\"leader_read\"}",
        )
        .await?;
    }
    phase!("{rechecked} of those uses came before the key reached the follower (looked up on the leader)");

    phase!("a join token created through the leader admits a node through a follower at once");
    let created = c.api(leader).post_ok("/v1/join-tokens", &json!({})).await?;
    let token = created["token"].as_str().context("no token")?.to_owned();
    let peer = c.nodes[followers[0]].cluster_addr.clone();
    let mut n4 = TestNode::new(c.tmp.path(), "n4", &c.env);
    n4.join(&peer, &token, false)?;
    c.nodes.push(n4);
    c.api(3).wait_healthy(Duration::from_secs(30)).await?;
    Ok(())
}

/// An echo server: answers every byte, closes when the client does.
async fn echo_server() -> anyhow::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// A connection to `addr` that echoed a probe.
async fn echoing(addr: &str) -> anyhow::Result<TcpStream> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    s.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await??;
    anyhow::ensure!(&buf == b"ping", "echoed {buf:?}");
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_past_the_l4_limit_are_refused_until_one_closes() -> anyhow::Result<()> {
    const LIMIT: usize = 4;
    let limit = LIMIT.to_string();
    let c = Cluster::start_with_env(1, &[("WARREN_L4_MAX_CONNECTIONS", &limit)]).await?;
    let api = c.api(0);
    let upstream = echo_server().await?;
    let port = free_port();
    api.post_ok(
        "/v1/policies",
        &json!({"name": "loopback", "allow": {"source_cidr": "127.0.0.0/8"}}),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &json!({"name": "echo", "route": {"tcp": {"port": port}},
                "targets": [upstream.to_string()], "policies": ["loopback"]}),
    )
    .await?;
    let addr = format!("{}:{port}", c.nodes[0].l4_ip);

    phase!("{LIMIT} connections through the TCP resource, held open");
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        match echoing(&addr).await {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => bail!("the TCP resource never answered: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut held = vec![first];
    for _ in 1..LIMIT {
        held.push(echoing(&addr).await?);
    }

    phase!("one more is closed at once, and the node says why");
    let mut extra = TcpStream::connect(&addr).await?;
    let _ = extra.write_all(b"ping").await;
    let mut buf = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a connection past --l4-max-connections was served: {read:?}"
    );
    let said = "connection limit reached (4 open, --l4-max-connections)";
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.nodes[0].log().contains(said) {
        anyhow::ensure!(Instant::now() < deadline, "no log line about the limit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The held ones still work.
    for s in &mut held {
        s.write_all(b"more").await?;
        s.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"more");
    }

    phase!("one held connection closes: a new one is served again");
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match echoing(&addr).await {
            Ok(s) => {
                held.push(s);
                break;
            }
            Err(e) if Instant::now() > deadline => {
                bail!("no connection was served after one closed: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(())
}
