//! `factory bench`: the write side's throughput, the relay's catch-up rate and lag, the
//! whole pipeline (relay, orchestrator, workers) on the scripted provider, and the read side
//! (rebuilding the projections, the live runners' lag).
//!
//! Every figure is one JSON object per line on stdout (contract §2); progress goes to
//! stderr through `tracing`. Targets are numbers in the unit of `value`; whether a target
//! is a floor or a ceiling follows from the figure (rates are floors, latencies ceilings),
//! and `met` says whether it held. Figures without a target of their own carry
//! `"target": null, "met": null`.
//!
//! Isolation: nothing touches the real event store or streams. Each suite runs in its own
//! scratch database `factory_bench_<pid>_<millis>` on the configured server, dropped at the
//! end even on error or Ctrl-C, and the relay, pipeline and rebuild suites publish to namespaced
//! streams (`BENCH<pid>_FACTORY_EVENTS`, `BENCHPIPE<pid>_FACTORY_WORK`, ...) that are deleted
//! at the end. A scratch database per suite keeps each suite's figures the same whether it
//! runs alone or within `all`.

use crate::config::Config;
use crate::stack;
use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use factory_commands::Store;
use factory_commands::relay::{Relay, RelayOptions, RelayProgress};
use factory_domain::objective::{ObjectiveAssigned, TaskResultRecorded};
use factory_domain::run::{StageCompleted, StageStarted};
use factory_domain::{ObjectiveCommand, ObjectiveId, RunCommand, RunId, SystemServices};
use factory_nats::{EventEnvelope, Topology};
use factory_projections::runner::ProjectionRunner;
use factory_projections::{Projection, ProjectionError};
use factory_teams::model::{Message, ModelFuture, ModelProvider, ModelRequest};
use factory_teams::orchestrator::Orchestrator;
use factory_teams::scripted::ScriptedProvider;
use factory_teams::tools::Scratch;
use factory_teams::worker::{Worker, WorkerOptions};
use factory_teams::{Pipeline, TEAM_IDS};
use futures::StreamExt;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use chrono::Utc;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinSet;
use uuid::Uuid;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Which benchmarks to run.
    #[arg(value_enum)]
    pub which: Suite,
    /// Short measurements: `all` finishes in under a minute.
    #[arg(long)]
    pub quick: bool,
    /// The pipeline's throughput phase: how many phase1 runs are submitted at once (200, or
    /// 50 with `--quick`). More runs make a longer steady phase, to profile under load.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub runs: Option<u32>,
    /// The pipeline's latency phase: how many phase1 runs are made one after the other (20,
    /// or 5 with `--quick`). More make a longer single-run phase, to profile it.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub single_runs: Option<u32>,
    /// With `pipeline`: also run the reference, LangGraph with its PostgreSQL checkpointer,
    /// on the same server and plan, and print the ratios of the Factory's figures to its.
    /// `./factory bench` installs it into `.factory/reference-venv` on first use.
    #[arg(long)]
    pub reference: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// Commands/s through cqrs-es + postgres-es, against raw INSERTs.
    Store,
    /// The relay: catch-up rate over a backlog, commit-to-stream lag under steady load.
    Relay,
    /// Whole runs through relay, orchestrator and workers (scripted provider, no latency):
    /// per-stage overhead, a 17-stage run's wall time, stages/s with many runs at once.
    Pipeline,
    /// The read side: rebuilding every projection over a store of real run histories, and
    /// how far the live projection runners trail a steady load.
    Rebuild,
    /// Every suite above.
    All,
}

/// Connections in every pool the bench opens, for the store and for the raw baseline alike.
const POOL_SIZE: u32 = 16;
/// Writer counts the store is measured with.
const STORE_WRITERS: [usize; 2] = [1, 8];
/// A requirement of ordinary length, so events have a realistic size.
const REQUIREMENT: &str = "Benchmark requirement: a small HTTP service that stores notes \
     per user, with a REST API, input validation, tests and a short README.";

/// The issue's targets.
const TARGET_RATIO_VS_RAW: f64 = 0.5;
const TARGET_COMMANDS_PER_S_8_WRITERS: f64 = 3000.0;
const TARGET_CATCH_UP_EVENTS_PER_S: f64 = 20_000.0;
const TARGET_LAG_P99_MS: f64 = 25.0;

/// The steady load of the lag measurement: `LAG_WRITERS` writers sharing `LAG_EVENTS_PER_S`.
const LAG_EVENTS_PER_S: u32 = 2000;
const LAG_WRITERS: u32 = 8;

/// How long and how much, full or `--quick`.
#[derive(Debug, Clone, Copy)]
struct Plan {
    warm_up: Duration,
    measure: Duration,
    /// Events in the store: the relay's backlog, and what the rebuild folds.
    backlog_events: i64,
    lag_window: Duration,
    /// Sequential phase1 runs measured for the per-stage overhead.
    single_runs: usize,
    /// Sequential `full` runs measured for the wall time.
    full_runs: usize,
    /// phase1 runs submitted at once for the throughput.
    concurrent_runs: usize,
    /// How long those may take, all together, before the bench gives up.
    concurrent_deadline: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                warm_up: Duration::from_millis(500),
                measure: Duration::from_secs(2),
                backlog_events: 20_000,
                lag_window: Duration::from_secs(3),
                single_runs: 5,
                full_runs: 3,
                concurrent_runs: 50,
                concurrent_deadline: Duration::from_secs(30),
            }
        } else {
            Self {
                warm_up: Duration::from_secs(1),
                measure: Duration::from_secs(10),
                backlog_events: 100_000,
                lag_window: Duration::from_secs(10),
                single_runs: 20,
                full_runs: 10,
                concurrent_runs: 200,
                concurrent_deadline: Duration::from_secs(120),
            }
        }
    }

    /// How long the relay may take over the backlog before the bench gives up.
    fn catch_up_deadline(&self) -> Duration {
        Duration::from_secs(30).max(Duration::from_millis(self.backlog_events as u64))
    }
}

pub async fn run(args: BenchArgs, config: &Config) -> Result<ExitCode> {
    let mut plan = Plan::new(args.quick);
    if let Some(runs) = args.runs {
        plan.concurrent_runs = runs as usize;
        // The plan's deadline, or a tenth of a second per run when that is longer.
        plan.concurrent_deadline = plan.concurrent_deadline.max(Duration::from_millis(100 * runs as u64));
    }
    if let Some(runs) = args.single_runs {
        plan.single_runs = runs as usize;
    }
    let reference = match (args.reference, args.which) {
        (false, _) => None,
        (true, Suite::Pipeline | Suite::All) => Some(Reference::find(config)?),
        (true, _) => bail!("--reference goes with the `pipeline` bench (or `all`)"),
    };
    if matches!(args.which, Suite::Store | Suite::All) {
        store_suite(config, plan).await?;
    }
    if matches!(args.which, Suite::Relay | Suite::All) {
        relay_suite(config, plan).await?;
    }
    if matches!(args.which, Suite::Pipeline | Suite::All) {
        pipeline_suite(config, plan, reference.as_ref()).await?;
    }
    if matches!(args.which, Suite::Rebuild | Suite::All) {
        rebuild_suite(config, plan).await?;
    }
    Ok(ExitCode::SUCCESS)
}

// ---- figures ----

/// What a figure is held to, in the unit of its value.
#[derive(Debug, Clone, Copy)]
enum Target {
    None,
    AtLeast(f64),
    AtMost(f64),
}

/// One figure line on stdout. `baseline` is the name and value of a figure measured in the
/// same run that this one is compared with.
fn print_figure(
    bench: &str,
    figure: &str,
    value: f64,
    unit: &str,
    target: Target,
    baseline: Option<(&str, f64)>,
) {
    let (target, met) = match target {
        Target::None => (None, None),
        Target::AtLeast(t) => (Some(t), Some(value >= t)),
        Target::AtMost(t) => (Some(t), Some(value <= t)),
    };
    let mut line = json!({
        "bench": bench,
        "figure": figure,
        "value": round(value, 2),
        "unit": unit,
        "target": target,
        "met": met,
    });
    if let Some((name, baseline_value)) = baseline {
        line["baseline"] = json!(name);
        line["baseline_value"] = json!(round(baseline_value, 2));
        line["ratio"] = json!(round(value / baseline_value, 3));
    }
    println!("{line}");
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

// ---- scratch database ----

/// A database of its own on the configured server, migrated, dropped by [`Self::remove`].
struct ScratchDatabase {
    /// A connection to the server's `postgres` database, to drop the scratch one.
    server: PgPool,
    name: String,
    pool: PgPool,
}

impl ScratchDatabase {
    async fn create(config: &Config) -> Result<Self> {
        // The owner/superuser URL: only it may create databases and run migrations. The
        // bench's application-side pools use it too, on the scratch database: the
        // `factory` role's password is only known for the embedded stack, and the role's
        // privilege checks cost nothing measurable next to the triggers, which still run.
        let admin_url = stack::admin_database_url(config, "postgres")?;
        let server = factory_commands::connect(&admin_url, 1)
            .await
            .context("is the stack running? Start it with `./factory up`")?;
        let millis = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
        let name = format!("factory_bench_{}_{millis}", std::process::id());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&server)
            .await
            .with_context(|| format!("creating the scratch database {name}"))?;
        let pool = match Self::connect_and_migrate(&admin_url, &name).await {
            Ok(pool) => pool,
            Err(error) => {
                if let Err(drop_error) = drop_database(&server, &name).await {
                    tracing::error!(error = %drop_error, database = %name, "could not drop the scratch database");
                }
                return Err(error);
            }
        };
        tracing::info!(database = %name, "scratch database ready");
        Ok(Self { server, name, pool })
    }

    async fn connect_and_migrate(admin_url: &str, name: &str) -> Result<PgPool> {
        let options = PgConnectOptions::from_str(admin_url)
            .context("the admin database URL is not valid")?
            .database(name)
            .application_name("factory-bench");
        // As `factory_commands::connect` makes production's pools.
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .with_context(|| format!("connecting to the scratch database {name}"))?;
        factory_commands::migrate(&pool).await?;
        Ok(pool)
    }

    async fn remove(self) -> Result<()> {
        self.pool.close().await;
        drop_database(&self.server, &self.name)
            .await
            .with_context(|| format!("dropping the scratch database {}", self.name))?;
        self.server.close().await;
        tracing::info!(database = %self.name, "scratch database dropped");
        Ok(())
    }
}

async fn drop_database(server: &PgPool, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(server)
        .await
        .map(|_| ())
}

/// Runs `bench` on a fresh scratch database and drops it afterwards, also when the bench
/// fails or the user presses Ctrl-C (the bench's future is dropped, and with it the
/// `JoinSet`s that abort its tasks).
async fn in_scratch_database<F, Fut, T>(config: &Config, bench: F) -> Result<T>
where
    F: FnOnce(PgPool) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let scratch = ScratchDatabase::create(config).await?;
    let outcome = tokio::select! {
        outcome = bench(scratch.pool.clone()) => outcome,
        _ = crate::up::shutdown_signal() => Err(anyhow!("interrupted")),
    };
    settle(outcome, scratch.remove().await)
}

/// The bench's own outcome first; a failed clean-up is an error too (the bench promised
/// to leave nothing behind), logged when the bench had already failed.
fn settle<T>(outcome: Result<T>, cleanup: Result<()>) -> Result<T> {
    match (outcome, cleanup) {
        (Ok(value), cleanup) => cleanup.map(|()| value),
        (Err(error), Err(cleanup_error)) => {
            tracing::error!(error = %crate::telemetry::chain(cleanup_error.as_ref()), "clean-up failed");
            Err(error)
        }
        (Err(error), Ok(())) => Err(error),
    }
}

// ---- store ----

async fn store_suite(config: &Config, plan: Plan) -> Result<()> {
    in_scratch_database(config, |pool| store_figures(pool, plan)).await
}

