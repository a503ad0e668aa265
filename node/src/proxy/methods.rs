//! Ways into one resource without an account: PIN, passcode, a one-time code sent to a
//! listed e-mail address, and share links. Each opens a session good for that resource only
//! (`Session::resource`), stored in the registry like any other, so it works on every node
//! and can be revoked.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use warren_consensus::registry::{Command, RegistryError};
use warren_consensus::types::{Actor as Who, Request as RaftRequest};
use warren_proto::session::{user_name_from_email, Session, SessionId, Via};
use warren_proto::Name;

use super::credential;
use super::pages::{document, esc, html_response, page};
use super::seal::Purpose;
use super::state::Route;
use super::{set_cookie, unix_now, Body, Proxy, ProxyState, SessionCookie, SESSION_COOKIE};

/// How long an e-mailed code is valid.
const EMAIL_CODE_TTL: u64 = 600;
/// Largest form body accepted.
const MAX_FORM: usize = 8 * 1024;

/// Where e-mail goes out.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mailer(from {})", self.from)
    }
}

impl Mailer {
    /// A mailer for an SMTP URL (`smtp://host:port`, `smtps://user:pass@host`,
    /// `smtp://host?tls=required`) sending from `from`.
    pub fn new(url: &str, from: &str) -> anyhow::Result<Self> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| anyhow::anyhow!("invalid setting --smtp-url: {e}"))?
            .timeout(Some(std::time::Duration::from_secs(10)))
            .build();
        let from = from
            .parse()
            .map_err(|e| anyhow::anyhow!("invalid setting --smtp-from {from:?}: {e}"))?;
        Ok(Self { transport, from })
    }

    async fn send_code(&self, to: &str, host: &str, code: &str) -> Result<(), String> {
        let to: Mailbox = to.parse().map_err(|e| format!("bad address: {e}"))?;
        let msg = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(format!("Your code for {host}"))
            .body(format!(
                "Your one-time code for {host} is {code}\n\nIt is valid for {} minutes. If you did not ask for it, ignore this message.\n",
                EMAIL_CODE_TTL / 60
            ))
            .map_err(|e| e.to_string())?;
        self.transport
            .send(msg)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// A pending e-mail code, sealed into the code form.
#[derive(Serialize, Deserialize)]
struct PendingCode {
    email: String,
    resource: String,
    code_sha256: [u8; 32],
    exp: u64,
    id: u128,
}

fn code_hash(code: &str, id: u128) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(id.to_be_bytes());
    h.update(code.trim().as_bytes());
    h.finalize().into()
}

fn form_page(route: &Route, rd: &str, sso_link: Option<&str>, notice: Option<&str>) -> String {
    let a = &route.options.access;
    let rd = esc(rd);
    let mut body = String::new();
    if let Some(n) = notice {
        body.push_str(&format!("<p id=\"notice\">{}</p>", esc(n)));
    }
    if let Some(link) = sso_link {
        body.push_str(&format!(
            "<p><a id=\"sso\" class=\"button\" href=\"{}\">Sign in with your account</a></p>",
            esc(link)
        ));
    }
    if a.pin_hash.is_some() {
        body.push_str(&format!(
            "<form method=\"post\" action=\"/.warren/auth\"><input type=\"hidden\" name=\"method\" value=\"pin\"><input type=\"hidden\" name=\"rd\" value=\"{rd}\"><label>PIN <input id=\"pin\" name=\"pin\" inputmode=\"numeric\" autocomplete=\"off\"></label> <button id=\"pin-submit\" type=\"submit\">Open</button></form>"
        ));
    }
    if a.passcode_hash.is_some() {
        body.push_str(&format!(
            "<form method=\"post\" action=\"/.warren/auth\"><input type=\"hidden\" name=\"method\" value=\"passcode\"><input type=\"hidden\" name=\"rd\" value=\"{rd}\"><label>Passcode <input id=\"passcode\" name=\"passcode\" type=\"password\"></label> <button id=\"passcode-submit\" type=\"submit\">Open</button></form>"
        ));
    }
    if !a.email_codes.is_empty() {
        body.push_str(&format!(
            "<form method=\"post\" action=\"/.warren/auth\"><input type=\"hidden\" name=\"method\" value=\"email\"><input type=\"hidden\" name=\"rd\" value=\"{rd}\"><label>E-mail <input id=\"email\" name=\"email\" type=\"email\"></label> <button id=\"email-submit\" type=\"submit\">Send me a code</button></form>"
        ));
    }
    document(&format!("Open {}", route.host), &body)
}

