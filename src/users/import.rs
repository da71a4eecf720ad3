//! ImportUsers: validated records, their batching, and the write of one batch.
//!
//! The gRPC handler validates each record into an [`ImportRecord`] (or a failure) and adds it
//! to a [`Batch`]. A batch closes at [`BATCH_RECORDS`] records, [`BATCH_BYTES`] bytes, or just
//! before a record that shares a unique key (id, email, phone, username, external id, linked
//! identity) with one already in it. That last rule makes a batch free of internal clashes, so
//! records apply as if one by one in stream order: a later duplicate meets the earlier record
//! as an existing user (ALREADY_EXISTS under CREATE_ONLY, an update under UPSERT), whatever
//! the batch boundaries.
//!
//! [`write_batch`] writes a batch in one transaction: binary COPY into a temporary staging
//! table, one query for every clash with stored users, one set-based INSERT, one UPDATE for
//! UPSERT matches, the identities, one USER_IMPORTED event per user written, then COMMIT (or
//! ROLLBACK for a dry run). Results are only handed back after that commit.
use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::Profile;
use super::bulk_store::{self, Clash, StagedIdentity, StagedUser};
use crate::auth::Caller;
use crate::authenticators::Kind;
use crate::crypto::seal::Sealer;
use crate::db::Client;
use crate::error::{Error, Result};
use crate::events::{EventContext, EventType, NewEvent, store as events};

/// Most records in one batch (one transaction, one fsync).
pub const BATCH_RECORDS: usize = 1000;
/// Most encoded record bytes in one batch: bounds the server's memory per import stream.
pub const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Most identities one record may carry.
pub const MAX_IDENTITIES: usize = 20;
/// Times a batch is re-checked when a concurrent write takes a unique value between the
/// clash check and the write.
const WRITE_ATTEMPTS: usize = 3;

/// What happens to a record whose user exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    CreateOnly,
    Upsert,
}

/// The key UPSERT matches existing users on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchOn {
    Email,
    ExternalId,
}

impl MatchOn {
    pub fn field(self) -> &'static str {
        match self {
            MatchOn::Email => "email",
            MatchOn::ExternalId => "external_id",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub mode: Mode,
    pub match_on: MatchOn,
    pub dry_run: bool,
    /// The client's name for this import: kept on its USER_IMPORTED events, so that a
    /// CREATE_ONLY record sent again after a break can be told from a clash
    /// (see [`replay_candidate`]).
    pub run_id: Option<String>,
    /// The project's `--password-history`: an UPSERT that replaces a user's hash files the
    /// old one as SetPassword does, so the history keeps covering the passwords it replaced.
    pub password_history: u32,
    /// Whether the server can seal TOTP seeds (ROSTER_ENCRYPTION_KEYS is set); a record
    /// carrying one fails otherwise.
    pub can_seal: bool,
}

/// A linked identity to create with an imported user.
#[derive(Debug, Clone)]
pub struct ImportIdentity {
    pub provider: String,
    pub subject: String,
    pub connection: Option<String>,
    pub email: Option<String>,
    pub profile: Map<String, Value>,
}

/// Most second factors a record carries (the per-user bound of enrolments).
pub const MAX_FACTORS: usize = crate::authenticators::factors::MAX_PER_USER as usize;

/// A second factor carried by export and import. The TOTP seed is in clear here: opened from
/// the source's seal on export, sealed again under the target's key and ids on import; so
/// this type's `Debug` leaves it out.
#[derive(Clone)]
pub struct CarriedFactor {
    pub kind: Kind,
    pub name: Option<String>,
    pub is_default: bool,
    pub created_at: Option<DateTime<Utc>>,
    pub totp_secret: Option<Vec<u8>>,
    pub recovery_code_hashes: Vec<Vec<u8>>,
    pub email: Option<String>,
    pub phone_number: Option<String>,
    /// A passkey: the stored credential (webauthn-rs's Passkey as JSON), with the columns
    /// the API shows, derived from it or carried along.
    pub passkey: Option<CarriedPasskey>,
}

/// A passkey's stored form and the columns kept beside it.
#[derive(Clone)]
pub struct CarriedPasskey {
    pub stored: Value,
    pub credential_id: Vec<u8>,
    pub aaguid: Option<Uuid>,
    pub transports: Vec<String>,
    pub backed_up: bool,
    pub sign_count: i64,
}

impl std::fmt::Debug for CarriedFactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CarriedFactor")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .field("is_default", &self.is_default)
            .finish_non_exhaustive()
    }
}

