//! Clients that send exactly what a test says, for the hostile-client tests: no library
//! between the test and the proxy normalizes the path, fixes the Host header or drops a
//! header it does not like.
//!
//! - [`h1`] / [`h1_sequence`]: request bytes written as given on a TLS connection whose
//!   server name (SNI) is chosen separately from anything in the request.
//! - [`h2`]: one HTTP/2 request through the `h2` crate, with any `:method`, `:path` and
//!   `:authority`, and any `host` header beside them.
//!
//! Both answer an [`Outcome`]: the response, or how the connection or stream ended
//! without one. Every step is bounded in time.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_rustls::client::TlsStream;

/// How long a connection and handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one answer may take to arrive in full.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to collect tunnelled bytes after a `101`.
const TUNNEL_READ: Duration = Duration::from_millis(500);

/// TLS client settings trusting the given certificates (PEM), offering `alpn`.
pub fn tls_config(cert_pems: &[&str], alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in cert_pems {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(c.context("certificate PEM")?)?;
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A TLS connection to `addr` with server name `sni` (a DNS name, or an IP address, then
/// sent without SNI).
pub async fn connect(
    addr: &str,
    sni: &str,
    cfg: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let name =
        ServerName::try_from(sni.to_owned()).with_context(|| format!("server name {sni}"))?;
    let connecting = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(name, tcp)
            .await
    };
    timeout(CONNECT_TIMEOUT, connecting)
        .await
        .context("TLS connection timed out")?
        .with_context(|| format!("TLS connection to {addr} for {sni}"))
}

/// A response as it arrived.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Header fields in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked); after a `101`, what came through the tunnel at first.
    pub body: Vec<u8>,
}

impl Reply {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (lower case).
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What came back for one request.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// An HTTP response.
    Reply(Reply),
    /// HTTP/2: the server refused the request by resetting its stream (or closing the
    /// connection with GOAWAY); says why.
    Reset(String),
    /// No response: the connection closed or failed; says how.
    NoReply(String),
}

impl Outcome {
    /// The status, if there was a response.
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Reply(r) => Some(r.status),
            Outcome::Reset(_) | Outcome::NoReply(_) => None,
        }
    }

    /// The body text, empty without a response.
    pub fn text(&self) -> String {
        match self {
            Outcome::Reply(r) => r.text(),
            Outcome::Reset(_) | Outcome::NoReply(_) => String::new(),
        }
    }

    /// The response, if any.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Outcome::Reply(r) => Some(r),
            Outcome::Reset(_) | Outcome::NoReply(_) => None,
        }
    }

    /// A one-line description for failure messages.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Reply(r) => {
                let text = r.text();
                let mut short: String = text.chars().take(240).collect();
                if short.len() < text.len() {
                    short.push('…');
                }
                format!("{} {:?}", r.status, short)
            }
            Outcome::Reset(why) => format!("refused by the server ({why})"),
            Outcome::NoReply(why) => format!("no answer ({why})"),
        }
    }
}

/// Sends `request` (bytes as given) on a new TLS connection for `sni` and reads one
/// response. Ask for `Connection: close` in the request unless the answer has a length.
pub async fn h1(addr: &str, sni: &str, cfg: &Arc<rustls::ClientConfig>, request: &[u8]) -> Outcome {
    h1_sequence(addr, sni, cfg, &[request.to_vec()])
        .await
        .pop()
        .unwrap_or_else(|| Outcome::NoReply("nothing sent".into()))
}

/// Sends each request in turn on one TLS connection for `sni`, reading each response
/// before the next request. Stops at the first request without a response.
pub async fn h1_sequence(
    addr: &str,
    sni: &str,
    cfg: &Arc<rustls::ClientConfig>,
    requests: &[Vec<u8>],
) -> Vec<Outcome> {
    let mut tls = match connect(addr, sni, cfg).await {
        Ok(t) => t,
        Err(e) => return vec![Outcome::NoReply(format!("{e:#}"))],
    };
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for req in requests {
        let head_only = req.starts_with(b"HEAD ");
        let sent = async {
            tls.write_all(req).await?;
            tls.flush().await
        };
        if let Err(e) = timeout(ANSWER_TIMEOUT, sent).await.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "write timed out",
            ))
        }) {
            out.push(Outcome::NoReply(format!("writing the request: {e}")));
            return out;
        }
        match read_response(&mut tls, &mut buf, head_only).await {
            Ok(r) => out.push(Outcome::Reply(r)),
            Err(why) => {
                out.push(Outcome::NoReply(why));
                return out;
            }
        }
    }
    out
}

