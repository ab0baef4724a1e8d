//! `tcpshiftctl`: inspect and change tcpshift's steering. Stateless: it reads and writes the
//! pinned kernel maps directly, whether or not `tcpshiftd` runs.

#[path = "tcpshiftctl/accept_owner.rs"]
mod accept_owner;
#[path = "tcpshiftctl/apply.rs"]
mod apply;
#[path = "tcpshiftctl/delete.rs"]
mod delete;
#[path = "tcpshiftctl/fleet.rs"]
mod fleet;
#[path = "tcpshiftctl/get.rs"]
mod get;
#[path = "tcpshiftctl/metrics.rs"]
mod metrics;
#[path = "tcpshiftctl/rollout.rs"]
mod rollout;
#[path = "tcpshiftctl/set_weight.rs"]
mod set_weight;
#[path = "tcpshiftctl/status.rs"]
mod status;
#[path = "tcpshiftctl/top.rs"]
mod top;
#[path = "tcpshiftctl/uninstall.rs"]
mod uninstall;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tcpshift::{config, netns::Netns, store::StoreArgs};

/// Control tcpshift: show the split, change weights live, uninstall.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Examples:\n  tcpshiftctl status\n  tcpshiftctl top\n  tcpshiftctl set-weight v2=20\n  tcpshiftctl set-weight --service tcp-echo v1=50 v2=50\n  tcpshiftctl apply -f tcp-echo-services.yaml -f tcp-echo-all-v1.yaml\n  tcpshiftctl apply -f tcp-echo-20-v2.yaml\n  tcpshiftctl get virtualservice tcp-echo -o yaml\n  tcpshiftctl uninstall\n\nFleet (--store URL or TCPSHIFT_STORE): apply, set-weight, delete and get act on the\nfleet's desired state in etcd; rollout drives one rollout for every node; status shows\nevery node; get nodes lists them.\n  tcpshiftctl --store etcd://10.0.0.1:2379 set-weight v2=20\n  tcpshiftctl --store etcd://10.0.0.1:2379 status\nOn a host whose tcpshiftd follows a store, a local apply, set-weight or delete is refused\n(it would diverge from the fleet) unless --local is given."
)]
struct Args {
    /// Network namespace to work in (e.g. /run/netns/NAME); default: the current one.
    #[arg(long, global = true, value_name = "PATH")]
    netns: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    /// Change this host's kernel even though its tcpshiftd follows a fleet store (the
    /// change then differs from the fleet until the store's next change overwrites it).
    #[arg(long, global = true)]
    local: bool,
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
    /// weights are the new weights. Everything is checked before anything changes. A service
    /// is not created (nor its listen address moved) where another server already listens,
    /// unless its `services:` entry says `takeOver: true`.
    Apply(apply::ApplyArgs),
    /// Show the services (`get services`) or the routing as Istio VirtualServices
    /// (`get virtualservice tcp-echo -o yaml`), read from the kernel.
    Get(get::GetArgs),
    /// Delete services: those a file applies (`delete -f FILE`), or by name
    /// (`delete service NAME`, `delete virtualservice NAME`). All or nothing.
    Delete(delete::DeleteArgs),
    /// Detach tcpshift from this namespace and remove everything it pinned.
    Uninstall,
    /// Progressive rollouts: `rollout start SERVICE --canary v2 --steps 5,20,50,100
    /// --interval 30s`, then `rollout status|promote|pause|resume|abort|history [NAME]`.
    /// tcpshiftd judges each step by the kernel's TCP signals and rolls back on failure.
    Rollout(rollout::RolloutArgs),
    /// Trust the owner of the next socket found on a subset's backend address.
    ///
    /// A subset serves only sockets of root or of the uid whose socket was registered for it
    /// first; sockets of other users are refused (see `status`). Run this when the new owner
    /// is legitimate (the service now runs as another user).
    AcceptOwner {
        /// The service.
        service: String,
        /// The subset.
        subset: String,
    },
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
    if let Some(options) = args.store.options()? {
        return fleet::run(options, args.command);
    }
    let netns = Netns::current()?;
    if matches!(
        args.command,
        Command::Apply(_) | Command::SetWeight { .. } | Command::Delete(_)
    ) {
        fleet::guard(&netns, args.local)?;
    }
    match args.command {
        Command::Status { json } => status::run(&netns, json),
        Command::Top {
            interval,
            iterations,
        } => top::run(&netns, interval, iterations),
        Command::Metrics => metrics::run(&netns),
        Command::SetWeight { service, weights } => {
            set_weight::run(&netns, service.as_deref(), &weights)
        }
        Command::Apply(a) => apply::run(&netns, a),
        Command::Get(a) => get::run(&netns, a),
        Command::Delete(a) => delete::run(&netns, a),
        Command::Uninstall => uninstall::run(&netns),
        Command::Rollout(a) => rollout::run(&netns, a, args.local),
        Command::AcceptOwner { service, subset } => accept_owner::run(&netns, &service, &subset),
    }
}
