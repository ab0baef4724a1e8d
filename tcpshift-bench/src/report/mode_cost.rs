//! BPF time per connection of the balancing modes and of connection limits
//! ([`Record::ModeCost`](crate::record::Record::ModeCost)): its rows, its goals and its
//! section of the report.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::{Goal, spread};
use crate::{bpf_cost::BpfCost, load::RateResult, record::Labels, stats::Spread};

/// The settings, in the report's order; the first is the reference of every ratio.
pub const SETTINGS: [(&str, &str); 4] = [
    ("hash", "hash (default)"),
    ("source-ip", "`affinity: source-ip`"),
    ("round-robin", "`balance: round-robin`"),
    ("limits", "hash, `maxConnections` far above the load"),
];

/// The goal of every setting: sk_lookup ns/run at most this many times the hash mode's.
pub const GOAL: f64 = 1.5;

/// One setting's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ModeCostRow {
    /// `hash`, `source-ip`, `round-robin` or `limits`.
    pub setting: String,
    /// sk_lookup run time ÷ its runs, ns.
    pub sk_lookup_ns_per_run: Option<Spread>,
    /// ÷ the hash mode's, within each round.
    pub sk_lookup_ratio: Option<Spread>,
    /// (sk_lookup + sock_ops run time) ÷ connections, ns.
    pub ns_per_connection: Option<Spread>,
    /// ÷ the hash mode's, within each round.
    pub ns_per_connection_ratio: Option<Spread>,
    /// Failed connections over all rounds.
    pub errors: u64,
}

/// One round's (sk_lookup ns/run, both programs' ns/connection).
type Figures = (Option<f64>, Option<f64>);

/// Per setting, per round: (sk_lookup ns/run, both programs' ns/connection).
#[derive(Debug, Default)]
pub struct Acc {
    by_setting: BTreeMap<String, BTreeMap<u32, Figures>>,
    errors: BTreeMap<String, u64>,
}

impl Acc {
    /// Takes one record's figures (missing statistics leave the round out).
    pub fn add(
        &mut self,
        labels: &Labels,
        setting: &str,
        result: &RateResult,
        bpf: Option<BpfCost>,
    ) {
        *self.errors.entry(setting.to_string()).or_default() += result.errors;
        let per_run = bpf
            .filter(|b| b.sk_lookup_runs > 0)
            .map(|b| b.sk_lookup_ns as f64 / b.sk_lookup_runs as f64);
        let per_conn = bpf.and_then(|b| b.ns_per_connection(result.connections));
        self.by_setting
            .entry(setting.to_string())
            .or_default()
            .insert(labels.round, (per_run, per_conn));
    }

    /// One row per setting seen (empty when the step did not run).
    pub fn rows(self) -> Vec<ModeCostRow> {
        let hash = self.by_setting.get(SETTINGS[0].0);
        let ratio = |rounds: &BTreeMap<u32, Figures>, pick: fn(&Figures) -> Option<f64>| {
            Spread::of(rounds.iter().filter_map(|(round, v)| {
                let base = pick(hash?.get(round)?).filter(|b| *b > 0.0)?;
                Some(pick(v)? / base)
            }))
        };
        let mut names: Vec<&String> = self.by_setting.keys().collect();
        names.sort_by_key(|n| {
            SETTINGS
                .iter()
                .position(|s| s.0 == n.as_str())
                .unwrap_or(usize::MAX)
        });
        names
            .into_iter()
            .map(|name| {
                let rounds = &self.by_setting[name];
                ModeCostRow {
                    setting: name.clone(),
                    sk_lookup_ns_per_run: Spread::of(rounds.values().filter_map(|v| v.0)),
                    sk_lookup_ratio: ratio(rounds, |v| v.0),
                    ns_per_connection: Spread::of(rounds.values().filter_map(|v| v.1)),
                    ns_per_connection_ratio: ratio(rounds, |v| v.1),
                    errors: self.errors.get(name).copied().unwrap_or(0),
                }
            })
            .collect()
    }
}

/// The goal rows: one per setting but the hash mode, "not measured" when the setting or the
/// hash mode of the same round is missing.
pub fn goals(rows: &[ModeCostRow]) -> Vec<Goal> {
    SETTINGS[1..]
        .iter()
        .map(|&(setting, _)| {
            let v = rows
                .iter()
                .find(|r| r.setting == setting)
                .and_then(|r| r.sk_lookup_ratio);
            let name = match setting {
                "limits" => "sk_lookup ns/run, connection limits on ÷ off (hash mode)".to_string(),
                s => format!("sk_lookup ns/run, {s} ÷ hash"),
            };
            Goal {
                name,
                goal: format!("≤ {GOAL}"),
                measured: v.map(|v| v.median),
                shown: v.map_or("not measured".into(), |v| v.show(3)),
                met: v.is_some_and(|v| v.median <= GOAL),
            }
        })
        .collect()
}

