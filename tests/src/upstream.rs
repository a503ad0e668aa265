//! A plain HTTP/1.1 upstream (the application behind the proxy), run inside the test's
//! tokio runtime.
//!
//! Routes:
//! - `GET /ws`: WebSocket echo (text and binary messages come back as they were sent).
//! - `POST /upload`: reads the body as it streams in; answers `{"bytes": n, "sha256": hex}`.
//! - `GET /download?bytes=N`: N bytes, streamed in 64 KiB chunks, byte `i` being
//!   [`pattern_byte`]`(i)`; with `Content-Length` unless `&chunked=1`. Check with
//!   [`download_pattern_sha256`].
//! - `GET /slow?ms=N`: waits N ms, then 200.
//! - `GET /status/N`: answers status N.
//! - anything else: echo, `{"upstream": name, "method", "path" (with query),
//!   "headers": {lower-case name: [values]}, "body_bytes": n}`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::{header, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Body = BoxBody<Bytes, Infallible>;

/// A running upstream on 127.0.0.1; stops (with every connection) when dropped.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its name, echoed as `"upstream"`.
    pub name: String,
    /// The self-signed certificate (PEM) when started with [`Upstream::start_tls`].
    pub cert_pem: Option<String>,
    task: tokio::task::JoinHandle<()>,
    // Dropping it ends every connection task.
    _stop: watch::Sender<()>,
}

impl Upstream {
    /// Starts a plain-HTTP upstream called `name` on a free loopback port.
    pub async fn start(name: &str) -> anyhow::Result<Upstream> {
        Self::spawn(name, None).await
    }

    /// Starts an HTTPS upstream (HTTP/1.1 over TLS) called `name` with a self-signed
    /// certificate for `dns_names` (see [`crate::certs::self_signed`]).
    pub async fn start_tls(name: &str, dns_names: &[&str]) -> anyhow::Result<Upstream> {
        let (cert, key) = crate::certs::self_signed(dns_names);
        Self::spawn(name, Some((cert, key))).await
    }

    async fn spawn(name: &str, tls: Option<(String, String)>) -> anyhow::Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(());
        let acceptor = match &tls {
            Some((cert, key)) => Some(tls_acceptor(cert, key)?),
            None => None,
        };
        let name_arc: Arc<str> = name.into();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let name = name_arc.clone();
                let stopped = stopped.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(Ok(tls)) =
                                tokio::time::timeout(Duration::from_secs(10), a.accept(tcp)).await
                            {
                                serve(tls, name, stopped).await;
                            }
                        }
                        None => serve(tcp, name, stopped).await,
                    }
                });
            }
        });
        Ok(Upstream {
            addr,
            name: name.to_owned(),
            cert_pem: tls.map(|(c, _)| c),
            task,
            _stop: stop,
        })
    }

    /// `http://<addr>` (or `https://` for a TLS upstream).
    pub fn url(&self) -> String {
        let scheme = if self.cert_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn tls_acceptor(cert: &str, key: &str) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("TLS server config")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

async fn serve<IO>(io: IO, name: Arc<str>, stopped: watch::Receiver<()>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc_stopped = stopped.clone();
    let svc = service_fn(move |req| handle(req, name.clone(), svc_stopped.clone()));
    let conn = http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    let mut stopped = stopped;
    tokio::select! {
        _ = conn => {}
        _ = stopped.changed() => {}
    }
}

/// Byte `i` of a `/download` body.
pub fn pattern_byte(i: u64) -> u8 {
    // (i*31 + 7) mod 251, without overflow for any i.
    (((i % 251) * 31 + 7) % 251) as u8
}

/// Bytes `offset..offset+len` of a `/download` body.
pub fn download_pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|k| pattern_byte(offset + k)).collect()
}

