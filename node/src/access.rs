//! Client access to private resources, the node's half: who may reach which private
//! resource from which device (one pure evaluation, used both for `warren ls` and for the
//! grants every node holding a site's tunnel pushes to its agent), and the relay tickets
//! the cluster signs for devices and agents.
//!
//! ```text
//!  registry ──► site_access(reg, site, now) ──► AccessConfig ──► agent (ToAgent::Access)
//!     │            per device: owner enabled, its session live,     on change, and a
//!     │            per private resource: policies allow the flow    Heartbeat every second
//!     └──────► reachable(reg, user, session, device, now) ─► `GET /v1/client/resources`
//! ```
//!
//! A device's grants need its owner enabled and the session it last registered with
//! live: revoking that session, disabling or deleting the user, deleting the device or a
//! policy change all change the grants the agents hold, and the agents cut what is no
//! longer allowed. A flow's facts: the user, their verified e-mail, groups and roles, the
//! ID token's claims, the device's name, its last public address (`source_cidr`), and the
//! time; HTTP criteria (method, path) never match a flow.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use warren_consensus::registry::Registry;
use warren_proto::access::{decide, CompiledPolicy, Facts, Identity};
use warren_proto::registry::{Device, L4Protocol, PrivateAddress, Resource, Route};
use warren_proto::relay::{Holder, SignedTicket, Ticket, TICKET_VERSION};
use warren_proto::session::Session;
use warren_proto::tunnel::{AccessConfig, DeviceAccess, FlowDst, FlowGrant};
use warren_proto::Name;

/// How long a relay ticket is good for. Clients and agents fetch a new one well before.
pub const TICKET_TTL: Duration = Duration::from_secs(300);
/// A node signs a new agent ticket when the one it sent is older than this.
pub const TICKET_RENEW: Duration = Duration::from_secs(60);

/// The grant of one private resource (what the agent checks flows against); `None` for
/// other resources.
pub fn grant_of(resource: &Resource) -> Option<FlowGrant> {
    let Route::Private {
        address,
        ports,
        protocols,
        virtual_address,
        ..
    } = &resource.route
    else {
        return None;
    };
    let dst = match address {
        PrivateAddress::Ip(ip) => FlowDst::Net(ipnet::IpNet::from(*ip)),
        PrivateAddress::Cidr(net) => FlowDst::Net(*net),
        PrivateAddress::Dns(name) => FlowDst::Dns {
            name: name.clone(),
            virtual_address: (*virtual_address)?,
        },
    };
    Some(FlowGrant {
        resource: resource.name.clone(),
        dst,
        ports: ports.ranges().to_vec(),
        tcp: protocols.contains(&L4Protocol::Tcp),
        udp: protocols.contains(&L4Protocol::Udp),
        icmp: protocols.contains(&L4Protocol::Icmp),
    })
}

/// The address clients send a resource's flows to: the virtual address of a DNS-named one,
/// else its own address (a network for a CIDR).
pub fn client_address(resource: &Resource) -> Option<String> {
    match &resource.route {
        Route::Private {
            address,
            virtual_address,
            ..
        } => Some(match (address, virtual_address) {
            (PrivateAddress::Dns(_), Some(v)) => v.to_string(),
            (a, _) => a.to_string(),
        }),
        _ => None,
    }
}

/// What evaluating access needs of one registry, made once per evaluation round (a
/// `warren ls`, a connect, one push to an agent): every policy compiled once and every
/// user's roles, instead of once per device and resource.
pub struct AccessIndex<'r> {
    reg: &'r Registry,
    policies: HashMap<&'r Name, CompiledPolicy>,
    roles: HashMap<&'r Name, Vec<String>>,
}

impl<'r> AccessIndex<'r> {
    /// The index of `reg` (policies that do not compile match nothing, as in the proxy).
    pub fn new(reg: &'r Registry) -> Self {
        let policies = reg
            .policies()
            .iter()
            .filter_map(|(n, p)| Some((n, CompiledPolicy::compile(p).ok()?)))
            .collect();
        let mut roles: HashMap<&'r Name, Vec<String>> = HashMap::new();
        for r in reg.roles().values() {
            for m in &r.members {
                roles.entry(m).or_default().push(r.name.to_string());
            }
        }
        Self {
            reg,
            policies,
            roles,
        }
    }

