//! Summarises the records of one benchmark run: ratios to `direct` within each round,
//! min/median/max over rounds, the goals of the benchmark, the Markdown table,
//! `results.json` and the chart.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::{
    record::{Labels, Record},
    stats::Spread,
};

mod bpf_cost;
mod chart;
mod memory;
mod mode_cost;

pub use bpf_cost::BpfCostRow;
pub use memory::{MapRow, MemoryRow, MemorySummary};
pub use mode_cost::ModeCostRow;

/// The font the chart uses by default (Debian's fonts-dejavu-core).
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The baseline every ratio is taken against.
pub const BASELINE: &str = "direct";

/// What [`run`] reads and where it writes.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Records, one JSON object per line.
    pub raw: PathBuf,
    /// Machine description (a JSON object), if any.
    pub machine: Option<PathBuf>,
    /// Where results.json, results.md and chart.png go.
    pub out_dir: PathBuf,
    /// TrueType font for the chart.
    pub font: PathBuf,
    /// The command that produced the records.
    pub command_line: String,
    /// Fail when the summary lists problems (connection errors, a missing backend, stale
    /// connections after a weight change).
    pub check: bool,
}

/// Reads the records, writes `results.json`, `results.md` and `chart.png` into the output
/// directory and prints the Markdown report.
pub fn run(inputs: &Inputs) -> Result<()> {
    let text = std::fs::read_to_string(&inputs.raw)
        .with_context(|| format!("cannot read {}", inputs.raw.display()))?;
    let records =
        parse_records(&text).with_context(|| format!("cannot parse {}", inputs.raw.display()))?;
    let machine: Value = match &inputs.machine {
        Some(p) => serde_json::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("{} is not JSON", p.display()))?,
        None => Value::Null,
    };
    let summary = summarise(&records);
    let markdown = markdown(&summary, &machine, &inputs.command_line);
    std::fs::create_dir_all(&inputs.out_dir)
        .with_context(|| format!("cannot create {}", inputs.out_dir.display()))?;
    let json = serde_json::json!({
        "schema": 1,
        "command": inputs.command_line,
        "machine": machine,
        "summary": summary,
        "records": records,
    });
    write(
        &inputs.out_dir.join("results.json"),
        &serde_json::to_string_pretty(&json)?,
    )?;
    write(&inputs.out_dir.join("results.md"), &markdown)?;
    let png = inputs.out_dir.join("chart.png");
    // `--only scale` / `--only cost` have no rate or latency to draw.
    if !summary.rate.is_empty() && !summary.latency.is_empty() {
        chart::draw(&summary, &machine, &inputs.font, &png)
            .with_context(|| format!("cannot draw {}", png.display()))?;
    }
    print!("{markdown}");
    if inputs.check && !summary.problems.is_empty() {
        anyhow::bail!(
            "the benchmark found {} problem(s):\n  {}",
            summary.problems.len(),
            summary.problems.join("\n  ")
        );
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Parses one record per non-empty line.
pub fn parse_records(text: &str) -> Result<Vec<Record>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("line {}", i + 1)))
        .collect()
}

/// A figure with its spread over rounds and, where there is a baseline, its ratio to the
/// baseline of the same round (spread over rounds too).
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// The figure itself.
    pub value: Spread,
    /// The figure divided by the baseline's in the same round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<Spread>,
}

/// Connection rate of one target.
#[derive(Debug, Clone, Serialize)]
pub struct RateRow {
    /// Target.
    pub target: String,
    /// Connections per second by concurrency.
    pub by_concurrency: BTreeMap<usize, Figure>,
    /// The best concurrency's rate in each round.
    pub peak: Option<Figure>,
    /// CPU microseconds of all benchmark processes per connection, by concurrency.
    pub cpu_us: BTreeMap<usize, Figure>,
    /// CPUs the benchmark's processes kept busy on average, by concurrency.
    pub cores: BTreeMap<usize, Spread>,
    /// Failed connections over all rounds.
    pub errors: u64,
}

/// Latency at a fixed rate of one target.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyRow {
    /// Target.
    pub target: String,
    /// Connections per second offered.
    pub offered_rate: f64,
    /// Median, from the scheduled start, µs.
    pub p50_us: Figure,
    /// 99th percentile, µs.
    pub p99_us: Figure,
    /// 99.9th percentile, µs.
    pub p999_us: Figure,
    /// CPU microseconds of all benchmark processes per connection.
    pub cpu_us: Option<Figure>,
    /// Connections that started more than 1 ms late, over all rounds.
    pub late: u64,
    /// Failed connections over all rounds.
    pub errors: u64,
}

/// Bulk throughput of one target.
#[derive(Debug, Clone, Serialize)]
pub struct BulkRow {
    /// Target.
    pub target: String,
    /// Echoed MiB/s.
    pub mib_per_s: Figure,
    /// CPU microseconds of all benchmark processes per echoed MiB.
    pub cpu_us_per_mib: Option<Figure>,
    /// Failed connections over all rounds (an echo that differed from what was sent counts).
    pub errors: u64,
    /// Whether every measured echoed byte was checked against what was sent.
    pub echo_verified: bool,
}

/// Split accuracy of one target: each round counts its own connections.
#[derive(Debug, Clone, Serialize)]
pub struct SplitRow {
    /// Target.
    pub target: String,
    /// Connections counted per round (the smallest round).
    pub connections: u64,
    /// Replies per backend prefix, all rounds together.
    pub prefixes: BTreeMap<String, u64>,
    /// The second backend's observed share per round, percent.
    pub v2_percent: Spread,
    /// Its configured share, percent.
    pub expected_v2_percent: f64,
    /// |observed − configured| per round, percentage points.
    pub error_points: Spread,
}

/// Per-connection cost with a map of a given size (tcpshift only).
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    /// Services configured.
    pub services: u32,
    /// Subsets per service.
    pub subsets: u32,
    /// Service ports the connections went to: 1 for the map-size comparison (the same port
    /// and listeners whatever the number of services), more for the port-spread row.
    pub ports: u32,
    /// Connections per second (closed loop); `None` when no round measured any.
    pub rate: Option<Spread>,
    /// Cost per connection, µs: CPU time of all benchmark processes when measured
    /// (`cost_from_cpu`), else the wall time per connection (1 / rate).
    pub us_per_connection: Option<Spread>,
    /// Whether `us_per_connection` is CPU time (else wall time).
    pub cost_from_cpu: bool,
    /// Cost relative to one service with the same subsets and the same ports, same round.
    pub cost_vs_one_service: Option<Spread>,
    /// For a port-spread row: cost relative to the same map with the traffic on one port.
    pub cost_vs_one_port: Option<Spread>,
    /// The sk_lookup program's mean run time, ns.
    pub bpf_ns_per_run: Option<Spread>,
    /// Writing all services (ms).
    pub apply_ms: Option<Spread>,
    /// Registering all sockets (ms).
    pub register_ms: Option<Spread>,
}

