//! The SQL of credentials: password hashes, sign-in bookkeeping and reset tokens. Every
//! statement is scoped by `project_id`. Password hashes are read here and nowhere else; they
//! never reach a `User`.
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use uuid::Uuid;

use crate::error::Result;
use crate::events::{EventContext, NewEvent};
use crate::users::store::{USER_COLUMNS, lookup_condition, user_from_row};
use crate::users::{LookupKey, User};

/// Who is signing in.
#[derive(Debug, Clone)]
pub enum Login {
    Id(Uuid),
    Key(LookupKey),
}

/// A user with what a password check needs.
pub struct Credentials {
    pub user: User,
    pub hash: Option<String>,
    pub failed_logins: i32,
}

fn credentials_from_row(r: &tokio_postgres::Row) -> Credentials {
    Credentials {
        user: user_from_row(r),
        hash: r.get("password_hash"),
        failed_logins: r.get("failed_logins"),
    }
}

/// Finds a user by login (no lock).
pub async fn credentials(
    db: &impl GenericClient,
    project_id: Uuid,
    login: &Login,
) -> Result<Option<Credentials>> {
    let row = match login {
        Login::Id(id) => {
            let stmt = db
                .prepare_cached(&format!(
                    "SELECT {USER_COLUMNS}, password_hash, failed_logins FROM users
                     WHERE project_id = $1 AND id = $2"
                ))
                .await?;
            db.query_opt(&stmt, &[&project_id, id]).await?
        }
        Login::Key(key) => {
            let (cond, value) = lookup_condition(key);
            let stmt = db
                .prepare_cached(&format!(
                    "SELECT {USER_COLUMNS}, password_hash, failed_logins FROM users
                     WHERE project_id = $1 AND {cond}"
                ))
                .await?;
            db.query_opt(&stmt, &[&project_id, value]).await?
        }
    };
    Ok(row.as_ref().map(credentials_from_row))
}

/// Reads a user's credentials and locks the row until the transaction ends, so concurrent
/// sign-ins of one user count their failures one after another.
pub async fn credentials_for_update(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
) -> Result<Option<Credentials>> {
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {USER_COLUMNS}, password_hash, failed_logins FROM users
             WHERE project_id = $1 AND id = $2 FOR UPDATE"
        ))
        .await?;
    Ok(tx
        .query_opt(&stmt, &[&project_id, &id])
        .await?
        .as_ref()
        .map(credentials_from_row))
}

/// Stores the failure count and, when the failure locked the account, the lock's end.
pub async fn record_failure(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
    failed_logins: i32,
    locked_until: Option<DateTime<Utc>>,
) -> Result<()> {
    let stmt = tx
        .prepare_cached(
            "UPDATE users SET failed_logins = $3, locked_until = coalesce($4, locked_until)
             WHERE project_id = $1 AND id = $2",
        )
        .await?;
    tx.execute(&stmt, &[&project_id, &id, &failed_logins, &locked_until])
        .await?;
    Ok(())
}

/// What a right password changes.
pub struct Success<'a> {
    /// A full sign-in (not one that must change its password first): counts the login.
    pub sign_in: bool,
    pub ip: Option<&'a str>,
    /// PENDING_VERIFICATION becomes ACTIVE.
    pub activate: bool,
    /// A replacement for a legacy or weaker hash.
    pub rehash: Option<&'a str>,
}

/// What a right password writes, from [`Success`] bound as $3 to $6.
const SUCCESS_SET: &str = "failed_logins = 0, locked_until = NULL,
    login_count = login_count + CASE WHEN $3 THEN 1 ELSE 0 END,
    last_login_at = CASE WHEN $3 THEN now() ELSE last_login_at END,
    last_login_ip = CASE WHEN $3 THEN $4 ELSE last_login_ip END,
    status = CASE WHEN $5 THEN 1 ELSE status END,
    version = version + CASE WHEN $5 THEN 1 ELSE 0 END,
    updated_at = CASE WHEN $5 THEN now() ELSE updated_at END,
    password_hash = coalesce($6, password_hash)";

/// Clears failure counting and records a sign-in. Sign-in counters do not bump the version
/// (the etag stays valid across logins); activation does.
pub async fn record_success(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
    s: &Success<'_>,
) -> Result<User> {
    let stmt = tx
        .prepare_cached(&format!(
            "UPDATE users SET {SUCCESS_SET} WHERE project_id = $1 AND id = $2
             RETURNING {USER_COLUMNS}"
        ))
        .await?;
    let row = tx
        .query_one(
            &stmt,
            &[&project_id, &id, &s.sign_in, &s.ip, &s.activate, &s.rehash],
        )
        .await?;
    Ok(user_from_row(&row))
}

