//! QUIC over turmoil's simulated UDP: a [`quinn::AsyncUdpSocket`] for quinn's endpoint.
//!
//! A task reads datagrams from the turmoil socket into a channel that `poll_recv` drains;
//! sends go straight to the socket (turmoil queues them, it never blocks).

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

/// A turmoil UDP socket that quinn can use.
pub struct SimUdp {
    socket: Arc<turmoil::net::UdpSocket>,
    incoming: Mutex<mpsc::Receiver<(Vec<u8>, SocketAddr)>>,
    local: SocketAddr,
}

impl fmt::Debug for SimUdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SimUdp({})", self.local)
    }
}

impl SimUdp {
    /// Binds `addr` in the current simulated host and starts its reader task.
    pub async fn bind(addr: SocketAddr) -> io::Result<Arc<Self>> {
        let socket = Arc::new(turmoil::net::UdpSocket::bind(addr).await?);
        let local = socket.local_addr()?;
        let (tx, rx) = mpsc::channel(4096);
        let reader = socket.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = reader.recv_from(&mut buf).await {
                if tx.send((buf[..n].to_vec(), from)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Arc::new(Self {
            socket,
            incoming: Mutex::new(rx),
            local,
        }))
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        // One datagram per transmit: max_transmit_segments is 1.
        self.socket
            .try_send_to(transmit.contents, transmit.destination)
            .map(|_| ())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = self.incoming.lock().expect("incoming lock");
        match rx.poll_recv(cx) {
            Poll::Ready(Some((data, from))) => {
                let n = data.len().min(bufs[0].len());
                bufs[0][..n].copy_from_slice(&data[..n]);
                meta[0] = RecvMeta {
                    addr: from,
                    len: n,
                    stride: n,
                    ..RecvMeta::default()
                };
                Poll::Ready(Ok(1))
            }
            Poll::Ready(None) => Poll::Ready(Err(io::Error::other("the simulated socket closed"))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
