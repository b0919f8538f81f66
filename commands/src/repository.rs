//! The event repository behind cqrs-es: postgres-es for reading (events, snapshots,
//! replay streams) and our own append.
//!
//! postgres-es appends with BEGIN, one INSERT per event, COMMIT: three round trips for the
//! usual single-event command. A single multi-row `INSERT ... SELECT FROM unnest(...)` is
//! one round trip and just as atomic (one statement is one transaction); the table's
//! triggers fill in position, hash and the rest either way, and a unique violation on
//! (aggregate_type, aggregate_id, sequence) is still the optimistic-concurrency conflict.
//! With snapshots, postgres-es's own path is used unchanged.

use cqrs_es::Aggregate;
use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlx::PgPool;

const APPEND: &str = "INSERT INTO events \
    (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
    SELECT $1, $2, e.sequence, e.event_type, e.event_version, e.payload, e.metadata \
      FROM unnest($3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::jsonb[]) \
           AS e(sequence, event_type, event_version, payload, metadata) \
     ORDER BY e.sequence";

pub struct EventRepository {
    pool: PgPool,
    reader: PostgresEventRepository,
}

impl EventRepository {
    pub fn new(pool: PgPool) -> Self {
        Self { reader: PostgresEventRepository::new(pool.clone()), pool }
    }

    async fn append<A: Aggregate>(&self, events: &[SerializedEvent]) -> Result<(), PersistenceError> {
        let Some(first) = events.first() else { return Ok(()) };
        let sequences: Vec<i64> = events.iter().map(|e| e.sequence as i64).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let versions: Vec<&str> = events.iter().map(|e| e.event_version.as_str()).collect();
        let payloads: Vec<Value> = events.iter().map(|e| e.payload.clone()).collect();
        let metadata: Vec<Value> = events.iter().map(|e| e.metadata.clone()).collect();
        sqlx::query(APPEND)
            .bind(A::TYPE)
            .bind(&first.aggregate_id)
            .bind(sequences)
            .bind(types)
            .bind(versions)
            .bind(payloads)
            .bind(metadata)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(persistence_error)
    }
}

fn persistence_error(error: sqlx::Error) -> PersistenceError {
    match &error {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            PersistenceError::OptimisticLockError
        }
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            PersistenceError::ConnectionError(Box::new(error))
        }
        _ => PersistenceError::UnknownError(Box::new(error)),
    }
}

impl PersistedEventRepository for EventRepository {
    async fn get_events<A: Aggregate>(&self, aggregate_id: &str) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.reader.get_events::<A>(aggregate_id).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.reader.get_last_events::<A>(aggregate_id, last_sequence).await
    }

    async fn get_snapshot<A: Aggregate>(&self, aggregate_id: &str) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        self.reader.get_snapshot::<A>(aggregate_id).await
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        match snapshot_update {
            None => self.append::<A>(events).await,
            Some(update) => self.reader.persist::<A>(events, Some(update)).await,
        }
    }

    async fn stream_events<A: Aggregate>(&self, aggregate_id: &str) -> Result<ReplayStream, PersistenceError> {
        self.reader.stream_events::<A>(aggregate_id).await
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        self.reader.stream_all_events::<A>().await
    }
}
