//! Password operations: set, change, expire, verify (sign-in with lockout and rehash), and
//! reset tokens. Each change commits together with its audit event.
//!
//! Hashing never happens while a database connection is held: a sign-in flood queues on the
//! hashing pool, not on the connection pool. So a sign-in reads the user, verifies on the
//! pool, then re-reads the row under a lock to do its bookkeeping, checking that the hash it
//! verified is still the stored one.
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::store::{self, Credentials, Login, Success};
use crate::auth::Caller;
use crate::crypto::{Hasher, formats, policy};
use crate::db::{self, Pool};
use crate::error::{Error, Reason, Result};
use crate::events::{EventContext, EventType, NewEvent, store as events};
use crate::users::{User, UserStatus};

/// The credential settings of a call (the server's, or its project's policy over them):
/// lockout, password rules and age, the per-address throttle, the rations of codes.
#[derive(Debug, Clone, Copy)]
pub struct PasswordSettings {
    /// Consecutive failures that lock an account; 0 never locks.
    pub lockout_threshold: u32,
    /// How long a lock lasts.
    pub lockout: Duration,
    /// A new password may not repeat any of the last this many (the current one included).
    pub history: u32,
    /// Fewest characters in a new password.
    pub min_length: u32,
    /// Days a password lasts before a sign-in requires a change; 0: no limit.
    pub max_age_days: u32,
    /// Failed sign-ins one client address may make per window; 0: not throttled.
    pub ip_failure_limit: u32,
    /// How often codes and links may be issued to one user.
    pub codes: super::sends::SendLimit,
}

impl PasswordSettings {
    /// These settings with a project's own policy applied over them.
    pub fn for_project(&self, policy: &crate::auth::ProjectPolicy) -> PasswordSettings {
        PasswordSettings {
            lockout_threshold: policy.lockout_threshold.unwrap_or(self.lockout_threshold),
            lockout: policy
                .lockout_secs
                .map_or(self.lockout, |s| Duration::seconds(i64::from(s))),
            history: policy.password_history.unwrap_or(self.history),
            min_length: policy.password_min_length.unwrap_or(self.min_length),
            max_age_days: policy.password_max_age_days.unwrap_or(self.max_age_days),
            ip_failure_limit: policy.ip_failure_limit.unwrap_or(self.ip_failure_limit),
            codes: super::sends::SendLimit {
                resend_secs: policy.code_resend_secs.unwrap_or(self.codes.resend_secs),
                per_hour: policy.codes_per_hour.unwrap_or(self.codes.per_hour),
                sms_per_hour: policy.sms_per_hour.unwrap_or(self.codes.sms_per_hour),
            },
        }
    }

    /// Whether a password set at `changed_at` is past its maximum age at `now`.
    pub fn too_old(&self, changed_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
        self.max_age_days > 0
            && changed_at.is_some_and(|t| now - t >= Duration::days(i64::from(self.max_age_days)))
    }
}

/// How long a reset token works (API.md: 30 minutes).
pub const RESET_TOKEN_TTL_MINUTES: i64 = 30;
/// Reset tokens read `prt_` and 43 base64url characters (256 random bits).
const RESET_TOKEN_PREFIX: &str = "prt_";
const RESET_TOKEN_SECRET_LEN: usize = 43;

/// A new password as given by the caller, validated at the edge (length, common list, hash
/// format); what depends on the user (its own email or username) is checked here.
#[derive(Clone)]
pub enum NewPassword {
    Plain(String),
    Hash(String),
}

/// The outcome of a sign-in attempt, as `roster.v1.VerifyPasswordResult`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignInResult {
    Ok,
    InvalidCredentials,
    Locked(DateTime<Utc>),
    Blocked,
    Deactivated,
    PasswordChangeRequired(ChangeReason),
}

/// Why a right password must be changed, as `roster.v1.PasswordChangeReason`; the first that
/// applies in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeReason {
    Breached,
    Expired,
    MaxAge,
}

/// Where a sign-in comes from, as the calling backend reports it.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

const USER: &str = "user";

pub(super) fn not_found(id: Uuid) -> Error {
    Error::not_found(USER, id.to_string())
}

