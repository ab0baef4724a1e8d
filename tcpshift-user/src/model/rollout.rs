//! Progressive rollouts: a canary subset's weight raised step by step while the kernel's own
//! TCP signals say it is healthy, and pulled back at once when they say it is not.
//!
//! Names follow Argo Rollouts and Flagger (`steps`, `setWeight`, `pause`, `analysis`,
//! `interval`, `failureLimit`, `inconclusiveLimit`, `thresholdRange`).
//!
//! Everything here is pure: [`tick`] turns (spec, state, one interval's signals of stable and
//! canary) into (next state, canary weight to write, events), and [`promote`], [`pause`],
//! [`resume`] and [`abort`] do the same for the manual commands. Whoever drives a rollout
//! (tcpshiftd) reads the signals, stores the state and writes the weights; nothing here
//! touches the kernel, YAML or a clock.

use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};
use tcpshift_common::srtt_bucket_floor_us;

/// `apiVersion` of a [`RolloutSpec`] document.
pub const API_VERSION: &str = "tcpshift.io/v1alpha1";
/// `kind` of a [`RolloutSpec`] document.
pub const KIND: &str = "Rollout";

/// One step of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Step {
    /// Give the canary this share of new connections (0..=100), the stable subset the rest.
    SetWeight(u32),
    /// Hold the current weights for this long (`pause: {duration: 30s}`), judged every
    /// analysis interval; `None` (`pause: {}`) holds until `tcpshiftctl rollout promote`.
    Pause(Option<Duration>),
}

/// A signal a metric check judges, computed per subset over one analysis interval.
///
/// Rates are percentages of the connections that ended in the interval ([`Signals::ended`]:
/// closed, or refused for lack of a live socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// Reset by the backend, closed by it without a reply, or refused (no live socket), in %.
    FailureRate,
    /// Reset by the backend, in %.
    ResetRate,
    /// Closed by the backend without a payload byte, in %.
    NoReplyRate,
    /// Refused because the subset had no live socket, in %.
    RefusedRate,
    /// Retransmission timeouts per 100 ended connections.
    RtoRate,
    /// 90th percentile of the smoothed RTT at close, in milliseconds (upper bound of the
    /// histogram bucket that holds it).
    SrttP90,
}

impl Metric {
    /// Every metric, with the name documents use.
    pub const ALL: [(Metric, &'static str); 6] = [
        (Metric::FailureRate, "failure-rate"),
        (Metric::ResetRate, "reset-rate"),
        (Metric::NoReplyRate, "no-reply-rate"),
        (Metric::RefusedRate, "refused-rate"),
        (Metric::RtoRate, "rto-rate"),
        (Metric::SrttP90, "srtt-p90"),
    ];

    /// The name documents use (`failure-rate`, …).
    pub fn name(self) -> &'static str {
        Metric::ALL
            .iter()
            .find(|(m, _)| *m == self)
            .map_or("?", |(_, n)| n)
    }

    /// The metric called `name` in a document.
    pub fn from_name(name: &str) -> Option<Metric> {
        Metric::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(m, _)| *m)
    }

    /// Unit of the metric's values, for messages.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::SrttP90 => "ms",
            Metric::RtoRate => " per 100 connections",
            _ => "%",
        }
    }

    /// The metric's value over `s`, `None` when `s` has no ended connection.
    pub fn value(self, s: &Signals) -> Option<f64> {
        if self == Metric::SrttP90 {
            return s.srtt_quantile_ms(0.9);
        }
        let ended = s.ended();
        if ended == 0 {
            return None;
        }
        let n = match self {
            Metric::FailureRate => s.failed(),
            Metric::ResetRate => s.reset_by_backend,
            Metric::NoReplyRate => s.closed_without_reply,
            Metric::RefusedRate => s.refused,
            Metric::RtoRate => s.retransmit_timeouts,
            Metric::SrttP90 => 0,
        };
        Some(n as f64 * 100.0 / ended as f64)
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A threshold on one metric: the canary passes when its value is at most `max` and at most
/// the stable subset's value in the same interval plus `max_over_stable`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricCheck {
    /// What is measured.
    pub metric: Metric,
    /// Absolute limit (`thresholdRange: {max: N}`).
    pub max: Option<f64>,
    /// Limit relative to the stable subset (`maxOverStable: N`): canary ≤ stable + N. Not
    /// judged in an interval where the stable subset has no value.
    pub max_over_stable: Option<f64>,
}