/// Weight-change timings of one kind of change.
#[derive(Debug, Clone, Serialize)]
pub struct FlipRow {
    /// `cli` or `library`.
    pub how: String,
    /// Changes measured.
    pub changes: usize,
    /// Duration of the change, µs.
    pub update_us: Spread,
    /// From the change returning to the first connection on the new subset, µs.
    pub first_follow_us: Option<Spread>,
    /// Connections started after a change returned that went to the old subset (all changes).
    pub stale_after: u64,
    /// Connections started after the changes returned (all changes).
    pub after: u64,
    /// Connections on the old subset whose connect was under way when a change returned
    /// (SYNs in flight at the flip; all changes).
    pub in_flight_old: u64,
    /// Connections on the old subset that finished their handshake after a change returned,
    /// with their timing and whether their SYN was in flight at the flip.
    pub old_subset: Vec<crate::steer::OldSubsetConnection>,
}

/// One goal of the benchmark and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    /// What is compared.
    pub name: String,
    /// The goal, e.g. `≥ 0.95`.
    pub goal: String,
    /// The measured value (median over rounds of the per-round ratio, or a share).
    pub measured: Option<f64>,
    /// How the value reads, e.g. `0.97 (0.95–0.99)`.
    pub shown: String,
    /// Whether it is met.
    pub met: bool,
}

/// Everything the report shows.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Targets in the order they were measured.
    pub targets: Vec<String>,
    /// Rounds measured.
    pub rounds: u32,
    /// (a) connection rate.
    pub rate: Vec<RateRow>,
    /// (b) latency at a fixed rate.
    pub latency: Vec<LatencyRow>,
    /// (c) bulk throughput.
    pub bulk: Vec<BulkRow>,
    /// (d) split accuracy.
    pub split: Vec<SplitRow>,
    /// (e) scale.
    pub scale: Vec<ScaleRow>,
    /// (f) weight changes.
    pub weight_change: Vec<FlipRow>,
    /// tcpshift's peak connection rate divided by HAProxy's, same round.
    pub tcpshift_vs_haproxy: Option<Spread>,
    /// direct's peak connection rate divided by HAProxy's, same round: the bound of the
    /// previous ratio for a target that adds no work at all.
    pub direct_vs_haproxy: Option<Spread>,
    /// The goals.
    pub goals: Vec<Goal>,
    /// What went wrong, whatever the speed: connection errors, a backend that never
    /// answered, a weight change no connection followed.
    pub problems: Vec<String>,
    /// Findings that do not fail the run (see [`warnings`]).
    pub warnings: Vec<String>,
    /// BPF time per connection with the failure signals on and off (`None`: not run).
    pub bpf_cost: Option<BpfCostRow>,
    /// BPF time per connection of the balancing modes and of connection limits (empty: not
    /// run).
    pub mode_cost: Vec<ModeCostRow>,
    /// Kernel memory per service in the scale runs.
    pub memory: MemorySummary,
}

/// Values of one figure per round, for one target.
type PerRound = BTreeMap<u32, f64>;

/// The spread of `values` and of their ratio to `base` in the same rounds.
fn figure(values: &PerRound, base: Option<&PerRound>) -> Option<Figure> {
    let value = Spread::of(values.values().copied())?;
    let ratio = base.and_then(|b| {
        Spread::of(
            values
                .iter()
                .filter_map(|(round, v)| b.get(round).filter(|&&d| d > 0.0).map(|d| v / d)),
        )
    });
    Some(Figure { value, ratio })
}

fn is_main(l: &Labels) -> bool {
    l.services.is_none() && l.subsets.is_none()
}

