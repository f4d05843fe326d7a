//! The per-IP connection rate limit (`connection_rate_per_ip`): a token
//! bucket per source address, in the accepting shard only (one acceptor, so
//! one table). A connection over the limit is closed at once, before INFO:
//! it costs the broker an accept and a close, and gets no bytes back.
//!
//! The table is bounded: at [`TRACKED_IPS_MAX`] addresses, the ones whose
//! bucket has refilled (idle for a second or more) are forgotten; if every
//! one is busy, the table starts over (a flood from that many addresses at
//! once, each completing TCP handshakes, is beyond what a per-IP limit is
//! for; `max_connections` still holds).

use std::collections::HashMap;
use std::net::IpAddr;

/// Addresses tracked at once.
pub(crate) const TRACKED_IPS_MAX: usize = 16 * 1024;

#[derive(Debug)]
pub(crate) struct RateLimiter {
    /// New connections per second per address; 0: no limit.
    per_second: u32,
    buckets: HashMap<IpAddr, Bucket>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Connections this address may open now, in thousandths.
    milli_tokens: u64,
    updated_ms: u64,
}

impl RateLimiter {
    pub(crate) fn new(per_second: u32) -> RateLimiter {
        RateLimiter {
            per_second,
            buckets: HashMap::new(),
        }
    }

    /// A reload changed the rate.
    pub(crate) fn set_rate(&mut self, per_second: u32) {
        if per_second != self.per_second {
            self.per_second = per_second;
            self.buckets.clear();
        }
    }

    /// Whether a connection from `ip` at `now_ms` is within the limit (and
    /// takes one token if so). Bursts of up to `per_second` are allowed.
    pub(crate) fn admit(&mut self, ip: IpAddr, now_ms: u64) -> bool {
        if self.per_second == 0 {
            return true;
        }
        let full = u64::from(self.per_second) * 1000;
        if self.buckets.len() >= TRACKED_IPS_MAX && !self.buckets.contains_key(&ip) {
            let rate = u64::from(self.per_second);
            self.buckets
                .retain(|_, b| b.milli_tokens + now_ms.saturating_sub(b.updated_ms) * rate < full);
            if self.buckets.len() >= TRACKED_IPS_MAX {
                self.buckets.clear();
            }
        }
        let bucket = self.buckets.entry(ip).or_insert(Bucket {
            milli_tokens: full,
            updated_ms: now_ms,
        });
        // Refill: per_second tokens a second = per_second milli-tokens a ms.
        let elapsed = now_ms.saturating_sub(bucket.updated_ms);
        bucket.milli_tokens =
            (bucket.milli_tokens + elapsed * u64::from(self.per_second)).min(full);
        bucket.updated_ms = now_ms;
        if bucket.milli_tokens >= 1000 {
            bucket.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn a_burst_of_rate_then_rate_per_second() {
        let mut limiter = RateLimiter::new(5);
        let admitted = (0..20).filter(|_| limiter.admit(ip(1), 1000)).count();
        assert_eq!(admitted, 5, "a burst of per_second");
        assert!(
            limiter.admit(ip(2), 1000),
            "other addresses are not affected"
        );
        assert!(!limiter.admit(ip(1), 1100), "half a token after 100 ms");
        assert!(limiter.admit(ip(1), 1200), "one token after 200 ms at 5/s");
        assert!(!limiter.admit(ip(1), 1200));
        let admitted = (0..20).filter(|_| limiter.admit(ip(1), 61_000)).count();
        assert_eq!(admitted, 5, "a long pause refills to the burst, not beyond");
    }

    #[test]
    fn zero_is_no_limit_and_the_table_stays_bounded() {
        let mut off = RateLimiter::new(0);
        assert!((0..1000).all(|_| off.admit(ip(1), 0)));
        let mut limiter = RateLimiter::new(1);
        for n in 0..(TRACKED_IPS_MAX as u32 * 3) {
            limiter.admit(ip(n), u64::from(n / 1000));
            assert!(limiter.buckets.len() <= TRACKED_IPS_MAX);
        }
    }
}
