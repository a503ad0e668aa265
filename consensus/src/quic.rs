//! The [`Transport`] over QUIC with mutual TLS.
//!
//! Each node has one QUIC endpoint (UDP, default port 7400) that both accepts and dials.
//! A connection per peer is kept and reused; each RPC is one bidirectional stream carrying
//! one [`Envelope`] and, back, one [`ReplyEnvelope`]; the end of the stream delimits the
//! message. Both sides cap what they read.
//!
//! ```text
//!  request: ['W' 'R' wire version][bincode: cluster id, speaks, needs][bincode: Rpc]
//!  reply:   ['W' 'R' wire version][bincode: speaks, needs][bincode: RpcReply]
//! ```
//!
//! The leading mark and [`WIRE_VERSION`] tell a later framing apart from garbage. `speaks`
//! is the newest [`Format`] the sender reads, `needs` the one the rest of the message is
//! in: a receiver checks it before decoding the rest, so a request from a newer build is
//! answered [`RpcReply::TooNew`] (and a loud log line) rather than misread, and the caller
//! remembers what each peer speaks ([`Transport::peer_format`]) for the leader's format
//! gate.
//!
//! Peers prove membership with certificates from the cluster CA (see [`crate::pki`]), and
//! who they are with the node identity the certificate carries: a request is handled as
//! coming from the node its certificate names, never from a name inside the message, and a
//! dialed peer must present the certificate of the node it was dialed as. The envelope's
//! cluster id is checked on top, so a misdirected node gets a clear refusal.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use warren_proto::registry::NodeId;

use crate::format::Format;
use crate::pki::{peer_node, NodeCert, CLUSTER_SERVER_NAME};
use crate::registry::{decode, encode};
use crate::transport::{BoxFuture, FormatLag, Rpc, RpcReply, Transport, TransportError};
use crate::types::ClusterNode;
use warren_proto::registry::NodeRole;

/// Largest message read from an authenticated peer (snapshots included), in bytes.
pub const MAX_CLUSTER_MESSAGE: usize = 256 << 20;

/// What every cluster message begins with, before [`WIRE_VERSION`].
pub const WIRE_MAGIC: [u8; 2] = *b"WR";
/// The version of the cluster message framing (see the module docs). A change to the
/// envelope's own fields gets a new one.
pub const WIRE_VERSION: u8 = 1;

/// What travels on a cluster stream: the cluster it is meant for, the formats, the RPC.
/// Who sends it is not in it: that comes from the connection's certificate.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// The sender's cluster.
    pub cluster_id: u128,
    /// The newest format the sender reads.
    pub speaks: Format,
    /// The format `rpc` needs ([`Rpc::format`]).
    pub needs: Format,
    /// The request.
    pub rpc: Rpc,
}

/// The part of an [`Envelope`] read before its RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeHead {
    /// The sender's cluster.
    pub cluster_id: u128,
    /// The newest format the sender reads.
    pub speaks: Format,
    /// The format the RPC needs.
    pub needs: Format,
}

/// What comes back on a cluster stream.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplyEnvelope {
    /// The newest format the replier reads.
    pub speaks: Format,
    /// The format `reply` needs ([`RpcReply::format`]).
    pub needs: Format,
    /// The reply.
    pub reply: RpcReply,
}

/// The part of a [`ReplyEnvelope`] read before its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyHead {
    /// The newest format the replier reads.
    pub speaks: Format,
    /// The format the reply needs.
    pub needs: Format,
}

/// Why a cluster message could not be read; the sender is at fault (or is another build).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// It does not begin with [`WIRE_MAGIC`]: not a Warren cluster message.
    #[error("not a Warren cluster message")]
    Garbage,
    /// A framing this build does not know (a newer build).
    #[error("cluster message framing version {found}, this build reads up to {WIRE_VERSION}: upgrade this node")]
    Version {
        /// The framing version found.
        found: u8,
    },
    /// The header or body did not decode.
    #[error("malformed cluster message: {0}")]
    Malformed(String),
}

