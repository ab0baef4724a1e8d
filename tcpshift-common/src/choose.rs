//! How a new connection's subset is picked from a service's [`ServiceEntry`], with no table:
//! the data path (sk_lookup, its UDP path) and userspace (tests, `weights.rs`' properties) run
//! these same functions.
//!
//! - The hash modes ([`mode::HASH_CONNECTION`], [`mode::HASH_SOURCE_IP`]) take a position of
//!   the [`NUM_BUCKETS`] positions from the flow hash and find the subset whose range holds it:
//!   [`by_position`], at most [`MAX_SUBSETS`] comparisons with the entry's
//!   [`ServiceEntry::bounds`].
//! - [`mode::ROUND_ROBIN`] takes the next position of the service's cursor and computes the
//!   subset of that position in a balanced weighted sequence: [`round_robin`].
//!
//! Both read only the entry, which userspace replaces as a whole: a weight change is one map
//! update, and a service costs no memory beyond its entry.

#[cfg(doc)]
use crate::mode;
use crate::{BUCKET_MASK, MAX_SUBSETS, ServiceEntry};

/// The subset owning position `position` (taken modulo [`NUM_BUCKETS`]) of `entry`'s ranges:
/// the first subset whose bound is above it. A position beyond every bound (never, for an
/// entry written by userspace: the last weighted subset's bound is [`NUM_BUCKETS`]) goes to
/// the last subset.
///
/// [`NUM_BUCKETS`]: crate::NUM_BUCKETS
#[inline(always)]
pub fn by_position(entry: &ServiceEntry, position: u32) -> u32 {
    let position = position & BUCKET_MASK;
    let n = entry.n_subsets as usize;
    let mut i = 0;
    while i < MAX_SUBSETS {
        if i + 1 >= n || position < u32::from(entry.bounds[i]) {
            return i as u32;
        }
        i += 1;
    }
    (MAX_SUBSETS - 1) as u32
}

/// The subset at position `position` of the service's weighted round-robin sequence, whose
/// period is [`ServiceEntry::rr_period`] (the sum of the weights).
///
/// The sequence is built subset by subset, each placed evenly among the positions the
/// subsets before it left: with `w` the subset's weight and `r` the positions left
/// (initially the period), position `j` of those left is the subset's when
/// `⌊((j + 1)·w + r/2) / r⌋ > ⌊(j·w + r/2) / r⌋` — `w` positions of every `r`, spread like a
/// straight line drawn on a grid — and otherwise becomes position `j − ⌊(j·w + r/2) / r⌋`
/// of the `r − w` left for the next subsets. The first subset is therefore within one
/// connection of its exact share over every run of consecutive positions, whatever its
/// length, and so is the second when there are two (it takes exactly the rest); 80/20 is
/// `0 0 1 0 0` repeated. Each further subset adds at most one connection to the error of
/// the ones after it (property-tested in `tcpshift-user`'s `weights.rs`).
///
/// At most [`MAX_SUBSETS`] steps of two divisions, no table. Weights are at most 10⁶ and
/// the period at most 1.6 · 10⁷, so every product fits in a `u64`.
#[inline(always)]
pub fn round_robin(entry: &ServiceEntry, position: u64) -> u32 {
    let mut left = u64::from(entry.rr_period);
    if left == 0 {
        return 0;
    }
    let mut j = position % left;
    let n = entry.n_subsets as usize;
    let mut i = 0;
    while i < MAX_SUBSETS && i < n {
        let w = u64::from(entry.weights[i]);
        if w >= left {
            return i as u32;
        }
        if w > 0 {
            // left > w > 0 here, so the divisions are by a non-zero value.
            let half = left / 2;
            let before = (j * w + half) / left;
            let through = ((j + 1) * w + half) / left;
            if through > before {
                return i as u32;
            }
            j -= before;
            left -= w;
        }
        i += 1;
    }
    // Only when the weights do not add up to the period (never, for an entry written by
    // userspace).
    0
}
