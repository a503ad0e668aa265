//! `warren connect`, `warren nc` and `warren ssh`: flows to private resources.
//!
//! ```text
//! app ─TCP─► 127.0.0.1:PORT ─┐                      warren hub (one per device): DataPath
//!                            ├─► run/hub.sock ─────► (WireGuard) ─► relay ─► agent
//! stdin/stdout (nc) ─────────┘   one stream a flow    POST /v1/client/connect per site,
//!                                                     again every ticket lifetime
//! ```
//!
//! Each command asks the node which resources the user may reach and picks the one named
//! (a 403 for its site means the user may reach nothing there: the message says "not
//! allowed"), then opens its flows through this device's hub ([`crate::hub`]), starting it
//! if none runs, and runs until its work is done or it is told to stop.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use clap::Args;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, BufWriter};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;

use crate::datapath::{DataPath, UdpFlow};
use crate::hub::{HubClient, HubUdp};
use crate::node::NodeError;
use crate::resources::{self, Proto, Target};
use crate::session::{self, Active};
use crate::status::{self, Reporter};

/// How long a new TCP flow may take to be established through the tunnel.
const FLOW_TIMEOUT: Duration = Duration::from_secs(15);
/// A UDP flow with no datagram either way for this long is closed.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Datagrams queued per UDP client before more are dropped.
const UDP_QUEUE: usize = 256;

/// `warren connect NAME`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The resource's name or alias (see `warren ls`).
    pub name: String,
    /// The local address to listen on (default: 127.0.0.1 and the resource's port if it is
    /// free, else a free port).
    #[arg(long, value_name = "ADDR:PORT")]
    pub local: Option<SocketAddr>,
    /// The resource's port to reach (default: its first).
    #[arg(long)]
    pub port: Option<u16>,
    /// Forward UDP instead of TCP: each local client address is one UDP flow, closed after
    /// 60 s without traffic.
    #[arg(long)]
    pub udp: bool,
}

/// `warren nc HOST PORT`.
#[derive(Debug, Args)]
pub struct NcArgs {
    /// A resource's name or alias, its DNS name, or an address inside a private resource.
    pub host: String,
    /// The port to reach.
    pub port: u16,
}

/// `warren ssh HOST [ARGS]...`.
#[derive(Debug, Args)]
pub struct SshArgs {
    /// The ssh destination: `[user@]HOST`, HOST as `warren nc` takes it.
    pub destination: String,
    /// Passed to ssh after the destination: options, then the remote command.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Runs `warren connect` until `shutdown` completes, the user's access ends, or the
/// listener fails.
pub async fn connect(args: ConnectArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let active = session::active()?;
    let proto = if args.udp { Proto::Udp } else { Proto::Tcp };
    let list = reachable(&active).await?;
    let target = resources::by_name(&list, &args.name, args.port, proto)?;
    let site = target.resource.site.clone();
    let data = open_site(&site).await?;
    let hub = data.clone();

    let local = match args.local {
        Some(a) => {
            if !a.ip().is_loopback() {
                eprintln!(
                    "warren: warning: {a} is not a loopback address: anyone who can reach it \
                     reaches {} as you",
                    target.resource.name
                );
            }
            a
        }
        None => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), target.dst.port()),
    };
    let explicit = args.local.is_some();
    let reporter_dir = status::run_dir()?;
    let serve = if args.udp {
        let sock = bind_udp(local, explicit).await?;
        let addr = sock.local_addr()?;
        announce(addr, &target, &site);
        let reporter = Reporter::listener(reporter_dir, "connect", &target, Some(addr));
        Box::pin(async move {
            let _reporter = reporter;
            serve_udp(sock, data.clone(), site.clone(), target.dst).await
        }) as std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>
    } else {
        let listener = bind_tcp(local, explicit).await?;
        let addr = listener.local_addr()?;
        announce(addr, &target, &site);
        let reporter = Reporter::listener(reporter_dir, "connect", &target, Some(addr));
        let (data, site, dst) = (data.clone(), site.clone(), target.dst);
        Box::pin(async move {
            let _reporter = reporter;
            serve_tcp(listener, data, site, dst).await
        })
    };
    tokio::select! {
        r = serve => r,
        () = hub.hold() => Ok(()),
        () = shutdown => Ok(()),
    }
}