pub(super) fn precondition(reason: Reason, message: &str) -> Error {
    Error::FailedPrecondition {
        reason,
        message: message.to_string(),
    }
}

pub(super) async fn record(
    tx: &deadpool_postgres::Transaction<'_>,
    caller: &Caller,
    ctx: &EventContext,
    evs: &[NewEvent],
) -> Result<()> {
    events::record(tx, caller.project_id, ctx, evs).await
}

/// The event context of a sign-in: the end user's address and agent when the caller gave them.
pub(super) fn sign_in_context(caller: &Caller, origin: &Origin) -> EventContext {
    let mut ctx = EventContext::from_caller(caller);
    if origin.ip.is_some() {
        ctx.ip = origin.ip.clone();
    }
    ctx.user_agent = origin.user_agent.clone();
    ctx
}

fn check_personal(
    settings: &PasswordSettings,
    user: &User,
    password: &NewPassword,
    field: &str,
) -> Result<()> {
    if let NewPassword::Plain(p) = password {
        policy::check_new_password(p, &user.profile.personal(), settings.min_length as usize)
            .map_err(|e| Error::invalid(field, e))?;
    }
    Ok(())
}

/// The stored hash for a new password; the plain one is hashed on the pool.
async fn hash_of(hasher: &Hasher, password: &NewPassword) -> Result<String> {
    match password {
        NewPassword::Plain(p) => hasher.hash(p.clone()).await,
        NewPassword::Hash(h) => Ok(h.clone()),
    }
}

/// Refuses a plain new password equal to one of the user's last `settings.history`
/// passwords: `current` (the stored hash, when the caller has not already ruled it out) and
/// the previous ones kept. Compared on the hashing pool, no connection held meanwhile.
#[allow(clippy::too_many_arguments)]
async fn check_history(
    pool: &Pool,
    hasher: &Hasher,
    settings: &PasswordSettings,
    caller: &Caller,
    id: Uuid,
    current: Option<&str>,
    password: &NewPassword,
    field: &str,
) -> Result<()> {
    let NewPassword::Plain(plain) = password else {
        return Ok(());
    };
    match history_problem(pool, hasher, settings, caller, id, current, plain).await? {
        Some(problem) => Err(Error::invalid(field, problem)),
        None => Ok(()),
    }
}

/// Why `plain` may not be the user's new password by the history rule (it is the current
/// one, hashed as `current`, or one of those kept), if it may not.
async fn history_problem(
    pool: &Pool,
    hasher: &Hasher,
    settings: &PasswordSettings,
    caller: &Caller,
    id: Uuid,
    current: Option<&str>,
    plain: &str,
) -> Result<Option<String>> {
    if settings.history == 0 {
        return Ok(None);
    }
    let mut hashes: Vec<String> = current.map(str::to_owned).into_iter().collect();
    if settings.history > 1 {
        let client = db::client(pool).await?;
        hashes.extend(
            store::previous_hashes(&*client, caller.project_id, id, settings.history - 1).await?,
        );
    }
    let checks = hashes
        .into_iter()
        .map(|h| hasher.verify(plain.to_owned(), Some(h)));
    let reused = futures_util::future::try_join_all(checks)
        .await?
        .iter()
        .any(|v| v.ok);
    Ok(reused.then(|| match settings.history {
        1 => "is the user's current password; choose another".to_string(),
        n => format!("is one of the user's last {n} passwords; choose another"),
    }))
}

/// For CheckPassword: why `plain` may not be user `id`'s next password by the history rule,
/// as SetPassword and ChangePassword would refuse it. One hash check per password compared.
pub async fn reuse_problem(
    pool: &Pool,
    hasher: &Hasher,
    settings: &PasswordSettings,
    caller: &Caller,
    id: Uuid,
    plain: &str,
) -> Result<Option<String>> {
    let found = credentials_of(pool, caller, id).await?;
    history_problem(
        pool,
        hasher,
        settings,
        caller,
        id,
        found.hash.as_deref(),
        plain,
    )
    .await
}

