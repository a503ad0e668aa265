//! The admin API: HTTPS JSON on every node, authenticated with a bearer API key.
//!
//! Routes are listed in `warren_proto::api`. Reads are linearizable (a read index round
//! trip, then this node's replica); writes go through Raft (forwarded to the leader) and
//! are answered after they are committed and applied. Both go straight from the request
//! task to the [`Cluster`] handle: no actor mailbox on the way.
//!
//! Authentication: the key is checked against this node's replica first, so a request with
//! a key nobody has does no work on the leader. A key this replica does not know yet is
//! checked again after a read barrier (it may have just been created elsewhere), within
//! the limits of [`crate::miss`]: one leader read per unknown key id at a time, a miss
//! remembered for a moment, a bounded rate per second; beyond them it is answered 401.
//! Reads then check the key again on the fresh state they read; writes carry the key id
//! into the log, and the state machine refuses the write if the key was revoked meanwhile.
//!
//! Connections are bounded before any key is seen ([`ConnLimits`]): at most 512 at once
//! (more are closed at once, counted in `/metrics` and logged at most every 10 s), 10 s
//! for the TLS handshake, 10 s for a request's header, 60 s for its body, and a connection
//! with no request in flight for 30 s is closed (HTTP/1 keep-alive and HTTP/2 alike), so a
//! client dripping bytes or holding idle connections cannot keep them for ever.

pub mod client;
mod error;
mod routes;
mod status;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
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
use crate::miss::Kind;

/// Largest body of a normal request, in bytes.
pub const MAX_BODY: usize = 1 << 20;
/// Largest body of `POST /v1/apply`, in bytes.
pub const MAX_APPLY_BODY: usize = 16 << 20;
/// Longest a request body may take to arrive once its handler reads it.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

pub use crate::conn::{ConnLimits, ConnStats};

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
    /// The admin listener's connection counters.
    connections: Arc<ConnStats>,
    /// Whether this node may grant access (fail closed otherwise).
    serving: crate::serving::Serving,
    /// The supervision tree's report on itself.
    tree: Arc<crate::publish::Published<crate::actors::TreeHealth>>,
    /// The ports this node listens on itself, against which resource ports are checked.
    own: OwnPorts,
}

/// The addresses a node listens on itself, and the IP its TCP and UDP resources use.
#[derive(Debug, Clone)]
pub struct OwnPorts {
    /// `--l4-addr`.
    pub l4_ip: std::net::IpAddr,
    /// TCP listeners, with what each is.
    pub tcp: Vec<(std::net::SocketAddr, &'static str)>,
    /// UDP sockets, with what each is.
    pub udp: Vec<(std::net::SocketAddr, &'static str)>,
}

impl OwnPorts {
    /// What of this node's own already listens where a resource on `port` would
    /// (`udp`: a UDP resource).
    pub fn taken(&self, port: u16, udp: bool) -> Option<&'static str> {
        let list = if udp { &self.udp } else { &self.tcp };
        list.iter()
            .find(|(a, _)| {
                a.port() == port
                    && (a.ip() == self.l4_ip
                        || a.ip().is_unspecified()
                        || self.l4_ip.is_unspecified())
            })
            .map(|(_, what)| *what)
    }
}

impl AdminState {
    /// The handlers' state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cluster: Cluster,
        transport: Arc<QuicTransport>,
        ca: ClusterCa,
        node_name: Name,
        cluster_id: u128,
        members: Members,
        proxy: Arc<crate::proxy::Proxy>,
        serving: crate::serving::Serving,
        tree: Arc<crate::publish::Published<crate::actors::TreeHealth>>,
        own: OwnPorts,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                own,
                serving,
                tree,
                proxy,
                cluster,
                transport,
                ca,
                node_name,
                cluster_id,
                members,
                connections: Arc::default(),
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
    drain: crate::conn::Drain,
) -> String {
    let stats = state.inner.connections.clone();
    let app = routes::router(state);
    serve_router(listener, tls, app, ConnLimits::default(), stats, drain).await
}

/// Serves `app` over HTTPS on `listener` within `limits`, counting in `stats`.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: axum::Router,
    limits: ConnLimits,
    stats: Arc<ConnStats>,
    drain: crate::conn::Drain,
) -> String {
    crate::conn::serve(
        listener,
        tls,
        limits,
        stats,
        "admin API",
        drain,
        move |remote, _| {
            let svc = TowerToHyperService::new(app.clone());
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(Peer(remote));
                hyper::service::Service::call(&svc, req)
            })
        },
    )
    .await
}

