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

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use reqwest::Method;
use serde_json::{json, Value};
use warren_tests::access::{
    metric_sum, ok_output, output, patch_policy, start_cluster, Reaped, World,
};
use warren_tests::collected::Collected;
use warren_tests::netlab::{self, Lab, Side};
use warren_tests::oidc::Idp;
use warren_tests::{bins, phase};

const PG_PASSWORD: &str = "site-pg-secret";

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

// ---------------------------------------------------------------------------------------
// The product, against the CLI contract of issue 14.
// ---------------------------------------------------------------------------------------

/// Prefix of the node's relay drop counters in `/metrics` (assumed).
const RELAY_DROPPED: &str = "warren_relay_dropped_total";

/// The agent's WireGuard port (fixed, so bad input can be aimed at it).
const AGENT_WG_PORT: u16 = 51820;

/// A WireGuard handshake initiation (type 1, 148 bytes) from a key nobody registered:
/// random where the real one carries ephemeral key, encrypted static key, timestamp, macs.
fn forged_initiation() -> Vec<u8> {
    let mut m = vec![0u8; 148];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut m).expect("random");
    m[..4].copy_from_slice(&[1, 0, 0, 0]);
    m
}

/// Random bytes.
fn random(n: usize) -> Vec<u8> {
    let mut m = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut m).expect("random");
    m
}

/// Random bytes that are no relay frame: the first byte is never a frame type (0xA0-0xA8),
/// so a random Ping (which anyone may send, and which is answered) cannot turn up by chance.
fn garbage(n: usize) -> Vec<u8> {
    let mut m = random(n);
    if let Some(b) = m.first_mut() {
        if (0xA0..=0xA8).contains(b) {
            *b ^= 0x40;
        }
    }
    m
}

/// A relay Data frame (type 0xA5, channel u32 big-endian) around `payload`
/// (proto/src/relay.rs's wire format).
fn data_frame(channel: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xA5];
    f.extend(channel.to_be_bytes());
    f.extend(payload);
    f
}

/// A relay Ping (type 0xA0, nonce u64, padded to 32 bytes): a live relay answers it.
fn ping_frame(nonce: u64) -> Vec<u8> {
    let mut f = vec![0xA0];
    f.extend(nonce.to_be_bytes());
    f.resize(32, 0);
    f
}

