//! `tcpshiftd`: loads tcpshift into a network namespace, applies the configuration and keeps
//! every subset's listening socket registered. Steering lives in the kernel: when tcpshiftd
//! exits or is killed, connections keep being steered; started again, it adopts the pinned
//! state without resetting weights.
//!
//! This file reads the arguments and runs the steps in order; each job has its own file:
//! [`instance`] (one tcpshiftd per network namespace), [`fleet`] (following the fleet store), [`http`] (the metrics and health
//! endpoint), [`scan`] (registering backends' sockets), [`outlier`] (outlier ejection), [`reload`] (SIGHUP), [`notify`]
//! (systemd's readiness protocol) and [`upgrade`] (replacing adopted programs in place).

#[path = "tcpshiftd/fleet.rs"]
mod fleet;
#[path = "tcpshiftd/fleet_rollouts.rs"]
mod fleet_rollouts;
#[path = "tcpshiftd/http.rs"]
mod http;
#[path = "tcpshiftd/instance.rs"]
mod instance;
#[path = "tcpshiftd/notify.rs"]
mod notify;
#[path = "tcpshiftd/outlier.rs"]
mod outlier;
#[path = "tcpshiftd/reload.rs"]
mod reload;
#[path = "tcpshiftd/rollouts.rs"]
mod rollouts;
#[path = "tcpshiftd/scan.rs"]
mod scan;
#[path = "tcpshiftd/upgrade.rs"]
mod upgrade;

use std::{io::IsTerminal, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use tcpshift::{
    EBPF_OBJECT,
    config::Config,
    model::Weights,
    netns::Netns,
    state::{DEFAULT_READ_GROUP, Installed, ReadGroup, State},
    store::StoreArgs,
};
use tracing::{error, info, warn};

/// Kernel-level TCP traffic shifting: load the sk_lookup program into a network namespace and
/// steer new connections to the subsets of each service by weight.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "\
One tcpshiftd runs per network namespace: a second one started where one runs exits with an
error naming the first one's pid and changes nothing (see --takeover).

Signals:
  SIGTERM, SIGINT  exit; steering continues in the kernel (`tcpshiftctl uninstall` removes it)
  SIGHUP           read the --config file again and apply it all or nothing: a file that does
                   not parse or validate is refused (logged) and nothing changes. Services whose
                   weights in the file changed since the last load get the file's weights;
                   others keep the weights in the kernel (set by `tcpshiftctl set-weight`).
                   Services removed from the file are left alone (`tcpshiftctl delete`).

systemd: with $NOTIFY_SOCKET set (Type=notify), READY=1 is sent once the programs are attached,
the configuration applied and the first scan registered the listening backends' sockets;
RELOADING=1/READY=1 around a SIGHUP reload; STOPPING=1 on exit.

Fleet (--store): the services come from the store instead of a --config file (the two cannot
be combined; put the file in the store with `tcpshiftctl --store URL apply -f FILE`). tcpshiftd
watches the store and applies each revision whole, in order; takes the fleet's hash seed from
it; writes its node report under a 10 s lease; and, while the store is unreachable, keeps
steering with the last state it applied (fail static; /metrics: tcpshift_store_connected,
tcpshift_store_applied_revision, tcpshift_store_last_contact_seconds). A local `tcpshiftctl`
change is then refused unless given --local.

Examples:
  tcpshiftd --config tcpshift.yaml
  tcpshiftctl set-weight v2=20

  tcpshiftd --metrics 127.0.0.1:9464 &
  tcpshiftctl apply -f tcp-echo-services.yaml -f tcp-echo-all-v1.yaml

  tcpshiftd --store etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379 --node gw-1
  tcpshiftctl --store etcd://10.0.0.1:2379 set-weight v2=20"
)]
struct Args {
    /// YAML configuration: services, their listen port, subsets and weights. Without it,
    /// services are added with `tcpshiftctl apply`. SIGHUP reads it again.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Network namespace to work in (e.g. /run/netns/NAME); default: the current one.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides). At debug and trace
    /// the kernel programs also report every subset chosen, fallback, miss and connection
    /// opened or closed (aya-log events), while this tcpshiftd runs. The log has colours only
    /// when stderr is a terminal and NO_COLOR is unset.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    log_level: tracing::Level,
    /// Serve HTTP at ADDR (e.g. 127.0.0.1:9464): /metrics (Prometheus, read from the kernel at
    /// every scrape), /healthz (200 while tcpshiftd runs) and /readyz (200 when the programs
    /// are attached and every subset with a weight above 0 has a live socket, else 503 with
    /// the reason). ADDR is in the network namespace tcpshiftd works in.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Replace the running eBPF programs even when they are identical to this version's (an
    /// adopted state's programs are otherwise replaced in place only when they differ; weights,
    /// sockets and connections are kept either way). For operators and the fault tests.
    #[arg(long)]
    reload_program: bool,
    /// If a tcpshiftd already runs in the network namespace, stop it (SIGTERM), wait until it
    /// has exited and take its place, instead of refusing to start. Steering continues in the
    /// kernel meanwhile.
    #[arg(long)]
    takeover: bool,
    /// Group whose members may read the pinned state without root (`tcpshiftctl status`,
    /// `top`, `metrics`, `get`; every change still needs root): the namespace's state
    /// directory becomes 0750 and its maps 0640 with that group. Default `tcpshift` when
    /// that group exists (the package creates it); without it the state stays root-only. A
    /// group named here must exist.
    #[arg(long, value_name = "GROUP")]
    read_group: Option<String>,

