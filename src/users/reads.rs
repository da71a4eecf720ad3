//! GetUser coalescing. A read by primary key costs PostgreSQL far more per statement (the
//! bind, a snapshot, executor start-up, a protocol round) than per row, so the calls that
//! arrive while earlier ones are at the database are read together: one statement per
//! project, `id = ANY(...)`.
//!
//! Nothing waits on a timer and no task sits in between: a call that finds one of the
//! `slots` free reads at once, alone, on its own task, so an idle server answers as fast as
//! without coalescing. Only when every slot is busy does a call queue; a call finishing its
//! read then hands its slot, with everything queued by then, to the first queued call, which
//! reads for all of them and answers each. Every call's statement starts after the call
//! arrived, so a client reads its own acknowledged writes.
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::User;
use super::store;
use crate::db;
use crate::error::{Error, Result};

type Key = (Uuid, Uuid);

#[allow(
    clippy::large_enum_variant,
    reason = "sent once, into a oneshot that is its own allocation already"
)]
enum Message {
    /// The answer, read by another call.
    Done(std::result::Result<Option<User>, Arc<Error>>),
    /// A slot, and the calls queued after this one: read for them too.
    Lead(Slot, Vec<Wanted>),
}

struct Wanted {
    key: Key,
    reply: oneshot::Sender<Message>,
}

#[derive(Default)]
struct Queue {
    busy: usize,
    waiting: VecDeque<Wanted>,
}

/// Reads users by id, coalescing concurrent calls, on the shared read connections.
pub struct UserReads(Arc<Inner>);

struct Inner {
    readers: Arc<db::Readers>,
    slots: usize,
    max_batch: usize,
    queue: Mutex<Queue>,
    /// How many calls each read answered.
    sizes: Histogram,
}

impl UserReads {
    /// Up to `slots` reads at the database at once, each for up to `max_batch` calls (1:
    /// every call reads on its own); `sizes` observes how many calls each read answered.
    pub fn new(
        readers: Arc<db::Readers>,
        slots: usize,
        max_batch: usize,
        sizes: Histogram,
    ) -> Self {
        UserReads(Arc::new(Inner {
            readers,
            slots: slots.max(1),
            max_batch: max_batch.max(1),
            queue: Mutex::default(),
            sizes,
        }))
    }

    /// The user `id` of `project_id`, if there is one.
    pub async fn get(&self, project_id: Uuid, id: Uuid) -> Result<Option<User>> {
        let this = &self.0;
        let key = (project_id, id);
        if this.max_batch == 1 {
            return this.alone(key).await;
        }
        let waiting = {
            let mut queue = this.lock();
            if queue.busy < this.slots {
                queue.busy += 1;
                None
            } else {
                let (reply, answer) = oneshot::channel();
                queue.waiting.push_back(Wanted { key, reply });
                Some(answer)
            }
        };
        // This call holds a slot until `_slot` drops, also when the call is cancelled.
        let (_slot, others) = match waiting {
            None => (Slot(Some(this.clone())), Vec::new()),
            Some(answer) => match answer.await {
                Ok(Message::Done(result)) => return result.map_err(Error::shared),
                Ok(Message::Lead(slot, others)) => (slot, others),
                // The call reading for this one was cancelled mid-read: read alone.
                Err(_) => return this.alone(key).await,
            },
        };
        this.sizes.observe((others.len() + 1) as f64);
        this.read_for(key, others).await
    }
}

impl Inner {
    /// One call's read (also the idle path, a slot held).
    async fn alone(&self, (project_id, id): Key) -> Result<Option<User>> {
        let client = self.readers.get().await?;
        store::get(&**client, project_id, id).await
    }

    /// Reads `own` and the keys of `others` together; answers `others`, returns `own`'s.
    async fn read_for(&self, own: Key, others: Vec<Wanted>) -> Result<Option<User>> {
        if others.is_empty() {
            return self.alone(own).await;
        }
        let mut found = match self.read(own, &others).await {
            Ok(found) => found,
            Err(e) => {
                let e = Arc::new(e);
                for w in others {
                    // A caller that has gone (deadline, cancel) no longer listens.
                    let _ = w.reply.send(Message::Done(Err(e.clone())));
                }
                return Err(Error::shared(e));
            }
        };
        // Two calls for one user each get it; the last to be answered (this call, for its
        // own) takes it without a copy.
        let mut later = HashSet::from([own]);
        let last: Vec<bool> = others.iter().rev().map(|w| later.insert(w.key)).collect();
        for (w, last) in others.into_iter().zip(last.into_iter().rev()) {
            let user = if last {
                found.remove(&w.key)
            } else {
                found.get(&w.key).cloned()
            };
            let _ = w.reply.send(Message::Done(Ok(user)));
        }
        Ok(found.remove(&own))
    }

    /// One statement per project among the keys (almost always one), pipelined on one
    /// connection.
    async fn read(&self, own: Key, others: &[Wanted]) -> Result<HashMap<Key, User>> {
        let mut projects: Vec<(Uuid, Vec<Uuid>)> = vec![(own.0, vec![own.1])];
        for (project_id, id) in others.iter().map(|w| w.key) {
            match projects.iter_mut().find(|(p, _)| *p == project_id) {
                Some((_, ids)) => ids.push(id),
                None => projects.push((project_id, vec![id])),
            }
        }
        let client = self.readers.get().await?;
        let reads = projects
            .iter()
            .map(|(project_id, ids)| store::get_many(&**client, *project_id, ids));
        let mut found = HashMap::with_capacity(others.len() + 1);
        let results = futures_util::future::join_all(reads).await;
        for (users, (project_id, _)) in results.into_iter().zip(&projects) {
            for user in users? {
                found.insert((*project_id, user.id), user);
            }
        }
        Ok(found)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding it; a poisoned queue is still consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Passes a slot to the first queued call still listening, with the calls queued after
    /// it; frees the slot when none is queued.
    fn release(self: &Arc<Self>) {
        let mut queue = self.lock();
        while let Some(first) = queue.waiting.pop_front() {
            let n = queue.waiting.len().min(self.max_batch - 1);
            let batch: Vec<Wanted> = queue.waiting.drain(..n).collect();
            match first
                .reply
                .send(Message::Lead(Slot(Some(self.clone())), batch))
            {
                Ok(()) => return,
                // That caller has gone: the others go back, in order, for the next one.
                Err(Message::Lead(mut slot, batch)) => {
                    // Still ours: dropping it armed would release under this lock.
                    slot.0 = None;
                    for w in batch.into_iter().rev() {
                        queue.waiting.push_front(w);
                    }
                }
                Err(Message::Done(_)) => {}
            }
        }
        queue.busy -= 1;
    }
}

/// A held read slot; dropping it passes the slot on. A slot handed to a call that is
/// cancelled before it looks at it is dropped with the message, so it is passed on too.
struct Slot(Option<Arc<Inner>>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            inner.release();
        }
    }
}
