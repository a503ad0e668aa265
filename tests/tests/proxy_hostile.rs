//! Hostile clients against the proxy, black box: one real node, a real OpenID provider and
//! headless Chromium for sign-in, and backends that read requests their own way (nginx,
//! which decodes and normalizes paths; nginx name-based virtual hosts; a WSGI app, which
//! reads `X_Warren_User` as `X-Warren-User`; a backend that switches to any protocol it is
//! offered). Clients write exact HTTP/1.1 bytes on TLS connections whose server name is
//! chosen apart from the request, or HTTP/2 frames with any `:path` and `:authority`.
//!
//! What it proves, one phase per class, each with many variants, over HTTP/1.1 and HTTP/2:
//! 1. The proxy decides on one canonical path and sends exactly that upstream: no spelling
//!    of a denied path (`//admin`, `/x/../admin`, `/%61dmin`, `/%2e%2e/admin`...) reaches
//!    it, a path-prefixed private route behind a public one and a bypass prefix cannot be
//!    escaped, ambiguous paths are refused with 400, prefixes match on segment boundaries,
//!    matching is case-sensitive. Asterisk form and other targets that are not paths get
//!    400 (and never take the app out of service). `CONNECT`/`TRACE` get 405, methods not
//!    in upper case 400.
//! 2. The proxy's cookies (`__Host-warren_session`, `__Secure-warren_login`) never reach an
//!    app (public, bypass, SSO, PIN), an app cannot set them, and sign-in never hands a
//!    session to a public resource's host.
//! 3. Header names with `_` never reach the app, nor client `X-Warren-*` headers.
//! 4. One authority per request: Host and the request-target (or `:authority`) agree, one
//!    Host only, and the app gets the routed Host.
//! 5. A request for a host the connection's certificate does not cover gets 421.
//! 6. Only WebSocket upgrades are relayed; a backend switching protocols unasked is a 502.
//! 7. Forwarding headers say what the proxy saw, never what the client claimed.
//! 8. The admin API (and the proxy) close connections that drip their headers.
//!
//! Every phase runs to the end and collects its failures; the test fails at the end with
//! all of them, so one run shows every class that does not hold. Set
//! `WARREN_HOSTILE_ONLY=<word>[,<word>...]` to run only the phases whose title contains
//! one of the words (say `1.` or `cookie`). Requests the `h2` crate refuses to write (a
//! `:path` not starting with `/`) are listed as not sent, not counted.

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::{SinkExt as _, StreamExt as _};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;
use warren_tests::hostile::{Nginx, UpgradeBackend, Wsgi};
use warren_tests::oidc::{browser_async, BrowserArgs, BrowserCookie, Idp};
use warren_tests::raw::{self, H2Request, Outcome, Unsendable};
use warren_tests::upstream::Upstream;
use warren_tests::{certs, phase, port_of, web_client, Cluster};

/// Names the main certificate covers.
const HOSTS: [&str; 14] = [
    "auth.localhost",
    "norm.localhost",
    "wsgi.localhost",
    "mixed.localhost",
    "bypass.localhost",
    "pub.localhost",
    "pin.localhost",
    "a.localhost",
    "b.localhost",
    "hh.localhost",
    "up.localhost",
    "up2.localhost",
    "ws.localhost",
    "wspriv.localhost",
];
/// Only the second certificate covers it.
const OTHER_HOST: &str = "other.localhost";
/// A resource that no certificate covers.
const NO_CERT_HOST: &str = "nocert.localhost";

/// The proxy's session cookie.
const SESSION_COOKIE: &str = "__Host-warren_session";
/// The proxy's sign-in state cookie.
const LOGIN_COOKIE: &str = "__Secure-warren_login";

/// How long one phase may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a dripping connection may stay open before the test calls it a failure.
const DRIP_LIMIT: Duration = Duration::from_secs(40);

/// The title of phase 8.
const SLOW_CLIENTS: &str =
    "8. slow clients: the admin API and the proxy close connections that drip their headers";

/// The PIN of the `pin` resource.
const PIN: &str = "123456";

/// What a request must get.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// 403 or 400 (over HTTP/2 a reset stream too); nothing from the app.
    Denied,
    /// 400 (over HTTP/2 a reset stream too): refused as ambiguous or malformed.
    Bad,
    /// A redirect to sign in, 401 or 400 (over HTTP/2 a reset stream too); nothing from
    /// the app.
    SignIn,
    /// 200 from the app, which was sent exactly this path and query.
    Upstream(&'static str),
}

use Want::{Bad, Denied, SignIn, Upstream as Up};

/// On `norm.localhost` (nginx) and `wsgi.localhost` (WSGI), both under a policy that
/// allows alice's group and denies `path: {prefix: /admin}`, alice signed in.
const POLICY_PATHS: &[(&str, Want)] = &[
    // Every spelling of /admin is /admin.
    ("/admin", Denied),
    ("/admin/", Denied),
    ("/admin/x", Denied),
    ("/admin?x=1", Denied),
    ("//admin", Denied),
    ("//admin/", Denied),
    ("///admin//x", Denied),
    ("/admin//x", Denied),
    ("/./admin", Denied),
    ("/././admin", Denied),
    ("/.//admin", Denied),
    ("/x/../admin", Denied),
    ("/x/y/../../admin", Denied),
    ("/../admin", Denied),
    ("/../../admin", Denied),
    ("/x/../../admin", Denied),
    ("/..//admin", Denied),
    ("/admin/.", Denied),
    ("/admin/./x", Denied),
    ("/admin/x/..", Denied),
    ("/admin/../admin", Denied),
    ("/public/../admin", Denied),
    ("/.warren/../admin", Denied),
    ("/%61dmin", Denied),
    ("/%61%64%6d%69%6e", Denied),
    ("/%61%64%6D%69%6E/x", Denied),
    ("/a%64min", Denied),
    ("/%61dmin/", Denied),
    ("/%2e/admin", Denied),
    ("/%2E/admin", Denied),
    ("/%2e%2e/admin", Denied),
    ("/%2E%2E/admin", Denied),
    ("/%2e%2E/admin", Denied),
    ("/.%2e/admin", Denied),
    ("/%2e./admin", Denied),
    ("/x/%2e%2e/admin", Denied),
    ("/x/.%2E/admin/y", Denied),
    ("/x/%2e%2e/%61dmin", Denied),
    ("/%2e%2e/%2e%2e/admin", Denied),
    ("/x/%2e%2e/%2e%2e/admin", Denied),
    ("/admin/%2e", Denied),
    ("/admin/x/%2e%2e", Denied),
    // Escaped separators: refused, not decoded and not passed on.
    ("/%2fadmin", Bad),
    ("/%2Fadmin", Bad),
    ("/admin%2f", Bad),
    ("/x%2f..%2fadmin", Bad),
    ("/%2e%2e%2fadmin", Bad),
    ("/x/..%2Fadmin", Bad),
    ("/%5cadmin", Bad),
    ("/%5Cadmin", Bad),
    ("/x/..%5cadmin", Bad),
    ("/admin%3bx", Bad),
    ("/admin%3B", Bad),
    // Raw backslash and semicolon (read as `/` or as a parameter by some servers).
    ("/\\admin", Bad),
    ("/x\\..\\admin", Bad),
    ("/x/..\\admin", Bad),
    ("/admin;x", Bad),
    ("/admin;", Bad),
    ("/..;/admin", Bad),
    ("/x/..;/admin", Bad),
    ("/admin;/x", Bad),
    // NUL and control characters, escaped.
    ("/admin%00", Bad),
    ("/%00/../admin", Bad),
    ("/admin%00.html", Bad),
    ("/%01", Bad),
    ("/%09admin", Bad),
    ("/%0a", Bad),
    ("/%0d%0aX-Injected:%201", Bad),
    ("/%1f", Bad),
    ("/%1F", Bad),
    ("/%7f", Bad),
    ("/%7F", Bad),
    // Malformed escapes.
    ("/%zz", Bad),
    ("/%4", Bad),
    ("/%", Bad),
    ("/admin%", Bad),
    ("/%g0", Bad),
    ("/%%32%65", Bad),
    ("/%-1", Bad),
    ("/%2", Bad),
    // Decoded bytes that are not UTF-8: overlong dots and slashes, stray bytes, surrogates.
    ("/%c0%ae%c0%ae/admin", Bad),
    ("/%c0%afadmin", Bad),
    ("/%e0%80%ae", Bad),
    ("/%ff", Bad),
    ("/%80", Bad),
    ("/%c3", Bad),
    ("/%ed%a0%80", Bad),
    ("/%f8%88%80%80%80", Bad),
    // Not a path: see `not_paths`.
    // Other names stay other names: case-sensitive, segment boundaries.
    ("/", Up("/")),
    ("/x", Up("/x")),
    ("/ADMIN", Up("/ADMIN")),
    ("/Admin", Up("/Admin")),
    ("/%41dmin", Up("/Admin")),
    ("/administrator", Up("/administrator")),
    ("/admin-x", Up("/admin-x")),
    ("/admin..", Up("/admin..")),
    ("/admin.", Up("/admin.")),
    ("/admin%2e", Up("/admin.")),
    ("/x/admin", Up("/x/admin")),
    ("/adm", Up("/adm")),
    ("/admin%20", Up("/admin%20")),
    ("/admin%3f", Up("/admin%3F")),
    ("/admin%23", Up("/admin%23")),
    // No Unicode folding: a fullwidth `ａ` is not `a`.
    ("/%ef%bd%81dmin", Up("/%EF%BD%81dmin")),
    // Dot segments and slashes are resolved before anything else looks at the path.
    ("/admin/..", Up("/")),
    ("/admin/../x", Up("/x")),
    ("/x//y", Up("/x/y")),
    ("/x/./y/../z", Up("/x/z")),
    ("/x/.", Up("/x/")),
    ("/x/..", Up("/")),
    ("/.", Up("/")),
    ("/..", Up("/")),
    ("/%2e%2e", Up("/")),
    ("/x/%2E", Up("/x/")),
    ("/x/.hidden", Up("/x/.hidden")),
    ("/x/..y", Up("/x/..y")),
    ("/...", Up("/...")),
    // Unreserved characters are decoded; other escapes stay, in upper case.
    ("/%7euser", Up("/~user")),
    ("/%7Euser", Up("/~user")),
    ("/%2D%2E%5F%7E%30%39%41%5A%61%7A", Up("/-._~09AZaz")),
    ("/%e2%82%ac", Up("/%E2%82%AC")),
    ("/caf%c3%a9", Up("/caf%C3%A9")),
    ("/%3f", Up("/%3F")),
    ("/%23", Up("/%23")),
    ("/%20x", Up("/%20x")),
    // `%25` stays opaque: `%252e` is not a dot.
    ("/%25", Up("/%25")),
    ("/a%25b", Up("/a%25b")),
    ("/%252e%252e/admin", Up("/%252e%252e/admin")),
    ("/%2561dmin", Up("/%2561dmin")),
    ("/%252fadmin", Up("/%252fadmin")),
    // The query string is passed on unchanged.
    (
        "/x?a=%2e%2e/admin&b=%2F&c=%zz",
        Up("/x?a=%2e%2e/admin&b=%2F&c=%zz"),
    ),
    ("/?/admin", Up("/?/admin")),
    ("/x?..", Up("/x?..")),
    ("/x/../y?/../admin", Up("/y?/../admin")),
];