/// Hex SHA-256 of the body of `GET /download?bytes=n`.
pub fn download_pattern_sha256(n: u64) -> String {
    // The pattern repeats every 251 bytes: hash whole blocks of 251 * 256 bytes.
    let block = download_pattern(0, 251 * 256);
    let mut h = Sha256::new();
    let mut left = n;
    while left > 0 {
        let take = left.min(block.len() as u64) as usize;
        h.update(&block[..take]);
        left -= take as u64;
    }
    hex::encode(h.finalize())
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()).boxed())
        .expect("response")
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    full(status, "text/plain; charset=utf-8", body.into())
}

fn json_response(v: &serde_json::Value) -> Response<Body> {
    full(StatusCode::OK, "application/json", v.to_string())
}

fn query_param(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| v.to_owned())
    })
}

async fn handle(
    req: Request<Incoming>,
    name: Arc<str>,
    stopped: watch::Receiver<()>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    Ok(match (req.method().as_str(), path.as_str()) {
        ("GET", "/ws") => websocket(req, stopped),
        ("POST", "/upload") => upload(req).await,
        ("GET", "/download") => download(&req),
        ("GET", "/slow") => match query_param(&req, "ms").and_then(|v| v.parse::<u64>().ok()) {
            Some(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text(StatusCode::OK, format!("slept {ms} ms\n"))
            }
            None => text(StatusCode::BAD_REQUEST, "want ?ms=N\n"),
        },
        ("GET", p) if p.starts_with("/status/") => {
            match p["/status/".len()..]
                .parse::<u16>()
                .ok()
                .and_then(|n| StatusCode::from_u16(n).ok())
            {
                Some(s) => text(s, format!("status {}\n", s.as_u16())),
                None => text(StatusCode::BAD_REQUEST, "want /status/N\n"),
            }
        }
        _ => echo(req, &name).await,
    })
}

async fn echo(req: Request<Incoming>, name: &str) -> Response<Body> {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
    let mut body = req.into_body();
    let mut body_bytes = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            body_bytes += d.len() as u64;
        }
    }
    json_response(&json!({
        "upstream": name,
        "method": method,
        "path": path,
        "headers": headers,
        "body_bytes": body_bytes,
    }))
}

async fn upload(req: Request<Incoming>) -> Response<Body> {
    let mut body = req.into_body();
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(d) = frame.data_ref() {
                    h.update(d);
                    n += d.len() as u64;
                }
            }
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("body error: {e}\n")),
        }
    }
    json_response(&json!({ "bytes": n, "sha256": hex::encode(h.finalize()) }))
}

fn download(req: &Request<Incoming>) -> Response<Body> {
    let Some(total) = query_param(req, "bytes").and_then(|v| v.parse::<u64>().ok()) else {
        return text(StatusCode::BAD_REQUEST, "want ?bytes=N\n");
    };
    let chunked = query_param(req, "chunked").is_some_and(|v| v == "1");
    const CHUNK: u64 = 64 * 1024;
    let stream = futures::stream::unfold(0u64, move |offset| async move {
        if offset >= total {
            return None;
        }
        let len = CHUNK.min(total - offset);
        let data = Bytes::from(download_pattern(offset, len as usize));
        Some((Ok::<_, Infallible>(Frame::data(data)), offset + len))
    });
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if !chunked {
        resp = resp.header(header::CONTENT_LENGTH, total);
    }
    resp.body(http_body_util::BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
}

fn websocket(req: Request<Incoming>, stopped: watch::Receiver<()>) -> Response<Body> {
    let is_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return text(StatusCode::BAD_REQUEST, "not a WebSocket handshake\n");
    };
    if !is_upgrade {
        return text(StatusCode::BAD_REQUEST, "not a WebSocket handshake\n");
    }
    let mut stopped = stopped;
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        tokio::select! {
            _ = ws_echo(ws) => {}
            _ = stopped.changed() => {}
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .body(Full::new(Bytes::new()).boxed())
        .expect("response")
}

async fn ws_echo<S>(mut ws: WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                if ws.send(msg).await.is_err() {
                    return;
                }
            }
            Message::Close(_) => {
                let _ = ws.close(None).await;
                return;
            }
            // tungstenite answers pings itself.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}
