//! One canonical view of each request: the routed authority, the canonical path, the
//! client's address, and the headers that may cross the proxy. Routing, bypass rules,
//! policies and the request sent upstream all read this view, so an app can never be
//! handed a request that means something other than what was checked.
//!
//! ```text
//!   request ── method upper case, not CONNECT/TRACE ─────────── else 400 / 405
//!           ── one Host; absolute-form / :authority agree with it ─ else 400
//!           ── host covered by the certificate of the TLS SNI ──── else 421
//!           ── path made canonical (warren_proto::canonical) ───── else 400
//!           ── client = peer, or from X-Forwarded-For of a trusted proxy
//!   upstream ◀ canonical path, routed Host, proxy's forwarding headers, no `_` headers,
//!              no X-Warren-* / override / forwarding headers from the client, no
//!              proxy cookies
//! ```

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use warren_proto::canonical::{canonical_path, check_method, Authority, MethodError};

use super::pages::page;
use super::state::Config;
use super::{Body, LOGIN_COOKIE, SESSION_COOKIE};

/// The authority a request was routed on.
#[derive(Debug, Clone)]
pub struct View {
    /// Lower case, without port or trailing dot.
    pub host: String,
    /// The port the client named, if any.
    pub port: Option<u16>,
}

impl View {
    /// `host[:port]` as the client named it (normalized), for the upstream `Host`.
    pub fn authority(&self) -> Cow<'_, str> {
        match self.port {
            Some(p) => Cow::Owned(format!("{}:{p}", self.host)),
            None => Cow::Borrowed(&self.host),
        }
    }
}

/// Why a request was refused before routing. The client is at fault in every case.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The method is not upper case.
    #[error("the request method must be upper case (methods are case-sensitive)")]
    MethodCase,
    /// `CONNECT` or `TRACE`.
    #[error("{0} is not allowed through Warren")]
    MethodNotAllowed(http::Method),
    /// No valid host, or more than one.
    #[error("{0}")]
    Authority(&'static str),
    /// A path canonical form cannot make unambiguous.
    #[error("refused: {0}")]
    Path(#[from] warren_proto::canonical::PathError),
}

impl Refusal {
    /// The answer to the client: 405 for a method, 400 otherwise.
    pub fn response(&self) -> Response<Body> {
        if let Refusal::MethodNotAllowed(_) = self {
            let mut r = page(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed",
                &format!("{}.", capitalized(&self.to_string())),
            );
            r.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
            return r;
        }
        page(
            StatusCode::BAD_REQUEST,
            "Bad request",
            &format!("{}.", capitalized(&self.to_string())),
        )
    }
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Checks the method and authority and makes the path canonical, rewriting the request's
/// URI in place when its path was not.
pub fn canonicalize<B>(req: &mut Request<B>) -> Result<View, Refusal> {
    match check_method(req.method().as_str()) {
        Ok(()) => {}
        Err(MethodError::NotUpperCase) => return Err(Refusal::MethodCase),
        Err(MethodError::NotAllowed) => {
            return Err(Refusal::MethodNotAllowed(req.method().clone()))
        }
    }
    let view = authority(req)?;
    let canonical = match canonical_path(req.uri().path())? {
        Cow::Borrowed(_) => None,
        Cow::Owned(c) => Some(c),
    };
    if let Some(mut path) = canonical {
        if let Some(q) = req.uri().query() {
            path.push('?');
            path.push_str(q);
        }
        let mut parts = req.uri().clone().into_parts();
        let invalid = || Refusal::Authority("the request path is not valid");
        parts.path_and_query = Some(path.parse().map_err(|_| invalid())?);
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| invalid())?;
    }
    Ok(view)
}

/// The one authority of the request: the Host header and the request-target's authority
/// (HTTP/1.1 absolute form, or HTTP/2 `:authority`) must agree where both are given.
fn authority<B>(req: &Request<B>) -> Result<View, Refusal> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::Authority(
            "the request has more than one Host header",
        ));
    }
    if req.version() == http::Version::HTTP_11 && host_header.is_none() {
        return Err(Refusal::Authority(
            "an HTTP/1.1 request needs a Host header",
        ));
    }
    let bad_host = || Refusal::Authority("the request does not name a valid host");
    let from_header = match host_header {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(Authority::parse)
                .ok_or_else(bad_host)?,
        ),
        None => None,
    };
    let from_target = match req.uri().authority() {
        Some(a) => Some(Authority::parse(a.as_str()).ok_or_else(bad_host)?),
        None => None,
    };
    let a = match (from_target, from_header) {
        (Some(t), Some(h)) if !t.same_as(&h, 443) => {
            return Err(Refusal::Authority(
                "the request names one host in its target and another in its Host header",
            ))
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => return Err(bad_host()),
    };
    Ok(View {
        host: a.host.into_owned(),
        port: a.port,
    })
}

