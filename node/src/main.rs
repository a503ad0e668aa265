//! `warren-node`: parse the command line, then hand over to the library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use warren_node::datadir::{DataDir, State};
use warren_node::node::RaftStopped;
use warren_node::node::{InitOutput, NodeSpec};
use warren_node::{Listeners, RunningNode, Settings};
use warren_proto::Name;

/// Warren server: identity-aware access, replicated by Raft. With no command, runs a single
/// node in ./warren-data on loopback ports, creating it on first use.
#[derive(Parser)]
#[command(name = "warren-node", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    settings: Settings,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,warren_consensus=debug`).
    #[arg(
        long,
        env = "WARREN_LOG",
        default_value = "info,openraft=warn",
        global = true
    )]
    log: String,
    /// Log format: `text` for people, `json` for one JSON object per line.
    #[arg(long, env = "WARREN_LOG_FORMAT", default_value = "text", global = true)]
    log_format: warren_proto::logging::LogFormat,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new cluster with this node as its only voter, then run it.
    Init {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Join an existing cluster through one of its nodes, then run.
    Join {
        #[command(flatten)]
        node: NodeArgs,
        /// Cluster address (host:port) of any node of the cluster.
        #[arg(long, env = "WARREN_PEER")]
        peer: String,
        /// Join token (`wjt1_…`) from `warren-node init` or `warren admin join-token create`.
        #[arg(long, env = "WARREN_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Start as a learner (replicates everything, does not vote) even with a voter
        /// token; promote it later with `warren cluster promote`. What a node may ever be
        /// is the join token's role (`warren admin join-token create --role learner`).
        #[arg(long, env = "WARREN_LEARNER")]
        learner: bool,
    },
    /// Run a relay-only node: it carries client↔agent WireGuard ciphertext for a cluster
    /// and holds no registry, no vote and no secrets of others. The first time, it
    /// enrolls with a join token made with `warren admin join-token create --role relay`;
    /// after that `--data-dir` is enough. The relay address comes from --relay-listen and
    /// --relay-public.
    Relay {
        /// Where the node keeps its key, certificate and cluster addresses.
        #[arg(long, env = "WARREN_DATA_DIR")]
        data_dir: PathBuf,
        /// Unique node name (to enroll).
        #[arg(long, env = "WARREN_NAME")]
        name: Option<String>,
        /// Cluster address (host:port) of any voter (to enroll).
        #[arg(long, env = "WARREN_PEER")]
        peer: Option<String>,
        /// Join token with the role `relay` (to enroll).
        #[arg(long, env = "WARREN_JOIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Region label (to enroll).
        #[arg(long, env = "WARREN_REGION", default_value = "")]
        region: String,
    },
    /// Start the node stored in a data directory.
    Run {
        /// The node's data directory.
        #[arg(long, env = "WARREN_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct NodeArgs {
    /// Where the node keeps its state.
    #[arg(long, env = "WARREN_DATA_DIR")]
    data_dir: PathBuf,
    /// Unique node name (lowercase letters, digits, '-', '_', '.').
    #[arg(long, env = "WARREN_NAME")]
    name: String,
    /// host:port other nodes reach this node on (UDP, QUIC).
    #[arg(long, env = "WARREN_CLUSTER_ADDR")]
    cluster_addr: String,
    /// host:port of the admin API (TCP, HTTPS).
    #[arg(long, env = "WARREN_ADMIN_ADDR")]
    admin_addr: String,
    /// Region label, used later to pick close nodes.
    #[arg(long, env = "WARREN_REGION", default_value = "")]
    region: String,
}

impl NodeArgs {
    fn split(self) -> anyhow::Result<(DataDir, NodeSpec)> {
        let name = Name::new(self.name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
        Ok((
            DataDir::new(self.data_dir),
            NodeSpec {
                name,
                cluster_addr: self.cluster_addr,
                admin_addr: self.admin_addr,
                region: self.region,
            },
        ))
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // One crypto provider for every TLS client and server in the process (ACME, OIDC, ...).
    let _ = rustls::crypto::ring::default_provider().install_default();
    warren_proto::logging::init("warren-node", &cli.log, "info", cli.log_format);
    let Cli {
        command, settings, ..
    } = cli;
    if let Some(Cmd::Relay {
        data_dir,
        name,
        peer,
        token,
        region,
    }) = command
    {
        return relay_only(data_dir, name, peer, token, region, &settings);
    }
    let quickstart_mode = command.is_none();
    let mut command = command;
    let mut restarts = 0u32;
    loop {
        // A runtime per incarnation: dropping it ends every task of the stopped node, so
        // nothing holds its storage when it starts again.
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("warren-node: cannot start the async runtime: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        let started = std::time::Instant::now();
        let (outcome, data_dir) = runtime.block_on(run(command.take(), &settings));
        runtime.shutdown_timeout(std::time::Duration::from_secs(5));
        let e = match outcome {
            Ok(()) => return std::process::ExitCode::SUCCESS,
            Err(e) => e,
        };
        // Restart after Raft stopped on its own, and keep trying while a restart fails
        // (a disk still full); anything else on the first start is the operator's to fix.
        let restartable = e.is::<RaftStopped>() || restarts > 0;
        let Some(dir) = data_dir.filter(|_| restartable) else {
            eprintln!("warren-node: {e:#}");
            return std::process::ExitCode::FAILURE;
        };
        if started.elapsed() > std::time::Duration::from_secs(300) {
            restarts = 0;
        }
        restarts += 1;
        let delay = std::time::Duration::from_secs(1 << (restarts - 1).min(4));
        eprintln!(
            "warren-node: {e:#}; starting the node in {} again in {} s (restart {restarts})",
            dir.display(),
            delay.as_secs()
        );
        let interrupted = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| {
                rt.block_on(async {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => false,
                        () = shutdown_signal() => true,
                    }
                })
            })
            .unwrap_or(false);
        if interrupted {
            return std::process::ExitCode::FAILURE;
        }
        command = (!quickstart_mode).then_some(Cmd::Run { data_dir: dir });
    }
}

/// Starts the node as `command` says and serves until it stops. Also returns the data
/// directory once known, for a restart.
async fn run(command: Option<Cmd>, settings: &Settings) -> (anyhow::Result<()>, Option<PathBuf>) {
    let data_dir = match &command {
        Some(Cmd::Init { node } | Cmd::Join { node, .. }) => node.data_dir.clone(),
        Some(Cmd::Run { data_dir } | Cmd::Relay { data_dir, .. }) => data_dir.clone(),
        None => PathBuf::from(QUICKSTART_DIR),
    };
    let node = match start(command, settings).await {
        Ok(n) => n,
        // A node not yet created has nothing to start again.
        Err(e) => {
            let created = DataDir::new(&data_dir)
                .state()
                .is_ok_and(|s| matches!(s, State::Ready(_)));
            return (Err(e), created.then_some(data_dir));
        }
    };
    (node.serve_until(shutdown_signal()).await, Some(data_dir))
}

const QUICKSTART_DIR: &str = "warren-data";

async fn start(command: Option<Cmd>, settings: &Settings) -> anyhow::Result<RunningNode> {
    let node = match command {
        Some(Cmd::Init { node }) => {
            let (dir, spec) = node.split()?;
            let listeners = Listeners::for_spec(&spec, settings)?;
            let (node, out) = warren_node::init(dir, spec, settings, listeners).await?;
            print_init(&node, &out);
            node
        }
        Some(Cmd::Join {
            node,
            peer,
            token,
            learner,
        }) => {
            let (dir, spec) = node.split()?;
            let listeners = Listeners::for_spec(&spec, settings)?;
            let (node, voter) =
                warren_node::join(dir, spec, &peer, &token, learner, settings, listeners).await?;
            println!(
                "Joined cluster {} as node {:?} (id {}) as a {}.",
                node.file.cluster_id,
                node.file.name.as_str(),
                node.file.node_id,
                if voter { "voter" } else { "learner" }
            );
            print_serving(&node);
            node
        }
        Some(Cmd::Relay { .. }) => unreachable!("handled before"),
        Some(Cmd::Run { data_dir }) => {
            let dir = DataDir::new(data_dir);
            let listeners = Listeners::for_dir(&dir, settings)?;
            let node = warren_node::run(dir, settings, listeners).await?;
            print_serving(&node);
            node
        }
        None => quickstart(settings).await?,
    };
    Ok(node)
}

/// `warren-node relay`: enrolls if the directory is new, then relays until a signal or the
/// cluster revokes the node.
fn relay_only(
    data_dir: PathBuf,
    name: Option<String>,
    peer: Option<String>,
    token: Option<String>,
    region: String,
    settings: &Settings,
) -> std::process::ExitCode {
    use warren_node::relay_only::{enroll, relay_file, Enrollment, RelayNode};
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warren-node: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome: anyhow::Result<()> = runtime.block_on(async {
        let dir = DataDir::new(&data_dir);
        if relay_file(&dir)?.is_none() {
            let (Some(name), Some(peer), Some(token)) = (name, peer, token) else {
                anyhow::bail!(
                    "{} holds no relay-only node yet: enroll with --name, --peer and --token (a join token made with `warren admin join-token create --role relay`)",
                    data_dir.display()
                );
            };
            let how = Enrollment {
                name: Name::new(name).map_err(|e| anyhow::anyhow!("--name: {e}"))?,
                peer,
                token: warren_proto::token::JoinToken::parse(&token)
                    .map_err(|e| anyhow::anyhow!("--token: {e}"))?,
                region,
            };
            let file = enroll(&dir, &how, settings).await?;
            println!(
                "Enrolled relay-only node {:?} (id {}) in cluster {}.",
                file.name.as_str(),
                file.node_id,
                file.cluster_id
            );
        }
        let node = RelayNode::start(dir, settings).await?;
        println!(
            "Relaying for cluster {} as {:?}: clients and agents are told {} (UDP, listening on {}).",
            node.file.cluster_id,
            node.file.name.as_str(),
            node.file.relay,
            node.listen
        );
        node.serve_until(shutdown_signal()).await
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `warren-node` with no command: ./warren-data on loopback ports.
async fn quickstart(settings: &Settings) -> anyhow::Result<RunningNode> {
    let dir = DataDir::new(QUICKSTART_DIR);
    match dir.state()? {
        State::Ready(_) => {
            let listeners = Listeners::for_dir(&dir, settings)?;
            let node = warren_node::run(dir, settings, listeners).await?;
            print_serving(&node);
            println!(
                "The admin API key was printed when this node was created; it is also in {}.",
                node.dir.path("admin.key").display()
            );
            print_try(&node);
            Ok(node)
        }
        _ => {
            let spec = NodeSpec {
                name: Name::new("node1").expect("valid name"),
                cluster_addr: "127.0.0.1:7400".into(),
                admin_addr: "127.0.0.1:7443".into(),
                region: String::new(),
            };
            let listeners = Listeners::for_spec(&spec, settings)?;
            let (node, out) = warren_node::init(dir, spec, settings, listeners)
                .await
                .context("creating ./warren-data")?;
            print_init(&node, &out);
            Ok(node)
        }
    }
}

fn print_init(node: &RunningNode, out: &InitOutput) {
    println!(
        "Created Warren cluster {} with node {:?}.",
        node.file.cluster_id,
        node.file.name.as_str()
    );
    print_serving(node);
    println!("  admin API key  {}", out.admin_key);
    println!(
        "                 (shown once; also stored in {})",
        node.dir.path("admin.key").display()
    );
    println!("  join token     {}", out.join_token);
    println!(
        "                 (add a node: warren-node join --peer {} --token <join token> --data-dir ... --name ... --cluster-addr ... --admin-addr ...)",
        node.file.cluster_addr
    );
    print_try(node);
}

fn print_serving(node: &RunningNode) {
    println!(
        "Serving node {:?} of cluster {}:",
        node.file.name.as_str(),
        node.file.cluster_id
    );
    println!("  admin API      https://{}/v1/", node.file.admin_addr);
    println!(
        "  cluster CA     {}",
        absolute_dir(node).join("ca.pem").display()
    );
    println!("  cluster addr   {} (QUIC)", node.file.cluster_addr);
    println!(
        "  web proxy      https://{} (resources by host name; sign-in on the auth host), HTTP redirect on --http-addr",
        node.https_addr
    );
}

/// The data directory as an absolute path, for lines meant to be pasted elsewhere.
fn absolute_dir(node: &RunningNode) -> PathBuf {
    std::fs::canonicalize(node.dir.root()).unwrap_or_else(|_| node.dir.root().to_path_buf())
}

fn print_try(node: &RunningNode) {
    let abs = absolute_dir(node);
    let dir = abs.display();
    println!("Try it:");
    println!(
        "  export WARREN_ADDR=https://{} WARREN_CA={dir}/ca.pem WARREN_API_KEY=$(cat {dir}/admin.key)",
        node.file.admin_addr
    );
    println!("  cargo run -q --release --bin warren -- admin cluster status");
    if node.proxy.makes_ca_certs() {
        println!(
            "  open {}/.warren/ (the sign-in page; its certificate is from the cluster CA: trust {dir}/ca.pem)",
            node.proxy.auth_origin()
        );
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
}