/// How each interval is judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Analysis {
    /// Length of an interval: the signals are read and judged once per interval.
    pub interval: Duration,
    /// The rollout aborts when more checks than this have failed.
    pub failure_limit: u32,
    /// The rollout pauses (phase Paused) when more checks than this were inconclusive in a row.
    pub inconclusive_limit: u32,
    /// Below this number of canary connections ended in an interval the check is
    /// inconclusive: a canary without traffic is not healthy.
    pub min_connections: u64,
    /// The thresholds.
    pub metrics: Vec<MetricCheck>,
}

impl Default for Analysis {
    fn default() -> Self {
        Analysis {
            interval: Duration::from_secs(30),
            failure_limit: 0,
            inconclusive_limit: 3,
            min_connections: 1,
            metrics: vec![MetricCheck {
                metric: Metric::FailureRate,
                max: Some(1.0),
                max_over_stable: None,
            }],
        }
    }
}

/// A rollout as a `Rollout` document (or `tcpshiftctl rollout start`) defines it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Name of the rollout (`metadata.name`).
    pub name: String,
    /// The service whose weights it changes.
    pub service: String,
    /// The subset that has the traffic now.
    pub stable: String,
    /// The subset being rolled out.
    pub canary: String,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// How each interval is judged.
    pub analysis: Analysis,
}

/// Why a spec is not valid: the field (`steps[2].setWeight`, …) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// Path of the field, as in the document (`spec.steps[1].setWeight`).
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

fn spec_err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

impl RolloutSpec {
    /// The short form `rollout start SERVICE --canary C --steps 5,20,100 --interval 30s`: each
    /// weight held for one interval, judged with the default analysis.
    pub fn short(
        service: &str,
        stable: &str,
        canary: &str,
        weights: &[u32],
        interval: Duration,
    ) -> RolloutSpec {
        let mut steps = Vec::new();
        for (i, w) in weights.iter().enumerate() {
            steps.push(Step::SetWeight(*w));
            if i + 1 < weights.len() {
                steps.push(Step::Pause(Some(interval)));
            }
        }
        RolloutSpec {
            name: service.to_string(),
            service: service.to_string(),
            stable: stable.to_string(),
            canary: canary.to_string(),
            steps,
            analysis: Analysis {
                interval,
                ..Analysis::default()
            },
        }
    }

