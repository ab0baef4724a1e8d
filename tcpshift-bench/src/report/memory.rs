//! Kernel memory per service in the scale runs ([`Record::Populate`] readings (a) and (b),
//! [`Record::Reweight`] reading (c)): its rows, its goal and its section of the report.
//!
//! [`Record::Populate`]: crate::record::Record::Populate
//! [`Record::Reweight`]: crate::record::Record::Reweight

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::{Goal, num, spread};
use crate::{
    memory::{KernelMemory, Stages},
    record::Labels,
    stats::Spread,
};

/// The goal: bytes per two-subset service at [`GOAL_SERVICES`] services.
pub const GOAL_BYTES: f64 = 2048.0;
/// The map size the goal is judged at.
pub const GOAL_SERVICES: u32 = 10_000;

/// Kernel memory of one map size (median [min–max] over rounds, bytes).
#[derive(Debug, Clone, Serialize)]
pub struct MemoryRow {
    /// Services configured.
    pub services: u32,
    /// Subsets per service.
    pub subsets: u32,
    /// (a) right after install, no service: the fixed base.
    pub base: Option<Spread>,
    /// (b) after populate (services applied, every socket registered).
    pub populated: Option<Spread>,
    /// (c) after one weight change of every service and the traffic runs.
    pub changed: Option<Spread>,
    /// (c − a) ÷ services: the marginal cost of a service.
    pub per_service: Option<Spread>,
    /// (c) ÷ services: the fixed base shared out.
    pub total_per_service: Option<Spread>,
}

/// One map's bytes at the largest size, per subset count (the last round with readings).
#[derive(Debug, Clone, Serialize)]
pub struct MapRow {
    /// Map name (pinned file).
    pub name: String,
    /// Its kind, e.g. `hash (no prealloc)`.
    pub kind: String,
    /// `max_entries`.
    pub max_entries: u64,
    /// Subsets → ((a) bytes, (c) bytes, (c − a) ÷ services).
    pub by_subsets: BTreeMap<u32, MapBytes>,
}

/// A map's (a) bytes, (c) bytes and (c − a) ÷ services.
pub type MapBytes = (Option<u64>, Option<u64>, Option<f64>);

/// The memory part of the summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemorySummary {
    /// One row per (services, subsets) that was populated.
    pub rows: Vec<MemoryRow>,
    /// The services of [`MemorySummary::maps`].
    pub maps_at: Option<u32>,
    /// Per map, at the largest size.
    pub maps: Vec<MapRow>,
}

/// The readings of one size in one round.
#[derive(Debug, Default)]
struct Readings {
    installed: Option<KernelMemory>,
    populated: Option<KernelMemory>,
    changed: Option<KernelMemory>,
}

/// Collects the readings of the scale runs.
#[derive(Debug, Default)]
pub struct Acc {
    by_size: BTreeMap<(u32, u32), BTreeMap<u32, Readings>>,
}

impl Acc {
    /// A populate record's readings (a) and (b).
    pub fn populated(
        &mut self,
        labels: &Labels,
        installed: Option<&KernelMemory>,
        populated: Option<&KernelMemory>,
    ) {
        if let Some(r) = self.readings(labels) {
            r.installed = installed.cloned();
            r.populated = populated.cloned();
        }
    }

    /// A reweight record's reading (c).
    pub fn changed(&mut self, labels: &Labels, memory: &KernelMemory) {
        if let Some(r) = self.readings(labels) {
            r.changed = Some(memory.clone());
        }
    }

    fn readings(&mut self, labels: &Labels) -> Option<&mut Readings> {
        let (Some(n), Some(s)) = (labels.services, labels.subsets) else {
            return None;
        };
        Some(
            self.by_size
                .entry((n, s))
                .or_default()
                .entry(labels.round)
                .or_default(),
        )
    }

