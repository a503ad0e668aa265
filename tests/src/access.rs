//! What the black-box tests of client access share: one [`World`] (a lab, a cluster whose
//! addresses are on the lab's node address, an OpenID provider) and the `warren` commands a
//! user runs in it (device-flow sign-in confirmed in Chromium, `connect`, `ssh`, `scp`,
//! `status --json`), used by `tests/client_access.rs` and `tests/direct_paths.rs`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use reqwest::Method;
use serde_json::{json, Value};

use crate::collected::Collected;
use crate::netlab::Lab;
use crate::oidc::{browser_async, BrowserArgs, Idp};
use crate::{bins, free_port, phase, Cluster, TestNode};

/// Runs `cmd` to completion within `limit` (killed after); (success, stdout, stderr).
pub fn output(mut cmd: Command, limit: Duration) -> anyhow::Result<(bool, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let out = Collected::from(&mut child);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{cmd:?} ran over {limit:?}:\n{}{}",
                out.stdout(),
                out.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = out.join();
    Ok((status.success(), stdout, stderr))
}

/// [`output`] that must succeed; its stdout.
pub fn ok_output(cmd: Command, limit: Duration) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let (ok, out, err) = output(cmd, limit)?;
    if !ok {
        bail!("{shown} failed:\n{out}{err}");
    }
    Ok(out)
}

/// The public client of `tests/oidc/op.mjs` that has the device flow.
pub const CLI_CLIENT: &str = "cli";

/// The nodes, the lab, the provider and what every case shares.
pub struct World {
    /// The lab the nodes' address is in.
    pub lab: Lab,
    /// The nodes.
    pub cluster: Cluster,
    /// The OpenID provider.
    pub idp: Idp,
    /// Each node's relay address (UDP), by node index.
    pub relays: Vec<SocketAddr>,
    /// `--client-id` for `warren login`, if the node's discovery should be overridden.
    pub client_id_override: Option<String>,
    /// A directory for the users' configuration directories and files.
    pub dir: tempfile::TempDir,
}

impl World {
    /// A `warren` command on the client machine for the user whose configuration is
    /// `config` (WARREN_CONFIG_DIR), trusting the cluster's CA.
    pub fn warren(&self, config: &Path, args: &[&str]) -> Command {
        self.warren_at(&self.lab, config, args)
    }

    /// [`World::warren`] on the client machine of another `lab` (whose routes reach the
    /// nodes' address).
    pub fn warren_at(&self, lab: &Lab, config: &Path, args: &[&str]) -> Command {
        let mut cmd = lab.client_exec(&bins().warren);
        cmd.args(args)
            .env("WARREN_CONFIG_DIR", config)
            .env("WARREN_CA", self.cluster.ca())
            .env("WARREN_LOG", "info")
            .env_remove("WARREN_NODE")
            .env_remove("WARREN_OIDC_ISSUER")
            .env_remove("WARREN_OIDC_CLIENT_ID")
            .env_remove("WARREN_API_KEY");
        cmd
    }

    /// `warren ARGS` that must succeed within 30 s; its stdout.
    pub fn warren_ok(&self, config: &Path, args: &[&str]) -> anyhow::Result<String> {
        ok_output(self.warren(config, args), Duration::from_secs(30))
    }

    /// `warren ARGS --json`, parsed.
    pub fn warren_json(&self, config: &Path, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.warren_ok(config, &all)?;
        serde_json::from_str(&out).with_context(|| format!("warren {all:?} printed no JSON: {out}"))
    }

    /// The node URL a client signs in to: node 1's API.
    pub fn node_url(&self, i: usize) -> String {
        format!("https://{}", self.cluster.nodes[i].admin_addr)
    }

