//! The agent tunnel protocol: what a `warren-agent` and a node say to each other over QUIC.
//!
//! ```text
//! agent                                    node
//!   │ QUIC, ALPN warren-enroll/1, no client certificate
//!   │ Enroll{token, CSR} ─────────────────► token valid and unused? consume it (Raft),
//!   │ ◄──────── Enrolled{site, cert, CA}     sign the CSR for the site
//!   │
//!   │ QUIC, ALPN warren-agent/1, site certificate
//!   │ control stream (agent opens):
//!   │ FromAgent::Hello{version, features} ─►
//!   │ ◄──────── ToAgent::Hello{version, features}   (only to an agent that sent one)
//!   │ ◄──────── ToAgent::Config   (on connect and whenever the site's targets change)
//!   │ FromAgent::Health ─────────────────►  (every check round)
//!   │ ◄───── data stream (node opens): Open{target} ; agent dials ; Opened ; bytes
//! ```
//!
//! # Frames
//!
//! Every message is a frame: a 4-byte big-endian length, then the body, capped per stream
//! ([`MAX_CONTROL`], [`MAX_HEADER`]). A length over the cap is refused before anything is
//! allocated; errors are [`FrameError`]s.
//!
//! # Control-stream messages: append-only tags
//!
//! On the control stream ([`ToAgent`], [`FromAgent`]) a body is a varint tag (bincode's
//! standard varint of a `u32`) followed by the bincode payload of that tag. Tags are
//! append-only: a tag is never reused or given another payload. A reader that meets a tag it
//! does not know gets [`ToAgent::Unknown`] / [`FromAgent::Unknown`], skips the frame (its
//! length says how long it is), counts it ([`Unknowns`]) and carries on: an unknown message
//! is never fatal. For the tags that existed before tags were introduced (`Config`,
//! `Health`, tag 0) the bytes are the same as bincode's encoding of the old enums, so nodes
//! and agents built before this scheme still understand them, and the ALPN stays
//! `warren-agent/1`.
//!
//! A payload may grow at its end: readers ignore bytes after the fields they know (true of
//! every frame this module decodes). A new field an old reader may ignore is appended; a
//! change it must not ignore is a new tag.
//!
//! # Negotiation
//!
//! Each side's first control message is a [`Hello`] with its protocol version
//! ([`PROTOCOL_VERSION`]) and the optional features it understands ([`FEATURES`]); a node
//! answers an agent's Hello with its own before the first Config. Each side then sends a
//! message only if the peer understands it ([`PeerProtocol::accepts`]).
//!
//! Agents from before negotiation (protocol 0) open with a [`LegacyHello`] (a bare version
//! string): the node tells it apart from a tagged Hello ([`PeerProtocol::from_agent_hello`]),
//! sends it no Hello and only protocol-0 messages. A node from before negotiation refuses a
//! tagged Hello (it closes the connection with [`CLOSE_BAD_HELLO`]); an agent that sees
//! that greets that node with a [`LegacyHello`] on its next dial.
//!
//! # Data streams
//!
//! A data stream's header ([`Open`], answered by [`Opened`]) stays a plain bincode struct:
//! node-to-node relay streams (`warren-relay/1`) carry it too and have no Hello, so its bytes
//! must stay readable by every node of a cluster in a rolling upgrade. It evolves by
//! appending fields, which readers of protocol 1 and later ignore when they do not know
//! them (builds from before refuse trailing bytes: send an appended field to an agent only
//! once its Hello says protocol 1 or later, and to a peer node only once the cluster no
//! longer runs such builds); an [`Opened`] variant an old node would not know is sent only
//! to a node whose Hello lists the feature it needs.
//! After `Opened::Ok` a TCP stream carries raw bytes; a UDP stream carries datagrams, each a
//! 2-byte big-endian length and the bytes, read with the cancel-safe
//! `io::DatagramReader` (feature `io`).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::registry::{HealthCheck, Target};
use crate::Name;

/// ALPN of agent tunnels.
pub const ALPN_AGENT: &[u8] = b"warren-agent/1";
/// ALPN of agent enrollment.
pub const ALPN_ENROLL: &[u8] = b"warren-enroll/1";
/// ALPN of node-to-node relayed data streams (to the node holding a site's tunnel).
pub const ALPN_RELAY: &[u8] = b"warren-relay/1";

/// The control-stream protocol version this build speaks (0: agents and nodes from before
/// [`Hello`] negotiation).
pub const PROTOCOL_VERSION: u32 = 1;
/// The optional features this build understands, announced in its [`Hello`]. Every message
/// of protocol 1 is understood by every protocol-1 peer, so none yet.
pub const FEATURES: &[&str] = &[FEATURE_ACCESS];

