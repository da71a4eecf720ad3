//! Identity operations, each in one transaction with its events. The user rows involved are
//! locked first (in id order when there are two), so links, unlinks and merges of the same
//! users run one after another and a merge never interleaves with an update.
use serde_json::{Value, json};
use uuid::Uuid;

use super::store::{self, SealedTokens};
use super::{Identity, NewIdentity, Tokens};
use crate::auth::Caller;
use crate::authenticators::store as credentials;
use crate::crypto::seal::Sealer;
use crate::db::{self, Pool};
use crate::error::{Error, Reason, Result, Violations};
use crate::events::{EventContext, EventType, NewEvent, store as events};
use crate::users::reads::UserReads;
use crate::users::{self, NewUser, Profile, User};

const USER: &str = "user";
const IDENTITY: &str = "identity";

fn user_not_found(id: Uuid) -> Error {
    Error::not_found(USER, id.to_string())
}

fn identity_not_found(provider: &str, subject: &str) -> Error {
    Error::not_found(IDENTITY, format!("{provider}|{subject}"))
}

/// What a sealed token is bound to: its project, identity and column.
pub(crate) fn token_context(project_id: Uuid, identity_id: Uuid, column: &str) -> Vec<u8> {
    format!("roster/identities/{project_id}/{identity_id}/{column}").into_bytes()
}

fn seal_tokens(
    sealer: Option<&Sealer>,
    project_id: Uuid,
    identity_id: Uuid,
    tokens: &Tokens,
) -> Result<SealedTokens> {
    let needs_key = tokens.access.is_some() || tokens.refresh.is_some();
    let sealer = match sealer {
        Some(s) => s,
        None if needs_key => {
            return Err(Error::FailedPrecondition {
                reason: Reason::EncryptionNotConfigured,
                message: "provider tokens need ROSTER_ENCRYPTION_KEYS to be configured".into(),
            });
        }
        None => {
            return Ok(SealedTokens {
                access: None,
                refresh: None,
                expires_at: tokens.expires_at,
            });
        }
    };
    let seal = |v: &Option<String>, column: &str| -> Result<Option<Vec<u8>>> {
        v.as_ref()
            .map(|t| {
                sealer
                    .seal(
                        t.as_bytes(),
                        &token_context(project_id, identity_id, column),
                    )
                    .map_err(Error::internal)
            })
            .transpose()
    };
    Ok(SealedTokens {
        access: seal(&tokens.access, "access_token")?,
        refresh: seal(&tokens.refresh, "refresh_token")?,
        expires_at: tokens.expires_at,
    })
}

fn identity_data(i: &Identity) -> Value {
    json!({ "identity_id": i.id, "provider": i.provider, "subject": i.subject,
            "connection": i.connection })
}

async fn lock_user(
    tx: &deadpool_postgres::Transaction<'_>,
    caller: &Caller,
    id: Uuid,
) -> Result<User> {
    users::store::get_for_update(tx, caller.project_id, id)
        .await?
        .ok_or_else(|| user_not_found(id))
}

/// Links (provider, subject) to a user, or refreshes it when it is already that user's.
pub async fn link(
    pool: &Pool,
    sealer: Option<&Sealer>,
    caller: &Caller,
    user_id: Uuid,
    new: NewIdentity,
) -> Result<Identity> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    lock_user(&tx, caller, user_id).await?;
    let id = Uuid::now_v7();
    let sealed = match &new.tokens {
        Some(t) => Some(seal_tokens(sealer, caller.project_id, id, t)?),
        None => None,
    };
    let ctx = EventContext::from_caller(caller);
    if let Some(identity) =
        store::insert(&tx, caller.project_id, id, user_id, &new, sealed.as_ref()).await?
    {
        let ev = NewEvent::for_user(EventType::IdentityLinked, user_id, identity_data(&identity));
        events::record(&tx, caller.project_id, &ctx, &[ev]).await?;
        tx.commit().await?;
        return Ok(identity);
    }
    let existing = store::find(&tx, caller.project_id, &new.provider, &new.subject, true)
        .await?
        .ok_or_else(|| Error::internal(anyhow::anyhow!("identity vanished after a conflict")))?;
    if existing.user_id != user_id {
        return Err(Error::AlreadyExists {
            resource: IDENTITY,
            field: "provider_subject",
            owner: Some(existing.user_id.to_string()),
        });
    }
    // Linked again (e.g. at each social sign-in): refresh details; tokens were sealed for
    // the new id, so seal again for the existing one.
    let sealed = match &new.tokens {
        Some(t) => Some(seal_tokens(sealer, caller.project_id, existing.id, t)?),
        None => None,
    };
    let identity =
        store::refresh(&tx, caller.project_id, existing.id, &new, sealed.as_ref()).await?;
    let mut data = identity_data(&identity);
    data["relinked"] = Value::Bool(true);
    let ev = NewEvent::for_user(EventType::IdentityLinked, user_id, data);
    events::record(&tx, caller.project_id, &ctx, &[ev]).await?;
    tx.commit().await?;
    Ok(identity)
}