/// A validated record.
#[derive(Debug)]
pub struct ImportRecord {
    /// The id a created user gets: the client's, or a fresh UUIDv7.
    pub id: Uuid,
    /// Whether the client chose `id` (an UPSERT match must then have that id).
    pub id_given: bool,
    pub profile: Profile,
    /// The status a created user starts in (active, pending, blocked or deactivated); on
    /// UPSERT only blocked and deactivated count, and only as restrictions.
    pub status: super::UserStatus,
    pub blocked_reason: Option<String>,
    pub require_password_change: bool,
    pub password_hash: Option<String>,
    pub identities: Vec<ImportIdentity>,
    pub created_at: Option<DateTime<Utc>>,
    pub last_login_at: Option<DateTime<Utc>>,
    /// Second factors to enroll when the record creates its user.
    pub factors: Vec<CarriedFactor>,
}

/// What became of one record.
#[derive(Debug)]
pub enum Outcome {
    Created(Uuid),
    /// Created by an earlier stream of the same run; nothing written this time.
    Replayed(Uuid),
    Updated(Uuid),
    Failed(Error),
}

/// One record of a batch with its zero-based index in the stream; records that failed
/// validation ride along so their results keep their place.
#[derive(Debug)]
pub struct Entry {
    pub index: i64,
    pub record: Result<ImportRecord>,
}

/// A unique key a record claims; two records of one batch never share one.
#[derive(Hash, PartialEq, Eq)]
enum Key {
    Id(Uuid),
    Email(String),
    Phone(String),
    Username(String),
    ExternalId(String),
    Identity(String, String),
}

fn keys_of(r: &ImportRecord) -> Vec<Key> {
    let p = &r.profile;
    let mut keys = vec![Key::Id(r.id)];
    if let Some(e) = &p.email {
        keys.push(Key::Email(e.to_lowercase()));
    }
    if let Some(x) = &p.phone_number {
        keys.push(Key::Phone(x.clone()));
    }
    if let Some(u) = &p.username {
        keys.push(Key::Username(u.to_lowercase()));
    }
    if let Some(x) = &p.external_id {
        keys.push(Key::ExternalId(x.clone()));
    }
    for i in &r.identities {
        keys.push(Key::Identity(i.provider.clone(), i.subject.clone()));
    }
    keys
}

/// Records on their way to one transaction.
#[derive(Default)]
pub struct Batch {
    pub entries: Vec<Entry>,
    /// Shares a unique value with the batch before it: it must not be written while that
    /// one may still be in flight.
    pub barrier: bool,
    keys: HashSet<Key>,
    bytes: usize,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Groups a stream's records into batches. A batch closes at [`BATCH_RECORDS`] records,
/// [`BATCH_BYTES`] bytes, or before a record repeating one of its unique values; a batch
/// repeating a value of the batch before it is marked as a barrier. Together with at most two
/// batches in flight (only neighbours overlap), records apply as if one by one, in order.
#[derive(Default)]
pub struct Batcher {
    current: Batch,
    previous: HashSet<Key>,
}

impl Batcher {
    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    /// Adds a record; returns the batch it closed, if it had to start a new one.
    pub fn add(&mut self, entry: Entry, bytes: usize) -> Option<Batch> {
        let keys = entry.record.as_ref().map(keys_of).unwrap_or_default();
        let c = &self.current;
        let closes = !c.entries.is_empty()
            && (c.entries.len() >= BATCH_RECORDS
                || c.bytes + bytes > BATCH_BYTES
                || keys.iter().any(|k| c.keys.contains(k)));
        let closed = if closes { self.close() } else { None };
        let c = &mut self.current;
        if keys.iter().any(|k| self.previous.contains(k)) {
            c.barrier = true;
        }
        c.keys.extend(keys);
        c.bytes += bytes;
        c.entries.push(entry);
        closed
    }

