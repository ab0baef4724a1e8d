//! Replacing an adopted state's programs with this version's, in place.

use std::time::Instant;

use anyhow::{Context, Result};
use tcpshift::{
    EBPF_OBJECT,
    state::{ProgramChange, State},
};
use tracing::{debug, info};

/// Replaces the adopted state's programs with this version's, in place (maps kept), when they
/// differ or `force` is set, and says what happened.
pub fn upgrade(state: &mut State, force: bool) -> Result<()> {
    let started = Instant::now();
    let upgrade = state
        .upgrade_programs(EBPF_OBJECT, force)
        .context("cannot upgrade the running programs in place")?;
    let took = started.elapsed();
    let links = [
        ("sk_lookup", Some(upgrade.sk_lookup)),
        ("sock_ops", upgrade.sock_ops),
    ];
    let mut unchanged = Vec::new();
    for (name, change) in links {
        match change {
            Some(ProgramChange::Replaced { old, new }) => {
                info!(took = ?took, "replaced the {name} program in place: {old} -> {new}")
            }
            Some(ProgramChange::Unchanged(p)) => unchanged.push(format!("{name} {p}")),
            None => {}
        }
    }
    if unchanged.len() == links.iter().filter(|(_, c)| c.is_some()).count() {
        info!(
            "running programs are this version's: {}",
            unchanged.join(", ")
        );
    } else if !unchanged.is_empty() {
        info!(
            "kept the running program, identical to this version's: {}",
            unchanged.join(", ")
        );
    }
    if upgrade.sock_ops.is_none() {
        debug!("no sock_ops link is pinned (connection accounting off): nothing to replace there");
    }
    Ok(())
}
