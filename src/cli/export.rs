//! `roster export`: writes ExportUsers to JSONL or CSV, a user at a time (memory stays flat).
//! With `-o FILE` the file appears only once the export is complete (it is written under a
//! temporary name first), so a broken export is never mistaken for a whole one. When the
//! server goes away mid-export (a replica restarted, a connection cut), the export goes on
//! after the last user written: users come in id order, so a new call with `id > "<last>"`
//! added to the filter brings exactly the rest.
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use tonic_types::StatusExt;

use super::records::{self, Format};
use super::remote::{Progress, ServerArgs};
use crate::pb::v1 as pb;

/// How long `roster export` waits, in all, for a server busy with other exports.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(600);
/// How long an export may go without receiving a user, across reconnections, before it
/// gives up; and the waits between reconnections (doubling from the first to the last).
const MAX_OUTAGE: Duration = Duration::from_secs(300);
const RECONNECT_FIRST: Duration = Duration::from_millis(500);
const RECONNECT_LAST: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: Format,
    /// AIP-160 filter, as on ListUsers (e.g. 'email_verified = true').
    #[arg(long, default_value = "")]
    pub filter: String,
    /// The User fields to write, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub fields: Vec<String>,
    /// Include password hashes (the key needs users.export_secrets).
    #[arg(long)]
    pub include_password_hashes: bool,
    /// Include linked identities (the key needs identities.read), as `roster import` reads
    /// them: a JSON array per user (JSON text in a CSV cell).
    #[arg(long)]
    pub include_identities: bool,
    /// Include second factors with their secrets (TOTP seeds, recovery-code hashes) and OTP
    /// channels (the key needs authenticators.read and users.export_secrets), as `roster
    /// import` reads them: a JSON array per user, passkeys included.
    #[arg(long)]
    pub include_authenticators: bool,
    /// Write here instead of standard output.
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub server: ServerArgs,
}

