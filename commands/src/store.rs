//! Executing commands: cqrs-es with the postgres-es repository, optimistic concurrency
//! retried from fresh state, and an in-process signal that events were committed (a wake-up
//! for the relay, and the committed events themselves for in-process consumers: the
//! orchestrator's fast path, see [`Committed`]).

use cqrs_es::{Aggregate, AggregateError, DomainEvent};
use cqrs_es::persist::{EventUpcaster, PersistedEventStore, SerializedEvent};
use cqrs_es::event_sink::EventSink;
use cqrs_es::EventStore;
use factory_domain::{
    Objective, ObjectiveCommand, ObjectiveError, ObjectiveId, Run, RunCommand, RunError, RunId,
    SharedServices,
};
use crate::group_commit::{Append, GroupCommit};
use crate::repository::EventRepository;
use sqlx::PgPool;
use futures::future::BoxFuture;
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
        Ok(self.load(aggregate_id).await?.0)
    }

    /// The aggregate read from the store (all its events folded), then remembered.
    async fn load(&self, aggregate_id: &str) -> Result<(A, usize), CommandError<A::Error>>
    where
        A::Error: 'static,
    {
        let context = self.events.load_aggregate(aggregate_id).await.map_err(store_error)?;
        self.remember(aggregate_id, (context.aggregate.clone(), context.current_sequence));
        Ok((context.aggregate, context.current_sequence))
    }

    /// Forgets the remembered state unless it is newer than `sequence`.
    fn forget_unless_newer(&self, aggregate_id: &str, sequence: usize) {
        let mut cache = self.cache.lock().expect("not poisoned");
        if cache.get(aggregate_id).is_some_and(|(_, remembered)| *remembered <= sequence) {
            cache.remove(aggregate_id);
        }
    }

    /// Remembers a state, unless a newer one is remembered already (a slower load or commit
    /// finishing after a later one).
    fn remember(&self, aggregate_id: &str, state: (A, usize)) {
        let mut cache = self.cache.lock().expect("not poisoned");
        if cache.get(aggregate_id).is_some_and(|(_, remembered)| *remembered > state.1) {
            return;
        }
        if cache.len() >= CACHED_AGGREGATES && !cache.contains_key(aggregate_id) {
            cache.clear();
        }
        cache.insert(aggregate_id.to_string(), state);
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
    /// The payload's JSON text as stored: cqrs-es's tagged form, `{"<event_type>": {...}}`.
    /// Parsed only by a consumer that wants it ([`Committed::payload`]): most events a
    /// process commits are wanted by nobody in it.
    pub stored_payload: String,
}

impl Committed {
    /// The event's own fields (the inner object, as in an `EventEnvelope`).
    pub fn payload(&self) -> Result<serde_json::Value, serde_json::Error> {
        Ok(crate::events::untag(&self.event_type, serde_json::from_str(&self.stored_payload)?))
    }
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
    contents: std::sync::Mutex<Contents>,
    group: Arc<GroupCommit>,
}

/// Artifact contents this process stored or read, by digest: content-addressed, so never
/// stale. Bounded in bytes; past the bound it starts over (it only saves reads).
#[derive(Default)]
struct Contents {
    by_sha: HashMap<String, Arc<Vec<u8>>>,
    bytes: usize,
}

/// Artifact bytes a process keeps at most.
const CACHED_CONTENT_BYTES: usize = 64 << 20;

impl Contents {
    fn keep(&mut self, sha256: &str, content: Arc<Vec<u8>>) {
        if content.len() > CACHED_CONTENT_BYTES / 4 || self.by_sha.contains_key(sha256) {
            return;
        }
        if self.bytes + content.len() > CACHED_CONTENT_BYTES {
            self.by_sha.clear();
            self.bytes = 0;
        }
        self.bytes += content.len();
        self.by_sha.insert(sha256.to_string(), content);
    }
}

impl Store {
    pub fn new(pool: PgPool, services: SharedServices) -> Self {
        Self {
            runs: Writer::new(&pool),
            objectives: Writer::new(&pool),
            group: GroupCommit::new(pool.clone()),
            services,
            pool,
            committed: Arc::new(Notify::new()),
            local: tokio::sync::broadcast::channel(COMMITTED_BUFFER).0,
            contents: std::sync::Mutex::default(),
        }
    }

