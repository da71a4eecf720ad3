//! GetUser, LookupUser and LookupUserByIdentity coalescing (`crate::coalesce`): calls that
//! arrive while earlier reads are at the database are read together, one statement per
//! project and kind of key (`id = ANY(...)`, or one index probe per email, phone number,
//! username, external id or linked identity).
use std::collections::{HashMap, HashSet};
use std::mem::discriminant;
use std::sync::Arc;

use deadpool_postgres::GenericClient;
use prometheus_client::metrics::histogram::Histogram;
use uuid::Uuid;

use super::{LookupKey, User, store};
use crate::coalesce::{Coalescer, Turn, Waiter};
use crate::db;
use crate::error::{Error, Result};
use crate::identities::{self, Identity};

/// What a call finds its user by.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Find {
    Id(Uuid),
    Key(LookupKey),
    /// A linked identity: (provider, subject).
    Identity(String, String),
}

impl Find {
    /// Whether `self` and `other` are read by the same statement.
    fn same_kind(&self, other: &Find) -> bool {
        match (self, other) {
            (Find::Id(_), Find::Id(_)) => true,
            (Find::Key(a), Find::Key(b)) => discriminant(a) == discriminant(b),
            (Find::Identity(..), Find::Identity(..)) => true,
            _ => false,
        }
    }
}

type Key = (Uuid, Find);
/// A user found, with the identity that found it (for `Find::Identity`).
type Found = (User, Option<Identity>);
type Wanted = Waiter<Key, Result<Option<Found>>>;

/// Reads users by id, unique key or linked identity, coalescing concurrent calls, on the
/// shared read connections.
pub struct UserReads {
    readers: Arc<db::Readers>,
    calls: Coalescer<Key, Result<Option<Found>>>,
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
        let found = self.find((project_id, Find::Id(id))).await?;
        Ok(found.map(|(user, _)| user))
    }

    /// The user of `project_id` that `key` names, if there is one.
    pub async fn lookup(&self, project_id: Uuid, key: LookupKey) -> Result<Option<User>> {
        let found = self.find((project_id, Find::Key(key))).await?;
        Ok(found.map(|(user, _)| user))
    }

    /// The user of `project_id` linked to `subject` at `provider`, with that identity.
    pub async fn lookup_by_identity(
        &self,
        project_id: Uuid,
        provider: &str,
        subject: &str,
    ) -> Result<Option<(User, Identity)>> {
        let find = Find::Identity(provider.to_string(), subject.to_string());
        let found = self.find((project_id, find)).await?;
        Ok(found.and_then(|(user, identity)| Some((user, identity?))))
    }

    async fn find(&self, key: Key) -> Result<Option<Found>> {
        match self.calls.enter(key.clone()).await {
            Turn::Answered(answer) => answer,
            // This call holds a slot until `_slot` drops, also when the call is cancelled.
            Turn::Lead {
                slot: _slot,
                item,
                others,
            } => self.read_for(item, others).await,
            // The call reading for this one was cancelled mid-read: read alone.
            Turn::Orphaned => self.alone(&key).await,
        }
    }

    /// One call's read (also the idle path, a slot held).
    async fn alone(&self, (project_id, find): &Key) -> Result<Option<Found>> {
        let client = self.readers.get().await?;
        let (db, p) = (&**client, *project_id);
        Ok(match find {
            Find::Id(id) => store::get(db, p, *id).await?.map(|u| (u, None)),
            Find::Key(key) => store::lookup(db, p, key).await?.map(|u| (u, None)),
            Find::Identity(provider, subject) => {
                identities::store::lookup_user(db, p, provider, subject)
                    .await?
                    .map(|(u, i)| (u, Some(i)))
            }
        })
    }

    /// Reads `own` and the keys of `others` together; answers `others`, returns `own`'s.
    async fn read_for(&self, own: Key, others: Vec<Wanted>) -> Result<Option<Found>> {
        if others.is_empty() {
            return self.alone(&own).await;
        }
        let mut found = match self.read(&own, &others).await {
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
        let last: Vec<bool> = {
            let mut later = HashSet::from([&own]);
            let mut last: Vec<bool> = others.iter().rev().map(|w| later.insert(&w.item)).collect();
            last.reverse();
            last
        };
        for (w, last) in others.into_iter().zip(last) {
            let user = if last {
                found.remove(&w.item)
            } else {
                found.get(&w.item).cloned()
            };
            w.answer(Ok(user));
        }
        Ok(found.remove(&own))
    }

    /// One statement per project and kind of key among the calls (almost always one),
    /// pipelined on one connection.
    async fn read(&self, own: &Key, others: &[Wanted]) -> Result<HashMap<Key, Found>> {
        let mut groups: Vec<(Uuid, Vec<&Find>)> = Vec::new();
        for (project_id, find) in std::iter::once(own).chain(others.iter().map(|w| &w.item)) {
            match groups
                .iter_mut()
                .find(|(p, finds)| p == project_id && finds[0].same_kind(find))
            {
                Some((_, finds)) => finds.push(find),
                None => groups.push((*project_id, vec![find])),
            }
        }
        let client = self.readers.get().await?;
        let reads = groups
            .iter()
            .map(|(project_id, finds)| read_group(&**client, *project_id, finds));
        let mut found = HashMap::with_capacity(others.len() + 1);
        for users in futures_util::future::join_all(reads).await {
            found.extend(users?);
        }
        Ok(found)
    }
}

/// The users of one project found by `finds`, all of one kind, each under its key.
async fn read_group(
    db: &impl GenericClient,
    project_id: Uuid,
    finds: &[&Find],
) -> Result<Vec<(Key, Found)>> {
    let mut ids = Vec::new();
    let mut keys = Vec::new();
    let mut linked = Vec::new();
    for find in finds {
        match find {
            Find::Id(id) => ids.push(*id),
            Find::Key(key) => keys.push(key),
            Find::Identity(provider, subject) => linked.push((provider.as_str(), subject.as_str())),
        }
    }
    if !ids.is_empty() {
        let users = store::get_many(db, project_id, &ids).await?;
        return Ok(users
            .into_iter()
            .map(|u| ((project_id, Find::Id(u.id)), (u, None)))
            .collect());
    }
    if !linked.is_empty() {
        let found = identities::store::lookup_users_many(db, project_id, &linked).await?;
        return Ok(found
            .into_iter()
            .map(|(i, u, identity)| {
                let (provider, subject) = linked[i];
                let key = Find::Identity(provider.to_string(), subject.to_string());
                ((project_id, key), (u, Some(identity)))
            })
            .collect());
    }
    let users = store::lookup_many(db, project_id, &keys).await?;
    Ok(users
        .into_iter()
        .map(|(i, u)| ((project_id, Find::Key(keys[i].clone())), (u, None)))
        .collect())
}
