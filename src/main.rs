//! The `roster` binary: parse the command line, set up logging, run the command.
use std::io::IsTerminal;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = roster::cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // ROSTER_LOG_FORMAT=json: one JSON object per line, with the span fields (method,
    // request_id, project, key) on every line of a call, for log pipelines.
    if std::env::var("ROSTER_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        logs.json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(roster::cli::run(cli))
}
