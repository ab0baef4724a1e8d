//! The [`Signals`] of one subset over one interval, from two readings of its kernel counters.

use crate::model::rollout::Signals;
use crate::state::CounterStatus;

/// What the counters of one subset moved by between `before` and `after` (counters only
/// grow; a reset, e.g. the service redefined, gives zeros, not a negative).
pub fn between(before: &CounterStatus, after: &CounterStatus) -> Signals {
    delta(&cumulative(before), &cumulative(after))
}

/// The counters of one subset as cumulative [`Signals`] (what a fleet node publishes; the
/// driver takes the [`delta`] of two readings).
pub fn cumulative(c: &CounterStatus) -> Signals {
    Signals {
        opened: c.opened,
        closed: c.closed,
        reset_by_backend: c.reset_by_backend,
        closed_without_reply: c.closed_without_reply,
        refused: c.misses,
        retransmit_timeouts: c.retransmit_timeouts,
        srtt_histogram: c.srtt_histogram.to_vec(),
    }
}

/// What cumulative signals moved by between `before` and `after` (a counter that went back,
/// e.g. the service redefined, gives 0, not a negative).
pub fn delta(before: &Signals, after: &Signals) -> Signals {
    let d = |a: u64, b: u64| b.saturating_sub(a);
    let len = before.srtt_histogram.len().max(after.srtt_histogram.len());
    let at = |h: &[u64], i: usize| h.get(i).copied().unwrap_or(0);
    Signals {
        opened: d(before.opened, after.opened),
        closed: d(before.closed, after.closed),
        reset_by_backend: d(before.reset_by_backend, after.reset_by_backend),
        closed_without_reply: d(before.closed_without_reply, after.closed_without_reply),
        refused: d(before.refused, after.refused),
        retransmit_timeouts: d(before.retransmit_timeouts, after.retransmit_timeouts),
        srtt_histogram: (0..len)
            .map(|i| d(at(&before.srtt_histogram, i), at(&after.srtt_histogram, i)))
            .collect(),
    }
}

/// Adds `more` to `sum` (the signals of several nodes over the same interval).
pub fn add(sum: &mut Signals, more: &Signals) {
    sum.opened += more.opened;
    sum.closed += more.closed;
    sum.reset_by_backend += more.reset_by_backend;
    sum.closed_without_reply += more.closed_without_reply;
    sum.refused += more.refused;
    sum.retransmit_timeouts += more.retransmit_timeouts;
    if sum.srtt_histogram.len() < more.srtt_histogram.len() {
        sum.srtt_histogram.resize(more.srtt_histogram.len(), 0);
    }
    for (s, m) in sum.srtt_histogram.iter_mut().zip(&more.srtt_histogram) {
        *s += m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_the_difference_of_two_readings() {
        let before = CounterStatus {
            opened: 10,
            closed: 8,
            reset_by_backend: 1,
            misses: 2,
            ..Default::default()
        };
        let mut after = CounterStatus {
            opened: 30,
            closed: 28,
            reset_by_backend: 7,
            misses: 2,
            ..Default::default()
        };
        after.srtt_histogram[3] = 5;
        let s = between(&before, &after);
        assert_eq!(
            (s.opened, s.closed, s.reset_by_backend, s.refused),
            (20, 20, 6, 0)
        );
        assert_eq!(s.srtt_histogram[3], 5);
        assert_eq!(between(&after, &before).opened, 0);
    }

    #[test]
    fn node_deltas_add_up() {
        let mut a = Signals {
            opened: 5,
            closed: 4,
            refused: 1,
            srtt_histogram: vec![1, 2],
            ..Default::default()
        };
        let b = Signals {
            opened: 3,
            closed: 3,
            reset_by_backend: 2,
            srtt_histogram: vec![0, 1, 7],
            ..Default::default()
        };
        add(&mut a, &b);
        assert_eq!(
            (a.opened, a.closed, a.reset_by_backend, a.refused),
            (8, 7, 2, 1)
        );
        assert_eq!(a.srtt_histogram, [1, 3, 7]);
        let d = delta(&b, &a);
        assert_eq!((d.opened, d.reset_by_backend), (5, 0));
        assert_eq!(d.srtt_histogram, [1, 2, 0]);
    }
}