    #[command(flatten)]
    store: StoreArgs,
    /// This node's name in the fleet store (with --store); default: the host name.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,

    /// How often to look for backend sockets that are not registered.
    #[arg(long, default_value = "250", value_name = "MS")]
    scan_interval_ms: u64,

    /// Idle timeout of a UDP flow: a flow without a datagram for this long chooses its subset
    /// again (by the weights of then). Default 30, the kernel's conntrack UDP timeout. Set at
    /// every start, for every flow.
    #[arg(long, default_value_t = tcpshift_common::DEFAULT_UDP_IDLE_SECS, value_name = "SECONDS",
          value_parser = clap::value_parser!(u32).range(1..))]
    udp_idle_timeout: u32,

    /// Size of the UDP flow table, in flows (an LRU table: when it is full the least recently
    /// used flow is forgotten and counted as evicted). Fixed when tcpshift is installed in the
    /// namespace; an adopted state keeps its table.
    #[arg(long, default_value_t = tcpshift_common::DEFAULT_UDP_FLOWS, value_name = "FLOWS",
          value_parser = clap::value_parser!(u32).range(1..))]
    udp_flow_table_size: u32,
    /// Measurement switch for `cargo xtask bench` (hidden): connections opened while this
    /// tcpshiftd runs get no failure-signal callbacks (see docs/design.md, "Measuring the
    /// signals' cost").
    #[arg(long, hide = true)]
    measure_without_signals: bool,
}

