//! `warren login`, `warren login status` and `warren logout`, black box: the real `warren`
//! binary runs the device flow (RFC 8628) against a real OpenID provider (npm oidc-provider,
//! public client `cli`), and a real headless Chromium confirms the code as alice.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;
use warren_tests::collected::Collected;
use warren_tests::oidc::{browser_async, BrowserArgs, Idp};
use warren_tests::{bins, free_port, phase};

/// A `warren` command with a private configuration directory and no ambient sign-in settings.
fn warren(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(&bins().warren);
    cmd.args(args)
        .env("WARREN_CONFIG_DIR", config)
        .env_remove("WARREN_OIDC_ISSUER")
        .env_remove("WARREN_OIDC_CLIENT_ID")
        .stdin(Stdio::null());
    cmd
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `warren login` whose stdout and stderr are collected as they come.
struct LoginRun {
    child: Child,
    out: Option<Collected>,
}

impl LoginRun {
    fn start(config: &Path, issuer: &str) -> anyhow::Result<Self> {
        let mut child = warren(config, &["login", "--issuer", issuer, "--client-id", "cli"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning warren login")?;
        let out = Some(Collected::from(&mut child));
        Ok(Self { child, out })
    }

    fn stderr(&self) -> String {
        self.out.as_ref().map(Collected::stderr).unwrap_or_default()
    }

    /// The verification URL with the code in it, and the code, once the CLI has shown them.
    async fn prompt(&mut self, timeout: Duration) -> anyhow::Result<(String, String)> {
        let url_re = regex::Regex::new(r"(?m)^\s*(https?://\S*user_code=\S+)\s*$")?;
        let code_re = regex::Regex::new(r"shows the code ([A-Z0-9-]+):")?;
        let deadline = Instant::now() + timeout;
        loop {
            let err = self.stderr();
            if let (Some(u), Some(c)) = (url_re.captures(&err), code_re.captures(&err)) {
                return Ok((u[1].to_owned(), c[1].to_owned()));
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("warren login exited ({status}) before showing a code:\n{err}");
            }
            if Instant::now() > deadline {
                bail!("warren login showed no code within {timeout:?}:\n{err}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the CLI to exit (killing it after `timeout`); returns success, stdout, stderr.
    async fn finish(mut self, timeout: Duration) -> anyhow::Result<(bool, String, String)> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "warren login did not finish within {timeout:?}:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (out, err) = self.out.take().map(Collected::join).unwrap_or_default();
        Ok((status.success(), out, err))
    }
}

impl Drop for LoginRun {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether the provider considers `token` live, asked with the confidential client's
/// credentials (RFC 7662).
async fn active(idp: &Idp, token: &str) -> anyhow::Result<bool> {
    let v: Value = reqwest::Client::new()
        .post(format!("{}/token/introspection", idp.issuer))
        .basic_auth(&idp.client_id, Some(&idp.client_secret))
        .form(&[("token", token)])
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    v["active"]
        .as_bool()
        .context("no `active` in introspection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_flow_signs_in_shows_status_and_signs_out() -> anyhow::Result<()> {
    bins();
    let idp = Idp::start(&["http://127.0.0.1/unused".into()], &[])?;
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("warren-config");

    phase!("an unknown client id fails at once, saying what to check");
    let started = Instant::now();
    let out = warren(
        &config,
        &["login", "--issuer", &idp.issuer, "--client-id", "nope"],
    )
    .output()?;
    let (_, err) = text(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--client-id nope"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    assert!(!config.join("token.json").exists());

    phase!("warren login shows where to confirm the code");
    let login_started = Instant::now();
    let mut run = LoginRun::start(&config, &idp.issuer)?;
    let (url, code) = run.prompt(Duration::from_secs(15)).await?;
    assert!(url.starts_with(&idp.issuer), "{url}");
    assert!(url.contains(&code), "{url} {code}");

    phase!("alice confirms {code} in a browser");
    let page = browser_async(
        BrowserArgs::new(&url)
            .login("alice", "alice-pw")
            .click("#confirm"),
    )
    .await?;
    assert!(page.text.contains("Sign-in Success"), "{}", page.text);

    phase!("the CLI picks the tokens up at its next poll and exits 0");
    let (ok, login_out, login_err) = run.finish(Duration::from_secs(40)).await?;
    assert!(ok, "warren login failed:\n{login_err}");
    phase!("login took {:?}", login_started.elapsed());
    assert!(login_out.contains("alice@example.test"), "{login_out}");

    let file = config.join("token.json");
    let meta = std::fs::metadata(&file).context("token.json")?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "token.json mode");
    let dir_mode = std::fs::metadata(&config)?.permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700, "config directory mode");
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(&file)?)?;
    assert_eq!(stored["email"], "alice@example.test", "{stored}");
    assert_eq!(stored["issuer"], idp.issuer.as_str());
    assert_eq!(stored["client_id"], "cli");
    assert!(
        stored["expires_at"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z')),
        "{stored}"
    );
    let mut tokens = Vec::new();
    for k in ["access_token", "refresh_token", "id_token"] {
        if let Some(t) = stored[k].as_str() {
            assert!(t.len() >= 16, "{k} is too short to be a token");
            tokens.push(t.to_owned());
        }
    }
    assert!(
        stored["access_token"].is_string()
            && stored["id_token"].is_string()
            && stored["refresh_token"].is_string(),
        "keys: {:?}",
        stored.as_object().map(|o| o.keys().collect::<Vec<_>>())
    );
    // offline_access was asked for, so logout has a refresh token to revoke.
    let revocable = stored["refresh_token"].as_str().unwrap().to_owned();
    assert!(active(&idp, &revocable).await?, "stored token is not live");

    phase!("warren login status says who is signed in");
    let out = warren(&config, &["login", "status"]).output()?;
    let (status_out, status_err) = text(&out);
    assert!(out.status.success(), "{status_err}");
    assert!(status_out.contains("alice@example.test"), "{status_out}");
    assert!(status_out.contains(&idp.issuer), "{status_out}");
    assert!(status_out.contains("expires at"), "{status_out}");

    phase!("warren logout revokes at the provider and deletes the file");
    let out = warren(&config, &["logout"]).output()?;
    let (logout_out, logout_err) = text(&out);
    assert!(out.status.success(), "{logout_err}");
    assert!(
        logout_err.contains("Revoked the refresh token"),
        "{logout_err}"
    );
    assert!(!file.exists(), "token.json is still there");
    assert!(
        !active(&idp, &revocable).await?,
        "token still live after logout"
    );

    let out = warren(&config, &["login", "status"]).output()?;
    let (after_out, after_err) = text(&out);
    assert!(!out.status.success(), "{after_out}");
    assert!(after_err.contains("not signed in"), "{after_err}");

    phase!("no token was ever printed");
    for (what, s) in [
        ("login stdout", &login_out),
        ("login stderr", &login_err),
        ("status stdout", &status_out),
        ("status stderr", &status_err),
        ("logout stdout", &logout_out),
        ("logout stderr", &logout_err),
    ] {
        for t in &tokens {
            // Any 16-character piece would do to give a token away.
            assert!(!s.contains(&t[..16]), "{what} shows a token:\n{s}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborting_in_the_browser_fails_the_login() -> anyhow::Result<()> {
    bins();
    let idp = Idp::start(&["http://127.0.0.1/unused".into()], &[])?;
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("warren-config");

    let mut run = LoginRun::start(&config, &idp.issuer)?;
    let (url, _) = run.prompt(Duration::from_secs(15)).await?;
    phase!("the person aborts on the confirmation page");
    browser_async(BrowserArgs::new(&url).click("#abort")).await?;
    let (ok, _, err) = run.finish(Duration::from_secs(40)).await?;
    assert!(!ok, "warren login succeeded after abort:\n{err}");
    assert!(
        err.contains("denied") && err.contains("warren login"),
        "{err}"
    );
    assert!(!config.join("token.json").exists());
    Ok(())
}

#[test]
fn unreachable_issuer_fails_fast_and_clearly() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("warren-config");
    // Bound once and released: nothing listens there.
    let issuer = format!("http://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let out = warren(
        &config,
        &["login", "--issuer", &issuer, "--client-id", "cli"],
    )
    .output()?;
    let elapsed = started.elapsed();
    let (stdout, err) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(
        err.contains("cannot reach") && err.contains(&issuer),
        "{err}"
    );
    assert!(err.contains("--issuer"), "{err}");
    assert!(!config.join("token.json").exists());

    phase!("without --issuer it says what to give");
    let out = warren(&config, &["login", "--client-id", "cli"]).output()?;
    let (_, err) = text(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("--issuer") && err.contains("WARREN_OIDC_ISSUER"),
        "{err}"
    );
    Ok(())
}
