//! Automatic TLS against a real ACME CA (Debian's pebble): one node orders under the Raft
//! lease, the CA validates HTTP-01 against another node, and all three serve the result.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rustls_pki_types::pem::PemObject as _;
use serde_json::json;
use warren_tests::{free_port, phase, Cluster};

/// pebble and its DNS, killed when dropped.
struct Pebble {
    children: Vec<Child>,
    dir: tempfile::TempDir,
    mgmt_port: u16,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Pebble {
    /// The directory for pebble's files, with the certificate of its own HTTPS endpoint
    /// (`cert.pem`), which nodes must trust.
    fn prepare() -> anyhow::Result<tempfile::TempDir> {
        for bin in ["pebble", "pebble-challtestsrv"] {
            if Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .output()?
                .stdout
                .is_empty()
            {
                bail!("{bin} is missing: run scripts/install-test-deps");
            }
        }
        let dir = tempfile::tempdir()?;
        let (cert, key) = warren_tests::certs::self_signed(&["localhost", "127.0.0.1"]);
        std::fs::write(dir.path().join("cert.pem"), &cert)?;
        std::fs::write(dir.path().join("key.pem"), &key)?;
        Ok(dir)
    }

    /// Starts challtestsrv (answering every name with `ip`) and pebble validating HTTP-01 on
    /// `http_port`.
    fn start(
        dir: tempfile::TempDir,
        ip: &str,
        http_port: u16,
        dir_port: u16,
    ) -> anyhow::Result<Self> {
        let (mgmt_port, dns_port, dns_mgmt) = (free_port(), free_port(), free_port());
        let config = json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{dir_port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": dir.path().join("cert.pem"),
            "privateKey": dir.path().join("key.pem"),
            "httpPort": http_port, "tlsPort": free_port(),
            "ocspResponderURL": "", "externalAccountBindingRequired": false}});
        std::fs::write(dir.path().join("pebble.json"), config.to_string())?;
        let log = |name: &str| std::fs::File::create(dir.path().join(name));
        let dns = Command::new("pebble-challtestsrv")
            .args([
                "-defaultIPv4",
                ip,
                "-defaultIPv6",
                "",
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &format!("127.0.0.1:{dns_mgmt}"),
            ])
            .stdout(log("challtestsrv.log")?)
            .stderr(log("challtestsrv.err")?)
            .stdin(Stdio::null())
            .spawn()?;
        let pebble = Command::new("pebble")
            .args(["-config"])
            .arg(dir.path().join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log("pebble.log")?)
            .stderr(log("pebble.err")?)
            .stdin(Stdio::null())
            .spawn()?;
        Ok(Self {
            children: vec![dns, pebble],
            dir,
            mgmt_port,
        })
    }

    fn log(&self) -> String {
        ["pebble.log", "pebble.err", "challtestsrv.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn insecure_http() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// The chain a node serves for `name`, verified against `root_pem`.
async fn served_and_verified(
    https_addr: &str,
    name: &str,
    root_pem: &str,
) -> anyhow::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(https_addr).await?;
    let server_name = rustls_pki_types::ServerName::try_from(name.to_owned())?;
    let tls = connector
        .connect(server_name, tcp)
        .await
        .context("TLS handshake with the ACME certificate")?;
    let (_, conn) = tls.get_ref();
    let leaf = conn.peer_certificates().context("no certificate")?[0].clone();
    Ok(format!("{} bytes", leaf.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pebble_certificate_is_ordered_once_and_served_by_every_node() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let http_port = free_port();
    let dir = Pebble::prepare()?;
    let root_ca = dir.path().join("cert.pem");
    let dir_port = free_port();
    let directory = format!("https://127.0.0.1:{dir_port}/dir");
    let port = http_port.to_string();
    let cluster = Cluster::start_with_env(
        3,
        &[
            ("WARREN_ACME_DIRECTORY", &directory),
            ("WARREN_ACME_ROOT_CA", root_ca.to_str().unwrap()),
            ("WARREN_TEST_HTTP_PORT", &port),
            ("WARREN_AUTH_HOST", "auth.example.test"),
        ],
    )
    .await?;
    // The CA resolves every name to node 2; node 1 or 3 may be the one that orders.
    let pebble = Pebble::start(dir, &cluster.nodes[1].l4_ip, http_port, dir_port)?;
    let http = insecure_http();
    let start = Instant::now();
    while http.get(&directory).send().await.is_err() {
        if start.elapsed() > Duration::from_secs(15) {
            bail!("pebble did not start:\n{}", pebble.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    phase!("a web resource without a certificate gets one from the CA");
    let api = cluster.api(0);
    api.post_ok(
        "/v1/resources",
        &json!({"name": "shop", "route": {"http": {"domain": "shop.example.test"}},
                "targets": ["127.0.0.1:9"], "http": {"public": true}}),
    )
    .await?;
    // The sign-in host needs one as much as the resource (an ACME-only cluster could
    // sign nobody in without it), although no resource names it.
    for host in ["shop.example.test", "auth.example.test"] {
        let deadline = Instant::now() + Duration::from_secs(60);
        let cert = loop {
            let (_, v) = api.get(&format!("/v1/certificates/acme.{host}")).await?;
            if v.get("domains").is_some() {
                break v;
            }
            if Instant::now() > deadline {
                bail!(
                    "no certificate for {host} within 60 s:\n{}\n{}",
                    cluster.logs(),
                    pebble.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert_eq!(cert["domains"], json!([host]));
        assert!(cert.get("key_pem").is_none());
    }

    phase!("one node ordered it; the CA validated through node 2");
    let logs = cluster.logs();
    let ordering = logs
        .lines()
        .filter(|l| l.contains("holding the ACME lease") && l.contains("shop.example.test"))
        .count();
    assert_eq!(ordering, 1, "exactly one node ordered:\n{logs}");

    phase!("every node serves it, and it verifies against the CA's root");
    let root = http
        .get(format!("https://127.0.0.1:{}/roots/0", pebble.mgmt_port))
        .send()
        .await?
        .text()
        .await?;
    for node in &cluster.nodes {
        served_and_verified(&node.https_addr, "shop.example.test", &root).await?;
        served_and_verified(&node.https_addr, "auth.example.test", &root).await?;
    }
    Ok(())
}
