//! A typed client for a node's client API (`/v1/client/...`): what `warren login`, `ls`,
//! `connect`, `nc`, `status` and `device` ask the node.
//!
//! ```text
//! GET    /v1/client/discovery               no auth: cluster id, identity providers
//! POST   /v1/client/sign-in                 no auth: provider ID token -> session token
//! POST   /v1/client/devices                 register this machine's WireGuard key
//! GET    /v1/client/devices                 the user's devices
//! DELETE /v1/client/devices/{name}
//! GET    /v1/client/resources?device=NAME   private resources the user may reach now
//! POST   /v1/client/connect                 agent key, relays and a relay ticket for a site
//! ```
//!
//! Every call but the first two carries `Authorization: Bearer <session token>`. Errors
//! arrive as `{"error":{"code","message"}}`, like the admin API's; they are read leniently
//! (an unknown code is kept as text) so a newer node still gives a clear message.

use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::api::error_chain;
use crate::token::Secret;

/// The node's public discovery document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovery {
    /// The cluster id, hex.
    pub cluster: String,
    /// The identity providers people sign in with, the default first.
    pub providers: Vec<Provider>,
    /// The client API of every node of the cluster (`https://host:port`).
    #[serde(default)]
    pub nodes: Vec<String>,
}

impl Discovery {
    /// The provider named `name`, or the first one.
    pub fn provider(&self, name: Option<&str>) -> Result<&Provider, String> {
        match name {
            Some(n) => self.providers.iter().find(|p| p.name == n).ok_or_else(|| {
                let known: Vec<&str> = self.providers.iter().map(|p| p.name.as_str()).collect();
                format!(
                    "--provider {n:?}: the cluster has no such identity provider (it has: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )
            }),
            None => self.providers.first().ok_or_else(|| {
                "the cluster has no identity provider configured; ask its administrator to add one"
                    .to_owned()
            }),
        }
    }
}

/// An identity provider as discovery names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provider {
    /// Its name in the registry (what sign-in names).
    pub name: String,
    /// Its issuer URL.
    pub issuer: String,
    /// The OAuth client id of the CLI at that provider.
    pub client_id: String,
    /// Scopes to ask for besides the defaults.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// `POST /v1/client/sign-in` body.
#[derive(Debug, Serialize)]
pub struct SignInRequest<'a> {
    /// The provider's name.
    pub provider: &'a str,
    /// The ID token (a JWT) the provider issued.
    pub id_token: &'a str,
}

/// `POST /v1/client/sign-in` answer.
#[derive(Debug, Clone, Deserialize)]
pub struct SignIn {
    /// The Warren client session token.
    pub token: Secret,
    /// The signed-in user's name.
    pub user: String,
    /// When the session ends, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// `POST /v1/client/devices` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegisterDevice {
    /// The device's name.
    pub name: String,
    /// Its WireGuard public key, standard base64 (44 characters).
    pub public_key: String,
    /// Its operating system.
    pub os: String,
}

/// A device as the node shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Its name.
    pub name: String,
    /// The user it belongs to.
    pub owner: String,
    /// Its WireGuard public key, base64.
    pub public_key: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// Its tunnel address.
    pub address: std::net::Ipv4Addr,
    /// Registration time, seconds since the Unix epoch.
    #[serde(default)]
    pub created_at: u64,
    /// Last seen, seconds since the Unix epoch.
    #[serde(default)]
    pub last_seen: u64,
}

/// A private resource the user may reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// Its name.
    pub name: String,
    /// The short name users may type instead.
    #[serde(default)]
    pub alias: Option<String>,
    /// The site it is in.
    pub site: String,
    /// An IP address, a network (`10.0.0.0/24`) or a DNS name.
    pub address: String,
    /// Where the client sends flows for a DNS-named resource.
    #[serde(default)]
    pub virtual_address: Option<std::net::Ipv4Addr>,
    /// Ports, like `22,5432,8000-8100`.
    pub ports: String,
    /// `tcp`, `udp`, `icmp`.
    #[serde(default)]
    pub protocols: Vec<String>,
}

