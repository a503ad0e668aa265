//! A network lab for client access: a private site and a client, each behind its own NAT
//! router, both reaching the nodes in the root namespace, with real peers inside the site.
//!
//! ```text
//! root namespace: nodes (cluster, admin, relay on 10.97.K.1), the test process, IdP, Chromium
//!   | veth wl<pid>s<n> 10.97.K.1/24             | veth wl<pid>c<n> 10.96.K.1/24
//! site router: wan 10.97.K.2                  client router: wan 10.96.K.2
//!   [MASQUERADE out wan; INPUT from wan only established/related; FORWARD wan->lan only
//!    established/related: unsolicited inbound is dropped, as a home or office NAT does]
//!   | lan 10.87.K.1                             | lan 10.86.K.1
//! site: eth0 10.87.K.2 — warren-agent,        client: eth0 10.86.K.2 — `warren`, ssh, scp,
//!   sshd :22, PostgreSQL :5432, dnsmasq :53,    psql, dig, iperf3 -c
//!   iperf3 -s :5201, a ready-banner service
//! ```
//!
//! The root namespace does not forward (`ip_forward` is left as it is, 0 here, and the lab
//! never needs it): the client reaches the nodes because the root namespace accepts any of
//! its own addresses on any interface (10.97.K.1 through the client's veth too), and nothing
//! else. The client and the site cannot reach each other except through a node, unless a
//! benchmark asks for [`Lab::direct_link`] (a plain veth between the two, for baselines).
//!
//! Every name carries the test process's pid (`warren-lab-<pid>-<n>-<role>` namespaces,
//! `wl<pid><s|c|i><n>` veths in the root namespace); [`Lab::start`] (and
//! [`Lab::start_with`]) first removes what a killed earlier run left behind (its pid is
//! gone), and dropping a [`Lab`] (also on panic) stops every process it started, by pid,
//! then whatever still runs inside its own namespaces, and deletes them.
//!
//! The layout above is [`Topology::Star`], what [`Lab::start`] builds.
//! [`Lab::start_with`] builds the others: [`Topology::Internet`] (the two routers reach each other through a routing
//! `inet` namespace, each with its own [`Nat`] behaviour: direct paths and hole punching
//! become possible) and [`Topology::SameLan`] (the client inside the site's LAN). Their
//! diagrams, addresses and helpers ([`Lab::cut_between_routers`], [`Lab::small_mtu`],
//! [`Lab::rebind`], [`Lab::set_udp_timeout`], [`Lab::flush_conntrack`]) are in
//! [`Topology`]; [`punch`] has a rendezvous and a plain UDP hole punch to check a cell of
//! the matrix without any Warren code.
//!
//! Needs root, `iproute2`, `iptables`, `conntrack` and for the peers
//! `openssh-server`/`openssh-client`, `postgresql`, `dnsmasq`, `iperf3`, `tcpdump`:
//! `scripts/install-test-deps`.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

mod internet;
pub mod punch;

pub use internet::{Nat, Topology};

/// Prefix of every namespace a lab creates.
const NS_PREFIX: &str = "warren-lab-";
/// Comment on the rule [`Lab::block_uplink`] inserts, to find it again.
const BLOCK_COMMENT: &str = "warren-lab-block";

/// Well-known ports of the site's peers.
pub const SSH_PORT: u16 = 22;
/// PostgreSQL.
pub const PG_PORT: u16 = 5432;
/// dnsmasq.
pub const DNS_PORT: u16 = 53;
/// iperf3's server.
pub const IPERF_PORT: u16 = 5201;
/// The ready-banner service ([`Lab::start_banner`]).
pub const BANNER_PORT: u16 = 7000;

/// The rules of a home or office NAT router whose interfaces are `lan` and `wan`, each a
/// command to run inside the router's namespace: forwarding on, MASQUERADE out of `wan`,
/// and from `wan` only what answers a flow from inside (unsolicited inbound dropped, to
/// the LAN and to the router itself).
pub const NAT_ROUTER: [&[&str]; 7] = [
    &["sysctl", "-qw", "net.ipv4.ip_forward=1"],
    &[
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        "wan",
        "-j",
        "MASQUERADE",
    ],
    &["iptables", "-P", "FORWARD", "DROP"],
    &[
        "iptables", "-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT",
    ],
    &[
        "iptables",
        "-A",
        "FORWARD",
        "-i",
        "wan",
        "-o",
        "lan",
        "-m",
        "conntrack",
        "--ctstate",
        "ESTABLISHED,RELATED",
        "-j",
        "ACCEPT",
    ],
    &[
        "iptables",
        "-A",
        "INPUT",
        "-i",
        "wan",
        "-m",
        "conntrack",
        "--ctstate",
        "ESTABLISHED,RELATED",
        "-j",
        "ACCEPT",
    ],
    &["iptables", "-A", "INPUT", "-i", "wan", "-j", "DROP"],
];

/// One of the lab's network namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The namespace the test runs in (not the lab's).
    Root,
    /// The site's NAT router.
    SiteRouter,
    /// The private site.
    Site,
    /// The client's NAT router.
    ClientRouter,
    /// The client machine.
    Client,
    /// The routing namespace between the routers and the root namespace
    /// ([`Topology::Internet`], [`Topology::SameLan`]): interfaces `root`, `site`, `client`.
    Inet,
    /// The carrier-grade NAT in front of the site's router ([`Nat::Double`] only).
    SiteCgnat,
    /// The carrier-grade NAT in front of the client's router ([`Nat::Double`] only).
    ClientCgnat,
    /// A public host on `inet` with no NAT (a relay-only node far away), made by
    /// [`Lab::add_relay_host`].
    Relay,
}

