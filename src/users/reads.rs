//! GetUser coalescing (`crate::coalesce`): calls that arrive while earlier reads are at the
//! database are read together, one statement per project, `id = ANY(...)`.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use prometheus_client::metrics::histogram::Histogram;
use uuid::Uuid;

use super::User;
use super::store;
use crate::coalesce::{Coalescer, Turn, Waiter};
use crate::db;
use crate::error::{Error, Result};

type Key = (Uuid, Uuid);
type Wanted = Waiter<Key, Result<Option<User>>>;

/// Reads users by id, coalescing concurrent calls, on the shared read connections.
pub struct UserReads {
    readers: Arc<db::Readers>,
    calls: Coalescer<Key, Result<Option<User>>>,
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
        UserReads {
            readers,
            calls: Coalescer::new(slots, max_batch, sizes),
        }
    }

    /// The user `id` of `project_id`, if there is one.
    pub async fn get(&self, project_id: Uuid, id: Uuid) -> Result<Option<User>> {
        let key = (project_id, id);
        match self.calls.enter(key).await {
            Turn::Answered(answer) => answer,
            // This call holds a slot until `_slot` drops, also when the call is cancelled.
            Turn::Lead {
                slot: _slot,
                item,
                others,
            } => self.read_for(item, others).await,
            // The call reading for this one was cancelled mid-read: read alone.
            Turn::Orphaned => self.alone(key).await,
        }
    }

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
                    w.answer(Err(Error::shared(e.clone())));
                }
                return Err(Error::shared(e));
            }
        };
        // Two calls for one user each get it; the last to be answered (this call, for its
        // own) takes it without a copy.
        let mut later = HashSet::from([own]);
        let last: Vec<bool> = others.iter().rev().map(|w| later.insert(w.item)).collect();
        for (w, last) in others.into_iter().zip(last.into_iter().rev()) {
            let user = if last {
                found.remove(&w.item)
            } else {
                found.get(&w.item).cloned()
            };
            w.answer(Ok(user));
        }
        Ok(found.remove(&own))
    }

    /// One statement per project among the keys (almost always one), pipelined on one
    /// connection.
    async fn read(&self, own: Key, others: &[Wanted]) -> Result<HashMap<Key, User>> {
        let mut projects: Vec<(Uuid, Vec<Uuid>)> = vec![(own.0, vec![own.1])];
        for (project_id, id) in others.iter().map(|w| w.item) {
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
}