/// [`record_success`] with the sign-in's `events`, in one statement and one commit, if the
/// user is still as `read` saw it: the same version and update time (its etag: a user deleted
/// and created again under the same id is another user), hash, status and change
/// requirement, and no lock taken meanwhile. `None` when anything changed; nothing is written
/// then, and the caller decides again under the row lock. Failure counts are not compared: a
/// right password clears them whatever they have become.
pub async fn record_success_if_unchanged(
    db: &impl GenericClient,
    project_id: Uuid,
    read: &Credentials,
    s: &Success<'_>,
    ctx: &EventContext,
    events: &[NewEvent],
) -> Result<Option<User>> {
    let stmt = db
        .prepare_cached(&format!(
            "WITH u AS (
                 UPDATE users SET {SUCCESS_SET}
                 WHERE project_id = $1 AND id = $2 AND version = $7 AND updated_at = $8
                     AND password_hash = $9 AND status = $10 AND require_password_change = $11
                     AND (locked_until IS NULL OR locked_until <= now())
                 RETURNING {USER_COLUMNS}),
             e AS (INSERT INTO events (project_id, id, type, user_id, api_key_id, ip,
                                       user_agent, request_id, data)
                   SELECT $1, e.id, e.type, u.id, $15, $16, $17, $18, e.data
                   FROM u, unnest($12::uuid[], $13::text[], $14::jsonb[]) AS e(id, type, data))
             SELECT * FROM u"
        ))
        .await?;
    let ids: Vec<Uuid> = events.iter().map(|_| Uuid::now_v7()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let data: Vec<&serde_json::Value> = events.iter().map(|e| &e.data).collect();
    let row = db
        .query_opt(
            &stmt,
            &[
                &project_id,
                &read.user.id,
                &s.sign_in,
                &s.ip,
                &s.activate,
                &s.rehash,
                &read.user.version,
                &read.user.updated_at,
                &read.hash,
                &(read.user.status as i16),
                &read.user.require_password_change,
                &ids,
                &types,
                &data,
                &ctx.api_key_id,
                &ctx.ip,
                &ctx.user_agent,
                &ctx.request_id,
            ],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    crate::events::stream::written();
    Ok(Some(user_from_row(&row)))
}

/// The hashes of the user's previous passwords (not the current one), newest first, at most
/// `limit` (`--password-history`).
pub async fn previous_hashes(
    db: &impl GenericClient,
    project_id: Uuid,
    id: Uuid,
    limit: u32,
) -> Result<Vec<String>> {
    let stmt = db
        .prepare_cached(
            "SELECT hash FROM password_history WHERE project_id = $1 AND user_id = $2
             ORDER BY seq DESC LIMIT $3",
        )
        .await?;
    let rows = db
        .query(&stmt, &[&project_id, &id, &i64::from(limit)])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Before a password change: files the current hash among the previous ones (unless it is
/// `new_hash` itself) and keeps the newest `keep`; 0 deletes them all, so a server whose
/// history is off keeps no old hashes.
pub async fn file_password_history(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
    new_hash: &str,
    keep: u32,
) -> Result<()> {
    if keep > 0 {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO password_history (project_id, user_id, hash)
                 SELECT project_id, id, password_hash FROM users
                 WHERE project_id = $1 AND id = $2 AND password_hash IS NOT NULL
                   AND password_hash <> $3",
            )
            .await?;
        tx.execute(&stmt, &[&project_id, &id, &new_hash]).await?;
    }
    let stmt = tx
        .prepare_cached(
            "DELETE FROM password_history WHERE project_id = $1 AND user_id = $2
               AND seq NOT IN (SELECT seq FROM password_history
                               WHERE project_id = $1 AND user_id = $2
                               ORDER BY seq DESC LIMIT $3)",
        )
        .await?;
    tx.execute(&stmt, &[&project_id, &id, &i64::from(keep)])
        .await?;
    Ok(())
}

/// Replaces the password hash (NULL removes the password), sets whether it must be changed,
/// clears a brute-force lock and voids the user's reset tokens.
pub async fn set_password(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
    hash: Option<&str>,
    require_change: bool,
) -> Result<User> {
    let stmt = tx
        .prepare_cached(&format!(
            "UPDATE users SET password_hash = $3,
                password_changed_at = CASE WHEN $3::text IS NULL THEN NULL ELSE now() END,
                require_password_change = $4, failed_logins = 0, locked_until = NULL,
                version = version + 1, updated_at = now()
             WHERE project_id = $1 AND id = $2
             RETURNING {USER_COLUMNS}"
        ))
        .await?;
    let row = tx
        .query_one(&stmt, &[&project_id, &id, &hash, &require_change])
        .await?;
    delete_reset_tokens(tx, project_id, id).await?;
    Ok(user_from_row(&row))
}

/// Marks the password as one that must be changed at the next sign-in.
pub async fn expire_password(tx: &Transaction<'_>, project_id: Uuid, id: Uuid) -> Result<User> {
    let stmt = tx
        .prepare_cached(&format!(
            "UPDATE users SET require_password_change = true,
                version = version + 1, updated_at = now()
             WHERE project_id = $1 AND id = $2
             RETURNING {USER_COLUMNS}"
        ))
        .await?;
    let row = tx.query_one(&stmt, &[&project_id, &id]).await?;
    Ok(user_from_row(&row))
}

/// Stores a reset token's hash, dropping the user's expired ones on the way.
pub async fn insert_reset_token(
    tx: &Transaction<'_>,
    project_id: Uuid,
    user_id: Uuid,
    token_hash: &[u8],
    expires_at: DateTime<Utc>,
) -> Result<()> {
    tx.execute(
        "DELETE FROM password_reset_tokens
         WHERE project_id = $1 AND user_id = $2 AND expires_at <= now()",
        &[&project_id, &user_id],
    )
    .await?;
    tx.execute(
        "INSERT INTO password_reset_tokens (project_id, token_hash, user_id, expires_at)
         VALUES ($1, $2, $3, $4)",
        &[&project_id, &token_hash, &user_id, &expires_at],
    )
    .await?;
    Ok(())
}

/// A stored reset token: (user id, expiry).
pub async fn find_reset_token(
    db: &impl GenericClient,
    project_id: Uuid,
    token_hash: &[u8],
) -> Result<Option<(Uuid, DateTime<Utc>)>> {
    Ok(db
        .query_opt(
            "SELECT user_id, expires_at FROM password_reset_tokens
             WHERE project_id = $1 AND token_hash = $2",
            &[&project_id, &token_hash],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// Consumes a token: of concurrent uses exactly one gets it back.
pub async fn take_reset_token(
    tx: &Transaction<'_>,
    project_id: Uuid,
    token_hash: &[u8],
) -> Result<Option<(Uuid, DateTime<Utc>)>> {
    Ok(tx
        .query_opt(
            "DELETE FROM password_reset_tokens WHERE project_id = $1 AND token_hash = $2
             RETURNING user_id, expires_at",
            &[&project_id, &token_hash],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

async fn delete_reset_tokens(tx: &Transaction<'_>, project_id: Uuid, user_id: Uuid) -> Result<()> {
    tx.execute(
        "DELETE FROM password_reset_tokens WHERE project_id = $1 AND user_id = $2",
        &[&project_id, &user_id],
    )
    .await?;
    Ok(())
}

// ---- Second factors and passkeys -------------------------------------------------------
//
// The `authenticators` table holds every factor but the password. Secrets stay in columns
// that `AUTH_COLUMNS` never selects: the sealed TOTP seed is read only by `factor_secrets`.

use super::{Authenticator, Kind};

const AUTH_COLUMNS: &str = "id, user_id, type, name, confirmed, is_default, created_at, \
    last_used_at, credential_id, aaguid, transports, backed_up, email, phone_number";

fn authenticator_from_row(r: &tokio_postgres::Row) -> Authenticator {
    Authenticator {
        id: r.get(0),
        user_id: r.get(1),
        // Only the service writes this column, always with a known number.
        kind: Kind::from_i16(r.get(2)).unwrap_or(Kind::Totp),
        name: r.get(3),
        confirmed: r.get(4),
        is_default: r.get(5),
        created_at: r.get(6),
        last_used_at: r.get(7),
        credential_id: r.get(8),
        aaguid: r.get(9),
        transports: r.get(10),
        backed_up: r.get(11),
        email: r.get(12),
        phone_number: r.get(13),
    }
}

/// A new authenticator row. Secrets arrive sealed or hashed.
#[derive(Default)]
pub struct NewAuthenticator<'a> {
    pub id: Uuid,
    pub user_id: Uuid,
    pub kind: Option<Kind>,
    pub name: Option<&'a str>,
    pub confirmed: bool,
    pub totp_secret: Option<&'a [u8]>,
    pub email: Option<&'a str>,
    pub phone_number: Option<&'a str>,
    pub credential_id: Option<&'a [u8]>,
    pub passkey: Option<&'a serde_json::Value>,
    pub aaguid: Option<Uuid>,
    pub transports: Vec<String>,
    pub backed_up: bool,
    pub sign_count: i64,
}

pub async fn insert_authenticator(
    tx: &Transaction<'_>,
    project_id: Uuid,
    a: &NewAuthenticator<'_>,
) -> Result<Authenticator> {
    let kind = a.kind.unwrap_or(Kind::Totp) as i16;
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO authenticators (project_id, id, user_id, type, name, confirmed,
                    totp_secret, email, phone_number, credential_id, passkey, aaguid, transports,
                    backed_up, sign_count)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
                 RETURNING {AUTH_COLUMNS}"
            ),
            &[
                &project_id,
                &a.id,
                &a.user_id,
                &kind,
                &a.name,
                &a.confirmed,
                &a.totp_secret,
                &a.email,
                &a.phone_number,
                &a.credential_id,
                &a.passkey,
                &a.aaguid,
                &a.transports,
                &a.backed_up,
                &a.sign_count,
            ],
        )
        .await?;
    Ok(authenticator_from_row(&row))
}

/// A user's authenticators, oldest first.
pub async fn list_authenticators(
    db: &impl GenericClient,
    project_id: Uuid,
    user_id: Uuid,
) -> Result<Vec<Authenticator>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {AUTH_COLUMNS} FROM authenticators WHERE project_id = $1 AND user_id = $2
             ORDER BY created_at, id"
        ))
        .await?;
    let rows = db.query(&stmt, &[&project_id, &user_id]).await?;
    Ok(rows.iter().map(authenticator_from_row).collect())
}

/// One of a user's authenticators (another user's id answers `None`).
pub async fn get_authenticator(
    db: &impl GenericClient,
    project_id: Uuid,
    user_id: Uuid,
    id: Uuid,
) -> Result<Option<Authenticator>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {AUTH_COLUMNS} FROM authenticators
             WHERE project_id = $1 AND user_id = $2 AND id = $3"
        ))
        .await?;
    Ok(db
        .query_opt(&stmt, &[&project_id, &user_id, &id])
        .await?
        .as_ref()
        .map(authenticator_from_row))
}

