//! `factory bench`: the write side's throughput, the relay's catch-up rate and lag, and the
//! whole pipeline (relay, orchestrator, workers) on the scripted provider.
//!
//! Every figure is one JSON object per line on stdout (contract §2); progress goes to
//! stderr through `tracing`. Targets are numbers in the unit of `value`; whether a target
//! is a floor or a ceiling follows from the figure (rates are floors, latencies ceilings),
//! and `met` says whether it held. Figures without a target of their own carry
//! `"target": null, "met": null`.
//!
//! Isolation: nothing touches the real event store or streams. Each suite runs in its own
//! scratch database `factory_bench_<pid>_<millis>` on the configured server, dropped at the
//! end even on error or Ctrl-C, and the relay and pipeline suites publish to namespaced
//! streams (`BENCH<pid>_FACTORY_EVENTS`, `BENCHPIPE<pid>_FACTORY_WORK`, ...) that are deleted
//! at the end. A scratch database per suite keeps each suite's figures the same whether it
//! runs alone or within `all`.

use crate::config::Config;
use crate::stack;
use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use factory_commands::Store;
use factory_commands::relay::{Relay, RelayOptions, RelayProgress};
use factory_domain::{ObjectiveId, RunCommand, RunId, SystemServices};
use factory_nats::Topology;
use futures::StreamExt;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::collections::HashMap;
use std::future::Future;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
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

/// The targets.
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
    let plan = Plan::new(args.quick);
    if matches!(args.which, Suite::Store | Suite::All) {
        store_suite(config, plan).await?;
    }
    if matches!(args.which, Suite::Relay | Suite::All) {
        relay_suite(config, plan).await?;
    }
    if matches!(args.which, Suite::Pipeline | Suite::All) {
        pipeline_suite(config, plan).await?;
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
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
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
async fn in_scratch_database<F, Fut>(config: &Config, bench: F) -> Result<()>
where
    F: FnOnce(PgPool) -> Fut,
    Fut: Future<Output = Result<()>>,
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
fn settle(outcome: Result<()>, cleanup: Result<()>) -> Result<()> {
    match (outcome, cleanup) {
        (Ok(()), cleanup) => cleanup,
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
        "CREATE TABLE bench_raw (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, payload jsonb NOT NULL)",
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

/// The baseline: one jsonb row per autocommitted statement, with a payload shaped and
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
            store
                .execute_run(
                    run_id,
                    RunCommand::StartStage {
                        stage: stage.clone(),
                        team: stage.clone(),
                        objective_id: ObjectiveId::new(),
                    },
                )
                .await?;
            store
                .execute_run(run_id, RunCommand::CompleteStage { stage })
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
        relay_figures(pool, publisher.clone(), reader, topology.clone(), plan)
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
    plan: Plan,
) -> Result<()> {
    let last_position = insert_backlog(&pool, plan.backlog_events).await?;
    let store = Arc::new(Store::new(pool.clone(), Arc::new(SystemServices)));
    let relay = Relay::new(
        pool.clone(),
        publisher,
        topology.clone(),
        RelayOptions {
            name: "bench".into(),
            ..RelayOptions::default()
        },
    )
    .with_wake(store.committed());
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
                    jsonb_build_object('BenchEvent', jsonb_build_object('n', g, 'pad', repeat('x', 200))), \
                    jsonb_build_object('run_id', $3::text) \
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

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.50), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }
}
