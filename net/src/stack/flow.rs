//! The async handles of open flows ([`TcpFlow`], [`UdpFlow`]) and the state each shares with
//! the [`Stack`](super::Stack): bounded buffers, wakers, and the flags that tell the stack
//! what the handle did.
//!
//! A handle never touches smoltcp. It reads and writes its own bounded buffers under a
//! per-flow mutex (held for one copy), puts its flow on the stack's dirty list and wakes the
//! stack's [`Notify`]; the stack moves the bytes between those buffers and the socket in
//! [`Stack::poll`](super::Stack::poll).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use smoltcp::storage::RingBuffer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use super::FlowId;

/// What the stack and every handle share: the wake-up and the list of flows to look at.
#[derive(Debug, Default)]
pub(super) struct Bridge {
    pub notify: Arc<Notify>,
    pub dirty: Mutex<Vec<FlowId>>,
}

impl Bridge {
    /// Puts `id` on the dirty list (once: `queued` is the flow's own flag) and wakes the stack.
    fn mark(&self, id: FlowId, queued: &mut bool) {
        if !*queued {
            *queued = true;
            lock(&self.dirty).push(id);
        }
        self.notify.notify_one();
    }
}

/// Locks, ignoring poison: every critical section leaves the state consistent.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A TCP flow's state shared between the stack and its [`TcpFlow`].
pub(super) struct TcpShared {
    pub state: Mutex<TcpState>,
}

/// See [`TcpShared`].
pub(super) struct TcpState {
    /// Bytes from the peer, waiting for the handle to read them.
    pub rx: RingBuffer<'static, u8>,
    /// Bytes from the handle, waiting for room in the socket.
    pub tx: RingBuffer<'static, u8>,
    pub read_waker: Option<Waker>,
    pub write_waker: Option<Waker>,
    pub connect_waker: Option<Waker>,
    /// The handshake completed.
    pub established: bool,
    /// The peer sent FIN and every byte before it is in `rx`.
    pub eof: bool,
    /// The flow was reset, refused, timed out or aborted: reads and writes fail with this.
    pub error: Option<io::ErrorKind>,
    /// The stack has forgotten the flow (closed cleanly): writes fail.
    pub closed: bool,
    /// The handle shut down its write half.
    pub write_shut: bool,
    /// The handle was dropped.
    pub dropped: bool,
    /// On the stack's dirty list.
    pub queued: bool,
    /// The stack left bytes in the socket because `rx` was full: reading must wake it.
    pub rx_blocked: bool,
}

impl TcpShared {
    pub fn new(rx: usize, tx: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(TcpState {
                rx: RingBuffer::new(vec![0; rx]),
                tx: RingBuffer::new(vec![0; tx]),
                read_waker: None,
                write_waker: None,
                connect_waker: None,
                established: false,
                eof: false,
                error: None,
                closed: false,
                write_shut: false,
                dropped: false,
                queued: false,
                rx_blocked: false,
            }),
        })
    }
}

impl TcpState {
    /// Fails the flow with `kind` and wakes every waiting task.
    pub fn fail(&mut self, kind: io::ErrorKind) {
        self.error.get_or_insert(kind);
        self.wake_all();
    }

    pub fn wake_all(&mut self) {
        for waker in [
            self.read_waker.take(),
            self.write_waker.take(),
            self.connect_waker.take(),
        ]
        .into_iter()
        .flatten()
        {
            waker.wake();
        }
    }
}

