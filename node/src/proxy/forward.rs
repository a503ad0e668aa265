//! Sending an allowed request to one of the route's targets, streaming both ways, and the
//! active health checks of targets.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;

use super::decide::{Grant, Pass, Principal};
use super::pages::page;
use super::request::{self, View};
use super::sign::Signer;
use super::state::{Pool, Route};
use super::{unix_now, Body, Proxy};

/// How often an upgraded connection is checked again when nothing changed.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// How much of a too-large request body is read before the 413 is sent.
const DRAIN_LIMIT: u64 = 16 * 1024 * 1024;

/// Headers that describe one connection and never cross the proxy (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for h in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(h);
    }
}

/// Whether the request carries a body. Asks the body itself: an HTTP/2 request streams a
/// body with neither Content-Length nor Transfer-Encoding.
fn has_body(req: &Request<Incoming>) -> bool {
    !hyper::body::Body::is_end_stream(req.body())
}

impl Proxy {
    /// Sends the request `pass` lets through to a usable target of its route and streams
    /// the answer back.
    pub(super) async fn forward(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        pass: &Pass<'_>,
        signer: Option<&Signer>,
        client: &request::Client,
        view: &View,
    ) -> Response<Body> {
        let route: &Route = &pass.route;
        let who = pass.principal();
        let host = view.host.as_str();
        if route.max_body > 0 {
            let declared = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > route.max_body) {
                // Read (and drop) a bounded part of what the client is sending before
                // answering, so it sees the 413 instead of a reset while still writing.
                let drain = async {
                    let mut body = req.into_body();
                    let mut seen = 0u64;
                    while seen < DRAIN_LIMIT {
                        match body.frame().await {
                            Some(Ok(f)) => {
                                seen += f.data_ref().map_or(0, |d| d.len() as u64);
                            }
                            _ => break,
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
                return page(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Request too large",
                    &format!(
                        "This resource accepts request bodies up to {} bytes.",
                        route.max_body
                    ),
                );
            }
        }
        // Only WebSocket, or what the resource lists: an upgraded connection is one policy
        // check for everything that follows on it.
        let upgrade_protocol = request::allowed_upgrade(&req, &route.options.upgrades);
        let client_upgrade = upgrade_protocol
            .is_some()
            .then(|| hyper::upgrade::on(&mut req));
        let bodyless = !has_body(&req);
        let (mut parts, body) = req.into_parts();
        // An upgraded connection outlives this check: it keeps what let it through.
        let grant = client_upgrade
            .as_ref()
            .map(|_| Grant::new(pass, &view.host, parts.uri.path(), &parts.method, client.ip));

        // Headers for upstream: no hop-by-hop, nothing only the proxy may say, ours added.
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        request::sanitize(headers);
        for h in &route.remove_request {
            headers.remove(h);
        }
        for (k, v) in &route.set_request {
            headers.insert(k.clone(), v.clone());
        }
        // The host that was routed, never one the client named elsewhere.
        let host_value = route
            .host_header
            .clone()
            .or_else(|| HeaderValue::from_str(&view.authority()).ok());
        if let Some(h) = host_value {
            headers.insert(header::HOST, h);
        }
        request::set_forwarding(headers, client, view);
        if let Some(p) = who {
            self.identity_headers(headers, p, host, signer);
        }
        if let Some(proto) = upgrade_protocol {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, proto);
        }
        let path_and_query = route
            .upstream_path(parts.uri.path_and_query().map_or("/", |p| p.as_str()))
            .into_owned();

        let mut body = Some(body);
        let mut avoid = None;
        let mut last_error = "no target is available";
        for attempt in 0..2 {
            let picked = match &route.site {
                Some(site) => route
                    .pool
                    .pick_where(avoid, |t| self.sites.target_ok(site, &t.target)),
                None => route.pool.pick(avoid),
            };
            let Some((index, target)) = picked else {
                break;
            };
            // Through a tunnel the request goes on a connection of its own: origin form.
            let uri = if route.site.is_some() {
                path_and_query.clone()
            } else {
                format!("http://{}{}", target.authority, path_and_query)
            };
            let uri: Uri = match uri.parse() {
                Ok(u) => u,
                Err(_) => {
                    return page(
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        "The request path is not valid.",
                    )
                }
            };
            let upstream_body: Body = if bodyless {
                Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed()
            } else {
                match body.take() {
                    Some(b) if route.max_body > 0 => {
                        Limited::new(b, route.max_body as usize).boxed()
                    }
                    Some(b) => b.map_err(Into::into).boxed(),
                    None => break,
                }
            };
            let mut up = Request::new(upstream_body);
            *up.method_mut() = parts.method.clone();
            *up.version_mut() = http::Version::HTTP_11;
            // Keep a copy only when a retry on another target can happen.
            let may_retry = bodyless && attempt == 0 && route.pool.targets.len() > 1;
            *up.headers_mut() = if may_retry {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            *up.uri_mut() = uri;
            match tokio::time::timeout(route.timeout, self.send(route, target, up)).await {
                Err(_) => {
                    return page(
                        StatusCode::GATEWAY_TIMEOUT,
                        "The app did not answer in time",
                        &format!(
                            "The app behind {host} did not answer within {} seconds.",
                            route.timeout.as_secs()
                        ),
                    )
                }
                Ok(Ok(resp)) => return self.answer(resp, route, client_upgrade, grant).await,
                Ok(Err(Failure::NotConnected(why))) => {
                    tracing::warn!(resource = %route.resource, "{why}");
                    return page(
                        StatusCode::BAD_GATEWAY,
                        "The site is not connected",
                        &format!("The network behind {host} is not connected to Warren right now."),
                    );
                }
                Ok(Err(Failure::Http(e))) => {
                    if matches!(&e, HttpFailure::Connect(_)) {
                        target.eject();
                        tracing::warn!(resource = %route.resource, target = %target.authority, "target refused the connection; left out for a while: {e}");
                        last_error = "the app is not accepting connections";
                        if bodyless && attempt == 0 {
                            avoid = Some(index);
                            continue;
                        }
                    } else if matches!(&e, HttpFailure::TooLarge) {
                        return page(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "Request too large",
                            &format!(
                                "This resource accepts request bodies up to {} bytes.",
                                route.max_body
                            ),
                        );
                    } else {
                        tracing::warn!(resource = %route.resource, target = %target.authority, "upstream request failed: {e}");
                        last_error = "the app closed the connection without a complete answer";
                    }
                    break;
                }
            }
        }
        let any_usable = match &route.site {
            Some(site) => route
                .pool
                .pick_where(None, |t| self.sites.target_ok(site, &t.target))
                .is_some(),
            None => route.pool.pick(None).is_some(),
        };
        if !any_usable && last_error == "no target is available" {
            // Behind a site the agent's checks decide: the gateway (the site) has nothing
            // healthy to reach, a 502 like a site without a tunnel.
            let status = if route.site.is_some() {
                StatusCode::BAD_GATEWAY
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return page(
                status,
                "The app is unavailable",
                &format!("No healthy server is available for {host} right now."),
            );
        }
        page(
            StatusCode::BAD_GATEWAY,
            "The app is not answering",
            &format!("Warren could not reach the app behind {host}: {last_error}."),
        )
    }

    /// Sends the request to `target`: directly, or through the site's tunnel.
    async fn send(
        &self,
        route: &Route,
        target: &super::state::TargetState,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, Failure> {
        let Some(site) = &route.site else {
            return self.client.request(req).await.map_err(|e| {
                Failure::Http(if e.is_connect() {
                    HttpFailure::Connect(e.to_string())
                } else if too_large(&e) {
                    HttpFailure::TooLarge
                } else {
                    HttpFailure::Other(e.to_string())
                })
            });
        };
        let stream = match self
            .sites
            .open(site, &target.target, warren_proto::tunnel::Protocol::Tcp)
            .await
        {
            Ok(s) => s,
            Err(crate::sites::OpenError::NotConnected(s)) => {
                return Err(Failure::NotConnected(format!(
                    "site {s} has no agent tunnel"
                )))
            }
            Err(crate::sites::OpenError::Refused(why)) => {
                return Err(Failure::Http(HttpFailure::Connect(why)))
            }
            Err(e) => return Err(Failure::Http(HttpFailure::Other(e.to_string()))),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::Http(HttpFailure::Other(e.to_string())))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        sender.send_request(req).await.map_err(|e| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return Failure::Http(HttpFailure::TooLarge);
                }
                source = s.source();
            }
            Failure::Http(HttpFailure::Other(e.to_string()))
        })
    }

    async fn answer(
        self: &Arc<Self>,
        mut resp: Response<Incoming>,
        route: &Route,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        grant: Option<Grant>,
    ) -> Response<Body> {
        request::strip_proxy_set_cookies(resp.headers_mut());
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return page(
                    StatusCode::BAD_GATEWAY,
                    "The app is not answering",
                    "The app switched protocols without being asked to.",
                );
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let proxy = Arc::downgrade(self);
            let mut changed = self.watch_state();
            tokio::spawn(async move {
                let (Ok(client), Ok(upstream)) = tokio::join!(client_upgrade, upstream_upgrade)
                else {
                    return;
                };
                let mut client = TokioIo::new(client);
                let mut upstream = TokioIo::new(upstream);
                let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
                tokio::pin!(copy);
                // Checked again on every change of the state (a revoked session, a disabled
                // user, a new policy) and every second (expiry, time windows): like an L4
                // flow, the connection ends when the request would no longer be allowed.
                let mut tick = tokio::time::interval(RECHECK_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = &mut copy => return,
                        r = changed.changed() => if r.is_err() { return },
                        _ = tick.tick() => {}
                    }
                    let (Some(p), Some(g)) = (proxy.upgrade(), &grant) else {
                        return;
                    };
                    if let Err(why) = p.recheck(g) {
                        tracing::info!(resource = %g.resource, "closing an upgraded connection: {why}");
                        return;
                    }
                }
            });
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, super::pages::full(Bytes::new()));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        request::strip_proxy_set_cookies(&mut parts.headers);
        for h in &route.remove_response {
            parts.headers.remove(h);
        }
        for (k, v) in &route.set_response {
            parts.headers.insert(k.clone(), v.clone());
        }
        Response::from_parts(parts, body.map_err(Into::into).boxed())
    }

    /// Who is asking, for the app: user, e-mail and groups headers and a signed assertion.
    /// A PIN, passcode or share link has no account behind it (nothing is sent); an e-mail
    /// code proves the address only. An address the provider did not verify is never sent.
    fn identity_headers(
        &self,
        headers: &mut http::HeaderMap,
        p: &Principal<'_>,
        host: &str,
        signer: Option<&Signer>,
    ) {
        let sso = p.session.via == warren_proto::session::Via::Sso;
        let email = p.session.verified_email();
        let sub = match (sso, email) {
            (true, _) => p.name(),
            (false, Some(email)) => email,
            (false, None) => return,
        };
        if sso {
            if let Ok(v) = HeaderValue::from_str(sub) {
                headers.insert(HeaderName::from_static("x-warren-user"), v);
            }
        }
        if let Some(v) = email.and_then(|e| HeaderValue::from_str(e).ok()) {
            headers.insert(HeaderName::from_static("x-warren-email"), v);
        }
        let groups: Vec<&str> = p
            .groups
            .iter()
            .map(String::as_str)
            .filter(|g| !g.contains(',') && HeaderValue::from_str(g).is_ok())
            .collect();
        if sso {
            if let Ok(v) = HeaderValue::from_str(&groups.join(",")) {
                headers.insert(HeaderName::from_static("x-warren-groups"), v);
            }
        }
        if let Some(signer) = signer {
            let jwt = signer.assertion(self.auth_origin(), host, sub, email, &groups, unix_now());
            if let Ok(v) = HeaderValue::from_str(&jwt) {
                headers.insert(HeaderName::from_static("x-warren-jwt-assertion"), v);
            }
        }
    }
}

