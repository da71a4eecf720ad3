//! ImportUsers and ExportUsers over gRPC: record validation, the two tasks of an import
//! stream, and export's read mask. The UserService methods in `grpc.rs` call in here.
//!
//! An import stream runs as two tasks joined by a channel of one batch: the reader validates
//! records and fills the next batch while the writer commits the previous one. Both channels
//! are bounded, so a fast client waits (HTTP/2 flow control) when the database is the
//! bottleneck, and a slow reader of results stops the writer: memory stays flat whatever the
//! stream's length.
use std::collections::HashSet;
use std::pin::Pin;
use std::time::Duration;

use chrono::Utc;
use futures_util::stream::FuturesOrdered;
use futures_util::{Stream, StreamExt};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use uuid::Uuid;

use super::grpc::{id_field, profile_from_proto, user_to_proto};
use super::import::{
    self, Batch, Batcher, CarriedFactor, Entry, ImportIdentity, ImportOptions, ImportRecord,
    MatchOn, Mode, Outcome,
};
use super::{USER_FIELDS, UserStatus, has_identifier, validate_profile};
use crate::auth::Caller;
use crate::crypto;
use crate::crypto::seal::Sealer;
use crate::error::{Error, Reason, Violations};
use crate::identities;
use crate::pb::v1 as pb;
use crate::wire;

pub type ImportStream =
    Pin<Box<dyn Stream<Item = Result<pb::ImportUsersResponse, Status>> + Send + 'static>>;
pub type ExportStream =
    Pin<Box<dyn Stream<Item = Result<pb::ExportUsersResponse, Status>> + Send + 'static>>;

/// What bounds exports on this server: how many run at once (each holds a database
/// connection and a snapshot for its whole run) and how long one waits on a client that
/// takes nothing.
pub struct Exports {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    limit: usize,
    pub stall: Option<Duration>,
}

/// How long a client refused for too many exports is told to wait.
const EXPORT_RETRY: Duration = Duration::from_secs(5);

impl Exports {
    pub fn new(limit: usize, stall: Option<Duration>) -> Self {
        Exports {
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(limit)),
            limit,
            stall,
        }
    }

    /// Exports running now.
    pub fn running(&self) -> usize {
        self.limit - self.slots.available_permits()
    }

    /// A slot for one export, held until it ends; RESOURCE_EXHAUSTED when all are taken.
    pub fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Error> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::Exhausted {
                reason: Reason::TooManyExports,
                message: format!(
                    "this server runs at most {} exports at once (--max-exports) and all are \
                     running; retry when one ends",
                    self.limit
                ),
                retry_after: EXPORT_RETRY,
            })
    }
}

/// A partial batch waits at most this long for the next record: a client that sends a few
/// records and waits for their results gets them promptly.
const IDLE_FLUSH: Duration = Duration::from_millis(20);

/// Longest `ImportOptions.run_id`: room for any id a client makes, bounded as every string.
const MAX_RUN_ID: usize = 128;

pub fn import_options(o: &pb::ImportOptions) -> Result<ImportOptions, Error> {
    let mut v = Violations::new();
    let mode = match pb::ImportMode::try_from(o.mode) {
        Ok(pb::ImportMode::Unspecified | pb::ImportMode::CreateOnly) => Mode::CreateOnly,
        Ok(pb::ImportMode::Upsert) => Mode::Upsert,
        Err(_) => {
            v.add("options.mode", "must be CREATE_ONLY or UPSERT");
            Mode::CreateOnly
        }
    };
    let match_on = match pb::ImportMatchOn::try_from(o.match_on) {
        Ok(pb::ImportMatchOn::Unspecified | pb::ImportMatchOn::Email) => MatchOn::Email,
        Ok(pb::ImportMatchOn::ExternalId) => MatchOn::ExternalId,
        Err(_) => {
            v.add("options.match_on", "must be EMAIL or EXTERNAL_ID");
            MatchOn::Email
        }
    };
    let run_id = (!o.run_id.is_empty()).then(|| o.run_id.clone());
    if let Some(run) = &run_id
        && (run.len() > MAX_RUN_ID || !run.bytes().all(|b| b.is_ascii_graphic()))
    {
        v.add(
            "options.run_id",
            format!("must be 1 to {MAX_RUN_ID} printable ASCII characters without spaces"),
        );
    }
    v.into_result()?;
    Ok(ImportOptions {
        mode,
        match_on,
        dry_run: o.dry_run,
        run_id,
        password_history: 0,
        can_seal: false,
    })
}

