//! The SQL of users. Every statement is scoped by `project_id`; callers pass the transaction
//! (or client) to run on, so a change and its event commit together.
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use serde_json::Value;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{LookupKey, NewUser, Profile, User, UserStatus};
use crate::error::{Error, Result};
use crate::events::{EventContext, NewEvent};
use crate::query::filter::Expr;
use crate::query::page::{Cursor, Order, OrderField, SortKind};
use crate::query::sql::{self, Field, FieldKind, Sql};

/// The columns every user query returns, in the order [`user_from_row`] reads them.
pub const USER_COLUMNS: &str = "id, external_id, email, email_verified, phone_number, \
    phone_verified, username, display_name, given_name, family_name, picture_url, locale, \
    timezone, status, user_metadata, app_metadata, password_hash IS NOT NULL AS has_password, \
    password_changed_at, require_password_change, login_count, last_login_at, last_login_ip, \
    locked_until, blocked_reason, created_at, updated_at, version, factor_types, default_factor";
// factor_types and default_factor mirror the user's authenticators (kept by a trigger,
// migrations 6 and 7), so a user read is one index probe.
pub const USER_COLUMN_COUNT: usize = 29;

fn object(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

pub fn user_from_row(r: &Row) -> User {
    User {
        id: r.get(0),
        profile: Profile {
            external_id: r.get(1),
            email: r.get(2),
            email_verified: r.get(3),
            phone_number: r.get(4),
            phone_verified: r.get(5),
            username: r.get(6),
            display_name: r.get(7),
            given_name: r.get(8),
            family_name: r.get(9),
            picture_url: r.get(10),
            locale: r.get(11),
            timezone: r.get(12),
            user_metadata: object(r.get(14)),
            app_metadata: object(r.get(15)),
        },
        status: UserStatus::from_i16(r.get(13)),
        has_password: r.get(16),
        password_changed_at: r.get(17),
        require_password_change: r.get(18),
        login_count: r.get(19),
        last_login_at: r.get(20),
        last_login_ip: r.get(21),
        locked_until: r.get(22),
        blocked_reason: r.get(23),
        created_at: r.get(24),
        updated_at: r.get(25),
        version: r.get(26),
        factor_types: r.get(27),
        default_factor: r.get(28),
    }
}

/// Inserts a user with an already-hashed (or imported) password hash.
pub async fn insert(
    db: &impl GenericClient,
    project_id: Uuid,
    user: &NewUser,
    password_hash: Option<&str>,
) -> Result<User> {
    insert_user(db, project_id, user, password_hash, None).await
}

/// The user already holding the unique `field` (ALREADY_EXISTS's `field`) of `profile` in the
/// project, for the error's ResourceInfo: the caller learns whose it is (its own earlier
/// create, retried, or another user's), as an import's results tell. Asked only once a
/// write has clashed.
async fn holder_of(
    db: &impl GenericClient,
    project_id: Uuid,
    field: &str,
    profile: &Profile,
) -> Result<Option<Uuid>> {
    // The unique indexes' own expressions, so each lookup is an index probe.
    let (condition, value) = match field {
        "email" => ("lower(email) = lower($2)", &profile.email),
        "phone_number" => ("phone_number = $2", &profile.phone_number),
        "username" => ("lower(username) = lower($2)", &profile.username),
        "external_id" => ("external_id = $2", &profile.external_id),
        _ => return Ok(None),
    };
    let Some(value) = value else {
        return Ok(None);
    };
    let sql = format!("SELECT id FROM users WHERE project_id = $1 AND {condition}");
    let row = db.query_opt(sql.as_str(), &[&project_id, value]).await?;
    Ok(row.map(|r| r.get(0)))
}

/// `e` naming the user that holds the clashing value when it is a user's ALREADY_EXISTS
/// that does not say (the unique index's error cannot): for an id, `id` itself (a create
/// retried with a client-chosen id meets its own first try), else [`holder_of`]'s lookup.
/// Any other error, or a lookup that fails, leaves `e` as it is.
pub async fn name_holder(
    db: &impl GenericClient,
    project_id: Uuid,
    e: Error,
    profile: &Profile,
    id: Uuid,
) -> Error {
    let Error::AlreadyExists {
        resource: "user",
        field,
        owner: None,
    } = e
    else {
        return e;
    };
    let owner = match field {
        "id" => Some(id),
        _ => holder_of(db, project_id, field, profile)
            .await
            .ok()
            .flatten(),
    };
    Error::AlreadyExists {
        resource: "user",
        field,
        owner: owner.map(|o| o.to_string()),
    }
}

/// Inserts `user` and, in the same statement, its USER_CREATED-style `event` (one round trip,
/// atomic without a transaction: the event row exists exactly when the user row does).
pub async fn insert_with_event(
    db: &impl GenericClient,
    project_id: Uuid,
    user: &NewUser,
    password_hash: Option<&str>,
    ctx: &EventContext,
    event: &NewEvent,
) -> Result<User> {
    let user = insert_user(db, project_id, user, password_hash, Some((ctx, event))).await?;
    crate::events::stream::written();
    Ok(user)
}

const USER_INSERT_COLUMNS: &str = "project_id, id, external_id, email, email_verified,
        phone_number, phone_verified, username, display_name, given_name, family_name,
        picture_url, locale, timezone, status, user_metadata, app_metadata, password_hash,
        password_changed_at, created_at, updated_at";
const EVENT_INSERT_COLUMNS: &str =
    "project_id, id, type, user_id, api_key_id, ip, user_agent, request_id, data";

/// What a user's INSERT binds besides the `NewUser`'s own fields.
struct Derived {
    status: i16,
    user_metadata: Value,
    app_metadata: Value,
    event_id: Uuid,
}

impl Derived {
    fn of(user: &NewUser) -> Self {
        Derived {
            status: UserStatus::initial(user.pending) as i16,
            user_metadata: Value::Object(user.profile.user_metadata.clone()),
            app_metadata: Value::Object(user.profile.app_metadata.clone()),
            event_id: Uuid::now_v7(),
        }
    }
}

/// A user's INSERT parameters in `USER_INSERT_COLUMNS` order, project_id to password_hash,
/// then created_at (19; password_changed_at and updated_at are worked out by the statement).
fn user_params<'a>(
    project_id: &'a Uuid,
    user: &'a NewUser,
    password_hash: &'a Option<&'a str>,
    d: &'a Derived,
) -> Vec<&'a (dyn ToSql + Sync)> {
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(USER_PARAMS + EVENT_PARAMS);
    params.extend_from_slice(&[project_id, &user.id]);
    params.extend(profile_columns(&user.profile));
    params.extend_from_slice(&[
        &d.status,
        &d.user_metadata,
        &d.app_metadata,
        password_hash,
        &user.created_at,
    ]);
    params
}
const USER_PARAMS: usize = 19;

