//! The UDP section of `cargo xtask bench` (alone with `--only udp`): datagram rate and p99
//! round trip of a UDP service, three ways, on loopback in the benchmark's namespace:
//!
//! - `direct`: the client itself sends each flow to v1 or v2 at 80/20 (no steering);
//! - `tcpshift`: a `protocol: udp` service (the sk_lookup program and its flow table);
//! - `nftables`: `numgen random mod 100` DNAT in the `output` hook, made sticky per flow by
//!   connection tracking (what kube-proxy's nftables mode does for a UDP service).
//!
//! Two workloads: **long flows** (a few client sockets, each sending one datagram and waiting
//! for the answer, again and again: every datagram after the first hits the flow table or the
//! conntrack entry) and **new flows** (every datagram from a fresh client socket: a flow table
//! insert, or a new conntrack entry, per datagram). The client runs in a thread of xtask that
//! entered the namespace; the backends are two `tcp-echo --udp`. While tcpshift is measured,
//! BPF run-time statistics (`kernel.bpf_stats_enabled`) give the sk_lookup program's cost per
//! datagram; the sysctl is restored afterwards.

use std::{
    fs::File,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{env::Env, peers};
use crate::cmd::say;

/// The UDP backends (`tcp-echo --udp`): v1 answers "one", v2 "two".
const V1_PORT: u16 = 9201;
const V2_PORT: u16 = 9202;
/// The service ports of tcpshift and nftables.
const TCPSHIFT_PORT: u16 = 5301;
const NFT_PORT: u16 = 5302;
/// Client sockets of the long-flows workload.
const LONG_FLOWS: usize = 16;
/// How long one client waits for an answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// The sysctl that turns BPF run-time statistics on.
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// The compared ways to the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    Tcpshift,
    Nftables,
}

impl Target {
    const ALL: [Target; 3] = [Target::Direct, Target::Tcpshift, Target::Nftables];

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Tcpshift => "tcpshift",
            Target::Nftables => "nftables",
        }
    }
}

/// The workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Long,
    New,
}

impl Workload {
    const ALL: [Workload; 2] = [Workload::Long, Workload::New];

    fn name(self) -> &'static str {
        match self {
            Workload::Long => "long flows",
            Workload::New => "new flows",
        }
    }
}

/// One measurement.
#[derive(Debug, Clone)]
struct Row {
    target: Target,
    workload: Workload,
    datagrams: u64,
    lost: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    /// The sk_lookup program's runs and run time during the measurement (tcpshift only).
    bpf: Option<BpfCost>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.datagrams as f64 / self.secs.max(1e-9)
    }
}

/// BPF run-time statistics of the sk_lookup program over one measurement.
#[derive(Debug, Clone, Copy)]
struct BpfCost {
    runs: u64,
    run_ns: u64,
    /// Datagrams the program steered (the UDP counters of `status`).
    steered: u64,
}

/// Runs the UDP section: starts the UDP backends, measures every target and workload for
/// `secs` seconds each, writes `udp.json` and `udp.md` into `out`, and prints the table.
pub fn run(env: &mut Env, out: &Path, secs: f64) -> Result<()> {
    let echo = env.bin("tcp-echo");
    for (name, port, prefix) in [("v1", V1_PORT, "one"), ("v2", V2_PORT, "two")] {
        let mut c = env.command(&echo);
        c.args(["--udp", "--bind", "127.0.0.1", &port.to_string(), prefix]);
        env.start_udp(
            &format!("tcp-echo --udp {name}"),
            c,
            &format!("udp-echo-{name}"),
            port,
        )?;
    }
    let config = out.join("tcpshift-udp.yaml");
    peers::write(&config, &tcpshift_yaml())?;
    let nft = out.join("nftables-udp.conf");
    peers::write(&nft, &nftables_conf())?;
    let stats = BpfStats::enable()?;
    let mut rows = Vec::new();
    for w in Workload::ALL {
        for target in Target::ALL {
            super::env::check_interrupted()?;
            env.check_alive()?;
            say(format_args!("udp: {} via {}", w.name(), target.name()));
            let row = match target {
                Target::Direct => measure(env, target, w, secs),
                Target::Tcpshift => {
                    env.tcpshift_up(&config)?;
                    let r = measure_tcpshift(env, w, secs);
                    env.tcpshift_down()?;
                    r
                }
                Target::Nftables => {
                    env.run("nft", &["-f", &nft.display().to_string()])?;
                    let r = measure(env, target, w, secs);
                    env.run("nft", &["delete", "table", "ip", "tcpshift_bench_udp"])?;
                    if let Err(e) = env.run("conntrack", &["-F"]) {
                        say(format_args!("warning: {e:#}"));
                    }
                    r
                }
            }?;
            rows.push(row);
        }
    }
    drop(stats);
    let report = report_json(&rows, secs);
    peers::write(
        &out.join("udp.json"),
        &serde_json::to_string_pretty(&report)?,
    )?;
    let md = markdown(&rows);
    peers::write(&out.join("udp.md"), &md)?;
    for line in md.lines() {
        say(line);
    }
    Ok(())
}

