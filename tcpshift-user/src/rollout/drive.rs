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
use crate::model::{
    ServiceConfig,
    rollout::{self, Decision, Phase, RolloutSpec, Signals},
};
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
    check_services(spec, views.iter().map(|v| &v.config))
}

/// Checks `spec` against `services` (a kernel's or the fleet store's): the service exists
/// and has both subsets.
pub fn check_services<'a>(
    spec: &RolloutSpec,
    services: impl Iterator<Item = &'a ServiceConfig>,
) -> Result<(), StateError> {
    let services: Vec<&ServiceConfig> = services.collect();
    let Some(config) = services.iter().find(|c| c.name == spec.service) else {
        let known: Vec<&str> = services.iter().map(|c| c.name.as_str()).collect();
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
    let subsets: Vec<&str> = config.subsets.iter().map(|s| s.name.as_str()).collect();
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

/// Checks that no other rollout of `records` is under way on `spec`'s service, and that
/// `spec` is valid; the decision that starts it.
pub fn check_start(records: &[RolloutRecord], spec: &RolloutSpec) -> Result<Decision, StateError> {
    spec.validate()
        .map_err(|e| StateError::Rollout(format!("rollout {:?}: {e}", spec.name)))?;
    if let Some(other) = records.iter().find(|r| {
        r.spec.service == spec.service && r.spec.name != spec.name && !r.state.phase.is_final()
    }) {
        return Err(StateError::Rollout(format!(
            "service {:?} already has rollout {:?} in phase {}: abort it first",
            spec.service, other.spec.name, other.state.phase
        )));
    }
    Ok(rollout::start(spec))
}

/// The decision a manual command takes on `record` (an error when the rollout is over).
pub fn decide(record: &RolloutRecord, cmd: Command) -> Result<Decision, StateError> {
    let s = &record.spec;
    let mut d = match cmd {
        Command::Promote { full } => rollout::promote(s, &record.state, full),
        Command::Pause => rollout::pause(&record.state, "by `tcpshiftctl rollout pause`"),
        Command::Resume => rollout::resume(s, &record.state),
        Command::Abort => rollout::abort(s, &record.state, "by `tcpshiftctl rollout abort`"),
    };
    if record.state.phase.is_final() {
        return Err(StateError::Rollout(format!(
            "rollout {:?} is over (phase {}); start a new one",
            s.name, record.state.phase
        )));
    }
    // Resuming writes the rollout's weights again (a manual set-weight may have changed them).
    if cmd == Command::Resume && d.canary_weight.is_none() && d.state.phase == Phase::Progressing {
        d.canary_weight = Some(d.state.canary_weight);
    }
    Ok(d)
}

/// The pause a manual weight change causes: `Some` when `record` is progressing and the
/// service's weights (`stable`, `canary`) are not the ones it wrote last.
pub fn hand_changed(record: &RolloutRecord, stable: u32, canary: u32) -> Option<Decision> {
    let cw = record.state.canary_weight;
    if record.state.phase != Phase::Progressing || (canary, stable) == (cw, 100 - cw) {
        return None;
    }
    let s = &record.spec;
    let why = format!(
        "the weights of {} were changed by hand ({}={stable} {}={canary}, the rollout had {}={} {}={cw}); `tcpshiftctl rollout resume {}` sets the rollout's weights again",
        s.service,
        s.stable,
        s.canary,
        s.stable,
        100 - cw,
        s.canary,
        s.name,
    );
    Some(rollout::pause(&record.state, &why))
}

/// Takes `d`'s state and events into `record` (and logs the events).
pub fn settle(record: &mut RolloutRecord, d: &Decision) {
    record.state = d.state.clone();
    for e in &d.events {
        info!(rollout = %record.spec.name, reason = %e.reason, "{}", e.message);
    }
    record.record(&d.events);
}

/// Marks `record` Degraded because its weights cannot be written (`error` says why).
pub fn unwritable(record: &mut RolloutRecord, error: &dyn std::fmt::Display) {
    warn!(rollout = %record.spec.name, "cannot write the weights: {error}");
    let message = format!("cannot write the weights ({error}); held until they can be written");
    record.record(&[rollout::Event {
        reason: "Degraded".into(),
        message: message.clone(),
    }]);
    if !record.state.phase.is_final() {
        record.state.phase = Phase::Degraded;
    }
    record.state.message = message;
}

/// Marks `record` Degraded because its service or a subset is gone; `false` when it was
/// Degraded already (nothing to store).
pub fn gone(record: &mut RolloutRecord) -> bool {
    if record.state.phase == Phase::Degraded {
        return false;
    }
    record.state.phase = Phase::Degraded;
    record.state.message = format!(
        "service {:?} or its subsets {:?}/{:?} are gone; held until they are back",
        record.spec.service, record.spec.stable, record.spec.canary
    );
    warn!(rollout = %record.spec.name, "{}", record.state.message);
    let e = rollout::Event {
        reason: "Degraded".into(),
        message: record.state.message.clone(),
    };
    record.record(&[e]);
    true
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
    settle(&mut record, &d);
    if let Some(w) = d.canary_weight
        && let Err(e) = write_weights(state, &record.spec, w)
    {
        unwritable(&mut record, &e);
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
    let d = check_start(&state.rollouts()?, &spec)?;
    let record = RolloutRecord::new(spec, d.state.clone());
    carry_out(state, record, d)
}

/// Runs a manual command on the rollout `name`.
pub fn command(state: &mut State, name: &str, cmd: Command) -> Result<RolloutRecord, StateError> {
    let record = state
        .rollout(name)?
        .ok_or_else(|| StateError::Rollout(format!("no rollout named {name:?}")))?;
    let d = decide(&record, cmd)?;
    carry_out(state, record, d)
}

/// `rollout abort --forget`: aborts the rollout `name` when it is still under way (the
/// canary drained to 0), then removes its record; whether there was one. A record that
/// cannot be read any more is removed as it is.
pub fn forget(state: &mut State, name: &str) -> Result<bool, StateError> {
    match state.rollout(name) {
        Ok(Some(r)) if !r.state.phase.is_final() => {
            command(state, name, Command::Abort)?;
        }
        Ok(_) => {}
        Err(e) => warn!(rollout = %name, "removing an unreadable rollout record: {e}"),
    }
    state.remove_rollout(name)
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
                let mut record = record;
                if gone(&mut record) {
                    state.put_rollout(&record)?;
                }
                continue;
            };
            if let Some(d) = hand_changed(&record, ws, wc) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> RolloutRecord {
        let spec = RolloutSpec::short("web", "v1", "v2", &[20, 100], Duration::from_secs(1));
        let d = rollout::start(&spec);
        RolloutRecord::new(spec, d.state)
    }

    #[test]
    fn a_weight_changed_by_hand_pauses_and_says_so() {
        let r = record();
        assert_eq!(r.state.canary_weight, 20);
        assert!(hand_changed(&r, 80, 20).is_none());
        let d = hand_changed(&r, 50, 50).expect("pauses");
        assert_eq!(d.state.phase, Phase::Paused);
        assert!(
            d.state.message.contains("changed by hand (v1=50 v2=50")
                && d.state.message.contains("rollout resume web"),
            "{}",
            d.state.message
        );
    }

    #[test]
    fn commands_on_a_finished_rollout_are_refused_and_resume_rewrites_weights() {
        let mut r = record();
        let d = decide(&r, Command::Pause).expect("pause");
        settle(&mut r, &d);
        let d = decide(&r, Command::Resume).expect("resume");
        assert_eq!(d.canary_weight, Some(20));
        let d = decide(&r, Command::Abort).expect("abort");
        assert_eq!(d.canary_weight, Some(0));
        settle(&mut r, &d);
        assert_eq!(
            r.history.last().map(|h| h.event.reason.as_str()),
            Some("Aborted")
        );
        let e = decide(&r, Command::Promote { full: true }).unwrap_err();
        assert!(e.to_string().contains("is over (phase Aborted)"), "{e}");
        // Another rollout of the same service may start once this one is over.
        let other = RolloutSpec {
            name: "other".into(),
            ..r.spec.clone()
        };
        assert!(check_start(std::slice::from_ref(&r), &other).is_ok());
    }
}
