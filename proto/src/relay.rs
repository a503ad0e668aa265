//! The relay protocol: plain UDP between a client device or an agent and a node's relay
//! port, carrying WireGuard packets the node cannot read.
//!
//! ```text
//! client (device)                node relay                          agent (site)
//!   │ Bind{nonce, ticket, site} ──►  ticket signed by the cluster,      │
//!   │                                for this device and site?           │
//!   │ ◄── Bound{nonce, channel C}    C ─► (agent address, channel A) ◄── Bind{nonce, ticket}
//!   │                                A ─► (client address, channel C)    (every 10 s: keeps
//!   │ Data{C, wg} ───────────────►  rewrite C to A, send to the agent ─►  the NAT open)
//!   │ ◄────────────────────────────  rewrite A to C ◄──────────────────── Data{A, wg}
//! ```
//!
//! A node that holds no binding of the site's agent binds onward, once, to a node that does
//! (with the client's ticket, as if it were the client) and splices the two channels.
//!
//! # Wire format
//!
//! Every datagram starts with a type byte. WireGuard's own messages start with 1-4, so a
//! socket that also carries direct WireGuard tells the two apart by that byte alone
//! ([`is_relay`]). Integers are big-endian.
//!
//! | type | message | body |
//! |---|---|---|
//! | `0xA0` | [`Frame::Ping`] | nonce u64, then padding: a ping is at least [`PING_LEN`] bytes so a pong (shorter) never amplifies |
//! | `0xA1` | [`Frame::Pong`] | nonce u64, the sender's address as the node saw it (family u8 4/6, IP, port u16) |
//! | `0xA2` | [`Frame::Bind`] | nonce u64, ticket length u16, ticket, site length u8, site (UTF-8; empty for an agent, whose ticket names its site), then only from a relay sending a client's Bind on: the relay's channel of that client u32 |
//! | `0xA3` | [`Frame::Bound`] | nonce u64, channel u32, lifetime u16 (seconds without traffic before the binding is forgotten) |
//! | `0xA4` | [`Frame::Refused`] | nonce u64, reason u8 ([`Refusal`]) |
//! | `0xA5` | [`Frame::Data`] | channel u32, then the WireGuard packet |
//! | `0xA6` | [`Frame::Punch`] | channel u32, kind u8 ([`PunchKind`]), observed address (family u8 0/4/6, IP, port u16), body length u16, body (an encoded [`Offer`]) |
//! | `0xA7` | [`Frame::Probe`] | sender's WireGuard key \[32\], receiver's round u64, transaction u64, tag \[16\], padding |
//! | `0xA8` | [`Frame::ProbeAck`] | sender's WireGuard key \[32\], transaction u64, the probe's source as seen (family u8 4/6, IP, port u16), tag \[16\], padding |
//!
//! # Direct paths
//!
//! Punch frames travel the relay like Data (a channel, checked against the sender's
//! address) and carry the hole-punch rendezvous: a client's [`PunchKind::Call`] (its
//! candidate addresses) reaches the coordinator on the node the client is bound to, which
//! sends it on to the agent; the agent's [`PunchKind::Answer`] comes back to the
//! coordinator, which then sends [`PunchKind::Go`] to both at once (each with the other's
//! offer): both probe every candidate of the other simultaneously. A relay that receives a
//! Punch straight from an endpoint writes the sender's address as it sees it into
//! `observed` (a reflexive candidate the endpoint may not know it has).
//!
//! Probe and ProbeAck never touch a relay: they go straight between client and agent on
//! the socket WireGuard uses, so they open exactly the NAT mappings WireGuard then takes.
//! Their tags (and an [`Offer`]'s) are MACs keyed by the two WireGuard keys' Diffie-Hellman
//! secret (computed in `warren-net`), so neither a relay nor anyone on the path can forge
//! one; both are padded to the full size of a WireGuard datagram, so a path whose MTU is
//! too small for data never answers a probe.
//!
//! A relay answers a Data frame from an address that is not the channel's with nothing: a
//! channel number is not a credential, the address it was bound from is checked too.
//!
//! # Tickets
//!
//! A [`Ticket`] says who may bind and to what, until when; the cluster signs it (ECDSA
//! P-256 over the encoded body, with one of the keys that sign identity assertions, named
//! by `kid`), so a relay admits a binding with one signature check and no registry lookup.
//! [`SignedTicket`] carries body and signature; signing and verifying happen in the node.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::Name;

