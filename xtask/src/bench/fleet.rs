//! The fleet section of `cargo xtask bench` (`--only fleet` runs it alone): a 1-member etcd
//! on 127.0.0.1 and 8 nodes, each a network namespace with a tcpshiftd following the store
//! through `--netns` and serving `--metrics` inside its namespace.
//!
//! - **Weight change**: the time from `tcpshiftctl --store set-weight` returning to every
//!   node's kernel map holding the new weight, over many changes (p50, p99, max). Each node
//!   is watched by a thread of its own that reads the node's runtime record
//!   (`/run/tcpshift/store/INODE.json`, a small file tcpshiftd rewrites right after each
//!   apply returns, i.e. once the revision is in its kernel maps) every millisecond until
//!   its `applied_revision` reaches the revision `set-weight` printed; the change's time is
//!   the slowest node's (a record counts only when written by the node's own tcpshiftd).
//!   Reading that file costs the node nothing (earlier versions polled `/metrics`, which
//!   renders every service from the kernel maps and walks `/proc`: 8 nodes scraped every
//!   1–2 ms took the CPU the followers needed to apply). Once every node has been seen,
//!   each node's `/metrics` is read once to check that its kernel holds the weight.
//! - **1 000 services**: `tcpshiftctl --store apply -f` of 1 000 services (one etcd
//!   transaction), then the time until every node's runtime record shows the new revision
//!   applied (set once the revision is in its kernel maps).
//! - **Idle CPU**: user + system CPU time of every tcpshiftd (`/proc/PID/stat`) over an idle
//!   interval while it follows the store (a watch, not a poll; the node report is written
//!   every 5 s), beside a baseline tcpshiftd in a ninth namespace holding the same services
//!   from `--config` and following nothing (its backend scan costs the same).
//!
//! Goals (reported, not asserted: timings depend on the machine): p99 ≤ 100 ms, 1 000
//! services converged ≤ 3 s, idle CPU ≈ 0. Writes `fleet.json` and `fleet.md` beside the
//! other results.

use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::json;

use super::{env::check_interrupted, step};
use crate::cmd::{self, say};

/// Nodes of the fleet.
const NODES: usize = 8;
/// Where each node serves its metrics, inside its own namespace.
const METRICS: &str = "127.0.0.1:9464";
/// How long one change may take to reach every node before it counts as failed.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a watcher reads its node's runtime record while waiting (the resolution of the
/// figures; the record is a small file, whatever the number of services).
const WATCH_EVERY: Duration = Duration::from_millis(1);
/// Services of the large apply.
const SERVICES: u32 = 1_000;
/// Their ports: 20000.. (nothing listens there; the kernel maps are what is measured).
const FIRST_PORT: u16 = 20_000;

/// How much of the fleet section to measure.
pub struct FleetPlan {
    /// Weight changes timed.
    pub changes: usize,
    /// How long tcpshiftd's CPU time is watched while idle.
    pub idle: Duration,
}

impl FleetPlan {
    /// 100 changes and 10 s idle; `quick`: 20 changes and 5 s.
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                changes: 20,
                idle: Duration::from_secs(5),
            }
        } else {
            Self {
                changes: 100,
                idle: Duration::from_secs(10),
            }
        }
    }
}

/// One node: its namespace and tcpshiftd.
struct Node {
    netns: String,
    path: PathBuf,
    daemon: Option<Child>,
}

/// The etcd member and the nodes, cleaned up on drop.
struct Fleet {
    bins: PathBuf,
    dir: PathBuf,
    etcd: Option<Child>,
    url: String,
    nodes: Vec<Node>,
}

