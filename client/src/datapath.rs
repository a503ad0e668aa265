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
//! shape does.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use boringtun::x25519::StaticSecret;
use serde::{Deserialize, Serialize};

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteStatus {
    /// The site.
    pub site: String,
    /// The relay in use, if one answered.
    pub relay: Option<SocketAddr>,
    /// Seconds since the last WireGuard handshake with the agent, if there was one.
    pub handshake_age_s: Option<u64>,
    /// Payload bytes sent to the site.
    pub bytes_sent: u64,
    /// Payload bytes received from the site.
    pub bytes_received: u64,
    /// Flows open now.
    pub flows: usize,
}

/// The client's data path: one endpoint shared by every flow of this process.
#[derive(Clone)]
pub struct DataPath {
    inner: Arc<Inner>,
}

struct Inner {
    _device: Ipv4Addr,
}

impl DataPath {
    /// Binds a UDP socket and starts the endpoint with this device's key and address.
    pub async fn start(
        _secret: StaticSecret,
        device: Ipv4Addr,
        _mtu: Option<u16>,
    ) -> anyhow::Result<Self> {
        let _ = Inner { _device: device };
        anyhow::bail!(
            "this build of warren has no data path yet (warren_net::endpoint is not wired in)"
        )
    }

    /// Adds a site's agent as a peer.
    pub fn add_site(&self, _peer: SitePeer) -> anyhow::Result<()> {
        let _ = &self.inner;
        Ok(())
    }

    /// Replaces a site's relay ticket (before the old one expires).
    pub fn update_ticket(&self, _site: &str, _ticket: Vec<u8>) -> anyhow::Result<()> {
        Ok(())
    }

    /// Opens a TCP flow to `dst` inside `site`, waiting until it is established (or
    /// `timeout` passes).
    pub async fn connect_tcp(
        &self,
        _site: &str,
        _dst: SocketAddr,
        _timeout: Duration,
    ) -> std::io::Result<TcpFlow> {
        Err(std::io::Error::other("no data path"))
    }

    /// Opens a UDP flow to `dst` inside `site`.
    pub async fn open_udp(&self, _site: &str, _dst: SocketAddr) -> std::io::Result<UdpFlow> {
        Err(std::io::Error::other("no data path"))
    }

    /// Every site's path now.
    pub fn status(&self) -> Vec<SiteStatus> {
        Vec::new()
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
