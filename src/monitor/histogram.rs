//! A fixed-bucket latency histogram of atomics, cheap enough to sit on the
//! store's sync path: one observation is two relaxed `fetch_add`s and a
//! search over a dozen constants, no lock and no allocation. Any thread may
//! observe; any thread may read a snapshot (the buckets are read one by one,
//! so a snapshot taken during observations may be off by those observations,
//! never torn inside one counter).
//!
//! Deliberately does not: compute quantiles (Prometheus does that from the
//! buckets), or reset.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds. From a fast NVMe fdatasync
/// (~50 µs) through an SD card's or eMMC's (1–50 ms) to a disk that is failing
/// (seconds); anything slower lands in the implicit `+Inf` bucket.
pub const FSYNC_BUCKET_BOUNDS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// `BUCKETS` upper bounds plus the `+Inf` bucket.
pub struct Histogram<const BUCKETS: usize> {
    bounds_us: [u64; BUCKETS],
    /// Non-cumulative: `counts[i]` holds observations in `(bounds[i-1], bounds[i]]`;
    /// the last slot is `+Inf`. (`BUCKETS + 1` cannot be written in a const
    /// generic on stable Rust, hence the separate overflow counter.)
    counts: [AtomicU64; BUCKETS],
    overflow: AtomicU64,
    sum_ns: AtomicU64,
}

/// A histogram read at one moment, cumulative as Prometheus exposes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// `(upper bound in µs, observations ≤ that bound)`, ascending.
    pub cumulative: Vec<(u64, u64)>,
    /// Every observation (the `+Inf` bucket).
    pub count: u64,
    pub sum_ns: u64,
}

impl<const BUCKETS: usize> Histogram<BUCKETS> {
    pub const fn new(bounds_us: [u64; BUCKETS]) -> Self {
        let mut i = 1;
        while i < BUCKETS {
            assert!(bounds_us[i - 1] < bounds_us[i], "bucket bounds ascend");
            i += 1;
        }
        Histogram {
            bounds_us,
            counts: [const { AtomicU64::new(0) }; BUCKETS],
            overflow: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, elapsed: Duration) {
        let us = elapsed.as_micros();
        let slot = self.bounds_us.iter().position(|&b| us <= u128::from(b));
        match slot {
            Some(i) => self.counts[i].fetch_add(1, Ordering::Relaxed),
            None => self.overflow.fetch_add(1, Ordering::Relaxed),
        };
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0u64;
        let cumulative = self
            .bounds_us
            .iter()
            .zip(&self.counts)
            .map(|(&bound, count)| {
                running += count.load(Ordering::Relaxed);
                (bound, running)
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            count: running + self.overflow.load(Ordering::Relaxed),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// Every `fdatasync` of the store's group commit (the per-shard sync threads).
pub static FSYNC: Histogram<{ FSYNC_BUCKET_BOUNDS_US.len() }> =
    Histogram::new(FSYNC_BUCKET_BOUNDS_US);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let histogram = Histogram::new([10, 100, 1_000]);
        for us in [0, 10, 11, 100, 999, 1_000, 1_001, 5_000_000] {
            histogram.observe(Duration::from_micros(us));
        }
        let snapshot = histogram.snapshot();
        // ≤10: 0, 10; ≤100: +11, 100; ≤1000: +999, 1000; +Inf: +1001, 5 s.
        assert_eq!(snapshot.cumulative, vec![(10, 2), (100, 4), (1_000, 6)]);
        assert_eq!(snapshot.count, 8);
        let sum_us: u64 = [0, 10, 11, 100, 999, 1_000, 1_001, 5_000_000].iter().sum();
        assert_eq!(snapshot.sum_ns, sum_us * 1_000);
    }
}
