//! The node's QUIC endpoint: one UDP socket, connections told apart by ALPN.
//!
//! - `warren-cluster/1`: other nodes, authenticated by a certificate from the cluster CA;
//!   each stream is one Raft or forwarding RPC, served by the [`Cluster`] handle.
//! - `warren-join/1`: a node that is joining, authenticated only by its join token.

use std::sync::Arc;

use warren_consensus::cluster::Cluster;
use warren_consensus::pki::{ALPN_CLUSTER, ALPN_JOIN};
use warren_consensus::quic::serve_cluster_connection;

use crate::join::JoinService;

/// Accepts connections until the endpoint closes.
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    cluster: Cluster,
    cluster_id: u128,
    join: Arc<JoinService>,
) {
    let handler: Arc<dyn warren_consensus::quic::RpcHandler> = Arc::new(cluster);
    while let Some(incoming) = endpoint.accept().await {
        let handler = handler.clone();
        let join = join.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
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
                Some(ALPN_CLUSTER) if conn.peer_identity().is_some() => {
                    serve_cluster_connection(conn, cluster_id, handler).await;
                }
                Some(ALPN_CLUSTER) => {
                    tracing::debug!(%remote, "cluster connection without a certificate");
                    conn.close(1u32.into(), b"a cluster certificate is required");
                }
                Some(ALPN_JOIN) => join.serve(conn).await,
                _ => conn.close(1u32.into(), b"unknown protocol"),
            }
        });
    }
}
