//! `roster import FILE`: streams a JSONL, JSON or CSV file into ImportUsers.
//!
//! A reader thread parses the file and feeds a bounded channel, so parsing overlaps the
//! network and a slow server slows the reader instead of filling memory. The reader also
//! hands the main task a note per record (its record number, and its text when `--errors` is
//! given) so that a failed result can be written back with its reason; notes live only until
//! their result arrives. Records are numbered from 1 in file order (a CSV header is not a
//! record); `--skip N` leaves out the first N, which is how an interrupted import resumes.
//! An import of a file resumes by itself when the server goes away (a replica restarted, a
//! connection cut): the file is read again from the first record without a result. UPSERT
//! makes that safe (a record already written is matched and left as it is). So does
//! CREATE_ONLY: every stream of one import carries the same `run_id` (a UUIDv7), and the
//! reader gives each record without an id one made from the run id and the record's number
//! ([`given_id`]), so any process sending it again sends the same id; a record whose result
//! was lost in the break then meets the user this run created for it, which the server
//! answers as CREATED `replayed` (a user that was there before, or a record repeating
//! another's values, still fails). An import that stops (a signal, the server away too long)
//! prints the command that goes on as the same run.
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::ValueEnum as _;
use serde::de::{DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::records::{self, Format};
use super::remote::{Progress, ServerArgs};
use super::sources::{BetterAuthSecrets, Convert, FirebaseHash, OtpChannel, Source};
use crate::pb::v1 as pb;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// A record whose user exists fails with ALREADY_EXISTS.
    CreateOnly,
    /// A record matching an existing user (see --match-on) updates it.
    Upsert,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum MatchOnArg {
    Email,
    ExternalId,
}

/// The formats import reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// One JSON object per line.
    Jsonl,
    /// One JSON document: an array of records, or an object with a `users` array (Firebase's
    /// and Keycloak's exports; Cognito's `Users`), read as a stream.
    Json,
    /// A header row, then one record per row.
    Csv,
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The file to import (JSONL, JSON or CSV; `-` reads standard input).
    pub file: PathBuf,
    /// The file's format; when not given, `.csv`, `.jsonl` and `.ndjson` files are told by
    /// their extension, others by their content (`[`, or a `{` whose first line is not a whole
    /// record, is JSON; `{` JSONL; anything else CSV).
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,
    /// What to do with a record whose user exists.
    #[arg(long, value_enum, default_value = "create-only")]
    pub mode: ModeArg,
    /// The key UPSERT matches existing users on.
    #[arg(long, value_enum, default_value = "email")]
    pub match_on: MatchOnArg,
    /// Validate and report every record without writing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Write each failed record here, in the input's format, with `_record` and `_error`.
    #[arg(long)]
    pub errors: Option<PathBuf>,
    /// Whose field names the file uses: roster (what `roster export` writes), auth0 (an Auth0
    /// user export, JSON or CSV), firebase (`firebase auth:export users.json`), keycloak (a
    /// realm export), cognito (`aws cognito-idp list-users`), supabase (`auth.users` rows),
    /// clerk (the dashboard's export), kratos, better-auth (the README's queries), zitadel
    /// (an instance's export), okta (its user list) or appwrite (its Users API); see the
    /// README's "Moving off" paragraphs.
    #[arg(long, value_enum, default_value = "roster")]
    pub from: Source,
    /// With --from firebase: a file holding the project's password hash parameters as the
    /// Firebase console shows them (the hash_config block), needed to import passwords.
    #[arg(long, value_name = "FILE")]
    pub firebase_hash_parameters: Option<PathBuf>,
    /// With --from better-auth: a file holding your BETTER_AUTH_SECRET (or your app's .env,
    /// whose BETTER_AUTH_SECRET / BETTER_AUTH_SECRETS lines are read), to open the TOTP
    /// secrets Better Auth sealed with it, so two-factor users keep their authenticator app.
    #[arg(long, value_name = "FILE")]
    pub better_auth_secret_file: Option<PathBuf>,
    /// With --from better-auth, when the two-factor plugin's OTP method is on
    /// (`otpOptions.sendOTP`): where it sends codes, `email` or `sms`. Two-factor users then
    /// get that channel here (EMAIL_OTP or SMS_OTP), beside their authenticator app if any.
    #[arg(long, value_enum, value_name = "CHANNEL")]
    pub better_auth_otp: Option<OtpChannel>,
    /// Leave out the first N records (to resume an interrupted import, as the command it
    /// prints says).
    #[arg(long, default_value_t = 0)]
    pub skip: u64,
    /// The import's run id, a UUIDv7, sent as ImportOptions.run_id and kept on its
    /// USER_IMPORTED events (a fresh one unless given). A stopped CREATE_ONLY import goes on
    /// with the same one (the command it prints says so): records it had written then count
    /// as created instead of failing as duplicates.
    #[arg(long, value_name = "UUID", value_parser = run_id_arg)]
    pub run_id: Option<uuid::Uuid>,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// A record's text as read, for the errors file.
enum Raw {
    Line(String),
    Row(Vec<String>),
}

/// What the reader tells the main task, in file order.
enum Note {
    /// The CSV header (first, for CSV only).
    Header(Vec<String>),
    /// The next record sent to the server: its record number and text.
    Sent { record: u64, raw: Option<Raw> },
    /// A record that could not even be read into a request.
    Local {
        record: u64,
        raw: Raw,
        reason: String,
    },
    /// The reader stopped early.
    Broken(String),
}

/// Counts the bytes read, for the progress bar.
struct Counting<R> {
    inner: R,
    bytes: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The format the user gave, else the one the extension names, else `None`: the content
/// decides (a `.json` file may hold JSON lines or one document).
fn declared_format(args: &ImportArgs) -> Option<InputFormat> {
    if let Some(f) = args.format {
        return Some(f);
    }
    let ext = args
        .file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("csv") => Some(InputFormat::Csv),
        Some("jsonl" | "ndjson") => Some(InputFormat::Jsonl),
        _ => None,
    }
}

/// Reads the start of `input` and tells the format from it: `[` starts a JSON document; `{`
/// JSON lines when the first line is a whole record by itself, else a JSON document (a
/// pretty-printed export, or one whose records are in `users`); anything else is CSV.
/// Returns what was read, to be put back in front, so that a pipe (`roster export | roster
/// import -`) is told as well as a file.
fn sniff_format(input: &mut dyn Read) -> std::io::Result<(InputFormat, Vec<u8>)> {
    // A first line longer than this is not a user record.
    const MAX_LINE: usize = 1 << 20;
    let mut head = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match input.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        head.extend_from_slice(&chunk[..n]);
        let start = head.iter().position(|b| !b.is_ascii_whitespace());
        let decided = match start.map(|i| (i, head[i])) {
            // Bounded: a stream of nothing but blanks is taken as CSV, which then reads it.
            None if n > 0 && head.len() < 64 * 1024 => None,
            Some((i, b'{')) => {
                let line_end = head[i..].iter().position(|&b| b == b'\n').map(|e| i + e);
                match line_end {
                    None if n > 0 && head.len() < MAX_LINE => None,
                    end => {
                        let line = &head[i..end.unwrap_or(head.len())];
                        let record =
                            serde_json::from_slice::<Map<String, Value>>(line).is_ok_and(|obj| {
                                !["users", "Users", "orgs"]
                                    .iter()
                                    .any(|k| obj.contains_key(*k))
                            });
                        Some(if record {
                            InputFormat::Jsonl
                        } else {
                            InputFormat::Json
                        })
                    }
                }
            }
            Some((_, b'[')) => Some(InputFormat::Json),
            _ => Some(InputFormat::Csv),
        };
        if let Some(format) = decided {
            return Ok((format, head));
        }
    }
}

