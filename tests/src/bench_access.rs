//! `warren-bench access`: client access throughput and time to first byte, side by side in
//! one [`Lab`](crate::netlab::Lab), each path between the same client and site namespaces.
//!
//! - `raw`: iperf3 over [`Lab::direct_link`], a plain veth from the client to the site (no
//!   router, no NAT, no node): the ceiling of the machine. The NATed path through the
//!   routers cannot carry it: the site's router drops unsolicited inbound, and the root
//!   namespace does not forward.
//! - `wggo`: Debian's `wireguard-go` in the client and in the site, over the same direct
//!   link (TUN devices, MTU 1420, the responder configured first, as
//!   `shared/lab/wg/wg_bench.sh` does).
//! - `warren`: `warren connect iperf --local 127.0.0.1:15201` on the client, relayed by one
//!   node (in the root namespace) to the site's agent behind its NAT: the product's path
//!   (the listener hands each connection to the device's hub over a Unix socket; the hub's
//!   userspace stack + WireGuard, relay, agent's WireGuard + userspace stack).
//!
//! For each path: iperf3 TCP with 1 and 4 streams (`--seconds` each, `--rounds` times, the
//! median round shown with min..max), CPU seconds per GiB received of every process on the
//! path (utime+stime from `/proc/<pid>/stat` before and after; iperf3's own from its JSON),
//! and time to first byte of a new flow to a banner service in the site (connect to the
//! first byte, median of `--ttfb-samples`; for `warren`, spawn of a fresh `warren nc` to
//! its first byte, so it includes process start and the flow set-up through the tunnel).
//!
//! The `warren` path signs in with the device flow (the IdP of `tests/oidc` and headless
//! Chromium, as alice) and needs the client access of issue 14; `--paths raw,wggo` runs the
//! baselines alone.

use std::io::Read as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use crate::netlab::{self, run, Lab, Nat, Side, Topology};
use crate::oidc::{browser, BrowserArgs, Idp};
use crate::{bins, free_port, phase, Cluster, TestNode};

/// What `warren-bench access` measures.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds per iperf3 run.
    pub seconds: u64,
    /// Rounds over every path; the median round is shown.
    pub rounds: usize,
    /// New flows timed per path for time to first byte.
    pub ttfb_samples: usize,
    /// Which paths: `raw`, `wggo`, `warren`.
    pub paths: Vec<String>,
    /// The NATs between client and site ([`topology`]).
    pub nat: String,
}

/// The lab topology `--nat` names: `star`, `same-lan`, or `<client>-<site>` with each of
/// easy, firewall, hard, mapped (the agent's WireGuard port 51820 forwarded), double.
pub fn topology(nat: &str) -> anyhow::Result<Topology> {
    let kind = |k: &str| -> anyhow::Result<Nat> {
        Ok(match k {
            "easy" => Nat::Easy,
            "firewall" => Nat::FirewallOnly,
            "hard" => Nat::Hard,
            "mapped" => Nat::PortMapped {
                port: AGENT_WG_PORT,
            },
            "double" => Nat::Double,
            other => bail!("unknown NAT kind {other:?} (easy, firewall, hard, mapped, double)"),
        })
    };
    Ok(match nat {
        "star" => Topology::Star,
        "same-lan" => Topology::SameLan { site: Nat::Easy },
        pair => {
            let (c, s) = pair
                .split_once('-')
                .with_context(|| format!("--nat {pair:?}: star, same-lan or <client>-<site>"))?;
            Topology::Internet {
                client: kind(c)?,
                site: kind(s)?,
            }
        }
    })
}

/// The agent's WireGuard port (fixed, so a port mapping can name it).
const AGENT_WG_PORT: u16 = 51820;

/// One process on a path whose CPU is counted.
struct Proc {
    label: String,
    pid: u32,
}

/// A path under test.
struct BenchPath {
    name: &'static str,
    /// iperf3 server address as the client reaches it.
    iperf: SocketAddr,
    /// The processes of the path besides iperf3 (tunnel daemons, client, node, agent).
    procs: Vec<Proc>,
}

/// One iperf3 run's result.
#[derive(Debug, Clone, Default)]
struct Run {
    gbps: f64,
    bytes: f64,
    retransmits: f64,
    /// (label, CPU seconds) of each process, iperf3's included.
    cpu: Vec<(String, f64)>,
}

