//! The SQL of identities. Every statement is scoped by `project_id`.
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use serde_json::Value;
use tokio_postgres::Row;
use uuid::Uuid;

use super::Identity;
use crate::error::Result;
use crate::users::User;
use crate::users::store::{USER_COLUMN_COUNT, USER_COLUMNS, user_from_row};

const IDENTITY_COLUMNS: &str = "i.id, i.user_id, i.provider, i.subject, i.connection, i.email, \
    i.profile, i.created_at, i.updated_at";

const IDENTITY_COLUMN_COUNT: usize = 9;

fn identity_from(r: &Row, first: usize) -> Identity {
    let profile = match r.get::<_, Value>(first + 6) {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    Identity {
        id: r.get(first),
        user_id: r.get(first + 1),
        provider: r.get(first + 2),
        subject: r.get(first + 3),
        connection: r.get(first + 4),
        email: r.get(first + 5),
        profile,
        created_at: r.get(first + 7),
        updated_at: r.get(first + 8),
    }
}

/// Sealed tokens as stored.
pub struct SealedTokens {
    pub access: Option<Vec<u8>>,
    pub refresh: Option<Vec<u8>>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Inserts unless (provider, subject) is taken; `None` when it is (also when a concurrent
/// link took it first: ON CONFLICT waits for that transaction).
#[allow(clippy::too_many_arguments)]
pub async fn insert(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
    user_id: Uuid,
    n: &super::NewIdentity,
    tokens: Option<&SealedTokens>,
) -> Result<Option<Identity>> {
    let (a, r, e) = match tokens {
        Some(t) => (t.access.clone(), t.refresh.clone(), t.expires_at),
        None => (None, None, None),
    };
    let row = tx
        .query_opt(
            &format!(
                "INSERT INTO identities AS i (project_id, id, user_id, provider, subject,
                    connection, email, profile, access_token, refresh_token, token_expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (project_id, provider, subject) DO NOTHING
                 RETURNING {IDENTITY_COLUMNS}"
            ),
            &[
                &project_id,
                &id,
                &user_id,
                &n.provider,
                &n.subject,
                &n.connection,
                &n.email,
                &Value::Object(n.profile.clone()),
                &a,
                &r,
                &e,
            ],
        )
        .await?;
    Ok(row.map(|r| identity_from(&r, 0)))
}

/// Refreshes a linked identity's details (and its tokens when given).
pub async fn refresh(
    tx: &Transaction<'_>,
    project_id: Uuid,
    id: Uuid,
    n: &super::NewIdentity,
    tokens: Option<&SealedTokens>,
) -> Result<Identity> {
    let replace = tokens.is_some();
    let (a, r, e) = match tokens {
        Some(t) => (t.access.clone(), t.refresh.clone(), t.expires_at),
        None => (None, None, None),
    };
    let row = tx
        .query_one(
            &format!(
                "UPDATE identities AS i SET connection = $3, email = $4, profile = $5,
                    access_token = CASE WHEN $6 THEN $7 ELSE access_token END,
                    refresh_token = CASE WHEN $6 THEN $8 ELSE refresh_token END,
                    token_expires_at = CASE WHEN $6 THEN $9 ELSE token_expires_at END,
                    updated_at = now()
                 WHERE project_id = $1 AND id = $2
                 RETURNING {IDENTITY_COLUMNS}"
            ),
            &[
                &project_id,
                &id,
                &n.connection,
                &n.email,
                &Value::Object(n.profile.clone()),
                &replace,
                &a,
                &r,
                &e,
            ],
        )
        .await?;
    Ok(identity_from(&row, 0))
}

/// The identity (provider, subject), locked when `for_update`.
pub async fn find(
    db: &impl GenericClient,
    project_id: Uuid,
    provider: &str,
    subject: &str,
    for_update: bool,
) -> Result<Option<Identity>> {
    let lock = if for_update { " FOR UPDATE" } else { "" };
    let row = db
        .query_opt(
            &format!(
                "SELECT {IDENTITY_COLUMNS} FROM identities i
                 WHERE i.project_id = $1 AND i.provider = $2 AND i.subject = $3{lock}"
            ),
            &[&project_id, &provider, &subject],
        )
        .await?;
    Ok(row.map(|r| identity_from(&r, 0)))
}

/// The social-login lookup: the user and identity for (provider, subject), one indexed query.
pub async fn lookup_user(
    db: &impl GenericClient,
    project_id: Uuid,
    provider: &str,
    subject: &str,
) -> Result<Option<(User, Identity)>> {
    // The user's columns come from a lateral subquery so that USER_COLUMNS (which refers to
    // `users` by name) applies unchanged, and identity columns cannot shadow them.
    let stmt = db
        .prepare_cached(&format!(
            "SELECT u.*, {IDENTITY_COLUMNS} FROM identities i,
             LATERAL (SELECT {USER_COLUMNS} FROM users
                      WHERE users.project_id = i.project_id AND users.id = i.user_id) u
             WHERE i.project_id = $1 AND i.provider = $2 AND i.subject = $3"
        ))
        .await?;
    let row = db
        .query_opt(&stmt, &[&project_id, &provider, &subject])
        .await?;
    Ok(row.map(|r| {
        let user = user_from_row(&r);
        (user, identity_from(&r, USER_COLUMN_COUNT))
    }))
}

/// The users (with their identity) that the (provider, subject) pairs of `keys` name in
/// `project_id`, each labelled with its pair's position in `keys`; a pair linked to no user
/// is simply absent. One statement for any number: one probe of the unique (project,
/// provider, subject) index per pair, then the user by primary key (checked with EXPLAIN on
/// the generic plan).
pub async fn lookup_users_many(
    db: &impl GenericClient,
    project_id: Uuid,
    keys: &[(&str, &str)],
) -> Result<Vec<(usize, User, Identity)>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT u.*, {IDENTITY_COLUMNS}, k.n
             FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS k(provider, subject, n)
             CROSS JOIN LATERAL (
                 SELECT * FROM identities
                 WHERE project_id = $1 AND provider = k.provider AND subject = k.subject) i
             CROSS JOIN LATERAL (
                 SELECT {USER_COLUMNS} FROM users
                 WHERE users.project_id = i.project_id AND users.id = i.user_id) u"
        ))
        .await?;
    let (providers, subjects): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
    Ok(db
        .query(&stmt, &[&project_id, &providers, &subjects])
        .await?
        .iter()
        .map(|r| {
            // Ordinals count from 1.
            let n: i64 = r.get(USER_COLUMN_COUNT + IDENTITY_COLUMN_COUNT);
            let identity = identity_from(r, USER_COLUMN_COUNT);
            ((n - 1) as usize, user_from_row(r), identity)
        })
        .collect())
}