/// One TCP connection through the stack: an outbound flow ([`Stack::connect_tcp`]) or an
/// admitted inbound one ([`Stack::admit_tcp`]).
///
/// - Read and write as any tokio stream; writes are buffered up to
///   [`StackConfig::flow_buffer`](super::StackConfig::flow_buffer) bytes and then wait
///   (backpressure reaches the peer as a shrinking TCP window, never as dropped data).
/// - `shutdown()` sends FIN once the written bytes are out; reading continues until the
///   peer's FIN (EOF).
/// - Dropping the handle closes gracefully: written bytes are still delivered, then FIN;
///   later bytes from the peer are discarded.
/// - After a reset from the peer or [`Stack::abort`], reads and writes fail with
///   `ConnectionReset` (`ConnectionRefused` if the handshake never completed, `TimedOut` if
///   the peer went silent).
///
/// Nothing moves unless the stack's owner keeps calling [`Stack::poll`] when
/// [`Stack::waker`] fires.
///
/// [`Stack::connect_tcp`]: super::Stack::connect_tcp
/// [`Stack::admit_tcp`]: super::Stack::admit_tcp
/// [`Stack::abort`]: super::Stack::abort
/// [`Stack::poll`]: super::Stack::poll
/// [`Stack::waker`]: super::Stack::waker
pub struct TcpFlow {
    id: FlowId,
    src: SocketAddr,
    dst: SocketAddr,
    shared: Arc<TcpShared>,
    bridge: Arc<Bridge>,
}

impl TcpFlow {
    pub(super) fn new(
        id: FlowId,
        src: SocketAddr,
        dst: SocketAddr,
        shared: Arc<TcpShared>,
        bridge: Arc<Bridge>,
    ) -> Self {
        Self {
            id,
            src,
            dst,
            shared,
            bridge,
        }
    }

    /// The flow's id in its stack.
    pub fn id(&self) -> FlowId {
        self.id
    }

    /// The initiator's endpoint (in client mode, this stack's own).
    pub fn src(&self) -> SocketAddr {
        self.src
    }

