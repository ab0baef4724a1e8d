//! Weight arithmetic and the ranges a service's traffic is split by.
//!
//! A new connection's flow hash picks one of [`NUM_BUCKETS`] positions, and each subset owns a
//! range of positions ([`tcpshift_common::ServiceEntry::bounds`], chosen by
//! [`tcpshift_common::choose`]). [`bucket_counts`] turns relative integer weights into a
//! number of positions per subset (largest-remainder rounding, so every subset is within one
//! position of its exact share), and [`bounds`] lays them out as consecutive ranges, subset 0
//! first. The round-robin mode needs no ranges: its sequence is computed from the weights
//! ([`tcpshift_common::choose::round_robin`], period [`round_robin_period`]).
//!
//! [`parse_assignment`] and [`apply_set_weight`] implement `tcpshiftctl set-weight`: naming
//! every subset sets relative weights, naming only some sets percentages and gives the rest to
//! the others in proportion to their current weights.

use tcpshift_common::{MAX_SUBSETS, NUM_BUCKETS};

/// Largest weight a subset can have (so that the sum of [`MAX_SUBSETS`] weights, and a weight
/// times [`NUM_BUCKETS`], never overflow).
pub const MAX_WEIGHT: u32 = 1_000_000;

/// Total of the weights produced by the partial (percentage) form of [`apply_set_weight`].
pub const PERCENT_TOTAL: u32 = 100;

/// Why a set of weights or a weight assignment was rejected. Each message says what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum WeightError {
    /// No weights at all.
    #[error("no weights given; a service needs at least one subset")]
    Empty,
    /// More weights than [`MAX_SUBSETS`].
    #[error("{count} weights given; a service has at most {MAX_SUBSETS} subsets")]
    TooManySubsets {
        /// Number of weights given.
        count: usize,
    },
    /// Every weight is 0.
    #[error("all weights are 0: at least one subset needs a weight above 0")]
    ZeroTotal,
    /// A weight above [`MAX_WEIGHT`].
    #[error("weight {weight} for subset {subset} is too large; weights are at most {MAX_WEIGHT}")]
    TooLarge {
        /// The subset (its name, or `#index` when only indices are known).
        subset: String,
        /// The weight given.
        weight: u64,
    },
    /// An assignment that is not `SUBSET=WEIGHT`.
    #[error("invalid weight assignment {input:?}: {reason}; expected SUBSET=WEIGHT, e.g. v2=20")]
    InvalidAssignment {
        /// The assignment as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An assignment with a negative weight.
    #[error(
        "invalid weight assignment {input:?}: weights cannot be negative; expected SUBSET=WEIGHT \
         with WEIGHT an integer from 0 to {MAX_WEIGHT}"
    )]
    Negative {
        /// The assignment as given.
        input: String,
    },
    /// No assignment at all.
    #[error("no weight given; expected at least one SUBSET=WEIGHT, e.g. v2=20")]
    NoAssignment,
    /// An assignment names a subset the service does not have.
    #[error("unknown subset {subset:?}; the service's subsets are: {}", known.join(", "))]
    UnknownSubset {
        /// The name given.
        subset: String,
        /// The service's subsets, in order.
        known: Vec<String>,
    },
    /// A subset named twice.
    #[error("subset {subset:?} is named twice; give each subset at most once")]
    DuplicateSubset {
        /// The name given twice.
        subset: String,
    },
    /// A value above 100 when only some subsets are named (percentages).
    #[error(
        "{subset}={weight}: when only some subsets are named, weights are percentages from 0 \
         to 100; name every subset to set relative weights above 100"
    )]
    PercentTooLarge {
        /// The subset.
        subset: String,
        /// The weight given.
        weight: u32,
    },
    /// Percentages adding up to more than 100.
    #[error(
        "the named subsets add up to {sum}%, more than 100%; lower them, or name every subset \
         to set relative weights"
    )]
    PercentSumTooLarge {
        /// Sum of the named percentages.
        sum: u64,
    },
}

