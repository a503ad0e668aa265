//! Node to node: data streams relayed to the node holding a site's tunnel, and the
//! announcements of which sites each node holds (passed to the `gossip` actor, which
//! also sends this node's).

use std::sync::Arc;

use futures::future::BoxFuture;
use warren_consensus::pki::{peer_node, NodeCert};
use warren_consensus::quic::OtherAlpn;
use warren_proto::registry::NodeRole;
use warren_proto::tunnel::io::{read_frame, write_frame};
use warren_proto::tunnel::{Held, Open, Opened, ALPN_RELAY, MAX_CONTROL, MAX_HEADER};

use super::{open_on, GossipMsg, OpenError, Sites};

/// Serves `warren-relay/1`.
pub struct RelayService {
    /// The node's site service.
    pub sites: Arc<Sites>,
}

impl OtherAlpn for RelayService {
    fn alpn(&self) -> &'static [u8] {
        ALPN_RELAY
    }

    fn serve(self: Arc<Self>, conn: quinn::Connection) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            // Who is speaking comes from the certificate: a peer can only ever say what it
            // holds itself.
            let peer = match relay_peer(&conn, self.sites.cluster_id) {
                Ok(p) => p,
                Err(why) => {
                    tracing::warn!(remote = %conn.remote_address(), "refused a relay connection: {why}");
                    conn.close(1u32.into(), why.as_bytes());
                    return;
                }
            };
            loop {
                tokio::select! {
                    bi = conn.accept_bi() => {
                        let Ok((send, recv)) = bi else { return };
                        tokio::spawn(relay_stream(self.sites.clone(), send, recv));
                    }
                    uni = conn.accept_uni() => {
                        let Ok(mut recv) = uni else { return };
                        let sites = self.sites.clone();
                        tokio::spawn(async move {
                            let Ok(Some(held)) = read_frame::<_, Held>(&mut recv, MAX_CONTROL).await else {
                                return;
                            };
                            // While `gossip` restarts the word is dropped; the peer says
                            // it again within a second.
                            if let Some(gossip) = sites.gossip.actor() {
                                let _ = gossip.cast(GossipMsg::Held(peer.id, held.sites));
                            }
                        });
                    }
                }
            }
        })
    }
}

/// The node on the far end of a relay connection, by its certificate: a voter or learner
/// of this cluster. Relay-only nodes carry ciphertext only: they neither reach site targets
/// (plaintext) through this node nor hold agent tunnels.
fn relay_peer(conn: &quinn::Connection, cluster_id: u128) -> Result<NodeCert, String> {
    let node = peer_node(conn).map_err(str::to_owned)?;
    if node.cluster_id != cluster_id {
        return Err(format!(
            "the certificate is for cluster {:032x}, not this one",
            node.cluster_id
        ));
    }
    if node.role == NodeRole::Relay {
        return Err(format!("{node} is relay-only and reaches no site targets"));
    }
    Ok(node)
}

/// Passes a peer's data stream on to a tunnel this node holds (never a second hop).
async fn relay_stream(sites: Arc<Sites>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let Ok(Some(header)) = read_frame::<_, Open>(&mut recv, MAX_HEADER).await else {
        return;
    };
    let tunnels: Vec<quinn::Connection> = sites
        .local
        .load()
        .tunnels(&header.site)
        .iter()
        .map(|t| t.handle().clone())
        .collect();
    for conn in tunnels {
        match open_on(&conn, &header).await {
            Ok(raw) => {
                let mut upstream = sites.counted(&header.site, raw);
                if write_frame(&mut send, &Opened::Ok).await.is_err() {
                    return;
                }
                let mut here = tokio::io::join(recv, send);
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut here,
                    &mut upstream,
                    super::COPY_BUF,
                    super::COPY_BUF,
                )
                .await;
                return;
            }
            Err(OpenError::Refused(why)) => {
                let _ = write_frame(&mut send, &Opened::Refused(why)).await;
                return;
            }
            Err(_) => continue,
        }
    }
    // No tunnel here (any more): reset, so the asking node tries another holder.
    let _ = send.reset(1u32.into());
}
