//! tcpshift-specific measurements: filling the maps with many services, the sk_lookup
//! program's own run time, and how fast a weight change takes effect.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tcpshift::{
    config::Config,
    discovery,
    model::{ServiceConfig, Weights},
    netns::Netns,
    state::{State, state_dir},
};

use crate::{
    load::{self, LINE},
    memory::{self, KernelMemory},
};

/// How long filling the maps took ([`populate`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PopulateResult {
    /// Services configured.
    pub services: u32,
    /// Subsets per service (the largest).
    pub subsets: u32,
    /// Loading, verifying and attaching the program (or adopting a pinned state).
    pub install_ms: f64,
    /// Writing every service: bucket tables, definitions, counters, entries.
    pub apply_ms: f64,
    /// Registering every subset's listening socket.
    pub register_ms: f64,
    /// Sockets registered.
    pub sockets: u64,
    /// Apply attempts that failed and were retried.
    #[serde(default)]
    pub apply_retries: u32,
    /// The first such failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_error: Option<String>,
    /// Kernel memory of every pinned map right after install, before any service (stage (a)
    /// of [`crate::memory::Stages`]); `None` when it could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_installed: Option<KernelMemory>,
    /// Kernel memory after every service was applied and every socket registered (stage
    /// (b)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_populated: Option<KernelMemory>,
}

/// One weight change of every service ([`reweight`]) and the kernel memory afterwards.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReweightResult {
    /// Services applied.
    pub services: u32,
    /// Applying them all (in chunks), ms.
    pub apply_ms: f64,
    /// Apply attempts that failed and were retried.
    pub apply_retries: u32,
    /// The first such failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_error: Option<String>,
    /// Kernel memory of every pinned map afterwards (stage (c) of
    /// [`crate::memory::Stages`]).
    pub memory: KernelMemory,
}

/// How often [`populate`] retries a failed apply (in all).
const APPLY_ATTEMPTS: u32 = 1000;
/// Services [`populate`] applies at a time.
const APPLY_CHUNK: usize = 250;

/// Installs tcpshift in the current network namespace, applies `config` and registers every
/// subset's socket, taking each distinct backend's listening socket once.
///
/// `tcpshiftd` does the same, but looks each subset's socket up on its own (a scan of
/// `/proc`), which for 10 000 services × 16 subsets takes far longer than the benchmark
/// should; the data path measured afterwards is the same.
pub fn populate(config_path: &Path) -> Result<PopulateResult> {
    let config = Config::from_file(config_path)?;
    let netns = Netns::current()?;
    let t = Instant::now();
    let (mut state, _) = State::install(&netns, tcpshift::EBPF_OBJECT)?;
    let install_ms = ms(t.elapsed());
    let memory_installed = memory_or_warn("after install");
    let t = Instant::now();
    let (apply_retries, apply_error) = apply_in_chunks(&mut state, &config.services)?;
    let apply_ms = ms(t.elapsed());
    let t = Instant::now();
    let mut sockets: HashMap<SocketAddr, OwnedFd> = HashMap::new();
    let mut registered = 0;
    for m in state.missing_sockets()? {
        let fd = match sockets.entry(m.backend) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let (fd, _, _) = discovery::acquire(m.backend)?
                    .with_context(|| format!("nothing listens on {}", m.backend))?;
                e.insert(fd)
            }
        };
        if state.register_socket(&m, fd.as_fd())? {
            registered += 1;
        }
    }
    Ok(PopulateResult {
        services: config.services.len() as u32,
        subsets: config
            .services
            .iter()
            .map(|s| s.subsets.len() as u32)
            .max()
            .unwrap_or(0),
        install_ms,
        apply_ms,
        register_ms: ms(t.elapsed()),
        sockets: registered,
        apply_retries,
        apply_error,
        memory_installed,
        memory_populated: memory_or_warn("after populate"),
    })
}

/// The kernel memory of the current namespace's maps; a failure is printed (the record then
/// has no reading, which the report shows as "not measured") rather than failing the setup.
fn memory_or_warn(stage: &str) -> Option<KernelMemory> {
    memory::read_current()
        .map_err(|e| eprintln!("tcpshift-load: cannot read the kernel memory {stage}: {e:#}"))
        .ok()
}

