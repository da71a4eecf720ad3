//! Second factors in general: listing and managing a user's authenticators (exactly one
//! default whenever any confirmed factor can be one), and the bookkeeping every factor check
//! shares with passwords: blocked and deactivated users are refused, failures count toward
//! the same lockout, and each outcome is an event.
//!
//! Every change takes the user's row lock first, so the operations on one user's factors
//! (and the failure count) run one after another.
use chrono::Utc;
use deadpool_postgres::Transaction;
use serde_json::{Value, json};
use uuid::Uuid;

use super::password::{
    PasswordSettings, SignInResult, count_failure, not_found, precondition, record, refusal,
};
use super::store::{self, Credentials};
use super::{Authenticator, FactorResult, Kind};
use crate::auth::Caller;
use crate::db::{self, Pool};
use crate::error::{Error, Reason, Result};
use crate::events::{EventContext, EventType, NewEvent};

const AUTHENTICATOR: &str = "authenticator";

pub(super) fn authenticator_not_found(id: Uuid) -> Error {
    Error::not_found(AUTHENTICATOR, id.to_string())
}

/// FAILED_PRECONDITION: the user has no confirmed authenticator of `kind` to check or use.
pub(super) fn not_enrolled(kind: Kind) -> Error {
    precondition(
        Reason::FactorNotEnrolled,
        &format!("the user has no confirmed {} authenticator", kind.as_str()),
    )
}

/// Event data naming an authenticator (never its secret).
pub(super) fn about(a: &Authenticator) -> Value {
    json!({ "authenticator_id": a.id, "type": a.kind.as_str() })
}

/// Locks the user's row; `None` when there is no such user.
pub(super) async fn lock_user(
    tx: &Transaction<'_>,
    caller: &Caller,
    user_id: Uuid,
) -> Result<Credentials> {
    store::credentials_for_update(tx, caller.project_id, user_id)
        .await?
        .ok_or_else(|| not_found(user_id))
}

/// The state rules of a factor check on a locked user: blocked and deactivated users are
/// refused outright (FAILED_PRECONDITION); a locked one gets `Some(Locked)`.
pub(super) fn check_state(user: &Credentials) -> Result<Option<FactorResult>> {
    match refusal(user, Utc::now()) {
        Some(SignInResult::Blocked) => {
            Err(precondition(Reason::UserBlocked, "the user is blocked"))
        }
        Some(SignInResult::Deactivated) => Err(precondition(
            Reason::UserDeactivated,
            "the user is deactivated",
        )),
        Some(_) => Ok(Some(FactorResult::Locked)),
        None => Ok(None),
    }
}

/// Who is checking a factor, from where, under which lockout rules, and through which RPC.
pub struct Attempt<'a> {
    pub caller: &'a Caller,
    pub ctx: &'a EventContext,
    pub settings: &'a PasswordSettings,
    pub via: &'static str,
}

/// Records a failed check: FACTOR_VERIFICATION_FAILED, and one more failure toward the
/// lockout unless the account is locked already. Answers LOCKED when this failure locked it.
pub(super) async fn fail_check(
    tx: &Transaction<'_>,
    at: &Attempt<'_>,
    user: &Credentials,
    authenticator: Option<&Authenticator>,
    result: FactorResult,
) -> Result<FactorResult> {
    let (caller, ctx, settings, via) = (at.caller, at.ctx, at.settings, at.via);
    let mut data = authenticator.map(about).unwrap_or_else(|| json!({}));
    data["reason"] = json!(result.as_str());
    data["via"] = json!(via);
    if result == FactorResult::Locked {
        let ev = NewEvent::for_user(EventType::FactorVerificationFailed, user.user.id, data);
        record(tx, caller, ctx, &[ev]).await?;
        return Ok(result);
    }
    let locked = count_failure(
        tx,
        caller,
        ctx,
        settings,
        user,
        EventType::FactorVerificationFailed,
        data,
    )
    .await?;
    Ok(if locked.is_some() {
        FactorResult::Locked
    } else {
        result
    })
}

