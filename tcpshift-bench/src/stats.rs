//! Percentiles of latency samples and min/median/max summaries of repeated runs.

use serde::{Deserialize, Serialize};

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Number of samples.
    pub samples: u64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest sample.
    pub max_us: f64,
}

impl Percentiles {
    /// Percentiles of `samples_ns` (nanoseconds; sorted in place). Empty input gives zeros.
    pub fn from_ns(samples_ns: &mut [u64]) -> Self {
        samples_ns.sort_unstable();
        let us = |q: f64| quantile_sorted(samples_ns, q).map_or(0.0, |ns| ns as f64 / 1e3);
        Percentiles {
            samples: samples_ns.len() as u64,
            p50_us: us(0.50),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: samples_ns.last().map_or(0.0, |&ns| ns as f64 / 1e3),
        }
    }
}

/// The `q`-quantile (0..=1) of sorted samples by the nearest-rank method: the smallest sample
/// with at least `q` of the samples at or below it.
pub fn quantile_sorted(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Minimum, median and maximum of repeated measurements of one figure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Smallest value.
    pub min: f64,
    /// Median (mean of the two middle values for an even count).
    pub median: f64,
    /// Largest value.
    pub max: f64,
    /// Number of values.
    pub n: usize,
}

impl Spread {
    /// The spread of `values`, or `None` when there is none (NaNs are ignored).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            min: v[0],
            median,
            max: v[n - 1],
            n,
        })
    }

    /// `median (min–max)` with `digits` decimals, or just the median for a single value.
    pub fn show(&self, digits: usize) -> String {
        if self.n == 1 || self.min == self.max {
            format!("{:.digits$}", self.median)
        } else {
            format!(
                "{:.digits$} ({:.digits$}–{:.digits$})",
                self.median, self.min, self.max
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile_sorted(&v, 0.5), Some(500));
        assert_eq!(quantile_sorted(&v, 0.99), Some(990));
        assert_eq!(quantile_sorted(&v, 0.999), Some(999));
        assert_eq!(quantile_sorted(&v, 1.0), Some(1000));
        assert_eq!(quantile_sorted(&v, 0.0), Some(1));
        assert_eq!(quantile_sorted(&[], 0.5), None);
        assert_eq!(quantile_sorted(&[7], 0.999), Some(7));
    }

    #[test]
    fn percentiles_in_microseconds() {
        let mut v: Vec<u64> = (1..=100).rev().map(|i| i * 1000).collect();
        let p = Percentiles::from_ns(&mut v);
        assert_eq!(p.samples, 100);
        assert_eq!(p.p50_us, 50.0);
        assert_eq!(p.p99_us, 99.0);
        assert_eq!(p.p999_us, 100.0);
        assert_eq!(p.max_us, 100.0);
        assert_eq!(Percentiles::from_ns(&mut []), Percentiles::default());
    }

    #[test]
    fn spread() {
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 2.0, 3.0, 3));
        let s = Spread::of([4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Spread::of([]).is_none());
        assert!(Spread::of([f64::NAN]).is_none());
        assert_eq!(Spread::of([2.0]).unwrap().show(1), "2.0");
        assert_eq!(Spread::of([1.0, 3.0]).unwrap().show(0), "2 (1–3)");
    }
}
