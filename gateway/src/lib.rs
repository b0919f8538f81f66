//! The Factory's HTTP surface. For now: `/healthz`, `/readyz` and `/metrics`; GraphQL and
//! the dashboard join here later.
//!
//! Depends on sqlx and async-nats only to probe readiness; the numbers `/metrics` shows come
//! in through [`Metrics`], filled by the components that own them.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Figures exported on `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// The relay's progress (last position acknowledged by JetStream).
    pub relay: Arc<factory_commands::relay::RelayProgress>,
}

#[derive(Clone)]
pub struct Health {
    pool: PgPool,
    nats: async_nats::Client,
    metrics: Arc<Metrics>,
}

impl Health {
    pub fn new(pool: PgPool, nats: async_nats::Client, metrics: Arc<Metrics>) -> Self {
        Self { pool, nats, metrics }
    }
}

pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

#[derive(serde::Serialize)]
struct Readiness {
    ready: bool,
    postgres: String,
    nats: String,
    migrations: String,
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    let postgres = match tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i64>("SELECT coalesce(max(version), 0) FROM _sqlx_migrations WHERE success")
            .fetch_one(&h.pool),
    )
    .await
    {
        Ok(Ok(version)) => Ok(version),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_string()),
    };
    let nats = match h.nats.connection_state() {
        async_nats::connection::State::Connected => Ok(()),
        other => Err(format!("{other:?}").to_lowercase()),
    };
    let (pg_text, migrations) = match &postgres {
        Ok(version) => ("ok".to_string(), format!("applied up to {version}")),
        Err(e) => (format!("unreachable: {e}"), "unknown".to_string()),
    };
    let ready = postgres.as_ref().map(|v| *v > 0).unwrap_or(false) && nats.is_ok();
    let body = Readiness {
        ready,
        postgres: pg_text,
        nats: nats.err().unwrap_or_else(|| "ok".into()),
        migrations,
    };
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body))
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    let published = h.metrics.relay.published.load(Ordering::Relaxed);
    let stored: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events")
        .fetch_one(&h.pool)
        .await
        .unwrap_or(-1);
    let text = format!(
        "# HELP factory_events_stored_position Highest position in the event store.\n\
         # TYPE factory_events_stored_position gauge\n\
         factory_events_stored_position {stored}\n\
         # HELP factory_relay_published_position Last position acknowledged by JetStream.\n\
         # TYPE factory_relay_published_position gauge\n\
         factory_relay_published_position {published}\n"
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