    /// Stored artifact contents by sha256 (digests not stored are left out): from memory
    /// when this process stored or read them before, the rest in one query.
    pub async fn artifact_contents(&self, shas: &[&str]) -> Result<HashMap<String, Arc<Vec<u8>>>, sqlx::Error> {
        let mut found = HashMap::with_capacity(shas.len());
        let mut missing = Vec::new();
        {
            let contents = self.contents.lock().expect("not poisoned");
            for sha in shas {
                match contents.by_sha.get(*sha) {
                    Some(content) => {
                        found.insert(sha.to_string(), content.clone());
                    }
                    None => missing.push(*sha),
                }
            }
        }
        if !missing.is_empty() {
            let rows: Vec<(String, Vec<u8>)> = sqlx::query_as("SELECT sha256, content FROM artifacts WHERE sha256 = ANY($1)")
                .bind(&missing)
                .fetch_all(&self.pool)
                .await?;
            let mut contents = self.contents.lock().expect("not poisoned");
            for (sha, content) in rows {
                let content = Arc::new(content);
                contents.keep(&sha, content.clone());
                found.insert(sha, content);
            }
        }
        Ok(found)
    }

    /// How many append statements this store sent, and how many were shared and refused
    /// (see [`crate::group_commit`]).
    pub fn group_commit_stats(&self) -> crate::group_commit::GroupCommitStats {
        self.group.stats()
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

    /// A run as this process last committed or read it, if it remembers it (no read: it may
    /// be behind the store).
    pub fn remembered_run(&self, run_id: RunId) -> Option<Run> {
        self.runs.cached(&run_id.to_string()).map(|(state, _)| state)
    }

    /// Asks `f` about the run as this process remembers it (see [`Store::remembered_run`]),
    /// without copying it; `None` when it does not remember the run.
    pub fn with_remembered_run<T>(&self, run_id: RunId, f: impl FnOnce(&Run) -> T) -> Option<T> {
        self.runs.cache.lock().expect("not poisoned").get(&run_id.to_string()).map(|(state, _)| f(state))
    }

    /// An objective as this process last committed or read it (see [`Store::remembered_run`]).
    pub fn remembered_objective(&self, objective_id: ObjectiveId) -> Option<Objective> {
        self.objectives.cached(&objective_id.to_string()).map(|(state, _)| state)
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
        self.execute(|changes, command| Box::pin(changes.execute_run(run_id, command)), vec![command], Vec::new()).await
    }

    pub async fn execute_objective(
        &self,
        objective_id: ObjectiveId,
        run_id: RunId,
        command: ObjectiveCommand,
    ) -> Result<(), CommandError<ObjectiveError>> {
        self.execute_objective_all(objective_id, run_id, vec![command]).await
    }

    /// Several commands on one objective, handled in order on one load of it and written in
    /// one append (one statement, so one transaction): all their events or none. A refusal of
    /// any refuses the lot.
    pub async fn execute_objective_all(
        &self,
        objective_id: ObjectiveId,
        run_id: RunId,
        commands: Vec<ObjectiveCommand>,
    ) -> Result<(), CommandError<ObjectiveError>> {
        self.record_objective(objective_id, run_id, commands, Vec::new()).await
    }

    /// As [`Store::execute_objective_all`], with artifact contents stored in the same
    /// statement: a worker records a finished objective's contents, artifacts, result and
    /// end in one commit.
    pub async fn record_objective(
        &self,
        objective_id: ObjectiveId,
        run_id: RunId,
        commands: Vec<ObjectiveCommand>,
        artifacts: Vec<ArtifactContent>,
    ) -> Result<(), CommandError<ObjectiveError>> {
        self.execute(
            |changes, command| Box::pin(changes.execute_objective(objective_id, run_id, command)),
            commands,
            artifacts,
        )
        .await
    }

    /// Commands on one aggregate, all or none, retried from fresh state when another writer
    /// got there first. A refusal on remembered state is asked again on fresh state.
    async fn execute<'s, C: Clone, E: std::error::Error + 'static>(
        &'s self,
        handle: impl for<'c> Fn(&'c mut Changes<'s>, C) -> BoxFuture<'c, Result<(), CommandError<E>>>,
        commands: Vec<C>,
        artifacts: Vec<ArtifactContent>,
    ) -> Result<(), CommandError<E>> {
        let mut attempt = 0;
        let mut fresh = false;
        loop {
            attempt += 1;
            let mut changes = if fresh { self.changes().fresh() } else { self.changes() };
            let mut refused = None;
            for command in commands.iter().cloned() {
                match handle(&mut changes, command).await {
                    Ok(()) => {}
                    Err(CommandError::Refused(e)) => {
                        refused = Some(e);
                        break;
                    }
                    Err(other) => return Err(other),
                }
            }
            if let Some(e) = refused {
                if !fresh && !changes.all_fresh() {
                    // Perhaps refused on what another process has since changed: ask again on fresh state.
                    fresh = true;
                    continue;
                }
                return Err(CommandError::Refused(e));
            }
            changes.store_artifacts(artifacts.clone());
            match changes.commit().await {
                Ok(()) => return Ok(()),
                Err(CommitError::Conflict) if self.pause_after_conflict(attempt).await => {
                    tracing::debug!(attempt, "concurrent write; retrying from fresh state");
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// A unit of work: commands on any aggregates, handled in order on their current state
    /// and committed together by [`Changes::commit`].
    pub fn changes(&self) -> Changes<'_> {
        Changes {
            store: self,
            runs: Vec::new(),
            objectives: Vec::new(),
            order: Vec::new(),
            artifacts: Vec::new(),
            use_cache: true,
        }
    }

    /// A unit of work that starts from what a unit not yet committed writes (`staged`, see
    /// [`Changes::staged`]): its aggregates as that unit leaves them, the rest as for
    /// [`Store::changes`]. To be committed only after that unit has: before, its events
    /// would have no predecessors in the store (refused); and if that unit's commit was
    /// refused, it must be dropped.
    pub fn changes_after(&self, staged: &Staged) -> Changes<'_> {
        fn entries<A: Aggregate + Clone>(later: &HashMap<String, Later<A>>) -> Vec<Entry<A>> {
            later
                .iter()
                .map(|(id, later)| Entry {
                    id: id.clone(),
                    run_id: later.run_id,
                    state: later.state.clone(),
                    base: later.sequence,
                    staged: Vec::new(),
                    fresh: false,
                })
                .collect()
        }
        Changes { runs: entries(&staged.runs), objectives: entries(&staged.objectives), ..self.changes() }
    }

    /// After a [`CommitError::Conflict`] on the `attempt`th try: waits (from the second
    /// conflict on) a short, growing, jittered pause and says whether to try again (false
    /// past the limit).
    pub async fn pause_after_conflict(&self, attempt: u32) -> bool {
        if attempt >= MAX_ATTEMPTS {
            return false;
        }
        let pause = conflict_backoff(attempt);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        true
    }
}

/// An artifact's content, stored (once per digest) with the events that name it.
#[derive(Debug, Clone)]
pub struct ArtifactContent {
    pub sha256: String,
    pub content: Vec<u8>,
}

/// What a unit of work writes once committed ([`Changes::staged`]), by aggregate id and
/// by digest.
#[derive(Debug, Default, Clone)]
pub struct Staged {
    pub runs: HashMap<String, Later<Run>>,
    pub objectives: HashMap<String, Later<Objective>>,
    pub contents: HashMap<String, Arc<Vec<u8>>>,
}

/// An aggregate as a unit leaves it once committed.
#[derive(Debug, Clone)]
pub struct Later<A> {
    pub state: A,
    /// Its last event's sequence then.
    sequence: usize,
    run_id: RunId,
}

/// Why a unit of work was not committed. Nothing of it was written.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Another writer appended to one of its aggregates first: handle the commands again on
    /// fresh state (a new [`Changes`]).
    #[error("another writer changed one of the aggregates first")]
    Conflict,
    #[error("the event store failed")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl<E: std::error::Error + 'static> From<CommitError> for CommandError<E> {
    fn from(error: CommitError) -> Self {
        match error {
            CommitError::Conflict => CommandError::Conflict,
            CommitError::Store(e) => CommandError::Store(e),
        }
    }
}

/// One aggregate in a unit of work: its state (with the staged events applied), the
/// sequence it was at, and the staged events.
struct Entry<A: Aggregate> {
    id: String,
    run_id: RunId,
    state: A,
    base: usize,
    staged: Vec<StagedEvent>,
    /// Read from the store by this unit, not taken from what the process remembers.
    fresh: bool,
}

/// Which aggregate an event staged in a unit of work belongs to, in the order staged.
#[derive(Clone, Copy)]
enum Slot {
    Run(usize),
    Objective(usize),
}

/// A unit of work (see [`Store::changes`]): commands on several aggregates (a run and the
/// objectives it starts, say), each handled on its aggregate's state as the earlier ones
/// left it, all their events appended in the order staged by one statement on
/// [`Changes::commit`]: one transaction, one commit, all or none. Dropped uncommitted, it
/// writes nothing.
///
/// State comes from what the process remembers when it can (no read): a unit staged on
/// stale state meets a conflict at commit, and a refusal on remembered state is asked again
/// on fresh state. Where a decision writes nothing, ask with the sequence the caller knows
/// ([`Changes::run_at_least`]).
pub struct Changes<'s> {
    store: &'s Store,
    runs: Vec<Entry<Run>>,
    objectives: Vec<Entry<Objective>>,
    order: Vec<Slot>,
    artifacts: Vec<ArtifactContent>,
    use_cache: bool,
}

impl<'s> Changes<'s> {
    /// Every aggregate read from the store, none from what the process remembers.
    pub fn fresh(mut self) -> Self {
        self.use_cache = false;
        self
    }

