//! `tcpshiftctl uninstall`: detach tcpshift from the namespace and remove what it pinned.

use anyhow::Result;
use tcpshift::{netns::Netns, state::State};

/// `tcpshiftctl uninstall`.
pub fn run(netns: &Netns) -> Result<()> {
    match State::uninstall(netns)? {
        Some(dir) => println!("removed {} (program detached, maps deleted)", dir.display()),
        None => println!("nothing to remove: tcpshift is not installed in this network namespace"),
    }
    Ok(())
}