/// The form again with why a try at a secret was not made: too many tries (429) or the
/// cluster could not count it (503).
fn refused_try(
    again: &dyn Fn(StatusCode, &str) -> Response<Body>,
    route: &Route,
    e: credential::ReserveError,
    what: &str,
) -> Response<Body> {
    match e {
        credential::ReserveError::TooMany { retry_after } => {
            let minutes = retry_after.div_ceil(60);
            again(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("Too many {what}; try again in {minutes} minute(s)."),
            )
        }
        credential::ReserveError::Unavailable(why) => {
            tracing::warn!(resource = %route.resource, "counting an attempt: {why}");
            again(
                StatusCode::SERVICE_UNAVAILABLE,
                "The server cannot check this right now; try again in a moment.",
            )
        }
    }
}

/// Only local paths: anything else would be an open redirect.
fn local_path(rd: &str) -> String {
    if rd.starts_with('/') && !rd.starts_with("//") && !rd.starts_with("/\\") {
        rd.to_owned()
    } else {
        "/".to_owned()
    }
}

/// The request's `application/x-www-form-urlencoded` body as a map, if it has at most
/// [`MAX_FORM`] bytes.
pub(super) async fn read_form(
    req: Request<Incoming>,
) -> Option<std::collections::HashMap<String, String>> {
    let body: Bytes = Limited::new(req.into_body(), MAX_FORM)
        .collect()
        .await
        .ok()?
        .to_bytes();
    Some(url::form_urlencoded::parse(&body).into_owned().collect())
}

impl Proxy {
    /// The sign-in page of a resource with other ways in than single sign-on.
    pub(super) fn methods_page(&self, route: &Route, rd: &str) -> Response<Body> {
        let sso = route
            .options
            .access
            .sso
            .then(|| self.sso_link(&route.host, rd));
        html_response(StatusCode::OK, form_page(route, rd, sso.as_deref(), None))
    }

    fn sso_link(&self, host: &str, rd: &str) -> String {
        let original = format!(
            "https://{}{}",
            super::authority_with_port(host, self.settings.public_https_port),
            local_path(rd)
        );
        url::Url::parse_with_params(
            &format!("{}/.warren/sign_in", self.auth_origin()),
            &[("rd", original.as_str())],
        )
        .map(|u| u.to_string())
        .unwrap_or_default()
    }

