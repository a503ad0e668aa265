//! Bounds every HTTPS listener of a node puts on the connections it accepts, before any
//! credential is seen: how many may be open, how long a TLS handshake and a request header
//! may take, and how long a connection may sit idle. A client dripping bytes, holding
//! silent connections or opening them by the thousand cannot exhaust the node.
//!
//! ```text
//!   accept ── over max_connections? ── close at once, count, log (rate-limited)
//!     │
//!   TLS handshake ≤ handshake_timeout
//!     │
//!   HTTP/1.1 or HTTP/2 (hyper-util auto) ── header ≤ header_read_timeout
//!     │   idle = no request in flight and no byte either way
//!   idle ≥ idle_timeout ── graceful shutdown, dropped close_grace later
//! ```
//!
//! An upgraded connection (WebSocket) leaves the HTTP connection and with it these
//! bounds; the proxy re-checks it on its own (`proxy::forward`).
//!
//! The count itself is a [`ConnGate`], which the TCP resource ports (`l4`) use as well.
//!
//! Shutdown drains ([`Drain`]): the listener stops accepting, every open connection is
//! asked to finish (HTTP/1 after the request in flight, HTTP/2 with GOAWAY) and the node
//! waits for them, up to a grace period, before it stops.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;

/// Stops listeners and drains their connections at shutdown.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    token: tokio_util::sync::CancellationToken,
    tracker: tokio_util::task::TaskTracker,
}

impl Drain {
    /// Nothing draining yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs one connection, counted until it ends.
    pub fn spawn<F>(&self, connection: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(connection);
    }

    /// Resolves once draining began.
    pub async fn started(&self) {
        self.token.cancelled().await
    }

    /// A signal for one connection. Each connection waits on its own (a child token): a
    /// waiting future is polled on every wake-up of its task, and polling one shared by
    /// every connection would take one lock shared by all of them on every request.
    fn for_connection(&self) -> tokio_util::sync::CancellationToken {
        self.token.child_token()
    }

    /// Whether draining began.
    pub fn is_draining(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Stops accepting everywhere, asks every connection to finish and waits for them for
    /// at most `grace`; returns how many were still open then.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.token.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(grace, self.tracker.wait()).await;
        self.tracker.len()
    }
}

/// Error type services and bodies may return.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bounds on a listener's connections.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Most connections open at once (from accept to close); more are closed at once.
    pub max_connections: usize,
    /// Longest a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Longest an HTTP/1 request header may take to arrive, from when the connection is
    /// ready for the next request.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no byte read or written for this long
    /// is closed gracefully (idle keep-alive and HTTP/2 connections, connections that
    /// never send a request).
    pub idle_timeout: Duration,
    /// How long a connection being closed may finish its requests before it is dropped.
    pub close_grace: Duration,
    /// Most concurrent HTTP/2 streams per connection.
    pub max_streams: u32,
    /// The setting that raises `max_connections`, named in the log line when it is
    /// reached (empty: none).
    pub setting: &'static str,
}

impl Default for ConnLimits {
    /// The admin API's bounds.
    fn default() -> Self {
        Self {
            max_connections: 512,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            close_grace: Duration::from_secs(10),
            max_streams: 64,
            setting: "",
        }
    }
}

impl ConnLimits {
    /// The HTTPS proxy's bounds: browsers keep connections open between page loads.
    pub fn proxy(max_connections: usize) -> Self {
        Self {
            max_connections,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            close_grace: Duration::from_secs(10),
            max_streams: 256,
            setting: "--proxy-max-connections",
        }
    }
}

/// Connection counters of a listener, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnStats {
    open: AtomicU64,
    refused: AtomicU64,
}

impl ConnStats {
    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections closed at once because [`ConnLimits::max_connections`] were open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The counters in the Prometheus text format, as `warren_<what>_connections` and
    /// `warren_<what>_connections_refused_total`.
    pub fn render(&self, what: &str, help: &str) -> String {
        format!(
            "# HELP warren_{what}_connections {help} connections open now.\n\
             # TYPE warren_{what}_connections gauge\n\
             warren_{what}_connections {}\n\
             # HELP warren_{what}_connections_refused_total {help} connections closed at once because the connection limit was reached.\n\
             # TYPE warren_{what}_connections_refused_total counter\n\
             warren_{what}_connections_refused_total {}\n",
            self.open(),
            self.refused()
        )
    }
}

/// A bound on how many connections are open at once, shared by the accept loops it covers,
/// with their counters.
#[derive(Clone)]
pub struct ConnGate {
    permits: Arc<Semaphore>,
    limit: usize,
    stats: Arc<ConnStats>,
}

impl ConnGate {
    /// At most `limit` connections (at least one) at once, counted in `stats`.
    pub fn new(limit: usize, stats: Arc<ConnStats>) -> Self {
        let limit = limit.max(1);
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            stats,
        }
    }

    /// How many connections may be open at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes one more connection, open until the [`Admitted`] is dropped; `None` (counted
    /// as refused) when `limit` are open. Never waits: the caller closes the connection
    /// at once rather than hold a socket for a client it cannot serve.
    pub fn admit(&self) -> Option<Admitted> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        Some(Admitted {
            _permit: permit,
            stats: self.stats.clone(),
        })
    }
}

