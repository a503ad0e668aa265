//! The access decision for one request to a resource host, as a pure function.
//!
//! [`decide`] reads the ready state (registry snapshot, compiled routes, cookie sealer), the
//! node's serving state and the canonical facts of the request, and says what to do; it
//! does no I/O and reads no clock (`now` is passed in). The proxy's shell (`Proxy::route`)
//! performs the [`Verdict`]: forwards, redirects to a sign-in or answers with a page, and
//! fills the access log from it. An upgraded connection keeps a [`Grant`] and asks the same
//! function again on every change of the state (`Proxy::recheck`), so the first request and
//! every re-check of the connection cannot disagree.
//!
//! ```text
//!  host + path ──► route? ── none ───────────────────────────────► NoRoute (404)
//!                    │ ── broken ────────────────────────────────► Misconfigured (503)
//!                    │ ── public / bypass rule ──────────────────► Forward (no identity)
//!  serving? ─────────┤ ── fail closed ───────────────────────────► Deny Paused (503)
//!  cookie / session ─┤ ── none, invalid, ended, other host ──────► SignIn (302 / 401)
//!                    │ ── session for this resource only ────────► Forward (that session)
//!                    │ ── single sign-on: user disabled ─────────► Deny (403)
//!  policies, now ────┴── single sign-on: policies say no / yes ──► Deny (403) / Forward
//! ```

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use http::StatusCode;
use warren_consensus::registry::Registry;
use warren_proto::access::{decide as decide_policies, Decision, Facts, Identity};
use warren_proto::registry::User;
use warren_proto::session::{Session, SessionId, Via};
use warren_proto::Name;

use super::seal::Purpose;
use super::state::{Config, ProxyState, Route};
use super::SessionCookie;

/// The canonical facts of a request that the decision reads.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    /// The routed host: lower case, without port.
    pub host: &'a str,
    /// The canonical path (no query).
    pub path: &'a str,
    /// The method.
    pub method: &'a http::Method,
    /// The client's address (after trusted proxies).
    pub source: IpAddr,
    /// What the request shows to be someone, if anything.
    pub credential: Option<Credential<'a>>,
}

/// What a request shows to be someone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// The session cookie's value as the browser sent it (sealed, not yet opened).
    Cookie(&'a str),
    /// A session already opened from a cookie: the re-check of an upgraded connection.
    Session(SessionId),
}

/// What to do with a request.
#[derive(Debug, PartialEq)]
pub enum Verdict<'s> {
    /// No resource is configured for the host and path: 404.
    NoRoute,
    /// The resource cannot serve (a policy is missing or does not compile): 503.
    Misconfigured {
        /// The route.
        route: RouteRef<'s>,
        /// What is wrong with it, for the node's log.
        why: &'s str,
    },
    /// Send the request to the route's targets.
    Forward(Pass<'s>),
    /// The request needs a sign-in first.
    SignIn {
        /// The route.
        route: RouteRef<'s>,
        /// Where the client is sent to sign in.
        how: SignIn,
        /// Why the request has no usable session.
        why: NoSession,
    },
    /// Refused.
    Deny {
        /// The route.
        route: RouteRef<'s>,
        /// Why.
        why: Denied<'s>,
    },
}

impl<'s> Verdict<'s> {
    /// The route the request was for, if one was found.
    pub fn route(&self) -> Option<&RouteRef<'s>> {
        match self {
            Verdict::NoRoute => None,
            Verdict::Misconfigured { route, .. }
            | Verdict::SignIn { route, .. }
            | Verdict::Deny { route, .. } => Some(route),
            Verdict::Forward(pass) => Some(&pass.route),
        }
    }
}

/// A request let through: where it goes, and on what grounds (who it is from).
#[derive(Debug, PartialEq)]
pub struct Pass<'s> {
    /// The route whose targets get it.
    pub route: RouteRef<'s>,
    /// Why it may pass.
    pub grounds: Grounds<'s>,
}

impl Pass<'_> {
    /// The session whose identity goes upstream; `None` for a request that needed none.
    pub fn principal(&self) -> Option<&Principal<'_>> {
        match &self.grounds {
            Grounds::Public | Grounds::Bypass => None,
            Grounds::ResourceSession(p) | Grounds::Policy { principal: p, .. } => Some(p),
        }
    }

    /// The grounds an upgraded connection keeps.
    pub fn grant_kind(&self) -> GrantKind {
        match &self.grounds {
            Grounds::Public => GrantKind::Public,
            Grounds::Bypass => GrantKind::Bypass,
            Grounds::ResourceSession(p) | Grounds::Policy { principal: p, .. } => {
                GrantKind::Session(p.session.id)
            }
        }
    }
}

/// Why a request may pass.
#[derive(Debug, PartialEq)]
pub enum Grounds<'s> {
    /// The resource is public.
    Public,
    /// A bypass rule of the resource matched.
    Bypass,
    /// A session opened for this resource only (PIN, passcode, e-mail code, share link).
    ResourceSession(Principal<'s>),
    /// A signed-in user, allowed by a policy.
    Policy {
        /// The user's session.
        principal: Principal<'s>,
        /// The allowing policy's name.
        policy: &'s str,
    },
}

impl std::fmt::Display for Grounds<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Grounds::Public => f.write_str("public resource"),
            Grounds::Bypass => f.write_str("bypass rule"),
            Grounds::ResourceSession(p) => {
                write!(f, "{:?} session for this resource", p.session.via)
            }
            // The words of `Decision::reason`, without a string in between.
            Grounds::Policy { policy, .. } => write!(f, "allowed by policy {policy}"),
        }
    }
}

/// Where a request without a usable session is sent to sign in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignIn {
    /// A redirect to single sign-on on the auth host, which comes back to the request.
    Sso,
    /// A redirect to the resource's own sign-in page (`/.warren/auth`): it has a PIN, a
    /// passcode or e-mailed codes.
    ResourcePage,
    /// 401: not a navigation (an API call, a form post) that a browser could follow to a
    /// sign-in page and back.
    Unauthorized,
}