/// Applies `services` [`APPLY_CHUNK`] at a time, retrying a chunk that fails; returns the
/// retries and the first failure.
///
/// Applying thousands of services in one burst fails: elements of maps without
/// preallocation (the per-CPU counters above all) come from a per-CPU cache that the kernel
/// refills asynchronously, and a burst finds it empty. So apply in chunks (services absent
/// from a configuration are left alone) and retry a chunk after a pause; applying again
/// continues where it stopped.
fn apply_in_chunks(state: &mut State, services: &[ServiceConfig]) -> Result<(u32, Option<String>)> {
    let (mut apply_retries, mut apply_error) = (0, None);
    for chunk in services.chunks(APPLY_CHUNK) {
        loop {
            match state.apply(chunk, Weights::FromConfig) {
                Ok(_) => break,
                Err(e) if apply_retries < APPLY_ATTEMPTS => {
                    apply_retries += 1;
                    apply_error.get_or_insert_with(|| format!("{e:#}"));
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e).context(format!(
                        "cannot apply the configuration ({apply_retries} attempts failed)"
                    ));
                }
            }
        }
    }
    Ok((apply_retries, apply_error))
}

/// Applies `config` to the tcpshift state of the current namespace (installed by
/// [`populate`] with the same services and other weights: one weight change of every
/// service), then reads the kernel memory of every pinned map.
pub fn reweight(config_path: &Path) -> Result<ReweightResult> {
    let config = Config::from_file(config_path)?;
    let mut state = State::open(&Netns::current()?)?;
    let t = Instant::now();
    let (apply_retries, apply_error) = apply_in_chunks(&mut state, &config.services)?;
    let apply_ms = ms(t.elapsed());
    Ok(ReweightResult {
        services: config.services.len() as u32,
        apply_ms,
        apply_retries,
        apply_error,
        memory: memory::read_current()?,
    })
}

/// Removes tcpshift from the current network namespace (nothing to do when absent).
pub fn uninstall() -> Result<()> {
    State::uninstall(&Netns::current()?)?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The sk_lookup program's run time over a measured window (kernel BPF statistics).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct BpfStats {
    /// Program runs in the window (one per SYN, plus one per other socket lookup in the
    /// namespace).
    pub runs: u64,
    /// Mean run time in nanoseconds.
    pub ns_per_run: f64,
}

/// Reads run time and run count of the sk_lookup program attached in the current network
/// namespace while kernel BPF statistics are enabled.
pub struct ProgStats {
    id: u32,
    _enabled: OwnedFd,
    start: Option<(Duration, u64)>,
    result: Option<BpfStats>,
}

impl ProgStats {
    /// Enables BPF run-time statistics (for as long as this value lives) and finds the
    /// program attached by tcpshift in the current network namespace.
    pub fn new() -> Result<Self> {
        let netns = Netns::current()?;
        let link = state_dir(&netns).join("link");
        let pinned = aya::programs::links::PinnedLink::from_pin(&link)
            .with_context(|| format!("cannot open {} (is tcpshift installed?)", link.display()))?;
        let fd_link: aya::programs::links::FdLink = pinned.into();
        let id = fd_link
            .info()
            .context("cannot read the link's program")?
            .program_id();
        let enabled = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("cannot enable BPF run-time statistics")?;
        Ok(ProgStats {
            id,
            _enabled: enabled,
            start: None,
            result: None,
        })
    }

    fn read(&self) -> Result<(Duration, u64)> {
        for info in aya::programs::loaded_programs() {
            let info = info.context("cannot list BPF programs")?;
            if info.id() == self.id {
                return Ok((info.run_time(), info.run_count()));
            }
        }
        bail!("BPF program {} is gone", self.id)
    }

    /// Handles one edge of the measured window (see [`load::rate`]).
    pub fn edge(&mut self, edge: load::Edge) {
        match edge {
            load::Edge::Start => self.start = self.read().ok(),
            load::Edge::End => {
                if let (Some((t0, n0)), Ok((t1, n1))) = (self.start, self.read()) {
                    let runs = n1.saturating_sub(n0);
                    self.result = Some(BpfStats {
                        runs,
                        ns_per_run: (t1.saturating_sub(t0)).as_nanos() as f64 / runs.max(1) as f64,
                    });
                }
            }
        }
    }

    /// The statistics of the window, once it has ended.
    pub fn result(&self) -> Option<BpfStats> {
        self.result
    }
}

/// What to flip in [`weight_change`].
#[derive(Debug, Clone)]
pub struct FlipParams {
    /// The service address clients connect to.
    pub addr: SocketAddr,
    /// The service's name.
    pub service: String,
    /// Subset names and the prefixes their backends answer with: `(a, prefix_a)`,
    /// `(b, prefix_b)`.
    pub a: (String, String),
    /// See `a`.
    pub b: (String, String),
    /// `tcpshiftctl` to run (with `--netns` when given).
    pub tcpshiftctl: PathBuf,
    /// Network namespace argument for `tcpshiftctl`.
    pub netns: Option<PathBuf>,
    /// Flips of each kind.
    pub iterations: usize,
    /// Client threads probing the service meanwhile.
    pub probes: usize,
}

