//! A real OpenID provider and a real headless Chromium, for black-box tests of web access.
//!
//! [`Idp`] runs `tests/oidc/op.mjs` (npm `oidc-provider`) on a free loopback port;
//! [`browser`] runs `tests/oidc/browser.mjs` (npm `playwright-core` driving Debian's
//! `/usr/bin/chromium`) once and returns what the page showed. Both need
//! `scripts/install-test-deps` to have run (Node.js, Chromium and `tests/oidc/node_modules`).
//!
//! The provider knows these users:
//!
//! | user | password | email | groups |
//! |---|---|---|---|
//! | `alice` | `alice-pw` | `alice@example.test` | `admins`, `dev` |
//! | `bob` | `bob-pw` | `bob@example.test` | `dev` |
//! | `carol` | `carol-pw` | `carol@corp.test` | none |
//! | `mallory` | `mallory-pw` | `dave@example.test`, **not verified** | `admins` |
//!
//! Every ID token carries `sub` (the user name) and `email_verified` (true but for
//! `mallory`).
//!
//! Its confidential client (default `warren` / `warren-secret`, `client_secret_basic`) must
//! use PKCE (S256). A request whose scope has `offline_access` gets a refresh token. The
//! public client `cli` has the device flow. See `tests/oidc/op.mjs` for every setting.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Deserialize;

use crate::free_port;

/// The folder holding `op.mjs`, `browser.mjs` and their `node_modules`.
pub fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

/// The Node.js binary: `$WARREN_TEST_NODE`, else `node` from `PATH`.
fn node() -> String {
    std::env::var("WARREN_TEST_NODE").unwrap_or_else(|_| "node".into())
}

fn check_installed() -> anyhow::Result<()> {
    for module in ["oidc-provider", "playwright-core"] {
        if !oidc_dir().join("node_modules").join(module).is_dir() {
            bail!(
                "{} is missing: run scripts/install-test-deps",
                oidc_dir().join("node_modules").join(module).display()
            );
        }
    }
    Ok(())
}

/// A running OpenID provider (`tests/oidc/op.mjs`), killed when dropped.
pub struct Idp {
    /// Issuer URL, `http://127.0.0.1:<port>` (no trailing slash).
    pub issuer: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Client id of the confidential client.
    pub client_id: String,
    /// Client secret of the confidential client.
    pub client_secret: String,
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

impl Idp {
    /// Starts the provider with `redirect_uris` for the confidential client and extra
    /// environment for `op.mjs` (`CLIENT_ID`, `CLIENT_SECRET`, `POST_LOGOUT_REDIRECT_URIS`,
    /// `OP_ACCESS_TTL`, ...); returns once discovery answers (at most 15 s).
    ///
    /// Blocks the calling thread while it waits.
    pub fn start(redirect_uris: &[String], env: &[(&str, &str)]) -> anyhow::Result<Idp> {
        check_installed()?;
        let port = free_port();
        let log = tempfile::Builder::new()
            .prefix("warren-idp-")
            .suffix(".log")
            .tempfile()?;
        let mut cmd = Command::new(node());
        cmd.arg(oidc_dir().join("op.mjs"))
            .current_dir(oidc_dir())
            .env("OP_PORT", port.to_string())
            .env("REDIRECT_URIS", redirect_uris.join(","))
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?);
        let mut client_id = "warren".to_owned();
        let mut client_secret = "warren-secret".to_owned();
        for (k, v) in env {
            cmd.env(k, v);
            match *k {
                "CLIENT_ID" => client_id = (*v).to_owned(),
                "CLIENT_SECRET" => client_secret = (*v).to_owned(),
                _ => {}
            }
        }
        let issuer = env.iter().find(|(k, _)| *k == "OP_ISSUER").map_or_else(
            || format!("http://127.0.0.1:{port}"),
            |(_, v)| v.to_string(),
        );
        let child = cmd.spawn().with_context(|| {
            format!(
                "spawning {} {}",
                node(),
                oidc_dir().join("op.mjs").display()
            )
        })?;
        let mut idp = Idp {
            issuer,
            port,
            client_id,
            client_secret,
            child: Some(child),
            log,
        };
        // Node.js takes a few seconds to load oidc-provider on a busy 2-core machine.
        idp.wait_ready(Duration::from_secs(30))?;
        Ok(idp)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, body)) = self.request("GET", "/.well-known/openid-configuration") {
                let v: serde_json::Value = serde_json::from_str(&body)
                    .with_context(|| format!("discovery is not JSON: {body}"))?;
                if v["issuer"] != self.issuer.as_str() {
                    bail!(
                        "discovery names issuer {}, expected {}",
                        v["issuer"],
                        self.issuer
                    );
                }
                return Ok(());
            }
            if let Some(child) = &mut self.child {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "op.mjs exited with {status} before it was ready:\n{}",
                        self.log()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "op.mjs did not answer discovery within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The discovery document's URL.
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.issuer)
    }

    /// Makes `user` unknown to the provider (`POST /test/disable/<user>`): logins fail,
    /// refreshes of its tokens answer `invalid_grant`, its IdP sessions no longer count.
    pub fn disable(&self, user: &str) -> anyhow::Result<()> {
        self.control("disable", user)
    }

    /// Undoes [`Idp::disable`].
    pub fn enable(&self, user: &str) -> anyhow::Result<()> {
        self.control("enable", user)
    }

    fn control(&self, action: &str, user: &str) -> anyhow::Result<()> {
        let (status, body) = self.request("POST", &format!("/test/{action}/{user}"))?;
        if status != 200 {
            bail!("{action} {user}: {status} {body}");
        }
        Ok(())
    }

    /// A minimal HTTP/1.0 request to the provider; returns (status, body).
    fn request(&self, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\r\n",
            self.port
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, body) = resp.split_once("\r\n\r\n").context("no HTTP header end")?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line: {head}"))?;
        Ok((status, body.to_owned()))
    }

    /// Everything the provider printed so far (requests, logins, errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("==== op.mjs log ====\n{}", self.log());
        }
    }
}

