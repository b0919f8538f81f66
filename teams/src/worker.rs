//! Workers: pull objectives from `FACTORY_WORK`, let the team work them, record what
//! happened (model calls, artifacts, the TaskResult) and finish the objective.
//!
//! One durable pull consumer per team (`worker-<team>`), shared by every worker process that
//! serves the team; explicit ack after the result's commands committed; in-progress acks
//! while a model call runs long; after `max_deliver` attempts the objective is blocked. A
//! redelivered message cannot record a second result: the result's idempotency key is the
//! message's stream sequence.

use crate::catalog::{ObjectiveContext, team as team_docs};
use crate::handoff::{Ahead, Attempts, Handed, LocalWork, Outcome};
use crate::lanes::{Entered, Lanes, Lead, Waiting};
use crate::model::ModelProvider;
use crate::operative;
use crate::orchestrator::{Dispatch, WorkItem};
use crate::tools::{Scratch, ToolRegistry, Workspace, granted_tools};
use async_nats::jetstream::{self, AckKind, consumer::pull};
use factory_commands::claims;
use factory_commands::store::{ArtifactContent, Changes, CommitError};
use factory_commands::{CommandError, Store};
use factory_domain::objective::{ArtifactProduced, ObjectiveStatus};
use factory_domain::{Objective, ObjectiveCommand, ObjectiveError, ObjectiveId, Run, RunCommand, TaskStatus};
use factory_nats::Topology;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// How long a model call's record may wait for the work to end, to go into its final
/// commit (a call's record is otherwise its own commit). A crash within it loses the record
/// of at most this much of an attempt's calls; the attempt itself is redone.
const RECORD_GRACE: Duration = Duration::from_millis(100);

/// How often a working objective checks that its run is still running.
const CANCEL_CHECK: Duration = Duration::from_millis(500);

/// How often a worker renews its presence in the workers bucket (it expires after
/// `WORKER_PRESENCE_TTL`).
const PRESENCE_RENEWAL: Duration = Duration::from_secs(5);

/// How long a stopping worker waits for its presence to be taken back.
const WITHDRAW_WAIT: Duration = Duration::from_secs(3);

/// How often a worker process sweeps for worker processes that have gone.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// How long the row of a worker process that has gone is kept, and swept again, after it
/// went stale: a statement it sent before it died may still commit a claim meanwhile.
pub const GONE_GRACE: Duration = Duration::from_secs(60);

/// How long a local attempt handed over after a commit whose outcome was not known waits for
/// its objective's assignment to show, before taking it for never made.
const DOUBTFUL_ASSIGNMENT_WAIT: Duration = Duration::from_secs(30);

/// How often a worker holding the message of an objective another process claimed looks
/// whether it has ended, or its claimant has gone.
const CLAIM_CHECK: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The teams this worker serves.
    pub teams: Vec<String>,
    /// Where each attempt's workspace keeps its files (in memory unless a directory).
    pub work_dir: Scratch,
    pub ack_wait: Duration,
    /// Deliveries of one message before its objective is blocked.
    pub max_deliver: i64,
    /// Objectives one team works at once in this process (model calls are mostly waiting).
    pub concurrency: usize,
}

/// Objectives one team works at once in one worker process, unless configured
/// (`worker_concurrency`). Those a team's free slots here cannot take go through the queue.
pub const DEFAULT_CONCURRENCY: usize = 64;

impl WorkerOptions {
    pub fn new(teams: Vec<String>, work_dir: impl Into<Scratch>) -> Self {
        Self {
            teams,
            work_dir: work_dir.into(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("JetStream failed")]
    Stream(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the event store failed")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the model call failed: {0}")]
    Model(#[from] crate::model::ModelError),
    #[error("the workspace failed")]
    Workspace(#[from] std::io::Error),
    #[error("unknown team `{0}`")]
    UnknownTeam(String),
    #[error("the attempt's task panicked: {0}")]
    Panicked(String),
    /// The commit of stage ends that waited in their run's lane together, or the queueing
    /// of what it started, failed (see [`crate::lanes`]).
    #[error(transparent)]
    Together(Arc<WorkerError>),
}

/// An objective's end, as its run's lane carries it (see [`Worker::finish`]).
struct End {
    item: WorkItem,
    commands: Vec<ObjectiveCommand>,
    contents: Vec<ArtifactContent>,
    /// What it means for the run ([`crate::orchestrator::follow_up`]).
    follow_up: Option<RunCommand>,
}

/// How the commit of ends that went together went, for each of them.
type Together = Result<(), Arc<WorkerError>>;

type EndLead = Lead<Arc<End>, Together>;

/// A unit of work decided, with the stages it starts.
type Decided<'s> = (Changes<'s>, Vec<Dispatch>);

/// An end in a unit its lane's holder commits: the holder's own (its outcome returned), or
/// one that waited (told).
struct Member {
    end: Arc<End>,
    reply: Option<tokio::sync::oneshot::Sender<Together>>,
}

impl From<Waiting<Arc<End>, Together>> for Member {
    fn from(waiting: Waiting<Arc<End>, Together>) -> Self {
        Self { end: waiting.end, reply: Some(waiting.reply) }
    }
}

impl Member {
    fn tell(self, outcome: Together, own: &mut Together) {
        match self.reply {
            // Its waiter may have gone (aborted): nobody to tell.
            Some(reply) => drop(reply.send(outcome)),
            None => *own = outcome,
        }
    }
}

/// Which way an attempt at an objective came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// A work message.
    Message,
    /// Handed over in memory to this process, which claimed it.
    Local,
    /// A work message of an objective whose local attempts here were abandoned.
    Abandoned,
}

fn store_err(e: impl std::error::Error + Send + Sync + 'static) -> WorkerError {
    WorkerError::Store(Box::new(e))
}

fn stream_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> WorkerError {
    WorkerError::Stream(e.into())
}

#[derive(Clone)]
pub struct Worker {
    store: Arc<Store>,
    js: jetstream::Context,
    topology: Topology,
    provider: Arc<dyn ModelProvider>,
    tools: Arc<ToolRegistry>,
    options: WorkerOptions,
    /// Objectives handed over in memory (see [`crate::handoff`]).
    local: Arc<LocalWork>,
    handed: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Handed>>>>,
    /// The workers bucket, looked up once (every renewal and presence check uses it).
    bucket: Arc<tokio::sync::OnceCell<jetstream::kv::Store>>,
    /// The runs whose stage ends are being committed (see [`crate::lanes`]).
    lanes: Arc<Lanes<Arc<End>, Together>>,
}

impl Worker {
    pub fn new(
        store: Arc<Store>,
        js: jetstream::Context,
        topology: Topology,
        provider: Arc<dyn ModelProvider>,
        options: WorkerOptions,
    ) -> Self {
        let (local, handed) = LocalWork::new(&options.teams, options.concurrency);
        let handed = Arc::new(std::sync::Mutex::new(Some(handed)));
        let bucket = Arc::default();
        Self { store, js, topology, provider, tools: Arc::new(ToolRegistry::standard()), options, local, handed, bucket, lanes: Arc::default() }
    }

    /// This worker as the code that starts objectives sees it, to hand them over in memory
    /// ([`crate::orchestrator::Orchestrator::with_local_work`]).
    pub fn local_work(&self) -> Arc<LocalWork> {
        self.local.clone()
    }

