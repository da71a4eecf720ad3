//! Per-API-key rate limiting: a token bucket per key, checked by the auth layer once the key
//! is verified (so only real keys ever get a bucket, and their number is bounded by the keys
//! that exist). A key's own limit (`roster keys limit`) wins over the server's
//! (`--rate-limit-rps`). A call over the limit answers RESOURCE_EXHAUSTED with RetryInfo
//! saying when a token will be there; a stream counts as one call.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A rate limit: calls per second, and how many a quiet key may make at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Tokens added per second.
    pub rate: f64,
    /// Most tokens a bucket holds.
    pub burst: f64,
}

impl Limit {
    /// `rate` calls per second with bursts of `burst` (twice the rate when not given, at
    /// least one); `None` for a rate that limits nothing (0, or not a finite number).
    pub fn new(rate: f64, burst: Option<f64>) -> Option<Limit> {
        (rate.is_finite() && rate > 0.0).then(|| Limit {
            rate,
            burst: burst
                .filter(|b| b.is_finite() && *b > 0.0)
                .unwrap_or(rate * 2.0)
                .max(1.0),
        })
    }
}

/// A key's own setting, when it has one: a limit, or none at all.
pub type KeyLimit = Option<Option<Limit>>;

pub struct RateLimiter {
    /// The server's limit, for keys without their own.
    default: Option<Limit>,
    buckets: Mutex<HashMap<Uuid, Bucket>>,
}

impl RateLimiter {
    pub fn new(default: Option<Limit>) -> Self {
        RateLimiter {
            default,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `key` under its own limit (else the server's), or says how long
    /// until one is there.
    pub fn check(&self, key: Uuid, own: KeyLimit) -> Result<(), Duration> {
        match own.unwrap_or(self.default) {
            Some(limit) => self.check_at(key, limit, Instant::now()),
            None => Ok(()),
        }
    }

    fn check_at(&self, key: Uuid, limit: Limit, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: limit.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * limit.rate).min(limit.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(wait_for((1.0 - b.tokens) / limit.rate))
        }
    }
}

/// Seconds until a token, as a Duration: at most a day (a tiny rate must not overflow it).
pub(crate) fn wait_for(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs.min(86_400.0)).unwrap_or(Duration::from_secs(86_400))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_rate_waits_a_day_at_most() {
        let limit = Limit::new(1e-300, Some(1.0)).unwrap();
        let l = RateLimiter::new(Some(limit));
        let (k, t) = (Uuid::now_v7(), Instant::now());
        assert!(l.check_at(k, limit, t).is_ok());
        assert_eq!(
            l.check_at(k, limit, t).unwrap_err(),
            Duration::from_secs(86_400)
        );
    }

    #[test]
    fn a_keys_own_limit_wins_over_the_servers() {
        let server = Limit::new(1.0, Some(1.0));
        let l = RateLimiter::new(server);
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        assert!(l.check(a, None).is_ok());
        assert!(l.check(a, None).is_err(), "the server's: one at once");
        let own = Some(Limit::new(1.0, Some(3.0)));
        for _ in 0..3 {
            l.check(b, own).unwrap();
        }
        assert!(l.check(b, own).is_err());
        for _ in 0..100 {
            l.check(c, Some(None)).unwrap();
        }
        assert!(Limit::new(0.0, None).is_none() && Limit::new(f64::NAN, None).is_none());
        assert_eq!(Limit::new(0.2, None).unwrap().burst, 1.0);
        assert_eq!(Limit::new(5.0, None).unwrap().burst, 10.0);
    }

    #[test]
    fn a_burst_then_the_rate() {
        let lim = Limit::new(10.0, Some(3.0)).unwrap();
        let l = RateLimiter::new(Some(lim));
        let (k, other) = (Uuid::now_v7(), Uuid::now_v7());
        let t = Instant::now();
        for _ in 0..3 {
            assert!(l.check_at(k, lim, t).is_ok());
        }
        let wait = l.check_at(k, lim, t).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert!(
            l.check_at(other, lim, t).is_ok(),
            "keys have their own buckets"
        );
        assert!(l.check_at(k, lim, t + Duration::from_millis(100)).is_ok());
        assert!(l.check_at(k, lim, t + Duration::from_millis(100)).is_err());
        // A long pause refills up to the burst, not beyond.
        let later = t + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.check_at(k, lim, later).is_ok());
        }
        assert!(l.check_at(k, lim, later).is_err());
    }
}
