//! `roster import FILE`: streams a JSONL or CSV file into ImportUsers.
//!
//! A reader thread parses the file and feeds a bounded channel, so parsing overlaps the
//! network and a slow server slows the reader instead of filling memory. The reader also
//! hands the main task a note per record (its record number, and its text when `--errors` is
//! given) so that a failed result can be written back with its reason; notes live only until
//! their result arrives. Records are numbered from 1 in file order (a CSV header is not a
//! record); `--skip N` leaves out the first N, which is how an interrupted import resumes.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;

use anyhow::{Context, bail};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::records::{self, Format, Source};
use super::remote::{Progress, ServerArgs};
use crate::pb::v1 as pb;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
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

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The file to import (JSONL or CSV; `-` reads standard input).
    pub file: PathBuf,
    /// The file's format; told from the extension, else from the first non-blank byte (`{` is
    /// JSONL, anything else CSV), when not given.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
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
    /// Whose field names the file uses: roster (what `roster export` writes) or auth0 (an
    /// Auth0 user export, JSON or CSV; see the README's migrating from Auth0).
    #[arg(long, value_enum, default_value = "roster")]
    pub from: Source,
    /// Leave out the first N records (to resume an interrupted import; use --mode upsert).
    #[arg(long, default_value_t = 0)]
    pub skip: u64,
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
/// decides.
fn declared_format(args: &ImportArgs) -> Option<Format> {
    if let Some(f) = args.format {
        return Some(f);
    }
    let ext = args
        .file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("csv") => Some(Format::Csv),
        Some("jsonl" | "ndjson" | "json") => Some(Format::Jsonl),
        _ => None,
    }
}

/// Reads `input` up to its first non-blank byte (or the end) and tells the format from it: a
/// `{` starts JSONL, anything else is CSV. Returns what was read, to be put back in front, so
/// that a pipe (`roster export | roster import -`) is told as well as a file.
fn sniff_format(input: &mut dyn Read) -> std::io::Result<(Format, Vec<u8>)> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = match input.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        head.extend_from_slice(&chunk[..n]);
        let first = head.iter().find(|b| !b.is_ascii_whitespace());
        // Bounded: a stream of nothing but blanks is taken as CSV, which then reads it.
        if n == 0 || first.is_some() || head.len() >= 64 * 1024 {
            let format = match first {
                Some(b'{') => Format::Jsonl,
                _ => Format::Csv,
            };
            return Ok((format, head));
        }
    }
}

struct Reader {
    format: Format,
    from: Source,
    skip: u64,
    keep_raw: bool,
    requests: mpsc::Sender<pb::ImportUsersRequest>,
    notes: std_mpsc::Sender<Note>,
}

impl Reader {
    /// Sends one parsed record; false when the stream is gone.
    fn send(&self, record: u64, raw: Raw, parsed: Result<Map<String, Value>, String>) -> bool {
        let csv = self.format == Format::Csv;
        let request = parsed
            .and_then(|obj| match self.from {
                Source::Roster => Ok(obj),
                Source::Auth0 => records::from_auth0(obj, csv),
            })
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
            Ok(r) => {
                let raw = self.keep_raw.then_some(raw);
                if self.notes.send(Note::Sent { record, raw }).is_err() {
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
            Format::Jsonl => self.jsonl(input),
            Format::Csv => self.csv(input),
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

/// The `--errors` file: failed records in the input's format, with their reason.
enum ErrorsFile {
    None,
    Jsonl(BufWriter<std::fs::File>),
    Csv {
        path: PathBuf,
        writer: Option<Box<csv::Writer<std::fs::File>>>,
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
            },
        })
    }

    fn header(&mut self, header: &[String]) -> anyhow::Result<()> {
        if let ErrorsFile::Csv { path, writer } = self {
            let mut w = csv::Writer::from_path(&*path)
                .with_context(|| format!("creating {}", path.display()))?;
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
                    writer: Some(w), ..
                },
                Some(Raw::Row(mut fields)),
            ) => {
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

struct Results {
    notes: std_mpsc::Receiver<Note>,
    /// Records sent and not yet answered, by stream index: (record number, text).
    pending: BTreeMap<i64, (u64, Option<Raw>)>,
    next_index: i64,
    last_record: u64,
    errors: ErrorsFile,
    has_errors_file: bool,
    tally: Tally,
    broken: Option<String>,
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
                    self.pending.insert(self.next_index, (record, raw));
                    self.next_index += 1;
                    self.last_record = record;
                }
                Note::Local {
                    record,
                    raw,
                    reason,
                } => {
                    self.last_record = record;
                    self.fail(record, Some(raw), &reason)?;
                }
                Note::Broken(e) => self.broken = Some(e),
            }
        }
    }

    fn result(&mut self, r: pb::ImportResult) -> anyhow::Result<()> {
        self.drain(Some(r.index))?;
        let Some((record, raw)) = self.pending.remove(&r.index) else {
            return Ok(());
        };
        match pb::ImportOutcome::try_from(r.outcome) {
            Ok(pb::ImportOutcome::Created) => self.tally.created += 1,
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
        match self.pending.values().map(|(record, _)| *record).min() {
            Some(first) => first - 1,
            None => self.last_record,
        }
    }
}