/// The address an admin API connection comes from (a request extension; absent when a
/// test calls the router directly).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

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

/// The scope of `key`: from this node's replica, or, for a key id it does not know, from
/// the leader within the limits of [`crate::miss`].
async fn authenticate(state: &AdminState, key: &ApiKey) -> Result<Scope, ApiErr> {
    if let Some(record) = state.cluster().registry().authenticate(key) {
        return Ok(record.scope);
    }
    let registry = crate::miss::recheck(state.cluster(), Kind::ApiKey, key.id.0).await?;
    let record = registry.authenticate(key).ok_or_else(unknown_key)?;
    Ok(record.scope)
}

/// Authenticates a read and returns a linearizable registry to answer it from.
async fn auth_read(state: &AdminState, headers: &HeaderMap) -> Result<Arc<Registry>, ApiErr> {
    let key = bearer(headers)?;
    // The key first: only an authenticated read costs the leader a round trip.
    authenticate(state, &key).await?;
    let registry = state.cluster().read().await?;
    // Revoked since this replica (or the leader, a moment ago) knew it.
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
    let scope = authenticate(state, &key).await?;
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
    parse_json(&read_body(body, limit).await?)
}

/// Like [`read_json`], where no body (or only white space) means `T::default()`.
async fn read_optional_json<T: DeserializeOwned + Default>(
    body: Body,
    limit: usize,
) -> Result<T, ApiErr> {
    let bytes = read_body(body, limit).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_json(&bytes)
}

/// Reads a body of at most `limit` bytes, within [`BODY_READ_TIMEOUT`].
async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiErr> {
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit));
    let bytes = read.await.map_err(|_| {
        ApiErr::new(
            ErrorCode::InvalidJson,
            format!(
                "the body did not arrive within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        )
    })?;
    let bytes = bytes.map_err(|e| {
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
    Ok(bytes)
}

/// Parses exactly one JSON object (nothing before or after it; not an array in its
/// place, which serde would take for a struct), naming the field at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiErr> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiErr::new(
            ErrorCode::InvalidJson,
            "the body must be one JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let result: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    let value = result.map_err(|e| {
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
    })?;
    de.end().map_err(|e| {
        ApiErr::new(
            ErrorCode::InvalidJson,
            format!("invalid request body: {e} (send one JSON object and nothing after it)"),
        )
    })?;
    Ok(value)
}

