//! What the proxy needs from the registry, prepared for the request path: routes by host,
//! compiled policies, TLS certificates by name, the cookie sealer, role memberships.
//!
//! Rebuilt off the request path whenever the registry changes and published through an
//! `ArcSwap`, so a request reads it with one atomic load and takes no lock. Routes are
//! rebuilt only when the entities they are made of change (sessions change far more often).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue};
use rustls::sign::CertifiedKey;
use warren_consensus::registry::Registry;
use warren_proto::access::CompiledPolicy;
use warren_proto::registry::{HealthCheck, HttpOptions, Resource, Route as RouteSpec, Target};
use warren_proto::Name;

use super::seal::Sealer;
use super::sign::Signer;

/// Milliseconds since the proxy's clock started (for ejection deadlines in atomics).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// How long a target that refused a connection is left out.
pub const PASSIVE_EJECT: Duration = Duration::from_secs(10);

/// One upstream address of a resource and what is known of its health.
#[derive(Debug)]
pub struct TargetState {
    /// The address.
    pub target: Target,
    /// `host:port` for the URI authority.
    pub authority: String,
    /// Result of the active check (true without one).
    pub healthy: AtomicBool,
    /// Failed active checks in a row.
    pub failures: AtomicU32,
    /// Left out until this [`now_ms`] after a failed connection.
    pub ejected_until: AtomicU64,
}

impl TargetState {
    /// Whether requests may go to it now.
    pub fn usable(&self, now: u64) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.ejected_until.load(Ordering::Relaxed) <= now
    }

    /// Leaves it out for [`PASSIVE_EJECT`] (a connection to it failed).
    pub fn eject(&self) {
        self.ejected_until.store(
            now_ms() + PASSIVE_EJECT.as_millis() as u64,
            Ordering::Relaxed,
        );
    }
}

/// The targets of one resource, balanced round robin over the usable ones. Kept across
/// registry changes while the targets and health check stay the same, so health survives.
#[derive(Debug)]
pub struct Pool {
    /// Targets, in the resource's order.
    pub targets: Vec<TargetState>,
    next: AtomicUsize,
    /// The active check, if any.
    pub check: Option<HealthCheck>,
}

