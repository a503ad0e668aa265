//! A site's UDP resource under heavy traffic, black box: a real node and a real
//! `warren-agent` carry 20 000 datagrams each way while the node's per-flow policy recheck
//! (every second) and the agent's socket keep racing the tunnel stream's reader. Every
//! datagram must come back whole and in order (the old two-`read_exact` reader lost its
//! place in the stream the first time a length had been read when another branch won).
//!
//! Run against other builds with `WARREN_TEST_BIN_DIR` (for instance this build's node with
//! an older agent) to check that the two still understand each other.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use warren_tests::{bins, free_port, phase, Cluster};

/// A `warren-agent` process, killed when dropped.
struct Agent {
    child: Child,
}

impl Agent {
    fn start(state: &Path, token: &str, node: &str, log: &Path) -> anyhow::Result<Self> {
        let child = Command::new(&bins().agent)
            .arg("--state-dir")
            .arg(state)
            .args(["--node", node, "--token", token])
            .env("WARREN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log)?)
            .stderr(std::fs::File::create(log.with_extension("err"))?)
            .spawn()
            .context("spawning warren-agent")?;
        Ok(Self { child })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Datagram `i`: its number, then bytes whose count varies from 0 to 1199.
fn datagram(i: u32) -> Vec<u8> {
    let mut d = i.to_be_bytes().to_vec();
    d.extend((0..(i * 7919) % 1200).map(|b| (b as u8) ^ (i as u8)));
    d
}

/// What the echo target answers: the datagram, reversed.
fn answer(d: &[u8]) -> Vec<u8> {
    d.iter().rev().copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_datagrams_each_way_through_a_site_arrive_whole_and_in_order(
) -> anyhow::Result<()> {
    const N: u32 = 20_000;
    // Datagrams in flight at most: far below every queue on the way (the node's per-flow
    // queue holds 256, loopback socket buffers hundreds), so a loss would be a bug.
    const WINDOW: u32 = 48;
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let cluster = Cluster::start(1).await?;
    let api = cluster.api(0);
    let dir = tempfile::tempdir()?;

    phase!("a site with a UDP resource, an echo target behind it, an agent");
    let target = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let target_addr = target.local_addr()?;
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        let mut echoed = 0u64;
        while let Ok((n, from)) = target.recv_from(&mut buf).await {
            let _ = target.send_to(&answer(&buf[..n]), from).await;
            echoed += 1;
        }
        echoed
    });
    api.post_ok("/v1/sites", &json!({"name": "hq"})).await?;
    api.post_ok(
        "/v1/policies",
        &json!({"name": "loopback", "allow": {"source_cidr": "127.0.0.0/8"}}),
    )
    .await?;
    let udp_port = free_port();
    api.post_ok(
        "/v1/resources",
        &json!({"name": "dgram", "site": "hq", "route": {"udp": {"port": udp_port}},
                "targets": [target_addr.to_string()], "policies": ["loopback"]}),
    )
    .await?;
    let token = api.post_ok("/v1/sites/hq/tokens", &json!({})).await?["token"]
        .as_str()
        .context("no token")?
        .to_owned();
    let _agent = Agent::start(
        &dir.path().join("agent"),
        &token,
        &cluster.nodes[0].cluster_addr,
        &dir.path().join("agent.log"),
    )?;

    phase!("the flow works (a first datagram answered)");
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    client
        .connect(format!("{}:{udp_port}", cluster.nodes[0].l4_ip))
        .await?;
    let mut buf = vec![0u8; 65_535];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the UDP resource never answered; agent log:\n{}{}",
            std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("agent.err")).unwrap_or_default()
        );
        client.send(b"hello").await?;
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await
        {
            if buf[..n] == answer(b"hello") {
                break;
            }
        }
    }
    // Late answers to the retries above.
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(500), client.recv(&mut buf)).await
    {}

    phase!("{N} datagrams each way, {WINDOW} in flight, while the recheck ticks");
    let started = Instant::now();
    let mut sent = 0u32;
    for i in 0..N {
        while sent < N && sent < i + WINDOW {
            client.send(&datagram(sent)).await?;
            sent += 1;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), client.recv(&mut buf))
            .await
            .with_context(|| format!("answer {i} never came (datagram lost or stream stuck)"))??;
        anyhow::ensure!(
            buf[..n] == answer(&datagram(i)),
            "answer {i} is not datagram {i} reversed ({n} bytes): out of order or damaged"
        );
    }
    let took = started.elapsed();
    eprintln!("{N} round trips in {took:?}");
    echo.abort();
    Ok(())
}