    /// Serves every team of the options until dropped.
    pub async fn run(self) {
        let mut tasks: Vec<_> = self
            .options
            .teams
            .clone()
            .into_iter()
            .map(|team| {
                let worker = self.clone();
                tokio::spawn(async move {
                    loop {
                        if let Err(error) = worker.consume(&team).await {
                            tracing::warn!(%team, error = %error, "worker interrupted; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                })
            })
            .collect();
        tasks.push(tokio::spawn(self.clone().announce()));
        tasks.push(tokio::spawn(self.clone().sweeps()));
        if let Some(handed) = self.handed.lock().expect("not poisoned").take() {
            tasks.push(tokio::spawn(self.clone().work_handed(handed)));
        }
        // Dropping this future aborts the team tasks with it.
        struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.iter().for_each(|t| t.abort());
            }
        }
        let tasks = AbortOnDrop(tasks);
        futures::future::pending::<()>().await;
        drop(tasks);
    }

    /// Keeps this process's presence (its key in the workers bucket and its row in
    /// `worker_instances`) while it runs; objectives are claimed for it only while the last
    /// renewal is recent (see [`LocalWork::claims_hold`]).
    async fn announce(self) {
        // Stopped (the worker dropped): the presence is taken back, when the runtime lets
        // that run (`up` and `worker` call [`Worker::withdraw`] before they close the pool).
        struct Withdraw(Worker);
        impl Drop for Withdraw {
            fn drop(&mut self) {
                self.0.local.withdraw();
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let worker = self.0.clone();
                    runtime.spawn(async move { worker.withdraw().await });
                }
            }
        }
        let _withdraw = Withdraw(self.clone());
        let mut renewal = tokio::time::interval(PRESENCE_RENEWAL);
        loop {
            renewal.tick().await;
            // Stamped before the renewal: the presence lives from about then.
            let started = std::time::Instant::now();
            match self.renew().await {
                Ok(()) => self.local.renewed(started),
                // New claims stop once the last renewal is nearly due to expire; work goes
                // through the queue meanwhile.
                Err(error) => tracing::warn!(%error, "the worker's presence could not be renewed"),
            }
        }
    }

    /// One renewal of the presence: the row (with where the open claims begin), then the key.
    async fn renew(&self) -> Result<(), WorkerError> {
        let pool = self.store.pool();
        // Read before the mark is made (see `LocalWork::mark`).
        let last_position = claims::last_position(pool).await.map_err(store_err)?;
        let since = self.local.mark(last_position).unwrap_or(0);
        claims::renew(pool, self.local.instance(), since).await.map_err(store_err)?;
        self.bucket().await?.put(self.local.instance(), "alive".into()).await.map_err(stream_err)?;
        Ok(())
    }

    /// Takes this process's presence back: no claim is made from now on, its key is deleted
    /// and its row made stale, so that the others' next sweep takes over its open claims
    /// without waiting for them to expire. For a process that stops; best effort.
    /// Waits at most [`WITHDRAW_WAIT`] (a server that does not answer must not hold up a
    /// stop: the presence then expires as after a crash).
    pub async fn withdraw(&self) {
        self.local.withdraw();
        let instance = self.local.instance();
        let taken_back = async {
            if let Ok(bucket) = self.bucket().await {
                let _ = bucket.delete(instance).await;
            }
            let _ = claims::withdraw(self.store.pool(), instance, factory_nats::WORKER_PRESENCE_TTL).await;
        };
        if tokio::time::timeout(WITHDRAW_WAIT, taken_back).await.is_err() {
            tracing::warn!("the worker's presence could not be taken back in time; it expires instead");
        }
    }

    /// Sweeps for worker processes that have gone, every few seconds, in a task of its own
    /// (a long sweep must not hold up the renewals).
    async fn sweeps(self) {
        let mut interval = tokio::time::interval(SWEEP_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            match self.sweep().await {
                Ok(0) => {}
                Ok(queued) => tracing::info!(queued, "queued the open claims of worker processes that have gone"),
                Err(error) => tracing::warn!(%error, "the sweep for worker processes that have gone failed; trying again"),
            }
        }
    }

    /// Queues the work of every open claim of the worker processes that have gone: whose row
    /// was not renewed for longer than a presence lasts and whose key is absent. How many
    /// objectives it queued. (Every worker process sweeps; two sweeping at once queue each
    /// objective once, by its message id.) A process that fails to be swept is left for the
    /// next sweep; the others are swept all the same.
    pub async fn sweep(&self) -> Result<usize, WorkerError> {
        let pool = self.store.pool();
        let mut queued = 0;
        for gone in claims::stale(pool, factory_nats::WORKER_PRESENCE_TTL, GONE_GRACE).await.map_err(store_err)? {
            // This process's own row is stale only while it cannot renew it: its claims are
            // its own to finish.
            if gone.instance == self.local.instance() {
                continue;
            }
            match self.present(&gone.instance).await {
                Ok(false) => {}
                Ok(true) => continue,
                Err(error) => {
                    tracing::warn!(instance = %gone.instance, %error, "a stale worker's presence cannot be read; it counts as present");
                    continue;
                }
            }
            match self.sweep_gone(&gone).await {
                Ok(count) => queued += count,
                Err(error) => tracing::warn!(instance = %gone.instance, %error, "a worker process that has gone could not be swept; trying again"),
            }
        }
        Ok(queued)
    }

    /// One gone process: the work of its open claims after its row's position queued, then
    /// the position moved up to what was settled before they were read, so that the next
    /// sweep reads only what committed since (a statement it sent before dying). Its row is
    /// deleted once it has been gone for longer than [`GONE_GRACE`] and a sweep found nothing.
    async fn sweep_gone(&self, gone: &claims::Stale) -> Result<usize, WorkerError> {
        let pool = self.store.pool();
        let (position, settled) = claims::settled_position(pool).await.map_err(store_err)?;
        let mut items = Vec::new();
        for claimed in claims::claimed_since(pool, &gone.instance, gone.since_position).await.map_err(store_err)? {
            let (Ok(objective_id), Some(run_id)) = (claimed.objective_id.parse::<ObjectiveId>(), claimed.run_id) else {
                continue;
            };
            let objective = self.store.load_objective(objective_id).await.map_err(store_err)?;
            if objective.status != ObjectiveStatus::Assigned || objective.last_result == Some(TaskStatus::NeedsClarification) {
                continue;
            }
            let run_id = factory_domain::RunId(run_id);
            let run = self.store.load_run(run_id).await.map_err(store_err)?;
            items.extend(crate::orchestrator::work_of(run_id, &run, &objective.stage, objective_id));
        }
        crate::orchestrator::publish(&self.js, &self.topology, &items).await.map_err(stream_err)?;
        if !items.is_empty() {
            tracing::info!(instance = %gone.instance, queued = items.len(), "a worker process has gone; its open claims are queued");
        }
        if settled {
            claims::advance(pool, &gone.instance, position).await.map_err(store_err)?;
            if gone.expired && items.is_empty() {
                claims::forget(pool, &gone.instance, factory_nats::WORKER_PRESENCE_TTL, GONE_GRACE).await.map_err(store_err)?;
            }
        }
        Ok(items.len())
    }

    /// Whether `instance`'s presence is in the workers bucket.
    async fn present(&self, instance: &str) -> Result<bool, WorkerError> {
        let entry = self.bucket().await?.entry(instance).await.map_err(stream_err)?;
        Ok(entry.is_some_and(|entry| entry.operation == jetstream::kv::Operation::Put))
    }

    /// The workers bucket (looked up on first use; a failed lookup is tried again next time).
    async fn bucket(&self) -> Result<&jetstream::kv::Store, WorkerError> {
        self.bucket
            .get_or_try_init(|| async { self.js.get_key_value(&self.topology.workers_bucket).await.map_err(stream_err) })
            .await
    }

    /// Works the objectives handed over in memory, each as its own task (dropped with this).
    async fn work_handed(self, mut handed: tokio::sync::mpsc::UnboundedReceiver<Handed>) {
        let mut attempts = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                next = handed.recv() => match next {
                    Some(next) => {
                        let worker = self.clone();
                        attempts.spawn(async move { worker.work_locally(next).await });
                    }
                    None => break,
                },
                Some(_) = attempts.join_next(), if !attempts.is_empty() => {}
            }
        }
        while attempts.join_next().await.is_some() {}
    }

