//! The user operations: each writes its audit event atomically with its change (in one
//! transaction, or one statement).
//! Inputs arrive validated (see `grpc.rs`); what can only be checked against the stored row
//! (etags, the profile after an update mask, state transitions) is checked here.
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::bulk_store;
use super::creates::{Create, UserCreates};
use super::reads::UserReads;
use super::store::{self, ListSpec, Verification};
use super::{
    LookupKey, MaskPath, NewUser, PasswordInput, Profile, ProfileField, User, UserStatus,
    has_identifier, validate_profile,
};
use crate::auth::Caller;
use crate::authenticators::sends::{self, Delivery, SendLimit, SmsPrefixes};
use crate::crypto::{Hasher, codes};
use crate::db::{self, Pool};
use crate::error::{Error, Reason, Result, Violations};
use crate::events::{EventContext, EventType, NewEvent, store as events};
use crate::query::page;

const USER: &str = "user";

fn not_found(id: Uuid) -> Error {
    Error::not_found(USER, id.to_string())
}

/// Which contact a verification is for; numbers are `roster.v1.ContactChannel`'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContactChannel {
    Email = 1,
    Phone = 2,
}

impl ContactChannel {
    fn name(self) -> &'static str {
        match self {
            ContactChannel::Email => "EMAIL",
            ContactChannel::Phone => "PHONE",
        }
    }

    /// What a verification code for this channel is issued as.
    pub fn delivery(self) -> Delivery {
        match self {
            ContactChannel::Email => Delivery::EmailVerification,
            ContactChannel::Phone => Delivery::PhoneVerification,
        }
    }
}

/// Outcome of a contact confirmation (not an error: the caller shows it to the end user).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerificationResult {
    Ok,
    InvalidCode,
    Expired,
    TooManyAttempts,
}

/// A verification code lives this long.
pub const CODE_TTL_MINUTES: i64 = 10;
/// Wrong codes allowed before the verification is void.
pub const MAX_CODE_ATTEMPTS: i32 = 5;

/// The names of the profile fields that are set (non-empty, true), for event data.
pub(crate) fn set_fields(p: &Profile) -> Vec<&'static str> {
    ProfileField::ALL
        .iter()
        .filter(|f| match field_value(p, **f) {
            Value::Null | Value::Bool(false) => false,
            Value::Object(m) => !m.is_empty(),
            _ => true,
        })
        .map(|f| f.name())
        .collect()
}

/// A profile field as JSON.
fn field_value(p: &Profile, f: ProfileField) -> Value {
    use ProfileField::*;
    let s = |v: &Option<String>| v.clone().map(Value::String).unwrap_or(Value::Null);
    match f {
        ExternalId => s(&p.external_id),
        Email => s(&p.email),
        EmailVerified => Value::Bool(p.email_verified),
        PhoneNumber => s(&p.phone_number),
        PhoneVerified => Value::Bool(p.phone_verified),
        Username => s(&p.username),
        DisplayName => s(&p.display_name),
        GivenName => s(&p.given_name),
        FamilyName => s(&p.family_name),
        PictureUrl => s(&p.picture_url),
        Locale => s(&p.locale),
        Timezone => s(&p.timezone),
        UserMetadata => Value::Object(p.user_metadata.clone()),
        AppMetadata => Value::Object(p.app_metadata.clone()),
    }
}

pub async fn create_user(
    creates: &UserCreates,
    hasher: &Hasher,
    caller: &Caller,
    new: NewUser,
) -> Result<User> {
    // Hash before queueing for the database: hashing may queue behind a sign-in flood.
    let password_hash = match &new.password {
        Some(PasswordInput::Plain(p)) => Some(hasher.hash(p.clone()).await?),
        Some(PasswordInput::Hash(h)) => Some(h.clone()),
        None => None,
    };
    let event = NewEvent::for_user(
        EventType::UserCreated,
        new.id,
        json!({
            "fields": set_fields(&new.profile),
            "status": UserStatus::initial(new.pending).as_str(),
            "has_password": password_hash.is_some(),
        }),
    );
    // One statement writes the user and its event (with those of concurrent creates): no
    // transaction to open and commit around it.
    creates
        .create(Create {
            project_id: caller.project_id,
            user: new,
            password_hash,
            ctx: EventContext::from_caller(caller),
            event,
        })
        .await
}