/// Computes the summary of a run's records.
pub fn summarise(records: &[Record]) -> Summary {
    let mut targets: Vec<String> = Vec::new();
    for r in records {
        let l = r.labels();
        if is_main(l) && !targets.contains(&l.target) {
            targets.push(l.target.clone());
        }
    }
    let rounds = records.iter().map(|r| r.labels().round).max().unwrap_or(0);

    // (a) rate: target -> concurrency -> round -> rate.
    let mut rates: BTreeMap<&str, BTreeMap<usize, PerRound>> = BTreeMap::new();
    let mut rate_errors: BTreeMap<&str, u64> = BTreeMap::new();
    let mut rate_cpu: BTreeMap<&str, BTreeMap<usize, PerRound>> = BTreeMap::new();
    let mut rate_cores: BTreeMap<&str, BTreeMap<usize, PerRound>> = BTreeMap::new();
    let mut lat_cpu: BTreeMap<&str, PerRound> = BTreeMap::new();
    let mut bulk_cpu: BTreeMap<&str, PerRound> = BTreeMap::new();
    // (b) latency: target -> (p50, p99, p999) per round.
    let mut lat: BTreeMap<&str, [PerRound; 3]> = BTreeMap::new();
    let mut lat_extra: BTreeMap<&str, (f64, u64, u64)> = BTreeMap::new();
    // (c) bulk.
    let mut bulk: BTreeMap<&str, PerRound> = BTreeMap::new();
    // Errors, bytes measured, bytes whose echo was checked.
    let mut bulk_errors: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
    // (d) split: per round (connections, v2 share), prefixes summed, expected share.
    type SplitAcc = (Vec<(u64, f64)>, BTreeMap<String, u64>, f64);
    let mut split: BTreeMap<&str, SplitAcc> = BTreeMap::new();
    // (e) scale: (services, subsets, ports) -> per-round rate, bpf, cpu; populate by
    // (services, subsets) -> per-round apply, register.
    type ScaleAcc = (PerRound, PerRound, PerRound);
    let mut scale: BTreeMap<(u32, u32, u32), ScaleAcc> = BTreeMap::new();
    let mut populated: BTreeMap<(u32, u32), (PerRound, PerRound)> = BTreeMap::new();
    // (f) flips by kind.
    let mut flips: BTreeMap<String, Vec<crate::steer::FlipSample>> = BTreeMap::new();
    let mut bpf_cost = bpf_cost::Acc::default();
    let mut mode_cost = mode_cost::Acc::default();
    let mut memory = memory::Acc::default();

    for r in records {
        match r {
            Record::Rate {
                labels,
                concurrency,
                result,
                bpf,
                cpu,
            } => {
                if let (Some(n), Some(s)) = (labels.services, labels.subsets) {
                    // Records of the previous method spread the load over every service.
                    let ports = labels.ports.unwrap_or(n);
                    let acc = scale.entry((n, s, ports)).or_default();
                    if result.connections > 0 {
                        acc.0.insert(labels.round, result.rate);
                    }
                    if let Some(b) = bpf {
                        acc.1.insert(labels.round, b.ns_per_run);
                    }
                    if let Some(c) = cpu.filter(|_| result.connections > 0) {
                        acc.2.insert(labels.round, c.per_unit_us);
                    }
                } else {
                    let by_round = rates
                        .entry(&labels.target)
                        .or_default()
                        .entry(*concurrency)
                        .or_default();
                    if result.connections > 0 {
                        by_round.insert(labels.round, result.rate);
                    }
                    *rate_errors.entry(&labels.target).or_default() += result.errors;
                    if let Some(c) = cpu {
                        rate_cpu
                            .entry(&labels.target)
                            .or_default()
                            .entry(*concurrency)
                            .or_default()
                            .insert(labels.round, c.per_unit_us);
                        rate_cores
                            .entry(&labels.target)
                            .or_default()
                            .entry(*concurrency)
                            .or_default()
                            .insert(labels.round, c.cores);
                    }
                }
            }
            Record::Latency {
                labels,
                result,
                cpu,
                ..
            } => {
                if let Some(c) = cpu {
                    lat_cpu
                        .entry(&labels.target)
                        .or_default()
                        .insert(labels.round, c.per_unit_us);
                }
                // No sample is no latency (not 0 µs): the round is left out.
                if result.response.samples > 0 {
                    let e = lat.entry(&labels.target).or_default();
                    e[0].insert(labels.round, result.response.p50_us);
                    e[1].insert(labels.round, result.response.p99_us);
                    e[2].insert(labels.round, result.response.p999_us);
                }
                let x = lat_extra.entry(&labels.target).or_default();
                x.0 = result.offered_rate;
                x.1 += result.late;
                x.2 += result.errors;
            }
            Record::Bulk {
                labels,
                result,
                cpu,
                ..
            } => {
                if let Some(c) = cpu {
                    bulk_cpu
                        .entry(&labels.target)
                        .or_default()
                        .insert(labels.round, c.per_unit_us);
                }
                if result.bytes > 0 {
                    bulk.entry(&labels.target)
                        .or_default()
                        .insert(labels.round, result.mib_per_s);
                }
                let e = bulk_errors.entry(&labels.target).or_default();
                e.0 += result.errors;
                e.1 += result.bytes;
                e.2 += result.verified_bytes;
            }
            Record::Split {
                labels,
                expected_v2_percent,
                result,
                ..
            } => {
                let e = split.entry(&labels.target).or_default();
                for (p, n) in &result.prefixes {
                    *e.1.entry(p.clone()).or_default() += n;
                }
                let total: u64 = result.prefixes.values().sum();
                // The second backend answers "two" in the benchmark's setup.
                let v2 = result.prefixes.get("two").copied().unwrap_or(0);
                if total > 0 {
                    e.0.push((total, 100.0 * v2 as f64 / total as f64));
                }
                e.2 = *expected_v2_percent;
            }
            Record::Populate { labels, result } => {
                memory.populated(
                    labels,
                    result.memory_installed.as_ref(),
                    result.memory_populated.as_ref(),
                );
                if let (Some(n), Some(s)) = (labels.services, labels.subsets) {
                    let acc = populated.entry((n, s)).or_default();
                    acc.0.insert(labels.round, result.apply_ms);
                    acc.1.insert(labels.round, result.register_ms);
                }
            }
            Record::BpfCost {
                labels,
                signals,
                result,
                bpf,
                ..
            } => bpf_cost.add(labels, *signals, result, *bpf),
            Record::ModeCost {
                labels,
                setting,
                result,
                bpf,
                ..
            } => mode_cost.add(labels, setting, result, *bpf),
            Record::Reweight { labels, result } => memory.changed(labels, &result.memory),
            Record::WeightChange { samples, .. } => {
                for s in samples {
                    flips.entry(s.how.clone()).or_default().push(s.clone());
                }
            }
        }
    }

    let order = |has: &dyn Fn(&str) -> bool| -> Vec<String> {
        targets.iter().filter(|t| has(t)).cloned().collect()
    };

    // (a)
    let peaks: BTreeMap<&str, PerRound> = rates
        .iter()
        .map(|(t, by_c)| {
            let mut peak = PerRound::new();
            for per_round in by_c.values() {
                for (round, v) in per_round {
                    let e = peak.entry(*round).or_insert(0.0);
                    *e = e.max(*v);
                }
            }
            (*t, peak)
        })
        .collect();
    let rate_rows: Vec<RateRow> = order(&|t| rates.contains_key(t))
        .into_iter()
        .map(|t| {
            let by_c = &rates[t.as_str()];
            let base = rates.get(BASELINE);
            RateRow {
                by_concurrency: by_c
                    .iter()
                    .filter_map(|(c, v)| Some((*c, figure(v, base.and_then(|b| b.get(c)))?)))
                    .collect(),
                peak: figure(&peaks[t.as_str()], peaks.get(BASELINE)),
                cpu_us: rate_cpu
                    .get(t.as_str())
                    .map(|by_c| {
                        by_c.iter()
                            .filter_map(|(c, v)| {
                                let base = rate_cpu.get(BASELINE).and_then(|b| b.get(c));
                                Some((*c, figure(v, base)?))
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                cores: rate_cores
                    .get(t.as_str())
                    .map(|by_c| {
                        by_c.iter()
                            .filter_map(|(c, v)| Some((*c, Spread::of(v.values().copied())?)))
                            .collect()
                    })
                    .unwrap_or_default(),
                errors: rate_errors.get(t.as_str()).copied().unwrap_or(0),
                target: t,
            }
        })
        .collect();

    // (b)
    let latency_rows: Vec<LatencyRow> = order(&|t| lat.contains_key(t))
        .into_iter()
        .filter_map(|t| {
            let v = &lat[t.as_str()];
            let b = lat.get(BASELINE);
            let (offered, late, errors) = lat_extra.get(t.as_str()).copied().unwrap_or_default();
            Some(LatencyRow {
                offered_rate: offered,
                p50_us: figure(&v[0], b.map(|b| &b[0]))?,
                p99_us: figure(&v[1], b.map(|b| &b[1]))?,
                p999_us: figure(&v[2], b.map(|b| &b[2]))?,
                cpu_us: lat_cpu
                    .get(t.as_str())
                    .and_then(|v| figure(v, lat_cpu.get(BASELINE))),
                late,
                errors,
                target: t,
            })
        })
        .collect();

    // (c)
    let bulk_rows: Vec<BulkRow> = order(&|t| bulk.contains_key(t))
        .into_iter()
        .filter_map(|t| {
            let (errors, bytes, verified_bytes) =
                bulk_errors.get(t.as_str()).copied().unwrap_or_default();
            Some(BulkRow {
                mib_per_s: figure(&bulk[t.as_str()], bulk.get(BASELINE))?,
                cpu_us_per_mib: bulk_cpu
                    .get(t.as_str())
                    .and_then(|v| figure(v, bulk_cpu.get(BASELINE))),
                errors,
                echo_verified: verified_bytes >= bytes,
                target: t,
            })
        })
        .collect();

    // (d)
    let split_rows: Vec<SplitRow> = order(&|t| split.contains_key(t))
        .into_iter()
        .filter_map(|t| {
            let (rounds, prefixes, expected) = split[t.as_str()].clone();
            Some(SplitRow {
                connections: rounds.iter().map(|r| r.0).min()?,
                v2_percent: Spread::of(rounds.iter().map(|r| r.1))?,
                error_points: Spread::of(rounds.iter().map(|r| (r.1 - expected).abs()))?,
                prefixes,
                expected_v2_percent: expected,
                target: t,
            })
        })
        .collect();

    // (e)
    // The CPU time per connection when it was measured (robust against other load on the
    // machine), else the wall time per connection at saturation.
    let per_conn = |(rate, _, cpu): &ScaleAcc| -> (PerRound, bool) {
        if !cpu.is_empty() {
            return (cpu.clone(), true);
        }
        let wall = rate
            .iter()
            .filter(|(_, r)| **r > 0.0)
            .map(|(k, r)| (*k, 1e6 / r))
            .collect();
        (wall, false)
    };
    let vs = |cost: &PerRound, other: Option<&ScaleAcc>| {
        other
            .and_then(|o| figure(cost, Some(&per_conn(o).0)))
            .and_then(|f| f.ratio)
    };
    let scale_rows: Vec<ScaleRow> = scale
        .iter()
        .map(|(&(services, subsets, ports), acc)| {
            let (cost, cost_from_cpu) = per_conn(acc);
            let pop = populated.get(&(services, subsets));
            ScaleRow {
                services,
                subsets,
                ports,
                rate: Spread::of(acc.0.values().copied()),
                us_per_connection: Spread::of(cost.values().copied()),
                cost_from_cpu,
                cost_vs_one_service: vs(&cost, scale.get(&(1, subsets, ports))),
                cost_vs_one_port: if ports > 1 {
                    vs(&cost, scale.get(&(services, subsets, 1)))
                } else {
                    None
                },
                bpf_ns_per_run: Spread::of(acc.1.values().copied()),
                apply_ms: pop.and_then(|p| Spread::of(p.0.values().copied())),
                register_ms: pop.and_then(|p| Spread::of(p.1.values().copied())),
            }
        })
        .collect();

    // (f)
    let flip_rows: Vec<FlipRow> = flips
        .into_iter()
        .filter_map(|(how, s)| {
            Some(FlipRow {
                changes: s.len(),
                update_us: Spread::of(s.iter().map(|x| x.update_us))?,
                first_follow_us: Spread::of(s.iter().filter_map(|x| x.first_follow_us)),
                stale_after: s.iter().map(|x| x.stale_after).sum(),
                after: s.iter().map(|x| x.after).sum(),
                in_flight_old: s.iter().map(|x| x.in_flight_old).sum(),
                old_subset: s
                    .iter()
                    .flat_map(|x| x.old_subset.iter().copied())
                    .collect(),
                how,
            })
        })
        .collect();

    let mut summary = Summary {
        targets,
        rounds,
        rate: rate_rows,
        latency: latency_rows,
        bulk: bulk_rows,
        split: split_rows,
        scale: scale_rows,
        weight_change: flip_rows,
        tcpshift_vs_haproxy: peaks
            .get("tcpshift")
            .and_then(|t| figure(t, peaks.get("haproxy")))
            .and_then(|f| f.ratio),
        direct_vs_haproxy: peaks
            .get("direct")
            .and_then(|d| figure(d, peaks.get("haproxy")))
            .and_then(|f| f.ratio),
        goals: Vec::new(),
        problems: Vec::new(),
        warnings: Vec::new(),
        bpf_cost: bpf_cost.row(),
        mode_cost: mode_cost.rows(),
        memory: memory.summary(),
    };
    summary.goals = goals(&summary);
    summary.problems = problems(&summary);
    summary.warnings = warnings(&summary);
    summary
}

/// Findings worth a look that do not fail the run: connections that followed the old
/// weights after a weight change returned, each with its timing and whether its SYN was in
/// flight at the flip.
fn warnings(s: &Summary) -> Vec<String> {
    let mut out = Vec::new();
    for f in &s.weight_change {
        if f.stale_after == 0 && f.in_flight_old == 0 {
            continue;
        }
        let list: Vec<String> = f
            .old_subset
            .iter()
            .map(|c| {
                format!(
                    "connect {:+.0}…{:+.0} µs{}",
                    c.connect_start_us,
                    c.connected_us,
                    if c.syn_in_flight {
                        " (SYN in flight at the flip)"
                    } else {
                        " (started after the change returned)"
                    }
                )
            })
            .collect();
        out.push(format!(
            "weight change ({}): {} connection(s) started after the change returned and {} \
             whose SYN was in flight at the flip went to the old subset; times relative to the \
             return: {}",
            f.how,
            f.stale_after,
            f.in_flight_old,
            list.join("; ")
        ));
    }
    out
}

/// Problems that make the run wrong rather than slow.
fn problems(s: &Summary) -> Vec<String> {
    let mut out = Vec::new();
    for r in &s.rate {
        if r.errors > 0 {
            out.push(format!(
                "{}: {} failed connections (rate)",
                r.target, r.errors
            ));
        }
    }
    for l in &s.latency {
        if l.errors > 0 {
            out.push(format!(
                "{}: {} failed connections (latency)",
                l.target, l.errors
            ));
        }
    }
    for b in &s.bulk {
        if b.errors > 0 {
            out.push(format!(
                "{}: {} failed bulk connections",
                b.target, b.errors
            ));
        }
        if !b.echo_verified {
            out.push(format!(
                "{}: the bulk echo was not checked against what was sent (record of an older \
                 tcpshift-load?)",
                b.target
            ));
        }
    }
    for x in &s.split {
        if x.connections == 0 || !x.prefixes.contains_key("one") || !x.prefixes.contains_key("two")
        {
            out.push(format!(
                "{}: the split reached {:?}, not both backends",
                x.target, x.prefixes
            ));
        }
    }
    for x in &s.scale {
        if x.rate.is_none_or(|r| r.median <= 0.0) {
            out.push(format!(
                "tcpshift with {} services × {} subsets ({} ports): no connection succeeded",
                x.services, x.subsets, x.ports
            ));
        }
    }
    for f in &s.weight_change {
        if f.first_follow_us.is_none() {
            out.push(format!(
                "weight change ({}): no connection followed the new weights",
                f.how
            ));
        }
    }
    out.extend(bpf_cost::problems(s.bpf_cost.as_ref()));
    out.extend(mode_cost::problems(&s.mode_cost));
    out.extend(memory::problems(&s.memory));
    for g in &s.goals {
        if g.measured.is_none() {
            out.push(format!("goal not measured: {}", g.name));
        }
    }
    out
}

/// The benchmark's goals, judged on medians over rounds of per-round ratios.
fn goals(s: &Summary) -> Vec<Goal> {
    let mut out = Vec::new();
    let ts = "tcpshift";
    let at_least = |name: String, goal: f64, v: Option<Spread>| Goal {
        name,
        goal: format!("≥ {goal}"),
        measured: v.map(|v| v.median),
        shown: v.map_or("not measured".into(), |v| v.show(3)),
        met: v.is_some_and(|v| v.median >= goal),
    };
    let at_most = |name: String, goal: f64, v: Option<Spread>| Goal {
        name,
        goal: format!("≤ {goal}"),
        measured: v.map(|v| v.median),
        shown: v.map_or("not measured".into(), |v| v.show(3)),
        met: v.is_some_and(|v| v.median <= goal),
    };
    // Every concurrency any target was measured at: a goal whose row is missing reads
    // "not measured" instead of disappearing.
    let mut concurrencies: Vec<usize> = s
        .rate
        .iter()
        .flat_map(|r| r.by_concurrency.keys().copied())
        .collect();
    concurrencies.sort_unstable();
    concurrencies.dedup();
    if concurrencies.is_empty() {
        out.push(at_least("connection rate × direct".into(), 0.95, None));
    }
    let ts_rate = s.rate.iter().find(|r| r.target == ts);
    let v1_rate = s.rate.iter().find(|r| r.target == "direct-v1");
    for c in concurrencies {
        let mut goal = at_least(
            format!("connection rate × direct, concurrency {c}"),
            0.95,
            ts_rate
                .and_then(|r| r.by_concurrency.get(&c))
                .and_then(|f| f.ratio),
        );
        // direct's client connects to two addresses (v1's and v2's), every other target's to
        // one (the service's); the client's own connect(2) is cheaper with two (fewer
        // TIME_WAIT sockets per destination to step over when picking a source port), which
        // direct-v1, one address and no steering, shows.
        if let Some(v1) = v1_rate
            .and_then(|r| r.by_concurrency.get(&c))
            .and_then(|f| f.ratio)
        {
            goal.shown = format!(
                "{}; one address, no steering: direct-v1 × direct = {}",
                goal.shown,
                v1.show(3)
            );
        }
        out.push(goal);
    }
    let mut goal = at_least(
        "peak connection rate × HAProxy's peak".into(),
        2.0,
        s.tcpshift_vs_haproxy,
    );
    // Clients and servers share the machine's CPUs: nothing can beat HAProxy by more than
    // direct connections do.
    if let Some(d) = s.direct_vs_haproxy {
        goal.shown = format!("{}; bound: direct ÷ HAProxy = {}", goal.shown, d.show(3));
    }
    out.push(goal);
    let bulk = s
        .bulk
        .iter()
        .find(|r| r.target == ts)
        .and_then(|r| r.mib_per_s.ratio);
    out.push(at_least("bulk throughput × direct".into(), 0.98, bulk));
    let p99 = s
        .latency
        .iter()
        .find(|r| r.target == ts)
        .and_then(|r| r.p99_us.ratio);
    out.push(at_most("p99 latency × direct".into(), 1.10, p99));
    out.push(bpf_cost::goal(s.bpf_cost.as_ref()));
    out.extend(mode_cost::goals(&s.mode_cost));
    out.push(memory::goal(&s.memory));
    for subsets in [2, 16] {
        let v = s
            .scale
            .iter()
            .find(|r| r.services == 10_000 && r.subsets == subsets && r.ports == 1)
            .and_then(|r| r.cost_vs_one_service);
        out.push(at_most(
            format!(
                "cost per connection, 10 000 services ÷ 1 service ({subsets} subsets, same \
                 port and listeners)"
            ),
            1.05,
            v,
        ));
    }
    let split = s.split.iter().find(|r| r.target == ts);
    if split.is_none() {
        out.push(Goal {
            name: "split error (points)".into(),
            goal: "≤ 1".into(),
            measured: None,
            shown: "not measured".into(),
            met: false,
        });
    }
    if let Some(row) = split {
        out.push(Goal {
            name: format!(
                "split error over {} connections (points; worst round {:.2})",
                row.connections, row.error_points.max
            ),
            goal: "≤ 1".into(),
            measured: Some(row.error_points.median),
            shown: format!(
                "{} (v2 share {} % vs {:.0} %)",
                spread(&row.error_points, 2),
                spread(&row.v2_percent, 2),
                row.expected_v2_percent
            ),
            met: row.error_points.median <= 1.0,
        });
    }
    out
}

/// Formats a number with thin grouping of thousands (`12 345`) and `digits` decimals.
pub fn num(v: f64, digits: usize) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let s = format!("{:.digits$}", v.abs());
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i.to_string(), Some(f.to_string())),
        None => (s, None),
    };
    let mut grouped = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(' ');
        }
        grouped.push(ch);
    }
    let sign = if v < 0.0 { "-" } else { "" };
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