/// Why a request did not get an answer from upstream.
enum Failure {
    /// No node holds a tunnel to the route's site.
    NotConnected(String),
    /// The HTTP exchange failed.
    Http(HttpFailure),
}

enum HttpFailure {
    /// The target refused or could not be reached.
    Connect(String),
    /// The request body went over the limit.
    TooLarge,
    /// Anything else.
    Other(String),
}

impl std::fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpFailure::Connect(e) | HttpFailure::Other(e) => f.write_str(e),
            HttpFailure::TooLarge => f.write_str("body over the limit"),
        }
    }
}

fn too_large(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Checks every target of `pool` on its interval until the pool is dropped.
pub async fn health_loop(pool: Weak<Pool>, client: Client<HttpConnector, Body>) {
    loop {
        let Some(p) = pool.upgrade() else { return };
        let Some(check) = p.check.clone() else { return };
        for t in &p.targets {
            let ok = match &check.path {
                Some(path) => {
                    let uri: Result<Uri, _> = format!("http://{}{path}", t.authority).parse();
                    match uri {
                        Ok(uri) => {
                            let req = Request::get(uri)
                                .header(header::USER_AGENT, "warren-health-check")
                                .body(
                                    Empty::<Bytes>::new()
                                        .map_err(|never| match never {})
                                        .boxed(),
                                )
                                .expect("valid request");
                            matches!(
                                tokio::time::timeout(Duration::from_secs(2), client.request(req)).await,
                                Ok(Ok(r)) if r.status().as_u16() < 400
                            )
                        }
                        Err(_) => false,
                    }
                }
                None => matches!(
                    tokio::time::timeout(
                        Duration::from_secs(2),
                        tokio::net::TcpStream::connect((t.target.host.as_str(), t.target.port))
                    )
                    .await,
                    Ok(Ok(_))
                ),
            };
            if ok {
                t.failures.store(0, Ordering::Relaxed);
                if !t.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(target = %t.authority, "target passes its health check again");
                }
            } else {
                let n = t.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= check.failures && t.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(target = %t.authority, "target failed {n} health checks; left out");
                }
            }
        }
        let interval = Duration::from_secs(check.interval_s.into());
        drop(p);
        tokio::time::sleep(interval).await;
    }
}