struct Reader {
    format: InputFormat,
    convert: Arc<Convert>,
    skip: u64,
    keep_raw: bool,
    /// The run whose ids records without one get ([`given_id`]; CREATE_ONLY).
    give_ids: Option<uuid::Uuid>,
    requests: mpsc::Sender<pb::ImportUsersRequest>,
    notes: std_mpsc::Sender<Note>,
}

impl Reader {
    /// Sends one parsed record; false when the stream is gone.
    fn send(&self, record: u64, raw: Raw, parsed: Result<Map<String, Value>, String>) -> bool {
        let request = parsed
            .and_then(|obj| self.convert.apply(obj))
            .and_then(records::import_record);
        match request {
            Err(reason) => self
                .notes
                .send(Note::Local {
                    record,
                    raw,
                    reason,
                })
                .is_ok(),
            Ok(mut r) => {
                let raw = self.keep_raw.then_some(raw);
                if let Some(run) = self.give_ids
                    && r.user_id.is_empty()
                {
                    r.user_id = given_id(run, record).to_string();
                }
                let note = Note::Sent { record, raw };
                if self.notes.send(note).is_err() {
                    return false;
                }
                let msg = pb::ImportUsersRequest {
                    item: Some(pb::import_users_request::Item::Record(r)),
                };
                self.requests.blocking_send(msg).is_ok()
            }
        }
    }

    fn run(self, input: impl Read) {
        let result = match self.format {
            InputFormat::Jsonl => self.jsonl(input),
            InputFormat::Json => self.json(input),
            InputFormat::Csv => self.csv(input),
        };
        if let Err(e) = result {
            let _ = self.notes.send(Note::Broken(format!("{e:#}")));
        }
    }

