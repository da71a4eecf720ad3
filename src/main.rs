//! The `roster` binary: parse the command line, set up logging, run the command.
use std::io::IsTerminal;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = roster::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(roster::cli::run(cli))
}
