//! Limits on issuing codes and links for delivery to a user: OTP codes, contact verification
//! codes and password reset tokens. Each is one message to the user's inbox or phone that the
//! calling backend sends, usually behind a "send me a code" button that anyone can press, so
//! without a limit a script could flood a user with mail or run up the SMS bill (SMS
//! pumping). Per user and kind of delivery: a gap between two issues (`--code-resend-secs`)
//! and a cap per rolling hour (`--codes-per-hour`); past either the call answers
//! RESOURCE_EXHAUSTED (TOO_MANY_CODES) with RetryInfo saying when the next one can be issued.
//!
//! SMS can also be kept to the countries a deployment serves (`--sms-allowed-prefixes`):
//! pumping schemes send to premium numbers of a few far-away ranges, which an allow list of
//! calling codes shuts out (the geo permissions of Twilio, Auth0, Stytch).
//!
//! The issue times live in PostgreSQL (`code_sends`), taken under a row lock in the issuing
//! transaction, so every replica counts against one allowance and an issue that does not
//! commit is not counted.
use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::store;
use crate::error::{Error, Reason, Result};

/// What a code or link is issued for; the numbers are stored (`code_sends.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    EmailOtp = 1,
    SmsOtp = 2,
    EmailVerification = 3,
    PhoneVerification = 4,
    PasswordReset = 5,
}

impl Delivery {
    /// Whether it goes out by SMS (and counts against the project's ceiling).
    pub fn is_sms(self) -> bool {
        matches!(self, Delivery::SmsOtp | Delivery::PhoneVerification)
    }

    /// What an OTP channel's codes are issued as (`kind` is EMAIL_OTP or SMS_OTP).
    pub fn of_otp(kind: super::Kind) -> Delivery {
        if kind == super::Kind::SmsOtp {
            Delivery::SmsOtp
        } else {
            Delivery::EmailOtp
        }
    }

    /// Its name in metrics (`roster_codes_issued_total{kind}`).
    pub fn label(self) -> &'static str {
        match self {
            Delivery::EmailOtp => "email_otp",
            Delivery::SmsOtp => "sms_otp",
            Delivery::EmailVerification => "email_verification",
            Delivery::PhoneVerification => "phone_verification",
            Delivery::PasswordReset => "password_reset",
        }
    }

    /// How the refusal names it.
    fn describe(self) -> &'static str {
        match self {
            Delivery::EmailOtp => "email one-time codes",
            Delivery::SmsOtp => "SMS one-time codes",
            Delivery::EmailVerification => "email verification codes",
            Delivery::PhoneVerification => "phone verification codes",
            Delivery::PasswordReset => "password reset tokens",
        }
    }
}

/// The allowance of one user for one kind of delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendLimit {
    /// Seconds between two issues; 0: no gap; at most an hour (older issues are forgotten).
    pub resend_secs: u32,
    /// Issues per rolling hour; 0: no cap.
    pub per_hour: u32,
    /// SMS per hour for the user's whole project (not per user); 0: no ceiling.
    pub sms_per_hour: u32,
}

const HOUR: Duration = Duration::hours(1);

/// Whether one more issue at `now` fits the limit after the issues `sent`: the times to keep
/// (this one included), or how long until one would fit.
pub fn allowance(
    limit: SendLimit,
    sent: &[DateTime<Utc>],
    now: DateTime<Utc>,
) -> std::result::Result<Vec<DateTime<Utc>>, Duration> {
    let mut recent: Vec<DateTime<Utc>> = sent.iter().copied().filter(|t| *t > now - HOUR).collect();
    recent.sort_unstable();
    let mut free_at = now;
    if let Some(last) = recent.last() {
        free_at = free_at.max(*last + Duration::seconds(i64::from(limit.resend_secs)));
    }
    let cap = limit.per_hour as usize;
    if cap > 0 && recent.len() >= cap {
        // The issue that must leave the window before another fits.
        free_at = free_at.max(recent[recent.len() - cap] + HOUR);
    }
    if free_at > now {
        return Err(free_at - now);
    }
    // Only what a later decision can need: the last `cap` (the gap needs only the last one).
    let keep = cap.max(1).saturating_sub(1);
    let drop = recent.len().saturating_sub(keep);
    recent.drain(..drop);
    recent.push(now);
    Ok(recent)
}