    fn jsonl(&self, input: impl Read) -> anyhow::Result<()> {
        let mut input = BufReader::with_capacity(256 * 1024, input);
        let mut line = String::new();
        let mut record = 0u64;
        loop {
            line.clear();
            if input.read_line(&mut line).context("reading the file")? == 0 {
                return Ok(());
            }
            let text = line.trim();
            if text.is_empty() {
                continue;
            }
            record += 1;
            if record <= self.skip {
                continue;
            }
            let parsed = serde_json::from_str::<Map<String, Value>>(text)
                .map_err(|e| format!("not a JSON object: {e}"));
            if !self.send(record, Raw::Line(text.to_string()), parsed) {
                return Ok(());
            }
        }
    }

    /// A JSON document, streamed: records are sent as the parser reaches them, so a
    /// million-user export is read in flat memory. Several documents one after another (JSON
    /// lines) are read too; unlike JSONL, a syntax error stops the reading at its line.
    fn json(&self, input: impl Read) -> anyhow::Result<()> {
        let input = BufReader::with_capacity(256 * 1024, input);
        let mut de = serde_json::Deserializer::from_reader(input);
        let mut walk = Walk {
            reader: self,
            record: 0,
            stopped: false,
        };
        // `end` is Ok once only blanks are left.
        while de.end().is_err() {
            let read = Top(&mut walk).deserialize(&mut de);
            if walk.stopped {
                return Ok(());
            }
            read.context("reading the JSON")?;
        }
        Ok(())
    }

    fn csv(&self, input: impl Read) -> anyhow::Result<()> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_reader(input);
        let header: Vec<String> = reader
            .headers()
            .context("reading the CSV header")?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        let _ = self.notes.send(Note::Header(header.clone()));
        let mut row = csv::StringRecord::new();
        let mut record = 0u64;
        loop {
            match reader.read_record(&mut row) {
                Ok(false) => return Ok(()),
                Ok(true) => {}
                Err(e) if e.is_io_error() => return Err(e).context("reading the file"),
                Err(e) => {
                    record += 1;
                    let raw = Raw::Row(row.iter().map(str::to_string).collect());
                    if record > self.skip && !self.send(record, raw, Err(e.to_string())) {
                        return Ok(());
                    }
                    continue;
                }
            }
            record += 1;
            if record <= self.skip {
                continue;
            }
            let parsed = if row.len() != header.len() {
                Err(format!(
                    "has {} fields where the header has {}",
                    row.len(),
                    header.len()
                ))
            } else {
                Ok(header
                    .iter()
                    .zip(row.iter())
                    .map(|(h, v)| (h.clone(), Value::String(v.to_string())))
                    .collect())
            };
            let raw = Raw::Row(row.iter().map(str::to_string).collect());
            if !self.send(record, raw, parsed) {
                return Ok(());
            }
        }
    }
}

/// Where the JSON reader is: the records seen, and whether the stream is gone.
struct Walk<'a> {
    reader: &'a Reader,
    record: u64,
    stopped: bool,
}

impl Walk<'_> {
    /// Sends one record; false once the stream is gone.
    fn record(&mut self, v: Value) -> bool {
        self.record += 1;
        if self.record <= self.reader.skip {
            return true;
        }
        // For the errors file: the record as one JSON line.
        let raw = Raw::Line(if self.reader.keep_raw {
            v.to_string()
        } else {
            String::new()
        });
        let parsed = match v {
            Value::Object(obj) => Ok(obj),
            _ => Err("not a JSON object".to_string()),
        };
        let sent = self.reader.send(self.record, raw, parsed);
        self.stopped = !sent;
        sent
    }
}

/// A JSON value at the top of the document or in a `users` array: a record, an array of
/// records, or an object whose `users` holds them (any other keys, such as a Keycloak realm's
/// settings, are skipped).
struct Top<'w, 'a>(&'w mut Walk<'a>);

impl<'de> DeserializeSeed<'de> for Top<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Top<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a user record, an array of them, or an object with a `users` array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(v) = seq.next_element::<Value>()? {
            if !self.0.record(v) {
                return Err(A::Error::custom("the import stopped"));
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut fields = Map::new();
        let mut container = false;
        let zitadel = matches!(*self.0.reader.convert, Convert::Zitadel);
        while let Some(key) = map.next_key::<String>()? {
            // Firebase and Keycloak say `users`, Cognito's list-users `Users`.
            if (key == "users" || key == "Users") && !container {
                container = true;
                map.next_value_seed(Users(&mut *self.0))?;
            } else if key == "orgs" && zitadel && !container {
                container = true;
                map.next_value_seed(Orgs(&mut *self.0))?;
            } else if container {
                map.next_value::<IgnoredAny>()?;
            } else {
                fields.insert(key, map.next_value()?);
            }
        }
        if !container && !self.0.record(Value::Object(fields)) {
            return Err(A::Error::custom("the import stopped"));
        }
        Ok(())
    }
}

/// The `users` array of a document.
struct Users<'w, 'a>(&'w mut Walk<'a>);

impl<'de> DeserializeSeed<'de> for Users<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(Top(self.0))
    }
}

/// A ZITADEL export's `orgs`: each organization read whole (its users' metadata and links
/// come after them), then its human users sent one by one.
struct Orgs<'w, 'a>(&'w mut Walk<'a>);

