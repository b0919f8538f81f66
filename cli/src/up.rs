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

    let relay = Relay::new(pool.clone(), js, topology, relay_options(config));
    let metrics = std::sync::Arc::new(factory_gateway::Metrics {
        relay: relay.progress(),
    });
    let relay = tokio::spawn(relay.run());

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
    println!("Ctrl-C stops it.");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the HTTP server failed")?;
    relay.abort();
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

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail on Unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