    /// Checks what does not need the kernel: weights in 0..=100, a step list that gives the
    /// canary some traffic, durations and limits in range, two different subsets.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.stable == self.canary {
            return Err(spec_err(
                "spec.canarySubset",
                format!(
                    "the canary subset {:?} is also the stable subset: name two different subsets",
                    self.canary
                ),
            ));
        }
        if self.steps.is_empty() {
            return Err(spec_err(
                "spec.steps",
                "no steps: give at least one `setWeight: N`",
            ));
        }
        for (i, step) in self.steps.iter().enumerate() {
            match step {
                Step::SetWeight(w) if *w > 100 => {
                    return Err(spec_err(
                        format!("spec.steps[{i}].setWeight"),
                        format!("{w} is out of range: give a percentage in 0..=100"),
                    ));
                }
                Step::Pause(Some(d)) if d.is_zero() => {
                    return Err(spec_err(
                        format!("spec.steps[{i}].pause.duration"),
                        "a pause of 0 s: give a positive duration, or `pause: {}` to wait for promote",
                    ));
                }
                _ => {}
            }
        }
        if !self
            .steps
            .iter()
            .any(|s| matches!(s, Step::SetWeight(w) if *w > 0))
        {
            return Err(spec_err(
                "spec.steps",
                "the steps never give the canary any traffic: add a `setWeight` above 0",
            ));
        }
        if self.analysis.interval < Duration::from_millis(100) {
            return Err(spec_err(
                "spec.analysis.interval",
                format!(
                    "{} is too short: give at least 100ms",
                    format_duration(self.analysis.interval)
                ),
            ));
        }
        for (i, m) in self.analysis.metrics.iter().enumerate() {
            if m.max.is_none() && m.max_over_stable.is_none() {
                return Err(spec_err(
                    format!("spec.analysis.metrics[{i}]"),
                    "no threshold: give `thresholdRange: {max: N}` and/or `maxOverStable: N`",
                ));
            }
            for (field, v) in [
                ("thresholdRange.max", m.max),
                ("maxOverStable", m.max_over_stable),
            ] {
                if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                    return Err(spec_err(
                        format!("spec.analysis.metrics[{i}].{field}"),
                        "give a number of 0 or more",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The canary weight the rollout ends at when promoted: the last step's `setWeight` when
    /// the document ends with one, else 100.
    pub fn final_weight(&self) -> u32 {
        match self.steps.last() {
            Some(Step::SetWeight(w)) => *w,
            _ => 100,
        }
    }
}

/// Where a rollout is (the names of Argo Rollouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Moving through the steps.
    Progressing,
    /// Held: by `rollout pause`, a `pause: {}` step, a manual `set-weight`, or too many
    /// inconclusive checks. `rollout resume` (or `promote`) moves on.
    Paused,
    /// Done: the canary has its final weight.
    Promoted,
    /// Rolled back: the canary's weight is 0 (by `rollout abort` or failed checks).
    Aborted,
    /// The weights cannot be written or read back (the service or a subset is gone); the
    /// rollout is held until it can go on.
    Degraded,
}

impl Phase {
    /// Whether the rollout is over (no further tick changes anything).
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Promoted | Phase::Aborted)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Signals of one subset over one analysis interval: the difference of its kernel counters
/// between the interval's start and end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signals {
    /// Connections established.
    pub opened: u64,
    /// Connections closed.
    pub closed: u64,
    /// Of the closed, reset by the backend.
    pub reset_by_backend: u64,
    /// Of the closed, closed by the backend without a payload byte.
    pub closed_without_reply: u64,
    /// Connections refused for lack of a live socket.
    pub refused: u64,
    /// Retransmission timeouts.
    pub retransmit_timeouts: u64,
    /// Smoothed RTT at close, the kernel's log2 histogram (see
    /// [`tcpshift_common::srtt_bucket`]).
    pub srtt_histogram: Vec<u64>,
}

impl Signals {
    /// Connections that ended: closed, or refused.
    pub fn ended(&self) -> u64 {
        self.closed + self.refused
    }

    /// Connections that failed: reset by the backend, closed without a reply, refused.
    pub fn failed(&self) -> u64 {
        self.reset_by_backend + self.closed_without_reply + self.refused
    }

    /// The `q` quantile of the smoothed RTT at close, in ms: the upper bound of the bucket
    /// that holds it (the last, open-ended bucket reports its floor). `None` without data.
    pub fn srtt_quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.srtt_histogram.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        let last = self.srtt_histogram.len() - 1;
        for (b, n) in self.srtt_histogram.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let bound = if b < last { b + 1 } else { b };
                return Some(f64::from(srtt_bucket_floor_us(bound)) / 1000.0);
            }
        }
        None
    }
}

/// One metric's values in the last judged interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricResult {
    /// The metric.
    pub metric: Metric,
    /// Canary's value (`None`: no data).
    pub canary: Option<f64>,
    /// Stable's value (`None`: no data).
    pub stable: Option<f64>,
    /// Whether the canary passed.
    pub passed: bool,
}

/// How an interval was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Every threshold held.
    Successful,
    /// Some threshold was crossed.
    Failed,
    /// Too few canary connections to judge.
    Inconclusive,
}

/// What a rollout has done so far: everything needed to go on after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    /// Where it is.
    pub phase: Phase,
    /// Index of the current step in [`RolloutSpec::steps`] (`steps.len()` once past the last).
    pub step: usize,
    /// Time already spent in the current pause step (judged intervals only).
    pub pause_elapsed: Duration,
    /// The canary weight the rollout wrote last (the stable subset has `100 - this`).
    pub canary_weight: u32,
    /// Failed checks so far.
    pub failures: u32,
    /// Inconclusive checks in a row.
    pub inconclusives: u32,
    /// The last interval's metric values.
    pub last: Vec<MetricResult>,
    /// Why the last decision was taken.
    pub message: String,
}