/// A process the lab started, stopped when the lab goes away.
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

/// The lab: namespaces, links, NAT rules, the processes started in them, and a temporary
/// directory for their files and logs. See the module documentation.
pub struct Lab {
    /// Third octet of every subnet of this lab.
    pub k: u8,
    /// `warren-lab-<pid>-<n>`: the prefix of its namespaces.
    pub name: String,
    /// Files: keys, configurations, logs (removed when the lab goes away, unless it panics
    /// and `WARREN_TEST_KEEP_LOGS` is set).
    pub tmp: tempfile::TempDir,
    topology: Topology,
    /// The namespaces this lab has (or is making), in the order they are torn down.
    sides: Vec<Side>,
    /// Its interfaces in the root namespace (their peers live in its namespaces).
    root_veths: Vec<String>,
    /// Its routes in the root namespace.
    root_routes: Vec<String>,
    /// NAT namespaces whose public address [`Lab::rebind`] moved to `.3` of their WAN (a
    /// lock, so that rebinding needs no `&mut` while other threads use the lab).
    rebound: std::sync::Mutex<Vec<Side>>,
    direct: bool,
    daemons: Vec<Daemon>,
    pg: Option<(PathBuf, PathBuf, tempfile::TempDir)>,
    forwarders: Vec<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
    wg_sockets: Vec<PathBuf>,
}

/// Runs a command to completion; its stdout, or an error with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