/// Encodes a cluster message: the mark, the framing version, then `message` (whose head
/// fields come first, so they can be read alone).
pub fn frame<T: Serialize>(message: &T) -> Result<Vec<u8>, TransportError> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&WIRE_MAGIC);
    out.push(WIRE_VERSION);
    // The storage codec's configuration (see `registry::encode`).
    bincode::serde::encode_into_std_write(message, &mut out, bincode::config::standard())
        .map_err(|e| TransportError::Protocol(format!("encoding a cluster message: {e}")))?;
    Ok(out)
}

/// Reads the head `H` of a message [`frame`] wrote; gives back the rest (the body).
pub fn unframe<H: DeserializeOwned>(bytes: &[u8]) -> Result<(H, &[u8]), FrameError> {
    let Some(rest) = bytes.strip_prefix(&WIRE_MAGIC) else {
        return Err(FrameError::Garbage);
    };
    let Some((&version, rest)) = rest.split_first() else {
        return Err(FrameError::Garbage);
    };
    if version != WIRE_VERSION {
        return Err(FrameError::Version { found: version });
    }
    let (head, used) = bincode::serde::decode_from_slice(rest, bincode::config::standard())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    Ok((head, &rest[used..]))
}

/// Decodes the body [`unframe`] gave back.
pub fn body<T: DeserializeOwned>(rest: &[u8]) -> Result<T, FrameError> {
    decode("cluster message", rest).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Serves RPCs arriving on cluster connections.
pub trait RpcHandler: Send + Sync + 'static {
    /// Handles one RPC from `from`, the node the connection's verified certificate names.
    fn handle(&self, from: NodeCert, rpc: Rpc) -> BoxFuture<'_, RpcReply>;
}

/// How many QUIC handshakes may be under way at once on a node's endpoint; more are
/// refused (the peer retries) and logged, so a flood of unauthenticated handshakes cannot
/// take the node's memory and CPU.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// How the last contact with a peer went, as seen from this node.
#[derive(Debug, Clone, Default)]
pub struct PeerHealth {
    /// When an RPC to it last succeeded.
    pub last_ok: Option<Instant>,
    /// The last failure, if it came after the last success.
    pub last_error: Option<String>,
    /// Smoothed round trip of the connection.
    pub rtt: Option<Duration>,
}

struct Peer {
    addr: String,
    conn: quinn::Connection,
    /// The newest format it said it reads on this connection.
    speaks: Option<Format>,
}

/// Node-to-node RPC over QUIC.
pub struct QuicTransport {
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    cluster_id: u128,
    peers: Mutex<HashMap<NodeId, Peer>>,
    health: Mutex<HashMap<NodeId, PeerHealth>>,
}

impl QuicTransport {
    /// A transport dialing from `endpoint` with `client_config` (see
    /// [`crate::pki::quic_client_config`]).
    pub fn new(
        endpoint: quinn::Endpoint,
        client_config: quinn::ClientConfig,
        cluster_id: u128,
    ) -> Self {
        Self {
            endpoint,
            client_config,
            cluster_id,
            peers: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
        }
    }

    /// How the last contact with `peer` went.
    pub fn health(&self, peer: NodeId) -> Option<PeerHealth> {
        self.health.lock().expect("health lock").get(&peer).cloned()
    }

    fn record(&self, peer: NodeId, result: Result<Option<Duration>, &TransportError>) {
        let mut health = self.health.lock().expect("health lock");
        let h = health.entry(peer).or_default();
        match result {
            Ok(rtt) => {
                h.last_ok = Some(Instant::now());
                h.last_error = None;
                h.rtt = rtt;
            }
            Err(e) => h.last_error = Some(e.to_string()),
        }
    }