impl Pool {
    fn new(targets: &[Target], check: Option<HealthCheck>) -> Self {
        Self {
            targets: targets
                .iter()
                .map(|t| TargetState {
                    target: t.clone(),
                    authority: t.to_string(),
                    healthy: AtomicBool::new(true),
                    failures: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            check,
        }
    }

    /// The next usable target after round robin, skipping `avoid`; `None` if none is usable.
    pub fn pick(&self, avoid: Option<usize>) -> Option<(usize, &TargetState)> {
        self.pick_where(avoid, |_| true)
    }

    /// Like [`Pool::pick`], among targets that also pass `ok` (the agent's health report).
    pub fn pick_where(
        &self,
        avoid: Option<usize>,
        ok: impl Fn(&TargetState) -> bool,
    ) -> Option<(usize, &TargetState)> {
        let n = self.targets.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        (0..n)
            .map(|i| (start + i) % n)
            .filter(|i| Some(*i) != avoid)
            .map(|i| (i, &self.targets[i]))
            .find(|(_, t)| t.usable(now) && ok(t))
    }
}

/// A web route: a resource on a host, under a path prefix.
pub struct Route {
    /// The resource's name.
    pub resource: Name,
    /// Host (exact, or `*.suffix`).
    pub host: String,
    /// Path prefix (`/` for all).
    pub prefix: String,
    /// Compiled policies of the resource.
    pub policies: Vec<CompiledPolicy>,
    /// The resource's HTTP options.
    pub options: HttpOptions,
    /// Headers to set on requests, parsed.
    pub set_request: Vec<(HeaderName, HeaderValue)>,
    /// Headers to remove from requests.
    pub remove_request: Vec<HeaderName>,
    /// Headers to set on responses.
    pub set_response: Vec<(HeaderName, HeaderValue)>,
    /// Headers to remove from responses.
    pub remove_response: Vec<HeaderName>,
    /// `Host` to send upstream instead of the client's.
    pub host_header: Option<HeaderValue>,
    /// Upstream timeout for response headers.
    pub timeout: Duration,
    /// Body limit (0 = none).
    pub max_body: u64,
    /// The targets.
    pub pool: Arc<Pool>,
    /// Why the route cannot serve (a policy that does not compile); requests get 503.
    pub broken: Option<String>,
    /// Whether a policy reads ID token claims.
    pub needs_claims: bool,
    /// The site whose agent reaches the targets, if any.
    pub site: Option<Name>,
}

impl Route {
    /// Whether the (canonical) `path` is under this route's prefix.
    pub fn matches(&self, path: &str) -> bool {
        warren_proto::canonical::prefix_matches(path, &self.prefix)
    }

    /// The path and query to send upstream for the (canonical, routed here) `path_and_query`:
    /// with `prefix_rewrite`, the route's prefix at its front is replaced by the rewrite
    /// (`/wiki/a?b` under `/wiki` with `/` becomes `/a?b`; `/wiki` alone becomes `/`), one
    /// slash where they meet; otherwise as it came.
    pub fn upstream_path<'a>(&self, path_and_query: &'a str) -> std::borrow::Cow<'a, str> {
        use std::borrow::Cow;
        let Some(rewrite) = self.options.prefix_rewrite.as_deref() else {
            return Cow::Borrowed(path_and_query);
        };
        let (path, query) = match path_and_query.find('?') {
            Some(i) => path_and_query.split_at(i),
            None => (path_and_query, ""),
        };
        if !self.matches(path) {
            return Cow::Borrowed(path_and_query);
        }
        let rest = path.get(self.prefix.len()..).unwrap_or("");
        let mut out = String::with_capacity(rewrite.len() + rest.len() + query.len() + 1);
        out.push_str(rewrite);
        match (out.ends_with('/'), rest.strip_prefix('/')) {
            (true, Some(r)) => out.push_str(r),
            (false, None) if !rest.is_empty() => {
                out.push('/');
                out.push_str(rest);
            }
            _ => out.push_str(rest),
        }
        out.push_str(query);
        Cow::Owned(out)
    }

    /// Whether a signed-in user's session may be handed to this route's host for it: a
    /// public route or one without single sign-on never gets one.
    pub fn takes_sso(&self) -> bool {
        !self.options.public && self.options.access.sso
    }
}

/// A certificate the proxy serves, with the names it covers.
pub struct ServedCert {
    /// What rustls serves.
    pub key: Arc<CertifiedKey>,
    /// DNS names (exact or `*.suffix`), lower case.
    pub names: Vec<String>,
}

impl ServedCert {
    /// Whether the certificate is valid for `host` (a `*.` name covers one label).
    pub fn covers(&self, host: &str) -> bool {
        self.names.iter().any(|n| match n.strip_prefix("*.") {
            Some(suffix) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
            None => n == host,
        })
    }
}

/// The part of the state made from configuration entities.
#[derive(Default)]
pub struct Config {
    /// Routes by host key, longest prefix first.
    pub routes: HashMap<String, Vec<Arc<Route>>>,
    /// Certificates by DNS name (exact or `*.suffix`).
    pub certs: HashMap<String, Arc<ServedCert>>,
    /// Roles each user is in.
    pub roles_of: HashMap<Name, Vec<String>>,
    /// Problems found while building, for the log.
    pub problems: Vec<String>,
}

