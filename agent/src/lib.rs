//! `warren-agent`: the connector that runs inside a private network (a "site") and dials out
//! to the cluster, so the site's targets become reachable without opening a port.
//!
//! - First start: the binary trades `--token` (from `warren admin site-token <site>`) for a
//!   site certificate over QUIC (ALPN `warren-enroll/1`, [`enroll()`]), trusting only the
//!   cluster CA the token pins. The certificate, key and CA are kept in `--state-dir`;
//!   later starts reuse them ([`Identity::load`]).
//! - Then [`run`] keeps tunnels (QUIC, ALPN `warren-agent/1`, mutual TLS) to the two nodes
//!   with the shortest handshake time, learning the cluster's nodes from the ones it
//!   reaches; lost tunnels are re-dialled with jittered backoff, forever, without spinning,
//!   and a tunnel moves when another node is clearly closer. Which node, when and which
//!   tunnel to move is decided by the sans-IO [`warren_proto::tunnels::TunnelSet`]; one
//!   driver task owns it and does the I/O (see `tunnel.rs`).
//! - Each tunnel's control stream opens with a `Hello` each way (protocol version and
//!   features, `warren_proto::tunnel`); the agent sends the node only messages it
//!   understands and skips, counts and logs (once) messages it does not know itself. A node
//!   from before negotiation refuses the `Hello`; the agent then greets it the old way.
//! - The node pushes the site's targets; the agent checks them and reports their health;
//!   for every stream a node opens it dials the target (only a configured one) and splices
//!   (TCP bytes, or UDP datagrams framed on the stream and read cancel-safely).
//! - Client access (`warren connect`, `warren ssh`): with [`AgentConfig::wireguard`] set,
//!   the agent runs a WireGuard endpoint (`warren_net::endpoint`) on its own UDP socket,
//!   with a key kept in the state directory ([`access::KEY_FILE`]). After a node's Hello
//!   lists the `access` feature, the agent announces its public key to it; what the nodes
//!   then send (devices and grants, their relays, heartbeats) is folded into one access
//!   for the endpoint ([`access`]), which admits each new flow against it and cuts the
//!   flows it no longer allows. Nodes that send none leave the agent as it was.
//! - When the shutdown future [`run`] was given completes, every tunnel is closed with a
//!   reason the node sees (`agent shutting down`) and `run` returns.
//!
//! ```text
//!   main.rs: flags ─► AgentConfig::validate ─► Identity::load, or enroll ─► run(identity,
//!                                                                          config, ctrl-c/SIGTERM)
//! ```

pub mod access;
mod enroll;
mod tls;
mod tunnel;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;

use warren_proto::tunnels::is_node_address;

pub use enroll::{enroll, Identity};

/// What the agent needs besides its identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentConfig {
    /// The nodes to dial first: `host:port` of their cluster (QUIC) address. The rest of
    /// the cluster is learned from them; these are never forgotten.
    pub nodes: Vec<String>,
    /// Client access over WireGuard; `None`: off (the agent serves web and L4 resources
    /// through its tunnels only).
    pub wireguard: Option<WireGuardConfig>,
}

/// Where the agent's WireGuard endpoint listens and keeps its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireGuardConfig {
    /// The UDP address to listen on (`0.0.0.0:0` by default: any port; the agent binds to
    /// the relays from it, so no inbound port needs opening).
    pub listen: SocketAddr,
    /// The state directory: the key is kept in [`access::KEY_FILE`] there (0600).
    pub state_dir: PathBuf,
}

/// A configuration [`AgentConfig::validate`] refuses; each names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// `nodes` is empty: the agent would know no node to dial.
    NoNodes,
    /// `nodes[index]` is not `host:port` (with a port from 1 to 65535).
    BadNode {
        /// Its position in `nodes`.
        index: usize,
        /// What was given.
        value: String,
    },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoNodes => f.write_str("nodes: at least one node (host:port) is needed"),
            Self::BadNode { index, value } => {
                write!(
                    f,
                    "nodes[{index}]: {value:?} is not a node address (host:port)"
                )
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl AgentConfig {
    /// The configuration if every field is usable, else the first field that is not.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.nodes.is_empty() {
            return Err(ConfigError::NoNodes);
        }
        if let Some((index, value)) = self
            .nodes
            .iter()
            .enumerate()
            .find(|(_, n)| !is_node_address(n))
        {
            return Err(ConfigError::BadNode {
                index,
                value: value.clone(),
            });
        }
        Ok(self)
    }
}