    /// The attempts at an objective handed over in memory: retried as redeliveries would be
    /// (a panic counts as a failed attempt), and after `max_deliver` failed ones the
    /// objective is blocked. The objective's message, if it is held here, is told how they
    /// ended (dropped, they count as abandoned).
    async fn work_locally(&self, handed: Handed) {
        struct Told<'w> {
            local: &'w LocalWork,
            handed: &'w Handed,
            how: Attempts,
        }
        impl Drop for Told<'_> {
            fn drop(&mut self) {
                self.local.ended(self.handed.item.objective_id, &self.handed.done, self.how);
            }
        }
        let mut told = Told { local: &self.local, handed: &handed, how: Attempts::Abandoned };
        let item = &handed.item;
        let key = format!("claim:{}", self.local.instance());
        let attempts = self.options.max_deliver.max(1);
        for attempt in 1..=attempts {
            // Only the first attempt starts ahead of the commit; later ones read the store.
            let ahead = if attempt == 1 { handed.ahead.clone() } else { None };
            let attempted = self.attempt_locally(item, &key, attempt > 1, ahead).await;
            // Handed over ahead of its commit, an attempt may fail before it knew the
            // outcome: nothing is retried, blocked or queued before it is known, and nothing
            // at all if the commit was refused (the objective does not exist).
            if attempted.is_err()
                && let Some(ahead) = &handed.ahead
                && ahead.outcome().await == Outcome::Refused
            {
                told.how = Attempts::Ended;
                return;
            }
            match attempted {
                Ok(()) => {
                    told.how = Attempts::Ended;
                    return;
                }
                Err(error) if attempt == attempts => {
                    tracing::error!(objective = %item.objective_id, error = %error, "giving up on the objective");
                    let reason = format!("the worker failed {attempt} times: {error}");
                    told.how = self.block_for_good(item, reason).await;
                }
                Err(error) => {
                    tracing::warn!(objective = %item.objective_id, error = %error, attempt, "objective failed; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        if told.how == Attempts::Abandoned {
            // Given up with the objective finished (or never assigned): what its end started
            // may not be queued, and no message of its own would do it. The run's stages in
            // progress are queued again before the claim is let go.
            self.queue_in_progress_for_good(item.run_id).await;
        }
    }

    /// Queues the run's stages in progress again, retrying while the store or JetStream
    /// fails (the claim is held meanwhile, so the sweep would find it should this process
    /// die).
    async fn queue_in_progress_for_good(&self, run_id: factory_domain::RunId) {
        let mut pause = Duration::from_secs(1);
        loop {
            let queued = async {
                let run = self.store.load_run(run_id).await.map_err(store_err)?;
                self.queue_in_progress(run_id, &run).await
            };
            match queued.await {
                Ok(()) => return,
                Err(error) => tracing::warn!(%run_id, %error, "the stages in progress could not be queued again; retrying"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(30));
        }
    }

    /// One local attempt, as a task of its own so that a panic is a failed attempt (and
    /// dropped with this future).
    async fn attempt_locally(&self, item: &WorkItem, key: &str, again: bool, ahead: Option<Arc<Ahead>>) -> Result<(), WorkerError> {
        let (worker, item, key) = (self.clone(), item.clone(), key.to_string());
        let task = tokio::spawn(async move { worker.work_on(&item, &key, again, Path::Local, ahead).await });
        struct AbortOnDrop(tokio::task::AbortHandle);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _abort = AbortOnDrop(task.abort_handle());
        task.await.unwrap_or_else(|joined| Err(WorkerError::Panicked(joined.to_string())))
    }

    /// Blocks the objective after its last failed local attempt, retrying while the store
    /// fails: the claim is this process's, so no other worker would. Refused because the
    /// objective finished (its queueing failed after the commit), the attempts count as
    /// abandoned: the message then queues that work again.
    async fn block_for_good(&self, item: &WorkItem, reason: String) -> Attempts {
        let mut pause = Duration::from_secs(1);
        loop {
            let block = ObjectiveCommand::BlockObjective { reason: reason.clone() };
            match self.store.execute_objective(item.objective_id, item.run_id, block).await {
                Ok(()) => return Attempts::Ended,
                Err(CommandError::Refused(ObjectiveError::Finished(_))) => return Attempts::Abandoned,
                Err(CommandError::Refused(other)) => {
                    tracing::warn!(objective = %item.objective_id, error = %other, "the block was refused");
                    return Attempts::Abandoned;
                }
                Err(error) => {
                    tracing::warn!(objective = %item.objective_id, %error, "the objective could not be blocked; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn consume(&self, team: &str) -> Result<(), WorkerError> {
        let stream = self.js.get_stream(&self.topology.work_stream).await.map_err(stream_err)?;
        let name = format!("worker-{team}");
        let consumer = stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: self.topology.work_subject(team),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.options.ack_wait,
                    max_deliver: self.options.max_deliver,
                    ..Default::default()
                },
            )
            .await
            .map_err(stream_err)?;
        // Pull no more than can be worked at once: a message waiting in the client's buffer
        // gets no in-progress acks and would be redelivered after `ack_wait`.
        let concurrency = self.options.concurrency.max(1);
        let messages = consumer.stream().max_messages_per_batch(concurrency).messages().await.map_err(stream_err)?;
        // Several objectives at once; each message is acked on its own, so their order does
        // not matter (a work queue has no order between objectives). When the message stream
        // fails, the objectives in flight finish first; then it is opened again.
        let failed = std::sync::Mutex::new(None::<String>);
        let mut handled = messages
            .take_while(|message| {
                if let Err(error) = message {
                    *failed.lock().expect("not poisoned") = Some(error.to_string());
                }
                futures::future::ready(message.is_ok())
            })
            .filter_map(|message| futures::future::ready(message.ok()))
            .map(|message| async move {
                // One message failing (an ack lost with the connection) ends only its own
                // work: JetStream redelivers it after `ack_wait`.
                if let Err(error) = self.handle(message).await {
                    tracing::warn!(error = %error, "work message not settled; it will be redelivered");
                }
            })
            .buffer_unordered(concurrency);
        while handled.next().await.is_some() {}
        drop(handled);
        match failed.into_inner().expect("not poisoned") {
            Some(error) => Err(stream_err(error)),
            None => Ok(()),
        }
    }

    /// One work message: the objective worked, then acked; or handed back for redelivery;
    /// or, past `max_deliver`, its objective blocked.
    async fn handle(&self, message: jetstream::Message) -> Result<(), WorkerError> {
        let info = message.info().map_err(stream_err)?;
        let (sequence, delivered) = (info.stream_sequence, info.delivered);
        let item: WorkItem = match serde_json::from_slice(&message.payload) {
            Ok(item) => item,
            Err(error) => {
                tracing::error!(%error, "not a work item; terminated");
                message.ack_with(AckKind::Term).await.map_err(stream_err)?;
                return Ok(());
            }
        };
        let key = format!("work:{sequence}");
        let in_flight = self.local.in_flight(item.objective_id);
        let work = async {
            // Handed to this process in memory and being worked: held until that ends.
            if let Some(attempts) = in_flight {
                crate::handoff::until_ended(attempts).await;
            }
            let path = if self.local.take_abandoned(item.objective_id) { Path::Abandoned } else { Path::Message };
            self.work_on(&item, &key, delivered > 1, path, None).await
        };
        tokio::pin!(work);
        // Tell JetStream we are alive while the team works (model calls can be long).
        // First tick one period from now: awaiting an interval's immediate first tick costs
        // a turn of the timer wheel (up to a millisecond) before the work even starts.
        let period = self.options.ack_wait / 3;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let outcome = loop {
            tokio::select! {
                outcome = &mut work => break outcome,
                _ = heartbeat.tick() => {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            }
        };
        match outcome {
            Ok(()) => message.double_ack().await.map_err(stream_err)?,
            Err(error) if delivered >= self.options.max_deliver => {
                tracing::error!(objective = %item.objective_id, error = %error, "giving up on the objective");
                let reason = format!("the worker failed {delivered} times: {error}");
                let _ = self
                    .store
                    .execute_objective(item.objective_id, item.run_id, ObjectiveCommand::BlockObjective { reason })
                    .await;
                message.ack_with(AckKind::Term).await.map_err(stream_err)?;
            }
            Err(error) => {
                tracing::warn!(objective = %item.objective_id, error = %error, delivered, "objective failed; redelivering");
                message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await.map_err(stream_err)?;
            }
        }
        Ok(())
    }

    /// Works one objective to its end, or does nothing when it already ended.
    ///
    /// A first delivery starts from what this process remembers of the run and the
    /// objective when it can (its own commit just assigned the objective, mostly): no read.
    /// A redelivery (`redelivered`) reads them afresh.
    pub async fn process(&self, item: &WorkItem, key: &str, redelivered: bool) -> Result<(), WorkerError> {
        self.work_on(item, key, redelivered, Path::Message, None).await
    }

    /// `ahead`: handed over ahead of the commit that assigns it (see [`Ahead`]); the work
    /// starts from what that commit writes, and writes nothing before it has committed.
    async fn work_on(&self, item: &WorkItem, key: &str, redelivered: bool, path: Path, ahead: Option<Arc<Ahead>>) -> Result<(), WorkerError> {
        let staged = ahead.as_deref().and_then(|ahead| Some((ahead.run(item.run_id)?.clone(), ahead.objective(item.objective_id)?.clone())));
        let ahead = match (ahead, staged.is_some()) {
            (Some(ahead), true) => Some(ahead),
            (Some(ahead), false) => {
                // The commit does not assign it (it cannot be, but then): started after it.
                ahead.outcome().await;
                None
            }
            (None, _) => None,
        };
        let (mut run, mut objective) = match staged {
            Some(states) => states,
            None => self.states(item, redelivered || path == Path::Abandoned).await?,
        };
        if path == Path::Local && objective.status == ObjectiveStatus::New {
            // Handed over after a commit whose outcome was not known: worked if its
            // assignment shows, else it was never made.
            match self.assignment_shows(item).await? {
                Some(states) => (run, objective) = states,
                None => {
                    tracing::info!(objective = %item.objective_id, "its assignment never committed; nothing to work");
                    return Ok(());
                }
            }
        }
        // Queued again after it ended: a redelivery may be the retry of work whose commit
        // started the next stages and whose process died (or whose queueing failed) before
        // queueing them; a repeat is dropped by its id.
        let mut queue_again = redelivered || path == Path::Abandoned;
        let open = objective.status == ObjectiveStatus::Assigned;
        match objective.claimed_by.clone() {
            // Claimed here, its local attempts have ended (they are not in flight) and its
            // answer waits for a clarification: nothing to work from the message. (Any other
            // open objective claimed here was abandoned and is worked below.)
            Some(claimant)
                if claimant == self.local.instance()
                    && path == Path::Message
                    && open
                    && objective.last_result == Some(TaskStatus::NeedsClarification) =>
            {
                if queue_again {
                    self.queue_in_progress(item.run_id, &run).await?;
                }
                return Ok(());
            }
            // Another process's worker took it in memory: left to it while that process lives.
            Some(claimant) if claimant != self.local.instance() && open => {
                if let Some(run) = self.wait_for_claimant(item, &claimant).await {
                    // Its commit may have started stages that its process could not queue.
                    return self.queue_in_progress(item.run_id, &run).await;
                }
                tracing::info!(objective = %item.objective_id, %claimant, "the claimant is gone; working the objective here");
                (run, objective) = self.states(item, true).await?;
                queue_again = true;
            }
            _ => {}
        }
        if objective.status != ObjectiveStatus::Assigned || run.status.is_terminal() || objective.result_keys.contains(key) {
            // Finished by another delivery (or this very message's result was recorded, its
            // ack lost), or its run was cancelled or failed meanwhile.
            if queue_again {
                self.queue_in_progress(item.run_id, &run).await?;
            }
            return Ok(());
        }
        let objectives = self.context_objectives(&run, objective, item, redelivered, ahead.as_deref()).await?;
        let objective = &objectives[&item.objective_id];
        let team = team_docs(&item.team).ok_or_else(|| WorkerError::UnknownTeam(item.team.clone()))?;
        let granted = granted_tools(team.tools).map_err(|e| WorkerError::UnknownTeam(format!("{}: {e}", item.team)))?;
        let run = RunContext::of(&run, item.objective_id, &objectives);

        // A workspace per attempt: two deliveries of one message never share one.
        let name = format!("{}-{}-{}", item.objective_id, key.replace(':', "-"), uuid::Uuid::now_v7());
        // The earlier stages' artifacts, served from memory (not written into the directory).
        let shas: Vec<&str> = run.artifacts.values().map(String::as_str).collect();
        let contents = self.contents(&shas, ahead.as_deref()).await?;
        if let Some(ahead) = ahead.as_deref()
            && !self.provider.answers_in_process()
            && !self.stands(item, ahead).await?
        {
            // A model outside the process is called only for work that stands: a call made
            // for nothing would cost and go unrecorded.
            tracing::debug!(objective = %item.objective_id, "the commit that assigned it was refused; nothing to work");
            return Ok(());
        }
        let workspace =
            self.options.work_dir.workspace(&name, workspace_inputs(&run.artifacts, |sha| contents.get(sha).map(|c| c.as_ref().clone())))?;
        let prompt = run.prompt(team, objective.iterations + 1, item.max_iterations);
        // Model calls are recorded as they return, by a task of their own, so that a dying
        // attempt keeps its audit; calls it has not taken when the work ends go into the
        // final commit instead (with a fast model, most of them).
        let calls = Arc::new(CallLog::default());
        let recorder = {
            let (store, calls, ahead) = (self.store.clone(), calls.clone(), ahead.clone());
            let (objective_id, run_id) = (item.objective_id, item.run_id);
            tokio::spawn(async move {
                loop {
                    if !calls.done.load(std::sync::atomic::Ordering::Acquire) && calls.is_empty() {
                        calls.wake.notified().await;
                        continue;
                    }
                    // A call just returned: give the work a moment to end, so that fast work
                    // records its calls in its final commit instead of one commit each.
                    if !calls.done.load(std::sync::atomic::Ordering::Acquire) {
                        let _ = tokio::time::timeout(RECORD_GRACE, calls.finished()).await;
                    }
                    let batch = calls.take();
                    if batch.is_empty() {
                        if calls.done.load(std::sync::atomic::Ordering::Acquire) {
                            return Ok::<(), WorkerError>(());
                        }
                        continue;
                    }
                    // Nothing is recorded before the commit that assigned the objective has
                    // committed; refused, there is nothing to record it for. (Not known, the
                    // recording is refused unless the objective was assigned.)
                    if let Some(ahead) = &ahead
                        && ahead.outcome().await == Outcome::Refused
                    {
                        return Ok(());
                    }
                    let commands = batch.into_iter().map(|call| ObjectiveCommand::RecordModelCall(call.into())).collect();
                    ignore_finished(store.execute_objective_all(objective_id, run_id, commands).await)?;
                }
            })
        };
        // However this function returns, the recorder records what is left and stops.
        let _finish_recording = calls.finisher();
        let on_call = {
            let calls = calls.clone();
            move |call: operative::ModelCall| calls.push(call)
        };
        let work = operative::work(self.provider.as_ref(), team, &item.alias, prompt, &self.tools, &granted, &workspace, run.team_spent_usd, &on_call);
        // A run cancelled while its team works drops the in-flight model call. (A run that
        // is only paused, BLOCKED or NEEDS_CLARIFICATION, lets parallel stages finish.)
        let cancelled = async {
            loop {
                tokio::time::sleep(CANCEL_CHECK).await;
                if let Ok(true) = self.run_has_ended(item).await {
                    break;
                }
            }
        };
        // Handed over ahead of a commit that was refused, the work is dropped at once.
        let refused = async {
            match ahead.as_deref() {
                Some(ahead) if ahead.outcome().await == Outcome::Refused => {}
                _ => std::future::pending().await,
            }
        };
        let dropped = async {
            tokio::select! {
                _ = refused => "the commit that assigned it was refused",
                _ = cancelled => "run stopped",
            }
        };
        let outcome = tokio::select! {
            outcome = work => outcome,
            why = dropped => {
                tracing::info!(objective = %item.objective_id, why, "work dropped");
                remove_workspace(workspace);
                // The calls made so far are recorded before the message is settled (none
                // when the commit was refused: there is no objective to record them for).
                calls.finish();
                let _ = recorder.await;
                return Ok(());
            }
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                remove_workspace(workspace);
                // Recorded before the message is settled: on the last delivery the objective
                // is blocked next, and calls recorded after that would be refused (lost).
                calls.finish();
                let _ = recorder.await;
                return Err(error.into());
            }
        };
        drop(on_call);
        // Taken before the recorder is told to stop, so that it does not take them first.
        let unrecorded = calls.take();
        calls.finish();
        recorder.await.map_err(|e| WorkerError::Store(Box::new(e)))??;
        // The contents (content-addressed, so a repeat is a no-op), the artifacts, the result
        // and the objective's end, in one commit.
        let mut commands: Vec<ObjectiveCommand> =
            unrecorded.into_iter().map(|call| ObjectiveCommand::RecordModelCall(call.into())).collect();
        let mut contents = Vec::new();
        for path in artifact_paths(&outcome) {
            let Some(content) = workspace.content(&path) else { continue };
            let artifact = artifact_of(path, &content);
            contents.push(ArtifactContent { sha256: artifact.sha256.clone(), content });
            commands.push(ObjectiveCommand::ProduceArtifact(artifact));
        }
        commands.extend(result_commands(key, outcome));
        let finished = self.finish(item, commands, contents, ahead.as_deref()).await;
        remove_workspace(workspace);
        finished
    }

    /// The run's stages in progress queued again (see [`Worker::work_on`]).
    async fn queue_in_progress(&self, run_id: factory_domain::RunId, run: &Run) -> Result<(), WorkerError> {
        let dispatches = crate::orchestrator::in_progress_of(run);
        crate::orchestrator::queue(&self.js, &self.topology, run_id, &dispatches).await.map_err(store_err)
    }

    /// Waits while `claimant`'s process lives and there is something left to work: the run
    /// once there is not (the objective ended, or waits for a clarification, or its run
    /// ended), `None` when the claimant has gone (its presence expired or was taken back)
    /// with the objective still to work. What cannot be read (the store, the bucket) is
    /// waited for: only the claimant's key being absent says it has gone.
    async fn wait_for_claimant(&self, item: &WorkItem, claimant: &str) -> Option<Run> {
        loop {
            let states = async {
                let objective = self.store.load_objective(item.objective_id).await.map_err(store_err)?;
                Ok::<_, WorkerError>((objective, self.store.load_run(item.run_id).await.map_err(store_err)?))
            };
            match states.await {
                Ok((objective, run))
                    if objective.status != ObjectiveStatus::Assigned
                        || objective.last_result == Some(TaskStatus::NeedsClarification)
                        || run.status.is_terminal() =>
                {
                    return Some(run);
                }
                Ok(_) => match self.present(claimant).await {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(error) => tracing::warn!(%error, "the claimant's presence cannot be read; it counts as present"),
                },
                Err(error) => tracing::warn!(%error, "the claimed objective cannot be read; waiting"),
            }
            tokio::time::sleep(CLAIM_CHECK).await;
        }
    }

    /// Whether the work handed over ahead of a commit stands: the commit assigned the
    /// objective (asked of the store when its outcome is not known).
    async fn stands(&self, item: &WorkItem, ahead: &Ahead) -> Result<bool, WorkerError> {
        match ahead.outcome().await {
            Outcome::Committed => Ok(true),
            Outcome::Refused => Ok(false),
            Outcome::Unknown => Ok(self.assignment_shows(item).await?.is_some()),
        }
    }

    /// The run and the objective once the objective's assignment shows in the store, for
    /// work handed over with a commit whose outcome was not known; `None` when it has not
    /// shown after a while (then it was never made).
    async fn assignment_shows(&self, item: &WorkItem) -> Result<Option<(Run, Objective)>, WorkerError> {
        let deadline = tokio::time::Instant::now() + DOUBTFUL_ASSIGNMENT_WAIT;
        loop {
            let (run, objective) = self.states(item, true).await?;
            if objective.status != ObjectiveStatus::New {
                return Ok(Some((run, objective)));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(CLAIM_CHECK).await;
        }
    }

    /// Artifact contents by digest: those the commit a piece of work was handed over ahead
    /// of stores from it, the rest from the store (see [`Store::artifact_contents`]).
    async fn contents(&self, shas: &[&str], ahead: Option<&Ahead>) -> Result<HashMap<String, Arc<Vec<u8>>>, WorkerError> {
        let Some(ahead) = ahead else {
            return self.store.artifact_contents(shas).await.map_err(store_err);
        };
        let (staged, stored): (Vec<&str>, Vec<&str>) = shas.iter().partition(|sha| ahead.content(sha).is_some());
        let mut contents = if stored.is_empty() { HashMap::new() } else { self.store.artifact_contents(&stored).await.map_err(store_err)? };
        for sha in staged {
            if let Some(content) = ahead.content(sha) {
                contents.insert(sha.to_string(), content.clone());
            }
        }
        Ok(contents)
    }

    /// The run and the objective: as remembered (see [`Worker::process`]) when the
    /// remembered run knows the objective, else read.
    async fn states(&self, item: &WorkItem, fresh: bool) -> Result<(Run, Objective), WorkerError> {
        let remembered = if fresh { None } else { self.store.remembered_run(item.run_id) };
        let run = match remembered {
            Some(run) if run.started.contains_key(&item.objective_id) => run,
            _ => self.store.load_run(item.run_id).await.map_err(store_err)?,
        };
        let remembered = if fresh { None } else { self.store.remembered_objective(item.objective_id) };
        let objective = match remembered {
            Some(objective) if objective.status != ObjectiveStatus::New => objective,
            _ => self.store.load_objective(item.objective_id).await.map_err(store_err)?,
        };
        Ok((run, objective))
    }

    /// The objectives a team's context needs ([`RunContext::needs`]), this one included:
    /// as the commit handed over `ahead` of writes them when it changes them, the finished
    /// ones from memory when remembered finished (their state is final), the rest read
    /// unless remembered.
    async fn context_objectives(
        &self,
        run: &Run,
        objective: Objective,
        item: &WorkItem,
        fresh: bool,
        ahead: Option<&Ahead>,
    ) -> Result<HashMap<ObjectiveId, Objective>, WorkerError> {
        let (finished, team) = RunContext::needs(run, item.objective_id);
        let mut objectives = HashMap::with_capacity(finished.len() + team.len() + 1);
        objectives.insert(item.objective_id, objective);
        let needed = finished.into_iter().map(|id| (id, true)).chain(team.into_iter().map(|id| (id, false)));
        for (id, must_be_final) in needed {
            if objectives.contains_key(&id) {
                continue;
            }
            // As the commit handed over ahead of writes it, if it changes it: the states the
            // unit was decided on, and nothing else of the store is newer than them.
            if let Some(staged) = ahead.and_then(|ahead| ahead.objective(id)) {
                objectives.insert(id, staged.clone());
                continue;
            }
            let remembered = if fresh { None } else { self.store.remembered_objective(id) };
            let objective = match remembered {
                Some(o) if !must_be_final || matches!(o.status, ObjectiveStatus::Completed | ObjectiveStatus::Blocked) => o,
                _ => self.store.load_objective(id).await.map_err(store_err)?,
            };
            objectives.insert(id, objective);
        }
        Ok(objectives)
    }

    /// Records the objective's end (its last calls, the artifacts and their contents, the
    /// result) and, in the same commit, what the end means for the run: the stage completed
    /// and the stages it makes ready started, or the run blocked or waiting for a
    /// clarification (the orchestrator's own step, see [`crate::orchestrator::stage_end`]).
    /// Then the started stages' work is queued. When another delivery finished the
    /// objective first, nothing is recorded.
    ///
    /// The commit goes through the run's lane ([`crate::lanes`]): while another unit of the
    /// run is being committed from this process, the end waits, and is committed with the
    /// others that waited, by whichever holds the lane.
    ///
    /// `ahead`: the work was handed over ahead of the commit that assigns the objective (see
    /// [`Ahead`]). While that commit is in flight, the end is decided on what it writes, and
    /// committed once it has (dropped, with the work, if refused). Once it is known, the
    /// process remembers what it wrote, or newer, and the end is decided on that.
    async fn finish(&self, item: &WorkItem, commands: Vec<ObjectiveCommand>, contents: Vec<ArtifactContent>, ahead: Option<&Ahead>) -> Result<(), WorkerError> {
        let follow_up = crate::orchestrator::follow_up(&commands, &item.stage, item.objective_id);
        let end = Arc::new(End { item: item.clone(), commands, contents, follow_up });
        let mut decided = None;
        if let Some(ahead) = ahead {
            if !ahead.is_known() {
                let mut changes = self.store.changes_after(ahead.staged());
                let mut dispatches = Vec::new();
                if !self.decide(&end, &mut changes, &mut dispatches).await? {
                    return Ok(());
                }
                decided = Some((changes, dispatches));
            }
            if !self.stands(item, ahead).await? {
                tracing::debug!(objective = %item.objective_id, "the commit that assigned it was refused; work dropped");
                return Ok(());
            }
        }
        let mut orphaned = false;
        loop {
            match self.lanes.enter(item.run_id, end.clone()) {
                Entered::Lead(lead) => {
                    self.lead(lead, end, decided).await?;
                    if orphaned {
                        // The holder that went may have committed this end and not queued
                        // what it started; found finished, the end queues nothing itself.
                        let run = self.store.load_run(item.run_id).await.map_err(store_err)?;
                        self.queue_in_progress(item.run_id, &run).await?;
                    }
                    return Ok(());
                }
                Entered::Wait(told) => {
                    // Undecided while it waits (the holder decides it on what it commits
                    // first), so the claims of what it would have started are let go now.
                    drop(decided.take());
                    if let Ok(outcome) = told.await {
                        return outcome.map_err(WorkerError::Together);
                    }
                    // Told nothing: its holder has gone (its task aborted).
                    orphaned = true;
                }
            }
        }
    }

    /// Commits `own`'s end holding its run's lane (`decided`: staged already), then the
    /// ends that waited meanwhile, together, until none waits; each waiting end is told its
    /// outcome, `own`'s is returned.
    async fn lead(&self, mut lead: EndLead, own: Arc<End>, mut decided: Option<Decided<'_>>) -> Result<(), WorkerError> {
        let run_id = own.item.run_id;
        let mut own_outcome: Together = Ok(());
        let mut ends = vec![Member { end: own, reply: None }];
        // Ends found finished while the unit was decided: perhaps by another end of the same
        // objective in it (two deliveries), so they are told the unit's outcome too.
        let mut riders = Vec::new();
        while !ends.is_empty() {
            let mut attempt = 0;
            let mut next = None;
            let committed = loop {
                attempt += 1;
                let (changes, mut dispatches) = match decided.take() {
                    Some(decided) => decided,
                    None => self.decide_together(&mut ends, &mut riders, &mut own_outcome).await,
                };
                if ends.is_empty() {
                    break Ok(Vec::new());
                }
                // The lane is freed (or the ends that came are taken) as soon as the commit
                // is known, before the work handed over ahead of it hears.
                let on_commit = |result: &Result<(), CommitError>| {
                    if !matches!(result, Err(CommitError::Conflict)) {
                        next = Some(lead.next());
                    }
                };
                match crate::orchestrator::commit_handing_over(run_id, &mut dispatches, Some(&self.local), changes, on_commit).await {
                    Ok(()) => break Ok(dispatches),
                    // Another writer of the run (another process, the orchestrator) came
                    // first: decided again on fresh state, with the ends that came meanwhile.
                    Err(CommitError::Conflict) if self.store.pause_after_conflict(attempt).await => {
                        ends.extend(lead.take().into_iter().map(Member::from));
                    }
                    Err(error) => break Err(store_err(CommandError::<ObjectiveError>::from(error))),
                }
            };
            let next = next.unwrap_or_else(|| lead.next());
            // Committed. Each message is settled once the work it started is queued; should
            // the queueing fail, the redelivery queues it again (see `process`).
            let outcome = match committed {
                Ok(dispatches) => crate::orchestrator::queue(&self.js, &self.topology, run_id, &dispatches).await.map_err(store_err),
                Err(error) => Err(error),
            }
            .map_err(Arc::new);
            for member in ends.drain(..).chain(riders.drain(..)) {
                member.tell(outcome.clone(), &mut own_outcome);
            }
            ends = next.into_iter().map(Member::from).collect();
        }
        own_outcome.map_err(|error| Arc::try_unwrap(error).unwrap_or_else(WorkerError::Together))
    }

    /// `ends` decided together, in order, on the run as the store has it. An end refused or
    /// failing is taken out, and the others are decided again without it: what it staged
    /// cannot be taken back. Refused (its objective found finished), it goes to `riders`;
    /// failing, it is told so.
    async fn decide_together(&self, ends: &mut Vec<Member>, riders: &mut Vec<Member>, own_outcome: &mut Together) -> Decided<'_> {
        'again: loop {
            let mut changes = self.store.changes();
            let mut dispatches = Vec::new();
            for i in 0..ends.len() {
                match self.decide(&ends[i].end, &mut changes, &mut dispatches).await {
                    Ok(true) => continue,
                    Ok(false) => riders.push(ends.remove(i)),
                    Err(error) => ends.remove(i).tell(Err(Arc::new(error)), own_outcome),
                }
                continue 'again;
            }
            return (changes, dispatches);
        }
    }

    /// Stages `end` into `changes`: the objective's commands, its artifacts' contents and,
    /// when it ends the stage, the orchestrator's step (the stages it starts added to
    /// `dispatches`). `false`: another delivery finished the objective first.
    async fn decide(&self, end: &End, changes: &mut Changes<'_>, dispatches: &mut Vec<Dispatch>) -> Result<bool, WorkerError> {
        let item = &end.item;
        for command in end.commands.iter().cloned() {
            match changes.execute_objective(item.objective_id, item.run_id, command).await {
                Ok(()) => {}
                Err(CommandError::Refused(ObjectiveError::Finished(_))) => return Ok(false),
                Err(other) => return Err(store_err(other)),
            }
        }
        changes.store_artifacts(end.contents.clone());
        if let Some(command) = &end.follow_up {
            crate::orchestrator::stage_end(changes, item.run_id, command.clone(), dispatches, Some(&self.local))
                .await
                .map_err(store_err)?;
        }
        Ok(true)
    }

    async fn run_has_ended(&self, item: &WorkItem) -> Result<bool, WorkerError> {
        let run = self.store.load_run(item.run_id).await.map_err(store_err)?;
        Ok(run.status.is_terminal())
    }
}

/// Removes an attempt's workspace: one in memory is dropped; a folder is deleted off the async
/// threads, not waited for: deleting files blocks, and the task woken by the commit just made
/// (the orchestrator's, told in memory) would wait for it on this thread.
fn remove_workspace(workspace: Workspace) {
    if workspace.is_in_memory() {
        return;
    }
    let dir = workspace.root().to_path_buf();
    tokio::task::spawn_blocking(move || {
        if let Err(error) = std::fs::remove_dir_all(&dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), %error, "an attempt's workspace could not be removed");
        }
    });
}

/// The files that become the objective's artifacts: those its tools wrote, then those its
/// result names, without repeats.
pub fn artifact_paths(outcome: &operative::Outcome) -> Vec<String> {
    let mut paths: Vec<String> = outcome.written.clone();
    for path in &outcome.result.artifacts {
        if !paths.contains(path) {
            paths.push(path.clone());
        }
    }
    paths
}

/// A workspace's inputs: the run's artifacts so far (path -> sha256) whose content is at
/// hand and is text.
pub fn workspace_inputs(artifacts: &BTreeMap<String, String>, mut content: impl FnMut(&str) -> Option<Vec<u8>>) -> BTreeMap<String, String> {
    artifacts
        .iter()
        .filter_map(|(path, sha)| Some((path.clone(), String::from_utf8(content(sha)?).ok()?)))
        .collect()
}

/// The `ArtifactProduced` of one file: content-addressed.
pub fn artifact_of(path: String, content: &[u8]) -> ArtifactProduced {
    let sha256 = operative::hex(&Sha256::digest(content));
    ArtifactProduced { media_type: media_type(&path).into(), bytes: content.len() as u64, sha256, path }
}

/// After the artifacts: record the TaskResult, then complete or block the objective (a
/// NEEDS_CLARIFICATION answer stays open: the orchestrator pauses the run on the result).
pub fn result_commands(key: &str, outcome: operative::Outcome) -> Vec<ObjectiveCommand> {
    let status = outcome.result.status;
    let blockers = outcome.result.blockers.join("; ");
    let mut commands = vec![ObjectiveCommand::RecordTaskResult { idempotency_key: key.to_string(), result: outcome.result }];
    match status {
        TaskStatus::Complete => commands.push(ObjectiveCommand::CompleteObjective),
        TaskStatus::Blocked => commands.push(ObjectiveCommand::BlockObjective {
            reason: match &outcome.unparsed {
                Some(raw) => format!("{blockers}; raw answer: {}", raw.chars().take(4000).collect::<String>()),
                None => blockers,
            },
        }),
        TaskStatus::NeedsClarification => {}
    }
    commands
}

/// The model calls of one objective's work, between the operative and the recorder task.
#[derive(Default)]
struct CallLog {
    pending: std::sync::Mutex<Vec<operative::ModelCall>>,
    wake: tokio::sync::Notify,
    done: std::sync::atomic::AtomicBool,
}

impl CallLog {
    fn push(&self, call: operative::ModelCall) {
        self.pending.lock().expect("not poisoned").push(call);
        self.wake.notify_one();
    }

    fn is_empty(&self) -> bool {
        self.pending.lock().expect("not poisoned").is_empty()
    }

    /// Resolves once [`CallLog::finish`] was called.
    async fn finished(&self) {
        while !self.done.load(std::sync::atomic::Ordering::Acquire) {
            self.wake.notified().await;
        }
    }

    fn take(&self) -> Vec<operative::ModelCall> {
        std::mem::take(&mut *self.pending.lock().expect("not poisoned"))
    }

    /// No more calls come: the recorder stops once it has nothing left.
    fn finish(&self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        self.wake.notify_one();
    }

    fn finisher(self: &Arc<Self>) -> impl Drop {
        struct Finisher(Arc<CallLog>);
        impl Drop for Finisher {
            fn drop(&mut self) {
                self.0.finish();
            }
        }
        Finisher(self.clone())
    }
}

/// Another delivery finished the objective first: nothing to record.
fn ignore_finished(result: Result<(), CommandError<ObjectiveError>>) -> Result<(), WorkerError> {
    match result {
        Ok(()) | Err(CommandError::Refused(ObjectiveError::Finished(_))) => Ok(()),
        Err(other) => Err(store_err(other)),
    }
}

fn media_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "md" => "text/markdown",
        "rs" => "text/x-rust",
        "toml" => "application/toml",
        "json" => "application/json",
        "yaml" | "yml" => "application/yaml",
        "sql" => "application/sql",
        "ts" | "tsx" => "text/typescript",
        "js" => "text/javascript",
        "py" => "text/x-python",
        _ => "text/plain",
    }
}