/// Type byte of [`Frame::Ping`].
pub const PING: u8 = 0xA0;
/// Type byte of [`Frame::Pong`].
pub const PONG: u8 = 0xA1;
/// Type byte of [`Frame::Bind`].
pub const BIND: u8 = 0xA2;
/// Type byte of [`Frame::Bound`].
pub const BOUND: u8 = 0xA3;
/// Type byte of [`Frame::Refused`].
pub const REFUSED: u8 = 0xA4;
/// Type byte of [`Frame::Data`].
pub const DATA: u8 = 0xA5;

/// Type byte of [`Frame::Punch`].
pub const PUNCH: u8 = 0xA6;
/// Type byte of [`Frame::Probe`].
pub const PROBE: u8 = 0xA7;
/// Type byte of [`Frame::ProbeAck`].
pub const PROBE_ACK: u8 = 0xA8;
/// ALPN of a relay-only node's feed from the cluster (QUIC, its relay certificate): the
/// ticket keys' public halves, who holds which site, the cluster's relays.
pub const ALPN_RELAY_FEED: &[u8] = b"warren-relay-feed/1";
/// Bytes of a MAC tag on probes and offers.
pub const TAG_LEN: usize = 16;
/// The most candidate addresses an [`Offer`] carries.
pub const MAX_CANDIDATES: usize = 16;
/// The largest Punch body.
pub const MAX_PUNCH_BODY: usize = 1024;

/// Bytes before the WireGuard packet in a [`Frame::Data`].
pub const DATA_HEADER: usize = 5;
/// The smallest ping: longer than any pong, so answering one never amplifies.
pub const PING_LEN: usize = 32;
/// The largest datagram a relay accepts; anything longer is dropped and counted.
pub const MAX_DATAGRAM: usize = 2048;
/// The largest encoded ticket.
pub const MAX_TICKET: usize = 1024;
/// The WireGuard MTU that fits a relayed packet in a 1500-byte path: 1500 - IPv6 (40) -
/// UDP (8) - relay header (5) - WireGuard overhead (32), rounded down to a multiple of 16.
pub const INNER_MTU: usize = 1408;

/// Whether a datagram is one of Warren's frames (relay or path probe) and not a WireGuard
/// message.
pub fn is_relay(datagram: &[u8]) -> bool {
    matches!(datagram.first(), Some(0xA0..=0xA8))
}

/// What a [`Frame::Punch`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PunchKind {
    /// Client to coordinator to agent: "here are my candidates" (the client's [`Offer`]).
    Call = 1,
    /// Agent to coordinator: its candidates, answering a Call (the agent's [`Offer`]).
    Answer = 2,
    /// Coordinator to both: "probe now"; the body is the other side's offer.
    Go = 3,
}

impl PunchKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Call,
            2 => Self::Answer,
            3 => Self::Go,
            _ => return None,
        })
    }
}

/// The body of a Punch: one side's candidate addresses for the other, tagged by the sender
/// (the tag covers every other field; see `warren-net`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The sender's WireGuard public key.
    pub from: [u8; 32],
    /// The sender's round: probes to the sender must carry it (a random value, new per
    /// Call or Answer, so a probe recorded earlier is stale).
    pub round: u64,
    /// For an Answer, the round of the Call it answers; 0 in a Call.
    pub answers: u64,
    /// Where the sender may be reached directly: host and reflexive addresses.
    pub candidates: Vec<SocketAddr>,
    /// The MAC.
    pub tag: [u8; TAG_LEN],
}

