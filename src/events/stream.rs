//! Live event streams that never skip or repeat an event, whatever order transactions commit in.
//!
//! # The problem
//! Positions come from a sequence when an event is inserted, but transactions commit in any
//! order: position 12 may be visible while 11 is still uncommitted. A reader that moved its
//! cursor past 12 would never see 11.
//!
//! # The design: a horizon fenced on in-progress transactions
//! A trigger (migration 0003) gives every event-writing transaction its transaction id *before*
//! it takes a position. The [`EventFeed`] task repeatedly:
//! 1. reads `H`, the last position handed out by the sequence (a non-transactional read);
//! 2. then takes a transaction id `X` of its own (an empty transaction): every transaction
//!    that holds a position `<= H` got its id before step 1, so its id is below `X`;
//! 3. once a later snapshot's `xmin` (the oldest transaction still running) is above `X`,
//!    all of those have finished, so every position `<= H` is final: committed and visible, or
//!    never to appear. `H` becomes the new *horizon*.
//!
//! Step 2 uses an id only when new positions were handed out since the last fence, so it
//! adds at most one (cheap, unflushed) transaction per round of commits.
//!
//! Streams only ever read up to the horizon, in position order, and advance their cursor to
//! what they read (or to the horizon when nothing more matches), so nothing behind a cursor
//! can appear later. Fences are kept in a queue and resolved oldest first, so a long writing
//! transaction delays delivery but never breaks it. (The sequence must not cache values per
//! session, or a session could later use a position below `H`; migration 0003 pins CACHE 1.)
//!
//! # Wake-ups and sharing
//! One task per process computes the horizon and publishes it on a `watch` channel that every
//! stream shares. It wakes when this process writes events ([`written`], called by
//! `store::record`), on `LISTEN roster_events` for other replicas' writes, and by polling as a
//! fallback, so a lost notification or a dropped listener connection only adds latency.
//! Writers do not NOTIFY themselves: PostgreSQL serialises the commits of notifying
//! transactions on a cluster-wide lock, which cost more than half of a mutation's throughput
//! in the events benchmark. Instead the horizon task sends one NOTIFY, in its own unflushed
//! transaction, whenever it fences new positions. Each stream reads in bounded batches and
//! sends into a bounded channel: a slow client stalls only its own reader, and memory stays
//! flat.
//!
//! # One read per project per advance
//! Each time the horizon moves, every stream caught up with it needs the project's events in
//! the range just made final. Querying once per stream cost writers most of their throughput
//! with 50 idle streams open (events benchmark). So the horizon is published with that range,
//! the first stream of a project to need it reads the project's events in it once (up to
//! [`SHARED_MAX`]), and every stream of the project picks its own out in memory with its
//! [`Matcher`]. A stream that is behind (catching up, or slow to be read), whose filter cannot
//! be decided in memory, or whose range was too large to share, reads with SQL as before.
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Notify, OnceCell, mpsc, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::Event;
use super::matcher::Matcher;
use super::store::{self, StreamSpec};
use crate::db::{self, Pool};
use crate::error::{Error, Result};

/// The PostgreSQL channel horizon tasks notify each other on.
pub const CHANNEL: &str = "roster_events";

/// Bumped whenever this process writes events; every horizon task in the process watches it.
static WRITES: std::sync::LazyLock<watch::Sender<u64>> =
    std::sync::LazyLock::new(|| watch::channel(0).0);

/// Tells the horizon tasks of this process that events were written (the transaction may not
/// have committed yet: the fence it causes waits for that).
pub fn written() {
    WRITES.send_modify(|n| *n = n.wrapping_add(1));
}
/// Events read per query by a stream.
const BATCH: i64 = 256;
/// Events buffered per stream before the reader waits for the client.
const BUFFER: usize = 64;
/// The least time between two checkpoints of a stream after its first.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How soon to look again while fences wait for transactions to finish.
const PENDING_RECHECK: Duration = Duration::from_millis(5);
/// The least time between two horizon computations: a burst of commits costs one.
const MIN_INTERVAL: Duration = Duration::from_millis(2);
/// Most fences kept; beyond it new ones are skipped, which only delays delivery.
const MAX_FENCES: usize = 4096;
/// Most events of one project in one advance that are read once and shared: a stream then
/// holds no more than one batch of its own would. A larger range (a bulk import) is read by
/// each stream in batches instead.
const SHARED_MAX: i64 = BATCH;

/// What the horizon task publishes: the horizon and the range that just became final.
#[derive(Clone, Default)]
struct Tail {
    horizon: i64,
    recent: Option<Arc<Recent>>,
}