    /// The rows and the per-map table.
    pub fn summary(self) -> MemorySummary {
        let mut rows = Vec::new();
        for (&(services, subsets), rounds) in &self.by_size {
            let total = |m: &Option<KernelMemory>| m.as_ref().map(|m| m.total() as f64);
            let stages: Vec<Stages> = rounds
                .values()
                .filter_map(|r| {
                    Some(Stages {
                        services,
                        base: r.installed.as_ref()?.total(),
                        populated: r.populated.as_ref().map_or(0, |m| m.total()),
                        changed: r.changed.as_ref()?.total(),
                    })
                })
                .collect();
            rows.push(MemoryRow {
                services,
                subsets,
                base: Spread::of(rounds.values().filter_map(|r| total(&r.installed))),
                populated: Spread::of(rounds.values().filter_map(|r| total(&r.populated))),
                changed: Spread::of(rounds.values().filter_map(|r| total(&r.changed))),
                per_service: Spread::of(stages.iter().filter_map(Stages::per_service)),
                total_per_service: Spread::of(stages.iter().filter_map(Stages::total_per_service)),
            });
        }
        let maps_at = self.by_size.keys().map(|k| k.0).max();
        let mut maps: BTreeMap<String, MapRow> = BTreeMap::new();
        for (&(services, subsets), rounds) in &self.by_size {
            if Some(services) != maps_at {
                continue;
            }
            // The last round with both readings.
            let Some((a, c)) = rounds
                .values()
                .rev()
                .find_map(|r| Some((r.installed.as_ref()?, r.changed.as_ref()?)))
            else {
                continue;
            };
            for m in a.maps.iter().chain(&c.maps) {
                let row = maps.entry(m.name.clone()).or_insert_with(|| MapRow {
                    name: m.name.clone(),
                    kind: m.kind(),
                    max_entries: m.max_entries,
                    by_subsets: BTreeMap::new(),
                });
                let (before, after) = (a.of(&m.name), c.of(&m.name));
                let per = after.map(|after| {
                    after.saturating_sub(before.unwrap_or(0)) as f64 / services.max(1) as f64
                });
                row.by_subsets.insert(subsets, (before, after, per));
            }
        }
        MemorySummary {
            rows,
            maps_at,
            maps: maps.into_values().collect(),
        }
    }
}

/// The goal row: "not measured" without a reading (c) and (a) at 10 000 × 2.
pub fn goal(s: &MemorySummary) -> Goal {
    let v = s
        .rows
        .iter()
        .find(|r| r.services == GOAL_SERVICES && r.subsets == 2)
        .and_then(|r| r.per_service);
    Goal {
        name: format!(
            "kernel memory per two-subset service at {} services, bytes ((c − a) ÷ n: all \
             pinned maps, kernel accounting)",
            num(GOAL_SERVICES as f64, 0)
        ),
        goal: format!("≤ {}", num(GOAL_BYTES, 0)),
        measured: v.map(|v| v.median),
        shown: v.map_or("not measured".into(), |v| spread(&v, 0)),
        met: v.is_some_and(|v| v.median <= GOAL_BYTES),
    }
}

/// Problems: a scale size whose memory could not be read.
pub fn problems(s: &MemorySummary) -> Vec<String> {
    s.rows
        .iter()
        .filter(|r| r.per_service.is_none())
        .map(|r| {
            format!(
                "kernel memory with {} services × {} subsets: not measured (a reading is missing)",
                r.services, r.subsets
            )
        })
        .collect()
}

