//! Driving rollouts against a namespace's state: starting one, the manual commands, and the
//! per-interval tick tcpshiftd runs. Every weight goes through the library's one commit path
//! ([`State::set_weights`]); the rollout's record is stored in `TS_ROLLOUTS` after each
//! decision, so a restarted tcpshiftd goes on where it was.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::signals;
use crate::model::rollout::{self, Decision, Phase, RolloutSpec, Signals};
use crate::state::{CounterStatus, RolloutRecord, State, StateError};

/// A manual command on a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// End the current pause (`full`: skip every remaining step).
    Promote {
        /// Skip every remaining step.
        full: bool,
    },
    /// Hold the current weights.
    Pause,
    /// Go on after a pause.
    Resume,
    /// Canary to 0, phase Aborted.
    Abort,
}

/// Checks `spec` against the kernel's services: the service exists and has both subsets.
fn check_against(state: &State, spec: &RolloutSpec) -> Result<(), StateError> {
    let views = state.services()?;
    let Some(view) = views.iter().find(|v| v.config.name == spec.service) else {
        let known: Vec<&str> = views.iter().map(|v| v.config.name.as_str()).collect();
        return Err(StateError::Rollout(format!(
            "rollout {:?}: no service named {:?} (services: {}); apply it first",
            spec.name,
            spec.service,
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        )));
    };
    let subsets: Vec<&str> = view
        .config
        .subsets
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    for (what, name) in [("stable", &spec.stable), ("canary", &spec.canary)] {
        if !subsets.contains(&name.as_str()) {
            return Err(StateError::Rollout(format!(
                "rollout {:?}: service {:?} has no {what} subset {name:?} (subsets: {})",
                spec.name,
                spec.service,
                subsets.join(", ")
            )));
        }
    }
    Ok(())
}

/// Writes the canary weight `w` (stable `100 - w`) through the one commit path.
fn write_weights(state: &mut State, spec: &RolloutSpec, w: u32) -> Result<(), StateError> {
    state
        .set_weights(
            Some(&spec.service),
            &[(spec.stable.clone(), 100 - w), (spec.canary.clone(), w)],
        )
        .map(|_| ())
}

/// Logs and records a decision's events, writes its weight and stores the record. A weight
/// that cannot be written leaves the rollout Degraded (it is tried again at the next tick).
fn carry_out(
    state: &mut State,
    mut record: RolloutRecord,
    d: Decision,
) -> Result<RolloutRecord, StateError> {
    record.state = d.state;
    for e in &d.events {
        info!(rollout = %record.spec.name, reason = %e.reason, "{}", e.message);
    }
    record.record(&d.events);
    if let Some(w) = d.canary_weight
        && let Err(e) = write_weights(state, &record.spec, w)
    {
        warn!(rollout = %record.spec.name, "cannot write the weights: {e}");
        let message = format!("cannot write the weights ({e}); held until they can be written");
        record.record(&[rollout::Event {
            reason: "Degraded".into(),
            message: message.clone(),
        }]);
        if !record.state.phase.is_final() {
            record.state.phase = Phase::Degraded;
        }
        record.state.message = message;
    }
    state.put_rollout(&record)?;
    Ok(record)
}

/// Starts (or restarts from step 1) the rollout `spec`: checked against the services, stored,
/// and its first weights written.
pub fn start(state: &mut State, spec: RolloutSpec) -> Result<RolloutRecord, StateError> {
    spec.validate()
        .map_err(|e| StateError::Rollout(format!("rollout {:?}: {e}", spec.name)))?;
    check_against(state, &spec)?;
    if let Some(other) = state.rollouts()?.into_iter().find(|r| {
        r.spec.service == spec.service && r.spec.name != spec.name && !r.state.phase.is_final()
    }) {
        return Err(StateError::Rollout(format!(
            "service {:?} already has rollout {:?} in phase {}: abort it first",
            spec.service, other.spec.name, other.state.phase
        )));
    }
    let d = rollout::start(&spec);
    let record = RolloutRecord {
        spec,
        state: d.state.clone(),
        history: Vec::new(),
    };
    carry_out(state, record, d)
}

