//! `warren`: parse the command line, then hand over to the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use warren_client::admin::{self, AdminCmd, Connection};
use warren_client::connect::{self, ConnectArgs, NcArgs, SshArgs};
use warren_client::device::{self, DeviceCmd};
use warren_client::login::{self, Login};
use warren_client::{resources, status};

/// Warren client.
#[derive(Parser)]
#[command(name = "warren", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Administer the cluster through its admin API.
    Admin {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        cmd: AdminCmd,
    },
    /// Sign in (with --node: to a Warren cluster, registering this machine as a device;
    /// `warren login status`: who is signed in).
    Login(Login),
    /// Sign out: forget the node session, revoke the stored tokens at the provider and
    /// delete them (this machine's device key is kept).
    Logout,
    /// List the private resources you may reach now.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Forward a local port to a private resource until stopped (ctrl-c).
    Connect(ConnectArgs),
    /// Connect stdin and stdout to HOST:PORT inside a site (for ssh's ProxyCommand, scp,
    /// rsync, git).
    Nc(NcArgs),
    /// Run the system ssh to a private host, through `warren nc`.
    Ssh(SshArgs),
    /// Show who is signed in, this device, the node and its RTT, and running connections.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List or delete your devices.
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// This device's tunnel hub: one WireGuard endpoint every `connect`, `nc` and `ssh` of
    /// this configuration directory opens its flows through. Started by them when none
    /// runs; exits after 30 s without flows.
    #[command(hide = true)]
    Hub,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_log();
    if let Cmd::Ssh(args) = cli.command {
        // Only returns if ssh could not be started.
        return report(connect::ssh(args));
    }
    // Flows are the only busy work: give them both cores; everything else is one request.
    let busy = matches!(cli.command, Cmd::Connect(_) | Cmd::Nc(_) | Cmd::Hub);
    let mut builder = if busy {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warren: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Admin { conn, cmd } => admin::run(&conn, cmd).await,
            Cmd::Login(l) => login::run(l).await,
            Cmd::Logout => login::logout().await,
            Cmd::Ls { json } => resources::list(json).await,
            Cmd::Connect(args) => connect::connect(args, stop_signal()).await,
            Cmd::Nc(args) => connect::nc(args, stop_signal()).await,
            Cmd::Ssh(_) => unreachable!("handled above"),
            Cmd::Status { json } => status::run(json).await,
            Cmd::Device { cmd } => device::run(cmd).await,
            Cmd::Hub => warren_client::hub::run(stop_signal()).await,
        }
    });
    // A read of stdin (`nc`) may still be blocked in a thread: do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(100));
    report(result)
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (never stdout: `warren nc` owns it) when `WARREN_LOG` names a filter
/// (tracing `EnvFilter` syntax, e.g. `info,warren_net=debug`); silent otherwise.
fn init_log() {
    let Some(spec) = std::env::var("WARREN_LOG").ok().filter(|s| !s.is_empty()) else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("warren: WARREN_LOG={spec:?} is not a log filter ({e}); using warn");
        tracing_subscriber::EnvFilter::new("warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Completes on ctrl-c or SIGTERM.
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
