//! Runtime settings of a node: command-line flags, each with an environment variable.

use std::time::Duration;

use clap::Args;
use warren_consensus::cluster::ClusterConfig;

/// Settings a node takes at every start (they are not stored in the data directory).
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Raft heartbeat interval, in milliseconds.
    #[arg(long, global = true, env = "WARREN_HEARTBEAT_MS", default_value_t = 50)]
    pub heartbeat_ms: u64,
    /// Shortest election timeout, in milliseconds.
    #[arg(
        long,
        global = true,
        env = "WARREN_ELECTION_TIMEOUT_MIN_MS",
        default_value_t = 300
    )]
    pub election_timeout_min_ms: u64,
    /// Longest election timeout, in milliseconds. A follower also refuses to vote for
    /// another node until this long after it last heard from its leader (openraft's leader
    /// lease), so failover takes one to two election timeouts.
    #[arg(
        long,
        global = true,
        env = "WARREN_ELECTION_TIMEOUT_MAX_MS",
        default_value_t = 500
    )]
    pub election_timeout_max_ms: u64,
    /// Build a snapshot and compact the log after at least this many writes (and at least
    /// as many writes as the registry has entities).
    #[arg(
        long,
        global = true,
        env = "WARREN_SNAPSHOT_WRITES",
        default_value_t = 5000
    )]
    pub snapshot_writes: u64,
    /// How long a write or a linearizable read may wait for the cluster, in milliseconds,
    /// before it is answered with 503.
    #[arg(
        long,
        global = true,
        env = "WARREN_REQUEST_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub request_timeout_ms: u64,
    /// How long a membership change may take (a new learner must catch up), in seconds.
    #[arg(
        long,
        global = true,
        env = "WARREN_MEMBERSHIP_TIMEOUT_S",
        default_value_t = 60
    )]
    pub membership_timeout_s: u64,
    /// After this many seconds without contact with a leader, the node reports itself
    /// unhealthy and stops granting access.
    #[arg(
        long,
        global = true,
        env = "WARREN_LEADER_LOSS_BOUND_S",
        default_value_t = 15
    )]
    pub leader_loss_bound_s: u64,
    /// host:port of the HTTPS proxy (web resources and sign-in).
    #[arg(
        long,
        global = true,
        env = "WARREN_HTTPS_ADDR",
        default_value = "127.0.0.1:8443"
    )]
    pub https_addr: String,
    /// host:port of the plain HTTP listener, which redirects to HTTPS.
    #[arg(
        long,
        global = true,
        env = "WARREN_HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: String,
    /// The HTTPS port users reach the proxy on, if not the port of --https-addr (behind
    /// port forwarding, say 443).
    #[arg(long, global = true, env = "WARREN_PUBLIC_HTTPS_PORT")]
    pub public_https_port: Option<u16>,
    /// Host name of the cluster's sign-in pages; must be the same on every node and have a
    /// certificate. Register https://<auth-host>[:port]/.warren/callback at the identity
    /// provider.
    #[arg(
        long,
        global = true,
        env = "WARREN_AUTH_HOST",
        default_value = "auth.localhost"
    )]
    pub auth_host: String,
    /// How long a browser session lasts, in hours.
    #[arg(
        long,
        global = true,
        env = "WARREN_SESSION_HOURS",
        default_value_t = 12
    )]
    pub session_hours: u64,
    /// Replace the key that signs identity assertions after this many hours (the previous
    /// key stays published in the JWKS until the next rotation).
    #[arg(long, global = true, env = "WARREN_SIGNING_KEY_ROTATION_HOURS", default_value_t = 24 * 30)]
    pub signing_key_rotation_hours: u64,
    /// ACME directory URL: with it, the cluster gets certificates for the domains of web
    /// resources automatically (HTTP-01 on --http-addr, which must be port 80 as the CA
    /// sees it).
    #[arg(long, global = true, env = "WARREN_ACME_DIRECTORY")]
    pub acme_directory: Option<String>,
    /// PEM file of a CA to trust for the ACME server's own TLS (a private or test CA).
    #[arg(long, global = true, env = "WARREN_ACME_ROOT_CA")]
    pub acme_root_ca: Option<std::path::PathBuf>,
    /// Do not serve certificates from the cluster CA. Without this (and without ACME), a
    /// node holding the CA key answers for the auth host and for every web resource host
    /// that has no certificate in the registry with one it makes from the cluster CA (trust
    /// the data directory's ca.pem to use them); an uploaded certificate always wins.
    #[arg(long, global = true, env = "WARREN_NO_CA_WEB_CERTS")]
    pub no_ca_web_certs: bool,
    /// Contact e-mail of the ACME account.
    #[arg(long, global = true, env = "WARREN_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// IP address the public TCP ports of TCP resources listen on.
    #[arg(
        long,
        global = true,
        env = "WARREN_L4_ADDR",
        default_value = "127.0.0.1"
    )]
    pub l4_addr: String,
    /// SMTP server for e-mailed one-time codes: smtp://host:port, smtps://user:pass@host,
    /// smtp://host?tls=required.
    #[arg(long, global = true, env = "WARREN_SMTP_URL", value_parser = secret_arg)]
    pub smtp_url: Option<warren_proto::Secret>,
    /// Most HTTPS proxy connections open at once; more are closed at once (and counted in
    /// `warren_proxy_connections_refused_total`).
    #[arg(
        long,
        global = true,
        env = "WARREN_PROXY_MAX_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub proxy_max_connections: usize,
    /// Most TCP connections and UDP flows open at once over all TCP and UDP resource
    /// ports of this node; past it a new connection is closed at once (a new UDP client's
    /// datagrams are dropped), logged at most every 10 s per port.
    #[arg(
        long,
        global = true,
        env = "WARREN_L4_MAX_CONNECTIONS",
        default_value_t = 4096
    )]
    pub l4_max_connections: usize,
    /// Leader reads per second (for each of: API keys, join tokens, ACME challenge tokens)
    /// to look up an id this node does not know yet, in case it was created a moment ago
    /// through another node. Anyone can send made-up ids: past this rate they are answered
    /// as unknown without asking the leader.
    #[arg(
        long,
        global = true,
        env = "WARREN_UNKNOWN_ID_LEADER_READS_PER_S",
        default_value_t = 20
    )]
    pub unknown_id_leader_reads_per_s: u32,
    /// Networks of proxies in front of this node (load balancers), comma-separated CIDRs.
    /// From a peer in one of them the proxy believes `X-Forwarded-For`: the client is the
    /// last address in it that is not itself a trusted proxy. From anyone else the
    /// client's forwarding headers are replaced. Empty (the default): trust nobody.
    #[arg(
        long,
        global = true,
        env = "WARREN_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Sender address of e-mailed codes.
    #[arg(
        long,
        global = true,
        env = "WARREN_SMTP_FROM",
        default_value = "Warren <warren@localhost>"
    )]
    pub smtp_from: String,
    /// UDP address the relay for client devices and agents listens on (WireGuard packets,
    /// ciphertext only). Default: the cluster address's IP, port 7401 (port 0: any free
    /// port). `off`: no relay on this node.
    #[arg(long, global = true, env = "WARREN_RELAY_LISTEN")]
    pub relay_listen: Option<String>,
    /// The relay address clients and agents are told (`ip:port`), when it differs from the
    /// listening one (NAT in front of the node). Default: the listening address, with the
    /// cluster address's IP if it listens on an unspecified one.
    #[arg(long, global = true, env = "WARREN_RELAY_PUBLIC")]
    pub relay_public: Option<String>,
    /// The OAuth client id of the `warren` command-line client at the identity providers
    /// (a public client with the device flow): `warren login --node` is told it, and the
    /// node accepts only ID tokens issued to it (or to the provider's own client id).
    #[arg(long, global = true, env = "WARREN_CLI_CLIENT_ID")]
    pub cli_client_id: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        let d = ClusterConfig::default();
        Self {
            heartbeat_ms: d.heartbeat.as_millis() as u64,
            election_timeout_min_ms: d.election_timeout_min.as_millis() as u64,
            election_timeout_max_ms: d.election_timeout_max.as_millis() as u64,
            snapshot_writes: d.snapshot_writes,
            request_timeout_ms: d.request_timeout.as_millis() as u64,
            membership_timeout_s: d.membership_timeout.as_secs(),
            leader_loss_bound_s: d.leader_loss_bound.as_secs(),
            https_addr: "127.0.0.1:8443".into(),
            http_addr: "127.0.0.1:8080".into(),
            public_https_port: None,
            auth_host: "auth.localhost".into(),
            session_hours: 12,
            smtp_url: None,
            acme_directory: None,
            acme_root_ca: None,
            acme_email: None,
            no_ca_web_certs: false,
            l4_addr: "127.0.0.1".into(),
            signing_key_rotation_hours: 24 * 30,
            smtp_from: "Warren <warren@localhost>".into(),
            trusted_proxies: Vec::new(),
            proxy_max_connections: 10_000,
            l4_max_connections: 4096,
            unknown_id_leader_reads_per_s: 20,
            relay_listen: None,
            relay_public: None,
            cli_client_id: None,
        }
    }
}

