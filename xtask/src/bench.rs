//! `cargo xtask bench`: the same workloads against direct connections, tcpshift, nftables
//! DNAT, HAProxy and nginx, in a fresh network namespace on loopback, with a report.
//!
//! Everything runs in `tcpshift-bench-<pid>`: one tcp-echo per backend (v1 "one" on 9001,
//! v2 "two" on 9002) that every target shares, HAProxy and nginx (idle unless measured), and
//! per round and workload, for one target at a time: tcpshift (tcpshiftd, uninstalled
//! afterwards) or the nftables table (deleted afterwards, with the connection tracking table
//! emptied), so that nothing of one target is in the path of another. The baseline, `direct`,
//! is the client itself picking v1 or v2 at 80/20 (no steering, the same two backends);
//! `direct-v1` sends everything to v1. The load generator is `tcpshift-load`
//! (crate `tcpshift-bench`); it prints one JSON record per measurement into
//! `target/bench/raw.jsonl`, and `tcpshift-load report` turns them into `results.json`,
//! `results.md` and `chart.png`.

mod env;
mod fleet;
mod peers;
mod udp;

use std::{
    fs::OpenOptions,
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    build::{Profile, build},
    cmd::{self, say},
};
use env::{Env, check_interrupted};

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A short smoke run of every target and workload (for CI; no speed is asserted). Writes
    /// into target/bench/quick/.
    #[arg(long)]
    quick: bool,
    /// Rounds: every target is measured once per round (default 5, 1 with --quick).
    #[arg(long, value_name = "N")]
    rounds: Option<u32>,
    /// Fixed connection rate of the latency workload.
    #[arg(long, default_value_t = 1000.0, value_name = "PER_SECOND")]
    latency_rate: f64,
    /// Run only this section (`fleet`: 8 nodes following a 1-member etcd, see bench/fleet.rs; `udp`: the UDP datagram
    /// rate and round trip, see bench/udp.rs, written to udp.json and udp.md; `scale` and
    /// `cost`: those sections of the main report, written to results.md without `--check`,
    /// since the other goals read "not measured").
    #[arg(long, value_enum, value_name = "SECTION")]
    only: Option<Section>,
}

/// A section `--only` can run alone.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    /// Weight-change propagation, 1 000 services and idle CPU of a fleet of 8 nodes.
    Fleet,
    /// The UDP datagram rate and round trip: direct, tcpshift and nftables DNAT.
    Udp,
    /// (e) 1 to 10 000 services: cost per connection and kernel memory per service.
    Scale,
    /// tcpshift's BPF time per connection: signals on/off, balancing modes, limits.
    Cost,
}

/// Seconds of each UDP measurement.
fn udp_secs(quick: bool) -> f64 {
    if quick { 1.0 } else { 5.0 }
}

/// Service ports of the targets (direct goes to the backends themselves).
const TCPSHIFT_PORT: u16 = 31400;
const NFT_PORT: u16 = 31401;
const HAPROXY_PORT: u16 = 31402;
const NGINX_PORT: u16 = 31403;
/// Scale runs: services on 20000.., backends (one tcp-echo) on 9101..9116.
const SCALE_FIRST_PORT: u16 = 20000;
const SCALE_BACKEND_PORT: u16 = 9101;
/// The run stops after this many failed measurements.
const MAX_FAILURES: usize = 10;

/// One compared target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The baseline: the client itself picks v1 or v2 at 80/20 (the same two backends as
    /// every other target, no steering at all).
    Direct,
    /// Every connection straight to v1 (one backend: a secondary row).
    DirectV1,
    Tcpshift,
    Nftables,
    Haproxy,
    Nginx,
}