/// Records a successful check: the failure count restarts and FACTOR_VERIFIED is written.
pub(super) async fn pass_check(
    tx: &Transaction<'_>,
    caller: &Caller,
    ctx: &EventContext,
    user: &Credentials,
    authenticator: &Authenticator,
    via: &str,
) -> Result<()> {
    if user.failed_logins > 0 {
        store::record_failure(tx, caller.project_id, user.user.id, 0, None).await?;
    }
    let mut data = about(authenticator);
    data["via"] = json!(via);
    let ev = NewEvent::for_user(EventType::FactorVerified, user.user.id, data);
    record(tx, caller, ctx, &[ev]).await
}

pub async fn list(pool: &Pool, caller: &Caller, user_id: Uuid) -> Result<Vec<Authenticator>> {
    let client = db::client(pool).await?;
    // One round trip: the user's existence and its factors.
    let (user, list) = tokio::try_join!(
        crate::users::store::get(&*client, caller.project_id, user_id),
        store::list_authenticators(&*client, caller.project_id, user_id)
    )?;
    user.ok_or_else(|| not_found(user_id))?;
    Ok(list)
}

pub async fn get(pool: &Pool, caller: &Caller, user_id: Uuid, id: Uuid) -> Result<Authenticator> {
    let client = db::client(pool).await?;
    store::get_authenticator(&*client, caller.project_id, user_id, id)
        .await?
        .ok_or_else(|| authenticator_not_found(id))
}

/// What UpdateAuthenticator changes.
pub struct AuthenticatorPatch {
    /// `Some(None)` clears the name.
    pub name: Option<Option<String>>,
    /// Only `true` is accepted (a default changes by choosing another one).
    pub make_default: bool,
}

pub async fn update(
    pool: &Pool,
    caller: &Caller,
    user_id: Uuid,
    id: Uuid,
    patch: AuthenticatorPatch,
) -> Result<Authenticator> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    lock_user(&tx, caller, user_id).await?;
    let p = caller.project_id;
    let current = store::get_authenticator(&tx, p, user_id, id)
        .await?
        .ok_or_else(|| authenticator_not_found(id))?;
    let mut changed = Vec::new();
    if let Some(name) = &patch.name
        && *name != current.name
    {
        store::rename_authenticator(&tx, p, id, name.as_deref()).await?;
        changed.push("name");
    }
    if patch.make_default && !current.is_default {
        if !current.kind.can_be_default() {
            return Err(Error::invalid(
                "authenticator.is_default",
                format!(
                    "a {} authenticator cannot be the default",
                    current.kind.as_str()
                ),
            ));
        }
        if !current.confirmed {
            return Err(precondition(
                Reason::AuthenticatorNotConfirmed,
                "only a confirmed authenticator can be the default",
            ));
        }
        store::make_default(&tx, p, user_id, id).await?;
        changed.push("is_default");
    }
    let updated = store::get_authenticator(&tx, p, user_id, id)
        .await?
        .ok_or_else(|| authenticator_not_found(id))?;
    if !changed.is_empty() {
        let mut data = about(&updated);
        data["fields"] = json!(changed);
        let ev = NewEvent::for_user(EventType::AuthenticatorUpdated, user_id, data);
        record(&tx, caller, &EventContext::from_caller(caller), &[ev]).await?;
    }
    tx.commit().await?;
    Ok(updated)
}

/// Deletes one authenticator (`id`) or all of the user's (optionally of one kind); a deleted
/// default passes to the oldest remaining confirmed factor. One event per authenticator.
pub async fn delete(
    pool: &Pool,
    caller: &Caller,
    user_id: Uuid,
    id: Option<Uuid>,
    kind: Option<Kind>,
) -> Result<Vec<Authenticator>> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    lock_user(&tx, caller, user_id).await?;
    let p = caller.project_id;
    let deleted = store::delete_authenticators(&tx, p, user_id, id, kind).await?;
    if let (Some(id), true) = (id, deleted.is_empty()) {
        return Err(authenticator_not_found(id));
    }
    if deleted.iter().any(|a| a.is_default) {
        store::ensure_default(&tx, p, user_id).await?;
    }
    let evs: Vec<NewEvent> = deleted
        .iter()
        .map(|a| NewEvent::for_user(EventType::AuthenticatorDeleted, user_id, about(a)))
        .collect();
    record(&tx, caller, &EventContext::from_caller(caller), &evs).await?;
    tx.commit().await?;
    Ok(deleted)
}

