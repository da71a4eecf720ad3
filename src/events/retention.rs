//! Deletes events older than the retention age, in the background and in small batches so
//! no statement holds locks for long. Every replica may run it: a transaction-level advisory
//! lock lets one batch run at a time.
use std::time::Duration;

use crate::db::{self, Pool};
use crate::error::Result;

/// Rows deleted per statement.
const BATCH: i64 = 1000;
/// Names Roster's retention lock.
const RETENTION_LOCK: i64 = 0x526f_7374_6572_0002;

/// Runs forever: a pass every `every`, removing events older than `age`.
pub async fn run(pool: Pool, age: Duration, every: Duration) {
    loop {
        match purge(&pool, age).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "event retention: old events deleted"),
            Err(e) => tracing::warn!(error = %e, "event retention pass failed; will retry"),
        }
        tokio::time::sleep(every).await;
    }
}

/// One pass: deletes batches until none is left; returns how many events went.
pub async fn purge(pool: &Pool, age: Duration) -> Result<u64> {
    let secs = age.as_secs_f64();
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
        let n = tx
            .execute(
                "DELETE FROM events WHERE (project_id, position) IN (
                     SELECT project_id, position FROM events
                     WHERE occurred_at < now() - make_interval(secs => $1)
                     LIMIT $2)",
                &[&secs, &BATCH],
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
