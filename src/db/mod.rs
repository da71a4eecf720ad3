//! PostgreSQL access: the connection pool, error classification, schema migrations and the
//! embedded private cluster used when no `DATABASE_URL` is given.
//!
//! Architecture invariant: database errors become domain errors here and only here (a unique
//! violation becomes `AlreadyExists` naming the field; a lost or refused connection becomes
//! `Unavailable`), so callers use `?` and never look at SQLSTATEs.
pub mod embedded;
pub mod migrate;

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;

use crate::error::{Error, Reason};

pub type Pool = deadpool_postgres::Pool;

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

/// A pooled connection, or `Unavailable` when none can be had in time. Checked out while an
/// RPC runs (inside [`RpcScope::run`]), it belongs to that RPC: see [`Client`].
pub async fn client(pool: &Pool) -> Result<Client, Error> {
    Ok(Client {
        object: Some(checkout(pool).await?),
        rpc: RPC.try_with(Arc::clone).ok(),
    })
}

tokio::task_local! {
    static RPC: Arc<RpcScope>;
}

/// The life of one RPC's handler, so that the connections it holds can tell whether it ended
/// normally or was dropped half-way (the client cancelled, or its deadline passed).
#[derive(Default)]
pub struct RpcScope {
    cancelled: AtomicBool,
}

impl RpcScope {
    /// Runs `fut` as an RPC's handler: if the returned future is dropped before it completes,
    /// every connection the handler still holds has its statement cancelled (see [`Client`]).
    pub fn run<F: Future>(fut: F) -> impl Future<Output = F::Output> {
        let scope = Arc::new(RpcScope::default());
        CancelOnDrop {
            fut: Box::pin(RPC.scope(scope.clone(), fut)),
            scope,
            done: false,
        }
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }
}

struct CancelOnDrop<F> {
    fut: Pin<Box<F>>,
    scope: Arc<RpcScope>,
    done: bool,
}

impl<F: Future> Future for CancelOnDrop<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let out = self.fut.as_mut().poll(cx);
        if out.is_ready() {
            self.done = true;
        }
        out
    }
}

impl<F> Drop for CancelOnDrop<F> {
    fn drop(&mut self) {
        // Runs before `fut` (and the connections inside it) is dropped, so they see the flag.
        if !self.done {
            self.scope.cancelled.store(true, Ordering::Release);
        }
    }
}

/// A pooled connection. Dropped normally it goes back to the pool. Dropped because its RPC
/// was cancelled, it may have a statement running that nobody will read: PostgreSQL would
/// run it to completion (holding locks, burning CPU) and the next borrower would queue
/// behind it. So it leaves the pool for good, its statement is cancelled, then it closes.
/// Leaving the pool first matters: a cancel request hits whatever the backend runs at that
/// moment, which must never be another RPC's statement.
pub struct Client {
    object: Option<deadpool_postgres::Object>,
    rpc: Option<Arc<RpcScope>>,
}

impl Client {
    /// Closes the connection instead of returning it to the pool (it may be left mid-way
    /// through a transaction).
    pub fn discard(mut self) {
        if let Some(object) = self.object.take() {
            drop(deadpool_postgres::Object::take(object));
        }
    }
}

// To the connection itself, so `&*client` is a `GenericClient` (deadpool seals that trait).
impl Deref for Client {
    type Target = deadpool_postgres::Object;
    #[allow(
        clippy::expect_used,
        reason = "only Drop and discard (by value) take it"
    )]
    fn deref(&self) -> &Self::Target {
        self.object.as_ref().expect("present until dropped")
    }
}

impl DerefMut for Client {
    #[allow(
        clippy::expect_used,
        reason = "only Drop and discard (by value) take it"
    )]
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.object.as_mut().expect("present until dropped")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else {
            return;
        };
        if !self.rpc.as_ref().is_some_and(|r| r.is_cancelled()) {
            return; // back to the pool
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let connection = deadpool_postgres::Object::take(object);
        let token = connection.cancel_token();
        runtime.spawn(async move {
            if let Err(e) = token.cancel_query(tokio_postgres::NoTls).await {
                tracing::debug!(error = %e, "cancelling the statement of a cancelled RPC");
            }
            drop(connection);
        });
    }
}

/// Connections shared by concurrent single-statement reads (a user by id or unique key).
/// tokio-postgres pipelines the statements of concurrent callers on one connection: under
/// load many reads leave in one write and their rows come back in one read, and PostgreSQL
/// wakes once for all of them, where a pooled connection each would cost a round of
/// syscalls and wake-ups per read (measured: +16 % GetUser/s at 8 concurrent calls, +68 %
/// at 32, on 2 cores). Only short index reads belong here: a statement is not cancelled
/// with its RPC (that would cancel its neighbours), so each connection bounds its
/// statements with [`READ_STATEMENT_TIMEOUT`] instead, in case one waits on a lock (a
/// migration's) and holds up the reads queued behind it.
pub struct Readers {
    pool: Pool,
    slots: Box<[std::sync::Mutex<Option<Arc<Reader>>>]>,
    next: std::sync::atomic::AtomicUsize,
}