/// The event's parameters after a user's: id, type, api_key_id, ip, user_agent, request_id,
/// data (its project and user are the user's).
fn event_params<'a>(
    event_id: &'a Uuid,
    kind: &'a &'static str,
    ctx: &'a EventContext,
    event: &'a NewEvent,
) -> [&'a (dyn ToSql + Sync); EVENT_PARAMS] {
    [
        event_id,
        kind,
        &ctx.api_key_id,
        &ctx.ip,
        &ctx.user_agent,
        &ctx.request_id,
        &event.data,
    ]
}
const EVENT_PARAMS: usize = 7;

async fn insert_user(
    db: &impl GenericClient,
    project_id: Uuid,
    user: &NewUser,
    password_hash: Option<&str>,
    event: Option<(&EventContext, &NewEvent)>,
) -> Result<User> {
    const VALUES: &str = "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
        $17, $18, CASE WHEN $18::text IS NULL THEN NULL ELSE now() END, coalesce($19, now()),
        now()";
    let insert = format!("INSERT INTO users ({USER_INSERT_COLUMNS}) VALUES ({VALUES})");
    let sql = match event {
        None => format!("{insert} RETURNING {USER_COLUMNS}"),
        Some(_) => format!(
            "WITH u AS ({insert} RETURNING {USER_COLUMNS}),
             e AS (INSERT INTO events ({EVENT_INSERT_COLUMNS})
                   SELECT $1, $20, $21, u.id, $22, $23, $24, $25, $26 FROM u)
             SELECT * FROM u"
        ),
    };
    let stmt = db.prepare_cached(&sql).await?;
    let derived = Derived::of(user);
    let mut params = user_params(&project_id, user, &password_hash, &derived);
    let kind = event.map(|(_, e)| e.kind.as_str());
    if let (Some((ctx, e)), Some(kind)) = (event, kind.as_ref()) {
        params.extend(event_params(&derived.event_id, kind, ctx, e));
    }
    let row = db.query_one(&stmt, &params).await?;
    Ok(user_from_row(&row))
}

