//! Sign-in: OpenID Connect authorization code flow with PKCE, state and nonce on the
//! cluster's auth host, then a one-time code hands the session to the resource's own
//! domain (cookies are per domain). Sessions are registry entries, so every node accepts
//! them; the leader refreshes provider tokens before they expire (`crate::sessions`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, OAuth2TokenResponse,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope,
    TokenResponse,
};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;
use warren_consensus::registry::{Command, Outcome, RegistryError};
use warren_consensus::types::{Actor as Who, Request as RaftRequest};
use warren_proto::registry::IdentityProvider;
use warren_proto::session::{Session, SessionId};
use warren_proto::{Name, Secret};

use super::decide::lookup_session;
use super::pages::{self, esc, page};
use super::seal::{Purpose, Sealer};
use super::{
    authority_with_port, cookie, set_cookie, unix_now, AccessLog, Body, Proxy, ProxyState,
    SessionCookie, LOGIN_COOKIE, SESSION_COOKIE,
};
use crate::sessions::{RefreshOutcome, Tokens};

/// How long a sign-in may take at the provider.
const LOGIN_TTL: u64 = 600;
/// How long a handoff code is valid.
const HANDOFF_TTL: u64 = 60;
/// How long a sign-out form stays good, in seconds.
const SIGN_OUT_TTL: u64 = 600;

/// Sign-in state, sealed in a cookie on the auth host while the user is at the provider.
#[derive(Serialize, Deserialize)]
struct LoginState {
    state: String,
    nonce: String,
    verifier: String,
    rd: String,
    idp: String,
    exp: u64,
}

/// A one-time code handing a session to a resource host, sealed.
#[derive(Serialize, Deserialize)]
pub(crate) struct HandoffCode {
    sid: u128,
    host: String,
    rd: String,
    exp: u64,
    id: u128,
}

/// The token of a sign-out form, sealed: which session on which host it may end, until
/// when. A page on another site cannot read it, so it cannot make the browser post one.
#[derive(Serialize, Deserialize)]
struct SignOutToken {
    sid: u128,
    host: String,
    exp: u64,
}

impl SignOutToken {
    /// Whether `token` (a form field) is a sign-out token sealed by `sealer` for session
    /// `sid` on `host` that has not expired at `now`.
    fn allows(sealer: &Sealer, token: Option<&str>, sid: SessionId, host: &str, now: u64) -> bool {
        token
            .and_then(|t| sealer.open::<SignOutToken>(Purpose::SignOut, t))
            .is_some_and(|t| t.sid == sid.0 && t.host == host && t.exp >= now)
    }
}

/// Who signed in, from a verified ID token.
struct Account {
    /// The session to open (its user is chosen by the registry).
    session: Session,
    /// The `name` claim.
    display_name: Option<String>,
    /// The `sub` claim.
    subject: String,
    /// Whether the address is verified: the `email_verified` claim (absent counts as not
    /// verified), or the provider's `trust_email`.
    email_verified: bool,
}

/// A discovered provider.
struct Discovered {
    revision: u64,
    metadata: CoreProviderMetadata,
    end_session: Option<String>,
}

/// Discovery results per provider and the HTTP client that talks to providers.
pub struct Oidc {
    http: openidconnect::reqwest::Client,
    discovered: Mutex<HashMap<Name, Arc<Discovered>>>,
}

impl Oidc {
    pub(super) fn new() -> Self {
        let http = openidconnect::reqwest::Client::builder()
            // Following redirects from the provider's endpoints would allow SSRF.
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client builds");
        Self {
            http,
            discovered: Mutex::new(HashMap::new()),
        }
    }

    async fn discover(&self, idp: &IdentityProvider) -> Result<Arc<Discovered>, String> {
        if let Some(d) = self.discovered.lock().expect("oidc lock").get(&idp.name) {
            if d.revision == idp.revision {
                return Ok(d.clone());
            }
        }
        let issuer = IssuerUrl::new(idp.issuer.clone()).map_err(|e| e.to_string())?;
        let metadata = CoreProviderMetadata::discover_async(issuer, &self.http)
            .await
            .map_err(|e| format!("discovery at {} failed: {e}", idp.issuer))?;
        // end_session_endpoint is not in the core metadata; read it from the same document.
        let end_session = async {
            let url = format!(
                "{}/.well-known/openid-configuration",
                idp.issuer.trim_end_matches('/')
            );
            let body = self.http.get(url).send().await.ok()?.bytes().await.ok()?;
            let doc: serde_json::Value = serde_json::from_slice(&body).ok()?;
            doc.get("end_session_endpoint")?.as_str().map(str::to_owned)
        }
        .await;
        let d = Arc::new(Discovered {
            revision: idp.revision,
            metadata,
            end_session,
        });
        self.discovered
            .lock()
            .expect("oidc lock")
            .insert(idp.name.clone(), d.clone());
        Ok(d)
    }
}