/// Why a request has no usable session (the access log's reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSession {
    /// The cluster has no cookie key yet.
    KeysNotReady,
    /// No session cookie.
    Missing,
    /// The cookie does not open with the cluster's key.
    Invalid,
    /// The cookie was issued for another host.
    OtherHost,
    /// The session is not in the registry (signed out, revoked, or forgotten).
    Ended,
    /// The session is past its end.
    Expired,
    /// The session's user no longer exists.
    UserDeleted,
    /// The session is good for another resource only, or is single sign-on on a resource
    /// that does not take it.
    OtherResource,
}

impl NoSession {
    /// The reason, as the access log and a closed connection's log line say it.
    pub fn as_str(self) -> &'static str {
        match self {
            NoSession::KeysNotReady => "cluster keys not ready",
            NoSession::Missing => "no session",
            NoSession::Invalid => "invalid session cookie",
            NoSession::OtherHost => "session cookie for another host",
            NoSession::Ended => "session ended",
            NoSession::Expired => "session expired",
            NoSession::UserDeleted => "user deleted",
            NoSession::OtherResource => "session not good for this resource",
        }
    }
}

impl std::fmt::Display for NoSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request to a resource is refused outright.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied<'s> {
    /// This node may not grant access now (it lost contact with the cluster); the reason.
    Paused(String),
    /// The signed-in user is disabled.
    UserDisabled {
        /// The user's name.
        user: &'s str,
    },
    /// The resource's policies do not let the signed-in user in.
    Policy {
        /// The user's name.
        user: &'s str,
        /// What the policies said (never [`Decision::Allow`]).
        decision: Decision<'s>,
    },
}

impl Denied<'_> {
    /// The status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Denied::Paused(_) => StatusCode::SERVICE_UNAVAILABLE,
            Denied::UserDisabled { .. } | Denied::Policy { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// The title of the page.
    pub fn title(&self) -> &'static str {
        match self {
            Denied::Paused(_) => "Access paused",
            Denied::UserDisabled { .. } | Denied::Policy { .. } => "Access denied",
        }
    }

    /// The text of the page.
    pub fn detail(&self) -> Cow<'static, str> {
        match self {
            Denied::Paused(_) => Cow::Borrowed(
                "This node has lost contact with the rest of the cluster, so it cannot be sure your access is still valid. Try again in a moment.",
            ),
            Denied::UserDisabled { .. } => Cow::Borrowed("Your account is disabled."),
            Denied::Policy { user, decision } => Cow::Owned(format!(
                "{user} may not use this resource ({}).",
                decision.reason()
            )),
        }
    }

    /// The reason, as the access log says it.
    pub fn reason(&self) -> String {
        match self {
            Denied::Paused(why) => format!("fail closed: {why}"),
            Denied::UserDisabled { .. } => "user disabled".into(),
            Denied::Policy { decision, .. } => decision.reason(),
        }
    }

    /// The signed-in user refused, if any.
    pub fn user(&self) -> Option<&str> {
        match self {
            Denied::Paused(_) => None,
            Denied::UserDisabled { user } | Denied::Policy { user, .. } => Some(user),
        }
    }
}

/// A route of the state a verdict was made from. Two are equal when they are the same
/// route of the same state (not merely alike), which is what tests of a verdict mean.
#[derive(Clone, Copy)]
pub struct RouteRef<'s>(pub &'s Arc<Route>);

impl std::ops::Deref for RouteRef<'_> {
    type Target = Route;

    fn deref(&self) -> &Route {
        self.0
    }
}

impl PartialEq for RouteRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(self.0, other.0)
    }
}

impl std::fmt::Debug for RouteRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Route({}{})", self.0.host, self.0.prefix)
    }
}

/// Who a request comes from, once its session checked out. Borrows from the registry
/// snapshot the request holds: nothing is copied per request unless the user is in roles.
#[derive(Debug, PartialEq)]
pub struct Principal<'r> {
    /// The session.
    pub session: &'r Session,
    /// The user (single sign-on sessions only).
    pub user: Option<&'r User>,
    /// Provider groups plus the roles the user is in.
    pub groups: Cow<'r, [String]>,
}

impl Principal<'_> {
    /// The name to show and send upstream.
    pub fn name(&self) -> &str {
        self.user
            .as_ref()
            .map_or(self.session.user.as_str(), |u| u.name.as_str())
    }
}

/// What let a request through, kept by a connection that outlives the request (an
/// upgrade) so that it can be checked again whenever the state changes.
pub(crate) struct Grant {
    /// The resource it was for.
    pub resource: Name,
    /// The routed host.
    pub host: String,
    /// The canonical path.
    pub path: String,
    /// The method.
    pub method: http::Method,
    /// The client's address.
    pub source: IpAddr,
    /// On what grounds.
    pub how: GrantKind,
}

/// The grounds of a [`Grant`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GrantKind {
    /// The resource is public.
    Public,
    /// A bypass rule matched.
    Bypass,
    /// A session (single sign-on, or one for this resource only).
    Session(SessionId),
}

impl Grant {
    /// What `pass` let through, for the request to `host` and `path`.
    pub fn new(
        pass: &Pass<'_>,
        host: &str,
        path: &str,
        method: &http::Method,
        source: IpAddr,
    ) -> Self {
        Self {
            resource: pass.route.resource.clone(),
            host: host.to_owned(),
            path: path.to_owned(),
            method: method.clone(),
            source,
            how: pass.grant_kind(),
        }
    }

    /// The request as it is asked again: the same facts, and the session the upstream was
    /// told about (none for a public or bypass grant, so it never gains an identity).
    pub fn asked(&self) -> Asked<'_> {
        Asked {
            host: &self.host,
            path: &self.path,
            method: &self.method,
            source: self.source,
            credential: match self.how {
                GrantKind::Session(sid) => Some(Credential::Session(sid)),
                GrantKind::Public | GrantKind::Bypass => None,
            },
        }
    }

    /// Whether the connection may stay open, given the [`decide`] verdict for
    /// [`Grant::asked`] now: while the same request would still be forwarded to the same
    /// resource, on a session if it was opened on one. The error says why not, for the log.
    pub fn holds(&self, now: &Verdict<'_>) -> Result<(), String> {
        let same = now
            .route()
            .is_some_and(|route| route.resource == self.resource);
        match now {
            _ if !same => Err("the resource changed".into()),
            Verdict::Forward(pass) => match (self.how, pass.grant_kind()) {
                (GrantKind::Session(_), GrantKind::Session(_))
                | (GrantKind::Public | GrantKind::Bypass, GrantKind::Public | GrantKind::Bypass) => {
                    Ok(())
                }
                // The app was told who is on this connection; a resource that turned
                // public no longer checks that session, so the connection would outlive
                // its revocation.
                _ => Err("the resource takes no session now".into()),
            },
            Verdict::NoRoute | Verdict::Misconfigured { .. } => Err("the resource changed".into()),
            Verdict::SignIn { why, .. } => match self.how {
                GrantKind::Session(_) => Err(why.to_string()),
                GrantKind::Public | GrantKind::Bypass => {
                    Err("the resource needs a sign-in now".into())
                }
            },
            Verdict::Deny { why, .. } => Err(why.reason()),
        }
    }
}

