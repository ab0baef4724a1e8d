//! The decision logic, interval by interval, with the signals a kernel would count.

use super::*;

const SEC: Duration = Duration::from_secs(1);

fn spec(steps: Vec<Step>) -> RolloutSpec {
    RolloutSpec {
        name: "echo".into(),
        service: "echo".into(),
        stable: "v1".into(),
        canary: "v2".into(),
        steps,
        analysis: Analysis {
            interval: SEC,
            failure_limit: 1,
            inconclusive_limit: 2,
            min_connections: 10,
            metrics: vec![MetricCheck {
                metric: Metric::FailureRate,
                max: Some(5.0),
                max_over_stable: None,
            }],
        },
    }
}

fn short() -> RolloutSpec {
    let mut s = RolloutSpec::short("echo", "v1", "v2", &[5, 20, 50, 100], SEC);
    s.analysis = spec(vec![]).analysis;
    s
}

/// `closed` connections ended, `reset` of them reset by the backend.
fn sig(closed: u64, reset: u64) -> Signals {
    Signals {
        opened: closed,
        closed,
        reset_by_backend: reset,
        ..Signals::default()
    }
}

#[test]
fn a_healthy_canary_goes_through_every_step_and_is_promoted() {
    let s = short();
    let d = start(&s);
    assert_eq!(d.canary_weight, Some(5));
    assert_eq!(d.state.phase, Phase::Progressing);
    let mut state = d.state;
    let mut written = vec![5];
    for _ in 0..10 {
        let d = tick(&s, &state, SEC, &sig(50, 0), &sig(20, 0));
        written.extend(d.canary_weight);
        state = d.state;
        if state.phase.is_final() {
            break;
        }
    }
    assert_eq!(written, vec![5, 20, 50, 100]);
    assert_eq!(state.phase, Phase::Promoted);
    assert_eq!(state.canary_weight, 100);
}

#[test]
fn a_failing_canary_is_aborted_after_failure_limit_plus_one_checks() {
    let s = short();
    let mut state = start(&s).state;
    // 30 % reset: failureLimit 1, so the second failed check aborts.
    let d = tick(&s, &state, SEC, &sig(50, 0), &sig(20, 6));
    assert_eq!(d.state.phase, Phase::Progressing);
    assert_eq!(d.canary_weight, None, "a failed check does not advance");
    assert_eq!(d.events[0].reason, "CheckFailed");
    state = d.state;
    let d = tick(&s, &state, SEC, &sig(50, 0), &sig(20, 6));
    assert_eq!(d.state.phase, Phase::Aborted);
    assert_eq!(d.canary_weight, Some(0));
    assert_eq!(d.events[0].reason, "Aborted");
    let msg = &d.events[0].message;
    assert!(msg.contains("failure-rate canary 30.00%"), "{msg}");
    assert!(msg.contains("stable 0.00%"), "{msg}");
    // Over: nothing changes any more.
    let again = tick(&s, &d.state, SEC, &sig(50, 0), &sig(20, 0));
    assert_eq!(again.state, d.state);
    assert_eq!(again.canary_weight, None);
}

#[test]
fn a_canary_without_traffic_is_inconclusive_then_paused_never_promoted() {
    let s = short();
    let mut state = start(&s).state;
    let mut reasons = Vec::new();
    for _ in 0..6 {
        let d = tick(&s, &state, SEC, &sig(50, 0), &sig(0, 0));
        assert_eq!(d.canary_weight, None);
        reasons.extend(d.events.iter().map(|e| e.reason.clone()));
        state = d.state;
    }
    assert_eq!(reasons, ["Inconclusive", "Inconclusive", "Paused"]);
    assert_eq!(state.phase, Phase::Paused);
    assert_eq!(state.canary_weight, 5);
    assert!(state.message.contains("inconclusive"), "{}", state.message);
}

#[test]
fn relative_thresholds_compare_with_stable_in_the_same_interval() {
    let mut s = short();
    s.analysis.metrics = vec![MetricCheck {
        metric: Metric::ResetRate,
        max: None,
        max_over_stable: Some(2.0),
    }];
    // Stable resets 10 %, canary 11 %: within stable + 2.
    let (v, r) = judge(&s.analysis, &sig(100, 10), &sig(100, 11));
    assert_eq!(v, Verdict::Successful, "{r:?}");
    // Canary 13 %: above.
    let (v, r) = judge(&s.analysis, &sig(100, 10), &sig(100, 13));
    assert_eq!(v, Verdict::Failed);
    assert_eq!(r[0].canary, Some(13.0));
    assert_eq!(r[0].stable, Some(10.0));
}

