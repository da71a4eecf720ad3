//! The `roster` binary: parse the command line, set up logging (and trace export), run the
//! command.
use clap::Parser;

// mimalloc instead of glibc's malloc: glibc's malloc/free were ~6 % of the server's CPU under
// GetUser load; with mimalloc a call costs 4-12 % less server CPU, for ~18 MiB more RSS
// (docs/performance.md, tenth session).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if let Some(roster::cli::Exit(code)) = e.downcast_ref() {
                std::process::exit(*code);
            }
            // The message and its causes, without the stack backtrace that returning the error
            // from main prints whenever RUST_BACKTRACE is set: these are an operator's errors
            // (a bad flag value, an unknown project), not the program's.
            eprintln!("Error: {}", roster::cli::error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = roster::cli::Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let roster::cli::Command::Serve(cfg) = &cli.command
        && cfg.worker_threads > 0
    {
        builder.worker_threads(cfg.worker_threads);
    }
    let runtime = builder.enable_all().build()?;
    // Only the server exports traces; the operator commands just log.
    let serving = matches!(cli.command, roster::cli::Command::Serve(_));
    let telemetry = roster::telemetry::init(runtime.handle(), serving)?;
    let result = runtime.block_on(roster::cli::run(cli));
    // Off the worker threads, with the runtime still alive to carry the last export.
    telemetry.shutdown();
    result
}