    async fn connection(
        &self,
        target: NodeId,
        addr: &str,
    ) -> Result<quinn::Connection, TransportError> {
        {
            let peers = self.peers.lock().expect("peers lock");
            if let Some(p) = peers.get(&target) {
                if p.addr == addr && p.conn.close_reason().is_none() {
                    return Ok(p.conn.clone());
                }
            }
        }
        let sockaddr = resolve(addr).await?;
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), sockaddr, CLUSTER_SERVER_NAME)
            .map_err(|e| TransportError::Unreachable(format!("{addr}: {e}")))?;
        let conn = connecting
            .await
            .map_err(|e| TransportError::Unreachable(explain_connection_error(addr, &e)))?;
        if let Err(why) = check_dialed_node(&conn, self.cluster_id, target) {
            conn.close(1u32.into(), b"not the node dialed");
            return Err(TransportError::Unreachable(format!("{addr}: {why}")));
        }
        self.peers.lock().expect("peers lock").insert(
            target,
            Peer {
                addr: addr.to_owned(),
                conn: conn.clone(),
                speaks: None,
            },
        );
        Ok(conn)
    }

    fn forget(&self, target: NodeId) {
        self.peers.lock().expect("peers lock").remove(&target);
    }

    async fn call_inner(
        &self,
        target: NodeId,
        node: &ClusterNode,
        rpc: Rpc,
    ) -> Result<(RpcReply, Duration), TransportError> {
        let conn = self.connection(target, &node.addr).await?;
        let envelope = Envelope {
            cluster_id: self.cluster_id,
            speaks: Format::CURRENT,
            needs: rpc.format(),
            rpc,
        };
        let reply = self.exchange(target, node, &conn, &envelope).await;
        if let Err(TransportError::Unreachable(_)) = &reply {
            self.forget(target);
        }
        Ok((reply?, conn.rtt()))
    }

    /// One request and its reply on a new stream; notes what the peer speaks.
    async fn exchange(
        &self,
        target: NodeId,
        node: &ClusterNode,
        conn: &quinn::Connection,
        envelope: &Envelope,
    ) -> Result<RpcReply, TransportError> {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| TransportError::Unreachable(e.to_string()))?;
        write_bytes(&mut send, &frame(envelope)?).await?;
        let bytes = read_bytes(&mut recv, MAX_CLUSTER_MESSAGE).await?;
        let protocol = |e: FrameError| TransportError::Protocol(format!("{node}: {e}"));
        let (head, rest) = unframe::<ReplyHead>(&bytes).map_err(protocol)?;
        if let Some(p) = self.peers.lock().expect("peers lock").get_mut(&target) {
            if p.conn.stable_id() == conn.stable_id() {
                p.speaks = Some(head.speaks);
            }
        }
        if head.needs > Format::CURRENT {
            return Err(TransportError::Protocol(format!(
                "the reply from {node} is format {}, this build reads up to {}: upgrade this node",
                head.needs,
                Format::CURRENT
            )));
        }
        body(rest).map_err(protocol)
    }
}

impl Transport for QuicTransport {
    fn peer_format(&self, peer: NodeId) -> Option<Format> {
        let peers = self.peers.lock().expect("peers lock");
        let p = peers.get(&peer)?;
        // A closed connection's word no longer counts: the peer may have restarted as
        // another build.
        p.conn
            .close_reason()
            .is_none()
            .then_some(p.speaks)
            .flatten()
    }

    fn call<'a>(
        &'a self,
        target: NodeId,
        node: &'a ClusterNode,
        rpc: Rpc,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<RpcReply, TransportError>> {
        Box::pin(async move {
            let result =
                match tokio::time::timeout(timeout, self.call_inner(target, node, rpc)).await {
                    Ok(r) => r,
                    Err(_) => Err(TransportError::Timeout(timeout)),
                };
            match result {
                Ok((RpcReply::TooNew { needs, reads }, _)) => {
                    let e = TransportError::Unsupported(FormatLag {
                        node: target,
                        name: node.name.clone(),
                        reads: Some(reads),
                        needs,
                    });
                    self.record(target, Err(&e));
                    Err(e)
                }
                Ok((RpcReply::Refused(why), _)) => {
                    let e = TransportError::Protocol(format!("refused by {node}: {why}"));
                    self.record(target, Err(&e));
                    Err(e)
                }
                Ok((reply, rtt)) => {
                    self.record(target, Ok(Some(rtt)));
                    Ok(reply)
                }
                Err(e) => {
                    self.record(target, Err(&e));
                    Err(e)
                }
            }
        })
    }
}

