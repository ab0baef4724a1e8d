//! The [`Signals`] of one subset over one interval, from two readings of its kernel counters.

use crate::model::rollout::Signals;
use crate::state::CounterStatus;

/// What the counters of one subset moved by between `before` and `after` (counters only
/// grow; a reset, e.g. the service redefined, gives zeros, not a negative).
pub fn between(before: &CounterStatus, after: &CounterStatus) -> Signals {
    let d = |a: u64, b: u64| b.saturating_sub(a);
    Signals {
        opened: d(before.opened, after.opened),
        closed: d(before.closed, after.closed),
        reset_by_backend: d(before.reset_by_backend, after.reset_by_backend),
        closed_without_reply: d(before.closed_without_reply, after.closed_without_reply),
        refused: d(before.misses, after.misses),
        retransmit_timeouts: d(before.retransmit_timeouts, after.retransmit_timeouts),
        srtt_histogram: before
            .srtt_histogram
            .iter()
            .zip(after.srtt_histogram.iter())
            .map(|(a, b)| d(*a, *b))
            .collect(),
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
}