async fn store_figures(pool: PgPool, plan: Plan) -> Result<()> {
    sqlx::query(
        "CREATE TABLE bench_raw (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, payload json NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let store = Arc::new(Store::new(pool.clone(), Arc::new(SystemServices)));

    tracing::info!(?plan.warm_up, "warming up the store and the raw baseline");
    raw_inserts_per_s(&pool, 8, plan.warm_up).await?;
    commands_per_s(&store, 8, plan.warm_up).await?;

    for writers in STORE_WRITERS {
        let suffix = if writers == 1 {
            "1_writer".to_string()
        } else {
            format!("{writers}_writers")
        };
        tracing::info!(writers, duration = ?plan.measure, "raw INSERT baseline");
        let raw = raw_inserts_per_s(&pool, writers, plan.measure).await?;
        tracing::info!(writers, duration = ?plan.measure, "commands through the store");
        let commands = commands_per_s(&store, writers, plan.measure).await?;
        let baseline_name = format!("raw_inserts_per_s_{suffix}");
        let absolute_target = if writers == 8 {
            Target::AtLeast(TARGET_COMMANDS_PER_S_8_WRITERS)
        } else {
            Target::None
        };
        print_figure(
            "store",
            &format!("commands_per_s_{suffix}"),
            commands,
            "commands/s",
            absolute_target,
            Some((&baseline_name, raw)),
        );
        print_figure(
            "store",
            &format!("ratio_vs_raw_{suffix}"),
            commands / raw,
            "ratio",
            Target::AtLeast(TARGET_RATIO_VS_RAW),
            None,
        );
    }
    Ok(())
}

/// The baseline: one json row per autocommitted statement, with a payload shaped and
/// sized like a `RequirementSubmitted` event as the store keeps it.
async fn raw_inserts_per_s(pool: &PgPool, writers: usize, duration: Duration) -> Result<f64> {
    let payload = json!({"RequirementSubmitted": {
        "title": "bench",
        "requirement": REQUIREMENT,
        "pipeline": "phase1",
        "auto_approve": false,
        "submitted_at": chrono::Utc::now(),
    }});
    let pool = pool.clone();
    throughput(writers, duration, move || {
        let pool = pool.clone();
        let payload = payload.clone();
        async move {
            sqlx::query("INSERT INTO bench_raw (payload) VALUES ($1)")
                .bind(payload)
                .execute(&pool)
                .await?;
            Ok(1)
        }
    })
    .await
}

/// Per iteration: a new run, then three commands on it (submit, start a stage, complete
/// it), so loading the aggregate reads 0, 1 and 2 events.
async fn commands_per_s(store: &Arc<Store>, writers: usize, duration: Duration) -> Result<f64> {
    let store = store.clone();
    throughput(writers, duration, move || {
        let store = store.clone();
        async move {
            let run_id = RunId::new();
            store.execute_run(run_id, submit_requirement()).await?;
            let stage = "business-analysis".to_string();
            let objective_id = ObjectiveId::new();
            store
                .execute_run(
                    run_id,
                    RunCommand::StartStage {
                        stage: stage.clone(),
                        team: stage.clone(),
                        objective_id,
                    },
                )
                .await?;
            store
                .execute_run(run_id, RunCommand::CompleteStage { stage, objective_id })
                .await?;
            Ok(3)
        }
    })
    .await
}

fn submit_requirement() -> RunCommand {
    RunCommand::SubmitRequirement {
        title: Some("bench".into()),
        requirement: REQUIREMENT.into(),
        pipeline: "phase1".into(),
        pipeline_definition: String::new(),
        auto_approve: false,
        submitted_by: "tester".into(),
    }
}

/// Operations per second of `writers` tasks each repeating `work` (which returns how many
/// operations it did) until `duration` has passed. The last round of each writer finishes,
/// so the rate divides by the time until every writer stopped.
async fn throughput<W, Fut>(writers: usize, duration: Duration, work: W) -> Result<f64>
where
    W: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<u64>> + Send + 'static,
{
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..writers {
        let work = work.clone();
        tasks.spawn(async move {
            let mut operations = 0u64;
            while Instant::now() < deadline {
                operations += work().await?;
            }
            Ok::<_, anyhow::Error>(operations)
        });
    }
    let mut operations = 0;
    while let Some(joined) = tasks.join_next().await {
        operations += joined??;
    }
    Ok(operations as f64 / started.elapsed().as_secs_f64())
}

// ---- relay ----

async fn relay_suite(config: &Config, plan: Plan) -> Result<()> {
    let topology = Topology::namespaced(&format!("bench{}", std::process::id()));
    // Two connections: the relay publishes on one; the lag consumer, like any outside
    // reader, receives on the other.
    let publisher = jetstream::new(stack::connect_nats(config).await?);
    let reader = jetstream::new(stack::connect_nats(config).await?);
    topology.ensure_streams(&publisher).await?;
    let outcome = in_scratch_database(config, |pool| {
        relay_figures(pool, publisher.clone(), reader, topology.clone(), relay_options(config), plan)
    })
    .await;
    settle(outcome, delete_streams(&publisher, &topology).await)
}

/// Deletes the bench's namespaced streams (their consumers go with them).
async fn delete_streams(js: &jetstream::Context, topology: &Topology) -> Result<()> {
    let mut cleanup = Ok(());
    for stream in [&topology.events_stream, &topology.work_stream] {
        if let Err(error) = js.delete_stream(stream).await {
            cleanup = Err(anyhow!(error).context(format!("deleting the stream {stream}")));
        }
    }
    if let Err(error) = js.delete_key_value(&topology.workers_bucket).await {
        cleanup = Err(anyhow!(error).context(format!("deleting the bucket {}", topology.workers_bucket)));
    }
    if cleanup.is_ok() {
        tracing::info!(stream = %topology.events_stream, "bench streams deleted");
    }
    cleanup
}

async fn relay_figures(
    pool: PgPool,
    publisher: jetstream::Context,
    reader: jetstream::Context,
    topology: Topology,
    relay_options: RelayOptions,
    plan: Plan,
) -> Result<()> {
    let last_position = insert_backlog(&pool, plan.backlog_events).await?;
    let store = Arc::new(Store::new(pool.clone(), Arc::new(SystemServices)));
    let relay = Relay::new(pool.clone(), publisher, topology.clone(), relay_options).with_wake(store.committed());
    let progress = relay.progress();

    tracing::info!(events = plan.backlog_events, "relay catching up");
    // From spawning the relay (its lock, stream check and recovery included) to its
    // checkpoint, written after JetStream acknowledged, reaching the backlog's last event.
    let started = Instant::now();
    let mut relay_task = JoinSet::new();
    relay_task.spawn(relay.run());
    let deadline = started + plan.catch_up_deadline();
    while progress.published.load(Ordering::Relaxed) < last_position {
        if Instant::now() > deadline {
            bail!(
                "the relay published up to position {} of {last_position} in {:?}",
                progress.published.load(Ordering::Relaxed),
                plan.catch_up_deadline()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let catch_up = started.elapsed();
    print_figure(
        "relay",
        "catch_up_events_per_s",
        plan.backlog_events as f64 / catch_up.as_secs_f64(),
        "events/s",
        Target::AtLeast(TARGET_CATCH_UP_EVENTS_PER_S),
        None,
    );

    let lag = commit_to_stream_lag(&store, &progress, &reader, &topology, plan.lag_window).await?;
    print_figure(
        "relay",
        "commit_to_stream_lag_p50_ms",
        lag.p50_ms,
        "ms",
        Target::None,
        None,
    );
    print_figure(
        "relay",
        "commit_to_stream_lag_p99_ms",
        lag.p99_ms,
        "ms",
        Target::AtMost(TARGET_LAG_P99_MS),
        None,
    );
    print_figure(
        "relay",
        "achieved_events_per_s",
        lag.achieved_events_per_s,
        "events/s",
        Target::AtLeast(LAG_EVENTS_PER_S as f64),
        None,
    );
    print_figure(
        "relay",
        "undelivered_events",
        lag.undelivered as f64,
        "events",
        Target::AtMost(0.0),
        None,
    );
    if lag.undelivered > 0 {
        // Not a missed target but a lost event: fail, after the figures are out.
        bail!(
            "{} of {} committed events never reached the stream{}",
            lag.undelivered,
            lag.submitted,
            if lag.relay_caught_up {
                " although the relay's checkpoint passed them: the relay skipped them"
            } else {
                "; the relay did not catch up with the load"
            }
        );
    }
    Ok(())
}

/// Inserts `events` single-event aggregates straight into `events` (the trigger computes
/// position and hash, as for any writer), in chunks of 10,000, and returns the highest
/// position.
async fn insert_backlog(pool: &PgPool, events: i64) -> Result<i64> {
    const CHUNK: i64 = 10_000;
    // Every backlog event belongs to one fixed run, so none can be mistaken for a run the
    // lag measurement submits.
    let run_id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
    tracing::info!(events, "inserting the relay's backlog");
    let mut first = 1;
    while first <= events {
        let last = (first + CHUNK - 1).min(events);
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             SELECT 'bench', 'agg-' || g, 1, 'BenchEvent', '1', \
                    json_build_object('BenchEvent', json_build_object('n', g, 'pad', repeat('x', 200))), \
                    json_build_object('run_id', $3::text) \
               FROM generate_series($1::bigint, $2::bigint) g",
        )
        .bind(first)
        .bind(last)
        .bind(run_id.to_string())
        .execute(pool)
        .await?;
        first = last + 1;
    }
    // A live events table has statistics; give this one the same before the relay reads it.
    sqlx::query("ANALYZE events").execute(pool).await?;
    let last_position: Option<i64> = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(pool)
        .await?;
    Ok(last_position.unwrap_or(0))
}

struct Lag {
    /// Over the events that arrived.
    p50_ms: f64,
    p99_ms: f64,
    achieved_events_per_s: f64,
    /// Events committed during the load.
    submitted: usize,
    /// Of those, how many never arrived on the stream.
    undelivered: usize,
    /// Whether the relay's checkpoint reached the load's last position.
    relay_caught_up: bool,
}

/// How long the lag measurement waits for stragglers after the load.
const DELIVERY_GRACE: Duration = Duration::from_secs(10);
/// How long after the relay's checkpoint passed the load's last event a delivery may still
/// arrive (it was acknowledged by JetStream by then).
const AFTER_PUBLISHED: Duration = Duration::from_secs(2);

/// Drives a steady `LAG_EVENTS_PER_S` of `SubmitRequirement` (each a new run) through the
/// store for `window` while the relay runs, and measures for each of those events the time
/// from its command returning (committed) to its delivery by an ordered consumer. That is
/// commit-to-delivery: an upper bound of commit-to-PubAck, which includes the hop from
/// the stream to a reader.
async fn commit_to_stream_lag(
    store: &Arc<Store>,
    progress: &RelayProgress,
    reader: &jetstream::Context,
    topology: &Topology,
    window: Duration,
) -> Result<Lag> {
    // Created before the load so that it sees every event of it, and only those
    // (`DeliverPolicy::New` skips the backlog already in the stream).
    let stream = reader
        .get_stream(&topology.events_stream)
        .await
        .context("opening the bench's events stream")?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: topology.all_events_filter(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .context("creating an ordered consumer")?;
    let mut messages = consumer.messages().await.context("subscribing")?;
    let (received_tx, mut received_rx) = tokio::sync::mpsc::unbounded_channel();
    let subject_prefix = format!("{}.", topology.events_prefix);
    let mut reader_task = JoinSet::new();
    reader_task.spawn(async move {
        while let Some(message) = messages.next().await {
            let received_at = Instant::now();
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, "reading the bench stream; the ordered consumer recovers");
                    continue;
                }
            };
            // `<prefix>.<run_id>.run.RequirementSubmitted`: the subject says all we need,
            // without parsing the body.
            let tokens: Vec<&str> = message
                .subject
                .strip_prefix(subject_prefix.as_str())
                .unwrap_or_default()
                .split('.')
                .collect();
            if let [run_id, "run", "RequirementSubmitted"] = tokens.as_slice()
                && let Ok(run_id) = Uuid::parse_str(run_id)
                && received_tx.send((run_id, received_at)).is_err()
            {
                break;
            }
        }
    });

    tracing::info!(
        events_per_s = LAG_EVENTS_PER_S,
        writers = LAG_WRITERS,
        ?window,
        "steady load with the relay running"
    );
    let period = Duration::from_secs(1) * LAG_WRITERS / LAG_EVENTS_PER_S;
    let started = Instant::now();
    let deadline = started + window;
    let mut writers = JoinSet::new();
    for writer in 0..LAG_WRITERS {
        let store = store.clone();
        // Staggered so that the writers' ticks interleave evenly.
        let first_tick = tokio::time::Instant::now() + period * writer / LAG_WRITERS;
        writers.spawn(async move {
            let mut ticks = tokio::time::interval_at(first_tick, period);
            // Burst: a writer that fell behind (a slow commit) catches up, so the offered
            // load stays at the target rate on average, as a real burst of submissions
            // would. Whether the store kept up shows in `achieved_events_per_s`, which counts
            // only commands started within the window.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut commits = Vec::new();
            loop {
                ticks.tick().await;
                if Instant::now() >= deadline {
                    break;
                }
                let run_id = RunId::new();
                store.execute_run(run_id, submit_requirement()).await?;
                commits.push((run_id.0, Instant::now()));
            }
            Ok::<_, anyhow::Error>(commits)
        });
    }
    let mut committed: HashMap<Uuid, Instant> = HashMap::new();
    while let Some(joined) = writers.join_next().await {
        committed.extend(joined??);
    }
    let submitted = committed.len();
    if submitted == 0 {
        bail!("no command committed within {window:?}: the store did not take any load");
    }
    let achieved_events_per_s = submitted as f64 / window.as_secs_f64();

    // Wait for every delivery, but not for ever: once the relay's checkpoint has passed
    // the last event of the load, what has not arrived shortly after never will.
    let last_position: Option<i64> = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(store.pool())
        .await?;
    let last_position = last_position.unwrap_or(0);
    let give_up = Instant::now() + DELIVERY_GRACE;
    let mut published_all_at: Option<Instant> = None;
    let mut lags_ms = Vec::with_capacity(submitted);
    while !committed.is_empty() {
        match tokio::time::timeout(Duration::from_millis(50), received_rx.recv()).await {
            Ok(Some((run_id, received_at))) => {
                if let Some(committed_at) = committed.remove(&run_id) {
                    // Saturates at zero: a delivery can beat the writer task to recording
                    // its commit when that task is scheduled late.
                    lags_ms.push(
                        received_at
                            .saturating_duration_since(committed_at)
                            .as_secs_f64()
                            * 1e3,
                    );
                }
            }
            Ok(None) => bail!("the bench's stream consumer stopped"),
            Err(_elapsed) => {}
        }
        if published_all_at.is_none() && progress.published.load(Ordering::Relaxed) >= last_position
        {
            published_all_at = Some(Instant::now());
        }
        let delivery_over = published_all_at.is_some_and(|at| at.elapsed() > AFTER_PUBLISHED);
        if delivery_over || Instant::now() > give_up {
            break;
        }
    }
    lags_ms.sort_by(f64::total_cmp);
    Ok(Lag {
        p50_ms: percentile(&lags_ms, 0.50),
        p99_ms: percentile(&lags_ms, 0.99),
        achieved_events_per_s,
        submitted,
        undelivered: committed.len(),
        relay_caught_up: published_all_at.is_some(),
    })
}

// ---- pipeline ----

/// The issue's targets for whole runs.
const TARGET_STAGE_OVERHEAD_P50_MS: f64 = 1.5;
const TARGET_FULL_RUN_WALL_MS: f64 = 30.0;
const TARGET_STAGES_PER_S: f64 = 1500.0;

/// Stages of a phase1 run.
const PHASE1_STAGES: usize = 5;
/// How long one run of the sequential measurements may take.
const RUN_DEADLINE: Duration = Duration::from_secs(60);
/// Put in every requirement, followed by the run id and `]`, so that the bench's provider
/// can tell which run a model call belongs to (a plain word: no `#` marker of the script).
const RUN_TAG: &str = "[bench-run ";
/// Run events after which a run does no more work on its own.
const RUN_ENDS: [&str; 6] = [
    "RunCompleted",
    "RunAwaitingReview",
    "RunBlocked",
    "RunFailed",
    "RunCancelled",
    "RunNeedsClarification",
];

/// The hops of one stage, in order; all but the last together span the time from the event
/// that made the stage ready to its `StageCompleted`. `recorded_at` is the store's clock at
/// insert (inside the transaction, so a hop that starts at an event includes that event's
/// commit); "seen" is when the bench's own ordered consumer received the event from the
/// events stream, as any outside reader would. Model-call bounds come from the bench's
/// wrapper around the scripted provider. All are the same machine's real-time clock.
const HOPS: [&str; 8] = [
    // the trigger (the latest StageCompleted of the stage's inputs, or RequirementSubmitted)
    // recorded -> StageStarted recorded: the same statement when the worker that ended the
    // last input took the orchestrator's step in its final commit; else the orchestrator's
    // reaction (told of the commit in memory, or by the stream), its load of the run and
    // StartStage.
    "trigger_to_stage_started",
    // -> ObjectiveAssigned recorded: the AssignObjective command, in the same statement.
    "stage_started_to_objective_assigned",
    // -> the first model call starts: the hand-over in memory (or the work message), the
    // context and the prompt. Negative when the work was handed over ahead of the commit
    // that assigns it and started before that commit's rows were written.
    "objective_assigned_to_first_model_call",
    // first model call starts -> last one returns: scripted answers and tools (the worker
    // records ModelCalled events meanwhile, as calls return).
    "model_calls",
    // -> TaskResultRecorded: waiting for the commit that assigned the objective, the final
    // unit decided (the ModelCalled commands still pending, artifact contents,
    // ArtifactProduced, the TaskResult, the stage's end and what it starts), the run's lane,
    // and its statement sent until its rows are written.
    "last_model_call_to_task_result",
    // -> ObjectiveCompleted recorded: the same statement.
    "task_result_to_objective_completed",
    // -> StageCompleted recorded: the same statement (the worker takes the step).
    "objective_completed_to_stage_completed",
    // ObjectiveCompleted recorded -> seen on the stream, as any outside reader sees it:
    // commit, relay wake-up, horizon, publish, PubAck, delivery. Not on the stage's path:
    // the next stage's work is told of the commit in memory.
    "stream_objective_completed_to_seen",
];

async fn pipeline_suite(config: &Config, plan: Plan, reference: Option<&Reference>) -> Result<()> {
    let ours = with_components(config, "pipe", |pool, stack| {
        pipeline_figures(pool, stack.components, stack.reader, stack.topology, stack.worker, stack.relay, plan)
    })
    .await?;
    if let Some(reference) = reference {
        reference.compare(config, plan, ours).await?;
    }
    Ok(())
}

/// What a suite that runs the stack's own components gets.
struct BenchStack {
    /// As in `up`, the components share one connection.
    components: jetstream::Context,
    /// The bench watches the events stream on another, like any outside reader.
    reader: jetstream::Context,
    topology: Topology,
    /// As `up` configures its worker: every team, the work dir, the slots per team.
    worker: WorkerOptions,
    relay: RelayOptions,
}

/// Runs `figures` on a scratch database, streams of a namespace of its own and a work dir,
/// and removes all three afterwards, whatever happened.
async fn with_components<F, Fut, T>(config: &Config, name: &str, figures: F) -> Result<T>
where
    F: FnOnce(PgPool, BenchStack) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let topology = Topology::namespaced(&format!("bench{name}{}", std::process::id()));
    let components = jetstream::new(stack::connect_nats(config).await?);
    let reader = jetstream::new(stack::connect_nats(config).await?);
    topology.ensure_streams(&components).await?;
    // Where `up`'s workers keep their workspaces, as in production (a folder of the bench's
    // own under a configured directory).
    let work_dir = match config.scratch() {
        Scratch::Memory => Scratch::Memory,
        Scratch::Dir(dir) => Scratch::Dir(dir.join(format!("bench-{}-{name}", std::process::id()))),
    };
    let stack = BenchStack {
        components: components.clone(),
        reader,
        topology: topology.clone(),
        worker: crate::up::worker_options(config, TEAM_IDS.iter().map(|t| t.to_string()).collect(), work_dir.clone()),
        relay: relay_options(config),
    };
    let outcome = in_scratch_database(config, |pool| figures(pool, stack)).await;
    let cleanup = delete_streams(&components, &topology).await;
    settle(outcome, cleanup.and(remove_work_dir(&work_dir)))
}