/// The same policy, other methods.
const POLICY_METHODS: &[(&str, &str)] = &[
    ("POST", "//admin"),
    ("PUT", "/%61dmin"),
    ("DELETE", "/x/../admin"),
    ("PATCH", "/./admin"),
    ("HEAD", "//admin"),
    ("OPTIONS", "/%2e%2e/admin"),
];

/// On `mixed.localhost`: a public resource on `/` and a private one on `/private`
/// (nginx behind both), nobody signed in.
const PRIVATE_ROUTE_PATHS: &[(&str, Want)] = &[
    ("/private", SignIn),
    ("/private/", SignIn),
    ("/private/x", SignIn),
    ("/private?x=1", SignIn),
    ("//private", SignIn),
    ("//private/x", SignIn),
    ("///private//x", SignIn),
    ("/./private", SignIn),
    ("/././private/x", SignIn),
    ("/x/../private", SignIn),
    ("/x/y/../../private/x", SignIn),
    ("/../private", SignIn),
    ("/public/../private/x", SignIn),
    ("/%70rivate", SignIn),
    ("/%70%72%69%76%61%74%65/x", SignIn),
    ("/priv%61te/", SignIn),
    ("/%2e%2e/private", SignIn),
    ("/%2e/private", SignIn),
    ("/.%2e/private/x", SignIn),
    ("/x/%2e%2e/private", SignIn),
    ("/x/%2E%2E/%70rivate/x", SignIn),
    ("/private/.", SignIn),
    ("/private/x/..", SignIn),
    ("/.warren/../private", SignIn),
    ("/%2fprivate", Bad),
    ("/private%2f", Bad),
    ("/private%2Fx", Bad),
    ("/private;x", Bad),
    ("/..;/private", Bad),
    ("/%5cprivate", Bad),
    ("/\\private", Bad),
    ("/private%00", Bad),
    ("/%c0%ae%c0%ae/private", Bad),
    ("/", Up("/")),
    ("/x", Up("/x")),
    ("/privatex", Up("/privatex")),
    ("/private-x", Up("/private-x")),
    ("/private.", Up("/private.")),
    ("/PRIVATE", Up("/PRIVATE")),
    ("/%50rivate", Up("/Private")),
    ("/x/private", Up("/x/private")),
    ("/private/..", Up("/")),
    ("/private/../x", Up("/x")),
];

/// On `bypass.localhost`: sign-in required except under the bypass prefix `/public`
/// (nginx behind it), nobody signed in.
const BYPASS_PATHS: &[(&str, Want)] = &[
    ("/public", Up("/public")),
    ("/public/", Up("/public/")),
    ("/public/x", Up("/public/x")),
    ("/public/x?y=1", Up("/public/x?y=1")),
    ("//public/x", Up("/public/x")),
    ("/public//x", Up("/public/x")),
    ("/./public/x", Up("/public/x")),
    ("/x/../public/x", Up("/public/x")),
    ("/%70ublic/x", Up("/public/x")),
    ("/public/./x", Up("/public/x")),
    ("/public/%78", Up("/public/x")),
    ("/public/../admin", SignIn),
    ("/public/../admin/x", SignIn),
    ("/public/%2e%2e/admin", SignIn),
    ("/public/%2E%2E/admin/x", SignIn),
    ("/public/.%2e/admin", SignIn),
    ("/public/%2e./admin", SignIn),
    ("/public/./../admin", SignIn),
    ("/public/x/../../admin", SignIn),
    ("/public/..", SignIn),
    ("/public/%2e%2e", SignIn),
    ("/public/x/%2e%2e/%2e%2e/admin", SignIn),
    ("/publicx", SignIn),
    ("/public.", SignIn),
    ("/public..", SignIn),
    ("/public-x/y", SignIn),
    ("/PUBLIC/x", SignIn),
    ("/%50ublic/x", SignIn),
    ("/publ%69c/../admin", SignIn),
    ("/", SignIn),
    ("/admin", SignIn),
    ("/x/../admin", SignIn),
    ("/x", SignIn),
    ("/public/..%2fadmin", Bad),
    ("/public%2f../admin", Bad),
    ("/public/..%5cadmin", Bad),
    ("/public/..;/admin", Bad),
    ("/public;/../admin", Bad),
    ("/public\\..\\admin", Bad),
    ("/public/%00/../../admin", Bad),
    ("/public/%c0%ae%c0%ae/admin", Bad),
];

/// Header names that must never reach the app (each sent alone, then all at once), with
/// values that show if they do.
const SPOOFED_HEADERS: &[(&str, &str)] = &[
    ("X_Warren_User", "spoofed-user"),
    ("x_warren_user", "spoofed-user"),
    ("X_WARREN_USER", "spoofed-user"),
    ("X-Warren_User", "spoofed-user"),
    ("X_Warren-User", "spoofed-user"),
    ("X-Warren-User", "spoofed-user"),
    ("x-warren-user", "spoofed-user"),
    ("X_Warren_Email", "spoofed@evil.test"),
    ("X-Warren-Email", "spoofed@evil.test"),
    ("X_Warren_Groups", "spoofed-admins"),
    ("X-Warren-Groups", "spoofed-admins"),
    ("x_warren_jwt_assertion", "spoofed.jwt.assertion"),
    ("X-Warren-Jwt-Assertion", "spoofed.jwt.assertion"),
    ("X_Forwarded_For", "spoofed-xff"),
    ("X_Real_IP", "spoofed-real-ip"),
    ("Foo_Bar", "spoofed-underscore"),
];

/// Forwarding and override headers a client may send; each value carries a marker that
/// must not reach the app.
const SPOOFED_FORWARDING: &[(&str, &str)] = &[
    ("X-Forwarded-For", "6.6.6.6"),
    ("x-forwarded-for", "6.6.6.6, 7.7.7.7"),
    ("Forwarded", "for=6.6.6.6;host=evil.example;proto=http"),
    ("Forwarded", "for=\"[2001:db8::6]\";by=evil.example"),
    ("X-Real-IP", "6.6.6.6"),
    ("True-Client-IP", "6.6.6.6"),
    ("X-Client-IP", "6.6.6.6"),
    ("CF-Connecting-IP", "6.6.6.6"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "http"),
    ("X-Original-URL", "/evil.example/admin"),
    ("X-Rewrite-URL", "/evil.example/admin"),
    ("X-HTTP-Method-Override", "DELETE"),
];
const FORWARDING_MARKERS: [&str; 4] = ["6.6.6.6", "7.7.7.7", "evil.example", "2001:db8"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_get_nothing_past_the_proxy() -> anyhow::Result<()> {
    let s = Suite::start().await?;
    let mut report = Report::from_env();
    // The slow clients drip while the other phases run.
    let drips = if report.selected(SLOW_CLIENTS) {
        s.start_drips()
    } else {
        Vec::new()
    };
    report
        .run(
            "1. canonical path: no spelling of a denied path reaches nginx or the WSGI app",
            policy_paths(&s),
        )
        .await;
    report
        .run(
            "1. canonical path: a private route under a public one needs sign-in",
            table(
                &s,
                "mixed.localhost",
                None,
                App::Nginx,
                "NGINX-PRIVATE",
                PRIVATE_ROUTE_PATHS,
            ),
        )
        .await;
    report
        .run(
            "1. canonical path: a bypass prefix cannot be escaped",
            table(
                &s,
                "bypass.localhost",
                None,
                App::Nginx,
                "NGINX-ADMIN",
                BYPASS_PATHS,
            ),
        )
        .await;
    report
        .run(
            "1. methods: CONNECT and TRACE get 405, methods not in upper case 400",
            methods(&s),
        )
        .await;
    report
        .run(
            "2. cookies: the proxy's cookies never reach an app, an app cannot set them, public hosts get no session",
            cookies(&s),
        )
        .await;
    report
        .run(
            "3. headers: names with '_' and client X-Warren-* never reach the app",
            spoofed_headers(&s),
        )
        .await;
    report
        .run(
            "4. authority: one host per request, and the app gets the routed Host",
            authority(&s),
        )
        .await;
    report
        .run(
            "5. SNI: a host the connection's certificate does not cover gets 421",
            sni(&s),
        )
        .await;
    report
        .run(
            "6. upgrades: only WebSocket is relayed; a backend switching unasked is a 502",
            upgrades(&s),
        )
        .await;
    report
        .run(
            "6. upgrades: a resource can allow h2c explicitly (http.upgrades)",
            opt_in_upgrade(&s),
        )
        .await;
    report
        .run(
            "6. upgrades: an open WebSocket is closed when its policy no longer allows it",
            upgraded_recheck(&s),
        )
        .await;
    report
        .run(
            "7. forwarding headers say what the proxy saw",
            forwarding(&s),
        )
        .await;
    report
        .run(
            "1. canonical path: request-targets that are not paths get 400 and leave the app in service",
            not_paths(&s),
        )
        .await;
    report.run(SLOW_CLIENTS, dripping(drips)).await;
    report.finish(&s)
}

/// Everything the phases share: the node, the backends, alice's sessions, clients.
struct Suite {
    cluster: Cluster,
    /// The node's HTTPS address.
    https: String,
    port: u16,
    /// Raw TLS settings trusting both certificates, offering HTTP/1.1 or h2.
    h1: Arc<rustls::ClientConfig>,
    h2: Arc<rustls::ClientConfig>,
    web: reqwest::Client,
    /// Alice's session cookies: on the auth host, on `wsgi.localhost` (from Chromium), and
    /// `norm.localhost` (handed over from the auth host).
    alice_auth: Cookie,
    alice_wsgi: Cookie,
    alice_norm: Cookie,
    /// What the browser held for the auth host's session cookie.
    auth_cookie_in_browser: BrowserCookie,
    /// The `Set-Cookie` of the handoff on `norm.localhost`.
    handoff_set_cookie: String,
    /// A PIN session on `pin.localhost`.
    pin: Cookie,
    nginx: Nginx,
    wsgi: Wsgi,
    upgrade: UpgradeBackend,
    _ws: Upstream,
    _idp: Idp,
}

/// A cookie as `name=value`.
#[derive(Clone, Debug)]
struct Cookie {
    name: String,
    value: String,
}

impl Cookie {
    fn pair(&self) -> String {
        format!("{}={}", self.name, self.value)
    }

    /// The first cookie of a `Set-Cookie` value.
    fn from_set_cookie(line: &str) -> Option<Self> {
        let (name, value) = line.split(';').next()?.split_once('=')?;
        Some(Self {
            name: name.trim().to_owned(),
            value: value.trim().to_owned(),
        })
    }
}

/// Whether a cookie name is the proxy's session cookie.
fn is_session_cookie(name: &str) -> bool {
    name == SESSION_COOKIE
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

impl Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
        })
    }
}

