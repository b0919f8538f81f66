//! The orchestrator: a process manager. It reads events from `FACTORY_EVENTS` (a durable
//! consumer) and answers with commands; it keeps no state of its own, so any instance can
//! pick up where another stopped. Every decision is recomputed from the run's aggregate.
//!
//! * A submitted run, a completed or skipped stage, a revision: start the stages whose
//!   inputs are done (each an objective, assigned and put on `FACTORY_WORK` for its team,
//!   or handed to this process's worker in memory, see [`crate::handoff`]), or finish the run (review gate, or completed with `auto_approve`).
//! * A completed objective completes its stage; a blocked one blocks the run; a
//!   NEEDS_CLARIFICATION answer pauses the run.
//!
//! Redelivered events are harmless: starting a started stage is refused (and its objective
//! is re-assigned and re-published, which are no-ops: the assignment is refused, and the work
//! message carries `Nats-Msg-Id` = objective id).
//!
//! **Fast path.** Events committed by this process's own store (its workers' results, its
//! own commands) are also taken in memory the moment they commit ([`Store::subscribe_committed`]),
//! a relay round trip sooner than the stream brings them. The stream stays the delivery that
//! counts: the stream's copy of an event already handled in memory is acked without being
//! handled again, and anything the fast path missed (a lagging receiver, another process's
//! event, a restart) comes through the stream as before. Handling is decided from the
//! aggregates' current state, so handling an event twice, or in memory before the stream's
//! copy of an earlier one arrives, changes nothing.

use crate::handoff::{Ahead, Claim, LocalWork, Outcome, Tell};
use crate::pipeline::Pipeline;
use async_nats::jetstream::{self, AckKind, consumer::pull};
use factory_commands::store::CommitError;
use factory_commands::{CommandError, Committed, Store};
use factory_domain::run::StageState;
use factory_domain::{
    ObjectiveCommand, ObjectiveError, ObjectiveId, RunCommand, RunError, RunId, RunStatus, TaskStatus,
};
use factory_nats::{EventEnvelope, Topology};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// A message on `FACTORY_WORK`: one objective for one team.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkItem {
    pub objective_id: ObjectiveId,
    pub run_id: RunId,
    pub stage: String,
    pub team: String,
    pub alias: String,
    pub max_iterations: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error("JetStream failed")]
    Stream(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the event store failed")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The event cannot be acted on however often it comes back (an aggregate id that is
    /// not an objective id, say): its stream copy is terminated.
    #[error("the event is malformed: {0}")]
    Malformed(String),
    #[error("run {run} has an invalid pipeline")]
    Pipeline {
        run: RunId,
        #[source]
        source: crate::pipeline::PipelineError,
    },
}

fn store_err<E: std::error::Error + Send + Sync + 'static>(e: CommandError<E>) -> OrchestratorError {
    OrchestratorError::Store(Box::new(e))
}

fn stream_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> OrchestratorError {
    OrchestratorError::Stream(e.into())
}

/// The events the orchestrator reacts to (see [`Orchestrator::react`]); its consumer is
/// given only these.
pub const REACTS_TO: [(&str, &str); 8] = [
    ("run", "RequirementSubmitted"),
    ("run", "StageCompleted"),
    ("run", "StageSkipped"),
    ("run", "StagesReopened"),
    ("run", "RunReviewed"),
    ("objective", "ObjectiveCompleted"),
    ("objective", "ObjectiveBlocked"),
    ("objective", "TaskResultRecorded"),
];

fn reacts_to(aggregate_type: &str, event_type: &str) -> bool {
    REACTS_TO.iter().any(|&(a, e)| a == aggregate_type && e == event_type)
}

/// Runs whose events one orchestrator handles at once; past this, a run with events to
/// handle waits for another to have nothing left.
const RUNS_AT_ONCE: usize = 256;

/// Events remembered as handled in memory, waiting for their stream copies; past this all
/// are forgotten (the copies are then handled again, which is harmless).
const HANDLED_IN_MEMORY: usize = 200_000;

/// How an event reached the orchestrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// From `FACTORY_EVENTS`: the delivery that counts, acked once handled.
    Stream,
    /// From this process's store as it committed (the fast path); its stream copy follows.
    InMemory,
}

/// An event to handle: from the stream, or one this process just committed.
enum Delivery {
    Stream(jetstream::Message),
    Local(Arc<Committed>),
}

/// The events of each run being handled, waiting their turn: a run's events are handled one
/// at a time, in the order they came, by the task that took its first; other runs' go on
/// beside it. (Fixed lanes shared by several runs made a burst of submissions wait behind
/// one another's commits: a run's first stage started up to half a second after it was
/// submitted, with 200 submitted at once.)
struct RunQueues<D> {
    waiting: std::sync::Mutex<HashMap<String, VecDeque<D>>>,
}

impl<D> Default for RunQueues<D> {
    fn default() -> Self {
        Self { waiting: std::sync::Mutex::new(HashMap::new()) }
    }
}

impl<D> RunQueues<D> {
    /// Queues `delivery` behind the run's events being handled; none being handled, it is
    /// given back for the caller to handle (and the run is marked as being handled).
    fn push(&self, run: &str, delivery: D) -> Option<D> {
        let mut waiting = self.waiting.lock().expect("not poisoned");
        match waiting.get_mut(run) {
            Some(queue) => {
                queue.push_back(delivery);
                None
            }
            None => {
                waiting.insert(run.to_string(), VecDeque::new());
                Some(delivery)
            }
        }
    }

