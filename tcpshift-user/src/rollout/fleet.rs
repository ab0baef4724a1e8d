//! Rollouts in a fleet: driven once for all nodes, judged on the sum of their signals.
//!
//! The record of each rollout lives in the store ([`crate::store::rollouts`]); every node's
//! tcpshiftd publishes the cumulative signals of the subsets under a rollout
//! ([`node_signals`]) and campaigns for the driver key; the one node holding it runs
//! [`FleetDriver::tick`]: once per analysis interval it sums, over the nodes seen at both
//! ends of the interval, what each node's counters moved by, judges that with the same pure
//! decision logic a single host uses ([`crate::model::rollout`], through [`super::drive`]'s
//! helpers), and writes the decision's weights as an ordinary change of the desired state in
//! the same transaction as the record, so every node applies them like a `set-weight`.
//! The commands of `tcpshiftctl --store rollout` ([`start`], [`command`], [`forget`]) write
//! the store directly, like `set-weight` does; they need no driver.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use tracing::info;

use super::{
    drive::{self, Command},
    signals,
};
use crate::{
    model::rollout::{self, Decision, RolloutSpec, Signals},
    state::{RolloutRecord, Status},
    store::{NodeSignals, Snapshot, Store, StoreError, StoredRollout, client::UPDATE_ATTEMPTS},
};

/// The signals node `node` publishes: the cumulative counters of the stable and canary
/// subsets of every rollout of `rollouts` that is under way, from its kernel's `status`.
pub fn node_signals(node: &str, status: &Status, rollouts: &[RolloutRecord]) -> NodeSignals {
    let mut out = NodeSignals {
        node: node.to_string(),
        services: BTreeMap::new(),
    };
    for r in rollouts.iter().filter(|r| !r.state.phase.is_final()) {
        let Some(svc) = status.services.iter().find(|s| s.name == r.spec.service) else {
            continue;
        };
        let entry = out.services.entry(svc.name.clone()).or_default();
        for s in &svc.subsets {
            if s.name == r.spec.stable || s.name == r.spec.canary {
                entry.insert(s.name.clone(), signals::cumulative(&s.counters));
            }
        }
    }
    out
}

/// Logs `d`, takes it into `stored`'s record (with `driver` as the driving node) and writes
/// the record — and the decision's weights, when it has some — in one transaction against
/// `base`. `None` when another writer came first (nothing written).
async fn carry_out(
    store: &Store,
    base: &Snapshot,
    stored: StoredRollout,
    d: Decision,
    driver: Option<&str>,
) -> Result<Option<RolloutRecord>, StoreError> {
    let mut record = stored.record;
    drive::settle(&mut record, &d);
    if let Some(node) = driver {
        record.driver = Some(node.to_string());
    }
    let mut next = None;
    if let Some(w) = d.canary_weight {
        let s = &record.spec;
        match base.state.with_weights(
            Some(&s.service),
            &[(s.stable.clone(), 100 - w), (s.canary.clone(), w)],
        ) {
            Ok(r) => next = Some(r.state),
            Err(e) => drive::unwritable(&mut record, &e),
        }
    }
    if store
        .commit_rollout(&record, stored.revision, base, next.as_ref())
        .await?
    {
        Ok(Some(record))
    } else {
        Ok(None)
    }
}

/// `tcpshiftctl --store rollout start` / `apply -f` of a `Rollout`: checks `spec` against the
/// fleet's services and its other rollouts, stores it and writes its first weights (one
/// transaction, retried when another writer came first).
pub async fn start(store: &Store, spec: RolloutSpec) -> Result<RolloutRecord, StoreError> {
    spec.validate()
        .map_err(|e| crate::state::StateError::Rollout(format!("rollout {:?}: {e}", spec.name)))?;
    for _ in 0..UPDATE_ATTEMPTS {
        let base = store.load().await?;
        drive::check_services(&spec, base.state.services().map(|s| &s.config))?;
        let all = store.rollouts().await?;
        let records: Vec<RolloutRecord> = all.iter().map(|r| r.record.clone()).collect();
        let d = drive::check_start(&records, &spec)?;
        let revision = all
            .iter()
            .find(|r| r.record.spec.name == spec.name)
            .map_or(0, |r| r.revision);
        let stored = StoredRollout {
            record: RolloutRecord::new(spec.clone(), d.state.clone()),
            revision,
        };
        if let Some(r) = carry_out(store, &base, stored, d, None).await? {
            return Ok(r);
        }
    }
    Err(StoreError::Contended {
        attempts: UPDATE_ATTEMPTS,
    })
}

fn no_such(name: &str, all: &[StoredRollout]) -> StoreError {
    let known: Vec<&str> = all.iter().map(|r| r.record.spec.name.as_str()).collect();
    crate::state::StateError::Rollout(format!(
        "no rollout named {name:?} in the store (rollouts: {}); start one with `tcpshiftctl --store URL rollout start`",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ))
    .into()
}