/// `median [min–max]`.
fn spread(s: &Spread, digits: usize) -> String {
    if s.n <= 1 || s.min == s.max {
        num(s.median, digits)
    } else {
        format!(
            "{} [{}–{}]",
            num(s.median, digits),
            num(s.min, digits),
            num(s.max, digits)
        )
    }
}

fn ratio(f: Option<&Figure>) -> String {
    match f.and_then(|f| f.ratio) {
        Some(r) => format!("×{}", spread(&r, 2)),
        None => "–".into(),
    }
}

fn median(f: Option<&Figure>, digits: usize) -> String {
    f.map_or("–".into(), |f| num(f.value.median, digits))
}

fn ratio_median(f: Option<&Figure>) -> String {
    match f.and_then(|f| f.ratio) {
        Some(r) => format!("{:.2}", r.median),
        None => "–".into(),
    }
}

/// Rows saying "not measured" for the targets of the run that `has` no figure for, so that a
/// missing measurement shows instead of disappearing (`cells` columns after the target).
fn not_measured(o: &mut String, s: &Summary, cells: usize, has: &dyn Fn(&str) -> bool) {
    for t in s.targets.iter().filter(|t| !has(t)) {
        let _ = writeln!(o, "| {t} |{}", " not measured |".repeat(cells));
    }
}

