//! The live projection runner: one durable JetStream consumer per projection on
//! `FACTORY_EVENTS`. A delivered batch says how far the store has been relayed; the runner
//! folds every event from its checkpoint up to there, read from the store in position order,
//! in one transaction with the new checkpoint, then acknowledges the batch. An event at or
//! below the checkpoint (a redelivery, or one a rebuild already folded in) is never applied
//! again, and none is skipped, whatever order JetStream redelivers in.
//!
//! An event the projection cannot apply stops it: the checkpoint row names the event and the
//! error (`/readyz` and `/metrics` show it), and the message is left unacknowledged. A
//! database or stream outage is retried.

use crate::{Projection, ProjectionError};
use async_nats::jetstream::{self, AckKind, consumer::pull};
use factory_nats::{EventEnvelope, Topology};
use futures::StreamExt;
use sqlx::{PgConnection, PgPool};
use std::time::Duration;

/// Events applied per transaction, at most.
const BATCH: usize = 500;

pub struct ProjectionRunner {
    pool: PgPool,
    js: jetstream::Context,
    topology: Topology,
    projection: Projection,
}

/// The advisory lock a projection's writers hold while they write its tables (the live runner
/// per batch, a rebuild while it swaps), so that the two never interleave.
pub(crate) fn lock_key(projection: Projection) -> i64 {
    // A fixed prefix keeps clear of the relay's lock.
    0x5052_4f4a_0000_0000 + projection as i64
}

pub(crate) async fn lock(db: &mut PgConnection, projection: Projection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(lock_key(projection)).execute(db).await?;
    Ok(())
}

/// The checkpoint, locked for this transaction (a row is made on first use).
pub(crate) async fn checkpoint(db: &mut PgConnection, projection: Projection) -> Result<i64, sqlx::Error> {
    sqlx::query("INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
        .bind(projection.name())
        .execute(&mut *db)
        .await?;
    sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = $1 FOR UPDATE")
        .bind(projection.name())
        .fetch_one(&mut *db)
        .await
}

pub(crate) async fn set_checkpoint(db: &mut PgConnection, projection: Projection, position: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_checkpoints SET position = $2, updated_at = now(), failed_position = NULL, error = NULL
         WHERE name = $1",
    )
    .bind(projection.name())
    .bind(position)
    .execute(db)
    .await?;
    Ok(())
}

/// Applies `events` (in position order) in one transaction with the checkpoint; returns how
/// many were new. Events at or below the checkpoint are skipped.
pub async fn apply_batch(pool: &PgPool, projection: Projection, events: &[EventEnvelope]) -> Result<usize, ProjectionError> {
    let mut tx = pool.begin().await?;
    lock(&mut tx, projection).await?;
    let mut position = checkpoint(&mut tx, projection).await?;
    let mut applied = 0;
    for event in events {
        if event.position <= position {
            continue;
        }
        projection.apply(&mut tx, event).await?;
        position = event.position;
        applied += 1;
    }
    if applied > 0 {
        set_checkpoint(&mut tx, projection, position).await?;
    }
    tx.commit().await?;
    Ok(applied)
}

/// Brings the projection up to `up_to` from the event store, in one transaction with the
/// checkpoint: every event in `(checkpoint, up_to]`, in position order. The live runner calls
/// it with the highest position a delivered batch names; reading the store rather than the
/// batch keeps the fold exact even when JetStream redelivers an older batch after a newer one
/// (a crashed runner's batch comes back after `ack_wait`). Everything at or below a relayed
/// event's position is settled, so nothing can appear below the checkpoint later.
pub async fn catch_up(pool: &PgPool, projection: Projection, up_to: i64) -> Result<usize, ProjectionError> {
    let mut tx = pool.begin().await?;
    lock(&mut tx, projection).await?;
    let mut position = checkpoint(&mut tx, projection).await?;
    let start = position;
    let mut applied = 0;
    while position < up_to {
        let events = factory_commands::events::range(&mut *tx, position, up_to, 5_000).await?;
        for event in &events {
            projection.apply(&mut tx, event).await?;
        }
        applied += events.len();
        position = match events.last() {
            Some(last) if events.len() == 5_000 => last.position,
            _ => up_to,
        };
    }
    if position > start {
        set_checkpoint(&mut tx, projection, position).await?;
    }
    tx.commit().await?;
    Ok(applied)
}