/// Frames cut short: every relay type with less than its fixed part, and a Bind whose
/// ticket length runs past the end.
fn truncated_frames() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = (0xA0..=0xA5u8).map(|t| vec![t]).collect();
    v.push(vec![0xA0, 0, 0, 0, 1]);
    v.push(vec![0xA2, 0, 0, 0, 0, 0, 0, 0, 1, 0x03, 0xff, 1, 2, 3]);
    v.push(vec![0xA3, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
    v.push(vec![0xA5, 0, 0]);
    v
}

/// How long until `child` exits (bounded by `limit`); None if it still runs then.
fn exit_within(child: &mut Child, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Retries `psql select N` through `port` on the client's loopback until it answers `N`
/// (bounded by `limit`); how long it took.
fn psql_until(lab: &Lab, port: u16, n: u32, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        match psql(lab, Side::Client, "127.0.0.1", port, &format!("select {n}")) {
            Ok(out) if out == n.to_string() => return Ok(start.elapsed()),
            Ok(out) if start.elapsed() > limit => bail!("psql answered {out:?}"),
            Err(e) if start.elapsed() > limit => return Err(e),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A running `ssh … sleep 60` through `warren ssh`, once it is logged in.
fn open_ssh_session(world: &World, config: &Path) -> anyhow::Result<(Reaped, Collected)> {
    let mut cmd = world.ssh(
        config,
        "ssh",
        &["echo", "session-open;", "exec", "sleep", "60"],
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = Collected::from(&mut child);
    let mut child = Reaped(child);
    let start = Instant::now();
    while !out.stdout().contains("session-open") {
        if let Some(s) = child.0.try_wait()? {
            bail!(
                "ssh exited ({s}) before the session opened:\n{}",
                out.stderr()
            );
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "the ssh session did not open within 30 s:\n{}",
                out.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((child, out))
}

/// Every string in `v` under a key whose name contains one of `keys`.
fn strings_under(v: &Value, keys: &[&str], out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if keys.iter().any(|w| k.contains(w)) {
                    match x {
                        Value::String(s) => out.push(s.clone()),
                        Value::Object(o) => {
                            out.extend(o.values().filter_map(|s| s.as_str().map(str::to_owned)))
                        }
                        _ => {}
                    }
                }
                strings_under(x, keys, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| strings_under(x, keys, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn people_reach_ssh_postgres_and_dns_in_a_site_through_the_nodes() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    tokio::task::spawn_blocking(bins).await?;
    let test_start = Instant::now();

    phase!("lab: the site and the client, each behind its own NAT; peers in the site");
    let mut lab = Lab::start("client-access")?;
    site_peers(&mut lab)?;
    check_site_peers(&lab)?;
    let site_ip = lab.site_ip().to_string();

    phase!(
        "a 3-node cluster on the nodes' address, relay on UDP; the IdP reachable from the client"
    );
    let (cluster, relays) = start_cluster(&lab).await?;
    let idp = tokio::task::spawn_blocking(|| Idp::start(&["http://127.0.0.1/unused".into()], &[]))
        .await??;
    // The client signs in at http://127.0.0.1:<port> (the CLI takes plain HTTP on loopback
    // only): the client's loopback forwards to the root namespace's, where the IdP is.
    let idp_addr = SocketAddr::from(([127, 0, 0, 1], idp.port));
    lab.forward_tcp(Side::Client, idp_addr, idp_addr)?;
    let dir = tempfile::tempdir()?;
    let mut w = World {
        lab,
        cluster,
        idp,
        relays,
        client_id_override: None,
        dir,
    };

    phase!("configure: provider, site, policy, private resources");
    let api = w.cluster.api(0);
    let provider = json!({"name": "test", "issuer": w.idp.issuer, "client_id": w.idp.client_id,
        "client_secret": w.idp.client_secret, "scopes": ["groups"], "groups_claim": "groups"});
    // The CLI's client id comes from the nodes (--cli-client-id), through discovery.
    api.post_ok("/v1/identity-providers", &provider).await?;
    api.post_ok("/v1/sites", &json!({"name": "site-a"})).await?;
    // Not the `dev` group: bob (the user without a grant) is in it too (tests/src/oidc.rs).
    api.post_ok(
        "/v1/policies",
        &json!({"name": "ops", "allow": {"group": "admins"}}),
    )
    .await?;
    // Source criteria match the device's public address: the client router's WAN address
    // is in 10.96.0.0/16, and never in 192.0.2.0/24.
    let client_net = format!("{}/32", w.lab.client_router_wan());
    api.post_ok(
        "/v1/policies",
        &json!({"name": "from-client-net", "allow": {"and": [{"group": "admins"}, {"source_cidr": client_net}]}}),
    )
    .await?;
    api.post_ok(
        "/v1/policies",
        &json!({"name": "from-elsewhere", "allow": {"and": [{"group": "admins"}, {"source_cidr": "192.0.2.0/24"}]}}),
    )
    .await?;
    let private = |name: &str, alias: Option<&str>, ports: &str, proto: &str, policies: &[&str]| {
        let mut route = json!({"address": site_ip, "ports": ports, "protocols": [proto]});
        if let Some(a) = alias {
            route["alias"] = json!(a);
        }
        json!({"name": name, "site": "site-a", "route": {"private": route}, "policies": policies})
    };
    for r in [
        private("pg", Some("db"), "5432", "tcp", &["ops"]),
        private("ssh", None, "22", "tcp", &["ops"]),
        private("dns", None, "53", "udp", &["ops"]),
        private("iperf", None, "5201", "tcp", &["ops"]),
        private("banner", None, "7000", "tcp", &["ops"]),
        // No policy: nobody may reach it (deny by default).
        private("vault", None, "8200", "tcp", &[]),
        private("pg-here", None, "5432", "tcp", &["from-client-net"]),
        private("pg-elsewhere", None, "5432", "tcp", &["from-elsewhere"]),
    ] {
        api.post_ok("/v1/resources", &r).await?;
    }

    phase!("the site's agent enrolls from behind its NAT");
    let token = api
        .post_ok("/v1/sites/site-a/tokens", &json!({"expires_in_s": 600}))
        .await?["token"]
        .as_str()
        .context("no site token")?
        .to_owned();
    let mut agent = w.lab.site_exec(&bins().agent);
    agent
        .arg("--state-dir")
        .arg(w.dir.path().join("agent-state"))
        .args([
            "--node",
            &w.cluster.nodes[0].cluster_addr,
            "--token",
            &token,
            "--wireguard-listen",
            &format!("0.0.0.0:{AGENT_WG_PORT}"),
        ])
        .env("WARREN_LOG", "info");
    w.lab.spawn("agent", agent)?;

    phase!("1. alice signs in from the client machine with the device flow; her device is listed");
    let alice = w.dir.path().join("alice");
    let printed = w.login(&alice, "alice", "alice-pw", "alice-laptop").await?;
    eprintln!("warren login printed:\n{printed}");
    let devices = w.warren_json(&alice, &["device", "list"])?;
    assert!(devices.to_string().contains("alice-laptop"), "{devices}");
    let (ok, out, err) = w.cluster.warren(0, &["device", "list"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("alice-laptop") && out.contains("alice"),
        "{out}"
    );
    let ls = w.warren_json(&alice, &["ls"])?;
    eprintln!("warren ls: {ls}");
    let names: Vec<&str> = ls
        .as_array()
        .context("ls --json is an array")?
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    for n in ["pg", "ssh", "dns", "iperf"] {
        assert!(names.contains(&n), "alice may reach {n}: {ls}");
    }
    assert!(!names.contains(&"vault"), "nobody may reach vault: {ls}");
    assert!(
        names.contains(&"pg-here") && !names.contains(&"pg-elsewhere"),
        "source_cidr matches the device's public address (the client router's, {}): {ls}",
        w.lab.client_router_wan()
    );
    let pg = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "pg")
        .unwrap();
    assert_eq!(pg["alias"], "db", "{pg}");
    assert_eq!(pg["site"], "site-a", "{pg}");
    assert!(pg["address"].to_string().contains(&site_ip), "{pg}");
    for k in ["ports", "protocols"] {
        assert!(!pg[k].is_null(), "ls shows {k}: {pg}");
    }

    phase!(
        "2. warren ssh runs a command on the site's sshd; scp of 64 MiB there and back is intact"
    );
    // The agent may still be enrolling: the first ssh is retried (bounded).
    let start = Instant::now();
    let hello = loop {
        let (ok, out, err) = output(
            w.ssh(&alice, "ssh", &["echo", "hello"]),
            Duration::from_secs(30),
        )?;
        if ok {
            break out;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "warren ssh never worked:\n{err}\nagent:\n{}",
                w.lab.log_of("agent")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(hello.trim(), "hello");
    eprintln!("first ssh through the tunnel after {:?}", start.elapsed());
    let files = tempfile::Builder::new().prefix("warren-scp-").tempdir()?;
    let original = files.path().join("original.bin");
    {
        let mut f = std::fs::File::create(&original)?;
        for _ in 0..64 {
            f.write_all(&random(1 << 20))?;
        }
    }
    let there = files.path().join("on-the-site.bin");
    let back = files.path().join("back.bin");
    let started = Instant::now();
    ok_output(
        w.scp(
            &alice,
            &original.display().to_string(),
            &format!("root@ssh:{}", there.display()),
        ),
        Duration::from_secs(300),
    )?;
    let up = started.elapsed();
    ok_output(
        w.scp(
            &alice,
            &format!("root@ssh:{}", there.display()),
            &back.display().to_string(),
        ),
        Duration::from_secs(300),
    )?;
    eprintln!("scp 64 MiB: up {up:?}, down {:?}", started.elapsed() - up);
    let digest = |p: &Path| -> anyhow::Result<String> {
        use sha2::Digest as _;
        Ok(hex::encode(sha2::Sha256::digest(std::fs::read(p)?)))
    };
    assert_eq!(
        digest(&original)?,
        digest(&back)?,
        "the file came back intact"
    );
    assert_eq!(
        digest(&original)?,
        digest(&there)?,
        "the file arrived intact"
    );

    phase!("3. warren connect pg, then psql through it");
    w.connect("connect-pg", &alice, &["pg", "--local", "127.0.0.1:15432"])?;
    let took = psql_until(&w.lab, 15432, 1, Duration::from_secs(20))?;
    eprintln!("psql select 1 through warren connect after {took:?}");
    let addr = psql(
        &w.lab,
        Side::Client,
        "127.0.0.1",
        15432,
        "select inet_server_addr()",
    )?;
    assert_eq!(addr, site_ip, "the server is the one inside the site");
    // The device's actor on the node recorded where the device is seen from.
    let rec = w.cluster.api(1).get_ok("/v1/devices/alice-laptop").await?;
    assert_eq!(
        rec["last_address"],
        json!(w.lab.client_router_wan().to_string()),
        "the registry records the device's public address: {rec}"
    );
    let mut connected = 0.0;
    for i in 0..3 {
        connected += metric_sum(&w.metrics(i).await?, "warren_devices_connected");
    }
    assert!(
        connected >= 1.0,
        "a node runs an actor for alice's connected device"
    );

    phase!("4. warren connect dns --udp, then dig through it");
    w.connect(
        "connect-dns",
        &alice,
        &["dns", "--udp", "--local", "127.0.0.1:15353"],
    )?;
    let start = Instant::now();
    loop {
        match dig(&w.lab, Side::Client, "127.0.0.1", 15353, "db.internal") {
            Ok(out) if out == site_ip => break,
            r if start.elapsed() > Duration::from_secs(20) => {
                bail!("dig through warren connect: {r:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    eprintln!(
        "dig db.internal through warren connect --udp after {:?}",
        start.elapsed()
    );

    phase!("4b. one tunnel per device: ssh (another process) and then psql through connect, each at the first try");
    // Every `warren` command of a device opens its flows through the device's one hub: a
    // second WireGuard endpoint with the same key would take the agent's session from the
    // first at each handshake, and the first's flows would stall until it handshakes again.
    for round in 0..2 {
        let (ok, out, err) = output(
            w.ssh(&alice, "ssh", &["echo", "side-by-side"]),
            Duration::from_secs(30),
        )?;
        assert!(
            ok && out.contains("side-by-side"),
            "ssh round {round}: {out}{err}"
        );
        let n = 40 + round;
        let one = psql(
            &w.lab,
            Side::Client,
            "127.0.0.1",
            15432,
            &format!("select {n}"),
        )
        .with_context(|| format!("psql at the first try right after ssh (round {round})"))?;
        assert_eq!(one, n.to_string());
        let dug = dig(&w.lab, Side::Client, "127.0.0.1", 15353, "db.internal")?;
        assert_eq!(
            dug, site_ip,
            "dig at the first try right after ssh and psql"
        );
    }
    let status = w.warren_json(&alice, &["status"])?;
    let sessions = status["sessions"]
        .as_array()
        .context("status has sessions")?;
    let with_paths: Vec<&Value> = sessions
        .iter()
        .filter(|s| s["sites"].as_array().is_some_and(|a| !a.is_empty()))
        .collect();
    assert_eq!(
        with_paths.len(),
        1,
        "one process (the hub) holds the device's WireGuard paths: {status}"
    );
    assert_eq!(with_paths[0]["command"], "hub", "{status}");
    // A hub that dies (SIGKILL: its socket file stays behind) is started again by the next
    // flow; `warren connect` goes on without a restart.
    let hub_pid = with_paths[0]["pid"].as_u64().context("the hub's pid")? as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(hub_pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    psql_until(&w.lab, 15432, 42, Duration::from_secs(20))
        .context("psql through connect after its hub was killed")?;
    let status = w.warren_json(&alice, &["status"])?;
    assert!(
        status.to_string().contains("\"command\":\"hub\""),
        "a new hub runs: {status}"
    );

    phase!("4c. a policy change takes alice's grants away and gives them back: the agent forgets her device and knows it again; the next psql works at the first try");
    // The agent drops a device without grants (its WireGuard session with it) and adds it
    // again without one: the hub's next flow must not wait 15 s for boringtun to give up.
    // Both policies that let her reach PostgreSQL (`ops` for pg, `from-client-net` for
    // pg-here) stop allowing her; `from-elsewhere` never did.
    let client_net = format!("{}/32", w.lab.client_router_wan());
    // (A PATCH is a JSON merge patch: each keeps the shape of its expression.)
    for (p, allow) in [
        ("ops", json!({"group": "nobody-has-this-group"})),
        (
            "from-client-net",
            json!({"and": [{"group": "nobody-has-this-group"}]}),
        ),
    ] {
        patch_policy(&api, p, allow).await?;
    }
    let taken = Instant::now();
    while psql(&w.lab, Side::Client, "127.0.0.1", 15432, "select 1").is_ok() {
        anyhow::ensure!(
            taken.elapsed() < Duration::from_secs(10),
            "psql still works 10 s after the policy stopped allowing it"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for (p, allow) in [
        ("ops", json!({"group": "admins"})),
        (
            "from-client-net",
            json!({"and": [{"group": "admins"}, {"source_cidr": client_net}]}),
        ),
    ] {
        patch_policy(&api, p, allow).await?;
    }
    // The grants reach the agent on the registry change (milliseconds); give them 2 s.
    std::thread::sleep(Duration::from_secs(2));
    let back = psql(&w.lab, Side::Client, "127.0.0.1", 15432, "select 43")
        .context("psql at the first try once the grants are back")?;
    assert_eq!(back, "43");

    phase!("5. bob (no grant) is refused; a forged WireGuard initiation gets nothing back");
    let bob = w.dir.path().join("bob");
    w.login(&bob, "bob", "bob-pw", "bob-laptop").await?;
    let started = Instant::now();
    let (ok, out, err) = output(
        w.warren(&bob, &["connect", "pg", "--local", "127.0.0.1:15433"]),
        Duration::from_secs(20),
    )?;
    eprintln!(
        "bob's warren connect pg ({:?}): {out}{err}",
        started.elapsed()
    );
    assert!(!ok, "bob may not connect to pg:\n{out}{err}");
    assert!(
        format!("{out}{err}").to_lowercase().contains("not allowed"),
        "a clear refusal:\n{out}{err}"
    );
    let ls = w.warren_json(&bob, &["ls"])?;
    assert!(
        !ls.to_string().contains("\"pg\""),
        "bob's ls shows nothing he may not reach: {ls}"
    );
    phase!("bob, with his own valid session, tries alice's device: her key, her name");
    {
        let session: Value = serde_json::from_slice(
            &std::fs::read(bob.join("node.json")).context("bob's node.json")?,
        )?;
        let token = session["token"].as_str().context("bob's token")?.to_owned();
        let alice_dev = w.cluster.api(0).get_ok("/v1/devices/alice-laptop").await?;
        let http = w.https()?;
        let base = format!("https://{}", w.cluster.nodes[0].admin_addr);
        let asked = |method: Method, path: &str, body: Option<Value>| {
            let mut r = http
                .request(method, format!("{base}{path}"))
                .bearer_auth(&token);
            if let Some(b) = body {
                r = r.json(&b);
            }
            r.send()
        };
        let r = asked(
            Method::POST,
            "/v1/client/devices",
            Some(
                json!({"name": "bobs-copy", "public_key": alice_dev["public_key"], "os": "linux"}),
            ),
        )
        .await?;
        let (status, text) = (r.status(), r.text().await?);
        assert_eq!(status, 409, "alice's key registered by bob: {text}");
        assert!(text.contains("another user"), "{text}");
        let r = asked(
            Method::POST,
            "/v1/client/connect",
            Some(json!({"device": "alice-laptop", "site": "site-a"})),
        )
        .await?;
        assert_eq!(
            r.status(),
            404,
            "bob connects as alice's device: {}",
            r.text().await?
        );
        let r = asked(Method::DELETE, "/v1/client/devices/alice-laptop", None).await?;
        assert_eq!(
            r.status(),
            404,
            "bob deletes alice's device: {}",
            r.text().await?
        );
        let after = w.cluster.api(0).get_ok("/v1/devices/alice-laptop").await?;
        assert_eq!(
            (after["public_key"].clone(), after["owner"].clone()),
            (alice_dev["public_key"].clone(), json!("alice")),
            "alice's device is unchanged"
        );
        let devices = w.cluster.api(0).get_ok("/v1/devices").await?;
        assert!(
            !devices.to_string().contains("bobs-copy"),
            "no device was made from alice's key: {devices}"
        );
    }
    for (i, relay) in w.relays.clone().iter().enumerate() {
        let pong = w.lab.udp_exchange(
            Side::Client,
            *relay,
            &[ping_frame(7)],
            Duration::from_secs(2),
        )?;
        assert!(
            !pong.is_empty(),
            "node {} answers a relay ping on {relay} (the relay is up)",
            i + 1
        );
        let forged = forged_initiation();
        let frames: Vec<Vec<u8>> = std::iter::once(forged.clone())
            .chain([0u32, 1, 2, 3, 0xdead_beef].map(|c| data_frame(c, &forged)))
            .collect();
        let got = w
            .lab
            .udp_exchange(Side::Client, *relay, &frames, Duration::from_secs(2))?;
        assert!(
            got.is_empty(),
            "node {}'s relay answered a forged initiation: {got:?}",
            i + 1
        );
    }

    phase!("6. revoking alice's session cuts her open ssh session; so does disabling her");
    let (mut session, _out) = open_ssh_session(&w, &alice)?;
    let sessions = api.get_ok("/v1/sessions").await?;
    let ids: Vec<String> = sessions["items"]
        .as_array()
        .context("sessions")?
        .iter()
        .filter(|s| s["user"] == "alice")
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect();
    assert!(!ids.is_empty(), "alice has a session: {sessions}");
    let revoked = Instant::now();
    for id in &ids {
        let (status, body) = api
            .raw(Method::DELETE, &format!("/v1/sessions/{id}"), None)
            .await?;
        assert!(status.is_success(), "{status} {body}");
    }
    let cut = exit_within(&mut session.0, Duration::from_secs(10));
    eprintln!("TIMING the ssh session ended {cut:?} after the revocation (sleep 60 was running)");
    assert!(
        cut.is_some_and(|d| d <= Duration::from_secs(5)),
        "the revoked session's ssh still runs {:?} later",
        revoked.elapsed()
    );
    drop(session);
    phase!("alice signs in again, opens ssh; the admin disables her");
    w.login(&alice, "alice", "alice-pw", "alice-laptop").await?;
    let (mut session, _out) = open_ssh_session(&w, &alice)?;
    api.send(Method::PATCH, "/v1/users/alice", &json!({"disabled": true}))
        .await?;
    let cut = exit_within(&mut session.0, Duration::from_secs(10));
    eprintln!("TIMING the ssh session ended {cut:?} after disabling the user");
    assert!(
        cut.is_some_and(|d| d <= Duration::from_secs(5)),
        "the disabled user's ssh still runs"
    );
    drop(session);
    api.send(
        Method::PATCH,
        "/v1/users/alice",
        &json!({"disabled": false}),
    )
    .await?;
    if w.warren_json(&alice, &["ls"]).is_err() {
        w.login(&alice, "alice", "alice-pw", "alice-laptop").await?;
    }
    w.lab.stop("connect-pg");
    w.lab.stop("connect-dns");
    w.connect("connect-pg", &alice, &["pg", "--local", "127.0.0.1:15432"])?;
    psql_until(&w.lab, 15432, 2, Duration::from_secs(20))?;

    phase!(
        "7. SIGKILL the node alice relays through: a new psql works within seconds, no manual step"
    );
    // `warren status` names the relay once the binding is made (and again after a
    // refresh): ask for up to 5 s.
    let alive: Vec<usize> = {
        let asked = Instant::now();
        let (status, via) = loop {
            let status = w.warren_json(&alice, &["status"])?;
            let mut seen = Vec::new();
            strings_under(&status, &["relay", "via", "node"], &mut seen);
            let via = (0..3).find(|&i| {
                let n = &w.cluster.nodes[i];
                seen.iter().any(|s| {
                    s == &n.name
                        || s.contains(&w.relays[i].to_string())
                        || s.contains(&n.admin_addr)
                        || s.contains(&n.cluster_addr)
                })
            });
            if via.is_some() || asked.elapsed() > Duration::from_secs(5) {
                break (status, via);
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        eprintln!("warren status: {status}");
        let via = via.with_context(|| {
            format!(
                "warren status names no node of the cluster as the relay: {status}\n{}",
                w.lab.log_of("connect-pg")
            )
        })?;
        phase!(
            "alice relays through {}; SIGKILL it",
            w.cluster.nodes[via].name
        );
        let killed = Instant::now();
        w.cluster.nodes[via].kill9();
        let took = psql_until(&w.lab, 15432, 3, Duration::from_secs(20))
            .with_context(|| w.lab.log_of("connect-pg"))?;
        eprintln!(
            "TIMING a new psql worked {took:?} after SIGKILL of {} ({:?} in all)",
            w.cluster.nodes[via].name,
            killed.elapsed()
        );
        let status = w.warren_json(&alice, &["status"])?;
        eprintln!("warren status after the kill: {status}");
        phase!(
            "alice's session names the killed node: the client asks the others discovery listed"
        );
        let path = alice.join("node.json");
        let mut session: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        session["node"] = json!(format!("https://{}", w.cluster.nodes[via].admin_addr));
        std::fs::write(&path, serde_json::to_vec(&session)?)?;
        let ls = w
            .warren_json(&alice, &["ls"])
            .context("warren ls with its node dead")?;
        assert!(ls.to_string().contains("\"pg\""), "{ls}");
        w.lab.stop("connect-dns");
        w.connect(
            "connect-dns",
            &alice,
            &["dns", "--udp", "--local", "127.0.0.1:15353"],
        )
        .context("warren connect with its node dead")?;
        (0..3).filter(|&i| i != via).collect()
    };

    phase!("8. bad input on the relays: garbage, truncated, oversized, replayed; nothing breaks, drops are counted");
    let before: Vec<f64> = {
        let mut v = Vec::new();
        for &i in &alive {
            v.push(metric_sum(&w.metrics(i).await?, RELAY_DROPPED));
        }
        v
    };
    // A capture of what the client sends the relays while psql runs, to replay.
    let ports: Vec<String> = alive
        .iter()
        .map(|&i| format!("dst port {}", w.relays[i].port()))
        .collect();
    let cap = w.lab.capture(Side::ClientRouter, "wan", "udp")?;
    psql_until(&w.lab, 15432, 4, Duration::from_secs(10))?;
    let all = cap.finish(&mut w.lab)?;
    let mut summary: std::collections::BTreeMap<String, usize> = Default::default();
    for p in &all {
        *summary
            .entry(format!(
                "{} -> {} [{:02x?}]",
                p.from,
                p.to,
                p.payload.first()
            ))
            .or_default() += 1;
    }
    eprintln!("captured on the client router's WAN: {summary:#?}");
    let captured: Vec<_> = all
        .into_iter()
        .filter(|p| alive.iter().any(|&i| SocketAddr::V4(p.to) == w.relays[i]))
        .collect();
    eprintln!(
        "captured {} datagrams from the client to the relays",
        captured.len()
    );
    assert!(
        !captured.is_empty(),
        "the client's traffic goes to a surviving node's relay (filter {ports:?}):\n{}",
        w.lab.log_of("connect-pg")
    );
    let mut sent = 0usize;
    for &i in &alive {
        let relay = w.relays[i];
        let mut bad: Vec<Vec<u8>> = (0..50).map(|n| garbage(1 + n * 7)).collect();
        bad.extend(truncated_frames());
        bad.extend([
            garbage(1600),
            data_frame(1, &random(1600)),
            garbage(4000),
            garbage(65000),
        ]);
        // Replays of what the client sent (from another address, as an attacker on the
        // path would): Data frames and Binds. Pings are left out: anyone's Ping gets a Pong
        // (its observed address), by design.
        bad.extend(
            captured
                .iter()
                .filter(|p| SocketAddr::V4(p.to) == relay)
                .filter(|p| p.payload.first() != Some(&0xA0))
                .take(20)
                .map(|p| p.payload.clone()),
        );
        sent += bad.len();
        let got = w
            .lab
            .udp_exchange(Side::Client, relay, &bad, Duration::from_secs(1))?;
        assert!(
            got.is_empty(),
            "{} answered bad input: {} datagrams",
            w.cluster.nodes[i].name,
            got.len()
        );
    }
    psql_until(&w.lab, 15432, 5, Duration::from_secs(10)).context("psql after the bad input")?;
    let mut after = Vec::new();
    for &i in &alive {
        after.push(metric_sum(&w.metrics(i).await?, RELAY_DROPPED));
    }
    let dropped: f64 = after.iter().sum::<f64>() - before.iter().sum::<f64>();
    eprintln!("{RELAY_DROPPED}* rose by {dropped} on the surviving nodes ({sent} bad datagrams sent; before {before:?}, after {after:?})");
    assert!(
        dropped >= 50.0,
        "the relays count what they drop ({RELAY_DROPPED}*): {before:?} -> {after:?}"
    );
    assert!(
        w.lab.is_running("agent"),
        "the agent survived:\n{}",
        w.lab.log_of("agent")
    );

    phase!("8b. bad input on the agent's WireGuard port, from inside the site: garbage, oversized, replays of what the relay sent it; nothing answers, the agent says what it dropped");
    let agent_wg = SocketAddr::new(w.lab.site_ip().into(), AGENT_WG_PORT);
    let cap = w.lab.capture(
        Side::SiteRouter,
        "lan",
        &format!("udp and dst port {AGENT_WG_PORT}"),
    )?;
    psql_until(&w.lab, 15432, 6, Duration::from_secs(10))?;
    let captured = cap.finish(&mut w.lab)?;
    let mut bad: Vec<Vec<u8>> = (0..20).map(|n| garbage(1 + n * 13)).collect();
    bad.extend([
        forged_initiation(),
        garbage(1600),
        garbage(4000),
        garbage(65000),
    ]);
    let replays: Vec<Vec<u8>> = captured
        .iter()
        .filter(|p| p.payload.first() == Some(&0xA5))
        .take(20)
        .map(|p| p.payload.clone())
        .collect();
    assert!(
        !replays.is_empty(),
        "the relay's data frames to the agent were captured ({} datagrams)",
        captured.len()
    );
    bad.extend(replays);
    let got = w
        .lab
        .udp_exchange(Side::Site, agent_wg, &bad, Duration::from_secs(1))?;
    assert!(
        got.is_empty(),
        "the agent answered bad input: {} datagrams",
        got.len()
    );
    psql_until(&w.lab, 15432, 7, Duration::from_secs(10))
        .context("psql after the bad input on the agent")?;
    let said = Instant::now();
    while !w
        .lab
        .log_of("agent")
        .contains("WireGuard endpoint dropped datagrams")
    {
        assert!(
            said.elapsed() < Duration::from_secs(25),
            "the agent logs what it dropped:\n{}",
            w.lab.log_of("agent")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "agent: {}",
        w.lab
            .log_of("agent")
            .lines()
            .filter(|l| l.contains("dropped datagrams"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(w.lab.is_running("agent"), "the agent survived");

    eprintln!("TIMING whole test {:?}", test_start.elapsed());
    Ok(())
}
