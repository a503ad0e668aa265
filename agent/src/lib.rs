//! `warren-agent`: the connector that runs inside a private network (a "site") and dials out
//! to the cluster, so the site's targets become reachable without opening a port.
//!
//! - First start: `--token` (from `warren admin site-token <site>`) is traded for a site
//!   certificate over QUIC (ALPN `warren-enroll/1`), trusting only the cluster CA the token
//!   pins. The certificate, key and CA are kept in `--state-dir`; later starts reuse them.
//! - Then it keeps tunnels (QUIC, ALPN `warren-agent/1`, mutual TLS) to the two nodes with
//!   the shortest handshake time, learning the cluster's nodes from the first it reaches;
//!   lost tunnels are re-dialled with jittered backoff, forever, without spinning.
//! - Each tunnel's control stream opens with a `Hello` each way (protocol version and
//!   features, `warren_proto::tunnel`); the agent sends the node only messages it
//!   understands and skips, counts and logs (once) messages it does not know itself. A node
//!   from before negotiation refuses the `Hello`; the agent then greets it the old way.
//! - The node pushes the site's targets; the agent checks them and reports their health;
//!   for every stream a node opens it dials the target (only a configured one) and splices
//!   (TCP bytes, or UDP datagrams framed on the stream and read cancel-safely).

mod enroll;
mod tls;
mod tunnel;

use std::path::PathBuf;

pub use enroll::Identity;

/// Command-line flags (each with an environment variable).
#[derive(Debug, clap::Parser)]
#[command(name = "warren-agent", version, about = "The Warren site connector")]
pub struct Args {
    /// One-time site token (`wst1_…`), needed on the first start only.
    #[arg(long, env = "WARREN_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A node to reach (`host:port` of its cluster address); repeat for more.
    #[arg(
        long = "node",
        env = "WARREN_AGENT_NODES",
        value_delimiter = ',',
        required = true
    )]
    pub nodes: Vec<String>,
    /// Where the agent keeps its certificate and key.
    #[arg(long, env = "WARREN_AGENT_STATE_DIR", default_value = "./warren-agent")]
    pub state_dir: PathBuf,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "WARREN_LOG", default_value = "info")]
    pub log: String,
}

/// Enrolls if needed, then keeps tunnels until killed.
pub async fn run(args: Args) -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let identity = match Identity::load(&args.state_dir)? {
        Some(id) => {
            tracing::info!(site = %id.site, dir = %args.state_dir.display(), "using the stored site certificate");
            id
        }
        None => {
            let token = args.token.as_deref().ok_or_else(|| {
                anyhow::anyhow!(
                    "{} holds no site certificate: give --token (from `warren admin site-token <site>`)",
                    args.state_dir.display()
                )
            })?;
            let id = enroll::enroll(token, &args.nodes, &args.state_dir).await?;
            println!("Enrolled as the agent of site {:?}.", id.site.as_str());
            id
        }
    };
    tunnel::run(identity, args.nodes).await
}