/// What a team needs to know of its run: the requirement, the results and artifacts of the
/// stages completed when its objective started (oldest first), the latest review feedback,
/// and what the team has spent so far.
///
/// Cut at the objective's start, by the run's own sequence of events, not at "now": what a
/// team sees does not depend on how fast the stages in parallel with it are, and a
/// deterministic re-run rebuilds the same context from the same aggregates.
pub struct RunContext {
    title: String,
    requirement: String,
    inputs: String,
    feedback: String,
    /// Every artifact of the completed stages: path -> content digest (the latest wins).
    artifacts: BTreeMap<String, String>,
    /// What this objective's team has spent on models in the run so far (its budget).
    pub team_spent_usd: f64,
}

impl RunContext {
    /// The objectives whose state [`RunContext::of`] reads for `objective_id`: first those
    /// whose completions the run knew when it started (finished, so their state is final),
    /// then the team's own (for its budget; this one's earlier attempts included).
    pub fn needs(run: &Run, objective_id: ObjectiveId) -> (Vec<ObjectiveId>, Vec<ObjectiveId>) {
        let Some((completions, _)) = run.known_at_start(objective_id) else { return Default::default() };
        let team = &run.started[&objective_id].team;
        let finished = completions.iter().map(|c| c.objective_id).collect();
        let teams = run.started.iter().filter(|(_, s)| &s.team == team).map(|(id, _)| *id).collect();
        (finished, teams)
    }

