//! `warren login`, `warren login status` and `warren logout`: signing in with an OpenID
//! provider through the OAuth 2.0 Device Authorization Grant (RFC 8628).
//!
//! `warren login` discovers the provider, asks it for a device code, shows the person where to
//! confirm it, polls the token endpoint until they have (honouring `interval`, `slow_down` and
//! the code's lifetime), verifies the ID token (signature against the provider's keys, issuer,
//! audience, expiry) and stores the tokens with [`crate::token::save`]. Tokens are never
//! printed.

use std::time::Duration;

use anyhow::{anyhow, Context as _};
use clap::{Args, Subcommand};
use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClient, CoreClientAuthMethod,
    CoreDeviceAuthorizationResponse, CoreGrantType, CoreJsonWebKey,
    CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreResponseMode,
    CoreResponseType, CoreSubjectIdentifierType, CoreUserInfoClaims,
};
use openidconnect::{
    AccessTokenHash, AdditionalProviderMetadata, ClientId, DeviceAuthorizationUrl,
    DeviceCodeErrorResponseType, DiscoveryError, IssuerUrl, JwsSigningAlgorithm as _, Nonce,
    OAuth2TokenResponse as _, ProviderMetadata, RequestTokenError, RevocationUrl, Scope,
    TokenResponse as _,
};
use serde::{Deserialize, Serialize};

use crate::api::error_chain;
use crate::enroll;
use crate::token::{self, Secret, StoredToken};

/// `warren login [status]`.
#[derive(Debug, Args)]
pub struct Login {
    /// Where to sign in.
    #[command(flatten)]
    pub args: LoginArgs,
    /// Instead of signing in.
    #[command(subcommand)]
    pub cmd: Option<LoginCmd>,
}

/// Which provider and client to sign in with.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The identity provider's issuer URL (https://, or http:// on loopback), as its
    /// /.well-known/openid-configuration names it.
    #[arg(long, env = "WARREN_OIDC_ISSUER")]
    pub issuer: Option<String>,
    /// The OAuth client id of the CLI at that provider (a public client with the device flow).
    #[arg(long, env = "WARREN_OIDC_CLIENT_ID")]
    pub client_id: Option<String>,
    /// A scope to request besides openid, email, profile and offline_access (repeat for more).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// The Warren node to sign in to (`https://host:port`, its client API): it names the
    /// identity provider and client id, so --issuer and --client-id are then overrides.
    /// Without it, the node of the last login.
    #[arg(long, env = "WARREN_NODE")]
    pub node: Option<String>,
    /// The CA certificate (PEM) the node's certificate is checked against; default: the
    /// public web roots, or the CA of the last login to the same node.
    #[arg(long, env = "WARREN_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// Which of the cluster's identity providers to sign in with (default: its first).
    #[arg(long, env = "WARREN_PROVIDER")]
    pub provider: Option<String>,
    /// The name to register this machine under (default: `<user>-<hostname>`, or the name
    /// of the last login).
    #[arg(long, env = "WARREN_DEVICE_NAME")]
    pub device_name: Option<String>,
}

/// `warren login` subcommands.
#[derive(Debug, Subcommand)]
pub enum LoginCmd {
    /// Show who is signed in, where, and until when.
    Status,
}

/// What discovery must tell us besides the core metadata.
#[derive(Clone, Debug, Deserialize, Serialize)]
struct ExtraMetadata {
    /// RFC 8628.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
    /// RFC 7009 (advertised per RFC 8414).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revocation_endpoint: Option<RevocationUrl>,
}

impl AdditionalProviderMetadata for ExtraMetadata {}

type Metadata = ProviderMetadata<
    ExtraMetadata,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// Scopes asked for besides `openid` (which the client adds itself).
const DEFAULT_SCOPES: [&str; 3] = ["email", "profile", "offline_access"];

