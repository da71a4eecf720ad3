//! The SQL of ImportUsers and ExportUsers.
//!
//! Import stages a batch with binary COPY into temporary tables (per connection, emptied at
//! every commit or rollback) and then works set-based: one query finds every clash, one INSERT
//! creates, one UPDATE applies UPSERT matches, one INSERT links identities. Export reads one
//! REPEATABLE READ snapshot through a portal, a chunk of rows at a time.
use std::collections::{HashMap, HashSet};
use std::pin::pin;

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, ToSql, Type};
use uuid::Uuid;

use super::import::{CarriedFactor, CarriedPasskey, ImportIdentity};
use super::store::{USER_COLUMNS, filter_field};
use super::{Profile, UserStatus};
use crate::authenticators::Kind;
use crate::crypto::seal::Sealer;
use crate::error::{Error, Reason, Result};
use crate::query::filter::Expr;
use crate::query::sql::{self, Sql};

/// A record as staged: `idx` is its place among the batch's valid records.
pub struct StagedUser<'a> {
    pub idx: i32,
    pub id: Uuid,
    pub profile: &'a Profile,
    pub status: UserStatus,
    pub blocked_reason: Option<&'a str>,
    pub require_password_change: bool,
    pub password_hash: Option<&'a str>,
    pub created_at: Option<DateTime<Utc>>,
    pub last_login_at: Option<DateTime<Utc>>,
}

pub struct StagedIdentity<'a> {
    pub idx: i32,
    pub id: Uuid,
    pub identity: &'a ImportIdentity,
}

/// The stored users holding each unique value of one staged record.
#[derive(Debug, Default, Clone)]
pub struct Clash {
    pub by_id: Option<Uuid>,
    pub by_email: Option<Uuid>,
    pub by_phone: Option<Uuid>,
    pub by_username: Option<Uuid>,
    pub by_external_id: Option<Uuid>,
}

/// Creates this connection's staging tables unless it has them. Temporary tables are not
/// WAL-logged, and ON COMMIT DELETE ROWS leaves them empty for the next batch.
pub async fn create_staging(db: &impl GenericClient) -> Result<()> {
    db.batch_execute(
        "SET client_min_messages = warning;
         CREATE TEMP TABLE IF NOT EXISTS roster_import_users (
            idx int4 NOT NULL, id uuid NOT NULL, external_id text, email text,
            email_verified bool NOT NULL, phone_number text, phone_verified bool NOT NULL,
            username text, display_name text, given_name text, family_name text,
            picture_url text, locale text, timezone text, status int2 NOT NULL,
            user_metadata jsonb, app_metadata jsonb, password_hash text, created_at timestamptz,
            blocked_reason text, require_password_change bool NOT NULL,
            last_login_at timestamptz
         ) ON COMMIT DELETE ROWS;
         CREATE TEMP TABLE IF NOT EXISTS roster_import_identities (
            idx int4 NOT NULL, id uuid NOT NULL, provider text NOT NULL, subject text NOT NULL,
            connection text, email text, profile jsonb NOT NULL
         ) ON COMMIT DELETE ROWS;
         RESET client_min_messages;",
    )
    .await?;
    Ok(())
}

const USER_TYPES: [Type; 22] = [
    Type::INT4,
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::BOOL,
    Type::TEXT,
    Type::BOOL,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT2,
    Type::JSONB,
    Type::JSONB,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::BOOL,
    Type::TIMESTAMPTZ,
];

const IDENTITY_TYPES: [Type; 7] = [
    Type::INT4,
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
];

