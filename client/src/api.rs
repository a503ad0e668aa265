//! A small client for the admin API.

use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use warren_proto::api::{ApiError, ErrorBody};

/// Why an admin API call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The API answered with an error.
    #[error("{} [{}]{}", .error.message, serde_json::to_value(.error.code).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(), .error.field.as_ref().map(|f| format!(" (field: {f})")).unwrap_or_default())]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The error body.
        error: ApiError,
    },
    /// No answer, or an answer that is not the API's.
    #[error("{0}")]
    Transport(String),
}

/// Connection settings and an HTTP client.
pub struct Client {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Client {
    /// A client for the admin API at `addr` (`https://host:port`), trusting the CA in
    /// `ca_file`, authenticating with `key`.
    pub fn new(addr: &str, key: &str, ca_file: &Path) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = addr.trim_end_matches('/');
        let base = if base.starts_with("https://") {
            base.to_owned()
        } else if base.starts_with("http://") {
            anyhow::bail!("--addr {addr:?}: the admin API is HTTPS only");
        } else {
            format!("https://{base}")
        };
        let pem = std::fs::read(ca_file)
            .map_err(|e| anyhow::anyhow!("--ca {}: {e}", ca_file.display()))?;
        let ca = reqwest::Certificate::from_pem(&pem).map_err(|e| {
            anyhow::anyhow!("--ca {}: not a PEM certificate: {e}", ca_file.display())
        })?;
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(90))
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            base,
            key: key.trim().to_owned(),
            http,
        })
    }

    /// Calls `method path` with an optional JSON body; returns the JSON answer.
    pub async fn call<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Value, CallError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CallError::Transport(format!("{url}: {}", error_chain(&e))))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CallError::Transport(format!("{url}: reading the answer: {e}")))?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes)
                .map_err(|e| CallError::Transport(format!("{url}: the answer is not JSON: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(CallError::Api {
                status,
                error: body.error,
            }),
            Err(_) => Err(CallError::Transport(format!(
                "{url}: HTTP {status}: {}",
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ))),
        }
    }

    /// GET and decode.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        let v = self.call::<()>(Method::GET, path, None).await?;
        serde_json::from_value(v)
            .map_err(|e| CallError::Transport(format!("{path}: unexpected answer: {e}")))
    }
}

/// `e` and its sources, joined by `: `.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    explain_tls(s)
}

/// rustls names certificate failures by their enum variants; say what they mean here.
fn explain_tls(s: String) -> String {
    let hint = if s.contains("UnknownIssuer") || s.contains("BadSignature") {
        "the server's certificate is not from the CA you trust (WARREN_CA / --ca): is this a node of another cluster, or the wrong CA file?"
    } else if s.contains("NotValidForName") {
        "the server's certificate does not name the host in the address: use the address the node was started with"
    } else if s.contains("Expired") {
        "the server's certificate has expired (or this machine's clock is wrong)"
    } else {
        return s;
    };
    format!("{hint} ({s})")
}
