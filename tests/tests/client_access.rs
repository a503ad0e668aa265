//! Client access to private TCP/UDP resources (issue 14), black box: a real `warren-agent`
//! in a site behind a NAT router, the real `warren` client on a machine behind another NAT
//! router, a 3-node cluster in between relaying WireGuard, and real peers inside the site:
//! OpenSSH (`warren ssh`, `scp`), PostgreSQL (`psql` through `warren connect`), a DNS
//! resolver (`dig` through `warren connect --udp`). Sign-in is the device flow against a
//! real OpenID provider confirmed in headless Chromium.
//!
//! The lab is [`warren_tests::netlab`]: nodes on 10.97.K.1 (root namespace), the site at
//! 10.87.K.2, the client at 10.86.K.2; the client and the site reach each other only
//! through a node. One lab and one cluster serve every case of the main test, each a
//! logged phase. `the_lab_itself_works` checks the lab alone (no Warren binary).
//!
//! What the product must offer here (the CLI contract of issue 14; adapt when it lands):
//! - `warren-node` serves the relay on UDP `--relay-listen ADDR:PORT` (env
//!   `WARREN_RELAY_LISTEN`, set here), and counts dropped datagrams in `/metrics` under
//!   names starting with `warren_relay_dropped_total`.
//! - `warren login --node https://ADMIN_ADDR [--ca FILE] [--device-name NAME]` (device flow,
//!   the provider and client id asked from the node), `warren ls --json`, `warren connect
//!   NAME --local ADDR [--udp]` printing `listening on <addr>`, `warren nc HOST PORT`,
//!   `warren ssh HOST [ssh args]`, `warren status --json`, `warren device list --json`,
//!   `warren admin device list`.
//!
//! Needs root and `scripts/install-test-deps` (openssh, dnsmasq, dig, PostgreSQL, iperf3,
//! tcpdump, Node.js, Chromium). Run: `cargo test -p warren-tests --test client_access --
//! --nocapture` (the lab alone: add `the_lab_itself_works`).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use warren_tests::netlab::{self, Lab, Side};
use warren_tests::phase;

const PG_PASSWORD: &str = "site-pg-secret";

/// Runs `cmd` to completion within `limit` (killed after); (success, stdout, stderr).
fn output(mut cmd: Command, limit: Duration) -> anyhow::Result<(bool, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let out = Collected::from(&mut child);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{cmd:?} ran over {limit:?}:\n{}{}",
                out.stdout(),
                out.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = out.join();
    Ok((status.success(), stdout, stderr))
}

/// [`output`] that must succeed; its stdout.
fn ok_output(cmd: Command, limit: Duration) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let (ok, out, err) = output(cmd, limit)?;
    if !ok {
        bail!("{shown} failed:\n{out}{err}");
    }
    Ok(out)
}