/// `POST /v1/client/connect` body.
#[derive(Debug, Serialize)]
pub struct ConnectRequest<'a> {
    /// This device's name.
    pub device: &'a str,
    /// The site to reach.
    pub site: &'a str,
}

/// `POST /v1/client/connect` answer: how to reach a site's agent.
#[derive(Debug, Clone, Deserialize)]
pub struct Connect {
    /// The site.
    pub site: String,
    /// The agent's WireGuard public key, base64.
    pub agent_key: String,
    /// This device's tunnel address.
    pub device_address: std::net::Ipv4Addr,
    /// The signed relay ticket, base64.
    pub ticket: Secret,
    /// When the ticket expires, seconds since the Unix epoch.
    pub ticket_expires_at: u64,
    /// Relays to send WireGuard packets through.
    pub relays: Vec<Relay>,
    /// The inner MTU for the path, bytes.
    #[serde(default)]
    pub mtu: Option<u16>,
}

/// One relay a connect answer offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relay {
    /// The node's name.
    pub node: String,
    /// Its relay UDP address.
    pub addr: std::net::SocketAddr,
}

/// Why a call to the node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The session token is missing, expired or revoked: the user must sign in again.
    #[error("the node does not accept this sign-in any more ({0}); run `warren login` again")]
    Unauthorized(String),
    /// The user may not do this (for connect: reach nothing at that site).
    #[error("{0}")]
    Forbidden(String),
    /// The node answered with another error.
    #[error("{message} [{code}]")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The error code, as sent.
        code: String,
        /// The node's message.
        message: String,
    },
    /// No answer, or one that is not the API's (the node, the network or the TLS trust is at
    /// fault).
    #[error("{0}")]
    Transport(String),
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// A client for one node, falling back to the cluster's other nodes (in order) when it
/// cannot be reached; the one that answered is asked first next time.
pub struct NodeClient {
    bases: Vec<String>,
    current: std::sync::atomic::AtomicUsize,
    token: Option<Secret>,
    http: reqwest::Client,
}

