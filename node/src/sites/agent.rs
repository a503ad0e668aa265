//! The node's end of an agent tunnel: a control stream (configuration out, health in)
//! and the connection itself, on which the node opens a stream per proxied connection.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use warren_consensus::pki::{peer_kind, Peer};
use warren_consensus::quic::OtherAlpn;
use warren_consensus::registry::Registry;
use warren_proto::registry::{Route, Site};
use warren_proto::tunnel::io::{read_frame, write_frame};
use warren_proto::tunnel::{
    FromAgent, Hello, SiteConfig, TargetSpec, ToAgent, ALPN_AGENT, MAX_CONTROL,
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
            match read_frame::<_, Hello>(&mut recv, MAX_CONTROL).await {
                Ok(Some(hello)) => {
                    tracing::info!(%site, %remote, version = %hello.version, "agent connected")
                }
                _ => {
                    conn.close(3u32.into(), b"expected a hello");
                    return;
                }
            }
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
                async move {
                    let mut rx = sites.cluster.subscribe();
                    let mut last = None;
                    loop {
                        let reg = rx.borrow_and_update().clone();
                        let Some(config) = site_config(&reg, &site) else {
                            conn.close(2u32.into(), b"the site was deleted");
                            return;
                        };
                        if last.as_ref() != Some(&config) {
                            if write_frame(&mut send, &ToAgent::Config(config.clone()))
                                .await
                                .is_err()
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
                    while let Ok(Some(msg)) =
                        read_frame::<_, FromAgent>(&mut recv, MAX_CONTROL).await
                    {
                        match msg {
                            FromAgent::Health(report) => sites.set_health(&site, report),
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