/// The feature of client access: [`ToAgent::Access`], [`ToAgent::Heartbeat`] and
/// [`FromAgent::WireGuard`].
pub const FEATURE_ACCESS: &str = "access";

/// The QUIC application close code of a node that could not read an agent's first
/// message (nodes from before negotiation use it for a tagged [`Hello`]).
pub const CLOSE_BAD_HELLO: u32 = 3;

/// Largest control message accepted, in bytes.
pub const MAX_CONTROL: usize = 1 << 20;
/// Largest stream header accepted, in bytes.
pub const MAX_HEADER: usize = 4096;
/// Largest UDP datagram a data stream carries, in bytes.
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// The DNS name a site certificate carries: `<site>.site.warren.invalid`.
pub fn site_cert_name(site: &Name) -> String {
    format!("{site}.site.warren.invalid")
}

/// The site a certificate name belongs to, if it is a site certificate name.
pub fn site_of_cert_name(name: &str) -> Option<Name> {
    Name::new(name.strip_suffix(".site.warren.invalid")?).ok()
}

/// Why a frame could not be read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame over the stream's limit (the peer is at fault); nothing
    /// was read or allocated for it.
    #[error("a frame of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// The announced length, in bytes.
        len: usize,
        /// The limit, in bytes.
        max: usize,
    },
    /// The stream ended inside a frame (the peer, or the path, cut it short).
    #[error("the stream ended inside a frame")]
    Truncated,
    /// The frame's bytes are not the message expected (the peer is at fault).
    #[error("malformed frame: {0}")]
    Malformed(#[source] bincode::error::DecodeError),
    /// Reading the stream failed (the connection or the peer went away).
    #[error("reading the stream failed: {0}")]
    Io(#[from] std::io::Error),
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

/// The first control message each way: what the sender speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's protocol version ([`PROTOCOL_VERSION`]).
    pub version: u32,
    /// The optional features the sender understands ([`FEATURES`]).
    pub features: Vec<String>,
    /// The sender's software version (for operators' logs only).
    pub software: String,
}

impl Hello {
    /// This build's Hello.
    pub fn ours() -> Self {
        Self {
            version: PROTOCOL_VERSION,
            features: FEATURES.iter().map(|f| (*f).to_owned()).collect(),
            software: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// The first control message of agents from before negotiation (protocol 0): an untagged
/// bincode struct.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyHello {
    /// The agent's software version.
    pub version: String,
}

/// What the peer on a control stream speaks, from its [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerProtocol {
    /// Its protocol version (0: from before negotiation).
    pub version: u32,
    /// The optional features it understands.
    pub features: Vec<String>,
    /// Its software version, as it says.
    pub software: String,
}

impl PeerProtocol {
    /// A peer from before negotiation: protocol 0, no features.
    pub fn legacy(software: String) -> Self {
        Self {
            version: 0,
            features: Vec::new(),
            software,
        }
    }

    /// A peer that sent `hello`.
    pub fn from_hello(hello: Hello) -> Self {
        Self {
            version: hello.version,
            features: hello.features,
            software: hello.software,
        }
    }

    /// What an agent speaks, from the body of the first frame on its control stream: a
    /// [`FromAgent::Hello`], or else a [`LegacyHello`].
    pub fn from_agent_hello(body: &[u8]) -> Result<Self, FrameError> {
        if let Ok(FromAgent::Hello(hello)) = decode_message::<FromAgent>(body) {
            return Ok(Self::from_hello(hello));
        }
        let legacy: LegacyHello = decode_body(body)?;
        Ok(Self::legacy(legacy.version))
    }

    /// Whether the peer said it understands `feature`.
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }

    /// Whether the peer understands `msg`: a protocol-0 peer only the messages of protocol 0
    /// (anything else ends its tunnel); a later one every message whose feature it listed.
    pub fn accepts<M: Message>(&self, msg: &M) -> bool {
        if self.version == 0 && !msg.in_protocol_0() {
            return false;
        }
        msg.feature().is_none_or(|f| self.has(f))
    }
}

/// Counts the unknown messages a control stream skipped.
#[derive(Debug, Default)]
pub struct Unknowns {
    count: u64,
}

impl Unknowns {
    /// Counts one; true for the first (log that one loudly, later ones quietly).
    pub fn note(&mut self) -> bool {
        self.count += 1;
        self.count == 1
    }

    /// How many were skipped.
    pub fn count(&self) -> u64 {
        self.count
    }
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

/// The agent's WireGuard endpoint, announced to the node on its control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentWireGuard {
    /// Its static X25519 public key (kept in the agent's state directory across restarts).
    pub public_key: [u8; 32],
}

/// Who may reach what behind the site: pushed by every node that holds a tunnel of the
/// site. The agent admits a new flow only if a grant of the flow's device allows it, and
/// cuts an open flow as soon as a new `AccessConfig` no longer allows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessConfig {
    /// Grows with every change the node sends (a restarted node starts again from 1).
    pub generation: u64,
    /// How long the agent may admit flows on this without hearing from a node again
    /// (the cluster's leader-loss bound), in milliseconds.
    pub valid_for_ms: u64,
    /// The signed relay ticket the agent binds to this node's relay with.
    pub relay_ticket: Vec<u8>,
    /// This node's relay address (`ip:port`, UDP).
    pub relay: String,
    /// Every device with at least one grant on this site.
    pub devices: Vec<DeviceAccess>,
}

