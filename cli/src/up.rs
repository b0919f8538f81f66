//! `factory up` (every component in one process) and `factory relay` (the relay alone).

use crate::config::{Config, secret_file};
use crate::stack;
use anyhow::{Context, Result};
use factory_commands::relay::{Relay, RelayOptions};
use std::process::ExitCode;

pub fn run(config: Config) -> Result<ExitCode> {
    // One `up` per data dir: a second one would fight the first over its servers. The lock
    // is released by the kernel when this process ends, however it ends.
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data dir {}", config.data_dir.display()))?;
    let lock_path = config.data_file("up.lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "another `factory up` is already running on {}; stop it first (Ctrl-C) or set FACTORY_DATA_DIR",
            config.data_dir.display()
        );
    }
    let embedded = stack::start_embedded(&config)?;
    let runtime = crate::runtime()?;
    let result = runtime.block_on(serve(&config, &embedded));
    // Components stop first (their connections close), then the servers.
    drop(runtime);
    drop(embedded);
    drop(lock);
    result
}

fn relay_options(config: &Config) -> RelayOptions {
    RelayOptions {
        // One checkpoint per namespace, should stacks ever share a database.
        name: match &config.nats_namespace {
            Some(ns) => format!("relay-{ns}"),
            None => "relay".into(),
        },
        batch_size: config.relay_batch_size,
        poll_interval: config.relay_poll_interval,
        read_interval: config.relay_read_interval,
        ..RelayOptions::default()
    }
}

async fn serve(config: &Config, embedded: &stack::Embedded) -> Result<ExitCode> {
    stack::migrate(config).await?;
    let pool = stack::connect_db(config).await?;
    let nats = stack::connect_nats(config).await?;
    let js = async_nats::jetstream::new(nats.clone());
    let topology = config.topology();
    topology.ensure_streams(&js).await?;
    let admin_token = match &config.admin_token {
        Some(_) => None,
        None => Some(secret_file(&config.data_file("admin-token"), || stack::random_secret(40))?),
    };

    let store = std::sync::Arc::new(factory_commands::Store::new(
        pool.clone(),
        std::sync::Arc::new(factory_domain::SystemServices),
    ));
    let relay = Relay::new(pool.clone(), js.clone(), topology.clone(), relay_options(config))
        .with_wake(store.committed());
    let metrics = std::sync::Arc::new(factory_gateway::Metrics {
        relay: relay.progress(),
        store: Some(store.clone()),
    });
    let relay = tokio::spawn(relay.run());
    let router = model_router(config, &pool)?;
    let banner = models_banner(&router);
    let worker = worker(config, store.clone(), js.clone(), topology.clone(), vec![], router);
    // The objectives it starts for this process's worker are handed over in memory.
    let orchestrator = tokio::spawn(
        factory_teams::orchestrator::Orchestrator::new(store.clone(), js.clone(), topology.clone())
            .with_local_work(worker.local_work())
            .run(),
    );
    let projections = crate::projections::spawn_runners(&pool, &js, &topology, &factory_projections::Projection::ALL);
    let stopping = worker.clone();
    let worker = tokio::spawn(worker.run());

    let app = factory_gateway::router(factory_gateway::Health::new(pool.clone(), nats, metrics));
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} (FACTORY_HTTP_ADDR)", config.http_addr))?;
    println!("The Factory is up at http://{}", config.http_addr);
    if let Some(pg) = &embedded.postgres {
        println!("  PostgreSQL  127.0.0.1:{} (embedded, data in {})", pg.port(), pg.data_dir().display());
    }
    if let Some(nats) = &embedded.nats {
        println!("  NATS        {} (embedded, JetStream)", nats.url());
    }
    match admin_token {
        Some(token) => println!("  admin token {token}  (kept in {})", config.data_file("admin-token").display()),
        None => println!("  admin token from FACTORY_ADMIN_TOKEN"),
    }
    println!("  models      {banner}");
    println!("Ctrl-C stops it.");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the HTTP server failed")?;
    relay.abort();
    orchestrator.abort();
    worker.abort();
    projections.iter().for_each(|p| p.abort());
    // Its work in flight is dropped: the presence taken back, the next sweep of another
    // process (or of the next `up`) queues that work without waiting 15 s.
    stopping.withdraw().await;
    pool.close().await;
    println!("stopped");
    Ok(ExitCode::SUCCESS)
}