/// One user to create with its event, for [`insert_many_with_events`].
pub struct Creation<'a> {
    pub project_id: Uuid,
    pub user: &'a NewUser,
    pub password_hash: Option<&'a str>,
    pub ctx: &'a EventContext,
    pub event: &'a NewEvent,
}

/// Inserts the users of `batch` that take no unique value already taken (by a stored user
/// or one earlier in the batch), each with its event, in one statement (one commit); returns
/// the users written with their project. A user not written is simply absent: writing it on
/// its own tells why. The batch must not repeat a (project, id).
///
/// The rows travel as one array per column: one statement text whatever the batch's size
/// (a VALUES list per size would prepare up to a megabyte of plan per size and connection).
/// `ON CONFLICT DO NOTHING` skips a row taking a taken unique value, waiting, as a plain
/// INSERT does, for a concurrent writer of the same value to finish.
pub async fn insert_many_with_events(
    db: &impl GenericClient,
    batch: &[Creation<'_>],
) -> Result<Vec<(Uuid, User)>> {
    let stmt = db
        .prepare_cached(&format!(
            "WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[],
                     $5::bool[], $6::text[], $7::bool[], $8::text[], $9::text[], $10::text[],
                     $11::text[], $12::text[], $13::text[], $14::text[], $15::int2[],
                     $16::jsonb[], $17::jsonb[], $18::text[], $19::timestamptz[],
                     $20::uuid[], $21::text[], $22::uuid[], $23::text[], $24::text[],
                     $25::text[], $26::jsonb[])
                 AS t (project_id, id, external_id, email, email_verified, phone_number,
                     phone_verified, username, display_name, given_name, family_name,
                     picture_url, locale, timezone, status, user_metadata, app_metadata,
                     password_hash, created_at, event_id, event_type, api_key_id, ip,
                     user_agent, request_id, data)),
             u AS (INSERT INTO users ({USER_INSERT_COLUMNS})
                   SELECT project_id, id, external_id, email, email_verified, phone_number,
                          phone_verified, username, display_name, given_name, family_name,
                          picture_url, locale, timezone, status, user_metadata, app_metadata,
                          password_hash,
                          CASE WHEN password_hash IS NULL THEN NULL ELSE now() END,
                          coalesce(created_at, now()), now()
                   FROM input
                   ON CONFLICT DO NOTHING
                   RETURNING {USER_COLUMNS}, project_id),
             e AS (INSERT INTO events ({EVENT_INSERT_COLUMNS})
                   SELECT i.project_id, i.event_id, i.event_type, u.id, i.api_key_id, i.ip,
                          i.user_agent, i.request_id, i.data
                   FROM u JOIN input i ON i.project_id = u.project_id AND i.id = u.id)
             SELECT * FROM u"
        ))
        .await?;
    fn text<'a>(
        batch: &'a [Creation<'a>],
        f: impl Fn(&'a Creation<'a>) -> Option<&'a str>,
    ) -> Vec<Option<&'a str>> {
        batch.iter().map(f).collect()
    }
    let flag = |f: fn(&Profile) -> bool| batch.iter().map(|c| f(&c.user.profile)).collect();
    let derived: Vec<Derived> = batch.iter().map(|c| Derived::of(c.user)).collect();
    let project_ids: Vec<Uuid> = batch.iter().map(|c| c.project_id).collect();
    let ids: Vec<Uuid> = batch.iter().map(|c| c.user.id).collect();
    let external_ids = text(batch, |c| c.user.profile.external_id.as_deref());
    let emails = text(batch, |c| c.user.profile.email.as_deref());
    let email_verified: Vec<bool> = flag(|p| p.email_verified);
    let phone_numbers = text(batch, |c| c.user.profile.phone_number.as_deref());
    let phone_verified: Vec<bool> = flag(|p| p.phone_verified);
    let usernames = text(batch, |c| c.user.profile.username.as_deref());
    let display_names = text(batch, |c| c.user.profile.display_name.as_deref());
    let given_names = text(batch, |c| c.user.profile.given_name.as_deref());
    let family_names = text(batch, |c| c.user.profile.family_name.as_deref());
    let picture_urls = text(batch, |c| c.user.profile.picture_url.as_deref());
    let locales = text(batch, |c| c.user.profile.locale.as_deref());
    let timezones = text(batch, |c| c.user.profile.timezone.as_deref());
    let statuses: Vec<i16> = derived.iter().map(|d| d.status).collect();
    let user_metadata: Vec<&Value> = derived.iter().map(|d| &d.user_metadata).collect();
    let app_metadata: Vec<&Value> = derived.iter().map(|d| &d.app_metadata).collect();
    let hashes = text(batch, |c| c.password_hash);
    let created_at: Vec<Option<DateTime<Utc>>> = batch.iter().map(|c| c.user.created_at).collect();
    let event_ids: Vec<Uuid> = derived.iter().map(|d| d.event_id).collect();
    let kinds = text(batch, |c| Some(c.event.kind.as_str()));
    let api_key_ids: Vec<Uuid> = batch.iter().map(|c| c.ctx.api_key_id).collect();
    let ips = text(batch, |c| c.ctx.ip.as_deref());
    let user_agents = text(batch, |c| c.ctx.user_agent.as_deref());
    let request_ids = text(batch, |c| Some(c.ctx.request_id.as_str()));
    let data: Vec<&Value> = batch.iter().map(|c| &c.event.data).collect();
    let rows = db
        .query(
            &stmt,
            &[
                &project_ids,
                &ids,
                &external_ids,
                &emails,
                &email_verified,
                &phone_numbers,
                &phone_verified,
                &usernames,
                &display_names,
                &given_names,
                &family_names,
                &picture_urls,
                &locales,
                &timezones,
                &statuses,
                &user_metadata,
                &app_metadata,
                &hashes,
                &created_at,
                &event_ids,
                &kinds,
                &api_key_ids,
                &ips,
                &user_agents,
                &request_ids,
                &data,
            ],
        )
        .await?;
    if !rows.is_empty() {
        crate::events::stream::written();
    }
    Ok(rows
        .iter()
        .map(|r| (r.get(USER_COLUMN_COUNT), user_from_row(r)))
        .collect())
}