/// Copies a batch into the staging tables.
pub async fn stage(
    tx: &Transaction<'_>,
    users: &[StagedUser<'_>],
    identities: &[StagedIdentity<'_>],
) -> Result<()> {
    let sink = tx
        .copy_in("COPY roster_import_users FROM STDIN (FORMAT binary)")
        .await?;
    let mut writer = pin!(BinaryCopyInWriter::new(sink, &USER_TYPES));
    for u in users {
        let p = u.profile;
        // An empty metadata object means "not given" (an UPSERT leaves the stored one).
        let meta = |m| (!serde_json::Map::is_empty(m)).then_some(Json(m));
        let (user_metadata, app_metadata) = (meta(&p.user_metadata), meta(&p.app_metadata));
        let status = u.status as i16;
        let mut row: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(USER_TYPES.len());
        row.extend_from_slice(&[&u.idx, &u.id]);
        row.extend(super::store::profile_columns(p));
        row.extend_from_slice(&[
            &status,
            &user_metadata,
            &app_metadata,
            &u.password_hash,
            &u.created_at,
            &u.blocked_reason,
            &u.require_password_change,
            &u.last_login_at,
        ]);
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    if identities.is_empty() {
        return Ok(());
    }
    let sink = tx
        .copy_in("COPY roster_import_identities FROM STDIN (FORMAT binary)")
        .await?;
    let mut writer = pin!(BinaryCopyInWriter::new(sink, &IDENTITY_TYPES));
    for s in identities {
        let i = s.identity;
        let profile = Json(&i.profile);
        let row: [&(dyn ToSql + Sync); 7] = [
            &s.idx,
            &s.id,
            &i.provider,
            &i.subject,
            &i.connection,
            &i.email,
            &profile,
        ];
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    Ok(())
}

/// Every stored user holding a unique value of a staged record (only records with a hit),
/// and the user linked to any of each record's identities.
pub async fn clashes(
    tx: &Transaction<'_>,
    project_id: Uuid,
) -> Result<(HashMap<i32, Clash>, HashMap<i32, Uuid>)> {
    // Each subquery is one probe of the matching unique index.
    let stmt = tx
        .prepare_cached(
            "SELECT * FROM (
                SELECT s.idx,
                  (SELECT u.id FROM users u WHERE u.project_id = $1 AND u.id = s.id) AS a,
                  (SELECT u.id FROM users u WHERE u.project_id = $1
                     AND lower(u.email) = lower(s.email)) AS b,
                  (SELECT u.id FROM users u WHERE u.project_id = $1
                     AND u.phone_number = s.phone_number) AS c,
                  (SELECT u.id FROM users u WHERE u.project_id = $1
                     AND lower(u.username) = lower(s.username)) AS d,
                  (SELECT u.id FROM users u WHERE u.project_id = $1
                     AND u.external_id = s.external_id) AS e
                FROM roster_import_users s
             ) h
             WHERE a IS NOT NULL OR b IS NOT NULL OR c IS NOT NULL OR d IS NOT NULL
                OR e IS NOT NULL",
        )
        .await?;
    let users = tx
        .query(&stmt, &[&project_id])
        .await?
        .iter()
        .map(|r| {
            (
                r.get::<_, i32>(0),
                Clash {
                    by_id: r.get(1),
                    by_email: r.get(2),
                    by_phone: r.get(3),
                    by_username: r.get(4),
                    by_external_id: r.get(5),
                },
            )
        })
        .collect();
    let stmt = tx
        .prepare_cached(
            "SELECT s.idx, i.user_id FROM roster_import_identities s
             JOIN identities i ON i.project_id = $1 AND i.provider = s.provider
                AND i.subject = s.subject",
        )
        .await?;
    let identities = tx
        .query(&stmt, &[&project_id])
        .await?
        .iter()
        .map(|r| (r.get::<_, i32>(0), r.get::<_, Uuid>(1)))
        .collect();
    Ok((users, identities))
}

/// Of the staged records `candidates` (idx, the user holding its id), those whose user the
/// import run `run` created (its USER_IMPORTED event says so) and which is still linked to
/// every identity the record carries.
pub async fn created_by_run(
    tx: &Transaction<'_>,
    project_id: Uuid,
    run: &str,
    candidates: &[(i32, Uuid)],
) -> Result<HashSet<i32>> {
    let (idxs, holders): (Vec<i32>, Vec<Uuid>) = candidates.iter().copied().unzip();
    let stmt = tx
        .prepare_cached(
            "SELECT c.idx FROM unnest($2::int[], $3::uuid[]) AS c(idx, holder)
             WHERE EXISTS (
                 SELECT 1 FROM events e
                 WHERE e.project_id = $1 AND e.user_id = c.holder AND e.type = 'USER_IMPORTED'
                   AND e.data->>'run_id' = $4 AND e.data->>'outcome' = 'CREATED')
               AND NOT EXISTS (
                 SELECT 1 FROM roster_import_identities s
                 LEFT JOIN identities i ON i.project_id = $1 AND i.provider = s.provider
                      AND i.subject = s.subject
                 WHERE s.idx = c.idx AND i.user_id IS DISTINCT FROM c.holder)",
        )
        .await?;
    Ok(tx
        .query(&stmt, &[&project_id, &idxs, &holders, &run])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Creates the staged users whose idx is in `$2` (in project `$1`).
const INSERT_USERS: &str = "INSERT INTO users (project_id, id, external_id, email, email_verified,
        phone_number, phone_verified, username, display_name, given_name, family_name,
        picture_url, locale, timezone, status, user_metadata, app_metadata, password_hash,
        password_changed_at, created_at, updated_at, blocked_reason, require_password_change,
        last_login_at)
     SELECT $1, s.id, s.external_id, s.email, s.email_verified, s.phone_number,
        s.phone_verified, s.username, s.display_name, s.given_name, s.family_name,
        s.picture_url, s.locale, s.timezone, s.status,
        coalesce(s.user_metadata, '{}'), coalesce(s.app_metadata, '{}'),
        s.password_hash, CASE WHEN s.password_hash IS NULL THEN NULL ELSE now() END,
        coalesce(s.created_at, now()), now(), s.blocked_reason, s.require_password_change,
        s.last_login_at
     FROM roster_import_users s WHERE s.idx = ANY($2)";

/// Creates the staged users `idxs`. A plain INSERT: the clash check just ran in this
/// transaction, and ON CONFLICT would add a speculative probe of every unique index per row
/// (a fifth of the cost). A unique value a concurrent writer took meanwhile surfaces as
/// ALREADY_EXISTS, which the caller answers by planning the batch again from its savepoint.
pub async fn insert_users(tx: &Transaction<'_>, project_id: Uuid, idxs: &[i32]) -> Result<()> {
    if idxs.is_empty() {
        return Ok(());
    }
    let stmt = tx.prepare_cached(INSERT_USERS).await?;
    tx.execute(&stmt, &[&project_id, &idxs]).await?;
    Ok(())
}

/// Like [`insert_users`], but a row whose unique value another transaction took meanwhile
/// is skipped (ON CONFLICT DO NOTHING, which waits for that transaction to finish); returns
/// the idxs created. Used only after a batch has lost such a race once.
pub async fn insert_users_skipping_clashes(
    tx: &Transaction<'_>,
    project_id: Uuid,
    idxs: &[i32],
) -> Result<Vec<i32>> {
    if idxs.is_empty() {
        return Ok(vec![]);
    }
    let stmt = tx
        .prepare_cached(&format!(
            "WITH created AS ({INSERT_USERS} ON CONFLICT DO NOTHING RETURNING id)
             SELECT s.idx FROM roster_import_users s JOIN created c ON c.id = s.id"
        ))
        .await?;
    Ok(tx
        .query(&stmt, &[&project_id, &idxs])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Applies UPSERT matches `(idx, user id)`: the fields a record sets replace the stored ones
/// (an email or phone brings its `*_verified` along); a record's blocked, deactivated and
/// require_password_change only ever restrict (block a user not blocked, deactivate an
/// active or pending one, set the flag), never lift; rows that would not change are left
/// alone, so re-running an import writes nothing. Returns the idxs of users changed.
pub async fn update_users(
    tx: &Transaction<'_>,
    project_id: Uuid,
    matches: &[(i32, Uuid)],
) -> Result<HashSet<i32>> {
    if matches.is_empty() {
        return Ok(HashSet::new());
    }
    let idxs: Vec<i32> = matches.iter().map(|m| m.0).collect();
    let ids: Vec<Uuid> = matches.iter().map(|m| m.1).collect();
    let stmt = tx
        .prepare_cached(
            "WITH n AS (
                SELECT m.idx, u.id,
                  coalesce(s.external_id, u.external_id) AS external_id,
                  coalesce(s.email, u.email) AS email,
                  CASE WHEN s.email IS NULL THEN u.email_verified
                       ELSE s.email_verified END AS email_verified,
                  coalesce(s.phone_number, u.phone_number) AS phone_number,
                  CASE WHEN s.phone_number IS NULL THEN u.phone_verified
                       ELSE s.phone_verified END AS phone_verified,
                  coalesce(s.username, u.username) AS username,
                  coalesce(s.display_name, u.display_name) AS display_name,
                  coalesce(s.given_name, u.given_name) AS given_name,
                  coalesce(s.family_name, u.family_name) AS family_name,
                  coalesce(s.picture_url, u.picture_url) AS picture_url,
                  coalesce(s.locale, u.locale) AS locale,
                  coalesce(s.timezone, u.timezone) AS timezone,
                  coalesce(s.user_metadata, u.user_metadata) AS user_metadata,
                  coalesce(s.app_metadata, u.app_metadata) AS app_metadata,
                  coalesce(s.password_hash, u.password_hash) AS password_hash,
                  CASE WHEN s.status = 3 AND u.status <> 3 THEN 3
                       WHEN s.status = 4 AND u.status IN (1, 2) THEN 4
                       ELSE u.status END AS status,
                  CASE WHEN s.status = 3 AND u.status <> 3 THEN s.blocked_reason
                       ELSE u.blocked_reason END AS blocked_reason,
                  u.require_password_change OR s.require_password_change
                    AS require_password_change,
                  greatest(u.last_login_at, s.last_login_at) AS last_login_at
                FROM unnest($2::int4[], $3::uuid[]) AS m(idx, id)
                JOIN roster_import_users s ON s.idx = m.idx
                JOIN users u ON u.project_id = $1 AND u.id = m.id
             )
             UPDATE users u SET external_id = n.external_id, email = n.email,
                email_verified = n.email_verified, phone_number = n.phone_number,
                phone_verified = n.phone_verified, username = n.username,
                display_name = n.display_name, given_name = n.given_name,
                family_name = n.family_name, picture_url = n.picture_url, locale = n.locale,
                timezone = n.timezone, user_metadata = n.user_metadata,
                app_metadata = n.app_metadata, password_hash = n.password_hash,
                status = n.status, blocked_reason = n.blocked_reason,
                require_password_change = n.require_password_change,
                last_login_at = n.last_login_at,
                password_changed_at = CASE WHEN n.password_hash IS DISTINCT FROM u.password_hash
                    THEN now() ELSE u.password_changed_at END,
                failed_logins = CASE WHEN n.password_hash IS DISTINCT FROM u.password_hash
                    THEN 0 ELSE u.failed_logins END,
                version = u.version + 1, updated_at = now()
             FROM n WHERE u.project_id = $1 AND u.id = n.id
               AND (n.external_id, n.email, n.email_verified, n.phone_number, n.phone_verified,
                    n.username, n.display_name, n.given_name, n.family_name, n.picture_url,
                    n.locale, n.timezone, n.user_metadata, n.app_metadata, n.password_hash,
                    n.status, n.blocked_reason, n.require_password_change, n.last_login_at)
                   IS DISTINCT FROM
                   (u.external_id, u.email, u.email_verified, u.phone_number, u.phone_verified,
                    u.username, u.display_name, u.given_name, u.family_name, u.picture_url,
                    u.locale, u.timezone, u.user_metadata, u.app_metadata, u.password_hash,
                    u.status, u.blocked_reason, u.require_password_change, u.last_login_at)
             RETURNING n.idx",
        )
        .await?;
    Ok(tx
        .query(&stmt, &[&project_id, &idxs, &ids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Before `update_users`: files the current hash of each user a staged record gives another
/// one in the password history, then keeps each such user's newest `keep` (as SetPassword's
/// `file_password_history` does, for a batch in two statements).
pub async fn file_replaced_hashes(
    tx: &Transaction<'_>,
    project_id: Uuid,
    matches: &[(i32, Uuid)],
    keep: u32,
) -> Result<()> {
    let idxs: Vec<i32> = matches.iter().map(|m| m.0).collect();
    let ids: Vec<Uuid> = matches.iter().map(|m| m.1).collect();
    let filed = tx
        .prepare_cached(
            "INSERT INTO password_history (project_id, user_id, hash)
             SELECT $1, u.id, u.password_hash
             FROM unnest($2::int4[], $3::uuid[]) AS m(idx, id)
             JOIN roster_import_users s ON s.idx = m.idx
             JOIN users u ON u.project_id = $1 AND u.id = m.id
             WHERE s.password_hash IS NOT NULL AND u.password_hash IS NOT NULL
               AND s.password_hash <> u.password_hash
             RETURNING user_id",
        )
        .await?;
    let users: Vec<Uuid> = tx
        .query(&filed, &[&project_id, &idxs, &ids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if users.is_empty() {
        return Ok(());
    }
    let trim = tx
        .prepare_cached(
            "DELETE FROM password_history h USING (
                 SELECT user_id, seq, row_number() OVER (PARTITION BY user_id ORDER BY seq DESC)
                 FROM password_history WHERE project_id = $1 AND user_id = ANY($2)) old
             WHERE h.project_id = $1 AND h.user_id = old.user_id AND h.seq = old.seq
               AND old.row_number > $3",
        )
        .await?;
    tx.execute(&trim, &[&project_id, &users, &i64::from(keep)])
        .await?;
    Ok(())
}

/// Links the staged identities of the records written, `(idx, user id)`; identities already
/// linked to that user stay as they are. Returns the idxs that gained an identity.
pub async fn insert_identities(
    tx: &Transaction<'_>,
    project_id: Uuid,
    owners: &[(i32, Uuid)],
) -> Result<HashSet<i32>> {
    if owners.is_empty() {
        return Ok(HashSet::new());
    }
    let idxs: Vec<i32> = owners.iter().map(|m| m.0).collect();
    let ids: Vec<Uuid> = owners.iter().map(|m| m.1).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO identities (project_id, id, user_id, provider, subject, connection,
                email, profile)
             SELECT $1, s.id, m.user_id, s.provider, s.subject, s.connection, s.email, s.profile
             FROM roster_import_identities s
             JOIN unnest($2::int4[], $3::uuid[]) AS m(idx, user_id) ON s.idx = m.idx
             ON CONFLICT (project_id, provider, subject) DO NOTHING
             RETURNING user_id",
        )
        .await?;
    // Within a batch each user is written by one record (see `import::Batch`).
    let idx_of: HashMap<Uuid, i32> = owners.iter().map(|(i, u)| (*u, *i)).collect();
    Ok(tx
        .query(&stmt, &[&project_id, &idxs, &ids])
        .await?
        .iter()
        .filter_map(|r| idx_of.get(&r.get::<_, Uuid>(0)).copied())
        .collect())
}

/// Enrolls each created user's carried factors, confirmed: one INSERT for the authenticators
/// (TOTP seeds sealed under this server's key, bound to their new ids; a set of recovery
/// codes marked as made elsewhere, so its codes are also checked as issued), one for the
/// recovery codes, one giving each user without a default its oldest factor that can be one
/// (as `ensure_default` picks). A passkey whose credential id the project already has (another
/// user's) is left out; returns how many were, per user.
pub async fn insert_factors(
    tx: &Transaction<'_>,
    project_id: Uuid,
    sealer: Option<&Sealer>,
    users: &[(Uuid, &[CarriedFactor])],
) -> Result<HashMap<Uuid, usize>> {
    let now = Utc::now();
    let (mut ids, mut user_ids, mut kinds, mut names, mut defaults) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut created, mut seeds, mut emails, mut phones) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut credential_ids, mut passkeys, mut aaguids, mut transports, mut backed_up) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut sign_counts = Vec::new();
    let (mut code_owners, mut code_hashes) = (Vec::new(), Vec::new());
    let mut passkey_owner: HashMap<Uuid, Uuid> = HashMap::new();
    for (user_id, factors) in users {
        for f in factors.iter() {
            let id = Uuid::now_v7();
            let sealed = match &f.totp_secret {
                Some(seed) => {
                    let sealer = sealer.ok_or_else(|| Error::FailedPrecondition {
                        reason: Reason::EncryptionNotConfigured,
                        message: "TOTP seeds need ROSTER_ENCRYPTION_KEYS to be configured".into(),
                    })?;
                    let context = crate::authenticators::totp::seal_context(project_id, id);
                    Some(sealer.seal(seed, &context).map_err(Error::internal)?)
                }
                None => None,
            };
            if f.kind == Kind::RecoveryCodes {
                for h in &f.recovery_code_hashes {
                    code_owners.push(id);
                    code_hashes.push(h.clone());
                }
            }
            let p = f.passkey.as_ref();
            if p.is_some() {
                passkey_owner.insert(id, *user_id);
            }
            ids.push(id);
            user_ids.push(*user_id);
            kinds.push(f.kind as i16);
            names.push(f.name.clone());
            defaults.push(f.is_default);
            created.push(f.created_at.unwrap_or(now));
            seeds.push(sealed);
            emails.push(f.email.clone());
            phones.push(f.phone_number.clone());
            credential_ids.push(p.map(|p| p.credential_id.clone()));
            passkeys.push(p.map(|p| Json(p.stored.clone())));
            aaguids.push(p.and_then(|p| p.aaguid));
            // An array of arrays cannot be ragged: the transports travel as one text each.
            transports.push(p.map(|p| p.transports.join(",")).unwrap_or_default());
            backed_up.push(p.is_some_and(|p| p.backed_up));
            sign_counts.push(p.map_or(0, |p| p.sign_count));
        }
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO authenticators (project_id, id, user_id, type, name, confirmed,
                is_default, created_at, totp_secret, email, phone_number, credential_id,
                passkey, aaguid, transports, backed_up, sign_count, foreign_codes)
             SELECT $1, id, user_id, type, name, true, is_default, created_at, totp_secret,
                email, phone_number, credential_id, passkey, aaguid,
                coalesce(string_to_array(nullif(transports, ''), ','), '{}'), backed_up, sign_count,
                type = 6
             FROM unnest($2::uuid[], $3::uuid[], $4::int2[], $5::text[], $6::bool[],
                         $7::timestamptz[], $8::bytea[], $9::text[], $10::text[],
                         $11::bytea[], $12::jsonb[], $13::uuid[], $14::text[], $15::bool[],
                         $16::int8[])
                AS f(id, user_id, type, name, is_default, created_at, totp_secret, email,
                     phone_number, credential_id, passkey, aaguid, transports, backed_up,
                     sign_count)
             ON CONFLICT (project_id, credential_id) DO NOTHING
             RETURNING id",
        )
        .await?;
    let inserted: HashSet<Uuid> = tx
        .query(
            &stmt,
            &[
                &project_id,
                &ids,
                &user_ids,
                &kinds,
                &names,
                &defaults,
                &created,
                &seeds,
                &emails,
                &phones,
                &credential_ids,
                &passkeys,
                &aaguids,
                &transports,
                &backed_up,
                &sign_counts,
            ],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut skipped: HashMap<Uuid, usize> = HashMap::new();
    for (id, user) in &passkey_owner {
        if !inserted.contains(id) {
            *skipped.entry(*user).or_default() += 1;
        }
    }
    // Each user without a default (none marked, or the marked one left out) gets one.
    let owners: Vec<Uuid> = users.iter().map(|(u, _)| *u).collect();
    let stmt = tx
        .prepare_cached(
            "UPDATE authenticators a SET is_default = true
             FROM (SELECT DISTINCT ON (user_id) id FROM authenticators
                   WHERE project_id = $1 AND user_id = ANY($2) AND confirmed
                     AND type NOT IN (1, 6)
                   ORDER BY user_id, created_at, id) d
             WHERE a.project_id = $1 AND a.id = d.id
               AND NOT EXISTS (SELECT 1 FROM authenticators b
                               WHERE b.project_id = $1 AND b.user_id = a.user_id
                                 AND b.is_default)",
        )
        .await?;
    tx.execute(&stmt, &[&project_id, &owners]).await?;
    if !code_owners.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO recovery_codes (project_id, authenticator_id, code_hash)
                 SELECT $1, a, h FROM unnest($2::uuid[], $3::bytea[]) AS c(a, h)",
            )
            .await?;
        tx.execute(&stmt, &[&project_id, &code_owners, &code_hashes])
            .await?;
    }
    Ok(skipped)
}

/// The confirmed second factors of `users` that an export carries (TOTP with its seed still
/// sealed, each set of recovery codes with the hashes of its unused codes, OTP channels),
/// each user's oldest first, with their ids (the seal is bound to them). Passkeys are left
/// out, and so is a set of recovery codes all spent.
pub async fn factors_of(
    tx: &Transaction<'_>,
    project_id: Uuid,
    users: &[Uuid],
) -> Result<HashMap<Uuid, Vec<(Uuid, CarriedFactor)>>> {
    let stmt = tx
        .prepare_cached(
            "SELECT a.user_id, a.id, a.type, a.name, a.is_default, a.created_at, a.totp_secret,
                a.email, a.phone_number,
                ARRAY(SELECT c.code_hash FROM recovery_codes c
                      WHERE c.project_id = a.project_id AND c.authenticator_id = a.id
                        AND c.used_at IS NULL ORDER BY c.code_hash),
                a.credential_id, a.passkey, a.aaguid, a.transports, a.backed_up, a.sign_count
             FROM authenticators a
             WHERE a.project_id = $1 AND a.user_id = ANY($2) AND a.confirmed
               AND a.type IN (2, 3, 4, 5, 6)
             ORDER BY a.user_id, a.created_at, a.id",
        )
        .await?;
    let mut out: HashMap<Uuid, Vec<(Uuid, CarriedFactor)>> = HashMap::new();
    for r in tx.query(&stmt, &[&project_id, &users]).await? {
        let Some(kind) = Kind::from_i16(r.get(2)) else {
            continue;
        };
        let codes: Vec<Vec<u8>> = r.get(9);
        if kind == Kind::RecoveryCodes && codes.is_empty() {
            continue;
        }
        out.entry(r.get(0)).or_default().push((
            r.get(1),
            CarriedFactor {
                kind,
                name: r.get(3),
                is_default: r.get(4),
                created_at: Some(r.get(5)),
                totp_secret: r.get(6),
                recovery_code_hashes: codes,
                email: r.get(7),
                phone_number: r.get(8),
                passkey: match (r.get::<_, Option<Vec<u8>>>(10), r.get(11)) {
                    (Some(credential_id), Some(stored)) => Some(CarriedPasskey {
                        stored,
                        credential_id,
                        aaguid: r.get(12),
                        transports: r.get(13),
                        backed_up: r.get(14),
                        sign_count: r.get(15),
                    }),
                    _ => None,
                },
            },
        ));
    }
    Ok(out)
}

// ---- export ----

/// What an export reads.
pub struct ExportSpec {
    pub filter: Option<Expr>,
    /// Read each chunk's linked identities too (one query per chunk).
    pub with_identities: bool,
    /// Read each chunk's second factors too (one query per chunk), opening TOTP seeds.
    pub with_factors: bool,
    pub with_password_hash: bool,
}

/// The linked identities of `users` (one query), in the shape an import takes them, each
/// user's oldest first. Provider tokens are never read.
pub async fn identities_of(
    tx: &Transaction<'_>,
    project_id: Uuid,
    users: &[Uuid],
) -> Result<HashMap<Uuid, Vec<ImportIdentity>>> {
    let stmt = tx
        .prepare_cached(
            "SELECT user_id, provider, subject, connection, email, profile FROM identities
             WHERE project_id = $1 AND user_id = ANY($2) ORDER BY user_id, created_at, id",
        )
        .await?;
    let mut out: HashMap<Uuid, Vec<ImportIdentity>> = HashMap::new();
    for r in tx.query(&stmt, &[&project_id, &users]).await? {
        out.entry(r.get(0)).or_default().push(ImportIdentity {
            provider: r.get(1),
            subject: r.get(2),
            connection: r.get(3),
            email: r.get(4),
            profile: match r.get::<_, serde_json::Value>(5) {
                serde_json::Value::Object(m) => m,
                _ => serde_json::Map::new(),
            },
        });
    }
    Ok(out)
}

/// Rows fetched per round trip from the export portal.
pub const EXPORT_CHUNK: i32 = 1000;

/// Opens the export query on `tx` (which must be a REPEATABLE READ snapshot) as a portal;
/// read it with `tx.query_portal(&portal, EXPORT_CHUNK)`. Rows are read by
/// `store::user_from_row`, with the password hash (or NULL) after the user's columns.
pub async fn open_export(
    tx: &Transaction<'_>,
    project_id: Uuid,
    spec: &ExportSpec,
) -> Result<tokio_postgres::Portal> {
    let mut sql = Sql::new();
    let hash = if spec.with_password_hash {
        "password_hash"
    } else {
        "NULL::text"
    };
    let p = sql.param(project_id);
    sql.push(&format!(
        "SELECT {USER_COLUMNS}, {hash} FROM users WHERE project_id = {p}"
    ));
    if let Some(f) = &spec.filter {
        sql.push(" AND ");
        sql::compile(f, filter_field, &mut sql)
            .map_err(|e| Error::invalid("filter", e.to_string()))?;
    }
    sql.push(" ORDER BY id");
    let stmt = tx.prepare(&sql.text).await?;
    Ok(tx.bind(&stmt, &sql.params()).await?)
}