/// Whether a request for `host` came on a TLS connection for a name whose certificate
/// does not cover `host` (answered 421, RFC 9110 15.5.20). Connection reuse across names
/// one certificate covers, as browsers do over HTTP/2, is fine.
pub fn misdirected(config: &Config, sni: Option<&str>, host: &str) -> bool {
    let Some(sni) = sni else { return true };
    if sni.eq_ignore_ascii_case(host) {
        return false;
    }
    !config
        .served_cert(&sni.to_ascii_lowercase())
        .is_some_and(|c| c.covers(host))
}

/// The 421 answer.
pub fn misdirected_page(host: &str) -> Response<Body> {
    page(
        StatusCode::MISDIRECTED_REQUEST,
        "Misdirected request",
        &format!("This connection was not made for {host}; connect to it directly."),
    )
}

/// Who sent the request: the TCP peer, or, behind a trusted proxy, the client it names.
#[derive(Debug, Clone)]
pub struct Client {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The client's address, for policies, bypass rules, limits and logs.
    pub ip: IpAddr,
    /// `X-Forwarded-For` as received from a trusted proxy.
    chain: Option<String>,
}

impl Client {
    /// The client of a request from `peer`, trusting `X-Forwarded-For` only from `trusted`.
    pub fn of(peer: SocketAddr, headers: &http::HeaderMap, trusted: &[ipnet::IpNet]) -> Self {
        let peer_ip = peer.ip().to_canonical();
        let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
        if trusted.is_empty() || !is_trusted(&peer_ip) {
            return Self {
                peer,
                ip: peer_ip,
                chain: None,
            };
        }
        let values: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let mut ip = peer_ip;
        for entry in values.iter().flat_map(|v| v.split(',')).rev() {
            if !is_trusted(&ip) {
                break;
            }
            match entry.trim().parse::<IpAddr>() {
                Ok(next) => ip = next.to_canonical(),
                Err(_) => break,
            }
        }
        let chain = (!values.is_empty()).then(|| values.join(", "));
        Self { peer, ip, chain }
    }

    /// The peer with the client's address, for code that counts per client.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.peer.port())
    }
}

/// Request headers a client must never set for the app: they claim identity, name
/// another client, path or method, or name the proxy's own view. Checked after `_` is
/// read as `-`, but any name with `_` is dropped anyway (as nginx does by default), since
/// CGI and WSGI servers read `X_Warren_User` as `X-Warren-User`.
const FROM_PROXY_ONLY: [&str; 22] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-forwarded-prefix",
    "x-forwarded-uri",
    "x-forwarded-path",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Removes what only the proxy may say, and the proxy's cookies, from what goes upstream.
pub fn sanitize(headers: &mut http::HeaderMap) {
    let drop: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k.contains('_') || k.starts_with("x-warren-") || FROM_PROXY_ONLY.contains(&k)
        })
        .cloned()
        .collect();
    for k in drop {
        headers.remove(k);
    }
    strip_proxy_cookies(headers);
}