/// Runs `warren nc`: stdin and stdout are one TCP flow. Only the payload goes to stdout.
pub async fn nc(args: NcArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let active = session::active()?;
    let list = reachable(&active).await?;
    let target = resources::by_host(&list, &args.host, args.port, Proto::Tcp)?;
    let site = target.resource.site.clone();
    let data = open_site(&site).await?;
    let _reporter = Reporter::listener(status::run_dir()?, "nc", &target, None);
    let flow = data
        .connect_tcp(&site, target.dst, FLOW_TIMEOUT)
        .await
        .map_err(|e| flow_error(&target, &site, &e))?;
    let piped = pipe(
        flow,
        tokio::io::stdin(),
        BufWriter::new(tokio::io::stdout()),
    );
    tokio::select! {
        r = piped => r.with_context(|| format!("the flow to {} ended", target.dst)),
        () = shutdown => Ok(()),
    }
}

/// Copies `input` into `flow` and `flow` into `output` until the flow's far side closes.
/// `input` ending (EOF, or an error) only shuts the flow's write half: the answer may still
/// be on its way (`ssh` and `git` half-close).
async fn pipe<F, R, W>(flow: F, mut input: R, mut output: W) -> std::io::Result<()>
where
    F: AsyncRead + AsyncWrite,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut from_flow, mut to_flow) = tokio::io::split(flow);
    let up = async {
        let _ = tokio::io::copy(&mut input, &mut to_flow).await;
        let _ = to_flow.shutdown().await;
        std::future::pending::<()>().await
    };
    let down = async {
        let copied = tokio::io::copy(&mut from_flow, &mut output).await;
        output.flush().await?;
        copied.map(drop)
    };
    tokio::select! {
        r = down => r,
        () = up => Ok(()),
    }
}

/// Runs `warren ssh`: replaces this process with the system `ssh`, its ProxyCommand
/// `warren nc %h %p` (the environment, `WARREN_CONFIG_DIR` included, passes through).
pub fn ssh(args: SshArgs) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;

    let exe = std::env::current_exe().context("cannot tell where this warren is")?;
    let cmd = ssh_command(&exe, &args);
    let err = std::process::Command::new(&cmd[0]).args(&cmd[1..]).exec();
    Err(anyhow!(
        "cannot run {}: {err}; is OpenSSH's client installed?",
        cmd[0]
    ))
}

/// The ssh command line `warren ssh` runs.
fn ssh_command(exe: &Path, args: &SshArgs) -> Vec<String> {
    let mut cmd = vec![
        "ssh".to_owned(),
        "-o".to_owned(),
        format!(
            "ProxyCommand={} nc %h %p",
            shell_quote(&exe.to_string_lossy())
        ),
        args.destination.clone(),
    ];
    cmd.extend(args.args.iter().cloned());
    cmd
}

/// `s` as one word for `sh -c` (ssh runs ProxyCommand through the shell).
fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The resources the user may reach now.
async fn reachable(active: &Active) -> anyhow::Result<Vec<crate::node::Resource>> {
    active
        .client
        .resources(&active.device.name)
        .await
        .map_err(|e| anyhow!("asking {} what you may reach: {e}", active.session.node))
}

/// This device's hub, with `site` open in it (so the node's refusal is said before any
/// listener opens).
async fn open_site(site: &str) -> anyhow::Result<HubClient> {
    let hub = HubClient::get().await?;
    hub.open_site(site).await.map_err(|e| anyhow!("{e}"))?;
    Ok(hub)
}

/// What a refused connect means to the person.
pub(crate) fn connect_error(site: &str, e: NodeError) -> anyhow::Error {
    match e {
        NodeError::Forbidden(m) => anyhow!("you are not allowed to reach {site}: {m}"),
        NodeError::Api {
            status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
            message,
            ..
        } => anyhow!("{site} cannot be reached now: {message}; try again shortly"),
        other => anyhow!("asking the node for a path to {site}: {other}"),
    }
}