/// A client device and what it may reach behind the site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceAccess {
    /// The device.
    pub device: Name,
    /// Its owner.
    pub user: Name,
    /// Its WireGuard public key: the handshake proves it.
    pub key: [u8; 32],
    /// Its tunnel address: the only source address its packets may carry.
    pub address: std::net::Ipv4Addr,
    /// What it may reach.
    pub grants: Vec<FlowGrant>,
}

/// One resource a device may reach: destination, ports and protocols.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowGrant {
    /// The resource.
    pub resource: Name,
    /// Where flows to it go.
    pub dst: FlowDst,
    /// Allowed destination port ranges (inclusive); empty: none.
    pub ports: Vec<(u16, u16)>,
    /// TCP allowed.
    pub tcp: bool,
    /// UDP allowed.
    pub udp: bool,
    /// ICMP echo allowed.
    pub icmp: bool,
}

/// Where a granted flow goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlowDst {
    /// An address or a network: the flow's destination must be inside it, and the agent
    /// dials that same destination.
    Net(ipnet::IpNet),
    /// A DNS name: clients send to `virtual_address`; the agent resolves `name` and dials
    /// what it resolves to.
    Dns {
        /// The name the agent resolves.
        name: String,
        /// The address clients use for it.
        virtual_address: std::net::Ipv4Addr,
    },
}

impl FlowGrant {
    /// Whether a flow of `proto` to `dst:port` is allowed by this grant; what to dial if so.
    pub fn allows(&self, proto: FlowProto, dst: std::net::IpAddr, port: u16) -> Option<Dial<'_>> {
        let proto_ok = match proto {
            FlowProto::Tcp => self.tcp,
            FlowProto::Udp => self.udp,
            FlowProto::Icmp => self.icmp,
        };
        if !proto_ok {
            return None;
        }
        if proto != FlowProto::Icmp && !self.ports.iter().any(|&(a, b)| a <= port && port <= b) {
            return None;
        }
        match &self.dst {
            FlowDst::Net(net) => net.contains(&dst).then_some(Dial::Address(dst)),
            FlowDst::Dns {
                name,
                virtual_address,
            } => (dst == std::net::IpAddr::V4(*virtual_address)).then_some(Dial::Name(name)),
        }
    }
}

/// What a flow's transport is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FlowProto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP echo.
    Icmp,
}

/// Where the agent dials an allowed flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dial<'a> {
    /// This address (the flow's own destination).
    Address(std::net::IpAddr),
    /// What this name resolves to.
    Name(&'a str),
}

/// A control-stream message: a tag and a payload (see the module documentation).
pub trait Message: Sized {
    /// The message's tag.
    fn tag(&self) -> u32;
    /// Appends the payload (bincode, after the tag) to `out`.
    fn encode_payload(&self, out: &mut Vec<u8>);
    /// Decodes the payload of a `tag` frame; an unknown tag is not an error but the
    /// type's `Unknown` message.
    fn decode_payload(tag: u32, payload: &[u8]) -> Result<Self, FrameError>;
    /// The optional feature a peer must have listed to be sent this; none: every peer of
    /// protocol 1 or later understands it.
    fn feature(&self) -> Option<&'static str> {
        None
    }
    /// Whether peers of protocol 0 (plain bincode enums) understand it.
    fn in_protocol_0(&self) -> bool;
}