#[test]
fn a_pause_is_counted_only_in_successful_intervals_and_survives_a_restart() {
    let s = spec(vec![
        Step::SetWeight(10),
        Step::Pause(Some(Duration::from_secs(3))),
        Step::SetWeight(100),
    ]);
    let mut state = start(&s).state;
    state = tick(&s, &state, SEC, &sig(50, 0), &sig(20, 0)).state;
    state = tick(&s, &state, SEC, &sig(50, 0), &sig(2, 0)).state; // inconclusive
    assert_eq!(state.pause_elapsed, 2 * SEC - SEC);
    // A restart stores and loads the state: same step, same elapsed pause.
    let restored: RolloutState =
        serde_json::from_str(&serde_json::to_string(&state).expect("json")).expect("json");
    assert_eq!(restored, state);
    let d = tick(&s, &restored, SEC, &sig(50, 0), &sig(20, 0));
    assert_eq!(d.canary_weight, None);
    let d = tick(&s, &d.state, SEC, &sig(50, 0), &sig(20, 0));
    assert_eq!(d.canary_weight, Some(100));
    assert_eq!(d.state.phase, Phase::Promoted);
}

#[test]
fn manual_pause_resume_promote_and_abort() {
    let s = spec(vec![
        Step::SetWeight(10),
        Step::Pause(None),
        Step::SetWeight(50),
        Step::Pause(Some(Duration::from_secs(60))),
        Step::SetWeight(100),
    ]);
    let d = start(&s);
    assert_eq!(d.state.phase, Phase::Paused, "waits at pause: {{}}");
    // resume does not pass a `pause: {}`.
    let r = resume(&s, &d.state);
    assert_eq!(r.state.phase, Phase::Paused);
    let p = promote(&s, &d.state, false);
    assert_eq!(p.canary_weight, Some(50));
    assert_eq!(p.state.phase, Phase::Progressing);
    let paused = pause(&p.state, "manual set-weight on echo");
    assert_eq!(paused.state.phase, Phase::Paused);
    assert!(paused.events[0].message.contains("set-weight"));
    // Paused: a successful check does not advance the pause.
    let t = tick(&s, &paused.state, 120 * SEC, &sig(50, 0), &sig(20, 0));
    assert_eq!(t.state.phase, Phase::Paused);
    assert_eq!(t.canary_weight, None);
    let resumed = resume(&s, &t.state);
    assert_eq!(resumed.state.phase, Phase::Progressing);
    let full = promote(&s, &resumed.state, true);
    assert_eq!(full.canary_weight, Some(100));
    assert_eq!(full.state.phase, Phase::Promoted);
    let aborted = abort(&s, &resumed.state, "by hand");
    assert_eq!(aborted.canary_weight, Some(0));
    assert_eq!(aborted.state.phase, Phase::Aborted);
}

#[test]
fn a_paused_rollout_is_still_rolled_back_when_failing() {
    let mut s = short();
    s.analysis.failure_limit = 0;
    let state = pause(&start(&s).state, "by hand").state;
    let d = tick(&s, &state, SEC, &sig(50, 0), &sig(20, 20));
    assert_eq!(d.state.phase, Phase::Aborted);
    assert_eq!(d.canary_weight, Some(0));
}

#[test]
fn validation_names_the_field() {
    let mut s = short();
    s.steps[2] = Step::SetWeight(120);
    let e = s.validate().expect_err("out of range");
    assert_eq!(e.field, "spec.steps[2].setWeight");
    let s = spec(vec![Step::SetWeight(0), Step::Pause(None)]);
    assert_eq!(s.validate().expect_err("no traffic").field, "spec.steps");
    let mut s = short();
    s.canary = "v1".into();
    assert_eq!(s.validate().expect_err("same").field, "spec.canarySubset");
    assert_eq!(short().validate(), Ok(()));
}

#[test]
fn srtt_quantile_is_the_upper_bound_of_its_bucket() {
    let mut s = Signals {
        srtt_histogram: vec![0; 16],
        ..Signals::default()
    };
    assert_eq!(s.srtt_quantile_ms(0.9), None);
    s.srtt_histogram[1] = 9; // 32-63 µs
    s.srtt_histogram[10] = 1; // 16.4-32.8 ms
    assert_eq!(s.srtt_quantile_ms(0.9), Some(0.064));
    assert_eq!(s.srtt_quantile_ms(1.0), Some(32.768));
}

#[test]
fn durations_round_trip() {
    for (text, d) in [
        ("30s", Duration::from_secs(30)),
        ("500ms", Duration::from_millis(500)),
        ("2m", Duration::from_secs(120)),
        ("1h", Duration::from_secs(3600)),
    ] {
        assert_eq!(parse_duration(text), Ok(d));
        assert_eq!(format_duration(d), text);
    }
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert!(parse_duration("30").is_err());
    assert!(parse_duration("s").is_err());
}