/// After the history check, inside the transaction: the hash it compared against must still be
/// the stored one, or a concurrent change slipped in between (ABORTED: retry).
fn unchanged_since_check(
    settings: &PasswordSettings,
    password: &NewPassword,
    checked: Option<&str>,
    current: &Credentials,
) -> Result<()> {
    if settings.history > 0
        && matches!(password, NewPassword::Plain(_))
        && current.hash.as_deref() != checked
    {
        return Err(Error::EtagMismatch { resource: USER });
    }
    Ok(())
}

async fn credentials_of(pool: &Pool, caller: &Caller, id: Uuid) -> Result<Credentials> {
    let client = db::client(pool).await?;
    store::credentials(&*client, caller.project_id, &Login::Id(id))
        .await?
        .ok_or_else(|| not_found(id))
}

fn password_event_data(password: &NewPassword, require_change: bool) -> serde_json::Value {
    let format = match password {
        NewPassword::Plain(_) => "argon2id",
        NewPassword::Hash(h) => formats::parse(h).map(|f| f.name()).unwrap_or("unknown"),
    };
    json!({
        "source": if matches!(password, NewPassword::Plain(_)) { "password" } else { "password_hash" },
        "format": format,
        "require_change": require_change,
    })
}

pub async fn set_password(
    pool: &Pool,
    hasher: &Hasher,
    settings: &PasswordSettings,
    caller: &Caller,
    id: Uuid,
    password: NewPassword,
    require_change: bool,
) -> Result<User> {
    let found = credentials_of(pool, caller, id).await?;
    check_personal(settings, &found.user, &password, "password")?;
    let checked = found.hash.as_deref();
    check_history(
        pool, hasher, settings, caller, id, checked, &password, "password",
    )
    .await?;
    let hash = hash_of(hasher, &password).await?;
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let current = store::credentials_for_update(&tx, caller.project_id, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    // The profile may have changed while hashing; the rule must hold for the stored one.
    check_personal(settings, &current.user, &password, "password")?;
    unchanged_since_check(settings, &password, checked, &current)?;
    let keep = settings.history.saturating_sub(1);
    store::file_password_history(&tx, caller.project_id, id, &hash, keep).await?;
    let updated =
        store::set_password(&tx, caller.project_id, id, Some(&hash), require_change).await?;
    let ev = NewEvent::for_user(
        EventType::PasswordSet,
        id,
        password_event_data(&password, require_change),
    );
    record(&tx, caller, &EventContext::from_caller(caller), &[ev]).await?;
    tx.commit().await?;
    Ok(updated)
}

pub async fn expire_password(pool: &Pool, caller: &Caller, id: Uuid) -> Result<User> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let current = store::credentials_for_update(&tx, caller.project_id, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    if current.hash.is_none() {
        return Err(precondition(Reason::NoPassword, "the user has no password"));
    }
    if current.user.require_password_change {
        // Already expired: idempotent, no second event.
        return Ok(current.user);
    }
    let updated = store::expire_password(&tx, caller.project_id, id).await?;
    let ev = NewEvent::for_user(EventType::PasswordExpired, id, json!({}));
    record(&tx, caller, &EventContext::from_caller(caller), &[ev]).await?;
    tx.commit().await?;
    Ok(updated)
}

/// The state checks every password attempt makes before looking at the password.
pub(super) fn refusal(c: &Credentials, now: DateTime<Utc>) -> Option<SignInResult> {
    match c.user.status {
        UserStatus::Blocked => return Some(SignInResult::Blocked),
        UserStatus::Deactivated => return Some(SignInResult::Deactivated),
        _ => {}
    }
    c.user
        .locked_until
        .filter(|t| *t > now)
        .map(SignInResult::Locked)
}

fn refusal_name(r: SignInResult) -> &'static str {
    match r {
        SignInResult::Blocked => "USER_BLOCKED",
        SignInResult::Deactivated => "USER_DEACTIVATED",
        SignInResult::Locked(_) => "USER_LOCKED",
        SignInResult::Ok => "OK",
        SignInResult::InvalidCredentials => "INVALID_CREDENTIALS",
        SignInResult::PasswordChangeRequired(_) => "PASSWORD_CHANGE_REQUIRED",
    }
}