const BOTH: [Proto; 2] = [Proto::H1, Proto::H2];

/// Which app answered, and what request-target it says it got.
#[derive(Clone, Copy, Debug)]
enum App {
    /// `NGINX-...` bodies with `request_uri=`.
    Nginx,
    /// JSON with `RAW_URI`.
    Wsgi,
}

impl App {
    /// The request-target the app reports, if the body is the app's.
    fn request_uri(self, body: &str) -> Option<String> {
        match self {
            App::Nginx => {
                if !body.starts_with("NGINX-") {
                    return None;
                }
                let rest = body.split_once("request_uri=")?.1;
                Some(
                    rest.split([' ', '\n'])
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                )
            }
            App::Wsgi => serde_json::from_str::<Value>(body).ok()?["RAW_URI"]
                .as_str()
                .map(str::to_owned),
        }
    }
}

impl Suite {
    async fn start() -> anyhow::Result<Self> {
        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        let nginx = tokio::task::spawn_blocking(Nginx::start).await??;
        let wsgi = tokio::task::spawn_blocking(Wsgi::start).await??;
        let upgrade = UpgradeBackend::start().await?;
        let ws = Upstream::start("ws").await?;
        let cluster = Cluster::start(1).await?;
        let https = cluster.nodes[0].https_addr.clone();
        let port = port_of(&https);
        let redirect = vec![format!("https://auth.localhost:{port}/.warren/callback")];
        let idp = tokio::task::spawn_blocking(move || Idp::start(&redirect, &[])).await??;
        let (cert, key) = certs::self_signed(&HOSTS);
        let (other_cert, other_key) = certs::self_signed(&[OTHER_HOST]);
        let h1 = raw::tls_config(&[&cert, &other_cert], &[b"http/1.1"])?;
        let h2 = raw::tls_config(&[&cert, &other_cert], &[b"h2"])?;
        let resolved: Vec<&str> = HOSTS.iter().copied().chain([OTHER_HOST]).collect();
        let web = web_client(&cert, &resolved, Duration::from_secs(20))
            .http1_only()
            .build()?;
        let api = cluster.api(0);

        phase!("configure: two certificates, the identity provider, policies, resources");
        for (name, c, k) in [("main", &cert, &key), ("other", &other_cert, &other_key)] {
            api.post_ok(
                "/v1/certificates",
                &json!({"name": name, "cert_pem": c, "key_pem": k}),
            )
            .await?;
        }
        api.post_ok(
            "/v1/identity-providers",
            &json!({"name": "test", "issuer": idp.issuer, "client_id": idp.client_id,
                    "client_secret": idp.client_secret, "scopes": ["groups"], "groups_claim": "groups"}),
        )
        .await?;
        for p in [
            json!({"name": "admins", "allow": {"group": "admins"}}),
            json!({"name": "admins-not-admin", "allow": {"group": "admins"},
                   "deny": {"path": {"prefix": "/admin"}}}),
            json!({"name": "nobody", "allow": {"group": "no-such-group"}}),
            json!({"name": "ws-admins", "allow": {"group": "admins"}}),
        ] {
            api.post_ok("/v1/policies", &p).await?;
        }
        let norm = nginx.norm.to_string();
        let vhost = nginx.vhost.to_string();
        let app = wsgi.addr.to_string();
        let up = upgrade.addr.to_string();
        let public = || json!({"public": true});
        let mut private_route = resource(
            "mixed-private",
            "mixed.localhost",
            &norm,
            &["admins"],
            json!({}),
        );
        private_route["route"]["http"]["path_prefix"] = json!("/private");
        let bypass = json!({"access": {"bypass": [{"path_prefix": "/public"}]}});
        let pin = json!({"access": {"sso": false, "pin": PIN}});
        let host_header = json!({"public": true, "host_header": "a.localhost"});
        for r in [
            resource(
                "norm",
                "norm.localhost",
                &norm,
                &["admins-not-admin"],
                json!({}),
            ),
            resource(
                "wsgi",
                "wsgi.localhost",
                &app,
                &["admins-not-admin"],
                json!({}),
            ),
            resource("mixed-public", "mixed.localhost", &norm, &[], public()),
            private_route,
            resource("bypass", "bypass.localhost", &norm, &["admins"], bypass),
            resource("pub", "pub.localhost", &app, &[], public()),
            resource("pin", "pin.localhost", &app, &[], pin),
            resource("vhost-a", "a.localhost", &vhost, &[], public()),
            resource("vhost-b", "b.localhost", &vhost, &["nobody"], json!({})),
            resource("vhost-hh", "hh.localhost", &vhost, &[], host_header),
            resource("other", OTHER_HOST, &norm, &[], public()),
            resource("nocert", NO_CERT_HOST, &norm, &[], public()),
            resource("up", "up.localhost", &up, &[], public()),
            resource("ws", "ws.localhost", &ws.addr.to_string(), &[], public()),
            resource(
                "wspriv",
                "wspriv.localhost",
                &ws.addr.to_string(),
                &["ws-admins"],
                json!({}),
            ),
        ] {
            api.post_ok("/v1/resources", &r).await?;
        }
        // The proxy follows the registry asynchronously: wait for the last resource and
        // for the cluster's keys (sessions need them).
        let ws_url = format!("https://ws.localhost:{port}/echo");
        let jwks = format!("https://auth.localhost:{port}/.well-known/warren/jwks.json");
        eventually("the resources and keys are in the proxy", || async {
            let routed = web
                .get(&ws_url)
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK);
            let keys = web
                .get(&jwks)
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK);
            Ok(routed && keys)
        })
        .await?;

        phase!("alice signs in with Chromium; sessions for the other hosts; a PIN session");
        let b = browser_async(
            BrowserArgs::new(format!("https://wsgi.localhost:{port}/signed-in"))
                .login("alice", "alice-pw"),
        )
        .await?;
        let seen: Value = serde_json::from_str(&b.text)
            .with_context(|| format!("the app's answer after sign-in: {}", b.text))?;
        anyhow::ensure!(seen["HTTP_X_WARREN_USER"] == "alice", "{seen}");
        let in_browser = |domain: &str| {
            b.cookies
                .iter()
                .find(|c| is_session_cookie(&c.name) && c.domain.trim_start_matches('.') == domain)
                .cloned()
                .with_context(|| format!("no session cookie for {domain}: {:?}", b.cookies))
        };
        let auth_cookie_in_browser = in_browser("auth.localhost")?;
        let as_cookie = |c: &BrowserCookie| Cookie {
            name: c.name.clone(),
            value: c.value.clone(),
        };
        let alice_auth = as_cookie(&auth_cookie_in_browser);
        let alice_wsgi = as_cookie(&in_browser("wsgi.localhost")?);
        let (alice_norm, handoff_set_cookie) =
            session_for(&web, port, &alice_auth, "norm.localhost").await?;
        let resp = web
            .post(format!("https://pin.localhost:{port}/.warren/auth"))
            .form(&[("method", "pin"), ("pin", PIN), ("rd", "/")])
            .send()
            .await?;
        let pin = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(Cookie::from_set_cookie)
            .find(|c| is_session_cookie(&c.name))
            .with_context(|| format!("no PIN session: {}", resp.status()))?;
        Ok(Self {
            cluster,
            https,
            port,
            h1,
            h2,
            web,
            alice_auth,
            alice_wsgi,
            alice_norm,
            auth_cookie_in_browser,
            handoff_set_cookie,
            pin,
            nginx,
            wsgi,
            upgrade,
            _ws: ws,
            _idp: idp,
        })
    }

    /// `host:port` of the proxy for `host`.
    fn authority(&self, host: &str) -> String {
        format!("{host}:{}", self.port)
    }

    /// Sends `method target` for `host` (also the TLS server name) with `headers`.
    async fn send(
        &self,
        proto: Proto,
        host: &str,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Result<Outcome, Unsendable> {
        let authority = self.authority(host);
        match proto {
            Proto::H1 => Ok(raw::h1(
                &self.https,
                host,
                &self.h1,
                &h1_request(method, target, &authority, headers),
            )
            .await),
            Proto::H2 => {
                raw::h2(
                    &self.https,
                    host,
                    &self.h2,
                    &H2Request {
                        method,
                        authority: &authority,
                        path: Some(target),
                        headers: headers.to_vec(),
                    },
                )
                .await
            }
        }
    }

    /// Raw HTTP/1.1 bytes on a connection for `sni`.
    async fn h1_raw(&self, sni: &str, request: &str) -> Outcome {
        raw::h1(&self.https, sni, &self.h1, request.as_bytes()).await
    }

    /// Starts the slow clients of phase 8.
    fn start_drips(&self) -> Vec<(String, tokio::task::JoinHandle<anyhow::Result<Drip>>)> {
        let mut drips = Vec::new();
        let ca = std::fs::read_to_string(self.cluster.ca()).unwrap_or_default();
        let admin = self.cluster.nodes[0].admin_addr.clone();
        let admin_tls = raw::tls_config(&[&ca], &[]);
        let proxy_request = format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nX-Drip: ",
            self.authority("pub.localhost")
        );
        let cases = [
            (
                "admin API, inside the request line",
                admin.clone(),
                "127.0.0.1",
                "GET /v1/hea".to_owned(),
            ),
            (
                "admin API, inside the headers",
                admin,
                "127.0.0.1",
                "GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ".to_owned(),
            ),
            (
                "HTTPS proxy, inside the headers",
                self.https.clone(),
                "pub.localhost",
                proxy_request,
            ),
        ];
        for (what, addr, sni, prefix) in cases {
            let tls = if sni == "127.0.0.1" {
                admin_tls
                    .as_ref()
                    .map(Arc::clone)
                    .map_err(|e| anyhow::anyhow!("{e:#}"))
            } else {
                Ok(self.h1.clone())
            };
            let task = tokio::spawn(async move { drip(&addr, sni, tls?, prefix.as_bytes()).await });
            drips.push((what.to_owned(), task));
        }
        drips
    }
}

