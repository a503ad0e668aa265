//! Sites behind a real NAT, black box: a real `warren-agent` in its own network namespace
//! behind a real NAT router (iptables MASQUERADE, unsolicited inbound dropped), next to a
//! real PostgreSQL and a small web app that nothing outside the site can reach, served
//! through a 3-node cluster: public web access through every node, `psql` through a TCP
//! resource, sign-in with a real OpenID provider in headless Chromium, the loss of the node
//! holding the agent's first tunnel, and a cut of the site's uplink.
//!
//! ```text
//! root namespace: nodes (QUIC on 10.99.N.1), test process, psql, Chromium, IdP
//!   | veth wrn<pid>  10.99.N.1/24          route 10.88.N.0/24 via 10.99.N.2 (so a direct try
//!   |                                      goes to the router, and nowhere else)
//! router namespace: wan 10.99.N.2  [MASQUERADE out wan; INPUT from wan dropped; FORWARD
//!   |               wan->lan only established/related]   lan 10.88.N.1
//! site namespace: eth0 10.88.N.2 — warren-agent, PostgreSQL :5432, web app :8080
//! ```
//!
//! Needs root (network namespaces), `iproute2`, `iptables`, PostgreSQL, `psql`, `python3`,
//! Node.js and Chromium: `scripts/install-test-deps`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use reqwest::StatusCode;
use serde_json::json;
use warren_tests::oidc::{browser_async, BrowserArgs, BrowserOutcome, Idp};
use warren_tests::{bins, certs, free_port, phase, Cluster};

const PYTHON: &str = "/usr/bin/python3";
const APP_PORT: u16 = 8080;
const PG_PORT: u16 = 5432;
/// A port the router itself listens on (on every interface), to show its WAN drops it.
const ROUTER_PORT: u16 = 9000;
const PG_PASSWORD: &str = "site-pg-secret";
const HOSTS: [&str; 3] = ["web.localhost", "app.localhost", "auth.localhost"];

/// The site's web app: plain text naming itself and the identity the proxy passed on.
const APP: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("%s\nuser: %s\npath: %s\n" % (sys.argv[3], self.headers.get("x-warren-user", "-"), self.path)).encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;

/// Connects once (exit 0) or fails (exit 1): a reachability probe run inside a namespace.
const PROBE: &str = r#"
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError as e:
    print(e)
    sys.exit(1)
"#;

/// A TCP listener that never answers anything: something on the router to knock at.
const LISTEN: &str = r#"
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
time.sleep(3600)
"#;

/// Runs a command to completion; its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    run_in(None, program, args)
}

