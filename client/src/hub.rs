//! One WireGuard endpoint per device on this machine, shared by every `warren connect`,
//! `nc` and `ssh` of the configuration directory.
//!
//! A device is one WireGuard key, and a WireGuard peer has one current session and one
//! path: two processes each running their own endpoint with the device's key would take the
//! agent's session from each other at every handshake (the agent then sends one process's
//! packets to the other, and its flows stall until it handshakes again). So the first
//! command that needs a flow starts the hub (`warren hub`, detached in its own process
//! group, logging to `<config>/run/hub.log`), and every command asks it for flows over a
//! Unix socket:
//!
//! ```text
//!  warren connect / nc ──UnixStream <config>/run/hub.sock──► warren hub ─► DataPath (one
//!    request line (JSON) ─►  ◄─ answer line (JSON)            endpoint: WireGuard, relays,
//!    then TCP: the flow's bytes both ways (half-close passes)  userspace stacks; tickets
//!         UDP: datagrams, each a u16 big-endian length + bytes   renewed per site)
//! ```
//!
//! The hub holds an exclusive lock on `<config>/run/hub.lock` while it runs, so two never
//! serve one directory. It reads the session (`node.json`) at every new site and ticket
//! renewal, so a new `warren login` is picked up; a new device key or address restarts its
//! endpoint (open flows end). It exits after [`IDLE_EXIT`] with no flow and no request.
//! The socket is 0600 in the private configuration directory: whoever can open it can open
//! flows as the signed-in user, like whoever can read `wg.key`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

use crate::datapath::{decode_ticket, DataPath, SitePeer, SiteStatus};
use crate::node::{Connect, NodeError, Relay};
use crate::status::{self, Reporter};
use crate::{device, session};

/// The hub exits after this long with no open flow and no request.
pub const IDLE_EXIT: Duration = Duration::from_secs(30);
/// How long a command waits for a hub it started to answer.
const START_WAIT: Duration = Duration::from_secs(10);
/// Longest request or answer line.
const MAX_LINE: usize = 4096;
/// The socket's name in the run directory.
pub const SOCKET: &str = "hub.sock";
const LOCK: &str = "hub.lock";
const LOG: &str = "hub.log";

/// What a command asks the hub for, one line of JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// A TCP flow to `dst` inside `site`, established (the agent admitted it and the target
    /// answered) within `timeout_ms`.
    Tcp {
        /// The site.
        site: String,
        /// The flow's destination.
        dst: SocketAddr,
        /// How long to wait for the target.
        timeout_ms: u64,
    },
    /// A UDP flow to `dst` inside `site`.
    Udp {
        /// The site.
        site: String,
        /// The flow's destination.
        dst: SocketAddr,
    },
    /// Keeps the hub running while this connection is open (a `warren connect` waiting for
    /// local connections holds one).
    Hold,
    /// Opens `site` in the hub (asking the node for its path if the hub has none yet), so
    /// a command hears a refusal before it listens.
    Site {
        /// The site.
        site: String,
    },
}

/// The hub's answer, one line of JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Answer {
    /// Empty when the flow is open.
    #[serde(default)]
    pub error: String,
    /// What kind of failure: `refused`, `timeout`, `forbidden`, `other`.
    #[serde(default)]
    pub kind: String,
}

fn run_path(name: &str) -> anyhow::Result<PathBuf> {
    Ok(status::run_dir()?.join(name))
}

/// A command's way to the hub of its configuration directory.
#[derive(Debug, Clone)]
pub struct HubClient {
    socket: PathBuf,
}

impl HubClient {
    /// The hub of this configuration directory, started (detached) if none answers.
    pub async fn get() -> anyhow::Result<Self> {
        let socket = run_path(SOCKET)?;
        let me = Self { socket };
        drop(me.dial().await?);
        Ok(me)
    }