/// An authenticator with what checking a code needs: the sealed TOTP seed and last step.
pub struct FactorSecrets {
    pub authenticator: Authenticator,
    pub totp_secret: Option<Vec<u8>>,
    pub totp_last_step: Option<i64>,
    /// Recovery codes that came by import (checked as their system issued them too).
    pub foreign_codes: bool,
}

/// The user's authenticators to check a code against: the one with `id`, or all of `kind`.
pub async fn factor_secrets(
    tx: &Transaction<'_>,
    project_id: Uuid,
    user_id: Uuid,
    id: Option<Uuid>,
    kind: Option<Kind>,
) -> Result<Vec<FactorSecrets>> {
    let kind = kind.map(|k| k as i16);
    let rows = tx
        .query(
            &format!(
                "SELECT {AUTH_COLUMNS}, totp_secret, totp_last_step, foreign_codes FROM authenticators
                 WHERE project_id = $1 AND user_id = $2
                   AND ($3::uuid IS NULL OR id = $3) AND ($4::smallint IS NULL OR type = $4)
                 ORDER BY created_at, id"
            ),
            &[&project_id, &user_id, &id, &kind],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| FactorSecrets {
            authenticator: authenticator_from_row(r),
            totp_secret: r.get(14),
            totp_last_step: r.get(15),
            foreign_codes: r.get(16),
        })
        .collect())
}