/// Node to agent, on the control stream. Tags are append-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToAgent {
    /// Tag 0: the site's configuration.
    Config(SiteConfig),
    /// Tag 1: the node's answer to the agent's [`Hello`], before the first `Config`.
    Hello(Hello),
    /// Tag 2: the client devices that may reach the site and what each may reach, with the
    /// agent's relay binding on this node. Sent on connect and whenever it changes.
    Access(AccessConfig),
    /// Tag 3: the node is still serving and what it sent last still holds, for
    /// `valid_for_ms` more milliseconds. Sent every second.
    Heartbeat {
        /// How long the agent may go on admitting flows without hearing from a node.
        valid_for_ms: u64,
    },
    /// Tag 4: the cluster's relay-only nodes (`ip:port`, UDP): the agent binds to them too,
    /// with the ticket of this node's [`AccessConfig`], so a client whose closest relay is
    /// one of them reaches the agent through it alone. Sent after the first `Access` and
    /// whenever the list changes.
    Relays(Vec<String>),
    /// A tag this build does not know (from a newer node): skipped. Never sent.
    Unknown {
        /// The tag.
        tag: u32,
    },
}

impl Message for ToAgent {
    fn tag(&self) -> u32 {
        match self {
            Self::Config(_) => 0,
            Self::Hello(_) => 1,
            Self::Access(_) => 2,
            Self::Heartbeat { .. } => 3,
            Self::Relays(_) => 4,
            Self::Unknown { tag } => *tag,
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Self::Config(c) => encode_into(c, out),
            Self::Hello(h) => encode_into(h, out),
            Self::Access(a) => encode_into(a, out),
            Self::Heartbeat { valid_for_ms } => encode_into(valid_for_ms, out),
            Self::Relays(r) => encode_into(r, out),
            Self::Unknown { .. } => {}
        }
    }

    fn decode_payload(tag: u32, payload: &[u8]) -> Result<Self, FrameError> {
        Ok(match tag {
            0 => Self::Config(decode_body(payload)?),
            1 => Self::Hello(decode_body(payload)?),
            2 => Self::Access(decode_body(payload)?),
            3 => Self::Heartbeat {
                valid_for_ms: decode_body(payload)?,
            },
            4 => Self::Relays(decode_body(payload)?),
            tag => Self::Unknown { tag },
        })
    }

    fn feature(&self) -> Option<&'static str> {
        matches!(
            self,
            Self::Access(_) | Self::Heartbeat { .. } | Self::Relays(_)
        )
        .then_some(FEATURE_ACCESS)
    }

    fn in_protocol_0(&self) -> bool {
        matches!(self, Self::Config(_))
    }
}

/// Agent to node, on the control stream. Tags are append-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromAgent {
    /// Tag 0: health of the checked targets (true: passing).
    Health(Vec<(Target, bool)>),
    /// Tag 1: the agent's first message.
    Hello(Hello),
    /// Tag 2: the agent's WireGuard endpoint for client devices (after its Hello, to a node
    /// that listed [`FEATURE_ACCESS`]).
    WireGuard(AgentWireGuard),
    /// A tag this build does not know (from a newer agent): skipped. Never sent.
    Unknown {
        /// The tag.
        tag: u32,
    },
}

impl Message for FromAgent {
    fn tag(&self) -> u32 {
        match self {
            Self::Health(_) => 0,
            Self::Hello(_) => 1,
            Self::WireGuard(_) => 2,
            Self::Unknown { tag } => *tag,
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Self::Health(h) => encode_into(h, out),
            Self::Hello(h) => encode_into(h, out),
            Self::WireGuard(w) => encode_into(w, out),
            Self::Unknown { .. } => {}
        }
    }

    fn decode_payload(tag: u32, payload: &[u8]) -> Result<Self, FrameError> {
        Ok(match tag {
            0 => Self::Health(decode_body(payload)?),
            1 => Self::Hello(decode_body(payload)?),
            2 => Self::WireGuard(decode_body(payload)?),
            tag => Self::Unknown { tag },
        })
    }

    fn feature(&self) -> Option<&'static str> {
        matches!(self, Self::WireGuard(_)).then_some(FEATURE_ACCESS)
    }

    fn in_protocol_0(&self) -> bool {
        matches!(self, Self::Health(_))
    }
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
    let mut out = vec![0; 4];
    encode_into(msg, &mut out);
    seal(out)
}

/// Frames a control-stream message: 4-byte big-endian length, the varint tag, the payload.
pub fn encode_message<M: Message>(msg: &M) -> Vec<u8> {
    let mut out = vec![0; 4];
    encode_into(&msg.tag(), &mut out);
    msg.encode_payload(&mut out);
    seal(out)
}