/// The openidconnect client with the endpoints discovery sets.
type OidcClient = openidconnect::Client<
    openidconnect::EmptyAdditionalClaims,
    openidconnect::core::CoreAuthDisplay,
    openidconnect::core::CoreGenderClaim,
    openidconnect::core::CoreJweContentEncryptionAlgorithm,
    openidconnect::core::CoreJsonWebKey,
    openidconnect::core::CoreAuthPrompt,
    openidconnect::StandardErrorResponse<openidconnect::core::CoreErrorResponseType>,
    openidconnect::core::CoreTokenResponse,
    openidconnect::core::CoreTokenIntrospectionResponse,
    openidconnect::core::CoreRevocableToken,
    openidconnect::core::CoreRevocationErrorResponse,
    openidconnect::EndpointSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointMaybeSet,
    openidconnect::EndpointMaybeSet,
>;

fn client_for(
    idp: &IdentityProvider,
    d: &Discovered,
    redirect: &str,
) -> Result<OidcClient, String> {
    let secret = (!idp.client_secret.is_empty())
        .then(|| ClientSecret::new(idp.client_secret.expose().to_owned()));
    let redirect = RedirectUrl::new(redirect.to_owned()).map_err(|e| e.to_string())?;
    Ok(CoreClient::from_provider_metadata(
        d.metadata.clone(),
        ClientId::new(idp.client_id.clone()),
        secret,
    )
    .set_redirect_uri(redirect))
}

/// The claim `name` of a (verified) JWT's payload.
fn jwt_claim(jwt: &str, name: &str) -> Option<serde_json::Value> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get(name).cloned()
}

/// The scope providers commonly release group membership under.
const GROUPS_SCOPE: &str = "groups";

/// Whether the provider's discovery document lists the `groups` scope.
fn advertises_groups(d: &Discovered) -> bool {
    d.metadata
        .scopes_supported()
        .is_some_and(|s| s.iter().any(|s| s.as_str() == GROUPS_SCOPE))
}