/// SIGKILLs every process inside network namespace `ns` (one of this process's own labs),
/// never this process itself.
fn kill_all_in(ns: &str) {
    let me = std::process::id() as i32;
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .filter(|p| *p != me)
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

impl Lab {
    /// Builds the two NATed networks (see the module documentation): [`Topology::Star`].
    /// `tag` goes into the log lines only; names come from the pid and a counter, so
    /// several labs can live in one process.
    pub fn start(tag: &str) -> anyhow::Result<Self> {
        Self::start_with(tag, Topology::Star)
    }

    /// Builds a lab of the given topology (see [`Topology`]); as [`Lab::start`] otherwise.
    pub fn start_with(tag: &str, topology: Topology) -> anyhow::Result<Self> {
        if run(Command::new("id").arg("-u"))?.trim() != "0" {
            bail!("the lab needs root (network namespaces, iptables): CI runs it as root");
        }
        Self::remove_stale();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let addrs = ip(&["-o", "-4", "addr"])?;
        let routes = ip(&["-4", "route"])?;
        let k = (0..200u32)
            .map(|i| 20 + ((pid.wrapping_mul(31) + n * 7 + i) % 200) as u8)
            .find(|k| {
                // Every third octet any topology uses (also those only inside its
                // namespaces: cheap, and never confusing in a dump).
                [97, 96, 95, 94, 93, 87, 86, 85].iter().all(|b| {
                    let net = format!("10.{b}.{k}.");
                    !addrs.contains(&net) && !routes.contains(&net)
                })
            })
            .context("no free 10.{97,96,95,94,93,87,86,85}.K.0/24 subnets")?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("warren-lab-{pid}-"))
            .tempdir()?;
        // Everything it will make is recorded before it is made: a lab that fails half-way
        // is dropped, and the drop removes whatever exists of it.
        let mut lab = Lab {
            k,
            name: format!("{NS_PREFIX}{pid}-{n}"),
            tmp,
            topology,
            sides: Vec::new(),
            root_veths: Vec::new(),
            root_routes: Vec::new(),
            rebound: std::sync::Mutex::new(Vec::new()),
            direct: false,
            daemons: Vec::new(),
            pg: None,
            forwarders: Vec::new(),
            wg_sockets: Vec::new(),
        };
        if topology == Topology::Star {
            let (site_veth, client_veth) = (format!("wl{pid}s{n}"), format!("wl{pid}c{n}"));
            lab.sides = vec![
                Side::Site,
                Side::Client,
                Side::SiteRouter,
                Side::ClientRouter,
            ];
            lab.root_veths = vec![site_veth.clone(), client_veth.clone()];
            lab.root_routes = vec![format!("10.87.{k}.0/24"), format!("10.86.{k}.0/24")];
            lab.build_side(Side::SiteRouter, Side::Site, &site_veth, 97, 87)?;
            lab.build_side(Side::ClientRouter, Side::Client, &client_veth, 96, 86)?;
        } else {
            lab.build_internet(&format!("wl{pid}i{n}"))?;
        }
        let key = lab.ssh_key();
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "warren-lab", "-f"])
            .arg(&key))
        .context("ssh-keygen (openssh-client)")?;
        if topology == Topology::Star {
            eprintln!(
                "lab {tag} ({}): nodes on {} | site router wan {} | site {} | client router wan {} | client {}",
                lab.name,
                lab.node_ip(),
                lab.site_router_wan(),
                lab.site_ip(),
                lab.client_router_wan(),
                lab.client_ip()
            );
        } else {
            eprintln!(
                "lab {tag} ({}, {topology:?}): nodes on {} | site public {} | site {} | client public {} | client {}",
                lab.name,
                lab.node_ip(),
                lab.public_ip(Side::Site)?,
                lab.site_ip(),
                lab.public_ip(Side::Client)?,
                lab.client_ip()
            );
        }
        Ok(lab)
    }

    /// Removes namespaces (and the processes in them) and veths of labs whose process is
    /// gone (killed before its cleanup ran).
    fn remove_stale() {
        let Ok(list) = ip(&["netns", "list"]) else {
            return;
        };
        for ns in list.split_whitespace() {
            let Some(pid) = ns
                .strip_prefix(NS_PREFIX)
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            eprintln!("removing {ns}, left behind by process {pid}");
            kill_all_in(ns);
            let _ = ip(&["netns", "del", ns]);
        }
        // The root ends of their veths went with the peers in the namespaces; a veth whose
        // peer namespace is gone is deleted with it. Nothing else to do.
    }

    fn build_side(
        &self,
        router: Side,
        inner: Side,
        veth: &str,
        wan_b: u8,
        lan_b: u8,
    ) -> anyhow::Result<()> {
        let k = self.k;
        let (r, s) = (self.ns(router), self.ns(inner));
        let host = format!("10.{wan_b}.{k}.1/24");
        let host_ip = format!("10.{wan_b}.{k}.1");
        let wan = format!("10.{wan_b}.{k}.2/24");
        let lan = format!("10.{lan_b}.{k}.1/24");
        let lan_gw = format!("10.{lan_b}.{k}.1");
        let eth0 = format!("10.{lan_b}.{k}.2/24");
        let lan_net = format!("10.{lan_b}.{k}.0/24");
        let wan_ip = format!("10.{wan_b}.{k}.2");
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &r],
            vec!["netns", "add", &s],
            vec![
                "link", "add", veth, "type", "veth", "peer", "name", "wan", "netns", &r,
            ],
            vec!["addr", "add", &host, "dev", veth],
            vec!["link", "set", veth, "up"],
            vec!["-n", &r, "link", "set", "lo", "up"],
            vec!["-n", &r, "addr", "add", &wan, "dev", "wan"],
            vec!["-n", &r, "link", "set", "wan", "up"],
            // Everything not local goes up to the root namespace: the client's router
            // reaches the nodes' 10.97.K.1 through its own WAN link this way.
            vec!["-n", &r, "route", "add", "default", "via", &host_ip],
            vec![
                "-n", &r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", &s,
            ],
            vec!["-n", &r, "addr", "add", &lan, "dev", "lan"],
            vec!["-n", &r, "link", "set", "lan", "up"],
            vec!["-n", &s, "link", "set", "lo", "up"],
            vec!["-n", &s, "addr", "add", &eth0, "dev", "eth0"],
            vec!["-n", &s, "link", "set", "eth0", "up"],
            vec!["-n", &s, "route", "add", "default", "via", &lan_gw],
            // The root namespace knows the way to the LAN (through the router), so a direct
            // attempt from it meets the router's rules, not a missing route.
            vec!["route", "add", &lan_net, "via", &wan_ip],
        ];
        for step in steps {
            ip(&step)?;
        }
        for rule in NAT_ROUTER {
            run(self.exec(router, rule[0]).args(&rule[1..]))?;
        }
        Ok(())
    }

    /// The namespace's name (empty for [`Side::Root`]).
    pub fn ns(&self, side: Side) -> String {
        let role = match side {
            Side::Root => return String::new(),
            Side::SiteRouter => "site-router",
            Side::Site => "site",
            Side::ClientRouter => "client-router",
            Side::Client => "client",
            Side::Inet => "inet",
            Side::Relay => "relay",
            Side::SiteCgnat => "site-cgnat",
            Side::ClientCgnat => "client-cgnat",
        };
        format!("{}-{role}", self.name)
    }

    /// The topology this lab was built with.
    pub fn topology(&self) -> Topology {
        self.topology
    }

    /// Whether this lab has `side`'s namespace ([`Side::Root`] always).
    pub fn has(&self, side: Side) -> bool {
        side == Side::Root || self.sides.contains(&side)
    }

    /// Where the nodes listen (bind them here): in [`Topology::Star`] the root
    /// namespace's end of the site router's WAN veth (reachable from the client's side
    /// too), 10.97.K.1; otherwise the root namespace's end of its veth to `inet`, 10.95.K.1.
    pub fn node_ip(&self) -> Ipv4Addr {
        match self.topology {
            Topology::Star => Ipv4Addr::new(10, 97, self.k, 1),
            _ => Ipv4Addr::new(10, 95, self.k, 1),
        }
    }

    /// Another root address, for services in the root namespace the client must reach
    /// (the IdP, through [`Lab::forward_tcp`]): in [`Topology::Star`] the root
    /// namespace's end of the client router's WAN veth (10.96.K.1), otherwise a second
    /// address on its veth to `inet` (10.95.K.3).
    pub fn root_client_side_ip(&self) -> Ipv4Addr {
        match self.topology {
            Topology::Star => Ipv4Addr::new(10, 96, self.k, 1),
            _ => Ipv4Addr::new(10, 95, self.k, 3),
        }
    }

    /// The site's public (WAN) address, 10.97.K.2: its router's WAN (its carrier NAT's
    /// with [`Nat::Double`]). Where the nodes see the agent come from, unless the site
    /// is [`Nat::FirewallOnly`] or was [rebound](Lab::rebind): [`Lab::public_ip`] knows.
    pub fn site_router_wan(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 97, self.k, 2)
    }

    /// The client's public (WAN) address, 10.96.K.2: its router's WAN (its carrier NAT's
    /// with [`Nat::Double`]). Where the nodes see the client come from, unless
    /// [`Nat::FirewallOnly`], rebound or in [`Topology::SameLan`] (no client router
    /// there): [`Lab::public_ip`] knows.
    pub fn client_router_wan(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, self.k, 2)
    }

    /// The site machine's (private) address, 10.87.K.2.
    pub fn site_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 87, self.k, 2)
    }

    /// The client machine's (private) address: 10.86.K.2, or 10.87.K.3 in the site's LAN
    /// ([`Topology::SameLan`]).
    pub fn client_ip(&self) -> Ipv4Addr {
        match self.topology {
            Topology::SameLan { .. } => Ipv4Addr::new(10, 87, self.k, 3),
            _ => Ipv4Addr::new(10, 86, self.k, 2),
        }
    }

    /// The site's LAN, for allow lists (pg_hba).
    pub fn site_net(&self) -> String {
        format!("10.87.{}.0/24", self.k)
    }

    /// `program` inside `side`'s namespace (`ip netns exec <ns> program`), to add
    /// arguments and environment to.
    pub fn exec(&self, side: Side, program: impl AsRef<std::ffi::OsStr>) -> Command {
        if side == Side::Root {
            return Command::new(program);
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(side)]).arg(program);
        cmd
    }

    /// `program` inside the site.
    pub fn site_exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.exec(Side::Site, program)
    }

    /// `program` on the client.
    pub fn client_exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.exec(Side::Client, program)
    }

    /// Runs `f` on a thread of its own that has entered `side`'s network namespace: the
    /// sockets it opens live there. The thread ends with `f`.
    pub fn within<T: Send>(&self, side: Side, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        if side == Side::Root {
            return Ok(f());
        }
        let path = format!("/var/run/netns/{}", self.ns(side));
        let shown = path.clone();
        std::thread::scope(|s| {
            s.spawn(move || -> anyhow::Result<T> {
                let fd = std::fs::File::open(&path).with_context(|| path.clone())?;
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering {path}"))?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a thread inside {shown} panicked"))?
        })
    }

    /// Whether `addr` accepts a TCP connection from `side` within `timeout`.
    pub fn tcp_open(&self, side: Side, addr: SocketAddr, timeout: Duration) -> bool {
        self.within(side, || TcpStream::connect_timeout(&addr, timeout).is_ok())
            .unwrap_or(false)
    }

    /// Waits (bounded by `limit`) until `addr` accepts TCP connections from `side`.
    pub fn wait_tcp(&self, side: Side, addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while !self.tcp_open(side, addr, Duration::from_millis(500)) {
            if start.elapsed() > limit {
                bail!("{addr} did not accept TCP from {side:?} within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Sends `datagrams` from one fresh UDP socket in `side` to `to`, then collects what
    /// comes back to that socket within `wait` (after the last send).
    pub fn udp_exchange(
        &self,
        side: Side,
        to: SocketAddr,
        datagrams: &[Vec<u8>],
        wait: Duration,
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        self.within(side, || -> anyhow::Result<Vec<Vec<u8>>> {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            for d in datagrams {
                // An oversized datagram may be refused locally (EMSGSIZE above 65507):
                // that is the caller's business, the rest still go.
                if let Err(e) = sock.send_to(d, to) {
                    eprintln!("udp send of {} bytes to {to}: {e}", d.len());
                }
            }
            let deadline = Instant::now() + wait;
            let mut got = Vec::new();
            let mut buf = vec![0u8; 65536];
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if left.is_zero() {
                    break;
                }
                sock.set_read_timeout(Some(left))?;
                match sock.recv_from(&mut buf) {
                    Ok((n, _)) => got.push(buf[..n].to_vec()),
                    Err(_) => break,
                }
            }
            Ok(got)
        })?
    }

    /// Starts `cmd` (made with [`Lab::exec`] or its shorthands), its output going to
    /// `<tmp>/<name>.log`; stopped (SIGTERM, then SIGKILL) when the lab goes away. Returns
    /// its pid.
    pub fn spawn(&mut self, name: &str, mut cmd: Command) -> anyhow::Result<u32> {
        let log = self.tmp.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        let pid = child.id();
        self.daemons.push(Daemon {
            name: name.to_owned(),
            child,
            log,
        });
        Ok(pid)
    }

    /// What process `name` printed so far.
    pub fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.tmp.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The pid of process `name`, if the lab started one by that name. (`ip netns exec`
    /// execs the program, so this is the program's own pid.)
    pub fn pid_of(&self, name: &str) -> Option<u32> {
        self.daemons
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.child.id())
    }

    /// Whether process `name` still runs.
    pub fn is_running(&mut self, name: &str) -> bool {
        self.daemons
            .iter_mut()
            .find(|d| d.name == name)
            .is_some_and(|d| matches!(d.child.try_wait(), Ok(None)))
    }

    /// Stops process `name` (SIGTERM, SIGKILL after 3 s) and forgets it.
    pub fn stop(&mut self, name: &str) {
        if let Some(i) = self.daemons.iter().position(|d| d.name == name) {
            let mut d = self.daemons.remove(i);
            stop_child(&mut d.child, Duration::from_secs(3));
        }
    }

    /// The test user's ssh private key (ed25519, no passphrase), made by [`Lab::start`].
    pub fn ssh_key(&self) -> PathBuf {
        self.tmp.path().join("id_ed25519")
    }

    /// Options for `ssh`/`scp` in tests: the lab's key only, no user config, no host key
    /// checks (a fresh host key per run), no prompts. Log in as `root`.
    pub fn ssh_opts(&self) -> Vec<String> {
        let mut v: Vec<String> = vec!["-F".into(), "/dev/null".into(), "-i".into()];
        v.push(self.ssh_key().display().to_string());
        for o in [
            "IdentitiesOnly=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "LogLevel=ERROR",
            "ConnectTimeout=15",
        ] {
            v.push("-o".into());
            v.push(o.into());
        }
        v
    }

    /// OpenSSH's server on the site's address, port 22, accepting the lab's key for root
    /// (key only, no PAM). Returns its address once it accepts connections.
    pub fn start_sshd(&mut self) -> anyhow::Result<SocketAddr> {
        let d = self.tmp.path().join("sshd");
        std::fs::create_dir_all(&d)?;
        std::fs::create_dir_all("/run/sshd")?;
        let host_key = d.join("host_ed25519");
        if !host_key.exists() {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&host_key))?;
        }
        std::fs::copy(
            self.ssh_key().with_extension("pub"),
            d.join("authorized_keys"),
        )?;
        let config = d.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress {ip}\nPort {SSH_PORT}\nHostKey {hk}\nPidFile {pid}\n\
                 AuthorizedKeysFile {ak}\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\n\
                 StrictModes no\nAllowTcpForwarding yes\nSubsystem sftp internal-sftp\n",
                ip = self.site_ip(),
                hk = host_key.display(),
                pid = d.join("sshd.pid").display(),
                ak = d.join("authorized_keys").display(),
            ),
        )?;
        run(Command::new("/usr/sbin/sshd")
            .arg("-t")
            .arg("-f")
            .arg(&config))
        .context("sshd -t (openssh-server)")?;
        let mut cmd = self.site_exec("/usr/sbin/sshd");
        cmd.args(["-D", "-e", "-f"]).arg(&config);
        self.spawn("sshd", cmd)?;
        let addr = SocketAddr::from((self.site_ip(), SSH_PORT));
        self.wait_tcp(Side::Site, addr, Duration::from_secs(10))
            .with_context(|| self.log_of("sshd"))?;
        Ok(addr)
    }

    /// PostgreSQL on the site's address, port 5432: user `postgres` with `password`
    /// (scram-sha-256) from the site's LAN, no TLS. Returns its address once it is up.
    /// Blocks for a few seconds (initdb).
    pub fn start_postgres(&mut self, password: &str) -> anyhow::Result<SocketAddr> {
        let bin = pg_bin()?;
        // Its own directory outside `tmp` (0700 root): the `postgres` user must enter it.
        let dir = tempfile::Builder::new()
            .prefix("warren-lab-pg-")
            .tempdir()?;
        let uid: u32 = run(Command::new("id").args(["-u", "postgres"]))?
            .trim()
            .parse()?;
        let gid: u32 = run(Command::new("id").args(["-g", "postgres"]))?
            .trim()
            .parse()?;
        let own = |p: &Path| std::os::unix::fs::chown(p, Some(uid), Some(gid));
        own(dir.path())?;
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, password)?;
        own(&pwfile)?;
        let data = dir.path().join("data");
        run(Command::new("runuser")
            .current_dir(dir.path())
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "scram-sha-256", "-U", "postgres"])
            .arg(format!("--pwfile={}", pwfile.display())))
        .context("initdb")?;
        let hba = data.join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba)?;
        text.push_str(&format!("host all all {} scram-sha-256\n", self.site_net()));
        std::fs::write(&hba, text)?;
        let opts = format!(
            "-c listen_addresses={} -c port={PG_PORT} -c unix_socket_directories={}",
            self.site_ip(),
            dir.path().display()
        );
        // Recorded before starting, so that a failed start is still stopped on drop.
        self.pg = Some((bin.clone(), data.clone(), dir));
        let dir = self.pg.as_ref().map(|p| p.2.path().to_owned()).unwrap();
        run(self
            .site_exec("runuser")
            .current_dir(&dir)
            .args(["-u", "postgres", "--"])
            .arg(bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(["-w", "-t", "30", "start", "-o", &opts]))
        .with_context(|| {
            format!(
                "pg_ctl start: {}",
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            )
        })?;
        Ok(SocketAddr::from((self.site_ip(), PG_PORT)))
    }

    /// dnsmasq on the site's address, port 53 (UDP and TCP), answering exactly `records`
    /// (name → IPv4 address) and nothing else: no /etc/hosts, no upstream, no
    /// configuration file. Returns its address once it answers TCP.
    pub fn start_dns(&mut self, records: &[(&str, Ipv4Addr)]) -> anyhow::Result<SocketAddr> {
        let mut cmd = self.site_exec("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--pid-file",
            "--log-queries",
            "--log-facility=-",
        ])
        .arg(format!("--listen-address={}", self.site_ip()))
        .arg(format!("--port={DNS_PORT}"));
        for (name, addr) in records {
            cmd.arg(format!("--host-record={name},{addr}"));
        }
        self.spawn("dnsmasq", cmd)?;
        let addr = SocketAddr::from((self.site_ip(), DNS_PORT));
        self.wait_tcp(Side::Site, addr, Duration::from_secs(10))
            .with_context(|| self.log_of("dnsmasq"))?;
        Ok(addr)
    }

    /// `iperf3 -s` on every address of the site, port 5201 (one test at a time, as iperf3 does).
    pub fn start_iperf3(&mut self) -> anyhow::Result<SocketAddr> {
        let mut cmd = self.site_exec("iperf3");
        // Every address of the site (also the benchmarks' direct link).
        cmd.args(["-s", "-p"]).arg(IPERF_PORT.to_string());
        self.spawn("iperf3", cmd)?;
        let addr = SocketAddr::from((self.site_ip(), IPERF_PORT));
        self.wait_tcp(Side::Site, addr, Duration::from_secs(10))
            .with_context(|| self.log_of("iperf3"))?;
        Ok(addr)
    }

    /// A TCP service on every address of the site, port 7000 (the site's address returned), that writes `ready\n` as soon as a
    /// connection is accepted and closes it: the first byte of a new flow, for
    /// time-to-first-byte. Runs as a thread of this process inside the site namespace.
    pub fn start_banner(&mut self) -> anyhow::Result<SocketAddr> {
        let addr = SocketAddr::from((self.site_ip(), BANNER_PORT));
        // Every address of the site (also the benchmarks' direct link and tunnels).
        let listener =
            self.within(Side::Site, || TcpListener::bind(("0.0.0.0", BANNER_PORT)))??;
        self.serve(listener, |mut s| {
            let _ = s.write_all(b"ready\n");
        })?;
        Ok(addr)
    }

    /// Forwards TCP connections to `listen` in `side`'s namespace to `to` in the root
    /// namespace: for a service of the root namespace that listens on loopback only (the
    /// IdP, `http://127.0.0.1:P`) and must be reached from the client at the same URL
    /// (`forward_tcp(Side::Client, 127.0.0.1:P, 127.0.0.1:P)`). Threads of this process;
    /// stopped when the lab goes away.
    pub fn forward_tcp(
        &mut self,
        side: Side,
        listen: SocketAddr,
        to: SocketAddr,
    ) -> anyhow::Result<()> {
        let listener = self
            .within(side, || TcpListener::bind(listen))?
            .with_context(|| format!("binding {listen} in {side:?}"))?;
        self.serve(listener, move |inbound| {
            let Ok(outbound) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
                return;
            };
            let (Ok(mut a), Ok(mut b)) = (inbound.try_clone(), outbound.try_clone()) else {
                return;
            };
            let up = std::thread::spawn(move || {
                let _ = std::io::copy(&mut a, &mut b);
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
            let (mut inbound, mut outbound) = (inbound, outbound);
            let _ = std::io::copy(&mut outbound, &mut inbound);
            let _ = inbound.shutdown(std::net::Shutdown::Write);
            let _ = up.join();
        })
    }

    /// Accepts on `listener` until the lab goes away, each connection handled on a thread.
    fn serve(
        &mut self,
        listener: TcpListener,
        handle: impl Fn(TcpStream) + Send + Sync + Clone + 'static,
    ) -> anyhow::Result<()> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsFd as _;
            while !stopped.load(Ordering::Relaxed) {
                // Woken at once by a connection (a sleep between polls would add its
                // half to every time-to-first-byte sample), every 100 ms to see `stop`.
                let mut fds = [nix::poll::PollFd::new(
                    listener.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                if !matches!(nix::poll::poll(&mut fds, 100u16), Ok(n) if n > 0) {
                    continue;
                }
                if let Ok((s, _)) = listener.accept() {
                    let _ = s.set_nonblocking(false);
                    let h = handle.clone();
                    std::thread::spawn(move || h(s));
                }
            }
        });
        self.forwarders.push((stop, thread));
        Ok(())
    }

    /// A plain veth between the client (10.85.K.1, `direct0`) and the site (10.85.K.2,
    /// `direct0`), bypassing both routers and the nodes: the raw baseline of benchmarks.
    /// Returns (client address, site address).
    pub fn direct_link(&mut self) -> anyhow::Result<(Ipv4Addr, Ipv4Addr)> {
        let (c, s) = (
            Ipv4Addr::new(10, 85, self.k, 1),
            Ipv4Addr::new(10, 85, self.k, 2),
        );
        if !self.direct {
            let (cn, sn) = (self.ns(Side::Client), self.ns(Side::Site));
            ip(&[
                "-n", &cn, "link", "add", "direct0", "type", "veth", "peer", "name", "direct0",
                "netns", &sn,
            ])?;
            ip(&[
                "-n",
                &cn,
                "addr",
                "add",
                &format!("{c}/24"),
                "dev",
                "direct0",
            ])?;
            ip(&[
                "-n",
                &sn,
                "addr",
                "add",
                &format!("{s}/24"),
                "dev",
                "direct0",
            ])?;
            ip(&["-n", &cn, "link", "set", "direct0", "up"])?;
            ip(&["-n", &sn, "link", "set", "direct0", "up"])?;
            self.direct = true;
        }
        Ok((c, s))
    }

    /// Remembers a WireGuard control socket (`/var/run/wireguard/<if>.sock`) to remove
    /// when the lab goes away.
    pub fn forget_wg_socket_on_drop(&mut self, interface: &str) {
        self.wg_sockets.push(PathBuf::from(format!(
            "/var/run/wireguard/{interface}.sock"
        )));
    }

    /// Cuts (true) or restores (false) the uplink of the site or the client: every packet
    /// through its router is dropped (links and NAT state stay, as when a cable is pulled
    /// upstream). In [`Topology::SameLan`] only that machine's packets through the site
    /// router are (the other machine keeps its uplink, the LAN stays). Idempotent.
    pub fn block_uplink(&self, side: Side, blocked: bool) -> anyhow::Result<()> {
        let router = match side {
            Side::Site | Side::SiteRouter | Side::SiteCgnat => Side::SiteRouter,
            Side::Client | Side::ClientRouter | Side::ClientCgnat => Side::ClientRouter,
            Side::Root | Side::Inet | Side::Relay => bail!("{side:?} has no uplink to block"),
        };
        let tail = ["-m", "comment", "--comment", BLOCK_COMMENT, "-j", "DROP"];
        let mut specs: Vec<Vec<String>> = Vec::new();
        if let Topology::SameLan { .. } = self.topology {
            let host = if router == Side::SiteRouter {
                self.site_ip()
            } else {
                self.client_ip()
            };
            for dir in ["-s", "-d"] {
                let mut spec = vec![dir.to_owned(), host.to_string()];
                spec.extend(tail.iter().map(|a| a.to_string()));
                specs.push(spec);
            }
            for spec in specs {
                self.set_rule(Side::SiteRouter, "filter", "FORWARD", &spec, blocked)?;
            }
            return Ok(());
        }
        let spec: Vec<String> = tail.iter().map(|a| a.to_string()).collect();
        self.set_rule(router, "filter", "FORWARD", &spec, blocked)
    }

    /// Drops (true) or passes again (false) the UDP that `side`'s machine sends through its
    /// router to `to` (one address and port: a node's tunnel port, say, while its relay
    /// port stays reachable). Idempotent.
    pub fn block_udp_to(&self, side: Side, to: SocketAddr, blocked: bool) -> anyhow::Result<()> {
        let router = match side {
            Side::Site | Side::SiteRouter | Side::SiteCgnat => Side::SiteRouter,
            Side::Client | Side::ClientRouter | Side::ClientCgnat => Side::ClientRouter,
            Side::Root | Side::Inet | Side::Relay => bail!("{side:?} has no router"),
        };
        let spec: Vec<String> = [
            "-p",
            "udp",
            "-d",
            &to.ip().to_string(),
            "--dport",
            &to.port().to_string(),
            "-m",
            "comment",
            "--comment",
            BLOCK_COMMENT,
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.set_rule(router, "filter", "FORWARD", &spec, blocked)
    }

    /// Puts (`present`) an iptables rule `spec` first in `chain` of `table` in `side`'s
    /// namespace, or takes it out; nothing if it already is (or is not) there.
    fn set_rule(
        &self,
        side: Side,
        table: &str,
        chain: &str,
        spec: &[String],
        present: bool,
    ) -> anyhow::Result<()> {
        let there = self
            .exec(side, "iptables")
            .args(["-t", table, "-C", chain])
            .args(spec)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("iptables -C in {side:?}"))?
            .success();
        if there == present {
            return Ok(());
        }
        let mut cmd = self.exec(side, "iptables");
        cmd.args(["-t", table]);
        if present {
            cmd.args(["-I", chain, "1"]);
        } else {
            cmd.args(["-D", chain]);
        }
        run(cmd.args(spec)).with_context(|| format!("a rule in {side:?}"))?;
        Ok(())
    }

    /// Starts `tcpdump` in `side` on `interface` writing every packet matching `filter`
    /// (pcap-filter syntax) to a file, until [`Capture::finish`].
    pub fn capture(
        &mut self,
        side: Side,
        interface: &str,
        filter: &str,
    ) -> anyhow::Result<Capture> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let file = self.tmp.path().join(format!("capture-{n}.pcap"));
        let name = format!("tcpdump-{n}");
        let mut cmd = self.exec(side, "tcpdump");
        // --immediate-mode: without it the kernel hands packets over in blocks (up to a
        // second late), and a capture stopped sooner writes nothing ("15 packets received
        // by filter", "0 packets captured").
        cmd.args([
            "-i",
            interface,
            "--immediate-mode",
            "-U",
            "-n",
            "-s",
            "0",
            "-w",
        ])
        .arg(&file)
        .arg(filter);
        self.spawn(&name, cmd)?;
        // tcpdump says "listening on" once it captures.
        let start = Instant::now();
        while !self.log_of(&name).contains("listening on") {
            if start.elapsed() > Duration::from_secs(5) || !self.is_running(&name) {
                bail!("tcpdump did not start: {}", self.log_of(&name));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Capture { name, file })
    }
}