/// A web resource on `domain` with one target.
fn resource(name: &str, domain: &str, target: &str, policies: &[&str], http: Value) -> Value {
    json!({"name": name, "route": {"http": {"domain": domain}}, "targets": [target],
           "policies": policies, "http": http})
}

/// An HTTP/1.1 request: `Host: authority`, `headers` as given, `Connection: close`.
fn h1_request(method: &str, target: &str, authority: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut r = format!("{method} {target} HTTP/1.1\r\nHost: {authority}\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if matches!(method, "POST" | "PUT" | "PATCH") {
        r.push_str("Content-Length: 0\r\n");
    }
    r.push_str("Connection: close\r\n\r\n");
    r.into_bytes()
}

/// Opens a session on `host` with an auth-host session, as the browser does (sign-in link,
/// handoff); returns the cookie and the handoff's `Set-Cookie`.
async fn session_for(
    web: &reqwest::Client,
    port: u16,
    auth: &Cookie,
    host: &str,
) -> anyhow::Result<(Cookie, String)> {
    let resp = web
        .get(format!(
            "https://auth.localhost:{port}/.warren/sign_in?rd=https%3A%2F%2F{host}%3A{port}%2F"
        ))
        .header("cookie", auth.pair())
        .send()
        .await?;
    let handoff =
        location(&resp).with_context(|| format!("sign-in for {host}: {}", resp.status()))?;
    let resp = web.get(handoff).send().await?;
    let line = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| Cookie::from_set_cookie(v).is_some_and(|c| is_session_cookie(&c.name)))
        .with_context(|| format!("handoff for {host}: {}", resp.status()))?
        .to_owned();
    let cookie = Cookie::from_set_cookie(&line).context("a cookie")?;
    Ok((cookie, line))
}

fn location(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Polls until `f` holds, at most 10 s.
async fn eventually<F, Fut>(what: &str, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if f().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} did not happen within 10 s")
}

/// The cases of one phase and which failed.
#[derive(Default)]
struct Tally {
    cases: usize,
    failures: Vec<String>,
    unsendable: Vec<String>,
}

impl Tally {
    /// Records one case.
    fn check(&mut self, case: impl Display, result: Result<(), String>) {
        self.cases += 1;
        if let Err(e) = result {
            self.failures.push(format!("{case}: {e}"));
        }
    }

    /// Records a case judged by `judge`, or one the client library could not send.
    fn outcome(
        &mut self,
        case: impl Display,
        sent: Result<Outcome, Unsendable>,
        judge: impl FnOnce(&Outcome) -> Result<(), String>,
    ) {
        match sent {
            Ok(o) => self.check(case, judge(&o)),
            Err(Unsendable(why)) => self.unsendable.push(format!("{case}: {why}")),
        }
    }
}

/// Runs the phases and collects what failed.
struct Report {
    only: Vec<String>,
    phases: Vec<(String, Tally)>,
}

impl Report {
    fn from_env() -> Self {
        let only = std::env::var("WARREN_HOSTILE_ONLY")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect();
        Self {
            only,
            phases: Vec::new(),
        }
    }

    /// Whether the phase called `title` runs.
    fn selected(&self, title: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| title.contains(w.as_str()))
    }

    async fn run(&mut self, title: &str, phase: impl Future<Output = anyhow::Result<Tally>>) {
        if !self.selected(title) {
            return;
        }
        phase!("{title}");
        let started = Instant::now();
        let tally = match tokio::time::timeout(PHASE_TIMEOUT, phase).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => Tally {
                cases: 1,
                failures: vec![format!("the phase could not run: {e:#}")],
                unsendable: Vec::new(),
            },
            Err(_) => Tally {
                cases: 1,
                failures: vec![format!("the phase did not end within {PHASE_TIMEOUT:?}")],
                unsendable: Vec::new(),
            },
        };
        eprintln!(
            "           {} cases, {} failed, {} not sendable by the client library ({:.1} s)",
            tally.cases,
            tally.failures.len(),
            tally.unsendable.len(),
            started.elapsed().as_secs_f64()
        );
        for f in &tally.failures {
            eprintln!("           FAIL {f}");
        }
        for u in &tally.unsendable {
            eprintln!("           (not sent) {u}");
        }
        self.phases.push((title.to_owned(), tally));
    }

    fn finish(self, s: &Suite) -> anyhow::Result<()> {
        let failed: Vec<String> = self
            .phases
            .iter()
            .filter(|(_, t)| !t.failures.is_empty())
            .map(|(title, t)| format!("{title}: {} of {} cases failed", t.failures.len(), t.cases))
            .collect();
        let total: usize = self.phases.iter().map(|(_, t)| t.cases).sum();
        phase!(
            "{} phases, {total} cases, {} phases failed",
            self.phases.len(),
            failed.len()
        );
        if failed.is_empty() {
            return Ok(());
        }
        eprintln!("==== node logs ====\n{}", s.cluster.logs());
        let nginx = s.nginx.log();
        if !nginx.is_empty() {
            eprintln!("==== nginx ====\n{nginx}");
        }
        let wsgi = s.wsgi.log();
        if !wsgi.is_empty() {
            eprintln!("==== echo_wsgi.py ====\n{wsgi}");
        }
        bail!(
            "the proxy let hostile requests through:\n{}",
            failed.join("\n")
        )
    }
}

/// Judges one answer against `want`. `never` is a body (the protected location's) that
/// must not come back whatever the status.
fn judge(o: &Outcome, want: Want, app: App, never: &str, proto: Proto) -> Result<(), String> {
    let body = o.text();
    if !never.is_empty() && body.contains(never) {
        return Err(format!("the app served {never}: {}", o.describe()));
    }
    let reached = app.request_uri(&body);
    let reset_ok = proto == Proto::H2 && matches!(o, Outcome::Reset(_));
    let refused = |codes: &[u16]| {
        reset_ok || (o.status().is_some_and(|s| codes.contains(&s)) && reached.is_none())
    };
    match want {
        Want::Denied if refused(&[400, 403]) => Ok(()),
        Want::Denied => Err(format!("want 403 or 400, got {}", o.describe())),
        Want::Bad if refused(&[400]) => Ok(()),
        Want::Bad => Err(format!("want 400, got {}", o.describe())),
        Want::SignIn if refused(&[302, 303, 401, 400]) => {
            let to = o.reply().and_then(|r| r.header("location")).unwrap_or("");
            if matches!(o.status(), Some(302 | 303)) && !to.contains("/.warren/") {
                return Err(format!("redirected elsewhere than sign-in: {to}"));
            }
            Ok(())
        }
        Want::SignIn => Err(format!(
            "want a sign-in redirect, 401 or 400, got {}",
            o.describe()
        )),
        Want::Upstream(path) => match (o.status(), reached) {
            (Some(200), Some(got)) if got == path => Ok(()),
            (Some(200), Some(got)) => Err(format!("the app was sent {got}, want {path}")),
            _ => Err(format!(
                "want 200 with the app sent {path}, got {}",
                o.describe()
            )),
        },
    }
}

/// Runs a path table on `host` over both HTTP versions.
async fn table(
    s: &Suite,
    host: &str,
    cookie: Option<&Cookie>,
    app: App,
    never: &str,
    cases: &[(&str, Want)],
) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let pair = cookie.map(Cookie::pair);
    let headers: Vec<(&str, &str)> = pair.iter().map(|c| ("Cookie", c.as_str())).collect();
    for proto in BOTH {
        for (path, want) in cases {
            let sent = s.send(proto, host, "GET", path, &headers).await;
            t.outcome(format!("{proto} GET {host} {path}"), sent, |o| {
                judge(o, *want, app, never, proto)
            });
        }
    }
    Ok(t)
}