/// Sets the proxy's forwarding headers: what it saw, never what the client claimed.
pub fn set_forwarding(headers: &mut http::HeaderMap, client: &Client, view: &View) {
    let peer = client.peer.ip().to_canonical();
    let xff = match &client.chain {
        Some(chain) => format!("{chain}, {peer}"),
        None => peer.to_string(),
    };
    let insert = |headers: &mut http::HeaderMap, name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    };
    insert(headers, "x-forwarded-for", &xff);
    insert(headers, "x-real-ip", &client.ip.to_string());
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("https"),
    );
    insert(headers, "x-forwarded-host", &view.host);
    let authority = view.authority();
    let for_ = match client.ip {
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
        v4 => v4.to_string(),
    };
    insert(
        headers,
        "forwarded",
        &format!("for={for_};host=\"{authority}\";proto=https"),
    );
}

/// Removes the proxy's own cookies from the request's `Cookie` headers.
pub fn strip_proxy_cookies(headers: &mut http::HeaderMap) {
    let ours = |pair: &str| {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n).trim();
        name == SESSION_COOKIE || name == LOGIN_COOKIE
    };
    let any = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .any(ours);
    if !any {
        return;
    }
    let kept: Vec<&str> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| !kv.is_empty() && !ours(kv))
        .collect();
    let kept = (!kept.is_empty())
        .then(|| HeaderValue::from_str(&kept.join("; ")).ok())
        .flatten();
    headers.remove(header::COOKIE);
    if let Some(v) = kept {
        headers.insert(header::COOKIE, v);
    }
}

/// Drops an app's `Set-Cookie` for the proxy's own cookie names (which would sign the
/// user out, or fix a session of the app's choosing on them).
pub fn strip_proxy_set_cookies(headers: &mut http::HeaderMap) {
    let ours = |v: &HeaderValue| {
        let Ok(s) = v.to_str() else { return false };
        let name = s.split_once('=').map_or(s, |(n, _)| n).trim();
        name.eq_ignore_ascii_case(SESSION_COOKIE) || name.eq_ignore_ascii_case(LOGIN_COOKIE)
    };
    if !headers.get_all(header::SET_COOKIE).iter().any(ours) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| !ours(v))
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in kept {
        headers.append(header::SET_COOKIE, v);
    }
}

