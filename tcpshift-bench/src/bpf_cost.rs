//! BPF time per connection: the run time of both of tcpshift's programs (sk_lookup and
//! sock_ops) over a measured window, divided by the connections made. `cargo xtask bench`
//! measures it with the kernel's failure signals on and off (tcpshiftd's hidden
//! `--measure-without-signals`) to report what the signals cost.

use std::{os::fd::OwnedFd, path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tcpshift::{
    netns::Netns,
    state::{SOCKOPS_LINK, state_dir},
};

use crate::load;

/// Run time of tcpshift's two programs over a window, and the connections made in it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct BpfCost {
    /// sk_lookup runs in the window.
    pub sk_lookup_runs: u64,
    /// sk_lookup run time in the window, ns.
    pub sk_lookup_ns: u64,
    /// sock_ops runs in the window (every callback of every socket of the host).
    pub sock_ops_runs: u64,
    /// sock_ops run time in the window, ns.
    pub sock_ops_ns: u64,
}

impl BpfCost {
    /// Both programs' time divided by `connections`; `None` without a connection.
    pub fn ns_per_connection(&self, connections: u64) -> Option<f64> {
        (connections > 0)
            .then(|| (self.sk_lookup_ns + self.sock_ops_ns) as f64 / connections as f64)
    }
}

/// Reads both programs' run-time statistics (enabled while this value lives).
pub struct CostMeter {
    sk_lookup: u32,
    sock_ops: u32,
    _enabled: OwnedFd,
    start: Option<[(u64, u64); 2]>,
    result: Option<BpfCost>,
}

/// The id of the program behind a pinned link.
fn program_of(link: &Path) -> Result<u32> {
    let pinned = aya::programs::links::PinnedLink::from_pin(link)
        .with_context(|| format!("cannot open {} (is tcpshift installed?)", link.display()))?;
    let fd_link: aya::programs::links::FdLink = pinned.into();
    Ok(fd_link
        .info()
        .with_context(|| format!("cannot read the program of {}", link.display()))?
        .program_id())
}

impl CostMeter {
    /// Finds the programs tcpshift attached for the current network namespace and enables
    /// the kernel's BPF run-time statistics.
    pub fn new() -> Result<Self> {
        let dir = state_dir(&Netns::current()?);
        let sk_lookup = program_of(&dir.join("link"))?;
        let sock_ops = program_of(&dir.join(SOCKOPS_LINK))?;
        let enabled = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("cannot enable BPF run-time statistics")?;
        Ok(CostMeter {
            sk_lookup,
            sock_ops,
            _enabled: enabled,
            start: None,
            result: None,
        })
    }

    /// (run time ns, run count) of both programs.
    fn read(&self) -> Result<[(u64, u64); 2]> {
        let mut out = [None, None];
        for info in aya::programs::loaded_programs() {
            let info = info.context("cannot list BPF programs")?;
            let figures = (
                Duration::as_nanos(&info.run_time()) as u64,
                info.run_count(),
            );
            if info.id() == self.sk_lookup {
                out[0] = Some(figures);
            } else if info.id() == self.sock_ops {
                out[1] = Some(figures);
            }
        }
        match out {
            [Some(a), Some(b)] => Ok([a, b]),
            _ => bail!(
                "BPF program {} or {} is gone",
                self.sk_lookup,
                self.sock_ops
            ),
        }
    }

    /// Handles one edge of the measured window (see [`load::rate`]).
    pub fn edge(&mut self, edge: load::Edge) {
        match edge {
            load::Edge::Start => self.start = self.read().ok(),
            load::Edge::End => {
                if let (Some(s), Ok(e)) = (self.start, self.read()) {
                    self.result = Some(BpfCost {
                        sk_lookup_ns: e[0].0.saturating_sub(s[0].0),
                        sk_lookup_runs: e[0].1.saturating_sub(s[0].1),
                        sock_ops_ns: e[1].0.saturating_sub(s[1].0),
                        sock_ops_runs: e[1].1.saturating_sub(s[1].1),
                    });
                }
            }
        }
    }

    /// The figures of the window, once it has ended.
    pub fn result(&self) -> Option<BpfCost> {
        self.result
    }
}