/// Splits `total` into integer parts proportional to `weights` (which must not all be 0) by
/// largest remainder, ties going to the lower index. Every part is the floor or the ceiling
/// of its exact share and a zero weight gets 0. Callers keep `total * weight` within `u64`.
fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    let sum: u64 = weights.iter().sum();
    if sum == 0 {
        return vec![0; weights.len()];
    }
    let mut parts: Vec<u64> = weights.iter().map(|&w| w * total / sum).collect();
    let mut order: Vec<(u64, usize)> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| (w * total % sum, i))
        .collect();
    // Largest remainder first, then lowest index.
    order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let left = total - parts.iter().sum::<u64>();
    // `left` is smaller than the number of positive remainders (each is below `sum` and they
    // add up to `left * sum`), so zero weights never get a part.
    for &(_, i) in order
        .iter()
        .take(usize::try_from(left).unwrap_or(usize::MAX))
    {
        if let Some(p) = parts.get_mut(i) {
            *p += 1;
        }
    }
    parts
}

fn check_weights(weights: &[u32]) -> Result<(), WeightError> {
    if weights.is_empty() {
        return Err(WeightError::Empty);
    }
    if weights.len() > MAX_SUBSETS {
        return Err(WeightError::TooManySubsets {
            count: weights.len(),
        });
    }
    if weights.iter().all(|&w| w == 0) {
        return Err(WeightError::ZeroTotal);
    }
    Ok(())
}

/// Number of buckets of the [`NUM_BUCKETS`] table each subset gets: proportional to the
/// weights, largest-remainder rounding (ties broken by lower index), sum exactly
/// [`NUM_BUCKETS`], a zero weight gets 0 buckets. Error if `weights` is empty, longer than
/// [`MAX_SUBSETS`] or sums to 0.
pub fn bucket_counts(weights: &[u32]) -> Result<Vec<u32>, WeightError> {
    check_weights(weights)?;
    let wide: Vec<u64> = weights.iter().map(|&w| u64::from(w)).collect();
    // Each part is at most NUM_BUCKETS, which fits in u32.
    Ok(apportion(NUM_BUCKETS as u64, &wide)
        .into_iter()
        .map(|c| u32::try_from(c).unwrap_or(u32::MAX))
        .collect())
}

/// The ranges of the hash modes ([`tcpshift_common::ServiceEntry::bounds`]): subset `i` owns
/// positions `bounds[i - 1] .. bounds[i]`, as many as [`bucket_counts`] gives it, so the last
/// weighted subset ends at [`NUM_BUCKETS`] and a subset without weight owns an empty range.
/// Entries past the subsets are [`NUM_BUCKETS`].
///
/// The ranges are a function of the weights alone, not of the weights applied before, and the
/// positions of source-IP affinity are the seeded hash of the client address: hosts that share
/// the seed (a fleet) map every client address to the same subset, whatever revisions each host
/// saw on the way. A weight change moves only the positions between the old and the new
/// bounds: with two subsets exactly the positions the counts force (80/20 → 70/30 moves 10 %
/// of them, all from subset 0 to subset 1); with more subsets, a change between subsets
/// `i < j` also shifts the ranges between them, so up to `j - i` times that share moves
/// (adjacent subsets: exactly the share).
pub fn bounds(weights: &[u32]) -> Result<[u16; MAX_SUBSETS], WeightError> {
    let counts = bucket_counts(weights)?;
    let mut bounds = [NUM_BUCKETS as u16; MAX_SUBSETS];
    let mut end = 0u32;
    for (b, c) in bounds.iter_mut().zip(counts) {
        end += c;
        // The counts add up to NUM_BUCKETS, which fits in a u16 (asserted in tcpshift-common).
        *b = u16::try_from(end).unwrap_or(NUM_BUCKETS as u16);
    }
    Ok(bounds)
}

