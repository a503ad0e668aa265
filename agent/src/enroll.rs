//! The agent's identity: enrollment with a site token, and the state directory.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use warren_proto::token::SiteToken;
use warren_proto::tunnel::io::{read_frame, write_frame};
use warren_proto::tunnel::{Enroll, Enrolled, MAX_CONTROL};
use warren_proto::Name;

use crate::tls;

/// What the agent is: its site, certificate and key, and the cluster's CA.
pub struct Identity {
    /// The site.
    pub site: Name,
    /// The cluster.
    pub cluster_id: u128,
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity(site {}, <key redacted>)", self.site)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SiteFile {
    site: Name,
    cluster_id: String,
}

impl Identity {
    /// Loads the identity from `dir`; `None` if the agent has not enrolled yet.
    pub fn load(dir: &Path) -> anyhow::Result<Option<Self>> {
        let file = dir.join("site.json");
        if !file.exists() {
            return Ok(None);
        }
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .with_context(|| format!("reading {}", dir.join(name).display()))
        };
        let f: SiteFile = serde_json::from_str(&read("site.json")?)
            .with_context(|| format!("{} is damaged", file.display()))?;
        let id = Self {
            site: f.site,
            cluster_id: u128::from_str_radix(&f.cluster_id, 16)
                .with_context(|| format!("{}: bad cluster id", file.display()))?,
            cert_pem: read("site.pem")?,
            key_pem: read("site.key")?,
            ca_pem: read("ca.pem")?,
        };
        id.tunnel_config()
            .with_context(|| format!("the certificate in {} is not usable", dir.display()))?;
        Ok(Some(id))
    }

    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let write = |name: &str, body: &str, mode: u32| -> anyhow::Result<()> {
            let tmp = dir.join(format!(".{name}.tmp"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(body.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join(name))?;
            Ok(())
        };
        write("site.key", &self.key_pem, 0o600)?;
        write("site.pem", &self.cert_pem, 0o644)?;
        write("ca.pem", &self.ca_pem, 0o644)?;
        // Last: its presence means the directory is complete.
        let f = SiteFile {
            site: self.site.clone(),
            cluster_id: format!("{:032x}", self.cluster_id),
        };
        write("site.json", &serde_json::to_string_pretty(&f)?, 0o644)
    }

    /// An identity from its parts (tests build one without enrolling).
    #[cfg(test)]
    pub(crate) fn from_parts(
        site: Name,
        cluster_id: u128,
        cert_pem: String,
        key_pem: String,
        ca_pem: String,
    ) -> Self {
        Self {
            site,
            cluster_id,
            cert_pem,
            key_pem,
            ca_pem,
        }
    }

    /// The QUIC client settings of a tunnel.
    pub fn tunnel_config(&self) -> anyhow::Result<quinn::ClientConfig> {
        let cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())?;
        let ca = CertificateDer::from_pem_slice(self.ca_pem.as_bytes())?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())?;
        tls::tunnel_config(ca.clone(), self.cluster_id, vec![cert, ca], key)
    }
}

/// Trades `token` for a site certificate at the first node that accepts it, and saves it.
pub async fn enroll(token: &str, nodes: &[String], dir: &Path) -> anyhow::Result<Identity> {
    let parsed = SiteToken::parse(token).map_err(|e| anyhow::anyhow!("--token: {e}"))?;
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    let csr_pem = params.serialize_request(&key)?.pem()?;
    let config = tls::enroll_config(parsed.ca_fingerprint, parsed.cluster_id)?;
    let mut endpoint = quinn::Endpoint::client("[::]:0".parse()?)
        .or_else(|_| quinn::Endpoint::client("0.0.0.0:0".parse().expect("valid address")))?;
    endpoint.set_default_client_config(config);
    let mut errors = Vec::new();
    for node in nodes {
        match enroll_at(&endpoint, node, token, &csr_pem).await {
            Ok(Enrolled::Ok {
                site,
                cluster_id,
                cert_pem,
                ca_pem,
            }) => {
                if cluster_id != parsed.cluster_id {
                    anyhow::bail!("{node} answered for another cluster");
                }
                let id = Identity {
                    site,
                    cluster_id,
                    cert_pem,
                    key_pem: key.serialize_pem(),
                    ca_pem,
                };
                id.save(dir)?;
                endpoint.close(0u32.into(), b"enrolled");
                return Ok(id);
            }
            // The token is used up or bad: another node would say the same.
            Ok(Enrolled::Refused(why)) => anyhow::bail!("{node} refused the enrollment: {why}"),
            Err(e) => errors.push(format!("{node}: {e:#}")),
        }
    }
    anyhow::bail!("no node could be reached to enroll: {}", errors.join("; "))
}

async fn enroll_at(
    endpoint: &quinn::Endpoint,
    node: &str,
    token: &str,
    csr_pem: &str,
) -> anyhow::Result<Enrolled> {
    let addr = tokio::net::lookup_host(node)
        .await
        .with_context(|| format!("cannot resolve {node}"))?
        .next()
        .with_context(|| format!("{node} has no address"))?;
    let attempt = async {
        let conn = endpoint.connect(addr, tls::SERVER_NAME)?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(
            &mut send,
            &Enroll {
                token: token.to_owned(),
                csr_pem: csr_pem.to_owned(),
            },
        )
        .await?;
        send.finish()?;
        let reply = read_frame::<_, Enrolled>(&mut recv, MAX_CONTROL)
            .await
            .map_err(|e| anyhow::anyhow!(e))?
            .context("the node closed the stream without an answer")?;
        conn.close(0u32.into(), b"done");
        Ok::<_, anyhow::Error>(reply)
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .context("no answer within 15 s")?
}