/// Counts one failed attempt (a password or a second factor) on a locked user row and
/// records `kind` with `data` plus the failure count; returns the lock's end if this failure
/// locked the account.
pub(super) async fn count_failure(
    tx: &deadpool_postgres::Transaction<'_>,
    caller: &Caller,
    ctx: &EventContext,
    settings: &PasswordSettings,
    current: &Credentials,
    kind: EventType,
    mut data: serde_json::Value,
) -> Result<Option<DateTime<Utc>>> {
    let id = current.user.id;
    let failed = current.failed_logins.saturating_add(1);
    let threshold = settings.lockout_threshold;
    let lock = threshold > 0 && failed as u32 >= threshold;
    data["consecutive_failures"] = json!(failed);
    let mut evs = vec![NewEvent::for_user(kind, id, data)];
    let locked_until = if lock {
        let until = Utc::now() + settings.lockout;
        evs.push(NewEvent::for_user(
            EventType::UserLockedOut,
            id,
            json!({ "consecutive_failures": failed, "locked_until": until.to_rfc3339() }),
        ));
        Some(until)
    } else {
        None
    };
    // A lock starts a fresh count for when it ends.
    let stored = if lock { 0 } else { failed };
    store::record_failure(tx, caller.project_id, id, stored, locked_until).await?;
    record(tx, caller, ctx, &evs).await?;
    Ok(locked_until)
}

fn wrong_password(via: &str) -> serde_json::Value {
    json!({ "reason": "INVALID_CREDENTIALS", "via": via })
}

/// Checks a password for a login and does the sign-in bookkeeping.
pub async fn verify_password(
    pool: &Pool,
    hasher: &Hasher,
    settings: &PasswordSettings,
    caller: &Caller,
    login: &Login,
    presented: Presented,
    origin: &Origin,
) -> Result<(SignInResult, Option<User>)> {
    let Presented { password, breached } = presented;
    let ctx = sign_in_context(caller, origin);
    let attempt = Attempt {
        pool,
        hasher,
        settings,
        caller,
        login,
        origin,
        ctx: &ctx,
        breached,
    };
    // A hash replaced while the password was being checked (most often by a concurrent
    // sign-in upgrading a legacy hash) is checked once more, against the new one.
    match attempt.run(password.clone(), false).await? {
        Some(answer) => Ok(answer),
        None => Ok(attempt
            .run(password, true)
            .await?
            .unwrap_or((SignInResult::InvalidCredentials, None))),
    }
}

/// The password a sign-in presents, and what is known of it before it is checked.
pub struct Presented {
    pub password: String,
    /// It is in the breached-passwords list, and the server then requires a change.
    pub breached: bool,
}

/// One password check with its bookkeeping, for [`verify_password`].
struct Attempt<'a> {
    pool: &'a Pool,
    hasher: &'a Hasher,
    settings: &'a PasswordSettings,
    caller: &'a Caller,
    login: &'a Login,
    origin: &'a Origin,
    ctx: &'a EventContext,
    /// The password is in the breached-passwords list (and the server requires a change).
    breached: bool,
}