    /// The run's next event to handle; none left, the run is no longer being handled.
    fn next(&self, run: &str) -> Option<D> {
        let mut waiting = self.waiting.lock().expect("not poisoned");
        let next = waiting.get_mut(run).and_then(VecDeque::pop_front);
        if next.is_none() {
            waiting.remove(run);
        }
        next
    }
}

/// Events handled in memory, by aggregate and sequence, until their stream copies come.
#[derive(Default)]
struct HandledInMemory(std::sync::Mutex<HashSet<(String, i64)>>);

impl HandledInMemory {
    fn insert(&self, event: &Committed) {
        let mut handled = self.0.lock().expect("not poisoned");
        if handled.len() >= HANDLED_IN_MEMORY {
            handled.clear();
        }
        handled.insert((event.aggregate_id.clone(), event.sequence));
    }

    /// Whether the event was handled in memory (forgotten now: its copy has come).
    fn take(&self, aggregate_id: &str, sequence: i64) -> bool {
        let mut handled = self.0.lock().expect("not poisoned");
        handled.remove(&(aggregate_id.to_string(), sequence))
    }
}

/// What the orchestrator needs of an event, wherever it came from.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub run_id: Option<RunId>,
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    /// The event's sequence within its aggregate.
    pub sequence: i64,
    pub event_type: &'a str,
    pub payload: &'a serde_json::Value,
}

impl<'a> From<&'a EventEnvelope> for Seen<'a> {
    fn from(e: &'a EventEnvelope) -> Self {
        Self {
            run_id: e.run_id.map(RunId),
            aggregate_type: &e.aggregate_type,
            aggregate_id: &e.aggregate_id,
            sequence: e.sequence,
            event_type: &e.event_type,
            payload: &e.payload,
        }
    }
}

impl<'a> Seen<'a> {
    /// An event committed in this process, with its payload parsed by the caller.
    fn committed(e: &'a Committed, payload: &'a serde_json::Value) -> Self {
        Self {
            run_id: Some(e.run_id),
            aggregate_type: &e.aggregate_type,
            aggregate_id: &e.aggregate_id,
            sequence: e.sequence,
            event_type: &e.event_type,
            payload,
        }
    }
}

pub struct Orchestrator {
    store: Arc<Store>,
    js: jetstream::Context,
    topology: Topology,
    /// The fast path's subscription, taken when made: what the store commits from then on
    /// is seen in memory, even before the first consume.
    local: std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<Arc<Committed>>>>,
    /// This process's worker, to hand the objectives it starts to (see [`crate::handoff`]).
    handoff: Option<Arc<LocalWork>>,
}

impl Orchestrator {
    pub fn new(store: Arc<Store>, js: jetstream::Context, topology: Topology) -> Self {
        let local = std::sync::Mutex::new(Some(store.subscribe_committed()));
        Self { store, js, topology, local, handoff: None }
    }

    /// Hands the objectives it starts for teams this process's worker serves to that worker
    /// in memory (see [`crate::handoff`]).
    pub fn with_local_work(mut self, local: Arc<LocalWork>) -> Self {
        self.handoff = Some(local);
        self
    }