/// Runs the fleet section with the binaries in `bins`, writes `fleet.json` and `fleet.md`
/// into `out` and prints the table.
pub fn run(bins: &Path, out: &Path, plan: &FleetPlan) -> Result<()> {
    crate::etcd::require("the fleet benchmark")?;
    let dir = out.join(format!("fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut fleet = Fleet {
        bins: bins.to_path_buf(),
        dir,
        etcd: None,
        url: String::new(),
        nodes: Vec::new(),
    };
    let result = fleet.measure(plan);
    fleet.clean_up();
    let results = result?;
    let md = markdown(&results, plan);
    println!("\n{md}");
    super::peers::write(
        &out.join("fleet.json"),
        &serde_json::to_string_pretty(&results)?,
    )?;
    super::peers::write(&out.join("fleet.md"), &md)?;
    say(format_args!(
        "wrote {} and {}",
        cmd::short(&out.join("fleet.json")).display(),
        cmd::short(&out.join("fleet.md")).display()
    ));
    Ok(())
}

impl Fleet {
    fn measure(&mut self, plan: &FleetPlan) -> Result<serde_json::Value> {
        step("fleet: starting etcd and 8 nodes");
        self.start_etcd()?;
        for i in 0..NODES {
            self.start_node(i, None)?;
        }
        let watchers: Vec<Watcher> = self
            .nodes
            .iter()
            .map(|n| Watcher::start(&n.path, n.daemon.as_ref().map_or(0, Child::id)))
            .collect::<Result<_>>()?;
        let seed = self.dir.join("seed.yaml");
        std::fs::write(&seed, service_yaml("tcp-echo", 31400, 100, 0))?;
        let revision = revision_of(&self.store_ctl(&["apply", "-f", &seed.to_string_lossy()])?)?;
        converge(
            &watchers,
            Want::Applied(revision),
            Duration::from_secs(30),
            WATCH_EVERY,
        )?;
        slowest(&watchers, Instant::now()).context("the nodes did not apply the seed")?;

        step(format_args!("fleet: {} weight changes", plan.changes));
        let mut times = Vec::with_capacity(plan.changes);
        for k in 0..plan.changes {
            check_interrupted()?;
            // Consecutive changes always differ: 1, 2, ..., 99, 1, ...
            let v2 = (k % 99) as u32 + 1;
            let shown = self.store_ctl(&["set-weight", &format!("v2={v2}")])?;
            let returned = Instant::now();
            let revision = revision_of(&shown)?;
            converge(
                &watchers,
                Want::Applied(revision),
                CHANGE_TIMEOUT,
                WATCH_EVERY,
            )?;
            times.push(
                slowest(&watchers, returned).with_context(|| format!("weight change v2={v2}"))?,
            );
            let kernel =
                format!("tcpshift_subset_weight{{service=\"tcp-echo\",subset=\"v2\"}} {v2}");
            converge(&watchers, Want::Kernel(kernel), CHANGE_TIMEOUT, WATCH_EVERY)?;
            slowest(&watchers, Instant::now())
                .with_context(|| format!("weight change v2={v2} in the kernel"))?;
        }
        times.sort_unstable();

        step(format_args!("fleet: {SERVICES} services applied once"));
        let many = self.dir.join("many.yaml");
        let mut yaml = String::from("services:\n");
        for i in 0..SERVICES {
            let body = service_yaml(&format!("svc-{i}"), FIRST_PORT + i as u16, 100, 0);
            yaml.push_str(body.trim_start_matches("services:\n"));
        }
        std::fs::write(&many, yaml)?;
        // The baseline for the idle CPU: the same services, from a file, no store.
        self.start_node(NODES, Some(&many))?;
        let started = Instant::now();
        let shown = self.store_ctl(&["apply", "-f", &many.to_string_lossy()])?;
        let apply_took = started.elapsed();
        let returned = Instant::now();
        let revision = revision_of(&shown)?;
        converge(
            &watchers,
            Want::Applied(revision),
            Duration::from_secs(60),
            WATCH_EVERY,
        )?;
        let converged =
            slowest(&watchers, returned).context("the nodes did not apply the 1 000 services")?;
        drop(watchers);

        step(format_args!(
            "fleet: idle tcpshiftd CPU over {} s",
            plan.idle.as_secs()
        ));
        // The followers, then the baseline.
        let pids: Vec<u32> = self
            .nodes
            .iter()
            .filter_map(|n| n.daemon.as_ref().map(Child::id))
            .collect();
        let before = pids
            .iter()
            .map(|&p| cpu_ticks(p))
            .collect::<Result<Vec<_>>>()?;
        let idle_start = Instant::now();
        while idle_start.elapsed() < plan.idle {
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(200));
        }
        let idle = idle_start.elapsed();
        let after = pids
            .iter()
            .map(|&p| cpu_ticks(p))
            .collect::<Result<Vec<_>>>()?;
        let hz = clock_ticks();
        let cpu_ms: Vec<f64> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| a.saturating_sub(*b) as f64 * 1000.0 / hz)
            .collect();
        let baseline_ms = cpu_ms.last().copied().unwrap_or(f64::NAN);
        let following = &cpu_ms[..cpu_ms.len().saturating_sub(1)];
        let cpu_max = following.iter().copied().fold(0.0, f64::max);
        let cpu_mean = following.iter().sum::<f64>() / following.len().max(1) as f64;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Ok(json!({
            "nodes": NODES,
            "weight_change": {
                "changes": times.len(),
                "p50_ms": ms(percentile(&times, 50.0)),
                "p99_ms": ms(percentile(&times, 99.0)),
                "max_ms": ms(times.last().copied().unwrap_or_default()),
                "goal_p99_ms": 100,
            },
            "services": {
                "count": SERVICES,
                "apply_ms": ms(apply_took),
                "converged_ms": ms(converged),
                "goal_ms": 3000,
            },
            "idle_cpu": {
                "seconds": idle.as_secs_f64(),
                "mean_ms": cpu_mean,
                "max_ms": cpu_max,
                "max_percent": cpu_max / ms(idle) * 100.0,
                "baseline_ms": baseline_ms,
            },
        }))
    }

    fn start_etcd(&mut self) -> Result<()> {
        let etcd = crate::etcd::start(&self.dir, "bench", &mut || {
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(100));
            Ok(())
        })?;
        self.url = etcd.url;
        self.etcd = Some(etcd.child);
        Ok(())
    }

    /// Starts node `i`: following the store, or (`source` = `--config FILE`) a baseline
    /// tcpshiftd that holds the same services from a file and follows nothing.
    fn start_node(&mut self, i: usize, source: Option<&Path>) -> Result<()> {
        let netns = format!("tsbench-fleet-{}-{i}", std::process::id());
        cmd::output(Command::new("ip").args(["netns", "add", &netns]))?;
        let path = PathBuf::from(format!("/run/netns/{netns}"));
        self.nodes.push(Node {
            netns,
            path: path.clone(),
            daemon: None,
        });
        cmd::output(
            Command::new("nsenter")
                .arg(format!("--net={}", path.display()))
                .args(["ip", "link", "set", "lo", "up"]),
        )?;
        let log = File::create(self.dir.join(format!("node{i}.log")))?;
        let mut daemon = Command::new(self.bins.join("tcpshiftd"));
        daemon.arg("--netns").arg(&path);
        match source {
            None => daemon.args(["--store", &self.url, "--node", &format!("bench-{i}")]),
            Some(config) => daemon.arg("--config").arg(config),
        };
        let child = daemon
            .args(["--metrics", METRICS, "--log-level", "warn"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start tcpshiftd")?;
        if let Some(node) = self.nodes.last_mut() {
            node.daemon = Some(child);
        }
        Ok(())
    }

    /// `tcpshiftctl --store URL ARGS`; its stdout.
    fn store_ctl(&self, args: &[&str]) -> Result<String> {
        let mut ctl = Command::new(self.bins.join("tcpshiftctl"));
        ctl.args(["--store", &self.url]).args(args);
        let out = cmd::output(&mut ctl)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn clean_up(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut d) = node.daemon.take() {
                if let Ok(pid) = libc::pid_t::try_from(d.id()) {
                    // SAFETY: kill has no memory-safety preconditions; `pid` is our child.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
                let _ = d.wait();
            }
            let _ = Command::new(self.bins.join("tcpshiftctl"))
                .arg("--netns")
                .arg(&node.path)
                .arg("uninstall")
                .output();
            let _ = Command::new("ip")
                .args(["netns", "del", &node.netns])
                .output();
        }
        self.nodes.clear();
        if let Some(mut etcd) = self.etcd.take() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.clean_up();
    }
}

/// What a watcher is asked for.
#[derive(Clone)]
enum Want {
    /// Wait until the node's runtime record shows at least this revision applied.
    Applied(i64),
    /// Check once, through the node's `/metrics`, that its kernel shows this exact line (a
    /// weight); asked after every node has been seen, so that it does not load a node that
    /// is still applying.
    Kernel(String),
}

/// Whether the runtime record `record`, written by the tcpshiftd of pid `pid` (a record left
/// by an earlier tcpshiftd of a namespace with the same inode does not count), shows
/// `revision` applied.
fn applied(record: &[u8], pid: u32, revision: i64) -> bool {
    serde_json::from_slice::<serde_json::Value>(record)
        .ok()
        .filter(|r| r["pid"].as_u64() == Some(u64::from(pid)))
        .and_then(|r| r["status"]["applied_revision"].as_i64())
        .is_some_and(|r| r >= revision)
}

/// [`Want::Kernel`]: whether the node's `/metrics` shows `line`.
fn kernel_shows(line: &str) -> Result<()> {
    let text = metrics()?;
    anyhow::ensure!(
        text.lines().any(|l| l == line),
        "the node recorded the revision as applied but its kernel does not show {line:?}"
    );
    Ok(())
}

/// A thread inside one node's namespace that reads its runtime record until what it is
/// asked for shows, and answers with the instant it saw it.
struct Watcher {
    ask: Option<mpsc::Sender<Ask>>,
    answer: mpsc::Receiver<Result<Instant>>,
}

impl Watcher {
    fn start(path: &Path, pid: u32) -> Result<Watcher> {
        let ns = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let record = PathBuf::from(format!(
            "/run/tcpshift/store/{}.json",
            std::os::unix::fs::MetadataExt::ino(&ns.metadata()?)
        ));
        let (ask, asked) = mpsc::channel::<Ask>();
        let (answer_tx, answer) = mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: setns on a namespace descriptor we hold; it moves only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = answer_tx.send(Err(anyhow::anyhow!(
                    "setns: {}",
                    std::io::Error::last_os_error()
                )));
                return;
            }
            for Ask {
                want,
                timeout,
                every,
            } in asked
            {
                let deadline = Instant::now() + timeout;
                let seen = match want {
                    Want::Kernel(line) => kernel_shows(&line).map(|()| Instant::now()),
                    Want::Applied(revision) => loop {
                        if let Ok(text) = std::fs::read(&record)
                            && applied(&text, pid, revision)
                        {
                            break Ok(Instant::now());
                        }
                        if Instant::now() >= deadline {
                            break Err(anyhow::anyhow!("not seen within {timeout:?}"));
                        }
                        std::thread::sleep(every);
                    },
                };
                if answer_tx.send(seen).is_err() {
                    return;
                }
            }
        });
        Ok(Watcher {
            ask: Some(ask),
            answer,
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.ask.take();
    }
}

