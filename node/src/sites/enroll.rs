//! Enrollment: an agent trades a one-time site token for a site certificate.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use warren_consensus::quic::OtherAlpn;
use warren_consensus::registry::{Command, Outcome};
use warren_consensus::types::{Actor as Who, Request};
use warren_proto::token::SiteToken;
use warren_proto::tunnel::io::{read_frame, write_frame};
use warren_proto::tunnel::{Enroll, Enrolled, ALPN_ENROLL, MAX_CONTROL};

use super::Sites;

/// Serves `warren-enroll/1`.
pub struct EnrollService {
    /// The node's site service.
    pub sites: Arc<Sites>,
}

impl OtherAlpn for EnrollService {
    fn alpn(&self) -> &'static [u8] {
        ALPN_ENROLL
    }

    fn serve(self: Arc<Self>, conn: quinn::Connection) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let Ok(Ok((mut send, mut recv))) =
                tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await
            else {
                return;
            };
            let reply = match read_frame::<_, Enroll>(&mut recv, MAX_CONTROL).await {
                Ok(Some(req)) => self.enroll(req, conn.remote_address()).await,
                Ok(None) => return,
                Err(e) => Enrolled::Refused(format!("malformed request: {e}")),
            };
            let _ = write_frame(&mut send, &reply).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        })
    }
}

impl EnrollService {
    async fn enroll(&self, req: Enroll, from: std::net::SocketAddr) -> Enrolled {
        let refused = |why: &str| {
            tracing::warn!(%from, "agent enrollment refused: {why}");
            Enrolled::Refused(why.to_owned())
        };
        let token = match SiteToken::parse(&req.token) {
            Ok(t) => t,
            Err(e) => return refused(&format!("not a site token: {e}")),
        };
        let sites = &self.sites;
        if token.cluster_id != sites.cluster_id {
            return refused("the token belongs to another cluster");
        }
        let reg = sites.cluster.registry();
        let known = reg
            .site_tokens()
            .get(&token.token_id)
            .is_some_and(|r| r.hash.matches(token.secret()));
        if !known {
            return refused("the site token is unknown or was already used");
        }
        if sites.ca.key_pem().is_none() {
            return refused("this node cannot sign certificates; enroll through a voting node");
        }
        if req.csr_pem.len() > 16 * 1024
            || rcgen::CertificateSigningRequestParams::from_pem(&req.csr_pem).is_err()
        {
            return refused("the certificate request does not parse");
        }
        let consume = Request::new(
            Who::System,
            Command::ConsumeSiteToken { id: token.token_id },
        );
        let site = match sites.cluster.write(consume).await {
            Ok(Ok(Outcome::SiteEnrolled { site })) => site,
            Ok(Ok(other)) => return refused(&format!("unexpected answer: {other:?}")),
            Ok(Err(e)) => return refused(&e.to_string()),
            Err(e) => return refused(&format!("the cluster is unavailable: {e}")),
        };
        match sites.ca.sign_site(&req.csr_pem, &site) {
            Ok(Some(cert_pem)) => {
                tracing::info!(%site, %from, "agent enrolled");
                Enrolled::Ok {
                    site,
                    cluster_id: sites.cluster_id,
                    cert_pem,
                    ca_pem: sites.ca.cert_pem().to_owned(),
                }
            }
            Ok(None) => refused("this node cannot sign certificates"),
            Err(e) => refused(&format!("signing failed: {e}")),
        }
    }
}