/// Runs `warren login` or `warren login status`.
pub async fn run(login: Login) -> anyhow::Result<()> {
    match login.cmd {
        Some(LoginCmd::Status) => status(),
        None => sign_in(&login.args).await,
    }
}

/// An HTTP client for the provider: no redirects (they would allow SSRF and could carry
/// credentials elsewhere), bounded waits.
fn http_client() -> anyhow::Result<openidconnect::reqwest::Client> {
    openidconnect::reqwest::Client::builder()
        .redirect(openidconnect::reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build an HTTP client")
}

/// Refuses plain HTTP except on loopback: tokens would cross the network in clear text.
fn check_url(what: &str, url: &openidconnect::url::Url) -> anyhow::Result<()> {
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            let host = url.host_str().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host == "localhost"
                || host.ends_with(".localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                anyhow::bail!("{what} {url} is plain http://; only https:// is allowed (or http:// on loopback)")
            }
        }
        other => anyhow::bail!("{what} {url}: unsupported scheme {other}:, use https://"),
    }
}

async fn discover(issuer: &str, http: &openidconnect::reqwest::Client) -> anyhow::Result<Metadata> {
    let url = IssuerUrl::new(issuer.to_owned()).map_err(|e| {
        anyhow!("--issuer {issuer:?} is not a URL ({e}); give the provider's issuer, like https://login.example.com")
    })?;
    check_url("--issuer", url.url())?;
    Metadata::discover_async(url, http)
        .await
        .map_err(|e| match e {
            DiscoveryError::Request(e) => anyhow!(
                "cannot reach the identity provider at {issuer}: {}; check --issuer \
                 (WARREN_OIDC_ISSUER) and that the provider is up",
                transport_error(&e)
            ),
            DiscoveryError::Validation(msg) => anyhow!(
                "OpenID discovery at {issuer} failed: {msg}; --issuer (WARREN_OIDC_ISSUER) must \
                 be the issuer exactly as the provider names it (mind a trailing slash)"
            ),
            other => anyhow!(
                "OpenID discovery at {issuer} failed: {}; check --issuer (WARREN_OIDC_ISSUER): \
                 it must be the provider's issuer URL, without /.well-known/openid-configuration",
                error_chain(&other)
            ),
        })
}

/// A failed HTTP exchange, without the layers that only say "request failed".
fn transport_error(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        let boilerplate = s == "Request failed"
            || s == "client error"
            || s.starts_with("error sending request for url");
        if !boilerplate {
            parts.push(s);
        }
        cur = err.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

async fn sign_in(args: &LoginArgs) -> anyhow::Result<()> {
    if let Some(node) = enroll::node_for_login(args)? {
        return enroll::sign_in(args, node).await;
    }
    let issuer = args
        .issuer
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            anyhow!(
                "no identity provider: give --node URL (or set WARREN_NODE) to sign in to a \
                 Warren cluster, or --issuer URL (or set WARREN_OIDC_ISSUER)"
            )
        })?;
    let client_id = args.client_id.as_deref().filter(|s| !s.is_empty()).ok_or_else(|| {
        anyhow!("no client id: give --client-id ID (or set WARREN_OIDC_CLIENT_ID), the CLI's client at {issuer}")
    })?;
    device_flow(issuer, client_id, &args.scopes).await.map(drop)
}