/// The tcpshift measurement with the sk_lookup program's run-time statistics around it.
fn measure_tcpshift(env: &Env, w: Workload, secs: f64) -> Result<Row> {
    let status = env.status()?;
    let id = status["program_id"]
        .as_u64()
        .context("`tcpshiftctl status --json` names no sk_lookup program")?;
    let before = prog_stats(env, id)?;
    let steered_before = steered(&status);
    let mut row = measure(env, Target::Tcpshift, w, secs)?;
    let after = prog_stats(env, id)?;
    let steered_after = steered(&env.status()?);
    row.bpf = Some(BpfCost {
        runs: after.0.saturating_sub(before.0),
        run_ns: after.1.saturating_sub(before.1),
        steered: steered_after.saturating_sub(steered_before),
    });
    Ok(row)
}

/// Datagrams steered so far, summed over the subsets of `status --json`.
fn steered(status: &Value) -> u64 {
    status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["subsets"].as_array().into_iter().flatten())
        .filter_map(|s| s["udp"]["datagrams"].as_u64())
        .sum()
}

/// `(run_cnt, run_time_ns)` of program `id` (`bpftool prog show id ID --json`).
fn prog_stats(env: &Env, id: u64) -> Result<(u64, u64)> {
    let out = env.run(
        "bpftool",
        &["prog", "show", "id", &id.to_string(), "--json"],
    )?;
    let v: Value = serde_json::from_str(&out).context("cannot parse `bpftool prog show`")?;
    Ok((
        v["run_cnt"].as_u64().unwrap_or(0),
        v["run_time_ns"].as_u64().unwrap_or(0),
    ))
}

/// Turns `kernel.bpf_stats_enabled` on while it lives, then restores the previous value.
struct BpfStats {
    previous: Option<String>,
}

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        let previous = std::fs::read_to_string(BPF_STATS)
            .with_context(|| format!("cannot read {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("cannot write {BPF_STATS}"))?;
        Ok(BpfStats {
            previous: Some(previous.trim().to_string()),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(p) = self.previous.take()
            && let Err(e) = std::fs::write(BPF_STATS, &p)
        {
            say(format_args!(
                "warning: cannot restore {BPF_STATS} to {p}: {e}"
            ));
        }
    }
}

/// Runs workload `w` against `target` for `secs` seconds in a thread inside the namespace.
fn measure(env: &Env, target: Target, w: Workload, secs: f64) -> Result<Row> {
    let netns =
        File::open(env.path()).with_context(|| format!("cannot open {}", env.path().display()))?;
    let duration = Duration::from_secs_f64(secs);
    let handle = std::thread::spawn(move || -> Result<(Vec<Duration>, u64, f64)> {
        // SAFETY: a valid namespace fd; setns changes only this thread's network namespace.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "cannot enter the benchmark's namespace: {}",
                std::io::Error::last_os_error()
            );
        }
        match w {
            Workload::Long => long_flows(target, duration),
            Workload::New => new_flows(target, duration),
        }
    });
    let (mut rtts, lost, elapsed) = handle
        .join()
        .map_err(|_| anyhow::anyhow!("the UDP client thread panicked"))??;
    if rtts.is_empty() {
        bail!(
            "no datagram was answered ({} via {})",
            w.name(),
            target.name()
        );
    }
    rtts.sort_unstable();
    let pct = |p: f64| {
        let i = ((rtts.len() as f64 * p).ceil() as usize).clamp(1, rtts.len()) - 1;
        rtts[i].as_secs_f64() * 1e6
    };
    Ok(Row {
        target,
        workload: w,
        datagrams: rtts.len() as u64,
        lost,
        secs: elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        bpf: None,
    })
}

