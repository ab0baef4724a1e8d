//! The rollout task: every [`TICK`], judges the rollouts whose interval is over and carries
//! out the decisions (see [`tcpshift::rollout::drive`]). Their state is in the pinned maps,
//! so a restarted tcpshiftd goes on at the same step and pause.

use tcpshift::{
    rollout::drive::{Driver, TICK},
    state::State,
};
use tracing::warn;

/// Spawns the rollout task on the current runtime, with its own handle on the state.
pub fn spawn(mut state: State) {
    tokio::spawn(async move {
        let mut driver = Driver::default();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error = String::new();
        loop {
            tick.tick().await;
            if !state.is_installed() {
                return;
            }
            match driver.tick(&mut state) {
                Ok(()) => last_error.clear(),
                Err(e) => {
                    let e = e.to_string();
                    // One line per new problem, not one per tick.
                    if e != last_error {
                        warn!("rollouts: {e}");
                        last_error = e;
                    }
                }
            }
        }
    });
}