impl Offer {
    /// The encoding (at most [`MAX_CANDIDATES`] candidates are written).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.candidates.len() * 19);
        self.encode_untagged(&mut out);
        out.extend_from_slice(&self.tag);
        out
    }

    /// Every field but the tag: what the tag covers.
    pub fn encode_untagged(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.from);
        out.extend_from_slice(&self.round.to_be_bytes());
        out.extend_from_slice(&self.answers.to_be_bytes());
        let n = self.candidates.len().min(MAX_CANDIDATES);
        out.push(n as u8);
        for c in &self.candidates[..n] {
            put_addr(out, *c);
        }
    }

    /// Decodes a body; `None` if malformed.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = Reader(b);
        let from = r.array::<32>().ok()?;
        let round = r.u64().ok()?;
        let answers = r.u64().ok()?;
        let n = usize::from(r.u8().ok()?);
        if n > MAX_CANDIDATES {
            return None;
        }
        let mut candidates = Vec::with_capacity(n);
        for _ in 0..n {
            candidates.push(r.addr().ok()?);
        }
        let tag = r.array::<TAG_LEN>().ok()?;
        r.0.is_empty().then_some(Self {
            from,
            round,
            answers,
            candidates,
            tag,
        })
    }
}

fn put_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

/// Why a relay refused a binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The ticket's signature does not verify, or its key is unknown.
    BadTicket = 1,
    /// The ticket has expired: get a new one from the cluster.
    Expired = 2,
    /// The ticket does not name the site asked for.
    WrongSite = 3,
    /// No node this relay knows holds the site's agent right now.
    SiteUnreachable = 4,
    /// The relay has as many bindings as it may hold.
    Full = 5,
    /// A reason this build does not know.
    Other = 255,
}

impl Refusal {
    fn from_u8(b: u8) -> Self {
        match b {
            1 => Self::BadTicket,
            2 => Self::Expired,
            3 => Self::WrongSite,
            4 => Self::SiteUnreachable,
            5 => Self::Full,
            _ => Self::Other,
        }
    }

    /// For people.
    pub fn describe(self) -> &'static str {
        match self {
            Self::BadTicket => "the relay ticket is not valid",
            Self::Expired => "the relay ticket has expired",
            Self::WrongSite => "the relay ticket is not for this site",
            Self::SiteUnreachable => "no node holds a tunnel to the site's agent",
            Self::Full => "the relay is full",
            Self::Other => "refused",
        }
    }
}

/// A decoded relay datagram, borrowing from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// "Are you there, and where do you see me?"
    Ping {
        /// Echoed in the pong.
        nonce: u64,
    },
    /// The answer to a ping.
    Pong {
        /// The ping's.
        nonce: u64,
        /// The address the ping came from, as the relay saw it (the sender's public,
        /// reflexive address).
        observed: SocketAddr,
    },
    /// Asks for a channel to a site (client) or announces where a site's agent is (agent).
    Bind {
        /// Echoed in the answer.
        nonce: u64,
        /// The encoded [`SignedTicket`].
        ticket: &'a [u8],
        /// The site to reach; empty for an agent.
        site: &'a str,
        /// Set by a relay that sends a client's Bind on to a peer (one hop): its own
        /// channel of that client, so the peer keeps one binding per client of the relay
        /// (not one per relay and site). Absent from endpoints; a relay that predates it
        /// ignores it (a trailing field).
        via: Option<u32>,
    },
    /// A binding made.
    Bound {
        /// The Bind's.
        nonce: u64,
        /// The channel to put on Data frames.
        channel: u32,
        /// Seconds without traffic after which the relay forgets the binding.
        lifetime: u16,
    },
    /// A binding refused.
    Refused {
        /// The Bind's.
        nonce: u64,
        /// Why.
        reason: Refusal,
    },
    /// A WireGuard packet on a channel.
    Data {
        /// The channel.
        channel: u32,
        /// The packet.
        payload: &'a [u8],
    },
    /// Hole-punch rendezvous on a channel (see the module documentation).
    Punch {
        /// The channel, as for Data.
        channel: u32,
        /// What it says.
        kind: PunchKind,
        /// The sender of the body as the first relay saw it, once one did.
        observed: Option<SocketAddr>,
        /// An encoded [`Offer`].
        body: &'a [u8],
    },
    /// A path probe, straight from one endpoint to a candidate address of the other.
    Probe {
        /// The sender's WireGuard public key.
        from: [u8; 32],
        /// The receiver's round (from its offer).
        round: u64,
        /// Echoed in the ack.
        tx: u64,
        /// The MAC.
        tag: [u8; TAG_LEN],
    },
    /// The answer to a probe, to where the probe came from.
    ProbeAck {
        /// The sender's WireGuard public key.
        from: [u8; 32],
        /// The probe's.
        tx: u64,
        /// Where the probe came from, as its receiver saw it.
        observed: SocketAddr,
        /// The MAC.
        tag: [u8; TAG_LEN],
    },
}

