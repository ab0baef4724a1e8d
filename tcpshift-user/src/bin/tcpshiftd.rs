//! `tcpshiftd`: loads tcpshift into a network namespace, applies the configuration and keeps
//! every subset's listening socket registered. Steering lives in the kernel: when tcpshiftd
//! exits or is killed, connections keep being steered; started again, it adopts the pinned
//! state without resetting weights.

use std::{collections::HashSet, os::fd::AsFd, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use tcpshift::{
    EBPF_OBJECT,
    config::Config,
    discovery,
    netns::Netns,
    state::{Installed, Missing, State, Weights},
};
use tracing::{error, info, warn};

/// Kernel-level TCP traffic shifting: load the sk_lookup program into a network namespace and
/// steer new connections to the subsets of each service by weight.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example:\n  tcpshiftd --config tcpshift.yaml\n  tcpshiftctl set-weight v2=20"
)]
struct Args {
    /// YAML configuration: services, their listen port, subsets and weights.
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// Network namespace to work in (e.g. /run/netns/NAME); default: the current one.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    log_level: tracing::Level,
    /// How often to look for backend sockets that are not registered.
    #[arg(long, default_value = "250", value_name = "MS")]
    scan_interval_ms: u64,
}

fn main() {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(args.log_level.as_str()));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(args) {
        error!("{e:#}");
        eprintln!("tcpshiftd: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let config = Config::from_file(&args.config)?;
    // Enter the namespace before any other thread exists: threads inherit it.
    if let Some(path) = &args.netns {
        Netns::open(path)?.enter()?;
    }
    let netns = Netns::current()?;
    let (mut state, installed) = State::install(&netns, EBPF_OBJECT)?;
    let policy = match installed {
        Installed::Created => Weights::FromConfig,
        Installed::Adopted => {
            info!(dir = %state.dir().display(), "adopted pinned state; keeping the weights in the kernel");
            Weights::KeepExisting
        }
    };
    state
        .apply(&config, policy)
        .context("cannot apply the configuration")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(supervise(
        state,
        Duration::from_millis(args.scan_interval_ms.max(10)),
    ))
}

/// Registers missing sockets until a signal arrives or the state is uninstalled.
async fn supervise(mut state: State, every: Duration) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waiting: HashSet<(String, String)> = HashSet::new();
    let mut ready_logged = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        if !state.is_installed() {
            info!("the pinned state was removed (tcpshiftctl uninstall); exiting");
            return Ok(());
        }
        let missing = state.missing_sockets()?;
        let mut still: HashSet<(String, String)> = HashSet::new();
        for m in &missing {
            let id = (m.service.clone(), m.subset.clone());
            if !register(&mut state, m)? {
                if !waiting.contains(&id) {
                    warn!(service = %m.service, subset = %m.subset, backend = %m.backend,
                        "no live socket: nothing listens on the backend address (yet); its connections fall back to the other subsets");
                }
                still.insert(id);
            }
        }
        waiting = still;
        if waiting.is_empty() && !ready_logged {
            info!("ready: every subset has a registered socket");
            ready_logged = true;
        }
    }
    info!("exiting; steering continues in the kernel (remove it with `tcpshiftctl uninstall`)");
    Ok(())
}

/// Finds the backend's listening socket and registers it. Returns whether it did.
fn register(state: &mut State, m: &Missing) -> Result<bool> {
    let found = match discovery::acquire(m.backend) {
        Ok(found) => found,
        Err(e) => {
            warn!(service = %m.service, subset = %m.subset, backend = %m.backend, "cannot take the backend's socket: {e}");
            return Ok(false);
        }
    };
    let Some((fd, listener, owner)) = found else {
        return Ok(false);
    };
    let done = state.register_socket(m, fd.as_fd())?;
    // `fd` (our duplicate of the backend's socket) is closed here: the map holds the socket.
    drop(fd);
    if done {
        info!(service = %m.service, subset = %m.subset, backend = %m.backend,
            socket = %listener.local, pid = owner.pid, process = %owner.comm, "registered listening socket");
    }
    Ok(done)
}
