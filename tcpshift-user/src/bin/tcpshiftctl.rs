//! `tcpshiftctl`: inspect and change tcpshift's steering. Stateless: it reads and writes the
//! pinned kernel maps directly, whether or not `tcpshiftd` runs.

#[path = "tcpshiftctl/apply.rs"]
mod apply;
#[path = "tcpshiftctl/top.rs"]
mod top;

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};
use tcpshift::{config, metrics, netns::Netns, report, state::State, weights};

/// Control tcpshift: show the split, change weights live, uninstall.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Examples:\n  tcpshiftctl status\n  tcpshiftctl top\n  tcpshiftctl set-weight v2=20\n  tcpshiftctl set-weight --service tcp-echo v1=50 v2=50\n  tcpshiftctl apply -f tcp-echo-services.yaml -f tcp-echo-all-v1.yaml\n  tcpshiftctl apply -f tcp-echo-20-v2.yaml\n  tcpshiftctl get virtualservice tcp-echo -o yaml\n  tcpshiftctl uninstall"
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
    /// Show services, subsets, weights, live sockets, the observed share of new connections
    /// (last 10 s) and connection counters: opened, active, closed, bytes, fallbacks.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Watch the split live: bars of weight vs observed share, refreshed every second.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value = "1", value_name = "SECS")]
        interval: f64,
        /// Stop after this many screens (for scripts); default: until q or Ctrl-C.
        #[arg(long, value_name = "N")]
        iterations: Option<u64>,
    },
    /// Print the Prometheus metrics (what `tcpshiftd --metrics` serves), read from the kernel.
    Metrics,
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
    /// Apply Istio VirtualService, DestinationRule and Gateway objects and tcpshift
    /// `services:` documents (multi-document YAML), all or nothing.
    ///
    /// A VirtualService route's destination host is a tcpshift service, its subsets are the
    /// service's subsets (addresses from a `services:` document of the same apply or from the
    /// kernel), the matched port (or the Gateway's server port) is the listen port, and its
    /// weights are the new weights. Everything is checked before anything changes.
    Apply(apply::ApplyArgs),
    /// Show the services (`get services`) or the routing as Istio VirtualServices
    /// (`get virtualservice tcp-echo -o yaml`), read from the kernel.
    Get(apply::GetArgs),
    /// Delete services: those a file applies (`delete -f FILE`), or by name
    /// (`delete service NAME`, `delete virtualservice NAME`). All or nothing.
    Delete(apply::DeleteArgs),
    /// Detach tcpshift from this namespace and remove everything it pinned.
    Uninstall,
}

fn main() {
    let args: Args = tcpshift::cli_docs::parse();
    if let Err(e) = run(args) {
        // Values from the command line or files are cut short: one message, not a dump.
        eprintln!("tcpshiftctl: error: {}", config::clip(&format!("{e:#}")));
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
                print!("{}", report::status_table(&status));
            }
        }
        Command::Top {
            interval,
            iterations,
        } => {
            if !(0.1..=3600.0).contains(&interval) {
                anyhow::bail!("--interval {interval}: give a number of seconds in 0.1..=3600");
            }
            top::run(&netns, Duration::from_secs_f64(interval), iterations)?;
        }
        Command::Metrics => {
            let status = State::open(&netns)?.status()?;
            print!("{}", metrics::render(&status)?);
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
        Command::Apply(a) => apply::apply(&netns, a)?,
        Command::Get(a) => apply::get(&netns, a)?,
        Command::Delete(a) => apply::delete(&netns, a)?,
        Command::Uninstall => match State::uninstall(&netns)? {
            Some(dir) => println!("removed {} (program detached, maps deleted)", dir.display()),
            None => {
                println!("nothing to remove: tcpshift is not installed in this network namespace")
            }
        },
    }
    Ok(())
}