/// Marks a successful use: `last_used_at`, and for TOTP the step now spent.
pub async fn record_factor_use(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
    totp_step: Option<i64>,
) -> Result<Authenticator> {
    let row = tx
        .query_one(
            &format!(
                "UPDATE authenticators SET last_used_at = now(),
                    totp_last_step = coalesce($3, totp_last_step)
                 WHERE project_id = $1 AND id = $2 RETURNING {AUTH_COLUMNS}"
            ),
            &[&project_id, &id, &totp_step],
        )
        .await?;
    Ok(authenticator_from_row(&row))
}

/// Confirms an enrolment (TOTP), spending the step its first code used.
pub async fn confirm_authenticator(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
    totp_step: Option<i64>,
) -> Result<()> {
    tx.execute(
        "UPDATE authenticators SET confirmed = true, last_used_at = now(),
            totp_last_step = coalesce($3, totp_last_step)
         WHERE project_id = $1 AND id = $2",
        &[&project_id, &id, &totp_step],
    )
    .await?;
    Ok(())
}

pub async fn rename_authenticator(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
    name: Option<&str>,
) -> Result<()> {
    tx.execute(
        "UPDATE authenticators SET name = $3 WHERE project_id = $1 AND id = $2",
        &[&project_id, &id, &name],
    )
    .await?;
    Ok(())
}

/// Makes `id` the user's one default.
pub async fn make_default(
    tx: &Transaction<'_>,
    project_id: Uuid,
    user_id: Uuid,
    id: Uuid,
) -> Result<()> {
    // Two statements: the partial unique index allows one default at any moment.
    tx.execute(
        "UPDATE authenticators SET is_default = false
         WHERE project_id = $1 AND user_id = $2 AND is_default AND id <> $3",
        &[&project_id, &user_id, &id],
    )
    .await?;
    tx.execute(
        "UPDATE authenticators SET is_default = true WHERE project_id = $1 AND id = $2",
        &[&project_id, &id],
    )
    .await?;
    Ok(())
}