/// Why a datagram is not a relay frame. Whoever sent it may be an attacker: the datagram is
/// dropped and counted, never answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Empty, or its first byte is no relay type.
    #[error("not a relay frame")]
    NotRelay,
    /// Shorter than its type needs, or a length inside runs past the end.
    #[error("truncated relay frame")]
    Truncated,
    /// Longer than [`MAX_DATAGRAM`], or a ticket longer than [`MAX_TICKET`].
    #[error("oversized relay frame")]
    Oversized,
    /// A field that is not what it must be (a site name that is not UTF-8, an address
    /// family that is neither 4 nor 6).
    #[error("malformed relay frame")]
    Malformed,
}

impl<'a> Frame<'a> {
    /// Decodes a datagram.
    pub fn decode(b: &'a [u8]) -> Result<Self, FrameError> {
        if b.len() > MAX_DATAGRAM {
            return Err(FrameError::Oversized);
        }
        let (&ty, rest) = b.split_first().ok_or(FrameError::NotRelay)?;
        let mut r = Reader(rest);
        Ok(match ty {
            PING => {
                if b.len() < PING_LEN {
                    return Err(FrameError::Truncated);
                }
                Frame::Ping { nonce: r.u64()? }
            }
            PONG => Frame::Pong {
                nonce: r.u64()?,
                observed: r.addr()?,
            },
            BIND => {
                let nonce = r.u64()?;
                let len = usize::from(r.u16()?);
                if len > MAX_TICKET {
                    return Err(FrameError::Oversized);
                }
                let ticket = r.take(len)?;
                let slen = usize::from(r.u8()?);
                let site = std::str::from_utf8(r.take(slen)?).map_err(|_| FrameError::Malformed)?;
                let via = if r.0.len() >= 4 { Some(r.u32()?) } else { None };
                Frame::Bind {
                    nonce,
                    ticket,
                    site,
                    via,
                }
            }
            BOUND => Frame::Bound {
                nonce: r.u64()?,
                channel: r.u32()?,
                lifetime: r.u16()?,
            },
            REFUSED => Frame::Refused {
                nonce: r.u64()?,
                reason: Refusal::from_u8(r.u8()?),
            },
            DATA => Frame::Data {
                channel: r.u32()?,
                payload: r.0,
            },
            PUNCH => {
                let channel = r.u32()?;
                let kind = PunchKind::from_u8(r.u8()?).ok_or(FrameError::Malformed)?;
                let observed = match r.0.first() {
                    Some(0) => {
                        r.u8()?;
                        None
                    }
                    _ => Some(r.addr()?),
                };
                let len = usize::from(r.u16()?);
                if len > MAX_PUNCH_BODY {
                    return Err(FrameError::Oversized);
                }
                Frame::Punch {
                    channel,
                    kind,
                    observed,
                    body: r.take(len)?,
                }
            }
            PROBE => Frame::Probe {
                from: r.array()?,
                round: r.u64()?,
                tx: r.u64()?,
                tag: r.array()?,
            },
            PROBE_ACK => Frame::ProbeAck {
                from: r.array()?,
                tx: r.u64()?,
                observed: r.addr()?,
                tag: r.array()?,
            },
            _ => return Err(FrameError::NotRelay),
        })
    }

