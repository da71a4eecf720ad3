//! Embedded, ordered schema migrations, applied under a PostgreSQL advisory lock so that many
//! replicas starting at once apply each migration exactly once.
use anyhow::Context;

/// (version, name, SQL), in order. Never edit a released migration: add a new one.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("migrations/0001_init.sql")),
    (
        2,
        "password_reset",
        include_str!("migrations/0002_password_reset.sql"),
    ),
    (
        3,
        "event_stream",
        include_str!("migrations/0003_event_stream.sql"),
    ),
    (
        4,
        "identities",
        include_str!("migrations/0004_identities.sql"),
    ),
    (
        5,
        "authenticators",
        include_str!("migrations/0005_authenticators.sql"),
    ),
    (
        6,
        "user_factor_columns",
        include_str!("migrations/0006_user_factor_columns.sql"),
    ),
    (
        7,
        "user_factor_backfill",
        include_str!("migrations/0007_user_factor_backfill.sql"),
    ),
    (
        8,
        "api_key_last_used",
        include_str!("migrations/0008_api_key_last_used.sql"),
    ),
    (
        9,
        "api_key_expiry",
        include_str!("migrations/0009_api_key_expiry.sql"),
    ),
    (
        10,
        "password_history",
        include_str!("migrations/0010_password_history.sql"),
    ),
    (
        11,
        "project_policy",
        include_str!("migrations/0011_project_policy.sql"),
    ),
    (
        12,
        "api_key_rate_limit",
        include_str!("migrations/0012_api_key_rate_limit.sql"),
    ),
    (
        13,
        "code_sends",
        include_str!("migrations/0013_code_sends.sql"),
    ),
    (
        14,
        "ip_failures",
        include_str!("migrations/0014_ip_failures.sql"),
    ),
    (
        15,
        "sms_budgets",
        include_str!("migrations/0015_sms_budgets.sql"),
    ),
    (
        16,
        "project_event_retention",
        include_str!("migrations/0016_project_event_retention.sql"),
    ),
    (
        17,
        "drop_events_retention_idx",
        include_str!("migrations/0017_drop_events_retention_idx.sql"),
    ),
    (
        18,
        "api_key_networks",
        include_str!("migrations/0018_api_key_networks.sql"),
    ),
    (
        19,
        "foreign_recovery_codes",
        include_str!("migrations/0019_foreign_recovery_codes.sql"),
    ),
    (20, "servers", include_str!("migrations/0020_servers.sql")),
];

/// A short digest of every migration's version, name and SQL: equal for two builds exactly
/// when they produce the same schema (the tests name their template database by it).
pub fn fingerprint() -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (version, name, sql) in MIGRATIONS {
        h.update(format!("{version}\0{name}\0{}\0", sql.len()));
        h.update(sql);
    }
    hex::encode(&h.finalize()[..8])
}

/// Arbitrary constant naming Roster's migration lock.
const MIGRATION_LOCK: i64 = 0x526f_7374_6572;

/// Applies every pending migration; returns how many were applied.
pub async fn migrate(client: &mut tokio_postgres::Client) -> anyhow::Result<usize> {
    migrate_to(client, i32::MAX).await
}

/// Applies the pending migrations up to and including `last` (upgrade tests start from an
/// older schema with it).
pub async fn migrate_to(client: &mut tokio_postgres::Client, last: i32) -> anyhow::Result<usize> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("taking the migration lock")?;
    let result = apply_pending(client, last).await;
    // Released on disconnect too, but a pooled connection lives on.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let applied = result?;
    unlock.context("releasing the migration lock")?;
    Ok(applied)
}

async fn apply_pending(client: &mut tokio_postgres::Client, last: i32) -> anyhow::Result<usize> {
    client
        .batch_execute(
            // Quiet: "already exists, skipping" would be logged as a NOTICE on every start
            // and every operator command.
            "SET client_min_messages = warning;
             CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
             );
             RESET client_min_messages;",
        )
        .await
        .context("creating schema_migrations")?;
    let done: Vec<i32> = client
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = 0;
    for (version, name, sql) in MIGRATIONS.iter().take_while(|(v, ..)| *v <= last) {
        if done.contains(version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("migration {version} ({name})"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied migration");
        applied += 1;
    }
    Ok(applied)
}