/// Reads one HTTP/1.x response from `s`, `buf` holding bytes already read (and keeping
/// those read past this response). Interim `100` responses are skipped.
async fn read_response<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    head_only: bool,
) -> Result<Reply, String> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        let end = loop {
            if let Some(i) = find(buf, b"\r\n\r\n") {
                break i;
            }
            if buf.len() > 256 * 1024 {
                return Err("response head over 256 KiB".into());
            }
            if !fill(s, buf, deadline).await? {
                return Err(if buf.is_empty() {
                    "connection closed without an answer".into()
                } else {
                    format!(
                        "connection closed mid-head: {:?}",
                        String::from_utf8_lossy(buf)
                    )
                });
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        if status == 100 {
            continue;
        }
        let mut reply = Reply {
            status,
            headers,
            body: Vec::new(),
        };
        if status == 101 {
            // Whatever the other side of the tunnel says first.
            let until = Instant::now() + TUNNEL_READ;
            while fill(s, buf, until).await.unwrap_or(false) {}
            reply.body = std::mem::take(buf);
            return Ok(reply);
        }
        if head_only || status == 204 || status == 304 {
            return Ok(reply);
        }
        let chunked = reply
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length = reply
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok());
        if chunked {
            reply.body = read_chunked(s, buf, deadline).await?;
        } else if let Some(n) = length {
            while buf.len() < n {
                if !fill(s, buf, deadline).await? {
                    return Err(format!("body ended after {} of {n} bytes", buf.len()));
                }
            }
            reply.body = buf.drain(..n).collect();
        } else {
            while fill(s, buf, deadline).await? {}
            reply.body = std::mem::take(buf);
        }
        return Ok(reply);
    }
}

async fn read_chunked<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = find(buf, b"\r\n") {
                break i;
            }
            if !fill(s, buf, deadline).await? {
                return Err("connection closed inside a chunked body".into());
            }
        };
        let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size line {line:?}"))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                if let Some(i) = find(buf, b"\r\n") {
                    let blank = i == 0;
                    buf.drain(..i + 2);
                    if blank {
                        return Ok(body);
                    }
                    continue;
                }
                if !fill(s, buf, deadline).await? {
                    return Ok(body);
                }
            }
        }
        while buf.len() < size + 2 {
            if !fill(s, buf, deadline).await? {
                return Err("connection closed inside a chunk".into());
            }
        }
        body.extend(buf.drain(..size));
        buf.drain(..2);
    }
}

/// Reads more into `buf`; `false` at the end of the stream (a TLS close without
/// close_notify counts as the end).
async fn fill<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<bool, String> {
    let mut chunk = [0u8; 16 * 1024];
    match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
        Err(_) => Err("timed out waiting for the answer".into()),
        Ok(Ok(0)) => Ok(false),
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(false),
        Ok(Err(e)) => Err(format!("reading: {e}")),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One HTTP/2 request, as the `h2` crate lets a client write it.
#[derive(Debug, Clone)]
pub struct H2Request<'a> {
    /// `:method`, any token (case kept).
    pub method: &'a str,
    /// `:authority`.
    pub authority: &'a str,
    /// `:path`; `None` for CONNECT (authority form). `:scheme` is `https` when given.
    pub path: Option<&'a str>,
    /// Other header fields, in order (names are sent lower case).
    pub headers: Vec<(&'a str, &'a str)>,
}

/// Why a request could not be written at all (the client library refuses it): the case
/// cannot be tested over HTTP/2 this way.
#[derive(Debug, Clone)]
pub struct Unsendable(pub String);