/// Checks that a dialed connection's server is node `target` of cluster `cluster_id` by its
/// certificate (an address that now belongs to another node, or a node that answers for
/// another, is not talked to).
pub fn check_dialed_node(
    conn: &quinn::Connection,
    cluster_id: u128,
    target: NodeId,
) -> Result<NodeCert, String> {
    let node = peer_node(conn).map_err(str::to_owned)?;
    if node.cluster_id != cluster_id {
        return Err(format!(
            "the peer belongs to cluster {:032x}, not {cluster_id:032x}",
            node.cluster_id
        ));
    }
    if node.id != target {
        return Err(format!(
            "the peer's certificate says it is {node}, it was dialed as node {target}"
        ));
    }
    Ok(node)
}

/// Resolves `host:port` to a socket address.
pub async fn resolve(addr: &str) -> Result<SocketAddr, TransportError> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| TransportError::Unreachable(format!("{addr}: cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| TransportError::Unreachable(format!("{addr}: the name has no address")))
}

fn explain_connection_error(addr: &str, e: &quinn::ConnectionError) -> String {
    let s = e.to_string();
    if s.contains("UnknownIssuer") || s.contains("BadSignature") || s.contains("certificate") {
        format!("{addr}: TLS handshake failed, the peer's certificate is not from this cluster's CA (a node of another cluster?): {s}")
    } else if matches!(e, quinn::ConnectionError::TimedOut) {
        format!("{addr}: no answer (node down or unreachable)")
    } else {
        format!("{addr}: {s}")
    }
}

/// Sends one message on a new stream of `conn` and reads the reply (at most `limit` bytes).
pub async fn request<Q: Serialize, A: DeserializeOwned>(
    conn: &quinn::Connection,
    message: &Q,
    limit: usize,
) -> Result<A, TransportError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| TransportError::Unreachable(e.to_string()))?;
    write_message(&mut send, message).await?;
    read_message(&mut recv, limit).await
}

/// Writes one message and finishes the stream.
pub async fn write_message<T: Serialize>(
    send: &mut quinn::SendStream,
    message: &T,
) -> Result<(), TransportError> {
    let bytes = encode("message", message).map_err(|e| TransportError::Protocol(e.to_string()))?;
    write_bytes(send, &bytes).await
}

/// Reads one message (the rest of the stream, at most `limit` bytes).
pub async fn read_message<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<T, TransportError> {
    let bytes = read_bytes(recv, limit).await?;
    decode("message", &bytes).map_err(|e| TransportError::Protocol(e.to_string()))
}

async fn write_bytes(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), TransportError> {
    send.write_all(bytes)
        .await
        .map_err(|e| TransportError::Unreachable(e.to_string()))?;
    send.finish()
        .map_err(|e| TransportError::Unreachable(e.to_string()))?;
    Ok(())
}

async fn read_bytes(recv: &mut quinn::RecvStream, limit: usize) -> Result<Vec<u8>, TransportError> {
    recv.read_to_end(limit).await.map_err(|e| match e {
        quinn::ReadToEndError::TooLong => {
            TransportError::Protocol(format!("message larger than {limit} bytes"))
        }
        quinn::ReadToEndError::Read(e) => TransportError::Unreachable(e.to_string()),
    })
}

/// Serves connections on a different ALPN than node-to-node RPC (the node's join service).
pub trait OtherAlpn: Send + Sync + 'static {
    /// The ALPN it serves.
    fn alpn(&self) -> &'static [u8];
    /// Serves one connection until it closes.
    fn serve(self: Arc<Self>, conn: quinn::Connection) -> BoxFuture<'static, ()>;
}