/// Most authenticators one user may have: enough for every device, and a bound on what one
/// account can make the service store and check.
pub const MAX_PER_USER: i64 = 20;

/// Refuses a new enrolment for a user at [`MAX_PER_USER`].
pub(super) async fn ensure_room(
    tx: &Transaction<'_>,
    caller: &Caller,
    user_id: Uuid,
) -> Result<()> {
    if store::count_authenticators(tx, caller.project_id, user_id).await? >= MAX_PER_USER {
        return Err(precondition(
            Reason::TooManyAuthenticators,
            "the user has the most authenticators allowed; delete one first",
        ));
    }
    Ok(())
}

/// Stores a factor that is confirmed as it is enrolled (an OTP channel, a passkey): checks
/// the per-user bound, gives the user a default if it had none, records
/// AUTHENTICATOR_ENROLLED, and returns the stored row (with its default flag).
pub(super) async fn enroll_confirmed(
    tx: &Transaction<'_>,
    caller: &Caller,
    new: &store::NewAuthenticator<'_>,
) -> Result<Authenticator> {
    let (p, user_id) = (caller.project_id, new.user_id);
    ensure_room(tx, caller, user_id).await?;
    let inserted = store::insert_authenticator(tx, p, new).await?;
    store::ensure_default(tx, p, user_id).await?;
    let ev = NewEvent::for_user(EventType::AuthenticatorEnrolled, user_id, about(&inserted));
    record(tx, caller, &EventContext::from_caller(caller), &[ev]).await?;
    store::get_authenticator(tx, p, user_id, inserted.id)
        .await?
        .ok_or_else(|| authenticator_not_found(inserted.id))
}

/// What identifies a user to an authenticator app or a passkey prompt.
pub(super) fn account_label(user: &crate::users::User) -> String {
    let p = &user.profile;
    p.email
        .clone()
        .or_else(|| p.username.clone())
        .or_else(|| p.phone_number.clone())
        .or_else(|| p.external_id.clone())
        .unwrap_or_else(|| user.id.to_string())
}

/// Which authenticator VerifyFactor checks.
#[derive(Debug, Clone, Copy)]
pub enum FactorTarget {
    Id(Uuid),
    /// Any confirmed authenticator of this kind (TOTP, EMAIL_OTP, SMS_OTP, RECOVERY_CODES).
    Kind(Kind),
}

/// What VerifyFactor answers.
pub struct Verified {
    pub result: FactorResult,
    pub authenticator: Option<Authenticator>,
    /// The user, on OK.
    pub user: Option<crate::users::User>,
}