    fn all_fresh(&self) -> bool {
        self.runs.iter().all(|e| e.fresh) && self.objectives.iter().all(|e| e.fresh)
    }

    /// The run as this unit has it (its staged events applied).
    pub async fn run(&mut self, run_id: RunId) -> Result<&Run, CommandError<RunError>> {
        self.run_at_least(run_id, 0).await
    }

    /// The run, at least at `sequence` (an event of it the caller has seen): remembered
    /// state older than that is read afresh.
    pub async fn run_at_least(&mut self, run_id: RunId, sequence: usize) -> Result<&Run, CommandError<RunError>> {
        let i = entry(&mut self.runs, &self.store.runs, &run_id.to_string(), run_id, self.use_cache, sequence).await?;
        Ok(&self.runs[i].state)
    }

    /// The objective, at least at `sequence` (see [`Changes::run_at_least`]).
    pub async fn objective_at_least(
        &mut self,
        objective_id: ObjectiveId,
        run_id: RunId,
        sequence: usize,
    ) -> Result<&Objective, CommandError<ObjectiveError>> {
        let i = entry(&mut self.objectives, &self.store.objectives, &objective_id.to_string(), run_id, self.use_cache, sequence).await?;
        Ok(&self.objectives[i].state)
    }

    /// Says that `objective_id` was just drawn, so no event of it exists: it is staged
    /// without a read. (Were it wrong, the commit would meet a conflict.)
    pub fn new_objective(&mut self, objective_id: ObjectiveId, run_id: RunId) {
        let id = objective_id.to_string();
        if !self.objectives.iter().any(|e| e.id == id) {
            self.objectives.push(Entry { id, run_id, state: Objective::default(), base: 0, staged: Vec::new(), fresh: true });
        }
    }