/// Runs a manual command on the rollout `name`.
pub fn command(state: &mut State, name: &str, cmd: Command) -> Result<RolloutRecord, StateError> {
    let record = state
        .rollout(name)?
        .ok_or_else(|| StateError::Rollout(format!("no rollout named {name:?}")))?;
    let s = &record.spec;
    let mut d = match cmd {
        Command::Promote { full } => rollout::promote(s, &record.state, full),
        Command::Pause => rollout::pause(&record.state, "by `tcpshiftctl rollout pause`"),
        Command::Resume => rollout::resume(s, &record.state),
        Command::Abort => rollout::abort(s, &record.state, "by `tcpshiftctl rollout abort`"),
    };
    if record.state.phase.is_final() {
        return Err(StateError::Rollout(format!(
            "rollout {name:?} is over (phase {}); start a new one",
            record.state.phase
        )));
    }
    // Resuming writes the rollout's weights again (a manual set-weight may have changed them).
    if cmd == Command::Resume && d.canary_weight.is_none() && d.state.phase == Phase::Progressing {
        d.canary_weight = Some(d.state.canary_weight);
    }
    carry_out(state, record, d)
}

/// The counters of the stable and canary subsets of `spec`'s service, with the kernel's
/// current weights of both; `None` when the service or a subset is gone.
fn read(
    state: &State,
    spec: &RolloutSpec,
) -> Result<Option<[(u32, CounterStatus); 2]>, StateError> {
    let status = state.status()?;
    let Some(svc) = status.services.iter().find(|s| s.name == spec.service) else {
        return Ok(None);
    };
    let find = |n: &str| {
        svc.subsets
            .iter()
            .find(|s| s.name == n)
            .map(|s| (s.weight, s.counters))
    };
    Ok(find(&spec.stable)
        .zip(find(&spec.canary))
        .map(|(a, b)| [a, b]))
}

/// The per-interval loop state of tcpshiftd: for each rollout, the counters at the start of
/// its current interval (kept in memory only: after a restart the first interval starts
/// anew, while the step and the elapsed pause come from the stored state).
#[derive(Debug, Default)]
pub struct Driver {
    baselines: HashMap<String, (Instant, CounterStatus, CounterStatus)>,
}

impl Driver {
    /// Judges every rollout whose interval is over and carries out the decisions. Also pauses a
    /// rollout whose service's weights were changed by hand.
    pub fn tick(&mut self, state: &mut State) -> Result<(), StateError> {
        let records = state.rollouts()?;
        self.baselines.retain(|name, _| {
            records
                .iter()
                .any(|r| &r.spec.name == name && !r.state.phase.is_final())
        });
        for record in records {
            if record.state.phase.is_final() {
                continue;
            }
            let name = record.spec.name.clone();
            let Some([(ws, stable), (wc, canary)]) = read(state, &record.spec)? else {
                if record.state.phase != Phase::Degraded {
                    let mut record = record;
                    record.state.phase = Phase::Degraded;
                    record.state.message = format!(
                        "service {:?} or its subsets {:?}/{:?} are gone; held until they are back",
                        record.spec.service, record.spec.stable, record.spec.canary
                    );
                    warn!(rollout = %name, "{}", record.state.message);
                    let e = rollout::Event {
                        reason: "Degraded".into(),
                        message: record.state.message.clone(),
                    };
                    record.record(&[e]);
                    state.put_rollout(&record)?;
                }
                continue;
            };
            let cw = record.state.canary_weight;
            if record.state.phase == Phase::Progressing && (wc, ws) != (cw, 100 - cw) {
                let why = format!(
                    "the weights of {} were changed by hand ({}={ws} {}={wc}, the rollout had {}={} {}={cw}); `tcpshiftctl rollout resume {name}` sets the rollout's weights again",
                    record.spec.service,
                    record.spec.stable,
                    record.spec.canary,
                    record.spec.stable,
                    100 - cw,
                    record.spec.canary,
                );
                let d = rollout::pause(&record.state, &why);
                carry_out(state, record, d)?;
                continue;
            }
            let now = Instant::now();
            let Some((since, b_stable, b_canary)) = self.baselines.get(&name).cloned() else {
                self.baselines.insert(name, (now, stable, canary));
                continue;
            };
            let elapsed = now - since;
            if elapsed < record.spec.analysis.interval {
                continue;
            }
            let s: Signals = signals::between(&b_stable, &stable);
            let c: Signals = signals::between(&b_canary, &canary);
            self.baselines.insert(name, (now, stable, canary));
            let d = rollout::tick(
                &record.spec,
                &record.state,
                elapsed.min(record.spec.analysis.interval * 2),
                &s,
                &c,
            );
            carry_out(state, record, d)?;
        }
        Ok(())
    }
}

/// How often tcpshiftd looks at its rollouts (each is judged once per its own interval).
pub const TICK: Duration = Duration::from_millis(100);
