//! `tcpshiftctl metrics`: the Prometheus text `tcpshiftd --metrics` serves, read from the
//! kernel.

use anyhow::Result;
use tcpshift::{metrics, netns::Netns, state::State};

/// `tcpshiftctl metrics`.
pub fn run(netns: &Netns) -> Result<()> {
    let status = State::open_read_only(netns)?.status()?;
    print!("{}", metrics::render(&status)?);
    Ok(())
}