pub async fn get_user(reads: &UserReads, caller: &Caller, id: Uuid) -> Result<User> {
    reads
        .get(caller.project_id, id)
        .await?
        .ok_or_else(|| not_found(id))
}

/// The users of `ids` in their order, and the ids that name none: one statement.
pub async fn batch_get_users(
    pool: &Pool,
    caller: &Caller,
    ids: &[Uuid],
) -> Result<(Vec<User>, Vec<Uuid>)> {
    let client = db::client(pool).await?;
    let mut by_id: std::collections::HashMap<Uuid, User> =
        store::get_many(&*client, caller.project_id, ids)
            .await?
            .into_iter()
            .map(|u| (u.id, u))
            .collect();
    let (mut found, mut missing) = (Vec::with_capacity(by_id.len()), Vec::new());
    for id in ids {
        match by_id.remove(id) {
            Some(u) => found.push(u),
            None => missing.push(*id),
        }
    }
    Ok((found, missing))
}

pub async fn lookup_user(reads: &UserReads, caller: &Caller, key: &LookupKey) -> Result<User> {
    reads
        .lookup(caller.project_id, key.clone())
        .await?
        .ok_or_else(|| {
            let (field, value) = match key {
                LookupKey::Email(v) => ("email", v),
                LookupKey::PhoneNumber(v) => ("phone_number", v),
                LookupKey::Username(v) => ("username", v),
                LookupKey::ExternalId(v) => ("external_id", v),
            };
            Error::not_found(USER, format!("{field}={value}"))
        })
}

fn check_etag(user: &User, etag: Option<&str>) -> Result<()> {
    match etag {
        Some(e) if e != user.etag() => Err(Error::EtagMismatch { resource: USER }),
        _ => Ok(()),
    }
}

pub async fn update_user(
    pool: &Pool,
    caller: &Caller,
    id: Uuid,
    given: &Profile,
    mask: &[MaskPath],
    etag: Option<&str>,
) -> Result<User> {
    match write_profile(pool, caller, id, given, mask, etag).await {
        // Name the user holding a clashing value, as CreateUser does (the write's transaction
        // went with its error, so the lookup takes a connection of its own).
        Err(e @ Error::AlreadyExists { .. }) => {
            let client = db::client(pool).await?;
            Err(store::name_holder(&*client, caller.project_id, e, given, id).await)
        }
        other => other,
    }
}

