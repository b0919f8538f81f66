//! Executing commands: cqrs-es with the postgres-es repository, optimistic concurrency
//! retried from fresh state, and an in-process signal that events were committed.

use cqrs_es::{Aggregate, AggregateError, CqrsFramework};
use cqrs_es::persist::{EventUpcaster, PersistedEventStore, SerializedEvent};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{AggregateContext, EventStore};
use factory_domain::{
    Objective, ObjectiveCommand, ObjectiveError, ObjectiveId, Run, RunCommand, RunError, RunId,
    SharedServices,
};
use crate::repository::EventRepository;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

type Framework<A> = CqrsFramework<A, PersistedEventStore<EventRepository, A>>;

fn framework<A: Aggregate>(pool: &PgPool, services: A::Services) -> Framework<A> {
    CqrsFramework::new(event_store(pool), vec![], services)
}

fn event_store<A: Aggregate>(pool: &PgPool) -> PersistedEventStore<EventRepository, A> {
    PersistedEventStore::new_event_store(EventRepository::new(pool.clone()))
        .with_upcasters(vec![Box::new(Upcaster)])
}

/// cqrs-es's hook onto `factory_domain::upcast`: aggregates load older events at the current
/// version of their type. cqrs-es keeps payloads tagged (`{"EventType": {..}}`).
struct Upcaster;

impl EventUpcaster for Upcaster {
    fn can_upcast(&self, _event_type: &str, _event_version: &str) -> bool {
        // Asked without the aggregate type; `upcast` below decides, and leaves current events alone.
        true
    }

    fn upcast(&self, mut event: SerializedEvent) -> SerializedEvent {
        let Some(inner) = event.payload.get_mut(&event.event_type) else { return event };
        match factory_domain::upcast::upcast(&event.aggregate_type, &event.event_type, &event.event_version, inner) {
            Ok(version) => event.event_version = version.to_string(),
            // Left as stored: deserialising it then fails with the event named, which is the
            // error a reader should see.
            Err(error) => tracing::error!(%error, aggregate_id = %event.aggregate_id, sequence = event.sequence, "cannot upcast event"),
        }
        event
    }
}

/// How often a command that lost an optimistic-concurrency race is retried from fresh state
/// before the conflict is reported.
const MAX_ATTEMPTS: u32 = 32;

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The aggregate refused the command; nothing was written.
    #[error(transparent)]
    Refused(E),
    /// Other writers kept winning the race for this aggregate.
    #[error("the command lost {MAX_ATTEMPTS} concurrent-write races in a row; try again")]
    Conflict,
    #[error("the event store failed")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The write side: one cqrs-es framework per aggregate over one pool.
pub struct Store {
    pool: PgPool,
    runs: Framework<Run>,
    objectives: Framework<Objective>,
    /// For several commands in one commit (cqrs-es's framework takes one at a time).
    objective_events: PersistedEventStore<EventRepository, Objective>,
    services: SharedServices,
    committed: Arc<Notify>,
}

impl Store {
    pub fn new(pool: PgPool, services: SharedServices) -> Self {
        Self {
            runs: framework(&pool, services.clone()),
            objectives: framework(&pool, services.clone()),
            objective_events: event_store(&pool),
            services,
            pool,
            committed: Arc::new(Notify::new()),
        }
    }

    /// A run as its events say it is now (the default state when it does not exist).
    pub async fn load_run(&self, run_id: RunId) -> Result<Run, CommandError<RunError>> {
        load::<Run>(&self.pool, &run_id.to_string()).await
    }

