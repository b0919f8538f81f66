//! Reaching PostgreSQL and NATS: the ones the configuration names, or the embedded ones
//! (started by `up`, found by the other verbs through the data dir).

use crate::config::{Config, secret_file};
use anyhow::{Context, Result, bail};
use factory_embedded::{EmbeddedNats, EmbeddedPostgres, NatsOptions, PostgresOptions, Venv};
use rand::Rng;
use secrecy::ExposeSecret;
use sqlx::PgPool;

/// The application role's password for the embedded PostgreSQL.
const APP_PASSWORD_FILE: &str = "pg-factory-password";
const SUPERUSER_PASSWORD_FILE: &str = "pg-superuser-password";
const DATABASE: &str = "factory";

pub fn random_secret(len: usize) -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// The embedded servers `up` runs, stopped when dropped.
pub struct Embedded {
    pub postgres: Option<EmbeddedPostgres>,
    pub nats: Option<EmbeddedNats>,
}

/// Starts whichever servers the configuration does not point elsewhere.
pub fn start_embedded(config: &Config) -> Result<Embedded> {
    let venv = Venv::new(config.venv());
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data dir {}", config.data_dir.display()))?;
    let nats = if config.nats_url.is_none() {
        Some(EmbeddedNats::start(NatsOptions {
            binary: venv.nats_server()?,
            store_dir: config.data_file("nats"),
            port: config.embedded_nats_port,
            pid_file: config.data_file("nats.pid"),
            log_file: config.data_file("nats.log"),
        })?)
    } else {
        None
    };
    let postgres = if config.database_url.is_none() {
        Some(EmbeddedPostgres::start(PostgresOptions {
            bin_dir: venv.pg_bin_dir()?,
            data_dir: config.data_file("pg"),
            port: config.embedded_pg_port,
            superuser_password_file: config.data_file(SUPERUSER_PASSWORD_FILE),
            extra_settings: vec![],
            log_file: config.data_file("pg.log"),
        })?)
    } else {
        None
    };
    Ok(Embedded { postgres, nats })
}

fn embedded_password(config: &Config, file: &str) -> Result<String> {
    let path = config.data_file(file);
    std::fs::read_to_string(&path).map(|s| s.trim().to_string()).with_context(|| {
        format!(
            "no embedded PostgreSQL credentials at {}: start the stack with `./factory up` \
             (or set FACTORY_DATABASE_URL)",
            path.display()
        )
    })
}

/// The URL the application connects with (role `factory`).
pub fn app_database_url(config: &Config) -> Result<String> {
    if let Some(url) = &config.database_url {
        return Ok(url.expose_secret().to_string());
    }
    let password = embedded_password(config, APP_PASSWORD_FILE)?;
    Ok(format!(
        "postgres://factory:{password}@127.0.0.1:{}/{DATABASE}",
        config.embedded_pg_port
    ))
}

/// The URL migrations run with: an owner of the schema.
pub fn admin_database_url(config: &Config, database: &str) -> Result<String> {
    if let Some(url) = &config.database_admin_url {
        return Ok(url.expose_secret().to_string());
    }
    if let Some(url) = &config.database_url {
        return Ok(url.expose_secret().to_string());
    }
    let password = embedded_password(config, SUPERUSER_PASSWORD_FILE)?;
    Ok(format!(
        "postgres://postgres:{password}@127.0.0.1:{}/{database}",
        config.embedded_pg_port
    ))
}

pub fn nats_url(config: &Config) -> String {
    config
        .nats_url
        .clone()
        .unwrap_or_else(|| format!("nats://127.0.0.1:{}", config.embedded_nats_port))
}

fn not_running_hint(config: &Config) -> &'static str {
    if config.database_url.is_none() || config.nats_url.is_none() {
        "is the stack running? Start it with `./factory up`"
    } else {
        "check the configured URL"
    }
}

pub async fn connect_db(config: &Config) -> Result<PgPool> {
    let url = app_database_url(config)?;
    factory_commands::connect(&url, config.db_max_connections)
        .await
        .with_context(|| not_running_hint(config))
}

/// A pool as the migration role (an owner of the tables), for rebuilds.
pub async fn connect_admin(config: &Config) -> Result<PgPool> {
    factory_commands::connect(&admin_database_url(config, DATABASE)?, 4)
        .await
        .with_context(|| not_running_hint(config))
}

pub async fn connect_nats(config: &Config) -> Result<async_nats::Client> {
    let url = nats_url(config);
    async_nats::ConnectOptions::new()
        .name("factory")
        .connection_timeout(std::time::Duration::from_secs(5))
        .connect(&url)
        .await
        .with_context(|| format!("cannot connect to NATS at {url}; {}", not_running_hint(config)))
}

/// Creates the database and the application role on the embedded server (first start),
/// then applies migrations. With external URLs, only migrates.
pub async fn migrate(config: &Config) -> Result<()> {
    if config.database_url.is_none() {
        let server = factory_commands::connect(&admin_database_url(config, "postgres")?, 2)
            .await
            .with_context(|| not_running_hint(config))?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)")
            .bind(DATABASE)
            .fetch_one(&server)
            .await?;
        if !exists {
            sqlx::query(&format!("CREATE DATABASE {DATABASE}")).execute(&server).await?;
        }
        server.close().await;
    }
    let admin = factory_commands::connect(&admin_database_url(config, DATABASE)?, 2)
        .await
        .with_context(|| not_running_hint(config))?;
    factory_commands::migrate(&admin).await?;
    if config.database_url.is_none() {
        // The migration creates the role without a password; the embedded stack gives it
        // one (kept in the data dir, mode 600) so that it can log in over TCP.
        let password = secret_file(&config.data_file(APP_PASSWORD_FILE), || random_secret(32))?;
        if !password.chars().all(|c| c.is_ascii_alphanumeric()) {
            bail!("{} must hold an alphanumeric password", APP_PASSWORD_FILE);
        }
        sqlx::query(&format!("ALTER ROLE factory LOGIN PASSWORD '{password}'"))
            .execute(&admin)
            .await?;
    }
    admin.close().await;
    Ok(())
}
