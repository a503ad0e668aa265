//! `warren-sim`: run, replay and soak simulations.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use warren_consensus::cluster::PlantedBug;
use warren_simulation::cluster::{run, Report, SimConfig};

/// Deterministic simulation of a Warren cluster under faults.
#[derive(Parser)]
#[command(name = "warren-sim")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Shape {
    /// Three voters and a learner.
    Three,
    /// Five voters and a learner.
    Five,
}

#[derive(Clone, Copy, ValueEnum)]
enum Bug {
    /// Reads skip the read index.
    StaleReads,
    /// Writes are acknowledged before they commit.
    EarlyAck,
    /// The log reports entries durable before it syncs them (a power cut takes them back).
    AckBeforeSync,
}

#[derive(Subcommand)]
enum Cmd {
    /// One run (a replay, given the seed a failure printed).
    Run {
        /// Cluster shape.
        #[arg(long, value_enum, default_value = "three")]
        shape: Shape,
        /// Seed.
        #[arg(long)]
        seed: u64,
        /// Simulated seconds of faults.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Plant a known bug (to see the checkers catch it).
        #[arg(long, value_enum)]
        bug: Option<Bug>,
        /// Print the faults and membership changes of a passing run too.
        #[arg(long)]
        verbose: bool,
    },
    /// Many runs: seeds `from..from+count` for both shapes.
    Soak {
        /// First seed.
        #[arg(long, default_value_t = 1000)]
        from: u64,
        /// Number of seeds.
        #[arg(long, default_value_t = 100)]
        count: u64,
        /// Simulated seconds of faults per run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn config(shape: Shape, seed: u64, seconds: u64, bug: Option<Bug>) -> SimConfig {
    let mut c = match shape {
        Shape::Three => SimConfig::three(seed),
        Shape::Five => SimConfig::five(seed),
    };
    c.fault_seconds = seconds;
    c.planted_bug = bug.map(|b| match b {
        Bug::StaleReads => PlantedBug::StaleReads,
        Bug::EarlyAck => PlantedBug::EarlyAck,
        Bug::AckBeforeSync => PlantedBug::AckBeforeSync,
    });
    c
}

fn shape_name(shape: Shape) -> &'static str {
    match shape {
        Shape::Three => "three",
        Shape::Five => "five",
    }
}

fn print_events(r: &Report) {
    for f in &r.faults {
        println!("  fault: {f}");
    }
    for m in &r.membership {
        println!("  membership: {m}");
    }
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WARREN_SIM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let mut verbose = false;
    let runs: Vec<(Shape, u64, u64, Option<Bug>)> = match Cli::parse().command {
        Cmd::Run {
            shape,
            seed,
            seconds,
            bug,
            verbose: v,
        } => {
            verbose = v;
            vec![(shape, seed, seconds, bug)]
        }
        Cmd::Soak {
            from,
            count,
            seconds,
        } => (from..from + count)
            .flat_map(|s| {
                [
                    (Shape::Three, s, seconds, None),
                    (Shape::Five, s, seconds, None),
                ]
            })
            .collect(),
    };
    let mut failed = 0;
    for (shape, seed, seconds, bug) in runs {
        let started = std::time::Instant::now();
        match run(&config(shape, seed, seconds, bug)) {
            Ok(r) if r.violations.is_empty() => {
                if verbose {
                    print_events(&r);
                }
                println!(
                "ok    {} seed {seed}: {} ops ({} answered, {} more settled from the log), {} faults ({} crashes after a snapshot install, {} power losses taking {} log entries), {} terms with a leader, {} simulated s, {:.1} s",
                shape_name(shape),
                r.ops,
                r.completed,
                r.unanswered_settled,
                r.faults.len(),
                r.snapshot_install_crashes,
                r.power_losses,
                r.entries_lost_to_power_loss,
                r.terms_with_leader,
                r.steps / 1000,
                started.elapsed().as_secs_f64()
                )
            }
            Ok(r) => {
                failed += 1;
                println!("FAIL  {} seed {seed}:", shape_name(shape));
                print_events(&r);
                for v in &r.violations {
                    println!("  violation: {v}");
                }
                let bug = bug
                    .and_then(|b| b.to_possible_value())
                    .map(|b| format!(" --bug {}", b.get_name()))
                    .unwrap_or_default();
                println!(
                    "  replay: cargo run -p warren-simulation --release --bin warren-sim -- run --shape {} --seed {seed} --seconds {seconds}{bug}",
                    shape_name(shape)
                );
            }
            Err(e) => {
                failed += 1;
                println!("ERROR {} seed {seed}: {e:#}", shape_name(shape));
            }
        }
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
