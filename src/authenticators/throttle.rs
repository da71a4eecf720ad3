//! Failed sign-ins per project and client address (`--ip-failure-limit` per
//! `--ip-failure-window-secs`, or a project's own limit): a budget of `limit` failures that
//! refills evenly over the window. An attempt takes one failure from the budget before its
//! password is checked (so many attempts at once cannot overdraw it) and gives it back unless
//! it failed; an address with nothing left is refused without hashing anything. IPv6
//! addresses count per /64, the block one subscriber gets.
//!
//! The budgets live in PostgreSQL (`ip_failures`, an unlogged table), so every replica draws
//! on the same one (with N replicas an address still gets the limit, not N times it) and a
//! restart or a rollout forgives nothing. Each take is one statement under the row's lock;
//! only addresses that owe failures or have a sign-in in progress have a row.
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use uuid::Uuid;

use super::store;
use crate::db::{self, Pool};
use crate::error::{Error, Reason, Result};

/// The throttle's settings; the limit comes with each attempt (the server's
/// `--ip-failure-limit` or the project's own).
pub struct FailureThrottle {
    /// Ranges never counted nor refused (`--ip-failure-exempt`).
    exempt: Vec<ipnet::IpNet>,
    /// The window a budget refills over.
    window_secs: f64,
}

/// One attempt's failure, taken from its address's budget: give it back with
/// [`Taken::settle`] once the attempt's outcome is known. Dropped unsettled (the call was
/// cancelled mid-way) it is given back in the background.
pub struct Taken {
    pool: Pool,
    project: Uuid,
    ip: IpAddr,
    rate: f64,
    settled: bool,
}

impl Taken {
    /// The attempt is over: a failure stays spent, any other outcome gives it back. A give-back
    /// that cannot be written is logged, not answered: the sign-in itself has happened. One
    /// cut short (the call dropped meanwhile) is made again by `drop`: at worst an address is
    /// given one failure too many back, never charged for a sign-in that did not fail.
    pub async fn settle(mut self, failed: bool) {
        if !failed {
            give_back(&self.pool, self.project, self.ip, self.rate).await;
        }
        self.settled = true;
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (pool, project, ip, rate) = (self.pool.clone(), self.project, self.ip, self.rate);
            runtime.spawn(async move { give_back(&pool, project, ip, rate).await });
        }
    }
}

async fn give_back(pool: &Pool, project: Uuid, ip: IpAddr, rate: f64) {
    let result = async {
        let client = db::client(pool).await?;
        store::give_back_ip_failure(&*client, project, ip, rate).await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not give back a sign-in attempt's failure budget");
    }
}

/// Rows deleted per purge statement.
const PURGE_BATCH: i64 = 1000;

impl FailureThrottle {
    /// Budgets refill over `window`.
    pub fn new(window: Duration, exempt: Vec<ipnet::IpNet>) -> Self {
        FailureThrottle {
            exempt,
            window_secs: window.as_secs_f64().max(1.0),
        }
    }

    /// What an address counts as: itself, or for IPv6 its /64.
    pub fn key(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
            v4 => v4,
        }
    }

    /// Whether `ip` is never counted: in an exempt range, or the `limit` is 0 (off).
    pub fn exempts(&self, ip: IpAddr, limit: u32) -> bool {
        let ip = ip.to_canonical();
        limit == 0 || self.exempt.iter().any(|net| net.contains(&ip))
    }

    /// Takes one failure from the budget (of `limit`) of `ip` in `project` for an attempt
    /// about to be checked: `None` for an address not counted ([`exempts`](Self::exempts)),
    /// RESOURCE_EXHAUSTED `IP_THROTTLED` with the wait until the next attempt is allowed when
    /// nothing is left.
    pub async fn attempt(
        &self,
        pool: &Pool,
        project: Uuid,
        ip: IpAddr,
        limit: u32,
    ) -> Result<Option<Taken>> {
        if self.exempts(ip, limit) {
            return Ok(None);
        }
        let key = Self::key(ip);
        let limit = f64::from(limit);
        let rate = limit / self.window_secs;
        let (owed, refusals) = {
            let client = db::client(pool).await?;
            store::take_ip_failure(&*client, project, key, rate, limit).await?
        };
        if refusals == 0 {
            return Ok(Some(Taken {
                pool: pool.clone(),
                project,
                ip: key,
                rate,
                settled: false,
            }));
        }
        if refusals == 1 {
            tracing::warn!(
                project = %project,
                ip = %key,
                "failed sign-ins from this address are over --ip-failure-limit: its \
                 VerifyPassword calls are refused until its budget refills"
            );
        }
        Err(Error::Exhausted {
            reason: Reason::IpThrottled,
            message: "too many failed sign-ins from this ip address; retry later".into(),
            retry_after: crate::ratelimit::wait_for((owed + 1.0 - limit) / rate),
        })
    }

    /// Runs forever: every `every`, forgets the addresses that have refilled.
    pub async fn purge_forever(pool: Pool, window: Duration, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match Self::purge(&pool, window).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(forgotten = n, "sign-in throttle: refilled addresses"),
                Err(e) => tracing::warn!(error = %e, "sign-in throttle purge failed; will retry"),
            }
        }
    }

    /// Deletes the rows of addresses untouched for a whole `window` (refilled by then), in
    /// batches; returns how many went.
    pub async fn purge(pool: &Pool, window: Duration) -> Result<u64> {
        let mut total = 0;
        loop {
            let client = db::client(pool).await?;
            let n = store::purge_ip_failures(&*client, window.as_secs_f64(), PURGE_BATCH).await?;
            total += n;
            if (n as i64) < PURGE_BATCH {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let key = |ip: &str| FailureThrottle::key(ip.parse().unwrap()).to_string();
        assert_eq!(key("2001:db8:1:2::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff::9"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:3::1"), "2001:db8:1:3::");
        assert_eq!(key("198.51.100.1"), "198.51.100.1");
        assert_eq!(key("::ffff:198.51.100.1"), "198.51.100.1");
    }

    #[test]
    fn exempt_ranges_and_a_limit_of_zero_are_never_counted() {
        let exempt = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        let th = FailureThrottle::new(Duration::from_secs(60), exempt);
        for ip in ["10.1.2.3", "::ffff:10.9.9.9", "2001:db8:ffff::1"] {
            assert!(th.exempts(ip.parse().unwrap(), 5), "{ip}");
        }
        let other: IpAddr = "11.0.0.1".parse().unwrap();
        assert!(!th.exempts(other, 5));
        assert!(th.exempts(other, 0));
    }
}
