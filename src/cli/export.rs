//! `roster export`: writes ExportUsers to JSONL or CSV, a user at a time (memory stays flat).
//! With `-o FILE` the file appears only once the export is complete (it is written under a
//! temporary name first), so a broken export is never mistaken for a whole one.
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tonic_types::StatusExt;

use super::records::{self, Format};
use super::remote::{Progress, ServerArgs};
use crate::pb::v1 as pb;

/// How long `roster export` waits, in all, for a server busy with other exports.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(600);

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
    let request = pb::ExportUsersRequest {
        filter: args.filter.clone(),
        read_mask: (!fields.is_empty()).then(|| prost_types::FieldMask {
            paths: fields.clone(),
        }),
        include_password_hashes: args.include_password_hashes,
        include_identities: args.include_identities,
        include_authenticators: args.include_authenticators,
    };
    // A server running its limit of exports says when to try again: wait (a scheduled
    // backup should not fail because another one is running), for a while.
    let mut waited = Duration::ZERO;
    let mut stream = loop {
        match users.export_users(request.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(s) => match s.get_details_retry_info().and_then(|r| r.retry_delay) {
                Some(delay)
                    if s.code() == tonic::Code::ResourceExhausted && waited < MAX_BUSY_WAIT =>
                {
                    eprintln!("{}; retrying in {} s", s.message(), delay.as_secs());
                    tokio::time::sleep(delay).await;
                    waited += delay;
                }
                _ => anyhow::bail!("the server refused the export: {}", s.message()),
            },
        }
    };

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
    let result = async {
        while let Some(m) = stream.message().await? {
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
            count += 1;
            progress.update(count, count, String::new);
        }
        match &mut out {
            Sink::Csv(w) => w.flush()?,
            Sink::Jsonl(w) => w.flush()?,
        }
        anyhow::Ok(())
    }
    .await;
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
    Ok(())
}