    /// `/.warren/auth` on a resource host: the form (GET) and its answers (POST).
    pub(super) async fn methods(
        self: &Arc<Self>,
        req: Request<Incoming>,
        state: &ProxyState,
        host: &str,
        peer: SocketAddr,
    ) -> Response<Body> {
        let rd = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .find(|(k, _)| k == "rd")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_else(|| "/".into());
        let Some(route) = state.config.route(host, &local_path(&rd)).cloned() else {
            return page(
                StatusCode::NOT_FOUND,
                "Not found",
                "No resource is configured here.",
            );
        };
        if req.method() == http::Method::GET {
            return self.methods_page(&route, &rd);
        }
        if req.method() != http::Method::POST {
            return page(
                StatusCode::METHOD_NOT_ALLOWED,
                "Not allowed",
                "Use the form.",
            );
        }
        let Some(form) = read_form(req).await else {
            return page(
                StatusCode::BAD_REQUEST,
                "Bad request",
                "The form could not be read.",
            );
        };
        let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
        let rd = local_path(get("rd"));
        // The form's rd decides the route again: it may differ from the query's.
        let Some(route) = state.config.route(host, &rd).cloned() else {
            return page(
                StatusCode::NOT_FOUND,
                "Not found",
                "No resource is configured here.",
            );
        };
        let a = &route.options.access;
        let ip = peer.ip();
        let key = |m: &str| format!("{m}:{}", route.resource);
        let sso = a.sso.then(|| self.sso_link(host, &rd));
        let again = |status: StatusCode, notice: &str| {
            html_response(status, form_page(&route, &rd, sso.as_deref(), Some(notice)))
        };
        match get("method") {
            m @ ("pin" | "passcode") => {
                let stored = if m == "pin" {
                    &a.pin_hash
                } else {
                    &a.passcode_hash
                };
                let Some(stored) = stored.clone() else {
                    return again(StatusCode::BAD_REQUEST, "This resource has no such way in.");
                };
                let reservation = match credential::reserve(&self.cluster, ip, &key(m)).await {
                    Ok(r) => r,
                    Err(e) => return refused_try(&again, &route, e, "wrong attempts"),
                };
                let given = get(m).to_owned();
                let ok = tokio::task::spawn_blocking(move || credential::verify(&given, &stored))
                    .await
                    .unwrap_or(false);
                if !ok {
                    // The reservation stays counted: a wrong guess.
                    drop(reservation);
                    tracing::info!(target: "warren::access", resource = %route.resource, client = %ip, method = m, decision = "deny", "wrong {m}");
                    return again(StatusCode::UNAUTHORIZED, &format!("Wrong {m}."));
                }
                let via = if m == "pin" { Via::Pin } else { Via::Passcode };
                // Released before the answer: the user's next try (on any node) finds this
                // one no longer counted.
                let (resp, ()) = tokio::join!(
                    self.open_bound_session(state, &route, host, via, String::new(), None, &rd),
                    reservation.release(&self.cluster)
                );
                resp
            }
            "email" => {
                let email = get("email").trim().to_owned();
                if !self.attempts.allowed(ip, &key("email")) {
                    return again(
                        StatusCode::TOO_MANY_REQUESTS,
                        "Too many codes asked for; wait a few minutes.",
                    );
                }
                // Counted like a failure: every request sends mail.
                self.attempts.failed(ip, &key("email"));
                let Some(sealer) = &state.sealer else {
                    return page(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Not ready",
                        "Try again in a moment.",
                    );
                };
                let id: u128 = rand::random();
                let code = format!("{:06}", rand::random::<u32>() % 1_000_000);
                let listed = a.email_allowed(&email);
                if listed {
                    let Some(mailer) = &self.mailer else {
                        tracing::warn!(resource = %route.resource, "e-mail codes are configured but this node has no --smtp-url");
                        return again(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "E-mail is not set up on this server.",
                        );
                    };
                    if let Err(e) = mailer.send_code(&email, host, &code).await {
                        tracing::warn!(resource = %route.resource, "sending an e-mail code failed: {e}");
                        return again(
                            StatusCode::BAD_GATEWAY,
                            "The code could not be sent; try again later.",
                        );
                    }
                }
                // An address that is not listed gets the same answer (and a code that was
                // never sent), so the form does not tell who is listed.
                let pending = PendingCode {
                    email: email.clone(),
                    resource: route.resource.to_string(),
                    code_sha256: if listed {
                        code_hash(&code, id)
                    } else {
                        [0xff; 32]
                    },
                    exp: unix_now() + EMAIL_CODE_TTL,
                    id,
                };
                let token = sealer.seal(Purpose::EmailCode, &pending);
                let body = document(
                    &format!("Open {}", route.host),
                    &format!(
                        "<p id=\"notice\">If {} may use this resource, a code is on its way.</p><form method=\"post\" action=\"/.warren/auth\"><input type=\"hidden\" name=\"method\" value=\"email_code\"><input type=\"hidden\" name=\"rd\" value=\"{}\"><input type=\"hidden\" name=\"token\" value=\"{}\"><label>Code <input id=\"code\" name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\"></label> <button id=\"code-submit\" type=\"submit\">Open</button></form>",
                        esc(&email),
                        esc(&rd),
                        esc(&token)
                    ),
                );
                html_response(StatusCode::OK, body)
            }
            "email_code" => {
                let Some(sealer) = &state.sealer else {
                    return page(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Not ready",
                        "Try again in a moment.",
                    );
                };
                let Some(p) = sealer.open::<PendingCode>(Purpose::EmailCode, get("token")) else {
                    return again(
                        StatusCode::BAD_REQUEST,
                        "That code form is not valid; ask for a new code.",
                    );
                };
                if p.resource != route.resource.as_str() || p.exp < unix_now() {
                    return again(
                        StatusCode::BAD_REQUEST,
                        "That code has expired; ask for a new one.",
                    );
                }
                // Counted per client and resource, across every code it was sent.
                let reservation = match credential::reserve(&self.cluster, ip, &key("code")).await {
                    Ok(r) => r,
                    Err(e) => return refused_try(&again, &route, e, "wrong codes"),
                };
                if !bool::from(code_hash(get("code"), p.id).ct_eq(&p.code_sha256)) {
                    drop(reservation);
                    return again(StatusCode::UNAUTHORIZED, "Wrong code.");
                }
                let consume = RaftRequest::new(
                    Who::System,
                    Command::ConsumeEmailCode {
                        id: p.id,
                        expires_at: p.exp,
                        resource: route.resource.clone(),
                    },
                );
                let (consumed, ()) = tokio::join!(
                    self.cluster.write(consume),
                    reservation.release(&self.cluster)
                );
                match consumed {
                    Ok(Ok(_)) => {}
                    // Expired only if it did so since the check above.
                    Ok(Err(RegistryError::Conflict { .. })) => {
                        return again(
                            StatusCode::BAD_REQUEST,
                            "That code was already used or has expired; ask for a new one.",
                        )
                    }
                    Ok(Err(RegistryError::NotFound { .. })) => {
                        return page(
                            StatusCode::NOT_FOUND,
                            "Not found",
                            "This resource no longer exists.",
                        )
                    }
                    _ => {
                        return page(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "Unavailable",
                            "Try again in a moment.",
                        )
                    }
                }
                self.open_bound_session(state, &route, host, Via::EmailCode, p.email, None, &rd)
                    .await
            }
            _ => again(StatusCode::BAD_REQUEST, "Choose a way in."),
        }
    }