/// Gives the user a default when it has none: its oldest confirmed factor that can be one.
pub async fn ensure_default(tx: &Transaction<'_>, project_id: Uuid, user_id: Uuid) -> Result<()> {
    let stmt = tx
        .prepare_cached(
            "UPDATE authenticators SET is_default = true
             WHERE project_id = $1 AND id = (
                 SELECT id FROM authenticators
                 WHERE project_id = $1 AND user_id = $2 AND confirmed AND type NOT IN (1, 6)
                 ORDER BY created_at, id LIMIT 1)
               AND NOT EXISTS (SELECT 1 FROM authenticators
                               WHERE project_id = $1 AND user_id = $2 AND is_default)",
        )
        .await?;
    tx.execute(&stmt, &[&project_id, &user_id]).await?;
    Ok(())
}

/// Deletes the user's authenticators: one (`id`), those of one kind, or all. Returns them.
pub async fn delete_authenticators(
    tx: &Transaction<'_>,
    project_id: Uuid,
    user_id: Uuid,
    id: Option<Uuid>,
    kind: Option<Kind>,
) -> Result<Vec<Authenticator>> {
    let kind = kind.map(|k| k as i16);
    let rows = tx
        .query(
            &format!(
                "DELETE FROM authenticators
                 WHERE project_id = $1 AND user_id = $2
                   AND ($3::uuid IS NULL OR id = $3) AND ($4::smallint IS NULL OR type = $4)
                 RETURNING {AUTH_COLUMNS}"
            ),
            &[&project_id, &user_id, &id, &kind],
        )
        .await?;
    let mut deleted: Vec<Authenticator> = rows.iter().map(authenticator_from_row).collect();
    deleted.sort_by_key(|a| (a.created_at, a.id));
    Ok(deleted)
}

/// Moves every authenticator of `from` to `to` (MergeUsers). Where both have a single-use
/// kind (recovery codes, the email or SMS channel), `to` keeps its own; `to` keeps its
/// default. Returns how many moved.
pub async fn move_authenticators(
    tx: &Transaction<'_>,
    project_id: Uuid,
    from: Uuid,
    to: Uuid,
) -> Result<u64> {
    tx.execute(
        "DELETE FROM authenticators f
         WHERE f.project_id = $1 AND f.user_id = $2 AND f.type IN (4, 5, 6)
           AND EXISTS (SELECT 1 FROM authenticators t
                       WHERE t.project_id = $1 AND t.user_id = $3 AND t.type = f.type)",
        &[&project_id, &from, &to],
    )
    .await?;
    let moved = tx
        .execute(
            "UPDATE authenticators SET user_id = $3, is_default = false
             WHERE project_id = $1 AND user_id = $2",
            &[&project_id, &from, &to],
        )
        .await?;
    ensure_default(tx, project_id, to).await?;
    Ok(moved)
}

/// Stores a new set of recovery-code hashes for `authenticator_id`.
pub async fn insert_recovery_codes(
    tx: &Transaction<'_>,
    project_id: Uuid,
    authenticator_id: Uuid,
    hashes: &[Vec<u8>],
) -> Result<()> {
    tx.execute(
        "INSERT INTO recovery_codes (project_id, authenticator_id, code_hash)
         SELECT $1, $2, h FROM unnest($3::bytea[]) AS h",
        &[&project_id, &authenticator_id, &hashes],
    )
    .await?;
    Ok(())
}

/// What using a recovery code found.
pub enum RecoveryUse {
    /// Spent now.
    Spent,
    /// Known but already spent.
    AlreadyUsed,
    Unknown,
}

/// Spends a recovery code stored under one of `hashes` (the forms a typed code may take).
/// Of concurrent uses of one code exactly one spends it (the row update re-checks `used_at`
/// after waiting for the other).
pub async fn use_recovery_code(
    tx: &Transaction<'_>,
    project_id: Uuid,
    authenticator_id: Uuid,
    hashes: &[Vec<u8>],
) -> Result<RecoveryUse> {
    // One round trip whatever the number of forms tried: spends the first unused code among
    // them (in the caller's order), or says whether one of them was spent before.
    let row = tx
        .query_one(
            "WITH hit AS (
                 SELECT code_hash FROM recovery_codes
                 WHERE project_id = $1 AND authenticator_id = $2 AND code_hash = ANY($3)
                   AND used_at IS NULL
                 ORDER BY array_position($3, code_hash) LIMIT 1
             ), spent AS (
                 UPDATE recovery_codes r SET used_at = now() FROM hit
                 WHERE r.project_id = $1 AND r.authenticator_id = $2
                   AND r.code_hash = hit.code_hash AND r.used_at IS NULL
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM spent),
                    (SELECT count(*) FROM recovery_codes
                     WHERE project_id = $1 AND authenticator_id = $2 AND code_hash = ANY($3))",
            &[&project_id, &authenticator_id, &hashes],
        )
        .await?;
    let (spent, known): (i64, i64) = (row.get(0), row.get(1));
    Ok(if spent == 1 {
        RecoveryUse::Spent
    } else if known > 0 {
        RecoveryUse::AlreadyUsed
    } else {
        RecoveryUse::Unknown
    })
}

