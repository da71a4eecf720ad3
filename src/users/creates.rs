//! CreateUser coalescing (`crate::coalesce`): creates that arrive while earlier ones are at
//! the database are written together, users and their events in one statement and one
//! commit. PostgreSQL spends far more per INSERT statement and commit than per row.
//!
//! A batch is written by a task of its own, so that a leading call's cancellation cannot
//! abandon the calls it writes for, nor leave their users written and unanswered. A user the
//! batch could not write (a unique value taken, by a stored user or one earlier in the batch;
//! any statement error) is written on its own, which gives it exactly the answer a lone
//! CreateUser would have had.
use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::GenericClient;
use prometheus_client::metrics::histogram::Histogram;
use tracing::Instrument;
use uuid::Uuid;

use super::store::{self, Creation};
use super::{NewUser, User};
use crate::coalesce::{Coalescer, Turn, Waiter};
use crate::db::{self, Pool};
use crate::error::{Error, Result};
use crate::events::{EventContext, NewEvent};

/// A user to create, its password already hashed, with its event.
pub struct Create {
    pub project_id: Uuid,
    pub user: NewUser,
    pub password_hash: Option<String>,
    pub ctx: EventContext,
    pub event: NewEvent,
}

impl Create {
    fn creation(&self) -> Creation<'_> {
        Creation {
            project_id: self.project_id,
            user: &self.user,
            password_hash: self.password_hash.as_deref(),
            ctx: &self.ctx,
            event: &self.event,
        }
    }
}

type Queued = Waiter<Create, Result<User>>;

/// Writes new users with their events, coalescing concurrent calls, on pooled connections.
pub struct UserCreates {
    pool: Pool,
    calls: Coalescer<Create, Result<User>>,
}

impl UserCreates {
    /// Up to `slots` writes at the database at once, each for up to `max_batch` users (1:
    /// every call writes on its own); `sizes` observes how many calls each write was for.
    pub fn new(pool: Pool, slots: usize, max_batch: usize, sizes: Histogram) -> Self {
        UserCreates {
            pool,
            calls: Coalescer::new(slots, max_batch, sizes),
        }
    }

    pub async fn create(&self, create: Create) -> Result<User> {
        match self.calls.enter(create).await {
            Turn::Answered(answer) => answer,
            Turn::Lead { slot, item, others } => {
                if others.is_empty() {
                    let _slot = slot;
                    return alone(&self.pool, &item).await;
                }
                let pool = self.pool.clone();
                // In the leading call's span, so that its logs say whose batch it was.
                let batch = tokio::spawn(
                    async move {
                        let _slot = slot;
                        write_batch(&pool, item, others).await
                    }
                    .instrument(tracing::Span::current()),
                );
                batch.await.unwrap_or_else(|e| Err(lost(e)))
            }
            // Only a panic in the batch's task ends it without an answer.
            Turn::Orphaned => Err(lost("the batch writing it ended without an answer")),
        }
    }
}

fn lost(why: impl std::fmt::Display) -> Error {
    Error::internal(anyhow::anyhow!("create not answered: {why}"))
}

/// One user written on its own, with its event.
async fn alone(pool: &Pool, c: &Create) -> Result<User> {
    write_one(&*db::client(pool).await?, c).await
}

async fn write_one(db: &impl GenericClient, c: &Create) -> Result<User> {
    let written = store::insert_with_event(
        db,
        c.project_id,
        &c.user,
        c.password_hash.as_deref(),
        &c.ctx,
        &c.event,
    )
    .await;
    match written {
        Err(e) => Err(store::name_holder(db, c.project_id, e, &c.user.profile, c.user.id).await),
        ok => ok,
    }
}

/// Writes `own` and the users of `others` (those whose callers still wait), answers
/// `others`, returns `own`'s answer.
async fn write_batch(pool: &Pool, own: Create, others: Vec<Queued>) -> Result<User> {
    // A caller gone (deadline, cancel) before its user was written gets no user.
    let others: Vec<Queued> = others.into_iter().filter(|w| !w.is_gone()).collect();
    let all: Vec<&Create> = std::iter::once(&own)
        .chain(others.iter().map(|w| &w.item))
        .collect();
    // One row per (project, id) in the statement: its event is joined by them. A repeated
    // one is written on its own afterwards (and told it exists).
    let mut first = HashMap::with_capacity(all.len());
    let batch: Vec<Creation> = all
        .iter()
        .enumerate()
        .filter(|(i, c)| *first.entry((c.project_id, c.user.id)).or_insert(*i) == *i)
        .map(|(_, c)| c.creation())
        .collect();
    let mut written: HashMap<(Uuid, Uuid), User> = match batch_write(pool, &batch).await {
        Ok(written) => written,
        // Not the database being away: something in one user's values, maybe, which must not
        // fail the others. Each is written on its own below.
        Err(e) if !matches!(e, Error::Unavailable(_)) => {
            tracing::warn!(error = %e, users = batch.len(), "batched create failed; writing each alone");
            HashMap::new()
        }
        Err(e) => {
            let e = Arc::new(e);
            for w in others {
                w.answer(Err(Error::shared(e.clone())));
            }
            return Err(Error::shared(e));
        }
    };
    drop(batch);
    let mut answers: Vec<Option<Result<User>>> = all
        .iter()
        .map(|c| written.remove(&(c.project_id, c.user.id)).map(Ok))
        .collect();
    // The rest, one statement each, pipelined on one connection.
    let rest: Vec<usize> = (0..all.len()).filter(|i| answers[*i].is_none()).collect();
    if !rest.is_empty() {
        match db::client(pool).await {
            Ok(client) => {
                let writes = rest.iter().map(|i| write_one(&*client, all[*i]));
                let results = futures_util::future::join_all(writes).await;
                for (i, result) in rest.into_iter().zip(results) {
                    answers[i] = Some(result);
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for i in rest {
                    answers[i] = Some(Err(Error::shared(e.clone())));
                }
            }
        }
    }
    drop(all);
    let mut answers = answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(lost("unwritten"))));
    let mine = answers.next().unwrap_or_else(|| Err(lost("unwritten")));
    for (w, answer) in others.into_iter().zip(answers) {
        w.answer(answer);
    }
    mine
}

/// The batch's statement on a pooled connection: the users written, by (project, id).
async fn batch_write(pool: &Pool, batch: &[Creation<'_>]) -> Result<HashMap<(Uuid, Uuid), User>> {
    let client = db::client(pool).await?;
    let written = store::insert_many_with_events(&*client, batch).await?;
    Ok(written
        .into_iter()
        .map(|(project_id, user)| ((project_id, user.id), user))
        .collect())
}