pub async fn run(args: ExportArgs) -> anyhow::Result<()> {
    let mut users = args.server.users().await?;
    let fields: Vec<String> = args
        .fields
        .iter()
        .map(|f| f.trim().to_string())
        .filter(|f| !f.is_empty())
        .collect();
    let mut columns: Vec<String> = if fields.is_empty() {
        records::USER_FIELDS.iter().map(|f| f.to_string()).collect()
    } else {
        fields.clone()
    };
    if args.include_password_hashes {
        columns.push("password_hash".into());
    }
    if args.include_identities {
        columns.push("identities".into());
    }
    if args.include_authenticators {
        columns.push("authenticators".into());
    }
    // The total, for the progress bar; a key without users.read just gets no ETA.
    let total = users
        .list_users(pb::ListUsersRequest {
            filter: args.filter.clone(),
            page_size: 1,
            show_total_size: true,
            ..Default::default()
        })
        .await
        .ok()
        .map(|r| r.into_inner().total_size as u64);
    // The id is asked for even when not written: it is where a broken export goes on from.
    let mut mask = fields.clone();
    if !mask.is_empty() && !mask.iter().any(|f| f == "id") {
        mask.push("id".into());
    }
    let request = pb::ExportUsersRequest {
        filter: args.filter.clone(),
        read_mask: (!mask.is_empty()).then_some(prost_types::FieldMask { paths: mask }),
        include_password_hashes: args.include_password_hashes,
        include_identities: args.include_identities,
        include_authenticators: args.include_authenticators,
    };
    // A server running its limit of exports says when to try again: wait (a scheduled
    // backup should not fail because another one is running), for a while.
    let mut waited = Duration::ZERO;
    let mut open = async |request: pb::ExportUsersRequest| loop {
        match users.export_users(request.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) => match s.get_details_retry_info().and_then(|r| r.retry_delay) {
                Some(delay)
                    if s.code() == tonic::Code::ResourceExhausted && waited < MAX_BUSY_WAIT =>
                {
                    eprintln!("{}; retrying in {} s", s.message(), delay.as_secs());
                    tokio::time::sleep(delay).await;
                    waited += delay;
                }
                _ => return Err(s),
            },
        }
    };
    let mut stream = open(request.clone())
        .await
        .map_err(|s| super::remote::call_failed(&args.server, "the export", s))?;

    let (sink, temp): (Box<dyn Write>, Option<PathBuf>) = match &args.output {
        Some(path) => {
            let mut name = path.as_os_str().to_owned();
            name.push(".partial");
            let temp = PathBuf::from(name);
            let f = std::fs::File::create(&temp)
                .with_context(|| format!("creating {}", temp.display()))?;
            (Box::new(f), Some(temp))
        }
        None => (Box::new(std::io::stdout().lock()), None),
    };
    enum Sink {
        Csv(Box<csv::Writer<Box<dyn Write>>>),
        Jsonl(BufWriter<Box<dyn Write>>),
    }
    let mut out = match args.format {
        Format::Csv => {
            let mut w = csv::WriterBuilder::new()
                .buffer_capacity(256 * 1024)
                .from_writer(sink);
            w.write_record(&columns)?;
            Sink::Csv(Box::new(w))
        }
        Format::Jsonl => Sink::Jsonl(BufWriter::with_capacity(256 * 1024, sink)),
    };
    let mut progress = Progress::new("exported", total, false);
    let mut count = 0u64;
    let mut last_id = String::new();
    let mut resumed = 0u32;
    // From here a signal stops the export as an error does: the partial file is removed.
    let mut stop = super::stop_on_signal()?;
    // Users arriving faster than they are written never let the call wait, so the loop
    // looks at the signal itself too.
    let signalled = stop.clone();
    let interrupted =
        |signal: Option<&str>| anyhow::anyhow!("interrupted ({})", signal.unwrap_or_default());
    let result = async {
        let mut wait = RECONNECT_FIRST;
        let mut last_user = Instant::now();
        loop {
            // The stream's own errors may be the server going away; writing's never are.
            let broke = loop {
                let m = match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break None,
                    Err(status) => break Some(status),
                };
                let obj = records::export_json(&m, &columns);
                match &mut out {
                    Sink::Csv(w) => w.write_record(
                        columns
                            .iter()
                            .map(|c| obj.get(c).map(records::cell).unwrap_or_default()),
                    )?,
                    Sink::Jsonl(w) => {
                        serde_json::to_writer(&mut *w, &obj)?;
                        w.write_all(b"\n")?;
                    }
                }
                if let Some(u) = &m.user {
                    last_id.clone_from(&u.id);
                }
                count += 1;
                if let Some(signal) = *signalled.borrow() {
                    return Err(interrupted(Some(signal)));
                }
                last_user = Instant::now();
                wait = RECONNECT_FIRST;
                progress.update(count, count, String::new);
            };
            let Some(status) = broke else { break };
            let status = anyhow::Error::from(status);
            if !super::remote::retryable(&status) || last_user.elapsed() > MAX_OUTAGE {
                return Err(status);
            }
            // Go on after the last user written, the rest of the filter as it was.
            let after = format!("id > \"{last_id}\"");
            let filter = match (args.filter.trim(), last_id.is_empty()) {
                (_, true) => args.filter.clone(),
                ("", false) => after,
                (f, false) => format!("({f}) AND {after}"),
            };
            loop {
                progress.println(&format!(
                    "roster export: {}; going on after {count} users in {:.1} s",
                    super::error_line(&status),
                    wait.as_secs_f64()
                ));
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RECONNECT_LAST);
                let again = pb::ExportUsersRequest {
                    filter: filter.clone(),
                    ..request.clone()
                };
                match open(again).await {
                    Ok(s) => {
                        stream = s;
                        resumed += 1;
                        break;
                    }
                    Err(s) => {
                        let e = anyhow::Error::from(s);
                        if !super::remote::retryable(&e) || last_user.elapsed() > MAX_OUTAGE {
                            return Err(e);
                        }
                    }
                }
            }
        }
        match &mut out {
            Sink::Csv(w) => w.flush()?,
            Sink::Jsonl(w) => w.flush()?,
        }
        anyhow::Ok(())
    };
    let result = tokio::select! {
        result = result => result,
        signal = stop.wait_for(Option::is_some) => Err(interrupted(signal.ok().and_then(|s| *s))),
    };
    progress.finish();
    drop(out);
    if let Err(e) = result {
        if let Some(t) = &temp {
            let _ = std::fs::remove_file(t);
        }
        return Err(e.context(format!("the export stopped after {count} users")));
    }
    if let (Some(t), Some(path)) = (&temp, &args.output) {
        std::fs::rename(t, path).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("exported {count} users {}", progress.took(count));
    if resumed > 0 {
        eprintln!(
            "the export went on {resumed} time(s) after the server went away: users changed \
             during a break may be as they were before or after it"
        );
    }
    Ok(())
}
