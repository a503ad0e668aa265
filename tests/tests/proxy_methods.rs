//! Ways into a web resource without an account: PIN, passcode, e-mailed one-time code,
//! share links and bypass rules, against a real three-node cluster and a local SMTP sink.

use std::time::Duration;

use anyhow::Context as _;
use reqwest::StatusCode;
use serde_json::{json, Value};
use warren_tests::oidc::{browser_async, screenshot_path, BrowserArgs};
use warren_tests::smtp::SmtpSink;
use warren_tests::upstream::Upstream;
use warren_tests::{certs, phase, Cluster};

const HOSTS: [&str; 6] = [
    "pin.localhost",
    "pass.localhost",
    "mail.localhost",
    "share.localhost",
    "mixed.localhost",
    "auth.localhost",
];

/// Wrong tries at a PIN, passcode or code a client gets within the window, cluster-wide
/// (`warren_node::proxy::credential::MAX_FAILURES`).
const MAX_FAILURES: usize = 10;

fn web(cert_pem: &str) -> reqwest::Client {
    warren_tests::web_client(cert_pem, &HOSTS, Duration::from_secs(20))
        .build()
        .unwrap()
}

struct Site<'a> {
    web: &'a reqwest::Client,
    base: String,
}

impl Site<'_> {
    async fn get(
        &self,
        path: &str,
        cookie: Option<&str>,
    ) -> anyhow::Result<(StatusCode, String, String)> {
        let mut r = self.web.get(format!("{}{path}", self.base));
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        let resp = r.send().await?;
        let status = resp.status();
        let loc = header(&resp, "location");
        Ok((status, loc, resp.text().await?))
    }

    /// Posts the form; returns status, body and the session cookie it set (if any).
    async fn post(
        &self,
        form: &[(&str, &str)],
    ) -> anyhow::Result<(StatusCode, String, Option<String>)> {
        let resp = self
            .web
            .post(format!("{}/.warren/auth", self.base))
            .form(form)
            .send()
            .await?;
        let status = resp.status();
        let cookie = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("__Host-warren_session="))
            .map(|v| v.split(';').next().unwrap().to_owned());
        Ok((status, resp.text().await?, cookie))
    }
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pin_passcode_email_code_share_link_and_bypass() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let app = Upstream::start("app").await?;
    let smtp = SmtpSink::start().await?;
    let cluster = Cluster::start_with_env(3, &[("WARREN_SMTP_URL", &smtp.url())]).await?;
    let ports: Vec<u16> = (0..3)
        .map(|i| warren_tests::port_of(&cluster.nodes[i].https_addr))
        .collect();
    let port = ports[0];
    let (cert, key) = certs::self_signed(&HOSTS);
    let web = web(&cert);
    let api = cluster.api(0);
    let target = app.addr.to_string();
    api.post_ok(
        "/v1/certificates",
        &json!({"name": "local", "cert_pem": cert, "key_pem": key}),
    )
    .await?;
    for (name, access) in [
        ("pin", json!({"sso": false, "pin": "123456"})),
        (
            "pass",
            json!({"sso": false, "passcode": "correct horse battery"}),
        ),
        (
            "mail",
            json!({"sso": false, "email_codes": ["@example.test", "eve@corp.test"]}),
        ),
        ("share", json!({"sso": true})),
        (
            "mixed",
            json!({"sso": false, "pin": "4321", "bypass": [{"path_prefix": "/health"}]}),
        ),
    ] {
        api.post_ok(
            "/v1/resources",
            &json!({"name": name, "route": {"http": {"domain": format!("{name}.localhost")}},
                    "targets": [target], "http": {"access": access}}),
        )
        .await?;
    }
    let site = |name: &str| Site {
        web: &web,
        base: format!("https://{name}.localhost:{port}"),
    };
    let site_on = |name: &str, node: usize| Site {
        web: &web,
        base: format!("https://{name}.localhost:{}", ports[node]),
    };
    // The proxy follows the registry asynchronously.
    let pin = site("pin");
    for _ in 0..200 {
        if pin
            .get("/", None)
            .await
            .is_ok_and(|r| r.0 == StatusCode::FOUND)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    phase!("the PIN, passcode and e-mail code forms in a real browser, at phone width: the one design, labelled inputs");
    for (name, input) in [("pin", "PIN"), ("pass", "Passcode"), ("mail", "E-mail")] {
        let b = browser_async(
            BrowserArgs::new(format!("https://{name}.localhost:{port}/echo"))
                .viewport(390, 844)
                .screenshot(screenshot_path(&format!("sign-in-{name}"))),
        )
        .await?;
        assert!(
            b.status == Some(200)
                && b.text.contains(input)
                && b.text.contains(&format!("Open {name}.localhost")),
            "{name}: {:?} {}",
            b.status,
            b.text
        );
        assert_eq!(b.design_problems(), Vec::<String>::new(), "{name}");
    }

    phase!("the API stores and shows only hashes");
    let shown = api.get_ok("/v1/resources/pin").await?;
    assert_eq!(shown["http"]["access"]["pin_hash"], "<hidden>", "{shown}");
    assert!(!shown.to_string().contains("123456"));
    let (status, body) = api
        .send(
            reqwest::Method::POST,
            "/v1/resources",
            &json!({"name": "bad", "route": {"http": {"domain": "bad.localhost"}},
            "targets": [target], "http": {"access": {"sso": false, "pin": "12ab"}}}),
        )
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["field"], "http.access.pin");
    let (status, body) = api
        .send(reqwest::Method::POST, "/v1/resources", &json!({"name": "bad", "route": {"http": {"domain": "bad.localhost"}},
            "targets": [target], "http": {"access": {"sso": false, "pin_hash": "$argon2id$v=19$m=1,t=1,p=1$AAAA$AAAA"}}}))
        .await?;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a hash from outside is refused: {body}"
    );
    // Changing another field keeps the PIN.
    api.send(
        reqwest::Method::PATCH,
        "/v1/resources/pin",
        &json!({"http": {"timeout_s": 20}}),
    )
    .await?;

    phase!("PIN: wrong is refused, right opens this resource only");
    let (status, loc, _) = pin.get("/echo?a=1", None).await?;
    assert_eq!(status, StatusCode::FOUND);
    assert!(loc.starts_with("/.warren/auth?rd="), "{loc}");
    let (status, _, page) = pin.get(&loc, None).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("id=\"pin\"") && !page.contains("id=\"sso\""),
        "{page}"
    );
    let (status, body, cookie) = pin
        .post(&[("method", "pin"), ("pin", "000000"), ("rd", "/echo")])
        .await?;
    assert_eq!((status, cookie), (StatusCode::UNAUTHORIZED, None), "{body}");
    assert!(body.contains("Wrong pin"));
    let (status, _, cookie) = pin
        .post(&[("method", "pin"), ("pin", "123456"), ("rd", "/echo")])
        .await?;
    assert_eq!(status, StatusCode::FOUND);
    let pin_cookie = cookie.context("no session cookie")?;
    let (status, _, body) = pin.get("/echo", Some(&pin_cookie)).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let echo: Value = serde_json::from_str(&body)?;
    assert!(echo["headers"].get("x-warren-email").is_none());
    let (status, _, _) = site("pass").get("/echo", Some(&pin_cookie.clone())).await?;
    assert_eq!(
        status,
        StatusCode::FOUND,
        "a PIN session opens only its resource"
    );

    phase!("a right PIN does not count against the limit: its users are never locked out");
    // One wrong PIN came from this address already; right ones, more than the limit,
    // spread over the nodes.
    for i in 0..MAX_FAILURES + 2 {
        let (status, body, cookie) = site_on("pin", i % 3)
            .post(&[("method", "pin"), ("pin", "123456"), ("rd", "/echo")])
            .await?;
        assert_eq!(
            status,
            StatusCode::FOUND,
            "right PIN {i} on node {}: {body}",
            i % 3 + 1
        );
        assert!(cookie.is_some());
    }

    phase!(
        "PIN guessing is limited cluster-wide: wrong PINs spread over three nodes count together"
    );
    let mut wrong = 0;
    for i in 0..3 * MAX_FAILURES {
        let (status, body, _) = site_on("mixed", i % 3)
            .post(&[("method", "pin"), ("pin", "9999"), ("rd", "/")])
            .await?;
        if status == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        wrong += 1;
    }
    assert_eq!(
        wrong, MAX_FAILURES,
        "wrong PINs allowed in total before the limit, over three nodes"
    );
    for node in 0..3 {
        let (status, _, cookie) = site_on("mixed", node)
            .post(&[("method", "pin"), ("pin", "4321"), ("rd", "/")])
            .await?;
        assert_eq!(
            (status, cookie),
            (StatusCode::TOO_MANY_REQUESTS, None),
            "even the right PIN waits after too many wrong ones, on node {}",
            node + 1
        );
    }

    phase!("bypass: /health needs no sign-in, the rest does");
    let (status, _, body) = site("mixed").get("/health", None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, _) = site("mixed").get("/healthz", None).await?;
    assert_eq!(
        status,
        StatusCode::FOUND,
        "prefix match stops at a path segment"
    );

    phase!("passcode");
    let pass = site("pass");
    let (status, _, _) = pass
        .post(&[
            ("method", "passcode"),
            ("passcode", "wrong horse"),
            ("rd", "/"),
        ])
        .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, cookie) = pass
        .post(&[
            ("method", "passcode"),
            ("passcode", "correct horse battery"),
            ("rd", "/echo"),
        ])
        .await?;
    assert_eq!(status, StatusCode::FOUND);
    let (status, _, _) = pass.get("/echo", cookie.as_deref()).await?;
    assert_eq!(status, StatusCode::OK);

    phase!("e-mail code: sent to a listed address, works once");
    let mail = site("mail");
    let (status, body, _) = mail
        .post(&[
            ("method", "email"),
            ("email", "dave@example.test"),
            ("rd", "/echo"),
        ])
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = regex::Regex::new(r#"name="token" value="([^"]+)""#)?
        .captures(&body)
        .context("no token in the code form")?[1]
        .to_owned();
    let sent = smtp.mails();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].to, vec!["dave@example.test".to_owned()]);
    let code = regex::Regex::new(r"code for mail\.localhost is (\d{6})")?
        .captures(&sent[0].data)
        .context("no code in the mail")?[1]
        .to_owned();
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let (status, _, _) = mail
        .post(&[
            ("method", "email_code"),
            ("token", &token),
            ("code", wrong),
            ("rd", "/echo"),
        ])
        .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, cookie) = mail
        .post(&[
            ("method", "email_code"),
            ("token", &token),
            ("code", &code),
            ("rd", "/echo"),
        ])
        .await?;
    assert_eq!(status, StatusCode::FOUND);
    let (status, _, body) = mail.get("/echo", cookie.as_deref()).await?;
    assert_eq!(status, StatusCode::OK);
    let echo: Value = serde_json::from_str(&body)?;
    assert_eq!(
        echo["headers"]["x-warren-email"],
        json!(["dave@example.test"])
    );
    let (status, _, _) = mail
        .post(&[
            ("method", "email_code"),
            ("token", &token),
            ("code", &code),
            ("rd", "/echo"),
        ])
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a used code is refused");
    let (status, body, _) = mail
        .post(&[
            ("method", "email"),
            ("email", "mallory@evil.test"),
            ("rd", "/"),
        ])
        .await?;
    assert_eq!(
        status,
        StatusCode::OK,
        "an unlisted address gets the same answer"
    );
    assert!(body.contains("a code is on its way"));
    assert_eq!(smtp.mails().len(), 1, "but no mail");

    phase!("share link: opens the resource until revoked; a forged one does not");
    let created = api
        .post_ok(
            "/v1/resources/share/share-links",
            &json!({"expires_in_s": 3600}),
        )
        .await?;
    let url = created["url"].as_str().context("no url")?.to_owned();
    let id = created["share_link"]["id"].as_str().unwrap().to_owned();
    let resp = web.get(&url).send().await?;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let cookie = header(&resp, "set-cookie")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let share = site("share");
    let (status, _, _) = share.get("/echo", Some(&cookie)).await?;
    assert_eq!(status, StatusCode::OK);
    let mut forged = url.clone();
    forged.pop();
    forged.push(if url.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(
        web.get(&forged).send().await?.status(),
        StatusCode::NOT_FOUND
    );
    let listed = api.get_ok("/v1/share-links").await?;
    assert!(
        !listed
            .to_string()
            .contains(url.rsplit_once("t=").unwrap().1),
        "tokens are not listed"
    );
    let (status, _) = api
        .raw(
            reqwest::Method::DELETE,
            &format!("/v1/share-links/{id}"),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        web.get(&url).send().await?.status(),
        StatusCode::NOT_FOUND,
        "revoked"
    );
    Ok(())
}
