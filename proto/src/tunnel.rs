//! The agent tunnel protocol: what a `warren-agent` and a node say to each other over QUIC.
//!
//! ```text
//! agent                                    node
//!   │ QUIC, ALPN warren-enroll/1, no client certificate
//!   │ Enroll{token, CSR} ─────────────────► token valid and unused? consume it (Raft),
//!   │ ◄──────── Enrolled{site, cert, CA}     sign the CSR for the site
//!   │
//!   │ QUIC, ALPN warren-agent/1, site certificate
//!   │ control stream (agent opens): Hello ─►
//!   │ ◄──────────────── Config (on connect and whenever the site's targets change)
//!   │ Health ────────────────────────────►  (every check round)
//!   │ ◄───── data stream (node opens): Open{target} ; agent dials ; Opened/Refused ; bytes
//! ```
//!
//! Every message is a 4-byte big-endian length and a bincode body, capped per direction.

use serde::{Deserialize, Serialize};

use crate::registry::{HealthCheck, Target};
use crate::Name;

/// ALPN of agent tunnels.
pub const ALPN_AGENT: &[u8] = b"warren-agent/1";
/// ALPN of agent enrollment.
pub const ALPN_ENROLL: &[u8] = b"warren-enroll/1";
/// ALPN of node-to-node relayed data streams (to the node holding a site's tunnel).
pub const ALPN_RELAY: &[u8] = b"warren-relay/1";

/// Largest control message accepted, in bytes.
pub const MAX_CONTROL: usize = 1 << 20;
/// Largest stream header accepted, in bytes.
pub const MAX_HEADER: usize = 4096;

/// The DNS name a site certificate carries: `<site>.site.warren.invalid`.
pub fn site_cert_name(site: &Name) -> String {
    format!("{site}.site.warren.invalid")
}

/// The site a certificate name belongs to, if it is a site certificate name.
pub fn site_of_cert_name(name: &str) -> Option<Name> {
    Name::new(name.strip_suffix(".site.warren.invalid")?).ok()
}

/// Agent to node, on an enrollment connection.
#[derive(Serialize, Deserialize)]
pub struct Enroll {
    /// The site token (`wst1_…`).
    pub token: String,
    /// CSR for the agent's key (PEM).
    pub csr_pem: String,
}

impl std::fmt::Debug for Enroll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Enroll(<token redacted>)")
    }
}

/// Node to agent: the answer to [`Enroll`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Enrolled {
    /// Enrolled.
    Ok {
        /// The site.
        site: Name,
        /// The cluster id.
        cluster_id: u128,
        /// The site certificate (PEM).
        cert_pem: String,
        /// The cluster CA certificate (PEM).
        ca_pem: String,
    },
    /// Refused, and why.
    Refused(String),
}

/// Agent to node, first on the control stream.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    /// Agent version.
    pub version: String,
}

/// What a site's agent needs to know, pushed on connect and on every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteConfig {
    /// The site.
    pub site: Name,
    /// Every target of the site's resources, with the resource's health check.
    pub targets: Vec<TargetSpec>,
    /// Cluster addresses of the nodes (QUIC), to keep tunnels to the closest two.
    pub nodes: Vec<String>,
}

/// A target the agent checks and may be asked to dial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetSpec {
    /// The address.
    pub target: Target,
    /// Its check (HTTP path or TCP connect when `path` is none); none: not checked.
    pub check: Option<HealthCheck>,
}

/// Node to agent, on the control stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToAgent {
    /// The site's configuration.
    Config(SiteConfig),
}

/// Agent to node, on the control stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromAgent {
    /// Health of the checked targets (true: passing).
    Health(Vec<(Target, bool)>),
}

/// Which transport a data stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    /// A TCP connection's bytes.
    Tcp,
    /// UDP datagrams, each framed with a 2-byte big-endian length.
    Udp,
}

