//! The [`Transport`] over QUIC with mutual TLS.
//!
//! Each node has one QUIC endpoint (UDP, default port 7400) that both accepts and dials.
//! A connection per peer is kept and reused; each RPC is one bidirectional stream carrying
//! one bincode [`Envelope`] and, back, one bincode [`RpcReply`]; the end of the stream
//! delimits the message. Both sides cap what they read.
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

use crate::pki::{peer_node, NodeCert, CLUSTER_SERVER_NAME};
use crate::registry::{decode, encode};
use crate::transport::{BoxFuture, Rpc, RpcReply, Transport, TransportError};
use crate::types::ClusterNode;
use warren_proto::registry::NodeRole;

/// Largest message read from an authenticated peer (snapshots included), in bytes.
pub const MAX_CLUSTER_MESSAGE: usize = 256 << 20;

/// What travels on a cluster stream: the RPC and the cluster it is meant for. Who sends it
/// is not in it: that comes from the connection's certificate.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// The sender's cluster.
    pub cluster_id: u128,
    /// The request.
    pub rpc: Rpc,
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
            rpc,
        };
        let reply = request::<_, RpcReply>(&conn, &envelope, MAX_CLUSTER_MESSAGE).await;
        if let Err(TransportError::Unreachable(_)) = &reply {
            self.forget(target);
        }
        Ok((reply?, conn.rtt()))
    }
}

impl Transport for QuicTransport {
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
    send.write_all(&bytes)
        .await
        .map_err(|e| TransportError::Unreachable(e.to_string()))?;
    send.finish()
        .map_err(|e| TransportError::Unreachable(e.to_string()))?;
    Ok(())
}

/// Reads one message (the rest of the stream, at most `limit` bytes).
pub async fn read_message<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<T, TransportError> {
    let bytes = recv.read_to_end(limit).await.map_err(|e| match e {
        quinn::ReadToEndError::TooLong => {
            TransportError::Protocol(format!("message larger than {limit} bytes"))
        }
        quinn::ReadToEndError::Read(e) => TransportError::Unreachable(e.to_string()),
    })?;
    decode("message", &bytes).map_err(|e| TransportError::Protocol(e.to_string()))
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
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer = %conn.remote_address(), "cluster connection closed: {e}");
                return;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let reply = match read_message::<Envelope>(&mut recv, MAX_CLUSTER_MESSAGE).await {
                Ok(env) if env.cluster_id != cluster_id => RpcReply::Refused(format!(
                    "this node belongs to cluster {cluster_id:032x}, the request to cluster {:032x}",
                    env.cluster_id
                )),
                Ok(env) => handler.handle(caller, env.rpc).await,
                Err(e) => {
                    tracing::warn!("dropping a malformed cluster request: {e}");
                    RpcReply::Refused(format!("malformed request: {e}"))
                }
            };
            if let Err(e) = write_message(&mut send, &reply).await {
                tracing::debug!("could not send a reply: {e}");
            }
        });
    }
}