/// Runs the device flow at `issuer` as `client_id`, verifies the ID token, stores the
/// tokens in `token.json` and says who signed in; returns what it stored.
pub(crate) async fn device_flow(
    issuer: &str,
    client_id: &str,
    extra_scopes: &[String],
) -> anyhow::Result<StoredToken> {
    let path = token::token_path()?;
    let http = http_client()?;
    let metadata = discover(issuer, &http).await?;
    // The issuer exactly as discovery confirmed it (the ID token must carry this one).
    let issuer = metadata.issuer().as_str().to_owned();
    let device_url = metadata
        .additional_metadata()
        .device_authorization_endpoint
        .clone()
        .ok_or_else(|| {
            anyhow!(
                "{issuer} does not offer the device flow (its discovery document has no \
                 device_authorization_endpoint); ask its administrator to enable it"
            )
        })?;
    check_url("the device authorization endpoint", device_url.url())?;
    if let Some(token_url) = metadata.token_endpoint() {
        check_url("the token endpoint", token_url.url())?;
    }
    // A public client has no shared secret, so only the provider's key pairs can sign.
    let algs: Vec<_> = metadata
        .id_token_signing_alg_values_supported()
        .iter()
        .filter(|a| a.key_type().is_some() && !a.uses_shared_secret())
        .cloned()
        .collect();
    let client =
        CoreClient::from_provider_metadata(metadata, ClientId::new(client_id.into()), None)
            .set_device_authorization_url(device_url);

    let mut scopes: Vec<String> = DEFAULT_SCOPES.iter().map(|s| (*s).to_owned()).collect();
    for s in extra_scopes.iter().flat_map(|s| s.split_whitespace()) {
        if s != "openid" && !scopes.iter().any(|x| x == s) {
            scopes.push(s.to_owned());
        }
    }
    let details: CoreDeviceAuthorizationResponse = client
        .exchange_device_code()
        .add_scopes(scopes.into_iter().map(Scope::new))
        .request_async(&http)
        .await
        .map_err(|e| match e {
            RequestTokenError::ServerResponse(r) => anyhow!(
                "{issuer} refused the device authorization request: {r}; check --client-id \
                 {client_id} (it must be a public client allowed the device flow) and --scope"
            ),
            other => anyhow!(
                "the device authorization request to {issuer} failed: {}",
                transport_error(&other)
            ),
        })?;

    let minutes = details.expires_in().as_secs().div_ceil(60);
    let code = printable(details.user_code().secret());
    let uri = printable(details.verification_uri().as_str());
    match details.verification_uri_complete() {
        Some(complete) => eprintln!(
            "To sign in, open this page in a browser and check that it shows the code {code}:\n\n    \
             {}\n\n(Or open {uri} and enter the code.)",
            printable(complete.secret()),
        ),
        None => eprintln!(
            "To sign in, open this page in a browser:\n\n    {uri}\n\nand enter the code {code}"
        ),
    }
    eprintln!("Waiting for you to finish (the code expires in {minutes} min)...");

    // The library polls the token endpoint: every `interval` seconds (5 if the provider gave
    // none), 5 s more after each `slow_down`, until `expires_in` has passed. The floor keeps
    // a provider that says `interval: 0` from being hammered.
    let token = client
        .exchange_device_access_token(&details)
        .map_err(|e| anyhow!("{issuer}: {e}"))?
        .request_async(
            &http,
            |interval| tokio::time::sleep(interval.max(Duration::from_secs(1))),
            None,
        )
        .await
        .map_err(|e| match e {
            RequestTokenError::ServerResponse(r) => match r.error() {
                DeviceCodeErrorResponseType::ExpiredToken => anyhow!(
                    "the code expired before the sign-in was confirmed; run `warren login` \
                     again and confirm within {minutes} min"
                ),
                DeviceCodeErrorResponseType::AccessDenied => anyhow!(
                    "the sign-in was denied at {issuer} (access_denied); run `warren login` \
                     again to retry"
                ),
                _ => anyhow!("{issuer} refused the sign-in: {r}; run `warren login` again"),
            },
            other => anyhow!(
                "getting the tokens from {issuer} failed: {}",
                transport_error(&other)
            ),
        })?;

    let id_token = token.id_token().ok_or_else(|| {
        anyhow!("{issuer} returned no ID token; the client {client_id} must be allowed the openid scope")
    })?;
    let mut verifier = client.id_token_verifier();
    if !algs.is_empty() {
        verifier = verifier.set_allowed_algs(algs);
    }
    // The device flow has no nonce; issuer, audience, expiry and signature are checked.
    let claims = id_token
        .claims(&verifier, |_: Option<&Nonce>| Ok(()))
        .map_err(|e| anyhow!("the ID token from {issuer} does not verify: {e}"))?;
    if let Some(expected) = claims.access_token_hash() {
        let alg = id_token.signing_alg()?;
        let key = id_token.signing_key(&verifier)?;
        let actual = AccessTokenHash::from_token(token.access_token(), alg, key)
            .map_err(|e| anyhow!("cannot check the ID token's at_hash: {e}"))?;
        if actual != *expected {
            anyhow::bail!("the ID token from {issuer} does not match its access token (at_hash)");
        }
    }

    let mut email = claims.email().map(|e| e.as_str().to_owned());
    if email.is_none() {
        // Providers that keep ID tokens small put the address in userinfo only.
        let usable = client
            .user_info_url()
            .is_some_and(|u| check_url("userinfo", u.url()).is_ok());
        if let (true, Ok(req)) = (
            usable,
            client.user_info(token.access_token().clone(), Some(claims.subject().clone())),
        ) {
            let info: Result<CoreUserInfoClaims, _> = req.request_async(&http).await;
            match info {
                Ok(info) => email = info.email().map(|e| e.as_str().to_owned()),
                Err(e) => eprintln!(
                    "warren: warning: cannot read your e-mail address from {issuer}'s userinfo: {}",
                    transport_error(&e)
                ),
            }
        }
    }
    let expires_at = match token.expires_in() {
        Some(d) => jiff::Timestamp::from_second(
            jiff::Timestamp::now()
                .as_second()
                .saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        )
        .context("the token's expires_in is out of range")?,
        None => jiff::Timestamp::from_second(claims.expiration().timestamp())?,
    };
    let stored = StoredToken {
        issuer: issuer.clone(),
        client_id: client_id.to_owned(),
        access_token: Secret::new(token.access_token().secret().as_str()),
        refresh_token: token
            .refresh_token()
            .map(|r| Secret::new(r.secret().as_str())),
        id_token: Secret::new(id_token.to_string()),
        expires_at,
        email,
    };
    token::save(&path, &stored)?;
    println!(
        "Signed in as {} at {issuer}; the sign-in is stored in {}",
        who(&stored),
        path.display()
    );
    if stored.refresh_token.is_none() {
        eprintln!(
            "warren: note: {issuer} issued no refresh token, so you will have to sign in again \
             at {expires_at}"
        );
    }
    Ok(stored)
}