/// Frames a payload under any tag, known to this build or not (to test what an older peer
/// does with a newer message).
pub fn encode_tagged<T: Serialize>(tag: u32, payload: &T) -> Vec<u8> {
    let mut out = vec![0; 4];
    encode_into(&tag, &mut out);
    encode_into(payload, &mut out);
    seal(out)
}

/// Decodes a frame body (after its length). Bytes after the fields `T` knows are ignored:
/// they are fields a newer peer appended.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (v, _used) = bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map_err(FrameError::Malformed)?;
    Ok(v)
}

/// Decodes a control-stream frame body (after its length): the tag, then its payload.
pub fn decode_message<M: Message>(body: &[u8]) -> Result<M, FrameError> {
    let (tag, used): (u32, usize) =
        bincode::serde::decode_from_slice(body, bincode::config::standard())
            .map_err(FrameError::Malformed)?;
    M::decode_payload(tag, &body[used..])
}

fn encode_into<T: Serialize + ?Sized>(msg: &T, out: &mut Vec<u8>) {
    bincode::serde::encode_into_std_write(msg, out, bincode::config::standard())
        .expect("protocol messages encode");
}

/// Writes the length of a frame built after a 4-byte placeholder.
fn seal(mut frame: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(frame.len() - 4).expect("frames are under 4 GiB");
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame
}

/// Reading and writing frames on async streams (feature `io`).
#[cfg(feature = "io")]
pub mod io {
    use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

    use super::MAX_DATAGRAM;
    use super::{decode_body, decode_message, encode_frame, encode_message, FrameError, Message};

    /// Writes one frame.
    pub async fn write_frame<W: AsyncWrite + Unpin, T: serde::Serialize>(
        w: &mut W,
        msg: &T,
    ) -> std::io::Result<()> {
        w.write_all(&encode_frame(msg)).await
    }

    /// Writes one control-stream message.
    pub async fn write_message<W: AsyncWrite + Unpin, M: Message>(
        w: &mut W,
        msg: &M,
    ) -> std::io::Result<()> {
        w.write_all(&encode_message(msg)).await
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

    /// Reads the UDP datagrams of a data stream. Bytes read stay in the reader between
    /// calls, so [`DatagramReader::read_next`] may be a `select!` branch that loses.
    pub struct DatagramReader {
        /// Room for the largest frame: a frame left incomplete is moved to the front first.
        buf: Box<[u8]>,
        /// Where the unread bytes start.
        start: usize,
        /// Where they end.
        end: usize,
    }

    impl Default for DatagramReader {
        fn default() -> Self {
            Self::new()
        }
    }

    impl DatagramReader {
        /// A reader with nothing buffered (64 KiB of buffer).
        pub fn new() -> Self {
            Self {
                buf: vec![0; 2 + MAX_DATAGRAM].into_boxed_slice(),
                start: 0,
                end: 0,
            }
        }

        /// The next datagram from `r`; `None` at a clean end of the stream.
        ///
        /// Cancel safe: if the future is dropped before it completes, no datagram is lost
        /// (the bytes already read stay here for the next call).
        pub async fn read_next<R: AsyncRead + Unpin>(
            &mut self,
            r: &mut R,
        ) -> Result<Option<&[u8]>, FrameError> {
            loop {
                let unread = &self.buf[self.start..self.end];
                if let [hi, lo, rest @ ..] = unread {
                    let len = usize::from(u16::from_be_bytes([*hi, *lo]));
                    if rest.len() >= len {
                        let at = self.start + 2;
                        self.start = at + len;
                        return Ok(Some(&self.buf[at..at + len]));
                    }
                }
                if self.start > 0 {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                }
                // The only await: `read` is cancel safe, and what it read is counted
                // before anything else can happen.
                let n = r.read(&mut self.buf[self.end..]).await?;
                if n == 0 {
                    return if self.end == 0 {
                        Ok(None)
                    } else {
                        Err(FrameError::Truncated)
                    };
                }
                self.end += n;
            }
        }
    }

    /// Reads one frame body of at most `max` bytes; `Ok(None)` at a clean end of stream.
    ///
    /// Not cancel safe (two `read_exact`s): await it to completion, from a future that
    /// owns the stream, never as a `select!` branch that may lose.
    pub async fn read_frame_body<R: AsyncRead + Unpin>(
        r: &mut R,
        max: usize,
    ) -> Result<Option<Vec<u8>>, FrameError> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(FrameError::Io(e)),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        let mut body = vec![0u8; len];
        match r.read_exact(&mut body).await {
            Ok(_) => Ok(Some(body)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
            Err(e) => Err(FrameError::Io(e)),
        }
    }

    /// Reads one frame of at most `max` bytes and decodes it; `Ok(None)` at a clean end of
    /// stream. Not cancel safe (see [`read_frame_body`]).
    pub async fn read_frame<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
        r: &mut R,
        max: usize,
    ) -> Result<Option<T>, FrameError> {
        match read_frame_body(r, max).await? {
            Some(body) => decode_body(&body).map(Some),
            None => Ok(None),
        }
    }