impl Config {
    /// The routes for `host`: exact name first, then the closest wildcard.
    pub fn routes_for(&self, host: &str) -> Option<&[Arc<Route>]> {
        if let Some(r) = self.routes.get(host) {
            return Some(r);
        }
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(r) = self.routes.get(&format!("*.{parent}")) {
                return Some(r);
            }
            rest = parent;
        }
        None
    }

    /// The route for `host` and `path`.
    pub fn route(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        self.routes_for(host)?.iter().find(|r| r.matches(path))
    }

    /// The certificate for a TLS server name.
    pub fn cert_for(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.served_cert(name).map(|c| c.key.clone())
    }

    /// The certificate served for a TLS server name, with the names it covers.
    pub fn served_cert(&self, name: &str) -> Option<&ServedCert> {
        if let Some(c) = self.certs.get(name) {
            return Some(c);
        }
        let (_, parent) = name.split_once('.')?;
        self.certs.get(&format!("*.{parent}")).map(|c| &**c)
    }
}

/// Everything a request reads, published as one unit.
pub struct ProxyState {
    /// The registry this was built from.
    pub registry: Arc<Registry>,
    /// Routes, certificates, roles.
    pub config: Arc<Config>,
    /// Seals cookies; `None` until the cluster has proxy keys.
    pub sealer: Option<Arc<Sealer>>,
    /// Signs identity assertions; `None` until the cluster has proxy keys.
    pub signer: Option<Arc<Signer>>,
    /// The cluster's title, for the pages the proxy serves itself.
    pub title: Option<Arc<str>>,
}

impl ProxyState {
    /// An empty state (before the first registry arrives).
    pub fn empty() -> Self {
        Self {
            registry: Arc::new(Registry::default()),
            config: Arc::new(Config::default()),
            sealer: None,
            signer: None,
            title: None,
        }
    }
}

/// Whether the configuration entities differ between two registries.
pub fn config_changed(a: &Registry, b: &Registry) -> bool {
    !(a.resources().ptr_eq(b.resources())
        && a.policies().ptr_eq(b.policies())
        && a.certificates().ptr_eq(b.certificates())
        && a.roles().ptr_eq(b.roles()))
}

/// Builds the configuration part, reusing `pools` whose targets did not change.
pub fn build_config(reg: &Registry, pools: &mut HashMap<Name, Arc<Pool>>) -> Config {
    let mut config = Config::default();
    let provider = rustls::crypto::ring::default_provider();
    for cert in reg.certificates().values() {
        let built = (|| {
            let info = cert.info().map_err(|e| e.to_string())?;
            let chain = cert.chain().map_err(|e| e.to_string())?;
            let key = cert.key().map_err(|e| e.to_string())?;
            let ck = CertifiedKey::from_der(chain, key, &provider).map_err(|e| e.to_string())?;
            Ok::<_, String>((info, Arc::new(ck)))
        })();
        match built {
            Ok((info, key)) => {
                let served = Arc::new(ServedCert {
                    key,
                    names: info
                        .domains
                        .iter()
                        .map(|d| d.to_ascii_lowercase())
                        .collect(),
                });
                for d in &served.names {
                    config.certs.insert(d.clone(), served.clone());
                }
            }
            Err(e) => config
                .problems
                .push(format!("certificate {:?}: {e}", cert.name.as_str())),
        }
    }
    for role in reg.roles().values() {
        for m in &role.members {
            config
                .roles_of
                .entry(m.clone())
                .or_default()
                .push(role.name.to_string());
        }
    }
    let mut kept = HashMap::new();
    for res in reg.resources().values() {
        let RouteSpec::Http {
            domain,
            path_prefix,
        } = &res.route
        else {
            continue;
        };
        // Behind a site, the agent checks the targets and reports; the node does not.
        let check = if res.site.is_some() {
            None
        } else {
            res.http.health_check.clone()
        };
        let pool = match pools.get(&res.name) {
            Some(p) if same_targets(p, res) && p.check == check => p.clone(),
            _ => Arc::new(Pool::new(&res.targets, check)),
        };
        kept.insert(res.name.clone(), pool.clone());
        let route = build_route(reg, res, domain, path_prefix.as_deref(), pool);
        if let Some(why) = &route.broken {
            config
                .problems
                .push(format!("resource {:?}: {why}", res.name.as_str()));
        }
        config
            .routes
            .entry(domain.clone())
            .or_default()
            .push(Arc::new(route));
    }
    for routes in config.routes.values_mut() {
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    }
    *pools = kept;
    config
}