impl Target {
    const ALL: [Target; 6] = [
        Target::Direct,
        Target::DirectV1,
        Target::Tcpshift,
        Target::Nftables,
        Target::Haproxy,
        Target::Nginx,
    ];

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::DirectV1 => "direct-v1",
            Target::Tcpshift => "tcpshift",
            Target::Nftables => "nftables",
            Target::Haproxy => "haproxy",
            Target::Nginx => "nginx",
        }
    }

    fn addr(self) -> String {
        match self {
            Target::Direct => format!("{}*80,{}*20", peers::V1, peers::V2),
            Target::DirectV1 => peers::V1.to_string(),
            Target::Tcpshift => format!("127.0.0.1:{TCPSHIFT_PORT}"),
            Target::Nftables => format!("127.0.0.1:{NFT_PORT}"),
            Target::Haproxy => format!("127.0.0.1:{HAPROXY_PORT}"),
            Target::Nginx => format!("127.0.0.1:{NGINX_PORT}"),
        }
    }
}

/// One workload of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// (a) connection rate with this many clients.
    Rate(usize),
    /// (b) latency at the fixed rate.
    Latency,
    /// (c) bulk throughput.
    Bulk,
    /// (d) split accuracy.
    Split,
}

impl Workload {
    fn name(self) -> String {
        match self {
            Workload::Rate(c) => format!("connection rate, {c} clients"),
            Workload::Latency => "latency".into(),
            Workload::Bulk => "bulk".into(),
            Workload::Split => "split".into(),
        }
    }
}

/// The targets, starting with the `first`-th (modulo their number).
fn rotated(first: usize) -> Vec<Target> {
    let n = Target::ALL.len();
    (0..n).map(|i| Target::ALL[(first + i) % n]).collect()
}

/// The labels of one measurement of `target` in round `round`, for `tcpshift-load`.
fn target_labels(target: Target, round: u32) -> Vec<String> {
    ["--target", target.name(), "--round", &round.to_string()]
        .map(str::to_string)
        .to_vec()
}

/// Prints a progress line with the time since the benchmark started.
fn step(msg: impl std::fmt::Display) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    say(format_args!("[{t:6.1} s] {msg}"));
}

/// How much of everything to measure.
#[derive(Debug, Clone)]
struct Plan {
    rounds: u32,
    concurrencies: Vec<usize>,
    warmup: f64,
    duration: f64,
    latency_rate: f64,
    latency_duration: f64,
    bulk_connections: usize,
    bulk_duration: f64,
    split_connections: u64,
    scale_services: Vec<u32>,
    scale_subsets: Vec<u32>,
    scale_rounds: u32,
    scale_concurrency: usize,
    flips: usize,
    /// Seconds of each UDP measurement (bench/udp.rs).
    udp_secs: f64,
}

impl Plan {
    fn new(args: &BenchArgs) -> Result<Plan> {
        if !(args.latency_rate > 0.0 && args.latency_rate <= 100_000.0) {
            bail!("--latency-rate must be in (0, 100000]");
        }
        let plan = if args.quick {
            Plan {
                rounds: args.rounds.unwrap_or(1),
                concurrencies: vec![4],
                warmup: 0.1,
                duration: 0.3,
                latency_rate: args.latency_rate,
                latency_duration: 0.5,
                bulk_connections: 2,
                bulk_duration: 0.3,
                split_connections: 2_000,
                scale_services: vec![1, 100, 10_000],
                scale_rounds: 1,
                scale_concurrency: 4,
                scale_subsets: vec![2, 16],
                flips: 3,
                udp_secs: udp_secs(true),
            }
        } else {
            let rounds = args.rounds.unwrap_or(5);
            Plan {
                rounds,
                concurrencies: vec![1, 4, 16, 64],
                warmup: 0.5,
                duration: 2.0,
                latency_rate: args.latency_rate,
                latency_duration: 4.0,
                bulk_connections: 2,
                bulk_duration: 2.0,
                split_connections: 10_000,
                scale_services: vec![1, 100, 10_000],
                scale_subsets: vec![2, 16],
                scale_rounds: rounds.min(3),
                scale_concurrency: 4,
                flips: 10,
                udp_secs: udp_secs(false),
            }
        };
        if plan.rounds == 0 || plan.rounds > 100 {
            bail!("--rounds must be between 1 and 100");
        }
        Ok(plan)
    }

    fn workloads(&self) -> Vec<Workload> {
        let mut w: Vec<Workload> = self
            .concurrencies
            .iter()
            .map(|&c| Workload::Rate(c))
            .collect();
        w.extend([Workload::Latency, Workload::Bulk, Workload::Split]);
        w
    }
}