/// The report's section.
pub fn markdown(o: &mut String, s: &MemorySummary) {
    if s.rows.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\n### Kernel memory per service (scale runs)\n\n\
         The kernel's own accounting (`memlock:` of each pinned map's fdinfo, what bpftool \
         shows as `bytes_memlock`), summed over every map pinned in the namespace's state \
         directory: (a) right after install with no service, (b) after populate (services \
         applied, every socket registered), (c) after one weight change of every service \
         (80/20 → 70/30; 16 subsets: one weight doubled) and the traffic runs. **Per service** \
         is (c − a) ÷ n, the marginal cost of a service (what the goal is about); total ÷ n \
         shares the fixed base out as well. On 6.18 a hash map without preallocation counts \
         the elements it holds (plus its bucket array, 16 B × `max_entries` rounded up to a \
         power of two, which is part of the base); an array or a preallocated map counts its \
         `max_entries` from the start. Bytes; median [min–max] over rounds.\n"
    );
    let _ = writeln!(
        o,
        "| services | subsets | base (a) | after populate (b) | after change (c) | per service (c − a) ÷ n | total ÷ n |"
    );
    let _ = writeln!(o, "|---:|---:|---:|---:|---:|---:|---:|");
    let nm = |v: Option<Spread>| v.map_or("not measured".into(), |v| spread(&v, 0));
    for r in &s.rows {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} |",
            num(r.services as f64, 0),
            r.subsets,
            nm(r.base),
            nm(r.populated),
            nm(r.changed),
            nm(r.per_service),
            nm(r.total_per_service),
        );
    }
    let Some(n) = s.maps_at else { return };
    if s.maps.is_empty() {
        return;
    }
    let subsets: Vec<u32> = {
        let mut v: Vec<u32> = s
            .maps
            .iter()
            .flat_map(|m| m.by_subsets.keys().copied())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let _ = writeln!(
        o,
        "\nWhere it goes, per map at {} services (the last round; bytes at (a) and (c), and \
         (c − a) ÷ n per service):\n",
        num(n as f64, 0)
    );
    let mut head = "| map | kind | max entries | base (a) |".to_string();
    let mut rule = "|---|---|---:|---:|".to_string();
    for s in &subsets {
        let _ = write!(head, " ×{s} subsets: (c) | per service |");
        rule.push_str("---:|---:|");
    }
    let _ = writeln!(o, "{head}\n{rule}");
    for m in &s.maps {
        let base = m.by_subsets.values().find_map(|v| v.0);
        let mut line = format!(
            "| {} | {} | {} | {} |",
            m.name,
            m.kind,
            num(m.max_entries as f64, 0),
            base.map_or("–".into(), |b| num(b as f64, 0))
        );
        for s in &subsets {
            let (c, per) = m
                .by_subsets
                .get(s)
                .map_or((None, None), |&(_, c, per)| (c, per));
            let _ = write!(
                line,
                " {} | {} |",
                c.map_or("–".into(), |c| num(c as f64, 0)),
                per.map_or("–".into(), |p| num(p, 1))
            );
        }
        let _ = writeln!(o, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MapMemory;

    fn mem(maps: &[(&str, u64)]) -> KernelMemory {
        KernelMemory {
            maps: maps
                .iter()
                .map(|&(name, memlock)| MapMemory {
                    name: name.into(),
                    map_type: 1,
                    map_flags: 1,
                    max_entries: 16_384,
                    memlock,
                })
                .collect(),
        }
    }

    fn labels(n: u32, s: u32, round: u32) -> Labels {
        Labels {
            target: "tcpshift".into(),
            round,
            services: Some(n),
            subsets: Some(s),
            ports: None,
        }
    }

    #[test]
    fn per_service_and_per_map() {
        let mut acc = Acc::default();
        for round in [1, 2] {
            let l = labels(10_000, 2, round);
            acc.populated(
                &l,
                Some(&mem(&[("TS_GLOBAL", 1_000), ("TS_SERVICES", 9_000)])),
                Some(&mem(&[("TS_GLOBAL", 1_000), ("TS_SERVICES", 10_009_000)])),
            );
            // A map created on first use shows in (c) only.
            acc.changed(
                &l,
                &mem(&[
                    ("TS_GLOBAL", 1_000),
                    ("TS_SERVICES", 10_009_000 + 1_000 * u64::from(round)),
                    ("TS_ROUTES", 10_000_000),
                ]),
            );
        }
        let s = acc.summary();
        assert_eq!(s.rows.len(), 1);
        let row = &s.rows[0];
        assert_eq!(row.base.map(|b| b.median), Some(10_000.0));
        let per = row.per_service.expect("per service");
        assert_eq!((per.min, per.max), (2_000.1, 2_000.2));
        let g = goal(&s);
        assert!(g.met, "{g:?}");
        assert_eq!(g.measured, Some(2_000.15));
        assert_eq!(s.maps_at, Some(10_000));
        let routes = s
            .maps
            .iter()
            .find(|m| m.name == "TS_ROUTES")
            .expect("routes");
        assert_eq!(
            routes.by_subsets[&2],
            (None, Some(10_000_000), Some(1_000.0))
        );
        let services = s
            .maps
            .iter()
            .find(|m| m.name == "TS_SERVICES")
            .expect("row");
        // The last round.
        assert_eq!(services.by_subsets[&2].2, Some(1_000.2));
        let mut md = String::new();
        markdown(&mut md, &s);
        assert!(
            md.contains("| TS_ROUTES | hash (no prealloc) | 16 384 | – | 10 000 000 | 1 000.0 |"),
            "{md}"
        );
        assert!(problems(&s).is_empty());
    }

    #[test]
    fn under_the_goal_is_met() {
        let mut acc = Acc::default();
        let l = labels(10_000, 2, 1);
        acc.populated(&l, Some(&mem(&[("A", 50_000)])), None);
        acc.changed(&l, &mem(&[("A", 50_000 + 10_000 * 1_500)]));
        let g = goal(&acc.summary());
        assert!(g.met, "{g:?}");
        assert_eq!(g.shown, "1 500");
        // Over it is not.
        let mut acc = Acc::default();
        acc.populated(&l, Some(&mem(&[("A", 50_000)])), None);
        acc.changed(&l, &mem(&[("A", 50_000 + 10_000 * 2_049)]));
        let g = goal(&acc.summary());
        assert!(!g.met && g.measured == Some(2_049.0), "{g:?}");
    }

    #[test]
    fn a_missing_reading_is_not_measured() {
        let mut acc = Acc::default();
        // Populate could not read (a); (c) alone says nothing per service.
        let l = labels(10_000, 2, 1);
        acc.populated(&l, None, None);
        acc.changed(&l, &mem(&[("A", 1)]));
        let s = acc.summary();
        let g = goal(&s);
        assert_eq!(
            (g.shown.as_str(), g.met, g.measured),
            ("not measured", false, None)
        );
        assert_eq!(problems(&s).len(), 1);
        let mut md = String::new();
        markdown(&mut md, &s);
        assert!(md.contains("| 10 000 | 2 | not measured |"), "{md}");
        // No scale run at all: the goal still shows.
        assert_eq!(goal(&MemorySummary::default()).shown, "not measured");
    }
}