/// Accepts connections on a node's endpoint until it closes: node-to-node RPC (ALPN
/// `warren-cluster/1`, which requires a node certificate from the cluster CA) goes to
/// `handler`, connections with another service's ALPN to that service, anything else is
/// closed.
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    cluster_id: u128,
    handler: Arc<dyn RpcHandler>,
    others: Vec<Arc<dyn OtherAlpn>>,
) {
    let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut last_refusal_log: Option<Instant> = None;
    while let Some(incoming) = endpoint.accept().await {
        if pending.load(std::sync::atomic::Ordering::Relaxed) >= MAX_PENDING_HANDSHAKES {
            if last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                last_refusal_log = Some(Instant::now());
                tracing::warn!(
                    remote = %incoming.remote_address(),
                    "{MAX_PENDING_HANDSHAKES} QUIC handshakes are already under way; refusing new ones until they finish (logged at most every 10 s)"
                );
            }
            incoming.refuse();
            continue;
        }
        pending.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let handler = handler.clone();
        let others = others.clone();
        let pending = pending.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let handshake = incoming.await;
            pending.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            let conn = match handshake {
                Ok(c) => c,
                Err(e) => {
                    // A node of another cluster, a scanner, or a peer that went away.
                    tracing::debug!(%remote, "QUIC handshake failed: {e}");
                    return;
                }
            };
            let alpn = conn
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.protocol);
            match alpn.as_deref() {
                Some(crate::pki::ALPN_CLUSTER) => match cluster_caller(&conn, cluster_id) {
                    Ok(caller) => serve_cluster_connection(conn, caller, cluster_id, handler).await,
                    Err(why) => {
                        tracing::warn!(%remote, "refused a cluster connection: {why}");
                        conn.close(1u32.into(), why.as_bytes());
                    }
                },
                Some(a) => match others.iter().find(|o| o.alpn() == a) {
                    Some(other) => other.clone().serve(conn).await,
                    None => conn.close(1u32.into(), b"unknown protocol"),
                },
                None => conn.close(1u32.into(), b"unknown protocol"),
            }
        });
    }
}

/// Who may speak Raft and cluster RPC on a connection: a voter or learner of this cluster,
/// by its certificate. Relay-only nodes take no part.
fn cluster_caller(conn: &quinn::Connection, cluster_id: u128) -> Result<NodeCert, String> {
    let node = peer_node(conn).map_err(str::to_owned)?;
    if node.cluster_id != cluster_id {
        return Err(format!(
            "the certificate is for cluster {:032x}, this is {cluster_id:032x}",
            node.cluster_id
        ));
    }
    if node.role == NodeRole::Relay {
        return Err(format!("{node} is relay-only and takes no part in Raft"));
    }
    Ok(node)
}

/// Serves one authenticated cluster connection until it closes: a task per stream.
pub async fn serve_cluster_connection(
    conn: quinn::Connection,
    caller: NodeCert,
    cluster_id: u128,
    handler: Arc<dyn RpcHandler>,
) {
    // Whether this connection's peer was told (in the log) that it sends a newer format.
    let told = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer = %conn.remote_address(), "cluster connection closed: {e}");
                return;
            }
        };
        let handler = handler.clone();
        let told = told.clone();
        tokio::spawn(async move {
            let reply = match read_bytes(&mut recv, MAX_CLUSTER_MESSAGE).await {
                Ok(bytes) => answer(&bytes, caller, cluster_id, &*handler, &told).await,
                Err(e) => {
                    tracing::debug!("could not read a cluster request: {e}");
                    return;
                }
            };
            let reply = ReplyEnvelope {
                speaks: Format::CURRENT,
                needs: reply.format(),
                reply,
            };
            let sent = match frame(&reply) {
                Ok(bytes) => write_bytes(&mut send, &bytes).await,
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                tracing::debug!("could not send a reply: {e}");
            }
        });
    }
}