/// [`run`] in working directory `dir` (one the user it switches to can enter).
fn run_in(dir: Option<&Path>, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(program);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip netns exec <ns> <args...>`.
fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// The namespaces, links, routes and processes of the NAT lab; all removed when dropped
/// (on panic too). Every name carries the test's pid.
struct Net {
    /// Third octet of the lab's subnets (10.99.N.0/24 WAN, 10.88.N.0/24 site LAN).
    n: u8,
    router: String,
    site: String,
    /// The root namespace's end of the WAN veth.
    veth: String,
    /// Processes started inside the namespaces (web app, router listener).
    children: Vec<Child>,
    /// PostgreSQL's binaries and data directory, once set up.
    pg: Option<(PathBuf, PathBuf)>,
    pg_dir: Option<tempfile::TempDir>,
}

impl Net {
    fn host_ip(&self) -> String {
        format!("10.99.{}.1", self.n)
    }

    fn router_wan(&self) -> String {
        format!("10.99.{}.2", self.n)
    }

    fn router_lan(&self) -> String {
        format!("10.88.{}.1", self.n)
    }

    fn site_ip(&self) -> String {
        format!("10.88.{}.2", self.n)
    }

    /// Removes what an earlier run of this test left behind if it was killed before its
    /// cleanup ran: namespaces named `warren-nat-<pid>-*` (and the processes inside them)
    /// and veths `wrn<pid>` whose test process is gone.
    fn remove_stale() {
        let Ok(list) = run("ip", &["netns", "list"]) else {
            return;
        };
        for ns in list.split_whitespace() {
            let Some(pid) = ns
                .strip_prefix("warren-nat-")
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            eprintln!("removing {ns}, left behind by test process {pid}");
            kill_all_in(ns);
            let _ = run("ip", &["netns", "del", ns]);
            let _ = run("ip", &["link", "del", &format!("wrn{pid}")]);
        }
    }

    /// Builds root <-> router <-> site with subnets nothing on this machine uses yet.
    fn up() -> anyhow::Result<Self> {
        if run("id", &["-u"])?.trim() != "0" {
            bail!("this test needs root (network namespaces, iptables): CI runs it as root");
        }
        Self::remove_stale();
        let pid = std::process::id();
        let addrs = run("ip", &["-o", "-4", "addr"])?;
        let routes = run("ip", &["-4", "route"])?;
        let n = (0..200u32)
            .map(|i| 20 + ((pid + i) % 200) as u8)
            .find(|n| {
                let wan = format!("10.99.{n}.");
                let lan = format!("10.88.{n}.");
                !addrs.contains(&wan)
                    && !addrs.contains(&lan)
                    && !routes.contains(&wan)
                    && !routes.contains(&lan)
            })
            .context("no free 10.99.N.0/24 and 10.88.N.0/24 pair")?;
        let net = Net {
            n,
            router: format!("warren-nat-{pid}-router"),
            site: format!("warren-nat-{pid}-site"),
            veth: format!("wrn{pid}"),
            children: Vec::new(),
            pg: None,
            pg_dir: None,
        };
        let (r, s, v) = (&net.router, &net.site, &net.veth);
        let wan = format!("{}/24", net.router_wan());
        let lan = format!("{}/24", net.router_lan());
        let host = format!("{}/24", net.host_ip());
        let site = format!("{}/24", net.site_ip());
        let site_net = format!("10.88.{n}.0/24");
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", r],
            vec!["netns", "add", s],
            vec![
                "link", "add", v, "type", "veth", "peer", "name", "wan", "netns", r,
            ],
            vec!["addr", "add", &host, "dev", v],
            vec!["link", "set", v, "up"],
            vec!["-n", r, "link", "set", "lo", "up"],
            vec!["-n", r, "addr", "add", &wan, "dev", "wan"],
            vec!["-n", r, "link", "set", "wan", "up"],
            vec![
                "-n", r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", s,
            ],
            vec!["-n", r, "addr", "add", &lan, "dev", "lan"],
            vec!["-n", r, "link", "set", "lan", "up"],
            vec!["-n", s, "link", "set", "lo", "up"],
            vec!["-n", s, "addr", "add", &site, "dev", "eth0"],
            vec!["-n", s, "link", "set", "eth0", "up"],
            vec![
                "-n",
                s,
                "route",
                "add",
                "default",
                "via",
                &lan[..lan.len() - 3],
            ],
            // The root namespace knows the way to the site's LAN (through the router), so
            // a direct attempt meets the router's rules, not a missing route.
            vec!["route", "add", &site_net, "via", &wan[..wan.len() - 3]],
        ];
        for step in steps {
            run("ip", &step)?;
        }
        for rule in warren_tests::netlab::NAT_ROUTER {
            in_ns(r, rule)?;
        }
        Ok(net)
    }

    /// Starts `python3 -c <script> <args>` inside `ns`, kept until the lab goes away.
    fn spawn_in(&mut self, ns: &str, script: &str, args: &[&str]) -> anyhow::Result<()> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, PYTHON, "-c", script])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning python3 in a namespace")?;
        self.children.push(child);
        Ok(())
    }

    /// Whether `host:port` accepts a TCP connection from inside `ns`.
    fn reachable_from(ns: &str, host: &str, port: u16) -> bool {
        in_ns(ns, &[PYTHON, "-c", PROBE, host, &port.to_string(), "1"]).is_ok()
    }

    /// Waits (bounded) until `host:port` answers from inside `ns`.
    fn wait_in(ns: &str, host: &str, port: u16, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while !Self::reachable_from(ns, host, port) {
            if start.elapsed() > limit {
                bail!("{host}:{port} did not answer inside {ns} within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Takes the router's site-side link down (true) or up again (false).
    fn cut_site(&self, down: bool) -> anyhow::Result<()> {
        let state = if down { "down" } else { "up" };
        run("ip", &["-n", &self.router, "link", "set", "lan", state])?;
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some((bin, data)) = &self.pg {
            let _ = Command::new("runuser")
                .current_dir(data.parent().unwrap_or(data))
                .args(["-u", "postgres", "--"])
                .arg(bin.join("pg_ctl"))
                .arg("-D")
                .arg(data)
                .args(["stop", "-m", "immediate", "-w", "-t", "10"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if std::thread::panicking() {
                if let Some(dir) = &self.pg_dir {
                    let log = std::fs::read_to_string(dir.path().join("server.log"));
                    eprintln!("==== postgres log ====\n{}", log.unwrap_or_default());
                }
            }
        }
        // Whatever still runs inside our own namespaces was started by this test.
        kill_all_in(&self.site);
        kill_all_in(&self.router);
        let site_net = format!("10.88.{}.0/24", self.n);
        let _ = run("ip", &["route", "del", &site_net]);
        let _ = run("ip", &["link", "del", &self.veth]);
        let _ = run("ip", &["netns", "del", &self.site]);
        let _ = run("ip", &["netns", "del", &self.router]);
    }
}

/// SIGKILLs every process inside network namespace `ns` (one of this test's own).
fn kill_all_in(ns: &str) {
    if let Ok(pids) = run("ip", &["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The newest PostgreSQL server binaries Debian installed.
fn pg_bin() -> anyhow::Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed: run scripts/install-test-deps")?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    Ok(found
        .pop()
        .context("no /usr/lib/postgresql/<version>/bin/initdb")?
        .1)
}

/// initdb (as `postgres`, password auth) and start PostgreSQL with TLS on the site's
/// address, inside the site namespace. Blocking.
fn start_pg(bin: &Path, dir: &Path, site_ns: &str, site_ip: &str, lan: &str) -> anyhow::Result<()> {
    let uid: u32 = run("id", &["-u", "postgres"])?.trim().parse()?;
    let gid: u32 = run("id", &["-g", "postgres"])?.trim().parse()?;
    let own = |p: &Path| std::os::unix::fs::chown(p, Some(uid), Some(gid));
    own(dir)?;
    let pwfile = dir.join("pwfile");
    std::fs::write(&pwfile, PG_PASSWORD)?;
    own(&pwfile)?;
    let data = dir.join("data");
    let initdb = bin.join("initdb");
    run_in(
        Some(dir),
        "runuser",
        &[
            "-u",
            "postgres",
            "--",
            initdb.to_str().context("path")?,
            "-D",
            data.to_str().context("path")?,
            "-A",
            "scram-sha-256",
            "-U",
            "postgres",
            &format!("--pwfile={}", pwfile.display()),
        ],
    )
    .context("initdb")?;
    let hba = data.join("pg_hba.conf");
    let mut text = std::fs::read_to_string(&hba)?;
    text.push_str(&format!("host all all {lan} scram-sha-256\n"));
    std::fs::write(&hba, text)?;
    let (cert, key) = certs::self_signed(&[site_ip]);
    for (name, pem) in [("server.crt", cert), ("server.key", key)] {
        let p = data.join(name);
        std::fs::write(&p, pem)?;
        own(&p)?;
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    }
    let opts = format!(
        "-c listen_addresses={site_ip} -c port={PG_PORT} -c unix_socket_directories={} -c ssl=on",
        dir.display()
    );
    let pg_ctl = bin.join("pg_ctl");
    run_in(
        Some(dir),
        "ip",
        &[
            "netns",
            "exec",
            site_ns,
            "runuser",
            "-u",
            "postgres",
            "--",
            pg_ctl.to_str().context("path")?,
            "-D",
            data.to_str().context("path")?,
            "-l",
            dir.join("server.log").to_str().context("path")?,
            "-w",
            "-t",
            "30",
            "start",
            "-o",
            &opts,
        ],
    )
    .context("pg_ctl start")?;
    Ok(())
}

/// `warren-agent` inside the site namespace, killed when dropped.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(ns: &str, state: &Path, token: &str, node: &str, log: &Path) -> anyhow::Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&bins().agent)
            .arg("--state-dir")
            .arg(state)
            .args(["--node", node, "--token", token])
            .env("WARREN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log)?)
            .stderr(std::fs::File::create(log.with_extension("err"))?)
            .spawn()
            .context("spawning warren-agent in the site namespace")?;
        Ok(Self {
            child,
            log: log.to_owned(),
        })
    }

    fn log(&self) -> String {
        let out = std::fs::read_to_string(&self.log).unwrap_or_default();
        let err = std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default();
        format!("{out}{err}")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("==== agent log ====\n{}", self.log());
        }
    }
}

/// An HTTPS client that sends the test's host names to loopback and trusts `cert`.
fn web(cert_pem: &str) -> reqwest::Client {
    warren_tests::web_client(cert_pem, &HOSTS, Duration::from_secs(3))
        .build()
        .unwrap()
}

use warren_tests::port_of;

/// GET `https://<host>:<port><path>`; status and body.
async fn get(
    web: &reqwest::Client,
    host: &str,
    port: u16,
    path: &str,
    cookie: Option<&str>,
) -> anyhow::Result<(StatusCode, String)> {
    let mut req = web.get(format!("https://{host}:{port}{path}"));
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = req.send().await?;
    Ok((resp.status(), resp.text().await?))
}

/// Whether the site's app answered through the proxy (its page, not a proxy error).
async fn app_ok(
    web: &reqwest::Client,
    host: &str,
    port: u16,
    cookie: Option<&str>,
    marker: &str,
) -> bool {
    matches!(get(web, host, port, "/", cookie).await,
        Ok((StatusCode::OK, body)) if body.contains(marker))
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} did not happen within {limit:?}")
}

