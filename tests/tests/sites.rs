//! Sites, black box: a real `warren-agent` enrolls with a one-time token, keeps tunnels to
//! the cluster, and every node serves the site's web and TCP resources through them.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use warren_tests::upstream::Upstream;
use warren_tests::{bins, certs, free_port, phase, Cluster};

/// A `warren-agent` process, killed when dropped.
struct Agent {
    child: Child,
    log: std::path::PathBuf,
}

impl Agent {
    fn start(
        state: &Path,
        token: Option<&str>,
        nodes: &[&str],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(&bins().agent);
        cmd.arg("--state-dir").arg(state);
        for n in nodes {
            cmd.args(["--node", n]);
        }
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        cmd.env("WARREN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log)?)
            .stderr(std::fs::File::create(log.with_extension("err"))?);
        Ok(Self {
            child: cmd.spawn().context("spawning warren-agent")?,
            log: log.to_owned(),
        })
    }

    fn log(&self) -> String {
        let out = std::fs::read_to_string(&self.log).unwrap_or_default();
        let err = std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default();
        format!("{out}{err}")
    }

    /// Waits for the process to exit (bounded) and returns its status and log.
    fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<(bool, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok((s.success(), self.log()));
            }
            if Instant::now() > deadline {
                bail!(
                    "warren-agent did not exit within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn web(cert_pem: &str) -> reqwest::Client {
    warren_tests::web_client(cert_pem, &["web.localhost"], Duration::from_secs(10))
        .build()
        .unwrap()
}

use warren_tests::port_of;

async fn get_echo(web: &reqwest::Client, port: u16) -> anyhow::Result<(StatusCode, String)> {
    let resp = web
        .get(format!("https://web.localhost:{port}/echo"))
        .send()
        .await?;
    Ok((resp.status(), resp.text().await?))
}

/// Polls (bounded) until `f` holds; returns how long it took.
async fn until<F, Fut>(what: &str, limit: Duration, mut f: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} did not happen within {limit:?}")
}

/// Sends one HTTP request over a raw TCP connection and returns the response text.
async fn http_over_tcp(addr: &str) -> anyhow::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await??;
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await??;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_serves_its_site_through_every_node_and_survives_a_node_loss() -> anyhow::Result<()>
{
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let app = Upstream::start("behind-the-site").await?;
    let mut cluster = Cluster::start(3).await?;
    let dir = tempfile::tempdir()?;
    let api = cluster.api(0);
    let (cert, key) = certs::self_signed(&["web.localhost"]);
    let web = web(&cert);
    let https: Vec<u16> = (0..3)
        .map(|i| port_of(&cluster.nodes[i].https_addr))
        .collect();
    let tcp_port = free_port();

    phase!("configure a site with a web and a TCP resource");
    api.post_ok("/v1/sites", &json!({"name": "hq"})).await?;
    api.post_ok(
        "/v1/certificates",
        &json!({"name": "web", "cert_pem": cert, "key_pem": key}),
    )
    .await?;
    api.post_ok(
        "/v1/policies",
        &json!({"name": "loopback", "allow": {"source_cidr": "127.0.0.0/8"}}),
    )
    .await?;
    api.post_ok(
        "/v1/policies",
        &json!({"name": "nobody", "allow": {"source_cidr": "192.0.2.0/24"}}),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &json!({"name": "web", "site": "hq", "route": {"http": {"domain": "web.localhost"}},
                "targets": [app.addr.to_string()], "http": {"public": true}}),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &json!({"name": "db", "site": "hq", "route": {"tcp": {"port": tcp_port}},
                "targets": [app.addr.to_string()], "policies": ["loopback"]}),
    )
    .await?;

    phase!("before any agent: a clear 502");
    let (status, body) = get_echo(&web, https[1]).await?;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("not connected"), "{body}");

    phase!("bad tokens are refused with a reason, nothing changes");
    let (ok, out, err) = cluster.warren(0, &["site-token", "hq", "--expires-in", "600"]);
    assert!(ok, "{err}");
    let token = out
        .lines()
        .find(|l| l.starts_with("wst1_"))
        .with_context(|| format!("no token in: {out}"))?
        .to_owned();
    let n1 = cluster.nodes[0].cluster_addr.clone();
    let mut forged = Agent::start(
        &dir.path().join("forged"),
        Some("wst1_AAAA"),
        &[&n1],
        &dir.path().join("forged.log"),
    )?;
    let (ok, log) = forged.wait_exit(Duration::from_secs(15))?;
    assert!(!ok && log.contains("--token"), "{log}");
    let mut bad = token.clone();
    bad.truncate(token.len() - 2);
    bad.push_str(if token.ends_with("AA") { "BB" } else { "AA" });
    let mut wrong = Agent::start(
        &dir.path().join("wrong"),
        Some(&bad),
        &[&n1],
        &dir.path().join("wrong.log"),
    )?;
    let (ok, log) = wrong.wait_exit(Duration::from_secs(20))?;
    assert!(!ok && log.contains("unknown or was already used"), "{log}");

    phase!("the agent enrolls through node 1 and learns the other nodes");
    let state = dir.path().join("agent");
    let _agent = Agent::start(&state, Some(&token), &[&n1], &dir.path().join("agent.log"))?;
    let took = until(
        "the site works through node 2",
        Duration::from_secs(20),
        || async { matches!(get_echo(&web, https[1]).await, Ok((StatusCode::OK, _))) },
    )
    .await?;
    eprintln!("site reachable through node 2 {took:?} after the agent started");
    for (i, port) in https.iter().enumerate() {
        until(
            &format!("the site works through node {}", i + 1),
            Duration::from_secs(5),
            || async { matches!(get_echo(&web, *port).await, Ok((StatusCode::OK, _))) },
        )
        .await?;
        let (status, body) = get_echo(&web, *port).await?;
        assert_eq!(status, StatusCode::OK, "node {}: {body}", i + 1);
        let v: Value = serde_json::from_str(&body)?;
        assert_eq!(v["upstream"], "behind-the-site");
    }
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.join("site.key"))?.permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600, "the agent key is private");

    phase!("the token worked once: a second agent with it is refused");
    let mut again = Agent::start(
        &dir.path().join("again"),
        Some(&token),
        &[&n1],
        &dir.path().join("again.log"),
    )?;
    let (ok, log) = again.wait_exit(Duration::from_secs(20))?;
    assert!(!ok && log.contains("unknown or was already used"), "{log}");

    phase!("an agent of another cluster is refused by this one");
    let other = Cluster::start(1).await?;
    other
        .api(0)
        .post_ok("/v1/sites", &json!({"name": "hq"}))
        .await?;
    let other_token = other
        .api(0)
        .post_ok("/v1/sites/hq/tokens", &json!({}))
        .await?["token"]
        .as_str()
        .context("no token")?
        .to_owned();
    let stranger_state = dir.path().join("stranger");
    let mut enroll_other = Agent::start(
        &stranger_state,
        Some(&other_token),
        &[&other.nodes[0].cluster_addr],
        &dir.path().join("stranger-enroll.log"),
    )?;
    until(
        "the stranger enrolls with its own cluster",
        Duration::from_secs(15),
        || async { stranger_state.join("site.json").exists() },
    )
    .await?;
    drop(enroll_other.child.kill());
    let _ = enroll_other.child.wait();
    let stranger = Agent::start(
        &stranger_state,
        None,
        &[&n1],
        &dir.path().join("stranger.log"),
    )?;
    until(
        "the stranger's tunnel is refused",
        Duration::from_secs(15),
        || async { stranger.log().contains("tunnel failed") },
    )
    .await?;
    let log = stranger.log();
    assert!(!log.contains("tunnel up"), "{log}");
    assert!(
        log.to_lowercase().contains("certificate") || log.contains("UnknownIssuer"),
        "{log}"
    );
    drop(stranger);
    drop(other);

    phase!("site list says it is connected, where, from which address and version");
    let (ok, table, err) = cluster.warren(0, &["site", "list"]);
    assert!(ok, "{err}");
    let row = table.lines().find(|l| l.contains("hq")).unwrap_or_default();
    assert!(
        row.contains("connected")
            && row.contains("127.0.0.1:")
            && row.contains(env!("CARGO_PKG_VERSION"))
            && cluster.nodes.iter().any(|n| row.contains(&n.name)),
        "{table}"
    );

    assert!(
        !_agent.log().contains('\u{1b}'),
        "no colour codes in the agent's log file"
    );

    phase!("a TCP resource on every node, checked by source address");
    for node in &cluster.nodes {
        let addr = format!("{}:{tcp_port}", node.l4_ip);
        let text = http_over_tcp(&addr).await?;
        assert!(
            text.starts_with("HTTP/1.1 200") && text.contains("behind-the-site"),
            "{addr}: {text}"
        );
    }
    api.send(
        reqwest::Method::PATCH,
        "/v1/resources/db",
        &json!({"policies": ["nobody"]}),
    )
    .await?;
    let addr = format!("{}:{tcp_port}", cluster.nodes[2].l4_ip);
    until(
        "the TCP port refuses a denied source",
        Duration::from_secs(5),
        || async {
            http_over_tcp(&addr)
                .await
                .map(|t| t.is_empty())
                .unwrap_or(true)
        },
    )
    .await?;
    // The probe that ended the wait may have been let in and then cut (node 3 applied the
    // change while it was open): now that node 3 has it, a new connection is refused.
    let text = http_over_tcp(&addr).await.unwrap_or_default();
    assert!(text.is_empty(), "a denied source got an answer: {text}");
    api.send(
        reqwest::Method::PATCH,
        "/v1/resources/db",
        &json!({"policies": ["loopback"]}),
    )
    .await?;
    until(
        "the TCP port allows loopback again",
        Duration::from_secs(5),
        || async {
            http_over_tcp(&addr)
                .await
                .is_ok_and(|t| t.starts_with("HTTP/1.1 200"))
        },
    )
    .await?;

    phase!("an open TCP flow is cut when the policy stops allowing it");
    let mut flow = tokio::net::TcpStream::connect(&addr).await?;
    flow.write_all(b"GET /echo HTTP/1.1\r\nHost: db\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), flow.read(&mut buf)).await??;
    assert!(
        n > 0 && buf.starts_with(b"HTTP/1.1 200"),
        "the flow works first"
    );
    api.send(
        reqwest::Method::PATCH,
        "/v1/resources/db",
        &json!({"policies": ["nobody"]}),
    )
    .await?;
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match flow.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "the open flow was not cut");

    phase!("node 3's metrics count the TCP flows by result and the site's streams and bytes");
    let text = cluster.metrics_text(2).await?;
    let value = |name: &str| warren_tests::metric_value(&text, name).unwrap_or(0);
    for result in ["allowed", "denied", "cut"] {
        assert!(
            value(&format!(
                "warren_l4_flows_total{{proto=\"tcp\",result=\"{result}\"}}"
            )) >= 1,
            "{result}:\n{text}"
        );
    }
    assert!(
        value("warren_site_streams_total{site=\"hq\",result=\"opened\"}") >= 2,
        "{text}"
    );
    for dir in ["to_site", "from_site"] {
        assert!(
            value(&format!(
                "warren_site_bytes_total{{site=\"hq\",direction=\"{dir}\"}}"
            )) > 30,
            "{dir}:\n{text}"
        );
    }
    api.send(
        reqwest::Method::PATCH,
        "/v1/resources/db",
        &json!({"policies": ["loopback"]}),
    )
    .await?;

    phase!("a UDP resource behind the site: datagrams both ways through every node");
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let echo_addr = echo.local_addr()?;
    let echo_task = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = echo.send_to(&reply, from).await;
        }
    });
    let udp_port = free_port();
    api.post_ok(
        "/v1/resources",
        &json!({"name": "dgram", "site": "hq", "route": {"udp": {"port": udp_port}},
                "targets": [echo_addr.to_string()], "policies": ["loopback"]}),
    )
    .await?;
    for node in &cluster.nodes {
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let to = format!("{}:{udp_port}", node.l4_ip);
        let mut got = None;
        for _ in 0..50 {
            client.send_to(b"ping", &to).await?;
            let mut buf = [0u8; 64];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(200), client.recv(&mut buf)).await
            {
                got = Some(buf[..n].to_vec());
                break;
            }
        }
        assert_eq!(got.as_deref(), Some(&b"echo:ping"[..]), "UDP through {to}");
    }
    echo_task.abort();

    phase!(
        "through the tunnel: a WebSocket (Chromium), a 64 MiB download and a 16 MiB upload intact"
    );
    let b = warren_tests::oidc::browser_async(
        warren_tests::oidc::BrowserArgs::new(format!("https://web.localhost:{}/echo", https[1]))
            .ws(format!("wss://web.localhost:{}/ws", https[1])),
    )
    .await?;
    assert_eq!(
        b.ws.as_deref(),
        Some("hello-ws"),
        "WebSocket through the site: {}",
        b.text
    );
    let total: u64 = 64 << 20;
    let mut resp = web
        .get(format!(
            "https://web.localhost:{}/download?bytes={total}",
            https[2]
        ))
        .timeout(Duration::from_secs(60))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut n = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        n += chunk.len() as u64;
        sha2::Digest::update(&mut hasher, &chunk);
    }
    assert_eq!(n, total);
    assert_eq!(
        hex::encode(sha2::Digest::finalize(hasher)),
        warren_tests::upstream::download_pattern_sha256(total)
    );
    let body: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
    let expected = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body));
    let up: Value = web
        .post(format!("https://web.localhost:{}/upload", https[0]))
        .timeout(Duration::from_secs(60))
        .body(body)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(up["bytes"], 16u64 << 20);
    assert_eq!(up["sha256"], expected.as_str());

    phase!("a target the agent finds unhealthy is left out: a clear 502");
    let sick_app = Upstream::start("sick").await?;
    api.post_ok(
        "/v1/resources",
        &json!({"name": "sick", "site": "hq",
                "route": {"http": {"domain": "web.localhost", "path_prefix": "/sick"}},
                "targets": [sick_app.addr.to_string()],
                "http": {"public": true, "health_check": {"path": "/status/500", "interval_s": 1, "failures": 1}}}),
    )
    .await?;
    until(
        "the sick target is reported and left out",
        Duration::from_secs(10),
        || async {
            web.get(format!("https://web.localhost:{}/sick/x", https[1]))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::BAD_GATEWAY)
        },
    )
    .await?;
    let text = web
        .get(format!("https://web.localhost:{}/sick/x", https[1]))
        .send()
        .await?
        .text()
        .await?;
    assert!(text.contains("No healthy server"), "{text}");
    let (status, _) = get_echo(&web, https[1]).await?;
    assert_eq!(
        status,
        StatusCode::OK,
        "the healthy resource on the same host still works"
    );

    phase!("SIGKILL node 1 (the agent's first tunnel): the other nodes keep serving");
    let killed = Instant::now();
    cluster.nodes[0].kill9();
    let took = until(
        "the site works through node 3 after node 1 died",
        Duration::from_secs(10),
        || async { matches!(get_echo(&web, https[2]).await, Ok((StatusCode::OK, _))) },
    )
    .await?;
    eprintln!(
        "first success through node 3 {took:?} after SIGKILL of node 1 ({:?})",
        killed.elapsed()
    );
    let (status, _) = get_echo(&web, https[1]).await?;
    assert_eq!(status, StatusCode::OK);

    phase!("the agent's network stops (SIGSTOP) and comes back: the site returns by itself");
    _agent.signal(nix::sys::signal::Signal::SIGSTOP);
    until("the site goes away", Duration::from_secs(15), || async {
        !matches!(get_echo(&web, https[1]).await, Ok((StatusCode::OK, _)))
    })
    .await?;
    let (ok, table, err) = cluster.warren(1, &["site", "get", "hq"]);
    assert!(ok, "{err}");
    assert!(
        table.contains("offline") && !table.contains("connected"),
        "the stopped agent's site is offline:\n{table}"
    );
    _agent.signal(nix::sys::signal::Signal::SIGCONT);
    let took = until("the site comes back", Duration::from_secs(20), || async {
        matches!(get_echo(&web, https[1]).await, Ok((StatusCode::OK, _)))
    })
    .await?;
    eprintln!("site back {took:?} after the agent resumed");

    phase!("restart node 1: the agent keeps working from its stored certificate");
    cluster.nodes[0].run()?;
    until(
        "node 1 serves the site again",
        Duration::from_secs(20),
        || async { matches!(get_echo(&web, https[0]).await, Ok((StatusCode::OK, _))) },
    )
    .await?;
    Ok(())
}