/// An outstanding OTP code.
pub struct OtpChallenge {
    pub salt: Vec<u8>,
    pub hash: Vec<u8>,
    pub attempts: i32,
    pub expires_at: DateTime<Utc>,
}

/// Stores the channel's one outstanding code, voiding the one before.
pub async fn put_otp_challenge(
    tx: &Transaction<'_>,
    project_id: Uuid,
    authenticator_id: Uuid,
    c: &OtpChallenge,
) -> Result<()> {
    tx.execute(
        "INSERT INTO otp_challenges
            (project_id, authenticator_id, code_salt, code_hash, attempts, expires_at)
         VALUES ($1, $2, $3, $4, 0, $5)
         ON CONFLICT (project_id, authenticator_id) DO UPDATE SET
            code_salt = EXCLUDED.code_salt, code_hash = EXCLUDED.code_hash, attempts = 0,
            expires_at = EXCLUDED.expires_at",
        &[
            &project_id,
            &authenticator_id,
            &c.salt,
            &c.hash,
            &c.expires_at,
        ],
    )
    .await?;
    Ok(())
}

pub async fn otp_challenge(
    tx: &Transaction<'_>,
    project_id: Uuid,
    authenticator_id: Uuid,
) -> Result<Option<OtpChallenge>> {
    Ok(tx
        .query_opt(
            "SELECT code_salt, code_hash, attempts, expires_at FROM otp_challenges
             WHERE project_id = $1 AND authenticator_id = $2",
            &[&project_id, &authenticator_id],
        )
        .await?
        .map(|r| OtpChallenge {
            salt: r.get(0),
            hash: r.get(1),
            attempts: r.get(2),
            expires_at: r.get(3),
        }))
}

pub async fn count_otp_failure(
    tx: &Transaction<'_>,
    project_id: Uuid,
    authenticator_id: Uuid,
) -> Result<()> {
    tx.execute(
        "UPDATE otp_challenges SET attempts = attempts + 1
         WHERE project_id = $1 AND authenticator_id = $2",
        &[&project_id, &authenticator_id],
    )
    .await?;
    Ok(())
}

/// The times codes of `kind` were issued to the user, with the row locked for the rest of the
/// transaction (made empty when there is none yet, so that a first issue is locked too).
pub async fn code_sends_for_update(
    tx: &Transaction<'_>,
    project_id: Uuid,
    user_id: Uuid,
    kind: i16,
) -> Result<Vec<DateTime<Utc>>> {
    let row = tx
        .query_one(
            "INSERT INTO code_sends (project_id, user_id, kind, sent_at) VALUES ($1, $2, $3, '{}')
             ON CONFLICT (project_id, user_id, kind) DO UPDATE SET sent_at = code_sends.sent_at
             RETURNING sent_at",
            &[&project_id, &user_id, &kind],
        )
        .await?;
    Ok(row.get(0))
}

pub async fn put_code_sends(
    tx: &Transaction<'_>,
    project_id: Uuid,
    user_id: Uuid,
    kind: i16,
    sent_at: &[DateTime<Utc>],
) -> Result<()> {
    tx.execute(
        "UPDATE code_sends SET sent_at = $4
         WHERE project_id = $1 AND user_id = $2 AND kind = $3",
        &[&project_id, &user_id, &kind, &sent_at],
    )
    .await?;
    Ok(())
}

pub async fn delete_otp_challenge(
    tx: &Transaction<'_>,
    project_id: Uuid,
    authenticator_id: Uuid,
) -> Result<()> {
    tx.execute(
        "DELETE FROM otp_challenges WHERE project_id = $1 AND authenticator_id = $2",
        &[&project_id, &authenticator_id],
    )
    .await?;
    Ok(())
}

/// A passkey as webauthn-rs stores it, with its row.
pub struct StoredPasskey {
    pub authenticator: Authenticator,
    pub passkey: serde_json::Value,
    pub sign_count: i64,
}

