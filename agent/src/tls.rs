//! TLS for the agent's QUIC connections.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The server name node certificates carry for cluster traffic.
pub const SERVER_NAME: &str = warren_proto::identity::CLUSTER_SERVER_NAME;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(
        Duration::from_secs(5)
            .try_into()
            .expect("5 s fits a QUIC idle timeout"),
    ));
    t.max_concurrent_bidi_streams(4096u32.into());
    t
}

fn quic(mut tls: rustls::ClientConfig, alpn: &[u8]) -> anyhow::Result<quinn::ClientConfig> {
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| anyhow::anyhow!("QUIC TLS: {e}"))?;
    let mut c = quinn::ClientConfig::new(Arc::new(quic));
    c.transport_config(Arc::new(transport()));
    Ok(c)
}

/// For enrollment: trusts a voter or learner of cluster `cluster_id` whose chain holds the
/// CA the token pins, presents nothing.
pub fn enroll_config(
    ca_fingerprint: [u8; 32],
    cluster_id: u128,
) -> anyhow::Result<quinn::ClientConfig> {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NodeVerifier {
            ca: Trust::Pinned(ca_fingerprint),
            cluster_id,
        }))
        .with_no_client_auth();
    quic(tls, warren_proto::tunnel::ALPN_ENROLL)
}

/// For tunnels: trusts a voter or learner of cluster `cluster_id` certified by the cluster
/// CA `ca`, presents the site certificate.
pub fn tunnel_config(
    ca: CertificateDer<'static>,
    cluster_id: u128,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<quinn::ClientConfig> {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NodeVerifier {
            ca: Trust::Ca(ca),
            cluster_id,
        }))
        .with_client_auth_cert(chain, key)?;
    quic(tls, warren_proto::tunnel::ALPN_AGENT)
}

/// Which CA a node's certificate must chain to.
#[derive(Debug)]
enum Trust {
    /// The CA certificate itself (from enrollment).
    Ca(CertificateDer<'static>),
    /// A CA in the server's chain with this SHA-256 fingerprint (the site token's pin).
    Pinned([u8; 32]),
}

/// Accepts a server certificate that the trusted CA signed for the cluster server name and
/// that names a voter or learner of the agent's cluster: the agent's traffic is plaintext
/// at the node, so a relay-only node (which may be another operator's) is never a tunnel
/// end, nor is a certificate without a node identity.
#[derive(Debug)]
struct NodeVerifier {
    ca: Trust,
    cluster_id: u128,
}

impl NodeVerifier {
    /// Whether the leaf's identity may carry this agent's tunnels.
    fn check_identity(&self, end_entity: &[u8]) -> Result<(), rustls::Error> {
        use warren_proto::identity::{classify, Peer};
        use warren_proto::registry::NodeRole;
        match classify(end_entity) {
            Peer::Node(n) if n.cluster_id != self.cluster_id => {
                Err(rustls::Error::General(format!(
                    "the node belongs to cluster {:032x}, this site to {:032x}",
                    n.cluster_id, self.cluster_id
                )))
            }
            Peer::Node(n) if n.role == NodeRole::Relay => Err(rustls::Error::General(format!(
                "{n} is relay-only: site tunnels end only at voters and learners"
            ))),
            Peer::Node(_) => Ok(()),
            _ => Err(rustls::Error::General(
                "the server's certificate names no node of the cluster".into(),
            )),
        }
    }
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = match &self.ca {
            Trust::Ca(ca) => ca.clone(),
            Trust::Pinned(fingerprint) => intermediates
                .iter()
                .find(|c| warren_proto::token::fingerprint(c) == *fingerprint)
                .ok_or_else(|| {
                    rustls::Error::General(
                        "the node's CA is not the one the site token names (another cluster?)"
                            .into(),
                    )
                })?
                .clone()
                .into_owned(),
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(ca)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified = inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)?;
        self.check_identity(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_proto::identity::NodeCert;
    use warren_proto::registry::{NodeId, NodeRole};

    fn cert(uri: Option<String>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).unwrap();
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.try_into().unwrap()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn node(cluster_id: u128, role: NodeRole) -> Vec<u8> {
        cert(Some(
            NodeCert {
                cluster_id,
                id: NodeId(2),
                role,
            }
            .uri(),
        ))
    }

    /// Tunnels and enrollment end only at voters and learners of the site's own cluster.
    #[test]
    fn only_members_of_the_cluster_carry_tunnels() {
        let v = NodeVerifier {
            ca: Trust::Pinned([0; 32]),
            cluster_id: 7,
        };
        assert!(v.check_identity(&node(7, NodeRole::Voter)).is_ok());
        assert!(v.check_identity(&node(7, NodeRole::Learner)).is_ok());
        let relay = v.check_identity(&node(7, NodeRole::Relay)).unwrap_err();
        assert!(relay.to_string().contains("relay-only"), "{relay}");
        let other = v.check_identity(&node(8, NodeRole::Voter)).unwrap_err();
        assert!(other.to_string().contains("cluster"), "{other}");
        assert!(v.check_identity(&cert(None)).is_err(), "no identity");
    }
}