/// `s` with control characters replaced, so a provider cannot drive the terminal.
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

pub(crate) fn who(t: &StoredToken) -> String {
    t.email.as_deref().map_or_else(
        || "an account without an e-mail address".to_owned(),
        printable,
    )
}

fn status() -> anyhow::Result<()> {
    let path = token::token_path()?;
    let Some(t) = token::load(&path)? else {
        anyhow::bail!("not signed in: run `warren login --issuer URL --client-id ID`");
    };
    println!(
        "Signed in as {} at {} (client {})",
        who(&t),
        t.issuer,
        t.client_id
    );
    let left = t.expires_at.duration_since(jiff::Timestamp::now());
    let refresh = match (&t.refresh_token, left.is_positive()) {
        (Some(_), _) => "a refresh token is stored",
        (None, true) => "there is no refresh token, so run `warren login` again by then",
        (None, false) => "there is no refresh token: run `warren login` again",
    };
    if left.is_positive() {
        println!(
            "The access token expires at {} (in {:#}); {refresh}.",
            t.expires_at,
            jiff::SignedDuration::from_secs(left.as_secs())
        );
    } else {
        println!(
            "The access token expired at {} ({:#} ago); {refresh}.",
            t.expires_at,
            jiff::SignedDuration::from_secs(-left.as_secs())
        );
    }
    println!("Stored in {}", path.display());
    if let Ok(Some(n)) = crate::session::load(&crate::session::session_path()?) {
        if let (Some(user), Some(_)) = (&n.user, &n.token) {
            println!("Signed in to {} as {}", n.node, printable(user));
        }
        if let Some(d) = &n.device {
            println!(
                "This machine is device {} with tunnel address {}",
                printable(&d.name),
                d.address
            );
        }
    }
    Ok(())
}

