//! Test harness: real `warren-node` and `warren` processes on loopback.
//!
//! A [`Cluster`] starts nodes with `init` and `join` in a temporary directory, each with
//! its own ports, talks to them over the admin API ([`Api`]) and the CLI, and kills every
//! process it started when dropped. Node logs are kept and printed when a test fails.
//!
//! Binaries are built (incrementally) on first use with the same cargo that runs the tests,
//! so a test never runs against stale binaries.
//!
//! Real peers for web access: [`oidc::Idp`] (an OpenID provider), [`oidc::browser`]
//! (headless Chromium), [`upstream::Upstream`] (the application behind the proxy) and
//! [`certs`] (throwaway TLS certificates). For hostile clients: [`hostile`] (nginx, a WSGI
//! app and an upgrade-happy backend) and [`raw`] (exact HTTP/1.1 bytes and HTTP/2 frames).

pub mod access;
pub mod bench_access;
pub mod certs;
pub mod collected;
pub mod hostile;
pub mod netlab;
pub mod oidc;
pub mod raw;
pub mod smtp;
pub mod upstream;

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Logs a test phase with the time since the test started.
#[macro_export]
macro_rules! phase {
    ($($arg:tt)*) => {
        eprintln!("[{:>8.3}s] == {}", $crate::since_start().as_secs_f64(), format!($($arg)*))
    };
}

/// Time since the harness was first used in this process.
pub fn since_start() -> Duration {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// Paths of the binaries under test.
pub struct Bins {
    /// `warren-node`.
    pub node: PathBuf,
    /// `warren`.
    pub warren: PathBuf,
    /// `warren-agent`.
    pub agent: PathBuf,
}

/// Builds the binaries once per test process and returns their paths.
///
/// `WARREN_TEST_BIN_DIR=<dir>` takes them from `dir` instead, unbuilt: to run the tests
/// against binaries built elsewhere (an older version, to see a test fail without a fix).
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        if let Some(dir) = std::env::var_os("WARREN_TEST_BIN_DIR").map(PathBuf::from) {
            return Bins {
                node: dir.join("warren-node"),
                warren: dir.join("warren"),
                agent: dir.join("warren-agent"),
            };
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        let release = std::env::var("WARREN_TEST_RELEASE").is_ok_and(|v| v == "1");
        let mut cmd = Command::new(cargo);
        // The test process carries the test crate's CARGO_* variables; build scripts that
        // watch them (ring watches CARGO_MANIFEST_DIR) would rebuild for nothing.
        for (k, _) in std::env::vars() {
            if k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
                cmd.env_remove(k);
            }
        }
        cmd.current_dir(&root)
            .args(["build", "--quiet", "--workspace", "--bins"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        let dir = target.join(if release { "release" } else { "debug" });
        Bins {
            node: dir.join("warren-node"),
            warren: dir.join("warren"),
            agent: dir.join("warren-agent"),
        }
    })
}

/// `warren-node-next`: `warren-node` built with `--features format-next` (the next stored
/// and wire format, for rolling-upgrade tests), next to the binaries under test. Not built
/// here (a second feature set would relink every binary); `scripts/test` builds it.
pub fn next_node_binary() -> anyhow::Result<PathBuf> {
    let path = bins()
        .node
        .parent()
        .context("the binaries' directory")?
        .join("warren-node-next");
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build it with `cargo build -p warren-node --features format-next --locked && cp target/debug/warren-node target/debug/warren-node-next` (scripts/test does), then run the test again",
        path.display()
    );
    Ok(path)
}

/// A free TCP+UDP port on 127.0.0.1 (both bound once to check, then released).
///
/// Taken below the kernel's ephemeral range (32768-60999 by default): a port from that
/// range can be taken by any outgoing connection between this check and the node binding
/// it, or while a killed node is down before it restarts on the same ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test binaries of one run start at different places, so that a port a previous one
    // still holds (a process winding down) is not the first tried.
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let port = (LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        let Ok(_tcp) = TcpListener::bind(("127.0.0.1", port)) else {
            continue;
        };
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair found");
}

/// One node process and where it lives.
pub struct TestNode {
    /// Node name.
    pub name: String,
    /// Its data directory.
    pub dir: PathBuf,
    /// Cluster (QUIC) address.
    pub cluster_addr: String,
    /// Admin API address.
    pub admin_addr: String,
    /// HTTPS proxy address.
    pub https_addr: String,
    /// HTTP (redirect) address.
    pub http_addr: String,
    /// IP address its TCP resources listen on (each node its own loopback address).
    pub l4_ip: String,
    /// Extra environment for every start.
    pub env: Vec<(String, String)>,
    /// The `warren-node` binary it runs from its next start on: `None` is the one under
    /// test ([`bins`]); see [`TestNode::with_binary`].
    pub binary: Option<PathBuf>,
    child: Option<Child>,
    log_dir: PathBuf,
    starts: u32,
}