fn flow_error(target: &Target, site: &str, e: &std::io::Error) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => anyhow!(
            "{} ({}) refused the connection, or the agent of {site} did not allow it",
            target.resource.name,
            target.dst
        ),
        std::io::ErrorKind::TimedOut => anyhow!(
            "no answer from {} ({}) through {site} within {} s",
            target.resource.name,
            target.dst,
            FLOW_TIMEOUT.as_secs()
        ),
        _ => anyhow!(
            "cannot open a flow to {} ({}) through {site}: {e}",
            target.resource.name,
            target.dst
        ),
    }
}

/// How long to wait before renewing a ticket that expires at `expires_at` (Unix s): until a
/// third of its remaining life is left, and at least 10 s (a skewed clock must not make us
/// hammer the node).
pub(crate) fn renew_after(expires_at: u64, now: u64) -> Duration {
    let left = expires_at.saturating_sub(now);
    Duration::from_secs((left - left / 3).max(10))
}

fn announce(addr: SocketAddr, target: &Target, site: &str) {
    println!(
        "listening on {addr} → {} ({}) via {site}",
        target.resource.name, target.dst
    );
}

async fn bind_tcp(local: SocketAddr, explicit: bool) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(local).await {
        Ok(l) => Ok(l),
        Err(e) if explicit => Err(e).with_context(|| format!("--local {local}: cannot listen")),
        Err(_) => TcpListener::bind(SocketAddr::new(local.ip(), 0))
            .await
            .with_context(|| format!("cannot listen on {}", local.ip())),
    }
}

async fn bind_udp(local: SocketAddr, explicit: bool) -> anyhow::Result<UdpSocket> {
    match UdpSocket::bind(local).await {
        Ok(s) => Ok(s),
        Err(e) if explicit => Err(e).with_context(|| format!("--local {local}: cannot listen")),
        Err(_) => UdpSocket::bind(SocketAddr::new(local.ip(), 0))
            .await
            .with_context(|| format!("cannot listen on {}", local.ip())),
    }
}

/// Where a command's flows are opened: this device's hub, or (in the hub itself, and in
/// tests) a data path in this process.
pub trait Flows: Clone + Send + Sync + 'static {
    /// A TCP flow's byte stream.
    type Tcp: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// A UDP flow.
    type Udp: Datagrams;
    /// A TCP flow to `dst` inside `site`, established within `timeout`.
    fn connect_tcp(
        &self,
        site: &str,
        dst: SocketAddr,
        timeout: Duration,
    ) -> impl Future<Output = std::io::Result<Self::Tcp>> + Send;
    /// A UDP flow to `dst` inside `site`.
    fn open_udp(
        &self,
        site: &str,
        dst: SocketAddr,
    ) -> impl Future<Output = std::io::Result<Self::Udp>> + Send;
}

/// A UDP flow's datagrams.
pub trait Datagrams: Send + Sync + 'static {
    /// Sends one datagram.
    fn send(&self, d: &[u8]) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Receives one datagram; its length.
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = std::io::Result<usize>> + Send;
}

impl Flows for HubClient {
    type Tcp = tokio::net::UnixStream;
    type Udp = HubUdp;
    async fn connect_tcp(
        &self,
        site: &str,
        dst: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<Self::Tcp> {
        HubClient::connect_tcp(self, site, dst, timeout).await
    }
    async fn open_udp(&self, site: &str, dst: SocketAddr) -> std::io::Result<Self::Udp> {
        HubClient::open_udp(self, site, dst).await
    }
}

impl Flows for DataPath {
    type Tcp = crate::datapath::TcpFlow;
    type Udp = UdpFlow;
    async fn connect_tcp(
        &self,
        site: &str,
        dst: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<Self::Tcp> {
        DataPath::connect_tcp(self, site, dst, timeout).await
    }
    async fn open_udp(&self, site: &str, dst: SocketAddr) -> std::io::Result<Self::Udp> {
        DataPath::open_udp(self, site, dst).await
    }
}

impl Datagrams for HubUdp {
    async fn send(&self, d: &[u8]) -> std::io::Result<()> {
        HubUdp::send(self, d).await
    }
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        HubUdp::recv(self, buf).await
    }
}

impl Datagrams for UdpFlow {
    async fn send(&self, d: &[u8]) -> std::io::Result<()> {
        UdpFlow::send(self, d).await
    }
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        UdpFlow::recv(self, buf).await
    }
}