impl<'de> DeserializeSeed<'de> for Orgs<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Orgs<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a ZITADEL export's array of organizations")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(org) = seq.next_element::<Map<String, Value>>()? {
            for user in super::sources::zitadel_users(org) {
                if !self.0.record(user) {
                    return Err(A::Error::custom("the import stopped"));
                }
            }
        }
        Ok(())
    }
}

/// The `--errors` file: failed records in the input's format, with their reason.
enum ErrorsFile {
    None,
    Jsonl(BufWriter<std::fs::File>),
    Csv {
        path: PathBuf,
        writer: Option<Box<csv::Writer<std::fs::File>>>,
        /// The input header's width: shorter rows are padded to it, so that `_record` and
        /// `_error` stay in their columns.
        width: usize,
    },
}

impl ErrorsFile {
    fn open(path: &Option<PathBuf>, format: Format) -> anyhow::Result<ErrorsFile> {
        let Some(path) = path else {
            return Ok(ErrorsFile::None);
        };
        Ok(match format {
            Format::Jsonl => ErrorsFile::Jsonl(BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?,
            )),
            Format::Csv => ErrorsFile::Csv {
                path: path.clone(),
                writer: None,
                width: 0,
            },
        })
    }

    /// Starts the CSV errors file with the input's header (once: a resumed run reads the
    /// header again).
    fn header(&mut self, header: &[String]) -> anyhow::Result<()> {
        if let ErrorsFile::Csv {
            path,
            writer: writer @ None,
            width,
        } = self
        {
            // Flexible: a failed row with more cells than the header is written whole (its
            // error says so) rather than failing the run.
            let mut w = csv::WriterBuilder::new()
                .flexible(true)
                .from_path(&*path)
                .with_context(|| format!("creating {}", path.display()))?;
            *width = header.len();
            let mut cols = header.to_vec();
            cols.extend(["_record".to_string(), "_error".to_string()]);
            w.write_record(&cols)?;
            *writer = Some(Box::new(w));
        }
        Ok(())
    }

    fn write(&mut self, record: u64, raw: Option<Raw>, reason: &str) -> anyhow::Result<()> {
        match (self, raw) {
            (ErrorsFile::Jsonl(w), Some(Raw::Line(text))) => {
                let mut obj = match serde_json::from_str::<Map<String, Value>>(&text) {
                    Ok(obj) => obj,
                    Err(_) => Map::from_iter([("_line".to_string(), Value::String(text))]),
                };
                obj.insert("_record".into(), Value::from(record));
                obj.insert("_error".into(), Value::String(reason.to_string()));
                serde_json::to_writer(&mut *w, &obj)?;
                w.write_all(b"\n")?;
            }
            (
                ErrorsFile::Csv {
                    writer: Some(w),
                    width,
                    ..
                },
                Some(Raw::Row(mut fields)),
            ) => {
                if fields.len() < *width {
                    fields.resize(*width, String::new());
                }
                fields.extend([record.to_string(), reason.to_string()]);
                w.write_record(&fields)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(self) -> anyhow::Result<()> {
        match self {
            ErrorsFile::Jsonl(mut w) => w.flush()?,
            ErrorsFile::Csv {
                writer: Some(mut w),
                ..
            } => w.flush()?,
            _ => {}
        }
        Ok(())
    }
}

#[derive(Default)]
struct Tally {
    created: u64,
    updated: u64,
    failed: u64,
    shown: u64,
    /// Of `created`, records written before a break whose result was lost.
    created_before_break: u64,
}

impl Tally {
    fn done(&self) -> u64 {
        self.created + self.updated + self.failed
    }

    fn detail(&self) -> String {
        format!(
            "{} created, {} updated, {} failed",
            self.created, self.updated, self.failed
        )
    }
}

/// Failures printed to stderr when there is no `--errors` file.
const SHOWN_FAILURES: u64 = 10;

/// A record sent and not yet answered.
struct Waiting {
    record: u64,
    raw: Option<Raw>,
}

struct Results {
    notes: std_mpsc::Receiver<Note>,
    /// Records sent and not yet answered, by stream index.
    pending: BTreeMap<i64, Waiting>,
    next_index: i64,
    last_record: u64,
    errors: ErrorsFile,
    has_errors_file: bool,
    tally: Tally,
    broken: Option<String>,
    /// Records that failed before reaching the server, so that a resumed run, reading them
    /// again, does not count them twice.
    local_failed: BTreeSet<u64>,
}

impl Results {
    fn fail(&mut self, record: u64, raw: Option<Raw>, reason: &str) -> anyhow::Result<()> {
        self.tally.failed += 1;
        if !self.has_errors_file && self.tally.shown < SHOWN_FAILURES {
            self.tally.shown += 1;
            eprintln!("record {record}: {reason}");
        }
        self.errors.write(record, raw, reason)
    }

    /// Takes in the reader's notes; with `until`, waits for the note of that stream index.
    fn drain(&mut self, until: Option<i64>) -> anyhow::Result<()> {
        loop {
            if let Some(i) = until
                && self.pending.contains_key(&i)
            {
                return Ok(());
            }
            let note = match until {
                Some(_) => match self.notes.recv() {
                    Ok(n) => n,
                    Err(_) => bail!("the server answered a record that was never sent"),
                },
                None => match self.notes.try_recv() {
                    Ok(n) => n,
                    Err(_) => return Ok(()),
                },
            };
            match note {
                Note::Header(h) => self.errors.header(&h)?,
                Note::Sent { record, raw } => {
                    self.pending
                        .insert(self.next_index, Waiting { record, raw });
                    self.next_index += 1;
                    self.last_record = record;
                }
                Note::Local {
                    record,
                    raw,
                    reason,
                } => {
                    self.last_record = record;
                    if self.local_failed.insert(record) {
                        self.fail(record, Some(raw), &reason)?;
                    }
                    // Only those after the first record still waiting can be read again.
                    if self.local_failed.len() > 4096 {
                        // Pending records are kept in stream order, which is file order.
                        let first = self.pending.values().next().map(|w| w.record);
                        self.local_failed = self.local_failed.split_off(&first.unwrap_or(record));
                    }
                }
                Note::Broken(e) => self.broken = Some(e),
            }
        }
    }

    fn result(&mut self, r: pb::ImportResult) -> anyhow::Result<()> {
        self.drain(Some(r.index))?;
        let Some(Waiting { record, raw, .. }) = self.pending.remove(&r.index) else {
            return Ok(());
        };
        match pb::ImportOutcome::try_from(r.outcome) {
            Ok(pb::ImportOutcome::Created) => {
                self.tally.created += 1;
                // Written before a break took its result: this run's user, found again.
                self.tally.created_before_break += u64::from(r.replayed);
            }
            Ok(pb::ImportOutcome::Updated) => self.tally.updated += 1,
            _ => {
                let reason = r
                    .error
                    .map(|e| e.message)
                    .unwrap_or_else(|| "failed".into());
                self.fail(record, raw, &reason)?;
            }
        }
        Ok(())
    }

    /// The number of leading records that have a result (what `--skip` resumes after).
    fn answered_prefix(&mut self) -> u64 {
        let _ = self.drain(None);
        match self.pending.values().map(|w| w.record).min() {
            Some(first) => first - 1,
            None => self.last_record,
        }
    }
}

/// The command that imports the rest of the file after `done` records: the same reading of
/// it (source, Firebase's parameters, format) in the same mode, in case the last answers were
/// lost: an UPSERT matches what was written, a CREATE_ONLY goes on as the same `run`, whose
/// writes the server finds again.
fn resume_command(args: &ImportArgs, done: u64, run: uuid::Uuid) -> String {
    let mut command = format!("roster import {}", args.file.display());
    if let Some(from) = args.from.to_possible_value()
        && args.from != Source::Roster
    {
        command += &format!(" --from {}", from.get_name());
    }
    if let Some(p) = &args.firebase_hash_parameters {
        command += &format!(" --firebase-hash-parameters {}", p.display());
    }
    if let Some(p) = &args.better_auth_secret_file {
        command += &format!(" --better-auth-secret-file {}", p.display());
    }
    if let Some(c) = args.better_auth_otp.and_then(|c| c.to_possible_value()) {
        command += &format!(" --better-auth-otp {}", c.get_name());
    }
    if let Some(f) = args.format.and_then(|f| f.to_possible_value()) {
        command += &format!(" --format {}", f.get_name());
    }
    match (args.mode, args.match_on) {
        (ModeArg::CreateOnly, _) => command += &format!(" --run-id {run}"),
        (ModeArg::Upsert, MatchOnArg::Email) => command += " --mode upsert",
        (ModeArg::Upsert, MatchOnArg::ExternalId) => {
            command += " --mode upsert --match-on external-id"
        }
    }
    if args.dry_run {
        command += " --dry-run";
    }
    command + &format!(" --skip {done}")
}

/// `--run-id`: a UUIDv7, whose time the ids given to records are made with ([`given_id`]).
fn run_id_arg(s: &str) -> Result<uuid::Uuid, String> {
    match uuid::Uuid::parse_str(s) {
        Ok(id) if id.get_version_num() == 7 => Ok(id),
        _ => Err("must be a UUIDv7 (as a stopped import prints it)".into()),
    }
}

/// The id a record without one gets in a CREATE_ONLY import: a UUIDv7 with the run id's time
/// whose other bits are a hash of the run id and the record's number. The same run makes the
/// same id for the same record in any process, so a record sent again meets the user its
/// first send created; and, the run id being known only to those who can read the audit
/// log, the ids are as unguessable as ones the server makes (a counter would let anyone who
/// sees one user's id name the import's others).
fn given_id(run: uuid::Uuid, record: u64) -> uuid::Uuid {
    use sha2::{Digest, Sha256};
    let millis = run
        .get_timestamp()
        .map(|t| {
            let (secs, nanos) = t.to_unix();
            secs * 1000 + u64::from(nanos) / 1_000_000
        })
        .unwrap_or_default();
    let hash = Sha256::new()
        .chain_update(b"roster import record id\0")
        .chain_update(run.as_bytes())
        .chain_update(record.to_be_bytes())
        .finalize();
    let mut bits = [0u8; 10];
    bits.copy_from_slice(&hash[..10]);
    // The builder sets the version and variant bits over the hash's.
    uuid::Builder::from_unix_timestamp_millis(millis, &bits).into_uuid()
}

/// How long an import may go without a result, across reconnections, before it stops; and
/// the waits between reconnections (doubling from the first to the last).
const MAX_OUTAGE: Duration = Duration::from_secs(300);
const RECONNECT_FIRST: Duration = Duration::from_millis(500);
const RECONNECT_LAST: Duration = Duration::from_secs(30);

/// The file again, from its start, for a resumed run.
fn reopen(path: &std::path::Path) -> anyhow::Result<Box<dyn Read + Send>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Box::new(f))
}

