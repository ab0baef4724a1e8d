//! The fleet rollout task (with `--store`): while a rollout of the store is under way, this
//! node publishes the cumulative signals of its subsets under a lease and campaigns for the
//! driver key; the node holding it drives every fleet rollout ([`FleetDriver`]). When this
//! tcpshiftd dies, its lease expires, the key goes and another node drives, going on from the
//! stored step and pause.

use std::time::{Duration, Instant};

use tcpshift::{
    rollout::fleet::{FLEET_TICK, FleetDriver, node_signals},
    state::{RolloutRecord, State},
    store::{Store, StoreError},
};
use tracing::{info, warn};

/// Lease of this node's signals and driver key: another node drives at most this long after
/// the driving tcpshiftd dies.
const LEASE_TTL_SECS: i64 = 3;
/// How often the lease is refreshed.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

struct Task {
    store: Store,
    node: String,
    state: State,
    driver: FleetDriver,
    lease: Option<(i64, Instant)>,
    driving: bool,
}

/// Spawns the task on the current runtime.
pub fn spawn(store: Store, node: String, state: State) {
    tokio::spawn(async move {
        let mut task = Task {
            driver: FleetDriver::new(&node),
            store,
            node,
            state,
            lease: None,
            driving: false,
        };
        let mut last_error = String::new();
        loop {
            tokio::time::sleep(FLEET_TICK).await;
            match task.step().await {
                Ok(()) => last_error.clear(),
                Err(e) => {
                    let e = e.to_string();
                    // One line per new problem, not one per tick.
                    if e != last_error {
                        warn!("fleet rollouts: {e}");
                        last_error = e;
                    }
                }
            }
        }
    });
}

impl Task {
    /// The lease, granted or refreshed as needed.
    async fn lease(&mut self) -> Result<i64, StoreError> {
        match self.lease {
            Some((id, at)) if at.elapsed() < REFRESH_EVERY => return Ok(id),
            Some((id, _)) if self.store.refresh_lease(id).await? => {
                self.lease = Some((id, Instant::now()));
                return Ok(id);
            }
            _ => {}
        }
        let id = self.store.grant_lease(LEASE_TTL_SECS).await?;
        self.lease = Some((id, Instant::now()));
        Ok(id)
    }

    async fn step(&mut self) -> Result<(), StoreError> {
        let all: Vec<RolloutRecord> = self
            .store
            .rollouts()
            .await?
            .into_iter()
            .map(|r| r.record)
            .collect();
        if all.iter().all(|r| r.state.phase.is_final()) {
            self.driver.reset();
            return Ok(());
        }
        let lease = self.lease().await?;
        let status = self.state.status()?;
        self.store
            .publish_signals(&node_signals(&self.node, &status, &all), lease)
            .await?;
        let holder = self.store.campaign(&self.node, lease).await?;
        let driving = holder == self.node;
        if driving != self.driving {
            if driving {
                info!(node = %self.node, "this node drives the fleet's rollouts");
            } else {
                info!(node = %self.node, driver = %holder, "another node drives the fleet's rollouts");
            }
            self.driving = driving;
        }
        if driving {
            self.driver.tick(&self.store).await
        } else {
            self.driver.reset();
            Ok(())
        }
    }
}