impl Attempt<'_> {
    /// The answer; `None` when the hash changed while it was being checked and this is not
    /// the `last` attempt (nothing was written: the caller checks again).
    async fn run(
        &self,
        password: String,
        last: bool,
    ) -> Result<Option<(SignInResult, Option<User>)>> {
        let Attempt {
            pool,
            hasher,
            settings,
            caller,
            login,
            origin,
            ctx,
            breached,
        } = *self;
        let found = {
            let client = db::client(pool).await?;
            store::credentials(&*client, caller.project_id, login).await?
        };
        if found.as_ref().is_none_or(|c| c.hash.is_none()) {
            // Unknown login or no password: the same work as a wrong password, the same answer.
            hasher.verify(password, None).await?;
            let user_id = found.as_ref().map(|c| c.user.id);
            let reason = if user_id.is_some() {
                "NO_PASSWORD"
            } else {
                "UNKNOWN_LOGIN"
            };
            record_refusal(pool, caller, ctx, user_id, reason).await?;
            return Ok(Some((SignInResult::InvalidCredentials, None)));
        }
        let Some(found) = found else {
            return Ok(Some((SignInResult::InvalidCredentials, None)));
        };
        let id = found.user.id;
        if let Some(r) = refusal(&found, Utc::now()) {
            // Blocked, deactivated or locked: answered without checking the password, so the
            // answer says nothing about it.
            record_refusal(pool, caller, ctx, Some(id), refusal_name(r)).await?;
            return Ok(Some((r, None)));
        }
        let hash = found.hash.clone().unwrap_or_default();
        let verified = hasher.verify(password.clone(), Some(hash.clone())).await?;
        let rehash = match verified.outdated {
            Some(_) if verified.ok => Some(hasher.hash(password).await?),
            _ => None,
        };

        let mut client = db::client(pool).await?;
        if verified.ok {
            // The usual case, nothing changed since the read: one statement, one round trip.
            let (success, evs, result) = sign_in(
                settings,
                &found,
                origin,
                verified.outdated,
                rehash.as_deref(),
                breached,
            );
            if let Some(user) = store::record_success_if_unchanged(
                &*client,
                caller.project_id,
                &found,
                &success,
                ctx,
                &evs,
            )
            .await?
            {
                return Ok(Some((result, Some(user))));
            }
        }
        let tx = client.transaction().await?;
        let Some(current) = store::credentials_for_update(&tx, caller.project_id, id).await? else {
            // Deleted meanwhile.
            return Ok(Some((SignInResult::InvalidCredentials, None)));
        };
        match recheck(&current, &hash, last, Utc::now()) {
            Recheck::Proceed => {}
            Recheck::Again => return Ok(None),
            Recheck::Refuse(r, reason) => {
                record(&tx, caller, ctx, &[refusal_event(Some(id), reason)]).await?;
                tx.commit().await?;
                return Ok(Some((r, None)));
            }
        }
        if !verified.ok {
            let locked = count_failure(
                &tx,
                caller,
                ctx,
                settings,
                &current,
                EventType::LoginFailed,
                wrong_password("VerifyPassword"),
            )
            .await?;
            tx.commit().await?;
            return Ok(Some(match locked {
                Some(until) => (SignInResult::Locked(until), None),
                None => (SignInResult::InvalidCredentials, None),
            }));
        }
        let (success, evs, result) = sign_in(
            settings,
            &current,
            origin,
            verified.outdated,
            rehash.as_deref(),
            breached,
        );
        let user = store::record_success(&tx, caller.project_id, id, &success).await?;
        record(&tx, caller, ctx, &evs).await?;
        tx.commit().await?;
        Ok(Some((result, Some(user))))
    }
}

/// The LOGIN_FAILED event of a VerifyPassword refused for `reason` without counting a wrong
/// password (`user_id` is `None` for an unknown login).
fn refusal_event(user_id: Option<Uuid>, reason: &str) -> NewEvent {
    NewEvent {
        kind: EventType::LoginFailed,
        user_id,
        data: json!({ "reason": reason, "via": "VerifyPassword" }),
    }
}

/// Records [`refusal_event`] on its own, for a refusal decided before the row is locked.
async fn record_refusal(
    pool: &Pool,
    caller: &Caller,
    ctx: &EventContext,
    user_id: Option<Uuid>,
    reason: &str,
) -> Result<()> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    record(&tx, caller, ctx, &[refusal_event(user_id, reason)]).await?;
    tx.commit().await?;
    Ok(())
}