impl TestNode {
    /// A node description with fresh ports (not started).
    pub fn new(base: &Path, name: &str, env: &[(String, String)]) -> Self {
        let mut node = Self::with_fresh_ports(base, name, env);
        // `WARREN_TEST_HTTP_PORT`: every node's HTTP listener on its own loopback address
        // at this port (ACME HTTP-01 validation connects to one fixed port).
        if let Some((_, port)) = env.iter().find(|(k, _)| k == "WARREN_TEST_HTTP_PORT") {
            node.http_addr = format!("{}:{port}", node.l4_ip);
        }
        node
    }

    fn with_fresh_ports(base: &Path, name: &str, env: &[(String, String)]) -> Self {
        Self {
            name: name.to_owned(),
            dir: base.join(name),
            cluster_addr: format!("127.0.0.1:{}", free_port()),
            admin_addr: format!("127.0.0.1:{}", free_port()),
            https_addr: format!("127.0.0.1:{}", free_port()),
            http_addr: format!("127.0.0.1:{}", free_port()),
            l4_ip: {
                static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!("127.0.{}.{}", 10 + (n / 250) % 200, 1 + n % 250)
            },
            env: {
                // Every node its own relay port: the default (the cluster IP, port 7401)
                // would be taken by the first node on 127.0.0.1. A caller's value wins.
                let mut e = vec![("WARREN_RELAY_LISTEN".to_owned(), "127.0.0.1:0".to_owned())];
                e.extend(env.iter().cloned());
                e
            },
            binary: None,
            child: None,
            log_dir: base.join("logs"),
            starts: 0,
        }
    }

