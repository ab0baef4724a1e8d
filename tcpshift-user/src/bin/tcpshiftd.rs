//! `tcpshiftd`: loads tcpshift into a network namespace, applies the configuration and keeps
//! every subset's listening socket registered. Steering lives in the kernel: when tcpshiftd
//! exits or is killed, connections keep being steered; started again, it adopts the pinned
//! state without resetting weights.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Parser;
use tcpshift::{
    EBPF_OBJECT,
    config::Config,
    discovery::{self, Registration},
    metrics,
    model::Weights,
    netns::Netns,
    state::{Installed, ProgramChange, State},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, error, info, warn};

/// Kernel-level TCP traffic shifting: load the sk_lookup program into a network namespace and
/// steer new connections to the subsets of each service by weight.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Examples:\n  tcpshiftd --config tcpshift.yaml\n  tcpshiftctl set-weight v2=20\n\n  tcpshiftd &\n  tcpshiftctl apply -f tcp-echo-services.yaml -f tcp-echo-all-v1.yaml"
)]
struct Args {
    /// YAML configuration: services, their listen port, subsets and weights. Without it,
    /// services are added with `tcpshiftctl apply`.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Network namespace to work in (e.g. /run/netns/NAME); default: the current one.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides). At debug and trace
    /// the kernel programs also report every subset chosen, fallback, miss and connection
    /// opened or closed (aya-log events), while this tcpshiftd runs.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    log_level: tracing::Level,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464), read from the
    /// kernel at every scrape. ADDR is in the network namespace tcpshiftd works in.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Replace the running eBPF programs even when they are identical to this version's (an
    /// adopted state's programs are otherwise replaced in place only when they differ; weights,
    /// sockets and connections are kept either way). For operators and the fault tests.
    #[arg(long)]
    reload_program: bool,

    /// How often to look for backend sockets that are not registered.
    #[arg(long, default_value = "250", value_name = "MS")]
    scan_interval_ms: u64,
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
    let config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config {
            services: Vec::new(),
        },
    };
    // Enter the namespace before any other thread exists: threads inherit it.
    if let Some(path) = &args.netns {
        Netns::open(path)?.enter()?;
    }
    let netns = Netns::current()?;
    // Take the metrics address before changing anything: one that cannot be bound must fail
    // the start with nothing installed or applied.
    let metrics = match args.metrics {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr} for metrics"))?;
            listener
                .set_nonblocking(true)
                .context("cannot make the metrics socket non-blocking")?;
            Some(listener)
        }
        None => None,
    };
    let (mut state, installed) = State::install(&netns, EBPF_OBJECT)?;
    let policy = match installed {
        Installed::Created => Weights::FromConfig,
        Installed::Adopted => {
            info!(dir = %state.dir().display(), "adopted pinned state; keeping the weights in the kernel");
            // Before the kernel events' logger starts: it follows the sk_lookup program's id.
            upgrade(&mut state, args.reload_program)?;
            Weights::KeepExisting
        }
    };
    state
        .apply(&config, policy)
        .context("cannot apply the configuration")?;
    let debug_events = args.log_level >= tracing::Level::DEBUG;
    state
        .set_debug_events(debug_events)
        .context("cannot set the kernel's debug events")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let result = runtime.block_on(async {
        if let Some(listener) = metrics {
            let listener = TcpListener::from_std(listener)
                .context("cannot serve metrics on the bound socket")?;
            let scraped = Arc::new(Mutex::new(State::open(&netns)?));
            if let Ok(address) = listener.local_addr() {
                info!(%address, "serving metrics at /metrics");
            }
            tokio::spawn(serve_metrics(listener, scraped));
        }
        if debug_events {
            match aya_log::EbpfLogger::init_from_id(state.program_id()?) {
                Ok(logger) => {
                    tokio::spawn(forward_kernel_events(logger));
                }
                Err(e) => warn!("kernel debug events unavailable: {e}"),
            }
        }
        supervise(
            &mut state,
            Duration::from_millis(args.scan_interval_ms.max(10)),
        )
        .await
    });
    if debug_events && state.is_installed() {
        // Nobody reads the events any more (whether tcpshiftd ends normally or on an
        // error): stop producing them.
        if let Err(e) = state.set_debug_events(false) {
            warn!("cannot turn the kernel's debug events off: {e}");
        }
    }
    result
}