pub async fn list_of_user(
    db: &impl GenericClient,
    project_id: Uuid,
    user_id: Uuid,
) -> Result<Vec<Identity>> {
    let rows = db
        .query(
            &format!(
                "SELECT {IDENTITY_COLUMNS} FROM identities i
                 WHERE i.project_id = $1 AND i.user_id = $2 ORDER BY i.created_at, i.id"
            ),
            &[&project_id, &user_id],
        )
        .await?;
    Ok(rows.iter().map(|r| identity_from(r, 0)).collect())
}

pub async fn delete(tx: &Transaction<'_>, project_id: Uuid, id: Uuid) -> Result<()> {
    tx.execute(
        "DELETE FROM identities WHERE project_id = $1 AND id = $2",
        &[&project_id, &id],
    )
    .await?;
    Ok(())
}

/// Moves one identity to another user.
pub async fn move_one(tx: &Transaction<'_>, project_id: Uuid, id: Uuid, to: Uuid) -> Result<()> {
    tx.execute(
        "UPDATE identities SET user_id = $3, updated_at = now() WHERE project_id = $1 AND id = $2",
        &[&project_id, &id, &to],
    )
    .await?;
    Ok(())
}

/// Moves every identity of `from` to `to`; returns how many moved.
pub async fn move_all(tx: &Transaction<'_>, project_id: Uuid, from: Uuid, to: Uuid) -> Result<u64> {
    Ok(tx
        .execute(
            "UPDATE identities SET user_id = $3, updated_at = now()
             WHERE project_id = $1 AND user_id = $2",
            &[&project_id, &from, &to],
        )
        .await?)
}

/// The sealed tokens of an identity of `user_id`.
pub async fn tokens(
    db: &impl GenericClient,
    project_id: Uuid,
    user_id: Uuid,
    provider: &str,
    subject: &str,
) -> Result<Option<(Uuid, SealedTokens)>> {
    let row = db
        .query_opt(
            "SELECT id, access_token, refresh_token, token_expires_at FROM identities
             WHERE project_id = $1 AND user_id = $2 AND provider = $3 AND subject = $4",
            &[&project_id, &user_id, &provider, &subject],
        )
        .await?;
    Ok(row.map(|r| {
        (
            r.get(0),
            SealedTokens {
                access: r.get(1),
                refresh: r.get(2),
                expires_at: r.get(3),
            },
        )
    }))
}