    /// Appends the encoded frame to `out`.
    ///
    /// # Panics
    /// If a Bind's ticket is longer than [`MAX_TICKET`] or its site longer than 255 bytes:
    /// callers build those from values they made.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Ping { nonce } => {
                out.push(PING);
                out.extend_from_slice(&nonce.to_be_bytes());
                out.resize(out.len() + PING_LEN - 9, 0);
            }
            Frame::Pong { nonce, observed } => {
                out.push(PONG);
                out.extend_from_slice(&nonce.to_be_bytes());
                put_addr(out, *observed);
            }
            Frame::Bind {
                nonce,
                ticket,
                site,
                via,
            } => {
                assert!(ticket.len() <= MAX_TICKET && site.len() <= 255);
                out.push(BIND);
                out.extend_from_slice(&nonce.to_be_bytes());
                out.extend_from_slice(&(ticket.len() as u16).to_be_bytes());
                out.extend_from_slice(ticket);
                out.push(site.len() as u8);
                out.extend_from_slice(site.as_bytes());
                if let Some(via) = via {
                    out.extend_from_slice(&via.to_be_bytes());
                }
            }
            Frame::Bound {
                nonce,
                channel,
                lifetime,
            } => {
                out.push(BOUND);
                out.extend_from_slice(&nonce.to_be_bytes());
                out.extend_from_slice(&channel.to_be_bytes());
                out.extend_from_slice(&lifetime.to_be_bytes());
            }
            Frame::Refused { nonce, reason } => {
                out.push(REFUSED);
                out.extend_from_slice(&nonce.to_be_bytes());
                out.push(*reason as u8);
            }
            Frame::Data { channel, payload } => {
                out.push(DATA);
                out.extend_from_slice(&channel.to_be_bytes());
                out.extend_from_slice(payload);
            }
            Frame::Punch {
                channel,
                kind,
                observed,
                body,
            } => {
                assert!(body.len() <= MAX_PUNCH_BODY);
                out.push(PUNCH);
                out.extend_from_slice(&channel.to_be_bytes());
                out.push(*kind as u8);
                match observed {
                    Some(a) => put_addr(out, *a),
                    None => out.push(0),
                }
                out.extend_from_slice(&(body.len() as u16).to_be_bytes());
                out.extend_from_slice(body);
            }
            Frame::Probe {
                from,
                round,
                tx,
                tag,
            } => {
                out.push(PROBE);
                out.extend_from_slice(from);
                out.extend_from_slice(&round.to_be_bytes());
                out.extend_from_slice(&tx.to_be_bytes());
                out.extend_from_slice(tag);
            }
            Frame::ProbeAck {
                from,
                tx,
                observed,
                tag,
            } => {
                out.push(PROBE_ACK);
                out.extend_from_slice(from);
                out.extend_from_slice(&tx.to_be_bytes());
                put_addr(out, *observed);
                out.extend_from_slice(tag);
            }
        }
    }

    /// Appends the frame, then zeros up to `size` bytes in all (a probe's padding).
    pub fn encode_padded(&self, out: &mut Vec<u8>, size: usize) {
        let start = out.len();
        self.encode(out);
        if out.len() - start < size {
            out.resize(start + size, 0);
        }
    }

    /// The encoded frame.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

/// Writes a Data header for `channel` into the first [`DATA_HEADER`] bytes of `buf`, in
/// place: a sender keeps that room in front of the WireGuard packet and so never copies it.
pub fn write_data_header(buf: &mut [u8], channel: u32) {
    buf[0] = DATA;
    buf[1..5].copy_from_slice(&channel.to_be_bytes());
}

/// The channel of a Data frame, without decoding the rest: the relay's per-packet path.
pub fn data_channel(datagram: &[u8]) -> Option<u32> {
    match datagram {
        [DATA, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    fn addr(&mut self) -> Result<SocketAddr, FrameError> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            _ => return Err(FrameError::Malformed),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }
}

/// Who a ticket admits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Holder {
    /// A client device, to the sites it lists.
    Device {
        /// The device.
        device: Name,
        /// Its WireGuard public key (the agent checks the handshake against it too).
        key: [u8; 32],
        /// The sites it may bind to.
        sites: Vec<Name>,
    },
    /// A site's agent.
    Agent {
        /// The site.
        site: Name,
    },
}

/// What the cluster vouches for, until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// Format version (1).
    pub version: u8,
    /// Who may bind.
    pub holder: Holder,
    /// End of validity, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Ticket format version this build writes.
pub const TICKET_VERSION: u8 = 1;