/// As `up` configures its relay.
fn relay_options(config: &Config) -> RelayOptions {
    RelayOptions {
        name: "bench".into(),
        batch_size: config.relay_batch_size,
        poll_interval: config.relay_poll_interval,
        read_interval: config.relay_read_interval,
        ..RelayOptions::default()
    }
}

/// Removes the workers' workspace folder, if they made one.
fn remove_work_dir(work_dir: &Scratch) -> Result<()> {
    let Scratch::Dir(work_dir) = work_dir else { return Ok(()) };
    if work_dir.exists() {
        std::fs::remove_dir_all(work_dir)
            .with_context(|| format!("removing {}", work_dir.display()))?;
    }
    Ok(())
}

async fn pipeline_figures(
    pool: PgPool,
    js: jetstream::Context,
    reader: jetstream::Context,
    topology: Topology,
    worker_options: WorkerOptions,
    relay_options: RelayOptions,
    plan: Plan,
) -> Result<PipelineFigures> {
    let store = Arc::new(Store::new(pool.clone(), Arc::new(SystemServices)));
    let calls = Arc::new(Mutex::new(CallTimes::new()));
    // Before any event exists, so that it sees every one.
    let mut observer = Observer::start(&reader, &topology).await?;

    // The components, in-process, as `up` runs them. Dropping the set aborts them.
    let mut components = JoinSet::new();
    components.spawn(
        Relay::new(pool.clone(), js.clone(), topology.clone(), relay_options)
            .with_wake(store.committed())
            .run(),
    );
    let provider: Arc<dyn ModelProvider> = Arc::new(TimedProvider {
        inner: ScriptedProvider::new(),
        calls: calls.clone(),
    });
    let worker = Worker::new(store.clone(), js.clone(), topology.clone(), provider, worker_options);
    components.spawn(
        Orchestrator::new(store.clone(), js.clone(), topology.clone())
            .with_local_work(worker.local_work())
            .run(),
    );
    components.spawn(worker.run());

    let phase1 = Pipeline::load("phase1")?;
    let full = Pipeline::load("full")?;

    tracing::info!("warming up: a phase1 and a full run");
    run_to_completion(&store, &mut observer, &phase1).await?;
    run_to_completion(&store, &mut observer, &full).await?;

    // 1. Per-stage overhead of single phase1 runs, one after the other.
    tracing::info!(runs = plan.single_runs, "single phase1 runs");
    let mut single = StageFigures::default();
    for _ in 0..plan.single_runs {
        let run = run_to_completion(&store, &mut observer, &phase1).await?;
        let events = factory_commands::events::run_events(&pool, run.0, None).await?;
        let samples = observer.with_seen(|seen| stage_samples(run.0, &phase1, &events, seen, &calls.lock().expect("call times")))?;
        single.add(samples);
    }
    single.sort();
    let stage_overhead_p50_ms = percentile(&single.overhead_ms, 0.50);
    print_figure(
        "pipeline",
        "stage_overhead_p50_ms",
        stage_overhead_p50_ms,
        "ms",
        Target::AtMost(TARGET_STAGE_OVERHEAD_P50_MS),
        None,
    );
    print_figure(
        "pipeline",
        "stage_overhead_p99_ms",
        percentile(&single.overhead_ms, 0.99),
        "ms",
        Target::None,
        None,
    );
    single.print_breakdown("");

    // 2. Wall time of full runs (17 stages, a DAG), one after the other.
    tracing::info!(runs = plan.full_runs, "full runs");
    let mut walls_ms = Vec::with_capacity(plan.full_runs);
    let mut full_stages = StageFigures::default();
    let mut full_run_ids = Vec::with_capacity(plan.full_runs);
    for _ in 0..plan.full_runs {
        let run = run_to_completion(&store, &mut observer, &full).await?;
        full_run_ids.push(run.0);
        let events = factory_commands::events::run_events(&pool, run.0, None).await?;
        walls_ms.push(run_wall_ms(&events)?);
        let samples = observer.with_seen(|seen| stage_samples(run.0, &full, &events, seen, &calls.lock().expect("call times")))?;
        full_stages.add(samples);
    }
    walls_ms.sort_by(f64::total_cmp);
    let full_run_wall_ms_p50 = percentile(&walls_ms, 0.50);
    print_figure(
        "pipeline",
        "full_run_wall_ms_p50",
        full_run_wall_ms_p50,
        "ms",
        Target::AtMost(TARGET_FULL_RUN_WALL_MS),
        None,
    );
    // Parallel stages ending together are committed together (see teams/src/lanes.rs): the
    // stage ends of those runs per commit that records any.
    let (stage_ends, commits): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT xid::text) FROM events WHERE run_id = ANY($1) AND event_type = 'StageCompleted'",
    )
    .bind(&full_run_ids)
    .fetch_one(&pool)
    .await?;
    print_figure(
        "pipeline",
        "stage_ends_per_commit_full",
        stage_ends as f64 / commits.max(1) as f64,
        "ends",
        Target::None,
        None,
    );
    full_stages.sort();
    print_figure(
        "pipeline",
        "stage_overhead_p50_ms_full",
        percentile(&full_stages.overhead_ms, 0.50),
        "ms",
        Target::None,
        None,
    );
    full_stages.print_breakdown("_full");

    // 3. Many phase1 runs at once.
    let outcome = concurrent_runs(&store, &mut observer, &phase1, &calls, plan).await;
    components.shutdown().await;
    Ok(PipelineFigures { stage_overhead_p50_ms, full_run_wall_ms_p50, stages_per_s: outcome? })
}