/// Checks a TOTP, OTP or recovery code for a user, with lockout, replay protection and
/// events, all under the user's row lock.
pub async fn verify_factor(
    pool: &Pool,
    sealer: Option<&crate::crypto::seal::Sealer>,
    at: &Attempt<'_>,
    user_id: Uuid,
    target: FactorTarget,
    code: &str,
) -> Result<Verified> {
    let (caller, ctx) = (at.caller, at.ctx);
    let p = caller.project_id;
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let user = lock_user(&tx, caller, user_id).await?;
    let (id, kind) = match target {
        FactorTarget::Id(id) => (Some(id), None),
        FactorTarget::Kind(k) => (None, Some(k)),
    };
    let mut candidates = store::factor_secrets(&tx, p, user_id, id, kind).await?;
    let Some(first) = candidates.first() else {
        return Err(match target {
            FactorTarget::Id(id) => authenticator_not_found(id),
            FactorTarget::Kind(k) => not_enrolled(k),
        });
    };
    let kind = first.authenticator.kind;
    let field = if id.is_some() {
        "authenticator_id"
    } else {
        "type"
    };
    let mut recovery_hashes = Vec::new();
    let normalized = match kind {
        Kind::Totp | Kind::EmailOtp | Kind::SmsOtp => {
            let c: String = code.chars().filter(|c| !c.is_whitespace()).collect();
            if !crate::crypto::codes::is_six_digits(&c) {
                return Err(Error::invalid("code", "must be 6 digits"));
            }
            c
        }
        Kind::RecoveryCodes => {
            // A set that came by import also takes its own system's codes, as issued.
            let foreign = first.foreign_codes;
            recovery_hashes = super::recovery::hashes_to_try(code, foreign);
            if recovery_hashes.is_empty() {
                return Err(Error::invalid(
                    "code",
                    if foreign {
                        "must be a recovery code: 6 to 64 characters besides dashes and spaces"
                    } else {
                        "must be a recovery code: 12 characters like XXXX-XXXX-XXXX"
                    },
                ));
            }
            String::new()
        }
        Kind::Passkey | Kind::Password => {
            return Err(Error::invalid(
                field,
                "VerifyFactor checks TOTP, OTP and recovery codes; passkeys use \
                 FinishPasskeyAuthentication and passwords VerifyPassword",
            ));
        }
    };
    if id.is_some() && !first.authenticator.confirmed {
        return Err(precondition(
            Reason::AuthenticatorNotConfirmed,
            "the authenticator is not confirmed yet (ConfirmTotp)",
        ));
    }
    candidates.retain(|c| c.authenticator.confirmed);
    if candidates.is_empty() {
        return Err(not_enrolled(kind));
    }
    if let Some(locked) = check_state(&user)? {
        let a = candidates[0].authenticator.clone();
        let result = fail_check(&tx, at, &user, Some(&a), locked).await?;
        tx.commit().await?;
        return Ok(Verified {
            result,
            authenticator: Some(a),
            user: None,
        });
    }

    // (result, the authenticator it concerns, the TOTP step spent)
    let (result, which, step) = match kind {
        Kind::Totp => {
            let mut outcome = (FactorResult::InvalidCode, 0, None);
            for (i, c) in candidates.iter().enumerate() {
                match super::totp::check(sealer, p, c, &normalized)? {
                    super::totp::Check::Ok(step) => {
                        outcome = (FactorResult::Ok, i, Some(step));
                        break;
                    }
                    super::totp::Check::Reused => outcome = (FactorResult::CodeReused, i, None),
                    super::totp::Check::Invalid => {}
                }
            }
            outcome
        }
        Kind::EmailOtp | Kind::SmsOtp => {
            let a = &candidates[0].authenticator;
            let r = super::otp::check(&tx, p, &user.user, a, &normalized).await?;
            (r, 0, None)
        }
        _ => {
            let a = &candidates[0].authenticator;
            let r = match store::use_recovery_code(&tx, p, a.id, &recovery_hashes).await? {
                store::RecoveryUse::Spent => FactorResult::Ok,
                store::RecoveryUse::AlreadyUsed => FactorResult::CodeReused,
                store::RecoveryUse::Unknown => FactorResult::InvalidCode,
            };
            (r, 0, None)
        }
    };
    let a = candidates.swap_remove(which).authenticator;
    if result != FactorResult::Ok {
        let result = fail_check(&tx, at, &user, Some(&a), result).await?;
        tx.commit().await?;
        return Ok(Verified {
            result,
            authenticator: Some(a),
            user: None,
        });
    }
    let a = store::record_factor_use(&tx, p, a.id, step).await?;
    pass_check(&tx, caller, ctx, &user, &a, at.via).await?;
    let fresh = crate::users::store::get(&tx, p, user_id).await?;
    tx.commit().await?;
    Ok(Verified {
        result,
        authenticator: Some(a),
        user: fresh,
    })
}
