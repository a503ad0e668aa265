//! The identity-aware HTTPS proxy every node runs.
//!
//! Each connection is a task; each request is handled in that task from the node's local
//! replica of the registry (an `ArcSwap` load, no lock, no actor hop): route by host and
//! path, session from the sealed cookie, policy, then the request streams to a target with
//! the identity headers added. See `docs` in the README for the sign-in flow.

mod auth;
pub mod config;
pub mod credential;
mod decide;
mod forward;
pub mod methods;
pub mod metrics;
pub mod pages;
pub mod request;
pub mod seal;
pub mod sign;
pub mod state;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use warren_consensus::cluster::Cluster;
use warren_proto::Secret;

pub use self::decide::Principal;
use self::decide::{decide, Asked, Credential, Grant, SignIn, Verdict};
use self::pages::page;
use self::state::ProxyState;
use crate::publish::Published;
use crate::serving::Serving;

/// Error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of every response the proxy sends.
pub type Body = BoxBody<Bytes, BoxError>;

/// Name of the session cookie (on the auth host and on every resource host). `__Host-`:
/// browsers take it only with `Secure`, `Path=/` and no `Domain`, so a sibling domain
/// cannot plant a session of its choosing on a resource host.
pub const SESSION_COOKIE: &str = "__Host-warren_session";
/// Name of the sign-in state cookie (auth host only; `__Secure-`: only over HTTPS).
pub const LOGIN_COOKIE: &str = "__Secure-warren_login";

/// The proxy's settings.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The host name of the cluster's sign-in pages (the same on every node).
    pub auth_host: String,
    /// The HTTPS port users reach this node on (in redirects and the OIDC callback URL).
    pub public_https_port: u16,
    /// How long a session lasts.
    pub session_ttl: Duration,
    /// Age at which the leader replaces the assertion signing key (the old one stays
    /// published until the next rotation).
    pub signing_key_rotation: Duration,
    /// SMTP URL and sender for e-mailed codes, if configured.
    pub smtp: Option<(Secret, String)>,
    /// Proxies in front of the nodes whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Most HTTPS connections open at once.
    pub max_connections: usize,
    /// The cluster CA (with its key), when this node makes certificates for the auth host
    /// and resource hosts that have none in the registry (ACME off).
    pub ca_certs: Option<warren_consensus::pki::ClusterCa>,
}