/// The events of one advance, `after < position <= upto`, read once per project when a
/// stream first needs them.
struct Recent {
    after: i64,
    upto: i64,
    by_project: std::sync::Mutex<HashMap<Uuid, SharedRead>>,
}

/// One project's events of an advance, read by the first stream that needs them; `None` once
/// read means "read it yourself": too many events, or the read failed.
type SharedRead = Arc<OnceCell<Option<Arc<Vec<Event>>>>>;

impl Recent {
    async fn events(
        &self,
        pool: &Pool,
        project_id: Uuid,
        reads: &Reads,
    ) -> Option<Arc<Vec<Event>>> {
        let cell = self
            .by_project
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(project_id)
            .or_default()
            .clone();
        cell.get_or_init(|| async {
            reads.shared.fetch_add(1, Ordering::Relaxed);
            let all = StreamSpec {
                project_id,
                filter: None,
                since: None,
            };
            let read = async {
                let client = db::client(pool).await?;
                store::read_range(&*client, &all, self.after, self.upto, SHARED_MAX + 1).await
            };
            match read.await {
                Ok(events) if events.len() as i64 <= SHARED_MAX => Some(Arc::new(events)),
                Ok(_) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "shared event read failed; streams read alone");
                    None
                }
            }
        })
        .await
        .clone()
    }
}

/// How the streams read events: shared reads of an advance, and reads of their own.
#[derive(Default)]
struct Reads {
    shared: AtomicU64,
    own: AtomicU64,
}

/// Event range reads since the feed began (tests check that caught-up streams share).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeReads {
    /// One per project per advance, shared by that project's caught-up streams.
    pub shared: u64,
    /// A stream's own queries (catching up, or a filter decided only by SQL).
    pub own: u64,
}

/// A candidate horizon: final once every transaction below `xbound` has finished.
#[derive(Debug, Clone, Copy)]
struct Fence {
    position: i64,
    xbound: u64,
}

/// The shared horizon and the streams following it.
pub struct EventFeed {
    horizon: watch::Receiver<Tail>,
    /// Taken by [`EventFeed::start`].
    publisher: std::sync::Mutex<Option<watch::Sender<Tail>>>,
    /// Set by [`EventFeed::close`] when the server shuts down.
    closing: watch::Sender<bool>,
    subscribers: Arc<AtomicUsize>,
    reads: Arc<Reads>,
}