/// A manual command on the fleet rollout `name` (one transaction, retried when another
/// writer — the driver — came first).
pub async fn command(store: &Store, name: &str, cmd: Command) -> Result<RolloutRecord, StoreError> {
    for _ in 0..UPDATE_ATTEMPTS {
        let base = store.load().await?;
        let Some(stored) = store.rollout(name).await? else {
            return Err(no_such(name, &store.rollouts().await?));
        };
        let d = drive::decide(&stored.record, cmd)?;
        if let Some(r) = carry_out(store, &base, stored, d, None).await? {
            return Ok(r);
        }
    }
    Err(StoreError::Contended {
        attempts: UPDATE_ATTEMPTS,
    })
}

/// `rollout abort --forget` on the fleet: aborts `name` when under way, then removes its
/// record; whether there was one.
pub async fn forget(store: &Store, name: &str) -> Result<bool, StoreError> {
    match store.rollout(name).await {
        Ok(Some(r)) if !r.record.state.phase.is_final() => {
            command(store, name, Command::Abort).await?;
        }
        Ok(_) => {}
        Err(StoreError::Corrupt { .. }) => {}
        Err(e) => return Err(e),
    }
    store.remove_rollout(name).await
}

/// What the driver remembers of one rollout's interval: when it started and each node's
/// cumulative (stable, canary) signals then. In memory only: a new driver starts a new
/// interval, while the step and the elapsed pause come from the stored record.
#[derive(Debug)]
struct Baseline {
    since: Instant,
    nodes: BTreeMap<String, [Signals; 2]>,
}

/// The fleet's rollout driver (run by the node holding the driver key).
#[derive(Debug)]
pub struct FleetDriver {
    node: String,
    baselines: HashMap<String, Baseline>,
}

impl FleetDriver {
    /// The driver of node `node`.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_string(),
            baselines: HashMap::new(),
        }
    }

    /// Forgets every interval (this node no longer drives: when it drives again, it starts
    /// new intervals).
    pub fn reset(&mut self) {
        self.baselines.clear();
    }

    /// Judges every fleet rollout whose interval is over, on the sum of the nodes' signals, and
    /// writes the decisions. Also pauses a rollout whose service's weights were changed by
    /// hand (`tcpshiftctl --store set-weight`).
    pub async fn tick(&mut self, store: &Store) -> Result<(), StoreError> {
        let all = store.rollouts().await?;
        self.baselines.retain(|name, _| {
            all.iter()
                .any(|r| &r.record.spec.name == name && !r.record.state.phase.is_final())
        });
        if all.iter().all(|r| r.record.state.phase.is_final()) {
            return Ok(());
        }
        let base = store.load().await?;
        let published = store.node_signals().await?;
        for stored in all {
            if stored.record.state.phase.is_final() {
                continue;
            }
            let spec = stored.record.spec.clone();
            let weight = |subset: &str| {
                base.state.get(&spec.service).and_then(|s| {
                    s.config
                        .subsets
                        .iter()
                        .find(|x| x.name == subset)
                        .map(|x| x.weight)
                })
            };
            let (Some(ws), Some(wc)) = (weight(&spec.stable), weight(&spec.canary)) else {
                let mut record = stored.record.clone();
                if drive::gone(&mut record) {
                    record.driver = Some(self.node.clone());
                    store
                        .commit_rollout(&record, stored.revision, &base, None)
                        .await?;
                }
                continue;
            };
            if let Some(d) = drive::hand_changed(&stored.record, ws, wc) {
                carry_out(store, &base, stored, d, Some(&self.node)).await?;
                continue;
            }
            let now = Instant::now();
            let nodes: BTreeMap<String, [Signals; 2]> = published
                .iter()
                .filter_map(|n| {
                    let svc = n.services.get(&spec.service)?;
                    Some((
                        n.node.clone(),
                        [
                            svc.get(&spec.stable)?.clone(),
                            svc.get(&spec.canary)?.clone(),
                        ],
                    ))
                })
                .collect();
            let Some(baseline) = self.baselines.get(&spec.name) else {
                self.baselines
                    .insert(spec.name.clone(), Baseline { since: now, nodes });
                continue;
            };
            let elapsed = now - baseline.since;
            if elapsed < spec.analysis.interval {
                continue;
            }
            let (mut stable, mut canary) = (Signals::default(), Signals::default());
            let mut counted = 0;
            for (node, [s1, c1]) in &nodes {
                if let Some([s0, c0]) = baseline.nodes.get(node) {
                    signals::add(&mut stable, &signals::delta(s0, s1));
                    signals::add(&mut canary, &signals::delta(c0, c1));
                    counted += 1;
                }
            }
            let d = rollout::tick(
                &spec,
                &stored.record.state,
                elapsed.min(spec.analysis.interval * 2),
                &stable,
                &canary,
            );
            info!(
                rollout = %spec.name,
                nodes = counted,
                canary_ended = canary.ended(),
                stable_ended = stable.ended(),
                "judged the fleet's interval"
            );
            // The interval ends only when its decision is stored (another writer first: it
            // is judged again, longer, at the next tick).
            if carry_out(store, &base, stored, d, Some(&self.node))
                .await?
                .is_some()
            {
                self.baselines
                    .insert(spec.name.clone(), Baseline { since: now, nodes });
            }
        }
        Ok(())
    }
}

/// How often a node's fleet rollout task publishes its signals and the driver looks at the
/// rollouts (each is judged once per its own interval).
pub const FLEET_TICK: Duration = Duration::from_millis(500);