/// The proxy of one node.
pub struct Proxy {
    /// What request tasks read; published by the `proxy_config` actor.
    state: Arc<Published<ProxyState>>,
    cluster: Cluster,
    settings: ProxySettings,
    client: Client<HttpConnector, Body>,
    /// Whether this node may grant access now (fail closed otherwise).
    serving: Serving,
    oidc: auth::Oidc,
    attempts: credential::Attempts,
    /// Request counters for `/metrics`.
    pub metrics: metrics::Metrics,
    /// Connection counters of the HTTPS listener, for `/metrics`.
    pub connections: Arc<crate::conn::ConnStats>,
    /// Flow counters of the TCP and UDP resource ports, for `/metrics`.
    pub l4_flows: crate::l4::FlowCounters,
    mailer: Option<methods::Mailer>,
    sites: Arc<crate::sites::Sites>,
    /// `https://<auth host>[:port]`, the issuer of assertions.
    auth_origin: String,
    /// Certificates made from the cluster CA for hosts without one.
    ca_certs: Option<CaCerts>,
    /// When a TLS handshake for a name without a certificate was last logged.
    unknown_sni_logged: AtomicU64,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Proxy {
    /// Creates the proxy. It serves from what the `proxy_config` actor publishes
    /// ([`Proxy::config_child`]) and grants access only while `serving` says so.
    pub fn start(
        cluster: Cluster,
        settings: ProxySettings,
        sites: Arc<crate::sites::Sites>,
        serving: Serving,
    ) -> anyhow::Result<Arc<Self>> {
        let auth_origin = format!(
            "https://{}",
            authority_with_port(&settings.auth_host, settings.public_https_port)
        );
        let mailer = match &settings.smtp {
            Some((url, from)) => Some(methods::Mailer::new(url.expose(), from)?),
            None => None,
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(connector);
        let settings_ca = settings.ca_certs.clone();
        let proxy = Arc::new(Self {
            state: Published::new(ProxyState::empty()),
            cluster,
            settings,
            client,
            serving,
            oidc: auth::Oidc::new(),
            attempts: credential::Attempts::default(),
            metrics: metrics::Metrics::default(),
            connections: Arc::default(),
            l4_flows: crate::l4::FlowCounters::default(),
            mailer,
            sites,
            auth_origin,
            ca_certs: settings_ca.map(CaCerts::new),
            unknown_sni_logged: AtomicU64::new(0),
        });
        Ok(proxy)
    }

    /// The tree's child that keeps this proxy's state current.
    pub fn config_child(&self) -> crate::actors::ChildSpec {
        config::ProxyConfigActor::child(config::ProxyConfigArgs {
            cluster: self.cluster.clone(),
            state: self.state.clone(),
            client: self.client.clone(),
            serving: self.serving.clone(),
        })
    }

    /// `https://<auth host>[:port]`: where people sign in.
    pub fn auth_origin(&self) -> &str {
        &self.auth_origin
    }

    /// Whether this node serves hosts without a certificate with one from the cluster CA.
    pub fn makes_ca_certs(&self) -> bool {
        self.ca_certs.is_some()
    }

    /// The cluster handle.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The site services.
    pub fn sites(&self) -> &Arc<crate::sites::Sites> {
        &self.sites
    }

    /// Why this node may not grant access now, if it may not.
    pub fn fail_closed(&self) -> Option<Arc<str>> {
        self.serving.check().err()
    }

    /// The node's serving state.
    pub fn serving(&self) -> &Serving {
        &self.serving
    }

    /// The HTTPS port users reach the proxy on.
    pub fn public_https_port(&self) -> u16 {
        self.settings.public_https_port
    }

    /// The current state.
    pub fn state(&self) -> Arc<ProxyState> {
        self.state.load_full()
    }

    /// TLS settings for the HTTPS listener: certificates by SNI from the registry.
    pub fn tls_config(self: &Arc<Self>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver(Arc::downgrade(self))));
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(tls))
    }

    /// Handles one request from a client at `peer`, on a TLS connection made for `sni`.
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        sni: Option<Arc<str>>,
    ) -> Result<Response<Body>, Infallible> {
        let started = std::time::Instant::now();
        let client = request::Client::of(peer, req.headers(), &self.settings.trusted_proxies);
        let is_head = req.method() == http::Method::HEAD;
        let view = match request::canonicalize(&mut req) {
            Ok(v) => v,
            Err(refusal) => {
                let resp = refusal.response();
                tracing::info!(
                    target: "warren::access",
                    method = %req.method(),
                    status = resp.status().as_u16(),
                    client = %client.ip,
                    decision = "-",
                    reason = %refusal,
                    "request"
                );
                self.metrics
                    .record(resp.status().as_u16(), "-", started.elapsed());
                return Ok(head_without_body(is_head, resp));
            }
        };
        // One state per request: the SNI check, routing and policy read the same snapshot.
        let state = self.state();
        let title = state.title.clone();
        let (resp, log) = pages::CLUSTER_TITLE
            .scope(title, async {
                if request::misdirected(&state.config, sni.as_deref(), &view.host) {
                    (
                        request::misdirected_page(&view.host),
                        AccessLog::internal("misdirected: not the connection's certificate"),
                    )
                } else {
                    let method = req.method().clone();
                    let path = req.uri().path().to_owned();
                    let (resp, log) = self.route(req, &client, &view, state).await;
                    (
                        resp,
                        AccessLog {
                            method: Some(method),
                            path: Some(path),
                            ..log
                        },
                    )
                }
            })
            .await;
        let status = resp.status().as_u16();
        self.metrics.record(status, log.decision, started.elapsed());
        let resp = head_without_body(is_head, resp);
        let host = &view.host;
        tracing::info!(
            target: "warren::access",
            %host,
            method = %log.method.as_ref().map_or("-", |m| m.as_str()),
            path = %log.path.as_deref().unwrap_or("-"),
            status,
            client = %client.ip,
            resource = log.resource.as_deref().unwrap_or("-"),
            user = log.user.as_deref().unwrap_or("-"),
            decision = log.decision,
            reason = %log.reason,
            ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            "request"
        );
        Ok(resp)
    }

    async fn route(
        self: &Arc<Self>,
        req: Request<Incoming>,
        client: &request::Client,
        view: &request::View,
        state: Arc<ProxyState>,
    ) -> (Response<Body>, AccessLog) {
        let host = view.host.as_str();
        let peer = client.addr();
        let path = req.uri().path();
        if path == "/.well-known/warren/jwks.json" {
            return (self.jwks(&state), AccessLog::internal("jwks"));
        }
        if host == self.settings.auth_host {
            return self.auth_host(req, &state).await;
        }
        if path.starts_with("/.warren/") || path == "/.warren" {
            return self.resource_host_pages(req, &state, host, peer).await;
        }
        let paused = self.fail_closed();
        let serving = paused.as_deref().map_or(Ok(()), Err);
        let asked = Asked {
            host,
            path,
            method: req.method(),
            source: client.ip,
            credential: cookie(req.headers(), SESSION_COOKIE).map(Credential::Cookie),
        };
        let verdict = decide(&state, serving, &asked, unix_now());
        let log = AccessLog::of(&verdict);
        let resp = match verdict {
            Verdict::NoRoute => page(
                StatusCode::NOT_FOUND,
                "Not found",
                &format!("No resource is configured for {host}{path}."),
            ),
            Verdict::Misconfigured { route, why } => {
                tracing::warn!(resource = %route.resource, "refusing requests: {why}");
                page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Resource unavailable",
                    "This resource is misconfigured; an administrator has to fix it.",
                )
            }
            Verdict::Forward(pass) => {
                self.forward(req, &pass, state.signer.as_deref(), client, view)
                    .await
            }
            Verdict::SignIn { how, .. } => self.need_sign_in(&req, host, how),
            Verdict::Deny { why, .. } => match why.user() {
                // Signed in as someone this resource does not let in: offer the way out.
                Some(_) => pages::page_with(
                    why.status(),
                    why.title(),
                    &why.detail(),
                    &[
                        ("/.warren/sign_out", "Sign out to switch user"),
                        ("/.warren/", "Who am I"),
                    ],
                ),
                None => page(why.status(), why.title(), &why.detail()),
            },
        };
        (resp, log)
    }

    /// Whether what let an upgraded connection through still holds, on this node's current
    /// state: the decision for the request that opened it ([`decide`]), asked again.
    pub(crate) fn recheck(&self, grant: &Grant) -> Result<(), String> {
        let state = self.state.load();
        let paused = self.fail_closed();
        let serving = paused.as_deref().map_or(Ok(()), Err);
        grant.holds(&decide(&state, serving, &grant.asked(), unix_now()))
    }

    /// Wakes on every change of the state, or of whether the node is serving (the
    /// `proxy_config` actor publishes the state again then): one watch, so a connection
    /// that waits on it polls one shared lock per wake-up, not two.
    pub(crate) fn watch_state(&self) -> tokio::sync::watch::Receiver<u64> {
        self.state.subscribe()
    }

    /// The answer that sends the client to sign in `how`, then back to this request.
    fn need_sign_in(&self, req: &Request<Incoming>, host: &str, how: SignIn) -> Response<Body> {
        // Not a navigation (a form post, an API call): it cannot be replayed after the
        // sign-in, so the link signs in and lands on the resource's front page.
        match how {
            SignIn::Unauthorized => {
                return pages::page_with(
                    StatusCode::UNAUTHORIZED,
                    "Sign-in required",
                    "Sign in through your browser first, then try again.",
                    &[("/.warren/auth?rd=%2F", "Sign in")],
                );
            }
            SignIn::ResourcePage => {
                let pq = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/");
                let to = url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("rd", pq)
                    .finish();
                return pages::redirect(&format!("/.warren/auth?{to}"));
            }
            SignIn::Sso => {}
        }
        let original = format!(
            "https://{}{}",
            authority_with_port(host, self.settings.public_https_port),
            req.uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
        );
        let url = url::Url::parse_with_params(
            &format!("{}/.warren/sign_in", self.auth_origin()),
            &[("rd", original.as_str())],
        );
        match url {
            Ok(u) => pages::redirect(u.as_str()),
            Err(_) => page(
                StatusCode::BAD_REQUEST,
                "Bad request",
                "The address could not be parsed.",
            ),
        }
    }

    fn jwks(&self, state: &ProxyState) -> Response<Body> {
        match &state.signer {
            Some(s) => Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CACHE_CONTROL, "max-age=60")
                .body(pages::full(s.jwks()))
                .expect("valid response"),
            None => page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Not ready",
                "The cluster has no signing keys yet.",
            ),
        }
    }

    /// Accepts HTTPS connections until the listener fails, within the node's connection
    /// bounds (`crate::conn`).
    pub async fn serve_https(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        drain: crate::conn::Drain,
    ) -> String {
        let tls = match self.tls_config() {
            Ok(t) => t,
            Err(e) => return format!("proxy TLS settings: {e}"),
        };
        let limits = crate::conn::ConnLimits::proxy(self.settings.max_connections);
        let stats = self.connections.clone();
        let proxy = self;
        crate::conn::serve(
            listener,
            tls,
            limits,
            stats,
            "proxy",
            drain,
            move |peer, sni| {
                let proxy = proxy.clone();
                service_fn(move |req| proxy.clone().handle(req, peer, sni.clone()))
            },
        )
        .await
    }

    /// Accepts plain HTTP connections (ACME challenges) and redirects every other request
    /// to HTTPS; at most `--proxy-max-connections` at once, like the HTTPS listener (a
    /// separate allowance), more are closed at once and logged at most every 10 s.
    pub async fn serve_http(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        drain: crate::conn::Drain,
    ) -> String {
        let gate = crate::conn::ConnGate::new(
            self.settings.max_connections,
            Arc::new(crate::conn::ConnStats::default()),
        );
        let mut refusals = crate::conn::RefusalLog::default();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = drain.started() => {
                    drop(listener);
                    std::future::pending::<()>().await;
                    unreachable!("pending never resolves");
                }
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("proxy HTTP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(admitted) = gate.admit() else {
                refusals.refused(
                    "plain HTTP (port 80)",
                    gate.limit(),
                    "--proxy-max-connections",
                );
                drop(tcp);
                continue;
            };
            let port = self.settings.public_https_port;
            let proxy = self.clone();
            drain.spawn(async move {
                let _admitted = admitted;
                let service = service_fn(move |req: Request<Incoming>| {
                    let proxy = proxy.clone();
                    async move {
                        if let Some(token) = req
                            .uri()
                            .path()
                            .strip_prefix("/.well-known/acme-challenge/")
                        {
                            return Ok::<_, Infallible>(
                                match crate::acme::challenge_answer(&proxy.cluster, token).await {
                                    Some(k) => Response::builder()
                                        .header(header::CONTENT_TYPE, "text/plain")
                                        .body(pages::full(k))
                                        .expect("valid response"),
                                    None => page(
                                        StatusCode::NOT_FOUND,
                                        "Not found",
                                        "No such challenge.",
                                    ),
                                },
                            );
                        }
                        Ok::<_, Infallible>(match request_host(&req) {
                            Some(host) => {
                                let pq = req
                                    .uri()
                                    .path_and_query()
                                    .map(|p| p.as_str())
                                    .unwrap_or("/");
                                let to =
                                    format!("https://{}{pq}", authority_with_port(&host, port));
                                let mut r = pages::redirect(&to);
                                *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
                                r
                            }
                            None => page(
                                StatusCode::BAD_REQUEST,
                                "Bad request",
                                "The request does not name a valid host.",
                            ),
                        })
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .serve_connection(TokioIo::new(tcp), service);
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, "proxy HTTP connection ended: {e}");
                }
            });
        }
    }
}