/// The figures the reference is compared with.
#[derive(Debug, Clone, Copy)]
struct PipelineFigures {
    stage_overhead_p50_ms: f64,
    full_run_wall_ms_p50: f64,
    stages_per_s: f64,
}

/// Submits `plan.concurrent_runs` phase1 runs at once and waits for all of them; their
/// stages/s.
async fn concurrent_runs(
    store: &Arc<Store>,
    observer: &mut Observer,
    phase1: &Pipeline,
    calls: &Mutex<CallTimes>,
    plan: Plan,
) -> Result<f64> {
    let runs = plan.concurrent_runs;
    // One burst of the same size first, not measured (the reference does the same): the
    // server's first load of that size is not what is measured. On a freshly initialised
    // data dir PostgreSQL creates its first WAL segments then, each written out in full
    // while commits wait; later bursts reuse them.
    tracing::info!(runs, "warming up: phase1 runs submitted at once, not measured");
    let warm_up = burst(store, observer, phase1, runs, plan.concurrent_deadline).await?;
    if !warm_up.pending.is_empty() {
        bail!("warming up: {} of {runs} runs did not end within {:?}", warm_up.pending.len(), plan.concurrent_deadline);
    }
    tracing::info!(runs, "phase1 runs submitted at once");
    let Burst { submitted, pending, ends } = burst(store, observer, phase1, runs, plan.concurrent_deadline).await?;

    // From the store, not from what the bench saw: the runs' own first and last events.
    let (first_submitted, last_completed, completed): (
        Option<chrono::DateTime<Utc>>,
        Option<chrono::DateTime<Utc>>,
        i64,
    ) = sqlx::query_as(
        "SELECT min(recorded_at) FILTER (WHERE event_type = 'RequirementSubmitted'), \
                max(recorded_at) FILTER (WHERE event_type = 'RunCompleted'), \
                count(*) FILTER (WHERE event_type = 'RunCompleted') \
           FROM events WHERE run_id = ANY($1)",
    )
    .bind(&submitted)
    .fetch_one(store.pool())
    .await?;
    let completed = completed as usize;
    let mut stages_per_s = 0.0;
    if let (Some(first), Some(last)) = (first_submitted, last_completed) {
        let seconds = micros(first, last) / 1e6;
        stages_per_s = (PHASE1_STAGES * completed) as f64 / seconds;
        print_figure(
            "pipeline",
            &format!("stages_per_s_{runs}_runs"),
            stages_per_s,
            "stages/s",
            Target::AtLeast(TARGET_STAGES_PER_S),
            None,
        );
    }
    print_figure(
        "pipeline",
        "runs_completed",
        completed as f64,
        "runs",
        Target::AtLeast(runs as f64),
        None,
    );
    if completed < runs {
        bail!(
            "{completed} of {runs} runs completed within {:?}; {} still going, ended otherwise: {:?}",
            plan.concurrent_deadline,
            pending.len(),
            ends.iter()
                .filter(|(end, _)| end.as_str() != "RunCompleted")
                .collect::<Vec<_>>()
        );
    }

    // Where the time went under load: the same hops.
    let observed = observer.snapshot();
    let calls = calls.lock().expect("call times").clone();
    let mut loaded = StageFigures::default();
    // How long a run submitted in the burst waited for its first stage to start: the
    // orchestrator's share of the queueing (a team's free slots are the workers').
    let mut first_started_ms = Vec::with_capacity(submitted.len());
    for run in &submitted {
        let events = factory_commands::events::run_events(store.pool(), *run, None).await?;
        let first = |event_type: &str| events.iter().find(|e| e.aggregate_type == "run" && e.event_type == event_type);
        if let (Some(submitted), Some(started)) = (first("RequirementSubmitted"), first("StageStarted")) {
            first_started_ms.push(micros(submitted.recorded_at, started.recorded_at) / 1e3);
        }
        loaded.add(stage_samples(*run, phase1, &events, &observed, &calls)?);
    }
    first_started_ms.sort_by(f64::total_cmp);
    for (q, name) in [(0.50, "p50"), (0.99, "p99")] {
        let figure = format!("submitted_to_first_stage_started_{name}_ms_{runs}_runs");
        print_figure("pipeline", &figure, percentile(&first_started_ms, q), "ms", Target::None, None);
    }
    loaded.sort();
    loaded.print_breakdown(&format!("_{runs}_runs"));
    Ok(stages_per_s)
}

async fn submit_run(store: &Store, pipeline: &Pipeline) -> Result<RunId> {
    let run = RunId::new();
    store
        .execute_run(
            run,
            RunCommand::SubmitRequirement {
                title: Some("bench".into()),
                requirement: format!("{REQUIREMENT} {RUN_TAG}{run}]"),
                pipeline: pipeline.name().into(),
                pipeline_definition: pipeline.source().into(),
                auto_approve: true,
                submitted_by: "tester".into(),
            },
        )
        .await?;
    Ok(run)
}

/// Runs submitted at once, and how they ended.
struct Burst {
    submitted: Vec<Uuid>,
    /// Not ended within the deadline.
    pending: HashSet<Uuid>,
    /// How many ended with each end event.
    ends: HashMap<String, usize>,
}

/// Submits `runs` phase1 runs at once and waits until each has ended, or `deadline` passed.
async fn burst(store: &Arc<Store>, observer: &mut Observer, phase1: &Pipeline, runs: usize, deadline: Duration) -> Result<Burst> {
    let mut submits = JoinSet::new();
    for _ in 0..runs {
        let store = store.clone();
        let phase1 = phase1.clone();
        submits.spawn(async move { submit_run(&store, &phase1).await });
    }
    let mut pending: HashSet<Uuid> = HashSet::with_capacity(runs);
    while let Some(joined) = submits.join_next().await {
        pending.insert(joined??.0);
    }
    let submitted: Vec<Uuid> = pending.iter().copied().collect();
    let deadline = Instant::now() + deadline;
    let mut ends: HashMap<String, usize> = HashMap::new();
    while !pending.is_empty() {
        let Some((run, end)) = next_end(observer, store.pool(), &pending, deadline).await? else {
            break;
        };
        if pending.remove(&run) {
            *ends.entry(end).or_default() += 1;
        }
    }
    Ok(Burst { submitted, pending, ends })
}

/// Submits one run and waits until the bench sees it end; anything but `RunCompleted` fails.
async fn run_to_completion(
    store: &Store,
    observer: &mut Observer,
    pipeline: &Pipeline,
) -> Result<RunId> {
    let run = submit_run(store, pipeline).await?;
    let deadline = Instant::now() + RUN_DEADLINE;
    let pending = HashSet::from([run.0]);
    loop {
        match next_end(observer, store.pool(), &pending, deadline).await? {
            Some((id, end)) if id == run.0 => {
                if end == "RunCompleted" {
                    return Ok(run);
                }
                bail!("the {} run {run} ended with {end}, not RunCompleted", pipeline.name());
            }
            Some(_) => {}
            None => bail!(
                "the {} run {run} did not complete within {RUN_DEADLINE:?}; {}",
                pipeline.name(),
                stuck_run(store, run).await
            ),
        }
    }
}

/// How long the bench waits for its stream consumer before it asks the store.
const STORE_CHECK: Duration = Duration::from_secs(1);

/// The next end of a run, as the bench's stream consumer reports it; after a second without
/// any, also as the store has it for one of `pending` (logged: the stream did not deliver,
/// within a second, an end the store had committed a second earlier). `None` at the
/// deadline. An end reported both ways comes twice; callers ignore runs not pending.
async fn next_end(
    observer: &mut Observer,
    pool: &PgPool,
    pending: &HashSet<Uuid>,
    deadline: Instant,
) -> Result<Option<(Uuid, String)>> {
    loop {
        let slice = deadline.min(Instant::now() + STORE_CHECK);
        if let Some(end) = observer.next_end(slice).await? {
            return Ok(Some(end));
        }
        let ended: Option<(Uuid, String)> = sqlx::query_as(
            "SELECT run_id, event_type FROM events \
              WHERE run_id = ANY($1) AND aggregate_type = 'run' AND event_type = ANY($2) \
                AND recorded_at < clock_timestamp() - interval '1 second' \
              ORDER BY position LIMIT 1",
        )
        .bind(pending.iter().copied().collect::<Vec<Uuid>>())
        .bind(RUN_ENDS.map(String::from).to_vec())
        .fetch_optional(pool)
        .await?;
        if let Some((run, end)) = ended {
            tracing::warn!(%run, %end, "the store has this end of a run for over a second; the bench's stream consumer has not seen it");
            return Ok(Some((run, end)));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
    }
}

/// What the store says of a run the bench gave up on: its status and its last events.
async fn stuck_run(store: &Store, run: RunId) -> String {
    let status = match store.load_run(run).await {
        Ok(state) => state.status.as_str().to_string(),
        Err(error) => format!("unknown ({error})"),
    };
    let events = factory_commands::events::run_events(store.pool(), run.0, None)
        .await
        .unwrap_or_default();
    let last: Vec<String> = events
        .iter()
        .rev()
        .take(4)
        .rev()
        .map(|e| {
            format!(
                "{} {} {}",
                e.position,
                e.event_type,
                e.payload["stage"].as_str().unwrap_or_default()
            )
        })
        .collect();
    format!(
        "in the store it is {status} after {} events, the last: {}",
        events.len(),
        last.join(", ")
    )
}

/// RequirementSubmitted to RunCompleted, store clock.
fn run_wall_ms(events: &[EventEnvelope]) -> Result<f64> {
    let at = |event_type: &str| {
        events
            .iter()
            .find(|e| e.aggregate_type == "run" && e.event_type == event_type)
            .map(|e| e.recorded_at)
            .with_context(|| format!("the run has no {event_type}"))
    };
    Ok(micros(at("RequirementSubmitted")?, at("RunCompleted")?) / 1e3)
}

fn micros(from: chrono::DateTime<Utc>, to: chrono::DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64
}

/// When the bench's consumer saw each event on the events stream, by `Nats-Msg-Id`.
type Seen = HashMap<String, chrono::DateTime<Utc>>;

/// Watches the events stream like any outside reader: records when each event arrived and
/// reports the run events after which a run stops.
struct Observer {
    seen: Arc<Mutex<Seen>>,
    ends: tokio::sync::mpsc::UnboundedReceiver<(Uuid, String)>,
    _task: JoinSet<()>,
}

impl Observer {
    async fn start(reader: &jetstream::Context, topology: &Topology) -> Result<Self> {
        let stream = reader
            .get_stream(&topology.events_stream)
            .await
            .context("opening the bench's events stream")?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                // What the hops and run ends are read from: the runs' own events and each
                // objective's end. Not the model calls and artifacts, which no figure needs
                // and which are most of the bytes: an instrument should not load what it
                // measures more than it must.
                filter_subjects: vec![
                    format!("{}.*.run.>", topology.events_prefix),
                    topology.event_type_filter("objective", "ObjectiveCompleted"),
                ],
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .context("creating an ordered consumer")?;
        let mut messages = consumer.messages().await.context("subscribing")?;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let (ends_tx, ends) = tokio::sync::mpsc::unbounded_channel();
        let subject_prefix = format!("{}.", topology.events_prefix);
        let mut task = JoinSet::new();
        let seen_by_task = seen.clone();
        task.spawn(async move {
            while let Some(message) = messages.next().await {
                let arrived = Utc::now();
                let message = match message {
                    Ok(message) => message,
                    Err(error) => {
                        tracing::warn!(%error, "reading the bench stream; the ordered consumer recovers");
                        continue;
                    }
                };
                if let Some(id) = message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get("Nats-Msg-Id"))
                {
                    seen_by_task
                        .lock()
                        .expect("seen events")
                        .insert(id.to_string(), arrived);
                }
                // `<prefix>.<run_id>.run.<EventType>`
                let tokens: Vec<&str> = message
                    .subject
                    .strip_prefix(subject_prefix.as_str())
                    .unwrap_or_default()
                    .split('.')
                    .collect();
                if let [run_id, "run", event_type] = tokens.as_slice()
                    && RUN_ENDS.contains(event_type)
                    && let Ok(run_id) = Uuid::parse_str(run_id)
                    && ends_tx.send((run_id, event_type.to_string())).is_err()
                {
                    break;
                }
            }
        });
        Ok(Self { seen, ends, _task: task })
    }

    /// The next run that ended and how, or `None` at the deadline.
    async fn next_end(&mut self, deadline: Instant) -> Result<Option<(Uuid, String)>> {
        match tokio::time::timeout_at(deadline.into(), self.ends.recv()).await {
            Ok(Some(end)) => Ok(Some(end)),
            Ok(None) => bail!("the bench's stream consumer stopped"),
            Err(_elapsed) => Ok(None),
        }
    }

    fn snapshot(&self) -> Seen {
        self.seen.lock().expect("seen events").clone()
    }

    /// `read` of what was seen so far, without copying it (the map grows with every run).
    fn with_seen<R>(&self, read: impl FnOnce(&Seen) -> R) -> R {
        read(&self.seen.lock().expect("seen events"))
    }
}

