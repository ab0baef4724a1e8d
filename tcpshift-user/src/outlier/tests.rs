use std::time::Duration;

use super::*;

fn detection(n: u32, percent: u32) -> Option<OutlierDetection> {
    Some(OutlierDetection {
        consecutive_errors: n,
        trigger: Trigger::GatewayErrors,
        interval: Duration::from_millis(100),
        base_ejection_time: Duration::from_secs(1),
        max_ejection_percent: percent,
    })
}

fn subset(name: &str, percent: u32) -> Subset {
    Subset {
        name: name.into(),
        detection: detection(3, percent),
        record: Record::default(),
        interval: None,
    }
}

fn iv(errors: u64, good: u64) -> Option<Interval> {
    Some(Interval { errors, good })
}

#[test]
fn errors_in_row_eject_for_base_times_count() {
    let mut s = vec![subset("v1", 100), subset("v2", 100)];
    s[0].interval = iv(0, 5);
    s[1].interval = iv(2, 0);
    assert!(decide(1_000, &mut s).is_empty());
    assert_eq!(s[1].record.errors_in_row, 2);
    s[1].interval = iv(1, 0);
    let ev = decide(2_000, &mut s);
    assert!(
        matches!(&ev[..], [Event::Ejected { subset, errors: 3, until_ms: 3_000, times: 1, .. }] if subset == "v2")
    );
    assert!(s[1].record.ejected && s[1].record.since_ms == 2_000);
    // Ejected: intervals do not count; the time ends it.
    s[1].interval = iv(0, 0);
    assert!(decide(2_500, &mut s).is_empty());
    let ev = decide(3_000, &mut s);
    assert_eq!(
        ev,
        vec![Event::Returned {
            subset: "v2".into()
        }]
    );
    assert_eq!((s[1].record.ejected, s[1].record.errors_in_row), (false, 0));
    // Fails again: ejected for twice the base time.
    s[1].interval = iv(3, 0);
    let ev = decide(3_100, &mut s);
    assert!(matches!(
        &ev[..],
        [Event::Ejected {
            until_ms: 5_100,
            times: 2,
            ..
        }]
    ));
}

#[test]
fn a_good_connection_ends_the_run_and_a_clean_interval_forgives_one_ejection() {
    let mut s = vec![subset("v1", 100), subset("v2", 100)];
    s[1].interval = iv(2, 0);
    decide(0, &mut s);
    s[1].interval = iv(2, 1);
    decide(1, &mut s);
    assert_eq!(s[1].record.errors_in_row, 0);
    s[1].record.times_ejected = 2;
    s[1].interval = iv(0, 4);
    decide(2, &mut s);
    assert_eq!(s[1].record.times_ejected, 1);
}

#[test]
fn max_ejection_percent_and_the_last_subset() {
    // 10 % of 3 subsets: the first ejection is allowed (0 % ejected), the second is not.
    let mut s = vec![subset("v1", 10), subset("v2", 10), subset("v3", 10)];
    s[1].interval = iv(5, 0);
    s[2].interval = iv(4, 0);
    let ev = decide(0, &mut s);
    assert!(matches!(&ev[0], Event::Ejected { subset, .. } if subset == "v2"));
    assert!(matches!(&ev[1], Event::Held { subset, errors: 4 } if subset == "v3"));
    assert!(!s[2].record.ejected);
    // 100 %: never the last subset not ejected.
    let mut s = vec![subset("v1", 100), subset("v2", 100)];
    s[0].interval = iv(3, 0);
    s[1].interval = iv(4, 0);
    let ev = decide(0, &mut s);
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, Event::Ejected { .. }))
            .count(),
        1
    );
    assert!(s[1].record.ejected && !s[0].record.ejected);
}

#[test]
fn no_detection_never_ejects() {
    let mut s = vec![subset("v1", 100), subset("v2", 100)];
    s[1].detection = None;
    s[1].interval = iv(50, 0);
    assert!(decide(0, &mut s).is_empty());
}

#[test]
fn interval_of_signals() {
    let sig = Signals {
        opened: 10,
        closed: 9,
        reset_by_backend: 3,
        closed_without_reply: 1,
        refused: 2,
        retransmit_timeouts: 1,
        srtt_histogram: Vec::new(),
    };
    assert_eq!(Interval::of(&sig), Interval { errors: 7, good: 5 });
}