    /// The same node with its cluster (QUIC) address on `ip` (same port; an IPv6 address
    /// is put in brackets).
    pub fn with_cluster_ip(mut self, ip: &str) -> Self {
        let port = self
            .cluster_addr
            .rsplit_once(':')
            .map_or("", |(_, p)| p)
            .to_owned();
        self.cluster_addr = if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        };
        self
    }

    /// The same node running another `warren-node` binary (another build, for upgrade
    /// tests) from its next start on.
    pub fn with_binary(mut self, path: &Path) -> Self {
        self.binary = Some(path.to_owned());
        self
    }

    fn spawn(&mut self, args: &[&str]) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(&self.log_dir)?;
        self.starts += 1;
        let out = self
            .log_dir
            .join(format!("{}.{}.out", self.name, self.starts));
        let err = self
            .log_dir
            .join(format!("{}.{}.err", self.name, self.starts));
        let mut cmd = Command::new(self.binary.as_deref().unwrap_or(&bins().node));
        cmd.args(args)
            // WARREN_TEST_NODE_LOG overrides the nodes' filter (a debugging aid).
            .env(
                "WARREN_LOG",
                std::env::var("WARREN_TEST_NODE_LOG")
                    .unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .env("WARREN_HTTPS_ADDR", &self.https_addr)
            .env("WARREN_HTTP_ADDR", &self.http_addr)
            .env("WARREN_L4_ADDR", &self.l4_ip)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().context("spawning warren-node")?);
        Ok(out)
    }

    fn node_args(&self) -> Vec<String> {
        vec![
            "--data-dir".into(),
            self.dir.display().to_string(),
            "--name".into(),
            self.name.clone(),
            "--cluster-addr".into(),
            self.cluster_addr.clone(),
            "--admin-addr".into(),
            self.admin_addr.clone(),
        ]
    }

    /// Starts `warren-node init`; returns (admin key, join token) once printed.
    pub fn init(&mut self) -> anyhow::Result<(String, String)> {
        let mut args = vec!["init".to_owned()];
        args.extend(self.node_args());
        let out = self.spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        let text = self.wait_output(&out, "join token", Duration::from_secs(30))?;
        let key = regex::Regex::new(r"wrn_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")?
            .find(&text)
            .context("no admin key in init output")?
            .as_str()
            .to_owned();
        let token = regex::Regex::new(r"wjt1_[A-Za-z0-9_-]+")?
            .find(&text)
            .context("no join token in init output")?
            .as_str()
            .to_owned();
        Ok((key, token))
    }

    /// Starts `warren-node join` and waits until it reports that it joined.
    pub fn join(&mut self, peer: &str, token: &str, learner: bool) -> anyhow::Result<()> {
        let mut args = vec!["join".to_owned()];
        args.extend(self.node_args());
        args.extend(["--peer".into(), peer.into(), "--token".into(), token.into()]);
        if learner {
            args.push("--learner".into());
        }
        let out = self.spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        self.wait_output(&out, "Joined cluster", Duration::from_secs(60))?;
        Ok(())
    }

    /// Runs `warren-node join` expecting it to fail; returns its stderr.
    pub fn join_expect_failure(&mut self, peer: &str, token: &str) -> anyhow::Result<String> {
        let mut args = vec!["join".to_owned()];
        args.extend(self.node_args());
        args.extend(["--peer".into(), peer.into(), "--token".into(), token.into()]);
        let out = Command::new(&bins().node)
            .args(&args)
            .env("WARREN_LOG", "warn")
            .env("WARREN_HTTPS_ADDR", &self.https_addr)
            .env("WARREN_HTTP_ADDR", &self.http_addr)
            .stdin(Stdio::null())
            .output()?;
        if out.status.success() {
            bail!("join succeeded but was expected to fail");
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Starts `warren-node run` on the existing data directory.
    pub fn run(&mut self) -> anyhow::Result<()> {
        let dir = self.dir.display().to_string();
        let out = self.spawn(&["run", "--data-dir", &dir])?;
        self.wait_output(&out, "Serving node", Duration::from_secs(30))?;
        Ok(())
    }

    /// Starts `warren-node run` on the existing data directory expecting the process to
    /// exit on its own (it refuses to start) within `timeout`; returns its exit status and
    /// what it logged.
    pub fn run_expecting_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<(ExitStatus, String)> {
        let dir = self.dir.display().to_string();
        self.spawn(&["run", "--data-dir", &dir])?;
        let mut child = self.child.take().context("not started")?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} was expected to exit but still ran after {timeout:?}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let err = self
            .log_dir
            .join(format!("{}.{}.err", self.name, self.starts));
        Ok((status, std::fs::read_to_string(err).unwrap_or_default()))
    }

    /// Everything this node logged (stderr), every start in order.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .filter_map(|i| {
                std::fs::read_to_string(self.log_dir.join(format!("{}.{i}.err", self.name))).ok()
            })
            .collect()
    }

    /// What this node logged (stderr) since its latest start.
    pub fn log_since_start(&self) -> String {
        std::fs::read_to_string(
            self.log_dir
                .join(format!("{}.{}.err", self.name, self.starts)),
        )
        .unwrap_or_default()
    }

    /// Moves the data directory of this stopped node into the directory `to` (which may be
    /// a mount point); the node runs from there from now on.
    pub fn move_data_dir(&mut self, to: &Path) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} is running", self.name);
        std::fs::create_dir_all(to)?;
        // `cp -a` keeps modes and works across file systems, which a rename does not.
        let status = Command::new("cp")
            .arg("-a")
            .arg(self.dir.join("."))
            .arg(to)
            .status()
            .context("running cp")?;
        anyhow::ensure!(status.success(), "copying {} failed", self.dir.display());
        std::fs::remove_dir_all(&self.dir)?;
        self.dir = to.to_owned();
        Ok(())
    }

    fn wait_output(
        &mut self,
        path: &Path,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.contains(needle) {
                return Ok(text);
            }
            if let Some(child) = &mut self.child {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "{} exited with {status} before printing {needle:?}:\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Its pid, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait (at most 20 s) and return the exit status.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("{} did not exit within 20 s of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of every log of this node.
    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        for i in 1..=self.starts {
            for ext in ["out", "err"] {
                let p = self.log_dir.join(format!("{}.{i}.{ext}", self.name));
                if let Ok(text) = std::fs::read_to_string(&p) {
                    let lines: Vec<&str> = text.lines().collect();
                    let from = lines.len().saturating_sub(40);
                    s.push_str(&format!(
                        "--- {} ---\n{}\n",
                        p.display(),
                        lines[from..].join("\n")
                    ));
                }
            }
        }
        s
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A cluster of test nodes.
pub struct Cluster {
    /// Temporary directory holding every data directory and log.
    pub tmp: tempfile::TempDir,
    /// The nodes, in creation order (`n1`, `n2`, ...).
    pub nodes: Vec<TestNode>,
    /// The bootstrap admin key.
    pub admin_key: String,
    /// The first join token.
    pub join_token: String,
    /// Environment given to every node.
    pub env: Vec<(String, String)>,
    /// IP address of every node's cluster (QUIC) address: 127.0.0.1, unless the cluster
    /// was started with [`Cluster::start_on`].
    pub cluster_ip: String,
}

impl Cluster {
    /// Starts `voters` nodes: `n1` by init, the rest by join through `n1`.
    pub async fn start(voters: usize) -> anyhow::Result<Self> {
        Self::start_with_env(voters, &[]).await
    }

    /// Like [`Cluster::start`], with extra environment for every node.
    pub async fn start_with_env(voters: usize, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_on_with_env(voters, "127.0.0.1", env).await
    }

    /// Like [`Cluster::start`], with every node's cluster (QUIC) address on `ip` (an address
    /// of this network namespace, say one end of a veth, that agents in other namespaces
    /// can reach) instead of 127.0.0.1. The admin, HTTPS and TCP-resource listeners stay on
    /// loopback.
    pub async fn start_on(voters: usize, ip: &str) -> anyhow::Result<Self> {
        Self::start_on_with_env(voters, ip, &[]).await
    }

    /// [`Cluster::start_on`] with extra environment for every node.
    pub async fn start_on_with_env(
        voters: usize,
        ip: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        since_start();
        let tmp = tempfile::Builder::new().prefix("warren-test-").tempdir()?;
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut n1 = TestNode::new(tmp.path(), "n1", &env).with_cluster_ip(ip);
        phase!("init n1");
        let (admin_key, join_token) = n1.init()?;
        let mut c = Self {
            tmp,
            nodes: vec![n1],
            admin_key,
            join_token,
            env,
            cluster_ip: ip.to_owned(),
        };
        c.api(0).wait_healthy(Duration::from_secs(30)).await?;
        for _ in 1..voters {
            c.add_node(false).await?;
        }
        Ok(c)
    }

    /// Joins one more node (through `n1`, or the first running node).
    pub async fn add_node(&mut self, learner: bool) -> anyhow::Result<usize> {
        let token = self.join_token.clone();
        self.add_node_with(&token, learner).await
    }

    /// Joins one more node with join token `token` (through `n1`, or the first running
    /// node); `learner` passes `--learner`.
    pub async fn add_node_with(&mut self, token: &str, learner: bool) -> anyhow::Result<usize> {
        let name = format!("n{}", self.nodes.len() + 1);
        let peer = self
            .nodes
            .iter_mut()
            .find_map(|n| n.is_running().then(|| n.cluster_addr.clone()))
            .context("no running node to join through")?;
        let mut node = self.new_node(&name);
        phase!("join {name}{}", if learner { " as a learner" } else { "" });
        node.join(&peer, token, learner)?;
        self.nodes.push(node);
        let i = self.nodes.len() - 1;
        self.api(i).wait_healthy(Duration::from_secs(30)).await?;
        Ok(i)
    }

    /// A node that is not started yet, named `name`, with the cluster's environment.
    pub fn new_node(&self, name: &str) -> TestNode {
        TestNode::new(self.tmp.path(), name, &self.env).with_cluster_ip(&self.cluster_ip)
    }

    /// The CA file.
    pub fn ca(&self) -> PathBuf {
        self.nodes[0].dir.join("ca.pem")
    }

    /// An admin API client for node `i` with the bootstrap key.
    pub fn api(&self, i: usize) -> Api {
        self.api_with_key(i, &self.admin_key)
    }

    /// An admin API client for node `i` with another key.
    pub fn api_with_key(&self, i: usize, key: &str) -> Api {
        Api::new(&self.nodes[i].admin_addr, key, &self.ca())
    }

    /// Node `i`'s `/metrics` (it needs no quorum).
    pub async fn metrics_text(&self, i: usize) -> anyhow::Result<String> {
        let ca = std::fs::read(self.ca())?;
        Ok(reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .timeout(Duration::from_secs(5))
            .build()?
            .get(format!("https://{}/metrics", self.nodes[i].admin_addr))
            .bearer_auth(&self.admin_key)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// Index of the current leader, as node `asked` reports it.
    pub async fn leader(&self, asked: usize) -> anyhow::Result<usize> {
        let status = self.api(asked).get_ok("/v1/cluster").await?;
        let name = status["leader"].as_str().context("no leader")?.to_owned();
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("leader {name} is not a test node"))
    }

    /// Waits until node `asked` reports a leader other than `not`, returning it.
    pub async fn wait_leader(
        &self,
        asked: usize,
        not: Option<usize>,
        timeout: Duration,
    ) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(l) = self.leader(asked).await {
                if Some(l) != not {
                    return Ok(l);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no new leader seen by {} within {timeout:?}",
                    self.nodes[asked].name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the `warren` CLI against node `i`; returns (success, stdout, stderr).
    pub fn warren(&self, i: usize, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(&bins().warren)
            .arg("admin")
            .args(args)
            .env(
                "WARREN_ADDR",
                format!("https://{}", self.nodes[i].admin_addr),
            )
            .env("WARREN_CA", self.ca())
            .env("WARREN_API_KEY", &self.admin_key)
            .stdin(Stdio::null())
            .output()
            .expect("running warren");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The cluster id, from n1's node.json.
    pub fn cluster_id_hex(&self) -> anyhow::Result<String> {
        let text = std::fs::read_to_string(self.nodes[0].dir.join("node.json"))?;
        let v: Value = serde_json::from_str(&text)?;
        Ok(v["cluster_id"]
            .as_str()
            .context("no cluster_id")?
            .to_owned())
    }

    /// Everything the nodes logged (stderr), leaving out what `init` printed to stdout on
    /// purpose (the admin key and join token, shown once).
    pub fn logs_after_init(&self) -> String {
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(self.tmp.path().join("logs")) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "err") {
                    all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        all
    }

    /// Every node's log tail.
    pub fn logs(&self) -> String {
        self.nodes.iter().map(TestNode::log_tail).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("==== node logs ====\n{}", self.logs());
        }
        for n in &mut self.nodes {
            n.kill9();
        }
        if std::env::var("WARREN_TEST_KEEP_LOGS").is_ok() {
            let keep = std::env::temp_dir().join(format!("warren-logs-{}", std::process::id()));
            if std::fs::rename(self.tmp.path().join("logs"), &keep).is_ok() {
                eprintln!("node logs kept in {}", keep.display());
            }
        }
    }
}

/// A client of one node's admin API.
#[derive(Clone)]
pub struct Api {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Api {
    /// A client for `https://<addr>` trusting `ca`.
    pub fn new(addr: &str, key: &str, ca: &Path) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pem = std::fs::read(ca).expect("reading the CA");
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA PEM"))
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client");
        Self {
            base: format!("https://{addr}"),
            key: key.to_owned(),
            http,
        }
    }

    /// Sends a request with a raw body; returns status and JSON (Null if none).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        let resp = req.send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)?
        };
        Ok((status, v))
    }

    /// Sends JSON.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: &Value,
    ) -> anyhow::Result<(StatusCode, Value)> {
        self.raw(method, path, Some(&body.to_string())).await
    }

    /// GET.
    pub async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.raw(Method::GET, path, None).await
    }

    /// GET that must succeed.
    pub async fn get_ok(&self, path: &str) -> anyhow::Result<Value> {
        let (s, v) = self.get(path).await?;
        if !s.is_success() {
            bail!("GET {path}: {s} {v}");
        }
        Ok(v)
    }

    /// POST that must succeed.
    pub async fn post_ok(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let (s, v) = self.send(Method::POST, path, body).await?;
        if !s.is_success() {
            bail!("POST {path}: {s} {v}");
        }
        Ok(v)
    }

    /// Waits until `/v1/health` answers 200.
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((StatusCode::OK, _)) = self.get("/v1/health").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} not healthy within {timeout:?}", self.base);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Retries a POST until it succeeds or `timeout` passes; returns the time it took.
    pub async fn post_until_ok(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            match self.send(Method::POST, path, body).await {
                Ok((s, _)) if s.is_success() => return Ok(start.elapsed()),
                Ok((s, v)) => last = format!("{s} {v}"),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("POST {path} did not succeed within {timeout:?}; last: {last}")
    }

    /// Names of the entities listed at `path`.
    pub async fn names(&self, path: &str) -> anyhow::Result<Vec<String>> {
        let v = self.get_ok(path).await?;
        Ok(v["items"]
            .as_array()
            .context("no items")?
            .iter()
            .filter_map(|i| i["name"].as_str().map(str::to_owned))
            .collect())
    }
}

/// An HTTPS client for the proxy in tests: sends each of `hosts` to 127.0.0.1 (whatever
/// the port in the URL), trusts only `cert_pem`, follows no redirects.
pub fn web_client(cert_pem: &str, hosts: &[&str], timeout: Duration) -> reqwest::ClientBuilder {
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(cert_pem.as_bytes()).expect("a PEM certificate"),
        )
        .timeout(timeout);
    for h in hosts {
        b = b.resolve(h, "127.0.0.1:0".parse().expect("an address"));
    }
    b
}

/// The port of a `host:port` address.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("host:port")
}

/// The value of the unlabelled metric `name` in a Prometheus text (`None` if absent).
pub fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