pub async fn get(db: &impl GenericClient, project_id: Uuid, id: Uuid) -> Result<Option<User>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE project_id = $1 AND id = $2"
        ))
        .await?;
    Ok(db
        .query_opt(&stmt, &[&project_id, &id])
        .await?
        .as_ref()
        .map(user_from_row))
}

/// The users of `project_id` among `ids` (any order; unknown ids are simply absent): one
/// index probe per id in one statement, for coalesced GetUser calls.
pub async fn get_many(
    db: &impl GenericClient,
    project_id: Uuid,
    ids: &[Uuid],
) -> Result<Vec<User>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE project_id = $1 AND id = ANY($2)"
        ))
        .await?;
    Ok(db
        .query(&stmt, &[&project_id, &ids])
        .await?
        .iter()
        .map(user_from_row)
        .collect())
}

/// The profile's scalar columns in the order every users statement lists them, external_id
/// to timezone (parameters $3..$14 of the INSERT and the profile UPDATE, and the staging
/// COPY of an import).
pub(crate) fn profile_columns(p: &Profile) -> [&(dyn ToSql + Sync); 12] {
    [
        &p.external_id,
        &p.email,
        &p.email_verified,
        &p.phone_number,
        &p.phone_verified,
        &p.username,
        &p.display_name,
        &p.given_name,
        &p.family_name,
        &p.picture_url,
        &p.locale,
        &p.timezone,
    ]
}

