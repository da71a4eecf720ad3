//! Deletes events older than their project's retention age (its own, or the server's
//! `--event-retention-days`; 0 keeps them), in the background and in small batches so no
//! statement holds locks for long. Every replica may run it: a transaction-level advisory
//! lock lets one batch run at a time.
use std::time::Duration;

use crate::db::{self, Pool};
use crate::error::Result;

/// Rows deleted per statement.
const BATCH: i64 = 1000;
/// Names Roster's retention lock.
const RETENTION_LOCK: i64 = 0x526f_7374_6572_0002;

/// Runs forever: a pass every `every`, removing each project's events older than its
/// retention (`server_days` for projects without their own).
pub async fn run(pool: Pool, server_days: u32, every: Duration) {
    loop {
        match purge(&pool, server_days).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "event retention: old events deleted"),
            Err(e) => tracing::warn!(error = %e, "event retention pass failed; will retry"),
        }
        tokio::time::sleep(every).await;
    }
}

/// One pass: deletes batches until none is left; returns how many events went.
pub async fn purge(pool: &Pool, server_days: u32) -> Result<u64> {
    let server_days = i32::try_from(server_days).unwrap_or(i32::MAX);
    let mut total = 0;
    loop {
        let mut client = db::client(pool).await?;
        let tx = client.transaction().await?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&RETENTION_LOCK])
            .await?
            .get(0);
        if !locked {
            return Ok(total); // another replica is at it
        }
        // Per project, so each reads its own (project_id, occurred_at) index range.
        let n = tx
            .execute(
                "DELETE FROM events WHERE (project_id, position) IN (
                     SELECT e.project_id, e.position FROM projects p
                     CROSS JOIN LATERAL (
                         SELECT project_id, position FROM events
                         WHERE project_id = p.id
                           AND occurred_at < now()
                               - make_interval(days => coalesce(p.event_retention_days, $1))
                         LIMIT $2) e
                     WHERE coalesce(p.event_retention_days, $1) > 0
                     LIMIT $2)",
                &[&server_days, &BATCH],
            )
            .await?;
        tx.commit().await?;
        total += n;
        if (n as i64) < BATCH {
            return Ok(total);
        }
        // Let other work in between batches.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
