//! `tcpshiftctl set-weight`: new weights for one service, effective for the next connection.

use anyhow::Result;
use tcpshift::{netns::Netns, state::State, weights};

/// `tcpshiftctl set-weight [--service NAME] SUBSET=WEIGHT...`.
pub fn run(netns: &Netns, service: Option<&str>, assignments: &[String]) -> Result<()> {
    let requested = assignments
        .iter()
        .map(|w| weights::parse_assignment(w))
        .collect::<Result<Vec<_>, _>>()?;
    let mut state = State::open(netns)?;
    let (name, new) = state.set_weights(service, &requested)?;
    let shown: Vec<String> = new.iter().map(|(s, w)| format!("{s}={w}")).collect();
    println!("{name}: {}", shown.join(" "));
    Ok(())
}