/// Counts a stream for as long as it lives.
struct Subscribed(Arc<AtomicUsize>);

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EventFeed {
    /// A feed whose horizon stays at 0 until [`EventFeed::start`].
    pub fn new() -> Arc<EventFeed> {
        let (tx, rx) = watch::channel(Tail::default());
        Arc::new(EventFeed {
            horizon: rx,
            publisher: std::sync::Mutex::new(Some(tx)),
            closing: watch::channel(false).0,
            subscribers: Arc::new(AtomicUsize::new(0)),
            reads: Arc::default(),
        })
    }

    /// Starts the horizon task (and, given a connection config, its listener); `None` when
    /// it already runs. Abort the handle to stop it.
    pub fn start(
        &self,
        pool: Pool,
        listen: Option<tokio_postgres::Config>,
        poll: Duration,
    ) -> Option<JoinHandle<()>> {
        let tx = self.publisher.lock().ok()?.take()?;
        Some(tokio::spawn(run_horizon(pool, listen, poll, tx)))
    }

    /// Ends every stream following the feed, and every one that starts from now on, with
    /// UNAVAILABLE `SHUTTING_DOWN`: live streams never end by themselves, and a shutting-down
    /// server should not hold their clients until its grace period runs out. They resume
    /// from the last position they received, on another replica or after the restart.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Streams following the feed right now (for metrics and tests).
    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// The range reads the streams have made so far.
    pub fn range_reads(&self) -> RangeReads {
        RangeReads {
            shared: self.reads.shared.load(Ordering::Relaxed),
            own: self.reads.own.load(Ordering::Relaxed),
        }
    }

    /// Follows `spec` from `start`: where to begin, resolved from a position or a time.
    /// Events, checkpoints when `checkpoints` is set (or the error that ended the stream)
    /// arrive on the returned channel, which holds at most a small batch; dropping it stops
    /// the reader.
    pub fn follow(
        &self,
        pool: Pool,
        spec: StreamSpec,
        start: Start,
        checkpoints: bool,
    ) -> mpsc::Receiver<Result<Item>> {
        let (tx, rx) = mpsc::channel(BUFFER);
        self.subscribers.fetch_add(1, Ordering::Relaxed);
        let guard = Subscribed(self.subscribers.clone());
        let horizon = self.horizon.clone();
        let reads = self.reads.clone();
        let mut closing = self.closing.subscribe();
        tokio::spawn(async move {
            let _guard = guard;
            let ended = tokio::select! {
                r = follow(pool, spec, start, checkpoints, horizon, &reads, &tx) => r,
                _ = closing.wait_for(|closed| *closed) => Err(Error::ShuttingDown),
            };
            if let Err(e) = ended {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }
}

/// What a stream sends.
#[derive(Debug)]
pub enum Item {
    Event(Event),
    /// Every event for the stream up to this position has been sent.
    Checkpoint(i64),
}

/// Where a stream begins.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// After this position (0: the beginning).
    After(i64),
    /// At the first event at or after this time.
    Since(chrono::DateTime<chrono::Utc>),
}

async fn follow(
    pool: Pool,
    spec: StreamSpec,
    start: Start,
    checkpoints: bool,
    mut horizon: watch::Receiver<Tail>,
    reads: &Reads,
    tx: &mpsc::Sender<Result<Item>>,
) -> Result<()> {
    let matcher = Matcher::new(&spec);
    let mut cursor = match start {
        Start::After(p) => p,
        Start::Since(t) => {
            // Read the horizon first: whatever the query below cannot see lies beyond it.
            let h = horizon.borrow_and_update().horizon;
            let client = db::client(&pool).await?;
            match store::position_before(&*client, spec.project_id, t).await? {
                Some(p) => p,
                None => h,
            }
        }
    };
    // The first checkpoint marks the end of the backlog: every event committed before the
    // stream began. The horizon may still lag behind some of them, so it waits for the
    // horizon to pass the last position handed out by then.
    let backlog_end = if checkpoints {
        last_position(&*db::client(&pool).await?).await?
    } else {
        0
    };
    // The position the client knows it has everything up to (by an event or a checkpoint),
    // and when the last checkpoint went (None before the first).
    let mut told = cursor;
    let mut last_checkpoint: Option<tokio::time::Instant> = None;
    loop {
        // Only the range in hand is held, and only while it is sent: an idle or slow stream
        // keeps no old range alive.
        let (h, recent) = {
            let tail = horizon.borrow_and_update();
            (tail.horizon, tail.recent.clone())
        };
        if let (Some(m), Some(recent)) = (&matcher, recent)
            && recent.after == cursor
            && let Some(events) = recent.events(&pool, spec.project_id, reads).await
        {
            // Decide every event before sending any: an undecided one sends the stream to
            // SQL for the whole range.
            let picked: std::result::Result<Vec<&Event>, _> = events
                .iter()
                .filter_map(|e| match m.matches(e) {
                    Ok(true) => Some(Ok(e)),
                    Ok(false) => None,
                    Err(u) => Some(Err(u)),
                })
                .collect();
            if let Ok(picked) = picked {
                for e in picked {
                    told = e.position;
                    if tx.send(Ok(Item::Event(e.clone()))).await.is_err() {
                        return Ok(());
                    }
                }
                cursor = h;
            }
        }
        while cursor < h {
            reads.own.fetch_add(1, Ordering::Relaxed);
            let batch = {
                let client = db::client(&pool).await?;
                store::read_range(&*client, &spec, cursor, h, BATCH).await?
            };
            tracing::trace!(cursor, horizon = h, read = batch.len(), "event stream read");
            let full = batch.len() as i64 == BATCH;
            for e in batch {
                cursor = e.position;
                told = cursor;
                if tx.send(Ok(Item::Event(e))).await.is_err() {
                    return Ok(()); // the client went away
                }
            }
            if !full {
                // Everything matching up to the horizon has been sent.
                cursor = h;
            }
        }
        // Caught up with the horizon. A checkpoint is owed when the client was never told
        // the backlog ended, or the log moved past what it was told; after the first, they
        // are spaced so a busy log costs a stream at most one a second.
        let mut due = None;
        if checkpoints {
            match last_checkpoint {
                None if cursor >= backlog_end => due = Some(tokio::time::Instant::now()),
                None => {}
                Some(at) if told < cursor => due = Some(at + CHECKPOINT_EVERY),
                Some(_) => {}
            }
        }
        if let Some(at) = due
            && at <= tokio::time::Instant::now()
        {
            if tx.send(Ok(Item::Checkpoint(cursor))).await.is_err() {
                return Ok(());
            }
            told = cursor;
            last_checkpoint = Some(tokio::time::Instant::now());
            due = None;
        }
        tokio::select! {
            changed = horizon.changed() => {
                if changed.is_err() {
                    return Err(Error::Unavailable(anyhow::anyhow!("the event feed stopped")));
                }
            }
            // A checkpoint held back by the spacing goes when its time comes, even when the
            // log has gone quiet meanwhile.
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {}
            _ = tx.closed() => return Ok(()),
        }
    }
}

/// The last position handed out: every event committed before this read has one at or below
/// it (a non-transactional read of the sequence).
async fn last_position(client: &tokio_postgres::Client) -> Result<i64> {
    Ok(client
        .query_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM events_position_seq",
            &[],
        )
        .await?
        .get(0))
}

async fn run_horizon(
    pool: Pool,
    listen: Option<tokio_postgres::Config>,
    poll: Duration,
    tx: watch::Sender<Tail>,
) {
    let wake = Arc::new(Notify::new());
    let listener = listen.map(|cfg| tokio::spawn(run_listener(cfg, wake.clone())));
    let mut writes = WRITES.subscribe();
    let mut fences: VecDeque<Fence> = VecDeque::new();
    let mut fenced = 0;
    let mut failing = false;
    loop {
        match advance(&pool, &mut fences, &mut fenced).await {
            Ok(Some(h)) => {
                tx.send_if_modified(|cur| {
                    let newer = h > cur.horizon;
                    if newer {
                        *cur = Tail {
                            horizon: h,
                            recent: Some(Arc::new(Recent {
                                after: cur.horizon,
                                upto: h,
                                by_project: Default::default(),
                            })),
                        };
                    }
                    newer
                });
                failing = false;
            }
            Ok(None) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "event horizon: cannot read the database; retrying");
                }
                failing = true;
            }
        }
        let wait = if fences.is_empty() {
            poll
        } else {
            PENDING_RECHECK
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = writes.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        tokio::time::sleep(MIN_INTERVAL).await;
        if tx.is_closed() {
            break;
        }
    }
    if let Some(l) = listener {
        l.abort();
    }
}