/// What [`browser`] does: open `url`, log in if the IdP asks and a user is given, click
/// an element if asked, and optionally open a WebSocket from the landed page.
#[derive(Clone, Debug, Default)]
pub struct BrowserArgs {
    /// The page to open (redirects are followed).
    pub url: String,
    /// User and password for the IdP login form, if it shows.
    pub login: Option<(String, String)>,
    /// A CSS selector to click once if it shows (e.g. `#confirm` on the IdP's device-flow
    /// page), before or after logging in.
    pub click: Option<String>,
    /// Playwright storage state (cookies) to start with.
    pub storage_in: Option<PathBuf>,
    /// Where to save the storage state at the end.
    pub storage_out: Option<PathBuf>,
    /// A `ws://` or `wss://` URL to open from the landed page, sending `hello-ws`.
    pub ws: Option<String>,
    /// How long browser.mjs may take (default 20 s); the process is killed 15 s after that.
    pub timeout: Option<Duration>,
    /// The window size, width and height in CSS pixels (default 1280x720).
    pub viewport: Option<(u32, u32)>,
    /// Where to save a PNG of the whole landed page.
    pub screenshot: Option<PathBuf>,
    /// Whether the page's `prefers-color-scheme` is dark (default light).
    pub dark: bool,
}

impl BrowserArgs {
    /// Opens `url`, nothing else.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// Logs in as `user` with `password` if the IdP login form shows.
    pub fn login(mut self, user: &str, password: &str) -> Self {
        self.login = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// Clicks `selector` once if it shows.
    pub fn click(mut self, selector: &str) -> Self {
        self.click = Some(selector.to_owned());
        self
    }

    /// Starts with the cookies saved in `path` by an earlier run.
    pub fn storage_in(mut self, path: impl Into<PathBuf>) -> Self {
        self.storage_in = Some(path.into());
        self
    }

    /// Saves the cookies to `path` at the end.
    pub fn storage_out(mut self, path: impl Into<PathBuf>) -> Self {
        self.storage_out = Some(path.into());
        self
    }

    /// Opens a WebSocket to `url` from the landed page.
    pub fn ws(mut self, url: impl Into<String>) -> Self {
        self.ws = Some(url.into());
        self
    }

    /// Sets browser.mjs's own timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Opens the page in a window of `width` x `height` CSS pixels.
    pub fn viewport(mut self, width: u32, height: u32) -> Self {
        self.viewport = Some((width, height));
        self
    }

    /// Shows the page as to someone whose system is in dark mode.
    pub fn dark(mut self) -> Self {
        self.dark = true;
        self
    }

    /// Saves a PNG of the whole landed page to `path`.
    pub fn screenshot(mut self, path: impl Into<PathBuf>) -> Self {
        self.screenshot = Some(path.into());
        self
    }
}

/// The landed page as a person meets it (see browser.mjs).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Layout {
    /// `<html lang>`.
    pub lang: String,
    /// `document.title`.
    pub title: String,
    /// The text of the first `<h1>`, if any.
    pub h1: Option<String>,
    /// Whether a stylesheet applies (`<main>` has a max width).
    pub styled: bool,
    /// Whether the page scrolls sideways at this width.
    pub overflow_x: bool,
    /// Visible inputs without a label.
    pub unlabeled: usize,
    /// The text of buttons and links smaller than 24x24 CSS pixels.
    pub too_small: Vec<String>,
    /// Whether the page's own background is dark.
    #[serde(default)]
    pub dark: bool,
    /// The lowest WCAG contrast ratio of any visible text against its background.
    #[serde(default)]
    pub contrast: Option<f64>,
    /// Texts below 4.5:1 (WCAG AA for body text), each with its ratio.
    #[serde(default)]
    pub low_contrast: Vec<String>,
}

