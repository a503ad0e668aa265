//! The connection bounds of the admin API and the HTTPS proxy, black box: a client
//! dripping its request header is cut off, and connections beyond the limit are closed at
//! once (and counted) while the listener keeps answering once they are gone.

use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use warren_tests::{phase, raw, Cluster};

/// Connections the admin API serves at once (`warren_node::admin::ConnLimits`).
const MAX_CONNECTIONS: usize = 512;
/// The proxy's limit in this test (`--proxy-max-connections`).
const PROXY_MAX_CONNECTIONS: usize = 16;

/// Whether the peer closed `s` within `within` (EOF or a reset), reading what it sends.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_excess_admin_connections_are_closed() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let limit = PROXY_MAX_CONNECTIONS.to_string();
    let c = Cluster::start_with_env(1, &[("WARREN_PROXY_MAX_CONNECTIONS", &limit)]).await?;
    let addr = c.nodes[0].admin_addr.clone();
    let ca = std::fs::read_to_string(c.ca())?;
    let tls = raw::tls_config(&[&ca], &[])?;
    let ip = addr.rsplit_once(':').context("admin address")?.0.to_owned();

    phase!("a request header dripped one byte at a time is cut off");
    let mut s = raw::connect(&addr, &ip, &tls).await?;
    s.write_all(b"GET /v1/health HTTP/1.1\r\nhost: warren\r\nx-slow: ")
        .await?;
    let mut cut_off = false;
    // Two bytes a second would keep this header coming for 60 s.
    for _ in 0..120 {
        if s.write_all(b"a").await.is_err() || s.flush().await.is_err() {
            cut_off = true;
            break;
        }
        if closed_within(&mut s, Duration::from_millis(500)).await {
            cut_off = true;
            break;
        }
    }
    assert!(cut_off, "the admin API waited a minute for one header");

    phase!("connections beyond {MAX_CONNECTIONS} are closed at once; the API answers again when they are gone");
    let mut held = Vec::with_capacity(MAX_CONNECTIONS);
    for _ in 0..MAX_CONNECTIONS {
        held.push(TcpStream::connect(&addr).await?);
    }
    // Accepted after the held ones: at least the limit is open, so it is closed at once
    // (the held ones, silent, would only be closed by the 10 s handshake timeout).
    let mut extra = TcpStream::connect(&addr).await?;
    assert!(
        closed_within(&mut extra, Duration::from_secs(5)).await,
        "a connection past the limit was kept open"
    );
    drop(held);
    let api = c.api(0);
    let mut answered = false;
    for _ in 0..200 {
        if api
            .get("/v1/health")
            .await
            .is_ok_and(|(s, _)| s.is_success())
        {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        answered,
        "the API did not answer after the extra connections closed"
    );
    let refused = metric(&c, &ca, "warren_admin_connections_refused_total").await?;
    assert!(refused >= 1, "admin connections refused: {refused}");

    phase!("the HTTPS proxy: connections beyond --proxy-max-connections are closed at once; silent ones end at the handshake bound");
    let https = c.nodes[0].https_addr.clone();
    let mut held = Vec::with_capacity(PROXY_MAX_CONNECTIONS);
    for _ in 0..PROXY_MAX_CONNECTIONS {
        held.push(TcpStream::connect(&https).await?);
    }
    let mut extra = TcpStream::connect(&https).await?;
    assert!(
        closed_within(&mut extra, Duration::from_secs(5)).await,
        "a proxy connection past the limit was kept open"
    );
    // The held connections never start TLS: the 10 s handshake bound closes them.
    for (i, s) in held.iter_mut().enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(30)).await,
            "silent proxy connection {i} was kept open"
        );
    }
    let refused = metric(&c, &ca, "warren_proxy_connections_refused_total").await?;
    assert!(refused >= 1, "proxy connections refused: {refused}");
    assert_eq!(metric(&c, &ca, "warren_proxy_connections").await?, 0);
    Ok(())
}

/// The value of the unlabelled metric `name` on node 0's `/metrics`.
async fn metric(c: &Cluster, ca: &str, name: &str) -> anyhow::Result<u64> {
    let text = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
        .build()?
        .get(format!("https://{}/metrics", c.nodes[0].admin_addr))
        .bearer_auth(&c.admin_key)
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no {name} in {text}"))
}
