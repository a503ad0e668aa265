//! The lab's topologies beyond the star: an "internet" between the two routers, per-router
//! NAT behaviours, the client inside the site's LAN, and the helpers that disturb a direct
//! path (cut, PMTU black hole, NAT rebinding, short mapping timeouts). Part of [`Lab`]: the
//! same names, processes and cleanup serve every topology.

use std::net::Ipv4Addr;

use anyhow::{bail, Context as _};

use super::{ip, run, Lab, Side, NAT_ROUTER};

/// Comment on the rules [`Lab::cut_between_routers`] inserts.
const CUT_COMMENT: &str = "warren-lab-cut";
/// Comment on the rule [`Lab::small_mtu`] inserts.
const PMTU_COMMENT: &str = "warren-lab-pmtu";
/// Policy routing tables (and rule preferences) of [`Lab::small_mtu`] in `inet`: for what
/// comes in from the site's side, and from the client's.
const MTU_TABLES: [u32; 2] = [201, 202];

/// How a router treats what crosses its WAN: each kind is real iptables rules in the
/// router's namespace (interfaces `lan` and `wan`). Filtering is always the kernel's
/// conntrack: from the WAN only what answers a flow from inside (the exact remote address
/// and port), everything else dropped silently (also to the router itself, so that an
/// early punch never leaves a confirmed conntrack entry that would steal the port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// A home or office NAT: [`NAT_ROUTER`] (MASQUERADE out of `wan`, the source port kept
    /// when free: an endpoint-independent mapping; unsolicited inbound dropped).
    Easy,
    /// No NAT: the LAN is routed (`inet` routes it via this router's WAN, so the machine's
    /// own address is its public one), behind a stateful firewall (from `wan` only
    /// ESTABLISHED,RELATED).
    FirewallOnly,
    /// A symmetric NAT: MASQUERADE `--random-fully`, a new random public port for every new
    /// remote address and port (endpoint-dependent mapping); unsolicited inbound dropped.
    Hard,
    /// [`Nat::Easy`] plus UDP `port` on the WAN forwarded (DNAT) to the same port of the
    /// machine behind it, and accepted: what UPnP/PCP/NAT-PMP would have opened.
    PortMapped {
        /// The UDP port forwarded, on the WAN and on the machine.
        port: u16,
    },
    /// Two chained [`Nat::Easy`] NATs, as behind a carrier-grade NAT: a namespace
    /// ([`Side::SiteCgnat`] or [`Side::ClientCgnat`]) between the router and `inet` holds the
    /// public address; the router's WAN is on a private link (10.93.K.0/24 for the site,
    /// 10.94.K.0/24 for the client) behind it.
    Double,
}