    /// Whether the policies of `resource` let this session's user reach it from `device`
    /// now.
    pub fn allowed(
        &self,
        resource: &Resource,
        session: &Session,
        device: Option<&Device>,
        now: u64,
    ) -> bool {
        let Some(user) = self.reg.users().get(&session.user) else {
            return false;
        };
        if user.disabled {
            return false;
        }
        let policies = resource
            .policies
            .iter()
            .filter_map(|p| self.policies.get(p));
        let mut groups = session.groups.clone();
        groups.extend(self.roles.get(&user.name).into_iter().flatten().cloned());
        let claims: serde_json::Value =
            serde_json::from_str(&session.claims).unwrap_or(serde_json::Value::Null);
        let facts = Facts {
            identity: Some(Identity {
                user: user.name.as_str(),
                email: session.verified_email().unwrap_or_default(),
                groups: &groups,
                claims: &claims,
            }),
            source: device
                .and_then(|d| d.last_address)
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            method: None,
            path: None,
            device: device.map(|d| d.name.as_str()),
            now: now as i64,
        };
        decide(policies, &facts).allowed()
    }
}

/// The live session `device` was registered with, if its owner may use it now.
pub fn device_session<'r>(reg: &'r Registry, device: &Device, now: u64) -> Option<&'r Session> {
    let sid = device.session?;
    let session = reg.sessions().get(&sid)?;
    let user = reg.users().get(&device.owner)?;
    (session.user == device.owner && session.expires_at > now && !user.disabled).then_some(session)
}

/// The private resources this session's user may reach now (from `device`, if given).
pub fn reachable<'r>(
    reg: &'r Registry,
    session: &Session,
    device: Option<&Device>,
    now: u64,
) -> Vec<&'r Resource> {
    let index = AccessIndex::new(reg);
    reg.resources()
        .values()
        .filter(|r| matches!(r.route, Route::Private { .. }) && r.site.is_some())
        .filter(|r| index.allowed(r, session, device, now))
        .collect()
}

/// Every device with at least one grant on `site`, and its grants, sorted by device.
pub fn site_access(reg: &Registry, site: &Name, now: u64) -> Vec<DeviceAccess> {
    let resources: Vec<&Resource> = reg
        .resources()
        .values()
        .filter(|r| r.site.as_ref() == Some(site) && matches!(r.route, Route::Private { .. }))
        .collect();
    if resources.is_empty() {
        return Vec::new();
    }
    let index = AccessIndex::new(reg);
    let mut out = Vec::new();
    for device in reg.devices().values() {
        let Some(session) = device_session(reg, device, now) else {
            continue;
        };
        let grants: Vec<FlowGrant> = resources
            .iter()
            .filter(|r| index.allowed(r, session, Some(device), now))
            .filter_map(|r| grant_of(r))
            .collect();
        if grants.is_empty() {
            continue;
        }
        out.push(DeviceAccess {
            device: device.name.clone(),
            user: device.owner.clone(),
            key: device.public_key.0,
            address: device.address,
            grants,
        });
    }
    out
}

/// A signed ticket for `holder`, valid for [`TICKET_TTL`] from `now`; `None` before the
/// cluster has signing keys.
pub fn ticket(reg: &Registry, holder: Holder, now: u64) -> Option<(SignedTicket, u64)> {
    let keys = &reg.proxy_keys()?.signing_keys;
    let expires_at = now + TICKET_TTL.as_secs();
    let t = Ticket {
        version: TICKET_VERSION,
        holder,
        expires_at,
    };
    Some((crate::relay::sign_ticket(keys, &t)?, expires_at))
}

/// What a node needs to tell agents about access.
#[derive(Debug, Clone)]
pub struct AccessSettings {
    /// This node's relay address, as clients and agents reach it.
    pub relay_public: SocketAddr,
    /// How long an agent may go on admitting flows without hearing from a node: the
    /// cluster's leader-loss bound.
    pub valid_for: Duration,
}