    /// `/.warren/share?t=<id>.<secret>`: a share link opens its resource.
    ///
    /// Invalid links are limited per node only: a share token's secret cannot be guessed,
    /// so the limit only slows down scanning.
    pub(super) async fn share(
        self: &Arc<Self>,
        req: Request<Incoming>,
        state: &ProxyState,
        host: &str,
        peer: SocketAddr,
    ) -> Response<Body> {
        let t = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .find(|(k, _)| k == "t")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let bad = || {
            page(
                StatusCode::NOT_FOUND,
                "Link not valid",
                "This share link is not valid or has expired.",
            )
        };
        if !self.attempts.allowed(peer.ip(), "share") {
            return page(
                StatusCode::TOO_MANY_REQUESTS,
                "Slow down",
                "Too many invalid links; wait a few minutes.",
            );
        }
        let parsed = warren_proto::token::parse_share_token(&t);
        let Some((id, secret)) = parsed else {
            self.attempts.failed(peer.ip(), "share");
            return bad();
        };
        let Some(link) = state.registry.share_links().get(&id).cloned() else {
            self.attempts.failed(peer.ip(), "share");
            return bad();
        };
        if !link.hash.matches(&secret) || link.expires_at <= unix_now() {
            self.attempts.failed(peer.ip(), "share");
            return bad();
        }
        let route = state
            .config
            .routes_for(host)
            .and_then(|rs| rs.iter().find(|r| r.resource == link.resource))
            .cloned();
        let Some(route) = route else {
            return bad();
        };
        let rd = route.prefix.clone();
        self.open_bound_session(
            state,
            &route,
            host,
            Via::ShareLink,
            String::new(),
            Some(link.expires_at),
            &rd,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn open_bound_session(
        &self,
        state: &ProxyState,
        route: &Route,
        host: &str,
        via: Via,
        email: String,
        not_after: Option<u64>,
        rd: &str,
    ) -> Response<Body> {
        let Some(sealer) = &state.sealer else {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Not ready",
                "Try again in a moment.",
            );
        };
        let now = unix_now();
        let mut expires_at = now + self.settings.session_ttl.as_secs();
        if let Some(n) = not_after {
            expires_at = expires_at.min(n);
        }
        let user = if email.is_empty() {
            "anonymous".to_owned()
        } else {
            user_name_from_email(&email)
        };
        let session = Session {
            id: SessionId::random(),
            user: Name::new(user).unwrap_or_else(|_| Name::new("anonymous").expect("valid")),
            idp: Name::new("none").expect("valid name"),
            // The code reached the address: that proves it. A PIN, passcode or share link
            // has no address.
            email_verified: via == Via::EmailCode && !email.is_empty(),
            email,
            groups: Vec::new(),
            created_at: now,
            expires_at,
            refresh_token: None,
            token_expires_at: None,
            id_token: None,
            via,
            resource: Some(route.resource.clone()),
            claims: String::new(),
        };
        let sid = session.id;
        match self
            .cluster
            .write(RaftRequest::new(
                Who::System,
                Command::CreateSession(session),
            ))
            .await
        {
            Ok(Ok(_)) => {}
            other => {
                tracing::warn!("opening a session: {other:?}");
                return page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Unavailable",
                    "The session could not be opened; try again in a moment.",
                );
            }
        }
        // The next request comes back to this node: make sure it has applied the session.
        if let Err(e) = self.cluster.barrier().await {
            tracing::warn!("waiting for a new session to reach this node: {e}");
        }
        tracing::info!(target: "warren::access", resource = %route.resource, via = ?via, decision = "allow", "session opened without an account");
        let cookie = set_cookie(
            SESSION_COOKIE,
            &sealer.seal(
                Purpose::Session,
                &SessionCookie {
                    sid: sid.0,
                    host: host.to_owned(),
                },
            ),
            "/",
            None,
        );
        let mut resp = super::pages::redirect(&local_path(rd));
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
        resp
    }
}