    /// A connection to the hub, starting one if none answers (it may have exited idle since
    /// this command last asked).
    async fn dial(&self) -> anyhow::Result<UnixStream> {
        let socket = &self.socket;
        if let Ok(s) = UnixStream::connect(socket).await {
            return Ok(s);
        }
        spawn_hub()?;
        let started = Instant::now();
        loop {
            if let Ok(s) = UnixStream::connect(socket).await {
                return Ok(s);
            }
            if started.elapsed() > START_WAIT {
                let log = std::fs::read_to_string(run_path(LOG)?).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                return Err(anyhow!(
                    "the tunnel hub (`warren hub`) did not start within {} s; its log ends:\n{}",
                    START_WAIT.as_secs(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ask(&self, req: &Request) -> std::io::Result<UnixStream> {
        let mut s = self.dial().await.map_err(std::io::Error::other)?;
        let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
        line.push(b'\n');
        s.write_all(&line).await?;
        let answer = read_line(&mut s).await?;
        let a: Answer = serde_json::from_str(&answer)
            .map_err(|e| std::io::Error::other(format!("the hub answered {answer:?}: {e}")))?;
        if a.error.is_empty() {
            return Ok(s);
        }
        let kind = match a.kind.as_str() {
            "refused" => std::io::ErrorKind::ConnectionRefused,
            "timeout" => std::io::ErrorKind::TimedOut,
            "forbidden" => std::io::ErrorKind::PermissionDenied,
            _ => std::io::ErrorKind::Other,
        };
        Err(std::io::Error::new(kind, a.error))
    }

    /// A TCP flow to `dst` inside `site`: the stream carries its bytes.
    pub async fn connect_tcp(
        &self,
        site: &str,
        dst: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<UnixStream> {
        self.ask(&Request::Tcp {
            site: site.to_owned(),
            dst,
            timeout_ms: timeout.as_millis() as u64,
        })
        .await
    }

    /// Opens `site` in the hub; the node's refusal, if it refuses, as the error.
    pub async fn open_site(&self, site: &str) -> std::io::Result<()> {
        self.ask(&Request::Site {
            site: site.to_owned(),
        })
        .await
        .map(drop)
    }

    /// Keeps the hub running as long as this command does: holds a connection open, and
    /// opens another when the hub went away (it is started again). Never returns.
    pub async fn hold(&self) {
        loop {
            if let Ok(mut s) = self.ask(&Request::Hold).await {
                let mut b = [0u8; 1];
                // Ends when the hub does.
                let _ = s.read(&mut b).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// A UDP flow to `dst` inside `site`.
    pub async fn open_udp(&self, site: &str, dst: SocketAddr) -> std::io::Result<HubUdp> {
        let s = self
            .ask(&Request::Udp {
                site: site.to_owned(),
                dst,
            })
            .await?;
        let (r, w) = s.into_split();
        Ok(HubUdp {
            r: Mutex::new(r),
            w: Mutex::new(w),
        })
    }
}

/// A UDP flow through the hub: datagrams framed with a u16 length.
#[derive(Debug)]
pub struct HubUdp {
    r: Mutex<tokio::net::unix::OwnedReadHalf>,
    w: Mutex<tokio::net::unix::OwnedWriteHalf>,
}

impl HubUdp {
    /// Sends one datagram.
    pub async fn send(&self, d: &[u8]) -> std::io::Result<()> {
        write_datagram(&mut *self.w.lock().await, d).await
    }

    /// Receives one datagram into `buf`; its length.
    pub async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        read_datagram(&mut *self.r.lock().await, buf).await
    }
}

async fn write_datagram<W: AsyncWriteExt + Unpin>(w: &mut W, d: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(d.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "datagram too long"))?;
    let mut frame = Vec::with_capacity(2 + d.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(d);
    w.write_all(&frame).await
}

async fn read_datagram<R: AsyncReadExt + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    let n = usize::from(u16::from_be_bytes(len));
    if n > buf.len() {
        let mut skip = vec![0u8; n];
        r.read_exact(&mut skip).await?;
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "datagram larger than the buffer",
        ));
    }
    r.read_exact(&mut buf[..n]).await?;
    Ok(n)
}

/// Reads one line (without its newline), at most [`MAX_LINE`] bytes, byte by byte so
/// nothing after it is consumed.
async fn read_line(s: &mut UnixStream) -> std::io::Result<String> {
    let mut out = Vec::new();
    loop {
        let b = s.read_u8().await?;
        if b == b'\n' {
            break;
        }
        if out.len() >= MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line too long",
            ));
        }
        out.push(b);
    }
    String::from_utf8(out).map_err(std::io::Error::other)
}

/// Starts `warren hub` for this configuration directory, detached: its own process group
/// (a Ctrl-C in the terminal does not reach it), no terminal, output to its log.
fn spawn_hub() -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let dir = status::run_dir()?;
    crate::token::private_dir(&dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(LOG))
        .with_context(|| format!("cannot open {}", dir.join(LOG).display()))?;
    let exe = std::env::current_exe().context("cannot find this program to start the hub")?;
    std::process::Command::new(exe)
        .arg("hub")
        .env("WARREN_CONFIG_DIR", crate::token::config_dir()?)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start the tunnel hub (`warren hub`)")?;
    Ok(())
}

/// What the hub keeps per site.
struct SiteEntry {
    relays: Vec<Relay>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Drop for SiteEntry {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// The endpoint and the device and sign-in it was started for.
struct Running {
    data: DataPath,
    key: [u8; 32],
    address: std::net::Ipv4Addr,
    /// The session token it was started with: a new sign-in is a new start.
    signed_in: Option<crate::token::Secret>,
}

struct Hub {
    state: Mutex<HubState>,
    /// Unix connections open now (requests and flows).
    open: AtomicUsize,
    last_activity: std::sync::Mutex<Instant>,
}

#[derive(Default)]
struct HubState {
    running: Option<Running>,
    sites: HashMap<String, SiteEntry>,
}

/// Counts one open connection while alive.
struct Open(Arc<Hub>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        *self.0.last_activity.lock().unwrap() = Instant::now();
    }
}

/// Runs `warren hub` until idle for [`IDLE_EXIT`], `shutdown`, or another hub holds the
/// lock (then at once, successfully).
pub async fn run(shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let dir = status::run_dir()?;
    crate::token::private_dir(&dir)?;
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK))
        .context("opening the hub's lock file")?;
    let _lock =
        match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                tracing::info!("another hub serves {}", dir.display());
                return Ok(());
            }
            Err((_, e)) => return Err(anyhow!("locking {}: {e}", dir.join(LOCK).display())),
        };
    let path = dir.join(SOCKET);
    // Ours to replace: we hold the lock, so whoever made it is gone.
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    tracing::info!(socket = %path.display(), pid = std::process::id(), "tunnel hub started");
    let hub = Arc::new(Hub {
        state: Mutex::new(HubState::default()),
        open: AtomicUsize::new(0),
        last_activity: std::sync::Mutex::new(Instant::now()),
    });
    let _reporter = Reporter::start_with(dir.clone(), "hub", "", String::new(), None, {
        let hub = hub.clone();
        move || {
            let hub = hub.clone();
            async move { hub.report().await }
        }
    });
    let idle = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let quiet = hub.last_activity.lock().unwrap().elapsed();
            if hub.open.load(Ordering::Relaxed) == 0 && quiet >= IDLE_EXIT {
                return;
            }
        }
    };
    let serve = async {
        loop {
            let (conn, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accepting on the hub's socket: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            hub.open.fetch_add(1, Ordering::Relaxed);
            *hub.last_activity.lock().unwrap() = Instant::now();
            let open = Open(hub.clone());
            tokio::spawn(async move {
                let hub = open.0.clone();
                if let Err(e) = hub.serve(conn).await {
                    tracing::debug!("a hub connection ended: {e:#}");
                }
                drop(open);
            });
        }
    };
    tokio::select! {
        () = idle => tracing::info!("no flow for {} s: the hub exits", IDLE_EXIT.as_secs()),
        () = serve => {}
        () = shutdown => tracing::info!("the hub stops"),
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

impl Hub {
    /// The relays the node offered for the open sites, and the sites' paths.
    async fn report(&self) -> (Vec<Relay>, Vec<SiteStatus>) {
        let (data, relays) = {
            let st = self.state.lock().await;
            let mut relays: Vec<Relay> = Vec::new();
            for r in st.sites.values().flat_map(|s| &s.relays) {
                if !relays.contains(r) {
                    relays.push(r.clone());
                }
            }
            (st.running.as_ref().map(|r| r.data.clone()), relays)
        };
        let sites = match data {
            Some(d) => d.status().await,
            None => Vec::new(),
        };
        (relays, sites)
    }

    async fn serve(self: &Arc<Self>, mut conn: UnixStream) -> anyhow::Result<()> {
        let line = read_line(&mut conn).await?;
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                answer(&mut conn, &format!("not a hub request: {e}"), "other").await?;
                return Ok(());
            }
        };
        match req {
            Request::Site { site } => match self.site(&site).await {
                Ok(_) => answer(&mut conn, "", "").await?,
                Err((kind, e)) => answer(&mut conn, &format!("{e:#}"), kind).await?,
            },
            Request::Hold => {
                answer(&mut conn, "", "").await?;
                let mut b = [0u8; 1];
                // Counted as open until the command closes it.
                while conn.read(&mut b).await? > 0 {}
            }
            Request::Tcp {
                site,
                dst,
                timeout_ms,
            } => {
                let data = match self.site(&site).await {
                    Ok(d) => d,
                    Err((kind, e)) => return answer(&mut conn, &format!("{e:#}"), kind).await,
                };
                let timeout = Duration::from_millis(timeout_ms.clamp(100, 120_000));
                let mut flow = match data.connect_tcp(&site, dst, timeout).await {
                    Ok(f) => f,
                    Err(e) => {
                        let kind = match e.kind() {
                            std::io::ErrorKind::ConnectionRefused => "refused",
                            std::io::ErrorKind::TimedOut => "timeout",
                            _ => "other",
                        };
                        return answer(&mut conn, &e.to_string(), kind).await;
                    }
                };
                answer(&mut conn, "", "").await?;
                let _ = tokio::io::copy_bidirectional(&mut conn, &mut flow).await;
            }
            Request::Udp { site, dst } => {
                let data = match self.site(&site).await {
                    Ok(d) => d,
                    Err((kind, e)) => return answer(&mut conn, &format!("{e:#}"), kind).await,
                };
                let flow = match data.open_udp(&site, dst).await {
                    Ok(f) => f,
                    Err(e) => return answer(&mut conn, &e.to_string(), "other").await,
                };
                answer(&mut conn, "", "").await?;
                let (mut r, mut w) = conn.into_split();
                let flow = Arc::new(flow);
                let up = {
                    let flow = flow.clone();
                    async move {
                        let mut buf = vec![0u8; 65_535];
                        loop {
                            let n = read_datagram(&mut r, &mut buf).await?;
                            flow.send(&buf[..n]).await?;
                        }
                        #[allow(unreachable_code)]
                        Ok::<(), std::io::Error>(())
                    }
                };
                let down = async move {
                    let mut buf = vec![0u8; 65_535];
                    loop {
                        let n = flow.recv(&mut buf).await?;
                        write_datagram(&mut w, &buf[..n]).await?;
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), std::io::Error>(())
                };
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            }
        }
        Ok(())
    }

    /// The endpoint, with `site` added (asking the node for it the first time).
    async fn site(self: &Arc<Self>, site: &str) -> Result<DataPath, (&'static str, anyhow::Error)> {
        let mut st = self.state.lock().await;
        let active = session::active().map_err(|e| ("forbidden", e))?;
        let signed_in = active.session.token.clone();
        if let (Some(r), true) = (&st.running, st.sites.contains_key(site)) {
            if r.signed_in == signed_in {
                return Ok(r.data.clone());
            }
        }
        let grant = active
            .client
            .connect(&active.device.name, site)
            .await
            .map_err(|e| match e {
                NodeError::Forbidden(_) | NodeError::Unauthorized(_) => {
                    ("forbidden", crate::connect::connect_error(site, e))
                }
                other => ("other", crate::connect::connect_error(site, other)),
            })?;
        let key = device::load_key(&device::key_path().map_err(|e| ("other", e))?)
            .map_err(|e| ("other", e))?
            .ok_or_else(|| {
                (
                    "other",
                    anyhow!("this machine's device key (wg.key) is missing: run `warren login`"),
                )
            })?;
        let peer = SitePeer::from_connect(&grant).map_err(|e| ("other", e))?;
        // After a new sign-in the agent may have dropped and re-added the device (its grants
        // went with the old session): start afresh, with a new handshake, rather than send
        // on a session the agent no longer has.
        let stale = st.running.as_ref().is_some_and(|r| {
            r.key != key.to_bytes() || r.address != grant.device_address || r.signed_in != signed_in
        });
        if stale {
            tracing::info!("a new sign-in: restarting the endpoint (its open flows end)");
            st.running = None;
            st.sites.clear();
        }
        let data = match &st.running {
            Some(r) => {
                r.data.add_site(peer).await.map_err(|e| ("other", e))?;
                r.data.clone()
            }
            None => {
                let data = DataPath::start(&key, grant.device_address, grant.mtu, peer)
                    .await
                    .map_err(|e| ("other", e))?;
                st.running = Some(Running {
                    data: data.clone(),
                    key: key.to_bytes(),
                    address: grant.device_address,
                    signed_in: signed_in.clone(),
                });
                data
            }
        };
        let keeper = tokio::spawn(keep_ticket(self.clone(), data.clone(), grant.clone()));
        st.sites.insert(
            site.to_owned(),
            SiteEntry {
                relays: grant.relays.clone(),
                keeper,
            },
        );
        tracing::info!(%site, "site added to the tunnel");
        Ok(data)
    }

    /// Forgets `site` (its ticket can no longer be renewed): the next request asks again.
    async fn forget(&self, site: &str) {
        let mut st = self.state.lock().await;
        st.sites.remove(site);
    }
}