/// A profile for a user made from an identity (OIDC standard claims), keeping only values
/// that pass the user rules.
fn standalone_profile(i: &Identity, email_free: bool) -> Profile {
    let claim = |k: &str, max: usize| {
        i.profile
            .get(k)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| {
                !s.is_empty() && s.chars().count() <= max && !s.chars().any(char::is_control)
            })
            .map(str::to_string)
    };
    let email = i.email.clone().filter(|_| email_free);
    let mut p = Profile {
        email_verified: email.is_some()
            && i.profile.get("email_verified").and_then(Value::as_bool) == Some(true),
        email,
        display_name: claim("name", users::MAX_NAME),
        given_name: claim("given_name", users::MAX_NAME),
        family_name: claim("family_name", users::MAX_NAME),
        picture_url: claim("picture", users::MAX_PICTURE_URL),
        ..Default::default()
    };
    // Auth0's convention: a user that came from an identity is known as provider|subject.
    p.external_id = Some(format!("{}|{}", i.provider, i.subject))
        .filter(|x| x.chars().count() <= users::MAX_EXTERNAL_ID);
    let mut v = Violations::new();
    users::validate_profile(&p, "user", &mut v);
    if !v.is_empty() {
        // Drop what the rules refuse rather than failing the unlink.
        p.picture_url = None;
        p.display_name = None;
        p.given_name = None;
        p.family_name = None;
    }
    p
}

/// Unlinks (provider, subject) from a user; with `standalone`, moves it to a new user made
/// from its profile and returns that user.
pub async fn unlink(
    pool: &Pool,
    caller: &Caller,
    user_id: Uuid,
    provider: &str,
    subject: &str,
    standalone: bool,
) -> Result<Option<User>> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    lock_user(&tx, caller, user_id).await?;
    let identity = store::find(&tx, caller.project_id, provider, subject, true)
        .await?
        .filter(|i| i.user_id == user_id)
        .ok_or_else(|| identity_not_found(provider, subject))?;
    let ctx = EventContext::from_caller(caller);
    let mut data = identity_data(&identity);
    if !standalone {
        store::delete(&tx, caller.project_id, identity.id).await?;
        let ev = NewEvent::for_user(EventType::IdentityUnlinked, user_id, data);
        events::record(&tx, caller.project_id, &ctx, &[ev]).await?;
        tx.commit().await?;
        return Ok(None);
    }
    let email_free = match &identity.email {
        Some(e) => {
            users::store::lookup(&tx, caller.project_id, &users::LookupKey::Email(e.clone()))
                .await?
                .is_none()
        }
        None => false,
    };
    let new = NewUser {
        id: Uuid::now_v7(),
        profile: standalone_profile(&identity, email_free),
        pending: false,
        password: None,
        created_at: None,
    };
    let user = users::store::insert(&tx, caller.project_id, &new, None).await?;
    store::move_one(&tx, caller.project_id, identity.id, user.id).await?;
    data["standalone_user_id"] = json!(user.id);
    let evs = [
        NewEvent::for_user(EventType::IdentityUnlinked, user_id, data),
        NewEvent::for_user(
            EventType::UserCreated,
            user.id,
            json!({ "source": "UnlinkIdentity", "from_user_id": user_id }),
        ),
        NewEvent::for_user(EventType::IdentityLinked, user.id, identity_data(&identity)),
    ];
    events::record(&tx, caller.project_id, &ctx, &evs).await?;
    tx.commit().await?;
    Ok(Some(user))
}

pub async fn list(pool: &Pool, caller: &Caller, user_id: Uuid) -> Result<Vec<Identity>> {
    let client = db::client(pool).await?;
    if users::store::get(&*client, caller.project_id, user_id)
        .await?
        .is_none()
    {
        return Err(user_not_found(user_id));
    }
    store::list_of_user(&*client, caller.project_id, user_id).await
}

/// The social-login lookup: read with GetUser's and LookupUser's (coalesced when busy).
pub async fn lookup(
    reads: &UserReads,
    caller: &Caller,
    provider: &str,
    subject: &str,
) -> Result<(User, Identity)> {
    reads
        .lookup_by_identity(caller.project_id, provider, subject)
        .await?
        .ok_or_else(|| identity_not_found(provider, subject))
}

