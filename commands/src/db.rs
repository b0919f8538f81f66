//! Connecting to PostgreSQL and applying `migrations/`.

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("the database URL is not valid")]
    BadUrl(#[source] sqlx::Error),
    #[error("cannot connect to PostgreSQL at {target}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("applying migrations failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// The migrations in `migrations/`, compiled into the binary so that it can migrate a
/// database from anywhere.
pub fn migrator() -> Migrator {
    let files: [(i64, &str, &str); 11] = [
        (1, "event store", include_str!("../../migrations/0001_event_store.sql")),
        (2, "artifacts", include_str!("../../migrations/0002_artifacts.sql")),
        (3, "model routing", include_str!("../../migrations/0003_model_routing.sql")),
        (4, "read models", include_str!("../../migrations/0004_read_models.sql")),
        (5, "run provenance", include_str!("../../migrations/0005_run_provenance.sql")),
        (6, "appender horizon", include_str!("../../migrations/0006_appender_horizon.sql")),
        (7, "inline payloads", include_str!("../../migrations/0007_inline_payloads.sql")),
        (8, "statement wake", include_str!("../../migrations/0008_statement_wake.sql")),
        (9, "worker claims", include_str!("../../migrations/0009_worker_claims.sql")),
        (10, "uncompressed contents", include_str!("../../migrations/0010_uncompressed_contents.sql")),
        (11, "payload text", include_str!("../../migrations/0011_payload_text.sql")),
    ];
    Migrator {
        migrations: Cow::Owned(
            files
                .into_iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect(),
        ),
        ..Migrator::DEFAULT
    }
}

/// Where a URL points, without its password, for messages.
pub fn describe(url: &str) -> String {
    match PgConnectOptions::from_str(url) {
        Ok(o) => format!(
            "{}:{}/{} as {}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or("postgres"),
            o.get_username()
        ),
        Err(_) => "<invalid URL>".into(),
    }
}

/// A pool with `max_connections`, failing fast when the server is not there.
///
/// Connections are not pinged before each use (sqlx's `test_before_acquire`): that is a
/// round trip before every statement, a tenth of the time of a short one. A connection
/// that died meanwhile fails its statement instead, and every caller retries a failed
/// statement (commands are retried or their events redelivered); sqlx drops the connection.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options = PgConnectOptions::from_str(url).map_err(DbError::BadUrl)?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|source| DbError::Connect { target: describe(url), source })
}

/// Applies every migration not yet applied. Needs a role that owns the schema.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    migrator().run(pool).await.map_err(DbError::Migrate)
}
