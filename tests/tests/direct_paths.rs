//! Direct paths (issue 15), black box: the real `warren` client and `warren-agent`, each
//! behind a real NAT router (iptables in network namespaces, [`warren_tests::netlab`]'s
//! internet topologies), punch a direct WireGuard path through the coordinator on the
//! nodes, and fall back to the relay when it dies.
//!
//! One 3-node cluster serves every cell: it listens on the first lab's node address, and
//! every lab's `inet` routes up to the root namespace, so each lab's machines reach it.
//! One sign-in (device flow, Chromium) serves every cell too: each cell's client uses a
//! copy of the signed-in configuration directory (one hub per copy, in that lab).
//!
//! Each cell asserts what a user sees: `warren status --json` says `direct` or `relayed`,
//! and iperf3 through `warren connect` either leaves the relays' forwarded-bytes counters
//! where they were (direct) or moves them by the transfer (relayed).
//!
//! Needs root and `scripts/install-test-deps`. Run: `cargo test -p warren-tests --test
//! direct_paths -- --nocapture`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use warren_tests::access::{metric_sum, ok_output, start_cluster, World};
use warren_tests::netlab::{Lab, Nat, Side, Topology, IPERF_PORT};
use warren_tests::oidc::Idp;
use warren_tests::{bins, phase};

/// The agent's WireGuard port (fixed: the port-mapped cell forwards it).
const AGENT_WG_PORT: u16 = 51820;
/// The relays' forwarded-bytes counter.
const FORWARDED: &str = "warren_relay_forwarded_bytes_total";
/// A direct cell must be direct within this long after `warren connect` starts.
const DIRECT_WITHIN: Duration = Duration::from_secs(10);

/// What a cell's site is called (and its resources' suffix).
fn site_name(cell: &str) -> String {
    format!("s-{cell}")
}

