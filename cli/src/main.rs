//! The `factory` binary: every verb of the contract (§2), wired from the crates below it.
//!
//! Start at [`Command`] for the verbs; `stack` connects to (or starts) PostgreSQL and NATS;
//! `up` runs every component in one process.

mod bench;
mod config;
mod models;
mod projections;
mod runs;
mod stack;
mod telemetry;
mod up;
mod verbs;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "factory", version, about = "The Factory: an event-sourced AI software factory")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start everything in one process: embedded NATS and PostgreSQL (unless configured
    /// elsewhere), migrations, the relay, the orchestrator, workers for every team and the
    /// HTTP endpoints.
    Up,
    /// Run only the relay (PostgreSQL -> JetStream); any number may run, one is active.
    Relay,
    /// Apply the database migrations.
    Migrate,
    /// Run only workers: pull objectives for these teams (all by default) and work them.
    Worker {
        #[arg(long, value_delimiter = ',')]
        teams: Vec<String>,
    },
    /// Run only the projection runners: keep the read models up to date.
    Project {
        /// `runs`, `graph`, `cost`, `activity` (default: all).
        #[arg(long, value_delimiter = ',')]
        projections: Vec<String>,
    },
    /// Runs: submit, ...
    #[command(subcommand)]
    Run(runs::RunVerb),
    /// Events as they arrive on JetStream.
    #[command(subcommand)]
    Events(verbs::EventsVerb),
    /// Audit tooling over the event store.
    #[command(subcommand)]
    Replay(verbs::ReplayVerb),
    /// The event store's integrity.
    #[command(subcommand)]
    Audit(verbs::AuditVerb),
    /// Print schemas.
    #[command(subcommand)]
    Schema(verbs::SchemaVerb),
    /// Model routing: show it, or change an alias's chain at run time.
    #[command(subcommand)]
    Models(models::ModelsVerb),
    /// Benchmarks; each prints one JSON object per figure.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    let config = match config::Config::load() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {}", telemetry::chain(&error));
            return ExitCode::from(2);
        }
    };
    telemetry::init(&config);
    let result = match cli.command {
        // `up` starts child processes from the main thread, which lives as long as the
        // process (they are told to exit when it dies), before the async runtime exists.
        Command::Up => up::run(config),
        other => runtime().and_then(|rt| rt.block_on(dispatch(other, config))),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", telemetry::chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Rust ignores SIGPIPE, so `factory replay timeline ... | head` would panic on a closed
/// pipe. A command-line tool should end quietly instead, as `cat` does.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

async fn dispatch(command: Command, config: config::Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Up => unreachable!("handled before the runtime starts"),
        Command::Relay => up::relay_only(&config).await,
        Command::Migrate => {
            stack::migrate(&config).await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(verb) => runs::run(verb, &config).await,
        Command::Worker { teams } => up::worker_only(&config, teams).await,
        Command::Project { projections } => projections::project(&config, projections).await,
        Command::Events(verb) => verbs::events(verb, &config).await,
        Command::Replay(verb) => verbs::replay(verb, &config).await,
        Command::Audit(verb) => verbs::audit(verb, &config).await,
        Command::Schema(verb) => verbs::schema(verb),
        Command::Models(verb) => models::run(verb, &config).await,
        Command::Bench(args) => bench::run(args, &config).await,
    }
}

/// Who is acting, as recorded in events (`submitted_by`, `reviewer`, ...): `cli:<user>`.
pub(crate) fn who() -> String {
    std::env::var("USER").map(|u| format!("cli:{u}")).unwrap_or_else(|_| "cli".into())
}