fn same_targets(pool: &Pool, res: &Resource) -> bool {
    pool.targets.len() == res.targets.len()
        && pool
            .targets
            .iter()
            .zip(&res.targets)
            .all(|(a, b)| a.target == *b)
}

fn build_route(
    reg: &Registry,
    res: &Resource,
    domain: &str,
    prefix: Option<&str>,
    pool: Arc<Pool>,
) -> Route {
    let mut broken = None;
    let mut policies = Vec::new();
    for name in &res.policies {
        match reg.policies().get(name) {
            Some(p) => match CompiledPolicy::compile(p) {
                Ok(c) => policies.push(c),
                Err(e) => {
                    broken = Some(format!("policy {:?} does not compile: {e}", name.as_str()))
                }
            },
            None => broken = Some(format!("policy {:?} is missing", name.as_str())),
        }
    }
    let parse_set = |m: &std::collections::BTreeMap<String, String>| {
        m.iter()
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::from_bytes(k.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect::<Vec<_>>()
    };
    let parse_names = |v: &[String]| {
        v.iter()
            .filter_map(|k| HeaderName::from_bytes(k.as_bytes()).ok())
            .collect::<Vec<_>>()
    };
    let o = &res.http;
    let needs_claims = policies.iter().any(CompiledPolicy::uses_claims);
    Route {
        site: res.site.clone(),
        needs_claims,
        resource: res.name.clone(),
        host: domain.to_owned(),
        prefix: prefix.unwrap_or("/").to_owned(),
        policies,
        options: (**o).clone(),
        set_request: parse_set(&o.set_request_headers),
        remove_request: parse_names(&o.remove_request_headers),
        set_response: parse_set(&o.set_response_headers),
        remove_response: parse_names(&o.remove_response_headers),
        host_header: o
            .host_header
            .as_deref()
            .and_then(|h| HeaderValue::from_str(h).ok()),
        timeout: Duration::from_secs(o.timeout_s.unwrap_or(HttpOptions::DEFAULT_TIMEOUT_S).into()),
        max_body: o.max_body_bytes.unwrap_or(HttpOptions::DEFAULT_MAX_BODY),
        pool,
        broken,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, rewrite: Option<&str>) -> Route {
        let res: Resource = serde_json::from_value(serde_json::json!({
            "name": "wiki",
            "route": {"http": {"domain": "app.test", "path_prefix": prefix}},
            "targets": ["127.0.0.1:9"],
            "http": {"prefix_rewrite": rewrite},
        }))
        .expect("resource");
        let pool = Arc::new(Pool::new(&res.targets, None));
        build_route(&Registry::default(), &res, "app.test", Some(prefix), pool)
    }

    #[test]
    fn a_prefix_rewrite_replaces_the_routed_prefix_and_keeps_the_rest() {
        let cases = [
            // (prefix, rewrite, request, upstream)
            ("/wiki", None, "/wiki/a?b=1", "/wiki/a?b=1"),
            ("/wiki", Some("/"), "/wiki", "/"),
            ("/wiki", Some("/"), "/wiki/", "/"),
            ("/wiki", Some("/"), "/wiki/a/b?c=%2F", "/a/b?c=%2F"),
            ("/wiki", Some("/"), "/wiki?x", "/?x"),
            ("/wiki", Some("/app"), "/wiki", "/app"),
            ("/wiki", Some("/app"), "/wiki/a", "/app/a"),
            ("/wiki", Some("/app/"), "/wiki/a", "/app/a"),
            ("/wiki/", Some("/"), "/wiki/a", "/a"),
            ("/wiki/", Some("/app"), "/wiki/a", "/app/a"),
        ];
        for (prefix, rewrite, request, upstream) in cases {
            let r = route(prefix, rewrite);
            assert!(r.matches(request.split('?').next().unwrap()), "{request}");
            assert_eq!(
                r.upstream_path(request),
                upstream,
                "{prefix} -> {rewrite:?}: {request}"
            );
        }
    }
}
