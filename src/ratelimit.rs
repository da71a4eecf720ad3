//! Per-API-key rate limiting: a token bucket per key, checked by the auth layer once the key
//! is verified (so only real keys ever get a bucket, and their number is bounded by the keys
//! that exist). A call over the limit answers RESOURCE_EXHAUSTED with RetryInfo saying when a
//! token will be there; a stream counts as one call.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct RateLimiter {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens a bucket holds: how many calls a quiet key may make at once.
    burst: f64,
    buckets: Mutex<HashMap<Uuid, Bucket>>,
}

impl RateLimiter {
    /// `rate` calls per second per key, bursts of `burst` (at least one).
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `key`, or says how long until one is there.
    pub fn check(&self, key: Uuid) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: Uuid, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let l = RateLimiter::new(10.0, 3.0);
        let (k, other) = (Uuid::now_v7(), Uuid::now_v7());
        let t = Instant::now();
        for _ in 0..3 {
            assert!(l.check_at(k, t).is_ok());
        }
        let wait = l.check_at(k, t).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert!(l.check_at(other, t).is_ok(), "keys have their own buckets");
        assert!(l.check_at(k, t + Duration::from_millis(100)).is_ok());
        assert!(l.check_at(k, t + Duration::from_millis(100)).is_err());
        // A long pause refills up to the burst, not beyond.
        let later = t + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.check_at(k, later).is_ok());
        }
        assert!(l.check_at(k, later).is_err());
    }
}
