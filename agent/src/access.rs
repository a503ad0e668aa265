//! Client access on the agent: what the nodes say (per tunnel) folded into one access for
//! the WireGuard endpoint, and the key that endpoint uses.
//!
//! ```text
//!  tunnel tasks ─ AccessMsg (mpsc) ─► access task: AccessState ─► AgentEndpoint::set_access
//!   (Access, Heartbeat, Closed)                                   / ::heartbeat
//! ```
//!
//! - Relays: the union of what the currently connected tunnels' nodes sent (each node its
//!   own relay and the ticket to bind to it with); a tunnel that closes drops its relay.
//! - Devices and grants: the most recent `AccessConfig` by arrival among the connected
//!   tunnels. With no tunnel left, the last one stays in force: new flows are still
//!   admitted until `valid_until`, open flows keep going, so a moment without tunnels does
//!   not cut every session (the validity bound is what fails closed).
//! - `valid_until`: arrival of the latest message (Access or Heartbeat, from any tunnel)
//!   plus its `valid_for_ms`.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::mpsc;
use warren_net::endpoint::AgentEndpoint;
use warren_net::wg::SecretKey;
use warren_proto::tunnel::{AccessConfig, DeviceAccess};

/// The file in the state directory that holds the agent's WireGuard secret (hex, 0600).
pub const KEY_FILE: &str = "wireguard.key";

