//! `warren`: parse the command line, then hand over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use warren_client::admin::{self, AdminCmd, Connection};
use warren_client::login::{self, Login};

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
    /// Sign in with your identity provider (`warren login status`: who is signed in).
    Login(Login),
    /// Sign out: revoke the stored tokens at the provider and delete them.
    Logout,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
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
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren: {e:#}");
            ExitCode::FAILURE
        }
    }
}