/// One open connection of a [`ConnGate`]; dropping it frees its place.
pub struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    stats: Arc<ConnStats>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves HTTPS on `listener` within `limits`, counting in `stats`, until accepting fails
/// for good; `service` makes the service of one connection from the peer and the TLS
/// server name it asked for. `what` names the listener in logs.
pub async fn serve<F, S, B>(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: ConnLimits,
    stats: Arc<ConnStats>,
    what: &'static str,
    drain: Drain,
    service: F,
) -> String
where
    F: Fn(SocketAddr, Option<Arc<str>>) -> S + Send + Sync + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let gate = ConnGate::new(limits.max_connections, stats);
    let limits = Arc::new(limits);
    let service = Arc::new(service);
    let mut refusals = RefusalLog::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = drain.started() => {
                tracing::debug!("{what}: no longer accepting (shutting down)");
                drop(listener);
                // Draining is not a failure of the listener: it stays quiet until stopped.
                std::future::pending::<()>().await;
                unreachable!("pending never resolves");
            }
        };
        let (tcp, remote) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("{what}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(admitted) = gate.admit() else {
            refusals.refused(what, gate.limit(), limits.setting);
            // Closed at once: queueing would hold the socket for a client we cannot serve.
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let limits = limits.clone();
        let service = service.clone();
        let draining = drain.for_connection();
        drain.spawn(async move {
            match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let sni: Option<Arc<str>> = tls.get_ref().1.server_name().map(Arc::from);
                    let svc = service(remote, sni);
                    serve_connection(tls, svc, &limits, remote, what, &draining).await;
                }
                Ok(Err(e)) => tracing::debug!(%remote, "{what}: TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%remote, "{what}: TLS handshake timed out"),
            }
            drop(admitted);
        });
    }
}

/// Serves one connection until it ends, closing it when it has been idle too long.
async fn serve_connection<S, B>(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    service: S,
    limits: &ConnLimits,
    remote: SocketAddr,
    what: &'static str,
    drain: &tokio_util::sync::CancellationToken,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let activity = Arc::new(Activity::new());
    let io = Tracked {
        inner: tls,
        activity: activity.clone(),
    };
    let tracked = Counted {
        inner: service,
        activity: activity.clone(),
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), tracked);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval((limits.idle_timeout / 4).max(Duration::from_millis(10)));
    let drained = drain.cancelled();
    tokio::pin!(drained);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%remote, "{what}: connection ended: {e}");
                }
                return;
            }
            _ = tick.tick() => {
                if activity.idle_for() >= limits.idle_timeout {
                    tracing::debug!(%remote, "{what}: closing an idle connection");
                    break;
                }
            }
            () = &mut drained => {
                tracing::debug!(%remote, "{what}: finishing a connection (shutting down)");
                break;
            }
        }
    }
    conn.as_mut().graceful_shutdown();
    if tokio::time::timeout(limits.close_grace, conn.as_mut())
        .await
        .is_err()
    {
        tracing::debug!(%remote, "{what}: dropping a connection that did not close in time");
    }
}

/// Milliseconds since the first call, for activity stamps in atomics.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// When a connection last did something: requests in flight, and the last byte or request
/// end. Lock-free: it is touched on every read and write of the connection.
struct Activity {
    busy: AtomicUsize,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            busy: AtomicUsize::new(0),
            last_ms: AtomicU64::new(now_ms()),
        }
    }

    fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// How long nothing has happened (zero while a request is in flight).
    fn idle_for(&self) -> Duration {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(now_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Marks a request in flight until dropped.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A service that counts its requests in flight.
struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> hyper::service::Service<Request<Incoming>> for Counted<S>
where
    S: hyper::service::Service<Request<Incoming>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.activity.busy.fetch_add(1, Ordering::Relaxed);
        let busy = Busy(self.activity.clone());
        let answer = self.inner.call(req);
        Box::pin(async move {
            let resp = answer.await;
            drop(busy);
            resp
        })
    }
}

/// The connection's stream, stamping [`Activity`] on every read and write.
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Logs refused connections at most every 10 s, with how many since the last line. One per
/// accept loop, owned by it.
#[derive(Default)]
pub struct RefusalLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    /// Counts one connection `what` refused at `limit`, and logs if it is time to;
    /// `setting` names the flag that raises the limit (empty: none).
    pub fn refused(&mut self, what: &str, limit: usize, setting: &str) {
        self.unlogged += 1;
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        let raise = if setting.is_empty() {
            String::new()
        } else {
            format!(", {setting}")
        };
        tracing::warn!(
            refused = self.unlogged,
            "{what}: connection limit reached ({limit} open{raise}); refused {} new connections since the last report",
            self.unlogged
        );
        self.last = Some(Instant::now());
        self.unlogged = 0;
    }
}