/// Validates one record, collecting every violation under `record.`.
pub fn record_from_proto(
    r: pb::ImportRecord,
    options: &ImportOptions,
) -> Result<ImportRecord, Error> {
    let mut v = Violations::new();
    let Some(u) = &r.user else {
        return Err(Error::invalid("record.user", "is required"));
    };
    let profile = profile_from_proto(u, "record.user", &mut v);
    validate_profile(&profile, "record.user", &mut v);
    if !has_identifier(&profile) {
        v.add(
            "record.user",
            "needs at least one of email, phone_number, username, external_id",
        );
    }
    if options.mode == Mode::Upsert {
        let (field, value) = match options.match_on {
            MatchOn::Email => ("email", &profile.email),
            MatchOn::ExternalId => ("external_id", &profile.external_id),
        };
        if value.is_none() {
            v.add(
                format!("record.user.{field}"),
                format!("is required: the import matches existing users on {field}"),
            );
        }
    }
    let (id, id_given) = if r.user_id.is_empty() {
        (Uuid::now_v7(), false)
    } else {
        (id_field(&mut v, "record.user_id", &r.user_id), true)
    };
    let password_hash = if r.password_hash.is_empty() {
        None
    } else {
        if let Err(e) = crypto::formats::parse(&r.password_hash) {
            v.add("record.password_hash", e);
        }
        Some(r.password_hash)
    };
    if r.identities.len() > import::MAX_IDENTITIES {
        v.add(
            "record.identities",
            format!("at most {} identities per record", import::MAX_IDENTITIES),
        );
    }
    let mut ids = Vec::with_capacity(r.identities.len());
    for (i, x) in r.identities.iter().take(import::MAX_IDENTITIES).enumerate() {
        ids.push(identity_from_proto(
            x,
            &format!("record.identities[{i}]"),
            &mut v,
        ));
    }
    for (i, a) in ids.iter().enumerate() {
        if ids[..i]
            .iter()
            .any(|b| a.provider == b.provider && a.subject == b.subject)
        {
            v.add(
                format!("record.identities[{i}]"),
                "repeats an identity of this record",
            );
        }
    }
    let created_at = past_time(&mut v, "record.created_at", &r.created_at);
    let last_login_at = past_time(&mut v, "record.last_login_at", &r.last_login_at);
    let factors = factors_from_proto(&r.authenticators, &mut v);
    let status = match (r.pending, r.blocked, r.deactivated) {
        (false, false, false) => UserStatus::Active,
        (true, false, false) => UserStatus::PendingVerification,
        (false, true, false) => UserStatus::Blocked,
        (false, false, true) => UserStatus::Deactivated,
        (_, blocked, _) => {
            v.add(
                if blocked {
                    "record.blocked"
                } else {
                    "record.deactivated"
                },
                "a record is at most one of pending, blocked and deactivated",
            );
            UserStatus::Active
        }
    };
    let blocked_reason = super::grpc::text(&r.blocked_reason);
    if let Some(reason) = &blocked_reason {
        if !r.blocked {
            v.add("record.blocked_reason", "goes with blocked");
        } else if let Err(m) = super::check_reason(reason) {
            v.add("record.blocked_reason", m);
        }
    }
    v.into_result()?;
    Ok(ImportRecord {
        id,
        id_given,
        profile,
        status,
        blocked_reason,
        require_password_change: r.require_password_change,
        password_hash,
        identities: ids,
        created_at,
        last_login_at,
        factors,
    })
    .and_then(|record| {
        if !options.can_seal && record.factors.iter().any(|f| f.totp_secret.is_some()) {
            return Err(Error::FailedPrecondition {
                reason: Reason::EncryptionNotConfigured,
                message: "TOTP seeds need ROSTER_ENCRYPTION_KEYS to be configured".into(),
            });
        }
        Ok(record)
    })
}

/// A past time, as a record's times must be: between 1970 and now (a day's leeway for the
/// source's clock).
fn past_time(
    v: &mut Violations,
    field: &str,
    t: &Option<prost_types::Timestamp>,
) -> Option<chrono::DateTime<Utc>> {
    let t = t.as_ref()?;
    let parsed = wire::from_timestamp(t)
        .filter(|t| t.timestamp() >= 0 && *t <= Utc::now() + chrono::Duration::days(1));
    if parsed.is_none() {
        v.add(field, "must be a valid time between 1970 and now");
    }
    parsed
}

