//! The node's end of an agent tunnel, up to the hand-over: checks the agent's certificate
//! and hello, then gives the connection and its control stream to the `tunnels` actor
//! (`super::tunnels`), whose child for the tunnel pushes the configuration and reads
//! health. The node opens a stream per proxied connection on the connection itself.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use warren_consensus::pki::{peer_kind, Peer};
use warren_consensus::quic::OtherAlpn;
use warren_consensus::registry::Registry;
use warren_proto::registry::{Route, Site};
use warren_proto::tunnel::io::read_frame_body;
use warren_proto::tunnel::{
    FrameError, PeerProtocol, SiteConfig, TargetSpec, ALPN_AGENT, CLOSE_BAD_HELLO, MAX_CONTROL,
};
use warren_proto::Name;

use super::{Handover, Sites, TunnelsMsg, CLOSE_TUNNEL_LOST};

/// Serves `warren-agent/1`.
pub struct AgentService {
    /// The node's site service.
    pub sites: Arc<Sites>,
}

/// What the agent of `site` should know now; `None` if the site is gone.
pub fn site_config(reg: &Registry, site: &Name) -> Option<SiteConfig> {
    let _: &Site = reg.sites().get(site)?;
    let mut targets: Vec<TargetSpec> = Vec::new();
    for res in reg.resources().values() {
        if res.site.as_ref() != Some(site) {
            continue;
        }
        let check = match res.route {
            Route::Http { .. } => res.http.health_check.clone(),
            Route::Tcp { .. } | Route::Udp { .. } | Route::Private { .. } => None,
        };
        for t in &res.targets {
            if let Some(existing) = targets.iter_mut().find(|x| x.target == *t) {
                if existing.check.is_none() {
                    existing.check = check.clone();
                }
            } else {
                targets.push(TargetSpec {
                    target: t.clone(),
                    check: check.clone(),
                });
            }
        }
    }
    let nodes = reg
        .member_grade_nodes()
        .map(|n| n.cluster_addr.clone())
        .collect();
    Some(SiteConfig {
        site: site.clone(),
        targets,
        nodes,
    })
}

impl OtherAlpn for AgentService {
    fn alpn(&self) -> &'static [u8] {
        ALPN_AGENT
    }

    fn serve(self: Arc<Self>, conn: quinn::Connection) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let remote = conn.remote_address();
            let Peer::Site(site) = peer_kind(&conn) else {
                tracing::warn!(%remote, "agent connection without a site certificate");
                conn.close(1u32.into(), b"a site certificate is required");
                return;
            };
            if !self.sites.cluster.registry().sites().contains_key(&site) {
                tracing::warn!(%remote, %site, "agent of a site that does not exist");
                conn.close(2u32.into(), b"the site does not exist");
                return;
            }
            let Ok(Ok((send, mut recv))) =
                tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await
            else {
                return;
            };
            let agent = match tokio::time::timeout(
                Duration::from_secs(10),
                read_frame_body(&mut recv, MAX_CONTROL),
            )
            .await
            {
                Ok(Ok(Some(body))) => PeerProtocol::from_agent_hello(&body),
                Ok(Ok(None)) => Err(FrameError::Truncated),
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    tracing::debug!(%site, %remote, "no hello within 10 s");
                    // Not CLOSE_BAD_HELLO: that one tells an agent to greet the old way.
                    conn.close(4u32.into(), b"no hello in time");
                    return;
                }
            };
            let agent = match agent {
                Ok(agent) => agent,
                Err(e) => {
                    tracing::warn!(%site, %remote, "agent connection without a hello: {e}");
                    conn.close(CLOSE_BAD_HELLO.into(), b"expected a hello");
                    return;
                }
            };
            let Some(tunnels) = self.sites.tunnels.actor() else {
                tracing::warn!(%site, %remote, "refused an agent: the node's tunnel table is restarting");
                conn.close(
                    CLOSE_TUNNEL_LOST.into(),
                    b"the node's tunnel table is restarting; dial again",
                );
                return;
            };
            let handover = Handover {
                site: site.clone(),
                conn: conn.clone(),
                send,
                recv,
                agent,
            };
            // From here the tunnel is the `tunnels` actor's (which logs it as connected):
            // its child pushes the configuration, reads health and closes the connection
            // when it ends.
            if tunnels
                .cast(TunnelsMsg::Connected(Box::new(handover)))
                .is_err()
            {
                conn.close(
                    CLOSE_TUNNEL_LOST.into(),
                    b"the node's tunnel table is restarting; dial again",
                );
                tracing::warn!(%site, %remote, "refused an agent: the node's tunnel table is restarting");
            }
        })
    }
}
