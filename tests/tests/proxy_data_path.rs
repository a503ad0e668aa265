//! The proxy's data path, black box: real nodes, a plain HTTP app behind them and real
//! HTTPS clients (reqwest, and hyper where the body has to be streamed by hand). What a user
//! notices: large bodies arrive intact both ways, limits hold, HTTP goes to HTTPS, errors
//! say what is wrong without showing internals, load balancing and path routing, header
//! rewriting, HTTP/2, and a node cut off from its cluster pausing access.
//!
//! Every resource here is public (no sign-in) except in the fail-closed test.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures::SinkExt as _;
use http::{header, HeaderMap, Request, Version};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use warren_tests::upstream::{download_pattern_sha256, Upstream};
use warren_tests::{certs, free_port, phase, Api, Cluster};

/// Names the test certificate covers.
const HOSTS: [&str; 14] = [
    "app.localhost",
    "big.localhost",
    "small.localhost",
    "dead.localhost",
    "slow.localhost",
    "sick.localhost",
    "unknown.localhost",
    "rr.localhost",
    "eject.localhost",
    "hdr.localhost",
    "h2.localhost",
    "h2small.localhost",
    "private.localhost",
    "open.localhost",
];

/// Resolvable, but no certificate covers it.
const NO_CERT_HOST: &str = "nocert.localhost";

const MIB: u64 = 1024 * 1024;

/// An HTTPS client that sends every `*.localhost` name to loopback and trusts `cert`.
fn web_builder(cert_pem: &str) -> reqwest::ClientBuilder {
    let hosts: Vec<&str> = HOSTS.iter().copied().chain([NO_CERT_HOST]).collect();
    warren_tests::web_client(cert_pem, &hosts, Duration::from_secs(30))
}

/// The same, speaking HTTP/1.1 only (reqwest would otherwise negotiate HTTP/2 by ALPN).
fn web(cert_pem: &str) -> reqwest::Client {
    web_builder(cert_pem).http1_only().build().unwrap()
}

use warren_tests::port_of;

/// A cluster with the test certificate uploaded, and a client that trusts it.
struct Setup {
    cluster: Cluster,
    cert: String,
    web: reqwest::Client,
}

impl Setup {
    async fn start(voters: usize, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        let cluster = Cluster::start_with_env(voters, env).await?;
        let (cert, key) = certs::self_signed(&HOSTS);
        cluster
            .api(0)
            .post_ok(
                "/v1/certificates",
                &json!({"name": "local", "cert_pem": cert, "key_pem": key}),
            )
            .await?;
        let web = web(&cert);
        Ok(Self { cluster, cert, web })
    }

    fn api(&self) -> Api {
        self.cluster.api(0)
    }

    /// `https://<host>:<node i's HTTPS port><path>`.
    fn url_on(&self, i: usize, host: &str, path: &str) -> String {
        format!(
            "https://{host}:{}{path}",
            port_of(&self.cluster.nodes[i].https_addr)
        )
    }

    fn url(&self, host: &str, path: &str) -> String {
        self.url_on(0, host, path)
    }
}

/// A public web resource on `domain` (under `prefix`) with `targets` and extra HTTP options.
fn public(
    name: &str,
    domain: &str,
    prefix: Option<&str>,
    targets: &[String],
    http: Value,
) -> Value {
    let mut options = json!({"public": true});
    if let Value::Object(extra) = http {
        options.as_object_mut().unwrap().extend(extra);
    }
    let mut route = json!({"domain": domain});
    if let Some(p) = prefix {
        route["path_prefix"] = json!(p);
    }
    json!({"name": name, "route": {"http": route}, "targets": targets, "http": options})
}

