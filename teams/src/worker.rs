//! Workers: pull objectives from `FACTORY_WORK`, let the team work them, record what
//! happened (model calls, artifacts, the TaskResult) and finish the objective.
//!
//! One durable pull consumer per team (`worker-<team>`), shared by every worker process that
//! serves the team; explicit ack after the result's commands committed; in-progress acks
//! while a model call runs long; after `max_deliver` attempts the objective is blocked. A
//! redelivered message cannot record a second result: the result's idempotency key is the
//! message's stream sequence.

use crate::catalog::{ObjectiveContext, team as team_docs};
use crate::model::ModelProvider;
use crate::operative;
use crate::orchestrator::WorkItem;
use crate::tools::{ToolRegistry, Workspace, granted_tools};
use async_nats::jetstream::{self, AckKind, consumer::pull};
use factory_commands::store::ArtifactContent;
use factory_commands::{CommandError, Store};
use factory_domain::objective::{ArtifactProduced, ObjectiveStatus};
use factory_domain::{ObjectiveCommand, ObjectiveError, TaskStatus};
use factory_nats::{EventEnvelope, Topology};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long a model call's record may wait for the work to end, to go into its final
/// commit (a call's record is otherwise its own commit). A crash within it loses the record
/// of at most this much of an attempt's calls; the attempt itself is redone.
const RECORD_GRACE: Duration = Duration::from_millis(100);

/// How often a working objective checks that its run is still running.
const CANCEL_CHECK: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The teams this worker serves.
    pub teams: Vec<String>,
    /// Where objectives get their scratch workspaces.
    pub work_dir: PathBuf,
    pub ack_wait: Duration,
    /// Deliveries of one message before its objective is blocked.
    pub max_deliver: i64,
    /// Objectives one team works at once in this process (model calls are mostly waiting).
    pub concurrency: usize,
}

impl WorkerOptions {
    pub fn new(teams: Vec<String>, work_dir: PathBuf) -> Self {
        Self { teams, work_dir, ack_wait: Duration::from_secs(30), max_deliver: 5, concurrency: 16 }
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
}

impl Worker {
    pub fn new(
        store: Arc<Store>,
        js: jetstream::Context,
        topology: Topology,
        provider: Arc<dyn ModelProvider>,
        options: WorkerOptions,
    ) -> Self {
        Self { store, js, topology, provider, tools: Arc::new(ToolRegistry::standard()), options }
    }

