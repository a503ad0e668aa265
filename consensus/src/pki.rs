//! The cluster's public key infrastructure.
//!
//! `warren-node init` creates a cluster CA; every node gets a certificate from it, used for
//! mutual TLS between nodes (QUIC) and for the admin API (HTTPS). A joining node sends a
//! certificate signing request; the node that admits it signs it. The CA's private key
//! stays on voters (it is handed to a joining voter, never to a learner, which may be run
//! by another operator).
//!
//! A join token pins the CA by its SHA-256 fingerprint, so the joining node verifies the
//! cluster with [`join_client_config`] before it sends the token's secret.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use warren_proto::token::fingerprint;

pub use warren_proto::identity::{classify, NodeCert, Peer, CLUSTER_SERVER_NAME};
/// ALPN of node-to-node RPC (mutual TLS).
pub const ALPN_CLUSTER: &[u8] = b"warren-cluster/1";
/// ALPN of the join handshake (server-authenticated only; the token authenticates the client).
/// Version 2: the join token, not the joining node, decides the node's role.
pub const ALPN_JOIN: &[u8] = b"warren-join/2";

/// Why a certificate or TLS configuration could not be made; bad input or a bug.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Key or certificate generation or signing failed.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A PEM file did not parse.
    #[error("PEM: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    /// rustls refused the configuration.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn refused the TLS configuration.
    #[error("QUIC TLS: {0}")]
    Quic(String),
}

/// The cluster CA: its certificate, and its key where this node holds it.
#[derive(Clone)]
pub struct ClusterCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: Option<String>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("fingerprint", &hex::encode(self.fingerprint()))
            .field("has_key", &self.key_pem.is_some())
            .finish()
    }
}

impl ClusterCa {
    /// A new CA for cluster `cluster_id`, valid for 20 years.
    pub fn generate(cluster_id: u128) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Warren");
        dn.push(
            DnType::CommonName,
            format!("Warren cluster CA {cluster_id:032x}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time_now();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(20 * 365 * 86400);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: Some(key.serialize_pem()),
        })
    }

    /// Loads a CA from PEM; `key_pem` only where this node holds the key.
    pub fn from_pem(cert_pem: &str, key_pem: Option<String>) -> Result<Self, PkiError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            key_pem,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA key, PEM, if this node holds it.
    pub fn key_pem(&self) -> Option<&str> {
        self.key_pem.as_deref()
    }

    /// SHA-256 of the CA certificate, as join tokens pin it.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.cert_der)
    }

    /// Signs a node's CSR. The certificate's names are chosen here, not taken from the CSR:
    /// the node's identity ([`NodeCert`], as a URI name), the cluster server name,
    /// `localhost`, and the hosts the node is reached at.
    /// Returns `None` if this node does not hold the CA key.
    pub fn sign_node(
        &self,
        csr_pem: &str,
        node: NodeCert,
        node_name: &str,
        hosts: &[String],
    ) -> Result<Option<String>, PkiError> {
        let Some(key_pem) = &self.key_pem else {
            return Ok(None);
        };
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, key)?;
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Warren");
        dn.push(
            DnType::CommonName,
            format!("warren node {node_name} ({} {})", node.role, node.id),
        );
        params.distinguished_name = dn;
        let mut sans = vec![SanType::URI(node.uri().try_into()?)];
        sans.extend(node_sans(hosts)?);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time_now();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(10 * 365 * 86400);
        csr.params = params;
        Ok(Some(csr.signed_by(&issuer)?.pem()))
    }
}

impl ClusterCa {
    /// A certificate and its key (PEM) for serving the web host `host` over HTTPS, from
    /// this CA: server authentication only, the one DNS name, valid 30 days. For a cluster
    /// without ACME or an uploaded certificate for the host; the key never leaves the node
    /// that made it. `None` if this node lacks the CA key.
    pub fn issue_web(&self, host: &str) -> Result<Option<(String, String)>, PkiError> {
        let Some(ca_key_pem) = &self.key_pem else {
            return Ok(None);
        };
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, KeyPair::from_pem(ca_key_pem)?)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Warren");
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(host.to_owned().try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time_now();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(30 * 86400);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Some((cert.pem(), key.serialize_pem())))
    }
}

impl ClusterCa {
    /// Signs a site agent's CSR: client authentication only, one name,
    /// `<site>.site.warren.invalid`, valid one year. `None` if this node lacks the CA key.
    pub fn sign_site(
        &self,
        csr_pem: &str,
        site: &warren_proto::Name,
    ) -> Result<Option<String>, PkiError> {
        let Some(key_pem) = &self.key_pem else {
            return Ok(None);
        };
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, key)?;
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Warren");
        dn.push(DnType::CommonName, format!("warren agent of site {site}"));
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(
            warren_proto::tunnel::site_cert_name(site).try_into()?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time_now();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(365 * 86400);
        csr.params = params;
        Ok(Some(csr.signed_by(&issuer)?.pem()))
    }
}

