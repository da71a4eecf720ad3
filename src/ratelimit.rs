//! Per-API-key rate limiting: a token bucket per key, checked by the auth layer once the key
//! is verified (so only real keys ever get a bucket, and their number is bounded by the keys
//! that exist). A key's own limit (`roster keys limit`) wins over the server's
//! (`--rate-limit-rps`). A call over the limit answers RESOURCE_EXHAUSTED with RetryInfo
//! saying when a token will be there; a stream counts as one call.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
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
fn wait_for(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs.min(86_400.0)).unwrap_or(Duration::from_secs(86_400))
}

/// Failed sign-ins per project and client address (`--ip-failure-limit` per
/// `--ip-failure-window-secs`): a budget of `limit` failures that refills evenly over the
/// window. An attempt takes one failure from the budget before its password is checked (so
/// many attempts at once cannot overdraw it) and gives it back unless it failed; an address
/// with nothing left is refused without hashing anything. IPv6 addresses count per /64, the
/// block one subscriber gets. Kept in memory per server, bounded.
pub struct FailureThrottle {
    /// Ranges never counted nor refused (`--ip-failure-exempt`).
    exempt: Vec<ipnet::IpNet>,
    /// The window a budget refills over.
    window_secs: f64,
    budgets: Mutex<HashMap<(Uuid, IpAddr), Budget>>,
}

struct Budget {
    /// The budget's size: the limit in force when it was last used (a project's may change).
    limit: f64,
    left: f64,
    at: Instant,
    /// Whether this address's refusal has been logged since it last had budget left.
    warned: bool,
}

/// One attempt's failure, taken from its address's budget; see [`FailureThrottle::attempt`].
pub struct Taken<'a> {
    throttle: &'a FailureThrottle,
    project: Uuid,
    ip: IpAddr,
    failed: bool,
}

impl Taken<'_> {
    /// The attempt failed: its failure stays spent.
    pub fn failed(mut self) {
        self.failed = true;
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if !self.failed {
            self.throttle.give_back(self.project, self.ip);
        }
    }
}

/// Most addresses tracked (an address is tracked while it owes failures); past it, those
/// refilled meanwhile are dropped, and if that frees too little the lot is forgotten (the
/// throttle fails open rather than growing without bound).
const MAX_ADDRESSES: usize = 100_000;

impl FailureThrottle {
    /// Budgets refill over `window`; the limit comes with each attempt (the server's
    /// `--ip-failure-limit` or the project's own).
    pub fn new(window: Duration, exempt: Vec<ipnet::IpNet>) -> Self {
        FailureThrottle {
            exempt,
            window_secs: window.as_secs_f64().max(1.0),
            budgets: Mutex::new(HashMap::new()),
        }
    }