/// Copies the signed-in configuration `from` to `to`, without its run directory (the hub
/// of the copy is its own).
fn copy_config(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_name() == "run" || e.file_type()?.is_dir() {
            continue;
        }
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// The sum of the relays' forwarded bytes over every live node.
async fn forwarded(w: &World) -> f64 {
    let mut sum = 0.0;
    for i in 0..w.cluster.nodes.len() {
        if let Ok(m) = w.metrics(i).await {
            sum += metric_sum(&m, FORWARDED);
        }
    }
    sum
}

/// One cell's running parts.
struct Cell {
    name: String,
    config: PathBuf,
    /// The local port `warren connect iperf-<cell>` listens on.
    iperf: u16,
}

/// The site of `cell`'s path as `warren status --json` shows it (path, direct address,
/// the whole entry).
fn site_path(w: &World, lab: &Lab, cell: &Cell) -> anyhow::Result<(String, Value)> {
    let out = ok_output(
        w.warren_at(lab, &cell.config, &["status", "--json"]),
        Duration::from_secs(15),
    )?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("status: {out}"))?;
    let site = site_name(&cell.name);
    let entry = v["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["sites"].as_array().into_iter().flatten())
        .find(|s| s["site"] == site.as_str())
        .cloned()
        .unwrap_or(Value::Null);
    Ok((entry["path"].as_str().unwrap_or("none").to_owned(), entry))
}

/// Polls `warren status` until the site's path is `want` (bounded); how long it took.
fn wait_path(
    w: &World,
    lab: &Lab,
    cell: &Cell,
    want: &str,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let (path, entry) = site_path(w, lab, cell)?;
        if path == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            eprintln!(
                "hub log of cell {}:\n{}",
                cell.name,
                tail(&hub_log(cell), 60)
            );
            eprintln!("agent log:\n{}", tail(&lab.log_of("agent"), 60));
            bail!(
                "cell {}: the path is {path}, not {want}, after {limit:?}: {entry}",
                cell.name
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// iperf3 through the cell's `warren connect` for `secs`; the bytes received.
fn iperf(lab: &Lab, cell: &Cell, secs: u32) -> anyhow::Result<f64> {
    let mut last = String::new();
    // The server may still be closing the previous test ("the server is busy").
    for _ in 0..5 {
        let mut cmd = lab.client_exec("iperf3");
        cmd.args(["-c", "127.0.0.1", "-p", &cell.iperf.to_string(), "-t"])
            .arg(secs.to_string())
            .args(["-J", "--connect-timeout", "5000"]);
        let (ok, out, err) =
            warren_tests::access::output(cmd, Duration::from_secs(u64::from(secs) + 30))?;
        if ok {
            let v: Value = serde_json::from_str(&out)?;
            return v["end"]["sum_received"]["bytes"]
                .as_f64()
                .context("iperf3 -J without end.sum_received.bytes");
        }
        last = format!("{out}{err}");
        if !last.contains("busy") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("iperf3 through cell {} failed: {last}", cell.name)
}

/// Sets up `cell` in `lab`: its site, resources, agent (enrolled from behind the site's
/// NAT), iperf3 in the site, and `warren connect iperf-<cell>` on the client with a copy
/// of `signed_in`. Returns once `connect` listens.
async fn start_cell(
    w: &World,
    lab: &mut Lab,
    cell: &str,
    signed_in: &Path,
    iperf_port: u16,
) -> anyhow::Result<(Cell, Instant)> {
    let api = w.cluster.api(0);
    let site = site_name(cell);
    api.post_ok("/v1/sites", &json!({"name": site})).await?;
    let site_ip = lab.site_ip().to_string();
    api.post_ok(
        "/v1/resources",
        &json!({"name": format!("iperf-{cell}"), "site": site, "policies": ["ops"],
            "route": {"private": {"address": site_ip, "ports": IPERF_PORT.to_string(), "protocols": ["tcp"]}}}),
    )
    .await?;
    let token = api
        .post_ok(
            &format!("/v1/sites/{site}/tokens"),
            &json!({"expires_in_s": 600}),
        )
        .await?["token"]
        .as_str()
        .context("no site token")?
        .to_owned();
    lab.start_iperf3()?;
    let mut agent = lab.site_exec(&bins().agent);
    agent
        .arg("--state-dir")
        .arg(w.dir.path().join(format!("agent-{cell}")))
        .args([
            "--node",
            &w.cluster.nodes[0].cluster_addr,
            "--token",
            &token,
            "--wireguard-listen",
            &format!("0.0.0.0:{AGENT_WG_PORT}"),
        ])
        .env("WARREN_LOG", "info,warren_net=debug");
    lab.spawn("agent", agent)?;
    let config = w.dir.path().join(format!("alice-{cell}"));
    if config != signed_in {
        copy_config(signed_in, &config)?;
    }
    let c = Cell {
        name: cell.to_owned(),
        config,
        iperf: iperf_port,
    };
    // The agent must hold its tunnel before the client asks for the site.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lab.log_of("agent").contains("configuration received") {
        if Instant::now() > deadline {
            bail!(
                "cell {cell}: the agent got no configuration within 20 s:\n{}",
                lab.log_of("agent")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    let name = format!("connect-{cell}");
    let mut cmd = w.warren_at(
        lab,
        &c.config,
        &[
            "connect",
            &format!("iperf-{cell}"),
            "--local",
            &format!("127.0.0.1:{iperf_port}"),
        ],
    );
    // The hub it starts logs its path decisions (run/hub.log).
    cmd.env("WARREN_LOG", "info,warren_net=debug");
    lab.spawn(&name, cmd)?;
    while !lab.log_of(&name).contains("listening on") {
        if !lab.is_running(&name) {
            bail!(
                "warren connect (cell {cell}) exited:\n{}",
                lab.log_of(&name)
            );
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!(
                "warren connect (cell {cell}) never listened:\n{}",
                lab.log_of(&name)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((c, started))
}

/// The last `n` lines of `s`.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The hub's log of a cell (where the path changes are logged).
fn hub_log(cell: &Cell) -> String {
    std::fs::read_to_string(cell.config.join("run/hub.log")).unwrap_or_default()
}

/// Runs one cell to its verdict: direct (within [`DIRECT_WITHIN`], and iperf3 leaves the
/// relays alone) or relayed (still so after a whole punch round, and iperf3 goes through
/// the relays). Returns (time to direct, throughput bit/s).
async fn verdict(
    w: &World,
    lab: &Lab,
    cell: &Cell,
    started: Instant,
    want_direct: bool,
) -> anyhow::Result<(Option<Duration>, f64)> {
    let to_direct = if want_direct {
        let r = wait_path(w, lab, cell, "direct", DIRECT_WITHIN);
        r?;
        Some(started.elapsed())
    } else {
        // The first round ends (no ack) within a Call and a punch window.
        std::thread::sleep(Duration::from_secs(7));
        let (path, entry) = site_path(w, lab, cell)?;
        assert_eq!(path, "relayed", "cell {}: {entry}", cell.name);
        None
    };
    let before = forwarded(w).await;
    let secs = 3;
    let got = tokio::task::block_in_place(|| iperf(lab, cell, secs))?;
    let moved = forwarded(w).await - before;
    eprintln!(
        "cell {}: {} after {:?}; iperf3 {:.0} MB in {secs} s ({:.0} Mbit/s); relays forwarded {:.1} MB",
        cell.name,
        if want_direct { "direct" } else { "relayed" },
        to_direct,
        got / 1e6,
        got * 8.0 / f64::from(secs) / 1e6,
        moved / 1e6
    );
    assert!(
        got > 1e6,
        "cell {}: iperf3 moved only {got} bytes",
        cell.name
    );
    if want_direct {
        // Heartbeats and WireGuard keepalives never touch the relay; a few stray packets
        // around the switch may.
        assert!(
            moved < 256.0 * 1024.0,
            "cell {}: direct, yet the relays forwarded {moved} bytes of {got}",
            cell.name
        );
        let (path, entry) = site_path(w, lab, cell)?;
        assert_eq!(path, "direct", "cell {} after iperf3: {entry}", cell.name);
    } else {
        assert!(
            moved >= got,
            "cell {}: relayed, yet the relays forwarded {moved} bytes of {got}",
            cell.name
        );
    }
    Ok((to_direct, got * 8.0 / f64::from(secs)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_and_agent_go_direct_whenever_their_nats_allow_it() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    tokio::task::spawn_blocking(bins).await?;

    phase!("home lab (easy x easy), a 3-node cluster on its node address, the IdP");
    let mut home = Lab::start_with(
        "direct-home",
        Topology::Internet {
            site: Nat::Easy,
            client: Nat::Easy,
        },
    )?;
    let (cluster, relays) = start_cluster(&home).await?;
    let idp = tokio::task::spawn_blocking(|| Idp::start(&["http://127.0.0.1/unused".into()], &[]))
        .await??;
    let idp_addr = SocketAddr::from(([127, 0, 0, 1], idp.port));
    home.forward_tcp(Side::Client, idp_addr, idp_addr)?;
    let dir = tempfile::tempdir()?;
    let mut w = World {
        lab: home,
        cluster,
        idp,
        relays,
        client_id_override: None,
        dir,
    };
    let api = w.cluster.api(0);
    let provider = json!({"name": "test", "issuer": w.idp.issuer, "client_id": w.idp.client_id,
        "client_secret": w.idp.client_secret, "scopes": ["groups"], "groups_claim": "groups"});
    api.post_ok("/v1/identity-providers", &provider).await?;
    api.post_ok(
        "/v1/policies",
        &json!({"name": "ops", "allow": {"group": "admins"}}),
    )
    .await?;

    phase!("alice signs in once (device flow in Chromium)");
    let alice = w.dir.path().join("alice-easy-easy");
    w.login(&alice, "alice", "alice-pw", "alice-laptop").await?;

    // The home lab holds the nodes' address for the whole test; its cells need it mutable
    // beside the world, which keeps a spare lab meanwhile.
    let mut home = std::mem::replace(&mut w.lab, Lab::start("direct-spare")?);
    let mut table: Vec<String> = Vec::new();
    let mut port = 16000;

    phase!("easy x easy: direct; short NAT timeouts hold; a cut falls back; rebinding recovers");
    {
        // Small path MTU first (ICMP dropped): never direct over it, and no stall.
        home.small_mtu(1280, true)?;
        let (cell, started) = start_cell(&w, &mut home, "easy-easy", &alice, port).await?;
        port += 1;
        verdict(&w, &home, &cell, started, false).await?;
        table.push("easy x easy, path MTU 1280, ICMP dropped: relayed (no stall)".into());
        home.small_mtu(1280, false)?;
        // The next round (backoff 5 s, then 10 s) finds the full-size path.
        let took = wait_path(&w, &home, &cell, "direct", Duration::from_secs(30))?;
        eprintln!("MTU restored: direct after {took:?}");
        let (_, bps) = verdict(&w, &home, &cell, Instant::now(), true).await?;
        table.push(format!("easy x easy: direct, {:.0} Mbit/s", bps / 1e6));

        // NAT mappings that expire after 5 s stay open: heartbeats every 500 ms.
        home.set_udp_timeout(Side::ClientRouter, 5)?;
        home.set_udp_timeout(Side::SiteRouter, 5)?;
        std::thread::sleep(Duration::from_secs(12));
        let (path, entry) = site_path(&w, &home, &cell)?;
        assert_eq!(
            path, "direct",
            "after 12 s idle with 5 s NAT timeouts: {entry}"
        );
        assert_eq!(entry["fallbacks"], 0, "{entry}");
        verdict(&w, &home, &cell, Instant::now(), true).await?;
        table.push("easy x easy, NAT UDP timeout 5 s, idle 12 s: stays direct".into());

        // Cut between the routers mid-transfer: iperf3 survives on the relay.
        let lab_ref = &home;
        let cut_at = Duration::from_secs(2);
        let fell_back = std::thread::scope(|s| -> anyhow::Result<(f64, Duration)> {
            let t = s.spawn(|| iperf(lab_ref, &cell, 8));
            std::thread::sleep(cut_at);
            lab_ref.cut_between_routers(true)?;
            let cut = Instant::now();
            let took = wait_path(&w, lab_ref, &cell, "relayed", Duration::from_secs(5))
                .map(|_| cut.elapsed())?;
            let got = t.join().map_err(|_| anyhow::anyhow!("iperf thread"))??;
            Ok((got, took))
        })?;
        eprintln!(
            "cut mid-transfer: relayed {:?} after the cut; iperf3 finished with {:.0} MB",
            fell_back.1,
            fell_back.0 / 1e6
        );
        assert!(
            fell_back.1 <= Duration::from_secs(3),
            "fallback took {:?}",
            fell_back.1
        );
        table.push(format!(
            "easy x easy, cut mid-transfer: relayed after {:.1} s, the transfer completes",
            fell_back.1.as_secs_f64()
        ));
        home.cut_between_routers(false)?;
        let back = wait_path(&w, &home, &cell, "direct", Duration::from_secs(45))?;
        table.push(format!(
            "easy x easy, cut restored: direct again after {:.1} s",
            back.as_secs_f64()
        ));

        // The client's NAT takes a new public address mid-flow.
        let lab_ref = &home;
        let got = std::thread::scope(|s| -> anyhow::Result<f64> {
            let t = s.spawn(|| iperf(lab_ref, &cell, 6));
            std::thread::sleep(Duration::from_secs(2));
            lab_ref.rebind(Side::ClientRouter)?;
            t.join().map_err(|_| anyhow::anyhow!("iperf thread"))?
        })?;
        assert!(got > 1e6, "iperf3 across the rebinding moved {got} bytes");
        let back = wait_path(&w, &home, &cell, "direct", Duration::from_secs(45))?;
        table.push(format!(
            "easy x easy, NAT rebinding mid-flow: the transfer completes; direct again after {:.1} s",
            back.as_secs_f64()
        ));

        // Twice: whichever way the first goes (off the client's relay, or onto it), the
        // second goes the other way, so every run covers both.
        for _ in 0..2 {
            phase!("easy x easy: the agent moves a tunnel while direct; a cut then falls back to a relay that follows it");
            agent_moves_then_the_direct_path_dies(&w, &home, &cell, &mut table).await?;
        }
    }

    let cells: [(&str, Topology, bool); 6] = [
        (
            "easy-firewall",
            Topology::Internet {
                site: Nat::FirewallOnly,
                client: Nat::Easy,
            },
            true,
        ),
        (
            "hard-hard",
            Topology::Internet {
                site: Nat::Hard,
                client: Nat::Hard,
            },
            false,
        ),
        (
            "easy-hard",
            Topology::Internet {
                site: Nat::Hard,
                client: Nat::Easy,
            },
            false,
        ),
        (
            "mapped-hard",
            Topology::Internet {
                site: Nat::PortMapped {
                    port: AGENT_WG_PORT,
                },
                client: Nat::Hard,
            },
            true,
        ),
        (
            "double-easy",
            Topology::Internet {
                site: Nat::Easy,
                client: Nat::Double,
            },
            true,
        ),
        ("same-lan", Topology::SameLan { site: Nat::Easy }, true),
    ];
    for (name, topology, direct) in cells {
        phase!(
            "cell {name}: expect {}",
            if direct { "direct" } else { "relayed" }
        );
        let mut lab = Lab::start_with(name, topology)?;
        let (cell, started) = start_cell(&w, &mut lab, name, &alice, port).await?;
        port += 1;
        let (to_direct, bps) = verdict(&w, &lab, &cell, started, direct).await?;
        table.push(match to_direct {
            Some(t) => format!(
                "{name}: direct {:.2} s after connect, {:.0} Mbit/s",
                t.as_secs_f64(),
                bps / 1e6
            ),
            None => format!("{name}: relayed, {:.0} Mbit/s", bps / 1e6),
        });
        if name == "hard-hard" {
            phase!("cell {name}: behind a NAT that forgets idle mappings after 5 s, the agent keeps the ones its relays reach it through");
            agent_keeps_its_relay_mappings(&w, &lab, &cell, &mut table).await?;
        }
        // The lab (agent, hub, iperf3) goes with it.
    }
    phase!("a relay-only node in its own namespace: used when it is the closest; revoked, its sessions end");
    relay_only_node(&w, &alice, port, &mut table).await?;

    eprintln!("direct paths:\n  {}", table.join("\n  "));
    drop(w);
    drop(home);
    Ok(())
}

/// The site's NAT forgets idle UDP mappings after 5 s; the agent binds to its relays every
/// 10 s and pings them every 2 s in between. Sampled every second for 12 s, the site NAT
/// always holds the agent's mapping to every relay it is bound to (without the pings, each
/// would be gone for about half of every 10 s, and a relayed session with it); then, after
/// that idle time, a transfer goes through the relay at once.
async fn agent_keeps_its_relay_mappings(
    w: &World,
    lab: &Lab,
    cell: &Cell,
    table: &mut Vec<String>,
) -> anyhow::Result<()> {
    let site = site_name(&cell.name);
    lab.set_udp_timeout(Side::SiteRouter, 5)?;
    let held = tunnel_nodes(w, &site).await?;
    let relays: Vec<SocketAddr> = (0..held.len())
        .filter(|&i| held[i])
        .map(|i| w.relays[i])
        .collect();
    anyhow::ensure!(!relays.is_empty(), "no node holds the site's tunnel");
    // Let the mappings made by the last transfer age out first.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for second in 0..12 {
        let table = lab.conntrack_udp(Side::SiteRouter)?;
        for r in &relays {
            let mapped = table.lines().any(|l| {
                l.contains(&format!("sport={AGENT_WG_PORT} "))
                    && l.contains(&format!("dst={} ", r.ip()))
                    && l.contains(&format!("dport={} ", r.port()))
            });
            assert!(
                mapped,
                "after {second} s: the site NAT holds no mapping from the agent to relay {r}:\n{table}"
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let got = tokio::task::block_in_place(|| iperf(lab, cell, 3))?;
    assert!(
        got > 1e6,
        "after the idle time iperf3 moved only {got} bytes"
    );
    let (path, entry) = site_path(w, lab, cell)?;
    assert_eq!(path, "relayed", "{entry}");
    table.push(format!(
        "hard x hard, NAT UDP timeout 5 s: the agent's relay mappings held for 12 s of sampling; then relayed, {:.0} MB in 3 s",
        got / 1e6
    ));
    Ok(())
}

/// Which nodes hold a tunnel of `site` now (each node's own view).
async fn tunnel_nodes(w: &World, site: &str) -> anyhow::Result<Vec<bool>> {
    let mut out = Vec::new();
    for i in 0..w.cluster.nodes.len() {
        let v = w
            .cluster
            .api(i)
            .get_ok(&format!("/v1/sites/{site}/status"))
            .await?;
        out.push(v["tunnel_here"] == true);
    }
    Ok(out)
}

/// An agent moves its tunnels between nodes (to a closer one, or off one it lost), and a
/// client's session must not notice. The hard case: the session is direct when the agent
/// moves, so nothing flows through the client's relay; with the site's NAT forgetting idle
/// mappings after 5 s, the agent's old node soon cannot reach it. When the direct path
/// then dies, the client falls back to its relay, which must send its traffic to where
/// the agent is now (one hop to a peer, or to the agent itself), on the client's channel.
async fn agent_moves_then_the_direct_path_dies(
    w: &World,
    lab: &Lab,
    cell: &Cell,
    table: &mut Vec<String>,
) -> anyhow::Result<()> {
    let site = site_name(&cell.name);
    let relay = relay_node_of(w, lab, cell)?;
    let via = w
        .cluster
        .nodes
        .iter()
        .position(|n| n.name == relay)
        .with_context(|| format!("the client's relay {relay:?} is no node of the cluster"))?;
    let held = tunnel_nodes(w, &site).await?;
    // The client's own relay if it holds a tunnel (its session then goes one hop to a
    // peer), else another node that does (the agent then moves that tunnel to the client's
    // relay, and its session comes home).
    let cut = if held[via] {
        via
    } else {
        held.iter()
            .position(|h| *h)
            .context("no node holds the site's tunnel")?
    };
    let kind = if cut == via {
        "off the client's relay"
    } else {
        "onto the client's relay"
    };
    let tunnel_port: SocketAddr = w.cluster.nodes[cut].cluster_addr.parse()?;
    eprintln!(
        "client relays through {relay}; tunnels at {held:?}; cutting the agent off {}'s tunnel port {tunnel_port} ({kind})",
        w.cluster.nodes[cut].name
    );
    lab.block_udp_to(Side::Site, tunnel_port, true)?;
    let blocked = Instant::now();
    // The agent notices (5 s without an answer) and dials another node.
    let moved = loop {
        let held = tunnel_nodes(w, &site).await?;
        // Off the client's relay: anywhere else; onto it: the only node without a tunnel.
        let landed = if cut == via {
            held.iter().any(|h| *h)
        } else {
            held[via]
        };
        if !held[cut] && landed {
            break blocked.elapsed();
        }
        if blocked.elapsed() > Duration::from_secs(30) {
            bail!(
                "the agent did not move its tunnel off {} ({kind}) within 30 s: {held:?}\n{}",
                w.cluster.nodes[cut].name,
                tail(&lab.log_of("agent"), 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("the agent's tunnel moved {moved:?} after the cut");
    // Past the site NAT's 5 s: the old node's mapping to the agent is gone.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let (path, entry) = site_path(w, lab, cell)?;
    assert_eq!(path, "direct", "still direct after the move: {entry}");
    let before = forwarded(w).await;
    lab.cut_between_routers(true)?;
    let fell_back = wait_path(w, lab, cell, "relayed", Duration::from_secs(5))?;
    let got = tokio::task::block_in_place(|| iperf(lab, cell, 3)).with_context(|| {
        format!(
            "a transfer over the relay after the agent moved its tunnel {kind}\nhub:\n{}\nagent:\n{}\nnodes (relay):\n{}",
            tail(&hub_log(cell), 40),
            tail(&lab.log_of("agent"), 40),
            tail(
                &w.cluster
                    .logs()
                    .lines()
                    .filter(|l| l.contains("relay"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                40
            )
        )
    })?;
    let through = forwarded(w).await - before;
    eprintln!(
        "relayed {fell_back:?} after the cut; a 3 s transfer moved {:.0} MB, the relays {:.0} MB",
        got / 1e6,
        through / 1e6
    );
    assert!(got > 1e6, "after the move iperf3 moved only {got} bytes");
    assert!(
        through >= got,
        "the transfer went through the relays: {through} of {got}"
    );
    let (_, entry) = site_path(w, lab, cell)?;
    assert_eq!(
        entry["relay_node"].as_str(),
        Some(relay.as_str()),
        "the client kept its relay (the relay followed the site): {entry}"
    );
    lab.cut_between_routers(false)?;
    lab.block_udp_to(Side::Site, tunnel_port, false)?;
    let back = wait_path(w, lab, cell, "direct", Duration::from_secs(45))?;
    table.push(format!(
        "easy x easy, the agent moves a tunnel {kind} while direct, then the direct path is cut: relayed, {:.0} MB in 3 s; direct again after {:.1} s",
        got / 1e6,
        back.as_secs_f64()
    ));
    Ok(())
}

/// The site's relay as `warren status --json` names it (its node).
fn relay_node_of(w: &World, lab: &Lab, cell: &Cell) -> anyhow::Result<String> {
    let (_, entry) = site_path(w, lab, cell)?;
    Ok(entry["relay_node"].as_str().unwrap_or("").to_owned())
}

/// Polls until the site's relay is (`want`) or is not (`!want`) the node `node`.
fn wait_relay(
    w: &World,
    lab: &Lab,
    cell: &Cell,
    node: &str,
    want: bool,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let now = relay_node_of(w, lab, cell)?;
        if (now == node) == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            let (_, entry) = site_path(w, lab, cell)?;
            eprintln!("hub log:\n{}", tail(&hub_log(cell), 60));
            bail!(
                "the relay is {now:?}, {} {node:?}, after {limit:?}: {entry}",
                if want { "not" } else { "still" }
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Drops (or lets through again) the client's UDP to every cluster relay, at its router.
fn block_cluster_relays(w: &World, lab: &Lab, blocked: bool) -> anyhow::Result<()> {
    for r in &w.relays {
        let out = lab
            .exec(Side::ClientRouter, "iptables")
            .args([if blocked { "-I" } else { "-D" }, "FORWARD", "-d"])
            .arg(r.ip().to_string())
            .args(["-p", "udp", "--dport"])
            .arg(r.port().to_string())
            .args(["-j", "DROP"])
            .output()?;
        if !out.status.success() {
            bail!("iptables: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

/// A relay-only node enrolled with a relay join token, in its own namespace on the
/// internet. Behind two hard NATs the client is relayed; with the cluster's relays out of
/// its reach the relay-only node is the closest it has, and traffic goes client → it → the
/// node holding the site → agent. Removing the node from the cluster ends its sessions:
/// it stops and exits, and the client moves to a cluster relay with the transfer working.
async fn relay_only_node(
    w: &World,
    signed_in: &Path,
    port: u16,
    table: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut lab = Lab::start_with(
        "relay-only",
        Topology::Internet {
            site: Nat::Hard,
            client: Nat::Hard,
        },
    )?;
    let relay_ip = lab.add_relay_host()?;
    let api = w.cluster.api(0);
    let token = api
        .post_ok("/v1/join-tokens", &json!({"role": "relay"}))
        .await?["token"]
        .as_str()
        .context("no join token")?
        .to_owned();
    // A relay token does not make a member, and a member token does not make a relay.
    let data = w.dir.path().join("relay-far");
    let mut cmd = lab.exec(Side::Relay, &bins().node);
    // Node settings go before the command, as for every warren-node command.
    let listen = format!("{relay_ip}:7401");
    cmd.args(["--relay-listen", &listen, "relay", "--data-dir"])
        .arg(&data)
        .args(["--name", "far", "--peer", &w.cluster.nodes[0].cluster_addr])
        .args(["--token", &token]);
    cmd.env("WARREN_LOG", "info,warren_node::relay_only=debug");
    lab.spawn("relay-far", cmd)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lab.log_of("relay-far").contains("Relaying for cluster") {
        if Instant::now() > deadline || !lab.is_running("relay-far") {
            bail!(
                "the relay-only node did not start:\n{}",
                lab.log_of("relay-far")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let nodes = api.get_ok("/v1/nodes").await?;
    let far = nodes["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == "far")
        .cloned()
        .context("the relay-only node is not listed")?;
    // Relay-grade, and no member of the Raft membership.
    assert_eq!(
        (&far["grade"], &far["role"]),
        (&json!("relay"), &json!("none")),
        "{far}"
    );
    // It holds its key, its certificate and the CA's certificate: no registry, no CA key.
    let mut held: Vec<String> = std::fs::read_dir(&data)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    held.sort();
    assert_eq!(held, ["ca.pem", "node.key", "node.pem", "relay.json"]);

    block_cluster_relays(w, &lab, true)?;
    let (cell, _) = start_cell(w, &mut lab, "relay-only", signed_in, port).await?;
    wait_relay(w, &lab, &cell, "far", true, Duration::from_secs(15))?;
    // The agent binds to it too (the nodes name it): client → it → agent, no node between.
    let bound_far = |log: &str| {
        log.lines()
            .any(|l| l.contains("relay bound") && l.contains(&listen))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bound_far(&lab.log_of("agent")) {
        if Instant::now() > deadline {
            bail!(
                "the agent never bound to the relay-only node:\n{}",
                tail(&lab.log_of("agent"), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = tokio::task::block_in_place(|| iperf(&lab, &cell, 3))?;
    assert!(
        got > 1e6,
        "iperf3 through the relay-only node moved {got} bytes"
    );
    let (path, entry) = site_path(w, &lab, &cell)?;
    assert_eq!(path, "relayed", "{entry}");
    table.push(format!(
        "relay-only node, the closest relay: relayed through it, {:.0} MB in 3 s",
        got / 1e6
    ));

    // Revoked mid-flow: the transfer carries on through a cluster relay.
    block_cluster_relays(w, &lab, false)?;
    let lab_ref = &lab;
    let (got, moved, stopped) =
        std::thread::scope(|s| -> anyhow::Result<(f64, Duration, Duration)> {
            let t = s.spawn(|| iperf(lab_ref, &cell, 10));
            std::thread::sleep(Duration::from_secs(2));
            let revoked = Instant::now();
            let del = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(api.raw(
                    reqwest::Method::DELETE,
                    "/v1/nodes/far",
                    None,
                ))
            })?;
            assert!(del.0.is_success(), "deleting the relay-only node: {del:?}");
            let mut stopped = None;
            while revoked.elapsed() < Duration::from_secs(15) {
                if lab_ref
                    .log_of("relay-far")
                    .contains("no longer a relay of this cluster")
                {
                    stopped = Some(revoked.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let stopped = stopped.with_context(|| {
                format!(
                    "the revoked relay-only node did not stop:\n{}",
                    lab_ref.log_of("relay-far")
                )
            })?;
            let moved = wait_relay(w, lab_ref, &cell, "far", false, Duration::from_secs(15))?;
            let got = t.join().map_err(|_| anyhow::anyhow!("iperf thread"))??;
            Ok((got, moved + stopped, stopped))
        })?;
    assert!(got > 1e6, "iperf3 across the revocation moved {got} bytes");
    assert!(
        !lab.is_running("relay-far"),
        "the revoked relay-only node still runs:\n{}",
        lab.log_of("relay-far")
    );
    // Enrolled again with the same directory: refused, it is no relay of the cluster now.
    let mut again = lab.exec(Side::Relay, &bins().node);
    again.arg("relay").arg("--data-dir").arg(&data);
    let (ok, _, err) = warren_tests::access::output(again, Duration::from_secs(20))?;
    assert!(
        !ok && err.contains("no longer a relay"),
        "a revoked relay restarted: {err}"
    );
    table.push(format!(
        "relay-only node revoked mid-transfer: it stopped after {:.1} s, the client was on a cluster relay {:.1} s after the revocation, the transfer completes",
        stopped.as_secs_f64(),
        moved.as_secs_f64()
    ));
    Ok(())
}
