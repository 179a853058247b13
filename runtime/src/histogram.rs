//! A lock-free latency histogram: four buckets per power of two of
//! nanoseconds (at most 25% wide), so p50 and p99 cost one atomic add per
//! call to collect.

use std::sync::atomic::{AtomicU64, Ordering};

/// Buckets: four per power of two over the whole `u64` range.
pub(crate) const BUCKETS: usize = 64 * 4;

/// Counts of durations by bucket.
pub(crate) struct Histogram([AtomicU64; BUCKETS]);

impl Default for Histogram {
    fn default() -> Self {
        Histogram([const { AtomicU64::new(0) }; BUCKETS])
    }
}

impl Histogram {
    /// Counts one duration of `ns` nanoseconds.
    pub(crate) fn add(&self, ns: u64) {
        self.0[index(ns)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    pub(crate) fn snapshot(&self) -> [u64; BUCKETS] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

fn index(ns: u64) -> usize {
    if ns < 4 {
        return ns as usize;
    }
    let log = 63 - ns.leading_zeros() as usize;
    // The two bits after the leading one pick the quarter.
    (log << 2) | ((ns >> (log - 2)) & 3) as usize
}

/// The upper bound, in nanoseconds, of bucket `i`.
fn upper(i: usize) -> u64 {
    if i < 8 {
        return i as u64 + 1;
    }
    let (log, quarter) = (i >> 2, (i & 3) as u64);
    (4 + quarter + 1).saturating_mul(1u64 << (log - 2))
}

/// The `q` quantile (0..=1) of `counts`, as a bucket's upper bound in
/// nanoseconds; 0 with no counts.
pub(crate) fn quantile(counts: &[u64; BUCKETS], q: f64) -> u64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0;
    }
    let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (i, count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return upper(i);
        }
    }
    upper(BUCKETS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_values_within_a_quarter() {
        for ns in [
            0u64,
            1,
            3,
            4,
            5,
            7,
            8,
            100,
            999,
            1_000_000,
            123_456_789,
            u64::MAX / 3,
        ] {
            let i = index(ns);
            assert!(
                upper(i) > ns || upper(i) == u64::MAX,
                "{ns} in bucket {i} up to {}",
                upper(i)
            );
            if ns >= 8 {
                assert!(
                    upper(i) as f64 <= ns as f64 * 1.25 + 1.0,
                    "{ns}: {}",
                    upper(i)
                );
            }
        }
    }

    #[test]
    fn quantiles() {
        let h = Histogram::default();
        for _ in 0..98 {
            h.add(1_000_000);
        }
        h.add(50_000_000);
        h.add(80_000_000);
        let counts = h.snapshot();
        let p50 = quantile(&counts, 0.50);
        assert!((1_000_000..=1_250_000).contains(&p50), "{p50}");
        let p99 = quantile(&counts, 0.99);
        assert!((50_000_000..=62_500_000).contains(&p99), "{p99}");
        assert_eq!(quantile(&[0; BUCKETS], 0.5), 0);
    }
}