/// The reply to one framed request from `caller`.
async fn answer(
    bytes: &[u8],
    caller: NodeCert,
    cluster_id: u128,
    handler: &dyn RpcHandler,
    told: &std::sync::atomic::AtomicBool,
) -> RpcReply {
    let (head, rest) = match unframe::<EnvelopeHead>(bytes) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(%caller, "dropping a cluster request: {e}");
            return RpcReply::Refused(e.to_string());
        }
    };
    if head.cluster_id != cluster_id {
        return RpcReply::Refused(format!(
            "this node belongs to cluster {cluster_id:032x}, the request to cluster {:032x}",
            head.cluster_id
        ));
    }
    if head.needs > Format::CURRENT {
        // The cluster's leader refuses newer commands until every member reads them, so
        // this is a node left behind by an upgrade (or one rolled back): it stops taking
        // part rather than skip what it cannot read.
        if !told.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::error!(
                %caller,
                "{caller} sends format {} (it reads up to {}), this build reads up to {}: upgrade this node; until then it cannot follow the cluster",
                head.needs,
                head.speaks,
                Format::CURRENT
            );
        }
        return RpcReply::TooNew {
            needs: head.needs,
            reads: Format::CURRENT,
        };
    }
    match body::<Rpc>(rest) {
        Ok(rpc) => handler.handle(caller, rpc).await,
        Err(e) => {
            tracing::warn!(%caller, "dropping a malformed cluster request: {e}");
            RpcReply::Refused(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    impl RpcHandler for Echo {
        fn handle(&self, _from: NodeCert, rpc: Rpc) -> BoxFuture<'_, RpcReply> {
            Box::pin(async move { RpcReply::Refused(format!("handled {}", rpc.name())) })
        }
    }

    fn caller() -> NodeCert {
        NodeCert {
            cluster_id: 7,
            id: NodeId(2),
            role: NodeRole::Voter,
        }
    }

    fn envelope(needs: Format) -> Vec<u8> {
        frame(&Envelope {
            cluster_id: 7,
            speaks: needs,
            needs,
            rpc: Rpc::Status,
        })
        .expect("frame")
    }

    async fn answer_to(bytes: &[u8]) -> RpcReply {
        let told = std::sync::atomic::AtomicBool::new(false);
        answer(bytes, caller(), 7, &Echo, &told).await
    }

    #[test]
    fn a_framed_message_reads_back_head_first() {
        let bytes = envelope(Format::V1);
        assert_eq!(&bytes[..3], b"WR\x01");
        let (head, rest) = unframe::<EnvelopeHead>(&bytes).expect("head");
        assert_eq!(
            head,
            EnvelopeHead {
                cluster_id: 7,
                speaks: Format::V1,
                needs: Format::V1,
            }
        );
        assert!(matches!(body::<Rpc>(rest), Ok(Rpc::Status)));
        let reply = frame(&ReplyEnvelope {
            speaks: Format::CURRENT,
            needs: Format::V1,
            reply: RpcReply::Refused("no".into()),
        })
        .expect("frame");
        let (head, rest) = unframe::<ReplyHead>(&reply).expect("head");
        assert_eq!(head.speaks, Format::CURRENT);
        assert!(matches!(body::<RpcReply>(rest), Ok(RpcReply::Refused(w)) if w == "no"));
    }

    #[test]
    fn garbage_and_a_newer_framing_are_told_apart() {
        assert_eq!(
            unframe::<EnvelopeHead>(b"GET / HTTP/1.1\r\n").unwrap_err(),
            FrameError::Garbage
        );
        assert_eq!(
            unframe::<EnvelopeHead>(b"").unwrap_err(),
            FrameError::Garbage
        );
        let mut newer = envelope(Format::V1);
        newer[2] = WIRE_VERSION + 1;
        let e = unframe::<EnvelopeHead>(&newer).unwrap_err();
        assert_eq!(
            e,
            FrameError::Version {
                found: WIRE_VERSION + 1
            }
        );
        assert!(e.to_string().contains("upgrade this node"), "{e}");
    }

    #[tokio::test]
    async fn a_request_of_a_newer_format_is_refused_before_it_is_decoded() {
        let newer = Format(Format::CURRENT.0 + 1);
        // The body after the head is not even an `Rpc` of this build: it is never read.
        let mut bytes = envelope(newer);
        bytes.truncate(bytes.len() - 1);
        bytes.extend_from_slice(&[0xfe, 0xfe, 0xfe]);
        match answer_to(&bytes).await {
            RpcReply::TooNew { needs, reads } => {
                assert_eq!((needs, reads), (newer, Format::CURRENT));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            answer_to(&envelope(Format::V1)).await,
            RpcReply::Refused(w) if w == "handled status"
        ));
        let mut other_cluster = envelope(Format::V1);
        other_cluster[3] ^= 1;
        assert!(matches!(
            answer_to(&other_cluster).await,
            RpcReply::Refused(w) if w.contains("belongs to cluster")
        ));
    }
}
