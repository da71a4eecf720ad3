//! Rotating the keys that seal secrets at rest. Listing a new key first makes it seal every
//! new value, but values sealed earlier keep naming their old key, which must stay configured
//! until they are sealed again: [`key_use`] says which keys the stored values need, and
//! [`reseal`] seals every value that does not use the current key again under it, so the old
//! key can then be dropped (`roster encryption status|reseal`).
use std::collections::BTreeMap;

use anyhow::Context;
use uuid::Uuid;

use super::seal::Sealer;

/// A column of sealed values, and the associated data each of its values is sealed with.
struct SealedColumn {
    table: &'static str,
    column: &'static str,
    context: fn(Uuid, Uuid) -> Vec<u8>,
}

/// Every column Roster seals values into (each table keyed by `(project_id, id)`).
const COLUMNS: &[SealedColumn] = &[
    SealedColumn {
        table: "identities",
        column: "access_token",
        context: |p, id| crate::identities::ops::token_context(p, id, "access_token"),
    },
    SealedColumn {
        table: "identities",
        column: "refresh_token",
        context: |p, id| crate::identities::ops::token_context(p, id, "refresh_token"),
    },
    SealedColumn {
        table: "authenticators",
        column: "totp_secret",
        context: crate::authenticators::totp::seal_context,
    },
];

/// Values re-sealed per statement.
const BATCH: i64 = 500;

/// How many values of one column are sealed with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUse {
    /// `table.column`.
    pub column: String,
    pub key_id: String,
    pub values: i64,
}

/// Counts the stored sealed values by column and key id (no value is opened).
pub async fn key_use(client: &tokio_postgres::Client) -> anyhow::Result<Vec<KeyUse>> {
    let mut out = Vec::new();
    for c in COLUMNS {
        // A sealed value starts with a format byte, the key id's length and the key id.
        let sql = format!(
            "SELECT encode(substring({col} from 3 for get_byte({col}, 1)), 'escape'), count(*)
               FROM {table}
              WHERE length({col}) >= 2
              GROUP BY 1 ORDER BY 1",
            col = c.column,
            table = c.table,
        );
        for row in client
            .query(&sql, &[])
            .await
            .with_context(|| format!("counting {}.{}", c.table, c.column))?
        {
            out.push(KeyUse {
                column: format!("{}.{}", c.table, c.column),
                key_id: row.get(0),
                values: row.get(1),
            });
        }
    }
    Ok(out)
}

/// Logs a warning per key that stored secrets need and `sealer` lacks (run once as a server
/// starts): those secrets fail to open (GetProviderTokens, TOTP checks) until the key is
/// configured again, which is easy to miss after dropping a key too early.
pub async fn warn_of_missing_keys(pool: crate::db::Pool, sealer: Option<&Sealer>) {
    let uses = match crate::db::client(&pool).await {
        Ok(client) => key_use(&client).await,
        Err(e) => Err(anyhow::Error::new(e)),
    };
    let uses = match uses {
        Ok(uses) => uses,
        Err(e) => {
            tracing::debug!(error = %format!("{e:#}"), "could not count stored secrets by key");
            return;
        }
    };
    let mut missing = BTreeMap::<String, i64>::new();
    for u in uses {
        if !sealer.is_some_and(|s| s.has_key(&u.key_id)) {
            *missing.entry(u.key_id).or_default() += u.values;
        }
    }
    for (key_id, secrets) in missing {
        tracing::warn!(
            key_id,
            secrets,
            "stored secrets are sealed with a key this server is not given: they cannot be \
             opened (GetProviderTokens, TOTP) until it is in --encryption-keys again; see \
             `roster encryption status`"
        );
    }
}

/// What [`reseal`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Resealed {
    /// Values now sealed with the current key.
    pub resealed: u64,
    /// Values changed by a server while this ran (they were sealed anew there): left as is.
    pub changed_meanwhile: u64,
    /// Values that did not open, by the key id they name: that key is not configured here
    /// (or the value is damaged). They are left untouched.
    pub unopened: BTreeMap<String, u64>,
}

/// The bytes every value sealed with `key_id` starts with.
fn header(key_id: &str) -> Vec<u8> {
    let mut h = vec![super::seal::FORMAT_VERSION, key_id.len() as u8];
    h.extend_from_slice(key_id.as_bytes());
    h
}

/// The key id a sealed value names, for reporting.
fn named_key(sealed: &[u8]) -> String {
    match sealed {
        [_, len, rest @ ..] if rest.len() >= usize::from(*len) => {
            String::from_utf8_lossy(&rest[..usize::from(*len)]).into_owned()
        }
        _ => "(malformed)".to_string(),
    }
}

/// Seals every stored value that does not use `sealer`'s current key again under it, in
/// batches, while servers keep running: each value is replaced only if it is still the one
/// read, so a token or seed a server changed meanwhile is never overwritten.
pub async fn reseal(client: &tokio_postgres::Client, sealer: &Sealer) -> anyhow::Result<Resealed> {
    let current = header(sealer.current_key_id());
    let prefix_len = current.len() as i32;
    let mut done = Resealed::default();
    for c in COLUMNS {
        let select = format!(
            "SELECT project_id, id, {col} FROM {table}
              WHERE {col} IS NOT NULL AND substring({col} from 1 for $1) <> $2
                AND (project_id, id) > ($3, $4)
              ORDER BY project_id, id LIMIT {BATCH}",
            col = c.column,
            table = c.table,
        );
        let update = format!(
            "UPDATE {table} t SET {col} = v.new
               FROM unnest($1::uuid[], $2::uuid[], $3::bytea[], $4::bytea[])
                    AS v(project_id, id, old, new)
              WHERE t.project_id = v.project_id AND t.id = v.id AND t.{col} = v.old",
            col = c.column,
            table = c.table,
        );
        let mut after = (Uuid::nil(), Uuid::nil());
        loop {
            let rows = client
                .query(&select, &[&prefix_len, &current, &after.0, &after.1])
                .await
                .with_context(|| format!("reading {}.{}", c.table, c.column))?;
            let Some(last) = rows.last() else { break };
            after = (last.get(0), last.get(1));
            let (mut projects, mut ids, mut olds, mut news) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for row in &rows {
                let (project_id, id, old): (Uuid, Uuid, Vec<u8>) =
                    (row.get(0), row.get(1), row.get(2));
                let context = (c.context)(project_id, id);
                let Ok(plain) = sealer.open(&old, &context) else {
                    *done.unopened.entry(named_key(&old)).or_default() += 1;
                    continue;
                };
                news.push(sealer.seal(&plain, &context)?);
                projects.push(project_id);
                ids.push(id);
                olds.push(old);
            }
            if !ids.is_empty() {
                let changed = client
                    .execute(&update, &[&projects, &ids, &olds, &news])
                    .await
                    .with_context(|| format!("re-sealing {}.{}", c.table, c.column))?;
                done.resealed += changed;
                done.changed_meanwhile += ids.len() as u64 - changed;
            }
            if (rows.len() as i64) < BATCH {
                break;
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_starts_with_its_key_header() {
        let sealer = Sealer::parse(&Sealer::generate_spec("k-2")).unwrap();
        let sealed = sealer.seal(b"seed", b"ctx").unwrap();
        assert!(sealed.starts_with(&header("k-2")));
        assert_eq!(named_key(&sealed), "k-2");
        assert_eq!(named_key(&[1]), "(malformed)");
        assert_eq!(named_key(&[1, 9, b'x']), "(malformed)");
    }
}