/// Merges `secondary` into `primary`: its identities and authenticators move, the primary
/// keeps its profile (and takes the secondary's password only if it has none), the
/// secondary is deleted.
/// The secondary's past events stay in the log.
pub async fn merge(pool: &Pool, caller: &Caller, primary: Uuid, secondary: Uuid) -> Result<User> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let p = caller.project_id;
    // Lock in id order so two merges of the same pair cannot deadlock.
    let (first, second) = if primary < secondary {
        (primary, secondary)
    } else {
        (secondary, primary)
    };
    let a = credentials::credentials_for_update(&tx, p, first).await?;
    let b = credentials::credentials_for_update(&tx, p, second).await?;
    let (prim, sec) = if first == primary { (a, b) } else { (b, a) };
    let prim = prim.ok_or_else(|| user_not_found(primary))?;
    let sec = sec.ok_or_else(|| user_not_found(secondary))?;

    let moved = store::move_all(&tx, p, secondary, primary).await?;
    // Second factors and passkeys move too; where both have recovery codes or the same OTP
    // channel, the primary keeps its own.
    let factors_moved = credentials::move_authenticators(&tx, p, secondary, primary).await?;
    let password_moved = prim.hash.is_none() && sec.hash.is_some();
    if password_moved {
        credentials::set_password(
            &tx,
            p,
            primary,
            sec.hash.as_deref(),
            sec.user.require_password_change,
        )
        .await?;
    }
    // A plain delete: identities moved above; the secondary's events stay as history.
    tx.execute(
        "DELETE FROM users WHERE project_id = $1 AND id = $2",
        &[&p, &secondary],
    )
    .await?;
    let ev = NewEvent::for_user(
        EventType::UsersMerged,
        primary,
        json!({ "secondary_user_id": secondary, "identities_moved": moved,
                "authenticators_moved": factors_moved, "password_moved": password_moved }),
    );
    events::record(&tx, p, &EventContext::from_caller(caller), &[ev]).await?;
    let user = users::store::get(&tx, p, primary)
        .await?
        .ok_or_else(|| user_not_found(primary))?;
    tx.commit().await?;
    Ok(user)
}

/// The decrypted tokens of one of a user's identities. Handing them out is recorded as
/// PROVIDER_TOKENS_READ in the same transaction (they act as the user at the provider, so a
/// security review asks who read them), and no token leaves unless that event committed.
pub async fn provider_tokens(
    pool: &Pool,
    sealer: Option<&Sealer>,
    caller: &Caller,
    user_id: Uuid,
    provider: &str,
    subject: &str,
) -> Result<Tokens> {
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let (id, sealed) = store::tokens(&tx, caller.project_id, user_id, provider, subject)
        .await?
        .ok_or_else(|| identity_not_found(provider, subject))?;
    let open = |v: &Option<Vec<u8>>, column: &str| -> Result<Option<String>> {
        let Some(bytes) = v else { return Ok(None) };
        let sealer = sealer.ok_or_else(|| Error::FailedPrecondition {
            reason: Reason::EncryptionNotConfigured,
            message: "provider tokens need ROSTER_ENCRYPTION_KEYS to be configured".into(),
        })?;
        let plain = sealer
            .open(bytes, &token_context(caller.project_id, id, column))
            .map_err(|e| {
                // The message names the key id only, never key or token material.
                tracing::warn!(error = %e, identity = %id, "provider token cannot be opened");
                Error::FailedPrecondition {
                    reason: Reason::TokensUnreadable,
                    message: "the stored tokens cannot be decrypted with the configured keys"
                        .into(),
                }
            })?;
        String::from_utf8(plain)
            .map(Some)
            .map_err(|_| Error::internal(anyhow::anyhow!("stored token is not UTF-8")))
    };
    let tokens = Tokens {
        access: open(&sealed.access, "access_token")?,
        refresh: open(&sealed.refresh, "refresh_token")?,
        expires_at: sealed.expires_at,
    };
    // Which tokens were handed out, never their values.
    let data = json!({ "identity_id": id, "provider": provider, "subject": subject,
                       "access_token": tokens.access.is_some(),
                       "refresh_token": tokens.refresh.is_some() });
    let ev = NewEvent::for_user(EventType::ProviderTokensRead, user_id, data);
    events::record(
        &tx,
        caller.project_id,
        &EventContext::from_caller(caller),
        &[ev],
    )
    .await?;
    tx.commit().await?;
    Ok(tokens)
}