/// What a watcher is asked: wait for `want`, reading every `every`, at most `timeout`.
struct Ask {
    want: Want,
    timeout: Duration,
    every: Duration,
}

/// Asks every watcher to wait for `want` (see [`slowest`] for the answers).
fn converge(watchers: &[Watcher], want: Want, timeout: Duration, every: Duration) -> Result<()> {
    for w in watchers {
        w.ask
            .as_ref()
            .context("watcher stopped")?
            .send(Ask {
                want: want.clone(),
                timeout,
                every,
            })
            .context("a watcher thread stopped")?;
    }
    Ok(())
}

/// The time from `since` to the last node seeing what [`converge`] asked for.
fn slowest(watchers: &[Watcher], since: Instant) -> Result<Duration> {
    let mut last = since;
    for (i, w) in watchers.iter().enumerate() {
        let seen = w
            .answer
            .recv()
            .context("a watcher thread stopped")?
            .with_context(|| format!("node {i}"))?;
        last = last.max(seen);
    }
    Ok(last.saturating_duration_since(since))
}

/// `GET /metrics` of the node whose namespace this thread is in.
fn metrics() -> Result<String> {
    let addr: SocketAddr = METRICS.parse()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// The `store revision N` that tcpshiftctl prints after a write.
fn revision_of(output: &str) -> Result<i64> {
    let at = output
        .rfind("store revision ")
        .with_context(|| format!("no store revision in {output:?}"))?;
    let digits: String = output[at + "store revision ".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .with_context(|| format!("no store revision in {output:?}"))
}

/// One service as tcpshift's service file (`services:` included).
fn service_yaml(name: &str, port: u16, v1: u32, v2: u32) -> String {
    format!(
        "services:\n  {name}:\n    listen: {port}\n    subsets:\n      v1: 127.0.0.1:9101\n      \
         v2: 127.0.0.1:9102\n    weights: {{v1: {v1}, v2: {v2}}}\n"
    )
}

/// The `p`-th percentile (nearest rank) of sorted `values`.
fn percentile(values: &[Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("tcpshiftd (pid {pid}) is gone"))?;
    // Fields after the command (which may hold spaces) in parentheses.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .context("unreadable /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the command.
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context("unreadable /proc/PID/stat")
    };
    Ok(field(11)? + field(12)?)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// The section's table.
fn markdown(r: &serde_json::Value, plan: &FleetPlan) -> String {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let w = &r["weight_change"];
    let s = &r["services"];
    let c = &r["idle_cpu"];
    format!(
        "### Fleet: {nodes} nodes following a 1-member etcd on loopback\n\n\
         | measurement | result | goal |\n|---|---|---|\n\
         | `set-weight` returned → every node has applied it to its kernel maps ({n} changes; seen in each node's runtime record, the kernel weight checked after) | p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms | p99 ≤ 100 ms |\n\
         | {count} services applied once (`apply` took {apply:.0} ms) → every node applied them | {conv:.0} ms | ≤ 3 000 ms |\n\
         | idle tcpshiftd CPU while following ({secs:.0} s; the same {count} services) | mean {mean:.1} ms, max {cmax:.1} ms ({pct:.3} % of one core); a tcpshiftd with the same services from a file, following nothing: {base:.1} ms | ≈ 0 beyond the baseline |\n",
        nodes = r["nodes"],
        n = plan.changes,
        p50 = f(&w["p50_ms"]),
        p99 = f(&w["p99_ms"]),
        max = f(&w["max_ms"]),
        count = s["count"],
        apply = f(&s["apply_ms"]),
        conv = f(&s["converged_ms"]),
        secs = f(&c["seconds"]),
        mean = f(&c["mean_ms"]),
        cmax = f(&c["max_ms"]),
        pct = f(&c["max_percent"]),
        base = f(&c["baseline_ms"]),
    )
}
