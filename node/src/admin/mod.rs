//! The admin API: HTTPS JSON on every node, authenticated with a bearer API key.
//!
//! Routes are listed in `warren_proto::api`. Reads are linearizable (a read index round
//! trip, then this node's replica); writes go through Raft (forwarded to the leader) and
//! are answered after they are committed and applied. Both go straight from the request
//! task to the [`Cluster`] handle: no actor mailbox on the way.
//!
//! Authentication: the key is checked against this node's replica; a key this replica does
//! not know yet is checked again after a read barrier (it may have just been created
//! elsewhere). Reads check the key on the fresh state they read; writes carry the key id
//! into the log, and the state machine refuses the write if the key was revoked meanwhile.

mod error;
mod routes;
mod status;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use warren_consensus::cluster::Cluster;
use warren_consensus::pki::ClusterCa;
use warren_consensus::quic::QuicTransport;
use warren_consensus::registry::Registry;
use warren_proto::api::{ErrorCode, Scope};
use warren_proto::token::{ApiKey, KeyId};
use warren_proto::Name;

pub use error::ApiErr;
pub use status::cluster_status;

use crate::actors::Members;

/// Largest body of a normal request, in bytes.
pub const MAX_BODY: usize = 1 << 20;
/// Largest body of `POST /v1/apply`, in bytes.
pub const MAX_APPLY_BODY: usize = 16 << 20;

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    inner: Arc<Inner>,
}

struct Inner {
    cluster: Cluster,
    transport: Arc<QuicTransport>,
    ca: ClusterCa,
    node_name: Name,
    cluster_id: u128,
    members: Members,
    /// The node's proxy (its port for share link URLs, its metrics).
    proxy: Arc<crate::proxy::Proxy>,
}

impl AdminState {
    /// The handlers' state.
    pub fn new(
        cluster: Cluster,
        transport: Arc<QuicTransport>,
        ca: ClusterCa,
        node_name: Name,
        cluster_id: u128,
        members: Members,
        proxy: Arc<crate::proxy::Proxy>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                proxy,
                cluster,
                transport,
                ca,
                node_name,
                cluster_id,
                members,
            }),
        }
    }

    fn cluster(&self) -> &Cluster {
        &self.inner.cluster
    }
}

/// Serves HTTPS on `listener` until it fails; returns why it stopped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: AdminState,
) -> String {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = routes::router(state);
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("admin API accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, "admin TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%remote, "admin connection ended: {e}");
            }
        });
    }
}

/// The API key in the `Authorization` header.
fn bearer(headers: &HeaderMap) -> Result<ApiKey, ApiErr> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiErr::unauthorized("missing API key: send the header `Authorization: Bearer <key>`")
        })?;
    let value = value
        .to_str()
        .map_err(|_| ApiErr::unauthorized("the Authorization header is not text"))?;
    let key = value
        .strip_prefix("Bearer ")
        .ok_or_else(|| ApiErr::unauthorized("expected `Authorization: Bearer <key>`"))?;
    ApiKey::parse(key).map_err(|e| ApiErr::unauthorized(format!("malformed API key: {e}")))
}

fn unknown_key() -> ApiErr {
    ApiErr::unauthorized("unknown or revoked API key")
}

/// Authenticates a read and returns a linearizable registry to answer it from.
async fn auth_read(state: &AdminState, headers: &HeaderMap) -> Result<Arc<Registry>, ApiErr> {
    let key = bearer(headers)?;
    let registry = state.cluster().read().await?;
    registry.authenticate(&key).ok_or_else(unknown_key)?;
    Ok(registry)
}

/// Authenticates against this node's replica only: for status, which must work without a
/// quorum.
fn auth_local(state: &AdminState, headers: &HeaderMap) -> Result<(), ApiErr> {
    let key = bearer(headers)?;
    state
        .cluster()
        .registry()
        .authenticate(&key)
        .ok_or_else(unknown_key)?;
    Ok(())
}

/// Authenticates a write; returns the key id to put in the request.
async fn auth_write(state: &AdminState, headers: &HeaderMap) -> Result<KeyId, ApiErr> {
    let key = bearer(headers)?;
    let local = state.cluster().registry();
    let scope = match local.authenticate(&key) {
        Some(record) => record.scope,
        None => {
            let fresh = state.cluster().read().await?;
            fresh.authenticate(&key).ok_or_else(unknown_key)?.scope
        }
    };
    if scope == Scope::ReadOnly {
        return Err(ApiErr::new(
            ErrorCode::Forbidden,
            "this API key is read-only",
        ));
    }
    Ok(key.id)
}

/// Reads and parses a JSON body of at most `limit` bytes.
async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiErr> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        if too_large {
            ApiErr::new(
                ErrorCode::PayloadTooLarge,
                format!("the body is larger than {limit} bytes"),
            )
        } else {
            ApiErr::new(ErrorCode::InvalidJson, format!("reading the body: {e}"))
        }
    })?;
    parse_json(&bytes)
}

/// Parses JSON, naming the field at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiErr> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let result: Result<T, _> = serde_path_to_error::deserialize(de);
    result.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let code = match inner.classify() {
            serde_json::error::Category::Data => ErrorCode::InvalidField,
            _ => ErrorCode::InvalidJson,
        };
        let msg = inner.to_string();
        let mut field = (path != "." && !path.contains('?')).then_some(path);
        if let Some(rest) = msg.strip_prefix("unknown field `") {
            if let Some((name, _)) = rest.split_once('`') {
                field = Some(match field {
                    Some(p) if !p.ends_with(name) => format!("{p}.{name}"),
                    Some(p) => p,
                    None => name.to_owned(),
                });
            }
        }
        let err = ApiErr::new(code, format!("invalid request body: {msg}"));
        match field {
            Some(f) => err.field(f),
            None => err,
        }
    })
}

/// Parses a path segment as a name; a bad one cannot exist, so it is a 404.
fn path_name(kind: warren_proto::registry::Kind, s: &str) -> Result<Name, ApiErr> {
    Name::new(s).map_err(|_| ApiErr::not_found(kind, s))
}
