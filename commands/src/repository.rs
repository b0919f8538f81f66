//! The event repository behind cqrs-es: postgres-es, with our upcasting. The store loads
//! aggregates through it; it appends with its own statement (`store::Changes::commit`: one
//! multi-row `INSERT ... SELECT FROM unnest(...)` for any number of aggregates, one round
//! trip, as atomic as postgres-es's BEGIN, INSERT per event, COMMIT). `persist` is
//! postgres-es's own, for anything that commits through cqrs-es directly.

use cqrs_es::Aggregate;
use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlx::PgPool;

pub struct EventRepository {
    reader: PostgresEventRepository,
}

impl EventRepository {
    pub fn new(pool: PgPool) -> Self {
        Self { reader: PostgresEventRepository::new(pool) }
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
        self.reader.persist::<A>(events, snapshot_update).await
    }

    async fn stream_events<A: Aggregate>(&self, aggregate_id: &str) -> Result<ReplayStream, PersistenceError> {
        self.reader.stream_events::<A>(aggregate_id).await
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        self.reader.stream_all_events::<A>().await
    }
}