/// How often the relays a site may use are asked again (with a new ticket): a relay the
/// cluster no longer lists (a revoked relay-only node) is left within this long even if it
/// keeps answering.
const RELAYS_REFRESH: Duration = Duration::from_secs(30);

/// Renews `grant`'s relay ticket before it expires, and the relays it may use every
/// [`RELAYS_REFRESH`], reading the session afresh each time; when the node refuses for
/// good, forgets the site.
async fn keep_ticket(hub: Arc<Hub>, data: DataPath, grant: Connect) {
    let site = grant.site.clone();
    let mut expires_at = grant.ticket_expires_at;
    let mut retry = false;
    loop {
        let wait = if retry {
            Duration::from_secs(5)
        } else {
            crate::connect::renew_after(expires_at, session::now_unix()).min(RELAYS_REFRESH)
        };
        tokio::time::sleep(wait).await;
        let asked = match session::active() {
            Ok(a) => a.client.connect(&a.device.name, &site).await,
            Err(e) => Err(NodeError::Unauthorized(format!("{e:#}"))),
        };
        match asked {
            Ok(g) => {
                let relays = g.relays.iter().map(|r| r.addr).collect();
                let renewed = match decode_ticket(&g) {
                    Ok(t) => data.update_ticket(&site, relays, t).await,
                    Err(e) => Err(e),
                };
                match renewed {
                    Ok(()) => {
                        expires_at = g.ticket_expires_at;
                        retry = false;
                        if let Some(s) = hub.state.lock().await.sites.get_mut(&site) {
                            s.relays = g.relays.clone();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%site, "renewing the relay ticket: {e:#}");
                        retry = true;
                    }
                }
            }
            Err(e @ (NodeError::Forbidden(_) | NodeError::Unauthorized(_))) => {
                tracing::warn!(%site, "access to the site ended: {e}");
                // Spawned: forgetting aborts this very task.
                let site = site.clone();
                tokio::spawn(async move { hub.forget(&site).await });
                return;
            }
            Err(e) => {
                tracing::warn!(%site, "renewing the relay ticket: {e}; retrying in 5 s");
                retry = true;
            }
        }
    }
}