/// Runs the benchmark (as root) and writes the report.
pub fn run(args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    if !cmd::is_root() {
        bail!(
            "the benchmark creates a network namespace and loads BPF programs: run it as root \
             (e.g. `sudo -E env PATH=\"$PATH\" cargo xtask bench`)"
        );
    }
    let plan = Plan::new(args)?;
    let bins = build(Profile::Release)?;
    if args.only == Some(Section::Fleet) {
        let out = fleet_out(args.quick)?;
        env::install_signal_handler()?;
        return fleet::run(&bins, &out, &fleet::FleetPlan::new(args.quick));
    }
    if args.only == Some(Section::Udp) {
        peers::ensure_packages()?;
        env::install_signal_handler()?;
        let out = cmd::target_dir()?
            .join("bench")
            .join(if args.quick { "quick" } else { "" });
        let logs = out.join("logs");
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("cannot create {}", logs.display()))?;
        let mut env = Env::create(&bins, &logs)?;
        let result = udp::run(&mut env, &out, plan.udp_secs);
        env.clean_up();
        result?;
        say(format_args!(
            "wrote {} and {} in {:.0} s",
            cmd::short(&out.join("udp.json")).display(),
            cmd::short(&out.join("udp.md")).display(),
            started.elapsed().as_secs_f64()
        ));
        return Ok(());
    }
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "--package",
        "tcpshift-bench",
        "--bin",
        "tcpshift-load",
    ]))?;
    let load = bins.join("tcpshift-load");
    peers::ensure_packages()?;
    peers::check_programs()?;
    env::install_signal_handler()?;

    let mut out = cmd::target_dir()?.join("bench");
    if args.quick {
        out = out.join("quick");
    }
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let raw = out.join("raw.jsonl");
    if raw.exists() {
        std::fs::remove_file(&raw).with_context(|| format!("cannot remove {}", raw.display()))?;
    }
    let machine = peers::machine();
    peers::write(
        &out.join("machine.json"),
        &serde_json::to_string_pretty(&machine)?,
    )?;
    say(format_args!(
        "machine: {} ({} cores), kernel {}, load average {}",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["loadavg"].as_str().unwrap_or("?")
    ));

    // Before anything is started in it: children inherit the cgroup.
    let cgroup = env::Cgroup::enter(&format!("tcpshift-bench-{}", std::process::id()));
    let mut bench = Bench {
        cpu: cgroup
            .as_ref()
            .map(|c| ["--cpu-cgroup".to_string(), c.path().display().to_string()]),
        env: Env::create(&bins, &logs)?,
        plan,
        load,
        out: out.clone(),
        raw: raw.clone(),
        failures: Vec::new(),
        only: args.only,
    };
    let measured = bench.measure();
    bench.env.clean_up();
    drop(cgroup);
    let failures = std::mem::take(&mut bench.failures);
    measured?;

    let mut command_line = if args.quick {
        "cargo xtask bench --quick".to_string()
    } else {
        let mut c = "cargo xtask bench".to_string();
        if let Some(r) = args.rounds {
            c.push_str(&format!(" --rounds {r}"));
        }
        c
    };
    let section = match args.only {
        Some(Section::Scale) => Some("scale"),
        Some(Section::Cost) => Some("cost"),
        _ => None,
    };
    if let Some(name) = section {
        command_line.push_str(&format!(" --only {name}"));
    }
    let mut report = std::process::Command::new(&bench.load);
    report
        .arg("report")
        .arg("--raw")
        .arg(&raw)
        .arg("--machine")
        .arg(out.join("machine.json"))
        .arg("--out-dir")
        .arg(&out)
        .arg("--command-line")
        .arg(&command_line);
    // One section alone leaves the other goals "not measured": check full runs only.
    if section.is_none() {
        report.arg("--check");
    }
    cmd::run(&mut report)?;
    say(format_args!(
        "wrote {}, {} and {} in {:.0} s",
        cmd::short(&out.join("results.json")).display(),
        cmd::short(&out.join("results.md")).display(),
        cmd::short(&out.join("chart.png")).display(),
        started.elapsed().as_secs_f64()
    ));
    if section.is_none() {
        fleet::run(&bins, &out, &fleet::FleetPlan::new(args.quick))?;
    }
    if !failures.is_empty() {
        bail!(
            "{} measurement(s) failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

/// Where the fleet section writes when it runs alone (beside the other results).
fn fleet_out(quick: bool) -> Result<PathBuf> {
    let mut out = cmd::target_dir()?.join("bench");
    if quick {
        out = out.join("quick");
    }
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok(out)
}

/// A running benchmark.
struct Bench {
    env: Env,
    /// `--cpu-cgroup DIR` for the measurements that report CPU time.
    cpu: Option<[String; 2]>,
    plan: Plan,
    load: PathBuf,
    out: PathBuf,
    raw: PathBuf,
    failures: Vec<String>,
    /// `--only scale` or `--only cost`: that section alone.
    only: Option<Section>,
}

impl Bench {
    /// Starts the backends and peers, then measures everything.
    fn measure(&mut self) -> Result<()> {
        self.start_servers()?;
        let main_config = self.out.join("tcpshift.yaml");
        peers::write(&main_config, &peers::tcpshift_yaml(TCPSHIFT_PORT, 80, 20))?;
        let nft_conf = self.out.join("nftables.conf");
        peers::write(&nft_conf, &peers::nftables_conf(NFT_PORT))?;
        if self.only == Some(Section::Scale) {
            return self.scale();
        }
        if self.only == Some(Section::Cost) {
            for round in 1..=self.plan.rounds {
                self.bpf_cost(&main_config, round)?;
                self.mode_cost(round)?;
            }
            return Ok(());
        }
        let workloads = self.plan.workloads();
        // Targets are interleaved within every round (with --quick too): each workload
        // measures every target back to back, so that a change of the machine's load over
        // the run hits all of them alike.
        for round in 1..=self.plan.rounds {
            for (wi, w) in workloads.iter().enumerate() {
                // A different target goes first each time, so that none is always measured
                // right after a setup.
                for target in rotated(round as usize - 1 + wi) {
                    self.with_target(target, &main_config, &nft_conf, |b| {
                        b.workload(*w, target, round)
                    })?;
                }
            }
            self.bpf_cost(&main_config, round)?;
            self.mode_cost(round)?;
        }
        self.scale()?;
        self.weight_change(&main_config)?;
        udp::run(&mut self.env, &self.out, self.plan.udp_secs)?;
        Ok(())
    }

    /// Sets `target` up (tcpshiftd, or the nftables table), runs `f`, and tears it down
    /// again, so that nothing of it stays in the path of the other targets.
    fn with_target(
        &mut self,
        target: Target,
        tcpshift_config: &Path,
        nft_conf: &Path,
        f: impl FnOnce(&mut Self) -> Result<()>,
    ) -> Result<()> {
        check_interrupted()?;
        self.env.check_alive()?;
        match target {
            Target::Tcpshift => self.env.tcpshift_up(tcpshift_config)?,
            Target::Nftables => {
                self.env
                    .run("nft", &["-f", &nft_conf.display().to_string()])?;
            }
            _ => {}
        }
        let result = f(self);
        match target {
            Target::Tcpshift => self.env.tcpshift_down()?,
            Target::Nftables => {
                self.env
                    .run("nft", &["delete", "table", "ip", "tcpshift_bench"])?;
                // Forget the tracked connections, so that the next nftables run starts from
                // an empty table (and never fills it).
                if let Err(e) = self.env.run("conntrack", &["-F"]) {
                    say(format_args!("warning: {e:#}"));
                }
            }
            _ => {}
        }
        result
    }

    fn start_servers(&mut self) -> Result<()> {
        let echo = self.env.bin("tcp-echo");
        for (name, port, prefix) in [("v1", 9001u16, "one"), ("v2", 9002, "two")] {
            let mut c = self.env.command(&echo);
            c.args(["--bind", "127.0.0.1", &port.to_string(), prefix]);
            self.env.start(
                &format!("tcp-echo {name}"),
                c,
                &format!("tcp-echo-{name}"),
                port,
            )?;
        }
        let ports: Vec<String> = (0..16)
            .map(|j| (SCALE_BACKEND_PORT + j).to_string())
            .collect();
        let mut c = self.env.command(&echo);
        c.args(["--bind", "127.0.0.1", &ports.join(","), "scale"]);
        self.env.start(
            "tcp-echo scale",
            c,
            "tcp-echo-scale",
            SCALE_BACKEND_PORT + 15,
        )?;

        let cfg = self.out.join("haproxy.cfg");
        peers::write(&cfg, &peers::haproxy_cfg(HAPROXY_PORT))?;
        let mut c = self.env.command("haproxy");
        c.arg("-db").arg("-f").arg(&cfg);
        self.env.start("haproxy", c, "haproxy", HAPROXY_PORT)?;

        let conf = self.out.join("nginx.conf");
        peers::write(&conf, &peers::nginx_conf(NGINX_PORT, &self.out))?;
        let mut c = self.env.command("nginx");
        c.arg("-e")
            .arg(self.out.join("logs/nginx-error.log"))
            .arg("-p")
            .arg(&self.out)
            .arg("-c")
            .arg(&conf);
        self.env.start("nginx", c, "nginx", NGINX_PORT)?;
        say("started tcp-echo v1 (9001), v2 (9002), scale (9101-9116), HAProxy, nginx");
        Ok(())
    }

    /// One workload against one target.
    fn workload(&mut self, w: Workload, target: Target, round: u32) -> Result<()> {
        let p = self.plan.clone();
        let mut labels = target_labels(target, round);
        if w != Workload::Split {
            labels.extend(self.cpu.iter().flatten().cloned());
        }
        let addr = target.addr();
        let (warmup, secs) = (p.warmup.to_string(), |s: f64| s.to_string());
        step(format_args!(
            "round {round}/{}: {} {}",
            p.rounds,
            target.name(),
            w.name()
        ));
        match w {
            Workload::Rate(c) => self.measure_one(
                &labels,
                &[
                    "rate",
                    "--addr",
                    &addr,
                    "--concurrency",
                    &c.to_string(),
                    "--warmup",
                    &warmup,
                    "--duration",
                    &secs(p.duration),
                ],
                p.warmup + p.duration,
            )?,
            Workload::Latency => self.measure_one(
                &labels,
                &[
                    "latency",
                    "--addr",
                    &addr,
                    "--rate",
                    &p.latency_rate.to_string(),
                    "--workers",
                    "16",
                    "--warmup",
                    &warmup,
                    "--duration",
                    &secs(p.latency_duration),
                ],
                p.warmup + p.latency_duration,
            )?,
            Workload::Bulk => self.measure_one(
                &labels,
                &[
                    "bulk",
                    "--addr",
                    &addr,
                    "--connections",
                    &p.bulk_connections.to_string(),
                    "--warmup",
                    &warmup,
                    "--duration",
                    &secs(p.bulk_duration),
                ],
                p.warmup + p.bulk_duration,
            )?,
            // direct-v1 goes to v1 only: its split says nothing.
            Workload::Split if target == Target::DirectV1 => true,
            Workload::Split => self.measure_one(
                &labels,
                &[
                    "split",
                    "--addr",
                    &addr,
                    "--connections",
                    &p.split_connections.to_string(),
                    "--concurrency",
                    "4",
                    "--expect-v2",
                    "20",
                ],
                p.split_connections as f64 / 500.0,
            )?,
        };
        Ok(())
    }

    /// BPF time per connection with tcpshift's failure signals on and off: tcpshiftd is
    /// started once per setting (off: its hidden measurement switch
    /// `--measure-without-signals`), back to back within the round, the first one
    /// alternating between rounds.
    fn bpf_cost(&mut self, config: &Path, round: u32) -> Result<()> {
        let p = self.plan.clone();
        let order = if round % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for signals in order {
            check_interrupted()?;
            self.env.check_alive()?;
            let setting = if signals { "on" } else { "off" };
            step(format_args!(
                "round {round}/{}: tcpshift BPF time per connection, signals {setting}",
                p.rounds
            ));
            let extra: &[&str] = if signals {
                &[]
            } else {
                &["--measure-without-signals"]
            };
            self.env.tcpshift_up_with(config, extra)?;
            self.bpf_time_then_down(round, "bpf-cost", ["--signals", setting])?;
        }
        Ok(())
    }

    /// One `tcpshift-load SUBCOMMAND` run (BPF time per connection) against the tcpshiftd
    /// just started, at the scale concurrency, labelled with the round; then tcpshiftd is
    /// stopped whatever the run gave, and the first failure is returned.
    fn bpf_time_then_down(
        &mut self,
        round: u32,
        subcommand: &str,
        [flag, value]: [&str; 2],
    ) -> Result<()> {
        let p = self.plan.clone();
        let result = self.measure_one(
            &target_labels(Target::Tcpshift, round),
            &[
                subcommand,
                "--addr",
                &Target::Tcpshift.addr(),
                "--concurrency",
                &p.scale_concurrency.to_string(),
                "--warmup",
                &p.warmup.to_string(),
                "--duration",
                &p.duration.to_string(),
                flag,
                value,
            ],
            p.warmup + p.duration,
        );
        let down = self.env.tcpshift_down();
        result?;
        down
    }

    /// BPF time per connection of the 80/20 service in each of [`peers::MODE_SETTINGS`] (the
    /// hash mode, source-IP affinity, round-robin, hash with connection limits far above the
    /// load): tcpshiftd started once per setting, back to back within the round, the first
    /// one rotating between rounds.
    fn mode_cost(&mut self, round: u32) -> Result<()> {
        let p = self.plan.clone();
        let n = peers::MODE_SETTINGS.len();
        for i in 0..n {
            let (setting, extra) = peers::MODE_SETTINGS[(i + round as usize - 1) % n];
            check_interrupted()?;
            self.env.check_alive()?;
            let config = self.out.join(format!("tcpshift-{setting}.yaml"));
            peers::write(&config, &peers::tcpshift_mode_yaml(TCPSHIFT_PORT, extra))?;
            step(format_args!(
                "round {round}/{}: tcpshift BPF time per connection, {setting}",
                p.rounds
            ));
            self.env.tcpshift_up(&config)?;
            self.bpf_time_then_down(round, "mode-cost", ["--setting", setting])?;
        }
        Ok(())
    }

    /// (e) tcpshift with 1 to 10 000 services. The map size alone: every size gets the same
    /// traffic (all connections to the first service's port, the same listeners), and the
    /// sizes are interleaved within each round (each is set up afresh per round: 10 000
    /// services × 16 subsets take a minute). The port-spread effect is measured apart: with
    /// the largest map, connections spread over every service's port as well.
    fn scale(&mut self) -> Result<()> {
        let p = self.plan.clone();
        let largest = p.scale_services.iter().copied().max().unwrap_or(0);
        for round in 1..=p.scale_rounds {
            let sizes = p.scale_services.len();
            for i in 0..sizes {
                let n = p.scale_services[(i + round as usize - 1) % sizes];
                for &s in &p.scale_subsets {
                    check_interrupted()?;
                    self.scale_one(n, s, round, n == largest)?;
                }
            }
        }
        Ok(())
    }

    /// One map size in one round: set up, measure on one port (and over all ports when
    /// `spread`), tear down.
    fn scale_one(&mut self, n: u32, s: u32, round: u32, spread: bool) -> Result<()> {
        let p = self.plan.clone();
        let path = self.out.join(format!("scale-{n}x{s}.yaml"));
        let changed = self.out.join(format!("scale-{n}x{s}-changed.yaml"));
        for (path, change) in [(&path, false), (&changed, true)] {
            if !path.exists() {
                peers::write(
                    path,
                    &peers::scale_yaml(n, s, SCALE_FIRST_PORT, SCALE_BACKEND_PORT, change),
                )?;
            }
        }
        let labels = |ports: Option<u32>| {
            let mut l: Vec<String> = [
                "--target",
                "tcpshift",
                "--round",
                &round.to_string(),
                "--services",
                &n.to_string(),
                "--subsets",
                &s.to_string(),
            ]
            .map(str::to_string)
            .to_vec();
            if let Some(ports) = ports {
                l.extend(["--ports".to_string(), ports.to_string()]);
            }
            l
        };
        let cpu: Vec<String> = self.cpu.iter().flatten().cloned().collect();
        step(format_args!(
            "scale, round {round}/{}: {n} services × {s} subsets: set up",
            p.scale_rounds
        ));
        self.env.load(
            &self.load,
            &["uninstall".to_string()],
            Duration::from_secs(60),
        )?;
        let populated = self.measure_one(
            &labels(None),
            &["populate", "--config", &path.display().to_string()],
            100.0,
        )?;
        if populated {
            let last = u32::from(SCALE_FIRST_PORT) + n - 1;
            let mut runs = vec![(1, format!("127.0.0.1:{SCALE_FIRST_PORT}"))];
            if spread && n > 1 {
                runs.push((n, format!("127.0.0.1:{SCALE_FIRST_PORT}-{last}")));
            }
            for (ports, addrs) in runs {
                step(format_args!(
                    "scale, round {round}/{}: {n} services × {s} subsets, traffic on {ports} \
                     port(s)",
                    p.scale_rounds
                ));
                let mut l = labels(Some(ports));
                l.extend(cpu.iter().cloned());
                self.measure_one(
                    &l,
                    &[
                        "rate",
                        "--addr",
                        &addrs,
                        "--concurrency",
                        &p.scale_concurrency.to_string(),
                        "--warmup",
                        &p.warmup.to_string(),
                        "--duration",
                        &p.duration.to_string(),
                        "--bpf-stats",
                    ],
                    p.warmup + p.duration,
                )?;
            }
            // Kernel memory (c): after one weight change of every service (and the traffic).
            step(format_args!(
                "scale, round {round}/{}: {n} services × {s} subsets: change every weight, \
                 read the kernel memory",
                p.scale_rounds
            ));
            self.measure_one(
                &labels(None),
                &["reweight", "--config", &changed.display().to_string()],
                100.0,
            )?;
        }
        self.env.load(
            &self.load,
            &["uninstall".to_string()],
            Duration::from_secs(60),
        )?;
        Ok(())
    }

    /// (f) Weight changes with tcpshiftd running, as in production.
    fn weight_change(&mut self, config: &Path) -> Result<()> {
        check_interrupted()?;
        step("weight change: 100/0 ⇄ 0/100 while clients connect");
        self.env.tcpshift_up(config)?;
        let ctl = self.env.bin("tcpshiftctl").display().to_string();
        let netns = self.env.path().display().to_string();
        let result = self.measure_one(
            &target_labels(Target::Tcpshift, 1),
            &[
                "weight-change",
                "--addr",
                &Target::Tcpshift.addr(),
                "--tcpshiftctl",
                &ctl,
                "--netns",
                &netns,
                "--iterations",
                &self.plan.flips.to_string(),
            ],
            self.plan.flips as f64 * 2.0,
        );
        let down = self.env.tcpshift_down();
        result?;
        down
    }

    /// Runs one measurement and appends its record to raw.jsonl; returns whether it
    /// succeeded. A failed measurement is noted and the run goes on, unless the user
    /// interrupted or too many failed.
    fn measure_one(
        &mut self,
        labels: &[String],
        args: &[&str],
        expected_secs: f64,
    ) -> Result<bool> {
        let mut all: Vec<String> = labels.to_vec();
        all.extend(args.iter().map(|a| a.to_string()));
        let timeout = Duration::from_secs_f64(expected_secs * 3.0 + 30.0);
        match self.env.load(&self.load, &all, timeout) {
            Ok(record) => {
                let mut f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.raw)
                    .with_context(|| format!("cannot open {}", self.raw.display()))?;
                writeln!(f, "{record}")
                    .with_context(|| format!("cannot write {}", self.raw.display()))?;
                Ok(true)
            }
            Err(e) => {
                check_interrupted()?;
                say(format_args!("warning: {e:#}"));
                self.failures.push(format!("{e:#}"));
                if self.failures.len() >= MAX_FAILURES {
                    bail!("{MAX_FAILURES} measurements failed; giving up");
                }
                Ok(false)
            }
        }
    }
}