    /// The context of `objective_id` from its run and the objectives [`RunContext::needs`]
    /// names (one missing from `objectives` adds nothing).
    pub fn of(run: &Run, objective_id: ObjectiveId, objectives: &HashMap<ObjectiveId, Objective>) -> Self {
        let mut context = RunContext {
            title: run.title.clone(),
            requirement: run.requirement.clone(),
            inputs: String::new(),
            feedback: String::new(),
            artifacts: BTreeMap::new(),
            team_spent_usd: 0.0,
        };
        let Some((completions, feedback)) = run.known_at_start(objective_id) else { return context };
        context.feedback = feedback.unwrap_or_default().to_string();
        for completion in completions {
            let Some(objective) = objectives.get(&completion.objective_id) else { continue };
            for (path, sha) in &objective.artifacts {
                context.artifacts.insert(path.clone(), sha.clone());
            }
            if let Some((reasoning, artifacts)) = &objective.completed_with {
                context.inputs.push_str(&format!(
                    "### {}\n{reasoning}\nArtifacts (in your workspace): {}\n\n",
                    completion.stage,
                    artifacts.join(", ")
                ));
            }
        }
        let (_, team) = Self::needs(run, objective_id);
        context.team_spent_usd = team.iter().filter_map(|id| objectives.get(id)).map(|o| o.spent_usd).sum();
        context
    }