/// Parses a path segment as a name; a bad one cannot exist, so it is a 404.
fn path_name(kind: warren_proto::registry::Kind, s: &str) -> Result<Name, ApiErr> {
    Name::new(s).map_err(|_| ApiErr::not_found(kind, s))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::client::TlsStream;
    use tokio_rustls::TlsConnector;

    use super::*;

    /// A server configuration for `localhost` and a client that trusts it.
    fn tls_pair() -> (Arc<rustls::ServerConfig>, TlsConnector) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), TlsConnector::from(Arc::new(client)))
    }

    struct Server {
        addr: SocketAddr,
        stats: Arc<ConnStats>,
        connector: TlsConnector,
    }

    impl Server {
        async fn start(limits: ConnLimits) -> Self {
            let (tls, connector) = tls_pair();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stats = Arc::new(ConnStats::default());
            let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
            tokio::spawn(serve_router(
                listener,
                tls,
                app,
                limits,
                stats.clone(),
                crate::conn::Drain::new(),
            ));
            Self {
                addr,
                stats,
                connector,
            }
        }

        async fn connect(&self) -> std::io::Result<TlsStream<TcpStream>> {
            let tcp = TcpStream::connect(self.addr).await?;
            let name = ServerName::try_from("localhost").unwrap();
            self.connector.connect(name, tcp).await
        }

        /// Polls (bounded) until `open` connections are counted.
        async fn until_open(&self, open: u64) {
            for _ in 0..500 {
                if self.stats.open() == open {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{} connections open, expected {open}", self.stats.open());
        }
    }

    async fn get(
        sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    ) -> (u16, Bytes) {
        let req = http::Request::get("/")
            .header("host", "localhost")
            .body(Empty::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn a_header_dripped_byte_by_byte_is_cut_off() {
        let server = Server::start(ConnLimits {
            header_read_timeout: Duration::from_millis(300),
            ..ConnLimits::default()
        })
        .await;
        let mut s = server.connect().await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nx-slow: ")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let mut closed = false;
        // One byte every 50 ms would keep the header coming for 10 s.
        for _ in 0..200 {
            if s.write_all(b"a").await.is_err() || s.flush().await.is_err() {
                closed = true;
                break;
            }
            match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(_)) | Err(_) => {}
            }
        }
        assert!(closed, "the server waited for the whole dripped header");
        server.until_open(0).await;
    }

    #[tokio::test]
    async fn idle_connections_are_closed_on_both_http_versions() {
        let server = Server::start(ConnLimits {
            idle_timeout: Duration::from_millis(300),
            close_grace: Duration::from_millis(300),
            ..ConnLimits::default()
        })
        .await;
        let (mut h1, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(server.connect().await.unwrap()))
                .await
                .unwrap();
        let h1_conn = tokio::spawn(conn);
        assert_eq!(get(&mut h1).await, (200, Bytes::from_static(b"ok")));
        let (mut h2, conn) = hyper::client::conn::http2::handshake(
            TokioExecutor::new(),
            TokioIo::new(server.connect().await.unwrap()),
        )
        .await
        .unwrap();
        let h2_conn = tokio::spawn(conn);
        let req = http::Request::get("https://localhost/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        // Both stay open while nothing happens, then the server ends them.
        tokio::time::timeout(Duration::from_secs(10), h1_conn)
            .await
            .expect("the idle HTTP/1.1 connection stayed open")
            .unwrap()
            .ok();
        tokio::time::timeout(Duration::from_secs(10), h2_conn)
            .await
            .expect("the idle HTTP/2 connection stayed open")
            .unwrap()
            .ok();
        server.until_open(0).await;
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed() {
        let server = Server::start(ConnLimits {
            idle_timeout: Duration::from_millis(300),
            close_grace: Duration::from_millis(300),
            ..ConnLimits::default()
        })
        .await;
        let mut s = server.connect().await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the silent connection stayed open"
        );
        server.until_open(0).await;
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_at_once() {
        let server = Server::start(ConnLimits {
            max_connections: 2,
            ..ConnLimits::default()
        })
        .await;
        let first = server.connect().await.unwrap();
        let second = server.connect().await.unwrap();
        server.until_open(2).await;
        let mut third = TcpStream::connect(server.addr).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the connection past the limit was not closed: {read:?}"
        );
        assert_eq!(server.stats.refused(), 1);
        assert!(server
            .stats
            .render("admin", "Admin API")
            .contains("warren_admin_connections_refused_total 1"));
        // One closes: a new connection is served again.
        drop(first);
        server.until_open(1).await;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(server.connect().await.unwrap()))
                .await
                .unwrap();
        tokio::spawn(conn);
        assert_eq!(get(&mut sender).await.0, 200);
        drop(second);
    }
}
