//! The NAT lab alone, no Warren binary: every topology of [`warren_tests::netlab`] built
//! for real, and in each a plain simultaneous UDP hole punch between a socket on the client
//! and one on the site, introduced by a rendezvous on the nodes' address (root namespace).
//! Each cell asserts the outcome the direct-path matrix (issue 15) relies on:
//!
//! | cell | expected |
//! |---|---|
//! | star (today's lab) | no direct path (the root namespace does not forward) |
//! | easy × easy | punch works |
//! | firewall-only (site) × easy | works; the site's own address is its public one |
//! | hard × hard | fails (both mappings endpoint-dependent) |
//! | easy (site) × hard (client) | fails (no birthday probing here) |
//! | port-mapped (site) × hard (client) | works when the hard side sends to the mapped port |
//! | easy × double NAT (client) | works through both NATs |
//! | same LAN | host addresses reach each other; the router's WAN address does not hairpin |
//! | easy × easy, cut between routers | punch fails, both still reach the root namespace |
//! | easy × easy, MTU 1280 between routers | 1400 bytes with DF lost, 1200 pass, the nodes' path keeps 1500 |
//! | easy × easy, rebind / flush / UDP timeout | new public address; old mappings gone |
//!
//! Needs root, `iproute2`, `iptables`, `conntrack`, `openssh-server`, `postgresql`,
//! `dnsmasq`, `iperf3` (`scripts/install-test-deps`). Run:
//! `cargo test -p warren-tests --test nat_lab -- --nocapture`.