    /// What an address counts as: itself, or for IPv6 its /64.
    fn key(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
            v4 => v4,
        }
    }

    /// Takes one failure from the budget (of `limit`) of `ip` in `project` for an attempt
    /// about to be checked; `Err` says how long until the address may try again.
    fn take(&self, project: Uuid, ip: IpAddr, limit: u32) -> Result<(), Duration> {
        self.take_at(project, ip, limit, Instant::now())
    }

    fn take_at(&self, project: Uuid, ip: IpAddr, limit: u32, now: Instant) -> Result<(), Duration> {
        let limit = f64::from(limit.max(1));
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let key = (project, Self::key(ip));
        if budgets.len() >= MAX_ADDRESSES && !budgets.contains_key(&key) {
            budgets.retain(|_, b| self.refilled(b, now) < b.limit);
            if budgets.len() > MAX_ADDRESSES * 9 / 10 {
                tracing::warn!(
                    tracked = budgets.len(),
                    "too many addresses owe failed sign-ins to track: all are forgiven"
                );
                budgets.clear();
            }
        }
        let b = budgets.entry(key).or_insert(Budget {
            limit,
            left: limit,
            at: now,
            warned: false,
        });
        b.left = self.refilled(b, now);
        b.at = now;
        if b.limit != limit {
            // A changed limit keeps what was spent: raised, the address has room at once.
            b.left = (b.left + limit - b.limit).max(0.0);
            b.limit = limit;
        }
        if b.left >= 1.0 {
            b.left -= 1.0;
            b.warned = false;
            return Ok(());
        }
        if !b.warned {
            b.warned = true;
            tracing::warn!(
                project = %project,
                ip = %key.1,
                "failed sign-ins from this address are over --ip-failure-limit: its \
                 VerifyPassword calls are refused until its budget refills"
            );
        }
        Err(wait_for((1.0 - b.left) / self.rate(b)))
    }

    /// Failures a budget gets back per second.
    fn rate(&self, b: &Budget) -> f64 {
        b.limit / self.window_secs
    }

    /// [`take`](Self::take) for one attempt: the failure goes back when the returned guard
    /// drops, unless [`Taken::failed`] was called (a call given up on gives it back too).
    /// `None` for an exempt address or a `limit` of 0 (off), which nothing counts.
    pub fn attempt(
        &self,
        project: Uuid,
        ip: IpAddr,
        limit: u32,
    ) -> Result<Option<Taken<'_>>, Duration> {
        let ip = ip.to_canonical();
        if limit == 0 || self.exempt.iter().any(|net| net.contains(&ip)) {
            return Ok(None);
        }
        self.take(project, ip, limit)?;
        Ok(Some(Taken {
            throttle: self,
            project,
            ip,
            failed: false,
        }))
    }

    /// Gives back the failure taken for an attempt that did not fail.
    fn give_back(&self, project: Uuid, ip: IpAddr) {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let key = (project, Self::key(ip));
        if let Some(b) = budgets.get_mut(&key) {
            b.left += 1.0;
            // An address that owes nothing needs no entry (successful sign-ins add none).
            if b.left >= b.limit {
                budgets.remove(&key);
            }
        }
    }

    fn refilled(&self, b: &Budget, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        (b.left + elapsed * self.rate(b)).min(b.limit)
    }
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
    fn failures_per_address_refill_over_the_window() {
        let th = FailureThrottle::new(Duration::from_secs(300), vec![]);
        let take = |p, ip, t| th.take_at(p, ip, 3, t);
        let (p, q) = (Uuid::now_v7(), Uuid::now_v7());
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let t = Instant::now();
        for _ in 0..3 {
            take(p, ip, t).unwrap();
        }
        // One failure comes back every 100 s.
        let wait = take(p, ip, t).unwrap_err();
        assert!((wait.as_secs_f64() - 100.0).abs() < 1e-6, "{wait:?}");
        assert!(take(q, ip, t).is_ok(), "projects have their own budgets");
        assert!(take(p, "203.0.113.8".parse().unwrap(), t).is_ok());
        // An attempt that did not fail gives its failure back.
        th.give_back(p, ip);
        take(p, ip, t).unwrap();
        assert!(take(p, ip, t).is_err());
        let q_ip: IpAddr = "192.0.2.1".parse().unwrap();
        let fail = |ip| th.attempt(q, ip, 3).unwrap().unwrap().failed();
        fail(q_ip);
        drop(th.attempt(q, q_ip, 3).unwrap());
        drop(th.attempt(q, q_ip, 3).unwrap());
        fail(q_ip);
        fail(q_ip);
        assert!(
            th.attempt(q, q_ip, 3).is_err(),
            "three failed, two given back"
        );
        assert!(take(p, ip, t + Duration::from_secs(100)).is_ok());
        assert!(take(p, ip, t + Duration::from_secs(100)).is_err());
        // Refilled up to the limit, not beyond.
        let later = t + Duration::from_secs(86_400);
        for _ in 0..3 {
            take(p, ip, later).unwrap();
        }
        assert!(take(p, ip, later).is_err());
        // A limit of 0 counts nothing; a raised limit gives the budget room at once.
        for _ in 0..10 {
            assert!(th.attempt(p, ip, 0).unwrap().is_none());
        }
        assert!(th.take_at(p, ip, 5, later).is_ok());
    }

    #[test]
    fn exempt_ranges_are_never_counted() {
        let exempt = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        let th = FailureThrottle::new(Duration::from_secs(60), exempt);
        let p = Uuid::now_v7();
        for ip in ["10.1.2.3", "::ffff:10.9.9.9", "2001:db8:ffff::1"] {
            for _ in 0..5 {
                assert!(
                    th.attempt(p, ip.parse().unwrap(), 1).unwrap().is_none(),
                    "{ip}"
                );
            }
        }
        let other: IpAddr = "11.0.0.1".parse().unwrap();
        th.attempt(p, other, 1).unwrap().unwrap().failed();
        assert!(th.attempt(p, other, 1).is_err());
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let th = FailureThrottle::new(Duration::from_secs(60), vec![]);
        let (p, t) = (Uuid::now_v7(), Instant::now());
        let take = |ip: &str| th.take_at(p, ip.parse().unwrap(), 1, t);
        take("2001:db8:1:2::1").unwrap();
        assert!(take("2001:db8:1:2:ffff::9").is_err());
        assert!(take("2001:db8:1:3::1").is_ok());
        take("198.51.100.1").unwrap();
        assert!(take("::ffff:198.51.100.1").is_err());
    }

    #[test]
    fn the_tracked_addresses_are_bounded() {
        let th = FailureThrottle::new(Duration::from_secs(60), vec![]);
        let (p, t) = (Uuid::now_v7(), Instant::now());
        for i in 0..MAX_ADDRESSES as u32 + 10 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(i));
            let _ = th.take_at(p, ip, 2, t);
        }
        assert!(th.budgets.lock().unwrap().len() <= MAX_ADDRESSES);
        // Attempts that did not fail leave nothing behind.
        let th = FailureThrottle::new(Duration::from_secs(60), vec![]);
        for i in 0..1_000u32 {
            drop(
                th.attempt(p, IpAddr::V4(std::net::Ipv4Addr::from(i)), 2)
                    .unwrap(),
            );
        }
        assert_eq!(th.budgets.lock().unwrap().len(), 0);
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
