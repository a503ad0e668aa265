//! Per-site data counters of this node, for `/metrics`: streams opened to a site's targets
//! (by result) and the bytes they carried each way. A stream counts its bytes as it polls
//! (one relaxed atomic add per read or write, no lock); the per-site entry is found once per
//! stream open in a sharded map.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use dashmap::DashMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use warren_proto::Name;

/// One site's counters on this node.
#[derive(Debug, Default)]
pub struct SiteStats {
    /// Streams that reached the target.
    pub opened: AtomicU64,
    /// Streams the agent refused (target down, not allowed) or no route could carry.
    pub failed: AtomicU64,
    /// Bytes towards the site (client to target).
    pub to_site: Arc<AtomicU64>,
    /// Bytes from the site (target to client).
    pub from_site: Arc<AtomicU64>,
}

/// Every site's counters on this node.
#[derive(Debug, Default)]
pub struct Stats(DashMap<Name, Arc<SiteStats>>);

impl Stats {
    /// The counters of `site`, made on first use.
    pub fn of(&self, site: &Name) -> Arc<SiteStats> {
        if let Some(s) = self.0.get(site) {
            return s.clone();
        }
        self.0.entry(site.clone()).or_default().clone()
    }

    /// The Prometheus text for the sites `keep` says still exist; the others are forgotten.
    pub fn render(&self, out: &mut String, keep: impl Fn(&Name) -> bool) {
        use std::fmt::Write as _;
        self.0.retain(|site, _| keep(site));
        let mut rows: Vec<(Name, Arc<SiteStats>)> = self
            .0
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        out.push_str("# HELP warren_site_streams_total Streams this node opened to targets behind each site, by result.\n# TYPE warren_site_streams_total counter\n");
        for (site, s) in &rows {
            for (result, c) in [("opened", &s.opened), ("failed", &s.failed)] {
                let _ = writeln!(
                    out,
                    "warren_site_streams_total{{site=\"{site}\",result=\"{result}\"}} {}",
                    c.load(Ordering::Relaxed)
                );
            }
        }
        out.push_str("# HELP warren_site_bytes_total Bytes this node carried on streams to targets behind each site, by direction.\n# TYPE warren_site_bytes_total counter\n");
        for (site, s) in &rows {
            for (dir, c) in [("to_site", &s.to_site), ("from_site", &s.from_site)] {
                let _ = writeln!(
                    out,
                    "warren_site_bytes_total{{site=\"{site}\",direction=\"{dir}\"}} {}",
                    c.load(Ordering::Relaxed)
                );
            }
        }
    }
}

/// A stream half that adds the bytes it moves to a counter.
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    bytes: Arc<AtomicU64>,
}

impl<T> Counted<T> {
    /// `inner`, counting into `bytes`.
    pub fn new(inner: T, bytes: Arc<AtomicU64>) -> Self {
        Self { inner, bytes }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    // Forwarded so that a counted stream writes exactly as the stream itself would (hyper
    // gathers headers and body into one write only for a vectored stream).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_counted_stream_writes_vectored_as_the_stream_does_and_counts_it() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (mut peer, _) = l.accept().await.unwrap();
        assert!(tcp.is_write_vectored());
        let bytes = Arc::new(AtomicU64::new(0));
        let mut w = Counted::new(tcp, bytes.clone());
        assert!(
            w.is_write_vectored(),
            "the counter hides nothing of the stream"
        );
        let bufs = [io::IoSlice::new(b"head "), io::IoSlice::new(b"body")];
        let n = w.write_vectored(&bufs).await.unwrap();
        assert_eq!(bytes.load(Ordering::Relaxed), n as u64);
        let mut got = vec![0u8; n];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], &b"head body"[..n]);
    }

    #[tokio::test]
    async fn streams_count_their_bytes_into_their_site() {
        let stats = Stats::default();
        let hq = Name::new("hq").unwrap();
        let s = stats.of(&hq);
        let (a, mut b) = tokio::io::duplex(64);
        let (r, w) = tokio::io::split(a);
        let mut r = Counted::new(r, s.from_site.clone());
        let mut w = Counted::new(w, s.to_site.clone());
        w.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        b.write_all(b"hi").await.unwrap();
        let mut back = [0u8; 2];
        r.read_exact(&mut back).await.unwrap();
        s.opened.fetch_add(1, Ordering::Relaxed);
        let mut text = String::new();
        stats.render(&mut text, |_| true);
        assert!(text.contains("warren_site_bytes_total{site=\"hq\",direction=\"to_site\"} 5\n"));
        assert!(text.contains("warren_site_bytes_total{site=\"hq\",direction=\"from_site\"} 2\n"));
        assert!(text.contains("warren_site_streams_total{site=\"hq\",result=\"opened\"} 1\n"));
        let mut text = String::new();
        stats.render(&mut text, |_| false);
        assert!(!text.contains("hq"), "a deleted site is forgotten");
    }
}
