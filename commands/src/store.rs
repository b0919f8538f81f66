//! Executing commands: cqrs-es with the postgres-es repository, optimistic concurrency
//! retried from fresh state, and an in-process signal that events were committed (a wake-up
//! for the relay, and the committed events themselves for in-process consumers: the
//! orchestrator's fast path, see [`Committed`]).

use cqrs_es::{Aggregate, AggregateError, DomainEvent};
use cqrs_es::persist::{EventStoreAggregateContext, EventUpcaster, PersistedEventStore, SerializedEvent};
use cqrs_es::event_sink::EventSink;
use cqrs_es::EventStore;
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

/// Aggregates kept per process at most; past it the cache starts over (it only saves loads).
const CACHED_AGGREGATES: usize = 20_000;

/// Writes one aggregate type: cqrs-es's event store, and the state this process left each
/// aggregate in after its last commit, so the next command on it skips the load. A state
/// made stale by another process costs one optimistic-concurrency conflict (or a refusal
/// double-checked on fresh state), then a fresh load: the store stays the judge.
struct Writer<A: Aggregate> {
    events: PersistedEventStore<EventRepository, A>,
    cache: std::sync::Mutex<HashMap<String, (A, usize)>>,
}

impl<A: Aggregate + Clone> Writer<A> {
    fn new(pool: &PgPool) -> Self {
        Self { events: event_store(pool), cache: std::sync::Mutex::new(HashMap::new()) }
    }

    fn cached(&self, aggregate_id: &str) -> Option<(A, usize)> {
        self.cache.lock().expect("not poisoned").get(aggregate_id).cloned()
    }

    /// The aggregate as its events say it is now: the remembered state when the store holds
    /// no later event of it (one index lookup), else a fresh load, then remembered.
    async fn current(&self, pool: &PgPool, aggregate_id: &str) -> Result<A, CommandError<A::Error>>
    where
        A::Error: 'static,
    {
        if let Some((state, sequence)) = self.cached(aggregate_id) {
            let latest: Option<i64> =
                sqlx::query_scalar("SELECT max(sequence) FROM events WHERE aggregate_type = $1 AND aggregate_id = $2")
                    .bind(A::TYPE)
                    .bind(aggregate_id)
                    .fetch_one(pool)
                    .await
                    .map_err(|e| CommandError::Store(Box::new(e)))?;
            if latest.unwrap_or(0) == sequence as i64 {
                return Ok(state);
            }
        }
        let context = self.events.load_aggregate(aggregate_id).await.map_err(store_error)?;
        let sequence = context.current_sequence;
        let state = context.aggregate;
        self.remember(aggregate_id, Some((state.clone(), sequence)));
        Ok(state)
    }

    fn remember(&self, aggregate_id: &str, state: Option<(A, usize)>) {
        let mut cache = self.cache.lock().expect("not poisoned");
        match state {
            Some(state) => {
                if cache.len() >= CACHED_AGGREGATES && !cache.contains_key(aggregate_id) {
                    cache.clear();
                }
                cache.insert(aggregate_id.to_string(), state);
            }
            None => {
                cache.remove(aggregate_id);
            }
        }
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

/// An event this process has just committed, told in memory to in-process consumers before
/// the relay has published it (DESIGN §4's fast path: a component told of a commit at once,
/// the broker still getting every event). Best effort by design: a receiver that falls
/// behind misses some and reads them from the stream as always; the stream stays the
/// delivery that counts. `(aggregate_id, sequence)` names the event as the stream's copy
/// does, so a consumer can tell the two apart.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub run_id: RunId,
    pub event_type: String,
    /// The event's own fields (the inner object, as in an `EventEnvelope`).
    pub payload: serde_json::Value,
}

/// Committed events buffered per in-process receiver before it starts missing some.
const COMMITTED_BUFFER: usize = 8_192;

/// The write side: cqrs-es's event store per aggregate type over one pool.
pub struct Store {
    pool: PgPool,
    runs: Writer<Run>,
    objectives: Writer<Objective>,
    services: SharedServices,
    committed: Arc<Notify>,
    local: tokio::sync::broadcast::Sender<Arc<Committed>>,
}

impl Store {
    pub fn new(pool: PgPool, services: SharedServices) -> Self {
        Self {
            runs: Writer::new(&pool),
            objectives: Writer::new(&pool),
            services,
            pool,
            committed: Arc::new(Notify::new()),
            local: tokio::sync::broadcast::channel(COMMITTED_BUFFER).0,
        }
    }

    /// Every event this store commits from now on, as soon as its transaction has committed
    /// (see [`Committed`]). A receiver that lags gets `Lagged` and goes on with newer ones.
    pub fn subscribe_committed(&self) -> tokio::sync::broadcast::Receiver<Arc<Committed>> {
        self.local.subscribe()
    }

    /// A run as its events say it is now (the default state when it does not exist).
    pub async fn load_run(&self, run_id: RunId) -> Result<Run, CommandError<RunError>> {
        self.runs.current(&self.pool, &run_id.to_string()).await
    }