/// Per run and team: when its first model call started and its last one returned.
type CallTimes = HashMap<(Uuid, String), (chrono::DateTime<Utc>, chrono::DateTime<Utc>)>;

/// The scripted provider, unchanged, plus a note of when each run's team called it. The
/// note costs a substring search and a mutex, microseconds.
struct TimedProvider {
    inner: ScriptedProvider,
    calls: Arc<Mutex<CallTimes>>,
}

impl ModelProvider for TimedProvider {
    fn answers_in_process(&self) -> bool {
        self.inner.answers_in_process()
    }

    fn complete<'a>(&'a self, request: &'a ModelRequest) -> ModelFuture<'a> {
        Box::pin(async move {
            let started = Utc::now();
            let response = self.inner.complete(request).await;
            let returned = Utc::now();
            if let Some(run) = tagged_run(request) {
                self.calls
                    .lock()
                    .expect("call times")
                    .entry((run, request.team.clone()))
                    .or_insert((started, returned))
                    .1 = returned;
            }
            response
        })
    }
}

/// The run id the bench put in the requirement, from the objective prompt.
fn tagged_run(request: &ModelRequest) -> Option<Uuid> {
    let prompt = request.messages.iter().find_map(|m| match m {
        Message::User { content } => Some(content),
        _ => None,
    })?;
    let start = prompt.find(RUN_TAG)? + RUN_TAG.len();
    Uuid::parse_str(prompt.get(start..start + 36)?).ok()
}

/// One stage: its overhead and its hops (`None` where a moment was not seen).
struct StageSample {
    overhead_ms: f64,
    hops_ms: [Option<f64>; HOPS.len()],
    events: usize,
}

/// Per-stage samples of one run. A stage's time runs from the event that made it ready
/// (the latest `StageCompleted` of its inputs, or `RequirementSubmitted` for a stage without
/// inputs) to its own `StageCompleted`; its overhead is that minus the `latency_ms` of its
/// model calls.
fn stage_samples(
    run: Uuid,
    pipeline: &Pipeline,
    events: &[EventEnvelope],
    seen: &Seen,
    calls: &CallTimes,
) -> Result<Vec<StageSample>> {
    let ms = |from: chrono::DateTime<Utc>, to: chrono::DateTime<Utc>| micros(from, to) / 1e3;
    let seen_at = |event: &EventEnvelope| seen.get(&event.message_id()).copied();
    let run_event = |event_type: &str, stage: Option<&str>| {
        events.iter().find(|e| {
            e.aggregate_type == "run"
                && e.event_type == event_type
                && stage.is_none_or(|stage| e.payload["stage"] == stage)
        })
    };
    let submitted = run_event("RequirementSubmitted", None)
        .with_context(|| format!("run {run} has no RequirementSubmitted"))?;
    let mut samples = Vec::new();
    for stage in pipeline.stages() {
        let name = stage.name.as_str();
        let completed = run_event("StageCompleted", Some(name))
            .with_context(|| format!("run {run}: stage {name} has no StageCompleted"))?;
        let started = run_event("StageStarted", Some(name))
            .with_context(|| format!("run {run}: stage {name} has no StageStarted"))?;
        let mut trigger = submitted;
        for input in &stage.inputs {
            let input_completed = run_event("StageCompleted", Some(input))
                .with_context(|| format!("run {run}: stage {input} has no StageCompleted"))?;
            if input_completed.position > trigger.position {
                trigger = input_completed;
            }
        }
        let objective = completed.payload["objective_id"]
            .as_str()
            .unwrap_or_default();
        let of_objective: Vec<&EventEnvelope> = events
            .iter()
            .filter(|e| e.aggregate_type == "objective" && e.aggregate_id == objective)
            .collect();
        let first = |event_type: &str| {
            of_objective
                .iter()
                .find(|e| e.event_type == event_type)
                .copied()
                .with_context(|| format!("run {run}: stage {name} has no {event_type}"))
        };
        let assigned = first("ObjectiveAssigned")?;
        let task_result = first("TaskResultRecorded")?;
        let objective_completed = first("ObjectiveCompleted")?;
        let latency_ms: f64 = of_objective
            .iter()
            .filter(|e| e.event_type == "ModelCalled")
            .map(|e| e.payload["latency_ms"].as_f64().unwrap_or(0.0))
            .sum();
        let model_calls = calls.get(&(run, stage.team.clone())).copied();
        let completed_seen = seen_at(objective_completed);
        let hops_ms = [
            Some(ms(trigger.recorded_at, started.recorded_at)),
            Some(ms(started.recorded_at, assigned.recorded_at)),
            model_calls.map(|(first, _)| ms(assigned.recorded_at, first)),
            model_calls.map(|(first, last)| ms(first, last)),
            model_calls.map(|(_, last)| ms(last, task_result.recorded_at)),
            Some(ms(task_result.recorded_at, objective_completed.recorded_at)),
            Some(ms(objective_completed.recorded_at, completed.recorded_at)),
            completed_seen.map(|at| ms(objective_completed.recorded_at, at)),
        ];
        samples.push(StageSample {
            overhead_ms: ms(trigger.recorded_at, completed.recorded_at) - latency_ms,
            hops_ms,
            // The objective's events and the run's StageStarted and StageCompleted.
            events: of_objective.len() + 2,
        });
    }
    Ok(samples)
}

/// Stage samples gathered over runs, each figure sorted for percentiles.
#[derive(Default)]
struct StageFigures {
    overhead_ms: Vec<f64>,
    hops_ms: [Vec<f64>; HOPS.len()],
    events: Vec<f64>,
}

impl StageFigures {
    fn add(&mut self, samples: Vec<StageSample>) {
        for sample in samples {
            self.overhead_ms.push(sample.overhead_ms);
            for (hop, value) in self.hops_ms.iter_mut().zip(sample.hops_ms) {
                hop.extend(value);
            }
            self.events.push(sample.events as f64);
        }
    }

    fn sort(&mut self) {
        self.overhead_ms.sort_by(f64::total_cmp);
        for hop in &mut self.hops_ms {
            hop.sort_by(f64::total_cmp);
        }
        self.events.sort_by(f64::total_cmp);
    }