    /// Closes the current batch (none when it is empty).
    pub fn close(&mut self) -> Option<Batch> {
        if self.current.is_empty() {
            return None;
        }
        let mut batch = std::mem::take(&mut self.current);
        self.previous = std::mem::take(&mut batch.keys);
        Some(batch)
    }
}

/// What was decided for a staged record once clashes are known.
enum Plan {
    Create,
    Update(Uuid),
    Fail(Error),
    /// Its user was created by this run before (see [`replay_candidate`]).
    Replay(Uuid),
}

fn clash(resource: &'static str, field: &'static str, owner: Uuid) -> Error {
    Error::AlreadyExists {
        resource,
        field,
        owner: Some(owner.to_string()),
    }
}

/// Decides one record: `hits` are the users holding each of its unique values, in the order
/// id, email, phone_number, username, external_id; `identity_owner` a user already linked to
/// one of its identities.
fn plan(
    options: &ImportOptions,
    record: &ImportRecord,
    hits: &Clash,
    identity_owner: Option<Uuid>,
) -> Plan {
    let fields = [
        ("id", hits.by_id),
        ("email", hits.by_email),
        ("phone_number", hits.by_phone),
        ("username", hits.by_username),
        ("external_id", hits.by_external_id),
    ];
    let target = match options.mode {
        Mode::CreateOnly => None,
        Mode::Upsert => match options.match_on {
            MatchOn::Email => hits.by_email,
            MatchOn::ExternalId => hits.by_external_id,
        },
    };
    // Anything held by a user other than the target is a clash.
    for (field, owner) in fields {
        if let Some(owner) = owner
            && Some(owner) != target
        {
            if field == "id" && target.is_some() {
                // The record's own id names another user than the one it matched.
                return Plan::Fail(Error::invalid(
                    "record.user_id",
                    format!(
                        "names another user than {} matched on {}",
                        target.unwrap_or_default(),
                        options.match_on.field()
                    ),
                ));
            }
            return Plan::Fail(clash("user", field, owner));
        }
    }
    if let Some(owner) = identity_owner
        && Some(owner) != target
    {
        return Plan::Fail(clash("identity", "provider_subject", owner));
    }
    match target {
        Some(t) if record.id_given && record.id != t => Plan::Fail(Error::invalid(
            "record.user_id",
            format!(
                "names another user than {t} matched on {}",
                options.match_on.field()
            ),
        )),
        Some(t) => Plan::Update(t),
        None => Plan::Create,
    }
}

/// Under CREATE_ONLY with a run id, the user a record would replay: the record names its id,
/// a user has that id, and that user holds every other unique value the record carries (its
/// email, phone, username, external id). Whether this run created that user, and whether
/// it still has the record's identities, is then asked of the database
/// ([`bulk_store::created_by_run`]). Anything less (a value now held by someone else, or
/// freed) is the clash it would be without a run id.
fn replay_candidate(options: &ImportOptions, record: &ImportRecord, hits: &Clash) -> Option<Uuid> {
    if options.mode != Mode::CreateOnly || options.run_id.is_none() || !record.id_given {
        return None;
    }
    let holder = hits.by_id?;
    let p = &record.profile;
    let held = |claimed: bool, by: Option<Uuid>| !claimed || by == Some(holder);
    (held(p.email.is_some(), hits.by_email)
        && held(p.phone_number.is_some(), hits.by_phone)
        && held(p.username.is_some(), hits.by_username)
        && held(p.external_id.is_some(), hits.by_external_id))
    .then_some(holder)
}

/// Makes sure `client` has the staging tables (they live as long as the connection).
pub async fn prepare(client: &Client) -> Result<()> {
    bulk_store::create_staging(&**client).await
}

/// Writes the valid records of `batch` and returns every entry's outcome, in batch order.
pub async fn write_batch(
    client: &mut Client,
    caller: &Caller,
    options: &ImportOptions,
    sealer: Option<&Sealer>,
    batch: Batch,
) -> Result<Vec<(i64, Outcome)>> {
    let mut outcomes: Vec<(i64, Option<Outcome>)> = Vec::with_capacity(batch.entries.len());
    let mut valid: Vec<(usize, ImportRecord)> = Vec::with_capacity(batch.entries.len());
    for entry in batch.entries {
        match entry.record {
            Ok(r) => {
                valid.push((outcomes.len(), r));
                outcomes.push((entry.index, None));
            }
            Err(e) => outcomes.push((entry.index, Some(Outcome::Failed(e)))),
        }
    }
    if !valid.is_empty() {
        let written = write_valid(client, caller, options, sealer, &valid).await?;
        for ((slot, _), outcome) in valid.iter().zip(written) {
            outcomes[*slot].1 = Some(outcome);
        }
    }
    Ok(outcomes
        .into_iter()
        .map(|(i, o)| {
            (
                i,
                o.unwrap_or_else(|| {
                    Outcome::Failed(Error::internal(anyhow::anyhow!("no outcome")))
                }),
            )
        })
        .collect())
}

async fn write_valid(
    client: &mut Client,
    caller: &Caller,
    options: &ImportOptions,
    sealer: Option<&Sealer>,
    records: &[(usize, ImportRecord)],
) -> Result<Vec<Outcome>> {
    let project = caller.project_id;
    let staged: Vec<StagedUser<'_>> = records
        .iter()
        .enumerate()
        .map(|(i, (_, r))| StagedUser {
            idx: i as i32,
            id: r.id,
            profile: &r.profile,
            status: r.status,
            blocked_reason: r.blocked_reason.as_deref(),
            require_password_change: r.require_password_change,
            password_hash: r.password_hash.as_deref(),
            created_at: r.created_at,
            last_login_at: r.last_login_at,
        })
        .collect();
    let identities: Vec<StagedIdentity<'_>> = records
        .iter()
        .enumerate()
        .flat_map(|(i, (_, r))| {
            r.identities.iter().map(move |x| StagedIdentity {
                idx: i as i32,
                id: Uuid::now_v7(),
                identity: x,
            })
        })
        .collect();

    let tx = client.transaction().await?;
    bulk_store::stage(&tx, &staged, &identities).await?;
    let mut attempt = 0;
    let outcomes = loop {
        attempt += 1;
        tx.batch_execute("SAVEPOINT import_write").await?;
        // The first attempt inserts plainly (fast); after a race, rows that lose a unique
        // value again are skipped and reported rather than failing the batch once more.
        match write_staged(&tx, project, options, records, attempt > 1).await {
            Ok(o) => break o,
            // A concurrent write took a unique value after the clash check: check again
            // (the savepoint keeps the staged rows).
            Err(Error::AlreadyExists { .. }) if attempt < WRITE_ATTEMPTS => {
                tracing::debug!(
                    attempt,
                    "an import batch lost a unique value to a concurrent write"
                );
                tx.batch_execute("ROLLBACK TO SAVEPOINT import_write")
                    .await?;
            }
            Err(Error::AlreadyExists { .. }) => {
                return Err(Error::Unavailable(anyhow::anyhow!(
                    "import batch kept racing concurrent writes"
                )));
            }
            Err(e) => return Err(e),
        }
    };
    // Created users' second factors (an UPSERT leaves a matched user's alone).
    let with_factors: Vec<(Uuid, &[CarriedFactor])> = records
        .iter()
        .zip(&outcomes)
        .filter_map(|((_, r), (o, _))| match o {
            Outcome::Created(id) if !r.factors.is_empty() => Some((*id, r.factors.as_slice())),
            _ => None,
        })
        .collect();
    let skipped = if with_factors.is_empty() {
        Default::default()
    } else {
        bulk_store::insert_factors(&tx, project, sealer, &with_factors).await?
    };
    let ctx = EventContext::from_caller(caller);
    let mut new_events = Vec::new();
    for ((_, r), (o, changed)) in records.iter().zip(&outcomes) {
        let (id, outcome) = match o {
            Outcome::Created(id) => (*id, "CREATED"),
            Outcome::Updated(id) if *changed => (*id, "UPDATED"),
            _ => continue,
        };
        let mut data = json!({
            "outcome": outcome,
            "fields": super::ops::set_fields(&r.profile),
            "has_password": r.password_hash.is_some(),
            "identities": r.identities.len(),
        });
        // What the record asked of the user's state (an UPSERT applies it as a restriction).
        if r.status != super::UserStatus::Active {
            data["status"] = json!(r.status.as_str());
        }
        if let Some(reason) = &r.blocked_reason {
            data["blocked_reason"] = json!(reason);
        }
        if r.require_password_change {
            data["require_password_change"] = json!(true);
        }
        if outcome == "CREATED" && !r.factors.is_empty() {
            let kinds: Vec<&str> = r.factors.iter().map(|f| f.kind.as_str()).collect();
            data["authenticators"] = json!(kinds);
            if let Some(n) = skipped.get(&id) {
                data["passkeys_skipped"] = json!(n);
            }
        }
        if let Some(run) = &options.run_id {
            data["run_id"] = json!(run);
        }
        new_events.push(NewEvent::for_user(EventType::UserImported, id, data));
    }
    events::record(&tx, project, &ctx, &new_events).await?;
    if options.dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(outcomes.into_iter().map(|(o, _)| o).collect())
}

/// One attempt at writing the staged batch: each outcome with whether the user changed.
async fn write_staged(
    tx: &deadpool_postgres::Transaction<'_>,
    project: Uuid,
    options: &ImportOptions,
    records: &[(usize, ImportRecord)],
    tolerant: bool,
) -> Result<Vec<(Outcome, bool)>> {
    let (clashes, identity_owners) = bulk_store::clashes(tx, project).await?;
    let mut plans: Vec<Plan> = Vec::with_capacity(records.len());
    let mut candidates: Vec<(i32, Uuid)> = Vec::new();
    let none = Clash::default();
    for (i, (_, r)) in records.iter().enumerate() {
        let hits = clashes.get(&(i as i32)).unwrap_or(&none);
        let owner = identity_owners.get(&(i as i32)).copied();
        if let Some(holder) = replay_candidate(options, r, hits) {
            candidates.push((i as i32, holder));
        }
        plans.push(plan(options, r, hits, owner));
    }
    if let (Some(run), false) = (&options.run_id, candidates.is_empty()) {
        // Only records that clash get here: a resumed stream's first batches, or a mistake.
        let ours = bulk_store::created_by_run(tx, project, run, &candidates).await?;
        for (i, holder) in candidates {
            if ours.contains(&i) {
                plans[i as usize] = Plan::Replay(holder);
            }
        }
    }
    let creates: Vec<i32> = plans
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p, Plan::Create))
        .map(|(i, _)| i as i32)
        .collect();
    let updates: Vec<(i32, Uuid)> = plans
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            Plan::Update(t) => Some((i as i32, *t)),
            _ => None,
        })
        .collect();
    let mut creates = creates;
    if tolerant {
        let created = bulk_store::insert_users_skipping_clashes(tx, project, &creates).await?;
        if created.len() < creates.len() {
            // The writers that won have committed (the insert waited for them): name them.
            let (now, _) = bulk_store::clashes(tx, project).await?;
            for i in creates.iter().filter(|i| !created.contains(i)) {
                let h = now.get(i).cloned().unwrap_or_default();
                let (field, owner) = [
                    ("email", h.by_email),
                    ("phone_number", h.by_phone),
                    ("username", h.by_username),
                    ("external_id", h.by_external_id),
                    ("id", h.by_id),
                ]
                .into_iter()
                .find_map(|(f, o)| o.map(|o| (f, o)))
                .unwrap_or(("id", Uuid::nil()));
                plans[*i as usize] = Plan::Fail(clash("user", field, owner));
            }
            creates = created;
        }
    } else {
        bulk_store::insert_users(tx, project, &creates).await?;
    }
    if options.password_history > 0 && !updates.is_empty() {
        let keep = options.password_history - 1;
        bulk_store::file_replaced_hashes(tx, project, &updates, keep).await?;
    }
    let changed = bulk_store::update_users(tx, project, &updates).await?;
    let mut owners: Vec<(i32, Uuid)> = creates
        .iter()
        .map(|i| (*i, records[*i as usize].1.id))
        .collect();
    owners.extend(updates.iter().copied());
    let linked = if records.iter().any(|(_, r)| !r.identities.is_empty()) {
        bulk_store::insert_identities(tx, project, &owners).await?
    } else {
        HashSet::new()
    };
    Ok(plans
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let i = i as i32;
            match p {
                Plan::Create => (Outcome::Created(records[i as usize].1.id), true),
                Plan::Update(t) => (
                    Outcome::Updated(t),
                    changed.contains(&i) || linked.contains(&i),
                ),
                Plan::Fail(e) => (Outcome::Failed(e), false),
                Plan::Replay(id) => (Outcome::Replayed(id), false),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(email: &str) -> ImportRecord {
        ImportRecord {
            id: Uuid::now_v7(),
            id_given: false,
            profile: Profile {
                email: Some(email.into()),
                ..Default::default()
            },
            status: crate::users::UserStatus::Active,
            blocked_reason: None,
            require_password_change: false,
            password_hash: None,
            identities: vec![],
            created_at: None,
            last_login_at: None,
            factors: vec![],
        }
    }

    fn entry(index: i64, r: ImportRecord) -> Entry {
        Entry {
            index,
            record: Ok(r),
        }
    }

    #[test]
    fn batches_close_before_a_duplicate_key_and_bar_overlap_with_the_previous() {
        let mut b = Batcher::default();
        assert!(b.add(entry(0, record("a@x.io")), 10).is_none());
        assert!(b.add(entry(1, record("b@x.io")), 10).is_none());
        let first = b.add(entry(2, record("A@X.IO")), 10).expect("closed");
        assert_eq!(first.entries.len(), 2);
        assert!(!first.barrier);
        let failed = Entry {
            index: 3,
            record: Err(Error::invalid("record", "bad")),
        };
        assert!(b.add(failed, 10).is_none());
        let second = b
            .add(entry(4, record("c@x.io")), BATCH_BYTES)
            .expect("closed");
        assert!(second.barrier, "it repeats a@x.io of the batch before");
        let third = b.close().expect("closed");
        assert!(!third.barrier);
        assert!(b.close().is_none());
    }

    #[test]
    fn upsert_plans() {
        let opts = ImportOptions {
            mode: Mode::Upsert,
            match_on: MatchOn::Email,
            dry_run: false,
            run_id: None,
            password_history: 0,
            can_seal: true,
        };
        let r = record("a@x.io");
        let (u, other) = (Uuid::now_v7(), Uuid::now_v7());
        let hits = Clash {
            by_email: Some(u),
            ..Default::default()
        };
        assert!(matches!(plan(&opts, &r, &hits, None), Plan::Update(t) if t == u));
        assert!(matches!(
            plan(&opts, &r, &Clash::default(), None),
            Plan::Create
        ));
        let taken = Clash {
            by_email: Some(u),
            by_username: Some(other),
            ..Default::default()
        };
        assert!(matches!(
            plan(&opts, &r, &taken, None),
            Plan::Fail(Error::AlreadyExists {
                field: "username",
                ..
            })
        ));
        assert!(matches!(
            plan(&opts, &r, &hits, Some(other)),
            Plan::Fail(Error::AlreadyExists {
                resource: "identity",
                ..
            })
        ));
        let create_only = ImportOptions {
            mode: Mode::CreateOnly,
            ..opts
        };
        assert!(matches!(
            plan(&create_only, &r, &hits, None),
            Plan::Fail(Error::AlreadyExists { field: "email", .. })
        ));
    }

    #[test]
    fn only_a_record_naming_its_id_whose_user_holds_all_its_values_may_replay() {
        let run = ImportOptions {
            mode: Mode::CreateOnly,
            match_on: MatchOn::Email,
            dry_run: false,
            run_id: Some("run-1".into()),
            password_history: 0,
            can_seal: true,
        };
        let mut r = record("a@x.io");
        r.id_given = true;
        r.profile.username = Some("ann".into());
        let (u, other) = (r.id, Uuid::now_v7());
        let all = Clash {
            by_id: Some(u),
            by_email: Some(u),
            by_username: Some(u),
            ..Default::default()
        };
        assert_eq!(replay_candidate(&run, &r, &all), Some(u));
        // A value now held by another user, or by nobody, is not the run's own write.
        for hits in [
            Clash {
                by_username: Some(other),
                ..all.clone()
            },
            Clash {
                by_email: None,
                ..all.clone()
            },
        ] {
            assert_eq!(replay_candidate(&run, &r, &hits), None);
        }
        // Nor without a run id, under UPSERT, or when the server made the id.
        let no_run = ImportOptions {
            run_id: None,
            ..run.clone()
        };
        let upsert = ImportOptions {
            mode: Mode::Upsert,
            ..run.clone()
        };
        assert_eq!(replay_candidate(&no_run, &r, &all), None);
        assert_eq!(replay_candidate(&upsert, &r, &all), None);
        r.id_given = false;
        assert_eq!(replay_candidate(&run, &r, &all), None);
    }
}
