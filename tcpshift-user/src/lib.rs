//! tcpshift userspace library: everything the loader (`tcpshiftd`) and the control CLI
//! (`tcpshiftctl`) share.
//!
//! - [`model`]: services, subsets, listen addresses and plan types (no YAML, no BPF);
//! - [`yaml`]: the YAML toolkit both parsers share: bounded reads, documents, field
//!   locations, weights and ports, the one error type;
//! - [`config`]: the YAML configuration, parsed and validated;
//! - [`weights`]: weight arithmetic and bucket tables;
//! - [`discovery`]: finding a backend's listening socket and taking a reference to it, over
//!   [`procfs`], the one `/proc` walker;
//! - [`istio`]: `tcpshiftctl apply`: Istio VirtualService / DestinationRule / Gateway objects,
//!   Gateway API Gateways and TCPRoutes, and `services:` documents, mapped onto services;
//! - [`rollout`]: `Rollout` documents and the driver of progressive rollouts;
//! - [`outlier`]: outlier ejection's pure decisions (which subsets to eject, when they return);
//! - [`store`]: the fleet's desired state in etcd (`--store`);
//! - [`netns`]: network namespaces and bpffs;
//! - [`state`]: the pinned per-namespace state (the only module that touches the BPF maps);
//! - [`sockdiag`]: byte counts of open connections, from the kernel's socket diagnostics;
//! - [`metrics`]: the status as Prometheus text (`tcpshiftd --metrics`, `tcpshiftctl metrics`);
//! - [`report`]: every table `tcpshiftctl` prints (status, top, get, apply's result);
//! - [`cli_docs`]: man pages and shell completions from the binaries' clap definitions.

pub mod cli_docs;
pub mod config;
pub mod discovery;
pub mod istio;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod outlier;
pub mod procfs;
pub mod report;
pub mod rollout;
pub mod sockdiag;
pub mod state;
pub mod store;
pub mod weights;
pub mod yaml;

/// The eBPF object built from `tcpshift-ebpf` (see `build.rs`).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpshift.bpf.o"));