    /// An objective as its events say it is now.
    pub async fn load_objective(&self, objective_id: ObjectiveId) -> Result<Objective, CommandError<ObjectiveError>> {
        self.objectives.current(&self.pool, &objective_id.to_string()).await
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Signalled after every command that committed events, so an in-process relay can
    /// publish at once instead of waiting for NOTIFY.
    pub fn committed(&self) -> Arc<Notify> {
        self.committed.clone()
    }

    /// Says that `objective_id` was just drawn, so no event of it exists: its first command
    /// skips the load. (Were it wrong, that command would meet a conflict and load.)
    pub fn expect_new_objective(&self, objective_id: ObjectiveId) {
        let id = objective_id.to_string();
        if self.objectives.cached(&id).is_none() {
            self.objectives.remember(&id, Some((Objective::default(), 0)));
        }
    }

    pub async fn execute_run(
        &self,
        run_id: RunId,
        command: RunCommand,
    ) -> Result<(), CommandError<RunError>> {
        self.execute(&self.runs, &run_id.to_string(), run_id, vec![command]).await
    }

    pub async fn execute_objective(
        &self,
        objective_id: ObjectiveId,
        run_id: RunId,
        command: ObjectiveCommand,
    ) -> Result<(), CommandError<ObjectiveError>> {
        self.execute(&self.objectives, &objective_id.to_string(), run_id, vec![command]).await
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
        self.execute(&self.objectives, &objective_id.to_string(), run_id, commands).await
    }

    /// Handles the commands in order on the aggregate's state and commits all their events
    /// in one append, retrying from fresh state when another writer got there first.
    async fn execute<A>(
        &self,
        writer: &Writer<A>,
        aggregate_id: &str,
        run_id: RunId,
        commands: Vec<A::Command>,
    ) -> Result<(), CommandError<A::Error>>
    where
        A: Aggregate<Services = SharedServices> + Clone,
        A::Command: Clone,
        A::Error: 'static,
    {
        let metadata = HashMap::from([("run_id".to_string(), run_id.to_string())]);
        let mut attempt = 0;
        // After a refusal on remembered state, the next attempt loads, whatever the cache says.
        let mut fresh = false;
        loop {
            attempt += 1;
            let cached = if fresh { None } else { writer.cached(aggregate_id) };
            let from_cache = cached.is_some();
            let mut context = match cached {
                Some((aggregate, current_sequence)) => EventStoreAggregateContext {
                    aggregate_id: aggregate_id.to_string(),
                    aggregate,
                    current_sequence,
                    current_snapshot: None,
                },
                None => writer.events.load_aggregate(aggregate_id).await.map_err(store_error)?,
            };
            let sink = EventSink::default();
            let mut refused = None;
            for command in commands.iter().cloned() {
                if let Err(e) = context.aggregate.handle(command, &self.services, &sink).await {
                    refused = Some(e);
                    break;
                }
            }
            if let Some(e) = refused {
                writer.remember(aggregate_id, None);
                if from_cache {
                    // Perhaps refused on what another process has since changed: ask again on fresh state.
                    fresh = true;
                    continue;
                }
                return Err(CommandError::Refused(e));
            }
            let events = sink.collect().await;
            let after = (context.aggregate.clone(), context.current_sequence + events.len());
            // Told in memory after the commit; built only while someone listens.
            let told: Vec<Committed> = if self.local.receiver_count() > 0 {
                committed::<A>(aggregate_id, run_id, context.current_sequence, &events)
            } else {
                Vec::new()
            };
            if events.is_empty() {
                // Accepted with nothing to record (a repeated idempotency key). Safe on
                // remembered state: what makes a command a no-op (a key already recorded)
                // never becomes untrue later.
                return Ok(());
            }
            match writer.events.commit(events, context, metadata.clone()).await {
                Ok(_) => {
                    writer.remember(aggregate_id, Some(after));
                    // `notify_one` keeps a permit when the relay is busy, so no wake-up is lost.
                    self.committed.notify_one();
                    for event in told {
                        // No receiver left is fine: the stream carries every event anyway.
                        let _ = self.local.send(Arc::new(event));
                    }
                    return Ok(());
                }
                Err(AggregateError::AggregateConflict) if attempt < MAX_ATTEMPTS => {
                    writer.remember(aggregate_id, None);
                    tracing::debug!(aggregate_id, attempt, "concurrent write; retrying from fresh state");
                    if !from_cache {
                        tokio::time::sleep(conflict_backoff(attempt)).await;
                    }
                }
                Err(error) => {
                    writer.remember(aggregate_id, None);
                    return Err(store_error(error));
                }
            }
        }
    }
}

/// The in-memory form of events about to be committed after `current_sequence`.
fn committed<A: Aggregate>(aggregate_id: &str, run_id: RunId, current_sequence: usize, events: &[A::Event]) -> Vec<Committed> {
    events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            let event_type = event.event_type();
            // cqrs-es tags payloads by event type; the envelope carries the inner object.
            let mut tagged = serde_json::to_value(event).unwrap_or_default();
            let payload = tagged.get_mut(&event_type).map(serde_json::Value::take).unwrap_or(tagged);
            Committed {
                aggregate_type: A::TYPE.to_string(),
                aggregate_id: aggregate_id.to_string(),
                sequence: (current_sequence + i + 1) as i64,
                run_id,
                event_type,
                payload,
            }
        })
        .collect()
}

fn store_error<E: std::error::Error + 'static>(e: AggregateError<E>) -> CommandError<E> {
    match e {
        AggregateError::DatabaseConnectionError(e)
        | AggregateError::DeserializationError(e)
        | AggregateError::UnexpectedError(e) => CommandError::Store(e),
        AggregateError::AggregateConflict => CommandError::Conflict,
        AggregateError::UserError(e) => CommandError::Refused(e),
    }
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