/// Reads a user and locks its row until the transaction ends.
pub async fn get_for_update(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
) -> Result<Option<User>> {
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE project_id = $1 AND id = $2 FOR UPDATE"
        ))
        .await?;
    Ok(tx
        .query_opt(&stmt, &[&project_id, &id])
        .await?
        .as_ref()
        .map(user_from_row))
}

/// The WHERE condition (on `$2`) and value finding a user by `key`; each form matches its
/// unique index exactly.
pub fn lookup_condition(key: &LookupKey) -> (&'static str, &String) {
    match key {
        LookupKey::Email(e) => ("lower(email) = lower($2)", e),
        LookupKey::PhoneNumber(p) => ("phone_number = $2", p),
        LookupKey::Username(u) => ("lower(username) = lower($2)", u),
        LookupKey::ExternalId(x) => ("external_id = $2", x),
    }
}

/// The users found by `keys`, all of one kind (that of the first), in one statement: each
/// with the position in `keys` of the key that found it. One index probe per key whatever
/// the plan's guess at the array's length (a `LATERAL` lookup cannot become a scan).
pub async fn lookup_many(
    db: &impl GenericClient,
    project_id: Uuid,
    keys: &[&LookupKey],
) -> Result<Vec<(usize, User)>> {
    let Some(first) = keys.first() else {
        return Ok(Vec::new());
    };
    let cond = lookup_condition(first).0.replace("$2", "k.v");
    let stmt = db
        .prepare_cached(&format!(
            "SELECT u.*, k.i FROM unnest($2::text[]) WITH ORDINALITY AS k(v, i)
             CROSS JOIN LATERAL (
                 SELECT {USER_COLUMNS} FROM users WHERE project_id = $1 AND {cond}) u"
        ))
        .await?;
    let values: Vec<&str> = keys
        .iter()
        .map(|k| lookup_condition(k).1.as_str())
        .collect();
    Ok(db
        .query(&stmt, &[&project_id, &values])
        .await?
        .iter()
        // Ordinals count from 1.
        .map(|r| {
            (
                (r.get::<_, i64>(USER_COLUMN_COUNT) - 1) as usize,
                user_from_row(r),
            )
        })
        .collect())
}

pub async fn lookup(
    db: &impl GenericClient,
    project_id: Uuid,
    key: &LookupKey,
) -> Result<Option<User>> {
    let (cond, value) = lookup_condition(key);
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE project_id = $1 AND {cond}"
        ))
        .await?;
    Ok(db
        .query_opt(&stmt, &[&project_id, value])
        .await?
        .as_ref()
        .map(user_from_row))
}

/// Writes every profile field of user `read` if it is still the version read (the same
/// version and update time, as its etag: a user deleted and created again under the same id
/// meanwhile is another user), bumping the version, and records `event` in the same
/// statement; `None` when the user changed or went since it was read (nothing is written).
pub async fn save_profile(
    db: &impl GenericClient,
    project_id: Uuid,
    read: &User,
    p: &Profile,
    ctx: &EventContext,
    event: &NewEvent,
) -> Result<Option<User>> {
    let stmt = db
        .prepare_cached(&format!(
            "WITH u AS (
                 UPDATE users SET external_id = $3, email = $4, email_verified = $5,
                     phone_number = $6, phone_verified = $7, username = $8, display_name = $9,
                     given_name = $10, family_name = $11, picture_url = $12, locale = $13,
                     timezone = $14, user_metadata = $15, app_metadata = $16,
                     version = version + 1, updated_at = now()
                 WHERE project_id = $1 AND id = $2 AND version = $17 AND updated_at = $18
                 RETURNING {USER_COLUMNS}),
             e AS (INSERT INTO events ({EVENT_INSERT_COLUMNS})
                   SELECT $1, $19, $20, u.id, $21, $22, $23, $24, $25 FROM u)
             SELECT * FROM u"
        ))
        .await?;
    let (user_metadata, app_metadata) = (
        Value::Object(p.user_metadata.clone()),
        Value::Object(p.app_metadata.clone()),
    );
    let (event_id, kind) = (Uuid::now_v7(), event.kind.as_str());
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&project_id, &read.id];
    params.extend(profile_columns(p));
    params.extend_from_slice(&[
        &user_metadata,
        &app_metadata,
        &read.version,
        &read.updated_at,
    ]);
    params.extend(event_params(&event_id, &kind, ctx, event));
    let Some(row) = db.query_opt(&stmt, &params).await? else {
        return Ok(None);
    };
    crate::events::stream::written();
    Ok(Some(user_from_row(&row)))
}