/// One cookie in the browser at the end of a run.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct BrowserCookie {
    /// Name.
    pub name: String,
    /// Domain (host-only cookies have the bare host).
    pub domain: String,
    /// Path.
    pub path: String,
    /// HttpOnly.
    #[serde(rename = "httpOnly")]
    pub http_only: bool,
    /// Secure.
    pub secure: bool,
    /// SameSite as Chromium reports it: `Strict`, `Lax` or `None`.
    #[serde(rename = "sameSite")]
    pub same_site: String,
    /// Value.
    pub value: String,
}

/// What a [`browser`] run saw.
#[derive(Clone, Debug, Deserialize)]
pub struct BrowserOutcome {
    /// URL of the page it ended on.
    pub url: String,
    /// HTTP status of the last main-frame response that was not a redirect.
    pub status: Option<u16>,
    /// `document.body.innerText` of that page.
    pub text: String,
    /// The WebSocket reply to `hello-ws`, or None if none was asked for or it failed
    /// (why is in `stderr`).
    pub ws: Option<String>,
    /// Every cookie in the browser.
    pub cookies: Vec<BrowserCookie>,
    /// The landed page's language, title, heading and layout.
    #[serde(default)]
    pub layout: Layout,
    /// What browser.mjs printed on stderr (non-loopback requests, WebSocket failures).
    #[serde(skip)]
    pub stderr: String,
}

impl BrowserOutcome {
    /// The first cookie called `name`.
    pub fn cookie(&self, name: &str) -> Option<&BrowserCookie> {
        self.cookies.iter().find(|c| c.name == name)
    }

    /// Console errors of the page (a stylesheet or script the page's policy refused).
    pub fn console_errors(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter_map(|l| l.strip_prefix("console error: "))
            .collect()
    }