async fn policy_paths(s: &Suite) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let targets = [
        ("norm.localhost", &s.alice_norm, App::Nginx, "NGINX-ADMIN"),
        ("wsgi.localhost", &s.alice_wsgi, App::Wsgi, ""),
    ];
    for (host, cookie, app, never) in targets {
        let sub = table(s, host, Some(cookie), app, never, POLICY_PATHS).await?;
        t.cases += sub.cases;
        t.failures.extend(sub.failures);
        t.unsendable.extend(sub.unsendable);
        let pair = cookie.pair();
        let headers = [("Cookie", pair.as_str())];
        for proto in BOTH {
            for (method, path) in POLICY_METHODS {
                let sent = s.send(proto, host, method, path, &headers).await;
                t.outcome(format!("{proto} {method} {host} {path}"), sent, |o| {
                    judge(o, Denied, app, never, proto)
                });
            }
            // Absolute form carries the path too.
            if proto == Proto::H1 {
                for path in ["//admin", "/%61dmin", "/x/../admin", "/%2e%2e/admin"] {
                    let target = format!("https://{}{path}", s.authority(host));
                    let sent = s.send(proto, host, "GET", &target, &headers).await;
                    t.outcome(format!("{proto} GET {target}"), sent, |o| {
                        judge(o, Denied, app, never, proto)
                    });
                }
            }
        }
    }
    Ok(t)
}

async fn methods(s: &Suite) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    for (host, cookie) in [
        ("pub.localhost", None),
        ("wsgi.localhost", Some(&s.alice_wsgi)),
    ] {
        let authority = s.authority(host);
        let pair = cookie.map(Cookie::pair);
        let cookie_line = pair
            .as_ref()
            .map(|c| format!("Cookie: {c}\r\n"))
            .unwrap_or_default();
        let h1_cases: Vec<(String, &[u16])> = vec![
            (format!("CONNECT {authority} HTTP/1.1"), &[405]),
            ("CONNECT / HTTP/1.1".into(), &[405, 400]),
            ("TRACE / HTTP/1.1".into(), &[405]),
            ("TRACE /x?y=1 HTTP/1.1".into(), &[405]),
            ("get / HTTP/1.1".into(), &[400]),
            ("Get / HTTP/1.1".into(), &[400]),
            ("gET / HTTP/1.1".into(), &[400]),
            ("post / HTTP/1.1".into(), &[400]),
            ("delete / HTTP/1.1".into(), &[400]),
            ("trace / HTTP/1.1".into(), &[400, 405]),
            ("GET / HTTP/1.1".into(), &[200]),
            ("HEAD / HTTP/1.1".into(), &[200]),
            ("OPTIONS / HTTP/1.1".into(), &[200]),
            ("DELETE / HTTP/1.1".into(), &[200]),
        ];
        for (line, want) in h1_cases {
            let request = format!(
                "{line}\r\nHost: {authority}\r\n{cookie_line}Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let o = s.h1_raw(host, &request).await;
            t.check(
                format!("HTTP/1.1 {host} {line}"),
                judge_method(&o, want, &line),
            );
        }
        let mut h2_headers = Vec::new();
        if let Some(c) = &pair {
            h2_headers.push(("cookie", c.as_str()));
        }
        let h2_cases: [(&str, Option<&str>, &[u16]); 6] = [
            ("CONNECT", None, &[405]),
            ("TRACE", Some("/"), &[405]),
            ("get", Some("/"), &[400]),
            ("Post", Some("/"), &[400]),
            ("GET", Some("/"), &[200]),
            ("OPTIONS", Some("/"), &[200]),
        ];
        for (method, path, want) in h2_cases {
            let req = H2Request {
                method,
                authority: &authority,
                path,
                headers: h2_headers.clone(),
            };
            let sent = raw::h2(&s.https, host, &s.h2, &req).await;
            let line = format!("{method} {}", path.unwrap_or(&authority));
            t.outcome(format!("HTTP/2 {host} {line}"), sent, |o| {
                // A stream reset refuses too, except where the request must go through.
                if matches!(o, Outcome::Reset(_)) && want != [200] {
                    return Ok(());
                }
                judge_method(o, want, &line)
            });
        }
    }
    Ok(t)
}

fn judge_method(o: &Outcome, want: &[u16], line: &str) -> Result<(), String> {
    let reached = o.text().contains("REQUEST_METHOD");
    match o.status() {
        Some(200) if want == [200] => {
            let method = line.split(' ').next().unwrap_or_default();
            if method != "HEAD"
                && !o
                    .text()
                    .contains(&format!("\"REQUEST_METHOD\": \"{method}\""))
            {
                return Err(format!("the app did not get {method}: {}", o.describe()));
            }
            Ok(())
        }
        Some(s) if want.contains(&s) && !reached => Ok(()),
        _ => Err(format!("want {want:?}, got {}", o.describe())),
    }
}

/// Asterisk form and targets without a leading `/`, on a public and a private resource.
/// Each is followed by an ordinary request, which must still reach the app: a proxy that
/// sent `*` on would make the target look down and take it out of service for everyone.
/// Runs after the other path phases so that such an outage cannot hide their results.
async fn not_paths(s: &Suite) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let norm = s.alice_norm.pair();
    for (host, cookie, app) in [
        ("pub.localhost", None, App::Wsgi),
        ("norm.localhost", Some(norm.as_str()), App::Nginx),
    ] {
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("Cookie", *c)).collect();
        for proto in BOTH {
            for (method, target) in [
                ("GET", "*"),
                ("OPTIONS", "*"),
                ("GET", "admin"),
                ("DELETE", "*"),
            ] {
                let sent = s.send(proto, host, method, target, &headers).await;
                t.outcome(format!("{proto} {method} {target} on {host}"), sent, |o| {
                    judge(o, Bad, app, "", proto)
                });
                let sent = s.send(proto, host, "GET", "/after", &headers).await;
                t.outcome(
                    format!("{proto} GET /after {method} {target} on {host}"),
                    sent,
                    |o| judge(o, Up("/after"), app, "", proto),
                );
            }
        }
    }
    Ok(t)
}

/// The WSGI app's view of a request that must have reached it.
fn app_view(o: &Outcome) -> Result<Value, String> {
    if o.status() != Some(200) {
        return Err(format!("want 200 from the app, got {}", o.describe()));
    }
    serde_json::from_str(&o.text()).map_err(|_| format!("not the app's JSON: {}", o.describe()))
}

/// Whether the `Cookie` an app got is free of the proxy's cookies (and of `secrets`), and
/// still has `app=1` if `keep`.
fn cookie_clean(seen: Option<&str>, secrets: &[&str], keep: bool) -> Result<(), String> {
    let seen = seen.unwrap_or("");
    for bad in [SESSION_COOKIE, LOGIN_COOKIE].iter().chain(secrets) {
        if seen.contains(bad) {
            return Err(format!("the app got {bad:?} in Cookie: {seen:?}"));
        }
    }
    if keep && !seen.split(';').any(|c| c.trim() == "app=1") {
        return Err(format!(
            "the app's own cookie did not pass: Cookie: {seen:?}"
        ));
    }
    Ok(())
}