/// Takes one issue of `what` for the user from their allowance in the caller's transaction,
/// or answers RESOURCE_EXHAUSTED (TOO_MANY_CODES) with the wait; an SMS also from its
/// project's hourly ceiling (SMS_LIMIT_REACHED). The rows stay locked until the transaction
/// ends, so concurrent issues queue and count one by one, and one that does not commit
/// takes nothing.
pub async fn take(
    tx: &deadpool_postgres::Transaction<'_>,
    project_id: Uuid,
    user_id: Uuid,
    what: Delivery,
    limit: SendLimit,
) -> Result<()> {
    if limit.resend_secs > 0 || limit.per_hour > 0 {
        take_for_user(tx, project_id, user_id, what, limit).await?;
    }
    if what.is_sms() && limit.sms_per_hour > 0 {
        take_sms(tx, project_id, limit.sms_per_hour).await?;
    }
    Ok(())
}

/// Whole seconds, rounded up (retrying after RetryInfo must succeed), at least one.
fn whole_secs(wait: Duration) -> i64 {
    ((wait.num_milliseconds() + 999) / 1000).max(1)
}

/// Takes one SMS from the project's budget of `per_hour`, which refills evenly over the hour.
async fn take_sms(
    tx: &deadpool_postgres::Transaction<'_>,
    project_id: Uuid,
    per_hour: u32,
) -> Result<()> {
    let ceiling = f64::from(per_hour);
    let rate = ceiling / HOUR.num_seconds() as f64;
    let Err(owed) = store::take_sms_budget(tx, project_id, rate, ceiling).await? else {
        return Ok(());
    };
    let wait = Duration::milliseconds(((owed + 1.0 - ceiling) / rate * 1000.0).ceil() as i64);
    let secs = whole_secs(wait);
    warn_of_sms_ceiling(project_id, per_hour);
    Err(Error::Exhausted {
        reason: Reason::SmsLimitReached,
        message: format!(
            "this project's SMS ceiling ({per_hour} an hour) is reached; the next SMS can be \
             issued in {secs} s"
        ),
        retry_after: std::time::Duration::from_secs(secs.unsigned_abs()),
    })
}

/// Logs that a project's SMS are being refused, at most once a minute per project and server
/// (the refused issue's transaction rolls back, so the database cannot remember it).
fn warn_of_sms_ceiling(project_id: Uuid, per_hour: u32) {
    static WARNED: std::sync::Mutex<Vec<(Uuid, std::time::Instant)>> =
        std::sync::Mutex::new(Vec::new());
    let now = std::time::Instant::now();
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    warned.retain(|(_, at)| now.duration_since(*at) < std::time::Duration::from_secs(60));
    if warned.iter().any(|(p, _)| *p == project_id) {
        return;
    }
    warned.push((project_id, now));
    tracing::warn!(
        project = %project_id,
        sms_per_hour = per_hour,
        "the project's SMS ceiling (--sms-per-hour) is reached: its SMS codes are refused \
         until the budget refills"
    );
}

async fn take_for_user(
    tx: &deadpool_postgres::Transaction<'_>,
    project_id: Uuid,
    user_id: Uuid,
    what: Delivery,
    limit: SendLimit,
) -> Result<()> {
    let kind = what as i16;
    let sent = store::code_sends_for_update(tx, project_id, user_id, kind).await?;
    match allowance(limit, &sent, Utc::now()) {
        Ok(keep) => store::put_code_sends(tx, project_id, user_id, kind, &keep).await,
        Err(wait) => {
            let secs = whole_secs(wait);
            Err(Error::Exhausted {
                reason: Reason::TooManyCodes,
                message: format!(
                    "too many {} for this user; the next can be issued in {secs} s",
                    what.describe()
                ),
                retry_after: std::time::Duration::from_secs(secs.unsigned_abs()),
            })
        }
    }
}

/// The phone number prefixes SMS may be sent to (`--sms-allowed-prefixes`); none: any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmsPrefixes(Vec<String>);

impl SmsPrefixes {
    /// Most prefixes in a list.
    pub const MAX: usize = 500;