    /// The responder's endpoint (in accept mode, the address the client asked for).
    pub fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// Waits for the handshake: `Ok` once established, the error if the peer refused
    /// (`ConnectionRefused`), the handshake timed out, or the flow was aborted.
    pub async fn established(&self) -> io::Result<()> {
        poll_fn(|cx| {
            let mut st = lock(&self.shared.state);
            if let Some(kind) = st.error {
                return Poll::Ready(Err(kind.into()));
            }
            if st.established || st.closed {
                return Poll::Ready(Ok(()));
            }
            st.connect_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl AsyncRead for TcpFlow {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = lock(&this.shared.state);
        if let Some(kind) = st.error {
            return Poll::Ready(Err(kind.into()));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if !st.rx.is_empty() {
            let n = st.rx.dequeue_slice(buf.initialize_unfilled());
            buf.advance(n);
            if st.rx_blocked {
                st.rx_blocked = false;
                let TcpState { queued, .. } = &mut *st;
                this.bridge.mark(this.id, queued);
            }
            return Poll::Ready(Ok(()));
        }
        if st.eof || st.closed {
            return Poll::Ready(Ok(()));
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for TcpFlow {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut st = lock(&this.shared.state);
        if let Some(kind) = st.error {
            return Poll::Ready(Err(kind.into()));
        }
        if st.write_shut || st.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = st.tx.enqueue_slice(data);
        if n == 0 {
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let TcpState { queued, .. } = &mut *st;
        this.bridge.mark(this.id, queued);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = lock(&this.shared.state);
        if !st.write_shut {
            st.write_shut = true;
            let TcpState { queued, .. } = &mut *st;
            this.bridge.mark(this.id, queued);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpFlow {
    fn drop(&mut self) {
        let mut st = lock(&self.shared.state);
        st.dropped = true;
        let TcpState { queued, .. } = &mut *st;
        self.bridge.mark(self.id, queued);
    }
}

impl std::fmt::Debug for TcpFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpFlow")
            .field("id", &self.id)
            .field("src", &self.src)
            .field("dst", &self.dst)
            .finish_non_exhaustive()
    }
}

/// A UDP flow's state shared between the stack and its [`UdpFlow`].
pub(super) struct UdpShared {
    pub state: Mutex<UdpState>,
}

/// See [`UdpShared`].
pub(super) struct UdpState {
    /// Datagrams from the peer (at most `limit`; more are dropped and counted).
    pub rx: VecDeque<Vec<u8>>,
    /// Datagrams from the handle (at most `limit`; `send` waits for room).
    pub tx: VecDeque<Vec<u8>>,
    pub limit: usize,
    /// The largest payload that fits the inner MTU.
    pub max_payload: usize,
    pub read_waker: Option<Waker>,
    pub write_waker: Option<Waker>,
    /// Closed by the stack (idle, aborted): every call fails with this.
    pub error: Option<io::ErrorKind>,
    pub dropped: bool,
    pub queued: bool,
}

impl UdpShared {
    pub fn new(limit: usize, max_payload: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(UdpState {
                rx: VecDeque::new(),
                tx: VecDeque::new(),
                limit,
                max_payload,
                read_waker: None,
                write_waker: None,
                error: None,
                dropped: false,
                queued: false,
            }),
        })
    }
}

impl UdpState {
    pub fn fail(&mut self, kind: io::ErrorKind) {
        self.error.get_or_insert(kind);
        for waker in [self.read_waker.take(), self.write_waker.take()]
            .into_iter()
            .flatten()
        {
            waker.wake();
        }
    }
}

/// One UDP flow (a 5-tuple) through the stack: datagrams both ways, no ordering or delivery
/// guarantee. Closed when idle for
/// [`StackConfig::idle_timeout`](super::StackConfig::idle_timeout), aborted, or dropped;
/// after that every call fails (`TimedOut` when idle, `ConnectionReset` when aborted).
pub struct UdpFlow {
    id: FlowId,
    src: SocketAddr,
    dst: SocketAddr,
    shared: Arc<UdpShared>,
    bridge: Arc<Bridge>,
}

impl UdpFlow {
    pub(super) fn new(
        id: FlowId,
        src: SocketAddr,
        dst: SocketAddr,
        shared: Arc<UdpShared>,
        bridge: Arc<Bridge>,
    ) -> Self {
        Self {
            id,
            src,
            dst,
            shared,
            bridge,
        }
    }

    /// The flow's id in its stack.
    pub fn id(&self) -> FlowId {
        self.id
    }

    /// The initiator's endpoint.
    pub fn src(&self) -> SocketAddr {
        self.src
    }

    /// The responder's endpoint.
    pub fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// Sends one datagram, waiting while the flow's queue is full. A datagram larger than
    /// the inner MTU allows fails with `InvalidInput` (no fragmentation).
    pub async fn send(&self, datagram: &[u8]) -> io::Result<()> {
        poll_fn(|cx| self.poll_send(cx, datagram)).await
    }

    /// Poll form of [`UdpFlow::send`].
    pub fn poll_send(&self, cx: &mut Context<'_>, datagram: &[u8]) -> Poll<io::Result<()>> {
        let mut st = lock(&self.shared.state);
        if let Some(kind) = st.error {
            return Poll::Ready(Err(kind.into()));
        }
        if datagram.len() > st.max_payload {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "datagram of {} bytes exceeds the {} bytes the inner MTU allows",
                    datagram.len(),
                    st.max_payload
                ),
            )));
        }
        if st.tx.len() >= st.limit {
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        st.tx.push_back(datagram.to_vec());
        let UdpState { queued, .. } = &mut *st;
        self.bridge.mark(self.id, queued);
        Poll::Ready(Ok(()))
    }

    /// Receives one datagram into `buf`, returning its length; a datagram longer than `buf`
    /// is truncated (as `recv(2)` does).
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        poll_fn(|cx| self.poll_recv(cx, buf)).await
    }

    /// Poll form of [`UdpFlow::recv`].
    pub fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut st = lock(&self.shared.state);
        if let Some(datagram) = st.rx.pop_front() {
            let n = datagram.len().min(buf.len());
            buf[..n].copy_from_slice(&datagram[..n]);
            return Poll::Ready(Ok(n));
        }
        if let Some(kind) = st.error {
            return Poll::Ready(Err(kind.into()));
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        let mut st = lock(&self.shared.state);
        st.dropped = true;
        let UdpState { queued, .. } = &mut *st;
        self.bridge.mark(self.id, queued);
    }
}

impl std::fmt::Debug for UdpFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpFlow")
            .field("id", &self.id)
            .field("src", &self.src)
            .field("dst", &self.dst)
            .finish_non_exhaustive()
    }
}
