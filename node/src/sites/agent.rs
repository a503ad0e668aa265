//! The node's end of an agent tunnel: a control stream (configuration out, health in)
//! and the connection itself, on which the node opens a stream per proxied connection.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use warren_consensus::pki::{peer_kind, Peer};
use warren_consensus::quic::OtherAlpn;
use warren_consensus::registry::Registry;
use warren_proto::registry::{Route, Site};
use warren_proto::tunnel::io::{read_frame_body, read_message, write_message};
use warren_proto::tunnel::{
    FrameError, FromAgent, Hello, PeerProtocol, SiteConfig, TargetSpec, ToAgent, Unknowns,
    ALPN_AGENT, CLOSE_BAD_HELLO, MAX_CONTROL,
};
use warren_proto::Name;

use super::{Sites, Tunnel};

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
            Route::Tcp { .. } | Route::Udp { .. } => None,
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
        .nodes()
        .values()
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
            let Ok(Ok((mut send, mut recv))) =
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
            tracing::info!(
                %site, %remote, protocol = agent.version, version = %agent.software,
                features = ?agent.features, "agent connected"
            );
            let id = rand::random();
            self.sites.add_tunnel(
                &site,
                Tunnel {
                    id,
                    conn: conn.clone(),
                },
            );
            let pusher = {
                let sites = self.sites.clone();
                let site = site.clone();
                let conn = conn.clone();
                let agent = agent.clone();
                async move {
                    let hello = ToAgent::Hello(Hello::ours());
                    if agent.accepts(&hello) && write_message(&mut send, &hello).await.is_err() {
                        return;
                    }
                    let mut rx = sites.cluster.subscribe();
                    let mut last = None;
                    loop {
                        let reg = rx.borrow_and_update().clone();
                        let Some(config) = site_config(&reg, &site) else {
                            conn.close(2u32.into(), b"the site was deleted");
                            return;
                        };
                        if last.as_ref() != Some(&config) {
                            let msg = ToAgent::Config(config.clone());
                            if agent.accepts(&msg) && write_message(&mut send, &msg).await.is_err()
                            {
                                return;
                            }
                            last = Some(config);
                        }
                        if rx.changed().await.is_err() {
                            return;
                        }
                    }
                }
            };
            let reader = {
                let sites = self.sites.clone();
                let site = site.clone();
                async move {
                    let mut unknowns = Unknowns::default();
                    loop {
                        match read_message::<_, FromAgent>(&mut recv, MAX_CONTROL).await {
                            Ok(Some(FromAgent::Health(report))) => sites.set_health(&site, report),
                            Ok(Some(FromAgent::Hello(_))) => {
                                tracing::debug!(%site, "ignoring a second hello from an agent");
                            }
                            Ok(Some(FromAgent::Unknown { tag })) => {
                                if unknowns.note() {
                                    tracing::info!(%site, tag, "skipping a message this node does not know (a newer agent); later ones are logged at debug");
                                } else {
                                    tracing::debug!(%site, tag, skipped = unknowns.count(), "skipping an unknown message");
                                }
                            }
                            Ok(None) => return,
                            Err(e) => {
                                tracing::warn!(%site, "agent control stream: {e}");
                                return;
                            }
                        }
                    }
                }
            };
            tokio::select! {
                () = pusher => {}
                () = reader => {}
                _ = conn.closed() => {}
            }
            self.sites.remove_tunnel(&site, id);
            let why = conn
                .close_reason()
                .map_or_else(|| "control stream ended".to_owned(), |r| r.to_string());
            tracing::info!(%site, %remote, "agent disconnected: {why}");
            conn.close(0u32.into(), b"bye");
        })
    }
}