/// Problems: failed connections during the measurement.
pub fn problems(rows: &[ModeCostRow]) -> Vec<String> {
    rows.iter()
        .filter(|r| r.errors > 0)
        .map(|r| {
            format!(
                "tcpshift ({}): {} failed connections (mode cost)",
                r.setting, r.errors
            )
        })
        .collect()
}

/// The report's section.
pub fn markdown(o: &mut String, rows: &[ModeCostRow]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\n### BPF time per connection — balancing modes and connection limits\n\n\
         The 80/20 service in four settings, each with tcpshiftd started for it, interleaved \
         within every round (the first rotating): sk_lookup run time ÷ its runs, and both \
         programs' (sk_lookup + sock_ops) run time ÷ connections made, from the kernel's BPF \
         statistics over a connection-rate window; ratios to the hash mode are taken within \
         the same round. `limits` sets `maxConnections` far above the load on every subset, \
         so sk_lookup reads the limits of every candidate but diverts nothing. The client \
         connects from one address (127.0.0.1): the per-run cost of `affinity: source-ip` \
         does not depend on how many there are. Goal, each setting: sk_lookup ns/run ≤ \
         {GOAL} × the hash mode's.\n"
    );
    let _ = writeln!(
        o,
        "| setting | sk_lookup ns/run | × hash | ns/connection (both programs) | × hash |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|");
    let nm = |s: Option<Spread>, d: usize| s.map_or("not measured".into(), |s| spread(&s, d));
    for (setting, label) in SETTINGS {
        let Some(r) = rows.iter().find(|r| r.setting == setting) else {
            let _ = writeln!(o, "| {label} |{}", " not measured |".repeat(4));
            continue;
        };
        let _ = writeln!(
            o,
            "| {label} | {} | {} | {} | {} |",
            nm(r.sk_lookup_ns_per_run, 0),
            nm(r.sk_lookup_ratio, 3),
            nm(r.ns_per_connection, 0),
            nm(r.ns_per_connection_ratio, 3),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(acc: &mut Acc, round: u32, setting: &str, sk_ns: u64, sock_ops_ns: u64) {
        let labels = Labels {
            target: "tcpshift".into(),
            round,
            ..Labels::default()
        };
        let result = RateResult {
            connections: 100,
            ..RateResult::default()
        };
        let bpf = BpfCost {
            sk_lookup_runs: 100,
            sk_lookup_ns: sk_ns,
            sock_ops_runs: 1_300,
            sock_ops_ns,
        };
        acc.add(&labels, setting, &result, Some(bpf));
    }

    #[test]
    fn ratios_to_hash_within_rounds() {
        let mut acc = Acc::default();
        add(&mut acc, 1, "limits", 120_000, 200_000);
        add(&mut acc, 1, "hash", 100_000, 200_000);
        add(&mut acc, 2, "hash", 200_000, 200_000);
        add(&mut acc, 2, "limits", 200_000, 200_000);
        add(&mut acc, 1, "round-robin", 400_000, 200_000);
        let rows = acc.rows();
        assert_eq!(
            rows.iter().map(|r| r.setting.as_str()).collect::<Vec<_>>(),
            ["hash", "round-robin", "limits"]
        );
        let limits = &rows[2];
        let r = limits.sk_lookup_ratio.expect("ratio");
        assert_eq!((r.min, r.max), (1.0, 1.2));
        assert_eq!(limits.sk_lookup_ns_per_run.map(|s| s.max), Some(2_000.0));
        let goals = goals(&rows);
        assert_eq!(goals.len(), 3);
        let by = |n: &str| goals.iter().find(|g| g.name.contains(n)).expect(n).clone();
        assert!(by("limits on").met);
        let rr = by("round-robin");
        assert!(!rr.met && rr.measured == Some(4.0), "{rr:?}");
        // affinity never ran: not measured, and shown as such.
        let aff = by("source-ip");
        assert_eq!((aff.shown.as_str(), aff.met), ("not measured", false));
        let mut md = String::new();
        markdown(&mut md, &rows);
        assert!(
            md.contains("| `affinity: source-ip` | not measured |"),
            "{md}"
        );
        assert!(
            md.contains("| hash (default) | 1 500 [1 000–2 000] | 1.000 |"),
            "{md}"
        );
    }

    #[test]
    fn without_hash_no_ratio() {
        let mut acc = Acc::default();
        add(&mut acc, 1, "limits", 120_000, 200_000);
        let rows = acc.rows();
        assert!(rows[0].sk_lookup_ratio.is_none());
        assert!(goals(&rows).iter().all(|g| g.measured.is_none()));
        assert!(goals(&[]).iter().all(|g| g.shown == "not measured"));
    }
}
