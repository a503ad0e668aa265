//! A local SMTP sink: accepts every message on loopback and keeps it for the test to read.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

/// A received message.
#[derive(Debug, Clone)]
pub struct Mail {
    /// Envelope recipients.
    pub to: Vec<String>,
    /// The message as sent (headers and body).
    pub data: String,
}

/// An SMTP server on 127.0.0.1 that stores what it receives; stops when dropped.
pub struct SmtpSink {
    /// Where it listens.
    pub addr: SocketAddr,
    mails: Arc<Mutex<Vec<Mail>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SmtpSink {
    /// Starts the sink.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mails = Arc::new(Mutex::new(Vec::new()));
        let store = mails.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    let _ = session(conn, store).await;
                });
            }
        });
        Ok(Self { addr, mails, task })
    }

    /// `smtp://127.0.0.1:<port>` for `--smtp-url`.
    pub fn url(&self) -> String {
        format!("smtp://{}", self.addr)
    }

    /// Messages received so far.
    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().expect("mails lock").clone()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn session(conn: tokio::net::TcpStream, store: Arc<Mutex<Vec<Mail>>>) -> anyhow::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut lines = BufReader::new(r).lines();
    w.write_all(b"220 sink ESMTP\r\n").await?;
    let mut to = Vec::new();
    // Bounded: a test message is small; stop after 10k lines.
    for _ in 0..10_000 {
        let Some(line) = lines.next_line().await? else {
            return Ok(());
        };
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            w.write_all(b"250 sink\r\n").await?;
        } else if upper.starts_with("MAIL FROM")
            || upper.starts_with("RSET")
            || upper.starts_with("NOOP")
        {
            w.write_all(b"250 ok\r\n").await?;
        } else if upper.starts_with("RCPT TO") {
            let addr = line
                .split_once(':')
                .map(|(_, a)| {
                    a.trim()
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_owned()
                })
                .unwrap_or_default();
            to.push(addr);
            w.write_all(b"250 ok\r\n").await?;
        } else if upper == "DATA" {
            w.write_all(b"354 go ahead\r\n").await?;
            let mut data = String::new();
            for _ in 0..10_000 {
                let Some(l) = lines.next_line().await? else {
                    return Ok(());
                };
                if l == "." {
                    break;
                }
                data.push_str(l.strip_prefix('.').unwrap_or(&l));
                data.push('\n');
            }
            store.lock().expect("mails lock").push(Mail {
                to: std::mem::take(&mut to),
                data,
            });
            w.write_all(b"250 queued\r\n").await?;
        } else if upper.starts_with("QUIT") {
            w.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            w.write_all(b"502 not implemented\r\n").await?;
        }
    }
    Ok(())
}