/// Whether the request asks to upgrade to a protocol this route relays: WebSocket on
/// GET, or a token the resource lists. Returns the token.
pub fn allowed_upgrade<B>(req: &Request<B>, extra: &[String]) -> Option<HeaderValue> {
    let connection_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    if !connection_upgrade {
        return None;
    }
    let mut upgrades = req.headers().get_all(header::UPGRADE).iter();
    let value = upgrades.next()?;
    if upgrades.next().is_some() {
        return None;
    }
    let token = value.to_str().ok()?.trim();
    // One protocol per request: a list would let the app pick one that was not checked.
    if token.contains(',') {
        return None;
    }
    let name = token.split('/').next().unwrap_or(token);
    let ok = (name.eq_ignore_ascii_case("websocket") && req.method() == http::Method::GET)
        || extra.iter().any(|e| e.eq_ignore_ascii_case(token));
    ok.then(|| value.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(target: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::get(target);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn one_authority_per_request() {
        let v = canonicalize(&mut req("/", &["App.Localhost:8443"])).unwrap();
        assert_eq!((v.host.as_str(), v.port), ("app.localhost", Some(8443)));
        let v = canonicalize(&mut req("https://a.localhost/x", &["a.localhost:443"])).unwrap();
        assert_eq!(v.host, "a.localhost");
        for (target, hosts) in [
            ("https://a.localhost/x", &["b.localhost"][..]),
            ("https://a.localhost:8443/x", &["a.localhost"][..]),
            ("/", &["a.localhost", "a.localhost"][..]),
            ("/", &[][..]),
            ("/", &["a b"][..]),
            ("/", &["a.localhost:x"][..]),
        ] {
            let r = canonicalize(&mut req(target, hosts));
            assert_eq!(
                r.map(|_| ()).unwrap_err().response().status(),
                StatusCode::BAD_REQUEST,
                "{target} {hosts:?}"
            );
        }
    }

    #[test]
    fn the_uri_is_rewritten_to_the_canonical_path_keeping_the_query() {
        let mut r = req("/x/../%61dmin//y?a=%2F..&b", &["a.localhost"]);
        canonicalize(&mut r).unwrap();
        assert_eq!(r.uri().path(), "/admin/y");
        assert_eq!(r.uri().query(), Some("a=%2F..&b"));
        let mut r = req("/a%2fb", &["a.localhost"]);
        assert_eq!(
            canonicalize(&mut r).unwrap_err().response().status(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn methods_are_checked() {
        let mut r = req("/", &["a.localhost"]);
        *r.method_mut() = http::Method::from_bytes(b"get").unwrap();
        assert_eq!(
            canonicalize(&mut r).unwrap_err().response().status(),
            StatusCode::BAD_REQUEST
        );
        *r.method_mut() = http::Method::TRACE;
        assert_eq!(
            canonicalize(&mut r).unwrap_err().response().status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_names_it() {
        let mut h = http::HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.9, 10.0.0.5".parse().unwrap());
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let c = Client::of(peer, &h, &[]);
        assert_eq!(c.ip, peer.ip());
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        let c = Client::of(peer, &h, &trusted);
        assert_eq!(c.ip, "203.0.113.9".parse::<IpAddr>().unwrap());
        let c = Client::of("192.0.2.1:1".parse().unwrap(), &h, &trusted);
        assert_eq!(c.ip, "192.0.2.1".parse::<IpAddr>().unwrap());
        let mut view = View {
            host: "a.localhost".into(),
            port: None,
        };
        let mut up = h.clone();
        sanitize(&mut up);
        set_forwarding(&mut up, &c, &view);
        assert_eq!(up["x-forwarded-for"], "192.0.2.1");
        view.port = Some(8443);
        set_forwarding(&mut up, &c, &view);
        assert_eq!(
            up["forwarded"],
            "for=192.0.2.1;host=\"a.localhost:8443\";proto=https"
        );
    }

    #[test]
    fn spoofed_and_underscore_headers_and_proxy_cookies_are_dropped() {
        let mut h = http::HeaderMap::new();
        for (k, v) in [
            ("x_warren_user", "root"),
            ("x-warren-user", "root"),
            ("x-real-ip", "1.2.3.4"),
            ("true-client-ip", "1.2.3.4"),
            ("x-original-url", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("forwarded", "for=1.2.3.4"),
            ("accept", "*/*"),
        ] {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h.append(
            header::COOKIE,
            format!("a=1; {SESSION_COOKIE}=s; b=2").parse().unwrap(),
        );
        h.append(header::COOKIE, format!("{LOGIN_COOKIE}=l").parse().unwrap());
        sanitize(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["accept"], "*/*");
        assert_eq!(h[header::COOKIE], "a=1; b=2");
        let mut r = http::HeaderMap::new();
        r.append(header::SET_COOKIE, "app=1".parse().unwrap());
        r.append(
            header::SET_COOKIE,
            format!("{SESSION_COOKIE}=x; Path=/").parse().unwrap(),
        );
        strip_proxy_set_cookies(&mut r);
        assert_eq!(r.get_all(header::SET_COOKIE).iter().count(), 1);
    }

    #[test]
    fn only_websocket_or_listed_upgrades() {
        let up = |proto: &str, method: http::Method| {
            Request::builder()
                .method(method)
                .uri("/")
                .header(header::CONNECTION, "keep-alive, Upgrade")
                .header(header::UPGRADE, proto)
                .body(())
                .unwrap()
        };
        assert!(allowed_upgrade(&up("websocket", http::Method::GET), &[]).is_some());
        assert!(allowed_upgrade(&up("WebSocket", http::Method::GET), &[]).is_some());
        assert!(allowed_upgrade(&up("websocket", http::Method::POST), &[]).is_none());
        assert!(allowed_upgrade(&up("h2c", http::Method::GET), &[]).is_none());
        assert!(allowed_upgrade(&up("websocket, h2c", http::Method::GET), &[]).is_none());
        assert!(allowed_upgrade(&up("h2c", http::Method::GET), &["h2c".into()]).is_some());
    }
}
