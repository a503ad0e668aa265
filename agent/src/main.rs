//! `warren-agent`: parses the flags, enrolls on the first start, then runs the agent (see
//! the library docs) until ctrl-c or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use warren_agent::{AgentConfig, Identity, WireGuardConfig};

/// Command-line flags (each with an environment variable).
#[derive(Debug, clap::Parser)]
#[command(name = "warren-agent", version, about = "The Warren site connector")]
struct Args {
    /// One-time site token (`wst1_…`), needed on the first start only.
    #[arg(long, env = "WARREN_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A node to reach (`host:port` of its cluster address); repeat for more.
    #[arg(
        long = "node",
        env = "WARREN_AGENT_NODES",
        value_delimiter = ',',
        required = true
    )]
    nodes: Vec<String>,
    /// Where the agent keeps its certificate and key.
    #[arg(long, env = "WARREN_AGENT_STATE_DIR", default_value = "./warren-agent")]
    state_dir: PathBuf,
    /// The UDP address of the WireGuard endpoint for client devices (any port by default:
    /// the agent reaches the nodes' relays from it, no inbound port is needed).
    #[arg(
        long,
        env = "WARREN_AGENT_WIREGUARD_LISTEN",
        default_value = "0.0.0.0:0"
    )]
    wireguard_listen: SocketAddr,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "WARREN_LOG", default_value = "info")]
    log: String,
    /// Log format: `text` for people, `json` for one JSON object per line.
    #[arg(long, env = "WARREN_LOG_FORMAT", default_value = "text")]
    log_format: warren_proto::logging::LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    warren_proto::logging::init("warren-agent", &args.log, "info", args.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(start(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Enrolls if the state directory holds no certificate yet, then runs until a signal.
async fn start(args: Args) -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let config = AgentConfig {
        nodes: args.nodes,
        wireguard: Some(WireGuardConfig {
            listen: args.wireguard_listen,
            state_dir: args.state_dir.clone(),
        }),
    }
    .validate()
    .map_err(|e| anyhow::anyhow!("--node: {e}"))?;
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
            let id = warren_agent::enroll(token, &config.nodes, &args.state_dir).await?;
            println!("Enrolled as the agent of site {:?}.", id.site.as_str());
            id
        }
    };
    warren_agent::run(identity, config, shutdown_signal()).await
}

/// Completes on ctrl-c or SIGTERM. Created only once enrolled: until then the signals keep
/// their default effect (the process ends at once, which is right mid-enrollment).
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot watch for SIGTERM ({e}); ctrl-c still stops the agent");
                std::future::pending::<()>().await;
            }
        }
    };
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot watch for ctrl-c ({e}); SIGTERM still stops the agent");
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