/// Classifies the (CA-verified) peer certificate of `conn` (the client's on an accepted
/// connection, the server's on a dialed one) by its names: node certificates carry exactly
/// one node identity URI and the cluster server name, site certificates only their site
/// name.
pub fn peer_kind(conn: &quinn::Connection) -> Peer {
    let Some(certs) = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
    else {
        return Peer::Unknown;
    };
    match certs.first() {
        Some(leaf) => classify(leaf),
        None => Peer::Unknown,
    }
}

/// The node identity of a connection's peer, or why there is none (for a log line or a
/// close reason).
pub fn peer_node(conn: &quinn::Connection) -> Result<NodeCert, &'static str> {
    match peer_kind(conn) {
        Peer::Node(n) => Ok(n),
        Peer::NodeWithoutIdentity => Err("the node certificate carries no node identity (issued by an older version: join this node again)"),
        Peer::Site(_) => Err("a site certificate is not a node certificate"),
        Peer::Unknown => Err("a node certificate is required"),
    }
}

fn node_sans(hosts: &[String]) -> Result<Vec<SanType>, PkiError> {
    let mut names: Vec<String> = vec![
        CLUSTER_SERVER_NAME.into(),
        "localhost".into(),
        "127.0.0.1".into(),
    ];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    names
        .into_iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(n.try_into()?)),
        })
        .collect()
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A new node key and a CSR for it (PEM, PEM).
pub fn node_key_and_csr(node_name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("warren node {node_name}"));
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// A node's certificate chain (its certificate, then the CA) and key.
#[derive(Clone)]
pub struct NodeIdentity {
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeIdentity(<key redacted>)")
    }
}

impl NodeIdentity {
    /// Loads a node certificate and key (PEM) and appends the CA certificate to the chain.
    pub fn from_pem(cert_pem: &str, key_pem: &str, ca: &ClusterCa) -> Result<Self, PkiError> {
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
        Ok(Self {
            chain: vec![cert, ca.cert_der().clone()],
            key_der: key.secret_der().to_vec(),
        })
    }

    /// What this node's own certificate says it is.
    pub fn peer(&self) -> Peer {
        classify(&self.chain[0])
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::try_from(self.key_der.clone()).expect("key was parsed when loaded")
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &ClusterCa) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone())?;
    Ok(Arc::new(roots))
}

/// The QUIC server config of a node's cluster endpoint: presents the node certificate,
/// verifies client certificates against the cluster CA when given (cluster ALPN requires
/// one; the join ALPN works without).
pub fn quic_server_config(
    ca: &ClusterCa,
    me: &NodeIdentity,
) -> Result<quinn::ServerConfig, PkiError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .allow_unauthenticated()
        .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(me.chain.clone(), me.key())?;
    tls.alpn_protocols = vec![
        ALPN_CLUSTER.to_vec(),
        ALPN_JOIN.to_vec(),
        warren_proto::tunnel::ALPN_AGENT.to_vec(),
        warren_proto::tunnel::ALPN_ENROLL.to_vec(),
        warren_proto::tunnel::ALPN_RELAY.to_vec(),
        warren_proto::relay::ALPN_RELAY_FEED.to_vec(),
    ];
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| PkiError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// The QUIC client config for node-to-node RPC: verifies the peer against the cluster CA
/// and presents this node's certificate.
pub fn quic_client_config(
    ca: &ClusterCa,
    me: &NodeIdentity,
) -> Result<quinn::ClientConfig, PkiError> {
    quic_client_config_for(ca, me, ALPN_CLUSTER)
}

/// Like [`quic_client_config`] for another node-to-node ALPN (relayed data streams).
pub fn quic_client_config_for(
    ca: &ClusterCa,
    me: &NodeIdentity,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, PkiError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(me.chain.clone(), me.key())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| PkiError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// The QUIC client config a joining node uses: trusts only a CA with the pinned fingerprint,
/// presents no certificate.
pub fn join_client_config(ca_fingerprint: [u8; 32]) -> Result<quinn::ClientConfig, PkiError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            fingerprint: ca_fingerprint,
            provider: provider(),
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_JOIN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| PkiError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// The rustls config of the admin API (HTTPS): the node certificate, h2 and HTTP/1.1.
pub fn https_server_config(me: &NodeIdentity) -> Result<rustls::ServerConfig, PkiError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(me.chain.clone(), me.key())?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(
        Duration::from_secs(5)
            .try_into()
            .expect("5 s fits a QUIC idle timeout"),
    ));
    t.max_concurrent_bidi_streams(1024u32.into());
    // Unidirectional streams carry node-to-node announcements (which sites a node holds).
    t.max_concurrent_uni_streams(64u32.into());
    t
}