/// The Markdown report: machine, headline table, goals, then every workload in detail.
pub fn markdown(s: &Summary, machine: &Value, command: &str) -> String {
    let mut o = String::new();
    let m = |k: &str| {
        machine
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    let _ = writeln!(o, "## tcpshift benchmark\n");
    let _ = writeln!(o, "Command: `{command}`  ");
    let _ = writeln!(
        o,
        "Machine: {} ({} cores), {} GiB, kernel {}, {}  ",
        m("cpu"),
        machine.get("cores").and_then(Value::as_u64).unwrap_or(0),
        machine
            .get("memory_gib")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        m("kernel"),
        m("os")
    );
    if let Some(peers) = machine.get("peers").and_then(Value::as_object) {
        let list: Vec<String> = peers
            .iter()
            .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("?")))
            .collect();
        let _ = writeln!(o, "Peers: {}  ", list.join(", "));
    }
    if let Some(load) = machine.get("loadavg").and_then(Value::as_str) {
        let _ = writeln!(o, "Load average before the run: {load}  ");
    }
    let _ = writeln!(
        o,
        "{} round(s); figures are medians over rounds, [min–max] where shown; ratios are taken \
         against `direct` within the same round, then summarised. `direct`: the client itself \
         picks v1 or v2 at 80/20 (the same two backends, no steering at all); `direct-v1`: \
         every connection to v1. Targets are interleaved within every round; – in the \
         headline: not measured (or the baseline itself).\n",
        s.rounds
    );

    // Headline.
    let _ = writeln!(
        o,
        "| target | peak conn/s | × direct | CPU µs/conn | × direct | p50 µs | p99 µs | p99.9 µs | p99 × direct | bulk MiB/s | × direct | split (v2 %) |"
    );
    let _ = writeln!(
        o,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for t in &s.targets {
        let rate = s.rate.iter().find(|r| &r.target == t);
        let lat = s.latency.iter().find(|r| &r.target == t);
        let bulk = s.bulk.iter().find(|r| &r.target == t);
        let split = s.split.iter().find(|r| &r.target == t);
        let _ = writeln!(
            o,
            "| {t} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            median(rate.and_then(|r| r.peak.as_ref()), 0),
            ratio_median(rate.and_then(|r| r.peak.as_ref())),
            median(lat.and_then(|l| l.cpu_us.as_ref()), 1),
            ratio_median(lat.and_then(|l| l.cpu_us.as_ref())),
            median(lat.map(|l| &l.p50_us), 0),
            median(lat.map(|l| &l.p99_us), 0),
            median(lat.map(|l| &l.p999_us), 0),
            ratio_median(lat.map(|l| &l.p99_us)),
            median(bulk.map(|b| &b.mib_per_s), 0),
            ratio_median(bulk.map(|b| &b.mib_per_s)),
            split.map_or("–".into(), |x| format!("{:.2}", x.v2_percent.median)),
        );
    }

    // Goals.
    let _ = writeln!(o, "\n### Goals (tcpshift)\n");
    let _ = writeln!(o, "| goal | target | measured | met |");
    let _ = writeln!(o, "|---|---|---|---|");
    for g in &s.goals {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            g.name,
            g.goal,
            g.shown,
            if g.met { "yes" } else { "**no**" }
        );
    }

    if !s.problems.is_empty() || !s.warnings.is_empty() {
        let _ = writeln!(o, "\n### Problems\n");
        for p in &s.problems {
            let _ = writeln!(o, "- {p}");
        }
        for w in &s.warnings {
            let _ = writeln!(o, "- (warning) {w}");
        }
    }

    // (a)
    let concs: Vec<usize> = {
        let mut c: Vec<usize> = s
            .rate
            .iter()
            .flat_map(|r| r.by_concurrency.keys().copied())
            .collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    if !concs.is_empty() {
        let _ = writeln!(
            o,
            "\n### (a) Connection rate — connect, send a line, read the echo, close (connections/s)\n"
        );
        let head: Vec<String> = concs.iter().map(|c| format!("{c} clients")).collect();
        let _ = writeln!(o, "| target | {} | errors |", head.join(" | "));
        let _ = writeln!(o, "|---|{}---:|", "---:|".repeat(concs.len()));
        for r in &s.rate {
            let cells: Vec<String> = concs
                .iter()
                .map(|c| {
                    r.by_concurrency.get(c).map_or("not measured".into(), |f| {
                        format!("{} {}", spread(&f.value, 0), ratio(Some(f)))
                    })
                })
                .collect();
            let _ = writeln!(o, "| {} | {} | {} |", r.target, cells.join(" | "), r.errors);
        }
        not_measured(&mut o, s, concs.len() + 1, &|t| {
            s.rate.iter().any(|r| r.target == t && r.peak.is_some())
        });
        if s.rate.iter().any(|r| !r.cpu_us.is_empty()) {
            let _ = writeln!(
                o,
                "\nCPU time of all benchmark processes (clients, servers, proxies, tcpshiftd; \
                 kernel work in their context included) per connection, µs, and in brackets \
                 after `@` the CPUs they kept busy (of {} here; the rest went to other work on \
                 the machine):\n",
                machine.get("cores").and_then(Value::as_u64).unwrap_or(0)
            );
            let _ = writeln!(o, "| target | {} |", head.join(" | "));
            let _ = writeln!(o, "|---|{}", "---:|".repeat(concs.len()));
            for r in &s.rate {
                let cells: Vec<String> = concs
                    .iter()
                    .map(|c| match (r.cpu_us.get(c), r.cores.get(c)) {
                        (Some(f), cores) => format!(
                            "{} {}{}",
                            spread(&f.value, 1),
                            ratio(Some(f)),
                            cores.map_or(String::new(), |k| format!(" @{:.2}", k.median))
                        ),
                        _ => "–".into(),
                    })
                    .collect();
                let _ = writeln!(o, "| {} | {} |", r.target, cells.join(" | "));
            }
        }
    }

    // (b)
    if !s.latency.is_empty() {
        let offered = s.latency.first().map_or(0.0, |l| l.offered_rate);
        let _ = writeln!(
            o,
            "\n### (b) Latency at a fixed {} connections/s (µs, from the scheduled start to the close)\n",
            num(offered, 0)
        );
        let _ = writeln!(
            o,
            "| target | p50 | p99 | p99.9 | CPU µs/conn | late starts | errors |"
        );
        let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|");
        for l in &s.latency {
            let _ = writeln!(
                o,
                "| {} | {} {} | {} {} | {} {} | {} | {} | {} |",
                l.target,
                spread(&l.p50_us.value, 0),
                ratio(Some(&l.p50_us)),
                spread(&l.p99_us.value, 0),
                ratio(Some(&l.p99_us)),
                spread(&l.p999_us.value, 0),
                ratio(Some(&l.p999_us)),
                l.cpu_us.as_ref().map_or("–".into(), |f| format!(
                    "{} {}",
                    spread(&f.value, 1),
                    ratio(Some(f))
                )),
                l.late,
                l.errors
            );
        }
        not_measured(&mut o, s, 6, &|t| s.latency.iter().any(|l| l.target == t));
    }

    // (c)
    if !s.bulk.is_empty() {
        let _ = writeln!(
            o,
            "\n### (c) Bulk throughput on long connections (echoed MiB/s)\n"
        );
        let _ = writeln!(o, "| target | MiB/s | CPU µs/MiB | errors |");
        let _ = writeln!(o, "|---|---:|---:|---:|");
        for b in &s.bulk {
            let _ = writeln!(
                o,
                "| {} | {} {} | {} | {} |",
                b.target,
                spread(&b.mib_per_s.value, 0),
                ratio(Some(&b.mib_per_s)),
                b.cpu_us_per_mib.as_ref().map_or("–".into(), |f| format!(
                    "{} {}",
                    spread(&f.value, 0),
                    ratio(Some(f))
                )),
                b.errors
            );
        }
        not_measured(&mut o, s, 3, &|t| s.bulk.iter().any(|b| b.target == t));
    }

    bpf_cost::markdown(&mut o, s.bpf_cost.as_ref());
    mode_cost::markdown(&mut o, &s.mode_cost);

    // (d)
    if !s.split.is_empty() {
        let _ = writeln!(o, "\n### (d) Split accuracy (configured 80/20)\n");
        let _ = writeln!(
            o,
            "| target | connections per round | v1 (all rounds) | v2 (all rounds) | v2 share % | error (points) |"
        );
        let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|");
        for x in &s.split {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} |",
                x.target,
                num(x.connections as f64, 0),
                num(x.prefixes.get("one").copied().unwrap_or(0) as f64, 0),
                num(x.prefixes.get("two").copied().unwrap_or(0) as f64, 0),
                spread(&x.v2_percent, 2),
                spread(&x.error_points, 2)
            );
        }
        // direct-v1 sends everything to v1 by design: it has no split to measure.
        not_measured(&mut o, s, 5, &|t| {
            t == "direct-v1" || s.split.iter().any(|x| x.target == t)
        });
    }

    // (e)
    if !s.scale.is_empty() {
        let _ = writeln!(
            o,
            "\n### (e) Scale — tcpshift with 1 to 10 000 services in the maps\n\n\
             Rows with 1 port send the same traffic to the same service port and listeners \
             whatever the number of services (sizes interleaved within each round): they \
             measure the map size alone. A row with more ports spreads the connections over \
             that many services (one listener each), and × 1 port compares it with the same \
             map and all traffic on one port. The cost is the CPU time of all benchmark \
             processes per connection, or the wall time per connection where marked (wall) \
             (cgroup CPU time unavailable).\n"
        );
        let _ = writeln!(
            o,
            "| services | subsets | ports | conn/s | cost µs/conn | × 1 service | × 1 port | sk_lookup ns/run | apply ms | register ms |"
        );
        let _ = writeln!(o, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let nm = || "not measured".to_string();
        for x in &s.scale {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                num(f64::from(x.services), 0),
                x.subsets,
                num(f64::from(x.ports), 0),
                x.rate.map_or_else(nm, |r| spread(&r, 0)),
                x.us_per_connection.map_or_else(nm, |c| format!(
                    "{} ({})",
                    spread(&c, 2),
                    if x.cost_from_cpu { "CPU" } else { "wall" }
                )),
                x.cost_vs_one_service
                    .map_or("–".into(), |r| format!("×{}", spread(&r, 3))),
                x.cost_vs_one_port
                    .map_or("–".into(), |r| format!("×{}", spread(&r, 3))),
                x.bpf_ns_per_run.map_or_else(nm, |v| spread(&v, 0)),
                x.apply_ms.map_or_else(nm, |v| spread(&v, 0)),
                x.register_ms.map_or_else(nm, |v| spread(&v, 0)),
            );
        }
    }

    memory::markdown(&mut o, &s.memory);

    // (f)
    if !s.weight_change.is_empty() {
        let _ = writeln!(
            o,
            "\n### (f) Weight change — 100/0 ⇄ 0/100 while clients connect continuously\n"
        );
        let _ = writeln!(
            o,
            "| change | changes | duration µs | first connection on the new subset after return, µs | connections after return still on the old subset | old subset, SYN in flight at the flip |"
        );
        let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|");
        for f in &s.weight_change {
            let how = match f.how.as_str() {
                "cli" => "`tcpshiftctl set-weight` (process)",
                "library" => "map update (library call)",
                other => other,
            };
            let _ = writeln!(
                o,
                "| {how} | {} | {} | {} | {} of {} | {} |",
                f.changes,
                spread(&f.update_us, 0),
                f.first_follow_us
                    .map_or("not measured".into(), |v| spread(&v, 0)),
                f.stale_after,
                f.after,
                f.in_flight_old
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        load::{BulkResult, PacedResult, RateResult},
        stats::Percentiles,
    };

    fn labels(target: &str, round: u32) -> Labels {
        Labels {
            target: target.into(),
            round,
            services: None,
            subsets: None,
            ports: None,
        }
    }

    fn rate(target: &str, round: u32, c: usize, r: f64) -> Record {
        Record::Rate {
            labels: labels(target, round),
            concurrency: c,
            result: RateResult {
                rate: r,
                connections: 100,
                ..RateResult::default()
            },
            bpf: None,
            cpu: None,
        }
    }

    #[test]
    fn ratios_are_paired_by_round() {
        let recs = vec![
            rate("direct", 1, 4, 100.0),
            rate("tcpshift", 1, 4, 99.0),
            rate("direct", 2, 4, 50.0),
            rate("tcpshift", 2, 4, 49.0),
            rate("haproxy", 1, 4, 40.0),
            rate("haproxy", 2, 4, 20.0),
        ];
        let s = summarise(&recs);
        assert_eq!(s.targets, ["direct", "tcpshift", "haproxy"]);
        let t = &s.rate[1];
        let r = t.by_concurrency[&4].ratio.unwrap();
        assert!((r.min - 0.98).abs() < 1e-9 && (r.max - 0.99).abs() < 1e-9);
        let g = s
            .goals
            .iter()
            .find(|g| g.name.contains("concurrency 4"))
            .unwrap();
        assert!(g.met);
        let h = s.goals.iter().find(|g| g.name.contains("HAProxy")).unwrap();
        assert!(h.met, "{h:?}");
        let md = markdown(&s, &Value::Null, "cargo xtask bench");
        assert!(md.contains("| tcpshift |"));
    }

    #[test]
    fn latency_bulk_split_and_scale() {
        let p = |p99: f64| Percentiles {
            samples: 10,
            p50_us: 10.0,
            p99_us: p99,
            p999_us: 2.0 * p99,
            max_us: 3.0 * p99,
        };
        let lat = |t: &str, p99: f64| Record::Latency {
            labels: labels(t, 1),
            workers: 4,
            result: PacedResult {
                offered_rate: 1000.0,
                response: p(p99),
                service: p(p99),
                ..PacedResult::default()
            },
            cpu: None,
        };
        let bulk = |t: &str, v: f64| Record::Bulk {
            labels: labels(t, 1),
            connections: 2,
            line_bytes: 100,
            result: BulkResult {
                mib_per_s: v,
                bytes: 1 << 20,
                verified_bytes: 1 << 20,
                ..BulkResult::default()
            },
            cpu: None,
        };
        let split = Record::Split {
            labels: labels("tcpshift", 1),
            concurrency: 4,
            expected_v2_percent: 20.0,
            result: RateResult {
                prefixes: [("one".to_string(), 7_950), ("two".to_string(), 2_050)].into(),
                ..RateResult::default()
            },
        };
        let scale = |n: u32, r: f64| Record::Rate {
            labels: Labels {
                target: "tcpshift".into(),
                round: 1,
                services: Some(n),
                subsets: Some(2),
                ports: Some(1),
            },
            concurrency: 4,
            result: RateResult {
                rate: r,
                connections: 100,
                ..RateResult::default()
            },
            bpf: None,
            cpu: None,
        };
        let recs = vec![
            lat("direct", 100.0),
            lat("tcpshift", 105.0),
            bulk("direct", 1000.0),
            bulk("tcpshift", 990.0),
            split,
            scale(1, 1000.0),
            scale(10_000, 940.0),
        ];
        let s = summarise(&recs);
        let g = |name: &str| s.goals.iter().find(|g| g.name.contains(name)).unwrap();
        assert!(g("p99").met);
        assert!(g("bulk").met);
        assert!(g("split").met);
        assert!((s.split[0].v2_percent.median - 20.5).abs() < 1e-9);
        assert_eq!(s.split[0].connections, 10_000);
        let cost = g("10 000 services ÷ 1 service (2 subsets");
        assert!(!cost.met, "{cost:?}");
        assert!((cost.measured.unwrap() - 1000.0 / 940.0).abs() < 1e-9);
        // Not measured: shown, not met, and a problem for --check; never 0 µs.
        let sixteen = g("(16 subsets");
        assert_eq!((sixteen.measured, sixteen.met), (None, false));
        assert_eq!(sixteen.shown, "not measured");
        assert!(s.problems.iter().any(|p| p.contains("not measured: cost")));
        let md = markdown(&s, &Value::Null, "cargo xtask bench --quick");
        assert!(md.contains("(wall)"), "{md}");
    }

    #[test]
    fn empty_samples_are_not_measured_rather_than_zero() {
        let recs = vec![
            Record::Latency {
                labels: labels("direct", 1),
                workers: 4,
                result: PacedResult::default(),
                cpu: None,
            },
            Record::Bulk {
                labels: labels("tcpshift", 1),
                connections: 2,
                line_bytes: 100,
                result: BulkResult {
                    mib_per_s: 5.0,
                    bytes: 100,
                    ..BulkResult::default()
                },
                cpu: None,
            },
        ];
        let s = summarise(&recs);
        assert!(s.latency.is_empty(), "{:?}", s.latency);
        let p99 = s.goals.iter().find(|g| g.name.contains("p99")).unwrap();
        assert_eq!(p99.shown, "not measured");
        assert!(
            s.problems
                .iter()
                .any(|p| p.contains("bulk echo was not checked"))
        );
        let md = markdown(&s, &Value::Null, "x");
        assert!(md.contains("| direct | not measured |"), "{md}");
        // Scale runs are not targets of the main comparison.
        assert_eq!(s.targets, ["direct", "tcpshift"]);
    }

    #[test]
    fn numbers() {
        assert_eq!(num(1234567.0, 0), "1 234 567");
        assert_eq!(num(123.456, 2), "123.46");
        assert_eq!(num(-1234.5, 1), "-1 234.5");
        assert_eq!(num(f64::NAN, 0), "–");
    }
}