/// GETs `url` until the proxy has a route for it (TLS works and the answer is not the
/// proxy's 404), at most 5 s; returns that first routed answer.
async fn routed(web: &reqwest::Client, url: &str) -> anyhow::Result<reqwest::Response> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(5) {
        match web.get(url).send().await {
            Ok(r) if r.status() != StatusCode::NOT_FOUND => return Ok(r),
            Ok(r) => last = format!("{}", r.status()),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("{url} was not routed within 5 s; last: {last}")
}

/// GETs `url` until it answers `want` or `within` passes; returns the last answer.
async fn until_status(
    web: &reqwest::Client,
    url: &str,
    want: StatusCode,
    within: Duration,
) -> anyhow::Result<(StatusCode, String)> {
    let start = Instant::now();
    loop {
        let last = match web.get(url).send().await {
            Ok(resp) => {
                let status = resp.status();
                (status, resp.text().await.unwrap_or_default())
            }
            Err(e) => (StatusCode::IM_A_TEAPOT, format!("no answer: {e:#}")),
        };
        if last.0 == want || start.elapsed() > within {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Status and JSON (or the text as a JSON string) of a GET.
async fn get_json(
    web: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(StatusCode, HeaderMap, Value)> {
    let mut req = web.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let h = resp.headers().clone();
    let text = resp.text().await?;
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, h, v))
}

/// `len` bytes that do not repeat (xorshift), so lost, doubled or reordered chunks show.
fn pseudo_random(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A TLS client connection to `addr` for server name `host`, trusting `cert_pem`.
async fn tls_connect(
    addr: &str,
    host: &str,
    cert_pem: &str,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(c.expect("certificate PEM")).expect("root");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(host.to_owned()).expect("name"), tcp)
        .await
}

/// What a streamed upload got back.
struct Reply {
    status: StatusCode,
    version: Version,
    body: String,
    /// Whether every byte was handed to the connection before the answer was read.
    all_sent: bool,
}

/// POSTs `data` to `https://host<path>` on `https_addr`, streamed in 64 KiB chunks from a
/// channel (so nothing holds the whole body in a request object), over HTTP/1.1 or HTTP/2,
/// with a `Content-Length` header or without one (chunked on HTTP/1.1, plain DATA frames on
/// HTTP/2). Reads the answer as soon as it comes, even if the body is not all sent.
async fn stream_upload(
    https_addr: &str,
    cert_pem: &str,
    host: &str,
    path: &str,
    data: Bytes,
    content_length: bool,
    h2: bool,
) -> anyhow::Result<Reply> {
    let port = port_of(https_addr);
    let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
    let tls = tls_connect(https_addr, host, cert_pem, alpn).await?;
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let body = StreamBody::new(rx);
    let mut req = if h2 {
        Request::post(format!("https://{host}:{port}{path}")).version(Version::HTTP_2)
    } else {
        Request::post(path).header(header::HOST, format!("{host}:{port}"))
    };
    req = req.header(header::CONTENT_TYPE, "application/octet-stream");
    if content_length {
        req = req.header(header::CONTENT_LENGTH, data.len());
    }
    let req = req.body(body)?;
    type RespFut = Pin<Box<dyn Future<Output = hyper::Result<http::Response<Incoming>>> + Send>>;
    let resp_fut: RespFut = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        sender.ready().await?;
        Box::pin(async move { sender.send_request(req).await })
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        sender.ready().await?;
        Box::pin(async move { sender.send_request(req).await })
    };
    let mut producer = tokio::spawn(async move {
        let mut tx = tx;
        let mut offset = 0;
        while offset < data.len() {
            let end = (offset + 64 * 1024).min(data.len());
            if tx
                .send(Ok(Frame::data(data.slice(offset..end))))
                .await
                .is_err()
            {
                return false;
            }
            offset = end;
        }
        true
    });
    let resp = tokio::time::timeout(Duration::from_secs(30), resp_fut)
        .await
        .context("no answer to the upload within 30 s")??;
    let status = resp.status();
    let version = resp.version();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .context("the answer's body did not arrive within 10 s")??
        .to_bytes();
    producer.abort();
    let all_sent = matches!((&mut producer).await, Ok(true));
    Ok(Reply {
        status,
        version,
        body: String::from_utf8_lossy(&body).into_owned(),
        all_sent,
    })
}

/// Hashes a response body as it streams in; returns (bytes, hex SHA-256).
async fn hash_download(resp: reqwest::Response) -> anyhow::Result<(u64, String)> {
    let mut resp = resp;
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        n += chunk.len() as u64;
        h.update(&chunk);
    }
    Ok((n, hex::encode(h.finalize())))
}

/// The body of an error page must not show where the app lives.
fn assert_no_internals(body: &str, what: &str, secrets: &[String]) {
    for s in secrets {
        assert!(
            !body.contains(s.as_str()),
            "{what}: the page shows {s:?}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_bodies_stream_intact_and_body_limits_hold() -> anyhow::Result<()> {
    let up = Upstream::start("big").await?;
    let t = Setup::start(1, &[]).await?;
    let api = t.api();
    let target = vec![up.addr.to_string()];
    api.post_ok(
        "/v1/resources",
        &public("big", "big.localhost", None, &target, json!({})),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &public(
            "small",
            "small.localhost",
            None,
            &target,
            json!({"max_body_bytes": MIB}),
        ),
    )
    .await?;
    for host in ["big.localhost", "small.localhost"] {
        let r = routed(&t.web, &t.url(host, "/echo")).await?;
        assert_eq!(r.status(), StatusCode::OK, "{host}");
    }
    let https = &t.cluster.nodes[0].https_addr;

    phase!("a 32 MiB upload, streamed chunked, arrives intact");
    let data = pseudo_random((32 * MIB) as usize, 0x5eed);
    let want = sha256_hex(&data);
    let started = Instant::now();
    let r = stream_upload(
        https,
        &t.cert,
        "big.localhost",
        "/upload",
        data.clone(),
        false,
        false,
    )
    .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.all_sent);
    let seen: Value = serde_json::from_str(&r.body).context(r.body.clone())?;
    assert_eq!(seen["bytes"], json!(32 * MIB), "{seen}");
    assert_eq!(seen["sha256"], json!(want), "the upstream got other bytes");
    eprintln!("32 MiB chunked upload took {:?}", started.elapsed());

    phase!("the same 32 MiB with Content-Length arrives intact");
    let r = stream_upload(
        https,
        &t.cert,
        "big.localhost",
        "/upload",
        data.clone(),
        true,
        false,
    )
    .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let seen: Value = serde_json::from_str(&r.body).context(r.body.clone())?;
    assert_eq!(seen["bytes"], json!(32 * MIB), "{seen}");
    assert_eq!(seen["sha256"], json!(want), "the upstream got other bytes");
    drop(data);

    phase!("a 256 MiB download arrives intact (hashed while streaming)");
    let total = 256 * MIB;
    let started = Instant::now();
    let resp = t
        .web
        .get(t.url("big.localhost", &format!("/download?bytes={total}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()),
        Some(total.to_string().as_str()),
        "the length is passed on"
    );
    let (n, got) = hash_download(resp).await?;
    assert_eq!(n, total);
    assert_eq!(
        got,
        download_pattern_sha256(total),
        "the download is corrupt"
    );
    eprintln!("256 MiB download took {:?}", started.elapsed());

    phase!("a chunked download (no length) arrives intact too");
    let total = 8 * MIB;
    let resp = t
        .web
        .get(t.url(
            "big.localhost",
            &format!("/download?bytes={total}&chunked=1"),
        ))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let (n, got) = hash_download(resp).await?;
    assert_eq!((n, got), (total, download_pattern_sha256(total)));

    phase!("uploads above max_body_bytes get 413, with Content-Length and chunked");
    let big = pseudo_random((2 * MIB) as usize, 7);
    let r = stream_upload(
        https,
        &t.cert,
        "small.localhost",
        "/upload",
        big.clone(),
        true,
        false,
    )
    .await?;
    assert_eq!(
        r.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "declared length: {}",
        r.body
    );
    assert!(
        r.body.contains("1048576 bytes"),
        "says the limit: {}",
        r.body
    );
    let r = stream_upload(
        https,
        &t.cert,
        "small.localhost",
        "/upload",
        big.clone(),
        false,
        false,
    )
    .await?;
    assert_eq!(
        r.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "chunked: {}",
        r.body
    );

    phase!("an upload just under the limit still goes through");
    let fits = pseudo_random((MIB - 1) as usize, 9);
    let r = stream_upload(
        https,
        &t.cert,
        "small.localhost",
        "/upload",
        fits.clone(),
        false,
        false,
    )
    .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let seen: Value = serde_json::from_str(&r.body).context(r.body.clone())?;
    assert_eq!(seen["sha256"], json!(sha256_hex(&fits)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_redirects_and_error_pages_say_what_is_wrong() -> anyhow::Result<()> {
    let up = Upstream::start("app").await?;
    let t = Setup::start(1, &[]).await?;
    let api = t.api();
    let https = port_of(&t.cluster.nodes[0].https_addr);
    let http = port_of(&t.cluster.nodes[0].http_addr);
    let target = vec![up.addr.to_string()];
    let closed = free_port();
    let dead_target = format!("127.0.0.1:{closed}");
    api.post_ok(
        "/v1/resources",
        &public("app", "app.localhost", None, &target, json!({})),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &public(
            "dead",
            "dead.localhost",
            None,
            std::slice::from_ref(&dead_target),
            json!({}),
        ),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &public(
            "slow",
            "slow.localhost",
            None,
            &target,
            json!({"timeout_s": 1}),
        ),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &public(
            "sick",
            "sick.localhost",
            None,
            &target,
            json!({"health_check": {"path": "/status/500", "interval_s": 1, "failures": 1}}),
        ),
    )
    .await?;
    let secrets = vec![
        "127.0.0.1".to_owned(),
        up.addr.port().to_string(),
        closed.to_string(),
    ];

    phase!("plain HTTP answers 308 to the same address on HTTPS");
    let resp = t
        .web
        .get(format!("http://app.localhost:{http}/x?y=1"))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        resp.headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok()),
        Some(format!("https://app.localhost:{https}/x?y=1").as_str())
    );
    let r = routed(&t.web, &t.url("app.localhost", "/x?y=1")).await?;
    assert_eq!(r.status(), StatusCode::OK, "the redirect target works");

    phase!("a target on a closed port: 502 that does not show the address");
    let resp = routed(&t.web, &t.url("dead.localhost", "/echo")).await?;
    let status = resp.status();
    let body = resp.text().await?;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("could not reach the app"), "{body}");
    assert_no_internals(&body, "502", &secrets);

    phase!("an app slower than timeout_s: 504 after about a second");
    routed(&t.web, &t.url("slow.localhost", "/echo")).await?;
    let started = Instant::now();
    let resp = t
        .web
        .get(t.url("slow.localhost", "/slow?ms=3000"))
        .send()
        .await?;
    let took = started.elapsed();
    let status = resp.status();
    let body = resp.text().await?;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2900),
        "answered after {took:?}"
    );
    assert!(body.contains("did not answer"), "{body}");
    assert_no_internals(&body, "504", &secrets);

    phase!("the only target fails its health check: 503 within a few seconds");
    let started = Instant::now();
    let (status, body) = until_status(
        &t.web,
        &t.url("sick.localhost", "/echo"),
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("No healthy server"), "{body}");
    assert_no_internals(&body, "503", &secrets);
    eprintln!(
        "health check left the target out after {:?}",
        started.elapsed()
    );

    phase!("a host with a certificate but no resource: 404 page");
    let resp = t.web.get(t.url("unknown.localhost", "/a")).send().await?;
    let status = resp.status();
    let body = resp.text().await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("No resource is configured"), "{body}");

    phase!("a TLS server name without a certificate fails the handshake promptly");
    let handshake = tokio::time::timeout(
        Duration::from_secs(5),
        tls_connect(
            &t.cluster.nodes[0].https_addr,
            NO_CERT_HOST,
            &t.cert,
            b"http/1.1",
        ),
    )
    .await
    .context("the TLS handshake hung")?;
    let err = match handshake {
        Ok(_) => bail!("a handshake for {NO_CERT_HOST} succeeded without a certificate"),
        Err(e) => e,
    };
    eprintln!("handshake for {NO_CERT_HOST}: {err}");
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        t.web.get(t.url(NO_CERT_HOST, "/")).send(),
    )
    .await
    .context("reqwest hung")?;
    assert!(r.is_err(), "reqwest got an answer for {NO_CERT_HOST}");

    phase!("the node keeps serving");
    let mut t = t;
    assert!(t.cluster.nodes[0].is_running(), "the node died");
    let (status, _, body) = get_json(&t.web, &t.url("app.localhost", "/echo"), &[]).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["upstream"], "app");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_path_prefixes_and_passive_ejection() -> anyhow::Result<()> {
    let a = Upstream::start("up-a").await?;
    let b = Upstream::start("up-b").await?;
    let t = Setup::start(1, &[]).await?;
    let api = t.api();
    let (ta, tb) = (a.addr.to_string(), b.addr.to_string());
    let dead = format!("127.0.0.1:{}", free_port());
    api.post_ok(
        "/v1/resources",
        &public(
            "rr",
            "rr.localhost",
            None,
            &[ta.clone(), tb.clone()],
            json!({}),
        ),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &public(
            "site",
            "app.localhost",
            None,
            std::slice::from_ref(&ta),
            json!({}),
        ),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &public(
            "api",
            "app.localhost",
            Some("/api"),
            std::slice::from_ref(&tb),
            json!({}),
        ),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &public(
            "eject",
            "eject.localhost",
            None,
            &[dead.clone(), ta.clone()],
            json!({}),
        ),
    )
    .await?;

    phase!("round robin over two healthy targets");
    routed(&t.web, &t.url("rr.localhost", "/echo")).await?;
    let mut seen = Vec::new();
    for _ in 0..10 {
        let (status, _, body) = get_json(&t.web, &t.url("rr.localhost", "/echo"), &[]).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        seen.push(body["upstream"].as_str().unwrap_or("?").to_owned());
    }
    assert!(seen.iter().any(|s| s == "up-a"), "{seen:?}");
    assert!(seen.iter().any(|s| s == "up-b"), "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] != w[1]),
        "targets alternate: {seen:?}"
    );

    phase!("path prefixes: /api and /api/... go to one resource, /apix to the other");
    // The /api route is created last: wait until it is in.
    let start = Instant::now();
    loop {
        let (_, _, body) = get_json(&t.web, &t.url("app.localhost", "/api/x"), &[]).await?;
        if body["upstream"] == "up-b" || start.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for (path, want) in [
        ("/api/x", "up-b"),
        ("/api", "up-b"),
        ("/api/", "up-b"),
        ("/apix", "up-a"),
        ("/", "up-a"),
        ("/other/api", "up-a"),
    ] {
        let (status, _, body) = get_json(&t.web, &t.url("app.localhost", path), &[]).await?;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(body["upstream"], want, "{path}: {body}");
        assert_eq!(body["path"], path, "the path is passed on unchanged");
    }

    phase!("passive ejection: a refused connection is retried on the other target");
    let first = routed(&t.web, &t.url("eject.localhost", "/echo?n=0")).await?;
    let mut results = vec![(first.status(), first.text().await?)];
    for n in 1..10 {
        let resp = t
            .web
            .get(t.url("eject.localhost", &format!("/echo?n={n}")))
            .send()
            .await?;
        results.push((resp.status(), resp.text().await?));
    }
    for (i, (status, body)) in results.iter().enumerate() {
        assert_eq!(*status, StatusCode::OK, "request {i}: {body}");
        assert!(body.contains("\"up-a\""), "request {i}: {body}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn configured_headers_apply_and_identity_headers_cannot_be_spoofed() -> anyhow::Result<()> {
    let up = Upstream::start("app").await?;
    let t = Setup::start(1, &[]).await?;
    let api = t.api();
    let https = port_of(&t.cluster.nodes[0].https_addr);
    let target = vec![up.addr.to_string()];
    api.post_ok(
        "/v1/resources",
        &public(
            "hdr",
            "hdr.localhost",
            None,
            &target,
            json!({
                "host_header": "internal.example",
                "set_request_headers": {"X-Set-Req": "on", "X-Tenant": "blue"},
                "remove_request_headers": ["X-Drop-Me"],
                "set_response_headers": {"X-Frame-Options": "DENY"},
                "remove_response_headers": ["Content-Type"],
            }),
        ),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &public("app", "app.localhost", None, &target, json!({})),
    )
    .await?;
    routed(&t.web, &t.url("hdr.localhost", "/echo")).await?;
    routed(&t.web, &t.url("app.localhost", "/echo")).await?;

    phase!("request and response headers are rewritten as configured");
    let (status, resp_headers, body) = get_json(
        &t.web,
        &t.url("hdr.localhost", "/echo"),
        &[
            ("X-Set-Req", "from-client"),
            ("X-Drop-Me", "secret"),
            ("X-Kept", "yes"),
            ("X-Warren-User", "mallory"),
            ("X-Warren-Email", "mallory@evil.test"),
            ("X-Warren-Jwt-Assertion", "forged"),
        ],
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let h = &body["headers"];
    assert_eq!(
        h["x-set-req"],
        json!(["on"]),
        "set replaces the client's: {h}"
    );
    assert_eq!(h["x-tenant"], json!(["blue"]), "{h}");
    assert!(h.get("x-drop-me").is_none(), "removed: {h}");
    assert_eq!(h["x-kept"], json!(["yes"]), "others pass: {h}");
    assert_eq!(h["host"], json!(["internal.example"]), "host_header: {h}");
    for k in ["x-warren-user", "x-warren-email", "x-warren-jwt-assertion"] {
        assert!(
            h.get(k).is_none(),
            "{k} from the client reached the app: {h}"
        );
    }
    assert_eq!(h["x-forwarded-for"], json!(["127.0.0.1"]), "{h}");
    assert_eq!(h["x-forwarded-proto"], json!(["https"]), "{h}");
    assert_eq!(h["x-forwarded-host"], json!(["hdr.localhost"]), "{h}");
    assert_eq!(
        resp_headers
            .get("x-frame-options")
            .and_then(|v| v.to_str().ok()),
        Some("DENY"),
        "{resp_headers:?}"
    );
    assert!(
        resp_headers.get(header::CONTENT_TYPE).is_none(),
        "removed from the response: {resp_headers:?}"
    );

    phase!("without host_header the app sees the host the user asked for");
    let (status, resp_headers, body) = get_json(
        &t.web,
        &t.url("app.localhost", "/echo"),
        &[("x-warren-user", "mallory"), ("X-Warren-Groups", "admins")],
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let h = &body["headers"];
    assert_eq!(h["host"], json!([format!("app.localhost:{https}")]), "{h}");
    assert!(h.get("x-warren-user").is_none(), "{h}");
    assert!(h.get("x-warren-groups").is_none(), "{h}");
    assert!(
        h.get("x-set-req").is_none(),
        "other resources' options: {h}"
    );
    assert_eq!(h["x-forwarded-for"], json!(["127.0.0.1"]), "{h}");
    assert_eq!(h["x-forwarded-proto"], json!(["https"]), "{h}");
    assert_eq!(h["x-forwarded-host"], json!(["app.localhost"]), "{h}");
    assert_eq!(
        resp_headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert!(resp_headers.get("x-frame-options").is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_clients_work() -> anyhow::Result<()> {
    let up = Upstream::start("app").await?;
    let t = Setup::start(1, &[]).await?;
    let api = t.api();
    let port = port_of(&t.cluster.nodes[0].https_addr);
    let target = vec![up.addr.to_string()];
    api.post_ok(
        "/v1/resources",
        &public("h2", "h2.localhost", None, &target, json!({})),
    )
    .await?;
    routed(&t.web, &t.url("h2.localhost", "/echo")).await?;
    let https = &t.cluster.nodes[0].https_addr;

    phase!("ALPN picks HTTP/2; prior knowledge works too");
    let alpn = web_builder(&t.cert).build()?;
    let prior = web_builder(&t.cert).http2_prior_knowledge().build()?;
    let mut hosts_seen = Vec::new();
    for (what, client) in [("ALPN", &alpn), ("prior knowledge", &prior)] {
        let resp = client
            .get(t.url("h2.localhost", "/echo?v=2"))
            .header("x-warren-user", "mallory")
            .send()
            .await?;
        assert_eq!(resp.version(), Version::HTTP_2, "{what}");
        assert_eq!(resp.status(), StatusCode::OK, "{what}");
        let body: Value = resp.json().await?;
        assert_eq!(body["upstream"], "app", "{what}: {body}");
        assert_eq!(body["path"], "/echo?v=2", "{what}: {body}");
        let h = &body["headers"];
        assert!(h.get("x-warren-user").is_none(), "{what}: {h}");
        assert_eq!(h["x-forwarded-proto"], json!(["https"]), "{what}: {h}");
        assert_eq!(
            h["x-forwarded-host"],
            json!(["h2.localhost"]),
            "{what}: {h}"
        );
        hosts_seen.push((what, h["host"].clone()));
    }

    phase!("HTTP/2: a 16 MiB download and uploads with a length arrive intact");
    let total = 16 * MIB;
    let resp = prior
        .get(t.url("h2.localhost", &format!("/download?bytes={total}")))
        .send()
        .await?;
    assert_eq!(resp.version(), Version::HTTP_2);
    let (n, got) = hash_download(resp).await?;
    assert_eq!((n, got), (total, download_pattern_sha256(total)));
    let data = pseudo_random((4 * MIB) as usize, 3);
    let resp = prior
        .post(t.url("h2.localhost", "/upload"))
        .body(data.to_vec())
        .send()
        .await?;
    assert_eq!(resp.version(), Version::HTTP_2);
    let seen: Value = resp.json().await?;
    assert_eq!(seen["sha256"], json!(sha256_hex(&data)), "{seen}");
    let r = stream_upload(
        https,
        &t.cert,
        "h2.localhost",
        "/upload",
        data.clone(),
        true,
        true,
    )
    .await?;
    assert_eq!(r.version, Version::HTTP_2);
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let seen: Value = serde_json::from_str(&r.body).context(r.body.clone())?;
    assert_eq!(seen["sha256"], json!(sha256_hex(&data)), "{seen}");

    phase!("the app sees the same Host over HTTP/2 as over HTTP/1.1");
    let (status, _, body) = get_json(&t.web, &t.url("h2.localhost", "/echo"), &[]).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let want = json!([format!("h2.localhost:{port}")]);
    assert_eq!(body["headers"]["host"], want, "HTTP/1.1: {body}");
    for (what, host) in hosts_seen {
        assert_eq!(
            host, want,
            "HTTP/2 ({what}): the app is told another Host (port dropped) than over HTTP/1.1"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_uploads_without_content_length_reach_the_app() -> anyhow::Result<()> {
    let up = Upstream::start("app").await?;
    let t = Setup::start(1, &[]).await?;
    let api = t.api();
    let target = vec![up.addr.to_string()];
    api.post_ok(
        "/v1/resources",
        &public("h2", "h2.localhost", None, &target, json!({})),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &public(
            "h2small",
            "h2small.localhost",
            None,
            &target,
            json!({"max_body_bytes": MIB}),
        ),
    )
    .await?;
    routed(&t.web, &t.url("h2.localhost", "/echo")).await?;
    routed(&t.web, &t.url("h2small.localhost", "/echo")).await?;
    let https = &t.cluster.nodes[0].https_addr;

    phase!("HTTP/2: a streamed upload without Content-Length (DATA frames only) arrives intact");
    let data = pseudo_random((4 * MIB) as usize, 3);
    let r = stream_upload(
        https,
        &t.cert,
        "h2.localhost",
        "/upload",
        data.clone(),
        false,
        true,
    )
    .await?;
    assert_eq!(r.version, Version::HTTP_2);
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let seen: Value = serde_json::from_str(&r.body).context(r.body.clone())?;
    assert_eq!(
        seen["bytes"],
        json!(data.len()),
        "an HTTP/2 body without Content-Length must reach the app: {seen}"
    );
    assert_eq!(seen["sha256"], json!(sha256_hex(&data)), "{seen}");

    phase!("HTTP/2: the same above max_body_bytes gets 413");
    let big = pseudo_random((2 * MIB) as usize, 5);
    let r = stream_upload(
        https,
        &t.cert,
        "h2small.localhost",
        "/upload",
        big,
        false,
        true,
    )
    .await?;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    Ok(())
}

/// Three nodes; two are killed with SIGKILL, leaving the leader alive (`leader_survives`)
/// or a follower. The survivor must stop granting access to the private resource.
async fn cut_off_node_fails_closed(leader_survives: bool) -> anyhow::Result<()> {
    let up = Upstream::start("app").await?;
    let mut t = Setup::start(3, &[("WARREN_LEADER_LOSS_BOUND_S", "2")]).await?;
    let api = t.api();
    let target = vec![up.addr.to_string()];
    api.post_ok(
        "/v1/policies",
        &json!({"name": "admins", "allow": {"group": "admins"}}),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &json!({"name": "private", "route": {"http": {"domain": "private.localhost"}},
                "targets": target, "policies": ["admins"]}),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &public("open", "open.localhost", None, &target, json!({})),
    )
    .await?;

    phase!("once in contact: the private resource asks for sign-in on every node");
    for i in 0..3 {
        // A node that just joined fails closed until it hears from the leader.
        let url = t.url_on(i, "private.localhost", "/echo");
        let (status, body) =
            until_status(&t.web, &url, StatusCode::FOUND, Duration::from_secs(5)).await?;
        assert_eq!(
            status,
            StatusCode::FOUND,
            "node {i}: sign-in redirect: {body}"
        );
        let resp = routed(&t.web, &t.url_on(i, "open.localhost", "/echo")).await?;
        assert_eq!(resp.status(), StatusCode::OK, "node {i}");
    }
    let leader = t.cluster.leader(0).await?;
    let survivor = if leader_survives {
        leader
    } else {
        (leader + 1) % 3
    };
    let private = t.url_on(survivor, "private.localhost", "/echo");
    let open = t.url_on(survivor, "open.localhost", "/echo");

    phase!(
        "kill -9 the two nodes other than {} (the leader is {})",
        t.cluster.nodes[survivor].name,
        t.cluster.nodes[leader].name
    );
    for i in (0..3).filter(|i| *i != survivor) {
        t.cluster.nodes[i].kill9();
    }
    let killed = Instant::now();

    phase!("the survivor pauses access to the private resource within 10 s");
    let (status, body) = until_status(
        &t.web,
        &private,
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(10),
    )
    .await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("Access paused"), "{body}");
    eprintln!("access paused {:?} after the kill", killed.elapsed());

    phase!("public resources on the survivor still work");
    let (status, _, body) = get_json(&t.web, &open, &[]).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["upstream"], "app");
    let (status, _, body) = get_json(&t.web, &private, &[]).await?;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "still paused: {body}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_cut_off_from_its_cluster_pauses_access_but_serves_public_resources(
) -> anyhow::Result<()> {
    cut_off_node_fails_closed(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_its_cluster_pauses_access_but_serves_public_resources(
) -> anyhow::Result<()> {
    cut_off_node_fails_closed(true).await
}

/// Shutdown drains: a request in flight when the node is told to stop (SIGTERM) gets its
/// whole answer, and the node then exits cleanly. (Before, stopping aborted it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_in_flight_when_the_node_stops_gets_its_answer() -> anyhow::Result<()> {
    let up = Upstream::start("slow").await?;
    let mut t = Setup::start(1, &[]).await?;
    t.api()
        .post_ok(
            "/v1/resources",
            &public(
                "slow",
                "slow.localhost",
                None,
                &[up.addr.to_string()],
                json!({}),
            ),
        )
        .await?;
    routed(&t.web, &t.url("slow.localhost", "/slow?ms=1")).await?;

    phase!("a request that takes 2 s is in flight when the node gets SIGTERM");
    let web = t.web.clone();
    let url = t.url("slow.localhost", "/slow?ms=2000");
    let inflight = tokio::spawn(async move {
        let r = web.get(&url).send().await?;
        let status = r.status();
        let body = r.text().await?;
        anyhow::Ok((status, body))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let exit = tokio::task::block_in_place(|| t.cluster.nodes[0].terminate())?;
    phase!("the node exited {exit} after {:?}", started.elapsed());
    let (status, body) = inflight
        .await?
        .context("the request in flight was cut off by the shutdown")?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(exit.success(), "the node did not exit cleanly: {exit}");
    Ok(())
}