/// Where flow number `k` sends: the service port, or (direct) v1 or v2 at 80/20.
fn destination(target: Target, k: u64) -> SocketAddr {
    let port = match target {
        Target::Tcpshift => TCPSHIFT_PORT,
        Target::Nftables => NFT_PORT,
        // Spread like the weights: 4 of every 5 flows to v1.
        Target::Direct if k % 5 == 4 => V2_PORT,
        Target::Direct => V1_PORT,
    };
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A client socket on an ephemeral port of 127.0.0.1 (unconnected: a tcpshift backend
/// answers from its own address, not the service's).
fn client() -> Result<UdpSocket> {
    let s = UdpSocket::bind("127.0.0.1:0").context("cannot bind a UDP client socket")?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    Ok(s)
}

/// Sends one datagram and waits for its answer; `None` when none came in time.
fn round_trip(s: &UdpSocket, to: SocketAddr, buf: &mut [u8]) -> Result<Option<Duration>> {
    let t = Instant::now();
    s.send_to(b"ping", to).context("cannot send a datagram")?;
    match s.recv_from(buf) {
        Ok(_) => Ok(Some(t.elapsed())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).context("cannot receive an answer"),
    }
}

/// [`LONG_FLOWS`] client sockets taking turns for `d`.
fn long_flows(target: Target, d: Duration) -> Result<(Vec<Duration>, u64, f64)> {
    let flows = (0..LONG_FLOWS)
        .map(|_| client())
        .collect::<Result<Vec<_>>>()?;
    let mut buf = [0u8; 256];
    // First datagrams (the flows' choice) are not measured.
    for (k, s) in flows.iter().enumerate() {
        round_trip(s, destination(target, k as u64), &mut buf)?;
    }
    let mut rtts = Vec::with_capacity(1 << 20);
    let mut lost = 0;
    let start = Instant::now();
    'outer: loop {
        for (k, s) in flows.iter().enumerate() {
            match round_trip(s, destination(target, k as u64), &mut buf)? {
                Some(rtt) => rtts.push(rtt),
                None => lost += 1,
            }
            if start.elapsed() >= d {
                break 'outer;
            }
        }
    }
    Ok((rtts, lost, start.elapsed().as_secs_f64()))
}

/// Every datagram from a new client socket (a new flow) for `d`.
fn new_flows(target: Target, d: Duration) -> Result<(Vec<Duration>, u64, f64)> {
    let mut buf = [0u8; 256];
    let mut rtts = Vec::with_capacity(1 << 20);
    let mut lost = 0;
    let start = Instant::now();
    let mut k = 0u64;
    while start.elapsed() < d {
        let s = client()?;
        match round_trip(&s, destination(target, k), &mut buf)? {
            Some(rtt) => rtts.push(rtt),
            None => lost += 1,
        }
        k += 1;
    }
    Ok((rtts, lost, start.elapsed().as_secs_f64()))
}

/// The tcpshift configuration: one `protocol: udp` service, 80/20.
fn tcpshift_yaml() -> String {
    format!(
        "services:
  udp-echo:
    protocol: udp
    listen: 127.0.0.1:{TCPSHIFT_PORT}
    subsets:
      v1: 127.0.0.1:{V1_PORT}
      v2: 127.0.0.1:{V2_PORT}
    weights: {{v1: 80, v2: 20}}
"
    )
}

/// nftables as kube-proxy's nftables mode splits a UDP service (see
/// [`peers::nftables_conf`]): `numgen random` picks the endpoint of a flow's first datagram,
/// connection tracking keeps the flow there.
fn nftables_conf() -> String {
    format!(
        "table ip tcpshift_bench_udp {{
  chain endpoint-v1 {{
    meta l4proto udp dnat to 127.0.0.1:{V1_PORT}
  }}
  chain endpoint-v2 {{
    meta l4proto udp dnat to 127.0.0.1:{V2_PORT}
  }}
  chain service-udp-echo {{
    numgen random mod 100 vmap {{ 0-79 : goto endpoint-v1, 80-99 : goto endpoint-v2 }}
  }}
  map service-ips {{
    type ipv4_addr . inet_proto . inet_service : verdict
    elements = {{ 127.0.0.1 . udp . {NFT_PORT} : goto service-udp-echo }}
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    ip daddr . meta l4proto . th dport vmap @service-ips
  }}
}}
"
    )
}

