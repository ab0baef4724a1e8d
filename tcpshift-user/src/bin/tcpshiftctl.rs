//! `tcpshiftctl`: inspect and change tcpshift's steering. Stateless: it reads and writes the
//! pinned kernel maps directly, whether or not `tcpshiftd` runs.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tcpshift::{
    netns::Netns,
    state::{State, Status},
    weights,
};

/// Control tcpshift: show the split, change weights live, uninstall.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Examples:\n  tcpshiftctl status\n  tcpshiftctl set-weight v2=20\n  tcpshiftctl set-weight --service tcp-echo v1=50 v2=50\n  tcpshiftctl uninstall"
)]
struct Args {
    /// Network namespace to work in (e.g. /run/netns/NAME); default: the current one.
    #[arg(long, global = true, value_name = "PATH")]
    netns: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show services, subsets, weights, live sockets and counters.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change weights; takes effect for the very next connection.
    ///
    /// Naming only some subsets (v2=20) sets those in percent and gives the rest of 100 to the
    /// others in proportion to their current weights; naming all subsets sets them exactly
    /// (relative integers).
    SetWeight {
        /// Service to change; may be omitted when there is only one.
        #[arg(long, short)]
        service: Option<String>,
        /// SUBSET=WEIGHT assignments, e.g. v2=20.
        #[arg(
            required = true,
            value_name = "SUBSET=WEIGHT",
            allow_hyphen_values = true
        )]
        weights: Vec<String>,
    },
    /// Detach tcpshift from this namespace and remove everything it pinned.
    Uninstall,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("tcpshiftctl: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if let Some(path) = &args.netns {
        Netns::open(path)?.enter()?;
    }
    let netns = Netns::current()?;
    match args.command {
        Command::Status { json } => {
            let status = State::open(&netns)?.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", table(&status));
            }
        }
        Command::SetWeight { service, weights } => {
            let requested = weights
                .iter()
                .map(|w| weights::parse_assignment(w))
                .collect::<Result<Vec<_>, _>>()?;
            let mut state = State::open(&netns)?;
            let (name, new) = state.set_weights(service.as_deref(), &requested)?;
            let shown: Vec<String> = new.iter().map(|(s, w)| format!("{s}={w}")).collect();
            println!("{name}: {}", shown.join(" "));
        }
        Command::Uninstall => match State::uninstall(&netns)? {
            Some(dir) => println!("removed {} (program detached, maps deleted)", dir.display()),
            None => {
                println!("nothing to remove: tcpshift is not installed in this network namespace")
            }
        },
    }
    Ok(())
}

fn table(status: &Status) -> String {
    let mut rows = vec![
        [
            "SERVICE",
            "LISTEN",
            "SUBSET",
            "BACKEND",
            "WEIGHT",
            "SHARE",
            "LIVE",
            "STEERED",
            "FALLBACK-IN",
            "FALLBACK-OUT",
            "MISSES",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for svc in &status.services {
        for (i, s) in svc.subsets.iter().enumerate() {
            let (name, listen) = if i == 0 {
                (svc.name.clone(), svc.listen.clone())
            } else {
                (String::new(), String::new())
            };
            rows.push(vec![
                name,
                listen,
                s.name.clone(),
                s.backend.to_string(),
                s.weight.to_string(),
                format!("{:.1}%", s.share),
                if s.live { "yes" } else { "NO" }.to_string(),
                s.counters.steered.to_string(),
                s.counters.fallback_in.to_string(),
                s.counters.fallback_out.to_string(),
                s.counters.misses.to_string(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if status.services.is_empty() {
        out.push_str("(no services)\n");
    }
    out
}
