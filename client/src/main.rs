//! `warren`: parse the command line, then hand over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use warren_client::admin::{self, AdminCmd, Connection};

/// Warren client.
#[derive(Parser)]
#[command(name = "warren", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Administer the cluster through its admin API.
    Admin {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        cmd: AdminCmd,
    },
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
    let Cmd::Admin { conn, cmd } = cli.command;
    match runtime.block_on(admin::run(&conn, cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren: {e:#}");
            ExitCode::FAILURE
        }
    }
}