fn ticks_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields count from after its closing parenthesis.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> f64 {
    run(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Runs iperf3 on the client against `path`, `streams` streams; the result with the CPU of
/// every process of the path.
fn iperf(
    lab: &Lab,
    path: &BenchPath,
    streams: u32,
    seconds: u64,
    server_pid: u32,
) -> anyhow::Result<Run> {
    let hz = clock_ticks();
    let mut procs: Vec<(String, u32)> = path
        .procs
        .iter()
        .map(|p| (p.label.clone(), p.pid))
        .collect();
    procs.push(("iperf3 -s".into(), server_pid));
    let before: Vec<f64> = procs
        .iter()
        .map(|(_, p)| ticks_of(*p).unwrap_or(0.0))
        .collect();
    let mut cmd = lab.client_exec("iperf3");
    cmd.args([
        "-c",
        &path.iperf.ip().to_string(),
        "-p",
        &path.iperf.port().to_string(),
    ])
    .args(["-t", &seconds.to_string(), "-P", &streams.to_string(), "-J"]);
    // iperf3's server takes one test at a time and may still be closing the last one.
    let mut tries = 0;
    let (out, wall) = loop {
        let started = Instant::now();
        let out = cmd.stdin(Stdio::null()).output().context("iperf3 -c")?;
        let busy = String::from_utf8_lossy(&out.stdout).contains("the server is busy");
        tries += 1;
        if !busy || tries >= 10 {
            break (out, started.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let after: Vec<f64> = procs
        .iter()
        .map(|(_, p)| ticks_of(*p).unwrap_or(0.0))
        .collect();
    let j: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = j.get("error") {
        bail!(
            "iperf3 to {} ({}): {e}\nwarren connect:\n{}\nagent:\n{}",
            path.iperf,
            path.name,
            lab.log_of("warren-connect"),
            lab.log_of("agent")
        );
    }
    let end = &j["end"];
    let gbps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9;
    let bytes = end["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let retransmits = end["sum_sent"]["retransmits"].as_f64().unwrap_or(0.0);
    let mut cpu: Vec<(String, f64)> = procs
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|((label, _), _)| label != "iperf3 -s")
        .map(|((label, _), (b, a))| (label.clone(), (a - b) / hz))
        .collect();
    // iperf3's own accounting (getrusage over the test) for the short-lived client; the
    // server's from /proc like the rest.
    let host = end["cpu_utilization_percent"]["host_total"]
        .as_f64()
        .unwrap_or(0.0);
    cpu.push(("iperf3 -c".into(), host / 100.0 * wall));
    let i = procs.len() - 1;
    cpu.push(("iperf3 -s".into(), (after[i] - before[i]) / hz));
    Ok(Run {
        gbps,
        bytes,
        retransmits,
        cpu,
    })
}

/// Time to first byte of new flows to the banner: `connect` makes a flow and returns once
/// the first byte arrived.
fn ttfb(
    samples: usize,
    mut connect: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<f64>> {
    let mut v = Vec::new();
    for _ in 0..samples {
        let t = Instant::now();
        connect()?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(v)
}

/// Time to first byte of `samples` new TCP connections from the client to `addr`, in ms:
/// connect to first byte, timed on one thread that entered the client namespace once
/// (entering a namespace costs milliseconds of its own, which are not the flow's).
fn ttfb_direct(lab: &Lab, addr: SocketAddr, samples: usize) -> anyhow::Result<Vec<f64>> {
    lab.within(Side::Client, || -> anyhow::Result<Vec<f64>> {
        let mut v = Vec::new();
        for _ in 0..samples {
            let t = Instant::now();
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            v.push(t.elapsed().as_secs_f64() * 1000.0);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(v)
    })?
}

/// `wireguard-go` in the client and the site over the direct link; the two daemons.
fn start_wggo(
    lab: &mut Lab,
    client_direct: std::net::Ipv4Addr,
    site_direct: std::net::Ipv4Addr,
) -> anyhow::Result<(SocketAddr, Vec<Proc>)> {
    let pid = std::process::id();
    let (ifc, ifs) = (format!("wgc{pid}"), format!("wgs{pid}"));
    let keys = lab.tmp.path().join("wg");
    std::fs::create_dir_all(&keys)?;
    let key = |name: &str| -> anyhow::Result<(PathBuf, String)> {
        let private =
            run(Command::new("wg").arg("genkey")).context("wg genkey (wireguard-tools)")?;
        let file = keys.join(name);
        std::fs::write(&file, &private)?;
        let mut p = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(p.stdin.as_mut().context("stdin")?, private.as_bytes())?;
        let out = p.wait_with_output()?;
        Ok((file, String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    };
    let (ck, cpub) = key("client.key")?;
    let (sk, spub) = key("site.key")?;
    let k = lab.k;
    let (tun_c, tun_s) = (format!("10.84.{k}.1"), format!("10.84.{k}.2"));
    let mut pids = Vec::new();
    for (side, ifname) in [(Side::Site, &ifs), (Side::Client, &ifc)] {
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
        lab.forget_wg_socket_on_drop(ifname);
        let mut cmd = lab.exec(side, "wireguard-go");
        cmd.args(["-f", ifname]).env("WG_PROCESS_FOREGROUND", "1");
        pids.push(lab.spawn(&format!("wireguard-go-{ifname}"), cmd)?);
    }
    for ifname in [&ifs, &ifc] {
        let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        let start = Instant::now();
        while !sock.exists() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("wireguard-go made no control socket for {ifname}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The responder (site) first: an initiation to an unconfigured peer is retried only
    // after 5 s.
    let conf = [
        (
            Side::Site,
            &ifs,
            &sk,
            &cpub,
            &tun_c,
            client_direct,
            51821,
            51820,
            &tun_s,
        ),
        (
            Side::Client,
            &ifc,
            &ck,
            &spub,
            &tun_s,
            site_direct,
            51820,
            51821,
            &tun_c,
        ),
    ];
    for (side, ifname, key, peer, peer_tun, peer_ip, port, peer_port, own_tun) in conf {
        run(lab
            .exec(side, "wg")
            .args([
                "set",
                ifname,
                "listen-port",
                &port.to_string(),
                "private-key",
            ])
            .arg(key)
            .args([
                "peer",
                peer,
                "allowed-ips",
                &format!("{peer_tun}/32"),
                "endpoint",
            ])
            .arg(format!("{peer_ip}:{peer_port}")))?;
        run(lab
            .exec(side, "ip")
            .args(["addr", "add", &format!("{own_tun}/24"), "dev", ifname]))?;
        run(lab
            .exec(side, "ip")
            .args(["link", "set", ifname, "mtu", "1420", "up"]))?;
    }
    let mut up = false;
    for _ in 0..20 {
        if lab
            .client_exec("ping")
            .args(["-c", "1", "-W", "1", &tun_s])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            up = true;
            break;
        }
    }
    if !up {
        bail!("the wireguard-go tunnel did not come up");
    }
    let procs = vec![
        Proc {
            label: "wireguard-go (site)".into(),
            pid: pids[0],
        },
        Proc {
            label: "wireguard-go (client)".into(),
            pid: pids[1],
        },
    ];
    Ok((SocketAddr::new(tun_s.parse()?, netlab::IPERF_PORT), procs))
}

/// The `warren` path: a one-node cluster on the lab's node address (relay on UDP), the
/// site's agent, alice signed in on the client, and `warren connect iperf`. Returns the
/// local iperf3 address, the processes, and what must live as long as the measurement.
struct WarrenPath {
    _cluster: Cluster,
    _idp: Idp,
    config: PathBuf,
    ca: PathBuf,
    procs: Vec<Proc>,
    /// From `warren connect` starting to its first flow's first byte.
    first_flow: Duration,
    /// From `warren connect` starting to `warren status` saying direct, if it did
    /// (within 15 s).
    direct_after: Option<Duration>,
}

/// The path `warren status --json` shows for the (only) site (direct, relayed, none), and
/// the site's whole entry.
fn status_path(lab: &Lab, config: &Path, ca: &Path) -> (String, Value) {
    let out = warren(lab, config, ca, &["status", "--json"])
        .stdin(Stdio::null())
        .output();
    let entry = out
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .and_then(|v| {
            v["sessions"]
                .as_array()?
                .iter()
                .flat_map(|s| s["sites"].as_array().into_iter().flatten())
                .next()
                .cloned()
        })
        .unwrap_or(Value::Null);
    let path = entry["path"].as_str().unwrap_or("none").to_owned();
    (path, entry)
}

/// Polls until the path is `want` (every 50 ms, bounded); how long it took.
fn until_path(
    lab: &Lab,
    config: &Path,
    ca: &Path,
    want: &str,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let (path, entry) = status_path(lab, config, ca);
        if path == want {
            // Which path, as the client sees it (a direct one names its address).
            eprintln!(
                "path {want} after {:?}: direct {} relay {}",
                start.elapsed(),
                entry["direct"],
                entry["relay"]
            );
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

async fn start_warren(lab: &mut Lab) -> anyhow::Result<WarrenPath> {
    let ip = lab.node_ip().to_string();
    let tmp = tempfile::Builder::new().prefix("warren-bench-").tempdir()?;
    let mut n1 = TestNode::new(tmp.path(), "n1", &[]).with_cluster_ip(&ip);
    n1.admin_addr = format!("{ip}:{}", free_port());
    n1.env.push((
        "WARREN_RELAY_LISTEN".into(),
        format!("{ip}:{}", free_port()),
    ));
    // The CLI signs in with the IdP's public client `cli` (tests/oidc), as in client_access.
    n1.env.push(("WARREN_CLI_CLIENT_ID".into(), "cli".into()));
    let (admin_key, join_token) = n1.init()?;
    let cluster = Cluster {
        tmp,
        nodes: vec![n1],
        admin_key,
        join_token,
        env: Vec::new(),
        cluster_ip: ip,
    };
    let api = cluster.api(0);
    api.wait_healthy(Duration::from_secs(30)).await?;
    let idp = tokio::task::spawn_blocking(|| Idp::start(&["http://127.0.0.1/unused".into()], &[]))
        .await??;
    let idp_addr = SocketAddr::from(([127, 0, 0, 1], idp.port));
    lab.forward_tcp(Side::Client, idp_addr, idp_addr)?;
    // See tests/tests/client_access.rs: the provider field naming the CLI's client is
    // assumed; without it, `--client-id cli` is given to `warren login`.
    let mut provider = json!({"name": "test", "issuer": idp.issuer, "client_id": idp.client_id,
        "client_secret": idp.client_secret, "scopes": ["groups"], "groups_claim": "groups",
        "cli_client_id": "cli"});
    let mut override_id = false;
    if api
        .post_ok("/v1/identity-providers", &provider)
        .await
        .is_err()
    {
        provider
            .as_object_mut()
            .expect("object")
            .remove("cli_client_id");
        api.post_ok("/v1/identity-providers", &provider).await?;
        override_id = true;
    }
    let site_ip = lab.site_ip().to_string();
    api.post_ok("/v1/sites", &json!({"name": "bench"})).await?;
    api.post_ok(
        "/v1/policies",
        &json!({"name": "ops", "allow": {"group": "admins"}}),
    )
    .await?;
    for (name, port) in [
        ("iperf", netlab::IPERF_PORT),
        ("banner", netlab::BANNER_PORT),
    ] {
        api.post_ok(
            "/v1/resources",
            &json!({"name": name, "site": "bench", "policies": ["ops"],
                    "route": {"private": {"address": site_ip, "ports": port.to_string(), "protocols": ["tcp"]}}}),
        )
        .await?;
    }
    let token = api
        .post_ok("/v1/sites/bench/tokens", &json!({"expires_in_s": 600}))
        .await?["token"]
        .as_str()
        .context("no site token")?
        .to_owned();
    let mut agent = lab.site_exec(&bins().agent);
    agent
        .arg("--state-dir")
        .arg(lab.tmp.path().join("agent-state"))
        .args(["--node", &cluster.nodes[0].cluster_addr, "--token", &token])
        .args(["--wireguard-listen", &format!("0.0.0.0:{AGENT_WG_PORT}")])
        .env("WARREN_LOG", "warn");
    let agent_pid = lab.spawn("agent", agent)?;
    let config = lab.tmp.path().join("alice");
    let ca = cluster.ca();
    phase!("alice signs in (device flow, Chromium)");
    let node = format!("https://{}", cluster.nodes[0].admin_addr);
    let mut args = vec![
        "login".to_owned(),
        "--node".into(),
        node,
        "--device-name".into(),
        "bench".into(),
    ];
    if override_id {
        args.extend(["--client-id".into(), "cli".into()]);
    }
    let mut login = warren(
        lab,
        &config,
        &ca,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let log = lab.tmp.path().join("login.log");
    let mut child = login
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(log.with_extension("err"))?)
        .spawn()?;
    let url_re = regex::Regex::new(r"(?m)^\s*(https?://\S*user_code=\S+)\s*$")?;
    let start = Instant::now();
    let url = loop {
        let err = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
        if let Some(u) = url_re.captures(&err) {
            break u[1].to_owned();
        }
        if start.elapsed() > Duration::from_secs(20) || child.try_wait()?.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("warren login showed no code:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let page = tokio::task::spawn_blocking(move || {
        browser(
            &BrowserArgs::new(url)
                .login("alice", "alice-pw")
                .click("#confirm"),
        )
    })
    .await??;
    anyhow::ensure!(page.text.contains("Sign-in Success"), "{}", page.text);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > Duration::from_secs(40) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("warren login did not finish");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    anyhow::ensure!(
        status.success(),
        "warren login failed: {}",
        std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
    );
    let cmd = warren(
        lab,
        &config,
        &ca,
        &["connect", "iperf", "--local", "127.0.0.1:15201"],
    );
    let connect_pid = lab.spawn("warren-connect", cmd)?;
    let start = Instant::now();
    let connect_started = start;
    while !lab.log_of("warren-connect").contains("listening on") {
        if start.elapsed() > Duration::from_secs(20) || !lab.is_running("warren-connect") {
            bail!("warren connect iperf: {}", lab.log_of("warren-connect"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The agent may still be enrolling and getting its grants: wait (bounded) until a new
    // flow through the tunnel gets the site's banner.
    let start = Instant::now();
    while first_byte_warren(lab, &config, &ca).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "no flow through the tunnel within 30 s; agent:\n{}",
                lab.log_of("agent")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let first_flow = connect_started.elapsed();
    let direct_after = until_path(lab, &config, &ca, "direct", Duration::from_secs(15))
        .map(|_| connect_started.elapsed());
    // The client's WireGuard endpoint is the device's hub (`warren hub`, started by the
    // first command): its pid from its run file.
    let hub_pid = std::fs::read_dir(config.join("run"))?
        .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .filter_map(|b| serde_json::from_slice::<Value>(&b).ok())
        .find(|v| v["command"] == "hub")
        .and_then(|v| v["pid"].as_u64())
        .context("no run file of the hub")? as u32;
    let procs = vec![
        Proc {
            label: "warren hub (client)".into(),
            pid: hub_pid,
        },
        Proc {
            label: "warren connect (client's listener)".into(),
            pid: connect_pid,
        },
        Proc {
            label: "warren-node (relay)".into(),
            pid: cluster.nodes[0].pid().context("node pid")?,
        },
        Proc {
            label: "warren-agent (site)".into(),
            pid: agent_pid,
        },
    ];
    Ok(WarrenPath {
        _cluster: cluster,
        _idp: idp,
        config,
        ca,
        procs,
        first_flow,
        direct_after,
    })
}

fn warren(lab: &Lab, config: &Path, ca: &Path, args: &[&str]) -> Command {
    let mut cmd = lab.client_exec(&bins().warren);
    cmd.args(args)
        .env("WARREN_CONFIG_DIR", config)
        .env("WARREN_CA", ca)
        .env("WARREN_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

/// A fresh `warren nc banner 7000` and its first byte on stdout.
fn first_byte_warren(lab: &Lab, config: &Path, ca: &Path) -> anyhow::Result<()> {
    let mut child = warren(
        lab,
        config,
        ca,
        &["nc", "banner", &netlab::BANNER_PORT.to_string()],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()?;
    let mut out = child.stdout.take().context("stdout")?;
    let got = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        out.read_exact(&mut b).is_ok()
    });
    let start = Instant::now();
    while !got.is_finished() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let _ = child.wait();
    if !got.join().unwrap_or(false) {
        bail!("warren nc banner: no first byte");
    }
    Ok(())
}

/// Runs the benchmark and prints the markdown tables.
pub async fn run_access(o: Options) -> anyhow::Result<()> {
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut lab = Lab::start_with("bench-access", topology(&o.nat)?)?;
    let server_pid = {
        lab.start_iperf3()?;
        lab.pid_of("iperf3").context("iperf3 pid")?
    };
    let banner = lab.start_banner()?;
    let (client_direct, site_direct) = lab.direct_link()?;
    // The baselines' veth, and the wireguard-go tunnel over it, are no path for warren:
    // its probes would find the site over them (host addresses) and the numbers would be
    // theirs, not the NATs' or the relay's (a run of hard-hard once measured warren inside
    // wireguard-go's tunnel: 0.14 Gbit/s, "direct").
    for via in ["direct0", "wgs+"] {
        run(lab.exec(Side::Site, "iptables").args([
            "-A",
            "INPUT",
            "-i",
            via,
            "-p",
            "udp",
            "--dport",
            &AGENT_WG_PORT.to_string(),
            "-j",
            "DROP",
        ]))?;
    }
    let mut paths: Vec<BenchPath> = Vec::new();
    // The floor under a `warren nc` sample: starting a process in the client namespace.
    let spawn_floor = ttfb(o.ttfb_samples, || {
        let ok = lab
            .client_exec("true")
            .stdin(Stdio::null())
            .status()?
            .success();
        anyhow::ensure!(ok, "ip netns exec … true failed");
        Ok(())
    })?;
    let mut first_bytes: Vec<(&'static str, Vec<f64>)> = vec![(
        "(floor: spawning `ip netns exec <client> true`, no flow)",
        spawn_floor,
    )];
    let mut warren_path = None;
    for p in &o.paths {
        match p.as_str() {
            "raw" => {
                phase!("raw: the direct veth");
                paths.push(BenchPath {
                    name: "raw veth (direct link)",
                    iperf: SocketAddr::new(site_direct.into(), netlab::IPERF_PORT),
                    procs: Vec::new(),
                });
                let to = SocketAddr::new(site_direct.into(), netlab::BANNER_PORT);
                first_bytes.push((
                    "raw veth (direct link)",
                    ttfb_direct(&lab, to, o.ttfb_samples)?,
                ));
            }
            "wggo" => {
                phase!("wggo: wireguard-go <-> wireguard-go over the direct veth");
                let (iperf, procs) = start_wggo(&mut lab, client_direct, site_direct)?;
                let to = SocketAddr::new(iperf.ip(), netlab::BANNER_PORT);
                first_bytes.push((
                    "wireguard-go <-> wireguard-go",
                    ttfb_direct(&lab, to, o.ttfb_samples)?,
                ));
                paths.push(BenchPath {
                    name: "wireguard-go <-> wireguard-go",
                    iperf,
                    procs,
                });
            }
            "warren" => {
                phase!(
                    "warren: warren connect to the agent behind NAT (NATs: {})",
                    o.nat
                );
                let w = start_warren(&mut lab).await?;
                let (config, ca) = (w.config.clone(), w.ca.clone());
                let name = if w.direct_after.is_some() {
                    "warren connect (direct)"
                } else {
                    "warren connect (relayed)"
                };
                first_bytes.push((
                    name,
                    ttfb(o.ttfb_samples, || first_byte_warren(&lab, &config, &ca))?,
                ));
                paths.push(BenchPath {
                    name,
                    iperf: SocketAddr::from(([127, 0, 0, 1], 15201)),
                    procs: w
                        .procs
                        .iter()
                        .map(|p| Proc {
                            label: p.label.clone(),
                            pid: p.pid,
                        })
                        .collect(),
                });
                warren_path = Some(w);
            }
            other => bail!("unknown path {other:?} (raw, wggo, warren)"),
        }
    }
    // Rounds take turns over the paths, so a slow phase of the machine hits them all.
    let mut results: Vec<Vec<(u32, Run)>> = vec![Vec::new(); paths.len()];
    for round in 0..o.rounds {
        for (i, path) in paths.iter().enumerate() {
            for streams in [1u32, 4] {
                let r = iperf(&lab, path, streams, o.seconds, server_pid)?;
                eprintln!(
                    "round {} {} P{streams}: {:.3} Gbit/s, {} retransmits",
                    round + 1,
                    path.name,
                    r.gbps,
                    r.retransmits
                );
                results[i].push((streams, r));
            }
        }
    }
    println!();
    println!("| path | streams | Gbit/s median (min..max) | retransmits (median) | CPU s per GiB received, by process |");
    println!("|---|---|---|---|---|");
    for (i, path) in paths.iter().enumerate() {
        for streams in [1u32, 4] {
            let runs: Vec<&Run> = results[i]
                .iter()
                .filter(|(s, _)| *s == streams)
                .map(|(_, r)| r)
                .collect();
            let mut g: Vec<f64> = runs.iter().map(|r| r.gbps).collect();
            let (lo, hi) = (
                g.iter().copied().fold(f64::INFINITY, f64::min),
                g.iter().copied().fold(0.0, f64::max),
            );
            let med = median(&mut g);
            let mut rt: Vec<f64> = runs.iter().map(|r| r.retransmits).collect();
            let labels: Vec<String> = runs
                .first()
                .map(|r| r.cpu.iter().map(|(l, _)| l.clone()).collect())
                .unwrap_or_default();
            let cpu: Vec<String> = labels
                .iter()
                .map(|l| {
                    let mut per: Vec<f64> = runs
                        .iter()
                        .map(|r| {
                            let s = r.cpu.iter().find(|(x, _)| x == l).map_or(0.0, |(_, s)| *s);
                            s / (r.bytes / f64::from(1u32 << 30)).max(1e-9)
                        })
                        .collect();
                    format!("{l} {:.2}", median(&mut per))
                })
                .collect();
            println!(
                "| {} | {streams} | {med:.3} ({lo:.3}..{hi:.3}) | {:.0} | {} |",
                path.name,
                median(&mut rt),
                cpu.join(", ")
            );
        }
    }
    println!();
    println!("| path | time to first byte of a new flow, ms: median (min..max), n |");
    println!("|---|---|");
    for (name, mut v) in first_bytes {
        let (lo, hi) = (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        );
        let n = v.len();
        println!("| {name} | {:.2} ({lo:.2}..{hi:.2}), {n} |", median(&mut v));
    }
    println!();
    println!(
        "{}s per run, {} rounds; {} CPUs; load average before: {}",
        o.seconds,
        o.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_before.trim()
    );
    if let Some(w) = &warren_path {
        // The direct path cut between the two routers: how long until the relay carries
        // the traffic; then restored: how long until it is direct again.
        let (mut fallback, mut back) = (None, None);
        if w.direct_after.is_some() && matches!(lab.topology(), Topology::Internet { .. }) {
            let (config, ca) = (w.config.clone(), w.ca.clone());
            let keep = std::thread::spawn({
                let ns = lab.ns(Side::Client);
                move || {
                    // Traffic during the cut, as a user's open flow would make.
                    let _ = Command::new("ip")
                        .args([
                            "netns",
                            "exec",
                            &ns,
                            "iperf3",
                            "-c",
                            "127.0.0.1",
                            "-p",
                            "15201",
                            "-t",
                            "6",
                        ])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            });
            std::thread::sleep(Duration::from_secs(1));
            lab.cut_between_routers(true)?;
            fallback = until_path(&lab, &config, &ca, "relayed", Duration::from_secs(10));
            let _ = keep.join();
            lab.cut_between_routers(false)?;
            back = until_path(&lab, &config, &ca, "direct", Duration::from_secs(70));
        }
        let secs =
            |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.2}", d.as_secs_f64()));
        println!();
        println!("| NATs (client-site) | path | `warren connect` to its first flow's first byte, s | `warren connect` to direct, s | cut to relayed, s | restored to direct, s |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {:.2} | {} | {} | {} |",
            o.nat,
            if w.direct_after.is_some() {
                "direct"
            } else {
                "relayed"
            },
            w.first_flow.as_secs_f64(),
            secs(w.direct_after),
            secs(fallback),
            secs(back)
        );
    }
    let _ = banner;
    drop(warren_path);
    drop(lab);
    Ok(())
}