    /// `warren login --node …` on the client as `user`, confirmed in Chromium; returns
    /// what the CLI printed.
    pub async fn login(
        &self,
        config: &Path,
        user: &str,
        password: &str,
        device: &str,
    ) -> anyhow::Result<String> {
        let node = self.node_url(0);
        let ca = self.cluster.ca().display().to_string();
        let mut args = vec![
            "login",
            "--node",
            &node,
            "--ca",
            &ca,
            "--device-name",
            device,
        ];
        if let Some(id) = &self.client_id_override {
            args.extend(["--client-id", id.as_str()]);
        }
        let mut child = self
            .warren(config, &args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning warren login")?;
        let out = Collected::from(&mut child);
        let mut child = Reaped(child);
        let url_re = regex::Regex::new(r"(?m)^\s*(https?://\S*user_code=\S+)\s*$")?;
        let code_re = regex::Regex::new(r"shows the code ([A-Z0-9-]+):")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let (url, code) = loop {
            let err = out.stderr();
            if let (Some(u), Some(c)) = (url_re.captures(&err), code_re.captures(&err)) {
                break (u[1].to_owned(), c[1].to_owned());
            }
            if let Some(status) = child.0.try_wait()? {
                bail!(
                    "warren login exited ({status}) before showing a code:\n{}{err}",
                    out.stdout()
                );
            }
            if Instant::now() > deadline {
                bail!("warren login showed no code within 20 s:\n{err}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        phase!("{user} confirms {code} in Chromium");
        let page = browser_async(
            BrowserArgs::new(&url)
                .login(user, password)
                .click("#confirm")
                .timeout(Duration::from_secs(30)),
        )
        .await?;
        assert!(page.text.contains("Sign-in Success"), "{}", page.text);
        let deadline = Instant::now() + Duration::from_secs(40);
        let status = loop {
            if let Some(status) = child.0.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("warren login did not finish within 40 s:\n{}", out.stderr());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (stdout, stderr) = out.join();
        if !status.success() {
            bail!("warren login as {user} failed ({status}):\n{stdout}{stderr}");
        }
        Ok(format!("{stdout}{stderr}"))
    }

    /// Starts `warren connect ARGS` on the client (named `name` in the lab) and waits until
    /// it prints `listening on`.
    pub fn connect(&mut self, name: &str, config: &Path, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["connect"];
        all.extend_from_slice(args);
        let cmd = self.warren(config, &all);
        self.lab.spawn(name, cmd)?;
        let start = Instant::now();
        while !self.lab.log_of(name).contains("listening on") {
            if !self.lab.is_running(name) {
                bail!("warren {all:?} exited:\n{}", self.lab.log_of(name));
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!(
                    "warren {all:?} printed no `listening on` within 20 s:\n{}",
                    self.lab.log_of(name)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The system `ssh` on the client through `warren ssh`, as root on `host`, running
    /// `command`.
    pub fn ssh(&self, config: &Path, host: &str, command: &[&str]) -> Command {
        let mut args: Vec<String> = vec!["ssh".into(), host.into(), "-l".into(), "root".into()];
        args.extend(self.lab.ssh_opts());
        args.extend(command.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.warren(config, &args)
    }

    /// `scp` on the client with `ProxyCommand warren nc %h %p`.
    pub fn scp(&self, config: &Path, from: &str, to: &str) -> Command {
        let mut cmd = self.lab.client_exec("scp");
        cmd.args(self.lab.ssh_opts())
            .arg("-o")
            .arg(format!("ProxyCommand={} nc %h %p", bins().warren.display()))
            .args([from, to])
            .env("WARREN_CONFIG_DIR", config)
            .env("WARREN_CA", self.cluster.ca());
        cmd
    }

    /// An HTTPS client that trusts the cluster's CA (for the nodes' admin and client API).
    pub fn https(&self) -> anyhow::Result<reqwest::Client> {
        let pem = std::fs::read(self.cluster.ca())?;
        Ok(reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
            .timeout(Duration::from_secs(10))
            .build()?)
    }

    /// The admin API's `/metrics` of node `i`, as text.
    pub async fn metrics(&self, i: usize) -> anyhow::Result<String> {
        Ok(self
            .https()?
            .get(format!(
                "https://{}/metrics",
                self.cluster.nodes[i].admin_addr
            ))
            .bearer_auth(&self.cluster.admin_key)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }
}

/// A child process killed (and reaped) when dropped.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The sum of every sample of metrics whose name starts with `prefix`.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// A 3-node cluster whose cluster (QUIC), admin/client API and relay addresses are all on
/// the lab's node address, so the site's agent and the client (each behind its NAT) reach
/// them; the HTTPS proxy stays on loopback.
pub async fn start_cluster(lab: &Lab) -> anyhow::Result<(Cluster, Vec<SocketAddr>)> {
    let ip = lab.node_ip().to_string();
    let tmp = tempfile::Builder::new().prefix("warren-test-").tempdir()?;
    let mut relays = Vec::new();
    let mut node = |tmp: &Path, name: &str| {
        let mut n = TestNode::new(tmp, name, &[]).with_cluster_ip(&ip);
        n.admin_addr = format!("{ip}:{}", free_port());
        let relay: SocketAddr = format!("{ip}:{}", free_port()).parse().expect("address");
        n.env
            .push(("WARREN_RELAY_LISTEN".into(), relay.to_string()));
        n.env
            .push(("WARREN_CLI_CLIENT_ID".into(), CLI_CLIENT.into()));
        relays.push(relay);
        n
    };
    let mut n1 = node(tmp.path(), "n1");
    phase!("init n1");
    let (admin_key, join_token) = n1.init()?;
    let mut cluster = Cluster {
        tmp,
        nodes: vec![n1],
        admin_key,
        join_token,
        env: Vec::new(),
        cluster_ip: ip.clone(),
    };
    cluster.api(0).wait_healthy(Duration::from_secs(30)).await?;
    for i in 1..3 {
        let name = format!("n{}", i + 1);
        let mut n = node(cluster.tmp.path(), &name);
        phase!("join {name}");
        let peer = cluster.nodes[0].cluster_addr.clone();
        let token = cluster.join_token.clone();
        n.join(&peer, &token, false)?;
        cluster.nodes.push(n);
        cluster.api(i).wait_healthy(Duration::from_secs(30)).await?;
    }
    Ok((cluster, relays))
}

/// Sets policy `name`'s `allow` expression (a JSON merge patch: the new expression must
/// keep the old one's shape, or the keys merge).
pub async fn patch_policy(api: &crate::Api, name: &str, allow: Value) -> anyhow::Result<()> {
    let (status, body) = api
        .send(
            Method::PATCH,
            &format!("/v1/policies/{name}"),
            &json!({ "allow": allow }),
        )
        .await?;
    anyhow::ensure!(status.is_success(), "PATCH {name}: {status} {body}");
    Ok(())
}