/// Accepts a server whose chain contains a CA with a given fingerprint and whose
/// certificate that CA signed, for the cluster server name.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the peer is not part of the cluster this join token belongs to (its CA does not match the token)"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_proto::registry::{NodeId, NodeRole};

    #[test]
    fn a_signed_node_certificate_loads_with_its_chain() {
        let ca = ClusterCa::generate(42).unwrap();
        let (key, csr) = node_key_and_csr("n1").unwrap();
        let who = NodeCert {
            cluster_id: 42,
            id: NodeId(3),
            role: NodeRole::Learner,
        };
        let cert = ca
            .sign_node(
                &csr,
                who,
                "n1",
                &["10.1.2.3".into(), "node1.example".into()],
            )
            .unwrap()
            .unwrap();
        let id = NodeIdentity::from_pem(&cert, &key, &ca).unwrap();
        assert_eq!(classify(&id.chain[0]), Peer::Node(who));
        assert_eq!(id.chain.len(), 2);
        assert!(quic_server_config(&ca, &id).is_ok());
        assert!(quic_client_config(&ca, &id).is_ok());
        assert!(https_server_config(&id).is_ok());
    }

    #[test]
    fn a_ca_without_its_key_signs_nothing() {
        let ca = ClusterCa::generate(1).unwrap();
        let public = ClusterCa::from_pem(ca.cert_pem(), None).unwrap();
        assert_eq!(public.fingerprint(), ca.fingerprint());
        let (_, csr) = node_key_and_csr("n2").unwrap();
        let who = NodeCert {
            cluster_id: 1,
            id: NodeId(2),
            role: NodeRole::Voter,
        };
        assert!(public.sign_node(&csr, who, "n2", &[]).unwrap().is_none());
    }

    #[test]
    fn node_identities_parse_strictly() {
        let who = NodeCert {
            cluster_id: 0xabc,
            id: NodeId(17),
            role: NodeRole::Relay,
        };
        assert_eq!(
            who.uri(),
            "warren://00000000000000000000000000000abc/node/17/relay"
        );
        assert_eq!(NodeCert::parse_uri(&who.uri()), Some(who));
        for bad in [
            "warren://00000000000000000000000000000abc/node/17/admin",
            "warren://00000000000000000000000000000abc/node/17/voter/x",
            "warren://00000000000000000000000000000ABC/node/17/voter",
            "warren://abc/node/17/voter",
            "warren://00000000000000000000000000000abc/node/017/voter",
            "warren://00000000000000000000000000000abc/node//voter",
            "warren://00000000000000000000000000000abc/node/+17/voter",
            "warren://00000000000000000000000000000abc/site/17/voter",
            "https://00000000000000000000000000000abc/node/17/voter",
            "warren://00000000000000000000000000000abc/node/99999999999999999999999/voter",
        ] {
            assert_eq!(NodeCert::parse_uri(bad), None, "{bad}");
        }
    }

    /// A certificate with the cluster server name but no identity (as issued before
    /// identities existed) is not taken for a node; a site certificate stays a site's.
    #[test]
    fn certificates_without_an_identity_are_not_nodes() {
        let key = KeyPair::generate().unwrap();
        let old = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string(), "localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(classify(old.der()), Peer::NodeWithoutIdentity);
        let two = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()]).unwrap();
        let mut two = two;
        for id in [1, 2] {
            two.subject_alt_names.push(SanType::URI(
                NodeCert {
                    cluster_id: 1,
                    id: NodeId(id),
                    role: NodeRole::Voter,
                }
                .uri()
                .try_into()
                .unwrap(),
            ));
        }
        let two = two.self_signed(&key).unwrap();
        assert_eq!(
            classify(two.der()),
            Peer::NodeWithoutIdentity,
            "two identities"
        );
        let site = warren_proto::Name::new("hq").unwrap();
        let site_cert = CertificateParams::new(vec![warren_proto::tunnel::site_cert_name(&site)])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(classify(site_cert.der()), Peer::Site(site));
    }

    #[test]
    fn debug_hides_keys() {
        let ca = ClusterCa::generate(1).unwrap();
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }
}