fn stored_passkey(r: &tokio_postgres::Row) -> StoredPasskey {
    StoredPasskey {
        authenticator: authenticator_from_row(r),
        passkey: r.get(14),
        sign_count: r.get(15),
    }
}

/// The user's registered passkeys.
pub async fn passkeys_of_user(
    db: &impl GenericClient,
    project_id: Uuid,
    user_id: Uuid,
) -> Result<Vec<StoredPasskey>> {
    let rows = db
        .query(
            &format!(
                "SELECT {AUTH_COLUMNS}, passkey, sign_count FROM authenticators
                 WHERE project_id = $1 AND user_id = $2 AND type = 3 AND passkey IS NOT NULL
                 ORDER BY created_at, id"
            ),
            &[&project_id, &user_id],
        )
        .await?;
    Ok(rows.iter().map(stored_passkey).collect())
}

/// The passkey with this credential id.
pub async fn passkey_by_credential(
    tx: &Transaction<'_>,
    project_id: Uuid,
    credential_id: &[u8],
) -> Result<Option<StoredPasskey>> {
    Ok(tx
        .query_opt(
            &format!(
                "SELECT {AUTH_COLUMNS}, passkey, sign_count FROM authenticators
                 WHERE project_id = $1 AND credential_id = $2 AND type = 3"
            ),
            &[&project_id, &credential_id],
        )
        .await?
        .as_ref()
        .map(stored_passkey))
}

/// Records a passkey sign-in: its new counter and flags, and `last_used_at`.
pub async fn update_passkey(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
    passkey: &serde_json::Value,
    sign_count: i64,
    backed_up: bool,
) -> Result<Authenticator> {
    let row = tx
        .query_one(
            &format!(
                "UPDATE authenticators SET passkey = $3, sign_count = $4, backed_up = $5,
                    last_used_at = now()
                 WHERE project_id = $1 AND id = $2 RETURNING {AUTH_COLUMNS}"
            ),
            &[&project_id, &id, passkey, &sign_count, &backed_up],
        )
        .await?;
    Ok(authenticator_from_row(&row))
}

/// A WebAuthn ceremony in progress.
pub struct Ceremony {
    pub user_id: Option<Uuid>,
    pub name: Option<String>,
    pub state: serde_json::Value,
    pub expires_at: DateTime<Utc>,
}

pub const CEREMONY_REGISTRATION: i16 = 1;
pub const CEREMONY_AUTHENTICATION: i16 = 2;

/// Stores a ceremony's state, sweeping the project's expired ones on the way.
pub async fn insert_ceremony(
    db: &impl GenericClient,
    project_id: Uuid,
    id: Uuid,
    kind: i16,
    c: &Ceremony,
) -> Result<()> {
    db.execute(
        "DELETE FROM passkey_ceremonies WHERE expires_at < now() - interval '1 minute'",
        &[],
    )
    .await?;
    db.execute(
        "INSERT INTO passkey_ceremonies (project_id, id, kind, user_id, name, state, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &project_id,
            &id,
            &kind,
            &c.user_id,
            &c.name,
            &c.state,
            &c.expires_at,
        ],
    )
    .await?;
    Ok(())
}

/// Consumes a ceremony: a finish call gets it once, whatever its outcome.
pub async fn take_ceremony(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
    kind: i16,
) -> Result<Option<Ceremony>> {
    Ok(tx
        .query_opt(
            "DELETE FROM passkey_ceremonies WHERE project_id = $1 AND id = $2 AND kind = $3
             RETURNING user_id, name, state, expires_at",
            &[&project_id, &id, &kind],
        )
        .await?
        .map(|r| Ceremony {
            user_id: r.get(0),
            name: r.get(1),
            state: r.get(2),
            expires_at: r.get(3),
        }))
}

/// A project's WebAuthn relying party: (id, name, allowed origins, project name).
pub async fn relying_party(
    db: &impl GenericClient,
    project_id: Uuid,
) -> Result<Option<(Option<String>, Option<String>, Vec<String>, String)>> {
    Ok(db
        .query_opt(
            "SELECT webauthn_rp_id, webauthn_rp_name, webauthn_origins, name FROM projects
             WHERE id = $1",
            &[&project_id],
        )
        .await?
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))))
}

/// The project's name (the TOTP issuer).
pub async fn project_name(db: &impl GenericClient, project_id: Uuid) -> Result<String> {
    Ok(db
        .query_opt("SELECT name FROM projects WHERE id = $1", &[&project_id])
        .await?
        .map(|r| r.get(0))
        .unwrap_or_else(|| "Roster".to_string()))
}

/// Drops the user's unconfirmed enrolments of `kind` (a new enrolment replaces them).
pub async fn delete_unconfirmed(
    tx: &Transaction<'_>,
    project_id: Uuid,
    user_id: Uuid,
    kind: Kind,
) -> Result<()> {
    tx.execute(
        "DELETE FROM authenticators
         WHERE project_id = $1 AND user_id = $2 AND type = $3 AND NOT confirmed",
        &[&project_id, &user_id, &(kind as i16)],
    )
    .await?;
    Ok(())
}

