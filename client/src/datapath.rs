//! The one place the commands meet `warren_net`'s client endpoint: one UDP socket, this
//! device's WireGuard key and tunnel address, a peer per site (the agent's key, relays and
//! relay ticket), and TCP/UDP flows through the userspace stack.
//!
//! ```text
//! connect / nc ──connect_tcp / open_udp──► DataPath ──► warren_net endpoint ──UDP──► relay
//!                 status() ◄── per site: relay in use, handshake age, bytes, flows
//! ```
//!
//! Everything here is a thin translation, so the commands do not change when the endpoint's
//! shape does. The device key stays a `boringtun` secret in the client and is handed to the
//! endpoint as bytes.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use boringtun::x25519::StaticSecret;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use warren_net::endpoint::{self, ClientEndpoint, Endpoint, EndpointConfig};
use warren_net::wg::{PeerKey, SecretKey};

use crate::node::Connect;

/// A TCP flow through the tunnel (`AsyncRead + AsyncWrite`).
pub use warren_net::stack::TcpFlow;
/// A UDP flow through the tunnel (`send` / `recv` of whole datagrams).
pub use warren_net::stack::UdpFlow;

/// A site to reach: its agent and how (relays, ticket).
#[derive(Clone, PartialEq, Eq)]
pub struct SitePeer {
    /// The site's name.
    pub site: String,
    /// The agent's WireGuard public key.
    pub agent_key: [u8; 32],
    /// Relay addresses to send WireGuard packets through, in the node's order.
    pub relays: Vec<SocketAddr>,
    /// The signed relay ticket.
    pub ticket: Vec<u8>,
}

impl std::fmt::Debug for SitePeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SitePeer")
            .field("site", &self.site)
            .field("relays", &self.relays)
            .finish_non_exhaustive()
    }
}

impl SitePeer {
    /// The peer a connect answer describes; an error names the field the node got wrong.
    pub fn from_connect(c: &Connect) -> anyhow::Result<Self> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let agent_key = b64
            .decode(c.agent_key.trim())
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .context("the node's connect answer has an agent_key that is not 32 bytes of base64")?;
        let ticket = decode_ticket(c)?;
        if c.relays.is_empty() {
            anyhow::bail!(
                "the node offers no relay for {}: no node can reach its agent",
                c.site
            );
        }
        Ok(Self {
            site: c.site.clone(),
            agent_key,
            relays: c.relays.iter().map(|r| r.addr).collect(),
            ticket,
        })
    }
}

/// The relay ticket of a connect answer, decoded.
pub fn decode_ticket(c: &Connect) -> anyhow::Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(c.ticket.expose().trim())
        .ok()
        .filter(|t| !t.is_empty())
        .context("the node's connect answer has a ticket that is not base64")
}

/// What a site's path looks like now, for `warren status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteStatus {
    /// The site.
    pub site: String,
    /// The relay in use, if one is bound.
    pub relay: Option<SocketAddr>,
    /// The relay's round-trip time, microseconds, once a ping was answered.
    #[serde(default)]
    pub relay_rtt_us: Option<u64>,
    /// Seconds since the last WireGuard handshake with the agent, if there was one.
    pub handshake_age_s: Option<u64>,
    /// IP bytes sent to the site's agent.
    pub bytes_sent: u64,
    /// IP bytes received from it.
    pub bytes_received: u64,
    /// Flows open now.
    pub flows: usize,
    /// The agent's address when packets go straight to it (no relay).
    #[serde(default)]
    pub direct: Option<SocketAddr>,
    /// The direct path's round-trip time, microseconds.
    #[serde(default)]
    pub direct_rtt_us: Option<u64>,
    /// What the direct-path logic is doing: direct, probing, calling, relayed.
    #[serde(default)]
    pub direct_state: Option<String>,
    /// Seconds until the next attempt at a direct path, while relayed.
    #[serde(default)]
    pub next_attempt_s: Option<u64>,
    /// Times traffic went back to the relay after a direct path died.
    #[serde(default)]
    pub fallbacks: u64,
    /// Rounds of hole punching made.
    #[serde(default)]
    pub rounds: u64,
    /// Probes and offers ignored as forged or replayed.
    #[serde(default)]
    pub probes_ignored: u64,
    /// Our candidate addresses for a direct path.
    #[serde(default)]
    pub candidates: Vec<SocketAddr>,
    /// How our NAT maps (endpoint-independent, endpoint-dependent, none, unknown).
    #[serde(default)]
    pub mapping: Option<String>,
    /// Every relay pinged: its address and RTT (microseconds; `None` while it does not
    /// answer). The site's relay is the lowest, sticky.
    #[serde(default)]
    pub relay_rtts: Vec<(SocketAddr, Option<u64>)>,
}

impl From<&endpoint::SiteStatus> for SiteStatus {
    fn from(s: &endpoint::SiteStatus) -> Self {
        Self {
            site: s.site.clone(),
            relay: s.relay,
            relay_rtt_us: s
                .rtt
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            handshake_age_s: s.handshake_age.map(|d| d.as_secs()),
            bytes_sent: s.tx_bytes,
            bytes_received: s.rx_bytes,
            flows: s.open_flows,
            direct: s.direct.as_ref().and_then(|d| d.direct),
            direct_rtt_us: s
                .direct
                .as_ref()
                .and_then(|d| d.rtt)
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            direct_state: s.direct.as_ref().map(|d| d.state.to_owned()),
            next_attempt_s: s
                .direct
                .as_ref()
                .and_then(|d| d.next_round_in)
                .map(|d| d.as_secs()),
            fallbacks: s.direct.as_ref().map_or(0, |d| d.stats.fallbacks),
            rounds: s.direct.as_ref().map_or(0, |d| d.stats.rounds),
            probes_ignored: s
                .direct
                .as_ref()
                .map_or(0, |d| d.stats.forged + d.stats.replayed),
            candidates: Vec::new(),
            mapping: None,
            relay_rtts: Vec::new(),
        }
    }
}

