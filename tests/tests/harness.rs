//! Smoke test of the web-access harness itself: the real OpenID provider, headless
//! Chromium through its login form, and every route of the test upstream.
//!
//! The upstream doubles as the relying party: the provider redirects the browser to the
//! upstream's echo route with the authorization code, and the test redeems it.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tokio_tungstenite::tungstenite::Message;
use warren_tests::oidc::{browser_async, BrowserArgs, Idp};
use warren_tests::phase;
use warren_tests::upstream::{download_pattern_sha256, Upstream};

const VERIFIER: &str = "harness-smoke-test-pkce-verifier-0123456789abcdefghijkl";

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn jwt_claims(jwt: &str) -> anyhow::Result<Value> {
    let payload = jwt.split('.').nth(1).context("not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Redeems a code or refresh token at the token endpoint; returns (status, JSON).
async fn token(
    http: &reqwest::Client,
    idp: &Idp,
    endpoint: &str,
    form: &[(&str, &str)],
) -> anyhow::Result<(u16, Value)> {
    let resp = http
        .post(endpoint)
        .basic_auth(&idp.client_id, Some(&idp.client_secret))
        .form(form)
        .send()
        .await?;
    Ok((resp.status().as_u16(), resp.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_browser_and_upstream_work() -> anyhow::Result<()> {
    let started = Instant::now();
    let up = Upstream::start("app").await?;
    let redirect = format!("{}/cb", up.url());
    let after_logout = format!("{}/logged-out", up.url());
    phase!("start the OpenID provider");
    let idp = Idp::start(
        std::slice::from_ref(&redirect),
        &[
            ("OP_ACCESS_TTL", "30"),
            ("POST_LOGOUT_REDIRECT_URIS", &after_logout),
        ],
    )?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;

    let disc: Value = http.get(idp.discovery_url()).send().await?.json().await?;
    assert_eq!(disc["issuer"], idp.issuer.as_str());
    let auth_ep = disc["authorization_endpoint"]
        .as_str()
        .context("no auth endpoint")?;
    let token_ep = disc["token_endpoint"]
        .as_str()
        .context("no token endpoint")?;

    phase!("log alice in with Chromium");
    let challenge = b64url(&Sha256::digest(VERIFIER.as_bytes()));
    let auth_url = reqwest::Url::parse_with_params(
        auth_ep,
        &[
            ("client_id", idp.client_id.as_str()),
            ("response_type", "code"),
            ("scope", "openid email profile groups offline_access"),
            ("redirect_uri", redirect.as_str()),
            ("state", "st-1"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ],
    )?;
    let tmp = tempfile::tempdir()?;
    let storage = tmp.path().join("storage.json");
    let seen = browser_async(
        BrowserArgs::new(auth_url.as_str())
            .login("alice", "alice-pw")
            .storage_out(&storage),
    )
    .await?;
    assert!(seen.url.starts_with(&redirect), "landed on {}", seen.url);
    assert_eq!(seen.status, Some(200));
    assert!(seen.non_loopback_requests().is_empty());
    let echo: Value = serde_json::from_str(&seen.text).context("echo JSON")?;
    assert_eq!(echo["upstream"], "app");
    let cb = reqwest::Url::parse(&format!("http://x{}", echo["path"].as_str().unwrap()))?;
    let param = |k: &str| {
        cb.query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
    };
    assert_eq!(param("state").as_deref(), Some("st-1"));
    let code = param("code").context("no code in the callback")?;
    let session = seen.cookie("_session").context("no IdP session cookie")?;
    assert_eq!(session.domain, "127.0.0.1");
    assert!(session.http_only);
    assert!(storage.exists());

    phase!("redeem the code, refresh, disable alice");
    let (status, tok) = token(
        &http,
        &idp,
        token_ep,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", &redirect),
            ("code_verifier", VERIFIER),
        ],
    )
    .await?;
    assert_eq!(status, 200, "{tok}");
    assert_eq!(tok["expires_in"], 30);
    let claims = jwt_claims(tok["id_token"].as_str().context("no id_token")?)?;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["email"], "alice@example.test");
    assert_eq!(claims["groups"], serde_json::json!(["admins", "dev"]));
    let refresh = tok["refresh_token"]
        .as_str()
        .context("no refresh_token")?
        .to_owned();
    let (status, again) = token(
        &http,
        &idp,
        token_ep,
        &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
    )
    .await?;
    assert_eq!(status, 200, "{again}");
    assert!(again["access_token"].is_string());

    phase!("single sign-on with the saved cookies");
    let sso = browser_async(BrowserArgs::new(auth_url.as_str()).storage_in(&storage)).await?;
    assert!(sso.url.starts_with(&redirect), "SSO landed on {}", sso.url);

    phase!("RP-initiated logout (confirms itself)");
    let end = disc["end_session_endpoint"]
        .as_str()
        .context("no end_session_endpoint")?;
    let logout_url = reqwest::Url::parse_with_params(
        end,
        &[
            ("client_id", idp.client_id.as_str()),
            ("post_logout_redirect_uri", after_logout.as_str()),
        ],
    )?;
    let out = browser_async(BrowserArgs::new(logout_url.as_str()).storage_in(&storage)).await?;
    assert_eq!(out.url, after_logout);
    assert!(out.cookie("_session").is_none(), "{:?}", out.cookies);

    idp.disable("alice")?;
    let (status, refused) = token(
        &http,
        &idp,
        token_ep,
        &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
    )
    .await?;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"], "invalid_grant");

    phase!("upstream routes");
    let base = up.url();
    let v: Value = http
        .get(format!("{base}/echo/a?b=1"))
        .header("x-test", "one")
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(v["upstream"], "app");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/echo/a?b=1");
    assert_eq!(v["headers"]["x-test"], serde_json::json!(["one"]));

    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let v: Value = http
        .post(format!("{base}/upload"))
        .body(body.clone())
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(v["bytes"], body.len());
    assert_eq!(v["sha256"], hex::encode(Sha256::digest(&body)));

    for q in ["bytes=1000003", "bytes=70000&chunked=1"] {
        let n: u64 = q["bytes=".len()..].split('&').next().unwrap().parse()?;
        let resp = http.get(format!("{base}/download?{q}")).send().await?;
        assert_eq!(resp.status(), 200);
        let got = resp.bytes().await?;
        assert_eq!(got.len() as u64, n);
        assert_eq!(
            hex::encode(Sha256::digest(&got)),
            download_pattern_sha256(n)
        );
    }
    assert_eq!(
        http.get(format!("{base}/status/418"))
            .send()
            .await?
            .status(),
        418
    );
    let t = Instant::now();
    assert_eq!(
        http.get(format!("{base}/slow?ms=150"))
            .send()
            .await?
            .status(),
        200
    );
    assert!(t.elapsed() >= Duration::from_millis(150));

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", up.addr)).await?;
    ws.send(Message::text("ping-text")).await?;
    assert_eq!(
        ws.next().await.context("ws closed")??,
        Message::text("ping-text")
    );
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).await?;
    assert_eq!(
        ws.next().await.context("ws closed")??,
        Message::binary(vec![0u8, 1, 2, 255])
    );
    ws.close(None).await?;

    let short = Upstream::start("short").await?;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", short.addr)).await?;
    drop(short);
    let end = tokio::time::timeout(Duration::from_secs(2), ws.next()).await?;
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");

    phase!("Chromium over HTTPS and WSS to app.localhost (self-signed)");
    let tls = Upstream::start_tls("app-tls", &["app.localhost"]).await?;
    let port = tls.addr.port();
    let seen = browser_async(
        BrowserArgs::new(format!("https://app.localhost:{port}/hello"))
            .ws(format!("wss://app.localhost:{port}/ws")),
    )
    .await?;
    assert_eq!(seen.status, Some(200));
    let echo: Value = serde_json::from_str(&seen.text)?;
    assert_eq!(echo["upstream"], "app-tls");
    assert_eq!(
        echo["headers"]["host"],
        serde_json::json!([format!("app.localhost:{port}")])
    );
    assert_eq!(seen.ws.as_deref(), Some("hello-ws"));
    assert!(seen.non_loopback_requests().is_empty());

    phase!("done in {:?}", started.elapsed());
    Ok(())
}
