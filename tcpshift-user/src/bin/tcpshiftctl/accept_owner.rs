//! `tcpshiftctl accept-owner SERVICE SUBSET`: trust the next socket found on a subset's
//! backend address, whoever owns it.

use anyhow::Result;
use tcpshift::{
    netns::Netns,
    state::{State, user_name},
};

/// `tcpshiftctl accept-owner SERVICE SUBSET`.
pub fn run(netns: &Netns, service: &str, subset: &str) -> Result<()> {
    let mut state = State::open(netns)?;
    match state.accept_owner(service, subset)? {
        Some(uid) => println!(
            "service/{service} subset {subset}: no longer bound to uid {uid}{}; the next socket \
             found on its backend address is registered and its owner trusted",
            user_name(uid)
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        ),
        None => println!(
            "service/{service} subset {subset}: no owner was trusted yet; the next socket found \
             on its backend address is registered and its owner trusted"
        ),
    }
    Ok(())
}