/// What a sign-in's locked re-read of the user decides, before the password's check counts.
#[derive(Debug, PartialEq)]
enum Recheck {
    /// Nothing that matters changed: the check stands.
    Proceed,
    /// The hash was replaced while it was checked: check again, against the new one.
    Again,
    /// Refused (recorded with this reason, not counted as a wrong password).
    Refuse(SignInResult, &'static str),
}

/// Locked or blocked by a concurrent call while the password was hashing: refused. A hash
/// replaced meanwhile (most often by a concurrent sign-in upgrading a legacy hash): the check
/// proves nothing about the new one, which is checked next; on the `last` check the attempt
/// is refused instead.
fn recheck(current: &Credentials, checked: &str, last: bool, now: DateTime<Utc>) -> Recheck {
    if let Some(r) = refusal(current, now) {
        return Recheck::Refuse(r, refusal_name(r));
    }
    match current.hash.as_deref() {
        Some(h) if h == checked => Recheck::Proceed,
        _ if last => Recheck::Refuse(SignInResult::InvalidCredentials, "PASSWORD_CHANGED"),
        _ => Recheck::Again,
    }
}

/// What a right password does for `current`: the bookkeeping to store, the events to record
/// and the answer. `outdated` names the algorithm of a hash being replaced by `rehash`. A
/// password past the maximum age, or a `breached` one, requires a change like an expired one
/// (nothing is stored for it: changing the password ends it).
fn sign_in<'a>(
    settings: &PasswordSettings,
    current: &Credentials,
    origin: &'a Origin,
    outdated: Option<&'static str>,
    rehash: Option<&'a str>,
    breached: bool,
) -> (Success<'a>, Vec<NewEvent>, SignInResult) {
    let id = current.user.id;
    let too_old = settings.too_old(current.user.password_changed_at, Utc::now());
    let change = if breached {
        Some(ChangeReason::Breached)
    } else if current.user.require_password_change {
        Some(ChangeReason::Expired)
    } else if too_old {
        Some(ChangeReason::MaxAge)
    } else {
        None
    };
    let change_required = change.is_some();
    let activate = !change_required && current.user.status == UserStatus::PendingVerification;
    let mut evs = Vec::new();
    if let (Some(from), Some(_)) = (outdated, rehash) {
        evs.push(NewEvent::for_user(
            EventType::PasswordRehashed,
            id,
            json!({ "from": from, "to": "argon2id" }),
        ));
    }
    let result = change.map_or(SignInResult::Ok, SignInResult::PasswordChangeRequired);
    let mut data = json!({ "method": "PASSWORD", "result": refusal_name(result) });
    if too_old {
        data["password_max_age_days"] = json!(settings.max_age_days);
    }
    if breached {
        data["password_breached"] = json!(true);
    }
    if activate {
        data["activated"] = json!(true);
    }
    evs.push(NewEvent::for_user(EventType::LoginSucceeded, id, data));
    let success = Success {
        sign_in: !change_required,
        ip: origin.ip.as_deref(),
        activate,
        rehash,
    };
    (success, evs, result)
}