/// Runs `warren logout`: revokes the refresh token (or, without one, the access token) at the
/// provider if it advertises a revocation endpoint, then deletes the stored sign-in. A failed
/// revocation is a warning: the local sign-in is deleted regardless.
pub async fn logout() -> anyhow::Result<()> {
    // The node session goes first: it is only a file here, and it must not outlive the
    // provider's tokens.
    let node_path = crate::session::session_path()?;
    let node = crate::session::load(&node_path).ok().flatten();
    match crate::session::forget(&node_path) {
        Ok(true) => eprintln!(
            "Forgot the session with {}",
            node.map(|n| n.node).unwrap_or_default()
        ),
        Ok(false) => {}
        Err(e) => eprintln!("warren: warning: {e:#}"),
    }
    let path = token::token_path()?;
    let t = match token::load(&path) {
        Ok(Some(t)) => t,
        Ok(None) => {
            println!("Not signed in; nothing to do.");
            return Ok(());
        }
        Err(e) => {
            // A damaged file cannot be revoked, but it can still be removed.
            eprintln!("warren: warning: {e:#}");
            token::remove(&path)?;
            println!("Deleted {}", path.display());
            return Ok(());
        }
    };
    match tokio::time::timeout(Duration::from_secs(30), revoke(&t)).await {
        Ok(Ok(Some(what))) => eprintln!("Revoked the {what} at {}", t.issuer),
        Ok(Ok(None)) => eprintln!(
            "warren: note: {} advertises no revocation endpoint; the tokens stay valid there until they expire",
            t.issuer
        ),
        Ok(Err(e)) => eprintln!(
            "warren: warning: could not revoke the tokens at {}: {e:#}; they stay valid there until they expire",
            t.issuer
        ),
        Err(_) => eprintln!(
            "warren: warning: {} did not answer the revocation in 30 s; the tokens stay valid there until they expire",
            t.issuer
        ),
    }
    token::remove(&path)?;
    println!("Signed out {} at {}", who(&t), t.issuer);
    Ok(())
}

/// Revokes the refresh token (else the access token); which one, or None if the provider has
/// no revocation endpoint.
async fn revoke(t: &StoredToken) -> anyhow::Result<Option<&'static str>> {
    let http = http_client()?;
    let metadata = discover(&t.issuer, &http).await?;
    let Some(url) = metadata.additional_metadata().revocation_endpoint.clone() else {
        return Ok(None);
    };
    check_url("the revocation endpoint", url.url())?;
    let (what, hint, token) = match &t.refresh_token {
        Some(r) => ("refresh token", "refresh_token", r),
        None => ("access token", "access_token", &t.access_token),
    };
    // RFC 7009 by hand: the oauth2 crate refuses a revocation endpoint that is not https://,
    // and check_url allows http:// on loopback. A public client identifies itself in the body.
    let resp = http
        .post(url.url().as_str())
        .form(&[
            ("token", token.expose()),
            ("token_type_hint", hint),
            ("client_id", t.client_id.as_str()),
        ])
        .send()
        .await
        .map_err(|e| anyhow!("{url}: {}", transport_error(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.bytes().await.unwrap_or_default();
        let detail = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .map(|v| {
                let field = |k: &str| {
                    v.get(k)
                        .and_then(|x| x.as_str())
                        .unwrap_or_default()
                        .to_owned()
                };
                format!("{} {}", field("error"), field("error_description"))
            })
            .unwrap_or_default();
        anyhow::bail!("{url} answered {status} {}", detail.trim());
    }
    Ok(Some(what))
}