/// Validates a record's second factors under `record.authenticators[i]`: kinds that can be
/// carried, each with only its own data and that bounded, the singletons once, one default.
fn factors_from_proto(list: &[pb::ImportAuthenticator], v: &mut Violations) -> Vec<CarriedFactor> {
    use crate::authenticators::Kind;
    if list.len() > import::MAX_FACTORS {
        v.add(
            "record.authenticators",
            format!("at most {} authenticators per user", import::MAX_FACTORS),
        );
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, a) in list.iter().take(import::MAX_FACTORS).enumerate() {
        let f = |name: &str| format!("record.authenticators[{i}].{name}");
        let kind = match pb::AuthenticatorType::try_from(a.r#type) {
            Ok(pb::AuthenticatorType::Totp) => Kind::Totp,
            Ok(pb::AuthenticatorType::RecoveryCodes) => Kind::RecoveryCodes,
            Ok(pb::AuthenticatorType::EmailOtp) => Kind::EmailOtp,
            Ok(pb::AuthenticatorType::SmsOtp) => Kind::SmsOtp,
            Ok(pb::AuthenticatorType::Passkey) => Kind::Passkey,
            _ => {
                v.add(
                    f("type"),
                    "must be TOTP, RECOVERY_CODES, EMAIL_OTP, SMS_OTP or PASSKEY",
                );
                continue;
            }
        };
        let name = crate::authenticators::grpc::optional_name(v, &f("name"), &a.name)
            // Named as a set Roster makes is, so a factor list reads the same either way.
            .or_else(|| {
                (kind == Kind::RecoveryCodes)
                    .then(|| crate::authenticators::recovery::SET_NAME.to_string())
            });
        // Each kind's own data, and none of the others'.
        let totp = kind == Kind::Totp;
        if totp == a.totp_secret.is_empty() {
            v.add(f("totp_secret"), "is required for TOTP and only for TOTP");
        } else if totp && !(16..=64).contains(&a.totp_secret.len()) {
            v.add(
                f("totp_secret"),
                "must be 16..=64 bytes (128 bits at least, as RFC 4226 asks)",
            );
        }
        let codes = kind == Kind::RecoveryCodes;
        if codes == a.recovery_code_hashes.is_empty() {
            v.add(
                f("recovery_code_hashes"),
                "are required for RECOVERY_CODES and only for them",
            );
        } else if codes {
            let hashes = &a.recovery_code_hashes;
            let max = crate::authenticators::recovery::IMPORTED_CODES_MAX;
            // SHA-256 (Roster's, Better Auth's, Kratos's) or SHA-512 (Keycloak's) of each.
            if hashes.len() > max || hashes.iter().any(|h| h.len() != 32 && h.len() != 64) {
                v.add(
                    f("recovery_code_hashes"),
                    format!(
                        "must be at most {max} hashes: SHA-256 (32 bytes) or SHA-512 (64 bytes)"
                    ),
                );
            } else if hashes.iter().collect::<HashSet<_>>().len() != hashes.len() {
                v.add(f("recovery_code_hashes"), "must be distinct");
            }
        }
        let email = Some(a.email.trim().to_string()).filter(|e| !e.is_empty());
        match (&email, kind == Kind::EmailOtp) {
            (Some(e), true) => {
                if let Err(m) = super::check_email(e) {
                    v.add(f("email"), m);
                }
            }
            (None, false) => {}
            _ => v.add(f("email"), "is required for EMAIL_OTP and only for it"),
        }
        let phone = Some(a.phone_number.trim().to_string()).filter(|p| !p.is_empty());
        match (&phone, kind == Kind::SmsOtp) {
            (Some(p), true) => {
                if let Err(m) = super::check_phone(p) {
                    v.add(f("phone_number"), m);
                }
            }
            (None, false) => {}
            _ => v.add(f("phone_number"), "is required for SMS_OTP and only for it"),
        }
        let passkey = carried_passkey(a, kind == Kind::Passkey, &f, v);
        if a.is_default && !kind.can_be_default() {
            v.add(
                f("is_default"),
                "recovery codes cannot be the default factor",
            );
        }
        let created_at = past_time(v, &f("created_at"), &a.created_at);
        out.push(CarriedFactor {
            kind,
            name,
            is_default: a.is_default,
            created_at,
            totp_secret: totp.then(|| a.totp_secret.clone()),
            recovery_code_hashes: a.recovery_code_hashes.clone(),
            email,
            phone_number: phone,
            passkey,
        });
    }
    for kind in [Kind::RecoveryCodes, Kind::EmailOtp, Kind::SmsOtp] {
        if out.iter().filter(|f| f.kind == kind).count() > 1 {
            v.add(
                "record.authenticators",
                format!("a user has at most one {}", kind.as_str()),
            );
        }
    }
    if out.iter().filter(|f| f.is_default).count() > 1 {
        v.add("record.authenticators", "at most one is_default");
    }
    out
}