/// How long a shared read may run before PostgreSQL cancels it (answered UNAVAILABLE).
pub const READ_STATEMENT_TIMEOUT: &str = "5s";

/// A connection taken out of the pool for good: its session setting must not leak into
/// the pool's other uses, so when the last reader lets go it is closed, not returned.
pub struct Reader(Option<deadpool_postgres::Object>);

impl Deref for Reader {
    type Target = deadpool_postgres::Object;
    #[allow(clippy::expect_used, reason = "only Drop takes it")]
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(object) = self.0.take() {
            drop(deadpool_postgres::Object::take(object));
        }
    }
}

impl Readers {
    /// `n` shared connections, taken from `pool` when first needed.
    pub fn new(pool: Pool, n: usize) -> Self {
        Readers {
            pool,
            slots: (0..n.max(1)).map(|_| std::sync::Mutex::new(None)).collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// A shared connection (round robin), replaced when it has broken.
    pub async fn get(&self) -> Result<Arc<Reader>, Error> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[i];
        {
            let current = slot.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = current.as_ref().filter(|c| !c.is_closed()) {
                return Ok(c.clone());
            }
        }
        let fresh = Arc::new(Reader(Some(checkout(&self.pool).await?)));
        // Generic plans: these connections run only lookups by a unique key, whose generic
        // plan is the index probe. Left to choose, PostgreSQL re-plans `id = ANY($2)` (the
        // coalesced GetUser) at every execution, since it prices the generic plan for an
        // array of unknown length above a custom one: that planning halved its throughput.
        fresh
            .batch_execute(&format!(
                "SET statement_timeout = '{READ_STATEMENT_TIMEOUT}'; \
                 SET plan_cache_mode = force_generic_plan"
            ))
            .await?;
        let mut current = slot.lock().unwrap_or_else(|p| p.into_inner());
        match current.as_ref().filter(|c| !c.is_closed()) {
            // Another caller filled the slot meanwhile: use that one (ours closes).
            Some(c) => Ok(c.clone()),
            None => {
                *current = Some(fresh.clone());
                Ok(fresh)
            }
        }
    }
}

/// Runs `connect` until it succeeds or fails for a reason other than the database being
/// unreachable (refused, starting up, too many connections), for up to `limit`, backing off
/// to 5 s between tries: at start-up PostgreSQL may come up after Roster (a cluster restart,
/// one chart installing both), and exiting would only earn a crash-loop back-off. A wrong
/// password or database name fails at once.
pub async fn retry_unavailable<T, F, Fut>(limit: Duration, mut connect: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(250);
    let mut waited = false;
    loop {
        match connect().await {
            Ok(v) => {
                if waited {
                    tracing::info!("the database is reachable");
                }
                return Ok(v);
            }
            Err(Error::Unavailable(cause)) if tokio::time::Instant::now() + pause < deadline => {
                if !waited {
                    tracing::warn!(
                        error = %format!("{cause:#}"),
                        wait_secs = limit.as_secs(),
                        "the database is not reachable yet; trying again (--db-wait-secs)"
                    );
                    waited = true;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A connection from `pool`, or `Unavailable` when none can be had in time.
async fn checkout(pool: &Pool) -> Result<deadpool_postgres::Object, Error> {
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
            // A row referring to a user that a concurrent call deleted after this one read it
            // (every `<table>_project_id_user_id_fkey` references users): the user is gone.
            if *code == SqlState::FOREIGN_KEY_VIOLATION
                && db
                    .constraint()
                    .is_some_and(|n| n.ends_with("_project_id_user_id_fkey"))
            {
                return Error::NotFound {
                    resource: "user",
                    id: String::new(),
                };
            }
            // Deadlock broken, or a serialization failure: the transaction was rolled back,
            // nothing of it stays, and the same call sent again will most likely pass.
            if *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
            {
                return Error::Aborted {
                    reason: Reason::ConcurrentConflict,
                    message: "the call conflicted with a concurrent call on the same data and \
                              changed nothing; retry it"
                        .into(),
                };
            }
            // Class 08 (connection exception), 57P01..57P03 (admin shutdown, crash shutdown,
            // cannot connect now), 53300 (too many connections): the database is not there
            // for us right now, and a retry may well succeed. Likewise 57014, below.
            let c = code.code();
            // 57014 (query_canceled): a statement timeout or a cancel request; for the
            // caller, the database did not answer in time.
            if c.starts_with("08") || c.starts_with("57P") || c == "53300" || c == "57014" {
                return Error::Unavailable(e.into());
            }
            // Without the DETAIL, which may quote the row ("Failing row contains (...)",
            // "Key (...)=(...)"): a password hash or a person's data must not reach the log.
            return Error::Internal(anyhow::anyhow!(
                "database error {c}: {}{}",
                db.message(),
                db.constraint()
                    .map(|n| format!(" (constraint {n})"))
                    .unwrap_or_default()
            ));
        }
        // No server error: the socket failed, closed, or the connection could not be made.
        Error::Unavailable(e.into())
    }
}