/// Records that the projection stopped on an event.
async fn record_failure(pool: &PgPool, projection: Projection, position: i64, error: &str) -> Result<(), sqlx::Error> {
    // The failed transaction may have been the one to create the row.
    sqlx::query(
        "INSERT INTO projection_checkpoints (name, failed_position, error) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE SET failed_position = $2, error = $3, updated_at = now()",
    )
        .bind(projection.name())
        .bind(position)
        .bind(error)
        .execute(pool)
        .await?;
    Ok(())
}

impl ProjectionRunner {
    pub fn new(pool: PgPool, js: jetstream::Context, topology: Topology, projection: Projection) -> Self {
        Self { pool, js, topology, projection }
    }

    pub fn consumer_name(&self) -> String {
        format!("projection-{}", self.projection.name())
    }

    /// Runs until dropped, or until an event cannot be applied (returned, and recorded).
    pub async fn run(self) -> ProjectionError {
        loop {
            match self.consume().await {
                Err(error @ ProjectionError::Apply { .. }) => {
                    tracing::error!(projection = self.projection.name(), %error, "projection stopped");
                    return error;
                }
                Err(error) => {
                    tracing::warn!(projection = self.projection.name(), %error, "projection interrupted; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(()) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn consume(&self) -> Result<(), ProjectionError> {
        let stream_err = |e: &dyn std::fmt::Display| ProjectionError::Stream(e.to_string());
        let stream = self.js.get_stream(&self.topology.events_stream).await.map_err(|e| stream_err(&e))?;
        let name = self.consumer_name();
        let consumer = stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: self.topology.all_events_filter(),
                    ack_policy: jetstream::consumer::AckPolicy::All,
                    // A runner that dies leaves its batch unacknowledged; its successor gets it
                    // after this long (and skips what the checkpoint already covers).
                    ack_wait: Duration::from_secs(5),
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| stream_err(&e))?;
        let mut batches = consumer.messages().await.map_err(|e| stream_err(&e))?.ready_chunks(BATCH);
        while let Some(batch) = batches.next().await {
            let mut messages = Vec::with_capacity(batch.len());
            for message in batch {
                messages.push(message.map_err(|e| stream_err(&e))?);
            }
            let mut events = Vec::with_capacity(messages.len());
            for message in &messages {
                match serde_json::from_slice::<EventEnvelope>(&message.payload) {
                    Ok(event) => events.push(event),
                    Err(error) => {
                        let error = format!("message {} is not an event envelope: {error}", message.subject);
                        record_failure(&self.pool, self.projection, -1, &error).await?;
                        return Err(ProjectionError::Apply {
                            projection: self.projection.name(),
                            position: -1,
                            event_type: "?".into(),
                            problem: error,
                        });
                    }
                }
            }
            let up_to = events.iter().map(|e| e.position).max().unwrap_or(0);
            match catch_up(&self.pool, self.projection, up_to).await {
                Ok(_) => {
                    // AckPolicy::All: acknowledging the last acknowledges the batch.
                    if let Some(last) = messages.last() {
                        last.ack().await.map_err(|e| stream_err(&e))?;
                    }
                }
                Err(error @ ProjectionError::Apply { position, .. }) => {
                    record_failure(&self.pool, self.projection, position, &error.to_string()).await?;
                    return Err(error);
                }
                Err(error) => {
                    for message in &messages {
                        let _ = message.ack_with(AckKind::Nak(Some(Duration::from_millis(500)))).await;
                    }
                    return Err(error);
                }
            }
        }
        Ok(())
    }
}