pub async fn change_password(
    pool: &Pool,
    hasher: &Hasher,
    settings: &PasswordSettings,
    caller: &Caller,
    id: Uuid,
    current_password: String,
    new_password: String,
) -> Result<User> {
    let found = {
        let client = db::client(pool).await?;
        store::credentials(&*client, caller.project_id, &Login::Id(id))
            .await?
            .ok_or_else(|| not_found(id))?
    };
    let state_error = |r: SignInResult| match r {
        SignInResult::Blocked => precondition(Reason::UserBlocked, "the user is blocked"),
        SignInResult::Deactivated => {
            precondition(Reason::UserDeactivated, "the user is deactivated")
        }
        _ => precondition(
            Reason::UserLocked,
            "the user is locked after too many failed attempts",
        ),
    };
    if let Some(r) = refusal(&found, Utc::now()) {
        return Err(state_error(r));
    }
    let Some(hash) = found.hash.clone() else {
        return Err(precondition(
            Reason::NoPassword,
            "the user has no password; use SetPassword",
        ));
    };
    let new = NewPassword::Plain(new_password);
    check_personal(settings, &found.user, &new, "new_password")?;
    let verified = hasher.verify(current_password, Some(hash.clone())).await?;
    let new_hash = if verified.ok {
        // Only for the holder of the current password: it tells whether a password was
        // used before. The current one is ruled out already (it is not the new one).
        check_history(
            pool,
            hasher,
            settings,
            caller,
            id,
            None,
            &new,
            "new_password",
        )
        .await?;
        Some(hash_of(hasher, &new).await?)
    } else {
        None
    };

    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let current = store::credentials_for_update(&tx, caller.project_id, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    if let Some(r) = refusal(&current, Utc::now()) {
        return Err(state_error(r));
    }
    if current.hash.as_deref() != Some(hash.as_str()) {
        return Err(Error::EtagMismatch { resource: USER });
    }
    let Some(new_hash) = new_hash else {
        // A wrong current password is a failed sign-in: otherwise this RPC would be a way
        // around the lockout.
        let ctx = EventContext::from_caller(caller);
        count_failure(
            &tx,
            caller,
            &ctx,
            settings,
            &current,
            EventType::LoginFailed,
            wrong_password("ChangePassword"),
        )
        .await?;
        tx.commit().await?;
        return Err(Error::invalid(
            "current_password",
            "is not the user's current password",
        ));
    };
    check_personal(settings, &current.user, &new, "new_password")?;
    let keep = settings.history.saturating_sub(1);
    store::file_password_history(&tx, caller.project_id, id, &new_hash, keep).await?;
    let updated = store::set_password(&tx, caller.project_id, id, Some(&new_hash), false).await?;
    let ev = NewEvent::for_user(
        EventType::PasswordChanged,
        id,
        json!({ "format": "argon2id" }),
    );
    record(&tx, caller, &EventContext::from_caller(caller), &[ev]).await?;
    tx.commit().await?;
    Ok(updated)
}

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Whether `token` has the shape of a reset token (checked before any lookup).
pub fn is_reset_token(token: &str) -> bool {
    token.strip_prefix(RESET_TOKEN_PREFIX).is_some_and(|s| {
        s.len() == RESET_TOKEN_SECRET_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// Makes a reset token for the user found by `login` (id or email); returns it and its expiry.
pub async fn create_reset_token(
    pool: &Pool,
    caller: &Caller,
    login: &Login,
    limit: super::sends::SendLimit,
) -> Result<(String, DateTime<Utc>)> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let found = store::credentials(&tx, caller.project_id, login).await?;
    let Some(found) = found else {
        let id = match login {
            Login::Id(id) => id.to_string(),
            Login::Key(crate::users::LookupKey::Email(e)) => format!("email={e}"),
            Login::Key(_) => String::new(),
        };
        return Err(Error::not_found(USER, id));
    };
    let id = found.user.id;
    super::sends::take(
        &tx,
        caller.project_id,
        id,
        super::sends::Delivery::PasswordReset,
        limit,
    )
    .await?;
    let secret: [u8; 32] = rand::random();
    let token = format!("{RESET_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let expires_at = Utc::now() + Duration::minutes(RESET_TOKEN_TTL_MINUTES);
    store::insert_reset_token(&tx, caller.project_id, id, &token_hash(&token), expires_at).await?;
    let ev = NewEvent::for_user(
        EventType::PasswordResetRequested,
        id,
        json!({ "expires_at": expires_at.to_rfc3339() }),
    );
    record(&tx, caller, &EventContext::from_caller(caller), &[ev]).await?;
    tx.commit().await?;
    Ok((token, expires_at))
}

fn token_error(description: &str) -> Error {
    Error::invalid("token", description)
}

pub async fn reset_password(
    pool: &Pool,
    hasher: &Hasher,
    settings: &PasswordSettings,
    caller: &Caller,
    token: &str,
    new_password: String,
) -> Result<User> {
    let hash = token_hash(token);
    let unknown = || token_error("is unknown or was already used");
    let expired = || token_error("has expired; request a new one");
    let (user_id, expires_at) = {
        let client = db::client(pool).await?;
        store::find_reset_token(&*client, caller.project_id, &hash)
            .await?
            .ok_or_else(unknown)?
    };
    if expires_at <= Utc::now() {
        return Err(expired());
    }
    let found = credentials_of(pool, caller, user_id).await?;
    let new = NewPassword::Plain(new_password);
    check_personal(settings, &found.user, &new, "new_password")?;
    let checked = found.hash.as_deref();
    check_history(
        pool,
        hasher,
        settings,
        caller,
        user_id,
        checked,
        &new,
        "new_password",
    )
    .await?;
    let new_hash = hash_of(hasher, &new).await?;

    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    // Consuming the token row decides which of two concurrent resets wins.
    let Some((user_id, expires_at)) =
        store::take_reset_token(&tx, caller.project_id, &hash).await?
    else {
        return Err(unknown());
    };
    if expires_at <= Utc::now() {
        return Err(expired());
    }
    let current = store::credentials_for_update(&tx, caller.project_id, user_id)
        .await?
        .ok_or_else(unknown)?;
    check_personal(settings, &current.user, &new, "new_password")?;
    unchanged_since_check(settings, &new, checked, &current)?;
    let lock_cleared = current.user.locked_until.is_some_and(|t| t > Utc::now());
    let keep = settings.history.saturating_sub(1);
    store::file_password_history(&tx, caller.project_id, user_id, &new_hash, keep).await?;
    let updated =
        store::set_password(&tx, caller.project_id, user_id, Some(&new_hash), false).await?;
    let ev = NewEvent::for_user(
        EventType::PasswordReset,
        user_id,
        json!({ "format": "argon2id", "lock_cleared": lock_cleared }),
    );
    record(&tx, caller, &EventContext::from_caller(caller), &[ev]).await?;
    tx.commit().await?;
    Ok(updated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(status: UserStatus, locked_until: Option<DateTime<Utc>>) -> Credentials {
        let now = Utc::now();
        Credentials {
            user: User {
                id: Uuid::now_v7(),
                profile: Default::default(),
                status,
                has_password: true,
                password_changed_at: Some(now),
                require_password_change: false,
                login_count: 0,
                last_login_at: None,
                last_login_ip: None,
                locked_until,
                blocked_reason: None,
                created_at: now,
                updated_at: now,
                version: 1,
                factor_types: Vec::new(),
                default_factor: None,
            },
            hash: Some("$argon2id$new".into()),
            failed_logins: 0,
        }
    }

    #[test]
    fn a_sign_ins_locked_re_read_decides_on_state_first_then_the_hash() {
        let now = Utc::now();
        let active = credentials(UserStatus::Active, None);
        assert_eq!(
            recheck(&active, "$argon2id$new", false, now),
            Recheck::Proceed
        );
        assert_eq!(
            recheck(&active, "$argon2id$new", true, now),
            Recheck::Proceed
        );
        // Replaced while it was checked: once more against the new hash, then refused.
        assert_eq!(
            recheck(&active, "$argon2id$old", false, now),
            Recheck::Again
        );
        assert_eq!(
            recheck(&active, "$argon2id$old", true, now),
            Recheck::Refuse(SignInResult::InvalidCredentials, "PASSWORD_CHANGED")
        );
        let mut removed = credentials(UserStatus::Active, None);
        removed.hash = None;
        assert_eq!(
            recheck(&removed, "$argon2id$new", false, now),
            Recheck::Again
        );
        // A refusal wins over a replaced hash; an ended lock refuses nothing.
        let until = now + chrono::Duration::minutes(5);
        for (c, expected) in [
            (
                credentials(UserStatus::Blocked, None),
                Recheck::Refuse(SignInResult::Blocked, "USER_BLOCKED"),
            ),
            (
                credentials(UserStatus::Deactivated, None),
                Recheck::Refuse(SignInResult::Deactivated, "USER_DEACTIVATED"),
            ),
            (
                credentials(UserStatus::Active, Some(until)),
                Recheck::Refuse(SignInResult::Locked(until), "USER_LOCKED"),
            ),
        ] {
            assert_eq!(recheck(&c, "$argon2id$old", false, now), expected);
            assert_eq!(recheck(&c, "$argon2id$new", true, now), expected);
        }
        let ended = credentials(UserStatus::Active, Some(now - chrono::Duration::seconds(1)));
        assert_eq!(
            recheck(&ended, "$argon2id$new", false, now),
            Recheck::Proceed
        );
    }

    #[test]
    fn reset_token_shape() {
        let t = format!("prt_{}", URL_SAFE_NO_PAD.encode([7u8; 32]));
        assert!(is_reset_token(&t));
        assert!(!is_reset_token("prt_short"));
        assert!(!is_reset_token(&t.replace("prt_", "rst_")));
        assert!(!is_reset_token(&format!("{t}=")));
    }
}