/// Flags that may carry a password are kept redacted in `Debug`.
fn secret_arg(s: &str) -> Result<warren_proto::Secret, String> {
    Ok(warren_proto::Secret::new(s))
}

impl Settings {
    /// The ACME settings, if ACME is on.
    pub fn acme(&self) -> anyhow::Result<Option<crate::acme::AcmeSettings>> {
        let Some(dir) = &self.acme_directory else {
            return Ok(None);
        };
        let url = url::Url::parse(dir)
            .map_err(|e| anyhow::anyhow!("invalid setting --acme-directory {dir:?}: {e}"))?;
        if url.scheme() != "https" {
            anyhow::bail!("invalid setting --acme-directory: ACME servers are https:// URLs");
        }
        if let Some(p) = &self.acme_root_ca {
            if !p.is_file() {
                anyhow::bail!(
                    "invalid setting --acme-root-ca: {} is not a file",
                    p.display()
                );
            }
        }
        Ok(Some(crate::acme::AcmeSettings {
            directory: dir.clone(),
            root_ca: self.acme_root_ca.clone(),
            email: self.acme_email.clone(),
            renew_before: Duration::from_secs(30 * 86_400),
            also: vec![self.auth_host.to_ascii_lowercase()],
        }))
    }

    /// The address TCP resources listen on.
    pub fn l4_addr(&self) -> anyhow::Result<std::net::IpAddr> {
        self.l4_addr.parse().map_err(|_| {
            anyhow::anyhow!(
                "invalid setting --l4-addr {:?}: expected an IP address",
                self.l4_addr
            )
        })
    }