async fn cookies(s: &Suite) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let secret = s.alice_wsgi.value.as_str();
    let planted: Vec<(&str, Vec<String>, bool)> = vec![
        (
            "one Cookie header",
            vec![format!(
                "{SESSION_COOKIE}={secret}; {LOGIN_COOKIE}=login-state; app=1"
            )],
            true,
        ),
        (
            "three Cookie headers",
            vec![
                "app=1".into(),
                format!("{SESSION_COOKIE}={secret}"),
                format!("{LOGIN_COOKIE}=login-state"),
            ],
            true,
        ),
        (
            "no spaces",
            vec![format!(
                "app=1;{SESSION_COOKIE}={secret};{LOGIN_COOKIE}=login-state"
            )],
            true,
        ),
        (
            "odd spacing",
            vec![format!(
                "  {SESSION_COOKIE}={secret} ;app=1 ;  {LOGIN_COOKIE}=login-state "
            )],
            true,
        ),
        (
            "only the proxy's cookies",
            vec![format!(
                "{SESSION_COOKIE}={secret}; {LOGIN_COOKIE}=login-state"
            )],
            false,
        ),
    ];
    // A public resource (WSGI) and a bypass rule (nginx echoes `cookie=[...]`).
    for (host, path, app) in [
        ("pub.localhost", "/cookies", App::Wsgi),
        ("bypass.localhost", "/public/cookies", App::Nginx),
    ] {
        for proto in BOTH {
            for (what, values, keep) in &planted {
                let headers: Vec<(&str, &str)> =
                    values.iter().map(|v| ("cookie", v.as_str())).collect();
                let sent = s.send(proto, host, "GET", path, &headers).await;
                t.outcome(format!("{proto} {host}{path}, {what}"), sent, |o| {
                    let seen = seen_cookie(o, app)?;
                    cookie_clean(seen.as_deref(), &[secret], *keep)
                });
            }
        }
    }
    // Signed in: by single sign-on and by PIN.
    for (host, session) in [("wsgi.localhost", &s.alice_wsgi), ("pin.localhost", &s.pin)] {
        let values = [
            format!("{}; app=1; {LOGIN_COOKIE}=login-state", session.pair()),
            format!("app=1;{}", session.pair()),
        ];
        for proto in BOTH {
            for v in &values {
                let sent = s
                    .send(proto, host, "GET", "/cookies", &[("cookie", v.as_str())])
                    .await;
                t.outcome(
                    format!("{proto} {host} with its session, Cookie: {v}"),
                    sent,
                    |o| {
                        let seen = seen_cookie(o, App::Wsgi)?;
                        cookie_clean(seen.as_deref(), &[session.value.as_str()], true)
                    },
                );
            }
        }
    }

    // The app cannot set the proxy's cookies.
    let wsgi_pair = s.alice_wsgi.pair();
    for (host, cookie) in [
        ("pub.localhost", None),
        ("wsgi.localhost", Some(wsgi_pair.as_str())),
    ] {
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("cookie", *c)).collect();
        for proto in BOTH {
            let sent = s.send(proto, host, "GET", "/set-cookie", &headers).await;
            t.outcome(format!("{proto} {host}/set-cookie"), sent, |o| {
                app_view(o)?;
                let set: Vec<&str> = o
                    .reply()
                    .map(|r| r.headers_named("set-cookie").collect())
                    .unwrap_or_default();
                for c in &set {
                    let name = c.split('=').next().unwrap_or_default().trim();
                    if name.eq_ignore_ascii_case(SESSION_COOKIE)
                        || name.eq_ignore_ascii_case(LOGIN_COOKIE)
                    {
                        return Err(format!("the app set the proxy's cookie: {c}"));
                    }
                }
                if !set.iter().any(|c| c.starts_with("app_cookie=kept")) {
                    return Err(format!("the app's own Set-Cookie was dropped: {set:?}"));
                }
                Ok(())
            });
        }
    }

    // Sign-in hands a session only to a host that needs one.
    for (host, public) in [
        ("pub.localhost", true),
        ("a.localhost", true),
        (OTHER_HOST, true),
        (NO_CERT_HOST, true),
        ("wsgi.localhost", false),
        ("norm.localhost", false),
    ] {
        let url = format!(
            "https://auth.localhost:{p}/.warren/sign_in?rd=https%3A%2F%2F{host}%3A{p}%2F",
            p = s.port
        );
        let resp = s
            .web
            .get(&url)
            .header("cookie", s.alice_auth.pair())
            .send()
            .await?;
        let status = resp.status();
        let to = location(&resp).unwrap_or_default();
        let handoff = format!("https://{}/.warren/handoff", s.authority(host));
        let result = if public {
            if status == StatusCode::BAD_REQUEST && !to.contains("/.warren/handoff") {
                Ok(())
            } else {
                Err(format!("want 400 and no handoff, got {status} to {to:?}"))
            }
        } else if status == StatusCode::FOUND && to.starts_with(&handoff) {
            Ok(())
        } else {
            Err(format!("want 302 to {handoff}, got {status} to {to:?}"))
        };
        let kind = if public { "public" } else { "private" };
        t.check(format!("sign-in with rd on {kind} {host}"), result);
    }

    // The cookies' names and attributes.
    let c = &s.auth_cookie_in_browser;
    t.check(
        "the session cookie Chromium holds for the auth host",
        if c.name == SESSION_COOKIE
            && c.secure
            && c.http_only
            && c.path == "/"
            && !c.domain.starts_with('.')
        {
            Ok(())
        } else {
            Err(format!(
                "want {SESSION_COOKIE}, Secure, HttpOnly, Path=/, host-only: {c:?}"
            ))
        },
    );
    let h = &s.handoff_set_cookie;
    let attrs: Vec<String> = h
        .split(';')
        .skip(1)
        .map(|a| a.trim().to_ascii_lowercase())
        .collect();
    t.check(
        "the handoff's Set-Cookie",
        if h.starts_with(&format!("{SESSION_COOKIE}="))
            && attrs.iter().any(|a| a == "secure")
            && attrs.iter().any(|a| a == "path=/")
            && !attrs.iter().any(|a| a.starts_with("domain="))
        {
            Ok(())
        } else {
            Err(format!(
                "want {SESSION_COOKIE}=..; Secure; Path=/ and no Domain: {h}"
            ))
        },
    );
    let resp = s
        .web
        .get(format!(
            "https://auth.localhost:{p}/.warren/sign_in?rd=https%3A%2F%2Fwsgi.localhost%3A{p}%2F",
            p = s.port
        ))
        .send()
        .await?;
    let login: Vec<String> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    t.check(
        "the sign-in state cookie",
        if login.iter().any(|l| {
            l.starts_with(&format!("{LOGIN_COOKIE}="))
                && l.split(';')
                    .any(|a| a.trim().eq_ignore_ascii_case("secure"))
        }) {
            Ok(())
        } else {
            Err(format!("want {LOGIN_COOKIE}=..; Secure: {login:?}"))
        },
    );
    Ok(t)
}

/// The `Cookie` header the app got (`None` if none), or why the answer is not the app's.
fn seen_cookie(o: &Outcome, app: App) -> Result<Option<String>, String> {
    match app {
        App::Wsgi => Ok(app_view(o)?["HTTP_COOKIE"].as_str().map(str::to_owned)),
        App::Nginx => {
            let body = o.text();
            if o.status() != Some(200) || !body.starts_with("NGINX-PUBLIC") {
                return Err(format!(
                    "want 200 from nginx's /public, got {}",
                    o.describe()
                ));
            }
            let inner = body
                .split_once("cookie=[")
                .and_then(|(_, rest)| rest.rsplit_once(']'))
                .map(|(c, _)| c.to_owned())
                .unwrap_or_default();
            Ok((!inner.is_empty()).then_some(inner))
        }
    }
}

async fn spoofed_headers(s: &Suite) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let wsgi_pair = s.alice_wsgi.pair();
    let mut cases: Vec<(String, Vec<(&str, &str)>)> = SPOOFED_HEADERS
        .iter()
        .map(|(k, v)| (format!("{k}: {v}"), vec![(*k, *v)]))
        .collect();
    cases.push(("all of them at once".into(), SPOOFED_HEADERS.to_vec()));
    for (host, signed_in) in [("wsgi.localhost", true), ("pub.localhost", false)] {
        for proto in BOTH {
            for (what, spoofed) in &cases {
                let mut headers = vec![("X-Kept", "kept-value")];
                if signed_in {
                    headers.push(("Cookie", wsgi_pair.as_str()));
                }
                headers.extend(spoofed.iter().copied());
                let sent = s.send(proto, host, "GET", "/headers", &headers).await;
                t.outcome(format!("{proto} {host}, {what}"), sent, |o| {
                    let v = app_view(o)?;
                    let text = v.to_string();
                    if text.contains("spoofed") {
                        return Err(format!("a spoofed header reached the app: {text}"));
                    }
                    if v["HTTP_X_KEPT"] != "kept-value" {
                        return Err(format!("an ordinary header did not pass: {text}"));
                    }
                    let identity: Vec<&String> = v
                        .as_object()
                        .map(|m| {
                            m.keys()
                                .filter(|k| k.starts_with("HTTP_X_WARREN_"))
                                .collect()
                        })
                        .unwrap_or_default();
                    if signed_in {
                        if v["HTTP_X_WARREN_USER"] != "alice"
                            || v["HTTP_X_WARREN_EMAIL"] != "alice@example.test"
                        {
                            return Err(format!("want exactly alice's identity: {text}"));
                        }
                    } else if !identity.is_empty() {
                        return Err(format!(
                            "identity headers on a public resource: {identity:?}"
                        ));
                    }
                    Ok(())
                });
            }
        }
    }
    Ok(t)
}