/// The decision for `asked` on `state`, with `serving` the node's serving state (`Err`
/// with the reason when it may not grant access) and `now` in seconds since the Unix
/// epoch. The order matters and is the one users see: a misconfigured resource serves
/// nobody; a public resource or a bypass rule needs nobody, even while this node fails
/// closed; everything else needs a session this node can still vouch for.
pub fn decide<'s>(
    state: &'s ProxyState,
    serving: Result<(), &str>,
    asked: &Asked<'_>,
    now: u64,
) -> Verdict<'s> {
    let Some(found) = state.config.route(asked.host, asked.path) else {
        return Verdict::NoRoute;
    };
    let route = RouteRef(found);
    if let Some(why) = &found.broken {
        return Verdict::Misconfigured { route, why };
    }
    if route.options.public {
        return forward(route, Grounds::Public);
    }
    let access = &route.options.access;
    if access
        .bypass
        .iter()
        .any(|b| b.matches(asked.path, asked.source))
    {
        return forward(route, Grounds::Bypass);
    }
    if let Err(why) = serving {
        return Verdict::Deny {
            route,
            why: Denied::Paused(why.to_owned()),
        };
    }
    let sign_in = |why| Verdict::SignIn {
        route,
        how: sign_in_kind(&route, asked.method),
        why,
    };
    let principal = match principal(state, asked.host, asked.credential, now) {
        Ok(p) => p,
        Err(why) => return sign_in(why),
    };
    let user = match principal.user {
        Some(user) if principal.session.via == Via::Sso && access.sso => user,
        _ if principal.session.resource.as_ref() == Some(&route.resource) => {
            return forward(route, Grounds::ResourceSession(principal));
        }
        _ => return sign_in(NoSession::OtherResource),
    };
    if user.disabled {
        return Verdict::Deny {
            route,
            why: Denied::UserDisabled {
                user: user.name.as_str(),
            },
        };
    }
    match policy_decision(found, &principal, user, asked, now) {
        Decision::Allow { policy } => forward(route, Grounds::Policy { principal, policy }),
        decision => Verdict::Deny {
            route,
            why: Denied::Policy {
                user: user.name.as_str(),
                decision,
            },
        },
    }
}

fn forward<'s>(route: RouteRef<'s>, grounds: Grounds<'s>) -> Verdict<'s> {
    Verdict::Forward(Pass { route, grounds })
}

/// The valid session `id` at `now`, with its user and groups.
pub(crate) fn lookup_session<'r>(
    reg: &'r Registry,
    config: &Config,
    id: SessionId,
    now: u64,
) -> Result<Principal<'r>, NoSession> {
    let session = reg.sessions().get(&id).ok_or(NoSession::Ended)?;
    if session.expires_at <= now {
        return Err(NoSession::Expired);
    }
    if session.via != Via::Sso {
        return Ok(Principal {
            session,
            user: None,
            groups: Cow::Borrowed(&[]),
        });
    }
    let user = reg
        .users()
        .get(&session.user)
        .ok_or(NoSession::UserDeleted)?;
    let groups = match config.roles_of.get(&user.name) {
        Some(roles) => {
            let mut g = session.groups.clone();
            g.extend(roles.iter().cloned());
            Cow::Owned(g)
        }
        None => Cow::Borrowed(session.groups.as_slice()),
    };
    Ok(Principal {
        session,
        user: Some(user),
        groups,
    })
}

/// The session behind `credential`, if it is valid for `host` at `now`.
fn principal<'s>(
    state: &'s ProxyState,
    host: &str,
    credential: Option<Credential<'_>>,
    now: u64,
) -> Result<Principal<'s>, NoSession> {
    let sid = match credential {
        Some(Credential::Session(sid)) => sid,
        cookie => {
            let sealer = state.sealer.as_ref().ok_or(NoSession::KeysNotReady)?;
            let Some(Credential::Cookie(token)) = cookie else {
                return Err(NoSession::Missing);
            };
            let c: SessionCookie = sealer
                .open(Purpose::Session, token)
                .ok_or(NoSession::Invalid)?;
            // Cookies are per host; one replayed on a sibling host proves nothing there.
            if c.host != host {
                return Err(NoSession::OtherHost);
            }
            SessionId(c.sid)
        }
    };
    lookup_session(&state.registry, &state.config, sid, now)
}

/// Where a request to `route` with `method` signs in.
fn sign_in_kind(route: &Route, method: &http::Method) -> SignIn {
    // Only a navigation can follow a redirect to a sign-in page and come back to itself.
    let navigational = method == http::Method::GET || method == http::Method::HEAD;
    if !navigational {
        SignIn::Unauthorized
    } else if route.options.access.has_other_methods() {
        SignIn::ResourcePage
    } else {
        SignIn::Sso
    }
}