impl RolloutState {
    /// The state before the first step.
    pub fn new() -> RolloutState {
        RolloutState {
            phase: Phase::Progressing,
            step: 0,
            pause_elapsed: Duration::ZERO,
            canary_weight: 0,
            failures: 0,
            inconclusives: 0,
            last: Vec::new(),
            message: "started".into(),
        }
    }
}

impl Default for RolloutState {
    fn default() -> Self {
        RolloutState::new()
    }
}

/// Something that happened, for the log and `rollout history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Short kind: `SetWeight`, `Paused`, `Resumed`, `CheckFailed`, `Inconclusive`,
    /// `Aborted`, `Promoted`.
    pub reason: String,
    /// What happened, with values.
    pub message: String,
}

fn event(reason: &str, message: impl Into<String>) -> Event {
    Event {
        reason: reason.into(),
        message: message.into(),
    }
}

/// What a decision asks the driver to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The state to store.
    pub state: RolloutState,
    /// The canary weight to write (stable gets `100 - w`), when it changes.
    pub canary_weight: Option<u32>,
    /// What happened, in order.
    pub events: Vec<Event>,
}

/// Judges one interval: each metric of `analysis` for `canary` against its thresholds and
/// `stable`.
pub fn judge(
    analysis: &Analysis,
    stable: &Signals,
    canary: &Signals,
) -> (Verdict, Vec<MetricResult>) {
    let results: Vec<MetricResult> = analysis
        .metrics
        .iter()
        .map(|check| {
            let c = check.metric.value(canary);
            let s = check.metric.value(stable);
            let passed = match c {
                None => true,
                Some(c) => {
                    check.max.is_none_or(|max| c <= max)
                        && match (check.max_over_stable, s) {
                            (Some(over), Some(s)) => c <= s + over,
                            _ => true,
                        }
                }
            };
            MetricResult {
                metric: check.metric,
                canary: c,
                stable: s,
                passed,
            }
        })
        .collect();
    let verdict = if canary.ended() < analysis.min_connections.max(1) {
        Verdict::Inconclusive
    } else if results.iter().all(|r| r.passed) {
        Verdict::Successful
    } else {
        Verdict::Failed
    };
    (verdict, results)
}

fn value_text(v: Option<f64>, metric: Metric) -> String {
    match v {
        Some(v) => format!("{v:.2}{}", metric.unit()),
        None => "no data".into(),
    }
}

