//! PostgreSQL access: the connection pool, error classification, schema migrations and the
//! embedded private cluster used when no `DATABASE_URL` is given.
//!
//! Architecture invariant: database errors become domain errors here and only here (a unique
//! violation becomes `AlreadyExists` naming the field; a lost or refused connection becomes
//! `Unavailable`), so callers use `?` and never look at SQLSTATEs.
pub mod embedded;
pub mod migrate;

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;

use crate::error::Error;

pub type Pool = deadpool_postgres::Pool;
pub type Client = deadpool_postgres::Object;

/// Builds a pool for `url` (a postgres:// URL or a key=value connection string). Connections
/// are made lazily, so this succeeds even while the database is down.
pub fn connect_pool(url: &str, size: usize, timeout: Duration) -> anyhow::Result<Pool> {
    let pg = pg_config(url, timeout)?;
    let manager = Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        .context("building the database pool")
}

/// The connection settings of `url`, with Roster's defaults (connect timeout, application
/// name), for connections made outside the pool (the event listener).
pub fn pg_config(url: &str, timeout: Duration) -> anyhow::Result<tokio_postgres::Config> {
    let mut pg = tokio_postgres::Config::from_str(url).context("parsing the database URL")?;
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(timeout);
    }
    pg.application_name("roster");
    Ok(pg)
}

/// A pooled connection, or `Unavailable` when none can be had in time.
pub async fn client(pool: &Pool) -> Result<Client, Error> {
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => Error::from(e),
        other => Error::Unavailable(anyhow::anyhow!("database pool: {other}")),
    })
}

/// Which (resource, field) a unique constraint protects, for ALREADY_EXISTS details.
fn unique_constraint_field(constraint: &str) -> Option<(&'static str, &'static str)> {
    Some(match constraint {
        "users_pkey" => ("user", "id"),
        "users_email_key" => ("user", "email"),
        "users_phone_number_key" => ("user", "phone_number"),
        "users_username_key" => ("user", "username"),
        "users_external_id_key" => ("user", "external_id"),
        "projects_name_key" => ("project", "name"),
        "identities_provider_subject_key" => ("identity", "provider_subject"),
        "authenticators_credential_id_key" => ("authenticator", "credential_id"),
        "authenticators_single_key" => ("authenticator", "type"),
        _ => return None,
    })
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            let code = db.code();
            if *code == SqlState::UNIQUE_VIOLATION
                && let Some((resource, field)) = db.constraint().and_then(unique_constraint_field)
            {
                return Error::AlreadyExists {
                    resource,
                    field,
                    owner: None,
                };
            }
            // Class 08 (connection exception), 57P01..57P03 (admin shutdown, crash shutdown,
            // cannot connect now), 53300 (too many connections): the database is not there
            // for us right now, and a retry may well succeed.
            let c = code.code();
            if c.starts_with("08") || c.starts_with("57P") || c == "53300" {
                return Error::Unavailable(e.into());
            }
            return Error::Internal(e.into());
        }
        // No server error: the socket failed, closed, or the connection could not be made.
        Error::Unavailable(e.into())
    }
}