fn groups_from(jwt: &str, claim: &str) -> Vec<String> {
    match jwt_claim(jwt, claim) {
        Some(serde_json::Value::Array(a)) => a
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .filter(|g| !g.is_empty() && g.len() <= 256)
            .take(256)
            .collect(),
        Some(serde_json::Value::String(s)) => vec![s],
        _ => Vec::new(),
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn with_cookies(mut resp: Response<Body>, cookies: &[String]) -> Response<Body> {
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

fn bad(title: &str, detail: &str) -> Response<Body> {
    page(StatusCode::BAD_REQUEST, title, detail)
}

/// A 200 HTML page of the proxy's own that must not be cached or framed (it carries a
/// sign-out button: framing it would let another site trick a click).
fn html_page(html: String) -> Response<Body> {
    pages::html_response(StatusCode::OK, html)
}

impl Proxy {
    /// Requests to the auth host.
    pub(super) async fn auth_host(
        self: &Arc<Self>,
        req: Request<Incoming>,
        state: &ProxyState,
    ) -> (Response<Body>, AccessLog) {
        let path = req.uri().path().to_owned();
        let resp = match path.as_str() {
            "/.warren/sign_in" => self.sign_in(&req, state).await,
            "/.warren/callback" => {
                let resp = self.callback(&req, state).await;
                self.metrics.record_sign_in(resp.status().as_u16());
                resp
            }
            "/.warren/sign_out" => self.sign_out(req, state, &self.settings.auth_host).await,
            // Where a provider with `post_logout_redirect` sends the browser after sign-out.
            "/.warren/signed_out" => page(
                StatusCode::OK,
                "Signed out",
                "You are signed out, here and at your identity provider.",
            ),
            "/.warren" | "/.warren/" | "/" => self.whoami(&req, state, &self.settings.auth_host),
            _ => page(
                StatusCode::NOT_FOUND,
                "Not found",
                "This is the sign-in host; there is nothing else here.",
            ),
        };
        (resp, AccessLog::internal("auth host"))
    }

    /// `/.warren/*` on a resource host.
    pub(super) async fn resource_host_pages(
        self: &Arc<Self>,
        req: Request<Incoming>,
        state: &ProxyState,
        host: &str,
        peer: std::net::SocketAddr,
    ) -> (Response<Body>, AccessLog) {
        let resp = match req.uri().path() {
            "/.warren/auth" => self.methods(req, state, host, peer).await,
            "/.warren/share" => self.share(req, state, host, peer).await,
            "/.warren/handoff" => self.handoff(&req, state, host).await,
            "/.warren/sign_out" => self.sign_out(req, state, host).await,
            "/.warren" | "/.warren/" => self.whoami(&req, state, host),
            _ => page(StatusCode::NOT_FOUND, "Not found", "No such Warren page."),
        };
        (resp, AccessLog::internal("warren page"))
    }

    /// Checks a post-sign-in URL: https, a host this cluster serves, this node's public
    /// port. Anything else would make the proxy an open redirect.
    fn check_rd(&self, state: &ProxyState, rd: &str) -> Option<url::Url> {
        let url = url::Url::parse(rd).ok()?;
        if url.scheme() != "https" || url.username() != "" || url.password().is_some() {
            return None;
        }
        let host = url.host_str()?.to_ascii_lowercase();
        let port = url.port().unwrap_or(443);
        if port != self.settings.public_https_port {
            return None;
        }
        if host == self.settings.auth_host {
            return Some(url);
        }
        // A session goes only to a host and path whose resource asks for one: never to a
        // public app, which could read the user's identity or sign them out.
        let path = warren_proto::canonical::canonical_path(url.path()).ok()?;
        state
            .config
            .route(&host, &path)
            .is_some_and(|r| r.takes_sso())
            .then_some(url)
    }

    fn session_from_cookie(
        &self,
        req: &Request<Incoming>,
        state: &ProxyState,
        host: &str,
    ) -> Option<SessionId> {
        let sealer = state.sealer.as_ref()?;
        let c: SessionCookie =
            sealer.open(Purpose::Session, cookie(req.headers(), SESSION_COOKIE)?)?;
        (c.host == host).then_some(SessionId(c.sid))
    }

    async fn sign_in(&self, req: &Request<Incoming>, state: &ProxyState) -> Response<Body> {
        let q = query(req);
        let rd = q.get("rd").map(String::as_str).unwrap_or("");
        let rd = if rd.is_empty() {
            format!("{}/.warren/", self.auth_origin())
        } else {
            rd.to_owned()
        };
        let Some(rd_url) = self.check_rd(state, &rd) else {
            return bad(
                "Bad sign-in link",
                "The address to return to after sign-in is not one this cluster serves.",
            );
        };
        let Some(sealer) = &state.sealer else {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Not ready",
                "The cluster is still starting; try again in a moment.",
            );
        };
        // Already signed in on the auth host: hand the session over without the provider.
        if let Some(sid) = self.session_from_cookie(req, state, &self.settings.auth_host) {
            if lookup_session(&state.registry, &state.config, sid, unix_now()).is_ok() {
                return self.redirect_handoff(state, sid, &rd_url, Vec::new());
            }
        }
        let idps = state.registry.identity_providers();
        let idp = match q.get("idp") {
            Some(name) => Name::new(name.clone())
                .ok()
                .and_then(|n| idps.get(&n).cloned()),
            None if idps.len() == 1 => idps.values().next().cloned(),
            None => None,
        };
        let Some(idp) = idp else {
            if idps.is_empty() {
                return page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Sign-in is not set up",
                    "No identity provider is configured for this cluster.",
                );
            }
            let links: String = idps
                .values()
                .filter_map(|p| {
                    url::Url::parse_with_params(
                        &format!("{}/.warren/sign_in", self.auth_origin()),
                        &[("rd", rd.as_str()), ("idp", p.name.as_str())],
                    )
                    .ok()
                    .map(|u| {
                        format!(
                            "<li><a class=\"button\" href=\"{}\">Continue with {}</a></li>",
                            esc(u.as_str()),
                            esc(p.title())
                        )
                    })
                })
                .collect();
            return html_page(pages::document(
                "Sign in",
                &format!("<p>Choose your identity provider.</p><ul class=\"choices\">{links}</ul>"),
            ));
        };
        let discovered = match self.oidc.discover(&idp).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(idp = %idp.name, "identity provider discovery failed: {e}");
                return page(
                    StatusCode::BAD_GATEWAY,
                    "Identity provider unavailable",
                    "The identity provider could not be reached; try again later.",
                );
            }
        };
        let callback = format!("{}/.warren/callback", self.auth_origin());
        let client = match client_for(&idp, &discovered, &callback) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(idp = %idp.name, "identity provider settings: {e}");
                return page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Sign-in is misconfigured",
                    "The identity provider's settings are not usable.",
                );
            }
        };
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut auth = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scope(Scope::new("email".into()))
            .add_scope(Scope::new("profile".into()))
            .set_pkce_challenge(challenge);
        for s in &idp.scopes {
            auth = auth.add_scope(Scope::new(s.clone()));
        }
        // Providers that release groups only under a `groups` scope (Keycloak, Authentik,
        // Okta, ...) say so in their discovery document: ask for it, or groups arrive empty.
        if !idp.scopes.iter().any(|s| s == GROUPS_SCOPE) && advertises_groups(&discovered) {
            auth = auth.add_scope(Scope::new(GROUPS_SCOPE.into()));
        }
        if idp.scopes.iter().any(|s| s == "offline_access") {
            // OIDC Core 11: offline access needs explicit consent.
            auth = auth.add_prompt(openidconnect::core::CoreAuthPrompt::Consent);
        }
        let (url, csrf, nonce) = auth.url();
        let login = LoginState {
            state: csrf.secret().clone(),
            nonce: nonce.secret().clone(),
            verifier: verifier.secret().clone(),
            rd,
            idp: idp.name.to_string(),
            exp: unix_now() + LOGIN_TTL,
        };
        let sealed = sealer.seal(Purpose::Login, &login);
        with_cookies(
            pages::redirect(url.as_str()),
            &[set_cookie(
                LOGIN_COOKIE,
                &sealed,
                "/.warren/callback",
                Some(LOGIN_TTL),
            )],
        )
    }

    async fn callback(&self, req: &Request<Incoming>, state: &ProxyState) -> Response<Body> {
        let q = query(req);
        let Some(sealer) = &state.sealer else {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Not ready",
                "Try again in a moment.",
            );
        };
        let login: Option<LoginState> =
            cookie(req.headers(), LOGIN_COOKIE).and_then(|c| sealer.open(Purpose::Login, c));
        let Some(login) = login else {
            return bad(
                "Sign-in expired",
                "This sign-in was not started here or took too long. Open the app again to sign in.",
            );
        };
        let clear_login = set_cookie(LOGIN_COOKIE, "", "/.warren/callback", Some(0));
        if login.exp < unix_now() {
            return with_cookies(
                bad(
                    "Sign-in expired",
                    "The sign-in took too long. Open the app again.",
                ),
                &[clear_login],
            );
        }
        let given_state = q.get("state").map(String::as_str).unwrap_or("");
        if !bool::from(given_state.as_bytes().ct_eq(login.state.as_bytes())) {
            tracing::warn!("sign-in callback with a state that does not match this browser's");
            return with_cookies(
                bad(
                    "Sign-in refused",
                    "The sign-in answer does not belong to this browser's sign-in.",
                ),
                &[clear_login],
            );
        }
        if let Some(err) = q.get("error") {
            let desc = q.get("error_description").cloned().unwrap_or_default();
            return with_cookies(
                page(
                    StatusCode::FORBIDDEN,
                    "Sign-in failed",
                    &format!("The identity provider said: {err} {desc}"),
                ),
                &[clear_login],
            );
        }
        let Some(code) = q.get("code") else {
            return with_cookies(
                bad("Sign-in refused", "The answer carries no code."),
                &[clear_login],
            );
        };
        let idp = Name::new(login.idp.clone())
            .ok()
            .and_then(|n| state.registry.identity_providers().get(&n).cloned());
        let Some(idp) = idp else {
            return with_cookies(
                bad(
                    "Sign-in failed",
                    "The identity provider was removed during sign-in.",
                ),
                &[clear_login],
            );
        };
        let result = self.finish_sign_in(&idp, code, &login).await;
        let account = match result {
            Ok(a) => a,
            Err(resp) => return with_cookies(resp, &[clear_login]),
        };
        let sid = account.session.id;
        let write = RaftRequest::new(
            Who::System,
            Command::SignIn {
                session: account.session,
                display_name: account.display_name,
                subject: account.subject,
                email_verified: account.email_verified,
            },
        );
        match self.cluster.write(write).await {
            Ok(Ok(Outcome::SignedIn { user, created })) => {
                if created {
                    tracing::info!(user = %user, idp = %idp.name, "created a user at sign-in: no user had this provider account, and none has its e-mail address as verified by the provider (create the user first, with that address, to have the sign-in link to it)");
                }
                tracing::info!(user = %user, created, idp = %idp.name, "signed in");
            }
            Ok(Err(RegistryError::EmailBelongsToAnotherUser { user })) => {
                tracing::info!(idp = %idp.name, "sign-in refused: its e-mail address belongs to another account");
                tracing::debug!(idp = %idp.name, %user, "the address belongs to this user");
                return with_cookies(
                    page(
                        StatusCode::FORBIDDEN,
                        "Account not linked",
                        "This e-mail address belongs to another account, so this sign-in cannot use it. Sign in the way you did before, or ask an administrator to link this account.",
                    ),
                    &[clear_login],
                );
            }
            Ok(Err(RegistryError::UserDisabled { .. })) => {
                return with_cookies(
                    page(
                        StatusCode::FORBIDDEN,
                        "Access denied",
                        "Your account is disabled.",
                    ),
                    &[clear_login],
                );
            }
            Ok(Err(RegistryError::NotInvited { .. })) => {
                tracing::info!(idp = %idp.name, "sign-in refused: no user matches this account (no linked account, no user with its verified e-mail address), and the provider has auto_create: false; add the user with that address to let it in");
                return with_cookies(
                    page(
                        StatusCode::FORBIDDEN,
                        "No account",
                        "You signed in, but there is no account for you here. Ask an administrator to add you, then sign in again.",
                    ),
                    &[clear_login],
                );
            }
            Ok(Err(RegistryError::Conflict { message })) => {
                return with_cookies(
                    page(StatusCode::FORBIDDEN, "Access denied", &message),
                    &[clear_login],
                )
            }
            Ok(other) => {
                tracing::warn!("recording a sign-in: {other:?}");
                return with_cookies(
                    page(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Sign-in failed",
                        "The sign-in could not be recorded.",
                    ),
                    &[clear_login],
                );
            }
            Err(e) => {
                tracing::warn!("recording a sign-in: {e}");
                return with_cookies(
                    page(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Sign-in unavailable",
                        "The cluster could not record the sign-in; try again in a moment.",
                    ),
                    &[clear_login],
                );
            }
        }
        let Some(rd) = self.check_rd(state, &login.rd) else {
            return with_cookies(
                bad("Bad sign-in link", "The return address is not valid."),
                &[clear_login],
            );
        };
        let auth_cookie = set_cookie(
            SESSION_COOKIE,
            &sealer.seal(
                Purpose::Session,
                &SessionCookie {
                    sid: sid.0,
                    host: self.settings.auth_host.clone(),
                },
            ),
            "/",
            None,
        );
        // The registry applied the sign-in on the leader; this node may apply it a moment
        // later, which the handoff on the resource host tolerates by retrying its lookup.
        self.redirect_handoff(state, sid, &rd, vec![clear_login, auth_cookie])
    }

    /// Exchanges the code, verifies the ID token, and makes the session.
    async fn finish_sign_in(
        &self,
        idp: &IdentityProvider,
        code: &str,
        login: &LoginState,
    ) -> Result<Account, Response<Body>> {
        let fail = |log: String| {
            tracing::warn!(idp = %idp.name, "sign-in failed: {log}");
            page(
                StatusCode::BAD_GATEWAY,
                "Sign-in failed",
                "The identity provider did not confirm the sign-in. Open the app again to retry.",
            )
        };
        let d = self.oidc.discover(idp).await.map_err(fail)?;
        let callback = format!("{}/.warren/callback", self.auth_origin());
        let client = client_for(idp, &d, &callback).map_err(fail)?;
        let token = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| fail(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(login.verifier.clone()))
            .request_async(&self.oidc.http)
            .await
            .map_err(|e| fail(format!("code exchange: {e}")))?;
        let id_token = token
            .id_token()
            .ok_or_else(|| fail("no ID token in the answer".into()))?;
        let claims = id_token
            .claims(
                &client.id_token_verifier(),
                &Nonce::new(login.nonce.clone()),
            )
            .map_err(|e| fail(format!("ID token: {e}")))?;
        let Some(email) = claims.email().map(|e| e.as_str().to_owned()) else {
            return Err(page(
                StatusCode::FORBIDDEN,
                "Sign-in failed",
                "The identity provider did not share your e-mail address, which Warren needs.",
            ));
        };
        let display_name = claims
            .name()
            .and_then(|n| n.get(None))
            .map(|n| n.as_str().to_owned());
        let subject = claims.subject().as_str().to_owned();
        // Some providers (Entra ID) send no `email_verified` but only hand out addresses
        // of their own directory: the admin says so with `trust_email`.
        let email_verified = claims.email_verified() == Some(true) || idp.trust_email;
        let jwt = id_token.to_string();
        let groups_claim = idp.groups_claim.as_deref().unwrap_or("groups");
        if jwt_claim(&jwt, groups_claim).is_none() {
            tracing::warn!(
                idp = %idp.name,
                claim = groups_claim,
                "the ID token has no groups claim: policies on the provider's groups will not match this user (release the claim at the provider, add its scope with `warren admin idp update --scope`, or set groups_claim to the claim it uses)"
            );
        }
        let groups = groups_from(&jwt, groups_claim);
        let now = unix_now();
        let session = Session {
            id: SessionId::random(),
            user: Name::new("pending").expect("valid name"),
            idp: idp.name.clone(),
            email,
            email_verified,
            groups,
            created_at: now,
            expires_at: now + self.settings.session_ttl.as_secs(),
            refresh_token: token
                .refresh_token()
                .map(|t| Secret::new(t.secret().clone())),
            token_expires_at: token.expires_in().map(|d| now + d.as_secs()),
            claims: jwt
                .split('.')
                .nth(1)
                .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
                .and_then(|b| String::from_utf8(b).ok())
                .filter(|c| c.len() <= 16 * 1024)
                .unwrap_or_default(),
            id_token: Some(Secret::new(jwt)),
            via: warren_proto::session::Via::Sso,
            resource: None,
        };
        Ok(Account {
            session,
            display_name,
            subject,
            email_verified,
        })
    }

    fn redirect_handoff(
        &self,
        state: &ProxyState,
        sid: SessionId,
        rd: &url::Url,
        cookies: Vec<String>,
    ) -> Response<Body> {
        let Some(sealer) = &state.sealer else {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Not ready",
                "Try again in a moment.",
            );
        };
        let host = rd.host_str().unwrap_or_default().to_ascii_lowercase();
        if host == self.settings.auth_host {
            return with_cookies(pages::redirect(rd.as_str()), &cookies);
        }
        let mut path = rd.path().to_owned();
        if let Some(q) = rd.query() {
            path.push('?');
            path.push_str(q);
        }
        let code = HandoffCode {
            sid: sid.0,
            host: host.clone(),
            rd: path,
            exp: unix_now() + HANDOFF_TTL,
            id: rand::random(),
        };
        let sealed = sealer.seal(Purpose::Handoff, &code);
        let to = format!(
            "https://{}/.warren/handoff?code={sealed}",
            authority_with_port(&host, self.settings.public_https_port)
        );
        with_cookies(pages::redirect(&to), &cookies)
    }

    async fn handoff(
        &self,
        req: &Request<Incoming>,
        state: &ProxyState,
        host: &str,
    ) -> Response<Body> {
        let q = query(req);
        let Some(sealer) = &state.sealer else {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Not ready",
                "Try again in a moment.",
            );
        };
        let code: Option<HandoffCode> =
            q.get("code").and_then(|c| sealer.open(Purpose::Handoff, c));
        let Some(code) = code else {
            return bad("Bad sign-in link", "This sign-in link is not valid.");
        };
        if code.host != host {
            return bad("Bad sign-in link", "This sign-in link is for another site.");
        }
        if code.exp < unix_now() {
            return bad("Sign-in link expired", "Open the app again to sign in.");
        }
        let consume = RaftRequest::new(
            Who::System,
            Command::ConsumeHandoff {
                id: code.id,
                expires_at: code.exp,
            },
        );
        match self.cluster.write(consume).await {
            Ok(Ok(_)) => {}
            Ok(Err(RegistryError::Conflict { message })) => {
                return bad(
                    "Sign-in link already used",
                    &format!("{message}. Open the app again."),
                )
            }
            Ok(Err(e)) => {
                tracing::warn!("consuming a handoff: {e}");
                return bad("Bad sign-in link", "This sign-in link is not valid.");
            }
            Err(e) => {
                tracing::warn!("consuming a handoff: {e}");
                return page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Sign-in unavailable",
                    "The cluster could not complete the sign-in; try again in a moment.",
                );
            }
        }
        // A forwarded write returns once the leader applied it; wait until this node has
        // too, so the session (and its sign-in, committed before) is visible here.
        let reg = match self.cluster.read().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("waiting for the sign-in to reach this node: {e}");
                return page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Sign-in unavailable",
                    "The cluster could not complete the sign-in; try again in a moment.",
                );
            }
        };
        if lookup_session(&reg, &state.config, SessionId(code.sid), unix_now()).is_err() {
            return bad(
                "Session ended",
                "The session this link was for has ended. Open the app again.",
            );
        }
        let rd = if code.rd.starts_with('/')
            && !code.rd.starts_with("//")
            && !code.rd.starts_with("/\\")
        {
            code.rd
        } else {
            "/".to_owned()
        };
        let cookie = set_cookie(
            SESSION_COOKIE,
            &sealer.seal(
                Purpose::Session,
                &SessionCookie {
                    sid: code.sid,
                    host: host.to_owned(),
                },
            ),
            "/",
            None,
        );
        with_cookies(pages::redirect(&rd), &[cookie])
    }

    /// `/.warren/sign_out`: a GET shows a confirmation form (it never signs out, so a link
    /// from another site cannot sign anyone out); a POST with that form's token ends the
    /// session everywhere and, where the provider supports it, at the provider too.
    async fn sign_out(
        &self,
        req: Request<Incoming>,
        state: &ProxyState,
        host: &str,
    ) -> Response<Body> {
        let sid = self.session_from_cookie(&req, state, host);
        match *req.method() {
            http::Method::GET | http::Method::HEAD => {
                return match sid {
                    Some(sid) => self.sign_out_page(state, sid, host),
                    None => page(StatusCode::OK, "Signed out", "You are not signed in here."),
                };
            }
            http::Method::POST => {}
            _ => {
                return page(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "Not allowed",
                    "Sign out with the button on the sign-out page.",
                )
            }
        }
        let refused = || {
            page(
                StatusCode::FORBIDDEN,
                "Sign-out refused",
                "This sign-out did not come from the sign-out page, or the page is too old. Open the sign-out page again.",
            )
        };
        let Some(sid) = sid else {
            return refused();
        };
        let form = super::methods::read_form(req).await;
        let token = form.as_ref().and_then(|f| f.get("token"));
        let Some(sealer) = &state.sealer else {
            return refused();
        };
        if !SignOutToken::allows(sealer, token.map(String::as_str), sid, host, unix_now()) {
            return refused();
        }
        let clear = set_cookie(SESSION_COOKIE, "", "/", Some(0));
        let session = state.registry.sessions().get(&sid).cloned();
        let revoke = RaftRequest::new(Who::System, Command::RevokeSession { id: sid });
        if let Err(e) = self.cluster.write(revoke).await {
            tracing::warn!("revoking a session at sign-out: {e}");
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign-out unavailable",
                "The cluster could not end the session; try again in a moment.",
            );
        }
        tracing::info!(session = ?sid, "signed out");
        // End the provider's session too, where it supports RP-initiated logout.
        if let Some(s) = session {
            let idp = state.registry.identity_providers().get(&s.idp).cloned();
            if let Some(idp) = idp {
                if let Ok(d) = self.oidc.discover(&idp).await {
                    if let Some(end) = &d.end_session {
                        let mut params = vec![("client_id", idp.client_id.clone())];
                        if let Some(t) = &s.id_token {
                            params.push(("id_token_hint", t.expose().to_owned()));
                        }
                        if idp.post_logout_redirect {
                            // Registered with the provider by the admin who turned this on.
                            params.push((
                                "post_logout_redirect_uri",
                                format!("{}/.warren/signed_out", self.auth_origin()),
                            ));
                        }
                        if let Ok(u) = url::Url::parse_with_params(end, &params) {
                            // 303: the browser follows a POST's redirect with a GET.
                            let mut resp = pages::redirect(u.as_str());
                            *resp.status_mut() = StatusCode::SEE_OTHER;
                            return with_cookies(resp, &[clear]);
                        }
                    }
                }
            }
        }
        with_cookies(
            page(StatusCode::OK, "Signed out", "You are signed out."),
            &[clear],
        )
    }

    /// The sign-out form of session `sid` on `host`, with its sealed token.
    fn sign_out_form(&self, state: &ProxyState, sid: SessionId, host: &str) -> Option<String> {
        let token = state.sealer.as_ref()?.seal(
            Purpose::SignOut,
            &SignOutToken {
                sid: sid.0,
                host: host.to_owned(),
                exp: unix_now() + SIGN_OUT_TTL,
            },
        );
        Some(format!(
            "<form method=\"post\" action=\"/.warren/sign_out\"><input type=\"hidden\" name=\"token\" value=\"{}\"><button id=\"sign-out\" type=\"submit\">Sign out</button></form>",
            esc(&token)
        ))
    }

    fn sign_out_page(&self, state: &ProxyState, sid: SessionId, host: &str) -> Response<Body> {
        let Some(form) = self.sign_out_form(state, sid, host) else {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Not ready",
                "Try again in a moment.",
            );
        };
        let html = format!(
            "<p>This ends your session on {} and every other site you opened with it.</p>{form}",
            esc(host)
        );
        html_page(pages::document("Sign out?", &html))
    }

    fn whoami(&self, req: &Request<Incoming>, state: &ProxyState, host: &str) -> Response<Body> {
        let principal = self
            .session_from_cookie(req, state, host)
            .and_then(|sid| lookup_session(&state.registry, &state.config, sid, unix_now()).ok());
        let Some(p) = principal else {
            // The auth host signs in with the provider; a resource's host through its own
            // sign-in page (which may offer a PIN or passcode too).
            let sign_in = if host == self.settings.auth_host {
                "/.warren/sign_in"
            } else {
                "/.warren/auth?rd=%2F"
            };
            return pages::page_with(
                StatusCode::UNAUTHORIZED,
                "Not signed in",
                "You are not signed in on this site.",
                &[(sign_in, "Sign in")],
            );
        };
        let wants_json = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/json"));
        if wants_json {
            let body = serde_json::json!({
                "user": p.name(),
                "via": p.session.via,
                "email": p.session.email,
                "email_verified": p.session.email_verified,
                "groups": p.groups,
                "idp": p.session.idp,
                "expires_at": p.session.expires_at,
            });
            return Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CACHE_CONTROL, "no-store")
                .body(pages::full(body.to_string()))
                .expect("valid response");
        }
        let groups = p
            .groups
            .iter()
            .map(|g| esc(g))
            .collect::<Vec<_>>()
            .join(", ");
        let form = self
            .sign_out_form(state, p.session.id, host)
            .unwrap_or_default();
        let html = format!(
            "<p>User: <b id=\"user\">{}</b></p><p>E-mail: <span id=\"email\">{}</span>{}</p>\
             <p>Groups: <span id=\"groups\">{}</span></p>{form}",
            esc(p.name()),
            esc(&p.session.email),
            if p.session.email_verified || p.session.email.is_empty() {
                ""
            } else {
                " (not verified by the identity provider: policies and apps do not see it)"
            },
            groups
        );
        html_page(pages::document("Signed in", &html))
    }
}