    pub async fn execute_run(&mut self, run_id: RunId, command: RunCommand) -> Result<(), CommandError<RunError>> {
        let services = self.store.services.clone();
        let i = entry(&mut self.runs, &self.store.runs, &run_id.to_string(), run_id, self.use_cache, 0).await?;
        let staged = handle(&mut self.runs[i], &self.store.runs, command, &services).await?;
        self.order.extend(std::iter::repeat_n(Slot::Run(i), staged));
        Ok(())
    }

    pub async fn execute_objective(
        &mut self,
        objective_id: ObjectiveId,
        run_id: RunId,
        command: ObjectiveCommand,
    ) -> Result<(), CommandError<ObjectiveError>> {
        let services = self.store.services.clone();
        let i = entry(&mut self.objectives, &self.store.objectives, &objective_id.to_string(), run_id, self.use_cache, 0).await?;
        let staged = handle(&mut self.objectives[i], &self.store.objectives, command, &services).await?;
        self.order.extend(std::iter::repeat_n(Slot::Objective(i), staged));
        Ok(())
    }

    /// Artifact contents to store in the same statement (a digest already stored is left).
    pub fn store_artifacts(&mut self, artifacts: Vec<ArtifactContent>) {
        self.artifacts.extend(artifacts);
        // In one order, once each: two units storing the same contents in opposite orders
        // would otherwise deadlock on the digests' unique index.
        self.artifacts.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        self.artifacts.dedup_by(|a, b| a.sha256 == b.sha256);
    }

