//! Outlier ejection: which subsets to eject and when they return — pure decision logic.
//!
//! tcpshiftd reads each subset's failure counters every `interval` (the kernel's signals of
//! [`crate::rollout::signals`]) and hands them here with the subset's stored record; what
//! comes back is written to `TS_LIMITS` (`state/limits.rs`), where the sk_lookup program
//! reads `ejected`. Nothing here touches the kernel.
//!
//! Istio's rule for TCP is that "connection timeouts and connection error/failure events
//! qualify as an error". The kernel's signals that are such events, per subset:
//! resets by the backend, closes without a reply (the backend closed first without a byte),
//! connections refused for lack of a socket (`misses`) and retransmission timeouts. A
//! connection that closed without either of the first two went well.
//!
//! The counters come in sums per interval, not one by one, so "in a row" is read per
//! interval: an interval with no connection that went well adds its errors to the run; an
//! interval with one that went well ends the run (the run starts again from that interval's
//! errors only if nothing went well — with a mix, the order is unknown and the run is reset,
//! erring on the side of not ejecting). A subset whose run reaches the threshold is ejected
//! for `baseEjectionTime × times ejected`, unless that would eject more than
//! `maxEjectionPercent` of the service's subsets (Envoy's rule: eject while the share already
//! ejected is below the percentage) or the last subset not ejected. When its time is up it
//! returns with an empty run; an interval that went well without an error while it is back
//! takes one off its count of ejections, so a subset that keeps failing is ejected for longer
//! each time and one that recovered comes back to the base time.

use crate::model::rollout::Signals;
use crate::model::traffic_policy::{OutlierDetection, Trigger};

/// What one interval of a subset's counters says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interval {
    /// Connection errors: resets by the backend, closes without a reply, refused,
    /// retransmission timeouts.
    pub errors: u64,
    /// Connections that closed well (neither reset by the backend nor without a reply).
    pub good: u64,
}

impl Interval {
    /// The interval of `signals` (a subset's counters moved by this much).
    pub fn of(signals: &Signals) -> Interval {
        let bad_closes = signals.reset_by_backend + signals.closed_without_reply;
        Interval {
            errors: bad_closes + signals.refused + signals.retransmit_timeouts,
            good: signals.closed.saturating_sub(bad_closes),
        }
    }
}

/// A subset's ejection record, as stored in `TS_LIMITS` (so it survives tcpshiftd).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// Ejected now.
    pub ejected: bool,
    /// Times ejected (the current ejection included); the next lasts one base time longer.
    pub times_ejected: u32,
    /// When the last ejection began, ms since the Unix epoch (0: never).
    pub since_ms: u64,
    /// When the current ejection ends, ms since the Unix epoch.
    pub until_ms: u64,
    /// Why the last ejection happened.
    pub reason: Option<Trigger>,
    /// Errors in the current run.
    pub errors_in_row: u32,
}

/// One subset of a service, as the decision sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subset {
    /// Its name (for events).
    pub name: String,
    /// Its outlier detection; `None`: never ejected by it.
    pub detection: Option<OutlierDetection>,
    /// Its record; updated in place by [`decide`].
    pub record: Record,
    /// Its counters over the interval just ended, when the service's interval ended now.
    pub interval: Option<Interval>,
}

/// What [`decide`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `subset` was ejected after `errors` errors in a row, until `until_ms`, for the
    /// `times`-th time.
    Ejected {
        /// The subset.
        subset: String,
        /// Errors in the run.
        errors: u32,
        /// End of the ejection, ms since the Unix epoch.
        until_ms: u64,
        /// Times ejected, this one included.
        times: u32,
        /// The threshold that ejected it.
        reason: Trigger,
    },
    /// `subset` reached its threshold but stays: `maxEjectionPercent` (or the last subset
    /// not ejected) forbids ejecting it now.
    Held {
        /// The subset.
        subset: String,
        /// Errors in the run.
        errors: u32,
    },
    /// `subset`'s ejection time is up: it gets new connections again.
    Returned {
        /// The subset.
        subset: String,
    },
}

/// One step for one service's `subsets` at `now_ms`: ejections that are over end, the
/// intervals given are counted, and subsets whose run reached their threshold are ejected as
/// far as `maxEjectionPercent` allows (the longest runs first). Records are updated in place.
pub fn decide(now_ms: u64, subsets: &mut [Subset]) -> Vec<Event> {
    let mut events = Vec::new();
    for s in subsets.iter_mut() {
        let r = &mut s.record;
        if r.ejected && now_ms >= r.until_ms {
            r.ejected = false;
            r.errors_in_row = 0;
            events.push(Event::Returned {
                subset: s.name.clone(),
            });
            // What happened while it was ejected is not its doing.
            s.interval = None;
        }
    }
    for s in subsets.iter_mut() {
        let (Some(_), Some(iv)) = (s.detection, s.interval) else {
            continue;
        };
        let r = &mut s.record;
        if r.ejected {
            continue;
        }
        if iv.good > 0 {
            r.errors_in_row = 0;
            if iv.errors == 0 {
                r.times_ejected = r.times_ejected.saturating_sub(1);
            }
        } else {
            let add = u32::try_from(iv.errors).unwrap_or(u32::MAX);
            r.errors_in_row = r.errors_in_row.saturating_add(add);
        }
    }
    let total = subsets.len();
    let mut due: Vec<usize> = (0..total)
        .filter(|&i| {
            let s = &subsets[i];
            !s.record.ejected
                && s.detection
                    .is_some_and(|d| s.record.errors_in_row >= d.consecutive_errors.max(1))
        })
        .collect();
    due.sort_by_key(|&i| std::cmp::Reverse(subsets[i].record.errors_in_row));
    for i in due {
        let ejected = subsets.iter().filter(|s| s.record.ejected).count();
        let s = &mut subsets[i];
        let Some(d) = s.detection else { continue };
        let allowed =
            (ejected * 100) < (d.max_ejection_percent as usize * total) && ejected + 1 < total;
        let r = &mut s.record;
        if !allowed {
            events.push(Event::Held {
                subset: s.name.clone(),
                errors: r.errors_in_row,
            });
            continue;
        }
        r.ejected = true;
        r.times_ejected = r.times_ejected.saturating_add(1);
        r.since_ms = now_ms;
        let length = d.base_ejection_time.as_millis() as u64 * u64::from(r.times_ejected);
        r.until_ms = now_ms.saturating_add(length);
        r.reason = Some(d.trigger);
        events.push(Event::Ejected {
            subset: s.name.clone(),
            errors: r.errors_in_row,
            until_ms: r.until_ms,
            times: r.times_ejected,
            reason: d.trigger,
        });
    }
    events
}

#[cfg(test)]
mod tests;