/// `metric canary X (max M, stable S)` for each failed metric.
fn failed_text(spec: &RolloutSpec, results: &[MetricResult]) -> String {
    results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| {
            let check = spec.analysis.metrics.iter().find(|c| c.metric == r.metric);
            let mut limits = Vec::new();
            if let Some(max) = check.and_then(|c| c.max) {
                limits.push(format!("max {}", value_text(Some(max), r.metric)));
            }
            if let Some(over) = check.and_then(|c| c.max_over_stable) {
                limits.push(format!("max stable + {over}"));
            }
            format!(
                "{} canary {} (stable {}; {})",
                r.metric,
                value_text(r.canary, r.metric),
                value_text(r.stable, r.metric),
                limits.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Runs steps from `state.step` while they need no waiting: applies `setWeight` steps, stops
/// at a pause, and promotes past the last step.
fn run_steps(spec: &RolloutSpec, d: &mut Decision) {
    while d.state.phase == Phase::Progressing {
        match spec.steps.get(d.state.step) {
            Some(Step::SetWeight(w)) => {
                if d.state.canary_weight != *w || (d.canary_weight.is_none() && d.state.step == 0) {
                    d.canary_weight = Some(*w);
                    d.events.push(event(
                        "SetWeight",
                        format!(
                            "step {}/{}: {} {}%, {} {}%",
                            d.state.step + 1,
                            spec.steps.len(),
                            spec.canary,
                            w,
                            spec.stable,
                            100 - w
                        ),
                    ));
                }
                d.state.canary_weight = *w;
                d.state.step += 1;
                d.state.pause_elapsed = Duration::ZERO;
            }
            Some(Step::Pause(None)) => {
                d.state.phase = Phase::Paused;
                d.state.message = format!(
                    "step {}/{}: paused until `tcpshiftctl rollout promote {}`",
                    d.state.step + 1,
                    spec.steps.len(),
                    spec.name
                );
                d.events.push(event("Paused", d.state.message.clone()));
            }
            Some(Step::Pause(Some(_))) => return,
            None => {
                let w = spec.final_weight();
                if d.state.canary_weight != w {
                    d.canary_weight = Some(w);
                }
                d.state.canary_weight = w;
                d.state.phase = Phase::Promoted;
                d.state.message = format!(
                    "promoted: {} {}%, {} {}%",
                    spec.canary,
                    w,
                    spec.stable,
                    100 - w
                );
                d.events.push(event("Promoted", d.state.message.clone()));
            }
        }
    }
}

fn decision(state: &RolloutState) -> Decision {
    Decision {
        state: state.clone(),
        canary_weight: None,
        events: Vec::new(),
    }
}

/// Starts a rollout: runs its first steps (the first `setWeight` is written at once).
pub fn start(spec: &RolloutSpec) -> Decision {
    let mut d = decision(&RolloutState::new());
    run_steps(spec, &mut d);
    d
}

/// One analysis interval of `elapsed` has passed with these signals: judge it, count failed
/// and inconclusive checks, abort or pause when over the limits, and move through the steps.
///
/// - A failed check counts toward `failureLimit`; over it the canary goes to 0 at once and
///   the phase is Aborted. A failed check does not advance a pause.
/// - An inconclusive check (fewer than `minConnections` canary connections ended) does not
///   advance a pause either; more than `inconclusiveLimit` in a row pause the rollout.
/// - A successful check adds `elapsed` to the current pause; when the pause is over, the next
///   steps run.
///
/// In phase Paused or Degraded checks are still judged (a failing canary is still rolled
/// back) but no step is taken. Final phases do not change.
pub fn tick(
    spec: &RolloutSpec,
    state: &RolloutState,
    elapsed: Duration,
    stable: &Signals,
    canary: &Signals,
) -> Decision {
    let mut d = decision(state);
    if state.phase.is_final() {
        return d;
    }
    let (verdict, results) = judge(&spec.analysis, stable, canary);
    d.state.last = results;
    match verdict {
        Verdict::Failed => {
            d.state.failures += 1;
            d.state.inconclusives = 0;
            let what = failed_text(spec, &d.state.last);
            if d.state.failures > spec.analysis.failure_limit {
                d.state.phase = Phase::Aborted;
                d.state.canary_weight = 0;
                d.canary_weight = Some(0);
                d.state.message = format!(
                    "aborted after {} failed checks (failureLimit {}): {what}; {} drained to 0%",
                    d.state.failures, spec.analysis.failure_limit, spec.canary
                );
                d.events.push(event("Aborted", d.state.message.clone()));
            } else {
                d.state.message = format!(
                    "check failed ({} of at most {}): {what}",
                    d.state.failures, spec.analysis.failure_limit
                );
                d.events.push(event("CheckFailed", d.state.message.clone()));
            }
        }
        Verdict::Inconclusive => {
            d.state.inconclusives += 1;
            d.state.message = format!(
                "inconclusive: {} canary connections ended in the interval, at least {} needed ({} in a row, limit {})",
                canary.ended(),
                spec.analysis.min_connections.max(1),
                d.state.inconclusives,
                spec.analysis.inconclusive_limit
            );
            if d.state.inconclusives > spec.analysis.inconclusive_limit
                && d.state.phase == Phase::Progressing
            {
                d.state.phase = Phase::Paused;
                d.state
                    .message
                    .push_str("; paused: `rollout resume` to go on");
                d.events.push(event("Paused", d.state.message.clone()));
            } else if d.state.phase == Phase::Progressing {
                d.events
                    .push(event("Inconclusive", d.state.message.clone()));
            }
        }
        Verdict::Successful => {
            d.state.inconclusives = 0;
            d.state.message = "check successful".into();
            if d.state.phase == Phase::Progressing
                && let Some(Step::Pause(Some(duration))) = spec.steps.get(d.state.step)
            {
                d.state.pause_elapsed += elapsed;
                if d.state.pause_elapsed >= *duration {
                    d.state.step += 1;
                    d.state.pause_elapsed = Duration::ZERO;
                } else {
                    d.state.message = format!(
                        "check successful; step {}/{}: paused {} of {}",
                        d.state.step + 1,
                        spec.steps.len(),
                        format_duration(d.state.pause_elapsed),
                        format_duration(*duration)
                    );
                }
            }
        }
    }
    if d.state.phase == Phase::Progressing {
        run_steps(spec, &mut d);
    }
    d
}

/// `rollout promote`: ends the current pause (or a Paused phase) and goes on with the next
/// steps; with `full`, skips every remaining step and promotes at once.
pub fn promote(spec: &RolloutSpec, state: &RolloutState, full: bool) -> Decision {
    let mut d = decision(state);
    if state.phase.is_final() {
        return d;
    }
    d.state.phase = Phase::Progressing;
    d.state.inconclusives = 0;
    if full {
        d.state.step = spec.steps.len();
    } else if matches!(spec.steps.get(d.state.step), Some(Step::Pause(_))) {
        d.state.step += 1;
    }
    d.state.pause_elapsed = Duration::ZERO;
    d.state.message = format!(
        "promote requested by hand{}",
        if full { " (full)" } else { "" }
    );
    d.events.push(event("Resumed", d.state.message.clone()));
    run_steps(spec, &mut d);
    d
}

/// `rollout pause` (or a manual weight change, `why` says which): holds the current weights.
pub fn pause(state: &RolloutState, why: &str) -> Decision {
    let mut d = decision(state);
    if state.phase.is_final() || state.phase == Phase::Paused {
        return d;
    }
    d.state.phase = Phase::Paused;
    d.state.message = format!("paused: {why}");
    d.events.push(event("Paused", d.state.message.clone()));
    d
}

/// `rollout resume`: goes on where it was paused (the elapsed part of a pause is kept; a
/// `pause: {}` step needs `promote`).
pub fn resume(spec: &RolloutSpec, state: &RolloutState) -> Decision {
    let mut d = decision(state);
    if state.phase != Phase::Paused && state.phase != Phase::Degraded {
        return d;
    }
    d.state.inconclusives = 0;
    if matches!(spec.steps.get(state.step), Some(Step::Pause(None))) {
        d.state.message = format!(
            "waiting at a `pause: {{}}` step: `tcpshiftctl rollout promote {}` goes on",
            spec.name
        );
        return d;
    }
    d.state.phase = Phase::Progressing;
    d.state.message = "resumed by hand".into();
    d.events.push(event("Resumed", d.state.message.clone()));
    run_steps(spec, &mut d);
    d
}

/// `rollout abort`: the canary to 0 at once, phase Aborted.
pub fn abort(spec: &RolloutSpec, state: &RolloutState, why: &str) -> Decision {
    let mut d = decision(state);
    if state.phase.is_final() {
        return d;
    }
    d.state.phase = Phase::Aborted;
    d.state.canary_weight = 0;
    d.canary_weight = Some(0);
    d.state.message = format!("aborted: {why}; {} drained to 0%", spec.canary);
    d.events.push(event("Aborted", d.state.message.clone()));
    d
}

/// A duration as documents write it: `1500ms`, `30s`, `5m`, `2h`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// Parses a duration as documents write it: a number followed by `ms`, `s`, `m` or `h`
/// (`30s`, `1.5s`, `500ms`, `2m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let factor = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "{text:?} is not a duration: write a number and a unit (ms, s, m, h), e.g. 30s"
            ));
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: the number is missing or malformed"))?;
    let secs = n * factor;
    if !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_millis((secs * 1000.0).round() as u64))
}

#[cfg(test)]
mod tests;