/// A child's stdout and stderr, collected by threads as they come.
struct Collected {
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Collected {
    fn from(child: &mut Child) -> Self {
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(o) = child.stdout.take() {
            readers.push(collect(o, stdout.clone()));
        }
        if let Some(e) = child.stderr.take() {
            readers.push(collect(e, stderr.clone()));
        }
        Self {
            stdout,
            stderr,
            readers,
        }
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the pipes to close; (stdout, stderr).
    fn join(self) -> (String, String) {
        for r in self.readers {
            let _ = r.join();
        }
        let out = self.stdout.lock().unwrap().clone();
        let err = self.stderr.lock().unwrap().clone();
        (out, err)
    }
}

fn collect<R: std::io::Read + Send + 'static>(
    mut r: R,
    into: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
}

/// `psql -c sql` from `side` against `host:port` as `postgres`; its output.
fn psql(lab: &Lab, side: Side, host: &str, port: u16, sql: &str) -> anyhow::Result<String> {
    let mut cmd = lab.exec(side, "psql");
    cmd.arg(format!(
        "host={host} port={port} user=postgres dbname=postgres connect_timeout=5"
    ))
    .args(["-X", "-A", "-t", "-c", sql])
    .env("PGPASSWORD", PG_PASSWORD);
    Ok(ok_output(cmd, Duration::from_secs(15))?.trim().to_owned())
}

/// `dig @server -p port name +short` from `side`; its answer lines.
fn dig(lab: &Lab, side: Side, server: &str, port: u16, name: &str) -> anyhow::Result<String> {
    let mut cmd = lab.exec(side, "dig");
    cmd.arg(format!("@{server}")).args([
        "-p",
        &port.to_string(),
        name,
        "+short",
        "+time=2",
        "+tries=2",
    ]);
    Ok(ok_output(cmd, Duration::from_secs(15))?.trim().to_owned())
}

/// Starts every peer of the site; the (ssh, pg, dns) addresses.
fn site_peers(lab: &mut Lab) -> anyhow::Result<(SocketAddr, SocketAddr, SocketAddr)> {
    let site = lab.site_ip();
    let ssh = lab.start_sshd()?;
    let pg = lab.start_postgres(PG_PASSWORD)?;
    let dns = lab.start_dns(&[("db.internal", site), ("ssh.internal", site)])?;
    lab.start_iperf3()?;
    lab.start_banner()?;
    Ok((ssh, pg, dns))
}

/// What every case relies on, checked from inside the site itself: ssh, psql, dig, the
/// banner; and that nothing in the site is reachable from the client or the root namespace.
fn check_site_peers(lab: &Lab) -> anyhow::Result<()> {
    let site = lab.site_ip().to_string();
    let mut ssh = lab.site_exec("ssh");
    ssh.args(lab.ssh_opts())
        .arg(format!("root@{site}"))
        .args(["echo", "hello"]);
    let out = ok_output(ssh, Duration::from_secs(20))?;
    assert_eq!(out.trim(), "hello", "ssh inside the site");
    let out = psql(lab, Side::Site, &site, netlab::PG_PORT, "select 1")?;
    assert_eq!(out, "1", "psql inside the site");
    let out = dig(lab, Side::Site, &site, netlab::DNS_PORT, "db.internal")?;
    assert_eq!(out, site, "dig inside the site");
    let out = dig(lab, Side::Site, &site, netlab::DNS_PORT, "example.com")?;
    assert_eq!(out, "", "the resolver knows nothing else (no upstream)");
    let banner = SocketAddr::from((lab.site_ip(), netlab::BANNER_PORT));
    let got = lab.within(Side::Site, || {
        TcpStream::connect_timeout(&banner, Duration::from_secs(2))
            .map(|s| netlab::read_some(s, 64))
            .unwrap_or_default()
    })?;
    assert_eq!(got, b"ready\n", "the banner service");
    let ssh_addr = SocketAddr::from((lab.site_ip(), netlab::SSH_PORT));
    for side in [Side::Client, Side::Root] {
        assert!(
            !lab.tcp_open(side, ssh_addr, Duration::from_secs(1)),
            "the site's sshd is reachable from {side:?}: the NAT must drop that"
        );
    }
    Ok(())
}

/// The lab alone: NAT on both sides, the peers answer inside the site, the client and the
/// site both reach a listener on the nodes' address, and neither reaches the other.
#[test]
fn the_lab_itself_works() -> anyhow::Result<()> {
    phase!("lab: two NATed networks around the root namespace");
    let mut lab = Lab::start("self-test")?;
    site_peers(&mut lab)?;
    phase!("the site's peers answer inside the site, and only there");
    check_site_peers(&lab)?;

    phase!("client and site reach the nodes' address (root namespace), from behind their NAT");
    let listener = TcpListener::bind((lab.node_ip(), 0))?;
    let node = listener.local_addr()?;
    let seen = std::thread::spawn(move || -> Vec<SocketAddr> {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while seen.len() < 2 && Instant::now() < deadline {
            match listener.accept() {
                Ok((_, from)) => seen.push(from),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        seen
    });
    assert!(lab.tcp_open(Side::Client, node, Duration::from_secs(2)));
    assert!(lab.tcp_open(Side::Site, node, Duration::from_secs(2)));
    let seen = seen.join().unwrap();
    let ips: Vec<String> = seen.iter().map(|a| a.ip().to_string()).collect();
    eprintln!("the root namespace saw connections from {ips:?}");
    assert_eq!(
        ips,
        [
            lab.client_router_wan().to_string(),
            lab.site_router_wan().to_string()
        ],
        "each side is seen from its router's WAN address (NAT)"
    );

    phase!("a UDP exchange from the client to the root namespace; a capture sees it");
    let echo = std::net::UdpSocket::bind((lab.node_ip(), 0))?;
    let echo_addr = echo.local_addr()?;
    let echo_thread = std::thread::spawn(move || {
        echo.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 2048];
        if let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let cap = lab.capture(Side::ClientRouter, "wan", "udp")?;
    let got = lab.udp_exchange(
        Side::Client,
        echo_addr,
        &[b"ping-through-nat".to_vec()],
        Duration::from_secs(2),
    )?;
    echo_thread.join().unwrap();
    assert_eq!(got, [b"ping-through-nat".to_vec()]);
    let packets = cap.finish(&mut lab)?;
    eprintln!("captured on the client router's WAN: {packets:?}");
    assert!(packets
        .iter()
        .any(|p| p.payload == b"ping-through-nat" && *p.from.ip() == lab.client_router_wan()));

    phase!("a blocked uplink: the client no longer reaches the nodes; unblocked: again");
    let listener = TcpListener::bind((lab.node_ip(), 0))?;
    let node = listener.local_addr()?;
    lab.block_uplink(Side::Client, true)?;
    assert!(!lab.tcp_open(Side::Client, node, Duration::from_secs(1)));
    lab.block_uplink(Side::Client, false)?;
    assert!(lab.tcp_open(Side::Client, node, Duration::from_secs(2)));
    drop(listener);

    phase!("the direct link (benchmark baseline) joins client and site");
    let (_, site_direct) = lab.direct_link()?;
    assert!(lab.tcp_open(
        Side::Client,
        SocketAddr::from((site_direct, netlab::IPERF_PORT)),
        Duration::from_secs(2)
    ));
    let names = lab.ns(Side::Site);
    drop(lab);
    let left = netlab::run(Command::new("ip").args(["netns", "list"]))?;
    assert!(!left.contains(&names), "the lab's namespaces are gone");
    Ok(())
}