/// Loads the agent's WireGuard key from `dir`, or makes one and keeps it there (0600) on
/// the first start: the nodes hand its public key to every device, so it must survive
/// restarts.
pub fn load_or_create_key(dir: &Path) -> anyhow::Result<SecretKey> {
    let path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_key(text.trim())
            .with_context(|| format!("{} is not a WireGuard key (64 hex digits)", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate();
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let tmp = dir.join(format!(".{KEY_FILE}.tmp"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            let hex: String = key.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
            writeln!(f, "{hex}")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(public_key = %key.public_key(), "made a WireGuard key for client access");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn parse_key(hex: &str) -> Option<SecretKey> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut b = [0u8; 32];
    for (i, out) in b.iter_mut().enumerate() {
        *out = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(SecretKey::from_bytes(b))
}

/// A tunnel task's id, unique for the agent's life (a reconnect is a new tunnel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TunnelId(pub u64);

/// What a tunnel task tells the access task.
#[derive(Debug)]
pub enum AccessMsg {
    /// The node sent an access configuration.
    Access(TunnelId, AccessConfig, Instant),
    /// The node is still serving.
    Heartbeat(TunnelId, u64, Instant),
    /// The node named the cluster's relay-only nodes.
    Relays(TunnelId, Vec<String>),
    /// The tunnel ended (sent also if its task is aborted: see [`ClosedOnDrop`]).
    Closed(TunnelId),
}

/// What the endpoint is to be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// Devices, relays, validity: all of it.
    Access {
        /// Devices that may reach the site.
        devices: Vec<DeviceAccess>,
        /// Relays to bind to, each with its ticket.
        relays: Vec<(SocketAddr, Vec<u8>)>,
        /// Until when new flows may be admitted.
        valid_until: Instant,
    },
    /// Only the validity moved.
    Heartbeat(Instant),
}

/// The access as the nodes say it, per tunnel; sans-IO.
#[derive(Debug, Default)]
pub struct AccessState {
    tunnels: HashMap<TunnelId, (u64, AccessConfig)>,
    /// The relay-only nodes each tunnel's node named (bound with that node's ticket).
    relay_only: HashMap<TunnelId, Vec<String>>,
    arrivals: u64,
    /// The devices in force when no connected tunnel has sent any.
    last_devices: Vec<DeviceAccess>,
    valid_until: Option<Instant>,
}

impl AccessState {
    /// Nothing heard yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// One message; what to tell the endpoint.
    pub fn handle(&mut self, msg: AccessMsg) -> Option<Update> {
        match msg {
            AccessMsg::Access(tunnel, config, now) => {
                self.valid_until = Some(now + Duration::from_millis(config.valid_for_ms));
                self.arrivals += 1;
                self.tunnels.insert(tunnel, (self.arrivals, config));
                Some(self.update())
            }
            AccessMsg::Heartbeat(tunnel, valid_for_ms, now) => {
                // Only a node that has told us the access vouches for it still holding.
                if !self.tunnels.contains_key(&tunnel) {
                    return None;
                }
                let v = now + Duration::from_millis(valid_for_ms);
                self.valid_until = Some(v);
                Some(Update::Heartbeat(v))
            }
            AccessMsg::Relays(tunnel, relays) => {
                if self.relay_only.get(&tunnel) == Some(&relays) {
                    return None;
                }
                self.relay_only.insert(tunnel, relays);
                self.tunnels.contains_key(&tunnel).then(|| self.update())
            }
            AccessMsg::Closed(tunnel) => {
                self.relay_only.remove(&tunnel);
                self.tunnels.remove(&tunnel)?;
                Some(self.update())
            }
        }
    }

    fn update(&mut self) -> Update {
        if let Some((_, latest)) = self.tunnels.values().max_by_key(|(seq, _)| *seq) {
            self.last_devices = latest.devices.clone();
        }
        let mut relays: Vec<(u64, SocketAddr, Vec<u8>)> = Vec::new();
        for (tunnel, (seq, c)) in &self.tunnels {
            // The node's own relay, then the relay-only nodes it named, with its ticket
            // (a ticket is good on any relay of the cluster).
            let named = self.relay_only.get(tunnel).into_iter().flatten();
            for relay in std::iter::once(&c.relay).chain(named) {
                let Ok(addr) = relay.parse::<SocketAddr>() else {
                    tracing::warn!(%relay, "a node sent a relay address that is not ip:port; not binding to it");
                    continue;
                };
                match relays.iter_mut().find(|(_, a, _)| *a == addr) {
                    Some(r) if r.0 < *seq => *r = (*seq, addr, c.relay_ticket.clone()),
                    Some(_) => {}
                    None => relays.push((*seq, addr, c.relay_ticket.clone())),
                }
            }
        }
        relays.sort_by_key(|(_, a, _)| *a);
        Update::Access {
            devices: self.last_devices.clone(),
            relays: relays.into_iter().map(|(_, a, t)| (a, t)).collect(),
            valid_until: self.valid_until.unwrap_or_else(Instant::now),
        }
    }
}

/// Sends [`AccessMsg::Closed`] when dropped: when the tunnel task ends, panics or is
/// aborted.
pub struct ClosedOnDrop {
    tx: mpsc::UnboundedSender<AccessMsg>,
    tunnel: TunnelId,
}

impl ClosedOnDrop {
    /// For `tunnel`.
    pub fn new(tx: mpsc::UnboundedSender<AccessMsg>, tunnel: TunnelId) -> Self {
        Self { tx, tunnel }
    }
}

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        let _ = self.tx.send(AccessMsg::Closed(self.tunnel));
    }
}

/// The access task: folds the tunnels' messages and applies them to the endpoint.
pub async fn run(endpoint: AgentEndpoint, mut rx: mpsc::UnboundedReceiver<AccessMsg>) {
    let mut state = AccessState::new();
    while let Some(msg) = rx.recv().await {
        let applied = match state.handle(msg) {
            None => Ok(()),
            Some(Update::Heartbeat(v)) => endpoint.heartbeat(v),
            Some(Update::Access {
                devices,
                relays,
                valid_until,
            }) => {
                tracing::debug!(
                    devices = devices.len(),
                    relays = relays.len(),
                    "client access updated"
                );
                endpoint.set_access(devices, relays, valid_until).await
            }
        };
        if let Err(e) = applied {
            tracing::error!("the WireGuard endpoint stopped: {e}; client access is off");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use warren_proto::Name;

    use super::*;

    fn device(name: &str) -> DeviceAccess {
        DeviceAccess {
            device: Name::new(name).unwrap(),
            user: Name::new("alice").unwrap(),
            key: [name.len() as u8; 32],
            address: std::net::Ipv4Addr::new(100, 64, 0, name.len() as u8),
            grants: vec![],
        }
    }

    fn config(relay: &str, ticket: &[u8], devices: &[&str], valid_for_ms: u64) -> AccessConfig {
        AccessConfig {
            generation: 1,
            valid_for_ms,
            relay_ticket: ticket.to_vec(),
            relay: relay.into(),
            devices: devices.iter().map(|d| device(d)).collect(),
        }
    }

    type Relays = Vec<(SocketAddr, Vec<u8>)>;

    fn access(u: Option<Update>) -> (Vec<String>, Relays, Instant) {
        match u {
            Some(Update::Access {
                devices,
                relays,
                valid_until,
            }) => (
                devices.iter().map(|d| d.device.to_string()).collect(),
                relays,
                valid_until,
            ),
            other => panic!("expected an access update, got {other:?}"),
        }
    }

    const R1: &str = "192.0.2.1:7401";
    const R2: &str = "192.0.2.2:7401";

    #[test]
    fn relays_are_the_union_of_the_connected_tunnels_and_devices_the_latest() {
        let now = Instant::now();
        let mut s = AccessState::new();
        let (devices, relays, valid) = access(s.handle(AccessMsg::Access(
            TunnelId(1),
            config(R1, b"t1", &["a"], 5000),
            now,
        )));
        assert_eq!(devices, ["a"]);
        assert_eq!(relays, vec![(R1.parse().unwrap(), b"t1".to_vec())]);
        assert_eq!(valid, now + Duration::from_secs(5));

        let later = now + Duration::from_secs(1);
        let (devices, relays, valid) = access(s.handle(AccessMsg::Access(
            TunnelId(2),
            config(R2, b"t2", &["a", "bb"], 3000),
            later,
        )));
        assert_eq!(devices, ["a", "bb"], "the latest by arrival");
        assert_eq!(relays.len(), 2);
        assert_eq!(
            valid,
            later + Duration::from_secs(3),
            "the latest message's"
        );

        // Tunnel 1 sends again (an older view): now it is the latest.
        let (devices, _, _) = access(s.handle(AccessMsg::Access(
            TunnelId(1),
            config(R1, b"t1b", &["a"], 3000),
            later,
        )));
        assert_eq!(devices, ["a"]);

        // Tunnel 1 closes: its relay goes, tunnel 2's devices are in force.
        let (devices, relays, _) = access(s.handle(AccessMsg::Closed(TunnelId(1))));
        assert_eq!(devices, ["a", "bb"]);
        assert_eq!(relays, vec![(R2.parse().unwrap(), b"t2".to_vec())]);

        // The last one closes: no relay, the devices stay (validity fails closed).
        let (devices, relays, valid) = access(s.handle(AccessMsg::Closed(TunnelId(2))));
        assert_eq!(devices, ["a", "bb"]);
        assert!(relays.is_empty());
        assert_eq!(valid, later + Duration::from_secs(3));
        // A closed tunnel's close again, or one that never sent access: nothing to do.
        assert_eq!(s.handle(AccessMsg::Closed(TunnelId(2))), None);
    }

    #[test]
    fn relay_only_nodes_are_bound_with_the_naming_nodes_ticket_and_go_when_unnamed() {
        const FAR: &str = "198.51.100.9:7401";
        let now = Instant::now();
        let mut s = AccessState::new();
        // Named before any access: nothing to bind with yet.
        assert_eq!(
            s.handle(AccessMsg::Relays(TunnelId(1), vec![FAR.into()])),
            None
        );
        let (_, relays, _) = access(s.handle(AccessMsg::Access(
            TunnelId(1),
            config(R1, b"t1", &["a"], 5000),
            now,
        )));
        assert_eq!(
            relays,
            vec![
                (R1.parse().unwrap(), b"t1".to_vec()),
                (FAR.parse().unwrap(), b"t1".to_vec())
            ]
        );
        // The same list again changes nothing; revoked (unnamed), it is no longer bound.
        assert_eq!(
            s.handle(AccessMsg::Relays(TunnelId(1), vec![FAR.into()])),
            None
        );
        let (_, relays, _) = access(s.handle(AccessMsg::Relays(TunnelId(1), vec![])));
        assert_eq!(relays, vec![(R1.parse().unwrap(), b"t1".to_vec())]);
    }

    #[test]
    fn heartbeats_extend_validity_only_from_tunnels_that_sent_access() {
        let now = Instant::now();
        let mut s = AccessState::new();
        assert_eq!(s.handle(AccessMsg::Heartbeat(TunnelId(1), 5000, now)), None);
        s.handle(AccessMsg::Access(
            TunnelId(1),
            config(R1, b"t", &["a"], 1000),
            now,
        ));
        let later = now + Duration::from_secs(2);
        assert_eq!(
            s.handle(AccessMsg::Heartbeat(TunnelId(1), 1000, later)),
            Some(Update::Heartbeat(later + Duration::from_secs(1)))
        );
        assert_eq!(
            s.handle(AccessMsg::Heartbeat(TunnelId(9), 1000, later)),
            None
        );
    }

    #[test]
    fn a_relay_that_is_not_an_address_is_skipped() {
        let now = Instant::now();
        let mut s = AccessState::new();
        let (devices, relays, _) = access(s.handle(AccessMsg::Access(
            TunnelId(1),
            config("relay.example", b"t", &["a"], 1),
            now,
        )));
        assert_eq!(devices, ["a"]);
        assert!(relays.is_empty());
    }

    #[test]
    fn the_key_is_made_once_kept_0600_and_reused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let k1 = load_or_create_key(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let k2 = load_or_create_key(dir.path()).unwrap();
        assert_eq!(k1.public_key(), k2.public_key());
        std::fs::write(dir.path().join(KEY_FILE), "not a key").unwrap();
        let err = load_or_create_key(dir.path()).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a WireGuard key"),
            "{err:#}"
        );
    }
}