    /// The hops' p50s (they need not add up to the overhead's p50) and the events per stage.
    fn print_breakdown(&self, suffix: &str) {
        for (name, values) in HOPS.iter().zip(&self.hops_ms) {
            print_figure(
                "pipeline",
                &format!("hop_{name}_p50_ms{suffix}"),
                percentile(values, 0.50),
                "ms",
                Target::None,
                None,
            );
        }
        print_figure(
            "pipeline",
            &format!("events_per_stage_p50{suffix}"),
            percentile(&self.events, 0.50),
            "events",
            Target::None,
            None,
        );

    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---- the reference ----

/// LangGraph with its PostgreSQL checkpointer (`cli/bench/langgraph_pipeline.py`), the
/// framework the issue's pipeline targets were set against: run on the same server, with the
/// same plan, right after the Factory's own figures, so that their ratios come from one run
/// whatever the machine's speed that day.
struct Reference {
    python: PathBuf,
    script: PathBuf,
}

/// What the reference's script prints, one figure per line.
#[derive(Debug, serde::Deserialize)]
struct ReferenceFigure {
    figure: String,
    value: f64,
}

impl Reference {
    fn find(config: &Config) -> Result<Self> {
        let python = config.home.join(".factory").join("reference-venv").join("bin").join("python");
        let script = config.home.join("cli").join("bench").join("langgraph_pipeline.py");
        if !python.exists() {
            bail!(
                "the reference is not installed ({} is missing); run the bench as `./factory bench pipeline --reference`, which installs it",
                python.display()
            );
        }
        if !script.exists() {
            bail!("the reference's script {} is missing; is FACTORY_HOME the project's folder?", script.display());
        }
        Ok(Self { python, script })
    }

    /// Runs the reference in a scratch database of its own and prints its figures, and the
    /// Factory's with the reference's as their baseline.
    async fn compare(&self, config: &Config, plan: Plan, ours: PipelineFigures) -> Result<()> {
        tracing::info!(
            single_runs = plan.single_runs,
            runs = plan.concurrent_runs,
            "the reference: LangGraph with its PostgreSQL checkpointer"
        );
        let theirs = in_scratch_database(config, |pool| async move {
            let database = pool.connect_options().get_database().context("the scratch pool names no database")?.to_string();
            self.run(config, &database, plan).await
        })
        .await?;
        let runs = plan.concurrent_runs;
        let their_stages_per_s = format!("reference_stages_per_s_{runs}_runs");
        print_figure("pipeline", "reference_stage_p50_ms", theirs.stage_overhead_p50_ms, "ms", Target::None, None);
        print_figure("pipeline", "reference_full_run_wall_ms_p50", theirs.full_run_wall_ms_p50, "ms", Target::None, None);
        print_figure("pipeline", &their_stages_per_s, theirs.stages_per_s, "stages/s", Target::None, None);
        print_figure(
            "pipeline",
            "stage_overhead_p50_ms_vs_reference",
            ours.stage_overhead_p50_ms,
            "ms",
            Target::None,
            Some(("reference_stage_p50_ms", theirs.stage_overhead_p50_ms)),
        );
        print_figure(
            "pipeline",
            "full_run_wall_ms_p50_vs_reference",
            ours.full_run_wall_ms_p50,
            "ms",
            Target::None,
            Some(("reference_full_run_wall_ms_p50", theirs.full_run_wall_ms_p50)),
        );
        print_figure(
            "pipeline",
            &format!("stages_per_s_{runs}_runs_vs_reference"),
            ours.stages_per_s,
            "stages/s",
            Target::None,
            Some((&their_stages_per_s, theirs.stages_per_s)),
        );
        Ok(())
    }

    async fn run(&self, config: &Config, database: &str, plan: Plan) -> Result<PipelineFigures> {
        // The same pipelines, as stages and their inputs.
        let mut pipelines = serde_json::Map::new();
        for name in ["phase1", "full"] {
            let stages: Vec<_> = Pipeline::load(name)?
                .stages()
                .iter()
                .map(|stage| json!({"name": stage.name, "inputs": stage.inputs}))
                .collect();
            pipelines.insert(name.into(), stages.into());
        }
        // The server's URL goes by the environment, not the command line (`ps` shows that).
        let output = tokio::process::Command::new(&self.python)
            .arg(&self.script)
            .arg(plan.single_runs.to_string())
            .arg(plan.full_runs.to_string())
            .arg(plan.concurrent_runs.to_string())
            .env("REFERENCE_PIPELINES", serde_json::Value::Object(pipelines).to_string())
            .env("REFERENCE_DATABASE_URL", stack::admin_database_url(config, "postgres")?)
            .env("REFERENCE_DATABASE", database)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("starting {}", self.python.display()))?;
        if !output.status.success() {
            bail!("the reference failed ({}); what it said is above", output.status);
        }
        reference_figures(&String::from_utf8_lossy(&output.stdout))
    }
}

/// The reference script's three figures from its output.
fn reference_figures(output: &str) -> Result<PipelineFigures> {
    let mut figures = (None, None, None);
    for line in output.lines().filter(|line| !line.trim().is_empty()) {
        let figure: ReferenceFigure = serde_json::from_str(line)
            .with_context(|| format!("the reference printed a line that is not a figure: {line}"))?;
        match figure.figure.as_str() {
            "stage_p50_ms" => figures.0 = Some(figure.value),
            "full_wall_ms_p50" => figures.1 = Some(figure.value),
            "stages_per_s" => figures.2 = Some(figure.value),
            _ => {}
        }
    }
    match figures {
        (Some(stage_overhead_p50_ms), Some(full_run_wall_ms_p50), Some(stages_per_s)) => {
            Ok(PipelineFigures { stage_overhead_p50_ms, full_run_wall_ms_p50, stages_per_s })
        }
        _ => bail!("the reference ended without printing stage_p50_ms, full_wall_ms_p50 and stages_per_s: {output:?}"),
    }
}

// ---- rebuild ----

/// The issue's target: every projection rebuilt over the store at this rate or better.
const TARGET_REBUILD_EVENTS_PER_S: f64 = 20_000.0;
/// The issue names the load (2,000 events/s) but not the lag it allows; this ceiling is
/// ours. It is four times the relay's own budget (25 ms p99 from commit to the stream,
/// above), which leaves the runners' delivery, fold and checkpoint three times as much
/// again; and it is about where a person who just acted on the dashboard starts to notice
/// the read side trailing behind.
const TARGET_PROJECTION_LAG_P99_MS: f64 = 100.0;
/// How often the bench reads the projections' checkpoints while it measures their lag. Each
/// lag is overstated by up to this much (half of it on average); reading more often would
/// take a noticeable share of the two cores the runners themselves need.
const CHECKPOINT_POLL: Duration = Duration::from_millis(2);
/// How long the live runners may take to work through the stream's backlog (every stored
/// event, which a rebuild already folded: they only acknowledge it) before the load starts.
const RUNNERS_DRAIN_DEADLINE: Duration = Duration::from_secs(120);
/// The paced load can only come out at or just under `LAG_EVENTS_PER_S`: the count stops
/// with the window, the clock with the last command, a few milliseconds later. 1% allows
/// for that edge; a store that fell behind shows as more.
const TARGET_ACHIEVED_SHARE: f64 = 0.99;

async fn rebuild_suite(config: &Config, plan: Plan) -> Result<()> {
    with_components(config, "rebuild", |pool, stack| {
        rebuild_figures(pool, stack.components, stack.reader, stack.topology, stack.worker, stack.relay, plan)
    })
    .await
}

async fn rebuild_figures(
    pool: PgPool,
    js: jetstream::Context,
    reader: jetstream::Context,
    topology: Topology,
    worker_options: WorkerOptions,
    relay_options: RelayOptions,
    plan: Plan,
) -> Result<()> {
    let store = Arc::new(Store::new(pool.clone(), Arc::new(SystemServices)));
    // The relay runs from here to the end, as in `up`: the projection runners learn from the
    // stream how far the store has been relayed.
    let relay = Relay::new(pool.clone(), js.clone(), topology.clone(), relay_options)
        .with_wake(store.committed());
    let progress = relay.progress();
    let mut relay_task = JoinSet::new();
    relay_task.spawn(relay.run());

    // 1. Real run histories: a phase1 and a full run through the orchestrator and the
    // workers on the scripted provider, as a user's runs would go.
    let templates = {
        let mut observer = Observer::start(&reader, &topology).await?;
        let mut pipeline = JoinSet::new();
        let worker = Worker::new(store.clone(), js.clone(), topology.clone(), Arc::new(ScriptedProvider::new()), worker_options);
        pipeline.spawn(
            Orchestrator::new(store.clone(), js.clone(), topology.clone())
                .with_local_work(worker.local_work())
                .run(),
        );
        pipeline.spawn(worker.run());
        let mut templates = Vec::new();
        for name in ["phase1", "full"] {
            let pipeline = Pipeline::load(name)?;
            tracing::info!(pipeline = name, "recording a template run");
            let run = run_to_completion(&store, &mut observer, &pipeline).await?;
            templates.push(TemplateRun::read(&pool, run, pipeline).await?);
        }
        pipeline.shutdown().await;
        templates
    };

    // 2. Copies of them, with fresh ids, until the store holds the events to rebuild from.
    let stored = copy_runs(&pool, &templates, plan.backlog_events).await?;
    sqlx::query("ANALYZE events").execute(&pool).await?;
    let last_position: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events")
        .fetch_one(&pool)
        .await?;
    // The relay publishes the copies as they are inserted; the rebuild is timed on a quiet
    // machine, once it is done.
    let deadline = Instant::now() + plan.catch_up_deadline();
    while progress.published.load(Ordering::Relaxed) < last_position {
        if Instant::now() > deadline {
            bail!(
                "the relay published up to position {} of {last_position} in {:?}",
                progress.published.load(Ordering::Relaxed),
                plan.catch_up_deadline()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    print_figure(
        "rebuild",
        "stored_events",
        stored as f64,
        "events",
        Target::None,
        None,
    );
    print_figure(
        "rebuild",
        "read_events_per_s",
        read_events_per_s(&pool, last_position).await?,
        "events/s",
        Target::None,
        None,
    );

    // 3. Every projection rebuilt, side by side, as `replay rebuild --projection all` does.
    // Each reads every stored event; the figure is stored events over the wall time of all.
    tracing::info!(events = stored, "rebuilding every projection");
    let started = Instant::now();
    let rebuilds = Projection::ALL.map(|projection| {
        let pool = pool.clone();
        async move {
            let started = Instant::now();
            let report = factory_projections::rebuild::rebuild(&pool, projection, |_, _, _| {}).await?;
            Ok::<_, anyhow::Error>((projection, report, started.elapsed()))
        }
    });
    for (projection, report, took) in futures::future::try_join_all(rebuilds).await? {
        if report.events_applied != stored as u64 || report.position != last_position {
            bail!(
                "the {} rebuild folded {} events up to position {}; the store holds {stored} up to {last_position}",
                projection.name(),
                report.events_applied,
                report.position
            );
        }
        print_figure(
            "rebuild",
            &format!("rebuild_{}_events_per_s", projection.name()),
            stored as f64 / took.as_secs_f64(),
            "events/s",
            Target::None,
            None,
        );
    }
    let total = started.elapsed();
    print_figure(
        "rebuild",
        "rebuild_events_per_s",
        stored as f64 / total.as_secs_f64(),
        "events/s",
        Target::AtLeast(TARGET_REBUILD_EVENTS_PER_S),
        None,
    );

    // 4. The live runners, and their lag under a steady load of commands.
    let mut runners = JoinSet::new();
    let mut consumers = Vec::new();
    for projection in Projection::ALL {
        let runner = ProjectionRunner::new(pool.clone(), js.clone(), topology.clone(), projection);
        consumers.push(runner.consumer_name());
        runners.spawn(runner.run());
    }
    drain_runners(&js, &topology, &consumers, &mut runners).await?;
    let lag = projection_lag(&store, &progress, &templates, &mut runners, plan.lag_window).await;
    runners.shutdown().await;
    relay_task.shutdown().await;
    let lag = lag?;
    print_figure(
        "rebuild",
        "projection_lag_p50_ms",
        lag.p50_ms,
        "ms",
        Target::None,
        None,
    );
    print_figure(
        "rebuild",
        "projection_lag_p99_ms",
        lag.p99_ms,
        "ms",
        Target::AtMost(TARGET_PROJECTION_LAG_P99_MS),
        None,
    );
    print_figure(
        "rebuild",
        "relay_lag_p50_ms",
        lag.relay_p50_ms,
        "ms",
        Target::None,
        None,
    );
    print_figure(
        "rebuild",
        "relay_lag_p99_ms",
        lag.relay_p99_ms,
        "ms",
        Target::None,
        None,
    );
    for (projection, p99_ms) in &lag.p99_ms_by_projection {
        print_figure(
            "rebuild",
            &format!("projection_lag_p99_ms_{projection}"),
            *p99_ms,
            "ms",
            Target::None,
            None,
        );
    }
    print_figure(
        "rebuild",
        "achieved_events_per_s",
        lag.achieved_events_per_s,
        "events/s",
        Target::AtLeast(TARGET_ACHIEVED_SHARE * f64::from(LAG_EVENTS_PER_S)),
        None,
    );
    print_figure(
        "rebuild",
        "uncovered_events",
        lag.uncovered as f64,
        "events",
        Target::AtMost(0.0),
        None,
    );
    if lag.uncovered > 0 {
        // Not a missed target: a read model that stopped or fell behind for good.
        bail!(
            "{} of {} committed events were not in every read model {DELIVERY_GRACE:?} after the load{}",
            lag.uncovered,
            lag.committed,
            lag.stopped
                .map(|why| format!("; {why}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Reading the whole store as a rebuild reads it (chunks of 5,000, decoded and upcast) and
/// folding nothing: how much of one projection's rebuild is the read.
async fn read_events_per_s(pool: &PgPool, last_position: i64) -> Result<f64> {
    let started = Instant::now();
    let (mut position, mut read) = (0, 0);
    while position < last_position {
        let events = factory_commands::events::range(pool, position, last_position, 5_000).await?;
        let Some(last) = events.last() else { break };
        position = last.position;
        read += events.len();
    }
    Ok(read as f64 / started.elapsed().as_secs_f64())
}

/// One recorded run: its events as stored (for copies) and as readers get them (for the
/// replay through commands).
struct TemplateRun {
    pipeline: Pipeline,
    /// The run's aggregates' ids: the run's own and its objectives'.
    ids: Vec<String>,
    stored: Vec<StoredEvent>,
    events: Vec<EventEnvelope>,
}

/// A stored event's columns as text, with every id of its run cut out, so that a copy with
/// fresh ids is a concatenation.
struct StoredEvent {
    aggregate_type: String,
    /// Into [`TemplateRun::ids`].
    aggregate_id: usize,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: Vec<Piece>,
    metadata: Vec<Piece>,
}

enum Piece {
    Text(String),
    Id(usize),
}

impl TemplateRun {
    async fn read(pool: &PgPool, run: RunId, pipeline: Pipeline) -> Result<Self> {
        let rows: Vec<(String, String, i64, String, String, String, String)> = sqlx::query_as(
            "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, \
                    payload::text, metadata::text \
               FROM events WHERE run_id = $1 ORDER BY position",
        )
        .bind(run.0)
        .fetch_all(pool)
        .await?;
        let mut ids: Vec<String> = Vec::new();
        for (_, aggregate_id, ..) in &rows {
            if !ids.contains(aggregate_id) {
                ids.push(aggregate_id.clone());
            }
        }
        let stored = rows
            .into_iter()
            .map(
                |(
                    aggregate_type,
                    aggregate_id,
                    sequence,
                    event_type,
                    event_version,
                    payload,
                    metadata,
                )| {
                    StoredEvent {
                        aggregate_id: ids
                            .iter()
                            .position(|id| *id == aggregate_id)
                            .unwrap_or_default(),
                        aggregate_type,
                        sequence,
                        event_type,
                        event_version,
                        payload: pieces(&payload, &ids),
                        metadata: pieces(&metadata, &ids),
                    }
                },
            )
            .collect();
        let events = factory_commands::events::run_events(pool, run.0, None).await?;
        tracing::info!(
            pipeline = pipeline.name(),
            events = events.len(),
            "template run recorded"
        );
        Ok(Self {
            pipeline,
            ids,
            stored,
            events,
        })
    }
}

/// `text` split around every occurrence of one of `ids`.
fn pieces(text: &str, ids: &[String]) -> Vec<Piece> {
    let mut hits: Vec<(usize, usize)> = ids
        .iter()
        .enumerate()
        .flat_map(|(i, id)| text.match_indices(id.as_str()).map(move |(at, _)| (at, i)))
        .collect();
    hits.sort_unstable();
    let mut pieces = Vec::new();
    let mut from = 0;
    for (at, i) in hits {
        if at < from {
            continue;
        }
        pieces.push(Piece::Text(text[from..at].to_string()));
        pieces.push(Piece::Id(i));
        from = at + ids[i].len();
    }
    pieces.push(Piece::Text(text[from..].to_string()));
    pieces
}

fn render(pieces: &[Piece], ids: &[String]) -> String {
    pieces
        .iter()
        .map(|piece| match piece {
            Piece::Text(text) => text.as_str(),
            Piece::Id(i) => ids[*i].as_str(),
        })
        .collect()
}

/// Inserts copies of the template runs, each with fresh ids, straight into `events` (the
/// trigger computes position, time and hash chain, as for any writer), until the store
/// holds at least `events`; returns how many it holds. Copies go in one after the other;
/// a live store interleaves concurrent runs, which changes nothing a fold does per event.
async fn copy_runs(pool: &PgPool, templates: &[TemplateRun], events: i64) -> Result<i64> {
    const CHUNK: usize = 5_000;
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?;
    let per_round: usize = templates.iter().map(|t| t.stored.len()).sum();
    if per_round == 0 {
        bail!("the template runs have no events");
    }
    let rounds = ((events - held).max(0) as usize).div_ceil(per_round);
    tracing::info!(
        rounds,
        events_per_round = per_round,
        "copying the template runs"
    );
    #[derive(Default)]
    struct Rows {
        aggregate_type: Vec<String>,
        aggregate_id: Vec<String>,
        sequence: Vec<i64>,
        event_type: Vec<String>,
        event_version: Vec<String>,
        payload: Vec<String>,
        metadata: Vec<String>,
    }
    async fn insert(pool: &PgPool, rows: &mut Rows) -> Result<()> {
        let rows = std::mem::take(rows);
        // WITH ORDINALITY and ORDER BY: positions are drawn in this order, and each event's
        // predecessor in its aggregate must be in before it (the hash chain).
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             SELECT a, i, s, t, v, p::json, m::json \
               FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[]) \
                    WITH ORDINALITY AS u(a, i, s, t, v, p, m, n) \
              ORDER BY n",
        )
        .bind(rows.aggregate_type)
        .bind(rows.aggregate_id)
        .bind(rows.sequence)
        .bind(rows.event_type)
        .bind(rows.event_version)
        .bind(rows.payload)
        .bind(rows.metadata)
        .execute(pool)
        .await?;
        Ok(())
    }
    let mut rows = Rows::default();
    for _ in 0..rounds {
        for template in templates {
            let ids: Vec<String> = template
                .ids
                .iter()
                .map(|_| Uuid::now_v7().to_string())
                .collect();
            for event in &template.stored {
                rows.aggregate_type.push(event.aggregate_type.clone());
                rows.aggregate_id.push(ids[event.aggregate_id].clone());
                rows.sequence.push(event.sequence);
                rows.event_type.push(event.event_type.clone());
                rows.event_version.push(event.event_version.clone());
                rows.payload.push(render(&event.payload, &ids));
                rows.metadata.push(render(&event.metadata, &ids));
            }
            if rows.sequence.len() >= CHUNK {
                insert(pool, &mut rows).await?;
            }
        }
    }
    if !rows.sequence.is_empty() {
        insert(pool, &mut rows).await?;
    }
    Ok(sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?)
}

/// Waits until each runner's durable consumer has been delivered, and has acknowledged,
/// everything on the stream: the stored events a rebuild already folded, which a runner
/// only acknowledges. The lag is measured from there, as on a live stack in its steady state.
async fn drain_runners(
    js: &jetstream::Context,
    topology: &Topology,
    consumers: &[String],
    runners: &mut JoinSet<ProjectionError>,
) -> Result<()> {
    tracing::info!("live projection runners working through the stream");
    let stream = js
        .get_stream(&topology.events_stream)
        .await
        .context("opening the bench's events stream")?;
    let deadline = Instant::now() + RUNNERS_DRAIN_DEADLINE;
    loop {
        if let Some(stopped) = runners.try_join_next() {
            bail!("a projection runner stopped: {}", runner_outcome(stopped));
        }
        let mut drained = true;
        for name in consumers {
            // Not there yet: the runner has not created it.
            match stream.consumer_info(name).await {
                Ok(info) => drained &= info.num_pending == 0 && info.num_ack_pending == 0,
                Err(_) => drained = false,
            }
        }
        if drained {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the projection runners did not work through the stream within {RUNNERS_DRAIN_DEADLINE:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn runner_outcome(joined: Result<ProjectionError, tokio::task::JoinError>) -> String {
    match joined {
        Ok(error) => error.to_string(),
        Err(error) => format!("it panicked or was cancelled: {error}"),
    }
}

struct ProjectionLag {
    /// Over the events every read model covered: from the command's return to the moment
    /// the last of the projections' checkpoints was seen past the event.
    p50_ms: f64,
    p99_ms: f64,
    /// The same, projection by projection.
    p99_ms_by_projection: Vec<(&'static str, f64)>,
    /// The part of it until the relay had the event acknowledged by JetStream.
    relay_p50_ms: f64,
    relay_p99_ms: f64,
    achieved_events_per_s: f64,
    /// Events the load committed.
    committed: usize,
    /// Of those, how many some read model had not covered by the end.
    uncovered: usize,
    /// Why, if a runner stopped.
    stopped: Option<String>,
}

/// When the bench saw each projection's checkpoint move, and to where; under [`RELAY`], the
/// relay's published position, sampled at the same moments.
type Checkpoints = HashMap<String, Vec<(Instant, i64)>>;
const RELAY: &str = "relay";

/// Drives a steady `LAG_EVENTS_PER_S` through the store while the relay and the projection
/// runners run: `LAG_WRITERS` writers each replay the template runs through commands (one
/// command, one event, per tick; fresh ids), so the runners fold what real runs hold. A
/// task reads the checkpoints every `CHECKPOINT_POLL` on a connection of its own and
/// notes when each one moved, at the moment its read returned (the commit was earlier:
/// an upper bound). An event's lag is from its command returning (just after the commit)
/// to the first read that found a projection's checkpoint at or past the event's position;
/// that of all read models is the largest over the projections. The relay's position,
/// sampled with each read, splits off the part until the event was on the stream.
async fn projection_lag(
    store: &Arc<Store>,
    progress: &Arc<RelayProgress>,
    templates: &[TemplateRun],
    runners: &mut JoinSet<ProjectionError>,
    window: Duration,
) -> Result<ProjectionLag> {
    let pool = store.pool();
    let before: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events")
        .fetch_one(pool)
        .await?;
    let poller_pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await
        .context("connecting the checkpoint reader")?;
    let checkpoints: Arc<Mutex<Checkpoints>> = Arc::default();
    let mut poller = JoinSet::new();
    {
        let checkpoints = checkpoints.clone();
        let poller_pool = poller_pool.clone();
        let progress = progress.clone();
        poller.spawn(async move {
            let mut ticks = tokio::time::interval(CHECKPOINT_POLL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                ticks.tick().await;
                let rows: Vec<(String, i64)> =
                    match sqlx::query_as("SELECT name, position FROM projection_checkpoints")
                        .fetch_all(&poller_pool)
                        .await
                    {
                        Ok(rows) => rows,
                        Err(error) => return error,
                    };
                let read_at = Instant::now();
                let relayed = progress.published.load(Ordering::Relaxed);
                let mut checkpoints = checkpoints.lock().expect("checkpoints");
                for (name, position) in rows.into_iter().chain([(RELAY.to_string(), relayed)]) {
                    let moves = checkpoints.entry(name).or_default();
                    if moves.last().is_none_or(|(_, last)| *last != position) {
                        moves.push((read_at, position));
                    }
                }
            }
        });
    }

    tracing::info!(
        events_per_s = LAG_EVENTS_PER_S,
        writers = LAG_WRITERS,
        ?window,
        "steady load with the relay and the projection runners running"
    );
    let period = Duration::from_secs(1) * LAG_WRITERS / LAG_EVENTS_PER_S;
    let started = Instant::now();
    let deadline = started + window;
    let templates = Arc::new(
        templates
            .iter()
            .map(|t| (t.pipeline.clone(), t.events.clone()))
            .collect::<Vec<_>>(),
    );
    let mut writers = JoinSet::new();
    for writer in 0..LAG_WRITERS {
        let store = store.clone();
        let templates = templates.clone();
        let first_tick = tokio::time::Instant::now() + period * writer / LAG_WRITERS;
        writers.spawn(async move {
            let mut ticks = tokio::time::interval_at(first_tick, period);
            // As in the relay's lag: a writer that fell behind catches up, so the offered
            // load stays at the rate on average; `achieved_events_per_s` shows whether the
            // store kept up.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut replay = Replay::new(writer as usize % templates.len());
            let mut commits = Vec::new();
            loop {
                ticks.tick().await;
                if Instant::now() >= deadline {
                    break;
                }
                let event = replay.next(&store, &templates).await?;
                commits.push((event, Instant::now()));
            }
            Ok::<_, anyhow::Error>(commits)
        });
    }
    let mut commits: Vec<(EventKey, Instant)> = Vec::new();
    while let Some(joined) = writers.join_next().await {
        commits.extend(joined??);
    }
    let load_took = started.elapsed();
    if commits.is_empty() {
        bail!("no command committed within {window:?}: the store did not take any load");
    }
    let last_position: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events")
        .fetch_one(pool)
        .await?;

    // Wait until every read model covers the load, or a runner stops, or the grace is over.
    let give_up = Instant::now() + DELIVERY_GRACE;
    let mut stopped = None;
    loop {
        let covered = {
            let checkpoints = checkpoints.lock().expect("checkpoints");
            Projection::ALL.iter().all(|p| {
                checkpoints
                    .get(p.name())
                    .and_then(|moves| moves.last())
                    .is_some_and(|(_, position)| *position >= last_position)
            })
        };
        if covered || Instant::now() > give_up {
            break;
        }
        if let Some(joined) = runners.try_join_next() {
            stopped = Some(format!(
                "a projection runner stopped: {}",
                runner_outcome(joined)
            ));
            break;
        }
        if let Some(joined) = poller.try_join_next() {
            match joined {
                Ok(error) => return Err(anyhow!(error).context("reading the checkpoints")),
                Err(error) => bail!("the checkpoint reader panicked: {error}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    poller.shutdown().await;
    poller_pool.close().await;
    let checkpoints = std::mem::take(&mut *checkpoints.lock().expect("checkpoints"));

    // Each command appended exactly one event; find its position.
    let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, sequence, position FROM events WHERE position > $1",
    )
    .bind(before)
    .fetch_all(pool)
    .await?;
    if rows.len() != commits.len() {
        bail!(
            "the load's {} commands appended {} events; the replay should append one per command",
            commits.len(),
            rows.len()
        );
    }
    let positions: HashMap<EventKey, i64> = rows
        .into_iter()
        .map(|(aggregate_type, aggregate_id, sequence, position)| {
            ((aggregate_type, aggregate_id, sequence), position)
        })
        .collect();
    let mut all_ms = Vec::with_capacity(commits.len());
    let mut by_projection: Vec<(&'static str, Vec<f64>)> = Projection::ALL
        .iter()
        .map(|p| (p.name(), Vec::new()))
        .collect();
    let mut relay_ms = Vec::with_capacity(commits.len());
    let mut uncovered = 0;
    // The first moment a timeline was seen at or past `position`.
    let seen = |name: &str, position: i64| {
        let moves = checkpoints.get(name).map(Vec::as_slice).unwrap_or_default();
        let first = moves.partition_point(|(_, covered)| *covered < position);
        moves.get(first).map(|(seen_at, _)| *seen_at)
    };
    for (key, committed_at) in &commits {
        let position = *positions.get(key).with_context(|| {
            format!("the store has no event {key:?} although its command returned")
        })?;
        // Saturates at zero: the reader can see a position move before the writer task
        // gets to note that its command returned.
        let ms = |seen_at: Instant| {
            seen_at
                .saturating_duration_since(*committed_at)
                .as_secs_f64()
                * 1e3
        };
        relay_ms.extend(seen(RELAY, position).map(ms));
        let mut worst: Option<f64> = Some(0.0);
        for (name, lags) in &mut by_projection {
            match seen(name, position).map(ms) {
                Some(ms) => {
                    lags.push(ms);
                    worst = worst.map(|w| w.max(ms));
                }
                None => worst = None,
            }
        }
        match worst {
            Some(ms) => all_ms.push(ms),
            None => uncovered += 1,
        }
    }
    all_ms.sort_by(f64::total_cmp);
    relay_ms.sort_by(f64::total_cmp);
    let p99_ms_by_projection = by_projection
        .into_iter()
        .map(|(name, mut lags)| {
            lags.sort_by(f64::total_cmp);
            (name, percentile(&lags, 0.99))
        })
        .collect();
    if uncovered > 0 && stopped.is_none() {
        stopped = failed_projections(pool).await?;
    }
    Ok(ProjectionLag {
        p50_ms: percentile(&all_ms, 0.50),
        p99_ms: percentile(&all_ms, 0.99),
        p99_ms_by_projection,
        relay_p50_ms: percentile(&relay_ms, 0.50),
        relay_p99_ms: percentile(&relay_ms, 0.99),
        achieved_events_per_s: commits.len() as f64 / load_took.as_secs_f64(),
        committed: commits.len(),
        uncovered,
        stopped,
    })
}

/// What the checkpoint table says of projections that stopped on an event.
async fn failed_projections(pool: &PgPool) -> Result<Option<String>> {
    let failed: Vec<(String, Option<i64>, Option<String>)> = sqlx::query_as(
        "SELECT name, failed_position, error FROM projection_checkpoints WHERE error IS NOT NULL",
    )
    .fetch_all(pool)
    .await?;
    Ok((!failed.is_empty()).then(|| {
        failed
            .iter()
            .map(|(name, position, error)| {
                format!(
                    "{name} stopped at {position:?}: {}",
                    error.as_deref().unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }))
}

/// An event by its aggregate and sequence, as a command's caller knows it.
type EventKey = (String, String, i64);

/// One writer's place in the template runs it replays, one after the other, each with
/// fresh ids.
struct Replay {
    template: usize,
    next: usize,
    /// Template id -> this copy's id.
    ids: HashMap<Uuid, Uuid>,
}

impl Replay {
    fn new(template: usize) -> Self {
        Self {
            template,
            next: 0,
            ids: HashMap::new(),
        }
    }

    /// Sends the command that appends the next event of the current copy, and says which
    /// event that is.
    async fn next(
        &mut self,
        store: &Store,
        templates: &[(Pipeline, Vec<EventEnvelope>)],
    ) -> Result<EventKey> {
        let (pipeline, events) = &templates[self.template];
        let event = &events[self.next];
        let key = self.send(store, pipeline, event).await.with_context(|| {
            format!(
                "replaying {} {} of a {} run",
                event.aggregate_type,
                event.event_type,
                pipeline.name()
            )
        })?;
        self.next += 1;
        if self.next == events.len() {
            *self = Self::new((self.template + 1) % templates.len());
        }
        Ok((
            event.aggregate_type.clone(),
            key.to_string(),
            event.sequence,
        ))
    }

    /// The command a worker, the orchestrator or a user sent for `event`; returns the id of
    /// the aggregate it went to. The run's events replay only what an auto-approved run
    /// holds (the templates are such runs).
    async fn send(
        &mut self,
        store: &Store,
        pipeline: &Pipeline,
        event: &EventEnvelope,
    ) -> Result<Uuid> {
        let template_run = event.run_id.context("the template event has no run")?;
        let payload = || event.payload.clone();
        if event.aggregate_type == "run" && event.event_type == "RequirementSubmitted" {
            let run = submit_run(store, pipeline).await?;
            self.ids.insert(template_run, run.0);
            return Ok(run.0);
        }
        let run = RunId(
            *self
                .ids
                .get(&template_run)
                .context("an event of the run before its RequirementSubmitted")?,
        );
        match event.aggregate_type.as_str() {
            "run" => {
                let command = match event.event_type.as_str() {
                    "StageStarted" => {
                        let started: StageStarted = serde_json::from_value(payload())?;
                        RunCommand::StartStage {
                            stage: started.stage,
                            team: started.team,
                            objective_id: ObjectiveId(self.fresh(started.objective_id.0)),
                        }
                    }
                    "StageCompleted" => {
                        let completed: StageCompleted = serde_json::from_value(payload())?;
                        RunCommand::CompleteStage {
                            stage: completed.stage,
                            objective_id: ObjectiveId(self.fresh(completed.objective_id.0)),
                        }
                    }
                    "RunCompleted" => RunCommand::CompleteRun,
                    other => bail!("the replay has no command for a run's {other}"),
                };
                store.execute_run(run, command).await?;
                Ok(run.0)
            }
            "objective" => {
                let objective = ObjectiveId(self.fresh(event.aggregate_id.parse()?));
                let command = match event.event_type.as_str() {
                    "ObjectiveAssigned" => {
                        let assigned: ObjectiveAssigned = serde_json::from_value(payload())?;
                        ObjectiveCommand::AssignObjective {
                            objective_id: objective,
                            run_id: run,
                            stage: assigned.stage,
                            team: assigned.team,
                            instructions: assigned.instructions,
                            max_iterations: assigned.max_iterations,
                            claimed_by: None,
                        }
                    }
                    "ModelCalled" => {
                        ObjectiveCommand::RecordModelCall(serde_json::from_value(payload())?)
                    }
                    "TaskResultRecorded" => {
                        let recorded: TaskResultRecorded = serde_json::from_value(payload())?;
                        ObjectiveCommand::RecordTaskResult {
                            idempotency_key: recorded.idempotency_key,
                            result: recorded.result,
                        }
                    }
                    "ArtifactProduced" => {
                        ObjectiveCommand::ProduceArtifact(serde_json::from_value(payload())?)
                    }
                    "ObjectiveCompleted" => ObjectiveCommand::CompleteObjective,
                    other => bail!("the replay has no command for an objective's {other}"),
                };
                store.execute_objective(objective, run, command).await?;
                Ok(objective.0)
            }
            other => bail!("the replay has no commands for {other} events"),
        }
    }

    fn fresh(&mut self, template_id: Uuid) -> Uuid {
        *self.ids.entry(template_id).or_insert_with(Uuid::now_v7)
    }
}

#[cfg(test)]
mod tests {
    use super::{Message, ModelRequest, RUN_TAG, percentile, pieces, reference_figures, render, tagged_run};
    use uuid::Uuid;

    #[test]
    fn the_references_figures_are_read_from_its_lines_and_a_missing_one_is_an_error() {
        let output = "{\"figure\": \"stage_p50_ms\", \"value\": 4.1}\n{\"figure\": \"full_wall_ms_p50\", \"value\": 61.2}\n\n\
                      {\"figure\": \"stages_per_s\", \"value\": 180.5, \"runs\": 200}\n";
        let figures = reference_figures(output).unwrap();
        assert_eq!((figures.stage_overhead_p50_ms, figures.full_run_wall_ms_p50, figures.stages_per_s), (4.1, 61.2, 180.5));
        let missing = reference_figures("{\"figure\": \"stage_p50_ms\", \"value\": 4.1}\n").unwrap_err();
        assert!(missing.to_string().contains("stages_per_s"), "{missing}");
        let garbled = reference_figures("Traceback (most recent call last):\n").unwrap_err();
        assert!(garbled.to_string().contains("not a figure"), "{garbled}");
    }

    /// The reference's script stands in for by a shell script (the runner is the same).
    #[tokio::test]
    async fn a_reference_that_fails_mid_run_or_stops_short_is_an_error_that_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::from_sources(&[
            ("FACTORY_HOME".to_string(), dir.path().display().to_string()),
            ("FACTORY_DATABASE_ADMIN_URL".to_string(), "postgres://nobody@127.0.0.1:1/postgres".to_string()),
        ])
        .unwrap();
        let reference = |name: &str, body: &str| {
            let script = dir.path().join(name);
            std::fs::write(&script, body).unwrap();
            super::Reference { python: "/bin/sh".into(), script }
        };
        let first_figure = "echo '{\"figure\": \"stage_p50_ms\", \"value\": 4.1}'\n";
        let failing = reference("fails.sh", &format!("{first_figure}echo 'the checkpointer lost its connection' >&2\nexit 3\n"));
        let error = failing.run(&config, "scratch", super::Plan::new(true)).await.unwrap_err().to_string();
        assert!(error.contains("the reference failed") && error.contains('3'), "{error}");
        let short = reference("short.sh", first_figure);
        let error = short.run(&config, "scratch", super::Plan::new(true)).await.unwrap_err().to_string();
        assert!(error.contains("ended without printing"), "{error}");
    }

    #[test]
    fn the_run_is_found_in_the_objective_prompt() {
        let run = Uuid::now_v7();
        let request = |content: String| ModelRequest {
            alias: "factory/fast".into(),
            team: "documentation".into(),
            system: String::new(),
            messages: vec![Message::User { content }],
            tools: vec![],
            response_schema: None,
            spent_usd: 0.0,
        };
        let tagged = format!("# Requirement\nnotes per user {RUN_TAG}{run}]\n\n# Inputs");
        assert_eq!(tagged_run(&request(tagged)), Some(run));
        assert_eq!(tagged_run(&request("no tag here".into())), None);
        assert_eq!(tagged_run(&request(format!("{RUN_TAG}not-a-uuid]"))), None);
    }

    #[test]
    fn a_copy_of_a_template_event_replaces_every_id_and_nothing_else() {
        let run = Uuid::now_v7().to_string();
        let objective = Uuid::now_v7().to_string();
        let ids = vec![run.clone(), objective.clone()];
        let text = format!(
            r#"{{"run_id":"{run}","objective_id":"{objective}","note":"{objective} of {run}, not {}"}}"#,
            &run[..35]
        );
        let pieces = pieces(&text, &ids);
        assert_eq!(render(&pieces, &ids), text);
        let fresh = vec!["R".to_string(), "O".to_string()];
        assert_eq!(
            render(&pieces, &fresh),
            format!(
                r#"{{"run_id":"R","objective_id":"O","note":"O of R, not {}"}}"#,
                &run[..35]
            )
        );
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.50), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }
}