    /// The objective's prompt: the team's template filled with the run's context.
    pub fn prompt(&self, team: &crate::catalog::Team, iteration: u32, max_iterations: u32) -> String {
        team.objective_prompt(&ObjectiveContext {
            title: &self.title,
            requirement: &self.requirement,
            inputs: &self.inputs,
            feedback: &self.feedback,
            iteration,
            max_iterations,
        })
    }

    /// Every artifact of the completed stages: path -> content digest (the latest wins).
    pub fn artifacts(&self) -> &BTreeMap<String, String> {
        &self.artifacts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::Aggregate;
    use factory_domain::objective::{ModelCalled, ObjectiveAssigned, ObjectiveCompleted, TaskResultRecorded};
    use factory_domain::run::{RequirementSubmitted, ReviewDecision, RunReviewed, StageCompleted, StageStarted};
    use factory_domain::{ObjectiveEvent, RunEvent, RunId, TaskResult};

    fn started(stage: &str, team: &str, objective_id: ObjectiveId) -> RunEvent {
        RunEvent::StageStarted(StageStarted { stage: stage.into(), team: team.into(), objective_id })
    }

    fn completed(stage: &str, objective_id: ObjectiveId) -> RunEvent {
        RunEvent::StageCompleted(StageCompleted { stage: stage.into(), objective_id })
    }

    /// An objective of `team` that cost `cost_usd`, produced `artifact` and, when `reasoning`
    /// is given, completed with it.
    fn objective(team: &str, cost_usd: f64, artifact: (&str, &str), reasoning: Option<&str>) -> Objective {
        let mut objective = Objective::default();
        let mut events = vec![
            ObjectiveEvent::ObjectiveAssigned(ObjectiveAssigned {
                objective_id: ObjectiveId::new(),
                run_id: RunId::new(),
                stage: team.into(),
                team: team.into(),
                instructions: "work".into(),
                max_iterations: 3,
                claimed_by: None,
            }),
            ObjectiveEvent::ModelCalled(ModelCalled {
                alias: "factory/fast".into(),
                provider: "scripted".into(),
                model: "scripted-fast".into(),
                input_tokens: 1,
                output_tokens: 1,
                cost_usd,
                latency_ms: 0,
                outcome: "ok".into(),
                failed_targets: Vec::new(),
                request_digest: String::new(),
                response: String::new(),
            }),
            ObjectiveEvent::ArtifactProduced(ArtifactProduced {
                path: artifact.0.into(),
                sha256: artifact.1.into(),
                bytes: 1,
                media_type: "text/markdown".into(),
            }),
        ];
        if let Some(reasoning) = reasoning {
            let result = TaskResult { artifacts: vec![artifact.0.into()], ..TaskResult::new(TaskStatus::Complete, reasoning) };
            events.push(ObjectiveEvent::TaskResultRecorded(TaskResultRecorded { idempotency_key: "k".into(), iteration: 1, result }));
            events.push(ObjectiveEvent::ObjectiveCompleted(ObjectiveCompleted { iterations: 1 }));
        }
        events.into_iter().for_each(|e| objective.apply(e));
        objective
    }

    #[test]
    fn a_team_is_told_what_the_run_knew_when_its_stage_started_and_nothing_that_ended_later() {
        let (ba, design, ba_again, review_fix) = (ObjectiveId::new(), ObjectiveId::new(), ObjectiveId::new(), ObjectiveId::new());
        let mut run = Run::default();
        let submitted = RunEvent::RequirementSubmitted(RequirementSubmitted {
            title: "Shortener".into(),
            requirement: "Build a URL shortener".into(),
            pipeline: "p".into(),
            pipeline_definition: String::new(),
            auto_approve: true,
            submitted_by: "tester".into(),
            submitted_at: chrono::Utc::now(),
        });
        let review = RunEvent::RunReviewed(RunReviewed {
            decision: ReviewDecision::Revise { feedback: "Add expiry".into() },
            reviewer: "tester".into(),
        });
        // ba and design in parallel; ba completes, then `fix` starts (team of ba), then
        // design completes; a review comes after.
        for event in [
            submitted,
            started("ba", "ba-team", ba),
            started("design", "design-team", design),
            completed("ba", ba),
            started("fix", "ba-team", ba_again),
            completed("design", design),
            review,
            started("review-fix", "ba-team", review_fix),
        ] {
            run.apply(event);
        }
        let objectives: HashMap<ObjectiveId, Objective> = [
            (ba, objective("ba-team", 0.25, ("req.md", "aa"), Some("requirements found"))),
            (design, objective("design-team", 1.0, ("arch.md", "bb"), Some("designed"))),
            (ba_again, objective("ba-team", 0.5, ("req.md", "cc"), None)),
            (review_fix, objective("ba-team", 0.0, ("x.md", "dd"), None)),
        ]
        .into();

        let (finished, team) = RunContext::needs(&run, ba_again);
        assert_eq!(finished, [ba], "only the completion known when it started");
        assert_eq!(team.len(), 3, "the team's objectives: {team:?}");
        let context = RunContext::of(&run, ba_again, &objectives);
        assert_eq!(context.requirement, "Build a URL shortener");
        assert!(context.inputs.contains("### ba\nrequirements found\nArtifacts (in your workspace): req.md"), "{}", context.inputs);
        assert!(!context.inputs.contains("designed"), "design ended after the stage started: {}", context.inputs);
        assert_eq!(context.artifacts(), &BTreeMap::from([("req.md".to_string(), "aa".to_string())]));
        assert_eq!(context.feedback, "", "the review came later");
        assert_eq!(context.team_spent_usd, 0.75, "everything the team spent, this objective's earlier attempts included");

        let later = RunContext::of(&run, review_fix, &objectives);
        assert!(later.inputs.find("### ba").unwrap() < later.inputs.find("### design").unwrap(), "in the order they completed");
        assert_eq!(later.artifacts().len(), 2);
        assert_eq!(later.feedback, "Add expiry");

        let unknown = RunContext::of(&run, ObjectiveId::new(), &objectives);
        assert!(unknown.inputs.is_empty() && unknown.artifacts().is_empty());
    }
}