pub async fn run(args: ImportArgs) -> anyhow::Result<()> {
    let run = args.run_id.unwrap_or_else(uuid::Uuid::now_v7);
    let (mut input, total): (Box<dyn Read + Send>, Option<u64>) = if args.file.as_os_str() == "-" {
        (Box::new(std::io::stdin()), None)
    } else {
        let f = std::fs::File::open(&args.file)
            .with_context(|| format!("opening {}", args.file.display()))?;
        let len = f.metadata().ok().map(|m| m.len());
        (Box::new(f), len)
    };
    let format = match declared_format(&args) {
        Some(f) => f,
        None => {
            let (f, head) = sniff_format(&mut input)
                .with_context(|| format!("reading {}", args.file.display()))?;
            input = Box::new(std::io::Cursor::new(head).chain(input));
            f
        }
    };
    if args.firebase_hash_parameters.is_some() && args.from != Source::Firebase {
        bail!("--firebase-hash-parameters goes with --from firebase");
    }
    if args.better_auth_secret_file.is_some() && args.from != Source::BetterAuth {
        bail!("--better-auth-secret-file goes with --from better-auth");
    }
    if args.better_auth_otp.is_some() && args.from != Source::BetterAuth {
        bail!("--better-auth-otp goes with --from better-auth");
    }
    let convert = match args.from {
        Source::Roster => Convert::Roster,
        Source::Auth0 => Convert::Auth0 {
            csv: format == InputFormat::Csv,
        },
        Source::Firebase => Convert::Firebase(read_with(
            args.firebase_hash_parameters.as_deref(),
            FirebaseHash::parse,
        )?),
        Source::Keycloak => Convert::Keycloak,
        Source::Cognito => Convert::Cognito,
        Source::Supabase => Convert::Supabase,
        Source::Clerk => Convert::Clerk,
        Source::Kratos => Convert::Kratos,
        Source::Zitadel => Convert::Zitadel,
        Source::Okta => Convert::Okta,
        Source::Appwrite => Convert::Appwrite,
        Source::BetterAuth => Convert::BetterAuth(
            read_with(
                args.better_auth_secret_file.as_deref(),
                BetterAuthSecrets::parse,
            )?,
            args.better_auth_otp,
        ),
    };
    if format == InputFormat::Csv
        && matches!(
            args.from,
            Source::Firebase
                | Source::Keycloak
                | Source::Cognito
                | Source::Supabase
                | Source::Kratos
                | Source::BetterAuth
                | Source::Zitadel
                | Source::Okta
                | Source::Appwrite
        )
    {
        bail!(
            "{:?} exports are read as JSON (firebase auth:export users.json; kc.sh export; \
             aws cognito-idp list-users; ZITADEL's /admin/v1/export; the README's commands \
             for Supabase, Kratos, Better Auth, Okta and Appwrite); this file looks like CSV",
            args.from
        );
    }
    // Failed records of a JSON document are written as JSON lines.
    let errors_format = match format {
        InputFormat::Csv => Format::Csv,
        InputFormat::Jsonl | InputFormat::Json => Format::Jsonl,
    };
    let errors = ErrorsFile::open(&args.errors, errors_format)?;
    let mut users = args.server.users().await?;
    let options = pb::ImportOptions {
        mode: match args.mode {
            ModeArg::CreateOnly => pb::ImportMode::CreateOnly,
            ModeArg::Upsert => pb::ImportMode::Upsert,
        } as i32,
        match_on: match args.match_on {
            MatchOnArg::Email => pb::ImportMatchOn::Email,
            MatchOnArg::ExternalId => pb::ImportMatchOn::ExternalId,
        } as i32,
        dry_run: args.dry_run,
        run_id: run.to_string(),
    };
    // Only an import of a file can go on by itself (the file can be read again; see the
    // module's doc for why that is exact in either mode).
    let from_file = args.file.as_os_str() != "-";
    let give_ids = (args.mode == ModeArg::CreateOnly && !args.dry_run).then_some(run);
    let convert = Arc::new(convert);
    let mut progress = Progress::new("imported", total, true);
    let mut input = Some(input);
    let mut skip = args.skip;
    let mut carried = (errors, Tally::default(), BTreeSet::new());
    let mut resumed = 0u32;
    let mut retrying = false;
    let mut wait = RECONNECT_FIRST;
    let mut last_result = Instant::now();
    // From here a signal stops the import saying how to go on (before, it ends the process).
    let mut stop = super::stop_on_signal()?;
    let (results, outcome, resume_at) = loop {
        let input = match input.take() {
            Some(i) => i,
            None => reopen(&args.file)?,
        };
        let (requests, requests_rx) = mpsc::channel(1024);
        requests
            .send(pb::ImportUsersRequest {
                item: Some(pb::import_users_request::Item::Options(options.clone())),
            })
            .await?;
        let (notes_tx, notes) = std_mpsc::channel();
        let bytes = Arc::new(AtomicU64::new(0));
        let reader = Reader {
            format,
            convert: convert.clone(),
            skip,
            keep_raw: args.errors.is_some(),
            give_ids,
            requests,
            notes: notes_tx,
        };
        let counting = Counting {
            inner: input,
            bytes: bytes.clone(),
        };
        let reader = std::thread::spawn(move || reader.run(counting));
        let (errors, tally, local_failed) = carried;
        let mut results = Results {
            notes,
            pending: BTreeMap::new(),
            next_index: 0,
            last_record: skip,
            errors,
            has_errors_file: args.errors.is_some(),
            tally,
            broken: None,
            local_failed,
        };
        let mut stopped_by = None;
        let call = async {
            let mut stream = users
                .import_users(ReceiverStream::new(requests_rx))
                .await?
                .into_inner();
            // Counted once the server took the call again, not per try while it was away.
            if retrying {
                resumed += 1;
                retrying = false;
            }
            let mut summary = None;
            while let Some(msg) = stream.message().await? {
                match msg.item {
                    Some(pb::import_users_response::Item::Result(r)) => {
                        results.result(r)?;
                        last_result = Instant::now();
                        wait = RECONNECT_FIRST;
                        let t = &results.tally;
                        progress.update(bytes.load(Ordering::Relaxed), t.done(), || t.detail());
                    }
                    Some(pb::import_users_response::Item::Summary(s)) => summary = Some(s),
                    None => {}
                }
            }
            anyhow::Ok(summary)
        };
        let outcome = tokio::select! {
            outcome = call => outcome,
            signal = stop.wait_for(Option::is_some) => {
                stopped_by = signal.ok().and_then(|s| *s);
                Ok(None)
            }
        };
        if let Some(signal) = stopped_by {
            // The reader may be waiting on standard input: it is left to end with the process.
            results.broken = Some(format!("interrupted ({signal})"));
            drop(reader);
        } else {
            // Local failures after the last record sent are only in the notes now.
            let _ = reader.join();
        }
        let resume_at = results.answered_prefix();
        let server_gone = match &outcome {
            Err(e) => super::remote::server_went_away(e),
            Ok(None) => true,
            Ok(Some(_)) => false,
        };
        if !(from_file
            && server_gone
            && results.broken.is_none()
            && last_result.elapsed() < MAX_OUTAGE)
        {
            break (results, outcome, resume_at);
        }
        let why = match &outcome {
            Err(e) => super::error_line(e),
            Ok(_) => "the server ended the stream without a summary".into(),
        };
        progress.println(&format!(
            "roster import: {why}; going on after record {resume_at} in {:.1} s",
            wait.as_secs_f64()
        ));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            signal = stop.wait_for(Option::is_some) => {
                let signal = signal.ok().and_then(|s| *s).unwrap_or_default();
                results.broken = Some(format!("interrupted ({signal})"));
                break (results, outcome, resume_at);
            }
        }
        wait = (wait * 2).min(RECONNECT_LAST);
        retrying = true;
        skip = resume_at;
        let mut local_failed = results.local_failed;
        local_failed.retain(|r| *r > resume_at);
        carried = (results.errors, results.tally, local_failed);
    };
    progress.finish();
    results.errors.finish()?;
    let t = &results.tally;
    let verb = if args.dry_run { "checked" } else { "imported" };
    // The run id names the import in the audit log (what it wrote: README, "Undoing an import").
    eprintln!(
        "{verb} {} records {}: {} (run {run})",
        t.done(),
        progress.took(t.done()),
        t.detail()
    );
    if t.failed > SHOWN_FAILURES && !results.has_errors_file {
        eprintln!("(first {SHOWN_FAILURES} failures shown; --errors FILE keeps them all)");
    }
    if resumed > 0 {
        eprintln!("the import went on {resumed} time(s) after the server went away");
    }
    if t.created_before_break > 0 {
        eprintln!(
            "({} of the created had been written by this run before, their results lost)",
            t.created_before_break
        );
    }
    let interrupted = match (&outcome, &results.broken) {
        (_, Some(b)) => Some(b.clone()),
        (Err(e), None) => Some(format!("{e:#}")),
        (Ok(None), None) => Some("the server ended the stream without a summary".into()),
        (Ok(Some(_)), None) => None,
    };
    if let Some(why) = interrupted {
        bail!(
            "the import stopped: {why}\nrecords 1 to {resume_at} have their results; resume with:\n  {}",
            resume_command(&args, resume_at, run)
        );
    }
    if t.failed > 0 {
        // Scripts see failed records as a non-zero exit (2), distinct from a broken run (1).
        return Err(super::Exit(2).into());
    }
    Ok(())
}

