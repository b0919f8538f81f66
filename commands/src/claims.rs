//! Worker processes that claim objectives (migration 0009): where each one's open claims
//! begin, and which ones have stopped renewing. The handoff that makes the claims, and the
//! sweep that reads this, are in `factory-teams` (`handoff`, `worker`).

use sqlx::PgPool;
use std::time::Duration;

/// A worker process that has stopped renewing its row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    pub instance: String,
    /// Its claims at positions after this may still be open.
    pub since_position: i64,
}

/// An objective assigned with a claim (from its `ObjectiveAssigned` event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub objective_id: String,
    pub run_id: Option<uuid::Uuid>,
    pub position: i64,
}

/// The highest event position drawn so far: every position drawn from now on is above it.
pub async fn last_position(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT last_position FROM events_horizon()").fetch_one(pool).await
}

/// Renews `instance`'s row (made on its first renewal). Its `since_position` only moves
/// forward.
pub async fn renew(pool: &PgPool, instance: &str, since_position: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO worker_instances (instance, since_position, seen_at) VALUES ($1, $2, now())
         ON CONFLICT (instance) DO UPDATE
            SET since_position = greatest(worker_instances.since_position, EXCLUDED.since_position),
                seen_at = now()",
    )
    .bind(instance)
    .bind(since_position)
    .execute(pool)
    .await?;
    Ok(())
}

/// `instance` has stopped: its row is stale at once, for the next sweep.
pub async fn withdraw(pool: &PgPool, instance: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE worker_instances SET seen_at = '-infinity' WHERE instance = $1")
        .bind(instance)
        .execute(pool)
        .await?;
    Ok(())
}

/// The rows not renewed for longer than `ttl` (by the database's clock), oldest first.
pub async fn stale(pool: &PgPool, ttl: Duration) -> Result<Vec<Stale>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT instance, since_position FROM worker_instances
          WHERE seen_at < now() - make_interval(secs => $1) ORDER BY seen_at",
    )
    .bind(ttl.as_secs_f64())
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(instance, since_position)| Stale { instance, since_position }).collect())
}

/// The objectives assigned with a claim for `instance` at positions after `since_position`,
/// in position order.
pub async fn claimed_since(pool: &PgPool, instance: &str, since_position: i64) -> Result<Vec<Claimed>, sqlx::Error> {
    let rows: Vec<(String, Option<uuid::Uuid>, i64)> = sqlx::query_as(
        "SELECT aggregate_id, run_id, position FROM events
          WHERE position > $1 AND event_type = 'ObjectiveAssigned' AND aggregate_type = 'objective'
            AND payload->'ObjectiveAssigned'->>'claimed_by' = $2
          ORDER BY position",
    )
    .bind(since_position)
    .bind(instance)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(objective_id, run_id, position)| Claimed { objective_id, run_id, position }).collect())
}

/// Deletes `instance`'s row if it is still stale (a renewal since the sweep read it keeps
/// it). Whether it was deleted.
pub async fn forget(pool: &PgPool, instance: &str, ttl: Duration) -> Result<bool, sqlx::Error> {
    let deleted = sqlx::query("DELETE FROM worker_instances WHERE instance = $1 AND seen_at < now() - make_interval(secs => $2)")
        .bind(instance)
        .bind(ttl.as_secs_f64())
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected() > 0)
}