/// Replaces the adopted state's programs with this version's, in place (maps kept), when they
/// differ or `force` is set, and says what happened.
fn upgrade(state: &mut State, force: bool) -> Result<()> {
    let started = Instant::now();
    let upgrade = state
        .upgrade_programs(EBPF_OBJECT, force)
        .context("cannot upgrade the running programs in place")?;
    let took = started.elapsed();
    let links = [
        ("sk_lookup", Some(upgrade.sk_lookup)),
        ("sock_ops", upgrade.sock_ops),
    ];
    let mut unchanged = Vec::new();
    for (name, change) in links {
        match change {
            Some(ProgramChange::Replaced { old, new }) => {
                info!(took = ?took, "replaced the {name} program in place: {old} -> {new}")
            }
            Some(ProgramChange::Unchanged(p)) => unchanged.push(format!("{name} {p}")),
            None => {}
        }
    }
    if unchanged.len() == links.iter().filter(|(_, c)| c.is_some()).count() {
        info!(
            "running programs are this version's: {}",
            unchanged.join(", ")
        );
    } else if !unchanged.is_empty() {
        info!(
            "kept the running program, identical to this version's: {}",
            unchanged.join(", ")
        );
    }
    if upgrade.sock_ops.is_none() {
        debug!("no sock_ops link is pinned (connection accounting off): nothing to replace there");
    }
    Ok(())
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

/// Serves `GET /metrics` (Prometheus text, rendered from the kernel maps at each request).
async fn serve_metrics(listener: TcpListener, state: Arc<Mutex<State>>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    if let Err(e) = metrics_request(stream, &state).await {
                        debug!(%peer, "metrics request: {e:#}");
                    }
                });
            }
            Err(e) => {
                warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One HTTP/1.x request: `GET /metrics` (or `HEAD`), anything else is refused.
async fn metrics_request(mut stream: TcpStream, state: &Mutex<State>) -> Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .context("timed out reading the request")??;
    let text = String::from_utf8_lossy(&head);
    let mut parts = text.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (code, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let rendered = state
                .lock()
                .map_err(|_| anyhow::anyhow!("metrics state poisoned"))?
                .status()
                .map_err(anyhow::Error::from)
                .and_then(|s| metrics::render(&s).context("cannot encode metrics"));
            match rendered {
                Ok(body) => ("200 OK", metrics::CONTENT_TYPE, body),
                Err(e) => (
                    "500 Internal Server Error",
                    "text/plain; charset=utf-8",
                    format!("cannot read tcpshift's state: {e:#}\n"),
                ),
            }
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "tcpshift serves /metrics only\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_string(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Registers missing sockets until a signal arrives or the state is uninstalled.
async fn supervise(state: &mut State, every: Duration) -> Result<()> {
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
        let mut still: HashSet<(String, String)> = HashSet::new();
        for outcome in discovery::register_missing(state, None)? {
            match outcome {
                Registration::Registered {
                    missing: m,
                    listener,
                    owner,
                } => {
                    info!(service = %m.service, subset = %m.subset, backend = %m.backend,
                        socket = %listener.local, pid = owner.pid, process = %owner.comm, "registered listening socket");
                }
                Registration::NotListening(m) => {
                    let id = (m.service.clone(), m.subset.clone());
                    if !waiting.contains(&id) {
                        warn!(service = %m.service, subset = %m.subset, backend = %m.backend,
                            "no live socket: nothing listens on the backend address (yet); its connections fall back to the other subsets");
                    }
                    still.insert(id);
                }
                Registration::Failed { missing: m, error } => {
                    let id = (m.service.clone(), m.subset.clone());
                    if !waiting.contains(&id) {
                        warn!(service = %m.service, subset = %m.subset, backend = %m.backend, "cannot take the backend's socket: {error}");
                    }
                    still.insert(id);
                }
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