/// Sets the status (and blocked reason); `clear_lock` also resets brute-force counting.
pub async fn set_status(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
    status: UserStatus,
    blocked_reason: Option<&str>,
    clear_lock: bool,
) -> Result<User> {
    let stmt = tx
        .prepare_cached(&format!(
            "UPDATE users SET status = $3, blocked_reason = $4,
                failed_logins = CASE WHEN $5 THEN 0 ELSE failed_logins END,
                locked_until = CASE WHEN $5 THEN NULL ELSE locked_until END,
                version = version + 1, updated_at = now()
             WHERE project_id = $1 AND id = $2
             RETURNING {USER_COLUMNS}"
        ))
        .await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &project_id,
                &id,
                &(status as i16),
                &blocked_reason,
                &clear_lock,
            ],
        )
        .await?;
    Ok(user_from_row(&row))
}

/// Deletes users with their events (authenticators, identities and verifications go by
/// foreign-key cascade); returns the ids that existed.
pub async fn delete(tx: &Transaction<'_>, project_id: Uuid, ids: &[Uuid]) -> Result<Vec<Uuid>> {
    let deleted: Vec<Uuid> = tx
        .query(
            "DELETE FROM users WHERE project_id = $1 AND id = ANY($2) RETURNING id",
            &[&project_id, &ids],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !deleted.is_empty() {
        tx.execute(
            "DELETE FROM events WHERE project_id = $1 AND user_id = ANY($2)",
            &[&project_id, &deleted],
        )
        .await?;
    }
    Ok(deleted)
}

/// Marks a contact verified; a pending user becomes active.
pub async fn mark_contact_verified(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
    phone: bool,
) -> Result<User> {
    let column = if phone {
        "phone_verified"
    } else {
        "email_verified"
    };
    let row = tx
        .query_one(
            &format!(
                "UPDATE users SET {column} = true,
                    status = CASE WHEN status = {pending} THEN {active} ELSE status END,
                    version = version + 1, updated_at = now()
                 WHERE project_id = $1 AND id = $2
                 RETURNING {USER_COLUMNS}",
                pending = UserStatus::PendingVerification as i16,
                active = UserStatus::Active as i16,
            ),
            &[&project_id, &id],
        )
        .await?;
    Ok(user_from_row(&row))
}

/// A pending contact verification.
pub struct Verification {
    pub target: String,
    pub salt: Vec<u8>,
    pub hash: Vec<u8>,
    pub attempts: i32,
    pub expires_at: DateTime<Utc>,
}

/// Stores a new code for (user, channel), replacing any earlier one.
pub async fn put_verification(
    tx: &Transaction<'_>,
    project_id: Uuid,
    user_id: Uuid,
    channel: i16,
    v: &Verification,
) -> Result<()> {
    tx.execute(
        "INSERT INTO contact_verifications
            (project_id, user_id, channel, target, code_salt, code_hash, attempts, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, 0, $7)
         ON CONFLICT (project_id, user_id, channel) DO UPDATE SET
            target = EXCLUDED.target, code_salt = EXCLUDED.code_salt,
            code_hash = EXCLUDED.code_hash, attempts = 0, expires_at = EXCLUDED.expires_at",
        &[
            &project_id,
            &user_id,
            &channel,
            &v.target,
            &v.salt,
            &v.hash,
            &v.expires_at,
        ],
    )
    .await?;
    Ok(())
}

/// Reads the pending verification and locks it, so concurrent guesses count one by one.
pub async fn get_verification_for_update(
    tx: &Transaction<'_>,
    project_id: Uuid,
    user_id: Uuid,
    channel: i16,
) -> Result<Option<Verification>> {
    let row = tx
        .query_opt(
            "SELECT target, code_salt, code_hash, attempts, expires_at
             FROM contact_verifications
             WHERE project_id = $1 AND user_id = $2 AND channel = $3 FOR UPDATE",
            &[&project_id, &user_id, &channel],
        )
        .await?;
    Ok(row.map(|r| Verification {
        target: r.get(0),
        salt: r.get(1),
        hash: r.get(2),
        attempts: r.get(3),
        expires_at: r.get(4),
    }))
}

pub async fn count_failed_verification(
    tx: &Transaction<'_>,
    project_id: Uuid,
    user_id: Uuid,
    channel: i16,
) -> Result<()> {
    tx.execute(
        "UPDATE contact_verifications SET attempts = attempts + 1
         WHERE project_id = $1 AND user_id = $2 AND channel = $3",
        &[&project_id, &user_id, &channel],
    )
    .await?;
    Ok(())
}

pub async fn delete_verification(
    tx: &Transaction<'_>,
    project_id: Uuid,
    user_id: Uuid,
    channel: i16,
) -> Result<()> {
    tx.execute(
        "DELETE FROM contact_verifications WHERE project_id = $1 AND user_id = $2 AND channel = $3",
        &[&project_id, &user_id, &channel],
    )
    .await?;
    Ok(())
}

// ---- listing ----

/// The fields ListUsers can order by.
pub const ORDER_FIELDS: &[OrderField] = &[
    OrderField {
        name: "created_at",
        sql: "created_at",
        nullable: false,
        kind: SortKind::Time,
    },
    OrderField {
        name: "updated_at",
        sql: "updated_at",
        nullable: false,
        kind: SortKind::Time,
    },
    OrderField {
        name: "email",
        sql: "lower(email)",
        nullable: true,
        kind: SortKind::Text,
    },
    OrderField {
        name: "username",
        sql: "lower(username)",
        nullable: true,
        kind: SortKind::Text,
    },
    OrderField {
        name: "last_login_at",
        sql: "last_login_at",
        nullable: true,
        kind: SortKind::Time,
    },
    OrderField {
        name: "display_name",
        sql: "display_name",
        nullable: true,
        kind: SortKind::Text,
    },
];

/// The filterable fields of a user (the whitelist of AIP-160 field names).
pub fn filter_field(name: &str) -> Result<Field, String> {
    let simple = |sql: &'static str, kind: FieldKind| {
        Ok(Field {
            sql,
            kind,
            path: vec![],
        })
    };
    let text = FieldKind::Text { ci: false };
    match name {
        "id" => simple("id", FieldKind::Uuid),
        "email" => simple("lower(email)", FieldKind::Text { ci: true }),
        "username" => simple("lower(username)", FieldKind::Text { ci: true }),
        "email_verified" => simple("email_verified", FieldKind::Bool),
        "phone_verified" => simple("phone_verified", FieldKind::Bool),
        "has_password" => simple("(password_hash IS NOT NULL)", FieldKind::Bool),
        // The stored hash's algorithm: `password_format != "argon2id"` lists the users a
        // migration has not moved to argon2id yet (they are, at their next sign-in).
        "password_format" => simple(
            crate::crypto::formats::FORMAT_SQL,
            FieldKind::Name(crate::crypto::formats::format_name),
        ),
        "password_changed_at" => simple("password_changed_at", FieldKind::Timestamp),
        "require_password_change" => simple("require_password_change", FieldKind::Bool),
        "phone_number" => simple("phone_number", text),
        "external_id" => simple("external_id", text),
        "display_name" => simple("display_name", text),
        "given_name" => simple("given_name", text),
        "family_name" => simple("family_name", text),
        "status" => simple("status", FieldKind::Enum(UserStatus::number_by_name)),
        "created_at" => simple("created_at", FieldKind::Timestamp),
        "updated_at" => simple("updated_at", FieldKind::Timestamp),
        "last_login_at" => simple("last_login_at", FieldKind::Timestamp),
        "login_count" => simple("login_count", FieldKind::Int),
        // As User.enrolled_methods shows it: PASSWORD when a password is set, then the
        // confirmed factors (kept on the row by a trigger). `NOT enrolled_methods:TOTP AND
        // NOT enrolled_methods:PASSKEY` lists who to nudge into a second factor.
        "enrolled_methods" => simple(
            "(CASE WHEN password_hash IS NULL THEN '{}'::smallint[] ELSE '{1}' END \
             || factor_types)",
            FieldKind::EnumList(crate::authenticators::Kind::number_by_name),
        ),
        // The user's linked identities, by provider or by connection (an enterprise SSO
        // connection's users, say, when a customer leaves): `identity_providers:"google"
        // AND has_password = false` lists who can only sign in with Google.
        "identity_providers" | "identity_connections" => simple(
            "",
            FieldKind::Linked {
                rows: "SELECT 1 FROM identities i WHERE i.project_id = users.project_id \
                       AND i.user_id = users.id",
                column: if name == "identity_providers" {
                    "i.provider"
                } else {
                    "i.connection"
                },
            },
        ),
        _ => {
            let json = name
                .strip_prefix("app_metadata")
                .map(|r| ("app_metadata", r))
                .or_else(|| {
                    name.strip_prefix("user_metadata")
                        .map(|r| ("user_metadata", r))
                });
            match json {
                Some((col, rest)) => {
                    let Some(rest) = rest.strip_prefix('.') else {
                        return Err(format!("'{col}' needs a key, e.g. '{col}.plan'"));
                    };
                    let keys = crate::wire::metadata_key_path(rest)
                        .map_err(|e| format!("'{name}' {e}"))?;
                    Ok(Field {
                        sql: col,
                        kind: FieldKind::Json,
                        path: keys,
                    })
                }
                None => Err(format!("unknown field '{name}'")),
            }
        }
    }
}