    /// An objective as its events say it is now.
    pub async fn load_objective(&self, objective_id: ObjectiveId) -> Result<Objective, CommandError<ObjectiveError>> {
        load::<Objective>(&self.pool, &objective_id.to_string()).await
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Signalled after every command that committed events, so an in-process relay can
    /// publish at once instead of waiting for NOTIFY.
    pub fn committed(&self) -> Arc<Notify> {
        self.committed.clone()
    }

    pub async fn execute_run(
        &self,
        run_id: RunId,
        command: RunCommand,
    ) -> Result<(), CommandError<RunError>> {
        self.execute(&self.runs, &run_id.to_string(), run_id, command).await
    }

    pub async fn execute_objective(
        &self,
        objective_id: ObjectiveId,
        run_id: RunId,
        command: ObjectiveCommand,
    ) -> Result<(), CommandError<ObjectiveError>> {
        self.execute(&self.objectives, &objective_id.to_string(), run_id, command).await
    }

    /// Several commands on one objective, handled in order on one load of it and written in
    /// one append (one statement, so one transaction): all their events or none. A refusal of
    /// any refuses the lot. A worker records a finished objective's artifacts, result and end
    /// this way: one round trip pair instead of one per command.
    pub async fn execute_objective_all(
        &self,
        objective_id: ObjectiveId,
        run_id: RunId,
        commands: Vec<ObjectiveCommand>,
    ) -> Result<(), CommandError<ObjectiveError>> {
        let aggregate_id = objective_id.to_string();
        let metadata = HashMap::from([("run_id".to_string(), run_id.to_string())]);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = async {
                let mut context = self.objective_events.load_aggregate(&aggregate_id).await?;
                let sink = EventSink::default();
                for command in commands.iter().cloned() {
                    context.aggregate().handle(command, &self.services, &sink).await.map_err(AggregateError::UserError)?;
                }
                self.objective_events.commit(sink.collect().await, context, metadata.clone()).await
            }
            .await;
            match outcome {
                Ok(_) => {
                    self.committed.notify_one();
                    return Ok(());
                }
                Err(AggregateError::UserError(e)) => return Err(CommandError::Refused(e)),
                Err(AggregateError::AggregateConflict) if attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(conflict_backoff(attempt)).await;
                }
                Err(AggregateError::AggregateConflict) => return Err(CommandError::Conflict),
                Err(
                    AggregateError::DatabaseConnectionError(e)
                    | AggregateError::DeserializationError(e)
                    | AggregateError::UnexpectedError(e),
                ) => return Err(CommandError::Store(e)),
            }
        }
    }

    async fn execute<A>(
        &self,
        framework: &Framework<A>,
        aggregate_id: &str,
        run_id: RunId,
        command: A::Command,
    ) -> Result<(), CommandError<A::Error>>
    where
        A: Aggregate,
        A::Command: Clone,
        A::Error: 'static,
    {
        let metadata = HashMap::from([("run_id".to_string(), run_id.to_string())]);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match framework
                .execute_with_metadata(aggregate_id, command.clone(), metadata.clone())
                .await
            {
                Ok(()) => {
                    // `notify_one` keeps a permit when the relay is busy, so no wake-up is lost.
                    self.committed.notify_one();
                    return Ok(());
                }
                Err(AggregateError::UserError(e)) => return Err(CommandError::Refused(e)),
                Err(AggregateError::AggregateConflict) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(aggregate_id, attempt, "concurrent write; retrying from fresh state");
                    tokio::time::sleep(conflict_backoff(attempt)).await;
                }
                Err(AggregateError::AggregateConflict) => return Err(CommandError::Conflict),
                Err(
                    AggregateError::DatabaseConnectionError(e)
                    | AggregateError::DeserializationError(e)
                    | AggregateError::UnexpectedError(e),
                ) => return Err(CommandError::Store(e)),
            }
        }
    }
}

async fn load<A: Aggregate>(pool: &PgPool, aggregate_id: &str) -> Result<A, CommandError<A::Error>>
where
    A::Error: 'static,
{
    let store: PersistedEventStore<EventRepository, A> = event_store(pool);
    let mut context = store.load_aggregate(aggregate_id).await.map_err(|e| match e {
        AggregateError::DatabaseConnectionError(e)
        | AggregateError::DeserializationError(e)
        | AggregateError::UnexpectedError(e) => CommandError::Store(e),
        AggregateError::AggregateConflict => CommandError::Conflict,
        AggregateError::UserError(e) => CommandError::Refused(e),
    })?;
    Ok(std::mem::take(context.aggregate()))
}

/// Short, growing, jittered pauses: the winner's commit takes a millisecond or two.
fn conflict_backoff(attempt: u32) -> Duration {
    let base_us = 200u64 << attempt.min(6);
    Duration::from_micros(base_us / 2 + rand_below(base_us))
}

fn rand_below(n: u64) -> u64 {
    // A cheap jitter source; uniformity does not matter here.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    nanos % n.max(1)
}