/// Every accepted connection becomes a flow to `dst`.
async fn serve_tcp<F: Flows>(
    listener: TcpListener,
    data: F,
    site: String,
    dst: SocketAddr,
) -> anyhow::Result<()> {
    loop {
        let (mut sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: they pass; keep the listener.
                eprintln!("warren: warning: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (data, site) = (data.clone(), site.clone());
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            match data.connect_tcp(&site, dst, FLOW_TIMEOUT).await {
                Ok(mut flow) => {
                    // Either side closing or resetting ends the pair; nothing to report.
                    let _ = tokio::io::copy_bidirectional(&mut sock, &mut flow).await;
                }
                Err(e) => eprintln!("warren: {peer}: cannot open a flow to {dst}: {e}"),
            }
        });
    }
}

/// Every local client address becomes a UDP flow to `dst`, closed after [`UDP_IDLE`].
async fn serve_udp<F: Flows>(
    sock: UdpSocket,
    data: F,
    site: String,
    dst: SocketAddr,
) -> anyhow::Result<()> {
    let sock = Arc::new(sock);
    let mut clients: std::collections::HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> =
        std::collections::HashMap::new();
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            // ICMP errors from earlier sends surface here on Linux (a client that went
            // away): they end no flow but that client's, which its idle timer ends.
            Err(_) => continue,
        };
        let datagram = buf[..n].to_vec();
        if let Some(tx) = clients.get(&src) {
            match tx.try_send(datagram) {
                Ok(()) => continue,
                // A full queue drops, as a full network would.
                Err(mpsc::error::TrySendError::Full(_)) => continue,
                Err(mpsc::error::TrySendError::Closed(d)) => {
                    clients.remove(&src);
                    start_udp_client(&mut clients, &sock, &data, &site, dst, src, d).await;
                }
            }
        } else {
            clients.retain(|_, tx| !tx.is_closed());
            start_udp_client(&mut clients, &sock, &data, &site, dst, src, datagram).await;
        }
    }
}

async fn start_udp_client<F: Flows>(
    clients: &mut std::collections::HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    sock: &Arc<UdpSocket>,
    data: &F,
    site: &str,
    dst: SocketAddr,
    src: SocketAddr,
    first: Vec<u8>,
) {
    let flow = match data.open_udp(site, dst).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("warren: {src}: cannot open a UDP flow to {dst}: {e}");
            return;
        }
    };
    let (tx, rx) = mpsc::channel(UDP_QUEUE);
    let _ = tx.try_send(first);
    clients.insert(src, tx);
    tokio::spawn(udp_client(flow, sock.clone(), src, rx));
}

