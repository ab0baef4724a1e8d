//! tcpshift's benchmark: the load generator `tcpshift-load` and the report of
//! `cargo xtask bench`.
//!
//! - [`load`]: the client workloads (connection rate, fixed-rate latency, bulk throughput);
//! - [`steer`]: tcpshift-specific measurements (many services, BPF run time, weight changes);
//! - [`bpf_cost`]: both programs' BPF time per connection (signals on vs off, and per
//!   balancing mode and with connection limits);
//! - [`memory`]: kernel memory of every pinned map, by the kernel's own accounting;
//! - [`record`]: one measurement as printed by `tcpshift-load`;
//! - [`stats`]: percentiles and min/median/max;
//! - [`report`]: the summary table, `results.json` and the chart.

pub mod bpf_cost;
pub mod load;
pub mod memory;
pub mod record;
pub mod report;
pub mod stats;
pub mod steer;
