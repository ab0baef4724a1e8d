//! `tcpshift-chaos`: tcpshift's fault suite (run it with `cargo xtask chaos`).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use tcpshift_tests::chaos::{self, Options};

/// Runs the seed (tcp-echo v1 and v2 behind tcpshift at 80/20) in a new network namespace under
/// a sustained load of new and long-lived connections, injects faults one after another
/// (weight changes, loader SIGKILL/SIGTERM and restart, in-place program upgrade, backend
/// kill and restart, malformed input) and prints, per fault, the connections attempted,
/// succeeded, refused, broken and mismatched (every reply is checked byte for byte).
///
/// Exits 1 when a goal is missed: anything refused or mismatched, or broken except what a
/// deliberately killed backend held. Needs root. The binaries come from $TCPSHIFT_BIN_DIR
/// (default target/release).
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example:\n  sudo cargo xtask chaos            (builds, then runs this)\n  tcpshift-chaos --short --json target/chaos.json"
)]
struct Args {
    /// The short variant that runs with the test suite (about 20 s instead of about a minute).
    #[arg(long)]
    short: bool,
    /// Weight changes in the weights phase (default 1000, 100 with --short).
    #[arg(long, value_name = "N")]
    weight_changes: Option<usize>,
    /// New connections per second, in total (default 600, 300 with --short).
    #[arg(long, value_name = "PER_SECOND", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rate: Option<u32>,
    /// Also write the report as JSON to PATH.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tcpshift-chaos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<bool> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "needs root: it creates a network namespace and loads BPF programs (run `sudo cargo xtask chaos`)"
        );
    }
    let mut opts = if args.short {
        Options::short()
    } else {
        Options::full()
    };
    if let Some(n) = args.weight_changes {
        opts.weight_changes = n;
    }
    if let Some(r) = args.rate {
        opts.rate = r;
    }
    let start = std::time::Instant::now();
    let report = chaos::run(&opts, &mut |line| {
        eprintln!("[{:6.1} s] {line}", start.elapsed().as_secs_f64());
    })?;
    println!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.to_json())?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let took = Duration::from_secs(start.elapsed().as_secs());
    if report.goals_met() {
        eprintln!("chaos: every goal met ({took:?})");
        Ok(true)
    } else {
        eprintln!("chaos: a goal was MISSED (rows marked MISSED above)");
        Ok(false)
    }
}