impl NodeClient {
    /// A client for the node at `url` (`https://host:port`), trusting the CA in `ca` (else
    /// the public web roots); without a session token until [`NodeClient::with_token`].
    pub fn new(url: &str, ca: Option<&Path>) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = normalize_url(url)?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10));
        if let Some(ca) = ca {
            let pem =
                std::fs::read(ca).map_err(|e| anyhow::anyhow!("--ca {}: {e}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                anyhow::anyhow!("--ca {}: not a PEM certificate: {e}", ca.display())
            })?;
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(cert);
        }
        Ok(Self {
            bases: vec![base],
            current: std::sync::atomic::AtomicUsize::new(0),
            token: None,
            http: builder.build()?,
        })
    }

    /// The same client, falling back to `others` (the cluster's other nodes, as discovery
    /// listed them; malformed or repeated ones are skipped).
    pub fn with_fallbacks(mut self, others: &[String]) -> Self {
        for o in others {
            if let Ok(u) = normalize_url(o) {
                if !self.bases.contains(&u) {
                    self.bases.push(u);
                }
            }
        }
        self
    }

    /// The same client, authenticating with `token`.
    pub fn with_token(mut self, token: Secret) -> Self {
        self.token = Some(token);
        self
    }

    /// The base URL of the node asked first now.
    pub fn url(&self) -> &str {
        &self.bases[self.current.load(std::sync::atomic::Ordering::Relaxed) % self.bases.len()]
    }

    /// `GET /v1/client/discovery`.
    pub async fn discovery(&self) -> Result<Discovery, NodeError> {
        self.call::<(), _>(Method::GET, "/v1/client/discovery", None)
            .await
    }

    /// `POST /v1/client/sign-in`.
    pub async fn sign_in(&self, provider: &str, id_token: &Secret) -> Result<SignIn, NodeError> {
        let body = SignInRequest {
            provider,
            id_token: id_token.expose(),
        };
        self.call(Method::POST, "/v1/client/sign-in", Some(&body))
            .await
    }

    /// `POST /v1/client/devices`.
    pub async fn register_device(&self, device: &RegisterDevice) -> Result<Device, NodeError> {
        self.call(Method::POST, "/v1/client/devices", Some(device))
            .await
    }

    /// `GET /v1/client/devices`.
    pub async fn devices(&self) -> Result<Vec<Device>, NodeError> {
        self.call::<(), _>(Method::GET, "/v1/client/devices", None)
            .await
    }

    /// `DELETE /v1/client/devices/{name}`.
    pub async fn delete_device(&self, name: &str) -> Result<(), NodeError> {
        let path = format!("/v1/client/devices/{}", path_segment(name));
        self.call::<(), serde_json::Value>(Method::DELETE, &path, None)
            .await
            .map(drop)
    }

    /// `GET /v1/client/resources?device=NAME`.
    pub async fn resources(&self, device: &str) -> Result<Vec<Resource>, NodeError> {
        let path = format!("/v1/client/resources?device={}", path_segment(device));
        self.call::<(), _>(Method::GET, &path, None).await
    }

    /// `POST /v1/client/connect`.
    pub async fn connect(&self, device: &str, site: &str) -> Result<Connect, NodeError> {
        let body = ConnectRequest { device, site };
        self.call(Method::POST, "/v1/client/connect", Some(&body))
            .await
    }

    /// Asks the current node, then the others in turn while a node cannot be reached (no
    /// connection: the request was not sent, so trying another is safe).
    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, NodeError> {
        use std::sync::atomic::Ordering;
        let first = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..self.bases.len() {
            let at = (first + i) % self.bases.len();
            match self
                .call_at(&self.bases[at], method.clone(), path, body)
                .await
            {
                Err(Unreached(e)) => last = Some(e),
                Ok(r) => {
                    self.current.store(at, Ordering::Relaxed);
                    return r;
                }
            }
        }
        Err(last.unwrap_or_else(|| NodeError::Transport("no node to ask".into())))
    }

    async fn call_at<B: Serialize, T: DeserializeOwned>(
        &self,
        base: &str,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Result<T, NodeError>, Unreached> {
        let url = format!("{base}{path}");
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                return Err(Unreached(NodeError::Transport(format!(
                    "{url}: {}",
                    error_chain(&e)
                ))))
            }
            Err(e) => {
                return Ok(Err(NodeError::Transport(format!(
                    "{url}: {}",
                    error_chain(&e)
                ))))
            }
        };
        let status = resp.status();
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => {
                return Ok(Err(NodeError::Transport(format!(
                    "{url}: reading the answer: {e}"
                ))))
            }
        };
        if status.is_success() {
            // A DELETE may answer with an empty body.
            let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            return Ok(serde_json::from_slice(bytes).map_err(|e| {
                NodeError::Transport(format!("{url}: unexpected answer from the node: {e}"))
            }));
        }
        Ok(Err(error_from(status, &url, &bytes)))
    }
}

/// A node that could not be reached at all (no connection).
struct Unreached(NodeError);

/// The error a non-2xx answer stands for.
fn error_from(status: StatusCode, url: &str, bytes: &[u8]) -> NodeError {
    let Ok(body) = serde_json::from_slice::<ErrorBody>(bytes) else {
        let text: String = String::from_utf8_lossy(bytes)
            .chars()
            .take(200)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        return match status {
            StatusCode::UNAUTHORIZED => NodeError::Unauthorized(format!("HTTP {status}")),
            _ => NodeError::Transport(format!("{url}: HTTP {status}: {text}")),
        };
    };
    let message: String = body
        .error
        .message
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    match status {
        StatusCode::UNAUTHORIZED => NodeError::Unauthorized(message),
        StatusCode::FORBIDDEN => NodeError::Forbidden(message),
        _ => NodeError::Api {
            status,
            code: body.error.code,
            message,
        },
    }
}