/// The rate of `target` relative to direct for the same workload.
fn ratio(rows: &[Row], r: &Row) -> Option<f64> {
    rows.iter()
        .find(|d| d.target == Target::Direct && d.workload == r.workload)
        .map(|d| r.rate() / d.rate().max(1e-9))
}

fn report_json(rows: &[Row], secs: f64) -> Value {
    let list: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "target": r.target.name(),
                "workload": r.workload.name(),
                "datagrams": r.datagrams,
                "lost": r.lost,
                "seconds": r.secs,
                "datagrams_per_second": r.rate(),
                "rtt_p50_us": r.p50_us,
                "rtt_p99_us": r.p99_us,
                "rate_vs_direct": ratio(rows, r),
                "bpf": r.bpf.map(|b| json!({
                    "runs": b.runs,
                    "run_time_ns": b.run_ns,
                    "ns_per_run": b.run_ns as f64 / b.runs.max(1) as f64,
                    "datagrams_steered": b.steered,
                    "ns_per_steered_datagram": b.run_ns as f64 / b.steered.max(1) as f64,
                })),
            })
        })
        .collect();
    json!({ "seconds_per_measurement": secs, "long_flows": LONG_FLOWS, "rows": list })
}

/// The section's table (Markdown), with the BPF cost rows of tcpshift.
fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| UDP workload | target | datagrams/s | vs direct | p50 RTT µs | p99 RTT µs | lost |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.0} | {} | {:.1} | {:.1} | {} |\n",
            r.workload.name(),
            r.target.name(),
            r.rate(),
            ratio(rows, r).map_or("-".into(), |x| format!("{x:.2}×")),
            r.p50_us,
            r.p99_us,
            r.lost,
        ));
    }
    s.push_str(
        "\n| tcpshift sk_lookup (BPF stats) | program runs | ns per run | datagrams steered | program ns per steered datagram |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        if let Some(b) = r.bpf {
            s.push_str(&format!(
                "| {} | {} | {:.0} | {} | {:.0} |\n",
                r.workload.name(),
                b.runs,
                b.run_ns as f64 / b.runs.max(1) as f64,
                b.steered,
                b.run_ns as f64 / b.steered.max(1) as f64,
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_name_the_ports() {
        assert!(tcpshift_yaml().contains(&format!("listen: 127.0.0.1:{TCPSHIFT_PORT}")));
        assert!(tcpshift_yaml().contains("protocol: udp"));
        let nft = nftables_conf();
        assert!(nft.contains(&format!("udp . {NFT_PORT}")));
        assert!(nft.contains(&format!("dnat to 127.0.0.1:{V2_PORT}")));
    }

    #[test]
    fn direct_spreads_flows_80_20() {
        let v2 = (0..1000)
            .filter(|k| destination(Target::Direct, *k).port() == V2_PORT)
            .count();
        assert_eq!(v2, 200);
    }
}
