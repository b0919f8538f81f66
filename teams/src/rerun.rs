//! Deterministic re-run (`factory replay rerun <run>`): a recorded run's pipeline executed
//! again, in memory, through the very decisions that drove it — the orchestrator's
//! ([`orchestrator::next_step`], [`orchestrator::revision`], [`orchestrator::reaction`]), the
//! worker's ([`RunContext`], [`artifact_paths`], [`result_commands`]), the operative loop
//! with its tools and the TaskResult gate, and the aggregates' own command handlers — with
//! every model answer taken from the run's `ModelCalled` events. No model is called and
//! nothing is written to the store; what humans decided (reviews, a cancel) is taken from
//! the record too.
//!
//! The report compares the decisions of both: per stage, what was started, completed,
//! blocked; per objective, each model call, artifact (by content hash), TaskResult and its
//! end; for the run, reviews, revisions and how it ended. Parallel stages may have finished
//! in another order in the recorded run, so decisions are compared per stage and per
//! objective, in order within each. A request whose digest differs from the recorded one
//! is a divergence too (the prompt changed: a team's documents, the template, the tools).

use crate::catalog::team as team_docs;
use crate::model::{ModelError, ModelFuture, ModelProvider, ModelRequest, ModelResponse, ToolCall};
use crate::operative::{self, ModelCall};
use crate::orchestrator::{self, Next, WorkItem};
use crate::pipeline::{Pipeline, Stage};
use crate::tools::{Scratch, ToolRegistry, granted_tools};
use crate::worker::{RunContext, artifact_of, artifact_paths, result_commands};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use factory_domain::objective::ModelCalled;
use factory_domain::run::{RequirementSubmitted, ReviewDecision, RunReviewed};
use factory_domain::{
    Objective, ObjectiveCommand, ObjectiveEvent, ObjectiveId, Run, RunCommand, RunEvent, RunId, RunStatus, SharedServices,
};
use factory_nats::EventEnvelope;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum RerunError {
    #[error("run {0} has no events")]
    NotFound(RunId),
    #[error("the recorded run cannot be read: {0}")]
    Record(String),
    #[error("the run's pipeline cannot be used")]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error("the event store failed")]
    Store(#[from] sqlx::Error),
    #[error("the scratch workspace failed")]
    Workspace(#[from] std::io::Error),
}

/// Where the re-run's decisions differ from the recorded ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Divergence {
    /// `run`, a stage's name, or `<stage> objective #<n>`.
    pub at: String,
    /// The decision's place in that sequence (0-based).
    pub index: usize,
    pub recorded: Option<String>,
    pub rerun: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RerunReport {
    pub run_id: RunId,
    pub recorded_status: String,
    pub rerun_status: String,
    /// Objectives the re-run worked.
    pub objectives: usize,
    /// Model answers taken from the record.
    pub answers_replayed: usize,
    /// Requests the record had no answer for. The re-run has no provider but the record, so
    /// no model is ever called; a request it cannot answer fails the team's attempt instead.
    pub unanswered: usize,
    /// Decisions compared, recorded side.
    pub decisions: usize,
    pub divergences: Vec<Divergence>,
    /// Where the re-run stopped because the recorded run did (a review, a human, an
    /// unfinished objective), if it did.
    pub stopped: Option<String>,
}

impl RerunReport {
    pub fn identical(&self) -> bool {
        self.divergences.is_empty()
    }
}

/// Re-runs `run_id` from its recorded events, in scratch workspaces (in memory, or in a
/// folder of their own under a directory).
pub async fn rerun(pool: &sqlx::PgPool, run_id: RunId, scratch: impl Into<Scratch>, services: SharedServices) -> Result<RerunReport, RerunError> {
    let events = factory_commands::events::run_events(pool, run_id.0, None).await?;
    if events.is_empty() {
        return Err(RerunError::NotFound(run_id));
    }
    let recording = Recording::read(&events)?;
    let submitted = &recording.submitted;
    let pipeline = if submitted.pipeline_definition.is_empty() {
        Pipeline::builtin(&submitted.pipeline)
            .ok_or_else(|| crate::pipeline::PipelineError::NotFound(submitted.pipeline.clone()))?
    } else {
        Pipeline::parse(&submitted.pipeline, &submitted.pipeline_definition)?
    };
    let scratch = match scratch.into() {
        Scratch::Memory => Scratch::Memory,
        Scratch::Dir(dir) => {
            let dir = dir.join(format!("rerun-{}", uuid::Uuid::now_v7()));
            std::fs::create_dir_all(&dir)?;
            Scratch::Dir(dir)
        }
    };
    let mut sim = Simulation::new(run_id, recording, pipeline, scratch.clone(), services, pool.clone());
    let outcome = sim.execute().await;
    if let Scratch::Dir(dir) = &scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    outcome?;
    let recorded = decisions(&events);
    let rerun = decisions(&sim.log);
    let mut divergences = compare(&recorded, &rerun);
    divergences.extend(sim.mismatches.lock().map(|m| m.clone()).unwrap_or_default());
    Ok(RerunReport {
        run_id,
        recorded_status: sim.recording.status.as_str().to_string(),
        rerun_status: sim.run.status.as_str().to_string(),
        objectives: sim.objectives.len(),
        answers_replayed: sim.replayed,
        unanswered: sim.unanswered.load(std::sync::atomic::Ordering::Relaxed),
        decisions: recorded.values().map(Vec::len).sum(),
        divergences,
        stopped: sim.stopped,
    })
}

// ---- the record ----

#[derive(Debug, Clone)]
struct RecordedCall {
    digest: String,
    response: ModelResponse,
}

#[derive(Debug, Clone, Default)]
struct RecordedObjective {
    calls: Vec<RecordedCall>,
    /// `Some(reason)` when it was blocked without a result (the worker gave up on errors).
    blocked_without_result: Option<String>,
    /// A blocker like `budget: $x spent of $y`, when the team hit its hard limit.
    budget: Option<(f64, f64)>,
    has_result: bool,
    ended: bool,
    /// Where its work ended in the record (its result or its block): the re-run finishes
    /// parallel objectives in this order, so each later one is assigned knowing what the
    /// recorded one knew.
    end_position: i64,
    /// Where it was assigned in the record.
    assigned_position: i64,
}

struct Recording {
    submitted: RequirementSubmitted,
    /// Per stage, the objectives that worked it, in the order they were assigned.
    objectives: HashMap<String, VecDeque<RecordedObjective>>,
    reviews: VecDeque<RunReviewed>,
    cancel: Option<(String, String)>,
    status: RunStatus,
}

fn tagged(event: &EventEnvelope) -> serde_json::Value {
    serde_json::json!({ event.event_type.clone(): event.payload.clone() })
}

impl Recording {
    fn read(events: &[EventEnvelope]) -> Result<Self, RerunError> {
        let bad = |e: &EventEnvelope, error: serde_json::Error| {
            RerunError::Record(format!("event {} ({}): {error}", e.position, e.event_type))
        };
        let mut run = Run::default();
        let mut submitted = None;
        let mut reviews = VecDeque::new();
        let mut cancel = None;
        let mut stage_of: HashMap<String, String> = HashMap::new();
        let mut by_id: HashMap<String, RecordedObjective> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        for e in events {
            match e.aggregate_type.as_str() {
                "run" => {
                    let event: RunEvent = serde_json::from_value(tagged(e)).map_err(|error| bad(e, error))?;
                    match &event {
                        RunEvent::RequirementSubmitted(s) => submitted = Some(s.clone()),
                        RunEvent::RunReviewed(r) => reviews.push_back(r.clone()),
                        RunEvent::RunCancelled(c) => cancel = Some((c.reason.clone(), c.cancelled_by.clone())),
                        RunEvent::RunForked(f) => {
                            return Err(RerunError::Record(format!(
                                "the run is a fork of {} at position {}: its first stages were copied, not worked; re-run the source run",
                                f.forked_from, f.at_position
                            )));
                        }
                        _ => {}
                    }
                    run.apply(event);
                }
                "objective" => {
                    let event: ObjectiveEvent = serde_json::from_value(tagged(e)).map_err(|error| bad(e, error))?;
                    let entry = by_id.entry(e.aggregate_id.clone()).or_insert_with(|| RecordedObjective {
                        end_position: i64::MAX,
                        ..RecordedObjective::default()
                    });
                    if matches!(event, ObjectiveEvent::TaskResultRecorded(_) | ObjectiveEvent::ObjectiveBlocked(_)) {
                        entry.end_position = entry.end_position.min(e.position);
                    }
                    match event {
                        ObjectiveEvent::ObjectiveAssigned(a) => {
                            entry.assigned_position = e.position;
                            stage_of.insert(e.aggregate_id.clone(), a.stage);
                            order.push(e.aggregate_id.clone());
                        }
                        ObjectiveEvent::ModelCalled(call) => entry.calls.push(recorded_call(call, e)?),
                        ObjectiveEvent::TaskResultRecorded(r) => {
                            entry.has_result = true;
                            entry.budget = r.result.blockers.iter().find_map(|b| budget_numbers(b));
                        }
                        ObjectiveEvent::ObjectiveBlocked(b) => {
                            entry.ended = true;
                            if !entry.has_result {
                                entry.blocked_without_result = Some(b.reason);
                            }
                        }
                        ObjectiveEvent::ObjectiveCompleted(_) => entry.ended = true,
                        ObjectiveEvent::ArtifactProduced(_) => {}
                    }
                }
                _ => {}
            }
        }
        let submitted = submitted.ok_or_else(|| RerunError::Record("the run has no RequirementSubmitted".into()))?;
        let mut objectives: HashMap<String, VecDeque<RecordedObjective>> = HashMap::new();
        for id in order {
            let stage = stage_of[&id].clone();
            objectives.entry(stage).or_default().push_back(by_id.remove(&id).unwrap_or_default());
        }
        Ok(Recording { submitted, objectives, reviews, cancel, status: run.status })
    }
}

fn recorded_call(call: ModelCalled, e: &EventEnvelope) -> Result<RecordedCall, RerunError> {
    #[derive(serde::Deserialize)]
    struct Said {
        content: String,
        #[serde(default)]
        tool_calls: Vec<ToolCall>,
    }
    let said: Said = serde_json::from_str(&call.response)
        .map_err(|error| RerunError::Record(format!("event {}: the recorded response cannot be read: {error}", e.position)))?;
    Ok(RecordedCall {
        digest: call.request_digest,
        response: ModelResponse {
            content: said.content,
            tool_calls: said.tool_calls,
            provider: call.provider,
            model: call.model,
            input_tokens: call.input_tokens,
            output_tokens: call.output_tokens,
            alias: call.alias,
            cost_usd: call.cost_usd,
            failed_targets: call.failed_targets,
        },
    })
}

/// `budget: $0.0012 spent of $0.0010` (the operative's budget blocker) -> (spent, limit).
fn budget_numbers(blocker: &str) -> Option<(f64, f64)> {
    let rest = blocker.strip_prefix("budget: $")?;
    let (spent, limit) = rest.split_once(" spent of $")?;
    Some((spent.parse().ok()?, limit.parse().ok()?))
}

// ---- the provider that answers from the record ----

struct Recorded {
    team: String,
    stage: String,
    calls: Mutex<Vec<(RecordedCall, bool)>>,
    budget: Option<(f64, f64)>,
    mismatches: Arc<Mutex<Vec<Divergence>>>,
    asked: Mutex<usize>,
    unanswered: Arc<std::sync::atomic::AtomicUsize>,
}

impl ModelProvider for Recorded {
    /// Answers from the recording: nothing outside the process.
    fn answers_in_process(&self) -> bool {
        true
    }

    fn complete<'a>(&'a self, request: &'a ModelRequest) -> ModelFuture<'a> {
        Box::pin(async move {
            let digest = operative::request_digest(request);
            let index = {
                let mut asked = self.asked.lock().expect("not poisoned");
                *asked += 1;
                *asked - 1
            };
            let mut calls = self.calls.lock().expect("not poisoned");
            // The answer to this very question; else the next one unused (and say so).
            let found = calls.iter().position(|(c, used)| !used && c.digest == digest);
            let position = match found {
                Some(p) => Some(p),
                None => {
                    let next = calls.iter().position(|(_, used)| !used);
                    if let Some(p) = next {
                        self.mismatches.lock().expect("not poisoned").push(Divergence {
                            at: format!("{} ({})", self.stage, self.team),
                            index,
                            recorded: Some(format!("request {}", calls[p].0.digest)),
                            rerun: Some(format!("request {digest} (the prompt differs)")),
                        });
                    }
                    next
                }
            };
            match position {
                Some(p) => {
                    calls[p].1 = true;
                    Ok(calls[p].0.response.clone())
                }
                None => match self.budget {
                    Some((spent_usd, limit_usd)) => Err(ModelError::BudgetExceeded { spent_usd, limit_usd }),
                    None => {
                        self.unanswered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Err(ModelError::NotConfigured("the recording has no further answer for this objective".into()))
                    }
                },
            }
        })
    }
}

// ---- the simulation ----

/// An objective assigned and not yet worked.
struct InFlight {
    objective_id: ObjectiveId,
    stage: Stage,
    recorded: RecordedObjective,
}

struct Simulation {
    run_id: RunId,
    recording: Recording,
    pipeline: Pipeline,
    run: Run,
    objectives: HashMap<ObjectiveId, Objective>,
    in_flight: Vec<InFlight>,
    /// The re-run's events, as envelopes (positions of its own), for the same folds.
    log: Vec<EventEnvelope>,
    sequences: HashMap<String, i64>,
    services: SharedServices,
    tools: ToolRegistry,
    scratch: Scratch,
    pool: sqlx::PgPool,
    /// Artifact contents the re-run produced, by sha256.
    contents: HashMap<String, Vec<u8>>,
    replayed: usize,
    mismatches: Arc<Mutex<Vec<Divergence>>>,
    unanswered: Arc<std::sync::atomic::AtomicUsize>,
    stopped: Option<String>,
}

impl Simulation {
    fn new(run_id: RunId, recording: Recording, pipeline: Pipeline, scratch: Scratch, services: SharedServices, pool: sqlx::PgPool) -> Self {
        Self {
            run_id,
            pipeline,
            recording,
            run: Run::default(),
            objectives: HashMap::new(),
            in_flight: Vec::new(),
            log: Vec::new(),
            sequences: HashMap::new(),
            services,
            tools: ToolRegistry::standard(),
            scratch,
            pool,
            contents: HashMap::new(),
            replayed: 0,
            mismatches: Arc::new(Mutex::new(Vec::new())),
            unanswered: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            stopped: None,
        }
    }

    async fn execute(&mut self) -> Result<(), RerunError> {
        let s = self.recording.submitted.clone();
        let title = if s.title.is_empty() { None } else { Some(s.title) };
        self.run_command(RunCommand::SubmitRequirement {
            title,
            requirement: s.requirement,
            pipeline: s.pipeline,
            pipeline_definition: s.pipeline_definition,
            auto_approve: s.auto_approve,
            submitted_by: s.submitted_by,
        })
        .await;
        // Bounded: every turn starts stages, finishes an objective, records a review, or stops.
        for _ in 0..10_000 {
            match self.run.status {
                RunStatus::Running => match orchestrator::next_step(&self.run, &self.pipeline) {
                    Next::Finish(command) => {
                        self.run_command(command).await;
                    }
                    Next::Start(stages) if !stages.is_empty() => {
                        // In the record's order: the stage assigned first, after the work
                        // that had ended before it was (so it knows what the recorded one knew).
                        let assigned = |name: &str| {
                            self.recording.objectives.get(name).and_then(|q| q.front()).map_or(i64::MAX, |o| o.assigned_position)
                        };
                        let Some(stage) = stages.into_iter().min_by_key(|s| assigned(&s.name)).cloned() else { continue };
                        let at = assigned(&stage.name);
                        if self.in_flight.iter().any(|f| f.recorded.end_position < at) {
                            self.finish_next().await?;
                            continue;
                        }
                        if !self.start(&stage).await {
                            return Ok(());
                        }
                    }
                    Next::Start(_) => {
                        if !self.finish_next().await? {
                            self.stop_where_the_record_stopped("no stage is ready and the pipeline is not finished").await;
                            return Ok(());
                        }
                    }
                },
                RunStatus::AwaitingReview => match self.recording.reviews.pop_front() {
                    Some(review) => {
                        let revise = matches!(review.decision, ReviewDecision::Revise { .. });
                        self.run_command(RunCommand::ReviewRun { decision: review.decision, reviewer: review.reviewer }).await;
                        if revise && self.run.status == RunStatus::Running {
                            let command = orchestrator::revision(&self.run, &self.pipeline);
                            self.run_command(command).await;
                        }
                    }
                    None => {
                        self.stopped = Some("awaiting review, as the recorded run was".into());
                        return Ok(());
                    }
                },
                status => {
                    // A paused run lets the stages already under way finish, as workers do.
                    if !status.is_terminal() && self.finish_next().await? {
                        continue;
                    }
                    if !status.is_terminal() {
                        self.stopped = Some(format!("{}: waits for a human, as the recorded run did", status.as_str()));
                    }
                    return Ok(());
                }
            }
        }
        self.stopped = Some("stopped after 10,000 steps".into());
        Ok(())
    }

    /// Works the in-flight objective whose recorded work ended first; false when none is.
    async fn finish_next(&mut self) -> Result<bool, RerunError> {
        let Some(next) = (0..self.in_flight.len()).min_by_key(|&i| self.in_flight[i].recorded.end_position) else {
            return Ok(false);
        };
        let in_flight = self.in_flight.remove(next);
        self.work(in_flight).await?;
        Ok(true)
    }

    /// The re-run cannot go on: the recorded run stopped here too (a cancel, an unfinished
    /// objective) or this is where the two part.
    async fn stop_where_the_record_stopped(&mut self, why: &str) {
        if let Some((reason, cancelled_by)) = self.recording.cancel.take() {
            self.run_command(RunCommand::CancelRun { reason, cancelled_by }).await;
            self.stopped = Some("cancelled where the recorded run was".into());
        } else {
            self.stopped = Some(format!("{why} (the recorded run is {})", self.recording.status.as_str()));
        }
    }

    /// Starts a stage and assigns its objective; false when the re-run must stop.
    async fn start(&mut self, stage: &Stage) -> bool {
        let Some(recorded) = self.recording.objectives.get_mut(&stage.name).and_then(VecDeque::pop_front) else {
            if self.recording.cancel.is_some() {
                self.stop_where_the_record_stopped("").await;
                return false;
            }
            // Started here, never in the record: the comparison shows it.
            let objective_id = ObjectiveId::new();
            self.run_command(RunCommand::StartStage { stage: stage.name.clone(), team: stage.team.clone(), objective_id }).await;
            self.stopped = Some(format!("stage {} has no recorded work", stage.name));
            return false;
        };
        let objective_id = ObjectiveId::new();
        self.run_command(RunCommand::StartStage { stage: stage.name.clone(), team: stage.team.clone(), objective_id }).await;
        self.objective_command(objective_id, orchestrator::assignment(self.run_id, objective_id, stage, None)).await;
        self.in_flight.push(InFlight { objective_id, stage: stage.clone(), recorded });
        true
    }

    async fn work(&mut self, in_flight: InFlight) -> Result<(), RerunError> {
        let InFlight { objective_id, stage, recorded } = in_flight;
        let stage = &stage;
        let item = WorkItem::new(self.run_id, objective_id, stage);
        let team = team_docs(&item.team).ok_or_else(|| RerunError::Record(format!("unknown team `{}`", item.team)))?;
        let granted = granted_tools(team.tools).map_err(|e| RerunError::Record(format!("{}: {e}", item.team)))?;
        // Cut where the run stood when the stage started, as the worker's is.
        let context = RunContext::of(&self.run, objective_id, &self.objectives);
        let mut contents = std::collections::HashMap::new();
        for sha in context.artifacts().values() {
            if let Some(content) = self.content(sha).await? {
                contents.insert(sha.clone(), content);
            }
        }
        let workspace = self.scratch.workspace(&objective_id.to_string(), crate::worker::workspace_inputs(context.artifacts(), |sha| contents.get(sha).cloned()))?;
        let iteration = self.objectives.get(&objective_id).map(|o| o.iterations).unwrap_or(0) + 1;
        let prompt = context.prompt(team, iteration, item.max_iterations);
        let provider = Recorded {
            team: item.team.clone(),
            stage: item.stage.clone(),
            calls: Mutex::new(recorded.calls.iter().cloned().map(|c| (c, false)).collect()),
            budget: recorded.budget,
            mismatches: self.mismatches.clone(),
            asked: Mutex::new(0),
            unanswered: self.unanswered.clone(),
        };
        let calls: Mutex<Vec<ModelCall>> = Mutex::new(Vec::new());
        let on_call = |call: ModelCall| calls.lock().expect("not poisoned").push(call);
        let outcome = operative::work(
            &provider,
            team,
            &item.alias,
            prompt,
            &self.tools,
            &granted,
            &workspace,
            context.team_spent_usd,
            &on_call,
        )
        .await;
        let calls = calls.into_inner().expect("not poisoned");
        self.replayed += calls.len();
        for call in calls {
            self.objective_command(objective_id, ObjectiveCommand::RecordModelCall(call.into())).await;
        }
        match outcome {
            Ok(outcome) => {
                for path in artifact_paths(&outcome) {
                    let Some(content) = workspace.content(&path) else { continue };
                    let artifact = artifact_of(path, &content);
                    self.contents.insert(artifact.sha256.clone(), content);
                    self.objective_command(objective_id, ObjectiveCommand::ProduceArtifact(artifact)).await;
                }
                for command in result_commands("rerun", outcome) {
                    self.objective_command(objective_id, command).await;
                }
            }
            Err(error) => match recorded.blocked_without_result {
                // The worker gave up after its retries: the record says so, the re-run follows.
                Some(reason) => self.objective_command(objective_id, ObjectiveCommand::BlockObjective { reason }).await,
                None if !recorded.ended => {
                    self.stopped = Some(format!("stage {}: the recorded objective never finished ({error})", stage.name));
                }
                None => {
                    self.mismatches.lock().expect("not poisoned").push(Divergence {
                        at: format!("{} ({})", stage.name, item.team),
                        index: 0,
                        recorded: Some("the objective ended".into()),
                        rerun: Some(format!("the team could not finish: {error}")),
                    });
                }
            },
        }
        if !workspace.is_in_memory() {
            let _ = std::fs::remove_dir_all(workspace.root());
        }
        Ok(())
    }

    async fn content(&self, sha: &str) -> Result<Option<Vec<u8>>, RerunError> {
        if let Some(content) = self.contents.get(sha) {
            return Ok(Some(content.clone()));
        }
        Ok(sqlx::query_scalar("SELECT content FROM artifacts WHERE sha256 = $1").bind(sha).fetch_optional(&self.pool).await?)
    }

    /// A command on the run, in memory; a refusal (a decision that does not apply) records nothing.
    async fn run_command(&mut self, command: RunCommand) {
        let mut run = self.run.clone();
        let sink = EventSink::default();
        if let Err(reason) = run.handle(command, &self.services, &sink).await {
            tracing::debug!(%reason, "re-run: run command refused");
            return;
        }
        self.run = run;
        let id = self.run_id.to_string();
        for event in sink.collect().await {
            self.append::<Run>(&id, &event);
        }
    }

    /// A command on an objective, in memory, then what the run does about its events.
    async fn objective_command(&mut self, objective_id: ObjectiveId, command: ObjectiveCommand) {
        let mut objective = self.objectives.get(&objective_id).cloned().unwrap_or_default();
        let sink = EventSink::default();
        if let Err(reason) = objective.handle(command, &self.services, &sink).await {
            tracing::debug!(%reason, "re-run: objective command refused");
            return;
        }
        let stage = objective.stage.clone();
        self.objectives.insert(objective_id, objective);
        let id = objective_id.to_string();
        for event in sink.collect().await {
            let envelope = self.append::<Objective>(&id, &event);
            if let Some(command) = orchestrator::reaction(&envelope.event_type, &envelope.payload, stage.clone(), objective_id) {
                self.run_command(command).await;
            }
        }
    }

    fn append<A: Aggregate>(&mut self, aggregate_id: &str, event: &A::Event) -> EventEnvelope {
        let sequence = self.sequences.entry(aggregate_id.to_string()).or_insert(0);
        *sequence += 1;
        let event_type = event.event_type();
        let tagged = serde_json::to_value(event).unwrap_or_default();
        let payload = tagged.get(&event_type).cloned().unwrap_or(tagged);
        let envelope = EventEnvelope {
            position: self.log.len() as i64 + 1,
            aggregate_type: A::TYPE.to_string(),
            aggregate_id: aggregate_id.to_string(),
            sequence: *sequence,
            event_version: event.event_version(),
            event_type,
            run_id: Some(self.run_id.0),
            recorded_at: self.services.now(),
            payload,
            metadata: serde_json::json!({}),
            hash: String::new(),
        };
        self.log.push(envelope.clone());
        envelope
    }
}

// ---- decisions, and comparing them ----

/// The decisions in a run's events, grouped where their order is fixed: per stage, per
/// objective (`<stage> objective #<n>`, n counting that stage's objectives), and the run's own.
pub fn decisions(events: &[EventEnvelope]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut objective_key: HashMap<String, String> = HashMap::new();
    let mut per_stage: HashMap<String, usize> = HashMap::new();
    let p = |e: &EventEnvelope, field: &str| e.payload[field].as_str().unwrap_or_default().to_string();
    for e in events {
        let (key, what) = match (e.aggregate_type.as_str(), e.event_type.as_str()) {
            ("run", "RequirementSubmitted") => continue,
            ("run", "StageStarted") => (p(e, "stage"), format!("started by {}", p(e, "team"))),
            ("run", "StageCompleted") => (p(e, "stage"), "completed".into()),
            ("run", "StageSkipped") => (p(e, "stage"), format!("skipped: {}", p(e, "reason"))),
            ("run", "RunBlocked") => (p(e, "stage"), format!("blocked the run: {}", p(e, "reason"))),
            ("run", "RunNeedsClarification") => (p(e, "stage"), format!("needs clarification: {}", p(e, "question"))),
            ("run", "RunReviewed") => ("run".into(), format!("reviewed: {} {}", p(e, "decision"), p(e, "feedback"))),
            ("run", "StagesReopened") => ("run".into(), format!("reopened {}", e.payload["stages"])),
            ("run", "RunFailed") => ("run".into(), format!("failed: {}", p(e, "reason"))),
            ("run", "RunCancelled") => ("run".into(), "cancelled".into()),
            ("run", other) => ("run".into(), other.to_string()),
            ("objective", "ObjectiveAssigned") => {
                let stage = p(e, "stage");
                let n = per_stage.entry(stage.clone()).or_insert(0);
                *n += 1;
                let key = format!("{stage} objective #{n}");
                objective_key.insert(e.aggregate_id.clone(), key.clone());
                (key, format!("assigned to {}", p(e, "team")))
            }
            ("objective", kind) => {
                let key = objective_key.get(&e.aggregate_id).cloned().unwrap_or_else(|| format!("objective {}", e.aggregate_id));
                let what = match kind {
                    "ModelCalled" => format!(
                        "model call {} -> {}:{} ({}), answer {}",
                        p(e, "alias"),
                        p(e, "provider"),
                        p(e, "model"),
                        p(e, "outcome"),
                        short_digest(&p(e, "response"))
                    ),
                    "ArtifactProduced" => format!("artifact {} {}", p(e, "path"), p(e, "sha256")),
                    "TaskResultRecorded" => {
                        let r = &e.payload["result"];
                        format!("result {} artifacts {} blockers {}", r["status"].as_str().unwrap_or_default(), r["artifacts"], r["blockers"])
                    }
                    "ObjectiveCompleted" => "completed".into(),
                    "ObjectiveBlocked" => format!("blocked: {}", p(e, "reason")),
                    other => other.to_string(),
                };
                (key, what)
            }
            _ => continue,
        };
        out.entry(key).or_default().push(what);
    }
    out
}

fn short_digest(text: &str) -> String {
    use sha2::Digest;
    operative::hex(&sha2::Sha256::digest(text.as_bytes()))[..12].to_string()
}

/// Every place where the two sets of decisions differ: the first differing decision of each
/// sequence, or a sequence one side has and the other lacks.
pub fn compare(recorded: &BTreeMap<String, Vec<String>>, rerun: &BTreeMap<String, Vec<String>>) -> Vec<Divergence> {
    let mut keys: Vec<&String> = recorded.keys().chain(rerun.keys()).collect();
    keys.sort();
    keys.dedup();
    let empty = Vec::new();
    let mut out = Vec::new();
    for key in keys {
        let (a, b) = (recorded.get(key).unwrap_or(&empty), rerun.get(key).unwrap_or(&empty));
        if let Some(index) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) {
            out.push(Divergence { at: key.clone(), index, recorded: a.get(index).cloned(), rerun: b.get(index).cloned() });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        entries.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect()
    }

    #[test]
    fn identical_decisions_have_no_divergence() {
        let a = map(&[("run", &["RunCompleted"]), ("ba", &["started by business-analysis", "completed"])]);
        assert!(compare(&a, &a.clone()).is_empty());
    }

    #[test]
    fn the_first_differing_decision_of_each_sequence_is_named() {
        let recorded = map(&[("ba", &["started by business-analysis", "completed"]), ("run", &["RunCompleted"])]);
        let rerun = map(&[("ba", &["started by business-analysis", "blocked the run: no"]), ("qa", &["started by qa-engineering"])]);
        let found = compare(&recorded, &rerun);
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[0], Divergence { at: "ba".into(), index: 1, recorded: Some("completed".into()), rerun: Some("blocked the run: no".into()) });
        assert_eq!(found[1].at, "qa");
        assert_eq!(found[1].recorded, None);
        assert_eq!(found[2], Divergence { at: "run".into(), index: 0, recorded: Some("RunCompleted".into()), rerun: None });
    }

    #[test]
    fn a_budget_blocker_gives_back_its_numbers() {
        assert_eq!(budget_numbers("budget: $0.0012 spent of $0.0010"), Some((0.0012, 0.001)));
        assert_eq!(budget_numbers("malformed answer"), None);
    }
}