impl AccessSettings {
    /// The access configuration of `site` for its agent, with a fresh agent ticket;
    /// `None` before the cluster has signing keys.
    pub fn config(
        &self,
        reg: &Registry,
        site: &Name,
        generation: u64,
        now: u64,
    ) -> Option<AccessConfig> {
        let (ticket, _) = ticket(reg, Holder::Agent { site: site.clone() }, now)?;
        Some(AccessConfig {
            generation,
            valid_for_ms: self.valid_for.as_millis() as u64,
            relay_ticket: ticket.encode(),
            relay: self.relay_public.to_string(),
            devices: site_access(reg, site, now),
        })
    }
}

/// How often a node tells each agent it still serves (and re-checks the grants, for
/// policies with time windows).
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// What the tunnels need of the node for client access.
pub struct AccessShell {
    /// Relay address and validity.
    pub settings: AccessSettings,
    /// Whether this node serves (else it tells agents nothing, and they fail closed).
    pub serving: crate::serving::Serving,
    /// For the agent keys it records.
    pub cluster: warren_consensus::cluster::Cluster,
    /// This node's relay counters (for `/metrics`).
    pub relay: std::sync::Arc<crate::relay::RelayStats>,
    /// The CLI's OAuth client id at the providers, if configured.
    pub cli_client_id: Option<String>,
    /// The devices connected to this node (one actor each).
    pub devices: std::sync::Arc<crate::devices::Devices>,
    /// The hole-punch coordinator (one actor per client↔site pairing).
    pub coordinator: std::sync::Arc<crate::coordinator::Coordinator>,
}

impl std::fmt::Debug for AccessShell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessShell")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl AccessShell {
    /// An agent of `site` announced its WireGuard key: record it if the registry has
    /// another (a Raft write, in its own task).
    pub fn agent_key(&self, site: &Name, key: [u8; 32]) {
        let reg = self.cluster.registry();
        if reg.site_key(site).map(|k| k.0) == Some(key) {
            return;
        }
        let cluster = self.cluster.clone();
        let site = site.clone();
        tokio::spawn(async move {
            let req = warren_consensus::types::Request::new(
                warren_consensus::types::Actor::System,
                warren_consensus::registry::Command::SetSiteKey {
                    site: site.clone(),
                    key: warren_proto::registry::WgKey(key),
                },
            );
            match cluster.write(req).await {
                Ok(Ok(_)) => tracing::info!(%site, "recorded the site agent's WireGuard key"),
                Ok(Err(e)) => tracing::warn!(%site, "recording the agent's WireGuard key: {e}"),
                Err(e) => tracing::warn!(%site, "recording the agent's WireGuard key: {e}"),
            }
        });
    }
}

/// One tunnel's pushes of access to its agent: an [`AccessConfig`] whenever the grants
/// change or the agent's ticket needs renewing, else a heartbeat, and nothing at all
/// while the node does not serve (the agent then stops admitting flows once the last
/// word it had runs out).
#[derive(Debug, Default)]
pub struct AgentPush {
    generation: u64,
    last: Option<Vec<DeviceAccess>>,
    signed_at: u64,
    relays: Option<Vec<String>>,
}

impl AgentPush {
    /// What to send now, if anything.
    pub fn next(
        &mut self,
        shell: &AccessShell,
        reg: &Registry,
        site: &Name,
    ) -> Option<warren_proto::tunnel::ToAgent> {
        use warren_proto::tunnel::ToAgent;
        if shell.serving.check().is_err() {
            return None;
        }
        let now = crate::proxy::unix_now();
        let devices = site_access(reg, site, now);
        let renew = now.saturating_sub(self.signed_at) >= TICKET_RENEW.as_secs();
        if self.last.as_ref() != Some(&devices) || renew {
            self.generation += 1;
            let mut config = shell.settings.config(reg, site, self.generation, now)?;
            config.devices = devices.clone();
            self.last = Some(devices);
            self.signed_at = now;
            return Some(ToAgent::Access(config));
        }
        let relay_only = relay_only_relays(reg);
        if self.relays.as_ref() != Some(&relay_only) {
            self.relays = Some(relay_only.clone());
            return Some(ToAgent::Relays(relay_only));
        }
        Some(ToAgent::Heartbeat {
            valid_for_ms: shell.settings.valid_for.as_millis() as u64,
        })
    }
}

