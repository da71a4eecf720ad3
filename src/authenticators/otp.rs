//! Email and SMS one-time codes. A channel is enrolled to the user's verified email or
//! phone (the address is fixed at enrolment); each challenge issues a 6-digit code for the
//! caller to deliver, valid 10 minutes, kept as a salted hash; a new challenge voids the old
//! code and 5 wrong codes void it too.
use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use uuid::Uuid;

use super::factors::{self, FactorTarget, about, authenticator_not_found, check_state, lock_user};
use super::password::{precondition, record};
use super::sends::{self, Delivery, SendLimit, SmsPrefixes};
use super::store::{self, NewAuthenticator, OtpChallenge};
use super::{Authenticator, FactorResult, Kind};
use crate::auth::Caller;
use crate::crypto::codes;
use crate::db::{self, Pool};
use crate::error::{Error, Reason, Result};
use crate::events::{EventContext, EventType, NewEvent};
use crate::users::User;

/// How long a code works (API.md: 10 minutes).
pub const CODE_TTL_MINUTES: i64 = 10;
/// Wrong codes that void a challenge.
pub const MAX_ATTEMPTS: i32 = 5;

/// The user's current address for a channel kind: (address, verified).
fn address(user: &User, kind: Kind) -> Option<(&str, bool)> {
    let p = &user.profile;
    match kind {
        Kind::EmailOtp => p.email.as_deref().map(|e| (e, p.email_verified)),
        Kind::SmsOtp => p.phone_number.as_deref().map(|n| (n, p.phone_verified)),
        _ => None,
    }
}

fn channel_address(a: &Authenticator) -> Option<&str> {
    a.email.as_deref().or(a.phone_number.as_deref())
}

/// Whether the channel still points at the user's current, verified address.
fn still_current(user: &User, a: &Authenticator) -> bool {
    match (address(user, a.kind), channel_address(a)) {
        (Some((now, true)), Some(then)) => now.eq_ignore_ascii_case(then),
        _ => false,
    }
}

/// Enrols the user's verified email (EMAIL_OTP) or phone (SMS_OTP) as a channel; a phone
/// SMS may not go to (`sms`) is refused now rather than at the first challenge, when the
/// user would be left with a second factor that cannot work.
pub async fn enroll(
    pool: &Pool,
    caller: &Caller,
    user_id: Uuid,
    kind: Kind,
    name: Option<&str>,
    sms: &SmsPrefixes,
) -> Result<Authenticator> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let user = lock_user(&tx, caller, user_id).await?.user;
    let what = if kind == Kind::EmailOtp {
        "email"
    } else {
        "phone number"
    };
    let (addr, verified) = address(&user, kind)
        .ok_or_else(|| precondition(Reason::NoContact, &format!("the user has no {what}")))?;
    if !verified {
        return Err(precondition(
            Reason::ContactNotVerified,
            &format!("the user's {what} is not verified (StartContactVerification first)"),
        ));
    }
    if kind == Kind::SmsOtp {
        sms.check(addr)?;
    }
    let authenticator = factors::enroll_confirmed(
        &tx,
        caller,
        &NewAuthenticator {
            id: Uuid::now_v7(),
            user_id,
            kind: Some(kind),
            name,
            confirmed: true,
            email: (kind == Kind::EmailOtp).then_some(addr),
            phone_number: (kind == Kind::SmsOtp).then_some(addr),
            ..Default::default()
        },
    )
    .await?;
    tx.commit().await?;
    Ok(authenticator)
}

/// Issues a new code for a channel: (code, expiry, channel).
pub async fn start_challenge(
    pool: &Pool,
    caller: &Caller,
    user_id: Uuid,
    target: FactorTarget,
    limit: SendLimit,
    sms: &SmsPrefixes,
) -> Result<(String, DateTime<Utc>, Authenticator)> {
    let p = caller.project_id;
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let user = lock_user(&tx, caller, user_id).await?;
    let authenticator = match target {
        FactorTarget::Id(id) => store::get_authenticator(&tx, p, user_id, id)
            .await?
            .ok_or_else(|| authenticator_not_found(id))?,
        // A user has at most one channel of each kind (EnrollOtpChannel refuses a second).
        FactorTarget::Kind(kind) => store::list_authenticators(&tx, p, user_id)
            .await?
            .into_iter()
            .find(|a| a.kind == kind)
            .ok_or_else(|| factors::not_enrolled(kind))?,
    };
    let id = authenticator.id;
    if !matches!(authenticator.kind, Kind::EmailOtp | Kind::SmsOtp) {
        return Err(Error::invalid(
            "authenticator_id",
            "is not an EMAIL_OTP or SMS_OTP authenticator",
        ));
    }
    if check_state(&user)?.is_some() {
        return Err(precondition(
            Reason::UserLocked,
            "the user is locked after too many failed attempts",
        ));
    }
    if !still_current(&user.user, &authenticator) {
        return Err(precondition(
            Reason::ContactChanged,
            "the user's address changed or is no longer verified since this channel was \
             enrolled; enrol the channel again",
        ));
    }
    let what = Delivery::of_otp(authenticator.kind);
    if what == Delivery::SmsOtp {
        sms.check(channel_address(&authenticator).unwrap_or_default())?;
    }
    sends::take(&tx, p, user_id, what, limit).await?;
    let code = codes::six_digit_code();
    let salt = codes::salt();
    let expires_at = Utc::now() + Duration::minutes(CODE_TTL_MINUTES);
    let challenge = OtpChallenge {
        salt: salt.to_vec(),
        hash: codes::salted_hash(&salt, &code),
        attempts: 0,
        expires_at,
    };
    store::put_otp_challenge(&tx, p, id, &challenge).await?;
    let mut data = about(&authenticator);
    data["expires_at"] = json!(expires_at.to_rfc3339());
    let ev = NewEvent::for_user(EventType::OtpChallengeStarted, user_id, data);
    record(&tx, caller, &EventContext::from_caller(caller), &[ev]).await?;
    tx.commit().await?;
    Ok((code, expires_at, authenticator))
}

/// Checks a code against the channel's outstanding challenge, spending it when right and
/// counting a wrong one.
pub(super) async fn check(
    tx: &deadpool_postgres::Transaction<'_>,
    project_id: Uuid,
    user: &User,
    authenticator: &Authenticator,
    code: &str,
) -> Result<FactorResult> {
    let id = authenticator.id;
    let Some(c) = store::otp_challenge(tx, project_id, id).await? else {
        // No code outstanding (never started, or already used): a new one is needed.
        return Ok(FactorResult::Expired);
    };
    if c.attempts >= MAX_ATTEMPTS {
        return Ok(FactorResult::TooManyAttempts);
    }
    if c.expires_at <= Utc::now() {
        return Ok(FactorResult::Expired);
    }
    if still_current(user, authenticator) && codes::matches(&c.salt, &c.hash, code) {
        store::delete_otp_challenge(tx, project_id, id).await?;
        return Ok(FactorResult::Ok);
    }
    store::count_otp_failure(tx, project_id, id).await?;
    Ok(if c.attempts + 1 >= MAX_ATTEMPTS {
        FactorResult::TooManyAttempts
    } else {
        FactorResult::InvalidCode
    })
}