/// What an authority case must get.
#[derive(Clone, Copy, Debug)]
enum HostWant {
    /// 400.
    Refused,
    /// Refused somehow (over HTTP/2 a reset stream too): not 2xx.
    NotServed,
    /// 200 with a body starting with this.
    Body(&'static str),
    /// A redirect to sign in.
    SignIn,
}

use HostWant::{Body, NotServed, Refused};

/// HTTP/1.1 request heads on a connection for `a.localhost`; `{a}`, `{b}` and `{hh}` stand
/// for `<name>.localhost:<port>`. `a.localhost` and `hh.localhost` (with `host_header:
/// a.localhost`) are public; `b.localhost` is private, on the same name-based nginx.
const AUTHORITY_H1: &[(&str, &str, HostWant)] = &[
    (
        "absolute-form for a, Host b",
        "GET https://{a}/ HTTP/1.1\r\nHost: {b}",
        Refused,
    ),
    (
        "absolute-form for a, Host b without port",
        "GET https://{a}/ HTTP/1.1\r\nHost: b.localhost",
        Refused,
    ),
    (
        "absolute-form for b, Host a",
        "GET https://{b}/ HTTP/1.1\r\nHost: {a}",
        Refused,
    ),
    (
        "absolute-form for hh, Host b",
        "GET https://{hh}/ HTTP/1.1\r\nHost: {b}",
        Refused,
    ),
    (
        "absolute-form for a, no Host",
        "GET https://{a}/ HTTP/1.1",
        Refused,
    ),
    (
        "absolute-form with user info",
        "GET https://{a}@{b}/ HTTP/1.1\r\nHost: {b}",
        Refused,
    ),
    (
        "two Host headers, a then b",
        "GET / HTTP/1.1\r\nHost: {a}\r\nHost: {b}",
        Refused,
    ),
    (
        "two Host headers, b then a",
        "GET / HTTP/1.1\r\nHost: {b}\r\nHost: {a}",
        Refused,
    ),
    (
        "the same Host twice",
        "GET / HTTP/1.1\r\nHost: {a}\r\nHost: {a}",
        Refused,
    ),
    ("no Host", "GET / HTTP/1.1", Refused),
    ("an empty Host", "GET / HTTP/1.1\r\nHost: ", Refused),
    (
        "a list in Host",
        "GET / HTTP/1.1\r\nHost: {a}, {b}",
        Refused,
    ),
    (
        "user info in Host",
        "GET / HTTP/1.1\r\nHost: b.localhost@{a}",
        Refused,
    ),
    (
        "Host a",
        "GET / HTTP/1.1\r\nHost: {a}",
        Body("VHOST-A host=a.localhost"),
    ),
    (
        "absolute-form for a, Host a",
        "GET https://{a}/ HTTP/1.1\r\nHost: {a}",
        Body("VHOST-A host=a.localhost"),
    ),
    (
        "Host a in upper case",
        "GET / HTTP/1.1\r\nHost: A.LOCALHOST:{port}",
        Body("VHOST-A host=a.localhost"),
    ),
    (
        "Host a, X-Forwarded-Host b",
        "GET / HTTP/1.1\r\nHost: {a}\r\nX-Forwarded-Host: {b}",
        Body("VHOST-A host=a.localhost"),
    ),
    (
        "Host hh (host_header a)",
        "GET / HTTP/1.1\r\nHost: {hh}",
        Body("VHOST-A host=a.localhost"),
    ),
    (
        "Host b (private)",
        "GET / HTTP/1.1\r\nHost: {b}",
        HostWant::SignIn,
    ),
];

/// HTTP/2 on a connection for `a.localhost` (whose certificate also covers
/// `b.localhost`): `:authority` and `host` headers, placeholders as above.
const AUTHORITY_H2: &[(&str, &str, &[&str], HostWant)] = &[
    (":authority a, host b", "{a}", &["{b}"], NotServed),
    (":authority b, host a", "{b}", &["{a}"], NotServed),
    (
        ":authority a, host a and b",
        "{a}",
        &["{a}", "{b}"],
        NotServed,
    ),
    (
        ":authority a, host b without port",
        "{a}",
        &["b.localhost"],
        NotServed,
    ),
    (":authority a", "{a}", &[], Body("VHOST-A host=a.localhost")),
    (
        ":authority a, host a",
        "{a}",
        &["{a}"],
        Body("VHOST-A host=a.localhost"),
    ),
    (
        ":authority b (a name the connection's certificate covers)",
        "{b}",
        &[],
        HostWant::SignIn,
    ),
];

fn judge_host(o: &Outcome, want: HostWant) -> Result<(), String> {
    let body = o.text();
    if body.contains("VHOST-B") {
        return Err(format!("the other app was served: {}", o.describe()));
    }
    match (want, o.status()) {
        (Refused, Some(400)) => Ok(()),
        (NotServed, None) if matches!(o, Outcome::Reset(_)) => Ok(()),
        (NotServed, Some(s)) if !(200..300).contains(&s) => Ok(()),
        (Body(b), Some(200)) if body.starts_with(b) => Ok(()),
        (HostWant::SignIn, Some(302 | 303 | 401)) => Ok(()),
        _ => Err(format!("want {want:?}, got {}", o.describe())),
    }
}

async fn authority(s: &Suite) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let fill = |text: &str| {
        text.replace("{a}", &s.authority("a.localhost"))
            .replace("{b}", &s.authority("b.localhost"))
            .replace("{hh}", &s.authority("hh.localhost"))
            .replace("{port}", &s.port.to_string())
    };
    for (what, head, want) in AUTHORITY_H1 {
        let request = format!("{}\r\nConnection: close\r\n\r\n", fill(head));
        let o = s.h1_raw("a.localhost", &request).await;
        t.check(format!("HTTP/1.1 {what}"), judge_host(&o, *want));
    }
    for (what, authority, hosts, want) in AUTHORITY_H2 {
        let authority = fill(authority);
        let hosts: Vec<String> = hosts.iter().map(|h| fill(h)).collect();
        let req = H2Request {
            method: "GET",
            authority: &authority,
            path: Some("/"),
            headers: hosts.iter().map(|h| ("host", h.as_str())).collect(),
        };
        let sent = raw::h2(&s.https, "a.localhost", &s.h2, &req).await;
        t.outcome(format!("HTTP/2 {what}"), sent, |o| judge_host(o, *want));
    }
    // The app gets the routed Host, and the path in origin form.
    let p = s.authority("pub.localhost");
    let cases = [
        ("HTTP/1.1 Host pub", format!("GET /x HTTP/1.1\r\nHost: {p}")),
        (
            "HTTP/1.1 absolute-form for pub",
            format!("GET https://{p}/x HTTP/1.1\r\nHost: {p}"),
        ),
    ];
    let mut sent = Vec::new();
    for (what, head) in cases {
        let request = format!("{head}\r\nConnection: close\r\n\r\n");
        sent.push((what, Ok(s.h1_raw("pub.localhost", &request).await)));
    }
    let h2 = s.send(Proto::H2, "pub.localhost", "GET", "/x", &[]).await;
    sent.push(("HTTP/2 :authority pub", h2));
    for (what, outcome) in sent {
        t.outcome(what, outcome, |o| {
            let v = app_view(o)?;
            if v["HTTP_HOST"] != p.as_str() || v["RAW_URI"] != "/x" {
                return Err(format!("want Host {p} and /x upstream: {v}"));
            }
            Ok(())
        });
    }
    Ok(t)
}

async fn sni(s: &Suite) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let judge_sni = |o: &Outcome, want: u16| -> Result<(), String> {
        let body = o.text();
        let from_app =
            body.starts_with("NGINX-") || body.starts_with("VHOST-") || body.contains("RAW_URI");
        match o.status() {
            Some(421) if want == 421 && !from_app => Ok(()),
            Some(200) if want == 200 && from_app => Ok(()),
            _ => Err(format!("want {want}, got {}", o.describe())),
        }
    };
    let auth_host = "auth.localhost";
    let cases: [(&str, &str, &str, u16); 12] = [
        (OTHER_HOST, "a.localhost", "/", 421),
        (OTHER_HOST, "pub.localhost", "/", 421),
        (OTHER_HOST, auth_host, "/.warren/", 421),
        ("a.localhost", OTHER_HOST, "/", 421),
        ("a.localhost", NO_CERT_HOST, "/", 421),
        ("pub.localhost", NO_CERT_HOST, "/", 421),
        (auth_host, NO_CERT_HOST, "/", 421),
        ("pub.localhost", "unrouted.localhost", "/", 421),
        ("a.localhost", "pub.localhost", "/", 200),
        ("pub.localhost", "PUB.LOCALHOST", "/", 200),
        (OTHER_HOST, OTHER_HOST, "/", 200),
        ("norm.localhost", "a.localhost", "/", 200),
    ];
    for proto in BOTH {
        for (sni, host, path, want) in cases {
            let authority = s.authority(host);
            let sent = match proto {
                Proto::H1 => Ok(raw::h1(
                    &s.https,
                    sni,
                    &s.h1,
                    &h1_request("GET", path, &authority, &[]),
                )
                .await),
                Proto::H2 => {
                    let req = H2Request {
                        method: "GET",
                        authority: &authority,
                        path: Some(path),
                        headers: vec![],
                    };
                    raw::h2(&s.https, sni, &s.h2, &req).await
                }
            };
            t.outcome(format!("{proto} SNI {sni}, host {host}"), sent, |o| {
                judge_sni(o, want)
            });
        }
    }
    // The auth host's pages on a connection for a name its certificate covers.
    let o = s
        .h1_raw(
            "pub.localhost",
            &String::from_utf8_lossy(&h1_request(
                "GET",
                "/.warren/",
                &s.authority(auth_host),
                &[],
            )),
        )
        .await;
    t.check(
        "HTTP/1.1 SNI pub.localhost, host auth.localhost",
        match o.status() {
            Some(421) | None => Err(format!("want the auth host's page, got {}", o.describe())),
            Some(_) => Ok(()),
        },
    );
    // Absolute form names the host too.
    let nc = s.authority(NO_CERT_HOST);
    let o = s
        .h1_raw(
            "pub.localhost",
            &format!("GET https://{nc}/ HTTP/1.1\r\nHost: {nc}\r\nConnection: close\r\n\r\n"),
        )
        .await;
    t.check(
        format!("HTTP/1.1 SNI pub.localhost, absolute-form for {NO_CERT_HOST}"),
        judge_sni(&o, 421),
    );
    // On one kept-alive connection, the second request names an uncovered host.
    for (sni, first, second) in [
        ("pub.localhost", "pub.localhost", NO_CERT_HOST),
        (OTHER_HOST, OTHER_HOST, "a.localhost"),
    ] {
        let keep = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", s.authority(first));
        let then = h1_request("GET", "/", &s.authority(second), &[]);
        let outcomes = raw::h1_sequence(&s.https, sni, &s.h1, &[keep.into_bytes(), then]).await;
        let result = match outcomes.as_slice() {
            [one, two] => judge_sni(one, 200)
                .map_err(|e| format!("first request: {e}"))
                .and_then(|()| judge_sni(two, 421).map_err(|e| format!("second request: {e}"))),
            other => Err(format!("want two answers, got {other:?}")),
        };
        t.check(
            format!("HTTP/1.1 SNI {sni}, {first} then {second} on one connection"),
            result,
        );
    }
    Ok(t)
}

async fn upgrades(s: &Suite) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let up = s.authority("up.localhost");
    let ws_key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "h2c",
            format!("GET / HTTP/1.1\r\nHost: {up}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"),
            200,
        ),
        (
            "H2C in upper case",
            format!("GET / HTTP/1.1\r\nHost: {up}\r\nConnection: upgrade\r\nUpgrade: H2C\r\n\r\n"),
            200,
        ),
        (
            "foo/1",
            format!("GET / HTTP/1.1\r\nHost: {up}\r\nConnection: Upgrade\r\nUpgrade: foo/1\r\n\r\n"),
            200,
        ),
        (
            "h2c without Connection: upgrade",
            format!("GET / HTTP/1.1\r\nHost: {up}\r\nUpgrade: h2c\r\n\r\n"),
            200,
        ),
        (
            "websocket on POST",
            format!("POST / HTTP/1.1\r\nHost: {up}\r\nContent-Length: 0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{ws_key}\r\n"),
            200,
        ),
        (
            "a 101 nobody asked for",
            format!("GET /always101 HTTP/1.1\r\nHost: {up}\r\nConnection: close\r\n\r\n"),
            502,
        ),
        (
            "a 101 to an h2c upgrade the proxy dropped",
            format!("GET /always101 HTTP/1.1\r\nHost: {up}\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"),
            502,
        ),
        (
            "websocket on GET",
            format!("GET /ws HTTP/1.1\r\nHost: {up}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{ws_key}\r\n"),
            101,
        ),
    ];
    for (what, request, want) in &cases {
        let o = s.h1_raw("up.localhost", request).await;
        let body = o.text();
        let result = match (o.status(), *want) {
            (Some(200), 200) if body.contains("upgrade=-") && body.contains("http2-settings=-") => {
                Ok(())
            }
            (Some(200), 200) => Err(format!("the backend was offered the upgrade: {body:?}")),
            (Some(502), 502) if !body.contains("TUNNEL-OPEN") => Ok(()),
            (Some(101), 101) if body.contains("TUNNEL-OPEN") => Ok(()),
            _ => Err(format!("want {want}, got {}", o.describe())),
        };
        t.check(format!("HTTP/1.1 Upgrade: {what}"), result);
    }
    // A real WebSocket through the proxy.
    let result = async {
        let tls = raw::connect(&s.https, "ws.localhost", &s.h1)
            .await
            .map_err(|e| format!("{e:#}"))?;
        let url = format!("wss://{}/ws", s.authority("ws.localhost"));
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::client_async(url, tls),
        )
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| format!("handshake: {e}"))?;
        ws.send(Message::text("hello-ws"))
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "hello-ws" => Ok(()),
            other => Err(format!("want the echo, got {other:?}")),
        }
    }
    .await;
    t.check("a WebSocket echo through the proxy", result);
    Ok(t)
}