/// A record's passkey: the stored JSON (bounded, and readable as webauthn-rs's Passkey),
/// the AAGUID and transports; none of them on another kind of factor.
fn carried_passkey(
    a: &pb::ImportAuthenticator,
    is_passkey: bool,
    f: &dyn Fn(&str) -> String,
    v: &mut Violations,
) -> Option<import::CarriedPasskey> {
    use crate::authenticators::passkey::{MAX_CARRIED_BYTES, read_carried};
    if !is_passkey {
        if !a.passkey.is_empty() || !a.aaguid.is_empty() || !a.transports.is_empty() {
            v.add(
                f("passkey"),
                "passkey, aaguid and transports are only for PASSKEY",
            );
        }
        return None;
    }
    let read = if a.passkey.len() > MAX_CARRIED_BYTES {
        v.add(
            f("passkey"),
            format!("must be at most {MAX_CARRIED_BYTES} bytes"),
        );
        None
    } else {
        let read = read_carried(&a.passkey);
        if read.is_none() {
            v.add(
                f("passkey"),
                "is required for PASSKEY: the credential as ExportUsers writes it",
            );
        }
        read
    };
    let aaguid = if a.aaguid.is_empty() {
        None
    } else {
        let parsed = Uuid::try_parse(&a.aaguid).ok();
        if parsed.is_none() {
            v.add(f("aaguid"), "must be a UUID");
        }
        parsed
    };
    // As the browser named them (usb, nfc, ble, hybrid, internal, smart-card, ...).
    let token = |t: &String| {
        (1..=32).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
    };
    if a.transports.len() > 8 || !a.transports.iter().all(token) {
        v.add(
            f("transports"),
            "at most 8 names such as usb, nfc, ble, hybrid, internal",
        );
    }
    let (stored, credential_id, backed_up, sign_count) = read?;
    Some(import::CarriedPasskey {
        stored,
        credential_id,
        aaguid,
        transports: a.transports.clone(),
        backed_up,
        sign_count,
    })
}

/// A carried factor as the proto says it.
pub fn factor_to_proto(f: CarriedFactor) -> pb::ImportAuthenticator {
    pb::ImportAuthenticator {
        r#type: f.kind as i32,
        name: f.name.unwrap_or_default(),
        is_default: f.is_default,
        created_at: f.created_at.map(wire::timestamp),
        totp_secret: f.totp_secret.unwrap_or_default(),
        recovery_code_hashes: f.recovery_code_hashes,
        email: f.email.unwrap_or_default(),
        phone_number: f.phone_number.unwrap_or_default(),
        passkey: f
            .passkey
            .as_ref()
            .and_then(|p| serde_json::to_vec(&p.stored).ok())
            .unwrap_or_default(),
        aaguid: f
            .passkey
            .as_ref()
            .and_then(|p| p.aaguid)
            .map(|u| u.to_string())
            .unwrap_or_default(),
        transports: f.passkey.map(|p| p.transports).unwrap_or_default(),
    }
}