    /// Runs until dropped; errors are logged and retried.
    pub async fn run(self) {
        loop {
            if let Err(error) = self.consume().await {
                tracing::warn!(error = %error, "orchestrator interrupted; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    async fn consume(&self) -> Result<(), OrchestratorError> {
        let stream = self.js.get_stream(&self.topology.events_stream).await.map_err(stream_err)?;
        // Created, or updated to this configuration (an older one took every event).
        let consumer = stream
            .create_consumer(
                pull::Config {
                    durable_name: Some("orchestrator".into()),
                    filter_subjects: REACTS_TO
                        .iter()
                        .map(|(aggregate_type, event_type)| self.topology.event_type_filter(aggregate_type, event_type))
                        .collect(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    ..Default::default()
                },
            )
            .await
            .map_err(stream_err)?;
        // Subscribed before the stream is read (at construction for the first consume): what
        // is committed from then on is in one or the other, or both.
        let taken = self.local.lock().expect("not poisoned").take();
        let mut local = Some(taken.unwrap_or_else(|| self.store.subscribe_committed()));
        let mut messages = consumer.messages().await.map_err(stream_err)?;
        // Runs are independent: each run's events are handled in order (and this process's
        // own in commit order), one at a time, and runs side by side, none waiting behind
        // another's (see `RunQueues`).
        let queues = RunQueues::default();
        let handled = HandledInMemory::default();
        let mut active = futures::stream::FuturesUnordered::new();
        // Runs with events to handle and no task yet, in the order they came: each gets one
        // while fewer than `RUNS_AT_ONCE` run, else when another has nothing left. Events are
        // read on meanwhile, so that the in-memory feed does not fall behind (its events would
        // then come from the stream, each to be loaded again).
        let mut ready: VecDeque<(String, Delivery)> = VecDeque::new();
        let start_ready = |active: &mut futures::stream::FuturesUnordered<_>, ready: &mut VecDeque<(String, Delivery)>| {
            while active.len() < RUNS_AT_ONCE
                && let Some((run, first)) = ready.pop_front()
            {
                active.push(self.drain(run, first, &queues, &handled));
            }
        };
        let fed = loop {
            start_ready(&mut active, &mut ready);
            tokio::select! {
                Some(()) = active.next(), if !active.is_empty() => {}
                message = messages.next() => {
                    let message = match message {
                        Some(Ok(message)) => message,
                        Some(Err(error)) => break Err(stream_err(error)),
                        None => break Ok(()),
                    };
                    let run = self.run_of_subject(&message.subject).to_string();
                    if let Some(first) = queues.push(&run, Delivery::Stream(message)) {
                        ready.push_back((run, first));
                    }
                }
                event = async { local.as_mut().expect("guarded").recv().await }, if local.is_some() => match event {
                    Ok(event) => {
                        if !reacts_to(&event.aggregate_type, &event.event_type) {
                            continue;
                        }
                        let run = event.run_id.to_string();
                        if let Some(first) = queues.push(&run, Delivery::Local(event)) {
                            ready.push_back((run, first));
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "fast path fell behind; the stream brings those events");
                    }
                    // Without the fast path the stream still brings everything.
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => local = None,
                },
            }
        };
        // The stream ended (or failed): what is being handled, or waits its turn, is finished
        // first.
        loop {
            start_ready(&mut active, &mut ready);
            if active.next().await.is_none() {
                break;
            }
        }
        fed
    }

    /// Handles `first`, then whatever comes for `run` meanwhile, until nothing is left.
    async fn drain(&self, run: String, first: Delivery, queues: &RunQueues<Delivery>, handled: &HandledInMemory) {
        let mut next = Some(first);
        while let Some(delivery) = next {
            match delivery {
                Delivery::Stream(message) => {
                    if let Err(error) = self.settle(message, handled).await {
                        tracing::warn!(error = %error, "event not settled; it will be redelivered");
                    }
                }
                Delivery::Local(event) => match self.react_committed(&event).await {
                    Ok(()) => handled.insert(&event),
                    // The stream's copy will be handled (and retried) as usual.
                    Err(error) => tracing::debug!(error = %error, event = %event.event_type, "in-memory event not handled; the stream's copy will be"),
                },
            }
            next = queues.next(&run);
        }
    }

    /// The run an event's subject names (its token after the prefix).
    fn run_of_subject<'s>(&self, subject: &'s str) -> &'s str {
        subject
            .strip_prefix(self.topology.events_prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|rest| rest.split('.').next())
            .unwrap_or(subject)
    }

    /// One event from the stream: handled (unless it already was, in memory), then acked;
    /// or handed back for redelivery.
    async fn settle(&self, message: jetstream::Message, handled: &HandledInMemory) -> Result<(), OrchestratorError> {
        // A copy of an event handled in memory is known by its `Nats-Msg-Id`
        // (`<aggregate_type>:<aggregate_id>:<sequence>`), without parsing the event.
        let identity = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("Nats-Msg-Id"))
            .and_then(|id| {
                let (rest, sequence) = id.as_str().rsplit_once(':')?;
                Some((rest.split_once(':')?.1, sequence.parse::<i64>().ok()?))
            });
        if identity.is_some_and(|(aggregate_id, sequence)| handled.take(aggregate_id, sequence)) {
            message.ack().await.map_err(stream_err)?;
            return Ok(());
        }
        let envelope: EventEnvelope = match serde_json::from_slice(&message.payload) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::error!(subject = %message.subject, %error, "not an event envelope; terminated");
                message.ack_with(AckKind::Term).await.map_err(stream_err)?;
                return Ok(());
            }
        };
        if handled.take(&envelope.aggregate_id, envelope.sequence) {
            message.ack().await.map_err(stream_err)?;
            return Ok(());
        }
        match self.handle(&envelope).await {
            Ok(()) => message.ack().await.map_err(stream_err)?,
            Err(error @ OrchestratorError::Malformed(_)) => {
                tracing::error!(position = envelope.position, event = %envelope.event_type, error = %error, "event cannot be handled; terminated");
                message.ack_with(AckKind::Term).await.map_err(stream_err)?;
            }
            Err(error) => {
                tracing::warn!(position = envelope.position, event = %envelope.event_type, error = %error, "event not handled; redelivering");
                message.ack_with(AckKind::Nak(Some(Duration::from_millis(500)))).await.map_err(stream_err)?;
            }
        }
        Ok(())
    }

    /// What one event from the stream causes.
    pub async fn handle(&self, event: &EventEnvelope) -> Result<(), OrchestratorError> {
        self.react(Seen::from(event), Delivered::Stream).await
    }

    /// What one event committed in this process causes (its payload parsed only now: the
    /// store tells every event, this takes the few it reacts to).
    async fn react_committed(&self, event: &Committed) -> Result<(), OrchestratorError> {
        let payload = event.payload().map_err(|e| OrchestratorError::Malformed(e.to_string()))?;
        self.react(Seen::committed(event, &payload), Delivered::InMemory).await
    }

    /// What one event causes.
    pub async fn react(&self, event: Seen<'_>, delivered: Delivered) -> Result<(), OrchestratorError> {
        let Some(run_id) = event.run_id else { return Ok(()) };
        let sequence = usize::try_from(event.sequence).unwrap_or(0);
        match (event.aggregate_type, event.event_type) {
            ("run", "RequirementSubmitted" | "StageCompleted" | "StageSkipped" | "StagesReopened") => {
                self.step(run_id, sequence, None, delivered).await
            }
            ("run", "RunReviewed") if event.payload["decision"] == "REVISE" => self.revise(run_id, sequence).await,
            ("objective", "TaskResultRecorded")
                if event.payload["result"]["status"] != serde_json::json!(TaskStatus::NeedsClarification) =>
            {
                Ok(())
            }
            ("objective", event_type @ ("ObjectiveCompleted" | "ObjectiveBlocked" | "TaskResultRecorded")) => {
                let objective_id = objective_id_of(event)?;
                let stage = self
                    .store
                    .changes()
                    .objective_at_least(objective_id, run_id, sequence)
                    .await
                    .map_err(store_err)?
                    .stage
                    .clone();
                match reaction(event_type, event.payload, stage, objective_id) {
                    // The worker's commit that ended the objective took this step too (see
                    // `stage_end`): nothing left to do for the copy told in memory.
                    Some(RunCommand::CompleteStage { stage, .. })
                        if delivered == Delivered::InMemory && self.stage_completed_by(run_id, &stage, objective_id) =>
                    {
                        Ok(())
                    }
                    // The stage's completion and what it makes ready, in one commit.
                    Some(command @ RunCommand::CompleteStage { .. }) => self.step(run_id, 0, Some(command), delivered).await,
                    Some(command) => self.run_command(run_id, command).await,
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// Whether the run, as this process remembers it, has `stage` completed by `objective_id`.
    fn stage_completed_by(&self, run_id: RunId, stage: &str, objective_id: ObjectiveId) -> bool {
        self.store
            .with_remembered_run(run_id, |run| {
                matches!(run.stages.get(stage), Some(StageState::Completed { objective_id: done, .. }) if *done == objective_id)
            })
            .unwrap_or(false)
    }

    /// A command whose refusal means "already done or no longer relevant" (a redelivery, or a
    /// run that moved on): logged, not retried.
    async fn run_command(&self, run_id: RunId, command: RunCommand) -> Result<(), OrchestratorError> {
        match self.store.execute_run(run_id, command).await {
            Ok(()) => Ok(()),
            Err(CommandError::Refused(reason)) => {
                tracing::debug!(%run_id, %reason, "command refused; nothing to do");
                Ok(())
            }
            Err(other) => Err(store_err(other)),
        }
    }

    /// A revision sends the run back to the pipeline's revision stage: it and everything
    /// downstream run again, with the feedback in their context. Bounded by the pipeline.
    async fn revise(&self, run_id: RunId, sequence: usize) -> Result<(), OrchestratorError> {
        let run = self.store.changes().run_at_least(run_id, sequence).await.map_err(store_err)?.clone();
        // Only once per review: a second delivery of it finds the stages already reopened
        // (and perhaps done again), and must not reopen them a second time.
        if run.status != RunStatus::Running || !run.revision_pending {
            return Ok(());
        }
        let command = match run_pipeline(&run) {
            Ok(pipeline) => revision(&run, &pipeline),
            Err(reason) => RunCommand::FailRun { reason },
        };
        self.run_command(run_id, command).await
    }

    /// `first` (a stage's completion), if any, then what the run needs next: the stages now
    /// ready started and their objectives assigned, or the run finished; all in one commit.
    /// Then the new objectives' work is queued. With `first` refused there is nothing to do.
    /// `at_least` is the run's sequence the caller has seen.
    async fn step(&self, run_id: RunId, at_least: usize, first: Option<RunCommand>, delivered: Delivered) -> Result<(), OrchestratorError> {
        let mut attempt = 0;
        let dispatches = loop {
            attempt += 1;
            let mut changes = self.store.changes();
            if let Some(command) = &first {
                match changes.execute_run(run_id, command.clone()).await {
                    Ok(()) => {}
                    // From the stream, a completion already recorded may be the redelivery of
                    // one whose step committed but whose work never reached the queue (the
                    // publish failed): go on, and queue the stages in progress again.
                    Err(CommandError::Refused(reason)) if delivered == Delivered::Stream => {
                        tracing::debug!(%run_id, %reason, "command refused; queueing the stages in progress again");
                    }
                    Err(CommandError::Refused(reason)) => {
                        tracing::debug!(%run_id, %reason, "command refused; nothing to do");
                        return Ok(());
                    }
                    Err(other) => return Err(store_err(other)),
                }
            }
            let run = changes.run_at_least(run_id, at_least).await.map_err(store_err)?.clone();
            let mut dispatches = Vec::new();
            if run.status == RunStatus::Running {
                // Stages in progress (started, not done) are queued again (a no-op when they
                // were): on the stream's deliveries, since a crash, or a failed publish, may
                // have come between the commit that started a stage and its work reaching the
                // queue, and then the event is redelivered; and after a conflict, since the
                // writer that won may have started stages and died before queueing them.
                let requeue = delivered == Delivered::Stream || attempt > 1;
                plan(&mut changes, run_id, &run, requeue, &mut dispatches, self.handoff.as_deref()).await?;
            }
            match commit_handing_over(run_id, &mut dispatches, self.handoff.as_deref(), changes, |_| {}).await {
                Ok(()) => break dispatches,
                Err(CommitError::Conflict) if self.store.pause_after_conflict(attempt).await => {
                    tracing::debug!(%run_id, attempt, "concurrent write; deciding again on fresh state");
                }
                Err(error) => return Err(store_err(CommandError::<RunError>::from(error))),
            }
        };
        for dispatch in &dispatches {
            if dispatch.queued_again {
                // Assigned in the commit that started it, save for runs written before
                // starting and assigning were one commit (then a no-op when assigned).
                let objective = self.store.changes().objective_at_least(dispatch.objective_id, run_id, 1).await.map_err(store_err)?.status;
                if objective != factory_domain::objective::ObjectiveStatus::New {
                    continue;
                }
                let assign = assignment(run_id, dispatch.objective_id, &dispatch.stage, None);
                match self.store.execute_objective(dispatch.objective_id, run_id, assign).await {
                    Ok(()) | Err(CommandError::Refused(ObjectiveError::AlreadyAssigned)) => {}
                    Err(other) => return Err(store_err(other)),
                }
            }
        }
        queue(&self.js, &self.topology, run_id, &dispatches).await
    }

}

/// Work to queue after a commit: a stage's objective.
pub(crate) struct Dispatch {
    pub(crate) objective_id: ObjectiveId,
    pub(crate) stage: crate::pipeline::Stage,
    /// Started earlier (queued before, perhaps): its assignment is made sure of first.
    pub(crate) queued_again: bool,
    /// Claimed for this process's worker: handed to it in memory once committed.
    pub(crate) claim: Option<Claim>,
    /// Handed over in memory ([`hand_over`]): no work message is queued for it.
    pub(crate) handed: bool,
}

/// Stages the run's next step into `changes` (see [`Orchestrator::step`] and [`stage_end`]), listing the
/// work to queue once committed.
pub(crate) async fn plan(
    changes: &mut factory_commands::store::Changes<'_>,
    run_id: RunId,
    run: &factory_domain::Run,
    requeue: bool,
    dispatches: &mut Vec<Dispatch>,
    handoff: Option<&LocalWork>,
) -> Result<(), OrchestratorError> {
    let pipeline = match run_pipeline(run) {
        Ok(pipeline) => pipeline,
        Err(reason) => {
            tracing::warn!(%run_id, %reason, "failing the run");
            return stage_run_command(changes, run_id, RunCommand::FailRun { reason }).await;
        }
    };
    if requeue {
        dispatches.extend(in_progress(run, &pipeline));
    }
    match next_step(run, &pipeline) {
        Next::Finish(command) => stage_run_command(changes, run_id, command).await,
        Next::Start(stages) => {
            for stage in stages {
                let objective_id = ObjectiveId::new();
                let command = RunCommand::StartStage {
                    stage: stage.name.clone(),
                    team: stage.team.clone(),
                    objective_id,
                };
                match changes.execute_run(run_id, command).await {
                    Ok(()) => {
                        changes.new_objective(objective_id, run_id);
                        let claim = handoff.and_then(|local| local.try_claim(&stage.team));
                        let claimed_by = claim.as_ref().and(handoff).map(|local| local.instance().to_string());
                        changes
                            .execute_objective(objective_id, run_id, assignment(run_id, objective_id, stage, claimed_by))
                            .await
                            .map_err(store_err)?;
                        dispatches.push(Dispatch { objective_id, stage: stage.clone(), queued_again: false, claim, handed: false });
                    }
                    Err(CommandError::Refused(RunError::StageAlreadyStarted(_))) => {
                        // Started by another handling of this event (another orchestrator,
                        // say), which may have died before queueing the work. Queueing it
                        // again is a no-op if it did not.
                        if let Some(StageState::InProgress { objective_id, .. }) =
                            changes.run(run_id).await.map_err(store_err)?.stages.get(&stage.name)
                            && !requeue
                        {
                            dispatches.push(Dispatch::again(*objective_id, stage));
                        }
                    }
                    Err(CommandError::Refused(RunError::StageFinished(_))) => {}
                    Err(CommandError::Refused(reason)) => {
                        tracing::debug!(%run_id, %reason, "stage not started");
                    }
                    Err(other) => return Err(store_err(other)),
                }
            }
            Ok(())
        }
    }
}


/// Commits `changes`, the unit that claims `dispatches`' objectives for this process's
/// worker, and hands those over to it (see [`crate::handoff`]): ahead of the commit when the
/// store is otherwise idle ([`hand_over_ahead`], told the outcome), else right after it.
/// Also when the outcome is not known (the append may have committed): so that no objective
/// stays claimed by this live process with nobody working it; an attempt whose objective
/// shows no assignment ends without working it. Not after a conflict: nothing was written,
/// and the claims are let go with the dispatches.
///
/// `on_commit` is called with the commit's result as soon as it is known, before the work
/// handed over ahead hears it (a worker frees its run's lane there, see [`crate::lanes`]).
pub(crate) async fn commit_handing_over(
    run_id: RunId,
    dispatches: &mut [Dispatch],
    handoff: Option<&LocalWork>,
    changes: factory_commands::store::Changes<'_>,
    on_commit: impl FnOnce(&Result<(), CommitError>),
) -> Result<(), CommitError> {
    let tell = hand_over_ahead(run_id, dispatches, handoff, &changes);
    let committed = changes.commit().await;
    on_commit(&committed);
    if let Some(tell) = tell {
        tell.tell(outcome_of(&committed));
    }
    if !matches!(committed, Err(CommitError::Conflict)) {
        hand_over(run_id, dispatches, handoff);
    }
    committed
}

/// Hands the objectives claimed for this process's worker to it (see [`crate::handoff`]),
/// right before `changes`, the unit that claims them, is committed, when nothing else of
/// the store is being appended: the work starts from what the commit writes while it is in
/// flight (see [`crate::handoff::Ahead`]). The caller tells the commit's outcome with what
/// this returns (dropped untold, the work asks the store). `None`: nothing was claimed, or
/// the store is busy and what was claimed is handed over after the commit ([`hand_over`]).
///
/// Only then: with other appends in flight the cores are busy, and work started ahead
/// only slows the commits it overlaps (in `bench pipeline`, 5% fewer stages/s at 200 runs
/// and slower 17-stage runs when every hand-over went ahead).
fn hand_over_ahead(
    run_id: RunId,
    dispatches: &mut [Dispatch],
    handoff: Option<&LocalWork>,
    changes: &factory_commands::store::Changes<'_>,
) -> Option<Tell> {
    let local = handoff?;
    if dispatches.iter().all(|dispatch| dispatch.claim.is_none()) || changes.others_appending() {
        return None;
    }
    let (ahead, tell) = Ahead::new(changes.staged());
    for dispatch in dispatches.iter_mut() {
        if let Some(claim) = dispatch.claim.take() {
            let item = WorkItem::new(run_id, dispatch.objective_id, &dispatch.stage);
            dispatch.handed = local.hand_off(claim, item, Some(ahead.clone()));
        }
    }
    Some(tell)
}

/// Hands the objectives claimed for this process's worker, and not handed over ahead of the
/// commit, to it. Called right after the commit that claimed them, before anything that
/// can fail: a claim committed and never handed over would leave the objective to a worker
/// that does not know of it (until the sweep took this process for dead).
fn hand_over(run_id: RunId, dispatches: &mut [Dispatch], handoff: Option<&LocalWork>) {
    for dispatch in dispatches.iter_mut() {
        if let (Some(claim), Some(local)) = (dispatch.claim.take(), handoff) {
            dispatch.handed = local.hand_off(claim, WorkItem::new(run_id, dispatch.objective_id, &dispatch.stage), None);
        }
    }
}

/// What a commit's result tells the work handed over ahead of it.
pub fn outcome_of(result: &Result<(), CommitError>) -> Outcome {
    match result {
        Ok(()) => Outcome::Committed,
        Err(CommitError::Conflict) => Outcome::Refused,
        Err(CommitError::Store(_)) => Outcome::Unknown,
    }
}

/// Puts the objectives' work on their teams' queues, all but those handed over in memory
/// (after [`commit_handing_over`]; see [`crate::handoff`]).
pub(crate) async fn queue(js: &jetstream::Context, topology: &Topology, run_id: RunId, dispatches: &[Dispatch]) -> Result<(), OrchestratorError> {
    let items: Vec<WorkItem> = dispatches
        .iter()
        .filter(|dispatch| !dispatch.handed)
        .map(|dispatch| WorkItem::new(run_id, dispatch.objective_id, &dispatch.stage))
        .collect();
    publish(js, topology, &items).await
}

/// Puts work items on their teams' queues (`Nats-Msg-Id` = objective id, so a repeat is
/// dropped), every publish in flight at once.
pub(crate) async fn publish(js: &jetstream::Context, topology: &Topology, items: &[WorkItem]) -> Result<(), OrchestratorError> {
    let mut acks = Vec::with_capacity(items.len());
    for item in items {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", item.objective_id.to_string().as_str());
        let body = serde_json::to_vec(item).map_err(stream_err)?;
        let subject = topology.work_subject(&item.team);
        acks.push(js.publish_with_headers(subject, headers, body.into()).await.map_err(stream_err)?);
    }
    for ack in acks {
        ack.await.map_err(stream_err)?;
    }
    Ok(())
}

impl Dispatch {
    /// A stage started earlier, to queue again.
    fn again(objective_id: ObjectiveId, stage: &crate::pipeline::Stage) -> Self {
        Self { objective_id, stage: stage.clone(), queued_again: true, claim: None, handed: false }
    }
}

/// The work item of `objective_id` while it works `stage` of a run not ended (the sweep
/// queues a dead claimant's work with it); `None` once the stage moved on or the run ended.
pub(crate) fn work_of(run_id: RunId, run: &factory_domain::Run, stage: &str, objective_id: ObjectiveId) -> Option<WorkItem> {
    if run.status.is_terminal() {
        return None;
    }
    let pipeline = run_pipeline(run).ok()?;
    in_progress(run, &pipeline)
        .into_iter()
        .find(|dispatch| dispatch.objective_id == objective_id && dispatch.stage.name == stage)
        .map(|dispatch| WorkItem::new(run_id, objective_id, &dispatch.stage))
}

/// The stages in progress, to queue again (see [`Orchestrator::step`]).
pub(crate) fn in_progress(run: &factory_domain::Run, pipeline: &Pipeline) -> Vec<Dispatch> {
    run.stages
        .iter()
        .filter_map(|(stage_name, state)| match state {
            StageState::InProgress { objective_id, .. } => pipeline
                .stage(stage_name)
                .map(|stage| Dispatch::again(*objective_id, stage)),
            _ => None,
        })
        .collect()
}

/// The stages in progress of a running run, to queue again after a crash may have come
/// between the commit that started them and their work reaching the queue.
pub(crate) fn in_progress_of(run: &factory_domain::Run) -> Vec<Dispatch> {
    match run_pipeline(run) {
        Ok(pipeline) if run.status == RunStatus::Running => in_progress(run, &pipeline),
        _ => Vec::new(),
    }
}

/// What an objective's end means for its run (`command`, from [`follow_up`]), staged into
/// the unit of work that records the end: the orchestrator's own step, taken by the worker
/// in its final commit instead of one commit later. A completion also starts the stages it
/// makes ready (listed in `dispatches`, to queue once committed) or finishes the run. A
/// refusal (the run moved on: cancelled, say) stages nothing for the run.
pub(crate) async fn stage_end(
    changes: &mut factory_commands::store::Changes<'_>,
    run_id: RunId,
    command: RunCommand,
    dispatches: &mut Vec<Dispatch>,
    handoff: Option<&LocalWork>,
) -> Result<(), OrchestratorError> {
    let completion = matches!(command, RunCommand::CompleteStage { .. });
    match changes.execute_run(run_id, command).await {
        Ok(()) => {}
        Err(CommandError::Refused(reason)) => {
            tracing::debug!(%run_id, %reason, "the run takes no step for this end");
            return Ok(());
        }
        Err(other) => return Err(store_err(other)),
    }
    if completion {
        let run = changes.run(run_id).await.map_err(store_err)?.clone();
        if run.status == RunStatus::Running {
            plan(changes, run_id, &run, false, dispatches, handoff).await?;
        }
    }
    Ok(())
}

/// Stages a run command; a refusal ("already done or no longer relevant") stages nothing.
async fn stage_run_command(
    changes: &mut factory_commands::store::Changes<'_>,
    run_id: RunId,
    command: RunCommand,
) -> Result<(), OrchestratorError> {
    match changes.execute_run(run_id, command).await {
        Ok(()) => Ok(()),
        Err(CommandError::Refused(reason)) => {
            tracing::debug!(%run_id, %reason, "command refused; nothing to do");
            Ok(())
        }
        Err(other) => Err(store_err(other)),
    }
}

/// The run's own pipeline (runs submitted before runs carried their pipeline's text fall
/// back to the built-in of that name), or why it cannot be used: then the run fails, as
/// retrying would not change it.
///
/// Parsed once per name and text and kept (every step of a run needs it; runs mostly share
/// a few pipelines): at most [`PARSED_PIPELINES`], then the memory starts over.
fn run_pipeline(run: &factory_domain::Run) -> Result<Arc<Pipeline>, String> {
    type Parsed = std::collections::HashMap<(String, String), Arc<Pipeline>>;
    static PARSED: std::sync::Mutex<Option<Parsed>> = std::sync::Mutex::new(None);
    let key = (run.pipeline.clone(), run.pipeline_definition.clone());
    if let Some(pipeline) = PARSED.lock().expect("not poisoned").as_ref().and_then(|parsed| parsed.get(&key)) {
        return Ok(pipeline.clone());
    }
    let parsed = if run.pipeline_definition.is_empty() {
        Pipeline::builtin(&run.pipeline).ok_or_else(|| crate::pipeline::PipelineError::NotFound(run.pipeline.clone()))
    } else {
        Pipeline::parse(&run.pipeline, &run.pipeline_definition)
    };
    let pipeline = Arc::new(parsed.map_err(|error| format!("the run's pipeline cannot be used: {error}"))?);
    let mut memory = PARSED.lock().expect("not poisoned");
    let parsed = memory.get_or_insert_with(Default::default);
    if parsed.len() >= PARSED_PIPELINES {
        parsed.clear();
    }
    parsed.insert(key, pipeline.clone());
    Ok(pipeline)
}

/// Parsed pipelines kept in memory at most.
const PARSED_PIPELINES: usize = 256;

/// The objective an objective event belongs to (its aggregate id).
fn objective_id_of(event: Seen<'_>) -> Result<ObjectiveId, OrchestratorError> {
    event
        .aggregate_id
        .parse()
        .map_err(|e| OrchestratorError::Malformed(format!("objective id `{}`: {e}", event.aggregate_id)))
}

impl WorkItem {
    pub fn new(run_id: RunId, objective_id: ObjectiveId, stage: &crate::pipeline::Stage) -> Self {
        Self {
            objective_id,
            run_id,
            stage: stage.name.clone(),
            team: stage.team.clone(),
            alias: stage.alias.clone(),
            max_iterations: stage.max_iterations,
        }
    }
}

// ---- decisions: pure functions of a run's state and its pipeline ----
//
// The live orchestrator and the deterministic re-run (`rerun`) decide through these, so a
// re-run checks the very logic that drove the run.

/// What a running run needs next.
#[derive(Debug)]
pub enum Next<'p> {
    /// Every stage is done: complete the run, or wait for review.
    Finish(RunCommand),
    /// Start these stages (their inputs are done); empty while others are in progress.
    Start(Vec<&'p crate::pipeline::Stage>),
}

pub fn next_step<'p>(run: &factory_domain::Run, pipeline: &'p Pipeline) -> Next<'p> {
    if run.revision_pending {
        // Sent back for revision: nothing starts or finishes until its stages are reopened.
        return Next::Start(Vec::new());
    }
    let done: BTreeSet<String> = run
        .stages
        .iter()
        .filter(|(_, s)| matches!(s, StageState::Completed { .. } | StageState::Skipped))
        .map(|(name, _)| name.clone())
        .collect();
    if pipeline.is_finished(&done) {
        return Next::Finish(if run.auto_approve || !pipeline.review() {
            RunCommand::CompleteRun
        } else {
            RunCommand::AwaitReview
        });
    }
    let started: BTreeSet<String> = run.stages.keys().cloned().collect();
    Next::Start(pipeline.ready_stages(&done, &started))
}

/// After a REVISE review: reopen the revision stage and everything downstream, or fail the
/// run past the pipeline's revision limit.
pub fn revision(run: &factory_domain::Run, pipeline: &Pipeline) -> RunCommand {
    if run.revisions > pipeline.max_revisions() {
        let reason = format!("revised {} times; the pipeline allows {}", run.revisions, pipeline.max_revisions());
        return RunCommand::FailRun { reason };
    }
    let stages = pipeline
        .downstream(pipeline.revision_stage())
        .into_iter()
        .map(|s| s.name.clone())
        .filter(|name| run.stages.contains_key(name))
        .collect();
    RunCommand::ReopenStages { stages }
}

/// The objective for a started stage.
pub fn assignment(
    run_id: RunId,
    objective_id: ObjectiveId,
    stage: &crate::pipeline::Stage,
    claimed_by: Option<String>,
) -> ObjectiveCommand {
    ObjectiveCommand::AssignObjective {
        objective_id,
        run_id,
        stage: stage.name.clone(),
        team: stage.team.clone(),
        instructions: format!("{} for stage {}", stage.team, stage.name),
        max_iterations: stage.max_iterations,
        claimed_by,
    }
}

/// What the run does about an objective's end, from the commands that record it (the same
/// as [`reaction`] to the events they write).
pub fn follow_up(commands: &[ObjectiveCommand], stage: &str, objective_id: ObjectiveId) -> Option<RunCommand> {
    commands.iter().rev().find_map(|command| match command {
        ObjectiveCommand::CompleteObjective => Some(RunCommand::CompleteStage { stage: stage.to_string(), objective_id }),
        ObjectiveCommand::BlockObjective { reason } => {
            Some(RunCommand::BlockRun { stage: stage.to_string(), reason: reason.clone(), objective_id })
        }
        ObjectiveCommand::RecordTaskResult { result, .. } if result.status == TaskStatus::NeedsClarification => {
            Some(RunCommand::AwaitClarification {
                stage: stage.to_string(),
                question: result.clarification_needed.clone().unwrap_or_default(),
                objective_id,
            })
        }
        _ => None,
    })
}

/// What the run does about an objective's event (its stage completes, the run blocks or
/// waits for a clarification), given the objective's stage.
pub fn reaction(event_type: &str, payload: &serde_json::Value, stage: String, objective_id: ObjectiveId) -> Option<RunCommand> {
    match event_type {
        "ObjectiveCompleted" => Some(RunCommand::CompleteStage { stage, objective_id }),
        "ObjectiveBlocked" => {
            let reason = payload["reason"].as_str().unwrap_or("blocked").to_string();
            Some(RunCommand::BlockRun { stage, reason, objective_id })
        }
        "TaskResultRecorded" => {
            let status: Option<TaskStatus> = serde_json::from_value(payload["result"]["status"].clone()).ok();
            if status != Some(TaskStatus::NeedsClarification) {
                return None;
            }
            let question = payload["result"]["clarification_needed"].as_str().unwrap_or("").to_string();
            Some(RunCommand::AwaitClarification { stage, question, objective_id })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::RunQueues;

    #[test]
    fn a_runs_events_wait_behind_the_one_being_handled_and_other_runs_do_not() {
        let queues = RunQueues::<u32>::default();
        // The first event of a run is the caller's to handle; the next wait, in order.
        assert_eq!(queues.push("a", 1), Some(1));
        assert_eq!(queues.push("a", 2), None);
        assert_eq!(queues.push("a", 3), None);
        // Another run is not held up by the first.
        assert_eq!(queues.push("b", 10), Some(10));
        assert_eq!(queues.next("a"), Some(2));
        // Still being handled: what comes meanwhile queues behind what waits.
        assert_eq!(queues.push("a", 4), None);
        assert_eq!(queues.next("a"), Some(3));
        assert_eq!(queues.next("a"), Some(4));
        assert_eq!(queues.next("b"), None);
        // Nothing left: the run is let go, and its next event is handled by whoever brings it.
        assert_eq!(queues.next("a"), None);
        assert_eq!(queues.push("a", 5), Some(5));
        assert_eq!(queues.push("b", 11), Some(11));
    }
}
