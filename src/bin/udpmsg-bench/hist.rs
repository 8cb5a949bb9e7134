//! A small HDR-style latency histogram: log-linear buckets (64 linear sub-buckets per power of
//! two, values below 128 exact), so every recorded value is kept to within 1/64 (1.6 %) of its
//! true value at any magnitude, in a fixed 30 KiB, with O(1) recording.
//!
//! Values are nanoseconds. Percentiles report the highest value equivalent to the bucket the
//! rank falls in (as HdrHistogram does), capped by the true maximum.

use serde::Serialize;
use std::time::Duration;

/// Values below this are counted exactly.
const LINEAR: u64 = 128;
/// Sub-buckets per power of two above `LINEAR` (6 bits of precision).
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// 128 exact slots + 57 octaves (2^7 .. 2^63) of 64 sub-buckets.
const BUCKETS: usize = LINEAR as usize + (64 - 7) * SUB;

#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; BUCKETS], count: 0, sum: 0, min: u64::MAX, max: 0 }
    }
}

fn index(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let top = 63 - v.leading_zeros(); // >= 7
    let sub = ((v >> (top - SUB_BITS)) as usize) & (SUB - 1);
    LINEAR as usize + (top as usize - 7) * SUB + sub
}

/// The highest value that maps to bucket `i`.
fn highest_equivalent(i: usize) -> u64 {
    if i < LINEAR as usize {
        return i as u64;
    }
    let j = i - LINEAR as usize;
    let top = (j / SUB) as u32 + 7;
    let sub = (j % SUB) as u64;
    let shift = top - SUB_BITS;
    let low = (1u64 << top) | (sub << shift);
    low.saturating_add((1u64 << shift) - 1)
}

impl Histogram {
    pub fn record(&mut self, d: Duration) {
        self.record_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn record_ns(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.count += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value at quantile `q` (0..=1), in nanoseconds; 0 when empty.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return highest_equivalent(i).min(self.max);
            }
        }
        self.max
    }

    pub fn mean_ns(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The figures reported for a latency distribution, in microseconds.
    pub fn summary(&self) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            count: self.count,
            p50_us: us(self.quantile_ns(0.50)),
            p99_us: us(self.quantile_ns(0.99)),
            p999_us: us(self.quantile_ns(0.999)),
            max_us: us(if self.count == 0 { 0 } else { self.max }),
            mean_us: self.mean_ns() / 1000.0,
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_the_error() {
        for v in [0u64, 1, 127, 128, 129, 1000, 65_535, 1 << 40, u64::MAX] {
            let i = index(v);
            let hi = highest_equivalent(i);
            assert!(hi >= v, "{v}: {hi}");
            assert!((hi - v) as f64 <= (v as f64 / 64.0).max(0.0) + 1.0, "{v}: {hi}");
            if i > 0 {
                assert!(highest_equivalent(i - 1) < v, "{v}");
            }
        }
    }

    #[test]
    fn percentiles() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record_ns(v * 1000);
        }
        let p50 = h.quantile_ns(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.02, "{p50}");
        assert_eq!(h.quantile_ns(1.0), 1_000_000);
        assert_eq!(h.count(), 1000);
    }
}