/// A running packet capture ([`Lab::capture`]).
pub struct Capture {
    name: String,
    file: PathBuf,
}

impl Capture {
    /// Stops the capture; the UDP payloads captured, in order.
    pub fn finish(self, lab: &mut Lab) -> anyhow::Result<Vec<UdpPacket>> {
        // SIGTERM lets tcpdump flush (it writes packet by packet with -U anyway).
        lab.stop(&self.name);
        let bytes = std::fs::read(&self.file).context("the capture file")?;
        parse_pcap_udp(&bytes)
    }
}

/// One captured UDP datagram.
#[derive(Debug, Clone)]
pub struct UdpPacket {
    /// Source.
    pub from: SocketAddrV4,
    /// Destination.
    pub to: SocketAddrV4,
    /// The UDP payload.
    pub payload: Vec<u8>,
}

/// The IPv4 UDP datagrams in a classic pcap file of Ethernet frames (what `tcpdump -w`
/// writes for a veth).
pub fn parse_pcap_udp(b: &[u8]) -> anyhow::Result<Vec<UdpPacket>> {
    if b.len() < 24 {
        return Ok(Vec::new());
    }
    let le = match b[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => bail!("not a pcap file"),
    };
    let u32_at = |o: usize| {
        let a: [u8; 4] = b[o..o + 4].try_into().expect("4 bytes");
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let link = u32_at(20);
    anyhow::ensure!(link == 1, "pcap link type {link}, expected Ethernet (1)");
    let mut out = Vec::new();
    let mut o = 24;
    while o + 16 <= b.len() {
        let incl = u32_at(o + 8) as usize;
        let frame = &b[(o + 16).min(b.len())..(o + 16 + incl).min(b.len())];
        o += 16 + incl;
        // Ethernet II, IPv4.
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ipv4 = &frame[14..];
        let ihl = usize::from(ipv4[0] & 0x0f) * 4;
        if ipv4[0] >> 4 != 4 || ipv4[9] != 17 || ipv4.len() < ihl + 8 {
            continue;
        }
        let src = Ipv4Addr::new(ipv4[12], ipv4[13], ipv4[14], ipv4[15]);
        let dst = Ipv4Addr::new(ipv4[16], ipv4[17], ipv4[18], ipv4[19]);
        let udp = &ipv4[ihl..];
        let sport = u16::from_be_bytes([udp[0], udp[1]]);
        let dport = u16::from_be_bytes([udp[2], udp[3]]);
        let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
        let payload = &udp[8..len.clamp(8, udp.len())];
        out.push(UdpPacket {
            from: SocketAddrV4::new(src, sport),
            to: SocketAddrV4::new(dst, dport),
            payload: payload.to_vec(),
        });
    }
    Ok(out)
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaped.
fn stop_child(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for d in &mut self.daemons {
            stop_child(&mut d.child, Duration::from_secs(2));
            if panicking {
                let text = std::fs::read_to_string(&d.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(40);
                eprintln!("==== lab: {} ====\n{}", d.name, lines[from..].join("\n"));
            }
        }
        if let Some((bin, data, dir)) = &self.pg {
            let _ = Command::new("runuser")
                .current_dir(dir.path())
                .args(["-u", "postgres", "--"])
                .arg(bin.join("pg_ctl"))
                .arg("-D")
                .arg(data)
                .args(["stop", "-m", "immediate", "-w", "-t", "10"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if panicking {
                let log = std::fs::read_to_string(dir.path().join("server.log"));
                eprintln!("==== lab: postgres ====\n{}", log.unwrap_or_default());
            }
        }
        for (stop, _) in &self.forwarders {
            stop.store(true, Ordering::Relaxed);
        }
        for (_, t) in self.forwarders.drain(..) {
            let _ = t.join();
        }
        // Whatever still runs inside the lab's own namespaces was started by this process.
        for side in &self.sides {
            kill_all_in(&self.ns(*side));
        }
        for net in &self.root_routes {
            let _ = ip(&["route", "del", net]);
        }
        for veth in &self.root_veths {
            let _ = ip(&["link", "del", veth]);
        }
        for side in &self.sides {
            let _ = ip(&["netns", "del", &self.ns(*side)]);
        }
        for s in &self.wg_sockets {
            let _ = std::fs::remove_file(s);
        }
        if panicking && std::env::var("WARREN_TEST_KEEP_LOGS").is_ok() {
            let keep = std::env::temp_dir().join(format!("{}-files", self.name));
            if std::fs::rename(self.tmp.path(), &keep).is_ok() {
                eprintln!("lab files kept in {}", keep.display());
            }
        }
    }
}

/// Reads what `r` sends until it closes or `limit` bytes came; for short answers.
pub fn read_some(mut r: impl std::io::Read, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < limit {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pcap_with_one_udp_datagram_parses() {
        let mut b = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        b.extend([0u8; 8]);
        b.extend(65535u32.to_le_bytes());
        b.extend(1u32.to_le_bytes());
        let payload = b"hello";
        let mut frame = vec![0u8; 12];
        frame.extend([0x08, 0x00]);
        let mut ipv4 = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ipv4.extend(1000u16.to_be_bytes());
        ipv4.extend(2000u16.to_be_bytes());
        ipv4.extend(((8 + payload.len()) as u16).to_be_bytes());
        ipv4.extend([0, 0]);
        ipv4.extend(payload);
        frame.extend(ipv4);
        b.extend([0u8; 8]);
        b.extend((frame.len() as u32).to_le_bytes());
        b.extend((frame.len() as u32).to_le_bytes());
        b.extend(frame);
        let got = parse_pcap_udp(&b).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].from, "10.0.0.1:1000".parse().unwrap());
        assert_eq!(got[0].to, "10.0.0.2:2000".parse().unwrap());
        assert_eq!(got[0].payload, payload);
    }

    #[test]
    fn read_some_stops_at_the_limit() {
        let data = vec![7u8; 10_000];
        assert!(read_some(&data[..], 100).len() >= 100);
    }
}