fn identity_from_proto(x: &pb::ImportIdentity, prefix: &str, v: &mut Violations) -> ImportIdentity {
    use identities::grpc::short_text;
    use identities::{MAX_CONNECTION, MAX_PROVIDER, MAX_SUBJECT};
    let f = |name: &str| format!("{prefix}.{name}");
    let provider = short_text(v, &f("provider"), &x.provider, MAX_PROVIDER, true);
    let subject = short_text(v, &f("subject"), &x.subject, MAX_SUBJECT, true);
    let connection = short_text(v, &f("connection"), &x.connection, MAX_CONNECTION, false);
    let email = Some(x.email.trim().to_string()).filter(|e| !e.is_empty());
    if let Some(e) = &email
        && let Err(m) = super::check_email(e)
    {
        v.add(f("email"), m);
    }
    let profile = match &x.profile {
        None => serde_json::Map::new(),
        Some(s) => wire::struct_to_json(s)
            .and_then(|m| wire::check_metadata(&m).map(|_| m))
            .unwrap_or_else(|e| {
                v.add(f("profile"), e);
                serde_json::Map::new()
            }),
    };
    ImportIdentity {
        provider: provider.unwrap_or_default(),
        subject: subject.unwrap_or_default(),
        connection,
        email,
        profile,
    }
}

fn identity_to_proto(x: ImportIdentity) -> pb::ImportIdentity {
    pb::ImportIdentity {
        provider: x.provider,
        subject: x.subject,
        connection: x.connection.unwrap_or_default(),
        email: x.email.unwrap_or_default(),
        profile: Some(wire::json_to_struct(&x.profile)),
    }
}

/// An error as the google.rpc.Status of a failed record, with the same details a unary call
/// would carry.
fn rpc_status(e: Error) -> tonic_types::pb::Status {
    let status = Status::from(e);
    tonic_types::pb::Status::decode(status.details()).unwrap_or_else(|_| tonic_types::pb::Status {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: vec![],
    })
}

fn result_message(index: i64, outcome: Outcome) -> pb::ImportUsersResponse {
    let replayed = matches!(outcome, Outcome::Replayed(_));
    let (user_id, outcome, error) = match outcome {
        Outcome::Created(id) | Outcome::Replayed(id) => {
            (id.to_string(), pb::ImportOutcome::Created, None)
        }
        Outcome::Updated(id) => (id.to_string(), pb::ImportOutcome::Updated, None),
        Outcome::Failed(e) => (
            String::new(),
            pb::ImportOutcome::Failed,
            Some(rpc_status(e)),
        ),
    };
    pb::ImportUsersResponse {
        item: Some(pb::import_users_response::Item::Result(pb::ImportResult {
            index,
            user_id,
            outcome: outcome as i32,
            error,
            replayed,
        })),
    }
}

/// Runs an import stream: answers at once (a client may wait for the response headers before
/// it sends anything), then reads the options and spawns the reader and the writer. A bad
/// start (no options first, no database) ends the response stream with that error.
/// `password_history` is the caller's project's (see [`ImportOptions`]).
pub fn run_import(
    mut inbound: Streaming<pb::ImportUsersRequest>,
    pool: crate::db::Pool,
    caller: Caller,
    password_history: u32,
    sealer: Option<std::sync::Arc<Sealer>>,
) -> ImportStream {
    // Room for two batches of results: the writer never waits on a reader keeping up.
    let (out_tx, out_rx) = mpsc::channel(2 * import::BATCH_RECORDS);
    tokio::spawn(async move {
        match open_import(&mut inbound).await {
            Err(e) => {
                let _ = out_tx.send(Err(e)).await;
            }
            Ok(options) => {
                let options = ImportOptions {
                    password_history,
                    can_seal: sealer.is_some(),
                    ..options
                };
                let (batch_tx, batch_rx) = mpsc::channel(1);
                tokio::spawn(read_records(inbound, options.clone(), batch_tx));
                write_batches(pool, caller, options, sealer, batch_rx, out_tx).await;
            }
        }
    });
    Box::pin(ReceiverStream::new(out_rx))
}

async fn open_import(
    inbound: &mut Streaming<pb::ImportUsersRequest>,
) -> Result<ImportOptions, Status> {
    use pb::import_users_request::Item;
    let options = match inbound.message().await? {
        Some(pb::ImportUsersRequest {
            item: Some(Item::Options(o)),
        }) => import_options(&o)?,
        _ => {
            return Err(
                Error::invalid("options", "the first message must carry the options").into(),
            );
        }
    };
    Ok(options)
}