/// Node to agent (or node to node), first on a data stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Open {
    /// The site (checked against the tunnel's certificate by the agent, and used by a
    /// relaying node to pick the tunnel).
    pub site: Name,
    /// Where to connect.
    pub target: Target,
    /// How.
    pub protocol: Protocol,
}

/// The answer to [`Open`], before any data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Opened {
    /// Connected: bytes follow both ways.
    Ok,
    /// Not connected, and why (shown to operators, not to end users).
    Refused(String),
}

/// Frames a message: 4-byte big-endian length, then bincode.
pub fn encode_frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = bincode::serde::encode_to_vec(msg, bincode::config::standard())
        .expect("protocol messages encode");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes a frame body (after its length), refusing trailing bytes.
pub fn decode_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let (v, used) = bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map_err(|e| format!("malformed message: {e}"))?;
    if used != body.len() {
        return Err("malformed message: trailing bytes".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let open = Open {
            site: Name::new("hq").unwrap(),
            target: "10.0.0.5:5432".parse().unwrap(),
            protocol: Protocol::Tcp,
        };
        let frame = encode_frame(&open);
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        let back: Open = decode_body(&frame[4..]).unwrap();
        assert_eq!(back.target.port, 5432);
        assert!(decode_body::<Open>(&[0xff, 0xff, 0xff]).is_err());
        let mut trailing = frame[4..].to_vec();
        trailing.push(0);
        assert!(decode_body::<Open>(&trailing).is_err());
        // A target that does not parse is refused by the Target type itself.
        assert!(decode_body::<Open>(&encode_frame(&("hq", "no port", 0u32))[4..]).is_err());
    }

    #[test]
    fn site_names_round_trip_through_certificate_names() {
        let hq = Name::new("hq").unwrap();
        assert_eq!(site_of_cert_name(&site_cert_name(&hq)), Some(hq));
        assert_eq!(site_of_cert_name("hq.example.com"), None);
    }
}

/// Reading and writing frames on async streams (feature `io`).
#[cfg(feature = "io")]
pub mod io {
    use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

    use super::{decode_body, encode_frame};

    /// Writes one frame.
    pub async fn write_frame<W: AsyncWrite + Unpin, T: serde::Serialize>(
        w: &mut W,
        msg: &T,
    ) -> std::io::Result<()> {
        w.write_all(&encode_frame(msg)).await
    }

    /// Writes one UDP datagram on a stream: 2-byte big-endian length, then the bytes.
    pub async fn write_datagram<W: AsyncWrite + Unpin>(
        w: &mut W,
        data: &[u8],
    ) -> std::io::Result<()> {
        let len = u16::try_from(data.len()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "datagram over 65535 bytes",
            )
        })?;
        let mut frame = Vec::with_capacity(2 + data.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(data);
        w.write_all(&frame).await
    }

    /// Reads one UDP datagram from a stream into `buf` (at least 65535 bytes); its length,
    /// or `None` at the end of the stream.
    pub async fn read_datagram<R: AsyncRead + Unpin>(
        r: &mut R,
        buf: &mut [u8],
    ) -> std::io::Result<Option<usize>> {
        let mut len = [0u8; 2];
        match r.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u16::from_be_bytes(len) as usize;
        r.read_exact(&mut buf[..len]).await?;
        Ok(Some(len))
    }

    /// Reads one frame of at most `max` bytes; `Ok(None)` at a clean end of stream.
    pub async fn read_frame<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
        r: &mut R,
        max: usize,
    ) -> Result<Option<T>, String> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.to_string()),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > max {
            return Err(format!(
                "a message of {len} bytes is over the {max}-byte limit"
            ));
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)
            .await
            .map_err(|e| format!("truncated message: {e}"))?;
        decode_body(&body).map(Some)
    }
}

/// Node to node, on a unidirectional relay stream: the sites the sender holds tunnels to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Held {
    /// The sender's node id.
    pub node: u64,
    /// Sites it holds a tunnel to.
    pub sites: Vec<Name>,
}