/// One weight change and what the probing clients saw after it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlipSample {
    /// `cli` (`tcpshiftctl set-weight`, a new process) or `library` (the map update alone:
    /// lock, read the service, build the 16 384-bucket table, two map updates).
    pub how: String,
    /// Wall time of the change: the command or the library call, in microseconds.
    pub update_us: f64,
    /// From the change returning to the start (connect) of the first connection that went
    /// to the newly weighted subset, in microseconds.
    pub first_follow_us: Option<f64>,
    /// Connections started after the change returned that still went to the old subset
    /// (should be 0: the very next connection follows the new weights).
    pub stale_after: u64,
    /// Connections started after the change returned (until the next change).
    pub after: u64,
    /// Connections that went to the old subset and whose connect was under way when the
    /// change returned (started before, handshake done after: a SYN possibly in flight at the
    /// flip, steered before the maps changed). Not counted in `stale_after`.
    #[serde(default)]
    pub in_flight_old: u64,
    /// Every connection that went to the old subset and finished its handshake after the
    /// change returned (at most 20 per change): its timing and whether its SYN was in flight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub old_subset: Vec<OldSubsetConnection>,
}

/// A connection that reached the old subset although its handshake ended after the weight
/// change returned.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OldSubsetConnection {
    /// Connect started, µs after the change returned (negative: before).
    pub connect_start_us: f64,
    /// Connect returned (handshake done), µs after the change returned.
    pub connected_us: f64,
    /// The connect started before the change returned: its SYN may have been steered before
    /// the maps changed (in flight at the flip), so it says nothing against the change.
    pub syn_in_flight: bool,
}