/// A TCP flow not established after this starts a new handshake with the site's agent.
const SLOW_SYN: Duration = Duration::from_secs(1);

/// The client's data path: one endpoint shared by every flow of this process; cheap to
/// clone, stopped when the last clone is dropped.
#[derive(Clone)]
pub struct DataPath {
    endpoint: ClientEndpoint,
}

impl DataPath {
    /// Binds a UDP socket (IPv6 if a relay of `peer` needs it) and starts the endpoint on the
    /// current runtime with this device's key and address, then adds `peer`.
    pub async fn start(
        secret: &StaticSecret,
        device: Ipv4Addr,
        mtu: Option<u16>,
        peer: SitePeer,
    ) -> anyhow::Result<Self> {
        let any: SocketAddr = if peer.relays.iter().all(SocketAddr::is_ipv4) {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(any)
            .await
            .with_context(|| format!("cannot open a UDP socket on {any}"))?;
        let mut config = EndpointConfig::default();
        // The node says what fits the path; never more than the endpoint can carry.
        if let Some(m) = mtu {
            config.mtu = usize::from(m).min(config.mtu);
        }
        let endpoint = Endpoint::client(
            socket,
            SecretKey::from_bytes(secret.to_bytes()),
            device,
            config,
        )
        .context("cannot start the data path")?;
        let data = Self { endpoint };
        data.add_site(peer).await?;
        Ok(data)
    }

    /// Adds another site to the running endpoint.
    pub async fn add_site(&self, peer: SitePeer) -> anyhow::Result<()> {
        let site = peer.site.clone();
        self.endpoint
            .add_site(endpoint::SitePeer {
                site: peer.site,
                agent_key: PeerKey(peer.agent_key),
                relays: peer.relays,
                ticket: peer.ticket,
            })
            .await
            .with_context(|| format!("cannot add the site {site} to the data path"))
    }

    /// Replaces a site's relay ticket (before the old one expires).
    pub async fn update_ticket(
        &self,
        site: &str,
        relays: Vec<SocketAddr>,
        ticket: Vec<u8>,
    ) -> anyhow::Result<()> {
        self.endpoint
            .update_ticket(site, relays, ticket)
            .await
            .with_context(|| format!("renewing the relay ticket of {site}"))
    }

    /// Opens a TCP flow to `dst` inside `site` and waits until the agent has admitted it
    /// and the target answered (`ConnectionRefused` if not), or `timeout` passes
    /// (`TimedOut`).
    pub async fn connect_tcp(
        &self,
        site: &str,
        dst: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<TcpFlow> {
        let flow = self
            .endpoint
            .connect_tcp(site, dst)
            .await
            .map_err(std::io::Error::other)?;
        // Unanswered for a second: the agent may no longer have our WireGuard session (it
        // drops a device whose grants went away, and re-adds it without one). A handshake
        // now costs one round trip; waiting for boringtun to give up costs 15 s.
        let first = SLOW_SYN.min(timeout);
        let r = {
            let established = flow.established();
            tokio::pin!(established);
            match tokio::time::timeout(first, &mut established).await {
                Ok(r) => Some(r),
                Err(_) => {
                    let _ = self.endpoint.rekey(site).await;
                    tokio::time::timeout(timeout.saturating_sub(first), &mut established)
                        .await
                        .ok()
                }
            }
        };
        match r {
            Some(Ok(())) => Ok(flow),
            Some(Err(e)) => Err(e),
            None => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Opens a UDP flow to `dst` inside `site`.
    pub async fn open_udp(&self, site: &str, dst: SocketAddr) -> std::io::Result<UdpFlow> {
        self.endpoint
            .open_udp(site, dst)
            .await
            .map_err(std::io::Error::other)
    }

    /// Every site's path now (empty if the endpoint has stopped).
    pub async fn status(&self) -> Vec<SiteStatus> {
        match self.endpoint.status().await {
            Ok(s) => s
                .sites
                .iter()
                .map(|site| SiteStatus {
                    candidates: s.candidates.clone(),
                    mapping: Some(s.mapping.label().to_owned()),
                    relay_rtts: s
                        .relays
                        .iter()
                        .map(|r| {
                            let rtt = r
                                .rtt
                                .filter(|_| r.alive)
                                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
                            (r.relay, rtt)
                        })
                        .collect(),
                    ..SiteStatus::from(site)
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_connect_answer_becomes_a_peer() {
        let c: Connect = serde_json::from_value(json!({
            "site": "site-a", "agent_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
            "device_address": "100.64.0.1", "ticket": "dGlja2V0",
            "ticket_expires_at": 1u64,
            "relays": [{"node": "n1", "addr": "10.97.1.1:7401"}], "mtu": 1408
        }))
        .unwrap();
        let p = SitePeer::from_connect(&c).unwrap();
        assert_eq!(p.agent_key, [1; 32]);
        assert_eq!(p.ticket, b"ticket");
        assert_eq!(p.relays, vec!["10.97.1.1:7401".parse().unwrap()]);
        assert!(!format!("{p:?}").contains("ticket: "));

        let mut bad = c.clone();
        bad.agent_key = "AAAA".into();
        assert!(SitePeer::from_connect(&bad).is_err());
        let mut none = c;
        none.relays.clear();
        assert!(SitePeer::from_connect(&none).is_err());
    }
}