    /// What this unit writes once committed: the state of each aggregate it changes, its
    /// staged events applied, and the artifact contents it stores. For work started while
    /// its commit is in flight (teams' `handoff`, "Work started ahead of its commit" in
    /// docs/architecture.md): none of it is in the store, nor remembered, until the commit
    /// succeeds, and none of it ever is if the commit fails.
    pub fn staged(&self) -> Staged {
        fn later<A: Aggregate + Clone>(entries: &[Entry<A>]) -> HashMap<String, Later<A>> {
            entries
                .iter()
                .filter(|e| !e.staged.is_empty())
                .map(|e| (e.id.clone(), Later { state: e.state.clone(), sequence: e.base + e.staged.len(), run_id: e.run_id }))
                .collect()
        }
        Staged {
            runs: later(&self.runs),
            objectives: later(&self.objectives),
            contents: self.artifacts.iter().map(|a| (a.sha256.clone(), Arc::new(a.content.clone()))).collect(),
        }
    }

    /// Whether other units of this store are being appended, or queued to be, right now.
    pub fn others_appending(&self) -> bool {
        self.store.group.is_busy()
    }

    /// Whether anything is staged.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty() && self.artifacts.is_empty()
    }

    /// Appends every staged event, in the order staged, and the artifact contents, in one
    /// statement. Then the process remembers the aggregates' new state, the relay is woken
    /// and in-process consumers are told (see [`Committed`]).
    pub async fn commit(mut self) -> Result<(), CommitError> {
        if self.is_empty() {
            return Ok(());
        }
        let mut rows = Rows::default();
        let (mut next_run, mut next_objective) = (vec![0; self.runs.len()], vec![0; self.objectives.len()]);
        for slot in &self.order {
            match *slot {
                Slot::Run(i) => rows.push(&mut self.runs[i], &mut next_run[i]),
                Slot::Objective(i) => rows.push(&mut self.objectives[i], &mut next_objective[i]),
            }
        }
        let store = self.store;
        match store.group.append(Append { rows, artifacts: self.artifacts }).await {
            Ok(Append { rows, artifacts }) => {
                settle(&store.runs, &self.runs, true);
                settle(&store.objectives, &self.objectives, true);
                if !artifacts.is_empty() {
                    let mut contents = store.contents.lock().expect("not poisoned");
                    for artifact in artifacts {
                        contents.keep(&artifact.sha256, Arc::new(artifact.content));
                    }
                }
                // `notify_one` keeps a permit when the relay is busy, so no wake-up is lost.
                store.committed.notify_one();
                if store.local.receiver_count() > 0 {
                    for event in rows.into_committed() {
                        // No receiver left is fine: the stream carries every event anyway.
                        let _ = store.local.send(Arc::new(event));
                    }
                }
                Ok(())
            }
            Err(error) => {
                settle(&store.runs, &self.runs, false);
                settle(&store.objectives, &self.objectives, false);
                Err(error)
            }
        }
    }
}

/// The index of the aggregate's entry in the unit, read (from memory when allowed and at
/// least at `at_least`, else from the store) when not there yet.
async fn entry<A>(
    entries: &mut Vec<Entry<A>>,
    writer: &Writer<A>,
    id: &str,
    run_id: RunId,
    use_cache: bool,
    at_least: usize,
) -> Result<usize, CommandError<A::Error>>
where
    A: Aggregate + Clone,
    A::Error: 'static,
{
    if let Some(i) = entries.iter().position(|e| e.id == id) {
        return Ok(i);
    }
    let remembered = if use_cache { writer.cached(id).filter(|(_, sequence)| *sequence >= at_least) } else { None };
    let (state, base, fresh) = match remembered {
        Some((state, sequence)) => (state, sequence, false),
        None => {
            let (state, sequence) = writer.load(id).await?;
            (state, sequence, true)
        }
    };
    entries.push(Entry { id: id.to_string(), run_id, state, base, staged: Vec::new(), fresh });
    Ok(entries.len() - 1)
}