impl Proxy {
    /// Age at which the leader replaces the assertion signing key.
    /// Signs in a `warren` client from the ID token the provider issued to the CLI's client
    /// (`client_id`) in the device flow: the token's signature, issuer, audience and expiry
    /// are checked against the provider, then the sign-in is recorded like a browser's.
    /// Returns the session id and the user, or a reason for the client.
    pub(crate) async fn client_sign_in(
        &self,
        idp: &IdentityProvider,
        client_id: &str,
        id_token: &str,
    ) -> Result<(SessionId, Name, u64), (StatusCode, String)> {
        let bad = |why: String| (StatusCode::UNAUTHORIZED, why);
        let d = self
            .oidc
            .discover(idp)
            .await
            .map_err(|e| (StatusCode::BAD_GATEWAY, e))?;
        let client = CoreClient::from_provider_metadata(
            d.metadata.clone(),
            ClientId::new(client_id.to_owned()),
            None,
        );
        let token: openidconnect::core::CoreIdToken = id_token
            .parse()
            .map_err(|_| bad("the ID token is not a JWT".into()))?;
        // The device flow carries no nonce: the token is bound to the CLI's client by its
        // audience, and to now by its expiry.
        let claims = token
            .claims(&client.id_token_verifier(), |_: Option<&Nonce>| Ok(()))
            .map_err(|e| bad(format!("the ID token was refused: {e}")))?;
        let Some(email) = claims.email().map(|e| e.as_str().to_owned()) else {
            return Err((
                StatusCode::FORBIDDEN,
                "the identity provider did not share your e-mail address, which Warren needs"
                    .into(),
            ));
        };
        let display_name = claims
            .name()
            .and_then(|n| n.get(None))
            .map(|n| n.as_str().to_owned());
        let subject = claims.subject().as_str().to_owned();
        let email_verified = claims.email_verified() == Some(true) || idp.trust_email;
        let groups = groups_from(id_token, idp.groups_claim.as_deref().unwrap_or("groups"));
        let now = unix_now();
        let expires_at = now + self.settings.session_ttl.as_secs();
        let session = Session {
            id: SessionId::random(),
            user: Name::new("pending").expect("valid name"),
            idp: idp.name.clone(),
            email,
            email_verified,
            groups,
            created_at: now,
            expires_at,
            // The CLI's refresh token belongs to the CLI's client: the cluster cannot use it.
            refresh_token: None,
            token_expires_at: None,
            claims: id_token
                .split('.')
                .nth(1)
                .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
                .and_then(|b| String::from_utf8(b).ok())
                .filter(|c| c.len() <= 16 * 1024)
                .unwrap_or_default(),
            id_token: None,
            via: warren_proto::session::Via::Sso,
            resource: None,
        };
        let sid = session.id;
        let write = RaftRequest::new(
            Who::System,
            Command::SignIn {
                session,
                display_name,
                subject,
                email_verified,
            },
        );
        match self.cluster.write(write).await {
            Ok(Ok(Outcome::SignedIn { user, created })) => {
                tracing::info!(user = %user, created, idp = %idp.name, "signed in (client)");
                Ok((sid, user, expires_at))
            }
            Ok(Err(RegistryError::UserDisabled { .. })) => {
                Err((StatusCode::FORBIDDEN, "your account is disabled".into()))
            }
            Ok(Err(e)) => Err((StatusCode::FORBIDDEN, e.to_string())),
            Ok(Ok(other)) => Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("unexpected outcome {other:?}"),
            )),
            Err(e) => Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        }
    }

    pub(crate) fn signing_key_rotation(&self) -> Duration {
        self.settings.signing_key_rotation
    }

    /// Asks `idp` for new tokens with session `s`'s refresh token (discovery, then the
    /// token exchange). The `sessions` actor runs it as a task and decides what to do with
    /// the answer (`crate::sessions`).
    pub(crate) async fn refresh_session(
        &self,
        idp: &IdentityProvider,
        s: &Session,
    ) -> RefreshOutcome {
        let Some(refresh) = &s.refresh_token else {
            return RefreshOutcome::Failed("the session has no refresh token".into());
        };
        let d = match self.oidc.discover(idp).await {
            Ok(d) => d,
            Err(e) => return RefreshOutcome::Failed(e),
        };
        let callback = format!("{}/.warren/callback", self.auth_origin());
        let client = match client_for(idp, &d, &callback) {
            Ok(c) => c,
            Err(e) => return RefreshOutcome::Failed(e),
        };
        let refresh = RefreshToken::new(refresh.expose().to_owned());
        let request = match client.exchange_refresh_token(&refresh) {
            Ok(r) => r,
            Err(e) => {
                return RefreshOutcome::Failed(format!("the provider has no token endpoint: {e}"))
            }
        };
        match request.request_async(&self.oidc.http).await {
            Ok(token) => {
                let now = unix_now();
                let groups = token
                    .id_token()
                    .map(|t| {
                        groups_from(
                            &t.to_string(),
                            idp.groups_claim.as_deref().unwrap_or("groups"),
                        )
                    })
                    .unwrap_or_else(|| s.groups.clone());
                RefreshOutcome::Refreshed(Tokens {
                    refresh_token: token
                        .refresh_token()
                        .map(|t| Secret::new(t.secret().clone())),
                    token_expires_at: token.expires_in().map(|d| now + d.as_secs()),
                    groups,
                })
            }
            Err(RequestTokenError::ServerResponse(e)) => {
                RefreshOutcome::Refused(e.error().to_string())
            }
            Err(e) => RefreshOutcome::Failed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sign_out_token_is_good_for_its_session_host_and_time_only() {
        let sealer = Sealer::from_b64(&Sealer::generate_key()).unwrap();
        let sid = SessionId(7);
        let token = |sid: u128, host: &str, exp: u64| {
            sealer.seal(
                Purpose::SignOut,
                &SignOutToken {
                    sid,
                    host: host.into(),
                    exp,
                },
            )
        };
        let good = token(7, "app.example", 1000);
        let allows =
            |t: Option<&str>, sid, host, now| SignOutToken::allows(&sealer, t, sid, host, now);
        assert!(allows(Some(&good), sid, "app.example", 1000));
        assert!(!allows(None, sid, "app.example", 1000), "no token");
        assert!(
            !allows(Some(&good), SessionId(8), "app.example", 1000),
            "another session"
        );
        assert!(
            !allows(Some(&good), sid, "other.example", 1000),
            "another host"
        );
        assert!(!allows(Some(&good), sid, "app.example", 1001), "expired");
        assert!(!allows(Some("garbage"), sid, "app.example", 1000));
        // The same contents sealed for another purpose (a session cookie) do not count.
        let cookie = sealer.seal(
            Purpose::Session,
            &SignOutToken {
                sid: 7,
                host: "app.example".into(),
                exp: 1000,
            },
        );
        assert!(!allows(Some(&cookie), sid, "app.example", 1000));
        let other = Sealer::from_b64(&Sealer::generate_key()).unwrap();
        let foreign = other.seal(
            Purpose::SignOut,
            &SignOutToken {
                sid: 7,
                host: "app.example".into(),
                exp: 1000,
            },
        );
        assert!(
            !allows(Some(&foreign), sid, "app.example", 1000),
            "another cluster's key"
        );
    }
}
