//! `tcpshift-load`: the load generator of `cargo xtask bench`. Each command runs one bounded
//! measurement in the current network namespace and prints one JSON record on stdout.

use std::{io::Write, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tcpshift_bench::{
    bpf_cost::{BpfCost, CostMeter},
    load::{self, Stop},
    memory,
    record::{Labels, Record},
    report,
    steer::{self, FlipParams, ProgStats},
};

/// Load generator for tcpshift's benchmark (run by `cargo xtask bench`).
///
/// Every workload is bounded in time or count and prints one JSON record on stdout. The
/// request/response workloads open a connection, send one line, read the echoed line
/// (`PREFIX line`, as tcp-echo answers) and close.
#[derive(Parser, Debug)]
#[command(
    name = "tcpshift-load",
    after_help = "Examples:\n  tcpshift-load rate --addr 127.0.0.1:9001 --concurrency 4 --duration 2\n  \
                  tcpshift-load split --addr 127.0.0.1:31400 --connections 10000\n  \
                  tcpshift-load report --raw target/bench/raw.jsonl --out-dir target/bench"
)]
struct Cli {
    #[command(flatten)]
    labels: LabelArgs,
    /// cgroup v2 directory holding every process of the benchmark: its CPU time over the
    /// measured window is reported per connection (rate, latency) or per MiB (bulk).
    #[arg(long, global = true, value_name = "DIR")]
    cpu_cgroup: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

/// Labels copied into the record.
#[derive(Args, Debug)]
struct LabelArgs {
    /// Target name recorded with the result (direct, tcpshift, nftables, haproxy, nginx).
    #[arg(long, global = true, default_value = "direct")]
    target: String,
    /// Round number recorded with the result.
    #[arg(long, global = true, default_value_t = 1)]
    round: u32,
    /// Services configured (scale runs), recorded with the result.
    #[arg(long, global = true)]
    services: Option<u32>,
    /// Subsets per service (scale runs), recorded with the result.
    #[arg(long, global = true)]
    subsets: Option<u32>,
    /// Service ports the load is spread over (scale runs), recorded with the result.
    #[arg(long, global = true)]
    ports: Option<u32>,
}

/// Where the load goes.
#[derive(Args, Debug)]
struct Addrs {
    /// Comma-separated IP:PORT or IP:FIRST-LAST, each optionally followed by *WEIGHT; each
    /// connection picks one at random, in proportion to the weights (default 1).
    #[arg(long, value_parser = parse_addr_list)]
    addr: AddrList,
}

/// The parsed `--addr` list.
#[derive(Debug, Clone)]
struct AddrList(Vec<SocketAddr>);

fn parse_addr_list(s: &str) -> Result<AddrList, String> {
    load::parse_addrs(s)
        .map(AddrList)
        .map_err(|e| format!("{e:#}"))
}

/// A measured window after a warm-up.
#[derive(Args, Debug)]
struct Window {
    /// Seconds measured.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
}

impl Window {
    fn durations(&self) -> Result<(Duration, Duration)> {
        let d = |s: f64, what: &str| {
            if !(0.0..=3600.0).contains(&s) {
                bail!("--{what} must be between 0 and 3600 seconds");
            }
            Ok(Duration::from_secs_f64(s))
        };
        Ok((d(self.warmup, "warmup")?, d(self.duration, "duration")?))
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// (a) Closed-loop connection rate: CONCURRENCY threads open connections back to back.
    Rate {
        #[command(flatten)]
        addrs: Addrs,
        /// Client threads.
        #[arg(long, short, default_value_t = 4)]
        concurrency: usize,
        #[command(flatten)]
        window: Window,
        /// Also measure the run time of tcpshift's sk_lookup program (kernel BPF statistics
        /// are enabled during the run).
        #[arg(long)]
        bpf_stats: bool,
    },
    /// (b) Latency at a fixed rate: connections scheduled RATE times a second.
    Latency {
        #[command(flatten)]
        addrs: Addrs,
        /// Connections per second.
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// Client threads (a scheduled connection waits for a free one).
        #[arg(long, default_value_t = 16)]
        workers: usize,
        #[command(flatten)]
        window: Window,
    },
    /// (c) Bulk throughput: long connections streaming lines, echo read back.
    Bulk {
        #[command(flatten)]
        addrs: Addrs,
        /// Long connections.
        #[arg(long, short, default_value_t = 2)]
        connections: usize,
        /// Bytes per line (with its newline).
        #[arg(long, default_value_t = 16 * 1024)]
        line_bytes: usize,
        #[command(flatten)]
        window: Window,
    },
    /// (d) Split accuracy: CONNECTIONS connections, counted per backend.
    Split {
        #[command(flatten)]
        addrs: Addrs,
        /// Connections in all.
        #[arg(long, default_value_t = 10_000)]
        connections: u64,
        /// Client threads.
        #[arg(long, short, default_value_t = 4)]
        concurrency: usize,
        /// The configured share of the second subset, in percent (recorded for the report).
        #[arg(long, default_value_t = 20.0)]
        expect_v2: f64,
    },
    /// (e) Install tcpshift here with CONFIG and register every subset's socket.
    Populate {
        /// tcpshift YAML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// (e) After `populate`: apply CONFIG (the same services with other weights: one weight
    /// change of every service), then read the kernel memory of every pinned map.
    Reweight {
        /// tcpshift YAML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the kernel memory of every pinned map of this namespace's tcpshift state (JSON).
    Memory,
    /// Remove tcpshift from this network namespace.
    Uninstall,
    /// (f) Weight-change latency: flip a two-subset service between 100/0 and 0/100.
    WeightChange {
        /// Service address.
        #[arg(long)]
        addr: SocketAddr,
        /// Service name.
        #[arg(long, default_value = "tcp-echo")]
        service: String,
        /// First subset and its backend's prefix, SUBSET=PREFIX.
        #[arg(long, default_value = "v1=one", value_parser = subset_prefix)]
        a: (String, String),
        /// Second subset and its backend's prefix, SUBSET=PREFIX.
        #[arg(long, default_value = "v2=two", value_parser = subset_prefix)]
        b: (String, String),
        /// tcpshiftctl binary.
        #[arg(long)]
        tcpshiftctl: PathBuf,
        /// Network namespace passed to tcpshiftctl.
        #[arg(long)]
        netns: Option<PathBuf>,
        /// Changes of each kind (CLI and library).
        #[arg(long, default_value_t = 10)]
        iterations: usize,
        /// Probing client threads.
        #[arg(long, default_value_t = 2)]
        probes: usize,
    },
    /// BPF time per connection: a connection rate run with the run time of tcpshift's
    /// sk_lookup and sock_ops programs (kernel BPF statistics are enabled during the run).
    BpfCost {
        #[command(flatten)]
        addrs: Addrs,
        /// Client threads.
        #[arg(long, short, default_value_t = 4)]
        concurrency: usize,
        #[command(flatten)]
        window: Window,
        /// Recorded with the result: whether tcpshiftd runs with its failure signals
        /// (`off`: started with `--measure-without-signals`).
        #[arg(long, value_parser = ["on", "off"], default_value = "on")]
        signals: String,
    },
    /// BPF time per connection of one balancing setting: like `bpf-cost`, recorded with
    /// the setting tcpshiftd was started with.
    ModeCost {
        #[command(flatten)]
        addrs: Addrs,
        /// Client threads.
        #[arg(long, short, default_value_t = 4)]
        concurrency: usize,
        #[command(flatten)]
        window: Window,
        /// Recorded with the result: the service's setting.
        #[arg(long, value_parser = ["hash", "source-ip", "round-robin", "limits"])]
        setting: String,
    },
    /// Summarise raw.jsonl: print the table, write results.json, results.md and chart.png.
    Report {
        /// Records, one JSON object per line.
        #[arg(long)]
        raw: PathBuf,
        /// Machine description (JSON object) to include.
        #[arg(long)]
        machine: Option<PathBuf>,
        /// Directory for results.json, results.md and chart.png.
        #[arg(long)]
        out_dir: PathBuf,
        /// TrueType font for the chart's text.
        #[arg(long, default_value = report::DEFAULT_FONT)]
        font: PathBuf,
        /// The command line that produced the records (shown in the report).
        #[arg(long, default_value = "cargo xtask bench")]
        command_line: String,
        /// Exit with an error when the run had problems (failed connections, a backend
        /// never reached, a weight change no connection followed).
        #[arg(long)]
        check: bool,
    },
}

fn subset_prefix(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .ok_or_else(|| format!("{s:?}: expected SUBSET=PREFIX"))
}

fn addrs(a: Addrs) -> Result<Vec<SocketAddr>> {
    Ok(a.addr.0)
}

/// A closed-loop connection-rate run over `window` with the BPF programs' time metered over
/// the same measured window (the `bpf-cost` and `mode-cost` subcommands).
fn metered_rate(
    a: Addrs,
    concurrency: usize,
    window: &Window,
) -> Result<(load::RateResult, Option<BpfCost>)> {
    let (warmup, measure) = window.durations()?;
    let mut cost = CostMeter::new()?;
    let result = load::rate(
        &addrs(a)?,
        concurrency,
        Stop::Duration { warmup, measure },
        &mut |edge| cost.edge(edge),
    )?;
    Ok((result, cost.result()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcpshift-load: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let labels = Labels {
        target: cli.labels.target,
        round: cli.labels.round,
        services: cli.labels.services,
        subsets: cli.labels.subsets,
        ports: cli.labels.ports,
    };
    let mut meter = cli
        .cpu_cgroup
        .as_deref()
        .map(load::CpuMeter::new)
        .transpose()?;
    let record = match cli.command {
        Cmd::Rate {
            addrs: a,
            concurrency,
            window,
            bpf_stats,
        } => {
            let (warmup, measure) = window.durations()?;
            let addrs = addrs(a)?;
            let mut stats = if bpf_stats {
                Some(ProgStats::new()?)
            } else {
                None
            };
            let result = load::rate(
                &addrs,
                concurrency,
                Stop::Duration { warmup, measure },
                &mut |edge| {
                    if let Some(s) = stats.as_mut() {
                        s.edge(edge);
                    }
                    if let Some(m) = meter.as_mut() {
                        m.edge(edge);
                    }
                },
            )?;
            Record::Rate {
                labels,
                concurrency,
                cpu: meter.and_then(|m| m.result(result.connections as f64)),
                result,
                bpf: stats.and_then(|s| s.result()),
            }
        }
        Cmd::BpfCost {
            addrs: a,
            concurrency,
            window,
            signals,
        } => {
            let (result, bpf) = metered_rate(a, concurrency, &window)?;
            Record::BpfCost {
                labels,
                signals: signals == "on",
                concurrency,
                result,
                bpf,
            }
        }
        Cmd::ModeCost {
            addrs: a,
            concurrency,
            window,
            setting,
        } => {
            let (result, bpf) = metered_rate(a, concurrency, &window)?;
            Record::ModeCost {
                labels,
                setting,
                concurrency,
                result,
                bpf,
            }
        }
        Cmd::Latency {
            addrs: a,
            rate,
            workers,
            window,
        } => {
            let (warmup, measure) = window.durations()?;
            let result = load::paced(&addrs(a)?, rate, workers, warmup, measure, &mut |e| {
                if let Some(m) = meter.as_mut() {
                    m.edge(e);
                }
            })?;
            Record::Latency {
                labels,
                workers,
                cpu: meter.and_then(|m| m.result(result.connections as f64)),
                result,
            }
        }
        Cmd::Bulk {
            addrs: a,
            connections,
            line_bytes,
            window,
        } => {
            let (warmup, measure) = window.durations()?;
            let result = load::bulk(
                &addrs(a)?,
                connections,
                line_bytes,
                warmup,
                measure,
                &mut |e| {
                    if let Some(m) = meter.as_mut() {
                        m.edge(e);
                    }
                },
            )?;
            Record::Bulk {
                labels,
                connections,
                line_bytes,
                cpu: meter.and_then(|m| m.result(result.bytes as f64 / (1024.0 * 1024.0))),
                result,
            }
        }
        Cmd::Split {
            addrs: a,
            connections,
            concurrency,
            expect_v2,
        } => {
            let result = load::rate(
                &addrs(a)?,
                concurrency,
                Stop::Count(connections),
                &mut |_| {},
            )?;
            Record::Split {
                labels,
                concurrency,
                expected_v2_percent: expect_v2,
                result,
            }
        }
        Cmd::Populate { config } => Record::Populate {
            labels,
            result: steer::populate(&config)
                .with_context(|| format!("cannot set up tcpshift with {}", config.display()))?,
        },
        Cmd::Reweight { config } => Record::Reweight {
            labels,
            result: steer::reweight(&config)
                .with_context(|| format!("cannot apply {}", config.display()))?,
        },
        Cmd::Memory => {
            let m = memory::read_current()?;
            let mut out = std::io::stdout().lock();
            serde_json::to_writer(&mut out, &m).context("cannot write the reading")?;
            writeln!(out).context("cannot write the reading")?;
            return Ok(());
        }
        Cmd::Uninstall => {
            steer::uninstall()?;
            return Ok(());
        }
        Cmd::WeightChange {
            addr,
            service,
            a,
            b,
            tcpshiftctl,
            netns,
            iterations,
            probes,
        } => Record::WeightChange {
            labels,
            samples: steer::weight_change(&FlipParams {
                addr,
                service,
                a,
                b,
                tcpshiftctl,
                netns,
                iterations,
                probes,
            })?,
        },
        Cmd::Report {
            raw,
            machine,
            out_dir,
            font,
            command_line,
            check,
        } => {
            return report::run(&report::Inputs {
                raw,
                machine,
                out_dir,
                font,
                command_line,
                check,
            });
        }
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &record).context("cannot write the record")?;
    writeln!(out).context("cannot write the record")?;
    Ok(())
}
