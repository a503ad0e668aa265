//! The identity-aware proxy, black box: three real nodes, a real OpenID provider
//! (npm oidc-provider), a real headless Chromium, and a plain HTTP app behind the proxy.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{json, Value};
use warren_tests::oidc::{browser_async, screenshot_path, BrowserArgs, BrowserOutcome, Idp};
use warren_tests::upstream::Upstream;
use warren_tests::{certs, phase, port_of, web_client, Cluster};

const HOSTS: [&str; 8] = [
    "auth.localhost",
    "app.localhost",
    "corp.localhost",
    "open.localhost",
    "lan.localhost",
    "claims.localhost",
    "noclaim.localhost",
    "staff.localhost",
];

/// Opens a session on `host` with a session of the auth host, as the browser would:
/// sign-in link, handoff, cookie. Returns the cookie, or the status that stopped it.
async fn session_for(
    web: &reqwest::Client,
    auth_cookie: &str,
    host: &str,
    port: u16,
) -> anyhow::Result<Result<String, StatusCode>> {
    let resp = web
        .get(format!(
            "https://auth.localhost:{port}/.warren/sign_in?rd=https%3A%2F%2F{host}%3A{port}%2Fecho"
        ))
        .header("cookie", auth_cookie)
        .send()
        .await?;
    let Some(handoff) = resp.headers().get("location").and_then(|v| v.to_str().ok()) else {
        return Ok(Err(resp.status()));
    };
    let resp = web.get(handoff).send().await?;
    Ok(resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned)
        .ok_or(resp.status()))
}

/// `warren admin ARGS` against node `i`, which must succeed; its output.
fn cli_ok(cluster: &Cluster, i: usize, args: &[&str]) -> anyhow::Result<String> {
    let (ok, out, err) = tokio::task::block_in_place(|| cluster.warren(i, args));
    anyhow::ensure!(ok, "warren admin {args:?}: {err}");
    Ok(out)
}

/// The hidden token of the sign-out form on `page`.
fn form_token(page: &str) -> Option<String> {
    let re = regex::Regex::new(r#"name="token" value="([^"]+)""#).ok()?;
    Some(re.captures(page)?[1].to_owned())
}

/// An HTTPS client that sends every `*.localhost` name to loopback and trusts `cert`.
fn web(cert_pem: &str) -> reqwest::Client {
    web_client(cert_pem, &HOSTS, Duration::from_secs(30))
        .build()
        .unwrap()
}

fn session_cookie(b: &BrowserOutcome, domain: &str) -> anyhow::Result<String> {
    let c = b
        .cookies
        .iter()
        .find(|c| c.name == "__Host-warren_session" && c.domain.trim_start_matches('.') == domain)
        .with_context(|| format!("no session cookie for {domain}: {:?}", b.cookies))?;
    assert!(c.http_only && c.secure, "cookie flags: {c:?}");
    assert_eq!(c.same_site, "Lax");
    Ok(format!("__Host-warren_session={}", c.value))
}

async fn echo(
    web: &reqwest::Client,
    url: &str,
    cookie: Option<&str>,
    extra: &[(&str, &str)],
) -> anyhow::Result<(StatusCode, Value, String)> {
    let mut req = web.get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = resp.text().await?;
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, v, location))
}