/// `url` without a trailing slash, https:// added when no scheme is given; plain http://
/// is refused (the session token would cross the network in clear text).
pub fn normalize_url(url: &str) -> anyhow::Result<String> {
    let base = url.trim().trim_end_matches('/');
    if base.is_empty() {
        anyhow::bail!("--node: give the node's address, like https://node1.example.com:7443");
    }
    if base.starts_with("https://") {
        Ok(base.to_owned())
    } else if base.starts_with("http://") {
        anyhow::bail!("--node {url:?}: the node's client API is HTTPS only, use https://")
    } else if base.contains("://") {
        anyhow::bail!("--node {url:?}: unsupported scheme, use https://")
    } else {
        Ok(format!("https://{base}"))
    }
}

/// `s` percent-encoded for a path segment or query value.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn answers_decode_as_the_contract_writes_them() {
        let d: Discovery = serde_json::from_value(json!({
            "cluster": "ab12",
            "providers": [{"name": "corp", "issuer": "https://idp", "client_id": "cli",
                           "scopes": ["groups"]}]
        }))
        .unwrap();
        assert_eq!(d.provider(None).unwrap().client_id, "cli");
        assert!(d.provider(Some("other")).unwrap_err().contains("corp"));

        let s: SignIn = serde_json::from_value(
            json!({"token": "wct_secret", "user": "alice", "expires_at": 1_700_000_000u64}),
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("wct_secret"));

        let dev: Device = serde_json::from_value(json!({
            "name": "alice-host", "owner": "alice",
            "public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "os": "linux",
            "address": "100.64.0.1", "created_at": 1, "last_seen": 2, "revision": 7
        }))
        .unwrap();
        assert_eq!(dev.address, std::net::Ipv4Addr::new(100, 64, 0, 1));

        let r: Vec<Resource> = serde_json::from_value(json!([
            {"name": "db", "alias": null, "site": "site-a", "address": "db.internal",
             "virtual_address": "100.100.0.3", "ports": "5432", "protocols": ["tcp"]}
        ]))
        .unwrap();
        assert_eq!(
            r[0].virtual_address,
            Some(std::net::Ipv4Addr::new(100, 100, 0, 3))
        );

        let c: Connect = serde_json::from_value(json!({
            "site": "site-a", "agent_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "device_address": "100.64.0.1", "ticket": "dGlja2V0",
            "ticket_expires_at": 1_700_000_300u64,
            "relays": [{"node": "n1", "addr": "10.97.1.1:7401"}], "mtu": 1408
        }))
        .unwrap();
        assert_eq!(c.relays[0].addr.port(), 7401);
        assert!(!format!("{c:?}").contains("dGlja2V0"));
    }

    #[test]
    fn requests_encode_as_the_contract_reads_them() {
        let body = RegisterDevice {
            name: "alice-host".into(),
            public_key: "k".into(),
            os: "linux".into(),
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"name": "alice-host", "public_key": "k", "os": "linux"})
        );
        let body = ConnectRequest {
            device: "alice-host",
            site: "site-a",
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"device": "alice-host", "site": "site-a"})
        );
    }

    #[test]
    fn errors_keep_the_nodes_message() {
        let body = br#"{"error":{"code":"forbidden","message":"alice is not allowed to reach anything at site-a"}}"#;
        let e = error_from(StatusCode::FORBIDDEN, "u", body);
        assert!(matches!(e, NodeError::Forbidden(_)));
        assert!(e.to_string().contains("not allowed"), "{e}");
        let e = error_from(StatusCode::UNAUTHORIZED, "u", b"");
        assert!(e.to_string().contains("warren login"), "{e}");
        let body = br#"{"error":{"code":"agent_offline","message":"site-a has no agent"}}"#;
        let e = error_from(StatusCode::SERVICE_UNAVAILABLE, "u", body);
        assert_eq!(e.to_string(), "site-a has no agent [agent_offline]");
    }

    #[test]
    fn node_urls() {
        assert_eq!(normalize_url("n1:7443/").unwrap(), "https://n1:7443");
        assert_eq!(normalize_url("https://n1:7443").unwrap(), "https://n1:7443");
        assert!(normalize_url("http://n1").is_err());
        assert_eq!(path_segment("a b/c"), "a%20b%2Fc");
    }
}
