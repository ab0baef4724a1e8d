//! The outlier loop: every [`TICK`], for each service with outlier detection whose `interval`
//! is over, reads its subsets' failure counters, lets [`tcpshift::outlier::decide`] eject or
//! return subsets, and writes the records back to `TS_LIMITS`, where sk_lookup reads
//! `ejected`. Ejections whose time is up end at the next tick. The records (ejected, since,
//! until, why, times ejected, errors in a row) live in the pinned map, so a restarted tcpshiftd
//! goes on with them; only the last counter reading is kept here (a restart starts a new
//! interval).

use std::{collections::HashMap, time::Duration};

use tcpshift::{
    outlier::{self, Event, Interval},
    rollout::signals,
    state::{CounterStatus, State, unix_now_ms},
};
use tokio::time::Instant;
use tracing::{info, warn};

/// How often ejections are checked for their end and intervals for being over.
pub const TICK: Duration = Duration::from_millis(100);

/// What the loop keeps between ticks, per service id.
#[derive(Default)]
struct Service {
    /// The service's name (a new name on the same id starts afresh).
    name: String,
    /// When its last interval began.
    since: Option<Instant>,
    /// The counters at that time, per slot.
    counters: HashMap<u32, CounterStatus>,
}

/// Spawns the outlier task on the current runtime, with its own handle on the state.
pub fn spawn(mut state: State) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut services: HashMap<u32, Service> = HashMap::new();
        let mut last_error = String::new();
        loop {
            tick.tick().await;
            if !state.is_installed() {
                return;
            }
            match step(&mut state, &mut services) {
                Ok(()) => last_error.clear(),
                Err(e) => {
                    let e = e.to_string();
                    if e != last_error {
                        warn!("outlier detection: {e}");
                        last_error = e;
                    }
                }
            }
        }
    });
}

fn step(
    state: &mut State,
    services: &mut HashMap<u32, Service>,
) -> Result<(), tcpshift::state::StateError> {
    let now = Instant::now();
    let found = state.outlier_services()?;
    services.retain(|id, s| found.iter().any(|f| f.id == *id && f.name == s.name));
    for svc in found {
        let mem = services.entry(svc.id).or_insert_with(|| Service {
            name: svc.name.clone(),
            ..Default::default()
        });
        let due = mem
            .since
            .is_none_or(|t| now.duration_since(t) >= svc.interval);
        let mut subsets = svc.subsets;
        if due {
            let first = mem.since.is_none();
            for (slot, s) in subsets.iter_mut() {
                let c = state.subset_counters(*slot)?;
                if !first && let Some(before) = mem.counters.get(slot) {
                    s.interval = Some(Interval::of(&signals::between(before, &c)));
                }
                mem.counters.insert(*slot, c);
            }
            mem.since = Some(now);
        }
        let before: Vec<outlier::Record> = subsets.iter().map(|(_, s)| s.record).collect();
        let mut decided: Vec<outlier::Subset> = subsets.iter().map(|(_, s)| s.clone()).collect();
        let events = outlier::decide(unix_now_ms(), &mut decided);
        let changed: Vec<(u32, outlier::Record)> = subsets
            .iter()
            .zip(&decided)
            .zip(&before)
            .filter(|((_, d), b)| d.record != **b)
            .map(|(((slot, _), d), _)| (*slot, d.record))
            .collect();
        if !changed.is_empty() {
            state.store_outlier_records(&changed)?;
        }
        for e in events {
            match e {
                Event::Ejected {
                    subset,
                    errors,
                    until_ms,
                    times,
                    reason,
                } => info!(
                    service = %svc.name, subset = %subset, errors, times,
                    for_ms = until_ms.saturating_sub(unix_now_ms()),
                    "outlier detection: ejected after {errors} connection errors in a row ({reason:?}); ejection {times}"
                ),
                Event::Held { subset, errors } => info!(
                    service = %svc.name, subset = %subset, errors,
                    "outlier detection: not ejected despite {errors} errors in a row: maxEjectionPercent reached"
                ),
                Event::Returned { subset } => info!(
                    service = %svc.name, subset = %subset,
                    "outlier detection: ejection over, the subset gets new connections again"
                ),
            }
        }
    }
    Ok(())
}