async fn udp_client<U: Datagrams>(
    flow: U,
    sock: Arc<UdpSocket>,
    src: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    let mut buf = vec![0u8; 65_535];
    loop {
        tokio::select! {
            d = rx.recv() => {
                let Some(d) = d else { break };
                if let Err(e) = flow.send(&d).await {
                    if e.kind() == std::io::ErrorKind::InvalidInput {
                        // Larger than the tunnel carries: dropped, like an oversized packet.
                        continue;
                    }
                    break;
                }
            }
            n = flow.recv(&mut buf) => {
                let Ok(n) = n else { break };
                let _ = sock.send_to(&buf[..n], src).await;
            }
            () = tokio::time::sleep(UDP_IDLE) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_gets_a_proxy_command_and_the_rest() {
        let args = SshArgs {
            destination: "alice@jump".into(),
            args: vec!["-p".into(), "2222".into(), "uname".into(), "-a".into()],
        };
        assert_eq!(
            ssh_command(Path::new("/usr/bin/warren"), &args),
            [
                "ssh",
                "-o",
                "ProxyCommand=/usr/bin/warren nc %h %p",
                "alice@jump",
                "-p",
                "2222",
                "uname",
                "-a"
            ]
        );
        assert_eq!(
            shell_quote("/opt/my tools/warren"),
            "'/opt/my tools/warren'"
        );
        assert_eq!(shell_quote("/tmp/it's"), r"'/tmp/it'\''s'");
    }

    #[test]
    fn tickets_renew_with_a_third_left() {
        assert_eq!(renew_after(1300, 1000), Duration::from_secs(200));
        assert_eq!(renew_after(1000, 1000), Duration::from_secs(10));
        assert_eq!(renew_after(900, 1000), Duration::from_secs(10));
    }

    /// A relay reduced to the splice (agents bind with an empty site, the client with its
    /// site; every ticket is good), an agent endpoint granting `127.0.0.1`, and this
    /// client's data path through them.
    mod lab {
        use boringtun::x25519::{PublicKey, StaticSecret};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        use warren_net::endpoint::{AgentEndpoint, Endpoint, EndpointConfig};
        use warren_net::wg::SecretKey;
        use warren_proto::relay::Frame;
        use warren_proto::tunnel::{DeviceAccess, FlowDst, FlowGrant};
        use warren_proto::Name;

        use super::*;
        use crate::datapath::SitePeer;

        const DEVICE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 9);
        /// A guard against a hung test, not a measurement.
        const PATIENCE: Duration = Duration::from_secs(20);

        async fn relay() -> SocketAddr {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = sock.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut agent, mut client) = (None, None);
                let (mut buf, mut out) = (vec![0u8; 65_536], Vec::new());
                while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                    let Ok(frame) = Frame::decode(&buf[..n]) else {
                        continue;
                    };
                    out.clear();
                    // The agent's channel is 1, the client's 2.
                    let to = match frame {
                        Frame::Ping { nonce } => {
                            Frame::Pong {
                                nonce,
                                observed: from,
                            }
                            .encode(&mut out);
                            from
                        }
                        Frame::Bind { nonce, site, .. } => {
                            let channel = if site.is_empty() {
                                agent = Some(from);
                                1
                            } else {
                                client = Some(from);
                                2
                            };
                            Frame::Bound {
                                nonce,
                                channel,
                                lifetime: 30,
                            }
                            .encode(&mut out);
                            from
                        }
                        Frame::Data { channel, payload } => {
                            let (other, to) = if channel == 1 {
                                (2, client)
                            } else {
                                (1, agent)
                            };
                            let Some(to) = to else { continue };
                            Frame::Data {
                                channel: other,
                                payload,
                            }
                            .encode(&mut out);
                            to
                        }
                        _ => continue,
                    };
                    let _ = sock.send_to(&out, to).await;
                }
            });
            addr
        }

        /// The data path to a site whose agent lets the device reach 127.0.0.1 (TCP, UDP);
        /// the agent stops when its endpoint is dropped.
        async fn data_path() -> (DataPath, AgentEndpoint) {
            let relay = relay().await;
            let agent_key = SecretKey::generate();
            let agent = Endpoint::agent(
                UdpSocket::bind("127.0.0.1:0").await.unwrap(),
                agent_key.clone(),
                EndpointConfig::default(),
            )
            .unwrap();
            let ours = StaticSecret::from([7u8; 32]);
            agent
                .set_access(
                    vec![DeviceAccess {
                        device: Name::new("laptop").unwrap(),
                        user: Name::new("alice").unwrap(),
                        key: PublicKey::from(&ours).to_bytes(),
                        address: DEVICE,
                        grants: vec![FlowGrant {
                            resource: Name::new("echo").unwrap(),
                            dst: FlowDst::Net("127.0.0.1/32".parse().unwrap()),
                            ports: vec![(1, u16::MAX)],
                            tcp: true,
                            udp: true,
                            icmp: false,
                        }],
                    }],
                    vec![(relay, b"agent-ticket".to_vec())],
                    tokio::time::Instant::now().into_std() + Duration::from_secs(300),
                )
                .await
                .unwrap();
            let peer = SitePeer {
                site: "lab".into(),
                agent_key: agent_key.public_key().0,
                relays: vec![relay],
                ticket: b"device-ticket".to_vec(),
            };
            let data = DataPath::start(&ours, DEVICE, Some(1408), peer)
                .await
                .unwrap();
            (data, agent)
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_local_tcp_listener_forwards_each_connection_as_a_flow() {
            let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let dst = echo.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = echo.accept().await {
                    tokio::spawn(async move {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                }
            });
            let (data, _agent) = data_path().await;
            let local = bind_tcp("127.0.0.1:0".parse().unwrap(), true)
                .await
                .unwrap();
            let addr = local.local_addr().unwrap();
            tokio::spawn(serve_tcp(local, data.clone(), "lab".into(), dst));

            for i in 0..2u8 {
                let mut app = tokio::net::TcpStream::connect(addr).await.unwrap();
                let msg = vec![i; 100_000];
                app.write_all(&msg).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                tokio::time::timeout(PATIENCE, app.read_exact(&mut back))
                    .await
                    .expect("echo hung")
                    .unwrap();
                assert_eq!(back, msg);
            }
            let status = data.status().await;
            assert_eq!(status.len(), 1, "{status:?}");
            assert!(status[0].relay.is_some(), "{status:?}");
            assert!(status[0].bytes_received > 200_000, "{status:?}");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn nc_half_closes_and_reads_the_answer_to_the_end() {
            // Answers only once the client has finished sending, then closes.
            let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let dst = server.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = server.accept().await.unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                s.write_all(format!("got {} bytes", got.len()).as_bytes())
                    .await
                    .unwrap();
            });
            let (data, _agent) = data_path().await;
            let flow = data.connect_tcp("lab", dst, PATIENCE).await.unwrap();
            let input = vec![b'x'; 300_000];
            let mut output = Vec::new();
            tokio::time::timeout(PATIENCE, pipe(flow, &input[..], &mut output))
                .await
                .expect("nc hung")
                .unwrap();
            assert_eq!(String::from_utf8(output).unwrap(), "got 300000 bytes");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn each_local_udp_client_is_its_own_flow() {
            let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let dst = echo.local_addr().unwrap();
            tokio::spawn(async move {
                let mut b = [0u8; 2048];
                while let Ok((n, from)) = echo.recv_from(&mut b).await {
                    // Which flow it came through shows in the answer: its source port.
                    let mut reply = b[..n].to_vec();
                    reply.extend_from_slice(&from.port().to_be_bytes());
                    let _ = echo.send_to(&reply, from).await;
                }
            });
            let (data, _agent) = data_path().await;
            let local = bind_udp("127.0.0.1:0".parse().unwrap(), true)
                .await
                .unwrap();
            let addr = local.local_addr().unwrap();
            tokio::spawn(serve_udp(local, data, "lab".into(), dst));

            let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let ra = ask(&a, addr, b"from a").await;
            let rb = ask(&b, addr, b"from b").await;
            assert_eq!(&ra[..6], b"from a");
            assert_eq!(&rb[..6], b"from b");
            assert_ne!(ra[6..], rb[6..], "two local clients share one flow");
            // The same client again: the same flow.
            assert_eq!(ask(&a, addr, b"from a").await, ra);
        }

        /// Sends `msg` from `sock` to `to` until an answer comes (the first datagram may race
        /// the handshake); the answer.
        async fn ask(sock: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Vec<u8> {
            let mut buf = [0u8; 2048];
            for _ in 0..40 {
                sock.send_to(msg, to).await.unwrap();
                let wait = tokio::time::timeout(Duration::from_millis(500), sock.recv(&mut buf));
                if let Ok(Ok(n)) = wait.await {
                    return buf[..n].to_vec();
                }
            }
            panic!("no answer through the tunnel");
        }
    }

    #[test]
    fn a_refused_connect_says_not_allowed() {
        let e = connect_error(
            "site-a",
            NodeError::Forbidden("alice may reach nothing".into()),
        );
        assert!(e.to_string().contains("not allowed"), "{e}");
    }
}