/// Keeps tunnels to the cluster as `identity`, starting from `config`'s nodes, until
/// `shutdown` completes; then closes every tunnel (a QUIC close with a reason) and returns
/// `Ok`. Errors only if it cannot start (a bad configuration, an unusable certificate, no
/// UDP socket).
pub async fn run(
    identity: Identity,
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let config = config.validate()?;
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let access = match &config.wireguard {
        None => None,
        Some(wg) => Some(start_access(wg).await?),
    };
    tunnel::run(&identity, config.nodes, access, shutdown).await
}

/// Binds the WireGuard socket, loads (or makes) the key, starts the endpoint.
async fn start_access(wg: &WireGuardConfig) -> anyhow::Result<tunnel::AccessHook> {
    let key = access::load_or_create_key(&wg.state_dir)?;
    let socket = tokio::net::UdpSocket::bind(wg.listen)
        .await
        .with_context(|| format!("--wireguard-listen {}: cannot bind", wg.listen))?;
    let public_key = key.public_key();
    let endpoint = warren_net::endpoint::Endpoint::agent(
        socket,
        key,
        warren_net::endpoint::EndpointConfig::default(),
    )?;
    tracing::info!(listen = %endpoint.local_addr(), "WireGuard endpoint for client access");
    tokio::spawn(report_drops(endpoint.clone()));
    Ok(tunnel::AccessHook::new(endpoint, public_key.0))
}

/// How often the agent says what its WireGuard endpoint dropped, when it dropped anything.
const DROP_REPORT: std::time::Duration = std::time::Duration::from_secs(10);

/// Logs, at most every [`DROP_REPORT`], the datagrams the endpoint dropped since the last
/// report, by reason: garbage, replays and unknown keys arriving at the agent's port are
/// refused silently on the wire, and said here. Ends with the endpoint.
async fn report_drops(endpoint: warren_net::endpoint::AgentEndpoint) {
    let mut last: Vec<(&'static str, u64)> = warren_net::wg::DropStats::default()
        .by_reason()
        .into_iter()
        .chain(warren_net::endpoint::ShellDrops::default().by_reason())
        .collect();
    let mut tick = tokio::time::interval(DROP_REPORT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(status) = endpoint.status().await else {
            return;
        };
        let now: Vec<(&'static str, u64)> = status
            .drops
            .by_reason()
            .into_iter()
            .chain(status.other_drops.by_reason())
            .collect();
        let delta: Vec<String> = now
            .iter()
            .zip(&last)
            .filter(|((_, n), (_, l))| n > l)
            .map(|((k, n), (_, l))| format!("{k} {}", n - l))
            .collect();
        if !delta.is_empty() {
            tracing::warn!(
                "WireGuard endpoint dropped datagrams in the last {}s: {}",
                DROP_REPORT.as_secs(),
                delta.join(", ")
            );
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(nodes: &[&str]) -> AgentConfig {
        AgentConfig {
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            wireguard: None,
        }
    }

    #[test]
    fn a_config_needs_nodes_that_are_host_and_port() {
        assert_eq!(AgentConfig::default().validate(), Err(ConfigError::NoNodes));
        let good = config(&["127.0.0.1:7000", "node-2.example.com:7000", "[::1]:7000"]);
        assert_eq!(good.clone().validate(), Ok(good));
        let err = config(&["127.0.0.1:7000", "node-2"])
            .validate()
            .unwrap_err();
        assert_eq!(
            err,
            ConfigError::BadNode {
                index: 1,
                value: "node-2".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "nodes[1]: \"node-2\" is not a node address (host:port)"
        );
    }
}