/// A ticket and the cluster's signature over its encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTicket {
    /// Which signing key (`kid` of the cluster's assertion keys).
    pub kid: String,
    /// The bincode encoding of the [`Ticket`].
    pub body: Vec<u8>,
    /// ECDSA P-256 SHA-256 signature over `b"warren-relay-ticket/1\0" || body`, fixed
    /// 64-byte form.
    pub signature: Vec<u8>,
}

/// What a ticket signature covers before the body: a ticket signature can never be taken
/// for an assertion's (or anything else the same keys sign).
pub const TICKET_CONTEXT: &[u8] = b"warren-relay-ticket/1\0";

impl Ticket {
    /// The body to sign.
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode::config::standard()).expect("tickets encode")
    }

    /// Decodes a body (bounded; trailing bytes from newer versions ignored).
    pub fn decode(body: &[u8]) -> Option<Self> {
        let cfg = bincode::config::standard().with_limit::<MAX_TICKET>();
        bincode::serde::decode_from_slice(body, cfg)
            .ok()
            .map(|(t, _)| t)
    }
}

impl SignedTicket {
    /// The bytes the signature covers.
    pub fn signed_bytes(body: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(TICKET_CONTEXT.len() + body.len());
        v.extend_from_slice(TICKET_CONTEXT);
        v.extend_from_slice(body);
        v
    }