/// The relay's view of the node: ticket keys from the registry, peers' relays from the
/// registry and the gossip of who holds which site.
pub struct NodeRelayView {
    /// The cluster (registry).
    pub cluster: warren_consensus::cluster::Cluster,
    /// Sites and peers' holdings.
    pub sites: std::sync::Arc<crate::sites::Sites>,
    /// Where new device bindings are reported.
    pub devices: std::sync::Arc<crate::devices::Devices>,
    /// The hole-punch coordinator.
    pub coordinator: std::sync::Arc<crate::coordinator::Coordinator>,
}

impl crate::relay::RelayView for NodeRelayView {
    fn keys(&self) -> crate::relay::TicketKeys {
        let reg = self.cluster.registry();
        reg.proxy_keys()
            .map(|k| crate::relay::TicketKeys::from_signing_keys(&k.signing_keys))
            .unwrap_or_default()
    }

    fn holders(&self) -> HashMap<Name, Vec<SocketAddr>> {
        peer_relays(&self.cluster.registry(), &self.sites)
    }

    fn relays(&self) -> Vec<SocketAddr> {
        all_relays(&self.cluster.registry())
    }

    fn held(&self) -> Option<Vec<Name>> {
        Some(self.sites.held())
    }

    fn coordinate(&self, punch: crate::relay::Coordinate) {
        self.coordinator.punch(punch);
    }

    fn pairing_gone(&self, client: (SocketAddr, u32)) {
        self.coordinator.gone(client);
    }

    fn device_bound(&self, bound: crate::relay::DeviceBound) {
        self.devices.seen(
            bound.device,
            crate::devices::Seen::Bound {
                site: bound.site,
                from: bound.from,
            },
        );
    }
}

/// The relay addresses of the peers holding a tunnel to each site, as last heard (members
/// only: a relay-only node holds no tunnel, and what it would say is never believed).
pub fn peer_relays(reg: &Registry, sites: &crate::sites::Sites) -> HashMap<Name, Vec<SocketAddr>> {
    let mut out: HashMap<Name, Vec<SocketAddr>> = HashMap::new();
    for (id, held) in sites.peer_holdings() {
        let Some(relay) = reg
            .node_by_id(id)
            .filter(|n| n.role != warren_proto::registry::NodeRole::Relay)
            .and_then(|n| reg.node_relay(&n.name))
            .and_then(|r| r.parse().ok())
        else {
            continue;
        };
        for site in held {
            out.entry(site).or_default().push(relay);
        }
    }
    out
}

/// The relay addresses of the relay-only nodes, sorted.
pub fn relay_only_relays(reg: &Registry) -> Vec<String> {
    let mut out: Vec<String> = reg
        .node_relays()
        .filter(|(n, _)| n.role == warren_proto::registry::NodeRole::Relay)
        .map(|(_, relay)| relay.to_owned())
        .collect();
    out.sort();
    out
}

/// The relay address of every node of the cluster, relay-only nodes included (a Bind from
/// one of them is a hop, and clients may use any of them).
pub fn all_relays(reg: &Registry) -> Vec<SocketAddr> {
    reg.node_relays()
        .filter_map(|(_, relay)| relay.parse().ok())
        .collect()
}

/// Records this node's relay address in the registry (once it differs), retrying until
/// the cluster takes it: every second at first, backing off to every 30 s (a node that
/// cannot write for that long has bigger trouble, reported elsewhere).
pub fn record_relay(cluster: warren_consensus::cluster::Cluster, me: Name, relay: SocketAddr) {
    tokio::spawn(async move {
        let relay = relay.to_string();
        for attempt in 0u32.. {
            if cluster.registry().node_relay(&me) == Some(relay.as_str()) {
                return;
            }
            if cluster.registry().nodes().contains_key(&me) {
                let req = warren_consensus::types::Request::new(
                    warren_consensus::types::Actor::System,
                    warren_consensus::registry::Command::SetNodeRelay {
                        node: me.clone(),
                        relay: relay.clone(),
                    },
                );
                match cluster.write(req).await {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) => tracing::warn!("recording this node's relay address: {e}"),
                    Err(e) if attempt % 10 == 9 => {
                        tracing::warn!("recording this node's relay address: {e}")
                    }
                    Err(_) => {}
                }
            }
            tokio::time::sleep(
                Duration::from_secs(1 << attempt.min(5)).min(Duration::from_secs(30)),
            )
            .await;
        }
    });
}