/// The period of the round-robin sequence of `weights`
/// ([`tcpshift_common::ServiceEntry::rr_period`]): the sum of the weights (at most
/// [`MAX_SUBSETS`] × [`MAX_WEIGHT`], so it fits in a `u32`, and the data path's products of a
/// position and a weight fit in a `u64`). Error for a weight above [`MAX_WEIGHT`].
pub fn round_robin_period(weights: &[u32]) -> Result<u32, WeightError> {
    check_weights(weights)?;
    if let Some((i, &w)) = weights.iter().enumerate().find(|(_, w)| **w > MAX_WEIGHT) {
        return Err(WeightError::TooLarge {
            subset: format!("#{i}"),
            weight: u64::from(w),
        });
    }
    // At most 16 × 10⁶.
    Ok(weights.iter().sum())
}

/// Parses one CLI assignment `NAME=W`. `W` must be a non-negative integer (at most
/// [`MAX_WEIGHT`]); `-5` gets a message saying weights cannot be negative, `v2`, `=5` or
/// `v2=abc` a message showing the expected form `SUBSET=WEIGHT`.
pub fn parse_assignment(s: &str) -> Result<(String, u32), WeightError> {
    let invalid = |reason: &str| WeightError::InvalidAssignment {
        input: s.to_owned(),
        reason: reason.to_owned(),
    };
    let Some((name, value)) = s.split_once('=') else {
        return Err(invalid("missing '='"));
    };
    let name = name.trim();
    let value = value.trim();
    if name.is_empty() {
        return Err(invalid("missing subset name before '='"));
    }
    if value.is_empty() {
        return Err(invalid("missing weight after '='"));
    }
    if let Some(digits) = value.strip_prefix('-')
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(WeightError::Negative {
            input: s.to_owned(),
        });
    }
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(&format!(
            "weight {value:?} is not a non-negative integer"
        )));
    }
    match value.parse::<u64>() {
        Ok(w) if w <= u64::from(MAX_WEIGHT) => {
            let w = u32::try_from(w).unwrap_or(MAX_WEIGHT);
            Ok((name.to_owned(), w))
        }
        Ok(w) => Err(WeightError::TooLarge {
            subset: name.to_owned(),
            weight: w,
        }),
        // Beyond u64: name the number as given, not a saturated one.
        Err(_) => Err(invalid(&format!(
            "weight {value} is too large; weights are at most {MAX_WEIGHT}"
        ))),
    }
}

/// The `tcpshiftctl set-weight` rule. `current` = (subset name, current weight) of every
/// subset of the service in order; `requested` = parsed assignments. Returns the new weights
/// in the order of `current`.
///
/// - Naming **all** subsets sets them exactly (relative integers, each at most
///   [`MAX_WEIGHT`], sum above 0).
/// - Naming only **some**: each named value must be 0..=100 and their sum at most 100
///   (percentages); the rest (100 - sum) goes to the unnamed subsets in proportion to their
///   current weights (largest remainder, ties to the lower index); if all unnamed subsets
///   currently have weight 0 the rest is split equally among them (the remainder to the first
///   ones). The result sums to 100.
///
/// Example: current `v1=100,v2=0`, request `v2=20` → `v1=80,v2=20`; current `v1=3,v2=1,v3=0`,
/// request `v3=20` → `v1=60,v2=20,v3=20`.
pub fn apply_set_weight(
    current: &[(String, u32)],
    requested: &[(String, u32)],
) -> Result<Vec<u32>, WeightError> {
    if requested.is_empty() {
        return Err(WeightError::NoAssignment);
    }
    if current.len() > MAX_SUBSETS {
        return Err(WeightError::TooManySubsets {
            count: current.len(),
        });
    }
    let mut named: Vec<Option<u32>> = vec![None; current.len()];
    for (name, weight) in requested {
        let Some(i) = current.iter().position(|(n, _)| n == name) else {
            return Err(WeightError::UnknownSubset {
                subset: name.clone(),
                known: current.iter().map(|(n, _)| n.clone()).collect(),
            });
        };
        match named.get_mut(i) {
            Some(Some(_)) => {
                return Err(WeightError::DuplicateSubset {
                    subset: name.clone(),
                });
            }
            Some(slot) => *slot = Some(*weight),
            None => {}
        }
    }

    if named.iter().all(Option::is_some) {
        for (name, weight) in requested {
            if *weight > MAX_WEIGHT {
                return Err(WeightError::TooLarge {
                    subset: name.clone(),
                    weight: u64::from(*weight),
                });
            }
        }
        let weights: Vec<u32> = named.iter().map(|w| w.unwrap_or(0)).collect();
        if weights.iter().all(|&w| w == 0) {
            return Err(WeightError::ZeroTotal);
        }
        return Ok(weights);
    }

    // Partial form: percentages.
    for (name, weight) in requested {
        if *weight > PERCENT_TOTAL {
            return Err(WeightError::PercentTooLarge {
                subset: name.clone(),
                weight: *weight,
            });
        }
    }
    let sum: u64 = requested.iter().map(|(_, w)| u64::from(*w)).sum();
    if sum > u64::from(PERCENT_TOTAL) {
        return Err(WeightError::PercentSumTooLarge { sum });
    }
    let rest = u64::from(PERCENT_TOTAL) - sum;
    let unnamed: Vec<usize> = (0..current.len())
        .filter(|&i| named.get(i).is_some_and(Option::is_none))
        .collect();
    let unnamed_current: Vec<u64> = unnamed
        .iter()
        .map(|&i| current.get(i).map_or(0, |(_, w)| u64::from(*w)))
        .collect();
    let shares = if unnamed_current.iter().all(|&w| w == 0) {
        apportion(rest, &vec![1; unnamed.len()])
    } else {
        apportion(rest, &unnamed_current)
    };
    let mut result: Vec<u32> = named.iter().map(|w| w.unwrap_or(0)).collect();
    for (&i, &share) in unnamed.iter().zip(shares.iter()) {
        if let Some(r) = result.get_mut(i) {
            // share <= rest <= 100.
            *r = u32::try_from(share).unwrap_or(PERCENT_TOTAL);
        }
    }
    Ok(result)
}