/// A HEAD answer has no body (RFC 9110 9.3.2); hyper's HTTP/2 server would send the
/// body of the proxy's own pages as DATA frames.
fn head_without_body(is_head: bool, resp: Response<Body>) -> Response<Body> {
    if is_head {
        resp.map(|_| pages::full(Bytes::new()))
    } else {
        resp
    }
}

/// What the access log records beside the request line.
#[derive(Default)]
struct AccessLog {
    method: Option<http::Method>,
    path: Option<String>,
    resource: Option<String>,
    user: Option<String>,
    decision: &'static str,
    reason: String,
}

impl AccessLog {
    fn internal(what: &str) -> Self {
        Self {
            decision: "-",
            reason: what.to_owned(),
            ..Self::default()
        }
    }

    /// What the log says of a request to a resource host, from its verdict.
    fn of(verdict: &Verdict<'_>) -> Self {
        let (route, user, decision, reason) = match verdict {
            Verdict::NoRoute => return Self::internal("no route"),
            // Neither allowed nor denied: nobody's access was looked at.
            Verdict::Misconfigured { route, .. } => {
                (route, None, "", "resource misconfigured".into())
            }
            Verdict::Forward(pass) => (
                &pass.route,
                pass.principal().map(|p| p.name().to_owned()),
                "allow",
                pass.grounds.to_string(),
            ),
            Verdict::SignIn { route, why, .. } => (route, None, "deny", why.to_string()),
            Verdict::Deny { route, why } => {
                (route, why.user().map(str::to_owned), "deny", why.reason())
            }
        };
        Self {
            resource: Some(route.resource.to_string()),
            user,
            decision,
            reason,
            ..Self::default()
        }
    }
}