/// Polls (bounded) until `f` succeeds; returns how long it took and its value, or the last
/// error.
async fn until_ok<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> anyhow::Result<(Duration, T)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return Ok((start.elapsed(), v)),
            Err(e) if start.elapsed() >= limit => {
                bail!("{what} did not happen within {limit:?}; last: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Runs `psql` from this (the root) namespace against `host:port`; its output.
async fn psql(host: &str, port: u16, sql: &str) -> anyhow::Result<String> {
    let conn = format!(
        "host={host} port={port} user=postgres dbname=postgres sslmode=require connect_timeout=5"
    );
    let out = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::process::Command::new("psql")
            .args([conn.as_str(), "-X", "-A", "-t", "-c", sql])
            .env("PGPASSWORD", PG_PASSWORD)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("psql ran over 15 s")??;
    if !out.status.success() {
        bail!(
            "psql {host}:{port} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Tries a TCP connection from this namespace for at most 2 s; `Err` says how it failed.
async fn connect_from_root(addr: &str) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 2 s (dropped)".into()),
    }
}

fn session_cookie(b: &BrowserOutcome, domain: &str) -> anyhow::Result<String> {
    let c = b
        .cookies
        .iter()
        .find(|c| c.name == "__Host-warren_session" && c.domain.trim_start_matches('.') == domain)
        .with_context(|| format!("no session cookie for {domain}: {:?}", b.cookies))?;
    Ok(format!("__Host-warren_session={}", c.value))
}

/// Lines of node logs that say an agent connected (terminal colours taken out).
fn agent_connections(cluster: &Cluster) -> Vec<String> {
    let colours = regex::Regex::new("\x1b\\[[0-9;]*m").expect("regex");
    colours
        .replace_all(&cluster.logs_after_init(), "")
        .lines()
        .filter(|l| l.contains("agent connected"))
        .map(str::to_owned)
        .collect()
}

/// How many agent tunnels node `i` holds, as its logs tell (connected minus disconnected).
fn tunnels_held(cluster: &Cluster, i: usize) -> usize {
    let prefix = format!("{}.", cluster.nodes[i].name);
    let Ok(entries) = std::fs::read_dir(cluster.tmp.path().join("logs")) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && name.ends_with(".err")
        })
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            text.matches("agent connected")
                .count()
                .saturating_sub(text.matches("agent disconnected").count())
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_behind_nat_serves_a_site_only_app_and_postgres_through_every_node(
) -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    // Build the binaries first, so the timings below are the test's own.
    tokio::task::spawn_blocking(bins).await?;
    let test_start = Instant::now();
    let marker = format!("hello from the site-only app {}", std::process::id());

    phase!("network: root namespace <-> NAT router <-> site");
    let mut net = Net::up()?;
    let (site_ns, router_ns) = (net.site.clone(), net.router.clone());
    let site_ip = net.site_ip();
    eprintln!(
        "root {} | router wan {} lan {} | site {site_ip}",
        net.host_ip(),
        net.router_wan(),
        net.router_lan()
    );
    net.spawn_in(&site_ns, APP, &[&site_ip, &APP_PORT.to_string(), &marker])?;
    net.spawn_in(&router_ns, LISTEN, &[&ROUTER_PORT.to_string()])?;
    let bin = pg_bin()?;
    let pg_major = bin
        .parent()
        .and_then(Path::file_name)
        .and_then(|v| v.to_str())
        .unwrap_or_default()
        .to_owned();
    let pg_dir = tempfile::Builder::new()
        .prefix("warren-nat-pg-")
        .tempdir()?;
    net.pg = Some((bin.clone(), pg_dir.path().join("data")));
    let pg = {
        let (dir, ns, ip) = (pg_dir.path().to_owned(), site_ns.clone(), site_ip.clone());
        let lan = format!("10.88.{}.0/24", net.n);
        tokio::task::spawn_blocking(move || start_pg(&bin, &dir, &ns, &ip, &lan))
    };
    net.pg_dir = Some(pg_dir);

    phase!("a 3-node cluster whose QUIC addresses the router can reach");
    let mut cluster = Cluster::start_on(3, &net.host_ip()).await?;
    let https: Vec<u16> = (0..3)
        .map(|i| port_of(&cluster.nodes[i].https_addr))
        .collect();
    let redirects: Vec<String> = https
        .iter()
        .map(|p| format!("https://auth.localhost:{p}/.warren/callback"))
        .collect();
    let idp = tokio::task::spawn_blocking(move || Idp::start(&redirects, &[])).await??;
    pg.await?.context("starting PostgreSQL in the site")?;
    phase!("PostgreSQL is up in the site");

    phase!("1. the site's app and database answer inside the site only; the router drops unsolicited inbound");
    Net::wait_in(&site_ns, &site_ip, APP_PORT, Duration::from_secs(10))?;
    assert!(Net::reachable_from(&site_ns, &site_ip, PG_PORT));
    Net::wait_in(
        &site_ns,
        &net.router_lan(),
        ROUTER_PORT,
        Duration::from_secs(10),
    )?;
    let app_addr = format!("{site_ip}:{APP_PORT}");
    let pg_addr = format!("{site_ip}:{PG_PORT}");
    let router_addr = format!("{}:{ROUTER_PORT}", net.router_wan());
    let (to_app, to_pg, to_router) = tokio::join!(
        connect_from_root(&app_addr),
        connect_from_root(&pg_addr),
        connect_from_root(&router_addr)
    );
    for (what, r) in [
        (&app_addr, &to_app),
        (&pg_addr, &to_pg),
        (&router_addr, &to_router),
    ] {
        eprintln!("direct connect from the root namespace to {what}: {r:?}");
        assert!(r.is_err(), "{what} is reachable from outside the site");
    }
    assert!(
        to_router.as_ref().is_err_and(|e| e.contains("dropped")),
        "the router's WAN must drop (not refuse) unsolicited inbound: {to_router:?}"
    );

    phase!("configure: site, certificate, identity provider, policies, resources");
    let api = cluster.api(0);
    let (cert, key) = certs::self_signed(&HOSTS);
    let web = web(&cert);
    let tcp_port = free_port();
    let app_target = format!("{site_ip}:{APP_PORT}");
    let pg_target = format!("{site_ip}:{PG_PORT}");
    api.post_ok("/v1/sites", &json!({"name": "hq"})).await?;
    api.post_ok(
        "/v1/certificates",
        &json!({"name": "local", "cert_pem": cert, "key_pem": key}),
    )
    .await?;
    api.post_ok(
        "/v1/identity-providers",
        &json!({"name": "test", "issuer": idp.issuer, "client_id": idp.client_id,
                "client_secret": idp.client_secret, "scopes": ["groups"], "groups_claim": "groups"}),
    )
    .await?;
    api.post_ok(
        "/v1/policies",
        &json!({"name": "loopback", "allow": {"source_cidr": "127.0.0.0/8"}}),
    )
    .await?;
    api.post_ok(
        "/v1/policies",
        &json!({"name": "admins", "allow": {"group": "admins"}}),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &json!({"name": "web", "site": "hq", "route": {"http": {"domain": "web.localhost"}},
                "targets": [app_target], "http": {"public": true}}),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &json!({"name": "app", "site": "hq", "route": {"http": {"domain": "app.localhost"}},
                "targets": [app_target], "policies": ["admins"]}),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &json!({"name": "db", "site": "hq", "route": {"tcp": {"port": tcp_port}},
                "targets": [pg_target], "policies": ["loopback"]}),
    )
    .await?;

    phase!("2. the agent behind the NAT enrolls through node 1; the app works through nodes 1, 2 and 3");
    let token = api
        .post_ok("/v1/sites/hq/tokens", &json!({"expires_in_s": 600}))
        .await?["token"]
        .as_str()
        .context("no token")?
        .to_owned();
    let dir = tempfile::tempdir()?;
    let first_node = cluster.nodes[0].cluster_addr.clone();
    let agent_started = Instant::now();
    let agent = Agent::start(
        &site_ns,
        &dir.path().join("agent-state"),
        &token,
        &first_node,
        &dir.path().join("agent.log"),
    )?;
    let took = until(
        "the site's app works through node 2",
        Duration::from_secs(30),
        || async { app_ok(&web, "web.localhost", https[1], None, &marker).await },
    )
    .await
    .with_context(|| agent.log())?;
    eprintln!("TIMING app reachable through node 2 {took:?} after the agent started");
    for (i, port) in https.iter().enumerate() {
        until(
            &format!("the site's app works through node {}", i + 1),
            Duration::from_secs(10),
            || async { app_ok(&web, "web.localhost", *port, None, &marker).await },
        )
        .await?;
        let (status, body) = get(&web, "web.localhost", *port, "/public", None).await?;
        assert_eq!(status, StatusCode::OK, "node {}: {body}", i + 1);
        assert!(
            body.contains(&marker) && body.contains("user: -"),
            "node {}: {body}",
            i + 1
        );
    }
    let enrolled = agent_started.elapsed();
    assert!(
        agent.log().contains("Enrolled as the agent of site \"hq\""),
        "{}",
        agent.log()
    );
    let seen = agent_connections(&cluster);
    eprintln!("node logs: {seen:#?}");
    let from_router = format!("remote={}:", net.router_wan());
    assert!(
        !seen.is_empty() && seen.iter().all(|l| l.contains(&from_router)),
        "nodes see the agent from the router's WAN address {}: {seen:#?}",
        net.router_wan()
    );
    let n1_log = std::fs::read_to_string(cluster.tmp.path().join("logs").join("n1.1.err"))?;
    assert!(
        n1_log.contains("agent connected"),
        "node 1 (given with --node) holds a tunnel"
    );

    phase!("3. psql from the root namespace reaches the site's PostgreSQL through each node's TCP port");
    let sql = "select 42, current_setting('server_version'), inet_server_addr(), \
               (select ssl from pg_stat_ssl where pid = pg_backend_pid())";
    for (i, node) in cluster.nodes.iter().enumerate() {
        let l4 = node.l4_ip.clone();
        let (took, last) = until_ok(
            &format!("psql through node {}", i + 1),
            Duration::from_secs(15),
            || psql(&l4, tcp_port, sql),
        )
        .await?;
        eprintln!(
            "psql through node {} ({l4}:{tcp_port}) in {took:?}: {last}",
            i + 1
        );
        let cols: Vec<&str> = last.split('|').collect();
        assert_eq!(cols.len(), 4, "{last}");
        assert_eq!(cols[0], "42");
        assert!(
            cols[1].starts_with(&format!("{pg_major}.")),
            "server version {} (installed: {pg_major}): {last}",
            cols[1]
        );
        assert_eq!(cols[2], site_ip, "the server is the one inside the site");
        assert_eq!(cols[3], "t", "TLS from psql to the server, end to end");
    }

    phase!("4. alice signs in with Chromium through node 2 and sees the site-only app");
    let alice_state = dir.path().join("alice.json");
    let url = format!("https://app.localhost:{}/from-browser", https[1]);
    let b = browser_async(
        BrowserArgs::new(&url)
            .login("alice", "alice-pw")
            .storage_out(&alice_state)
            .timeout(Duration::from_secs(30)),
    )
    .await?;
    assert!(b.url.starts_with(&url), "landed on {}: {}", b.url, b.text);
    assert_eq!(b.status, Some(200), "{}", b.text);
    assert!(
        b.text.contains(&marker) && b.text.contains("user: alice"),
        "{}",
        b.text
    );
    let alice = session_cookie(&b, "app.localhost")?;
    let (status, body) = get(&web, "app.localhost", https[2], "/", None).await?;
    assert_eq!(
        status,
        StatusCode::FOUND,
        "no session, no app (node 3): {body}"
    );

    phase!(
        "5. SIGKILL node 1 (the agent's first tunnel): alice keeps working through nodes 2 and 3"
    );
    let killed = Instant::now();
    cluster.nodes[0].kill9();
    let failures = std::cell::Cell::new(0u32);
    let took2 = until(
        "alice's session works through node 2 after node 1 died",
        Duration::from_secs(10),
        || async {
            let ok = app_ok(&web, "app.localhost", https[1], Some(&alice), &marker).await;
            failures.set(failures.get() + u32::from(!ok));
            ok
        },
    )
    .await?;
    let failures = failures.get();
    let took3 = until(
        "alice's session works through node 3 after node 1 died",
        Duration::from_secs(10),
        || async { app_ok(&web, "app.localhost", https[2], Some(&alice), &marker).await },
    )
    .await?;
    eprintln!(
        "TIMING after SIGKILL of node 1: node 2 served alice after {took2:?} ({failures} failed tries), \
         node 3 after {:?} more ({:?} in all)",
        took3,
        killed.elapsed()
    );
    let b = browser_async(
        BrowserArgs::new(format!("https://app.localhost:{}/after-kill", https[2]))
            .storage_in(&alice_state)
            .timeout(Duration::from_secs(30)),
    )
    .await?;
    assert!(
        b.text.contains(&marker) && b.text.contains("user: alice"),
        "the browser, without signing in again, through node 3: {} {}",
        b.url,
        b.text
    );
    let after_kill = killed.elapsed();
    eprintln!("TIMING Chromium through node 3 done {after_kill:?} after the SIGKILL");
    until(
        "the agent replaces its tunnel to node 1 (tunnels on nodes 2 and 3)",
        Duration::from_secs(15).saturating_sub(killed.elapsed()),
        || async { tunnels_held(&cluster, 1) >= 1 && tunnels_held(&cluster, 2) >= 1 },
    )
    .await
    .with_context(|| agent.log())?;
    eprintln!(
        "TIMING the agent holds tunnels to nodes 2 and 3 {:?} after the SIGKILL",
        killed.elapsed()
    );

    phase!("6. cut the site's uplink for 8 s: the site goes away, then comes back by itself");
    let cut = Instant::now();
    net.cut_site(true)?;
    // What a user sees during the cut, polled until the uplink comes back: each change of
    // outcome (the app, an error page, or a request still waiting after 3 s), with when.
    let mut timeline: Vec<(Duration, String)> = Vec::new();
    while cut.elapsed() < Duration::from_secs(8) {
        let sent = cut.elapsed();
        let what = match get(&web, "web.localhost", https[1], "/", None).await {
            Ok((StatusCode::OK, body)) if body.contains(&marker) => "the app".to_owned(),
            Ok((status, body)) => {
                let title = body
                    .split_once("<title>")
                    .and_then(|(_, t)| t.split_once("</title>"))
                    .map_or(body.as_str(), |(t, _)| t);
                let detail = body
                    .split_once("<p id=\"detail\">")
                    .and_then(|(_, t)| t.split_once("</p>"))
                    .map_or("", |(t, _)| t);
                format!("{status} {title}: {detail}")
            }
            Err(e)
                if e.to_string().contains("timed out")
                    || format!("{e:#}").contains("timed out") =>
            {
                "no answer within 3 s".to_owned()
            }
            Err(e) => format!("{e:#}"),
        };
        if timeline.last().is_none_or(|(_, last)| *last != what) {
            timeline.push((sent, what));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    net.cut_site(false)?;
    let restored = Instant::now();
    eprintln!("uplink restored after {:?}", cut.elapsed());
    for (at, what) in &timeline {
        eprintln!("during the cut, a request sent {at:.1?} after it through node 2 got: {what}");
    }
    assert!(
        timeline.iter().any(|(_, what)| what != "the app"),
        "the site kept answering while its uplink was cut"
    );
    let back2 = until(
        "the site comes back through node 2",
        Duration::from_secs(20),
        || async { app_ok(&web, "web.localhost", https[1], None, &marker).await },
    )
    .await
    .with_context(|| agent.log())?;
    until(
        "the site comes back through node 3",
        Duration::from_secs(20).saturating_sub(restored.elapsed()),
        || async { app_ok(&web, "web.localhost", https[2], None, &marker).await },
    )
    .await?;
    let back3 = restored.elapsed();
    let out = psql(&cluster.nodes[2].l4_ip, tcp_port, "select 42").await?;
    assert_eq!(out, "42");
    eprintln!(
        "TIMING after restoring the uplink: node 2 serves the site after {back2:?}, node 3 after {back3:?}, psql too after {:?}",
        restored.elapsed()
    );
    until(
        "the agent holds tunnels to nodes 2 and 3 again",
        Duration::from_secs(20).saturating_sub(restored.elapsed()),
        || async { tunnels_held(&cluster, 1) >= 1 && tunnels_held(&cluster, 2) >= 1 },
    )
    .await
    .with_context(|| agent.log())?;
    eprintln!(
        "TIMING the agent holds tunnels to nodes 2 and 3 again {:?} after the uplink came back",
        restored.elapsed()
    );
    let colours = regex::Regex::new("\x1b\\[[0-9;]*m").expect("regex");
    let agent_log = agent.log();
    let tunnels: Vec<&str> = agent_log.lines().filter(|l| l.contains("tunnel")).collect();
    eprintln!(
        "the agent's tunnels:\n{}",
        colours.replace_all(&tunnels.join("\n"), "")
    );
    eprintln!("TIMING whole test {:?}", test_start.elapsed());
    eprintln!("TIMING enroll to all three nodes serving: {enrolled:?}");
    drop(agent);
    Ok(())
}
