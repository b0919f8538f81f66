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
#[derive(Default)]
pub struct Metrics {
    /// The relay's progress (last position acknowledged by JetStream).
    pub relay: Arc<factory_commands::relay::RelayProgress>,
    /// The process's store, for its append statements (group commit).
    pub store: Option<Arc<factory_commands::Store>>,
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
    /// Each read model's position, and the event it stopped on if it did.
    projections: Vec<ProjectionState>,
}

#[derive(serde::Serialize)]
struct ProjectionState {
    name: String,
    position: i64,
    lag_positions: i64,
    lag_seconds: f64,
    failed_position: Option<i64>,
    error: Option<String>,
}

/// Each projection's checkpoint and how far behind the store it is: in positions, and in
/// seconds since the oldest event it has not applied was recorded.
async fn projection_states(pool: &PgPool) -> Result<Vec<ProjectionState>, sqlx::Error> {
    type Row = (String, i64, i64, f64, Option<i64>, Option<String>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT c.name, c.position,
                greatest((SELECT coalesce(max(position), 0) FROM events) - c.position, 0) AS lag_positions,
                coalesce(extract(epoch FROM now() - (SELECT recorded_at FROM events e WHERE e.position > c.position
                                                     ORDER BY e.position LIMIT 1))::float8, 0) AS lag_seconds,
                c.failed_position, c.error
         FROM projection_checkpoints c ORDER BY c.name",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, position, lag_positions, lag_seconds, failed_position, error)| ProjectionState {
            name,
            position,
            lag_positions,
            lag_seconds,
            failed_position,
            error,
        })
        .collect())
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
    let projections = projection_states(&h.pool).await.unwrap_or_default();
    // A projection stopped on an event serves stale reads: not ready.
    let ready = postgres.as_ref().map(|v| *v > 0).unwrap_or(false)
        && nats.is_ok()
        && projections.iter().all(|p| p.error.is_none());
    let body = Readiness {
        ready,
        postgres: pg_text,
        nats: nats.err().unwrap_or_else(|| "ok".into()),
        migrations,
        projections,
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
    let mut text = format!(
        "# HELP factory_events_stored_position Highest position in the event store.\n\
         # TYPE factory_events_stored_position gauge\n\
         factory_events_stored_position {stored}\n\
         # HELP factory_relay_published_position Last position acknowledged by JetStream.\n\
         # TYPE factory_relay_published_position gauge\n\
         factory_relay_published_position {published}\n"
    );
    if let Some(store) = &h.metrics.store {
        let appends = store.group_commit_stats();
        text.push_str(&format!(
            "# HELP factory_append_statements_total Append statements sent by this process's store.\n\
             # TYPE factory_append_statements_total counter\n\
             factory_append_statements_total {}\n\
             # HELP factory_append_shared_statements_total Of those, statements shared by several units of work (group commit).\n\
             # TYPE factory_append_shared_statements_total counter\n\
             factory_append_shared_statements_total {}\n\
             # HELP factory_append_refused_shared_total Shared statements the database refused (split and tried again).\n\
             # TYPE factory_append_refused_shared_total counter\n\
             factory_append_refused_shared_total {}\n",
            appends.statements, appends.shared, appends.refused_shared
        ));
    }
    let projections = projection_states(&h.pool).await.unwrap_or_default();
    text.push_str(
        "# HELP factory_projection_position Last store position applied to the read model.\n\
         # TYPE factory_projection_position gauge\n",
    );
    for p in &projections {
        text.push_str(&format!("factory_projection_position{{projection=\"{}\"}} {}\n", p.name, p.position));
    }
    text.push_str(
        "# HELP factory_projection_lag_positions Store positions not yet applied.\n\
         # TYPE factory_projection_lag_positions gauge\n",
    );
    for p in &projections {
        text.push_str(&format!("factory_projection_lag_positions{{projection=\"{}\"}} {}\n", p.name, p.lag_positions));
    }
    text.push_str(
        "# HELP factory_projection_lag_seconds Age of the oldest event not yet applied.\n\
         # TYPE factory_projection_lag_seconds gauge\n",
    );
    for p in &projections {
        text.push_str(&format!("factory_projection_lag_seconds{{projection=\"{}\"}} {:.3}\n", p.name, p.lag_seconds));
    }
    text.push_str(
        "# HELP factory_projection_failed 1 when the projection stopped on an event it cannot apply.\n\
         # TYPE factory_projection_failed gauge\n",
    );
    for p in &projections {
        text.push_str(&format!("factory_projection_failed{{projection=\"{}\"}} {}\n", p.name, u8::from(p.error.is_some())));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