    /// Where the relay listens (`None`: off), given the cluster's listening address.
    pub fn relay_listen(
        &self,
        cluster: std::net::SocketAddr,
    ) -> anyhow::Result<Option<std::net::SocketAddr>> {
        match self.relay_listen.as_deref() {
            Some("off") => Ok(None),
            Some(a) => a.parse().map(Some).map_err(|_| {
                anyhow::anyhow!("invalid setting --relay-listen {a:?}: expected ip:port or off")
            }),
            None => Ok(Some(std::net::SocketAddr::new(cluster.ip(), 7401))),
        }
    }

    /// Most TCP connections and UDP flows of TCP and UDP resources open at once.
    pub fn l4_max_connections(&self) -> anyhow::Result<usize> {
        if self.l4_max_connections == 0 {
            anyhow::bail!("invalid setting --l4-max-connections: expected at least 1");
        }
        Ok(self.l4_max_connections)
    }

    /// The limits on leader reads for ids this node does not know, checked.
    pub fn leader_checks(&self) -> anyhow::Result<crate::miss::CheckLimits> {
        crate::miss::CheckLimits {
            reads_per_second: self.unknown_id_leader_reads_per_s,
            ..crate::miss::CheckLimits::default()
        }
        .validate()
        .map_err(|e| {
            let flag = match e.field {
                "reads_per_second" => "--unknown-id-leader-reads-per-s",
                other => other,
            };
            anyhow::anyhow!("invalid setting {flag}: {}", e.reason)
        })
    }

    /// The proxy settings, checked; `https_port` is the port the HTTPS listener got.
    pub fn proxy(&self, https_port: u16) -> anyhow::Result<crate::proxy::ProxySettings> {
        warren_proto::registry::check_hostname(&self.auth_host, false)
            .map_err(|e| anyhow::anyhow!("invalid setting --auth-host: {}", e.reason))?;
        if !(1..=24 * 90).contains(&self.session_hours) {
            anyhow::bail!("invalid setting --session-hours: expected 1 to 2160");
        }
        if self.public_https_port == Some(0) {
            anyhow::bail!("invalid setting --public-https-port: expected 1 to 65535");
        }
        Ok(crate::proxy::ProxySettings {
            auth_host: self.auth_host.clone(),
            public_https_port: self.public_https_port.unwrap_or(https_port),
            session_ttl: Duration::from_secs(self.session_hours * 3600),
            signing_key_rotation: Duration::from_secs(
                self.signing_key_rotation_hours.max(1) * 3600,
            ),
            smtp: self.smtp_url.clone().map(|u| (u, self.smtp_from.clone())),
            trusted_proxies: self.trusted_proxies.clone(),
            max_connections: self.proxy_max_connections.max(1),
            ca_certs: None,
        })
    }

    /// The consensus settings, checked.
    pub fn cluster(&self) -> anyhow::Result<ClusterConfig> {
        let c = ClusterConfig {
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            election_timeout_min: Duration::from_millis(self.election_timeout_min_ms),
            election_timeout_max: Duration::from_millis(self.election_timeout_max_ms),
            snapshot_writes: self.snapshot_writes,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            membership_timeout: Duration::from_secs(self.membership_timeout_s),
            leader_loss_bound: Duration::from_secs(self.leader_loss_bound_s),
            planted_bug: None,
            storage_io: Default::default(),
        };
        c.validate().map_err(|e| {
            let flag = match e.field {
                "heartbeat" => "--heartbeat-ms",
                "election_timeout_min" => "--election-timeout-min-ms",
                "election_timeout_max" => "--election-timeout-max-ms",
                "snapshot_writes" => "--snapshot-writes",
                "request_timeout" => "--request-timeout-ms",
                other => other,
            };
            anyhow::anyhow!("invalid setting {flag}: {}", e.reason)
        })
    }
}