async fn read_records(
    mut inbound: Streaming<pb::ImportUsersRequest>,
    options: ImportOptions,
    batches: mpsc::Sender<Result<Batch, Status>>,
) {
    use pb::import_users_request::Item;
    let mut batcher = Batcher::default();
    let mut index: i64 = 0;
    loop {
        let next = if batcher.is_empty() {
            inbound.next().await
        } else {
            match tokio::time::timeout(IDLE_FLUSH, inbound.next()).await {
                Ok(next) => next,
                Err(_) => {
                    if let Some(b) = batcher.close()
                        && batches.send(Ok(b)).await.is_err()
                    {
                        return;
                    }
                    continue;
                }
            }
        };
        let msg = match next {
            None => break,
            // A message that does not decode is bad input: what came before it is written,
            // then the stream ends with INVALID_ARGUMENT naming its index (the codec reports
            // it as INVALID_ARGUMENT; a client going away is something else).
            Some(Err(status)) if status.code() == tonic::Code::InvalidArgument => {
                if let Some(b) = batcher.close() {
                    let _ = batches.send(Ok(b)).await;
                }
                let why = format!("message {index} is not a valid ImportUsersRequest");
                let _ = batches
                    .send(Err(Error::invalid("record", why).into()))
                    .await;
                return;
            }
            // The client went away or broke the stream: records not yet committed are not
            // written, so "re-send from the first record without a result" stays exact.
            Some(Err(_)) => return,
            Some(Ok(msg)) => msg,
        };
        let bytes = msg.encoded_len();
        let record = match msg.item {
            Some(Item::Record(r)) => record_from_proto(r, &options),
            Some(Item::Options(_)) => {
                let e = Error::invalid("options", "only the first message may carry options");
                if let Some(b) = batcher.close() {
                    let _ = batches.send(Ok(b)).await;
                }
                let _ = batches.send(Err(e.into())).await;
                return;
            }
            None => Err(Error::invalid("record", "is required")),
        };
        let entry = Entry { index, record };
        index += 1;
        if let Some(b) = batcher.add(entry, bytes)
            && batches.send(Ok(b)).await.is_err()
        {
            return;
        }
    }
    if let Some(b) = batcher.close() {
        let _ = batches.send(Ok(b)).await;
    }
}

/// Batches written at once per stream (two connections: PostgreSQL works on one batch while
/// the other commits). Only neighbouring batches are ever in flight together, which is what
/// [`Batcher`]'s barrier accounts for.
const WRITERS: usize = 2;

async fn write_one(
    pool: crate::db::Pool,
    caller: Caller,
    options: ImportOptions,
    sealer: Option<std::sync::Arc<Sealer>>,
    batch: Batch,
) -> crate::error::Result<Vec<(i64, Outcome)>> {
    // A connection per batch, not per stream: an idle stream holds none.
    let mut client = crate::db::client(&pool).await?;
    import::prepare(&client).await?;
    import::write_batch(&mut client, &caller, &options, sealer.as_deref(), batch).await
}

async fn write_batches(
    pool: crate::db::Pool,
    caller: Caller,
    options: ImportOptions,
    sealer: Option<std::sync::Arc<Sealer>>,
    mut batches: mpsc::Receiver<Result<Batch, Status>>,
    out: mpsc::Sender<Result<pb::ImportUsersResponse, Status>>,
) {
    let (mut created, mut updated, mut failed) = (0i64, 0i64, 0i64);
    // Written in order of start; results leave in batch order, each after its commit.
    let mut running = FuturesOrdered::new();
    let mut waiting: Option<Batch> = None;
    let mut input_done = false;
    let mut stream_error: Option<Status> = None;
    loop {
        if let Some(b) = waiting.take() {
            if running.is_empty() || (!b.barrier && running.len() < WRITERS) {
                if out.is_closed() {
                    return;
                }
                running.push_back(write_one(
                    pool.clone(),
                    caller.clone(),
                    options.clone(),
                    sealer.clone(),
                    b,
                ));
            } else {
                waiting = Some(b);
            }
        }
        if input_done && waiting.is_none() && running.is_empty() {
            break;
        }
        let can_take = !input_done && waiting.is_none() && running.len() < WRITERS;
        tokio::select! {
            done = running.next(), if !running.is_empty() => {
                let outcomes = match done {
                    Some(Ok(o)) => o,
                    Some(Err(e)) => {
                        let _ = out.send(Err(e.into())).await;
                        return;
                    }
                    None => continue,
                };
                for (index, outcome) in outcomes {
                    match outcome {
                        Outcome::Created(_) | Outcome::Replayed(_) => created += 1,
                        Outcome::Updated(_) => updated += 1,
                        Outcome::Failed(_) => failed += 1,
                    }
                    if out.send(Ok(result_message(index, outcome))).await.is_err() {
                        return;
                    }
                }
            }
            item = batches.recv(), if can_take => match item {
                None => input_done = true,
                Some(Ok(b)) if b.is_empty() => {}
                Some(Ok(b)) => waiting = Some(b),
                Some(Err(status)) => {
                    stream_error = Some(status);
                    input_done = true;
                }
            },
        }
    }
    if let Some(status) = stream_error {
        let _ = out.send(Err(status)).await;
        return;
    }
    let summary = pb::ImportUsersResponse {
        item: Some(pb::import_users_response::Item::Summary(
            pb::ImportSummary {
                created,
                updated,
                failed,
            },
        )),
    };
    let _ = out.send(Ok(summary)).await;
}