/// alice's WebSocket on a private resource echoes; once an admin changes the resource's
/// policy to let nobody in, the open connection is closed (not only new requests refused).
async fn upgraded_recheck(s: &Suite) -> anyhow::Result<Tally> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut t = Tally::default();
    let host = "wspriv.localhost";
    let (cookie, _) = session_for(&s.web, s.port, &s.alice_auth, host).await?;
    let tls = raw::connect(&s.https, host, &s.h1).await?;
    let mut request = format!("wss://{}/ws", s.authority(host)).into_client_request()?;
    request
        .headers_mut()
        .insert("cookie", cookie.pair().parse()?);
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(request, tls),
    )
    .await
    .context("WebSocket handshake timed out")??;
    ws.send(Message::text("before")).await?;
    let echo = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    let echoed = matches!(&echo, Ok(Some(Ok(Message::Text(m)))) if m.as_str() == "before");
    t.check(
        "alice's WebSocket on a private resource echoes",
        if echoed {
            Ok(())
        } else {
            Err(format!("{echo:?}"))
        },
    );
    let (status, body) = s
        .cluster
        .api(0)
        .send(
            reqwest::Method::PATCH,
            "/v1/policies/ws-admins",
            &json!({"allow": {"group": "no-such-group"}}),
        )
        .await?;
    anyhow::ensure!(status.is_success(), "policy change: {status} {body}");
    let changed = Instant::now();
    // The connection must end (close frame, reset or end of stream), within a bound.
    let mut result = Err("still open 10 s after the policy changed".to_owned());
    while changed.elapsed() < Duration::from_secs(10) {
        let _ = ws.send(Message::text("after")).await;
        match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(Message::Text(m)))) if m.as_str() == "after" => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                eprintln!(
                    "WebSocket closed {:?} after the policy change",
                    changed.elapsed()
                );
                result = Ok(());
                break;
            }
            Ok(other) => {
                result = Err(format!("unexpected {other:?}"));
                break;
            }
        }
    }
    t.check(
        "the open WebSocket is closed after the policy change",
        result,
    );
    let denied = s
        .web
        .get(format!("https://{}/ws", s.authority(host)))
        .header("cookie", cookie.pair())
        .send()
        .await?
        .status();
    t.check(
        "a new request is denied",
        if denied == StatusCode::FORBIDDEN {
            Ok(())
        } else {
            Err(format!("got {denied}"))
        },
    );
    Ok(t)
}

async fn opt_in_upgrade(s: &Suite) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let (status, body) = s
        .cluster
        .api(0)
        .send(
            reqwest::Method::POST,
            "/v1/resources",
            &json!({"name": "up2", "route": {"http": {"domain": "up2.localhost"}},
                    "targets": [s.upgrade.addr.to_string()],
                    "http": {"public": true, "upgrades": ["h2c"]}}),
        )
        .await?;
    if !status.is_success() {
        t.check(
            "creating a resource with http.upgrades [h2c]",
            Err(format!("{status} {body}")),
        );
        return Ok(t);
    }
    let url = format!("https://up2.localhost:{}/", s.port);
    eventually("up2.localhost is routed", || async {
        Ok(s.web
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK))
    })
    .await?;
    let host = s.authority("up2.localhost");
    let h2c = s
        .h1_raw(
            "up2.localhost",
            &format!(
                "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            ),
        )
        .await;
    t.check(
        "HTTP/1.1 Upgrade: h2c on a resource that allows it",
        match h2c.status() {
            Some(101) if h2c.text().contains("TUNNEL-OPEN") => Ok(()),
            _ => Err(format!("want 101 and the tunnel, got {}", h2c.describe())),
        },
    );
    let other = s
        .h1_raw(
            "up2.localhost",
            &format!(
                "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n"
            ),
        )
        .await;
    t.check(
        "HTTP/1.1 Upgrade: foo on a resource that allows only h2c",
        match other.status() {
            Some(200) if other.text().contains("upgrade=-") => Ok(()),
            _ => Err(format!(
                "want 200 without the upgrade, got {}",
                other.describe()
            )),
        },
    );
    Ok(t)
}

/// The app's view must show the proxy's forwarding headers only.
fn forwarding_ok(v: &Value, host: &str, port: u16) -> Result<(), String> {
    let text = v.to_string();
    for m in FORWARDING_MARKERS {
        if text.contains(m) {
            return Err(format!("the client's {m:?} reached the app: {text}"));
        }
    }
    let want = [
        ("HTTP_X_FORWARDED_FOR", "127.0.0.1"),
        ("HTTP_X_REAL_IP", "127.0.0.1"),
        ("HTTP_X_FORWARDED_PROTO", "https"),
        ("HTTP_X_FORWARDED_HOST", host),
    ];
    for (k, val) in want {
        if v[k] != val {
            return Err(format!("want {k} = {val:?}, got {}", v[k]));
        }
    }
    for k in [
        "HTTP_TRUE_CLIENT_IP",
        "HTTP_X_CLIENT_IP",
        "HTTP_CF_CONNECTING_IP",
        "HTTP_X_ORIGINAL_URL",
        "HTTP_X_REWRITE_URL",
        "HTTP_X_HTTP_METHOD_OVERRIDE",
    ] {
        if v.get(k).is_some() {
            return Err(format!("{k} reached the app: {}", v[k]));
        }
    }
    let forwarded = v["HTTP_FORWARDED"].as_str().unwrap_or_default();
    if forwarded.contains(',') {
        return Err(format!(
            "Forwarded has more than the proxy's element: {forwarded:?}"
        ));
    }
    let params: std::collections::HashMap<String, String> = forwarded
        .split(';')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_ascii_lowercase(),
                v.trim().trim_matches('"').to_owned(),
            )
        })
        .collect();
    let host_ok = params
        .get("host")
        .is_some_and(|h| h == host || *h == format!("{host}:{port}"));
    if params.get("for").map(String::as_str) != Some("127.0.0.1")
        || params.get("proto").map(String::as_str) != Some("https")
        || !host_ok
    {
        return Err(format!(
            "want Forwarded: for=127.0.0.1;host={host}..;proto=https, got {forwarded:?}"
        ));
    }
    Ok(())
}

async fn forwarding(s: &Suite) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    let mut cases: Vec<(String, Vec<(&str, &str)>)> = SPOOFED_FORWARDING
        .iter()
        .map(|(k, v)| (format!("{k}: {v}"), vec![(*k, *v)]))
        .collect();
    cases.push(("none".into(), vec![]));
    cases.push(("all of them at once".into(), SPOOFED_FORWARDING.to_vec()));
    for proto in BOTH {
        for (what, headers) in &cases {
            let sent = s.send(proto, "pub.localhost", "GET", "/fwd", headers).await;
            t.outcome(format!("{proto} pub.localhost, {what}"), sent, |o| {
                forwarding_ok(&app_view(o)?, "pub.localhost", s.port)
            });
        }
    }
    let pair = s.alice_wsgi.pair();
    let mut headers = vec![("Cookie", pair.as_str())];
    headers.extend(SPOOFED_FORWARDING.iter().copied());
    for proto in BOTH {
        let sent = s
            .send(proto, "wsgi.localhost", "GET", "/fwd", &headers)
            .await;
        t.outcome(
            format!("{proto} wsgi.localhost signed in, all of them"),
            sent,
            |o| forwarding_ok(&app_view(o)?, "wsgi.localhost", s.port),
        );
    }
    Ok(t)
}

/// How a dripping connection ended.
#[derive(Debug)]
enum Drip {
    /// The server closed it after this long.
    Closed(Duration),
    /// Still open after [`DRIP_LIMIT`].
    Open,
}

/// Writes `prefix`, then one more byte every second, never finishing the request; returns
/// when the server closes the connection or after [`DRIP_LIMIT`].
async fn drip(
    addr: &str,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
    prefix: &[u8],
) -> anyhow::Result<Drip> {
    let mut tls = raw::connect(addr, sni, &cfg).await?;
    tls.write_all(prefix).await?;
    tls.flush().await?;
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    while start.elapsed() < DRIP_LIMIT {
        match tokio::time::timeout(Duration::from_secs(1), tls.read(&mut buf)).await {
            // A 408 or similar may come first; the close follows.
            Ok(Ok(n)) if n > 0 => continue,
            Ok(_) => return Ok(Drip::Closed(start.elapsed())),
            Err(_) => {}
        }
        if tls.write_all(b"a").await.is_err() || tls.flush().await.is_err() {
            return Ok(Drip::Closed(start.elapsed()));
        }
    }
    Ok(Drip::Open)
}

async fn dripping(
    drips: Vec<(String, tokio::task::JoinHandle<anyhow::Result<Drip>>)>,
) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    for (what, task) in drips {
        let result = match task.await {
            Ok(Ok(Drip::Closed(after))) => {
                eprintln!(
                    "           {what}: closed after {:.1} s",
                    after.as_secs_f64()
                );
                Ok(())
            }
            Ok(Ok(Drip::Open)) => Err(format!("still open after {DRIP_LIMIT:?}")),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(e) => Err(format!("the client task failed: {e}")),
        };
        t.check(format!("a connection dripping {what}"), result);
    }
    Ok(t)
}
