//! One measurement as `tcpshift-load` prints it: a JSON object on one line. `cargo xtask bench`
//! collects them in `target/bench/raw.jsonl` and [`crate::report`] summarises them.

use serde::{Deserialize, Serialize};

use crate::{
    bpf_cost::BpfCost,
    load::{BulkResult, CpuUse, PacedResult, RateResult},
    steer::{BpfStats, FlipSample, PopulateResult, ReweightResult},
};

/// Names the measurement: which target, which round, and for scale runs the map size.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labels {
    /// `direct`, `tcpshift`, `nftables`, `haproxy`, `nginx`.
    pub target: String,
    /// Repetition number (1-based).
    pub round: u32,
    /// Services configured (scale runs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<u32>,
    /// Subsets per service (scale runs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsets: Option<u32>,
    /// Service ports the connections were spread over (scale runs only; absent in records
    /// of the previous method, which spread them over every service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<u32>,
}

/// One measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "workload", rename_all = "kebab-case")]
pub enum Record {
    /// (a) closed-loop connection rate at a concurrency (and, with `services`, a scale run).
    Rate {
        /// Which measurement.
        labels: Labels,
        /// Client threads.
        concurrency: usize,
        /// What the clients saw.
        result: RateResult,
        /// The sk_lookup program's own cost (tcpshift runs with `--bpf-stats`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bpf: Option<BpfStats>,
        /// CPU time of all benchmark processes per connection (with `--cpu-cgroup`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu: Option<CpuUse>,
    },
    /// (b) latency at a fixed connection rate.
    Latency {
        /// Which measurement.
        labels: Labels,
        /// Client threads.
        workers: usize,
        /// What the clients saw.
        result: PacedResult,
        /// CPU time of all benchmark processes per connection (with `--cpu-cgroup`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu: Option<CpuUse>,
    },
    /// (c) bulk throughput on long connections.
    Bulk {
        /// Which measurement.
        labels: Labels,
        /// Long connections.
        connections: usize,
        /// Bytes per line sent.
        line_bytes: usize,
        /// What the clients saw.
        result: BulkResult,
        /// CPU time of all benchmark processes per echoed MiB (with `--cpu-cgroup`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu: Option<CpuUse>,
    },
    /// (d) split accuracy: a fixed number of connections and where they went.
    Split {
        /// Which measurement.
        labels: Labels,
        /// Client threads.
        concurrency: usize,
        /// The share the configuration gives the second subset, in percent.
        expected_v2_percent: f64,
        /// What the clients saw (prefixes count the replies per backend).
        result: RateResult,
    },
    /// (e) filling the maps for a scale run.
    Populate {
        /// Which measurement.
        labels: Labels,
        /// Timings.
        result: PopulateResult,
    },
    /// (e) one weight change of every service of a scale run (after its traffic), and the
    /// kernel memory afterwards.
    Reweight {
        /// Which measurement.
        labels: Labels,
        /// Timings and the memory reading.
        result: ReweightResult,
    },
    /// (f) weight-change latency.
    WeightChange {
        /// Which measurement.
        labels: Labels,
        /// One entry per change.
        samples: Vec<FlipSample>,
    },
    /// BPF time per connection: connection rate with both programs' run time, tcpshift
    /// started with its failure signals on or off.
    BpfCost {
        /// Which measurement.
        labels: Labels,
        /// Whether tcpshiftd ran with the failure signals (off: `--measure-without-signals`).
        signals: bool,
        /// Client threads.
        concurrency: usize,
        /// What the clients saw.
        result: RateResult,
        /// Both programs' run time in the window; `None` when it could not be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bpf: Option<BpfCost>,
    },
    /// BPF time per connection of one balancing setting of the 80/20 service: `hash` (the
    /// default), `source-ip` (affinity), `round-robin`, or `limits` (hash with connection
    /// limits set far above the load).
    ModeCost {
        /// Which measurement.
        labels: Labels,
        /// The setting.
        setting: String,
        /// Client threads.
        concurrency: usize,
        /// What the clients saw.
        result: RateResult,
        /// Both programs' run time in the window; `None` when it could not be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bpf: Option<BpfCost>,
    },
}

impl Record {
    /// The labels of any record.
    pub fn labels(&self) -> &Labels {
        match self {
            Record::Rate { labels, .. }
            | Record::Latency { labels, .. }
            | Record::Bulk { labels, .. }
            | Record::Split { labels, .. }
            | Record::Populate { labels, .. }
            | Record::WeightChange { labels, .. }
            | Record::Reweight { labels, .. }
            | Record::BpfCost { labels, .. }
            | Record::ModeCost { labels, .. } => labels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let r = Record::Rate {
            labels: Labels {
                target: "direct".into(),
                round: 2,
                services: None,
                subsets: None,
                ports: None,
            },
            concurrency: 4,
            result: RateResult {
                connections: 10,
                rate: 5.0,
                ..RateResult::default()
            },
            bpf: None,
            cpu: None,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.starts_with(r#"{"workload":"rate","labels":{"target":"direct","round":2}"#));
        let back: Record = serde_json::from_str(&s).unwrap();
        assert_eq!(back.labels().round, 2);
        let Record::Rate { result, .. } = back else {
            panic!("wrong variant")
        };
        assert_eq!(result.connections, 10);
    }
}
