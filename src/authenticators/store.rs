//! The SQL of credentials: password hashes, sign-in bookkeeping and reset tokens. Every
//! statement is scoped by `project_id`. Password hashes are read here and nowhere else; they
//! never reach a `User`.
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use uuid::Uuid;

use crate::error::Result;
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
            "UPDATE users SET failed_logins = 0, locked_until = NULL,
                login_count = login_count + CASE WHEN $3 THEN 1 ELSE 0 END,
                last_login_at = CASE WHEN $3 THEN now() ELSE last_login_at END,
                last_login_ip = CASE WHEN $3 THEN $4 ELSE last_login_ip END,
                status = CASE WHEN $5 THEN 1 ELSE status END,
                version = version + CASE WHEN $5 THEN 1 ELSE 0 END,
                updated_at = CASE WHEN $5 THEN now() ELSE updated_at END,
                password_hash = coalesce($6, password_hash)
             WHERE project_id = $1 AND id = $2
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