/// Flips a two-subset service between 100/0 and 0/100 `iterations` times each way, once with
/// `tcpshiftctl set-weight` and once with the library call, while `probes` client threads
/// open connections continuously, and reports how soon the connections followed.
pub fn weight_change(p: &FlipParams) -> Result<Vec<FlipSample>> {
    let netns = Netns::current()?;
    let mut state = State::open(&netns)?;
    let to_a = [(p.a.0.clone(), 100), (p.b.0.clone(), 0)];
    state.set_weights(Some(&p.service), &to_a)?;
    let stop = AtomicBool::new(false);
    // (connect start, connect end, went to b?) per probe.
    let events: Mutex<Vec<Event>> = Mutex::new(Vec::new());
    let prefix_b = p.b.1.as_bytes();
    let prefix_a = p.a.1.as_bytes();
    let mut flips: Vec<(String, Instant, Instant, bool)> = Vec::new();
    thread::scope(|scope| -> Result<()> {
        let mut handles = Vec::new();
        for _ in 0..p.probes.max(1) {
            let (stop, events) = (&stop, &events);
            handles.push(scope.spawn(move || -> Result<()> {
                let mut mine = Vec::with_capacity(1 << 16);
                let mut buf = [0u8; 256];
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let t0 = Instant::now();
                    let (n, connected) = load::exchange_timed(p.addr, &mut buf)
                        .with_context(|| format!("probe connection to {}", p.addr))?;
                    let prefix = &buf[..n];
                    if prefix != prefix_a && prefix != prefix_b {
                        bail!(
                            "unexpected backend {:?} answered {}",
                            String::from_utf8_lossy(prefix),
                            String::from_utf8_lossy(LINE).trim_end()
                        );
                    }
                    mine.push((t0, connected, prefix == prefix_b));
                }
                events.lock().map_err(|_| anyhow!("poisoned"))?.extend(mine);
                Ok(())
            }));
        }
        let settle = Duration::from_millis(30);
        let result = (|| -> Result<()> {
            thread::sleep(settle);
            for _ in 0..p.iterations {
                // To b with the CLI (full form: both weights named).
                let before = Instant::now();
                let mut cmd = Command::new(&p.tcpshiftctl);
                if let Some(ns) = &p.netns {
                    cmd.arg("--netns").arg(ns);
                }
                let out = cmd
                    .args(["set-weight", "--service", &p.service])
                    .arg(format!("{}=0", p.a.0))
                    .arg(format!("{}=100", p.b.0))
                    .output()
                    .with_context(|| format!("cannot run {}", p.tcpshiftctl.display()))?;
                let after = Instant::now();
                if !out.status.success() {
                    bail!(
                        "tcpshiftctl set-weight failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                flips.push(("cli".into(), before, after, true));
                thread::sleep(settle);
                // Back to a with the library call.
                let before = Instant::now();
                state.set_weights(Some(&p.service), &to_a)?;
                let after = Instant::now();
                flips.push(("library".into(), before, after, false));
                thread::sleep(settle);
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().map_err(|_| anyhow!("a probe thread panicked"))??;
        }
        result
    })?;
    let mut events = events.into_inner().map_err(|_| anyhow!("poisoned"))?;
    events.sort_by_key(|e| e.0);
    Ok(analyse_flips(&flips, &events))
}

/// A probe connection: connect start, connect end, whether it went to subset b.
type Event = (Instant, Instant, bool);

/// Most connections on the old subset listed per change.
const OLD_LISTED: usize = 20;

/// For each flip `(how, before, after, to_b)`, looks at the connections whose handshake ended
/// after it returned and before the next flip began (so their lookup cannot have seen the next
/// flip's weights; a handshake spanning the next flip's start is judged by neither). Those
/// started after the return are judged (`after`, `stale_after`); those started before are
/// SYNs in flight at the flip, counted apart when they went to the old subset.
fn analyse_flips(flips: &[(String, Instant, Instant, bool)], events: &[Event]) -> Vec<FlipSample> {
    let mut out = Vec::new();
    let us = |t: Instant, at: Instant| {
        if t >= at {
            (t - at).as_secs_f64() * 1e6
        } else {
            -((at - t).as_secs_f64() * 1e6)
        }
    };
    for (i, (how, before, after, to_b)) in flips.iter().enumerate() {
        let until = flips.get(i + 1).map(|f| f.1);
        let window = events
            .iter()
            .filter(|(_, done, _)| *done >= *after && until.is_none_or(|u| *done < u));
        let mut s = FlipSample {
            how: how.clone(),
            update_us: (*after - *before).as_secs_f64() * 1e6,
            first_follow_us: None,
            stale_after: 0,
            after: 0,
            in_flight_old: 0,
            old_subset: Vec::new(),
        };
        for (t, done, b) in window {
            let in_flight = *t < *after;
            if !in_flight {
                s.after += 1;
            }
            if b == to_b {
                if !in_flight {
                    s.first_follow_us.get_or_insert(us(*t, *after));
                }
                continue;
            }
            if in_flight {
                s.in_flight_old += 1;
            } else {
                s.stale_after += 1;
            }
            if s.old_subset.len() < OLD_LISTED {
                s.old_subset.push(OldSubsetConnection {
                    connect_start_us: us(*t, *after),
                    connected_us: us(*done, *after),
                    syn_in_flight: in_flight,
                });
            }
        }
        out.push(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_are_judged_by_the_connections_after_them() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        let flips = vec![
            ("cli".to_string(), at(100), at(200), true),
            ("library".to_string(), at(1000), at(1010), false),
        ];
        // (start, connected, went to b)
        let c = |us: u64, b: bool| (at(us), at(us + 5), b);
        let events = vec![
            c(150, false),             // during the first change, done before it returned
            (at(190), at(205), false), // SYN in flight at the first change's return
            c(210, true),
            c(300, true),
            c(990, true),
            // Started before the second change, handshake ended during it (its lookup may have
            // seen the second change's weights): judged by neither change.
            (at(998), at(1003), false),
            c(1005, true), // in flight at the second change's return, on the old subset
            c(1020, true), // stale
            c(1050, false),
        ];
        let s = analyse_flips(&flips, &events);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].how, "cli");
        assert_eq!(s[0].after, 3);
        assert_eq!(s[0].stale_after, 0);
        assert_eq!(s[0].in_flight_old, 1);
        assert_eq!(
            s[0].old_subset,
            [OldSubsetConnection {
                connect_start_us: -10.0,
                connected_us: 5.0,
                syn_in_flight: true
            }]
        );
        assert!((s[0].first_follow_us.unwrap() - 10.0).abs() < 1e-6);
        assert!((s[0].update_us - 100.0).abs() < 1e-6);
        assert_eq!(s[1].after, 2);
        assert_eq!(s[1].stale_after, 1);
        assert_eq!(s[1].in_flight_old, 1);
        assert!(s[1].old_subset[0].syn_in_flight);
        assert!(!s[1].old_subset[1].syn_in_flight);
        assert!((s[1].old_subset[1].connect_start_us - 10.0).abs() < 1e-6);
        assert!((s[1].first_follow_us.unwrap() - 40.0).abs() < 1e-6);
    }
}
