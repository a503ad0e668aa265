//! TLS certificates the proxy serves: a PEM chain and its private key, checked on upload.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::registry::{check_hostname, Entity, FieldError, Kind, Reference};
use crate::{Name, Secret};

/// A certificate chain (leaf first) and its private key. The proxy serves it for every
/// DNS name of the leaf. The key is stored so every node can serve it and is never returned
/// by the API (see `api::CertificateView`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// Unique name.
    pub name: Name,
    /// PEM certificates, leaf first, then intermediates.
    pub cert_pem: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Secret,
    /// Raft log index of the last change; set by the cluster.
    #[serde(default)]
    pub revision: u64,
}

/// What a stored certificate covers, read from its leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// DNS names of the leaf (subject alternative names), lowercase; may hold `*.` wildcards.
    pub domains: Vec<String>,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
}

impl Certificate {
    /// Largest accepted PEM chain, in bytes.
    pub const MAX_CHAIN: usize = 64 * 1024;

    /// The DER certificates of the chain.
    pub fn chain(&self) -> Result<Vec<CertificateDer<'static>>, FieldError> {
        let certs: Result<Vec<_>, _> =
            CertificateDer::pem_slice_iter(self.cert_pem.as_bytes()).collect();
        let certs = certs.map_err(|e| {
            FieldError::new("cert_pem", format!("not a PEM certificate chain: {e}"))
        })?;
        if certs.is_empty() {
            return Err(FieldError::new(
                "cert_pem",
                "no certificate found (expected -----BEGIN CERTIFICATE-----)",
            ));
        }
        Ok(certs)
    }

    /// The DER private key.
    pub fn key(&self) -> Result<PrivateKeyDer<'static>, FieldError> {
        // The parse error could quote the input: say only what was expected.
        PrivateKeyDer::from_pem_slice(self.key_pem.expose().as_bytes()).map_err(|_| {
            FieldError::new(
                "key_pem",
                "not a PEM private key (expected PKCS#8, PKCS#1 or SEC1)",
            )
        })
    }

    /// The names and validity of the leaf.
    pub fn info(&self) -> Result<CertificateInfo, FieldError> {
        let chain = self.chain()?;
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| {
            FieldError::new(
                "cert_pem",
                format!("the first certificate does not parse: {e}"),
            )
        })?;
        let mut domains = Vec::new();
        if let Ok(Some(san)) = leaf.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(d) = name {
                    domains.push(d.to_ascii_lowercase());
                }
            }
        }
        if domains.is_empty() {
            return Err(FieldError::new(
                "cert_pem",
                "the leaf certificate names no DNS subject alternative name",
            ));
        }
        Ok(CertificateInfo {
            domains,
            not_after: leaf.validity().not_after.timestamp(),
            not_before: leaf.validity().not_before.timestamp(),
        })
    }
}

impl Entity for Certificate {
    const KIND: Kind = Kind::Certificate;

    fn name(&self) -> &Name {
        &self.name
    }
    fn revision(&self) -> u64 {
        self.revision
    }
    fn set_revision(&mut self, revision: u64) {
        self.revision = revision;
    }

    fn validate(&self) -> Result<(), FieldError> {
        if self.cert_pem.len() > Self::MAX_CHAIN {
            return Err(FieldError::new(
                "cert_pem",
                format!("at most {} bytes", Self::MAX_CHAIN),
            ));
        }
        if self.key_pem.expose().len() > 16 * 1024 {
            return Err(FieldError::new("key_pem", "at most 16384 bytes"));
        }
        let info = self.info()?;
        for (i, d) in info.domains.iter().enumerate() {
            check_hostname(d, true).map_err(|e| e.within(&format!("cert_pem.domains[{i}]")))?;
        }
        self.key()?;
        Ok(())
    }

    fn references(&self) -> Vec<Reference> {
        Vec::new()
    }
}