    /// Comma-separated E.164 prefixes: `+` and 1 to 14 digits (`+1,+44,+4915`).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut prefixes = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let digits = part.strip_prefix('+').unwrap_or("");
            if digits.is_empty() || digits.len() > 14 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(format!(
                    "{part:?} is not a phone number prefix like +44 (a plus and 1 to 14 digits)"
                ));
            }
            prefixes.push(part.to_string());
        }
        if prefixes.len() > Self::MAX {
            return Err(format!("at most {} prefixes", Self::MAX));
        }
        Ok(SmsPrefixes(prefixes))
    }

    /// Whether the list is empty, which allows any number.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The list as `parse` reads it.
    pub fn to_text(&self) -> String {
        self.0.join(",")
    }

    /// Whether an SMS may go to `phone` (E.164, as stored).
    pub fn allows(&self, phone: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|p| phone.starts_with(p.as_str()))
    }

    /// FAILED_PRECONDITION (SMS_DESTINATION_NOT_ALLOWED) unless an SMS may go to `phone`.
    pub fn check(&self, phone: &str) -> Result<()> {
        if self.allows(phone) {
            return Ok(());
        }
        Err(Error::FailedPrecondition {
            reason: Reason::SmsDestinationNotAllowed,
            message: "this server does not send SMS to the user's phone number (its calling \
                      code is not in --sms-allowed-prefixes)"
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sms_prefixes_allow_what_they_list_and_everything_when_empty() {
        let any = SmsPrefixes::parse(" ").unwrap();
        assert!(any.allows("+88212345678"));
        let some = SmsPrefixes::parse("+1, +44,+4915").unwrap();
        assert!(some.allows("+14155550100") && some.allows("+447700900123"));
        assert!(some.allows("+4915123456789") && !some.allows("+4930123456"));
        assert!(!some.allows("+88212345678"));
        assert_eq!(
            some.check("+88212345678").unwrap_err().to_string(),
            "this server does not send SMS to the user's phone number (its calling code is not \
             in --sms-allowed-prefixes)"
        );
        for bad in ["44", "+", "+4a", "+123456789012345", "+1;+44"] {
            assert!(SmsPrefixes::parse(bad).is_err(), "{bad}");
        }
        let many = vec!["+1"; SmsPrefixes::MAX + 1].join(",");
        assert!(SmsPrefixes::parse(&many).is_err());
    }

    #[test]
    fn a_gap_of_an_hour_is_kept_to_the_second() {
        let hourly = SendLimit {
            resend_secs: 3600,
            per_hour: 0,
            sms_per_hour: 0,
        };
        assert_eq!(
            allowance(hourly, &[at(0)], at(3599)),
            Err(Duration::seconds(1))
        );
        assert_eq!(allowance(hourly, &[at(0)], at(3600)), Ok(vec![at(3600)]));
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    const LIMIT: SendLimit = SendLimit {
        resend_secs: 30,
        per_hour: 3,
        sms_per_hour: 0,
    };

    #[test]
    fn the_first_issue_is_free_and_kept() {
        assert_eq!(allowance(LIMIT, &[], at(0)), Ok(vec![at(0)]));
    }

    #[test]
    fn a_resend_waits_for_the_gap() {
        assert_eq!(
            allowance(LIMIT, &[at(0)], at(10)),
            Err(Duration::seconds(20))
        );
        assert_eq!(allowance(LIMIT, &[at(0)], at(30)), Ok(vec![at(0), at(30)]));
    }

    #[test]
    fn the_hourly_cap_waits_for_the_oldest_to_leave_the_window() {
        let sent = [at(0), at(100), at(200)];
        assert_eq!(
            allowance(LIMIT, &sent, at(300)),
            Err(Duration::seconds(3300))
        );
        // At the hour the first has left; only the last cap-1 are kept with the new one.
        assert_eq!(
            allowance(LIMIT, &sent, at(3601)),
            Ok(vec![at(100), at(200), at(3601)])
        );
    }

    #[test]
    fn the_longer_of_the_two_waits_is_answered() {
        let sent = [at(0), at(100), at(3590)];
        // The cap frees at 3600 (the first leaves), the gap at 3620.
        assert_eq!(
            allowance(LIMIT, &sent, at(3595)),
            Err(Duration::seconds(25))
        );
    }

    #[test]
    fn zero_turns_each_rule_off() {
        let no_gap = SendLimit {
            resend_secs: 0,
            per_hour: 2,
            sms_per_hour: 0,
        };
        assert!(allowance(no_gap, &[at(0)], at(0)).is_ok());
        assert!(allowance(no_gap, &[at(0), at(1)], at(2)).is_err());
        let no_cap = SendLimit {
            resend_secs: 1,
            per_hour: 0,
            sms_per_hour: 0,
        };
        let many: Vec<_> = (0..100).map(|i| at(i * 2)).collect();
        // Without a cap only the new issue is kept (the gap needs no more).
        assert_eq!(allowance(no_cap, &many, at(198)), Err(Duration::seconds(1)));
        assert_eq!(allowance(no_cap, &many, at(199)), Ok(vec![at(199)]));
    }

    #[test]
    fn issues_older_than_an_hour_are_forgotten_and_order_does_not_matter() {
        let sent = [at(200), at(-4000), at(100)];
        assert_eq!(
            allowance(LIMIT, &sent, at(300)),
            Ok(vec![at(100), at(200), at(300)])
        );
    }
}