    /// Encodes for a Bind frame.
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode::config::standard()).expect("tickets encode")
    }

    /// Decodes from a Bind frame (bounded).
    pub fn decode(b: &[u8]) -> Option<Self> {
        let cfg = bincode::config::standard().with_limit::<MAX_TICKET>();
        bincode::serde::decode_from_slice(b, cfg)
            .ok()
            .map(|(t, _)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_round_trips() {
        let frames = [
            Frame::Ping { nonce: 7 },
            Frame::Pong {
                nonce: 7,
                observed: "203.0.113.9:4500".parse().unwrap(),
            },
            Frame::Pong {
                nonce: 8,
                observed: "[2001:db8::1]:51820".parse().unwrap(),
            },
            Frame::Bind {
                nonce: 9,
                ticket: b"ticket",
                site: "site-a",
                via: None,
            },
            Frame::Bind {
                nonce: 9,
                ticket: b"ticket",
                site: "site-a",
                via: Some(0xdead_beef),
            },
            Frame::Bound {
                nonce: 9,
                channel: 0xdead_beef,
                lifetime: 30,
            },
            Frame::Refused {
                nonce: 9,
                reason: Refusal::Expired,
            },
            Frame::Data {
                channel: 1,
                payload: &[4, 0, 0, 0, 1, 2, 3],
            },
            Frame::Punch {
                channel: 5,
                kind: PunchKind::Call,
                observed: None,
                body: b"offer",
            },
            Frame::Punch {
                channel: 6,
                kind: PunchKind::Go,
                observed: Some("198.51.100.7:40000".parse().unwrap()),
                body: b"",
            },
            Frame::Probe {
                from: [3; 32],
                round: 11,
                tx: 12,
                tag: [9; TAG_LEN],
            },
            Frame::ProbeAck {
                from: [4; 32],
                tx: 12,
                observed: "[2001:db8::2]:9".parse().unwrap(),
                tag: [8; TAG_LEN],
            },
        ];
        for f in frames {
            let b = f.to_vec();
            assert!(is_relay(&b));
            assert_eq!(Frame::decode(&b).unwrap(), f);
        }
    }

    #[test]
    fn offers_round_trip_and_reject_what_does_not_fit() {
        let o = Offer {
            from: [1; 32],
            round: 2,
            answers: 3,
            candidates: vec![
                "10.0.0.2:51820".parse().unwrap(),
                "[2001:db8::3]:1".parse().unwrap(),
            ],
            tag: [7; TAG_LEN],
        };
        let b = o.encode();
        assert_eq!(Offer::decode(&b), Some(o));
        // Trailing bytes, a cut, too many candidates: not an offer.
        let mut long = b.clone();
        long.push(0);
        assert_eq!(Offer::decode(&long), None);
        assert_eq!(Offer::decode(&b[..b.len() - 1]), None);
        let mut many = b.clone();
        many[48] = (MAX_CANDIDATES + 1) as u8;
        assert_eq!(Offer::decode(&many), None);
        // A padded probe decodes as the probe.
        let p = Frame::Probe {
            from: [3; 32],
            round: 1,
            tx: 2,
            tag: [0; TAG_LEN],
        };
        let mut padded = Vec::new();
        p.encode_padded(&mut padded, 1440);
        assert_eq!(padded.len(), 1440);
        assert_eq!(Frame::decode(&padded).unwrap(), p);
    }

    #[test]
    fn a_pong_is_never_longer_than_the_ping_it_answers() {
        let ping = Frame::Ping { nonce: 1 }.to_vec();
        let pong = Frame::Pong {
            nonce: 1,
            observed: "[2001:db8::1]:1".parse().unwrap(),
        }
        .to_vec();
        assert!(pong.len() <= ping.len(), "{} > {}", pong.len(), ping.len());
        // A short ping is refused, so nobody can make the relay answer more than it got.
        assert_eq!(Frame::decode(&ping[..20]), Err(FrameError::Truncated));
    }

    #[test]
    fn hostile_datagrams_are_errors_never_panics() {
        assert_eq!(Frame::decode(&[]), Err(FrameError::NotRelay));
        // WireGuard's own messages are not relay frames.
        for wg in 1u8..=4 {
            assert!(!is_relay(&[wg, 0, 0, 0]));
            assert_eq!(Frame::decode(&[wg, 0, 0, 0]), Err(FrameError::NotRelay));
        }
        assert_eq!(
            Frame::decode(&vec![DATA; MAX_DATAGRAM + 1]),
            Err(FrameError::Oversized)
        );
        // A ticket length past the end, and one past the cap.
        let mut b = vec![BIND];
        b.extend_from_slice(&1u64.to_be_bytes());
        b.extend_from_slice(&500u16.to_be_bytes());
        assert_eq!(Frame::decode(&b), Err(FrameError::Truncated));
        let mut b = vec![BIND];
        b.extend_from_slice(&1u64.to_be_bytes());
        b.extend_from_slice(&2000u16.to_be_bytes());
        b.resize(2040, 0);
        assert_eq!(Frame::decode(&b), Err(FrameError::Oversized));
        // Every prefix of every frame, and random bytes: errors or frames, no panic.
        let mut seed = 0x1234_5678_u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 64) as usize;
            let mut b: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            if let Some(first) = b.first_mut() {
                *first = 0xA0 + (*first % 6);
            }
            let _ = Frame::decode(&b);
        }
    }

    #[test]
    fn the_data_header_is_written_in_place_and_read_without_decoding() {
        let mut buf = vec![0u8; DATA_HEADER + 3];
        buf[DATA_HEADER..].copy_from_slice(&[4, 9, 9]);
        write_data_header(&mut buf, 42);
        assert_eq!(data_channel(&buf), Some(42));
        assert_eq!(
            Frame::decode(&buf).unwrap(),
            Frame::Data {
                channel: 42,
                payload: &[4, 9, 9]
            }
        );
        assert_eq!(data_channel(&[DATA, 0, 0]), None);
    }

    #[test]
    fn tickets_round_trip_and_garbage_is_refused() {
        let t = Ticket {
            version: TICKET_VERSION,
            holder: Holder::Device {
                device: Name::new("alice-laptop").unwrap(),
                key: [7; 32],
                sites: vec![Name::new("site-a").unwrap()],
            },
            expires_at: 1_800_000_000,
        };
        assert_eq!(Ticket::decode(&t.encode()), Some(t.clone()));
        let s = SignedTicket {
            kid: "k1".into(),
            body: t.encode(),
            signature: vec![1; 64],
        };
        let enc = s.encode();
        assert!(enc.len() < MAX_TICKET);
        assert_eq!(SignedTicket::decode(&enc), Some(s));
        assert_eq!(SignedTicket::decode(&[0xff; 40]), None);
        assert_eq!(Ticket::decode(&[0xff; 40]), None);
    }
}