pub async fn relay_only(config: &Config) -> Result<ExitCode> {
    let pool = stack::connect_db(config).await?;
    let nats = stack::connect_nats(config).await?;
    let relay = Relay::new(pool, async_nats::jetstream::new(nats), config.topology(), relay_options(config));
    tokio::select! {
        _ = relay.run() => {}
        _ = shutdown_signal() => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// Which providers answer: the banner `up` and `worker` print.
fn models_banner(router: &factory_models::Router) -> String {
    let configured = router.providers().configured();
    match (router.is_demo(), configured.is_empty()) {
        (true, true) => "DEMO MODE: no model provider configured; the scripted provider answers every alias".into(),
        (true, false) => format!(
            "DEMO MODE (demo = true): the scripted provider answers; configured but unused: {}",
            configured.join(", ")
        ),
        (false, true) => "NO PROVIDER: demo = false but no model provider is configured; every model call will fail".into(),
        (false, false) => format!("providers {}; `factory models show` prints the routing", configured.join(", ")),
    }
}

/// The model router of this process, with the run-time routing table followed.
fn model_router(config: &Config, pool: &sqlx::PgPool) -> Result<std::sync::Arc<factory_models::Router>> {
    let router = std::sync::Arc::new(factory_models::Router::new(
        config.models.clone(),
        config.providers.clone(),
        std::sync::Arc::new(factory_teams::scripted::ScriptedProvider::new()),
    )?);
    for (alias, chain) in &config.models.chains {
        if !router.is_demo() && !chain.iter().any(|t| router.available(t)) && alias != "local/embed" {
            tracing::warn!(%alias, "no target of this alias has a configured provider: its calls will fail");
        }
    }
    tokio::spawn(factory_models::overrides::follow(pool.clone(), router.clone()));
    Ok(router)
}

fn worker(
    config: &Config,
    store: std::sync::Arc<factory_commands::Store>,
    js: async_nats::jetstream::Context,
    topology: factory_nats::Topology,
    teams: Vec<String>,
    router: std::sync::Arc<factory_models::Router>,
) -> factory_teams::worker::Worker {
    let teams = if teams.is_empty() {
        factory_teams::TEAM_IDS.iter().map(|t| t.to_string()).collect()
    } else {
        teams
    };
    factory_teams::worker::Worker::new(store, js, topology, router, worker_options(config, teams, config.scratch()))
}

/// A worker's options as configured: its teams, where it keeps workspaces, its slots per team.
pub(crate) fn worker_options(
    config: &Config,
    teams: Vec<String>,
    work_dir: factory_teams::tools::Scratch,
) -> factory_teams::worker::WorkerOptions {
    let mut options = factory_teams::worker::WorkerOptions::new(teams, work_dir);
    options.concurrency = config.worker_concurrency;
    options
}

pub async fn worker_only(config: &Config, teams: Vec<String>) -> Result<ExitCode> {
    if let Some(unknown) = teams.iter().find(|t| !factory_teams::TEAM_IDS.contains(&t.as_str())) {
        anyhow::bail!("unknown team `{unknown}`; teams are: {}", factory_teams::TEAM_IDS.join(", "));
    }
    let pool = stack::connect_db(config).await?;
    let nats = stack::connect_nats(config).await?;
    let js = async_nats::jetstream::new(nats);
    let topology = config.topology();
    topology.ensure_streams(&js).await?;
    let router = model_router(config, &pool)?;
    let store = std::sync::Arc::new(factory_commands::Store::new(pool, std::sync::Arc::new(factory_domain::SystemServices)));
    eprintln!("{}", models_banner(&router));
    let worker = worker(config, store, js, topology, teams, router);
    tokio::select! {
        _ = worker.clone().run() => {}
        _ = shutdown_signal() => {}
    }
    // Its open claims are the others' at their next sweep (a `worker` alone claims none, but
    // its presence goes at once).
    worker.withdraw().await;
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail on Unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