/// How many authenticators the user has.
pub async fn count_authenticators(
    tx: &Transaction<'_>,
    project_id: Uuid,
    user_id: Uuid,
) -> Result<i64> {
    Ok(tx
        .query_one(
            "SELECT count(*) FROM authenticators WHERE project_id = $1 AND user_id = $2",
            &[&project_id, &user_id],
        )
        .await?
        .get(0))
}

/// Takes one SMS from the project's budget of `ceiling` that refills at `rate` per second, if
/// one is left, locking the row for the rest of the transaction: `Ok` when taken, else
/// `Err(owed)`, what the budget owes now.
pub async fn take_sms_budget(
    tx: &Transaction<'_>,
    project_id: Uuid,
    rate: f64,
    ceiling: f64,
) -> Result<std::result::Result<(), f64>> {
    let owed = "greatest(b.spent - greatest(extract(epoch FROM now() - b.at)::float8, 0) * $2, 0)";
    // A refused take changes nothing, but the conflicting row is locked all the same.
    let taken = tx
        .query_opt(
            &format!(
                "INSERT INTO sms_budgets AS b (project_id, spent, at) VALUES ($1, 1, now())
                 ON CONFLICT (project_id) DO UPDATE SET spent = {owed} + 1, at = now()
                 WHERE {owed} + 1 <= $3
                 RETURNING 1"
            ),
            &[&project_id, &rate, &ceiling],
        )
        .await?;
    if taken.is_some() {
        return Ok(Ok(()));
    }
    let row = tx
        .query_one(
            &format!("SELECT {owed} FROM sms_budgets b WHERE project_id = $1"),
            &[&project_id, &rate],
        )
        .await?;
    Ok(Err(row.get(0)))
}

/// The failures `ip` owes in the project, refilled at `rate` per second, as of now.
const IP_FAILURES_OWED: &str =
    "greatest(f.spent - greatest(extract(epoch FROM now() - f.at)::float8, 0) * $3, 0)";

/// Takes one failure for `ip` from a budget of `limit` that refills at `rate` per second, if
/// one is left: `(owed, refusals)` after the attempt, `refusals` 0 when it was taken, else how
/// many attempts in a row have now been refused. One statement, so concurrent attempts (on
/// any replica) count one by one under the row's lock.
pub async fn take_ip_failure(
    client: &impl GenericClient,
    project_id: Uuid,
    ip: std::net::IpAddr,
    rate: f64,
    limit: f64,
) -> Result<(f64, i32)> {
    let row = client
        .query_one(
            &format!(
                "INSERT INTO ip_failures AS f (project_id, ip, spent, at)
                 VALUES ($1, $2, 1, now())
                 ON CONFLICT ON CONSTRAINT ip_failures_pkey DO UPDATE SET
                     spent = {owed} + ({owed} + 1 <= $4)::int,
                     at = now(),
                     refusals = CASE WHEN {owed} + 1 <= $4 THEN 0 ELSE f.refusals + 1 END
                 RETURNING spent, refusals",
                owed = IP_FAILURES_OWED
            ),
            &[&project_id, &ip, &rate, &limit],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Gives back the failure an attempt took that did not fail; an address left owing nothing
/// loses its row (successful sign-ins leave none behind).
pub async fn give_back_ip_failure(
    client: &impl GenericClient,
    project_id: Uuid,
    ip: std::net::IpAddr,
    rate: f64,
) -> Result<()> {
    client
        .execute(
            &format!(
                "WITH gone AS (
                     DELETE FROM ip_failures f
                     WHERE project_id = $1 AND ip = $2 AND {owed} <= 1
                     RETURNING 1)
                 UPDATE ip_failures SET spent = greatest(spent - 1, 0)
                 WHERE project_id = $1 AND ip = $2 AND NOT EXISTS (SELECT FROM gone)",
                owed = IP_FAILURES_OWED
            ),
            &[&project_id, &ip, &rate],
        )
        .await?;
    Ok(())
}

/// Deletes up to `batch` rows of addresses untouched for `window_secs` (refilled by then);
/// rows in use are skipped, not waited for.
pub async fn purge_ip_failures(
    client: &impl GenericClient,
    window_secs: f64,
    batch: i64,
) -> Result<u64> {
    Ok(client
        .execute(
            "DELETE FROM ip_failures WHERE ctid IN (
                 SELECT ctid FROM ip_failures
                 WHERE at < now() - make_interval(secs => $1)
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&window_secs, &batch],
        )
        .await?)
}
