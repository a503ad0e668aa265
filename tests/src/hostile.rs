//! Backends for the hostile-client tests (`tests/tests/proxy_hostile.rs`): apps that read
//! requests the way real servers do, so a request the proxy lets through with another
//! meaning than the one it checked shows up in what the app answers.
//!
//! - [`Nginx`]: nginx normalizing paths (`tests/hostile/nginx.conf`: locations `/admin`,
//!   `/private`, `/public` and `/` that name themselves) and name-based virtual hosts
//!   `a.localhost` / `b.localhost`.
//! - [`Wsgi`]: a Python WSGI app on the standard library's wsgiref
//!   (`tests/hostile/echo_wsgi.py`) answering the CGI view of the request as JSON.
//! - [`UpgradeBackend`]: a raw TCP server that accepts any `Upgrade` with `101`, or always
//!   on `/always101`, and otherwise says which upgrade headers it was sent.
//!
//! Each runs on 127.0.0.1 and is stopped (by its own pid or task) when dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::free_port;

const NGINX_CONF: &str = include_str!("../hostile/nginx.conf");
const ECHO_WSGI: &str = include_str!("../hostile/echo_wsgi.py");

/// nginx with the normalizing server on `norm` and the virtual hosts on `vhost`.
pub struct Nginx {
    /// The normalizing server (`NGINX-ADMIN`, `NGINX-PRIVATE`, `NGINX-PUBLIC`,
    /// `NGINX-ROOT` bodies, each with `request_uri=` as received).
    pub norm: SocketAddr,
    /// The virtual hosts (`VHOST-A`, `VHOST-B`, `VHOST-DEFAULT`).
    pub vhost: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts `nginx` (from `PATH` or /usr/sbin) in the foreground with its own prefix in
    /// a temporary directory; returns once both ports accept connections (at most 10 s).
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("warren-nginx-").tempdir()?;
        let (norm, vhost) = (free_port(), free_port());
        let conf = NGINX_CONF
            .replace("@DIR@", &dir.path().display().to_string())
            .replace("@NORM_PORT@", &norm.to_string())
            .replace("@VHOST_PORT@", &vhost.to_string());
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let bin = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nginx");
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log"))?)
            .spawn()
            .context("spawning nginx (run scripts/install-test-deps)")?;
        let mut nginx = Self {
            norm: SocketAddr::from(([127, 0, 0, 1], norm)),
            vhost: SocketAddr::from(([127, 0, 0, 1], vhost)),
            child,
            dir,
        };
        for addr in [nginx.norm, nginx.vhost] {
            wait_listening(addr, &mut nginx.child, Duration::from_secs(10))
                .with_context(|| format!("nginx:\n{}", nginx.log()))?;
        }
        Ok(nginx)
    }

    /// nginx's error log and stderr.
    pub fn log(&self) -> String {
        ["error.log", "stderr.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The WSGI echo app (`tests/hostile/echo_wsgi.py`) under `python3`.
pub struct Wsgi {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Wsgi {
    /// Starts the app; returns once it accepts connections (at most 10 s).
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("warren-wsgi-").tempdir()?;
        let script = dir.path().join("echo_wsgi.py");
        std::fs::write(&script, ECHO_WSGI)?;
        let port = free_port();
        let child = Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log"))?)
            .spawn()
            .context("spawning python3 (run scripts/install-test-deps)")?;
        let mut wsgi = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            dir,
        };
        wait_listening(wsgi.addr, &mut wsgi.child, Duration::from_secs(10))
            .with_context(|| format!("echo_wsgi.py:\n{}", wsgi.log()))?;
        Ok(wsgi)
    }

    /// What the app printed on stderr (tracebacks).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Wsgi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `addr` until it accepts a TCP connection, failing early if `child` exits.
fn wait_listening(addr: SocketAddr, child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("exited with {status} before listening on {addr}");
        }
        if Instant::now() > deadline {
            bail!("not listening on {addr} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A raw HTTP/1.1 server that switches protocols whenever asked, as an h2c-capable
/// backend would: with `Upgrade: <token>` (or on a path starting with `/always101`, even
/// without one) it answers `101`, writes `TUNNEL-OPEN\n` and echoes what follows;
/// otherwise it answers `200` with `PLAIN method=.. target=.. upgrade=.. connection=..
/// http2-settings=..` (`-` for a header it was not sent). One request per connection.
pub struct UpgradeBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl UpgradeBackend {
    /// Starts it on a free loopback port in the current tokio runtime.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // Every connection ends within 20 s; finished ones are reaped here.
                while conns.try_join_next().is_some() {}
                conns.spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(20), upgrade_conn(tcp)).await;
                });
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for UpgradeBackend {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection.
        self.task.abort();
    }
}

async fn upgrade_conn(mut tcp: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or("-").to_owned();
    let target = request_line.next().unwrap_or("-").to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| {
        let values: Vec<&str> = headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect();
        if values.is_empty() {
            "-".to_owned()
        } else {
            values.join(",")
        }
    };
    let upgrade = header("upgrade");
    if upgrade != "-" || target.starts_with("/always101") {
        let token = if upgrade == "-" { "h2c" } else { &upgrade };
        tcp.write_all(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {token}\r\n\r\nTUNNEL-OPEN\n"
            )
            .as_bytes(),
        )
        .await?;
        tcp.write_all(&buf[end + 4..]).await?;
        loop {
            let n = tcp.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            tcp.write_all(&chunk[..n]).await?;
        }
    }
    let body = format!(
        "PLAIN method={method} target={target} upgrade={upgrade} connection={} http2-settings={}\n",
        header("connection"),
        header("http2-settings"),
    );
    tcp.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    tcp.shutdown().await
}
