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
    /// Stale for longer than the grace as well: its row may go once a sweep found nothing
    /// more (see [`forget`]).
    pub expired: bool,
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

/// The highest event position drawn so far, and whether every transaction that drew a
/// position up to it has ended (the relay's safe horizon, `relay.rs`): then every event up
/// to it that will ever be stored is visible to a read made after this returns.
pub async fn settled_position(pool: &PgPool) -> Result<(i64, bool), sqlx::Error> {
    let (drawn, bound, xmin): (i64, i64, i64) =
        sqlx::query_as("SELECT last_position, bound, xmin FROM events_horizon()").fetch_one(pool).await?;
    if xmin >= bound {
        return Ok((drawn, true));
    }
    let oldest: i64 = sqlx::query_scalar("SELECT events_oldest_appender($1)").bind(bound).fetch_one(pool).await?;
    Ok((drawn, oldest >= bound))
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

/// `instance` has stopped: its row is stale at once (as if not renewed for `ttl`), for the
/// next sweep.
pub async fn withdraw(pool: &PgPool, instance: &str, ttl: Duration) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE worker_instances SET seen_at = least(seen_at, now() - make_interval(secs => $2)) WHERE instance = $1")
        .bind(instance)
        .bind(ttl.as_secs_f64())
        .execute(pool)
        .await?;
    Ok(())
}

/// The rows not renewed for longer than `ttl` (by the database's clock), oldest first;
/// `expired` when not renewed for longer than `ttl + grace`.
pub async fn stale(pool: &PgPool, ttl: Duration, grace: Duration) -> Result<Vec<Stale>, sqlx::Error> {
    let rows: Vec<(String, i64, bool)> = sqlx::query_as(
        "SELECT instance, since_position, seen_at < now() - make_interval(secs => $2) FROM worker_instances
          WHERE seen_at < now() - make_interval(secs => $1) ORDER BY seen_at",
    )
    .bind(ttl.as_secs_f64())
    .bind((ttl + grace).as_secs_f64())
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(instance, since_position, expired)| Stale { instance, since_position, expired }).collect())
}

/// Moves a stale row's `since_position` up to `position` (a sweep has queued its claims up
/// to there).
pub async fn advance(pool: &PgPool, instance: &str, position: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE worker_instances SET since_position = greatest(since_position, $2) WHERE instance = $1")
        .bind(instance)
        .bind(position)
        .execute(pool)
        .await?;
    Ok(())
}

/// The objectives assigned with a claim for `instance` at positions after `since_position`
/// that have not ended (no `ObjectiveCompleted` or `ObjectiveBlocked`), in position order.
pub async fn claimed_since(pool: &PgPool, instance: &str, since_position: i64) -> Result<Vec<Claimed>, sqlx::Error> {
    let rows: Vec<(String, Option<uuid::Uuid>, i64)> = sqlx::query_as(
        "SELECT a.aggregate_id, a.run_id, a.position FROM events a
          WHERE a.position > $1 AND a.event_type = 'ObjectiveAssigned' AND a.aggregate_type = 'objective'
            AND a.payload->'ObjectiveAssigned'->>'claimed_by' = $2
            AND NOT EXISTS (SELECT FROM events e
                             WHERE e.aggregate_type = 'objective' AND e.aggregate_id = a.aggregate_id
                               AND e.sequence > a.sequence
                               AND e.event_type IN ('ObjectiveCompleted', 'ObjectiveBlocked'))
          ORDER BY a.position",
    )
    .bind(since_position)
    .bind(instance)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(objective_id, run_id, position)| Claimed { objective_id, run_id, position }).collect())
}

/// Deletes `instance`'s row if it is still stale for longer than `ttl + grace` (a renewal
/// since the sweep read it keeps it). Whether it was deleted.
pub async fn forget(pool: &PgPool, instance: &str, ttl: Duration, grace: Duration) -> Result<bool, sqlx::Error> {
    let deleted = sqlx::query("DELETE FROM worker_instances WHERE instance = $1 AND seen_at < now() - make_interval(secs => $2)")
        .bind(instance)
        .bind((ttl + grace).as_secs_f64())
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected() > 0)
}
