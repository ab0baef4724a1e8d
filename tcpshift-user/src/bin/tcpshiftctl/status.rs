//! `tcpshiftctl status`: services, subsets, weights, live sockets and counters.

use anyhow::Result;
use tcpshift::{netns::Netns, report, state::State};

/// `tcpshiftctl status [--json]`.
pub fn run(netns: &Netns, json: bool) -> Result<()> {
    let status = State::open_read_only(netns)?.status()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        if let Some(note) = crate::fleet::local_note(netns) {
            println!("{note}");
        }
        print!("{}", report::status_table(&status));
    }
    Ok(())
}