/// Polls until `f` holds (bounded), returning how long it took.
async fn eventually<F, Fut>(what: &str, mut f: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    for _ in 0..200 {
        if f().await? {
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("{what} did not happen within {:?}", start.elapsed())
}

/// Checks an ES256 JWT against a JWKS document.
fn verify_jwt(jwt: &str, jwks: &Value) -> anyhow::Result<Value> {
    let parts: Vec<&str> = jwt.split('.').collect();
    anyhow::ensure!(parts.len() == 3, "not a JWT");
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0])?)?;
    anyhow::ensure!(header["alg"] == "ES256");
    let key = jwks["keys"]
        .as_array()
        .context("keys")?
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .context("the JWT's kid is not published")?;
    let mut point = vec![4u8];
    point.extend(URL_SAFE_NO_PAD.decode(key["x"].as_str().context("x")?)?);
    point.extend(URL_SAFE_NO_PAD.decode(key["y"].as_str().context("y")?)?);
    let signed = format!("{}.{}", parts[0], parts[1]);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &point)
        .verify(signed.as_bytes(), &URL_SAFE_NO_PAD.decode(parts[2])?)
        .map_err(|_| anyhow::anyhow!("the JWT signature does not verify"))?;
    Ok(serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1])?)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sign_in_policies_and_revocation_across_nodes() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let app = Upstream::start("app").await?;
    let cluster = Cluster::start(3).await?;
    let https: Vec<u16> = (0..3)
        .map(|i| port_of(&cluster.nodes[i].https_addr))
        .collect();
    let redirects: Vec<String> = https
        .iter()
        .map(|p| format!("https://auth.localhost:{p}/.warren/callback"))
        .collect();
    let signed_out = https
        .iter()
        .map(|p| format!("https://auth.localhost:{p}/.warren/signed_out"))
        .collect::<Vec<_>>()
        .join(",");
    let idp = tokio::task::spawn_blocking(move || {
        Idp::start(
            &redirects,
            &[("POST_LOGOUT_REDIRECT_URIS", signed_out.as_str())],
        )
    })
    .await??;
    let (cert, key) = certs::self_signed(&HOSTS);
    let web = web(&cert);
    let api = cluster.api(0);

    phase!("configure: certificate, identity provider, policies, resources");
    api.post_ok(
        "/v1/certificates",
        &json!({"name": "local", "cert_pem": cert, "key_pem": key}),
    )
    .await?;
    let (_, shown) = api.get("/v1/certificates/local").await?;
    assert!(
        shown.get("key_pem").is_none(),
        "the key is never returned: {shown}"
    );
    assert_eq!(shown["domains"].as_array().unwrap().len(), HOSTS.len());
    api.post_ok(
        "/v1/identity-providers",
        // No `scopes`: the provider releases groups only under its `groups` scope, which
        // it advertises; the sign-in must ask for it on its own (alice's admin policy
        // below would deny her otherwise).
        &json!({"name": "test", "issuer": idp.issuer, "client_id": idp.client_id,
                "client_secret": idp.client_secret, "groups_claim": "groups"}),
    )
    .await?;
    let utc_today = {
        let days = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            / 86_400;
        // 1970-01-01 was a Thursday.
        (days + 3) % 7
    };
    let day = |i: u64| ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][(i % 7) as usize];
    let policies = json!([
        {"name": "admins", "allow": {"group": "admins"}},
        {"name": "corp", "allow": {"email_domain": "corp.test"}},
        {"name": "example-staff", "allow": {"email_domain": "example.test"}},
        {"name": "lan-only", "allow": {"and": [{"group": "admins"}, {"source_cidr": "10.0.0.0/8"}]}},
        {"name": "named-alice", "allow": {"claim": {"path": "name", "value": "Alice Test"}}},
        {"name": "named-nobody", "allow": {"claim": {"path": "name", "value": "Nobody"}}},
        {"name": "this-week-not-now", "allow": {"and": [{"group": "admins"},
            {"time": {"days": [day(utc_today + 2), day(utc_today + 3), day(utc_today + 4)],
                      "from": "00:00", "to": "24:00", "timezone": "UTC"}}]}},
    ]);
    for p in policies.as_array().unwrap() {
        api.post_ok("/v1/policies", p).await?;
    }
    let target = app.addr.to_string();
    for (name, domain, policy) in [
        ("app", "app.localhost", "admins"),
        ("corp", "corp.localhost", "corp"),
        ("lan", "lan.localhost", "lan-only"),
        ("claims", "claims.localhost", "named-alice"),
        ("staff", "staff.localhost", "example-staff"),
        ("noclaim", "noclaim.localhost", "named-nobody"),
    ] {
        api.post_ok(
            "/v1/resources",
            &json!({"name": name, "route": {"http": {"domain": domain}},
                    "targets": [target], "policies": [policy]}),
        )
        .await?;
    }
    api.post_ok(
        "/v1/resources",
        &json!({"name": "weekend", "route": {"http": {"domain": "app.localhost", "path_prefix": "/later"}},
                "targets": [target], "policies": ["this-week-not-now"]}),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &json!({"name": "open", "route": {"http": {"domain": "open.localhost"}},
                "targets": [target], "http": {"public": true}}),
    )
    .await?;
    let jwks_url = format!(
        "https://auth.localhost:{}/.well-known/warren/jwks.json",
        https[2]
    );
    eventually("the cluster's signing keys are published", || async {
        Ok(web.get(&jwks_url).send().await?.status() == StatusCode::OK)
    })
    .await?;
    let jwks: Value = web.get(&jwks_url).send().await?.json().await?;
    // The writes were acknowledged by the leader; a follower applies them a
    // moment later. "open" was written last, so a node that serves it has
    // every resource and policy above.
    for port in &https {
        let url = format!("https://open.localhost:{port}/echo");
        eventually("every node serves the last resource written", || async {
            Ok(echo(&web, &url, None, &[]).await?.0 == StatusCode::OK)
        })
        .await?;
    }

    phase!("a public resource needs no sign-in and gets no identity");
    let (status, body, _) = echo(
        &web,
        &format!("https://open.localhost:{}/echo", https[1]),
        None,
        &[("x-warren-user", "mallory")],
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["headers"].get("x-warren-user").is_none(), "{body}");

    phase!("alice signs in with Chromium through node 1");
    let dir = tempfile::tempdir()?;
    let alice_state = dir.path().join("alice.json");
    let b = browser_async(
        BrowserArgs::new(format!(
            "https://app.localhost:{}/echo?from=browser",
            https[0]
        ))
        .login("alice", "alice-pw")
        .storage_out(&alice_state)
        .ws(format!("wss://app.localhost:{}/ws", https[0])),
    )
    .await?;
    assert!(
        b.url.starts_with(&format!(
            "https://app.localhost:{}/echo?from=browser",
            https[0]
        )),
        "landed on {}",
        b.url
    );
    let seen: Value = serde_json::from_str(&b.text).with_context(|| b.text.clone())?;
    assert_eq!(seen["headers"]["x-warren-user"], json!(["alice"]));
    assert_eq!(
        seen["headers"]["x-warren-email"],
        json!(["alice@example.test"])
    );
    assert!(seen["headers"]["x-warren-groups"][0]
        .as_str()
        .unwrap()
        .contains("admins"));
    assert_eq!(
        b.ws.as_deref(),
        Some("hello-ws"),
        "WebSocket echo through the proxy"
    );
    assert!(b.non_loopback_requests().is_empty());
    let alice = session_cookie(&b, "app.localhost")?;

    phase!("user get shows the provider account a sign-in finds alice by");
    let (ok, shown, err) = cluster.warren(2, &["user", "get", "alice"]);
    assert!(ok, "{err}");
    assert!(
        shown.contains("test alice"),
        "provider and subject:\n{shown}"
    );
    let logs = cluster.logs();
    assert!(
        logs.contains("created a user at sign-in"),
        "no user was made for alice beforehand; the log says one was created:\n{logs}"
    );

    phase!("the identity assertion verifies against the published JWKS");
    let jwt = seen["headers"]["x-warren-jwt-assertion"][0]
        .as_str()
        .context("no JWT")?;
    let claims = verify_jwt(jwt, &jwks)?;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], "app.localhost");
    let ttl = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert!(
        (240..=360).contains(&ttl),
        "exp about 5 minutes after iat: {ttl}"
    );
    let mut forged = jwt.to_owned();
    forged.pop();
    forged.push(if jwt.ends_with('A') { 'B' } else { 'A' });
    assert!(verify_jwt(&forged, &jwks).is_err());

    phase!("the session started on node 1 works on node 3; spoofed identity headers are stripped");
    let (status, body, _) = echo(
        &web,
        &format!("https://app.localhost:{}/echo", https[2]),
        Some(&alice),
        &[
            ("x-warren-user", "mallory"),
            ("X-Warren-Groups", "admins"),
            ("x-warren-jwt-assertion", "x"),
        ],
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["headers"]["x-warren-user"], json!(["alice"]));
    assert_ne!(body["headers"]["x-warren-jwt-assertion"], json!(["x"]));
    assert!(
        body["headers"].get("cookie").is_none(),
        "the proxy's cookie does not reach the app: {body}"
    );

    phase!("rotate the signing key through node 2: node 3 signs with the new key, the old one stays published");
    let rotated = cluster
        .api(1)
        .post_ok("/v1/signing-keys/rotate", &json!({}))
        .await?;
    let new_kid = rotated["rotated"]["kid"]
        .as_str()
        .context("kid")?
        .to_owned();
    eventually("node 3 publishes the new key", || async {
        let jwks: Value = web.get(&jwks_url).send().await?.json().await?;
        Ok(jwks.to_string().contains(&new_kid))
    })
    .await?;
    let jwks: Value = web.get(&jwks_url).send().await?.json().await?;
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2, "{jwks}");
    verify_jwt(jwt, &jwks).context("an assertion signed before the rotation still verifies")?;
    let (_, body, _) = echo(
        &web,
        &format!("https://app.localhost:{}/echo", https[2]),
        Some(&alice),
        &[],
    )
    .await?;
    let jwt2 = body["headers"]["x-warren-jwt-assertion"][0]
        .as_str()
        .context("no JWT")?;
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(jwt2.split('.').next().unwrap())?)?;
    assert_eq!(header["kid"], new_kid.as_str());
    verify_jwt(jwt2, &jwks)?;

    phase!(
        "policies: source CIDR and time window deny alice; another host does not take her cookie"
    );
    let (status, body, _) = echo(
        &web,
        &format!("https://app.localhost:{}/later/x", https[1]),
        Some(&alice),
        &[],
    )
    .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "time window: {body}");
    let (status, _, location) = echo(
        &web,
        &format!("https://lan.localhost:{}/", https[1]),
        Some(&alice.replace("app", "lan")),
        &[],
    )
    .await?;
    assert_eq!(
        status,
        StatusCode::FOUND,
        "a cookie for app.localhost is not one for lan.localhost"
    );
    assert!(location.contains("/.warren/sign_in"), "{location}");

    phase!("a claim rule: alice's ID token name opens one resource, not the other");
    let alice_auth = {
        let state: Value = serde_json::from_str(&std::fs::read_to_string(&alice_state)?)?;
        let c = state["cookies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "__Host-warren_session" && c["domain"] == "auth.localhost")
            .context("no auth-host cookie")?
            .clone();
        format!("__Host-warren_session={}", c["value"].as_str().unwrap())
    };
    let cookie = session_for(&web, &alice_auth, "claims.localhost", https[1])
        .await?
        .map_err(|s| anyhow::anyhow!("no session for claims.localhost: {s}"))?;
    let (status, body, _) = echo(
        &web,
        &format!("https://claims.localhost:{}/echo", https[1]),
        Some(&cookie),
        &[],
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let cookie = session_for(&web, &alice_auth, "noclaim.localhost", https[1])
        .await?
        .map_err(|s| anyhow::anyhow!("no session for noclaim.localhost: {s}"))?;
    let (status, _, _) = echo(
        &web,
        &format!("https://noclaim.localhost:{}/echo", https[1]),
        Some(&cookie),
        &[],
    )
    .await?;
    assert_eq!(status, StatusCode::FORBIDDEN);

    phase!("bob is denied by group; the denied page offers to sign out and switch user; carol gets in by e-mail domain");
    let bob_state = dir.path().join("bob.json");
    let b = browser_async(
        BrowserArgs::new(format!("https://app.localhost:{}/echo", https[1]))
            .login("bob", "bob-pw")
            .storage_out(&bob_state)
            .screenshot(screenshot_path("denied")),
    )
    .await?;
    assert_eq!(b.status, Some(403), "{}", b.text);
    assert!(
        b.text.contains("Access denied") && b.text.contains("Sign out to switch user"),
        "{}",
        b.text
    );
    assert_eq!(b.design_problems(), Vec::<String>::new(), "the denied page");
    assert!(!b.layout.dark, "light unless the system asks for dark");
    let b = browser_async(
        BrowserArgs::new(format!("https://app.localhost:{}/echo", https[1]))
            .storage_in(&bob_state)
            .dark()
            .screenshot(screenshot_path("denied-dark")),
    )
    .await?;
    assert_eq!(b.status, Some(403), "{}", b.text);
    assert!(
        b.layout.dark,
        "the denied page follows the system's dark mode: {:?}",
        b.layout
    );
    assert_eq!(
        b.design_problems(),
        Vec::<String>::new(),
        "the denied page in dark mode (contrast {:?})",
        b.layout.contrast
    );
    let b = browser_async(
        BrowserArgs::new(format!("https://app.localhost:{}/echo", https[1]))
            .storage_in(&bob_state)
            .click("a[href='/.warren/sign_out']")
            .viewport(390, 844)
            .screenshot(screenshot_path("sign-out-narrow")),
    )
    .await?;
    assert!(
        b.url.ends_with("/.warren/sign_out") && b.text.contains("Sign out?"),
        "the link leads to the sign-out page: {} {}",
        b.url,
        b.text
    );
    assert_eq!(
        b.design_problems(),
        Vec::<String>::new(),
        "the sign-out page, 390 px wide"
    );

    phase!("the cluster's title, set with the CLI, names the cluster on every page it serves");
    let out = cli_ok(&cluster, 0, &["cluster", "title", "Acme access"])?;
    assert!(out.contains("Acme access"), "{out}");
    let (status, body) = api
        .send(
            reqwest::Method::PUT,
            "/v1/cluster/title",
            &json!({"title": "bad\ntitle"}),
        )
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        api.get_ok("/v1/cluster/title").await?,
        json!({"title": "Acme access"}),
        "a refused title changes nothing"
    );
    for port in &https {
        let url = format!("https://auth.localhost:{port}/.warren/");
        eventually("every node's pages carry the title", || async {
            let text = web.get(&url).send().await?.text().await?;
            Ok(text.contains("<footer id=\"cluster\">Acme access</footer>")
                && text.contains("<title>Not signed in \u{b7} Acme access</title>"))
        })
        .await?;
    }

    phase!("the proxy's own pages, in a real browser: one design, no external assets, a way on");
    let auth = format!("https://auth.localhost:{}", https[0]);
    for (name, url, status, wants) in [
        (
            "auth-host-not-signed-in",
            format!("{auth}/.warren/"),
            401,
            "Sign in",
        ),
        (
            "bad-sign-in-link",
            format!("{auth}/.warren/sign_in?rd=https%3A%2F%2Fevil.example%2F"),
            400,
            "Bad sign-in link",
        ),
        (
            "resource-not-signed-in",
            format!("https://app.localhost:{}/.warren/", https[2]),
            401,
            "Sign in",
        ),
    ] {
        let b = browser_async(
            BrowserArgs::new(&url)
                .viewport(390, 844)
                .screenshot(screenshot_path(name)),
        )
        .await?;
        assert_eq!(b.status, Some(status), "{name}: {}", b.text);
        assert!(b.text.contains(wants), "{name}: {}", b.text);
        assert!(b.text.contains("Acme access"), "{name}: {}", b.text);
        assert_eq!(b.design_problems(), Vec::<String>::new(), "{name}");
        let png = std::fs::read(screenshot_path(name))?;
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 2000,
            "{name}: a screenshot"
        );
    }
    phase!("a refused POST without a session is not redirected (its body would be lost): a 401 page links to the sign-in");
    let r = web
        .post(format!("https://app.localhost:{}/echo", https[1]))
        .body("a=1")
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        r.headers().get("location").is_none(),
        "no redirect for a POST"
    );
    let body = r.text().await?;
    assert!(
        body.contains("href=\"/.warren/auth?rd=%2F\""),
        "the 401 page of a refused POST links to the sign-in: {body}"
    );
    phase!(
        "the auth host's 401 links to the sign-in, which signs alice in and lands on who she is"
    );
    let b = browser_async(
        BrowserArgs::new(format!("{auth}/.warren/"))
            .click("a[href='/.warren/sign_in']")
            .login("alice", "alice-pw"),
    )
    .await?;
    assert!(
        b.status == Some(200) && b.text.contains("alice"),
        "{} {:?}: {}",
        b.url,
        b.status,
        b.text
    );
    let b = browser_async(
        BrowserArgs::new(format!("https://corp.localhost:{}/echo", https[2]))
            .login("carol", "carol-pw"),
    )
    .await?;
    let seen: Value = serde_json::from_str(&b.text).with_context(|| b.text.clone())?;
    assert_eq!(seen["headers"]["x-warren-user"], json!(["carol"]));
    let b = browser_async(
        BrowserArgs::new(format!("https://lan.localhost:{}/echo", https[0]))
            .storage_in(&alice_state),
    )
    .await?;
    assert_eq!(b.status, Some(403), "source CIDR rule: {}", b.text);

    phase!("an unverified e-mail address does not take over the provisioned user who has it");
    api.post_ok(
        "/v1/users",
        &json!({"name": "dave", "email": "dave@example.test"}),
    )
    .await?;
    let dave_before = api.get_ok("/v1/users/dave").await?;
    let users_before = api.get_ok("/v1/users").await?;
    // mallory's provider account claims dave's address, unverified (and the admins group).
    let b = browser_async(
        BrowserArgs::new(format!("https://app.localhost:{}/echo", https[2]))
            .login("mallory", "mallory-pw"),
    )
    .await?;
    assert_eq!(b.status, Some(403), "{}", b.text);
    assert!(b.text.contains("belongs to another account"), "{}", b.text);
    assert!(
        !b.cookies
            .iter()
            .any(|c| c.name == "__Host-warren_session" && c.domain == "app.localhost"),
        "no session for the app: {:?}",
        b.cookies
    );
    assert_eq!(api.get_ok("/v1/users/dave").await?, dave_before);
    assert_eq!(
        api.get_ok("/v1/users").await?,
        users_before,
        "no user was created either"
    );
    let sessions = api.get_ok("/v1/sessions").await?;
    assert!(
        !sessions.to_string().contains("dave"),
        "no session for dave: {sessions}"
    );

    phase!("an unverified address matches no e-mail policy, reaches no app and squats nothing");
    // Without dave's user nothing stops mallory's sign-in: she gets a user of her own.
    let (status, body) = api
        .raw(reqwest::Method::DELETE, "/v1/users/dave", None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let b = browser_async(
        BrowserArgs::new(format!("https://staff.localhost:{}/echo", https[0]))
            .login("mallory", "mallory-pw"),
    )
    .await?;
    assert_eq!(b.status, Some(403), "email_domain example.test: {}", b.text);
    assert!(b.text.contains("Access denied"), "{}", b.text);
    let mallory_auth = b
        .cookies
        .iter()
        .find(|c| {
            c.name == "__Host-warren_session"
                && c.domain.trim_start_matches('.') == "auth.localhost"
        })
        .map(|c| format!("__Host-warren_session={}", c.value))
        .with_context(|| format!("mallory is signed in: {:?}", b.cookies))?;
    let me: Value = web
        .get(format!("https://auth.localhost:{}/.warren/", https[1]))
        .header("cookie", &mallory_auth)
        .header("accept", "application/json")
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(me["email"], "dave@example.test", "{me}");
    assert_eq!(me["email_verified"], false, "{me}");
    let user = me["user"].as_str().context("user")?.to_owned();
    let shown = api.get_ok(&format!("/v1/users/{user}")).await?;
    assert!(
        shown["email"].is_null(),
        "the user holds no address: {shown}"
    );
    // mallory is in the admins group, so the app lets her in, but is not told the address.
    let cookie = session_for(&web, &mallory_auth, "app.localhost", https[1])
        .await?
        .map_err(|s| anyhow::anyhow!("no session for app.localhost: {s}"))?;
    let (status, body, _) = echo(
        &web,
        &format!("https://app.localhost:{}/echo", https[1]),
        Some(&cookie),
        &[("x-warren-email", "dave@example.test")],
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["headers"]["x-warren-user"], json!([user]));
    assert!(body["headers"].get("x-warren-email").is_none(), "{body}");
    let claims = verify_jwt(
        body["headers"]["x-warren-jwt-assertion"][0]
            .as_str()
            .context("no JWT")?,
        &jwks,
    )?;
    assert!(claims.get("email").is_none(), "{claims}");
    assert_eq!(claims["email_verified"], false, "{claims}");
    // alice's address is verified: the same policy lets her in, and the app is told it.
    let cookie = session_for(&web, &alice_auth, "staff.localhost", https[2])
        .await?
        .map_err(|s| anyhow::anyhow!("no session for staff.localhost: {s}"))?;
    let (status, body, _) = echo(
        &web,
        &format!("https://staff.localhost:{}/echo", https[2]),
        Some(&cookie),
        &[],
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["headers"]["x-warren-email"],
        json!(["alice@example.test"])
    );
    let claims = verify_jwt(
        body["headers"]["x-warren-jwt-assertion"][0]
            .as_str()
            .context("no JWT")?,
        &jwks,
    )?;
    assert_eq!(claims["email"], "alice@example.test");
    assert_eq!(claims["email_verified"], true);
    // The address is still free for its owner.
    api.post_ok(
        "/v1/users",
        &json!({"name": "dave-owner", "email": "dave@example.test"}),
    )
    .await?;

    phase!("bad input: open redirect, forged state, forged and replayed codes, forged cookie");
    let (status, _, _) = echo(
        &web,
        &format!(
            "https://auth.localhost:{}/.warren/sign_in?rd=https%3A%2F%2Fevil.example%2F",
            https[0]
        ),
        None,
        &[],
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "open redirect refused");
    let (status, _, _) = echo(
        &web,
        &format!(
            "https://auth.localhost:{}/.warren/sign_in?rd=https%3A%2F%2Fapp.localhost%3A1%2F",
            https[0]
        ),
        None,
        &[],
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "another port is refused");
    let start = web
        .get(format!(
            "https://auth.localhost:{}/.warren/sign_in?rd=https%3A%2F%2Fapp.localhost%3A{}%2F",
            https[0], https[0]
        ))
        .send()
        .await?;
    assert_eq!(start.status(), StatusCode::FOUND);
    let login_cookie = start
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("no login cookie")?
        .to_owned();
    let (status, body, _) = echo(
        &web,
        &format!(
            "https://auth.localhost:{}/.warren/callback?code=abc&state=forged",
            https[0]
        ),
        Some(&login_cookie),
        &[],
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _, _) = echo(
        &web,
        &format!(
            "https://auth.localhost:{}/.warren/callback?code=abc&state=forged",
            https[0]
        ),
        None,
        &[],
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "no sign-in cookie");
    let (status, _, _) = echo(
        &web,
        &format!(
            "https://app.localhost:{}/.warren/handoff?code=AAAA",
            https[0]
        ),
        None,
        &[],
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "forged handoff code");
    let mut tampered = alice.clone();
    tampered.push('x');
    let (status, _, _) = echo(
        &web,
        &format!("https://app.localhost:{}/echo", https[0]),
        Some(&tampered),
        &[],
    )
    .await?;
    assert_eq!(
        status,
        StatusCode::FOUND,
        "a forged cookie means sign in again"
    );
    // A handoff code works once: get one with alice's auth-host session.
    let auth_cookie = alice_auth.clone();
    let (status, _, handoff) = echo(
        &web,
        &format!(
            "https://auth.localhost:{}/.warren/sign_in?rd=https%3A%2F%2Fapp.localhost%3A{}%2Fecho",
            https[0], https[0]
        ),
        Some(&auth_cookie),
        &[],
    )
    .await?;
    assert_eq!(status, StatusCode::FOUND);
    assert!(handoff.contains("/.warren/handoff?code="), "{handoff}");
    let (status, _, to) = echo(&web, &handoff, None, &[]).await?;
    assert_eq!((status, to.as_str()), (StatusCode::FOUND, "/echo"));
    let (status, body, _) = echo(&web, &handoff, None, &[]).await?;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a replayed handoff code: {body}"
    );

    phase!("change the policy through node 2: node 3 applies it to alice's next request");
    cluster
        .api(1)
        .send(
            reqwest::Method::PATCH,
            "/v1/policies/admins",
            &json!({"allow": {"group": "nobody"}}),
        )
        .await?;
    eventually("node 3 denies under the changed policy", || async {
        let (status, _, _) = echo(
            &web,
            &format!("https://app.localhost:{}/echo", https[2]),
            Some(&alice),
            &[],
        )
        .await?;
        Ok(status == StatusCode::FORBIDDEN)
    })
    .await?;
    cluster
        .api(1)
        .send(
            reqwest::Method::PATCH,
            "/v1/policies/admins",
            &json!({"allow": {"group": "admins"}}),
        )
        .await?;
    eventually("node 3 allows again", || async {
        let (status, _, _) = echo(
            &web,
            &format!("https://app.localhost:{}/echo", https[2]),
            Some(&alice),
            &[],
        )
        .await?;
        Ok(status == StatusCode::OK)
    })
    .await?;

    phase!("revoke alice's session through node 2: node 3 denies her next request");
    let sessions = cluster.api(1).get_ok("/v1/sessions").await?;
    let alice_sessions: Vec<String> = sessions["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["user"] == "alice")
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!alice_sessions.is_empty());
    assert!(
        !sessions.to_string().contains("refresh_token"),
        "no tokens in the API: {sessions}"
    );
    assert!(
        !sessions.to_string().contains("id_token"),
        "no tokens in the API: {sessions}"
    );
    for id in &alice_sessions {
        let (status, body) = cluster
            .api(1)
            .raw(reqwest::Method::DELETE, &format!("/v1/sessions/{id}"), None)
            .await?;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let took = eventually("node 3 denies the revoked session", || async {
        let (status, _, _) = echo(
            &web,
            &format!("https://app.localhost:{}/echo", https[2]),
            Some(&alice),
            &[],
        )
        .await?;
        Ok(status == StatusCode::FOUND)
    })
    .await?;
    eprintln!("revocation reached node 3 {took:?} after the API answered on node 2");

    phase!("disable carol through node 2: node 3 denies her next request");
    let carol_state = dir.path().join("carol.json");
    let b = browser_async(
        BrowserArgs::new(format!("https://corp.localhost:{}/echo", https[0]))
            .login("carol", "carol-pw")
            .storage_out(&carol_state),
    )
    .await?;
    let carol = session_cookie(&b, "corp.localhost")?;
    cluster
        .api(1)
        .send(
            reqwest::Method::PATCH,
            "/v1/users/carol",
            &json!({"disabled": true}),
        )
        .await?;
    eventually("node 3 denies the disabled user", || async {
        let (status, _, _) = echo(
            &web,
            &format!("https://corp.localhost:{}/echo", https[2]),
            Some(&carol),
            &[],
        )
        .await?;
        Ok(status == StatusCode::FORBIDDEN)
    })
    .await?;

    phase!("metrics count requests, decisions and sign-ins by result");
    let invalid = |t: &str| {
        warren_tests::metric_value(t, "warren_sign_ins_total{result=\"invalid\"}").unwrap_or(0)
    };
    let invalid_before = invalid(&cluster.metrics_text(0).await?);
    let forged = web
        .get(format!(
            "https://auth.localhost:{}/.warren/callback?state=forged&code=x",
            https[0]
        ))
        .send()
        .await?;
    assert_eq!(forged.status(), StatusCode::BAD_REQUEST);
    let admin_web = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(
            cluster.ca(),
        )?)?)
        .build()?;
    let mut texts = Vec::new();
    for node in &cluster.nodes {
        let resp = admin_web
            .get(format!("https://{}/metrics", node.admin_addr))
            .bearer_auth(&cluster.admin_key)
            .send()
            .await?;
        assert_eq!(resp.status(), StatusCode::OK);
        texts.push(resp.text().await?);
    }
    let signed_in: u64 = texts
        .iter()
        .map(|t| {
            warren_tests::metric_value(t, "warren_sign_ins_total{result=\"success\"}").unwrap_or(0)
        })
        .sum();
    assert!(
        signed_in >= 3,
        "the browser sign-ins are counted: {signed_in}"
    );
    assert_eq!(
        invalid(&texts[0]),
        invalid_before + 1,
        "the forged callback is counted as invalid:\n{}",
        texts[0]
    );
    let text = texts.swap_remove(0);
    let count = |metric: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(metric))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        count("warren_proxy_decisions_total{decision=\"allow\"}") >= 1,
        "{text}"
    );
    assert!(
        count("warren_proxy_decisions_total{decision=\"deny\"}") >= 1,
        "{text}"
    );
    assert!(
        count("warren_proxy_request_duration_seconds_count") >= 3,
        "{text}"
    );

    phase!("sign-out: a GET only asks, a POST without the page's token changes nothing");
    let alice_state = dir.path().join("alice-again.json");
    let b = browser_async(
        BrowserArgs::new(format!("https://app.localhost:{}/echo", https[0]))
            .login("alice", "alice-pw")
            .storage_out(&alice_state),
    )
    .await?;
    let alice = session_cookie(&b, "app.localhost")?;
    let sign_out = format!("https://app.localhost:{}/.warren/sign_out", https[1]);
    let (status, page, _) = echo(&web, &sign_out, Some(&alice), &[]).await?;
    assert_eq!(status, StatusCode::OK, "{page}");
    let page = page.as_str().unwrap_or_default();
    assert!(
        page.contains("method=\"post\"") && page.contains("id=\"sign-out\""),
        "{page}"
    );
    let token = form_token(page).context("no token in the sign-out form")?;
    let still_in = || async {
        let (status, _, _) = echo(
            &web,
            &format!("https://app.localhost:{}/echo", https[0]),
            Some(&alice),
            &[],
        )
        .await?;
        Ok::<_, anyhow::Error>(status == StatusCode::OK)
    };
    assert!(still_in().await?, "a GET of the sign-out page signed out");
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    let (_, whoami, _) = echo(
        &web,
        &format!("https://app.localhost:{}/.warren/", https[2]),
        Some(&alice),
        &[],
    )
    .await?;
    let whoami = whoami.as_str().unwrap_or_default();
    assert!(whoami.contains("id=\"sign-out\""), "{whoami}");
    for (form, cookie, why) in [
        (vec![], Some(alice.as_str()), "no token"),
        (
            vec![("token", forged.as_str())],
            Some(&alice),
            "a forged token",
        ),
        (vec![("token", token.as_str())], None, "no session cookie"),
    ] {
        let mut post = web.post(&sign_out).form(&form);
        if let Some(c) = cookie {
            post = post.header("cookie", c);
        }
        let resp = post.send().await?;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{why}");
        assert!(
            resp.headers().get("set-cookie").is_none(),
            "{why}: no cookie is cleared"
        );
        assert!(still_in().await?, "{why} signed out");
    }

    phase!("a path-routed resource with a prefix rewrite: the prefix is replaced in the path sent upstream, nothing else");
    api.post_ok(
        "/v1/resources",
        &json!({"name": "wiki", "route": {"http": {"domain": "app.localhost", "path_prefix": "/wiki"}},
                "targets": [target], "policies": ["admins"], "http": {"prefix_rewrite": "/"}}),
    )
    .await?;
    let shown = api.get_ok("/v1/resources/wiki").await?;
    assert_eq!(shown["http"]["prefix_rewrite"], json!("/"), "{shown}");
    let (status, body) = api
        .send(
            reqwest::Method::POST,
            "/v1/resources",
            &json!({"name": "wiki2", "route": {"http": {"domain": "wiki.localhost"}},
                    "targets": [target], "http": {"prefix_rewrite": "/"}}),
        )
        .await?;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "no prefix to rewrite: {body}"
    );
    assert_eq!(
        body["error"]["field"],
        json!("http.prefix_rewrite"),
        "{body}"
    );
    for (port, path, upstream) in [
        (https[0], "/wiki/page?q=%2F1", "/page?q=%2F1"),
        (https[1], "/wiki", "/"),
        (https[2], "/wiki/a//b/../c", "/a/c"),
        (https[2], "/wikipedia", "/wikipedia"),
    ] {
        let url = format!("https://app.localhost:{port}{path}");
        let seen = std::sync::Mutex::new(Value::Null);
        eventually("every node rewrites the prefix", || async {
            let (status, body, _) = echo(&web, &url, Some(&alice), &[]).await?;
            let ok = status == StatusCode::OK && body["path"] == json!(upstream);
            *seen.lock().unwrap() = body;
            Ok(ok)
        })
        .await
        .with_context(|| format!("{path}: {}", seen.lock().unwrap()))?;
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen["upstream"], json!("app"), "{seen}");
    }
    // The CLI changes it back: the path goes upstream as it came.
    cli_ok(
        &cluster,
        0,
        &["resource", "update", "wiki", "--no-prefix-rewrite"],
    )?;
    eventually("the rewrite is gone", || async {
        let url = format!("https://app.localhost:{}/wiki/page", https[1]);
        let (_, body, _) = echo(&web, &url, Some(&alice), &[]).await?;
        Ok(body["path"] == json!("/wiki/page"))
    })
    .await?;

    phase!("a provider with auto_create off signs in only people who have a user; the chooser shows display names");
    let (status, body) = api
        .raw(reqwest::Method::DELETE, "/v1/users/bob", None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    cli_ok(
        &cluster,
        1,
        &[
            "idp",
            "update",
            "test",
            "--auto-create",
            "false",
            "--display-name",
            "Test IdP",
        ],
    )?;
    let shown = api.get_ok("/v1/identity-providers/test").await?;
    assert_eq!(
        (&shown["auto_create"], &shown["display_name"]),
        (&json!(false), &json!("Test IdP")),
        "{shown}"
    );
    let users_before = api.get_ok("/v1/users").await?;
    let last = std::sync::Mutex::new(String::new());
    eventually("every node refuses the unknown user", || async {
        let b = browser_async(
            BrowserArgs::new(format!("https://staff.localhost:{}/echo", https[2]))
                .login("bob", "bob-pw"),
        )
        .await?;
        *last.lock().unwrap() = format!("{:?}: {}", b.status, b.text);
        Ok(b.status == Some(403) && b.text.contains("no account for you here"))
    })
    .await
    .with_context(|| last.lock().unwrap().clone())?;
    assert_eq!(
        api.get_ok("/v1/users").await?,
        users_before,
        "no user was created"
    );
    api.post_ok(
        "/v1/users",
        &json!({"name": "bob", "email": "bob@example.test"}),
    )
    .await?;
    let b = browser_async(
        BrowserArgs::new(format!("https://staff.localhost:{}/echo", https[2]))
            .login("bob", "bob-pw"),
    )
    .await?;
    let seen: Value = serde_json::from_str(&b.text).with_context(|| b.text.clone())?;
    assert_eq!(
        seen["headers"]["x-warren-user"],
        json!(["bob"]),
        "the user the admin added, matched by verified e-mail"
    );
    api.post_ok(
        "/v1/identity-providers",
        &json!({"name": "second", "issuer": idp.issuer, "client_id": idp.client_id,
                "client_secret": idp.client_secret, "display_name": "Second & Co"}),
    )
    .await?;
    let last = std::sync::Mutex::new(String::new());
    eventually(
        "the chooser lists both providers by display name",
        || async {
            let b = browser_async(
                BrowserArgs::new(format!("https://corp.localhost:{}/echo", https[0]))
                    .screenshot(screenshot_path("provider-chooser")),
            )
            .await?;
            *last.lock().unwrap() = format!("{:?} {:?}", b.text, b.design_problems());
            Ok(b.text.contains("Continue with Test IdP")
                && b.text.contains("Continue with Second & Co")
                && b.design_problems().is_empty())
        },
    )
    .await
    .with_context(|| last.lock().unwrap().clone())?;
    let (status, body) = api
        .raw(
            reqwest::Method::DELETE,
            "/v1/identity-providers/second",
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");

    phase!("sign-out with the page's button ends the session everywhere, at the provider too, and comes back to our page");
    cli_ok(
        &cluster,
        2,
        &["idp", "update", "test", "--post-logout-redirect"],
    )?;
    let shown = api.get_ok("/v1/identity-providers/test").await?;
    assert_eq!(shown["post_logout_redirect"], json!(true), "{shown}");
    let mut b = None;
    for _ in 0..20 {
        let got = browser_async(
            BrowserArgs::new(format!("https://app.localhost:{}/.warren/", https[1]))
                .storage_in(&alice_state)
                .click("#sign-out"),
        )
        .await?;
        let back = got.url.contains("/.warren/signed_out");
        b = Some(got);
        if back {
            break;
        }
        // A node that has not applied the update yet sends her to the provider's page.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let b = b.expect("tried");
    assert!(
        b.url.starts_with("https://auth.localhost:")
            && b.url.ends_with("/.warren/signed_out")
            && b.text.contains("You are signed out"),
        "back from the provider: {} ({})",
        b.url,
        b.text
    );
    assert!(
        !b.cookies
            .iter()
            .any(|c| c.name == "__Host-warren_session" && c.domain == "app.localhost"),
        "the session cookie is cleared: {:?}",
        b.cookies
    );
    eventually("every node forgets the session", || async {
        Ok(!still_in().await?)
    })
    .await?;
    let (status, _, _) = echo(
        &web,
        &format!("https://app.localhost:{}/echo", https[2]),
        Some(&alice),
        &[],
    )
    .await?;
    assert_eq!(status, StatusCode::FOUND, "signed out");
    drop(idp);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provider_tokens_are_refreshed_and_a_refused_refresh_ends_the_session() -> anyhow::Result<()>
{
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let app = Upstream::start("app").await?;
    let cluster = Cluster::start(1).await?;
    let https = port_of(&cluster.nodes[0].https_addr);
    let redirect = vec![format!("https://auth.localhost:{https}/.warren/callback")];
    // Access tokens live 4 s, so the node refreshes them every round.
    let idp = tokio::task::spawn_blocking(move || Idp::start(&redirect, &[("OP_ACCESS_TTL", "4")]))
        .await??;
    let (cert, key) = certs::self_signed(&HOSTS);
    let web = web(&cert);
    let api = cluster.api(0);
    api.post_ok(
        "/v1/certificates",
        &json!({"name": "local", "cert_pem": cert, "key_pem": key}),
    )
    .await?;
    api.post_ok(
        "/v1/identity-providers",
        &json!({"name": "test", "issuer": idp.issuer, "client_id": idp.client_id,
                "client_secret": idp.client_secret, "scopes": ["groups", "offline_access"]}),
    )
    .await?;
    api.post_ok(
        "/v1/policies",
        &json!({"name": "dev", "allow": {"group": "dev"}}),
    )
    .await?;
    api.post_ok(
        "/v1/resources",
        &json!({"name": "app", "route": {"http": {"domain": "app.localhost"}},
                "targets": [app.addr.to_string()], "policies": ["dev"]}),
    )
    .await?;
    let jwks_url = format!("https://auth.localhost:{https}/.well-known/warren/jwks.json");
    eventually("the cluster's keys exist", || async {
        Ok(web.get(&jwks_url).send().await?.status() == StatusCode::OK)
    })
    .await?;

    phase!("bob signs in; the node refreshes his provider tokens before they expire");
    let b = browser_async(
        BrowserArgs::new(format!("https://app.localhost:{https}/echo")).login("bob", "bob-pw"),
    )
    .await?;
    let bob = session_cookie(&b, "app.localhost")?;
    let expiry = || async {
        let s = api.get_ok("/v1/sessions").await?;
        Ok::<_, anyhow::Error>(s["items"][0]["token_expires_at"].as_u64())
    };
    let first = expiry().await?.context("no token expiry recorded")?;
    let mut refreshed = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if expiry().await?.is_some_and(|t| t > first) {
            refreshed = true;
            break;
        }
    }
    assert!(refreshed, "the provider tokens were not refreshed");
    let (status, _, _) = echo(
        &web,
        &format!("https://app.localhost:{https}/echo"),
        Some(&bob),
        &[],
    )
    .await?;
    assert_eq!(status, StatusCode::OK);

    phase!("the provider stops knowing bob: the next refresh is refused and the session ends");
    let idp_ref = &idp;
    tokio::task::block_in_place(|| idp_ref.disable("bob"))?;
    let mut ended = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (status, _, _) = echo(
            &web,
            &format!("https://app.localhost:{https}/echo"),
            Some(&bob),
            &[],
        )
        .await?;
        if status == StatusCode::FOUND {
            ended = true;
            break;
        }
    }
    assert!(ended, "the session outlived a refused refresh");
    assert!(cluster.logs().contains("refused to refresh"));
    Ok(())
}