const SEARCH_TEXT: &str =
    "roster_user_search_text(email, username, display_name, given_name, family_name, external_id)";

/// A validated listing: filter tree, lowered search text, order, page size and cursor.
pub struct ListSpec {
    pub filter: Option<Expr>,
    pub query: Option<String>,
    pub order: Order,
    pub limit: i64,
    pub after: Option<Cursor>,
}

fn where_clause(
    project_id: Uuid,
    spec: &ListSpec,
    sql: &mut Sql,
) -> std::result::Result<(), crate::query::filter::FilterError> {
    let p = sql.param(project_id);
    sql.push(&format!(" WHERE project_id = {p}"));
    if let Some(f) = &spec.filter {
        sql.push(" AND ");
        sql::compile(f, filter_field, sql)?;
    }
    if let Some(q) = &spec.query {
        let mut pattern = String::from("%");
        for c in q.chars() {
            if matches!(c, '%' | '_' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('%');
        let p = sql.param(pattern);
        sql.push(&format!(" AND {SEARCH_TEXT} LIKE {p}"));
    }
    Ok(())
}

/// One page of users, each with the cursor pointing just past it; fetches one extra row so
/// the caller knows whether there is a next page.
pub async fn list(
    db: &impl GenericClient,
    project_id: Uuid,
    spec: &ListSpec,
) -> Result<Vec<(User, Cursor)>> {
    let mut sql = Sql::new();
    sql.push(&format!(
        "SELECT {USER_COLUMNS}{} FROM users",
        spec.order.select_sql()
    ));
    where_clause(project_id, spec, &mut sql)
        .map_err(|e| crate::error::Error::invalid("filter", e.to_string()))?;
    if let Some(after) = &spec.after {
        let cond = spec.order.after_sql(after, "id", &mut sql);
        sql.push(&format!(" AND {cond}"));
    }
    let limit = sql.param(spec.limit + 1);
    sql.push(&format!(
        " ORDER BY {} LIMIT {limit}",
        spec.order.order_by_sql("id")
    ));
    let rows = db.query(&sql.text, &sql.params()).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let user = user_from_row(r);
            let cursor = spec.order.cursor_of(r, USER_COLUMN_COUNT, user.id);
            (user, cursor)
        })
        .collect())
}

/// How many users match the filter and query.
pub async fn count(db: &impl GenericClient, project_id: Uuid, spec: &ListSpec) -> Result<i64> {
    let mut sql = Sql::new();
    sql.push("SELECT count(*) FROM users");
    where_clause(project_id, spec, &mut sql)
        .map_err(|e| crate::error::Error::invalid("filter", e.to_string()))?;
    Ok(db.query_one(&sql.text, &sql.params()).await?.get(0))
}
