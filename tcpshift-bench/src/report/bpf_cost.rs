//! BPF time per connection with tcpshift's failure signals on and off
//! ([`Record::BpfCost`](crate::record::Record::BpfCost)): its row, its goal and its section
//! of the report.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::{Goal, spread};
use crate::{bpf_cost::BpfCost, load::RateResult, record::Labels, stats::Spread};

/// The goal: signals on cost at most this many times the program without them.
pub const GOAL: f64 = 1.25;

/// BPF time per connection (sk_lookup + sock_ops run time ÷ connections made).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BpfCostRow {
    /// ns per connection with the failure signals on (tcpshiftd's default).
    pub on_ns: Option<Spread>,
    /// ns per connection with the signals off (`--measure-without-signals`).
    pub off_ns: Option<Spread>,
    /// on ÷ off, taken within each round.
    pub ratio: Option<Spread>,
    /// sock_ops runs per connection, signals on.
    pub on_sock_ops_runs: Option<Spread>,
    /// sock_ops runs per connection, signals off.
    pub off_sock_ops_runs: Option<Spread>,
    /// Failed connections over all rounds.
    pub errors: u64,
}

/// Per round: (ns per connection, sock_ops runs per connection), signals on and off.
#[derive(Debug, Default)]
pub struct Acc {
    on: BTreeMap<u32, (f64, f64)>,
    off: BTreeMap<u32, (f64, f64)>,
    errors: u64,
    seen: bool,
}

impl Acc {
    /// Takes one record's figures (a round without connections or statistics is left out).
    pub fn add(
        &mut self,
        labels: &Labels,
        signals: bool,
        result: &RateResult,
        bpf: Option<BpfCost>,
    ) {
        self.seen = true;
        self.errors += result.errors;
        let Some(b) = bpf else { return };
        let Some(ns) = b.ns_per_connection(result.connections) else {
            return;
        };
        let runs = b.sock_ops_runs as f64 / result.connections as f64;
        let side = if signals { &mut self.on } else { &mut self.off };
        side.insert(labels.round, (ns, runs));
    }

    /// The row, if any such record was seen.
    pub fn row(self) -> Option<BpfCostRow> {
        if !self.seen {
            return None;
        }
        let of = |m: &BTreeMap<u32, (f64, f64)>, f: fn(&(f64, f64)) -> f64| {
            Spread::of(m.values().map(f))
        };
        let ratio = Spread::of(self.on.iter().filter_map(|(round, on)| {
            self.off
                .get(round)
                .filter(|off| off.0 > 0.0)
                .map(|off| on.0 / off.0)
        }));
        Some(BpfCostRow {
            on_ns: of(&self.on, |v| v.0),
            off_ns: of(&self.off, |v| v.0),
            ratio,
            on_sock_ops_runs: of(&self.on, |v| v.1),
            off_sock_ops_runs: of(&self.off, |v| v.1),
            errors: self.errors,
        })
    }
}

/// The goal row: "not measured" when either side is missing.
pub fn goal(row: Option<&BpfCostRow>) -> Goal {
    let v = row.and_then(|r| r.ratio);
    Goal {
        name: "BPF time per connection (sk_lookup + sock_ops), signals on ÷ off".into(),
        goal: format!("≤ {GOAL}"),
        measured: v.map(|v| v.median),
        shown: v.map_or("not measured".into(), |v| v.show(3)),
        met: v.is_some_and(|v| v.median <= GOAL),
    }
}

/// Problems: failed connections during the measurement.
pub fn problems(row: Option<&BpfCostRow>) -> Vec<String> {
    row.filter(|r| r.errors > 0)
        .map(|r| format!("tcpshift: {} failed connections (BPF cost)", r.errors))
        .into_iter()
        .collect()
}

/// The report's section.
pub fn markdown(o: &mut String, row: Option<&BpfCostRow>) {
    let Some(r) = row else { return };
    let _ = writeln!(
        o,
        "\n### BPF time per connection — tcpshift's failure signals on vs off\n\n\
         (sk_lookup + sock_ops run time from the kernel's BPF statistics) ÷ connections made, \
         connection-rate workload; off: tcpshiftd `--measure-without-signals` (a measurement \
         switch). Goal: on ÷ off ≤ {GOAL}.\n"
    );
    let _ = writeln!(o, "| signals | ns/connection | sock_ops runs/connection |");
    let _ = writeln!(o, "|---|---:|---:|");
    let nm = |s: Option<Spread>, d: usize| s.map_or("not measured".into(), |s| spread(&s, d));
    let _ = writeln!(
        o,
        "| on | {} | {} |",
        nm(r.on_ns, 0),
        nm(r.on_sock_ops_runs, 2)
    );
    let _ = writeln!(
        o,
        "| off | {} | {} |",
        nm(r.off_ns, 0),
        nm(r.off_sock_ops_runs, 2)
    );
    let _ = writeln!(o, "| on ÷ off | {} | |", nm(r.ratio, 3));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(acc: &mut Acc, round: u32, signals: bool, connections: u64, ns: u64) {
        let labels = Labels {
            target: "tcpshift".into(),
            round,
            ..Labels::default()
        };
        let result = RateResult {
            connections,
            ..RateResult::default()
        };
        let bpf = BpfCost {
            sk_lookup_runs: connections,
            sk_lookup_ns: ns / 2,
            sock_ops_runs: connections * 3,
            sock_ops_ns: ns - ns / 2,
        };
        acc.add(&labels, signals, &result, Some(bpf));
    }

    #[test]
    fn ratio_is_taken_within_rounds() {
        let mut acc = Acc::default();
        add(&mut acc, 1, true, 100, 60_000);
        add(&mut acc, 1, false, 200, 100_000);
        add(&mut acc, 2, true, 100, 90_000);
        add(&mut acc, 2, false, 100, 100_000);
        let row = acc.row().expect("a row");
        let ratio = row.ratio.expect("a ratio");
        assert_eq!((ratio.min, ratio.max), (0.9, 1.2));
        assert_eq!(row.on_sock_ops_runs.map(|s| s.median), Some(3.0));
        let g = goal(Some(&row));
        assert!(g.met, "{g:?}");
    }

    #[test]
    fn a_missing_side_is_not_measured() {
        let mut acc = Acc::default();
        add(&mut acc, 1, true, 100, 60_000);
        add(&mut acc, 2, false, 0, 0);
        let row = acc.row().expect("a row");
        assert!(row.off_ns.is_none() && row.ratio.is_none());
        let g = goal(Some(&row));
        assert_eq!((g.shown.as_str(), g.met), ("not measured", false));
        assert_eq!(goal(None).shown, "not measured");
        let mut md = String::new();
        markdown(&mut md, Some(&row));
        assert!(md.contains("| off | not measured |"), "{md}");
    }
}