/// Handles one command on the entry's state, staging its events; returns how many. A
/// refusal on remembered state with nothing staged yet is asked again on fresh state.
async fn handle<A>(
    entry: &mut Entry<A>,
    writer: &Writer<A>,
    command: A::Command,
    services: &A::Services,
) -> Result<usize, CommandError<A::Error>>
where
    A: Aggregate + Clone,
    A::Command: Clone,
    A::Error: 'static,
{
    loop {
        let mut state = entry.state.clone();
        let sink = EventSink::default();
        match state.handle(command.clone(), services, &sink).await {
            Ok(()) => {
                let events = sink.collect().await;
                let mut staged = Vec::with_capacity(events.len());
                let mut cleaned = false;
                for event in &events {
                    let (event, clean) = StagedEvent::of(event).map_err(|e| CommandError::Store(Box::new(e)))?;
                    cleaned |= clean;
                    staged.push(event);
                }
                if cleaned {
                    // The state follows the text as stored, as a load from the store would.
                    state = entry.state.clone();
                    for event in &staged {
                        let event: A::Event = serde_json::from_str(&event.payload).map_err(|e| CommandError::Store(Box::new(e)))?;
                        state.apply(event);
                    }
                }
                let count = staged.len();
                entry.staged.extend(staged);
                entry.state = state;
                return Ok(count);
            }
            Err(_) if !entry.fresh && entry.staged.is_empty() => {
                let (state, sequence) = writer.load(&entry.id).await?;
                entry.state = state;
                entry.base = sequence;
                entry.fresh = true;
            }
            Err(e) => return Err(CommandError::Refused(e)),
        }
    }
}

/// After a commit (or its failure): the written aggregates' new state is remembered; after
/// a failure, the state the unit started from is forgotten, as perhaps stale, unless the
/// process has meanwhile remembered a newer one (the commit that won, made here), which the
/// next attempt then starts from without a read.
fn settle<A: Aggregate + Clone>(writer: &Writer<A>, entries: &[Entry<A>], committed: bool) {
    for entry in entries.iter().filter(|e| !e.staged.is_empty()) {
        if committed {
            writer.remember(&entry.id, (entry.state.clone(), entry.base + entry.staged.len()));
        } else {
            writer.forget_unless_newer(&entry.id, entry.base);
        }
    }
}

/// An event staged in a unit of work, as it is stored: its payload written once, when the
/// command is handled, and NUL-free.
struct StagedEvent {
    event_type: String,
    event_version: String,
    /// cqrs-es's tagged payload, JSON text written straight from the event (no
    /// `serde_json::Value` in between).
    payload: String,
}

impl StagedEvent {
    /// The event as stored, and whether a NUL of its text was replaced (see [`without_nul`]).
    fn of<E: DomainEvent>(event: &E) -> Result<(Self, bool), serde_json::Error> {
        let payload = serde_json::to_string(event)?;
        let (payload, cleaned) = match without_nul(&payload) {
            Some(clean) => (clean, true),
            None => (payload, false),
        };
        Ok((Self { event_type: event.event_type(), event_version: event.event_version(), payload }, cleaned))
    }
}

/// JSON text with every U+0000 in its strings (written `\u0000`) replaced by U+FFFD, or
/// `None` when it has none. PostgreSQL's `jsonb` (and `text`) cannot hold U+0000 and refuses
/// the whole statement; it can reach an event from a model's answer, a file a tool wrote, or
/// a requirement sent over HTTP. An escaped backslash (`\\`) is passed over, so the six
/// characters `\u0000` written as text are kept as they are.
fn without_nul(json: &str) -> Option<String> {
    const NUL: &str = "\\u0000";
    if !json.contains(NUL) {
        return None;
    }
    let mut out = String::with_capacity(json.len());
    let mut rest = json;
    let mut replaced = false;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let escape = &rest[at..];
        if escape.starts_with(NUL) {
            out.push('\u{FFFD}');
            replaced = true;
            rest = &escape[NUL.len()..];
        } else {
            // A backslash always starts a two-character escape (`\\`, `\"`, `\n`, ...,
            // or the `\u` of one with four hex digits, which are copied as they come).
            let end = escape.char_indices().nth(2).map_or(escape.len(), |(i, _)| i);
            out.push_str(&escape[..end]);
            rest = &escape[end..];
        }
    }
    out.push_str(rest);
    replaced.then_some(out)
}

/// The rows of one append, column by column.
#[derive(Default)]
pub(crate) struct Rows {
    pub aggregate_types: Vec<&'static str>,
    pub aggregate_ids: Vec<String>,
    pub sequences: Vec<i64>,
    pub event_types: Vec<String>,
    pub event_versions: Vec<String>,
    /// JSON text, written straight from the events (no `serde_json::Value` in between).
    pub payloads: Vec<String>,
    pub metadata: Vec<String>,
    pub run_ids: Vec<RunId>,
}