pub async fn run(args: ImportArgs) -> anyhow::Result<()> {
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
    let errors = ErrorsFile::open(&args.errors, format)?;
    let mut users = args.server.users().await?;

    let (requests, requests_rx) = mpsc::channel(1024);
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
    };
    requests
        .send(pb::ImportUsersRequest {
            item: Some(pb::import_users_request::Item::Options(options)),
        })
        .await?;
    let (notes_tx, notes) = std_mpsc::channel();
    let bytes = Arc::new(AtomicU64::new(0));
    let reader = Reader {
        format,
        from: args.from,
        skip: args.skip,
        keep_raw: args.errors.is_some(),
        requests,
        notes: notes_tx,
    };
    let counting = Counting {
        inner: input,
        bytes: bytes.clone(),
    };
    let reader = std::thread::spawn(move || reader.run(counting));

    let mut progress = Progress::new("imported", total, true);
    let mut results = Results {
        notes,
        pending: BTreeMap::new(),
        next_index: 0,
        last_record: args.skip,
        errors,
        has_errors_file: args.errors.is_some(),
        tally: Tally::default(),
        broken: None,
    };
    let outcome = async {
        let mut stream = users
            .import_users(ReceiverStream::new(requests_rx))
            .await?
            .into_inner();
        let mut summary = None;
        while let Some(msg) = stream.message().await? {
            match msg.item {
                Some(pb::import_users_response::Item::Result(r)) => {
                    results.result(r)?;
                    let t = &results.tally;
                    progress.update(bytes.load(Ordering::Relaxed), t.done(), || t.detail());
                }
                Some(pb::import_users_response::Item::Summary(s)) => summary = Some(s),
                None => {}
            }
        }
        anyhow::Ok(summary)
    }
    .await;
    progress.finish();
    // Local failures after the last record sent are only in the notes now.
    let _ = reader.join();
    let resume_at = results.answered_prefix();
    results.errors.finish()?;
    let t = &results.tally;
    let verb = if args.dry_run { "checked" } else { "imported" };
    eprintln!(
        "{verb} {} records {}: {}",
        t.done(),
        progress.took(t.done()),
        t.detail()
    );
    if t.failed > SHOWN_FAILURES && !results.has_errors_file {
        eprintln!("(first {SHOWN_FAILURES} failures shown; --errors FILE keeps them all)");
    }
    let interrupted = match (&outcome, &results.broken) {
        (Err(e), _) => Some(format!("{e:#}")),
        (Ok(None), _) => Some("the server ended the stream without a summary".into()),
        (Ok(Some(_)), Some(b)) => Some(b.clone()),
        _ => None,
    };
    if let Some(why) = interrupted {
        bail!(
            "the import stopped: {why}\nrecords 1 to {resume_at} have their results; resume with:\n  \
             roster import {} --mode upsert --skip {resume_at}",
            args.file.display()
        );
    }
    if t.failed > 0 {
        // Scripts see failed records as a non-zero exit (2), distinct from a broken run (1).
        return Err(super::Exit(2).into());
    }
    Ok(())
}