// ---- export ----

/// The fields a read mask keeps (`None`: all), collecting bad paths into `v`.
pub fn read_mask(
    mask: Option<&prost_types::FieldMask>,
    v: &mut Violations,
) -> Option<Vec<&'static str>> {
    let paths = mask.map(|m| m.paths.as_slice()).unwrap_or_default();
    if paths.is_empty() || paths.iter().any(|p| p.trim() == "*") {
        return None;
    }
    let mut fields = Vec::with_capacity(paths.len());
    for (i, p) in paths.iter().enumerate() {
        match USER_FIELDS.iter().find(|f| **f == p.trim()) {
            Some(f) if !fields.contains(f) => fields.push(*f),
            Some(_) => {}
            None => v.add(
                format!("read_mask.paths[{i}]"),
                format!("'{}' is not a field of User", p.trim()),
            ),
        }
    }
    Some(fields)
}

/// `u` with only the `fields` kept.
fn masked(mut u: pb::User, fields: &[&str]) -> pb::User {
    let mut out = pb::User::default();
    macro_rules! keep {
        ($name:expr, $($f:ident),*) => {
            match $name {
                $(stringify!($f) => out.$f = std::mem::take(&mut u.$f),)*
                _ => {}
            }
        };
    }
    for f in fields {
        keep!(
            *f,
            id,
            external_id,
            email,
            email_verified,
            phone_number,
            phone_verified,
            username,
            display_name,
            given_name,
            family_name,
            picture_url,
            locale,
            timezone,
            status,
            user_metadata,
            app_metadata,
            has_password,
            password_changed_at,
            require_password_change,
            enrolled_methods,
            default_method,
            login_count,
            last_login_at,
            last_login_ip,
            locked_until,
            blocked_reason,
            created_at,
            updated_at,
            etag
        );
    }
    out
}

/// The response stream of an export whose producer sends chunks into `rx` (its first, empty,
/// chunk already received) and its outcome into `end` once it stops: the stream ends with
/// that outcome after the last chunk, so an export that broke off (or whose producer
/// vanished) never looks complete.
pub fn export_stream(
    rx: mpsc::Receiver<Vec<super::ops::Exported>>,
    end: tokio::sync::oneshot::Receiver<crate::error::Result<()>>,
    fields: Option<Vec<&'static str>>,
) -> ExportStream {
    let users = ReceiverStream::new(rx).flat_map(move |chunk| {
        let items: Vec<Result<pb::ExportUsersResponse, Status>> = chunk
            .into_iter()
            .map(|x| {
                let user = user_to_proto(&x.user);
                Ok(pb::ExportUsersResponse {
                    user: Some(match &fields {
                        Some(f) => masked(user, f),
                        None => user,
                    }),
                    password_hash: x.password_hash.unwrap_or_default(),
                    identities: x.identities.into_iter().map(identity_to_proto).collect(),
                    authenticators: x.factors.into_iter().map(factor_to_proto).collect(),
                })
            })
            .collect();
        futures_util::stream::iter(items)
    });
    let outcome = futures_util::stream::once(async move {
        match end.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(Err(e.into())),
            Err(_) => Some(Err(Error::internal(anyhow::anyhow!(
                "the export ended before its last user"
            ))
            .into())),
        }
    })
    .filter_map(futures_util::future::ready);
    Box::pin(users.chain(outcome))
}