fn main() {
    let args: Args = tcpshift::cli_docs::parse();
    // aya's own debug output (BTF fix-ups, relocations) drowns the kernel events at debug:
    // RUST_LOG=aya=debug brings it back.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{},aya=info,aya_obj=info",
            args.log_level.as_str().to_lowercase()
        ))
    });
    // Colours only for a person at a terminal: a file, a pipe or the journal gets plain text.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
    if let Err(e) = run(args) {
        error!("{e:#}");
        eprintln!("tcpshiftd: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let store = args.store.options()?;
    if store.is_some() && args.config.is_some() {
        anyhow::bail!(
            "--config and --store cannot be combined: with --store the services come from the \
             store; put the file there with `tcpshiftctl --store URL apply -f FILE` and start \
             tcpshiftd without --config"
        );
    }
    let node = match (&store, &args.node) {
        (_, Some(node)) => node.clone(),
        (Some(_), None) => tcpshift::store::host_name()
            .context("cannot read the host name for the node name; give --node NAME")?,
        (None, None) => String::new(),
    };
    if store.is_some() {
        tcpshift::store::report::validate_node_name(&node)?;
    } else if args.node.is_some() {
        anyhow::bail!("--node names this host in a fleet store: add --store URL");
    }
    // The store is reached from the namespace tcpshiftd was started in: its thread starts
    // before tcpshiftd enters the served one.
    let fleet = match store {
        Some(options) => {
            let url = options.url.to_string();
            let (fleet, starter) = fleet::start(options, node.clone())?;
            Some((fleet, starter, url))
        }
        None => None,
    };
    let config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config {
            services: Vec::new(),
            policies: Vec::new(),
        },
    };
    // Enter the namespace before any other thread exists: threads inherit it.
    if let Some(path) = &args.netns {
        Netns::open(path)?.enter()?;
    }
    let netns = Netns::current()?;
    // Before changing anything: only one tcpshiftd per namespace.
    let instance = instance::Instance::claim(args.takeover)?;
    // Take the metrics address before changing anything: one that cannot be bound must fail
    // the start with nothing installed or applied.
    let metrics = match args.metrics {
        Some(addr) => Some(http::bind(addr)?),
        None => None,
    };
    let read_group = read_group(args.read_group.as_deref())?;
    tcpshift::state::set_flow_table_size(args.udp_flow_table_size);
    let (mut state, installed) = State::install(&netns, EBPF_OBJECT)?;
    share_read_only(&state, read_group.as_ref())?;
    let policy = match installed {
        Installed::Created => Weights::FromConfig,
        Installed::Adopted => {
            info!(dir = %state.dir().display(), "adopted pinned state; keeping the weights in the kernel");
            // Before the kernel events' logger starts: it follows the sk_lookup program's id.
            upgrade::upgrade(&mut state, args.reload_program)?;
            Weights::KeepExisting
        }
    };
    state
        .set_udp_idle_timeout(args.udp_idle_timeout)
        .context("cannot set the UDP idle timeout")?;
    state
        .apply(&config.services, policy)
        .context("cannot apply the configuration")?;
    state
        .set_traffic_policies(&config.policies)
        .context("cannot apply the configuration's connection limits and outlier detection")?;
    let debug_events = args.log_level >= tracing::Level::DEBUG;
    state
        .set_debug_events(debug_events)
        .context("cannot set the kernel's debug events")?;
    state
        .set_signals(!args.measure_without_signals)
        .context("cannot set the kernel's failure signals")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let result = runtime.block_on(async {
        instance.serve()?;
        let fleet = match fleet {
            Some((fleet, starter, url)) => {
                starter.go(Netns::current()?, &url, &node);
                Some(fleet)
            }
            None => None,
        };
        if let Some(listener) = metrics {
            http::spawn(listener, State::open(&netns)?, fleet.clone())?;
        }
        rollouts::spawn(State::open(&netns)?);
        outlier::spawn(State::open(&netns)?);
        if debug_events {
            match aya_log::EbpfLogger::init_from_id(state.program_id()?) {
                Ok(logger) => {
                    tokio::spawn(forward_kernel_events(logger));
                }
                Err(e) => warn!("kernel debug events unavailable: {e}"),
            }
        }
        let reloader = args
            .config
            .as_ref()
            .map(|path| reload::Reloader::new(path.clone(), config));
        let every = Duration::from_millis(args.scan_interval_ms.max(10));
        let result = scan::supervise(&mut state, every, reloader).await;
        notify::send("STOPPING=1");
        if fleet.is_some() {
            fleet::forget(netns.inode());
        }
        result
    });
    if debug_events && state.is_installed() {
        // Nobody reads the events any more (whether tcpshiftd ends normally or on an
        // error): stop producing them.
        if let Err(e) = state.set_debug_events(false) {
            warn!("cannot turn the kernel's debug events off: {e}");
        }
    }
    // The namespace's tcpshiftd slot is free from here on.
    drop(instance);
    result
}

/// Forwards the programs' aya-log events (a ring buffer) into tracing, as they arrive.
async fn forward_kernel_events(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the same for as long
    // as the logger lives (it is moved into the AsyncFd).
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("cannot watch the kernel's debug events: {e}");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                warn!("cannot read the kernel's debug events: {e}");
                return;
            }
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// The read group: the one named by `--read-group` (which must exist), or `tcpshift` when it
/// exists.
fn read_group(named: Option<&str>) -> Result<Option<ReadGroup>> {
    let name = named.unwrap_or(DEFAULT_READ_GROUP);
    let group = ReadGroup::lookup(name)
        .with_context(|| format!("cannot look up the group {name:?} (--read-group)"))?;
    match (group, named) {
        (Some(g), _) => Ok(Some(g)),
        (None, Some(_)) => anyhow::bail!(
            "--read-group {name}: no such group; create it (groupadd --system {name}) or name an existing one"
        ),
        (None, None) => {
            info!(
                "no group {DEFAULT_READ_GROUP:?}: the pinned state stays root-only (create the group, or name another with --read-group, to let its members run tcpshiftctl status, top, metrics and get)"
            );
            Ok(None)
        }
    }
}

/// Gives the read group, if any, read access to the pinned state.
fn share_read_only(state: &State, group: Option<&ReadGroup>) -> Result<()> {
    let Some(group) = group else {
        return Ok(());
    };
    let changed = state
        .share_read_only(group)
        .with_context(|| format!("cannot give group {} read access to the state", group.name))?;
    info!(
        group = %group.name,
        dir = %state.dir().display(),
        changed = changed.len(),
        "members of the read group may read the pinned state (status, top, metrics, get); changes need root"
    );
    Ok(())
}
