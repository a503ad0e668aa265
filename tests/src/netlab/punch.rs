//! Plain UDP hole punching, to check what a lab topology lets through without any Warren
//! code: a STUN-like [`Rendezvous`] in the root namespace (where the nodes are) tells each
//! socket its public mapping, then [`hole_punch`] has two sockets send to each other at the
//! same time. Sockets come from [`Lab::udp_socket`](super::Lab::udp_socket) (they stay in
//! their namespace whichever thread uses them).

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Prefix of a request to the rendezvous (`warren-rv? <nonce> <padding>`).
const ASK: &[u8] = b"warren-rv?";
/// Prefix of its answer (`warren-rv <observed addr> <nonce> <request length>`).
const ANSWER: &str = "warren-rv";
/// Prefix of a punch datagram (`warren-punch <peer index> <seq>`).
const PUNCH: &str = "warren-punch";
/// Prefix of a sized probe (`warren-size <nonce> <padding>`).
const SIZED: &str = "warren-size";

/// Nonces of this process, so that a late answer never matches a newer question.
fn nonce() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A STUN-like server: UDP sockets on one address of the root namespace, each answering
/// every `warren-rv?` datagram with the address and port it came from. Two ports, so that a
/// socket can see whether its NAT keeps one mapping for different destinations
/// ([`mapping_is_endpoint_independent`]). Stopped when dropped.
pub struct Rendezvous {
    socks: Vec<UdpSocket>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Rendezvous {
    /// Listens on two free UDP ports of `ip` (an address of the root namespace, e.g.
    /// [`Lab::node_ip`](super::Lab::node_ip)).
    pub fn start(ip: std::net::Ipv4Addr) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut socks = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..2 {
            let sock = UdpSocket::bind((ip, 0)).with_context(|| format!("rendezvous on {ip}"))?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let serve = sock.try_clone()?;
            socks.push(sock);
            let stopped = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stopped.load(Ordering::Relaxed) {
                    let Ok((n, from)) = serve.recv_from(&mut buf) else {
                        continue;
                    };
                    let Some(rest) = buf[..n].strip_prefix(ASK) else {
                        continue;
                    };
                    let text = String::from_utf8_lossy(rest);
                    let Some(id) = text.split_whitespace().next() else {
                        continue;
                    };
                    let _ = serve.send_to(format!("{ANSWER} {from} {id} {n}").as_bytes(), from);
                }
            }));
        }
        Ok(Rendezvous {
            socks,
            stop,
            threads,
        })
    }

    /// Its address number `which` (0 or 1).
    pub fn addr(&self, which: usize) -> anyhow::Result<SocketAddr> {
        self.socks
            .get(which)
            .with_context(|| format!("the rendezvous has no address {which}"))?
            .local_addr()
            .context("the rendezvous' address")
    }

    /// The public address of `sock` as the rendezvous' address `which` sees it, asked with
    /// a datagram of `len` bytes (at least 32), resent every 200 ms for up to 2 s.
    pub fn observe_sized(
        &self,
        sock: &UdpSocket,
        which: usize,
        len: usize,
    ) -> anyhow::Result<SocketAddrV4> {
        let to = self.addr(which)?;
        let id = nonce();
        let mut ask = format!("{} {id} ", String::from_utf8_lossy(ASK)).into_bytes();
        ask.resize(len.max(32), b'.');
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            sock.send_to(&ask, to)
                .with_context(|| format!("asking the rendezvous at {to}"))?;
            let resend = Instant::now() + Duration::from_millis(200);
            while let Some(left) = resend.checked_duration_since(Instant::now()) {
                if left.is_zero() {
                    break;
                }
                sock.set_read_timeout(Some(left))?;
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    break;
                };
                let text = String::from_utf8_lossy(&buf[..n]);
                let words: Vec<&str> = text.split_whitespace().collect();
                if from == to
                    && words.len() == 4
                    && words[0] == ANSWER
                    && words[2] == id.to_string()
                {
                    return words[1]
                        .parse()
                        .with_context(|| format!("the rendezvous' answer {text:?}"));
                }
            }
        }
        bail!(
            "no answer from the rendezvous at {to} within 2 s (socket {:?})",
            sock.local_addr().ok()
        )
    }

    /// [`Rendezvous::observe_sized`] with a small datagram.
    pub fn observe(&self, sock: &UdpSocket, which: usize) -> anyhow::Result<SocketAddrV4> {
        self.observe_sized(sock, which, 32)
    }

    /// Sends `payload` from its address `which` to `to` (e.g. to an old mapping, to see
    /// whether it still lets the rendezvous in).
    pub fn send_from(&self, which: usize, to: SocketAddr, payload: &[u8]) -> anyhow::Result<()> {
        self.socks
            .get(which)
            .with_context(|| format!("the rendezvous has no address {which}"))?
            .send_to(payload, to)
            .with_context(|| format!("sending from the rendezvous to {to}"))?;
        Ok(())
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Whether `sock`'s NAT shows it to both of the rendezvous' ports with the same public
/// address and port (endpoint-independent mapping), and those mappings.
pub fn mapping_is_endpoint_independent(
    rv: &Rendezvous,
    sock: &UdpSocket,
) -> anyhow::Result<(bool, [SocketAddrV4; 2])> {
    let m = [rv.observe(sock, 0)?, rv.observe(sock, 1)?];
    Ok((m[0] == m[1], m))
}

/// What one side of a [`hole_punch`] heard.
#[derive(Debug, Clone, Copy)]
pub struct Heard {
    /// Where the other side's datagram came from.
    pub from: SocketAddr,
    /// When, since the punch started.
    pub after: Duration,
}

/// The outcome of a [`hole_punch`].
#[derive(Debug, Clone)]
pub struct Punch {
    /// What each side heard from the other, if anything.
    pub heard: [Option<Heard>; 2],
    /// Datagrams each side sent.
    pub sent: [u32; 2],
    /// How long the punch ran.
    pub elapsed: Duration,
}

impl Punch {
    /// Both sides heard each other: the hole is open both ways.
    pub fn works(&self) -> bool {
        self.heard.iter().all(Option::is_some)
    }
}

/// Simultaneous hole punching between two sockets: each sends to its `targets` (the
/// other's candidate addresses, e.g. its public mapping from a [`Rendezvous`]) every 50 ms,
/// and also answers to where the other's datagrams come from (a peer-reflexive candidate,
/// as ICE does), until both heard each other or `window` is over. Bounded by `window`.
pub fn hole_punch(
    a: (&UdpSocket, &[SocketAddr]),
    b: (&UdpSocket, &[SocketAddr]),
    window: Duration,
) -> anyhow::Result<Punch> {
    let heard_flags = [AtomicBool::new(false), AtomicBool::new(false)];
    let start = Instant::now();
    let peer = |me: usize,
                sock: &UdpSocket,
                targets: &[SocketAddr]|
     -> anyhow::Result<(Option<Heard>, u32)> {
        let mut targets = targets.to_vec();
        let mut heard = None;
        let mut sent = 0u32;
        let mut next_send = start;
        let mut buf = vec![0u8; 2048];
        let want = format!("{PUNCH} {} ", 1 - me);
        loop {
            let now = Instant::now();
            if heard_flags.iter().all(|f| f.load(Ordering::Relaxed)) || now - start > window {
                break;
            }
            if now >= next_send {
                for t in &targets {
                    let msg = format!("{PUNCH} {me} {sent}");
                    // A refused send (no route) is a failed punch, not an error.
                    let _ = sock.send_to(msg.as_bytes(), t);
                    sent += 1;
                }
                next_send = now + Duration::from_millis(50);
            }
            sock.set_read_timeout(Some(Duration::from_millis(10)))?;
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                if buf[..n].starts_with(want.as_bytes()) {
                    if heard.is_none() {
                        heard = Some(Heard {
                            from,
                            after: start.elapsed(),
                        });
                        heard_flags[me].store(true, Ordering::Relaxed);
                    }
                    if !targets.contains(&from) {
                        targets.push(from);
                    }
                }
            }
        }
        Ok((heard, sent))
    };
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| peer(0, a.0, a.1));
        let tb = s.spawn(|| peer(1, b.0, b.1));
        (ta.join(), tb.join())
    });
    let (ha, sa) = ra.map_err(|_| anyhow::anyhow!("punching side 0 panicked"))??;
    let (hb, sb) = rb.map_err(|_| anyhow::anyhow!("punching side 1 panicked"))??;
    Ok(Punch {
        heard: [ha, hb],
        sent: [sa, sb],
        elapsed: start.elapsed(),
    })
}

/// Sends one datagram of exactly `len` bytes (at least 32) from `from` to `to` (twice, 50
/// ms apart) and says whether it arrives at `at` within `wait`.
pub fn datagram_arrives(
    from: &UdpSocket,
    to: SocketAddr,
    at: &UdpSocket,
    len: usize,
    wait: Duration,
) -> anyhow::Result<bool> {
    let id = nonce();
    let mut msg = format!("{SIZED} {id} ").into_bytes();
    msg.resize(len.max(32), b'.');
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 65536];
    for i in 0..2 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Err(e) = from.send_to(&msg, to) {
            eprintln!("sending {len} bytes to {to}: {e}");
        }
    }
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() {
            break;
        }
        at.set_read_timeout(Some(left))?;
        let Ok((n, _)) = at.recv_from(&mut buf) else {
            break;
        };
        if n == msg.len() && buf[..n] == msg[..] {
            return Ok(true);
        }
    }
    Ok(false)
}