    /// What a person would notice is wrong with the landed page's design: no stylesheet
    /// (or one the page's own policy refused), no language or heading, sideways scrolling,
    /// inputs without a label, buttons or links too small to hit (WCAG 2.5.8: 24x24),
    /// anything loaded from elsewhere. Empty when the page is fine.
    pub fn design_problems(&self) -> Vec<String> {
        let l = &self.layout;
        let mut out = Vec::new();
        if !l.styled {
            out.push("no stylesheet applies".to_owned());
        }
        if l.lang.is_empty() {
            out.push("no <html lang>".to_owned());
        }
        if l.h1.as_deref().is_none_or(str::is_empty) || l.title.is_empty() {
            out.push("no heading or title".to_owned());
        }
        if l.overflow_x {
            out.push("scrolls sideways".to_owned());
        }
        if l.unlabeled > 0 {
            out.push(format!("{} inputs without a label", l.unlabeled));
        }
        if !l.too_small.is_empty() {
            out.push(format!("too small to hit: {:?}", l.too_small));
        }
        if !l.low_contrast.is_empty() {
            out.push(format!("text below 4.5:1 contrast: {:?}", l.low_contrast));
        }
        // Chromium logs a non-2xx page itself as "Failed to load resource": that is the
        // page's status, not a fault of its design.
        out.extend(
            self.console_errors()
                .into_iter()
                .filter(|e| !e.starts_with("Failed to load resource"))
                .map(|e| format!("console: {e}")),
        );
        out.extend(
            self.non_loopback_requests()
                .into_iter()
                .map(|u| format!("loads {u}")),
        );
        out
    }

    /// URLs of requests that went to a non-loopback host.
    pub fn non_loopback_requests(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter_map(|l| l.strip_prefix("non-loopback request: "))
            .collect()
    }
}

/// Where tests save screenshots of the pages they check (`target/screenshots/<name>.png`),
/// for a person to look at after a run.
pub fn screenshot_path(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{name}.png"))
}

/// Runs browser.mjs once (a fresh headless Chromium) and returns what it saw.
///
/// Fails if browser.mjs fails or times out; the process is killed if it overruns its own
/// timeout by 15 s. Blocks the calling thread for a few seconds: inside a tokio runtime
/// that also serves the pages (an [`crate::upstream::Upstream`]), use [`browser_async`].
pub fn browser(args: &BrowserArgs) -> anyhow::Result<BrowserOutcome> {
    check_installed()?;
    let timeout = args.timeout.unwrap_or(Duration::from_secs(20));
    let mut cmd = Command::new(node());
    cmd.arg(oidc_dir().join("browser.mjs"))
        .current_dir(oidc_dir())
        .args(["--url", &args.url])
        .args(["--timeout-ms", &timeout.as_millis().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some((user, password)) = &args.login {
        cmd.args(["--user", user, "--password", password]);
    }
    if let Some(sel) = &args.click {
        cmd.args(["--click", sel]);
    }
    if let Some(p) = &args.storage_in {
        cmd.arg("--storage-in").arg(p);
    }
    if let Some(p) = &args.storage_out {
        cmd.arg("--storage-out").arg(p);
    }
    if let Some(ws) = &args.ws {
        cmd.args(["--ws", ws]);
    }
    if args.dark {
        cmd.args(["--color-scheme", "dark"]);
    }
    if let Some((w, h)) = args.viewport {
        cmd.args(["--viewport", &format!("{w}x{h}")]);
    }
    if let Some(p) = &args.screenshot {
        cmd.arg("--screenshot").arg(p);
    }
    let mut child = cmd.spawn().context("spawning browser.mjs")?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let hard = timeout + Duration::from_secs(15);
    let deadline = Instant::now() + hard;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            // SIGTERM lets Playwright close Chromium; SIGKILL if that hangs.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let grace = Instant::now() + Duration::from_secs(3);
            while child.try_wait()?.is_none() && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            bail!(
                "browser.mjs {} ran over {hard:?} and was killed:\n{stderr}",
                args.url
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    for line in stderr.lines() {
        eprintln!("[browser] {line}");
    }
    if !status.success() {
        bail!("browser.mjs {} failed ({status}):\n{stderr}", args.url);
    }
    let line = stdout.lines().last().unwrap_or_default();
    let mut outcome: BrowserOutcome = serde_json::from_str(line)
        .with_context(|| format!("browser.mjs printed no result line:\n{stdout}\n{stderr}"))?;
    outcome.stderr = stderr;
    Ok(outcome)
}

/// [`browser`] on tokio's blocking pool, so the calling runtime keeps serving.
pub async fn browser_async(args: BrowserArgs) -> anyhow::Result<BrowserOutcome> {
    tokio::task::spawn_blocking(move || browser(&args)).await?
}

fn drain<R: std::io::Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    })
}