async fn write_profile(
    pool: &Pool,
    caller: &Caller,
    id: Uuid,
    given: &Profile,
    mask: &[MaskPath],
    etag: Option<&str>,
) -> Result<User> {
    let p = caller.project_id;
    let ctx = EventContext::from_caller(caller);
    let mut client = db::client(pool).await?;
    // Optimistic first: read the user, then write only if it is still as read (version and
    // update time, as its etag): two round trips, no row lock held in between. When another
    // write came in between, the locking path below answers as if this call came after it.
    let current = store::get(&*client, p, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    let Some((next, event)) = profile_update(&current, given, mask, etag)? else {
        return Ok(current);
    };
    if let Some(updated) = store::save_profile(&*client, p, &current, &next, &ctx, &event).await? {
        return Ok(updated);
    }
    let tx = client.transaction().await?;
    let current = store::get_for_update(&tx, p, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    let Some((next, event)) = profile_update(&current, given, mask, etag)? else {
        return Ok(current);
    };
    let updated = store::save_profile(&tx, p, &current, &next, &ctx, &event)
        .await?
        .ok_or_else(|| Error::internal(anyhow::anyhow!("a locked user changed")))?;
    tx.commit().await?;
    Ok(updated)
}

/// What an update makes of `current`: the new profile and its event, or `None` when
/// nothing changes (no write, no event, same etag). Fails on a stale etag or a profile the
/// mask leaves invalid.
fn profile_update(
    current: &User,
    given: &Profile,
    mask: &[MaskPath],
    etag: Option<&str>,
) -> Result<Option<(Profile, NewEvent)>> {
    check_etag(current, etag)?;
    let next = super::apply_mask(&current.profile, given, mask);
    let mut v = Violations::new();
    validate_profile(&next, "user", &mut v);
    if !has_identifier(&next) {
        v.add(
            "user",
            "a user needs at least one of email, phone_number, username, external_id",
        );
    }
    v.into_result()?;
    if next == current.profile {
        return Ok(None);
    }
    let mut changes = serde_json::Map::new();
    for f in ProfileField::ALL {
        let (old, new) = (field_value(&current.profile, f), field_value(&next, f));
        let meta = matches!(f, ProfileField::UserMetadata | ProfileField::AppMetadata);
        if old != new {
            // Metadata values stay out of the audit log; their change is recorded by name.
            let entry = if meta {
                json!({})
            } else {
                json!({ "old": old, "new": new })
            };
            changes.insert(f.name().to_string(), entry);
        }
    }
    let data = json!({ "fields": changes.keys().collect::<Vec<_>>(), "changes": changes });
    let event = NewEvent::for_user(EventType::UserUpdated, current.id, data);
    Ok(Some((next, event)))
}

pub async fn delete_user(pool: &Pool, caller: &Caller, id: Uuid, etag: Option<&str>) -> Result<()> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let current = store::get_for_update(&tx, caller.project_id, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    check_etag(&current, etag)?;
    store::delete(&tx, caller.project_id, &[id]).await?;
    let ev = NewEvent::for_user(EventType::UserDeleted, id, json!({ "id": id }));
    events::record(
        &tx,
        caller.project_id,
        &EventContext::from_caller(caller),
        &[ev],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Deletes what exists of `ids`; returns (deleted, not found), each in request order.
pub async fn batch_delete_users(
    pool: &Pool,
    caller: &Caller,
    ids: &[Uuid],
) -> Result<(Vec<Uuid>, Vec<Uuid>)> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let deleted = store::delete(&tx, caller.project_id, ids).await?;
    let evs: Vec<NewEvent> = deleted
        .iter()
        .map(|id| NewEvent::for_user(EventType::UserDeleted, *id, json!({ "id": id })))
        .collect();
    events::record(
        &tx,
        caller.project_id,
        &EventContext::from_caller(caller),
        &evs,
    )
    .await?;
    tx.commit().await?;
    let (found, missing): (Vec<Uuid>, Vec<Uuid>) = ids.iter().partition(|id| deleted.contains(id));
    Ok((found, missing))
}

/// One page of users.
pub struct UserPage {
    pub users: Vec<User>,
    pub next_page_token: String,
    pub total_size: Option<i64>,
}

pub async fn list_users(
    pool: &Pool,
    caller: &Caller,
    spec: &ListSpec,
    fingerprint: &str,
    show_total_size: bool,
) -> Result<UserPage> {
    let client = db::client(pool).await?;
    let rows = store::list(&*client, caller.project_id, spec).await?;
    let (users, next_page_token) = page::split_page(rows, spec.limit, fingerprint);
    let total_size = if show_total_size {
        Some(store::count(&*client, caller.project_id, spec).await?)
    } else {
        None
    };
    Ok(UserPage {
        users,
        next_page_token,
        total_size,
    })
}

/// The lifecycle operations.
#[derive(Clone, Copy, Debug)]
pub enum Lifecycle {
    Block,
    Unblock,
    Deactivate,
    Reactivate,
}

pub async fn change_lifecycle(
    pool: &Pool,
    caller: &Caller,
    id: Uuid,
    op: Lifecycle,
    reason: Option<&str>,
) -> Result<User> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let user = store::get_for_update(&tx, caller.project_id, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    let precondition = |message: &str| Error::FailedPrecondition {
        reason: Reason::UserBlocked,
        message: message.to_string(),
    };
    // (new status, blocked reason, clear the brute-force lock, event); None: nothing to do.
    let change = match op {
        Lifecycle::Block => {
            if user.status == UserStatus::Blocked && user.blocked_reason.as_deref() == reason {
                None
            } else {
                Some((UserStatus::Blocked, reason, false, EventType::UserBlocked))
            }
        }
        Lifecycle::Unblock => {
            let locked = user.locked_until.is_some();
            if user.status == UserStatus::Blocked {
                Some((UserStatus::Active, None, true, EventType::UserUnblocked))
            } else if locked {
                Some((user.status, None, true, EventType::UserUnblocked))
            } else {
                None
            }
        }
        Lifecycle::Deactivate => match user.status {
            UserStatus::Blocked => {
                return Err(precondition("the user is blocked; unblock it first"));
            }
            UserStatus::Deactivated => None,
            _ => Some((
                UserStatus::Deactivated,
                None,
                false,
                EventType::UserDeactivated,
            )),
        },
        Lifecycle::Reactivate => match user.status {
            UserStatus::Blocked => {
                return Err(precondition("the user is blocked; unblock it instead"));
            }
            UserStatus::Deactivated => {
                Some((UserStatus::Active, None, false, EventType::UserReactivated))
            }
            _ => None,
        },
    };
    let Some((status, blocked_reason, clear_lock, kind)) = change else {
        // Already in the requested state: idempotent, so retries are safe.
        return Ok(user);
    };
    let updated = store::set_status(
        &tx,
        caller.project_id,
        id,
        status,
        blocked_reason,
        clear_lock,
    )
    .await?;
    let mut data = json!({ "old_status": user.status.as_str(), "new_status": status.as_str() });
    if let Some(r) = blocked_reason {
        data["reason"] = Value::String(r.to_string());
    }
    if clear_lock && user.locked_until.is_some() {
        data["lock_cleared"] = Value::Bool(true);
    }
    events::record(
        &tx,
        caller.project_id,
        &EventContext::from_caller(caller),
        &[NewEvent::for_user(kind, id, data)],
    )
    .await?;
    tx.commit().await?;
    Ok(updated)
}

fn contact_of(user: &User, channel: ContactChannel) -> Option<&str> {
    match channel {
        ContactChannel::Email => user.profile.email.as_deref(),
        ContactChannel::Phone => user.profile.phone_number.as_deref(),
    }
}

/// Issues a 6-digit code for the caller to deliver; returns it with its expiry.
pub async fn start_contact_verification(
    pool: &Pool,
    caller: &Caller,
    id: Uuid,
    channel: ContactChannel,
    limit: SendLimit,
    sms: &SmsPrefixes,
) -> Result<(String, DateTime<Utc>)> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let user = store::get_for_update(&tx, caller.project_id, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    let Some(target) = contact_of(&user, channel) else {
        return Err(Error::FailedPrecondition {
            reason: Reason::NoContact,
            message: format!(
                "the user has no {}",
                if channel == ContactChannel::Email {
                    "email"
                } else {
                    "phone_number"
                }
            ),
        });
    };
    if channel == ContactChannel::Phone {
        sms.check(target)?;
    }
    sends::take(&tx, caller.project_id, id, channel.delivery(), limit).await?;
    let code = codes::six_digit_code();
    let salt = codes::salt();
    let expires_at = Utc::now() + Duration::minutes(CODE_TTL_MINUTES);
    let v = Verification {
        target: target.to_string(),
        salt: salt.to_vec(),
        hash: codes::salted_hash(&salt, &code),
        attempts: 0,
        expires_at,
    };
    store::put_verification(&tx, caller.project_id, id, channel as i16, &v).await?;
    let ev = NewEvent::for_user(
        EventType::ContactVerificationStarted,
        id,
        json!({ "channel": channel.name() }),
    );
    events::record(
        &tx,
        caller.project_id,
        &EventContext::from_caller(caller),
        &[ev],
    )
    .await?;
    tx.commit().await?;
    Ok((code, expires_at))
}

pub async fn confirm_contact_verification(
    pool: &Pool,
    caller: &Caller,
    id: Uuid,
    channel: ContactChannel,
    code: &str,
) -> Result<(VerificationResult, User)> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let user = store::get_for_update(&tx, caller.project_id, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    let ch = channel as i16;
    let pending = store::get_verification_for_update(&tx, caller.project_id, id, ch).await?;
    let result = match &pending {
        None => VerificationResult::InvalidCode,
        Some(v) if v.attempts >= MAX_CODE_ATTEMPTS => VerificationResult::TooManyAttempts,
        Some(v) if v.expires_at <= Utc::now() => VerificationResult::Expired,
        // The contact changed since the code was sent: the code proves nothing about it.
        Some(v) if contact_of(&user, channel) != Some(v.target.as_str()) => {
            VerificationResult::InvalidCode
        }
        Some(v) => {
            if codes::matches(&v.salt, &v.hash, code) {
                VerificationResult::Ok
            } else {
                VerificationResult::InvalidCode
            }
        }
    };
    let ctx = EventContext::from_caller(caller);
    let user = if result == VerificationResult::Ok {
        store::delete_verification(&tx, caller.project_id, id, ch).await?;
        let user = store::mark_contact_verified(
            &tx,
            caller.project_id,
            id,
            channel == ContactChannel::Phone,
        )
        .await?;
        let ev = NewEvent::for_user(
            EventType::ContactVerified,
            id,
            json!({ "channel": channel.name() }),
        );
        events::record(&tx, caller.project_id, &ctx, &[ev]).await?;
        user
    } else {
        if result == VerificationResult::InvalidCode && pending.is_some() {
            store::count_failed_verification(&tx, caller.project_id, id, ch).await?;
        }
        let reason = match result {
            VerificationResult::Expired => "EXPIRED",
            VerificationResult::TooManyAttempts => "TOO_MANY_ATTEMPTS",
            _ => "INVALID_CODE",
        };
        let ev = NewEvent::for_user(
            EventType::ContactVerificationFailed,
            id,
            json!({ "channel": channel.name(), "reason": reason }),
        );
        events::record(&tx, caller.project_id, &ctx, &[ev]).await?;
        user
    };
    tx.commit().await?;
    Ok((result, user))
}

/// One exported user, with its password hash, identities and second factors when those
/// were asked for.
pub struct Exported {
    pub user: User,
    pub password_hash: Option<String>,
    pub identities: Vec<super::import::ImportIdentity>,
    pub factors: Vec<super::import::CarriedFactor>,
}

/// Where an export goes: its chunks, then its outcome; `stall` bounds the wait for a client
/// that takes nothing, and `slot` (one of `--max-exports`) is held until the export stops.
pub struct ExportOut {
    pub chunks: tokio::sync::mpsc::Sender<Vec<Exported>>,
    pub end: tokio::sync::oneshot::Sender<Result<()>>,
    pub stall: Option<std::time::Duration>,
    pub slot: tokio::sync::OwnedSemaphorePermit,
}

/// Streams the users matching `spec` from one REPEATABLE READ snapshot, in id order, into
/// `out` a chunk at a time. The first chunk is empty and sent once the snapshot is open;
/// the outcome (an error that prevented or ended the export) goes to `out.end` when it
/// stops, after its connection is back in the pool. The USERS_EXPORTED event (`data` says
/// what was asked) commits before any row leaves. Stops early when the client goes away, and
/// ends with EXPORT_STALLED when it takes nothing for `out.stall`; memory stays at a chunk or
/// two however many users there are.
pub async fn export_users(
    pool: Pool,
    caller: Caller,
    spec: bulk_store::ExportSpec,
    sealer: Option<std::sync::Arc<crate::crypto::seal::Sealer>>,
    data: Value,
    out: ExportOut,
) {
    let ExportOut {
        chunks,
        end,
        stall,
        slot,
    } = out;
    let deliver = |chunk: Vec<Exported>| deliver(&chunks, chunk, stall);
    let run = async {
        let mut client = db::client(&pool).await?;
        let tx = client.transaction().await?;
        events::record(
            &tx,
            caller.project_id,
            &EventContext::from_caller(&caller),
            &[NewEvent {
                kind: EventType::UsersExported,
                user_id: None,
                data,
            }],
        )
        .await?;
        tx.commit().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let portal = bulk_store::open_export(&tx, caller.project_id, &spec).await?;
        if !deliver(Vec::new()).await? {
            return Ok(());
        }
        loop {
            let rows = tx.query_portal(&portal, bulk_store::EXPORT_CHUNK).await?;
            let last = rows.len() < bulk_store::EXPORT_CHUNK as usize;
            let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
            let mut identities = if spec.with_identities && !rows.is_empty() {
                bulk_store::identities_of(&tx, caller.project_id, &ids).await?
            } else {
                Default::default()
            };
            let mut factors = if spec.with_factors && !rows.is_empty() {
                let stored = bulk_store::factors_of(&tx, caller.project_id, &ids).await?;
                open_seeds(stored, caller.project_id, sealer.as_deref())?
            } else {
                Default::default()
            };
            let chunk: Vec<Exported> = rows
                .iter()
                .map(|r| {
                    let user = store::user_from_row(r);
                    Exported {
                        identities: identities.remove(&user.id).unwrap_or_default(),
                        factors: factors.remove(&user.id).unwrap_or_default(),
                        password_hash: r.get(store::USER_COLUMN_COUNT),
                        user,
                    }
                })
                .collect();
            if !chunk.is_empty() && !deliver(chunk).await? {
                return Ok(());
            }
            if last {
                break;
            }
        }
        tx.commit().await?;
        Ok::<(), Error>(())
    };
    // The connection went back to the pool as `run` ended; the slot goes now.
    let outcome = run.await;
    drop(slot);
    let _ = end.send(outcome);
}

/// The exported factors with their TOTP seeds opened (each bound to its project and id), for
/// the export's client to seal again wherever it imports them.
fn open_seeds(
    stored: std::collections::HashMap<Uuid, Vec<(Uuid, super::import::CarriedFactor)>>,
    project_id: Uuid,
    sealer: Option<&crate::crypto::seal::Sealer>,
) -> Result<std::collections::HashMap<Uuid, Vec<super::import::CarriedFactor>>> {
    let mut out = std::collections::HashMap::with_capacity(stored.len());
    for (user, factors) in stored {
        let mut opened = Vec::with_capacity(factors.len());
        for (id, mut f) in factors {
            if let Some(sealed) = f.totp_secret.take() {
                let sealer = sealer.ok_or_else(|| Error::FailedPrecondition {
                    reason: Reason::EncryptionNotConfigured,
                    message: "TOTP seeds need ROSTER_ENCRYPTION_KEYS to be configured".into(),
                })?;
                let context = crate::authenticators::totp::seal_context(project_id, id);
                let seed = sealer.open(&sealed, &context).map_err(|e| {
                    tracing::warn!(error = %e, authenticator = %id, "TOTP seed cannot be opened");
                    Error::FailedPrecondition {
                        reason: Reason::SecretUnreadable,
                        message: "a stored TOTP seed cannot be decrypted with the configured keys"
                            .into(),
                    }
                })?;
                f.totp_secret = Some(seed);
            }
            opened.push(f);
        }
        out.insert(user, opened);
    }
    Ok(out)
}

/// Hands `chunk` to the client's stream: false when the client went away; EXPORT_STALLED
/// when it took nothing for `stall`.
async fn deliver(
    chunks: &tokio::sync::mpsc::Sender<Vec<Exported>>,
    chunk: Vec<Exported>,
    stall: Option<std::time::Duration>,
) -> Result<bool> {
    let sent = match stall {
        None => chunks.send(chunk).await,
        Some(limit) => tokio::time::timeout(limit, chunks.send(chunk))
            .await
            .map_err(|_| Error::Aborted {
                reason: Reason::ExportStalled,
                message: format!(
                    "the export was ended: its client took nothing for {} s while it held a \
                     database snapshot (--export-stall-secs); export again, reading as it comes",
                    limit.as_secs()
                ),
            })?,
    };
    Ok(sent.is_ok())
}