/// How the lab's networks are laid out ([`Lab::start_with`]).
///
/// [`Topology::Internet`] (the client side mirrors the site side):
///
/// ```text
/// root namespace: nodes on 10.95.K.1 (and 10.95.K.3), the test process; routes to every
///   | veth wl<pid>i<n>      subnet of the lab via 10.95.K.2 (the default route is untouched)
/// inet (<lab>-inet): routes (ip_forward=1 there only), no NAT, no filter unless a helper
///   asks; routes to a LAN only where it is public (Nat::FirewallOnly)
///   root 10.95.K.2 ---------- site 10.97.K.1 ------------------ client 10.96.K.1
///                               |                                 |
///   Nat::Double only:   site-cgnat wan 10.97.K.2          client-cgnat wan 10.96.K.2
///                       [Easy] lan 10.93.K.1              [Easy] lan 10.94.K.1
///                               |                                 |
///                       site router wan 10.97.K.2         client router wan 10.96.K.2
///                       (10.93.K.2 behind a CGNAT)        (10.94.K.2 behind a CGNAT)
///                       [the site's Nat]                  [the client's Nat]
///                       lan 10.87.K.1                     lan 10.86.K.1
///                               |                                 |
///                       site eth0 10.87.K.2               client eth0 10.86.K.2
///                       (agent, sshd, PostgreSQL,         (`warren`, ssh, psql, ...)
///                        dnsmasq, iperf3, banner)
/// ```
///
/// [`Topology::SameLan`]: no client router; the site router's `lan` is a bridge
/// (bridged frames never enter iptables: `bridge-nf-call-iptables=0` in that namespace):
///
/// ```text
/// root 10.95.K.1 -- inet -- site 10.97.K.1 -- site router wan 10.97.K.2 [the site's Nat]
///                                              lan (bridge) 10.87.K.1
///                                               |- lan-site   -- site eth0   10.87.K.2
///                                               '- lan-client -- client eth0 10.87.K.3
/// ```
///
/// No hairpinning: a packet from the LAN to the router's WAN address is delivered to the
/// router itself (no DNAT back in), so the client reaches the site at 10.87.K.2 but not at
/// its public mapping.
///
/// Names: `warren-lab-<pid>-<n>-{inet,site-router,site-cgnat,site,client-router,
/// client-cgnat,client}` namespaces, `wl<pid>i<n>` the root's veth. Dropping the lab
/// removes them; a later lab removes those of a process that is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Both routers ([`Nat::Easy`]) hang off the root namespace, which does not forward:
    /// client and site reach the nodes, never each other. What [`Lab::start`] builds; see
    /// the module documentation.
    Star,
    /// The routers reach each other (and the nodes) through `inet`, each with its NAT.
    Internet {
        /// The site router's behaviour.
        site: Nat,
        /// The client router's behaviour.
        client: Nat,
    },
    /// The client machine sits in the site's LAN, behind the one site router.
    SameLan {
        /// The site router's behaviour.
        site: Nat,
    },
}

/// One side's part of an internet topology.
struct Branch {
    router: Side,
    cgnat: Side,
    host: Side,
    /// `inet`'s interface toward it.
    inet_if: &'static str,
    /// Third octets: its public link to `inet`, the private link behind a CGNAT, its LAN.
    wan: u8,
    link: u8,
    lan: u8,
    nat: Nat,
}

impl Branch {
    fn site(nat: Nat) -> Self {
        Branch {
            router: Side::SiteRouter,
            cgnat: Side::SiteCgnat,
            host: Side::Site,
            inet_if: "site",
            wan: 97,
            link: 93,
            lan: 87,
            nat,
        }
    }

    fn client(nat: Nat) -> Self {
        Branch {
            router: Side::ClientRouter,
            cgnat: Side::ClientCgnat,
            host: Side::Client,
            inet_if: "client",
            wan: 96,
            link: 94,
            lan: 86,
            nat,
        }
    }

    /// The namespace holding the public address.
    fn outer(&self) -> Side {
        if self.nat == Nat::Double {
            self.cgnat
        } else {
            self.router
        }
    }
}

/// What stands between a machine and `inet`.
struct Chain {
    host_ip: Ipv4Addr,
    nat: Nat,
    /// Its NAT namespaces, the one nearest the machine first.
    nats: Vec<Side>,
    /// Third octet of the public link.
    wan: u8,
}

/// The rules of a router of kind `nat` in front of `inner` (the machine a port mapping
/// forwards to), each a command to run in its namespace.
fn router_rules(nat: Nat, inner: Ipv4Addr) -> Vec<Vec<String>> {
    let mut rules: Vec<Vec<String>> = NAT_ROUTER
        .iter()
        .map(|r| r.iter().map(|a| a.to_string()).collect())
        .collect();
    let masquerade = rules
        .iter()
        .position(|r| r.iter().any(|a| a == "MASQUERADE"));
    let strs = |v: &[&str]| -> Vec<String> { v.iter().map(|a| a.to_string()).collect() };
    match nat {
        Nat::Easy | Nat::Double => {}
        Nat::Hard => {
            if let Some(i) = masquerade {
                rules[i].push("--random-fully".into());
            }
        }
        Nat::FirewallOnly => {
            if let Some(i) = masquerade {
                rules.remove(i);
            }
        }
        Nat::PortMapped { port } => {
            let port = port.to_string();
            let to = format!("{inner}:{port}");
            rules.push(strs(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-i",
                "wan",
                "-p",
                "udp",
                "--dport",
                &port,
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ]));
            rules.push(strs(&[
                "iptables",
                "-A",
                "FORWARD",
                "-i",
                "wan",
                "-o",
                "lan",
                "-p",
                "udp",
                "-d",
                &inner.to_string(),
                "--dport",
                &port,
                "-j",
                "ACCEPT",
            ]));
        }
    }
    rules
}