async fn answer(conn: &mut UnixStream, error: &str, kind: &str) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(&Answer {
        error: error.to_owned(),
        kind: kind.to_owned(),
    })?;
    line.push(b'\n');
    conn.write_all(&line).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_are_one_json_line_each() {
        let r = Request::Tcp {
            site: "office".into(),
            dst: "10.0.0.7:5432".parse().unwrap(),
            timeout_ms: 10_000,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(
            line,
            r#"{"op":"tcp","site":"office","dst":"10.0.0.7:5432","timeout_ms":10000}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        let a: Answer = serde_json::from_str(r#"{"error":"no","kind":"refused"}"#).unwrap();
        assert_eq!(a.kind, "refused");
    }

    #[tokio::test]
    async fn datagrams_keep_their_boundaries_through_the_framing() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_ar, mut aw) = a.into_split();
        let (mut br, _bw) = b.into_split();
        for d in [&b""[..], b"x", &[7u8; 1400][..]] {
            write_datagram(&mut aw, d).await.unwrap();
        }
        let mut buf = [0u8; 2048];
        assert_eq!(read_datagram(&mut br, &mut buf).await.unwrap(), 0);
        assert_eq!(read_datagram(&mut br, &mut buf).await.unwrap(), 1);
        assert_eq!(buf[0], b'x');
        assert_eq!(read_datagram(&mut br, &mut buf).await.unwrap(), 1400);
        let mut small = [0u8; 10];
        write_datagram(&mut aw, &[1u8; 100]).await.unwrap();
        assert!(read_datagram(&mut br, &mut small).await.is_err());
    }
}
