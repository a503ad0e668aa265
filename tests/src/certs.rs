//! Throwaway TLS certificates for test servers.

use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

/// A self-signed leaf certificate for `names` and its private key, both PEM:
/// `(cert_pem, key_pem)`.
///
/// Each name becomes a subject alternative name (a DNS name, or an IP address if it parses
/// as one); the first is also the common name. The certificate says CA:false and is for
/// server authentication only; the key is ECDSA P-256.
///
/// # Panics
/// If `names` is empty or a name is not a valid DNS name or IP address.
pub fn self_signed(names: &[&str]) -> (String, String) {
    assert!(!names.is_empty(), "a certificate needs at least one name");
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("certificate names");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("generating a key");
    let cert = params.self_signed(&key).expect("signing the certificate");
    (cert.pem(), key.serialize_pem())
}

/// Like [`self_signed`], written to `<dir>/<stem>.crt` and `<dir>/<stem>.key`; returns
/// `(cert_path, key_path)`.
pub fn write_self_signed(
    dir: &Path,
    stem: &str,
    names: &[&str],
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = self_signed(names);
    let cert_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    std::fs::write(&cert_path, cert)?;
    std::fs::write(&key_path, key)?;
    Ok((cert_path, key_path))
}