/// What a session cookie holds, sealed.
#[derive(serde::Serialize, serde::Deserialize)]
struct SessionCookie {
    sid: u128,
    host: String,
}

/// The host the request is for, lowercase without port; `None` if missing or malformed.
pub fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req.headers().get(header::HOST)?.to_str().ok()?,
    };
    warren_proto::canonical::Authority::parse(raw).map(|a| a.host.into_owned())
}

/// `host` with `:port` unless it is 443.
pub fn authority_with_port(host: &str, port: u16) -> String {
    if port == 443 {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value for `name` on the current host: HttpOnly, Secure, SameSite=Lax.
pub fn set_cookie(name: &str, value: &str, path: &str, max_age: Option<u64>) -> String {
    let age = match max_age {
        Some(s) => format!("; Max-Age={s}"),
        None => String::new(),
    };
    format!("{name}={value}; Path={path}; HttpOnly; Secure; SameSite=Lax{age}")
}

/// Picks the certificate for the TLS server name from the current state.
#[derive(Debug)]
struct SniResolver(std::sync::Weak<Proxy>);

/// How often a handshake for a name without a certificate is logged (any name).
const UNKNOWN_SNI_LOG_EVERY_S: u64 = 10;

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        let proxy = self.0.upgrade()?;
        let state = proxy.state.load();
        if let Some(cert) = state.config.cert_for(&name) {
            return Some(cert);
        }
        // A host this cluster serves (the sign-in host, a web resource's) but that has no
        // certificate in the registry: one from the cluster CA, where this node makes them.
        let ours = name == proxy.settings.auth_host || state.config.routes_for(&name).is_some();
        if ours {
            if let Some(cert) = proxy.ca_certs.as_ref().and_then(|c| c.get(&name)) {
                return Some(cert);
            }
        }
        let now = unix_now();
        let last = proxy.unknown_sni_logged.load(Ordering::Relaxed);
        if now >= last + UNKNOWN_SNI_LOG_EVERY_S
            && proxy
                .unknown_sni_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // The name comes from the network: quoted, so it cannot forge a log line.
            tracing::warn!(
                server_name = ?name,
                served_here = ours,
                "no certificate for this TLS server name; refused the handshake (add one with `warren admin cert add`, or set --acme-directory; logged at most every {UNKNOWN_SNI_LOG_EVERY_S} s)"
            );
        }
        None
    }
}