use std::net::{SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use warren_tests::netlab::punch::{
    datagram_arrives, hole_punch, mapping_is_endpoint_independent, Punch, Rendezvous,
};
use warren_tests::netlab::{self, Lab, Nat, Side, Topology};
use warren_tests::phase;

/// How long a punch that should fail is given.
const FAIL_WINDOW: Duration = Duration::from_millis(1500);
/// How long a punch that should work may take at most.
const WORK_WINDOW: Duration = Duration::from_secs(3);
/// The UDP port a [`Nat::PortMapped`] site forwards.
const MAPPED_PORT: u16 = 41641;

/// A socket on each side and their public mappings as the rendezvous saw them.
struct Pair {
    client: UdpSocket,
    site: UdpSocket,
    client_pub: SocketAddrV4,
    site_pub: SocketAddrV4,
}

impl Pair {
    /// Fresh sockets (the site's on `site_port`, 0: any), each introduced to the
    /// rendezvous: proof that both reach the root namespace.
    fn new(lab: &Lab, rv: &Rendezvous, site_port: u16) -> anyhow::Result<Self> {
        let client = lab.udp_socket(Side::Client, 0)?;
        let site = lab.udp_socket(Side::Site, site_port)?;
        let client_pub = rv
            .observe(&client, 0)
            .context("the client reaching the rendezvous")?;
        let site_pub = rv
            .observe(&site, 0)
            .context("the site reaching the rendezvous")?;
        Ok(Pair {
            client,
            site,
            client_pub,
            site_pub,
        })
    }

    /// Punches with each side aiming at the other's public mapping.
    fn punch(&self, window: Duration) -> anyhow::Result<Punch> {
        let (to_site, to_client) = (
            [SocketAddr::V4(self.site_pub)],
            [SocketAddr::V4(self.client_pub)],
        );
        hole_punch((&self.client, &to_site), (&self.site, &to_client), window)
    }
}

/// One line of the summary.
fn describe(p: &Punch) -> String {
    let side = |i: usize| match p.heard[i] {
        Some(h) => format!(
            "heard {} after {:.0} ms",
            h.from,
            h.after.as_secs_f64() * 1e3
        ),
        None => "heard nothing".to_owned(),
    };
    format!(
        "client {} | site {} | sent {}+{} in {:.0} ms",
        side(0),
        side(1),
        p.sent[0],
        p.sent[1],
        p.elapsed.as_secs_f64() * 1e3
    )
}

/// The results, printed at the end.
struct Report {
    lines: Vec<(String, String)>,
    labs: Vec<(String, u8)>,
}

impl Report {
    fn add(&mut self, cell: &str, what: String) {
        eprintln!("  {cell}: {what}");
        self.lines.push((cell.to_owned(), what));
    }

    /// Expects the punch outcome `works` in `cell`.
    fn punch(&mut self, cell: &str, p: &Punch, works: bool) -> anyhow::Result<()> {
        self.add(cell, describe(p));
        ensure!(
            p.works() == works,
            "{cell}: expected the punch to {}, got {p:?}",
            if works { "work" } else { "fail" }
        );
        if !works {
            ensure!(
                p.heard.iter().all(Option::is_none),
                "{cell}: a failed punch must not be half open: {p:?}"
            );
        }
        Ok(())
    }

    fn lab(&mut self, tag: &str, topology: Topology) -> anyhow::Result<Lab> {
        let t = Instant::now();
        let lab = Lab::start_with(tag, topology)?;
        eprintln!("  built in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
        self.labs.push((lab.name.clone(), lab.k));
        Ok(lab)
    }
}

/// Asserts the mapping behaviour each side's NAT should have.
fn check_mappings(lab: &Lab, rv: &Rendezvous, r: &mut Report, cell: &str) -> anyhow::Result<()> {
    for side in [Side::Client, Side::Site] {
        let sock = lab.udp_socket(side, 0)?;
        let (eim, m) = mapping_is_endpoint_independent(rv, &sock)?;
        let nat = lab.nat_of(side)?;
        r.add(
            cell,
            format!(
                "{side:?} ({nat:?}) mapped {} / {}: {}",
                m[0],
                m[1],
                if eim {
                    "endpoint-independent"
                } else {
                    "endpoint-dependent"
                }
            ),
        );
        ensure!(
            eim == (nat != Nat::Hard),
            "{cell}: {side:?} behind {nat:?} should {}be endpoint-independent",
            if nat == Nat::Hard { "not " } else { "" }
        );
        ensure!(
            *m[0].ip() == lab.public_ip(side)?,
            "{cell}: {side:?} seen from {} instead of {}",
            m[0].ip(),
            lab.public_ip(side)?
        );
    }
    Ok(())
}

#[test]
fn the_nat_lab_models_the_direct_path_matrix() -> anyhow::Result<()> {
    let mut r = Report {
        lines: Vec::new(),
        labs: Vec::new(),
    };

    phase!("star (today's lab): no direct path");
    {
        let lab = r.lab("nat-star", Topology::Star)?;
        let rv = Rendezvous::start(lab.node_ip())?;
        let p = Pair::new(&lab, &rv, 0)?;
        r.punch("star", &p.punch(FAIL_WINDOW)?, false)?;
    }

    phase!("easy x easy: the site's peers, mappings, punch, MTU, cut, rebind, timeouts");
    easy_easy(&mut r)?;

    phase!("firewall-only (site) x easy (client)");
    {
        let lab = r.lab(
            "nat-fw-easy",
            Topology::Internet {
                site: Nat::FirewallOnly,
                client: Nat::Easy,
            },
        )?;
        let rv = Rendezvous::start(lab.node_ip())?;
        check_mappings(&lab, &rv, &mut r, "firewall x easy")?;
        let p = Pair::new(&lab, &rv, 0)?;
        ensure!(
            *p.site_pub.ip() == lab.site_ip(),
            "no NAT: the site is seen as itself"
        );
        r.punch("firewall x easy", &p.punch(WORK_WINDOW)?, true)?;
        // Routed, yet firewalled: a socket that never sent gets nothing from outside.
        let quiet = lab.udp_socket(Side::Site, 0)?;
        let to = SocketAddr::from((lab.site_ip(), quiet.local_addr()?.port()));
        let root = UdpSocket::bind((lab.node_ip(), 0))?;
        ensure!(
            !datagram_arrives(&root, to, &quiet, 100, Duration::from_millis(500))?,
            "the firewall drops unsolicited inbound"
        );
        r.add(
            "firewall x easy",
            "unsolicited datagram from the nodes to the routed site: dropped".into(),
        );
        ensure!(
            lab.rebind(Side::Site).is_err(),
            "no NAT to rebind behind a firewall"
        );
    }

    for (cell, tag, site, client) in [
        ("hard x hard", "nat-hard-hard", Nat::Hard, Nat::Hard),
        ("easy x hard", "nat-easy-hard", Nat::Easy, Nat::Hard),
    ] {
        phase!("{cell}");
        let lab = r.lab(tag, Topology::Internet { site, client })?;
        let rv = Rendezvous::start(lab.node_ip())?;
        check_mappings(&lab, &rv, &mut r, cell)?;
        let p = Pair::new(&lab, &rv, 0)?;
        r.punch(cell, &p.punch(FAIL_WINDOW)?, false)?;
        // A rebound symmetric NAT stays symmetric, on its new address.
        let new_ip = lab.rebind(Side::Client)?;
        check_mappings(&lab, &rv, &mut r, &format!("{cell}, rebound to {new_ip}"))?;
    }

    phase!("port-mapped (site) x hard (client)");
    {
        let lab = r.lab(
            "nat-mapped-hard",
            Topology::Internet {
                site: Nat::PortMapped { port: MAPPED_PORT },
                client: Nat::Hard,
            },
        )?;
        let rv = Rendezvous::start(lab.node_ip())?;
        check_mappings(&lab, &rv, &mut r, "mapped x hard")?;
        let p = Pair::new(&lab, &rv, MAPPED_PORT)?;
        let mapped = SocketAddr::from((lab.public_ip(Side::Site)?, MAPPED_PORT));
        // The hard side aims at the mapped port; the site aims at the client's mapping as
        // the rendezvous saw it (useless: another port toward the site) and answers where
        // the client's datagrams really come from.
        let punch = hole_punch(
            (&p.client, &[mapped]),
            (&p.site, &[SocketAddr::V4(p.client_pub)]),
            WORK_WINDOW,
        )?;
        r.punch("mapped x hard", &punch, true)?;
        let seen = punch.heard[1].context("the site heard the client")?.from;
        ensure!(
            seen != SocketAddr::V4(p.client_pub),
            "the client's mapping toward the site differs from the one toward the rendezvous"
        );
        // The port mapping follows the site's NAT to a new address.
        drop(p);
        let new_ip = lab.rebind(Side::Site)?;
        let p = Pair::new(&lab, &rv, MAPPED_PORT)?;
        let mapped = SocketAddr::from((new_ip, MAPPED_PORT));
        let punch = hole_punch(
            (&p.client, &[mapped]),
            (&p.site, &[SocketAddr::V4(p.client_pub)]),
            WORK_WINDOW,
        )?;
        r.punch("mapped x hard, rebound", &punch, true)?;
    }

    phase!("easy (site) x double NAT (client)");
    {
        let lab = r.lab(
            "nat-easy-double",
            Topology::Internet {
                site: Nat::Easy,
                client: Nat::Double,
            },
        )?;
        let rv = Rendezvous::start(lab.node_ip())?;
        check_mappings(&lab, &rv, &mut r, "easy x double")?;
        let p = Pair::new(&lab, &rv, 0)?;
        r.punch("easy x double", &p.punch(WORK_WINDOW)?, true)?;
        // Both NATs translated: the router to its private WAN, the CGNAT to the public one.
        let ct = lab.conntrack_udp(Side::Client)?;
        let inner = format!("dst=10.94.{}.2 ", lab.k);
        let outer = format!("dst={} ", lab.client_router_wan());
        ensure!(
            ct.contains(&inner) && ct.contains(&outer),
            "both NATs translate: {ct}"
        );
        r.add(
            "easy x double",
            "conntrack: router maps to 10.94.K.2, CGNAT to 10.96.K.2".into(),
        );
        // Rebinding a double NAT moves the outer (public) address.
        let new_ip = lab.rebind(Side::Client)?;
        ensure!(new_ip == lab.public_ip(Side::ClientCgnat)?);
        check_mappings(&lab, &rv, &mut r, "easy x double, rebound")?;
    }

    phase!("same LAN");
    same_lan(&mut r)?;

    phase!("every lab removed itself");
    let netns = netlab::run(Command::new("ip").args(["netns", "list"]))?;
    let links = netlab::run(Command::new("ip").args(["-o", "link"]))?;
    let routes = netlab::run(Command::new("ip").args(["-4", "route"]))?;
    let pid = std::process::id();
    for (name, k) in &r.labs {
        ensure!(!netns.contains(name.as_str()), "{name} is left: {netns}");
        for b in [97, 96, 95, 94, 93, 87, 86] {
            let net = format!("10.{b}.{k}.");
            ensure!(
                !routes.contains(&net),
                "a route to {net}0/24 is left: {routes}"
            );
        }
    }
    ensure!(
        !links.contains(&format!(": wl{pid}")),
        "a root veth of this process is left: {links}"
    );

    eprintln!("\n==== NAT lab summary ====");
    for (cell, what) in &r.lines {
        eprintln!("{cell:>22}: {what}");
    }
    Ok(())
}

/// The easy × easy lab, with every disturbance helper.
fn easy_easy(r: &mut Report) -> anyhow::Result<()> {
    const CELL: &str = "easy x easy";
    let mut lab = r.lab(
        "nat-easy-easy",
        Topology::Internet {
            site: Nat::Easy,
            client: Nat::Easy,
        },
    )?;
    let t = Instant::now();
    let peers = [
        lab.start_sshd()?,
        lab.start_postgres("nat-lab-pg")?,
        lab.start_dns(&[("db.internal", lab.site_ip())])?,
        lab.start_iperf3()?,
        lab.start_banner()?,
    ];
    for addr in peers {
        ensure!(
            lab.tcp_open(Side::Site, addr, Duration::from_secs(2)),
            "{addr} answers inside the site"
        );
    }
    r.add(
        CELL,
        format!(
            "sshd, PostgreSQL, dnsmasq, iperf3, banner up in the site in {:.1} s",
            t.elapsed().as_secs_f64()
        ),
    );
    // The nodes' address takes TCP from both sides (through their NATs).
    let listener = TcpListener::bind((lab.node_ip(), 0))?;
    let node = listener.local_addr()?;
    ensure!(lab.tcp_open(Side::Client, node, Duration::from_secs(2)));
    ensure!(lab.tcp_open(Side::Site, node, Duration::from_secs(2)));
    drop(listener);

    let rv = Rendezvous::start(lab.node_ip())?;
    check_mappings(&lab, &rv, r, CELL)?;
    let p = Pair::new(&lab, &rv, 0)?;
    r.punch(CELL, &p.punch(WORK_WINDOW)?, true)?;

    // PMTU black hole between the routers.
    let (to_site, to_client) = (SocketAddr::V4(p.site_pub), SocketAddr::V4(p.client_pub));
    let wait = Duration::from_millis(500);
    lab.small_mtu(1280, true)?;
    let big_lost = !datagram_arrives(&p.client, to_site, &p.site, 1400, wait)?
        && !datagram_arrives(&p.site, to_client, &p.client, 1400, wait)?;
    let small_pass = datagram_arrives(&p.client, to_site, &p.site, 1200, wait)?
        && datagram_arrives(&p.site, to_client, &p.client, 1200, wait)?;
    let icmp = lab.pmtu_icmp_dropped()?;
    let node_path = rv.observe_sized(&p.client, 0, 1400).is_ok();
    lab.small_mtu(1280, false)?;
    let big_after = datagram_arrives(&p.client, to_site, &p.site, 1400, wait)?;
    r.add(
        "mtu 1280",
        format!(
            "1400 B lost both ways: {big_lost}; 1200 B pass: {small_pass}; ICMP frag-needed \
             swallowed: {icmp}; 1400 B to the nodes: {node_path}; restored, 1400 B pass: {big_after}"
        ),
    );
    ensure!(big_lost && small_pass && icmp >= 2 && node_path && big_after);

    // Cut between the routers: both still reach the rendezvous (Pair::new), no punch.
    lab.cut_between_routers(true)?;
    let cut = Pair::new(&lab, &rv, 0)?;
    r.punch("cut", &cut.punch(FAIL_WINDOW)?, false)?;
    ensure!(
        !datagram_arrives(&p.client, to_site, &p.site, 100, wait)?,
        "the punched path is cut too"
    );
    lab.cut_between_routers(false)?;
    r.punch("cut restored", &cut.punch(WORK_WINDOW)?, true)?;

    // Flushed conntrack: the client's mapping is forgotten; the site's datagrams to it are
    // unsolicited until the client sends again.
    lab.flush_conntrack(Side::Client)?;
    let after_flush = datagram_arrives(&p.site, to_client, &p.client, 100, wait)?;
    let client_again = datagram_arrives(&p.client, to_site, &p.site, 100, wait)?;
    let then = datagram_arrives(&p.site, to_client, &p.client, 100, wait)?;
    r.add(
        "flush",
        format!(
            "site->client after flush: {after_flush}; client->site: {client_again}; \
             site->client then: {then}"
        ),
    );
    ensure!(!after_flush && client_again && then);

    // Rebind: the client's NAT moves to a new public address.
    let sock = lab.udp_socket(Side::Client, 0)?;
    let before = rv.observe(&sock, 0)?;
    let new_ip = lab.rebind(Side::Client)?;
    let after = rv.observe(&sock, 0)?;
    ensure!(
        *before.ip() == lab.client_router_wan() && *after.ip() == new_ip && before != after,
        "rebind: {before} -> {after} (expected {new_ip})"
    );
    ensure!(lab.public_ip(Side::Client)? == new_ip);
    let fresh = Pair::new(&lab, &rv, 0)?;
    ensure!(*fresh.client_pub.ip() == new_ip);
    r.add(
        "rebind",
        format!("the same socket seen as {before}, then {after}"),
    );
    r.punch("rebound", &fresh.punch(WORK_WINDOW)?, true)?;
    let back = lab.rebind(Side::Client)?;
    ensure!(back == lab.client_router_wan() && rv.observe(&sock, 0)?.ip() == &back);

    // A 3 s UDP timeout: an idle mapping is gone after 4 s.
    lab.set_udp_timeout(Side::Client, 3)?;
    let idle = lab.udp_socket(Side::Client, 0)?;
    let mapping = SocketAddr::V4(rv.observe(&idle, 0)?);
    let entry = format!(
        "sport={} dport={}",
        idle.local_addr()?.port(),
        rv.addr(0)?.port()
    );
    let listed = lab.conntrack_udp(Side::Client)?;
    let line = listed
        .lines()
        .find(|l| l.contains(&entry))
        .with_context(|| format!("no {entry} in {listed}"))?
        .to_owned();
    let left: u32 = line
        .split_whitespace()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("the timeout of {line}"))?;
    ensure!(left <= 3, "the entry lives {left} s: {line}");
    let probe = |n: &str| -> anyhow::Result<bool> {
        rv.send_from(0, mapping, n.as_bytes())?;
        idle.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 64];
        Ok(matches!(idle.recv_from(&mut buf), Ok((k, _)) if &buf[..k] == n.as_bytes()))
    };
    let alive = probe("alive")?;
    let idle_start = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let listed_after = lab.conntrack_udp(Side::Client)?;
    let gone = !listed_after.contains(&entry);
    let dropped = !probe("expired")?;
    r.add(
        "udp timeout 3 s",
        format!(
            "entry `{line}`; answer before: {alive}; after {:.1} s idle: listed {}, answer {}",
            idle_start.elapsed().as_secs_f64(),
            !gone,
            !dropped
        ),
    );
    ensure!(alive && gone && dropped);
    Ok(())
}