impl Rows {
    /// The entry's next staged event, as stored: cqrs-es's tagged payload, the run in the metadata.
    /// (Its text is moved out of the entry: only the count of its staged events is read
    /// after.)
    fn push<A: Aggregate>(&mut self, entry: &mut Entry<A>, next: &mut usize) {
        let event = &mut entry.staged[*next];
        *next += 1;
        self.aggregate_types.push(A::TYPE);
        self.aggregate_ids.push(entry.id.clone());
        self.sequences.push((entry.base + *next) as i64);
        self.event_types.push(std::mem::take(&mut event.event_type));
        self.event_versions.push(std::mem::take(&mut event.event_version));
        self.payloads.push(std::mem::take(&mut event.payload));
        self.metadata.push(metadata_text(entry.run_id));
        self.run_ids.push(entry.run_id);
    }

    pub(crate) fn len(&self) -> usize {
        self.sequences.len()
    }

    /// The in-memory form of the appended events (their payloads moved, not copied).
    fn into_committed(self) -> impl Iterator<Item = Committed> {
        let columns = self.aggregate_types.into_iter().zip(self.aggregate_ids).zip(self.sequences).zip(self.run_ids);
        columns.zip(self.event_types.into_iter().zip(self.payloads)).map(
            |((((aggregate_type, aggregate_id), sequence), run_id), (event_type, stored_payload))| Committed {
                aggregate_type: aggregate_type.to_string(),
                aggregate_id,
                sequence,
                run_id,
                event_type,
                stored_payload,
            },
        )
    }
}

/// An event's metadata as stored: the run it belongs to (the insert trigger reads `run_id`
/// from it). A UUID's text needs no escaping.
fn metadata_text(run_id: RunId) -> String {
    format!(r#"{{"run_id":"{run_id}"}}"#)
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

/// None after the first conflict, then short, growing, jittered pauses. The winner has
/// committed when a unit hears of the conflict (the database answers a unique violation
/// only once the other transaction has ended, and the group commit only once its statement
/// has), so the first retry can start at once; the pauses only spread out writers that keep
/// colliding.
fn conflict_backoff(attempt: u32) -> Duration {
    if attempt <= 1 {
        return Duration::ZERO;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_escapes_and_only_they_become_the_replacement_character() {
        let text = |value: &str| serde_json::to_string(&serde_json::json!({ "s": value })).unwrap();
        assert_eq!(without_nul(&text("plain")), None);
        // Written as text, the six characters are an escaped backslash and `u0000`: kept.
        assert_eq!(without_nul(&text("\\u0000")), None);
        assert_eq!(without_nul(&text("\\\\u0000")), None);
        for (value, expected) in [
            ("\u{0}", "\u{FFFD}"),
            ("a\u{0}b\u{0}", "a\u{FFFD}b\u{FFFD}"),
            ("\\\u{0}\"\n\u{1}é\u{0}", "\\\u{FFFD}\"\n\u{1}é\u{FFFD}"),
            ("\\u0000\u{0}", "\\u0000\u{FFFD}"),
        ] {
            let cleaned = without_nul(&text(value)).unwrap_or_else(|| panic!("{value:?} has a NUL"));
            let parsed: serde_json::Value = serde_json::from_str(&cleaned).unwrap();
            assert_eq!(parsed["s"], expected, "{value:?}");
        }
    }

    #[test]
    fn a_committed_events_payload_is_its_own_fields_untagged_from_the_stored_text() {
        let event = Committed {
            aggregate_type: "run".into(),
            aggregate_id: "r".into(),
            sequence: 2,
            run_id: RunId::new(),
            event_type: "StageStarted".into(),
            stored_payload: r#"{"StageStarted":{"stage":"ba","team":"business-analysis"}}"#.into(),
        };
        assert_eq!(event.payload().unwrap(), serde_json::json!({"stage": "ba", "team": "business-analysis"}));
        let broken = Committed { stored_payload: "{".into(), ..event };
        assert!(broken.payload().is_err());
    }

    #[test]
    fn metadata_is_written_as_the_trigger_reads_it() {
        let run = RunId::new();
        let metadata: serde_json::Value = serde_json::from_str(&metadata_text(run)).unwrap();
        assert_eq!(metadata, serde_json::json!({ "run_id": run.to_string() }));
    }
}