/// Certificates this node makes from the cluster CA, one per host, kept in memory (each
/// valid 30 days, made again after 7).
struct CaCerts {
    ca: warren_consensus::pki::ClusterCa,
    made: std::sync::Mutex<HashMap<String, (Instant, Arc<CertifiedKey>)>>,
}

/// Most hosts kept; past it the cache starts again (names come from the registry).
const CA_CERTS_MAX: usize = 4096;
/// Age at which a certificate made from the cluster CA is made again.
const CA_CERT_REMAKE: Duration = Duration::from_secs(7 * 86400);

impl CaCerts {
    fn new(ca: warren_consensus::pki::ClusterCa) -> Self {
        Self {
            ca,
            made: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        // Never a name the cluster's own certificates use.
        if host.ends_with(".invalid") || host == warren_consensus::pki::CLUSTER_SERVER_NAME {
            return None;
        }
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, key)) = made.get(host) {
            if at.elapsed() < CA_CERT_REMAKE {
                return Some(key.clone());
            }
        }
        let key = match self.make(host) {
            Ok(k) => Arc::new(k),
            Err(e) => {
                tracing::warn!(host, "cannot make a certificate from the cluster CA: {e:#}");
                return None;
            }
        };
        if made.len() >= CA_CERTS_MAX {
            made.clear();
        }
        tracing::info!(host, "serving a certificate from the cluster CA (no certificate for this host in the registry)");
        made.insert(host.to_owned(), (Instant::now(), key.clone()));
        Some(key)
    }

    fn make(&self, host: &str) -> anyhow::Result<CertifiedKey> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (cert_pem, key_pem) = self
            .ca
            .issue_web(host)?
            .ok_or_else(|| anyhow::anyhow!("this node does not hold the CA key"))?;
        let chain = vec![
            CertificateDer::from_pem_slice(cert_pem.as_bytes())?,
            self.ca.cert_der().clone(),
        ];
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
        Ok(CertifiedKey::from_der(
            chain,
            key,
            &rustls::crypto::ring::default_provider(),
        )?)
    }
}

/// Binds the proxy's listeners (checked at start like the admin listener).
pub fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<std::net::TcpListener> {
    use anyhow::Context as _;
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {what} address {addr} (TCP)"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}
