//! Writes events inside the caller's transaction.
use deadpool_postgres::Transaction;
use uuid::Uuid;

use super::{EventContext, NewEvent};
use crate::error::Result;

/// Records `events` (one statement for any number) in `tx`.
pub async fn record(
    tx: &Transaction<'_>,
    project_id: Uuid,
    ctx: &EventContext,
    events: &[NewEvent],
) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = events.iter().map(|_| Uuid::now_v7()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let users: Vec<Option<Uuid>> = events.iter().map(|e| e.user_id).collect();
    let data: Vec<&serde_json::Value> = events.iter().map(|e| &e.data).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO events (project_id, id, type, user_id, api_key_id, ip, user_agent,
                                 request_id, data)
             SELECT $1, e.id, e.type, e.user_id, $5, $6, $7, $8, e.data
             FROM unnest($2::uuid[], $3::text[], $4::uuid[], $9::jsonb[])
                  AS e(id, type, user_id, data)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &project_id,
            &ids,
            &types,
            &users,
            &ctx.api_key_id,
            &ctx.ip,
            &ctx.user_agent,
            &ctx.request_id,
            &data,
        ],
    )
    .await?;
    Ok(())
}