    /// Serves every team of the options until dropped.
    pub async fn run(self) {
        let tasks: Vec<_> = self
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
        let work = self.process(&item, &key);
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
    pub async fn process(&self, item: &WorkItem, key: &str) -> Result<(), WorkerError> {
        // One read of the run's events answers everything before the work: whether the run
        // ended, where the objective stands, and what the team needs to know.
        let id = item.objective_id.to_string();
        // Every event positioned before the assignment must be visible first: positions are
        // drawn before a transaction commits, so a parallel stage's result can hold a lower
        // position than the assignment and commit after it. Read too soon, the team's
        // context would depend on which commit landed first, and a re-run could not
        // rebuild it. So wait until the appenders running now have ended.
        factory_commands::events::settled_position(self.store.pool()).await.map_err(store_err)?;
        let events = factory_commands::events::run_events_for_team(self.store.pool(), item.run_id.0, &id, &item.team)
            .await
            .map_err(store_err)?;
        let run: factory_domain::Run =
            factory_commands::events::fold(events.iter().filter(|e| e.aggregate_type == "run")).map_err(store_err)?;
        let objective: factory_domain::Objective =
            factory_commands::events::fold(events.iter().filter(|e| e.aggregate_type == "objective" && e.aggregate_id == id))
                .map_err(store_err)?;
        if objective.status != ObjectiveStatus::Assigned || run.status.is_terminal() || objective.result_keys.contains(key) {
            // Finished by another delivery (or this very message's result was recorded, its
            // ack lost), or its run was cancelled or failed meanwhile.
            return Ok(());
        }
        let team = team_docs(&item.team).ok_or_else(|| WorkerError::UnknownTeam(item.team.clone()))?;
        let granted = granted_tools(team.tools).map_err(|e| WorkerError::UnknownTeam(format!("{}: {e}", item.team)))?;
        let run = RunContext::at_assignment(&events, item);

        // A workspace per attempt: two deliveries of one message never share one.
        let dir = self.options.work_dir.join(format!("{}-{}-{}", item.objective_id, key.replace(':', "-"), uuid::Uuid::now_v7()));
        // The earlier stages' artifacts, served from memory (not written into the directory).
        let shas: Vec<&str> = run.artifacts.values().map(String::as_str).collect();
        let contents = self.store.artifact_contents(&shas).await.map_err(store_err)?;
        let workspace =
            Workspace::with_inputs(&dir, workspace_inputs(&run.artifacts, |sha| contents.get(sha).map(|c| c.as_ref().clone())))?;
        let prompt = run.prompt(team, objective.iterations + 1, item.max_iterations);
        // Model calls are recorded as they return, by a task of their own, so that a dying
        // attempt keeps its audit; calls it has not taken when the work ends go into the
        // final commit instead (with a fast model, most of them).
        let calls = Arc::new(CallLog::default());
        let recorder = {
            let (store, calls) = (self.store.clone(), calls.clone());
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
                    let commands = batch.into_iter().map(|call| ObjectiveCommand::RecordModelCall(call.into())).collect();
                    ignore_finished(store.execute_objective_all(objective_id, run_id, commands).await)?;
                }
            })
        };
        // However this function returns, the recorder records what is left and stops.
        let _finish_recording = calls.finisher();
        let on_call = {
            let calls = calls.clone();
            move |call: &operative::ModelCall| calls.push(call.clone())
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
        let outcome = tokio::select! {
            outcome = work => outcome,
            _ = cancelled => {
                tracing::info!(objective = %item.objective_id, "run stopped; work dropped");
                remove_workspace(dir);
                // The calls made so far are recorded before the message is settled.
                calls.finish();
                let _ = recorder.await;
                return Ok(());
            }
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                remove_workspace(dir);
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
        ignore_finished(self.store.record_objective(item.objective_id, item.run_id, commands, contents).await)?;
        remove_workspace(dir);
        Ok(())
    }

    async fn run_has_ended(&self, item: &WorkItem) -> Result<bool, WorkerError> {
        let run = self.store.load_run(item.run_id).await.map_err(store_err)?;
        Ok(run.status.is_terminal())
    }
}

/// Removes an attempt's workspace off the async threads, not waited for: deleting files
/// blocks, and the task woken by the commit just made (the orchestrator's, told in memory)
/// would wait for it on this thread.
fn remove_workspace(dir: PathBuf) {
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

/// What a team needs to know of its run, read from the run's events.
pub struct RunContext {
    title: String,
    requirement: String,
    inputs: String,
    feedback: String,
    /// Every artifact so far: path -> content digest (the latest wins).
    artifacts: BTreeMap<String, String>,
    /// What this objective's team has spent on models in the run so far (its budget).
    pub team_spent_usd: f64,
}

impl RunContext {
    /// What the run knew when the objective was assigned: its events up to the assignment.
    /// Cut there, not at "now", so that what a team sees does not depend on how fast its
    /// parallel siblings are (a deterministic re-run rebuilds the same context).
    pub fn at_assignment(events: &[EventEnvelope], item: &WorkItem) -> Self {
        let id = item.objective_id.to_string();
        let end = events
            .iter()
            .position(|e| e.aggregate_type == "objective" && e.aggregate_id == id && e.sequence == 1)
            .map_or(events.len(), |i| i + 1);
        let mut context = Self::fold(&events[..end], item);
        // The budget counts everything the team has spent, this objective's earlier attempts
        // and parallel work included, not only what was known at the assignment.
        context.team_spent_usd = Self::fold(events, item).team_spent_usd;
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

    /// Every artifact of the run so far: path -> content digest (the latest wins).
    pub fn artifacts(&self) -> &BTreeMap<String, String> {
        &self.artifacts
    }

    /// Folds the run's events (in position order) into what `item`'s team needs to know.
    pub fn fold(events: &[EventEnvelope], item: &WorkItem) -> Self {
        let mut context = RunContext {
            title: String::new(),
            requirement: String::new(),
            inputs: String::new(),
            feedback: String::new(),
            artifacts: BTreeMap::new(),
            team_spent_usd: 0.0,
        };
        let mut team_objectives: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut stage_of: BTreeMap<String, String> = BTreeMap::new();
        for e in events {
            match (e.aggregate_type.as_str(), e.event_type.as_str()) {
                ("run", "RequirementSubmitted") => {
                    context.title = e.payload["title"].as_str().unwrap_or_default().to_string();
                    context.requirement = e.payload["requirement"].as_str().unwrap_or_default().to_string();
                }
                ("run", "RunReviewed") => {
                    if let Some(feedback) = e.payload["feedback"].as_str() {
                        context.feedback = feedback.to_string();
                    }
                }
                ("objective", "ObjectiveAssigned") => {
                    let stage = e.payload["stage"].as_str().unwrap_or_default().to_string();
                    stage_of.insert(e.aggregate_id.clone(), stage);
                    if e.payload["team"].as_str() == Some(item.team.as_str()) {
                        team_objectives.insert(e.aggregate_id.clone());
                    }
                }
                ("objective", "ModelCalled") if team_objectives.contains(&e.aggregate_id) => {
                    context.team_spent_usd += e.payload["cost_usd"].as_f64().unwrap_or(0.0);
                }
                ("objective", "ArtifactProduced") => {
                    if let (Some(path), Some(sha)) = (e.payload["path"].as_str(), e.payload["sha256"].as_str()) {
                        context.artifacts.insert(path.to_string(), sha.to_string());
                    }
                }
                ("objective", "TaskResultRecorded") if e.aggregate_id != item.objective_id.to_string() => {
                    let stage = stage_of.get(&e.aggregate_id).cloned().unwrap_or_default();
                    let result = &e.payload["result"];
                    if result["status"] == "COMPLETE" {
                        let artifacts: Vec<&str> = result["artifacts"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                            .unwrap_or_default();
                        context.inputs.push_str(&format!(
                            "### {stage}\n{}\nArtifacts (in your workspace): {}\n\n",
                            result["reasoning"].as_str().unwrap_or_default(),
                            artifacts.join(", ")
                        ));
                    }
                }
                _ => {}
            }
        }
        context
    }
}