/// Adds a fence for the positions handed out since the last one and returns the newest
/// horizon that became final, if any.
async fn advance(
    pool: &Pool,
    fences: &mut VecDeque<Fence>,
    fenced: &mut i64,
) -> Result<Option<i64>> {
    let client = db::client(pool).await?;
    let position = last_position(&client).await?;
    if position > *fenced {
        // A transaction id taken now is above that of every transaction holding a position
        // read above (they took theirs first). A snapshot's xmax would not do: it is one past
        // the latest *completed* transaction, below ids that are assigned but still running.
        // The empty transaction commits without waiting for a WAL flush, and wakes the other
        // replicas' horizon tasks (which notify in turn only for positions new to them).
        let reply = client
            .simple_query(
                "BEGIN; SET LOCAL synchronous_commit TO off; \
                 SELECT pg_current_xact_id()::text; NOTIFY roster_events; COMMIT",
            )
            .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                // The connection may be left inside the transaction: never reuse it.
                client.discard();
                return Err(e.into());
            }
        };
        let xid = reply
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| Error::internal(anyhow::anyhow!("no transaction id returned")))?;
        let fence = Fence {
            position,
            xbound: xid + 1,
        };
        // When full, skip: a later round fences these positions (delay, never a gap).
        if fences.len() < MAX_FENCES {
            fences.push_back(fence);
            *fenced = position;
        }
    }
    if fences.is_empty() {
        return Ok(None);
    }
    let xmin: String = client
        .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])
        .await?
        .get(0);
    let xmin: u64 = xmin
        .parse()
        .map_err(|_| Error::internal(anyhow::anyhow!("unexpected transaction id {xmin:?}")))?;
    tracing::trace!(position, xmin, pending = fences.len(), "event fence");
    let mut horizon = None;
    while let Some(f) = fences.front() {
        // Every transaction below the bound has finished: the fence's positions are final.
        if f.xbound <= xmin {
            horizon = Some(f.position);
            fences.pop_front();
        } else {
            break;
        }
    }
    Ok(horizon)
}

/// Holds `LISTEN roster_events` on its own connection and turns notifications into wake-ups,
/// reconnecting with backoff; the horizon task polls meanwhile.
async fn run_listener(cfg: tokio_postgres::Config, wake: Arc<Notify>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match cfg.connect(tokio_postgres::NoTls).await {
            Ok((client, mut conn)) => {
                let (msg_tx, mut msg_rx) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(m) = messages.next().await {
                        if msg_tx.send(m).is_err() {
                            break;
                        }
                    }
                });
                if client
                    .batch_execute(&format!("LISTEN {CHANNEL}"))
                    .await
                    .is_ok()
                {
                    backoff = Duration::from_millis(100);
                    // Wake once: events may have been written while not listening.
                    wake.notify_one();
                    while let Some(m) = msg_rx.recv().await {
                        match m {
                            Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                                tracing::trace!("event notification");
                                wake.notify_one()
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                }
                driver.abort();
                tracing::debug!("event listener connection lost; reconnecting");
            }
            Err(e) => tracing::debug!(error = %e, "event listener cannot connect; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