    /// Reads one control-stream message of at most `max` bytes (an unknown tag gives the
    /// type's `Unknown`, and the stream stays usable); `Ok(None)` at a clean end of stream.
    /// Not cancel safe (see [`read_frame_body`]).
    pub async fn read_message<R: AsyncRead + Unpin, M: Message>(
        r: &mut R,
        max: usize,
    ) -> Result<Option<M>, FrameError> {
        match read_frame_body(r, max).await? {
            Some(body) => decode_message(&body).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The control enums as they were before tags (protocol 0).
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum LegacyToAgent {
        Config(SiteConfig),
    }

    /// See [`LegacyToAgent`].
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum LegacyFromAgent {
        Health(Vec<(Target, bool)>),
    }

    fn config() -> SiteConfig {
        SiteConfig {
            site: Name::new("hq").unwrap(),
            targets: vec![TargetSpec {
                target: "10.0.0.5:5432".parse().unwrap(),
                check: None,
            }],
            nodes: vec!["127.0.0.1:7000".into()],
        }
    }

    fn legacy_bincode<T: Serialize>(msg: &T) -> Vec<u8> {
        bincode::serde::encode_to_vec(msg, bincode::config::standard()).unwrap()
    }

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
        assert!(matches!(
            decode_body::<Open>(&[0xff, 0xff, 0xff]),
            Err(FrameError::Malformed(_))
        ));
        // A field a newer node appended is ignored.
        let mut appended = frame[4..].to_vec();
        appended.extend_from_slice(&legacy_bincode(&Some(7u64)));
        assert_eq!(decode_body::<Open>(&appended).unwrap().target, open.target);
        // A target that does not parse is refused by the Target type itself.
        assert!(matches!(
            decode_body::<Open>(&encode_frame(&("hq", "no port", 0u32))[4..]),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn tags_of_protocol_0_keep_the_bytes_of_the_old_enums() {
        let new = encode_message(&ToAgent::Config(config()));
        assert_eq!(new[4..], legacy_bincode(&LegacyToAgent::Config(config())));
        let old: LegacyToAgent = decode_body(&new[4..]).unwrap();
        assert_eq!(old, LegacyToAgent::Config(config()));

        let report = vec![("10.0.0.5:80".parse().unwrap(), true)];
        let old = legacy_bincode(&LegacyFromAgent::Health(report.clone()));
        assert_eq!(
            decode_message::<FromAgent>(&old).unwrap(),
            FromAgent::Health(report.clone())
        );
        assert_eq!(encode_message(&FromAgent::Health(report))[4..], old);
    }

    #[test]
    fn an_unknown_tag_is_skipped_and_a_known_one_still_decodes() {
        // A message from a newer peer, with a payload this build cannot read.
        let future = encode_tagged(42, &("a payload", 7u64, vec![1u8, 2, 3]));
        assert_eq!(
            decode_message::<ToAgent>(&future[4..]).unwrap(),
            ToAgent::Unknown { tag: 42 }
        );
        assert_eq!(
            decode_message::<FromAgent>(&future[4..]).unwrap(),
            FromAgent::Unknown { tag: 42 }
        );
        // A tag past one byte of varint.
        let far = encode_tagged(70_000, &());
        assert_eq!(
            decode_message::<ToAgent>(&far[4..]).unwrap(),
            ToAgent::Unknown { tag: 70_000 }
        );
        // A known tag whose payload grew at its end (a newer peer appended a field).
        let mut grown = encode_message(&ToAgent::Config(config()))[4..].to_vec();
        grown.extend_from_slice(&legacy_bincode(&"new field"));
        assert_eq!(
            decode_message::<ToAgent>(&grown).unwrap(),
            ToAgent::Config(config())
        );
        // What a protocol-0 agent made of a Hello: the reason a node never sends it one.
        let hello = encode_message(&ToAgent::Hello(Hello::ours()));
        assert!(decode_body::<LegacyToAgent>(&hello[4..]).is_err());
    }

    #[test]
    fn hello_negotiation_tells_protocol_1_from_protocol_0() {
        let ours = Hello::ours();
        let frame = encode_message(&FromAgent::Hello(ours.clone()));
        let peer = PeerProtocol::from_agent_hello(&frame[4..]).unwrap();
        assert_eq!(peer, PeerProtocol::from_hello(ours.clone()));
        assert_eq!(peer.version, PROTOCOL_VERSION);
        // The node's answer round-trips too.
        let answer = encode_message(&ToAgent::Hello(ours.clone()));
        assert_eq!(
            decode_message::<ToAgent>(&answer[4..]).unwrap(),
            ToAgent::Hello(ours)
        );

        for version in ["0.1.0", "7", ""] {
            let legacy = encode_frame(&LegacyHello {
                version: version.into(),
            });
            let peer = PeerProtocol::from_agent_hello(&legacy[4..]).unwrap();
            assert_eq!(peer, PeerProtocol::legacy(version.into()), "{version:?}");
        }
        assert!(matches!(
            PeerProtocol::from_agent_hello(&[0xfe]),
            Err(FrameError::Malformed(_))
        ));
    }

    /// A message of a later protocol that needs a feature.
    struct NeedsFeature;

    impl Message for NeedsFeature {
        fn tag(&self) -> u32 {
            9
        }
        fn encode_payload(&self, _: &mut Vec<u8>) {}
        fn decode_payload(_: u32, _: &[u8]) -> Result<Self, FrameError> {
            Ok(Self)
        }
        fn feature(&self) -> Option<&'static str> {
            Some("later-thing")
        }
        fn in_protocol_0(&self) -> bool {
            false
        }
    }

    #[test]
    fn a_peer_is_sent_only_what_it_understands() {
        let legacy = PeerProtocol::legacy("0.1.0".into());
        assert!(legacy.accepts(&ToAgent::Config(config())));
        assert!(legacy.accepts(&FromAgent::Health(Vec::new())));
        assert!(!legacy.accepts(&ToAgent::Hello(Hello::ours())));
        assert!(!legacy.accepts(&NeedsFeature));

        let mut current = PeerProtocol::from_hello(Hello::ours());
        assert!(current.accepts(&ToAgent::Hello(Hello::ours())));
        assert!(current.accepts(&ToAgent::Config(config())));
        assert!(!current.accepts(&NeedsFeature));
        current.features.push("later-thing".into());
        assert!(current.accepts(&NeedsFeature));
    }

    #[test]
    fn unknowns_are_counted_and_only_the_first_is_flagged() {
        let mut u = Unknowns::default();
        assert!(u.note());
        assert!(!u.note());
        assert!(!u.note());
        assert_eq!(u.count(), 3);
    }

    #[test]
    fn site_names_round_trip_through_certificate_names() {
        let hq = Name::new("hq").unwrap();
        assert_eq!(site_of_cert_name(&site_cert_name(&hq)), Some(hq));
        assert_eq!(site_of_cert_name("hq.example.com"), None);
    }

    #[cfg(feature = "io")]
    mod io {
        use std::collections::VecDeque;
        use std::pin::Pin;
        use std::task::{Context, Poll};

        use tokio::io::{AsyncRead, ReadBuf};

        use super::*;
        use crate::tunnel::io::{read_frame, read_message, DatagramReader};

        /// Hands out `parts` one per read, pending `stalls` polls before each.
        struct Stalling {
            parts: VecDeque<Vec<u8>>,
            stalls: u32,
            left: u32,
        }

        impl Stalling {
            fn new(bytes: &[u8], sizes: &[usize], stalls: u32) -> Self {
                let mut parts = VecDeque::new();
                let mut at = 0;
                for size in sizes.iter().cycle() {
                    if at >= bytes.len() {
                        break;
                    }
                    let end = (at + size).min(bytes.len());
                    parts.push_back(bytes[at..end].to_vec());
                    at = end;
                }
                Self {
                    parts,
                    stalls,
                    left: 0,
                }
            }
        }

        impl AsyncRead for Stalling {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                if self.left > 0 {
                    self.left -= 1;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                let Some(mut part) = self.parts.pop_front() else {
                    return Poll::Ready(Ok(()));
                };
                let n = part.len().min(buf.remaining());
                buf.put_slice(&part[..n]);
                if n < part.len() {
                    part.drain(..n);
                    self.parts.push_front(part);
                }
                self.left = self.stalls;
                Poll::Ready(Ok(()))
            }
        }

        fn datagrams() -> Vec<Vec<u8>> {
            [5usize, 300, 0, 1, 1200, 2, MAX_DATAGRAM, 77]
                .iter()
                .enumerate()
                .map(|(i, n)| (0..*n).map(|b| (b * 31 + i) as u8).collect())
                .collect()
        }

        fn framed(datagrams: &[Vec<u8>]) -> Vec<u8> {
            let mut out = Vec::new();
            for d in datagrams {
                out.extend_from_slice(&(d.len() as u16).to_be_bytes());
                out.extend_from_slice(d);
            }
            out
        }

        /// The first read hands out exactly a datagram's length; the reader then stalls while
        /// the other branch of the `select!` wins, again and again, at every split.
        #[tokio::test]
        async fn a_datagram_survives_its_read_losing_a_select_between_its_length_and_its_bytes() {
            let want = datagrams();
            let mut r = Stalling::new(&framed(&want), &[2, 1, 5, 64, 333, 3, 4096], 2);
            let mut reader = DatagramReader::new();
            let mut got = Vec::new();
            let mut other_branch = 0u32;
            loop {
                tokio::select! {
                    biased;
                    d = reader.read_next(&mut r) => match d.unwrap() {
                        Some(d) => got.push(d.to_vec()),
                        None => break,
                    },
                    () = tokio::task::yield_now() => other_branch += 1,
                }
            }
            assert!(
                other_branch > 100,
                "the other branch won {other_branch} times"
            );
            assert_eq!(got.len(), want.len());
            assert!(got == want, "a datagram was changed");
        }

        #[tokio::test]
        async fn a_stream_cut_inside_a_datagram_is_truncated_and_a_clean_end_is_none() {
            let mut bytes = framed(&datagrams()[..2]);
            let mut reader = DatagramReader::new();
            let mut clean: &[u8] = &bytes;
            assert!(reader.read_next(&mut clean).await.unwrap().is_some());
            assert!(reader.read_next(&mut clean).await.unwrap().is_some());
            assert!(reader.read_next(&mut clean).await.unwrap().is_none());
            bytes.truncate(bytes.len() - 1);
            let mut reader = DatagramReader::new();
            let mut cut: &[u8] = &bytes;
            assert!(reader.read_next(&mut cut).await.unwrap().is_some());
            assert!(matches!(
                reader.read_next(&mut cut).await,
                Err(FrameError::Truncated)
            ));
        }

        #[tokio::test]
        async fn oversized_truncated_and_malformed_frames_give_typed_errors() {
            let mut oversized: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
            assert!(matches!(
                read_frame::<_, Open>(&mut oversized, MAX_HEADER).await,
                Err(FrameError::TooLarge {
                    len: 0xffff_ffff,
                    max: MAX_HEADER
                })
            ));
            let mut truncated: &[u8] = &[0, 0, 0, 50, 1, 2, 3];
            assert!(matches!(
                read_frame::<_, Open>(&mut truncated, MAX_HEADER).await,
                Err(FrameError::Truncated)
            ));
            let garbage = encode_frame(&("hq", "not a target", 7u8));
            assert!(matches!(
                read_frame::<_, Open>(&mut &garbage[..], MAX_HEADER).await,
                Err(FrameError::Malformed(_))
            ));
            let bad_config = encode_tagged(0, &"not a config");
            assert!(matches!(
                read_message::<_, ToAgent>(&mut &bad_config[..], MAX_CONTROL).await,
                Err(FrameError::Malformed(_))
            ));
            let mut empty: &[u8] = &[];
            assert!(read_message::<_, ToAgent>(&mut empty, MAX_CONTROL)
                .await
                .unwrap()
                .is_none());
        }

        #[tokio::test]
        async fn a_control_stream_carries_on_past_an_unknown_message() {
            let mut stream = encode_message(&ToAgent::Hello(Hello::ours()));
            stream.extend(encode_message(&ToAgent::Config(config())));
            stream.extend(encode_tagged(12, &vec![0u8; 5000]));
            stream.extend(encode_message(&ToAgent::Config(config())));
            let mut r = &stream[..];
            let mut got = Vec::new();
            while let Some(m) = read_message::<_, ToAgent>(&mut r, MAX_CONTROL)
                .await
                .unwrap()
            {
                got.push(m);
            }
            assert_eq!(
                got,
                vec![
                    ToAgent::Hello(Hello::ours()),
                    ToAgent::Config(config()),
                    ToAgent::Unknown { tag: 12 },
                    ToAgent::Config(config()),
                ]
            );
        }
    }
}

/// Node to node, on a unidirectional relay stream: the sites the sender holds tunnels to.
/// The sender is the node its connection's certificate names, never a field in here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Held {
    /// Sites it holds a tunnel to.
    pub sites: Vec<Name>,
}