/// Sends `req` on a new HTTP/2 connection for `sni` and reads the response.
pub async fn h2(
    addr: &str,
    sni: &str,
    cfg: &Arc<rustls::ClientConfig>,
    req: &H2Request<'_>,
) -> Result<Outcome, Unsendable> {
    let request = build_h2(req).map_err(|e| Unsendable(format!("{e:#}")))?;
    let tls = match connect(addr, sni, cfg).await {
        Ok(t) => t,
        Err(e) => return Ok(Outcome::NoReply(format!("{e:#}"))),
    };
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Ok(Outcome::NoReply(
            "the server did not pick h2 by ALPN".into(),
        ));
    }
    let (client, conn) = match timeout(CONNECT_TIMEOUT, h2::client::handshake(tls)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Ok(Outcome::NoReply(format!("HTTP/2 handshake: {e}"))),
        Err(_) => return Ok(Outcome::NoReply("HTTP/2 handshake timed out".into())),
    };
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let outcome = async {
        let mut client = match timeout(CONNECT_TIMEOUT, client.ready()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Ok(h2_failure(&e)),
            Err(_) => return Ok(Outcome::NoReply("HTTP/2 connection not ready".into())),
        };
        let (response, _) = match client.send_request(request, true) {
            Ok(r) => r,
            Err(e) if e.is_io() || e.is_go_away() || e.is_remote() => return Ok(h2_failure(&e)),
            // Anything else is the library refusing what it was given.
            Err(e) => return Err(Unsendable(format!("h2 refused to send it: {e}"))),
        };
        let resp = match timeout(ANSWER_TIMEOUT, response).await {
            Err(_) => return Ok(Outcome::NoReply("timed out waiting for the answer".into())),
            Ok(Err(e)) => return Ok(h2_failure(&e)),
            Ok(Ok(r)) => r,
        };
        let (parts, mut body) = resp.into_parts();
        let headers = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut data = Vec::new();
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, body.data()).await {
                Err(_) => return Ok(Outcome::NoReply("timed out reading the body".into())),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Ok(h2_failure(&e)),
                Ok(Some(Ok(chunk))) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    data.extend_from_slice(&chunk);
                }
            }
        }
        Ok(Outcome::Reply(Reply {
            status: parts.status.as_u16(),
            headers,
            body: data,
        }))
    }
    .await;
    conn.abort();
    outcome
}

fn build_h2(req: &H2Request<'_>) -> anyhow::Result<http::Request<()>> {
    let method = http::Method::from_bytes(req.method.as_bytes())?;
    let uri = match req.path {
        Some(p) => http::Uri::builder()
            .scheme("https")
            .authority(req.authority)
            .path_and_query(p)
            .build()?,
        None => http::Uri::builder().authority(req.authority).build()?,
    };
    let mut builder = http::Request::builder()
        .method(method)
        .uri(uri)
        .version(http::Version::HTTP_2);
    for (k, v) in &req.headers {
        builder = builder.header(
            http::HeaderName::from_bytes(k.as_bytes())?,
            http::HeaderValue::from_str(v)?,
        );
    }
    Ok(builder.body(())?)
}

/// A stream or connection the server refused is a [`Outcome::Reset`]; anything else
/// (I/O errors, our own protocol errors) is a [`Outcome::NoReply`].
fn h2_failure(e: &h2::Error) -> Outcome {
    match e.reason() {
        Some(r) if e.is_go_away() && e.is_remote() => {
            Outcome::Reset(format!("connection closed with GOAWAY {r:?}"))
        }
        Some(r) if e.is_remote() => Outcome::Reset(format!("stream reset {r:?}")),
        Some(r) if e.is_library() => Outcome::NoReply(format!(
            "the client reset the stream ({r:?}): the response broke RFC 9113 8.1.1, \
             e.g. content in an answer to HEAD or not matching its content-length"
        )),
        _ => Outcome::NoReply(format!("HTTP/2 error: {e}")),
    }
}