/// What `route`'s policies say about `user`'s request at `now`.
fn policy_decision<'s>(
    route: &'s Route,
    principal: &Principal<'_>,
    user: &User,
    asked: &Asked<'_>,
    now: u64,
) -> Decision<'s> {
    // Claims are parsed only for routes whose policies look at them.
    let claims = if route.needs_claims {
        serde_json::from_str(&principal.session.claims).unwrap_or(serde_json::Value::Null)
    } else {
        serde_json::Value::Null
    };
    let facts = Facts {
        identity: Some(Identity {
            user: user.name.as_str(),
            // An unverified address matches no `email`/`email_domain` criterion.
            email: principal.session.verified_email().unwrap_or_default(),
            groups: &principal.groups,
            claims: &claims,
        }),
        source: asked.source,
        method: Some(asked.method.as_str()),
        path: Some(asked.path),
        device: None,
        now: now as i64,
    };
    decide_policies(&route.policies, &facts)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    use http::Method;
    use serde_json::json;
    use warren_consensus::registry::{AnyEntity, Command};
    use warren_consensus::types::{Actor, Request, RequestId};
    use warren_proto::registry::{Kind, Resource, Role};

    use super::*;
    use crate::proxy::seal::Sealer;
    use crate::proxy::state::build_config;

    /// The registry's clock for every fixture command.
    const T: u64 = 1_700_000_000;
    /// When the decisions are asked, unless a test says otherwise.
    const NOW: u64 = T + 60;
    /// How long the fixtures' sessions last.
    const TTL: u64 = 3600;
    /// Alice, in the `staff` role: `app` lets her in.
    const ALICE: SessionId = SessionId(1);
    /// Bob, in `staff` too, but the `blocked` policy denies him by name.
    const BOB: SessionId = SessionId(2);
    /// Carol, in no role: no policy of `app` allows her.
    const CAROL: SessionId = SessionId(3);
    /// A PIN session opened for `pinned`.
    const PIN: SessionId = SessionId(10);
    /// The client's address in most requests (outside every bypass network).
    const OFFICE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    /// Inside `docs`'s bypass network.
    const LAN: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));

    static GET: Method = Method::GET;
    static HEAD: Method = Method::HEAD;
    static POST: Method = Method::POST;

    /// A registry written through its public commands, as the cluster would, and the
    /// cookie key of its proxy.
    struct World {
        reg: Registry,
        index: u64,
        sealer: Arc<Sealer>,
    }

    impl World {
        /// Users alice, bob and carol, signed in; the role `staff` (alice, bob); and the
        /// resources `app` (app.test, policies `staff` and `blocked`), `admin` (app.test
        /// under /admin, no policy), `open` (public), `docs` (bypass for /health and for
        /// 10.0.0.0/8), `pinned` (a PIN, with a PIN session) and `nosso` (e-mail codes
        /// instead of single sign-on).
        fn new() -> Self {
            let mut w = Self {
                reg: Registry::default(),
                index: 0,
                sealer: Arc::new(Sealer::from_b64(&Sealer::generate_key()).unwrap()),
            };
            w.create(json!({"policy": {"name": "staff", "allow": {"group": "staff"}}}));
            w.create(json!({"policy": {"name": "blocked", "deny": {"user": "bob"}}}));
            for user in ["alice", "bob", "carol"] {
                w.create(json!({"user": {"name": user, "email": format!("{user}@example.test")}}));
            }
            w.create(json!({"role": {"name": "staff", "members": ["alice", "bob"]}}));
            w.create(resource(
                "app",
                "app.test",
                json!({}),
                &["staff", "blocked"],
            ));
            w.create(json!({"resource": {"name": "admin",
                "route": {"http": {"domain": "app.test", "path_prefix": "/admin"}},
                "targets": ["127.0.0.1:9"]}}));
            w.create(resource("open", "open.test", json!({"public": true}), &[]));
            w.create(resource(
                "docs",
                "docs.test",
                json!({"access": {"bypass": [{"path_prefix": "/health"},
                                             {"source_cidr": "10.0.0.0/8"}]}}),
                &["staff"],
            ));
            w.create(resource(
                "pinned",
                "pin.test",
                json!({"access": {"pin_hash": "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"}}),
                &["staff"],
            ));
            w.create(resource(
                "nosso",
                "nosso.test",
                json!({"access": {"sso": false, "email_codes": ["@example.test"]}}),
                &["staff"],
            ));
            for (sid, user) in [(ALICE, "alice"), (BOB, "bob"), (CAROL, "carol")] {
                w.run(Command::SignIn {
                    session: session(sid, user, Via::Sso, None),
                    display_name: None,
                    subject: format!("{user}-sub"),
                    email_verified: true,
                });
            }
            w.run(Command::CreateSession(session(
                PIN,
                "anonymous",
                Via::Pin,
                Some("pinned"),
            )));
            w
        }

        /// Applies `command` as the cluster itself; it must succeed.
        fn run(&mut self, command: Command) {
            self.index += 1;
            let req = Request {
                id: RequestId(u128::from(self.index)),
                at: T,
                actor: Actor::System,
                command,
            };
            let reply = self.reg.apply_request(self.index, &req);
            assert!(reply.is_ok(), "{:?}: {reply:?}", req.command);
        }

        /// Creates the entity `{"<kind>": {...}}`.
        fn create(&mut self, entity: serde_json::Value) {
            self.run(Command::Create(entity_of(entity)));
        }

        /// Replaces the entity `{"<kind>": {...}}`.
        fn update(&mut self, entity: serde_json::Value) {
            self.run(Command::Update(entity_of(entity)));
        }

        /// The ready state the proxy would build from the registry now.
        fn state(&self) -> ProxyState {
            self.state_with(|_| {})
        }

        /// [`World::state`], with the built configuration changed by `edit` first.
        fn state_with(&self, edit: impl FnOnce(&mut Config)) -> ProxyState {
            let mut config = build_config(&self.reg, &mut HashMap::new());
            edit(&mut config);
            ProxyState {
                registry: Arc::new(self.reg.clone()),
                config: Arc::new(config),
                sealer: Some(self.sealer.clone()),
                signer: None,
                title: None,
            }
        }

        /// A session cookie for `sid` on `host`, sealed with the cluster's key.
        fn cookie(&self, sid: SessionId, host: &str) -> String {
            let c = SessionCookie {
                sid: sid.0,
                host: host.to_owned(),
            };
            self.sealer.seal(Purpose::Session, &c)
        }
    }

    fn entity_of(v: serde_json::Value) -> AnyEntity {
        let (kind, body) = v.as_object().unwrap().iter().next().unwrap();
        let body = body.clone();
        match kind.as_str() {
            "user" => AnyEntity::User(serde_json::from_value(body).unwrap()),
            "role" => AnyEntity::Role(serde_json::from_value::<Role>(body).unwrap()),
            "policy" => AnyEntity::Policy(serde_json::from_value(body).unwrap()),
            "resource" => AnyEntity::Resource(serde_json::from_value::<Resource>(body).unwrap()),
            other => panic!("no fixture kind {other}"),
        }
    }

    fn resource(
        name: &str,
        host: &str,
        http: serde_json::Value,
        policies: &[&str],
    ) -> serde_json::Value {
        json!({"resource": {"name": name, "route": {"http": {"domain": host}},
                            "targets": ["127.0.0.1:9"], "policies": policies, "http": http}})
    }

    fn session(sid: SessionId, user: &str, via: Via, resource: Option<&str>) -> Session {
        Session {
            id: sid,
            user: Name::new(user).unwrap(),
            idp: Name::new(if via == Via::Sso { "test" } else { "none" }).unwrap(),
            email: if via == Via::Sso {
                format!("{user}@example.test")
            } else {
                String::new()
            },
            email_verified: false,
            groups: Vec::new(),
            created_at: T,
            expires_at: T + TTL,
            refresh_token: None,
            token_expires_at: None,
            id_token: None,
            via,
            resource: resource.map(|r| Name::new(r).unwrap()),
            claims: String::new(),
        }
    }

    /// A request from the office, showing `cookie` if any.
    fn ask<'a>(
        method: &'a Method,
        host: &'a str,
        path: &'a str,
        cookie: Option<&'a str>,
    ) -> Asked<'a> {
        Asked {
            host,
            path,
            method,
            source: OFFICE,
            credential: cookie.map(Credential::Cookie),
        }
    }

    /// The route of `state` for `host` and `path`.
    fn route<'s>(state: &'s ProxyState, host: &str, path: &str) -> RouteRef<'s> {
        RouteRef(state.config.route(host, path).unwrap())
    }

    /// The expected principal of single sign-on session `sid`, with `groups`.
    fn sso<'s>(state: &'s ProxyState, sid: SessionId, groups: &[&str]) -> Principal<'s> {
        let session = &state.registry.sessions()[&sid];
        Principal {
            session,
            user: Some(&state.registry.users()[&session.user]),
            groups: Cow::Owned(groups.iter().map(|g| g.to_string()).collect()),
        }
    }

    /// The expected principal of a session for one resource.
    fn bound(state: &ProxyState, sid: SessionId) -> Principal<'_> {
        Principal {
            session: &state.registry.sessions()[&sid],
            user: None,
            groups: Cow::Borrowed(&[]),
        }
    }

    fn sign_in<'s>(route: RouteRef<'s>, how: SignIn, why: NoSession) -> Verdict<'s> {
        Verdict::SignIn { route, how, why }
    }

    #[test]
    fn an_unknown_host_or_path_has_no_route() {
        let w = World::new();
        let state = w.state();
        let alice = w.cookie(ALICE, "app.test");
        assert_eq!(
            decide(
                &state,
                Ok(()),
                &ask(&GET, "nowhere.test", "/", Some(&alice)),
                NOW
            ),
            Verdict::NoRoute
        );
        // Not even when this node fails closed: there is nothing to pause.
        assert_eq!(
            decide(
                &state,
                Err("cut off"),
                &ask(&GET, "nowhere.test", "/", None),
                NOW
            ),
            Verdict::NoRoute
        );
    }

    #[test]
    fn a_misconfigured_resource_serves_nobody_not_even_when_public() {
        let w = World::new();
        let state = w.state_with(|config| {
            for r in config.routes.values_mut().flatten() {
                if r.resource.as_str() == "open" || r.resource.as_str() == "app" {
                    Arc::get_mut(r).unwrap().broken = Some("policy \"x\" is missing".into());
                }
            }
        });
        let alice = w.cookie(ALICE, "app.test");
        for (host, cookie) in [("open.test", None), ("app.test", Some(alice.as_str()))] {
            assert_eq!(
                decide(&state, Ok(()), &ask(&GET, host, "/", cookie), NOW),
                Verdict::Misconfigured {
                    route: route(&state, host, "/"),
                    why: "policy \"x\" is missing",
                }
            );
        }
    }

    #[test]
    fn a_public_resource_needs_no_session_and_sends_no_identity() {
        let w = World::new();
        let state = w.state();
        let alice = w.cookie(ALICE, "open.test");
        let public = Verdict::Forward(Pass {
            route: route(&state, "open.test", "/"),
            grounds: Grounds::Public,
        });
        for method in [&GET, &POST] {
            for cookie in [None, Some(alice.as_str()), Some("forged")] {
                let asked = ask(method, "open.test", "/any", cookie);
                assert_eq!(decide(&state, Ok(()), &asked, NOW), public);
                // Granting needs no leader contact when nobody's access is checked.
                assert_eq!(decide(&state, Err("cut off"), &asked, NOW), public);
            }
        }
    }

    #[test]
    fn a_bypass_rule_lets_its_path_or_its_network_through_and_nothing_else() {
        let w = World::new();
        let state = w.state();
        let docs = route(&state, "docs.test", "/");
        let bypass = Verdict::Forward(Pass {
            route: docs,
            grounds: Grounds::Bypass,
        });
        for path in ["/health", "/health/deep"] {
            let asked = ask(&GET, "docs.test", path, None);
            assert_eq!(decide(&state, Ok(()), &asked, NOW), bypass);
            assert_eq!(decide(&state, Err("cut off"), &asked, NOW), bypass);
        }
        let from_lan = Asked {
            source: LAN,
            ..ask(&POST, "docs.test", "/private", None)
        };
        assert_eq!(decide(&state, Ok(()), &from_lan, NOW), bypass);
        assert_eq!(decide(&state, Err("cut off"), &from_lan, NOW), bypass);
        // A prefix matches at a `/` boundary only; another address needs a sign-in.
        for path in ["/healthz", "/private"] {
            assert_eq!(
                decide(&state, Ok(()), &ask(&GET, "docs.test", path, None), NOW),
                sign_in(docs, SignIn::Sso, NoSession::Missing)
            );
        }
    }

    #[test]
    fn failing_closed_pauses_every_session_but_no_public_or_bypass_request() {
        let w = World::new();
        let state = w.state();
        let app = route(&state, "app.test", "/");
        let paused = Verdict::Deny {
            route: app,
            why: Denied::Paused("no leader for 5 s".into()),
        };
        let alice = w.cookie(ALICE, "app.test");
        // Before the session is even looked at: this node cannot vouch for any.
        for cookie in [Some(alice.as_str()), None, Some("forged")] {
            let asked = ask(&GET, "app.test", "/", cookie);
            assert_eq!(
                decide(&state, Err("no leader for 5 s"), &asked, NOW),
                paused
            );
        }
        let pin = w.cookie(PIN, "pin.test");
        assert_eq!(
            decide(
                &state,
                Err("x"),
                &ask(&GET, "pin.test", "/", Some(&pin)),
                NOW
            ),
            Verdict::Deny {
                route: route(&state, "pin.test", "/"),
                why: Denied::Paused("x".into()),
            }
        );
        let Verdict::Deny { why, .. } = paused else {
            unreachable!()
        };
        assert_eq!(why.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(why.title(), "Access paused");
        assert_eq!(why.reason(), "fail closed: no leader for 5 s");
        assert_eq!(why.user(), None);
    }

    #[test]
    fn without_a_session_a_navigation_is_sent_to_sign_in_and_anything_else_gets_401() {
        let w = World::new();
        let state = w.state();
        let app = route(&state, "app.test", "/");
        for method in [&GET, &HEAD] {
            assert_eq!(
                decide(&state, Ok(()), &ask(method, "app.test", "/x", None), NOW),
                sign_in(app, SignIn::Sso, NoSession::Missing)
            );
        }
        for method in [&POST, &Method::PUT, &Method::DELETE] {
            assert_eq!(
                decide(&state, Ok(()), &ask(method, "app.test", "/x", None), NOW),
                sign_in(app, SignIn::Unauthorized, NoSession::Missing)
            );
        }
        // The cluster has no cookie key yet: no cookie can be opened.
        let mut keyless = w.state();
        keyless.sealer = None;
        let alice = w.cookie(ALICE, "app.test");
        assert_eq!(
            decide(
                &keyless,
                Ok(()),
                &ask(&GET, "app.test", "/", Some(&alice)),
                NOW
            ),
            sign_in(
                route(&keyless, "app.test", "/"),
                SignIn::Sso,
                NoSession::KeysNotReady
            )
        );
    }

    #[test]
    fn a_resource_with_its_own_sign_in_methods_sends_navigations_to_its_page() {
        let w = World::new();
        let state = w.state();
        let pinned = route(&state, "pin.test", "/");
        assert_eq!(
            decide(&state, Ok(()), &ask(&GET, "pin.test", "/", None), NOW),
            sign_in(pinned, SignIn::ResourcePage, NoSession::Missing)
        );
        assert_eq!(
            decide(&state, Ok(()), &ask(&POST, "pin.test", "/", None), NOW),
            sign_in(pinned, SignIn::Unauthorized, NoSession::Missing)
        );
        // A signed-in user is still welcome there on the policies' word.
        let alice = w.cookie(ALICE, "pin.test");
        assert_eq!(
            decide(
                &state,
                Ok(()),
                &ask(&GET, "pin.test", "/", Some(&alice)),
                NOW
            ),
            Verdict::Forward(Pass {
                route: pinned,
                grounds: Grounds::Policy {
                    principal: sso(&state, ALICE, &["staff"]),
                    policy: "staff",
                },
            })
        );
    }

    #[test]
    fn a_cookie_made_for_another_host_or_not_by_the_cluster_is_no_session() {
        let w = World::new();
        let state = w.state();
        let app = route(&state, "app.test", "/");
        let for_docs = w.cookie(ALICE, "docs.test");
        assert_eq!(
            decide(
                &state,
                Ok(()),
                &ask(&GET, "app.test", "/", Some(&for_docs)),
                NOW
            ),
            sign_in(app, SignIn::Sso, NoSession::OtherHost)
        );
        let other_key = Sealer::from_b64(&Sealer::generate_key()).unwrap();
        let foreign = other_key.seal(
            Purpose::Session,
            &SessionCookie {
                sid: ALICE.0,
                host: "app.test".into(),
            },
        );
        for cookie in ["garbage", foreign.as_str()] {
            assert_eq!(
                decide(
                    &state,
                    Ok(()),
                    &ask(&GET, "app.test", "/", Some(cookie)),
                    NOW
                ),
                sign_in(app, SignIn::Sso, NoSession::Invalid)
            );
        }
    }

    #[test]
    fn a_session_is_good_until_its_end_and_not_after() {
        let w = World::new();
        let state = w.state();
        let app = route(&state, "app.test", "/");
        let alice = w.cookie(ALICE, "app.test");
        let asked = ask(&GET, "app.test", "/", Some(&alice));
        assert_eq!(
            decide(&state, Ok(()), &asked, T + TTL - 1),
            Verdict::Forward(Pass {
                route: app,
                grounds: Grounds::Policy {
                    principal: sso(&state, ALICE, &["staff"]),
                    policy: "staff",
                },
            })
        );
        assert_eq!(
            decide(&state, Ok(()), &asked, T + TTL),
            sign_in(app, SignIn::Sso, NoSession::Expired)
        );
    }

    #[test]
    fn a_revoked_session_is_no_session() {
        let mut w = World::new();
        w.run(Command::RevokeSession { id: ALICE });
        w.run(Command::RevokeSession { id: PIN });
        let state = w.state();
        let alice = w.cookie(ALICE, "app.test");
        assert_eq!(
            decide(
                &state,
                Ok(()),
                &ask(&GET, "app.test", "/", Some(&alice)),
                NOW
            ),
            sign_in(
                route(&state, "app.test", "/"),
                SignIn::Sso,
                NoSession::Ended
            )
        );
        let pin = w.cookie(PIN, "pin.test");
        assert_eq!(
            decide(&state, Ok(()), &ask(&GET, "pin.test", "/", Some(&pin)), NOW),
            sign_in(
                route(&state, "pin.test", "/"),
                SignIn::ResourcePage,
                NoSession::Ended
            )
        );
    }

    #[test]
    fn a_disabled_user_is_denied_with_403_whatever_the_policies_say() {
        let mut w = World::new();
        w.update(
            json!({"user": {"name": "alice", "email": "alice@example.test", "disabled": true}}),
        );
        let state = w.state();
        let alice = w.cookie(ALICE, "app.test");
        let verdict = decide(
            &state,
            Ok(()),
            &ask(&GET, "app.test", "/", Some(&alice)),
            NOW,
        );
        assert_eq!(
            verdict,
            Verdict::Deny {
                route: route(&state, "app.test", "/"),
                why: Denied::UserDisabled { user: "alice" },
            }
        );
        let Verdict::Deny { why, .. } = verdict else {
            unreachable!()
        };
        assert_eq!(
            (why.status(), why.title(), why.detail().as_ref()),
            (
                StatusCode::FORBIDDEN,
                "Access denied",
                "Your account is disabled."
            )
        );
        assert_eq!(
            (why.reason().as_str(), why.user()),
            ("user disabled", Some("alice"))
        );
    }

    #[test]
    fn the_policies_deny_with_403_and_say_why() {
        let w = World::new();
        let state = w.state();
        // Bob is in the role `staff` allows: the deny by name comes first.
        let cases = [
            (
                BOB,
                "app.test",
                "/",
                "bob",
                Decision::DeniedBy { policy: "blocked" },
            ),
            (CAROL, "app.test", "/", "carol", Decision::NoAllowMatched),
            (ALICE, "app.test", "/admin/x", "alice", Decision::NoPolicy),
        ];
        for (sid, host, path, user, decision) in cases {
            let cookie = w.cookie(sid, host);
            let verdict = decide(&state, Ok(()), &ask(&GET, host, path, Some(&cookie)), NOW);
            let route = route(&state, host, path);
            assert_eq!(
                verdict,
                Verdict::Deny {
                    route,
                    why: Denied::Policy { user, decision },
                }
            );
            let Verdict::Deny { why, .. } = verdict else {
                unreachable!()
            };
            assert_eq!(why.status(), StatusCode::FORBIDDEN);
            assert_eq!(why.reason(), decision.reason());
            assert_eq!(
                why.detail(),
                format!("{user} may not use this resource ({}).", decision.reason())
            );
        }
    }

    #[test]
    fn a_policy_allows_a_user_through_a_role_and_the_identity_goes_upstream() {
        let w = World::new();
        let state = w.state();
        let alice = w.cookie(ALICE, "app.test");
        let verdict = decide(
            &state,
            Ok(()),
            &ask(&POST, "app.test", "/x", Some(&alice)),
            NOW,
        );
        assert_eq!(
            verdict,
            Verdict::Forward(Pass {
                route: route(&state, "app.test", "/"),
                grounds: Grounds::Policy {
                    principal: sso(&state, ALICE, &["staff"]),
                    policy: "staff",
                },
            })
        );
        let Verdict::Forward(pass) = verdict else {
            unreachable!()
        };
        assert_eq!(pass.principal().map(Principal::name), Some("alice"));
        assert_eq!(pass.grounds.to_string(), "allowed by policy staff");
        assert_eq!(pass.grant_kind(), GrantKind::Session(ALICE));
    }

    #[test]
    fn a_session_for_one_resource_is_good_for_that_resource_only() {
        let w = World::new();
        let state = w.state();
        let pin = w.cookie(PIN, "pin.test");
        let verdict = decide(&state, Ok(()), &ask(&GET, "pin.test", "/", Some(&pin)), NOW);
        assert_eq!(
            verdict,
            Verdict::Forward(Pass {
                route: route(&state, "pin.test", "/"),
                grounds: Grounds::ResourceSession(bound(&state, PIN)),
            })
        );
        let Verdict::Forward(pass) = verdict else {
            unreachable!()
        };
        assert_eq!(pass.grounds.to_string(), "Pin session for this resource");
        assert_eq!(pass.principal().map(Principal::name), Some("anonymous"));
        // The same session, with a cookie made for another resource's host.
        let elsewhere = w.cookie(PIN, "app.test");
        assert_eq!(
            decide(
                &state,
                Ok(()),
                &ask(&GET, "app.test", "/", Some(&elsewhere)),
                NOW
            ),
            sign_in(
                route(&state, "app.test", "/"),
                SignIn::Sso,
                NoSession::OtherResource
            )
        );
        // A single sign-on session on a resource that does not take one.
        let alice = w.cookie(ALICE, "nosso.test");
        assert_eq!(
            decide(
                &state,
                Ok(()),
                &ask(&GET, "nosso.test", "/", Some(&alice)),
                NOW
            ),
            sign_in(
                route(&state, "nosso.test", "/"),
                SignIn::ResourcePage,
                NoSession::OtherResource
            )
        );
    }

    #[test]
    fn a_recheck_keeps_an_anonymous_connection_the_same_request_would_still_be_let_through() {
        let w = World::new();
        let state = w.state();
        let alice = w.cookie(ALICE, "docs.test");
        let by_alice = grant_of(&state, "docs.test", "/private", OFFICE, Some(&alice));
        let by_path = grant_of(&state, "docs.test", "/health", OFFICE, None);
        let by_lan = grant_of(&state, "docs.test", "/private", LAN, None);
        // `docs` turns public: nobody needs a sign-in for it any more, not even while this
        // node fails closed, so the bypass grants hold (and never gain an identity).
        let mut opened = World::new();
        opened.update(resource("docs", "docs.test", json!({"public": true}), &[]));
        let state = opened.state();
        for g in [&by_path, &by_lan] {
            assert_eq!(recheck(g, &state, Ok(()), NOW), Ok(()));
            assert_eq!(recheck(g, &state, Err("no leader"), NOW), Ok(()));
        }
        // Alice's connection carries her identity, which nothing checks any more.
        assert_eq!(
            recheck(&by_alice, &state, Ok(()), NOW),
            Err("the resource takes no session now".into())
        );
        assert_eq!(by_path.asked().credential, None);
        assert_eq!(
            by_alice.asked().credential,
            Some(Credential::Session(ALICE))
        );
    }

    /// Every request of the fixtures the tests above look at.
    fn every_request(
        w: &World,
    ) -> Vec<(Method, IpAddr, &'static str, &'static str, Option<String>)> {
        let mut out = Vec::new();
        for (host, path) in [
            ("app.test", "/"),
            ("app.test", "/admin"),
            ("open.test", "/"),
            ("docs.test", "/health"),
            ("docs.test", "/private"),
            ("pin.test", "/"),
            ("nosso.test", "/"),
            ("nowhere.test", "/"),
        ] {
            for method in [Method::GET, Method::POST] {
                for source in [OFFICE, LAN] {
                    let mut cookies = vec![None, Some("forged".to_owned())];
                    for sid in [ALICE, BOB, CAROL, PIN] {
                        cookies.push(Some(w.cookie(sid, host)));
                    }
                    for cookie in cookies {
                        out.push((method.clone(), source, host, path, cookie));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn a_recheck_asks_the_same_question_and_gets_the_same_answer() {
        let w = World::new();
        let state = w.state();
        let mut forwarded = Vec::new();
        for (method, source, host, path, cookie) in every_request(&w) {
            let asked = Asked {
                source,
                ..ask(&method, host, path, cookie.as_deref())
            };
            let first = decide(&state, Ok(()), &asked, NOW);
            let Verdict::Forward(pass) = &first else {
                continue;
            };
            let grant = Grant::new(pass, host, path, &method, source);
            let again = decide(&state, Ok(()), &grant.asked(), NOW);
            assert_eq!(again, first, "{method} {host}{path} from {source}");
            assert_eq!(grant.holds(&again), Ok(()));
            forwarded.push(pass.grant_kind());
        }
        // Every kind of grant was among them.
        for kind in [
            GrantKind::Public,
            GrantKind::Bypass,
            GrantKind::Session(ALICE),
            GrantKind::Session(PIN),
        ] {
            assert!(forwarded.contains(&kind), "{kind:?}");
        }
    }

    /// The grant of a connection opened by `method` to `host` and `path` with `cookie`.
    fn grant_of(
        state: &ProxyState,
        host: &str,
        path: &str,
        source: IpAddr,
        cookie: Option<&str>,
    ) -> Grant {
        let asked = Asked {
            source,
            ..ask(&GET, host, path, cookie)
        };
        let Verdict::Forward(pass) = decide(state, Ok(()), &asked, NOW) else {
            panic!("{host}{path} is not forwarded");
        };
        Grant::new(&pass, host, path, &GET, source)
    }

    /// Whether `grant` holds on `state` at `now` with `serving`.
    fn recheck(
        grant: &Grant,
        state: &ProxyState,
        serving: Result<(), &str>,
        now: u64,
    ) -> Result<(), String> {
        grant.holds(&decide(state, serving, &grant.asked(), now))
    }

    #[test]
    fn a_recheck_closes_the_connection_once_what_let_it_in_is_gone() {
        let w = World::new();
        let state = w.state();
        let alice = w.cookie(ALICE, "app.test");
        let pin = w.cookie(PIN, "pin.test");
        let by_alice = grant_of(&state, "app.test", "/", OFFICE, Some(&alice));
        let by_pin = grant_of(&state, "pin.test", "/", OFFICE, Some(&pin));
        let public = grant_of(&state, "open.test", "/", OFFICE, None);
        let by_path = grant_of(&state, "docs.test", "/health", OFFICE, None);
        let by_lan = grant_of(&state, "docs.test", "/private", LAN, None);
        for g in [&by_alice, &by_pin, &public, &by_path, &by_lan] {
            assert_eq!(recheck(g, &state, Ok(()), NOW), Ok(()));
        }

        // Failing closed ends the session's connections, not the anonymous ones.
        for g in [&by_alice, &by_pin] {
            assert_eq!(
                recheck(g, &state, Err("no leader"), NOW),
                Err("fail closed: no leader".into())
            );
        }
        for g in [&public, &by_path, &by_lan] {
            assert_eq!(recheck(g, &state, Err("no leader"), NOW), Ok(()));
        }
        // The session's end.
        assert_eq!(
            recheck(&by_alice, &state, Ok(()), T + TTL),
            Err("session expired".into())
        );

        let mut revoked = World::new();
        revoked.run(Command::RevokeSession { id: ALICE });
        revoked.run(Command::RevokeSession { id: PIN });
        let state = revoked.state();
        for g in [&by_alice, &by_pin] {
            assert_eq!(recheck(g, &state, Ok(()), NOW), Err("session ended".into()));
        }

        let mut disabled = World::new();
        disabled.update(
            json!({"user": {"name": "alice", "email": "alice@example.test", "disabled": true}}),
        );
        assert_eq!(
            recheck(&by_alice, &disabled.state(), Ok(()), NOW),
            Err("user disabled".into())
        );

        // Out of the role the policy asks for.
        let mut demoted = World::new();
        demoted.update(json!({"role": {"name": "staff", "members": ["bob"]}}));
        assert_eq!(
            recheck(&by_alice, &demoted.state(), Ok(()), NOW),
            Err("no policy allows this request".into())
        );
        // A policy that now denies her by name.
        let mut blocked = World::new();
        blocked.update(json!({"policy": {"name": "blocked", "deny": {"user": "alice"}}}));
        assert_eq!(
            recheck(&by_alice, &blocked.state(), Ok(()), NOW),
            Err("denied by policy blocked".into())
        );

        // The resource is no longer public, the bypass rules are gone.
        let mut closed = World::new();
        closed.update(resource("open", "open.test", json!({}), &["staff"]));
        closed.update(resource("docs", "docs.test", json!({}), &["staff"]));
        let state = closed.state();
        for g in [&public, &by_path, &by_lan] {
            assert_eq!(
                recheck(g, &state, Ok(()), NOW),
                Err("the resource needs a sign-in now".into())
            );
        }

        // The host now routes to another resource, or to none.
        let mut moved = World::new();
        moved.run(Command::Delete {
            kind: Kind::Resource,
            name: Name::new("open").unwrap(),
            revision: 0,
        });
        moved.update(resource("app", "elsewhere.test", json!({}), &["staff"]));
        moved.create(resource("app2", "app.test", json!({"public": true}), &[]));
        let state = moved.state();
        for g in [&public, &by_alice] {
            assert_eq!(
                recheck(g, &state, Ok(()), NOW),
                Err("the resource changed".into())
            );
        }
    }
}