/// A settings file given with a flag, read and parsed (errors name the file).
fn read_with<T>(
    path: Option<&std::path::Path>,
    parse: fn(&str) -> Result<T, String>,
) -> anyhow::Result<Option<T>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_import_resumes_reading_the_file_the_same_way() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            import: ImportArgs,
        }
        let args = |line: &[&str]| Cli::parse_from([&["roster"], line].concat()).import;
        let run = uuid::Uuid::now_v7();
        assert_eq!(
            resume_command(&args(&["users.jsonl"]), 7, run),
            format!("roster import users.jsonl --run-id {run} --skip 7")
        );
        assert_eq!(
            resume_command(
                &args(&[
                    "users.jsonl",
                    "--mode",
                    "upsert",
                    "--match-on",
                    "external-id"
                ]),
                7,
                run
            ),
            "roster import users.jsonl --mode upsert --match-on external-id --skip 7"
        );
        assert_eq!(
            resume_command(&args(&["-", "--mode", "upsert", "--dry-run"]), 0, run),
            "roster import - --mode upsert --dry-run --skip 0"
        );
        assert_eq!(
            resume_command(
                &args(&[
                    "users.json",
                    "--from",
                    "firebase",
                    "--firebase-hash-parameters",
                    "hash.txt",
                    "--format",
                    "json",
                    "--skip",
                    "2",
                ]),
                1000,
                run
            ),
            format!(
                "roster import users.json --from firebase --firebase-hash-parameters hash.txt \
                 --format json --run-id {run} --skip 1000"
            )
        );
    }

    #[test]
    fn a_run_gives_records_the_same_ids_and_another_run_others() {
        let run = uuid::Uuid::now_v7();
        let ids: Vec<uuid::Uuid> = (1..=2000).map(|r| given_id(run, r)).collect();
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
        assert!(
            ids.iter()
                .all(|id| id.get_variant() == uuid::Variant::RFC4122)
        );
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        assert_eq!(given_id(run, 7), ids[6], "made again alike");
        let millis = |id: uuid::Uuid| id.get_timestamp().unwrap().to_unix();
        assert_eq!(millis(ids[1999]), millis(run));
        // Neighbouring records' ids share no more than their time: nothing to count along.
        assert_ne!(ids[0].as_bytes()[8..], ids[1].as_bytes()[8..]);
        assert_ne!(given_id(uuid::Uuid::now_v7(), 1), ids[0]);
        assert_eq!(run_id_arg(&run.to_string()), Ok(run));
        for bad in ["nightly", "3f1e0e9a-8c43-4c1e-9a56-2f8b2c7d1e00"] {
            assert!(run_id_arg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_format_is_told_from_the_content() {
        let long = format!("{{\"email\": \"{}@x.io\"}}\n", "a".repeat(100_000));
        for (text, format) in [
            (
                "{\"email\": \"a@x.io\"}\n{\"email\": \"b@x.io\"}\n",
                InputFormat::Jsonl,
            ),
            ("\n  {\"email\": \"a@x.io\"}", InputFormat::Jsonl),
            (long.as_str(), InputFormat::Jsonl),
            ("{\n  \"users\": [\n", InputFormat::Json),
            ("{\"users\": [{\"email\": \"a@x.io\"}]}", InputFormat::Json),
            ("{\"Users\": [], \"NextToken\": null}\n", InputFormat::Json),
            ("[{\"email\": \"a@x.io\"}]", InputFormat::Json),
            ("email,username\na@x.io,a\n", InputFormat::Csv),
            ("", InputFormat::Csv),
        ] {
            let mut input = std::io::Cursor::new(text.as_bytes().to_vec());
            let (got, head) = sniff_format(&mut input).unwrap();
            assert_eq!(got, format, "{:?}", &text[..text.len().min(40)]);
            // What was read is handed back whole.
            let mut all = head;
            input.read_to_end(&mut all).unwrap();
            assert_eq!(all, text.as_bytes());
        }
    }
}
