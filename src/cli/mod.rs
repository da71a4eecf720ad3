//! The `roster` command line: one binary, a subcommand per job (clap, `--help` on each).
pub mod admin;
pub mod events;
pub mod export;
pub mod follow_metrics;
pub mod import;
pub mod records;
pub mod remote;
pub mod sources;
pub mod users;
pub mod webhook;

use clap::{Parser, Subcommand};

use crate::config::{DatabaseConfig, ServeConfig};

/// Roster: self-hostable user management over gRPC on PostgreSQL.
#[derive(Parser)]
#[command(name = "roster", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the gRPC server (applies migrations first unless --no-migrate).
    Serve(Box<ServeConfig>),
    /// Apply the embedded schema migrations and exit (safe with many replicas at once).
    Migrate(DatabaseConfig),
    /// Manage projects (the isolation boundary of users, keys and events).
    Projects {
        #[command(subcommand)]
        command: admin::ProjectCommand,
        #[command(flatten)]
        database: DatabaseConfig,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: admin::KeyCommand,
        #[command(flatten)]
        database: DatabaseConfig,
    },
    /// See and release the addresses the sign-in throttle (--ip-failure-limit) holds failed
    /// sign-ins against.
    Throttle {
        #[command(subcommand)]
        command: admin::ThrottleCommand,
        #[command(flatten)]
        database: DatabaseConfig,
    },
    /// List the servers running against this database (seen in the last 90 s): id, host,
    /// version, address, start and last sign of life; then their settings, one per line,
    /// saying where servers differ (a rollout half done, a replica configured apart).
    Servers {
        #[command(flatten)]
        database: DatabaseConfig,
    },
    /// Rotate the keys sealing secrets at rest: which keys stored secrets need, re-seal them.
    Encryption {
        #[command(subcommand)]
        command: admin::EncryptionCommand,
        #[command(flatten)]
        keys: admin::EncryptionKeys,
        #[command(flatten)]
        database: DatabaseConfig,
    },
    /// Import users from a JSONL, JSON or CSV file through a running server (ImportUsers).
    Import(Box<import::ImportArgs>),
    /// Export users to JSONL or CSV through a running server (ExportUsers).
    Export(Box<export::ExportArgs>),
    /// Follow the audit log as JSON lines on standard output, for a SIEM or log shipper:
    /// every event after a position, then new ones as they happen, until stopped
    /// (StreamEvents; reconnects when the server goes away; --state resumes after a restart).
    Events(Box<events::EventsArgs>),
    /// One user at a time through a running server, for operators and support: show, list,
    /// create, update, set a password, block, unblock, deactivate, reactivate, delete; a
    /// user's factors, identities (link, unlink, merge a duplicate) and events.
    Users(Box<users::UsersArgs>),
}

/// An error as an operator reads it: the message and its causes joined by ": ", a cause that
/// repeats the one before it left out (tonic's connect error says "tcp connect error" twice).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        // A status as its code and message: its Display adds a Debug dump of its source,
        // whose own causes follow in the chain anyway.
        let text = match cause.downcast_ref::<tonic::Status>() {
            // A status the transport made ("transport error"): its causes say what happened.
            Some(_) if cause.source().is_some() => continue,
            Some(s) => format!("{:?}: {}", s.code(), s.message()),
            None => cause.to_string(),
        };
        if parts.last() != Some(&text) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// A watch that names the signal (SIGINT, SIGTERM) once one arrives, for a client command to
/// stop in good order (an import saying how to go on, an export removing its partial file,
/// `events` saving its position); a second SIGINT exits at once.
pub(crate) fn stop_on_signal() -> anyhow::Result<tokio::sync::watch::Receiver<Option<&'static str>>>
{
    use anyhow::Context as _;
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        let _ = tx.send(Some(name));
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
    Ok(rx)
}

/// Ends the process with this exit status once the command has cleaned up (logs flushed),
/// without an error message of its own: the command has already said what happened.
#[derive(Debug)]
pub struct Exit(pub i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(cfg) => crate::server::serve(*cfg).await,
        Command::Migrate(db) => {
            // with_database has just migrated: report what it applied (a second pass would
            // always find nothing to do).
            admin::with_database(&db, |_, applied| {
                Box::pin(async move {
                    println!("applied {applied} migration(s); the schema is up to date");
                    Ok(())
                })
            })
            .await
        }
        Command::Projects { command, database } => admin::projects(command, &database).await,
        Command::Keys { command, database } => admin::keys(command, &database).await,
        Command::Throttle { command, database } => admin::throttle(command, &database).await,
        Command::Servers { database } => admin::servers(&database).await,
        Command::Encryption {
            command,
            keys,
            database,
        } => admin::encryption(command, &database, &keys).await,
        Command::Import(args) => import::run(*args).await,
        Command::Export(args) => export::run(*args).await,
        Command::Events(args) => events::run(*args).await,
        Command::Users(args) => users::run(*args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::error_line;

    #[test]
    fn an_error_line_leaves_out_a_cause_that_repeats_the_one_before() {
        let e = anyhow::anyhow!("Connection refused (os error 111)")
            .context("tcp connect error")
            .context("tcp connect error")
            .context("transport error")
            .context("cannot reach the Roster server at http://127.0.0.1:1");
        assert_eq!(
            error_line(&e),
            "cannot reach the Roster server at http://127.0.0.1:1: transport error: tcp connect \
             error: Connection refused (os error 111)"
        );
        // Equal messages that are not neighbours are both kept.
        let e = anyhow::anyhow!("a").context("b").context("a");
        assert_eq!(error_line(&e), "a: b: a");
        // A status reads as its code and message, without its Debug dump.
        let e = anyhow::Error::from(tonic::Status::unavailable("the server is shutting down"));
        assert_eq!(error_line(&e), "Unavailable: the server is shutting down");
        // A transport failure: the causes, not "Unknown: transport error" before them.
        let alert = std::io::Error::other("received fatal alert: CertificateRequired");
        let e = anyhow::Error::from(tonic::Status::from_error(Box::new(alert)));
        assert_eq!(error_line(&e), "received fatal alert: CertificateRequired");
    }
}