impl Lab {
    /// Builds [`Topology::Internet`] or [`Topology::SameLan`]; `root_veth` is the root
    /// namespace's interface toward `inet`.
    pub(super) fn build_internet(&mut self, root_veth: &str) -> anyhow::Result<()> {
        let k = self.k;
        let (site, client) = match self.topology {
            Topology::Internet { site, client } => {
                (Branch::site(site), Some(Branch::client(client)))
            }
            Topology::SameLan { site } => (Branch::site(site), None),
            Topology::Star => bail!("the star topology is built by build_side"),
        };
        // Recorded first (see start_with), in teardown order.
        let mut sides = vec![Side::Site, Side::Client];
        for b in std::iter::once(&site).chain(client.as_ref()) {
            sides.push(b.router);
            if b.nat == Nat::Double {
                sides.push(b.cgnat);
            }
        }
        sides.push(Side::Inet);
        self.sides = sides;
        self.root_veths = vec![root_veth.to_owned()];
        let mut nets = vec![97, 87];
        if site.nat == Nat::Double {
            nets.push(93);
        }
        if let Some(c) = &client {
            nets.extend([96, 86]);
            if c.nat == Nat::Double {
                nets.push(94);
            }
        }
        self.root_routes = nets.iter().map(|b| format!("10.{b}.{k}.0/24")).collect();

        let inet = self.ns(Side::Inet);
        let root_ip = format!("10.95.{k}.1/24");
        let root_ip2 = format!("10.95.{k}.3/24");
        let inet_ip = format!("10.95.{k}.2/24");
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &inet],
            vec!["-n", &inet, "link", "set", "lo", "up"],
            vec![
                "link", "add", root_veth, "type", "veth", "peer", "name", "root", "netns", &inet,
            ],
            vec!["addr", "add", &root_ip, "dev", root_veth],
            vec!["addr", "add", &root_ip2, "dev", root_veth],
            vec!["link", "set", root_veth, "up"],
            vec!["-n", &inet, "addr", "add", &inet_ip, "dev", "root"],
            vec!["-n", &inet, "link", "set", "root", "up"],
        ];
        for step in steps {
            ip(&step)?;
        }
        // Forwarding in `inet` only: the root namespace's sysctls are never touched.
        run(self
            .exec(Side::Inet, "sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"]))?;
        let same_lan = client.is_none();
        self.build_branch(&site, same_lan)?;
        if let Some(c) = &client {
            self.build_branch(c, false)?;
        }
        // Anything else goes up to the root namespace (which does not forward): another
        // lab's node address is reachable this way, so one cluster serves several labs.
        ip(&[
            "-n",
            &inet,
            "route",
            "add",
            "default",
            "via",
            &format!("10.95.{k}.1"),
        ])?;
        // Every subnet of the lab is routed into it from the root namespace: nothing meant
        // for the lab ever leaves by the root's default route, whatever the NATs do.
        let via = format!("10.95.{k}.2");
        for net in &self.root_routes {
            ip(&["route", "add", net, "via", &via])?;
        }
        Ok(())
    }

    /// Adds [`Side::Relay`]: a namespace on `inet` with a public address and no NAT (where
    /// a relay-only node runs), reachable from the lab's machines and from the root
    /// namespace. Returns its address.
    pub fn add_relay_host(&mut self) -> anyhow::Result<Ipv4Addr> {
        if matches!(self.topology, Topology::Star) {
            bail!("the star topology has no inet for a relay host");
        }
        let k = self.k;
        let (inet, relay) = (self.ns(Side::Inet), self.ns(Side::Relay));
        // Deleted with the others (before inet, whose deletion takes the veth with it).
        let at = self
            .sides
            .iter()
            .position(|s| *s == Side::Inet)
            .unwrap_or(0);
        self.sides.insert(at, Side::Relay);
        let (gw, me) = (format!("10.98.{k}.1"), format!("10.98.{k}.2"));
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), relay.clone()],
            vec![
                "-n".into(),
                relay.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                inet.clone(),
                "link".into(),
                "add".into(),
                "relay".into(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                "wan".into(),
                "netns".into(),
                relay.clone(),
            ],
            vec![
                "-n".into(),
                inet.clone(),
                "addr".into(),
                "add".into(),
                format!("{gw}/24"),
                "dev".into(),
                "relay".into(),
            ],
            vec![
                "-n".into(),
                inet.clone(),
                "link".into(),
                "set".into(),
                "relay".into(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                relay.clone(),
                "addr".into(),
                "add".into(),
                format!("{me}/24"),
                "dev".into(),
                "wan".into(),
            ],
            vec![
                "-n".into(),
                relay.clone(),
                "link".into(),
                "set".into(),
                "wan".into(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                relay.clone(),
                "route".into(),
                "add".into(),
                "default".into(),
                "via".into(),
                gw.clone(),
            ],
        ];
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            ip(&args)?;
        }
        let net = format!("10.98.{k}.0/24");
        ip(&["route", "add", &net, "via", &format!("10.95.{k}.2")])?;
        self.root_routes.push(net);
        Ok(me.parse()?)
    }

    /// One side: its public link to `inet`, a CGNAT if asked, the router, its LAN and
    /// machine (in `same_lan`, the site's LAN is a bridge with the client on it too).
    fn build_branch(&self, b: &Branch, same_lan: bool) -> anyhow::Result<()> {
        let k = self.k;
        let (inet, r, host) = (self.ns(Side::Inet), self.ns(b.router), self.ns(b.host));
        let outer = self.ns(b.outer());
        let (wb, lb, nb) = (b.wan, b.link, b.lan);
        let inet_ip = format!("10.{wb}.{k}.1/24");
        let inet_gw = format!("10.{wb}.{k}.1");
        let wan = format!("10.{wb}.{k}.2/24");
        let mut steps: Vec<Vec<String>> = Vec::new();
        let mut add = |v: &[&str]| steps.push(v.iter().map(|a| a.to_string()).collect());
        add(&["netns", "add", &r]);
        add(&["netns", "add", &host]);
        if b.nat == Nat::Double {
            add(&["netns", "add", &outer]);
        }
        add(&[
            "-n", &inet, "link", "add", b.inet_if, "type", "veth", "peer", "name", "wan", "netns",
            &outer,
        ]);
        add(&["-n", &inet, "addr", "add", &inet_ip, "dev", b.inet_if]);
        add(&["-n", &inet, "link", "set", b.inet_if, "up"]);
        add(&["-n", &outer, "link", "set", "lo", "up"]);
        add(&["-n", &outer, "addr", "add", &wan, "dev", "wan"]);
        add(&["-n", &outer, "link", "set", "wan", "up"]);
        add(&["-n", &outer, "route", "add", "default", "via", &inet_gw]);
        if b.nat == Nat::Double {
            let (lan, gw, rwan) = (
                format!("10.{lb}.{k}.1/24"),
                format!("10.{lb}.{k}.1"),
                format!("10.{lb}.{k}.2/24"),
            );
            add(&[
                "-n", &outer, "link", "add", "lan", "type", "veth", "peer", "name", "wan", "netns",
                &r,
            ]);
            add(&["-n", &outer, "addr", "add", &lan, "dev", "lan"]);
            add(&["-n", &outer, "link", "set", "lan", "up"]);
            add(&["-n", &r, "link", "set", "lo", "up"]);
            add(&["-n", &r, "addr", "add", &rwan, "dev", "wan"]);
            add(&["-n", &r, "link", "set", "wan", "up"]);
            add(&["-n", &r, "route", "add", "default", "via", &gw]);
        }
        let (lan, gw) = (format!("10.{nb}.{k}.1/24"), format!("10.{nb}.{k}.1"));
        let mut hosts: Vec<(String, &str, String)> = Vec::new();
        if same_lan {
            add(&["-n", &r, "link", "add", "lan", "type", "bridge"]);
            hosts.push((host.clone(), "lan-site", format!("10.{nb}.{k}.2/24")));
            let client = self.ns(Side::Client);
            add(&["netns", "add", &client]);
            hosts.push((client, "lan-client", format!("10.{nb}.{k}.3/24")));
        } else {
            hosts.push((host.clone(), "lan", format!("10.{nb}.{k}.2/24")));
        }
        for (ns, port, addr) in &hosts {
            add(&[
                "-n", &r, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ]);
            if same_lan {
                add(&["-n", &r, "link", "set", port, "master", "lan"]);
                add(&["-n", &r, "link", "set", port, "up"]);
            }
            add(&["-n", ns, "link", "set", "lo", "up"]);
            add(&["-n", ns, "addr", "add", addr, "dev", "eth0"]);
            add(&["-n", ns, "link", "set", "eth0", "up"]);
            add(&["-n", ns, "route", "add", "default", "via", &gw]);
        }
        add(&["-n", &r, "addr", "add", &lan, "dev", "lan"]);
        add(&["-n", &r, "link", "set", "lan", "up"]);
        if b.nat == Nat::FirewallOnly {
            // The LAN is public: the internet knows the way to it.
            let (net, via) = (format!("10.{nb}.{k}.0/24"), format!("10.{wb}.{k}.2"));
            add(&["-n", &inet, "route", "add", &net, "via", &via]);
        }
        for step in &steps {
            let step: Vec<&str> = step.iter().map(String::as_str).collect();
            ip(&step)?;
        }
        let inner = Ipv4Addr::new(10, nb, k, 2);
        if same_lan {
            // A switch: frames between the LAN's machines never meet the router's
            // iptables (the kernel has br_netfilter built in, on by default in every
            // namespace). Also accepted in FORWARD, should that sysctl be missing.
            let _ = run(self
                .exec(b.router, "sysctl")
                .args(["-qw", "net.bridge.bridge-nf-call-iptables=0"]));
            run(self
                .exec(b.router, "iptables")
                .args(["-A", "FORWARD", "-i", "lan", "-o", "lan", "-j", "ACCEPT"]))?;
        }
        for rule in router_rules(b.nat, inner) {
            run(self.exec(b.router, &rule[0]).args(&rule[1..]))
                .with_context(|| format!("{:?} rules in {r}", b.nat))?;
        }
        if b.nat == Nat::Double {
            for rule in router_rules(Nat::Easy, inner) {
                run(self.exec(b.cgnat, &rule[0]).args(&rule[1..]))
                    .with_context(|| format!("CGNAT rules in {outer}"))?;
            }
        }
        Ok(())
    }

    /// What stands between `side`'s machine and the internet (any namespace of that side
    /// names it; in [`Topology::SameLan`] the client's NAT is the site router).
    fn chain(&self, side: Side) -> anyhow::Result<Chain> {
        let site = match side {
            Side::Site | Side::SiteRouter | Side::SiteCgnat => true,
            Side::Client | Side::ClientRouter | Side::ClientCgnat => false,
            Side::Root | Side::Inet | Side::Relay => bail!("{side:?} is not behind a NAT"),
        };
        let (site_nat, client_nat) = match self.topology {
            Topology::Star => (Nat::Easy, Nat::Easy),
            Topology::Internet { site, client } => (site, client),
            Topology::SameLan { site } => (site, site),
        };
        let behind_site = site || matches!(self.topology, Topology::SameLan { .. });
        let (nat, b) = if behind_site {
            (site_nat, Branch::site(site_nat))
        } else {
            (client_nat, Branch::client(client_nat))
        };
        let mut nats = vec![b.router];
        if nat == Nat::Double {
            nats.push(b.cgnat);
        }
        let host_ip = if site {
            self.site_ip()
        } else {
            self.client_ip()
        };
        Ok(Chain {
            host_ip,
            nat,
            nats,
            wan: b.wan,
        })
    }

    /// The NAT behaviour in front of `side`'s machine ([`Nat::Easy`] in the star).
    pub fn nat_of(&self, side: Side) -> anyhow::Result<Nat> {
        Ok(self.chain(side)?.nat)
    }

    /// Where the rest of the lab (the nodes, the other side) sees `side`'s machine come
    /// from: its NAT's public address (10.97.K.2 for the site, 10.96.K.2 for the client;
    /// `.3` after an odd number of [`Lab::rebind`]s), its own address behind
    /// [`Nat::FirewallOnly`], the site's public address for the client in
    /// [`Topology::SameLan`].
    pub fn public_ip(&self, side: Side) -> anyhow::Result<Ipv4Addr> {
        let c = self.chain(side)?;
        if c.nat == Nat::FirewallOnly {
            return Ok(c.host_ip);
        }
        let outer = *c.nats.last().context("a chain has a router")?;
        let last = if self.rebound().contains(&outer) {
            3
        } else {
            2
        };
        Ok(Ipv4Addr::new(10, c.wan, self.k, last))
    }

    /// Makes `side`'s NAT (the outer one with [`Nat::Double`]) use a new public address
    /// from now on, as a NAT rebinding or a changed uplink does: the WAN gets `.3` (or goes
    /// back to `.2` on the next call), the MASQUERADE becomes an SNAT to it (still
    /// `--random-fully` for [`Nat::Hard`]), and its conntrack table is flushed, so flows in
    /// progress get a new mapping at their next outbound packet and what is sent to the
    /// old one is dropped. `inet` reaches the new address (same subnet). Returns it.
    /// Not for [`Nat::FirewallOnly`] (no NAT: the address is the machine's own).
    pub fn rebind(&self, side: Side) -> anyhow::Result<Ipv4Addr> {
        let c = self.chain(side)?;
        if c.nat == Nat::FirewallOnly {
            bail!("{side:?} is behind Nat::FirewallOnly: there is no NAT to rebind");
        }
        let outer = *c.nats.last().context("a chain has a router")?;
        // Held throughout: two rebinds of one lab at once take turns.
        let mut rebound = self.rebound();
        let to_alt = !rebound.contains(&outer);
        let addr = Ipv4Addr::new(10, c.wan, self.k, if to_alt { 3 } else { 2 });
        let have = run(self
            .exec(outer, "ip")
            .args(["-4", "-o", "addr", "show", "dev", "wan"]))?;
        if !have.contains(&format!("inet {addr}/")) {
            run(self
                .exec(outer, "ip")
                .args(["addr", "add", &format!("{addr}/24"), "dev", "wan"]))?;
        }
        run(self
            .exec(outer, "iptables")
            .args(["-t", "nat", "-F", "POSTROUTING"]))?;
        let to = addr.to_string();
        let mut snat = vec![
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "wan",
            "-j",
            "SNAT",
            "--to-source",
            &to,
        ];
        if c.nat == Nat::Hard {
            snat.push("--random-fully");
        }
        run(self.exec(outer, "iptables").args(&snat))?;
        self.conntrack_flush_in(outer)?;
        if to_alt {
            rebound.push(outer);
        } else {
            rebound.retain(|s| *s != outer);
        }
        Ok(addr)
    }

    /// The NAT namespaces rebound to `.3` (a poisoned lock only means a panic elsewhere).
    fn rebound(&self) -> std::sync::MutexGuard<'_, Vec<Side>> {
        self.rebound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets how long an idle UDP mapping lives in `side`'s NATs (router, and CGNAT with
    /// [`Nat::Double`]): `net.netfilter.nf_conntrack_udp_timeout` (a flow seen one way, or
    /// both ways for under 2 s) and `nf_conntrack_udp_timeout_stream` (longer), both to
    /// `secs`. Defaults are 30 and 120 s. Both are per network namespace on this kernel
    /// (checked on 6.18: setting them in a lab namespace leaves the root's alone). A
    /// conntrack entry picks the value up at its next packet; one that expires is gone at
    /// once for lookups and `conntrack -L` (garbage collection only frees it later).
    pub fn set_udp_timeout(&self, side: Side, secs: u32) -> anyhow::Result<()> {
        for ns in self.chain(side)?.nats {
            run(self.exec(ns, "sysctl").args([
                "-qw",
                &format!("net.netfilter.nf_conntrack_udp_timeout={secs}"),
                &format!("net.netfilter.nf_conntrack_udp_timeout_stream={secs}"),
            ]))
            .with_context(|| format!("UDP conntrack timeouts in {ns:?}"))?;
        }
        Ok(())
    }

    /// Forgets every mapping of `side`'s NATs (`conntrack -F` in the router, and the CGNAT
    /// with [`Nat::Double`]): what arrives for an old mapping is now unsolicited.
    pub fn flush_conntrack(&self, side: Side) -> anyhow::Result<()> {
        for ns in self.chain(side)?.nats {
            self.conntrack_flush_in(ns)?;
        }
        Ok(())
    }

    fn conntrack_flush_in(&self, ns: Side) -> anyhow::Result<()> {
        run(self.exec(ns, "conntrack").arg("-F"))
            .with_context(|| format!("conntrack -F in {ns:?} (package conntrack)"))?;
        Ok(())
    }

    /// `conntrack -L -p udp` of `side`'s NATs (router first), one entry a line, e.g.
    /// `udp 17 28 src=10.86.K.2 dst=10.95.K.1 sport=40000 dport=3478 src=10.95.K.1
    /// dst=10.96.K.2 sport=3478 dport=40000 [ASSURED] mark=0 use=1`.
    pub fn conntrack_udp(&self, side: Side) -> anyhow::Result<String> {
        let mut out = String::new();
        for ns in self.chain(side)?.nats {
            out.push_str(
                &run(self.exec(ns, "conntrack").args(["-L", "-p", "udp"]))
                    .with_context(|| format!("conntrack -L in {ns:?} (package conntrack)"))?,
            );
        }
        Ok(out)
    }

    /// `inet`'s interfaces toward the two routers, or why there are not two.
    fn between_routers(&self) -> anyhow::Result<[&'static str; 2]> {
        match self.topology {
            Topology::Internet { .. } => Ok(["site", "client"]),
            t => bail!("{t:?} has no internet between two routers"),
        }
    }

    /// Cuts (true) or restores (false) the internet between the two routers: `inet` drops
    /// whatever it would forward from one router's side to the other's, both ways (any
    /// address behind them, also after a rebind), while each still reaches the root
    /// namespace (the nodes). [`Topology::Internet`] only. Idempotent.
    pub fn cut_between_routers(&self, cut: bool) -> anyhow::Result<()> {
        let [a, b] = self.between_routers()?;
        for (from, to) in [(a, b), (b, a)] {
            let spec: Vec<String> = [
                "-i",
                from,
                "-o",
                to,
                "-m",
                "comment",
                "--comment",
                CUT_COMMENT,
                "-j",
                "DROP",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            self.set_rule(Side::Inet, "filter", "FORWARD", &spec, cut)?;
        }
        Ok(())
    }

    /// Lowers (true) or restores (false) the path MTU between the two routers to `mtu`, as
    /// a PMTU black hole: `inet` forwards from one router's side to the other's through
    /// routes of that MTU (policy routing on the incoming interface: the paths to the root
    /// namespace keep 1500), so a larger packet with DF set is dropped, and the ICMP
    /// "fragmentation needed" it would send back is dropped too (a larger packet without
    /// DF is fragmented and passes). Linux UDP sockets set DF by default
    /// (`IP_PMTUDISC_WANT`, as long as no ICMP taught them a smaller MTU).
    /// [`Topology::Internet`] only; `mtu` 576..1500. Idempotent.
    pub fn small_mtu(&self, mtu: u32, on: bool) -> anyhow::Result<()> {
        let [a, b] = self.between_routers()?;
        if !(576..1500).contains(&mtu) {
            bail!("small_mtu: {mtu} is not in 576..1500");
        }
        let inet = self.ns(Side::Inet);
        let icmp: Vec<String> = [
            "-p",
            "icmp",
            "--icmp-type",
            "fragmentation-needed",
            "-m",
            "comment",
            "--comment",
            PMTU_COMMENT,
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Off first (also before on, so that a second `on` changes the MTU).
        for t in MTU_TABLES {
            let t = t.to_string();
            let _ = ip(&["-n", &inet, "rule", "del", "pref", &t]);
            let _ = ip(&["-n", &inet, "route", "flush", "table", &t]);
        }
        if !on {
            return self.set_rule(Side::Inet, "filter", "OUTPUT", &icmp, false);
        }
        self.set_rule(Side::Inet, "filter", "OUTPUT", &icmp, true)?;
        let k = self.k;
        let (site, client) = match self.topology {
            Topology::Internet { site, client } => (Branch::site(site), Branch::client(client)),
            _ => bail!("small_mtu needs Topology::Internet"),
        };
        let m = mtu.to_string();
        // From the site's side to the client's networks, and back.
        for (table, from, to) in [(MTU_TABLES[0], a, &client), (MTU_TABLES[1], b, &site)] {
            let t = table.to_string();
            ip(&[
                "-n", &inet, "rule", "add", "pref", &t, "iif", from, "lookup", &t,
            ])?;
            let net = format!("10.{}.{k}.0/24", to.wan);
            ip(&[
                "-n", &inet, "route", "add", &net, "dev", to.inet_if, "table", &t, "mtu", "lock",
                &m,
            ])?;
            if to.nat == Nat::FirewallOnly {
                let (lan, via) = (
                    format!("10.{}.{k}.0/24", to.lan),
                    format!("10.{}.{k}.2", to.wan),
                );
                ip(&[
                    "-n", &inet, "route", "add", &lan, "via", &via, "dev", to.inet_if, "table", &t,
                    "mtu", "lock", &m,
                ])?;
            }
        }
        Ok(())
    }

    /// How many ICMP "fragmentation needed" `inet` has swallowed since [`Lab::small_mtu`]
    /// was turned on: each one a packet too big with DF set.
    pub fn pmtu_icmp_dropped(&self) -> anyhow::Result<u64> {
        let out = run(self
            .exec(Side::Inet, "iptables")
            .args(["-t", "filter", "-L", "OUTPUT", "-v", "-x", "-n"]))?;
        let line = out
            .lines()
            .find(|l| l.contains(PMTU_COMMENT))
            .context("small_mtu is not on")?;
        line.split_whitespace()
            .next()
            .context("an iptables counter")?
            .parse()
            .with_context(|| format!("the packet counter of {line:?}"))
    }

    /// Binds a UDP socket to `0.0.0.0:port` (0: any) inside `side`'s namespace. It stays
    /// there whichever thread uses it.
    pub fn udp_socket(&self, side: Side, port: u16) -> anyhow::Result<std::net::UdpSocket> {
        if !self.has(side) {
            bail!("this lab ({:?}) has no {side:?}", self.topology);
        }
        self.within(side, || std::net::UdpSocket::bind(("0.0.0.0", port)))?
            .with_context(|| format!("binding UDP 0.0.0.0:{port} in {side:?}"))
    }
}