/// The client in the site's LAN.
fn same_lan(r: &mut Report) -> anyhow::Result<()> {
    const CELL: &str = "same LAN";
    let mut lab = r.lab("nat-same-lan", Topology::SameLan { site: Nat::Easy })?;
    let ssh = lab.start_sshd()?;
    ensure!(
        lab.tcp_open(Side::Client, ssh, Duration::from_secs(2)),
        "the client reaches the site's sshd on the LAN"
    );
    let rv = Rendezvous::start(lab.node_ip())?;
    check_mappings(&lab, &rv, r, CELL)?;
    let p = Pair::new(&lab, &rv, 0)?;
    ensure!(
        p.client_pub.ip() == p.site_pub.ip(),
        "one public address for both"
    );
    r.punch("same LAN, public", &p.punch(FAIL_WINDOW)?, false)?;
    let (to_site, to_client) = (
        [SocketAddr::from((
            lab.site_ip(),
            p.site.local_addr()?.port(),
        ))],
        [SocketAddr::from((
            lab.client_ip(),
            p.client.local_addr()?.port(),
        ))],
    );
    let host = hole_punch((&p.client, &to_site), (&p.site, &to_client), WORK_WINDOW)?;
    r.punch("same LAN, host", &host, true)?;

    // The client's own uplink blocked: the LAN stays, the site keeps its uplink.
    lab.block_uplink(Side::Client, true)?;
    let cut = rv.observe(&p.client, 0).is_err();
    let site_up = rv.observe(&p.site, 0).is_ok();
    let lan = lab.tcp_open(Side::Client, ssh, Duration::from_secs(1));
    lab.block_uplink(Side::Client, false)?;
    let back = rv.observe(&p.client, 0).is_ok();
    r.add(
        CELL,
        format!(
            "client uplink blocked: client cut {cut}, site up {site_up}, LAN up {lan}; \
             unblocked: {back}"
        ),
    );
    ensure!(cut && site_up && lan && back);
    Ok(())
}