/// Share in percent of each subset (`weight / total * 100`), for display. All shares are 0
/// when the total is 0.
pub fn shares(weights: &[u32]) -> Vec<f64> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 {
        return vec![0.0; weights.len()];
    }
    weights
        .iter()
        .map(|&w| f64::from(w) * 100.0 / total as f64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tcpshift_common::choose;

    const N: u32 = NUM_BUCKETS as u32;

    fn named(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
        pairs.iter().map(|(n, w)| (n.to_string(), *w)).collect()
    }

    /// A service entry with `weights` as userspace writes it (ranges and period).
    fn entry(weights: &[u32]) -> tcpshift_common::ServiceEntry {
        let mut e = tcpshift_common::ServiceEntry {
            n_subsets: weights.len() as u8,
            bounds: bounds(weights).unwrap(),
            rr_period: round_robin_period(weights).unwrap(),
            ..Default::default()
        };
        e.weights[..weights.len()].copy_from_slice(weights);
        e
    }

    /// The subset of every position of the hash space.
    fn by_position(weights: &[u32]) -> Vec<u32> {
        let e = entry(weights);
        (0..N).map(|p| choose::by_position(&e, p)).collect()
    }

    /// The first `n` positions of the round-robin sequence.
    fn round_robin(weights: &[u32], n: u64) -> Vec<u32> {
        let e = entry(weights);
        (0..n).map(|p| choose::round_robin(&e, p)).collect()
    }

    fn counts_of(subsets: &[u32], n: usize) -> Vec<u32> {
        let mut counts = vec![0u32; n];
        for &s in subsets {
            counts[s as usize] += 1;
        }
        counts
    }

    #[test]
    fn bucket_counts_examples() {
        assert_eq!(bucket_counts(&[100, 0]), Ok(vec![N, 0]));
        assert_eq!(bucket_counts(&[0, 7]), Ok(vec![0, N]));
        assert_eq!(bucket_counts(&[5]), Ok(vec![N]));
        assert_eq!(bucket_counts(&[1, 1]), Ok(vec![N / 2, N / 2]));
        // 16384 / 3 = 5461.33: equal remainders, the lowest index gets the extra bucket.
        assert_eq!(bucket_counts(&[1, 1, 1]), Ok(vec![5462, 5461, 5461]));
        // 13107.2 and 3276.8: the larger remainder wins.
        assert_eq!(bucket_counts(&[80, 20]), Ok(vec![13107, 3277]));
        assert_eq!(bucket_counts(&[MAX_WEIGHT, 1]), Ok(vec![N, 0]));
        assert_eq!(
            bucket_counts(&[u32::MAX; MAX_SUBSETS]),
            Ok(vec![N / 16; 16])
        );
    }

    #[test]
    fn bucket_counts_errors() {
        assert_eq!(bucket_counts(&[]), Err(WeightError::Empty));
        assert_eq!(
            bucket_counts(&[1; MAX_SUBSETS + 1]),
            Err(WeightError::TooManySubsets { count: 17 })
        );
        assert_eq!(bucket_counts(&[0, 0]), Err(WeightError::ZeroTotal));
        assert_eq!(
            WeightError::ZeroTotal.to_string(),
            "all weights are 0: at least one subset needs a weight above 0"
        );
        assert_eq!(
            WeightError::TooManySubsets { count: 17 }.to_string(),
            "17 weights given; a service has at most 16 subsets"
        );
        assert!(bounds(&[]).is_err());
        assert!(bounds(&[0]).is_err());
        assert!(round_robin_period(&[0, 0]).is_err());
        assert_eq!(
            round_robin_period(&[1, MAX_WEIGHT + 1]),
            Err(WeightError::TooLarge {
                subset: "#1".into(),
                weight: u64::from(MAX_WEIGHT) + 1
            })
        );
    }

    #[test]
    fn bounds_examples() {
        let mut expected = [N as u16; MAX_SUBSETS];
        expected[0] = 13107;
        assert_eq!(bounds(&[80, 20]), Ok(expected));
        expected[0] = 0;
        assert_eq!(bounds(&[0, 100, 0]), Ok(expected));
        let split = by_position(&[0, 100, 0]);
        assert!(split.iter().all(|&s| s == 1));
        // Consecutive ranges, subset 0 first.
        let split = by_position(&[1, 1]);
        assert!(split[..N as usize / 2].iter().all(|&s| s == 0));
        assert!(split[N as usize / 2..].iter().all(|&s| s == 1));
    }

    #[test]
    fn affinity_80_20_to_70_30_moves_a_tenth_and_back() {
        let old = by_position(&[80, 20]);
        let new = by_position(&[70, 30]);
        let moved = old.iter().zip(&new).filter(|(a, b)| a != b).count();
        assert_eq!(moved, NUM_BUCKETS / 10);
        // Every position that moved went from v1 to v2.
        assert!(
            old.iter()
                .zip(&new)
                .all(|(a, b)| a == b || (*a == 0 && *b == 1))
        );
        // Back to 80/20 is the old split, position for position: no history.
        assert_eq!(by_position(&[80, 20]), old);
    }

    #[test]
    fn round_robin_80_20_is_exact_in_every_ten() {
        assert_eq!(round_robin_period(&[80, 20]), Ok(100));
        assert_eq!(round_robin(&[80, 20], 10), [0, 0, 1, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(counts_of(&round_robin(&[80, 20], 1000), 2), [800, 200]);
        assert!(round_robin(&[0, 3, 0], 10).iter().all(|&s| s == 1));
        assert_eq!(round_robin(&[1, 1, 1], 6), [1, 0, 2, 1, 0, 2]);
        // Weights far apart: still exact over a period, nothing overflows.
        let seq = round_robin(&[999_983, 1], 1_000_000 + 17);
        assert_eq!(seq.iter().filter(|&&s| s == 1).count(), 1);
    }

    #[test]
    fn parse_assignment_ok() {
        assert_eq!(parse_assignment("v2=20"), Ok(("v2".into(), 20)));
        assert_eq!(parse_assignment(" v2 = 0 "), Ok(("v2".into(), 0)));
        assert_eq!(
            parse_assignment("v2=1000000"),
            Ok(("v2".into(), MAX_WEIGHT))
        );
        assert_eq!(parse_assignment("v2=007"), Ok(("v2".into(), 7)));
    }

    #[test]
    fn parse_assignment_errors() {
        let negative = parse_assignment("v2=-5").unwrap_err();
        assert_eq!(
            negative,
            WeightError::Negative {
                input: "v2=-5".into()
            }
        );
        assert!(negative.to_string().contains("weights cannot be negative"));
        for (input, reason) in [
            ("v2", "missing '='"),
            ("=5", "missing subset name"),
            ("v2=", "missing weight"),
            ("v2=abc", "\"abc\" is not a non-negative integer"),
            ("v2=1.5", "\"1.5\" is not a non-negative integer"),
            ("v2=+5", "is not a non-negative integer"),
            ("v2=-", "is not a non-negative integer"),
            ("", "missing '='"),
        ] {
            let message = parse_assignment(input).unwrap_err().to_string();
            assert!(message.contains(&format!("{input:?}")), "{message}");
            assert!(message.contains(reason), "{message}");
            assert!(
                message.contains("expected SUBSET=WEIGHT, e.g. v2=20"),
                "{message}"
            );
        }
        for input in ["v2=1000001", "v2=99999999999999999999999"] {
            let message = parse_assignment(input).unwrap_err().to_string();
            assert!(
                message.contains("too large") && message.contains("at most 1000000"),
                "{message}"
            );
        }
    }

    #[test]
    fn set_weight_examples() {
        let current = named(&[("v1", 100), ("v2", 0)]);
        assert_eq!(
            apply_set_weight(&current, &named(&[("v2", 20)])),
            Ok(vec![80, 20])
        );
        assert_eq!(
            apply_set_weight(&current, &named(&[("v2", 100)])),
            Ok(vec![0, 100])
        );
        assert_eq!(
            apply_set_weight(&current, &named(&[("v1", 0)])),
            Ok(vec![0, 100])
        );

        let current = named(&[("v1", 3), ("v2", 1), ("v3", 0)]);
        assert_eq!(
            apply_set_weight(&current, &named(&[("v3", 20)])),
            Ok(vec![60, 20, 20])
        );
        // All unnamed subsets at 0: the rest is split equally, remainder to the first.
        let current = named(&[("v1", 0), ("v2", 0), ("v3", 0), ("v4", 9)]);
        assert_eq!(
            apply_set_weight(&current, &named(&[("v4", 0)])),
            Ok(vec![34, 33, 33, 0])
        );
        // Naming every subset sets relative weights exactly.
        let current = named(&[("v1", 1), ("v2", 1)]);
        assert_eq!(
            apply_set_weight(&current, &named(&[("v2", 500), ("v1", 1_000_000)])),
            Ok(vec![1_000_000, 500])
        );
        assert_eq!(
            apply_set_weight(&current[..1], &named(&[("v1", 3)])),
            Ok(vec![3])
        );
    }

    #[test]
    fn set_weight_errors() {
        let current = named(&[("v1", 100), ("v2", 0), ("v3", 0)]);
        type Case = (Vec<(String, u32)>, WeightError, &'static str);
        let cases: Vec<Case> = vec![
            (
                vec![],
                WeightError::NoAssignment,
                "expected at least one SUBSET=WEIGHT",
            ),
            (
                named(&[("v9", 1)]),
                WeightError::UnknownSubset {
                    subset: "v9".into(),
                    known: vec!["v1".into(), "v2".into(), "v3".into()],
                },
                "unknown subset \"v9\"; the service's subsets are: v1, v2, v3",
            ),
            (
                named(&[("v2", 1), ("v2", 2)]),
                WeightError::DuplicateSubset {
                    subset: "v2".into(),
                },
                "subset \"v2\" is named twice; give each subset at most once",
            ),
            (
                named(&[("v2", 150)]),
                WeightError::PercentTooLarge {
                    subset: "v2".into(),
                    weight: 150,
                },
                "v2=150: when only some subsets are named, weights are percentages from 0 to 100",
            ),
            (
                named(&[("v2", 60), ("v3", 70)]),
                WeightError::PercentSumTooLarge { sum: 130 },
                "add up to 130%, more than 100%",
            ),
            (
                named(&[("v1", 0), ("v2", 0), ("v3", 0)]),
                WeightError::ZeroTotal,
                "at least one subset needs a weight above 0",
            ),
            (
                named(&[("v1", 1), ("v2", 0), ("v3", MAX_WEIGHT + 1)]),
                WeightError::TooLarge {
                    subset: "v3".into(),
                    weight: 1_000_001,
                },
                "weight 1000001 for subset v3 is too large; weights are at most 1000000",
            ),
        ];
        for (requested, expected, text) in cases {
            let e = apply_set_weight(&current, &requested).unwrap_err();
            assert_eq!(e, expected);
            assert!(e.to_string().contains(text), "{e}");
        }
        assert!(matches!(
            apply_set_weight(&named(&[("a", 1); 17]), &named(&[("a", 1)])),
            Err(WeightError::TooManySubsets { count: 17 })
        ));
    }

    #[test]
    fn shares_examples() {
        assert_eq!(shares(&[80, 20]), [80.0, 20.0]);
        assert_eq!(shares(&[1, 1, 2]), [25.0, 25.0, 50.0]);
        assert_eq!(shares(&[0, 0]), [0.0, 0.0]);
        assert!(shares(&[]).is_empty());
    }

    fn weights_strategy() -> impl Strategy<Value = Vec<u32>> {
        prop_oneof![
            proptest::collection::vec(0..=MAX_WEIGHT, 1..=MAX_SUBSETS),
            proptest::collection::vec(0..=10u32, 1..=MAX_SUBSETS),
            proptest::collection::vec(prop_oneof![Just(0u32), Just(1), 0..=MAX_WEIGHT], 1..=4),
        ]
        .prop_filter("sum above 0", |w| w.iter().any(|&x| x > 0))
    }

    proptest! {
        #[test]
        fn counts_sum_and_proportion(weights in weights_strategy()) {
            let counts = bucket_counts(&weights).unwrap();
            prop_assert_eq!(counts.len(), weights.len());
            prop_assert_eq!(counts.iter().sum::<u32>(), N);
            let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
            for (&w, &c) in weights.iter().zip(&counts) {
                // c is the floor or the ceiling of w * N / total.
                let exact = u64::from(w) * u64::from(N);
                let c = u64::from(c);
                prop_assert!(c * total + total > exact && c * total < exact + total,
                    "w={} c={} total={}", w, c, total);
                if w == 0 {
                    prop_assert_eq!(c, 0);
                }
            }
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The ranges give every subset its exact count, and between two weightings of two
        /// subsets move only the positions the counts force.
        #[test]
        fn ranges_count_and_move_only_what_the_weights_move(
            weights in weights_strategy(),
            a in 0u32..1000,
            b in 0u32..1000,
        ) {
            let split = by_position(&weights);
            prop_assert_eq!(counts_of(&split, weights.len()), bucket_counts(&weights).unwrap());
            prop_assume!(a + b > 0);
            let (x, y) = (by_position(&[a, b]), by_position(&[b, a]));
            let (cx, cy) = (bucket_counts(&[a, b]).unwrap(), bucket_counts(&[b, a]).unwrap());
            let moved = x.iter().zip(&y).filter(|(p, q)| p != q).count();
            prop_assert_eq!(moved as u32, cx[0].abs_diff(cy[0]));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Two subsets: every run of n consecutive positions of the round-robin cursor gives
        /// each subset its exact share within one connection, wherever the run starts.
        #[test]
        fn round_robin_windows_within_one(a in 0..=1000u32, b in 0..=1000u32, n in 1..=1000u64) {
            prop_assume!(a + b > 0);
            let p = u64::from(a + b);
            let seq = round_robin(&[a, b], p);
            let sum = u64::from(a + b);
            for start in 0..p {
                let got = (start..start + n).filter(|&i| seq[(i % p) as usize] == 1).count();
                // |got - n * b / sum| <= 1
                let exact = n * u64::from(b);
                let got = got as u64 * sum;
                prop_assert!(got + sum >= exact && got <= exact + sum,
                    "{}/{}: {} of {} from {}", a, b, got / sum, n, start);
            }
        }

        /// Any number of subsets: a period holds each subset exactly its weight, and every run
        /// of consecutive positions gives each subset its exact share within k - 1
        /// connections, k the number of subsets with a weight.
        #[test]
        fn round_robin_windows_within_k_minus_one(
            weights in proptest::collection::vec(0..=12u32, 1..=MAX_SUBSETS),
        ) {
            prop_assume!(weights.iter().any(|&w| w > 0));
            let p = u64::from(weights.iter().sum::<u32>());
            let seq = round_robin(&weights, p);
            prop_assert_eq!(counts_of(&seq, weights.len()), weights.clone());
            let k = weights.iter().filter(|&&w| w > 0).count() as u64;
            for n in 1..=p {
                for start in 0..p {
                    let mut got = vec![0u64; weights.len()];
                    for i in start..start + n {
                        got[seq[(i % p) as usize] as usize] += 1;
                    }
                    for (i, &w) in weights.iter().enumerate() {
                        let (got, exact) = (got[i] * p, n * u64::from(w));
                        prop_assert!(got.abs_diff(exact) <= (k - 1).max(1) * p,
                            "{:?}: subset {} has {} of {} from {}", weights, i, got / p, n, start);
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn partial_set_weight_sums_to_100(
            current in proptest::collection::vec(0..=1000u32, 2..=MAX_SUBSETS),
            mask in proptest::collection::vec(any::<bool>(), MAX_SUBSETS),
            raw in proptest::collection::vec(0..=100u32, MAX_SUBSETS),
        ) {
            let n = current.len();
            let mut chosen: Vec<usize> = (0..n).filter(|&i| mask[i]).collect();
            if chosen.is_empty() {
                chosen.push(0);
            }
            if chosen.len() == n {
                chosen.pop();
            }
            let k = chosen.len() as u32;
            let requested: Vec<(String, u32)> = chosen
                .iter()
                .map(|&i| (format!("s{i}"), raw[i] % (100 / k + 1)))
                .collect();
            let current: Vec<(String, u32)> =
                current.iter().enumerate().map(|(i, &w)| (format!("s{i}"), w)).collect();
            let result = apply_set_weight(&current, &requested).unwrap();
            prop_assert_eq!(result.len(), n);
            prop_assert_eq!(result.iter().sum::<u32>(), 100);
            for (name, w) in &requested {
                let i = current.iter().position(|(n, _)| n == name).unwrap();
                prop_assert_eq!(result[i], *w);
            }
            // The unnamed subsets share the rest in proportion to their current weights.
            let rest: u32 = 100 - requested.iter().map(|(_, w)| w).sum::<u32>();
            let unnamed: Vec<usize> = (0..n).filter(|i| !chosen.contains(i)).collect();
            let mut base: Vec<u64> = unnamed.iter().map(|&i| u64::from(current[i].1)).collect();
            if base.iter().all(|&w| w == 0) {
                base = vec![1; unnamed.len()];
            }
            let total: u64 = base.iter().sum();
            for (&i, &b) in unnamed.iter().zip(&base) {
                let exact = b * u64::from(rest);
                let got = u64::from(result[i]);
                prop_assert!(got * total + total > exact && got * total < exact + total);
            }
        }

        #[test]
        fn full_set_weight_is_exact(weights in weights_strategy()) {
            let current: Vec<(String, u32)> =
                weights.iter().enumerate().map(|(i, _)| (format!("s{i}"), 1)).collect();
            // Name them in reverse order: the result is still in subset order.
            let requested: Vec<(String, u32)> = weights
                .iter()
                .enumerate()
                .rev()
                .map(|(i, &w)| (format!("s{i}"), w))
                .collect();
            prop_assert_eq!(apply_set_weight(&current, &requested), Ok(weights));
        }

        #[test]
        fn parse_assignment_never_panics(s in any::<String>()) {
            let _ = parse_assignment(&s);
        }

        #[test]
        fn parse_assignment_round_trips(name in "[A-Za-z0-9._-]{1,31}", w in 0..=MAX_WEIGHT) {
            prop_assert_eq!(parse_assignment(&format!("{name}={w}")), Ok((name, w)));
        }
    }
}
