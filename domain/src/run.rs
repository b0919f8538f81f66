//! The `Run` aggregate: one requirement going through a pipeline of stages.
//!
//! A run is submitted, its stages start and complete (or are skipped) as the orchestrator
//! decides, it may stop to wait for a review, and it ends completed, failed or cancelled.
//! The aggregate guards the lifecycle: it refuses what cannot happen in the run's state
//! (completing a cancelled run, starting a stage twice, reviewing a run nobody asked to review).

use crate::{MAX_REQUIREMENT_BYTES, MAX_TITLE_CHARS, ObjectiveId, RunId, SharedServices};
use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The run's lifecycle, as the contract names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    /// Not submitted yet: the state of an id nobody used.
    #[default]
    New,
    Running,
    NeedsClarification,
    Blocked,
    AwaitingReview,
    Completed,
    Failed,
    Cancelled,
}

impl RunStatus {
    /// Completed, failed and cancelled runs take no further commands.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "NEW",
            Self::Running => "RUNNING",
            Self::NeedsClarification => "NEEDS_CLARIFICATION",
            Self::Blocked => "BLOCKED",
            Self::AwaitingReview => "AWAITING_REVIEW",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }
}

/// A human's verdict at the review gate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", tag = "decision")]
pub enum ReviewDecision {
    Approve,
    Revise { feedback: String },
}

// ---- commands ----

#[derive(Clone, Debug, PartialEq)]
pub enum RunCommand {
    SubmitRequirement {
        title: Option<String>,
        requirement: String,
        /// The pipeline's name (`phase1`, `full`, or the file it came from).
        pipeline: String,
        /// The pipeline file's text, so the run carries its plan: a re-run or another
        /// machine needs nothing else. Validated by whoever parsed it (the teams crate).
        pipeline_definition: String,
        auto_approve: bool,
        /// Who submitted it (a user name or token name), for the audit trail.
        submitted_by: String,
    },
    StartStage {
        stage: String,
        team: String,
        objective_id: ObjectiveId,
    },
    /// The stage's objective is done. Names the objective, so that a late or redelivered
    /// completion of an earlier objective of a reopened stage completes nothing.
    CompleteStage {
        stage: String,
        objective_id: ObjectiveId,
    },
    SkipStage {
        stage: String,
        reason: String,
    },
    AwaitReview,
    ReviewRun {
        decision: ReviewDecision,
        reviewer: String,
    },
    CompleteRun,
    FailRun {
        reason: String,
    },
    CancelRun {
        reason: String,
        cancelled_by: String,
    },
    /// After a revision: these stages run again (the feedback is in the run's events).
    ReopenStages {
        stages: Vec<String>,
    },
    /// A stage's team answered BLOCKED: the run stops until a human resolves it.
    BlockRun {
        stage: String,
        reason: String,
        /// The objective that answered; a stale one (of a reopened stage) is refused.
        objective_id: ObjectiveId,
    },
    /// A stage's team needs an answer before it can go on: the run waits for it.
    AwaitClarification {
        stage: String,
        question: String,
        /// The objective that asked; a stale one (of a reopened stage) is refused.
        objective_id: ObjectiveId,
    },
    /// A new run that starts where another stood at a position of the store: its
    /// requirement and pipeline, and the stages completed by then (their objectives, copied
    /// into this run, already hold the results). The rest runs live.
    ForkRun {
        title: String,
        requirement: String,
        pipeline: String,
        pipeline_definition: String,
        auto_approve: bool,
        submitted_by: String,
        forked_from: RunId,
        at_position: i64,
        completed: Vec<ForkedStage>,
    },
}

/// A stage a fork starts with, completed by the objective that holds its copied result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ForkedStage {
    pub stage: String,
    pub team: String,
    pub objective_id: ObjectiveId,
}

// ---- events ----

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RequirementSubmitted {
    pub title: String,
    pub requirement: String,
    pub pipeline: String,
    /// The pipeline's TOML text as submitted (teams/pipelines/*.toml format).
    #[serde(default)]
    pub pipeline_definition: String,
    pub auto_approve: bool,
    /// Who submitted the requirement. New in version 2; version-1 events are read through
    /// [`crate::upcast`], which sets it to [`crate::upcast::UNKNOWN_SUBMITTER`].
    pub submitted_by: String,
    pub submitted_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StageStarted {
    pub stage: String,
    pub team: String,
    pub objective_id: ObjectiveId,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StageCompleted {
    pub stage: String,
    pub objective_id: ObjectiveId,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StageSkipped {
    pub stage: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunAwaitingReview {
    /// Stages completed when the run stopped for review.
    pub completed_stages: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunReviewed {
    #[serde(flatten)]
    pub decision: ReviewDecision,
    pub reviewer: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunCompleted {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunFailed {
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunCancelled {
    pub reason: String,
    pub cancelled_by: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StagesReopened {
    pub stages: Vec<String>,
    /// Which revision this is (1 for the first).
    pub revision: u32,
}

/// This run is a fork: it starts with the state of `forked_from` after `at_position`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunForked {
    pub forked_from: RunId,
    pub at_position: i64,
    /// The stages it starts with, completed (their StageStarted/StageCompleted follow).
    pub stages: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunBlocked {
    pub stage: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunNeedsClarification {
    pub stage: String,
    pub question: String,
}

/// Everything that can happen to a run. Stored externally tagged (`{"StageStarted": {..}}`),
/// the cqrs-es convention; the relay publishes the inner payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RunEvent {
    RequirementSubmitted(RequirementSubmitted),
    StageStarted(StageStarted),
    StageCompleted(StageCompleted),
    StageSkipped(StageSkipped),
    RunAwaitingReview(RunAwaitingReview),
    RunReviewed(RunReviewed),
    RunCompleted(RunCompleted),
    RunFailed(RunFailed),
    RunCancelled(RunCancelled),
    RunBlocked(RunBlocked),
    RunNeedsClarification(RunNeedsClarification),
    StagesReopened(StagesReopened),
    RunForked(RunForked),
}

impl DomainEvent for RunEvent {
    fn event_type(&self) -> String {
        match self {
            Self::RequirementSubmitted(_) => "RequirementSubmitted",
            Self::StageStarted(_) => "StageStarted",
            Self::StageCompleted(_) => "StageCompleted",
            Self::StageSkipped(_) => "StageSkipped",
            Self::RunAwaitingReview(_) => "RunAwaitingReview",
            Self::RunReviewed(_) => "RunReviewed",
            Self::RunCompleted(_) => "RunCompleted",
            Self::RunFailed(_) => "RunFailed",
            Self::RunCancelled(_) => "RunCancelled",
            Self::RunBlocked(_) => "RunBlocked",
            Self::RunNeedsClarification(_) => "RunNeedsClarification",
            Self::StagesReopened(_) => "StagesReopened",
            Self::RunForked(_) => "RunForked",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::upcast::current_version(Run::TYPE, &self.event_type()).to_string()
    }
}

/// A requirement as submitted, checked and trimmed (for a new run and a fork alike).
fn submission(
    title: Option<String>,
    requirement: String,
    pipeline: String,
    pipeline_definition: String,
    auto_approve: bool,
    submitted_by: String,
    services: &SharedServices,
) -> Result<RequirementSubmitted, RunError> {
    let requirement = requirement.trim().to_string();
    if requirement.is_empty() {
        return Err(RunError::EmptyRequirement);
    }
    if requirement.len() > MAX_REQUIREMENT_BYTES {
        return Err(RunError::RequirementTooLarge(requirement.len()));
    }
    let title = match title.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
        Some(t) if t.chars().count() > MAX_TITLE_CHARS => {
            return Err(RunError::TitleTooLong);
        }
        Some(t) => t,
        None => default_title(&requirement),
    };
    let pipeline = pipeline.trim().to_string();
    if pipeline.is_empty() {
        return Err(RunError::EmptyPipeline);
    }
    Ok(RequirementSubmitted { title, requirement, pipeline, pipeline_definition, auto_approve, submitted_by, submitted_at: services.now() })
}

// ---- errors ----

/// Why a run refused a command. Messages say what to do instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunError {
    #[error("the requirement is empty: describe what should be built")]
    EmptyRequirement,
    #[error("the requirement is {0} bytes; at most {MAX_REQUIREMENT_BYTES} are accepted")]
    RequirementTooLarge(usize),
    #[error("the title is longer than {MAX_TITLE_CHARS} characters")]
    TitleTooLong,
    #[error("the pipeline name is empty")]
    EmptyPipeline,
    #[error("this run was already submitted")]
    AlreadySubmitted,
    #[error("no run with this id exists")]
    NotFound,
    #[error("the run is {0}: it takes no further commands")]
    Terminal(&'static str),
    #[error("stage `{0}` has already started")]
    StageAlreadyStarted(String),
    #[error("stage `{0}` has not started")]
    StageNotStarted(String),
    #[error("stage `{0}` is already finished")]
    StageFinished(String),
    #[error("stages are still in progress: {0}")]
    StagesInProgress(String),
    #[error("the run is {0}, not AWAITING_REVIEW: there is nothing to review")]
    NotAwaitingReview(&'static str),
    #[error("the run is {0}; only a RUNNING run can do this")]
    NotRunning(&'static str),
    #[error("revision feedback is empty: say what should change")]
    EmptyFeedback,
    #[error("no stages named to reopen")]
    NothingToReopen,
    #[error("stage `{stage}` is now worked by objective {current}, not {named}")]
    NotTheStagesObjective { stage: String, named: ObjectiveId, current: ObjectiveId },
    #[error("the run was sent back for revision: its stages must be reopened first")]
    RevisionPending,
}

// ---- the aggregate ----

/// Where one stage of a run stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageState {
    InProgress { team: String, objective_id: ObjectiveId },
    Completed { team: String, objective_id: ObjectiveId },
    Skipped,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Run {
    pub status: RunStatus,
    pub title: String,
    pub pipeline: String,
    pub pipeline_definition: String,
    pub auto_approve: bool,
    pub stages: BTreeMap<String, StageState>,
    pub revisions: u32,
    /// Sent back by a REVISE review, its stages not yet reopened.
    #[serde(default)]
    pub revision_pending: bool,
    /// The requirement as submitted.
    #[serde(default)]
    pub requirement: String,
    /// Every stage completion so far, in the order they happened (completions of stages
    /// reopened since included): what the run has learnt, for the teams that come after.
    #[serde(default)]
    pub completions: Vec<Completion>,
    /// The feedback of each REVISE review, in order.
    #[serde(default)]
    pub reviews: Vec<String>,
    /// Every objective started, and what the run knew when it started.
    #[serde(default)]
    pub started: BTreeMap<ObjectiveId, Started>,
}

/// One stage completion: the stage and the objective that completed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    pub stage: String,
    pub objective_id: ObjectiveId,
}

/// An objective as its stage started it: its team, and what the run knew then (how many of
/// the run's [`Run::completions`] and [`Run::reviews`] there were). A team's context is cut
/// there, so that it does not depend on how fast the stages in parallel with it are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub team: String,
    pub completions: usize,
    pub reviews: usize,
}

impl Run {
    /// What the run knew when `objective_id` started: the completions before it (oldest
    /// first) and the latest review feedback; `None` for an objective it never started.
    pub fn known_at_start(&self, objective_id: ObjectiveId) -> Option<(&[Completion], Option<&str>)> {
        let started = self.started.get(&objective_id)?;
        let completions = &self.completions[..started.completions.min(self.completions.len())];
        let feedback = self.reviews[..started.reviews.min(self.reviews.len())].last().map(String::as_str);
        Some((completions, feedback))
    }
}

impl Run {
    fn require_active(&self) -> Result<(), RunError> {
        match self.status {
            RunStatus::New => Err(RunError::NotFound),
            s if s.is_terminal() => Err(RunError::Terminal(s.as_str())),
            _ => Ok(()),
        }
    }

    fn require_running(&self) -> Result<(), RunError> {
        self.require_active()?;
        if self.status != RunStatus::Running {
            return Err(RunError::NotRunning(self.status.as_str()));
        }
        Ok(())
    }

    /// Between a REVISE review and the reopening of its stages, the run must not start,
    /// finish or go back to review on the state from before the review (a late event could
    /// otherwise send it straight back to review, the revision lost).
    fn require_no_pending_revision(&self) -> Result<(), RunError> {
        if self.revision_pending {
            return Err(RunError::RevisionPending);
        }
        Ok(())
    }

    /// The stage is in progress, worked by `named` (not an earlier objective of a stage
    /// since reopened).
    fn require_worked_by(&self, stage: &str, named: ObjectiveId) -> Result<(), RunError> {
        match self.stages.get(stage) {
            Some(StageState::InProgress { objective_id, .. }) if *objective_id == named => Ok(()),
            Some(StageState::InProgress { objective_id, .. }) => {
                Err(RunError::NotTheStagesObjective { stage: stage.to_string(), named, current: *objective_id })
            }
            _ => Err(RunError::StageNotStarted(stage.to_string())),
        }
    }

    fn in_progress(&self) -> Vec<&str> {
        self.stages
            .iter()
            .filter(|(_, s)| matches!(s, StageState::InProgress { .. }))
            .map(|(name, _)| name.as_str())
            .collect()
    }
}

impl Aggregate for Run {
    const TYPE: &'static str = "run";
    type Command = RunCommand;
    type Event = RunEvent;
    type Error = RunError;
    type Services = SharedServices;

    async fn handle(
        &mut self,
        command: RunCommand,
        services: &SharedServices,
        sink: &EventSink<Self>,
    ) -> Result<(), RunError> {
        let event = match command {
            RunCommand::SubmitRequirement { title, requirement, pipeline, pipeline_definition, auto_approve, submitted_by } => {
                if self.status != RunStatus::New {
                    return Err(RunError::AlreadySubmitted);
                }
                RunEvent::RequirementSubmitted(submission(title, requirement, pipeline, pipeline_definition, auto_approve, submitted_by, services)?)
            }
            RunCommand::ForkRun {
                title,
                requirement,
                pipeline,
                pipeline_definition,
                auto_approve,
                submitted_by,
                forked_from,
                at_position,
                completed,
            } => {
                if self.status != RunStatus::New {
                    return Err(RunError::AlreadySubmitted);
                }
                let submitted = submission(Some(title), requirement, pipeline, pipeline_definition, auto_approve, submitted_by, services)?;
                let stages = completed.iter().map(|s| s.stage.clone()).collect();
                sink.write(RunEvent::RequirementSubmitted(submitted), self).await;
                sink.write(RunEvent::RunForked(RunForked { forked_from, at_position, stages }), self).await;
                for ForkedStage { stage, team, objective_id } in completed {
                    sink.write(RunEvent::StageStarted(StageStarted { stage: stage.clone(), team, objective_id }), self).await;
                    sink.write(RunEvent::StageCompleted(StageCompleted { stage, objective_id }), self).await;
                }
                return Ok(());
            }
            RunCommand::StartStage { stage, team, objective_id } => {
                self.require_running()?;
                self.require_no_pending_revision()?;
                if let Some(state) = self.stages.get(&stage) {
                    return Err(match state {
                        StageState::InProgress { .. } => RunError::StageAlreadyStarted(stage),
                        _ => RunError::StageFinished(stage),
                    });
                }
                RunEvent::StageStarted(StageStarted { stage, team, objective_id })
            }
            RunCommand::CompleteStage { stage, objective_id: named } => {
                self.require_active()?;
                match self.stages.get(&stage) {
                    Some(StageState::InProgress { objective_id, .. }) if *objective_id == named => {
                        RunEvent::StageCompleted(StageCompleted { objective_id: named, stage })
                    }
                    Some(StageState::InProgress { objective_id, .. }) => {
                        return Err(RunError::NotTheStagesObjective { stage, named, current: *objective_id });
                    }
                    Some(_) => return Err(RunError::StageFinished(stage)),
                    None => return Err(RunError::StageNotStarted(stage)),
                }
            }
            RunCommand::SkipStage { stage, reason } => {
                self.require_active()?;
                if matches!(
                    self.stages.get(&stage),
                    Some(StageState::Completed { .. } | StageState::Skipped)
                ) {
                    return Err(RunError::StageFinished(stage));
                }
                RunEvent::StageSkipped(StageSkipped { stage, reason })
            }
            RunCommand::AwaitReview => {
                self.require_running()?;
                self.require_no_pending_revision()?;
                let busy = self.in_progress();
                if !busy.is_empty() {
                    return Err(RunError::StagesInProgress(busy.join(", ")));
                }
                let completed_stages = self
                    .stages
                    .iter()
                    .filter(|(_, s)| matches!(s, StageState::Completed { .. }))
                    .map(|(name, _)| name.clone())
                    .collect();
                RunEvent::RunAwaitingReview(RunAwaitingReview { completed_stages })
            }
            RunCommand::ReviewRun { decision, reviewer } => {
                self.require_active()?;
                if self.status != RunStatus::AwaitingReview {
                    return Err(RunError::NotAwaitingReview(self.status.as_str()));
                }
                if let ReviewDecision::Revise { feedback } = &decision
                    && feedback.trim().is_empty()
                {
                    return Err(RunError::EmptyFeedback);
                }
                let approved = decision == ReviewDecision::Approve;
                sink.write(RunEvent::RunReviewed(RunReviewed { decision, reviewer }), self).await;
                if approved {
                    sink.write(RunEvent::RunCompleted(RunCompleted {}), self).await;
                }
                return Ok(());
            }
            RunCommand::CompleteRun => {
                self.require_running()?;
                self.require_no_pending_revision()?;
                let busy = self.in_progress();
                if !busy.is_empty() {
                    return Err(RunError::StagesInProgress(busy.join(", ")));
                }
                RunEvent::RunCompleted(RunCompleted {})
            }
            RunCommand::FailRun { reason } => {
                self.require_active()?;
                RunEvent::RunFailed(RunFailed { reason })
            }
            RunCommand::CancelRun { reason, cancelled_by } => {
                self.require_active()?;
                RunEvent::RunCancelled(RunCancelled { reason, cancelled_by })
            }
            RunCommand::ReopenStages { stages } => {
                self.require_running()?;
                if stages.is_empty() {
                    return Err(RunError::NothingToReopen);
                }
                let busy = self.in_progress();
                if !busy.is_empty() {
                    return Err(RunError::StagesInProgress(busy.join(", ")));
                }
                if let Some(unknown) = stages.iter().find(|s| !self.stages.contains_key(*s)) {
                    return Err(RunError::StageNotStarted(unknown.clone()));
                }
                RunEvent::StagesReopened(StagesReopened { stages, revision: self.revisions })
            }
            RunCommand::BlockRun { stage, reason, objective_id } => {
                self.require_running()?;
                self.require_worked_by(&stage, objective_id)?;
                RunEvent::RunBlocked(RunBlocked { stage, reason })
            }
            RunCommand::AwaitClarification { stage, question, objective_id } => {
                self.require_running()?;
                self.require_worked_by(&stage, objective_id)?;
                RunEvent::RunNeedsClarification(RunNeedsClarification { stage, question })
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: RunEvent) {
        match event {
            RunEvent::RunForked(_) => {}
            RunEvent::RequirementSubmitted(e) => {
                self.status = RunStatus::Running;
                self.title = e.title;
                self.pipeline = e.pipeline;
                self.pipeline_definition = e.pipeline_definition;
                self.auto_approve = e.auto_approve;
                self.requirement = e.requirement;
            }
            RunEvent::StageStarted(e) => {
                self.started.insert(
                    e.objective_id,
                    Started {
                        team: e.team.clone(),
                        completions: self.completions.len(),
                        reviews: self.reviews.len(),
                    },
                );
                self.stages.insert(
                    e.stage,
                    StageState::InProgress { team: e.team, objective_id: e.objective_id },
                );
            }
            RunEvent::StageCompleted(e) => {
                if let Some(state) = self.stages.get_mut(&e.stage) {
                    let team = match state {
                        StageState::InProgress { team, .. } | StageState::Completed { team, .. } => {
                            std::mem::take(team)
                        }
                        StageState::Skipped => String::new(),
                    };
                    *state = StageState::Completed { team, objective_id: e.objective_id };
                }
                self.completions.push(Completion { stage: e.stage, objective_id: e.objective_id });
            }
            RunEvent::StageSkipped(e) => {
                self.stages.insert(e.stage, StageState::Skipped);
            }
            RunEvent::RunAwaitingReview(_) => self.status = RunStatus::AwaitingReview,
            RunEvent::RunReviewed(e) => {
                if let ReviewDecision::Revise { feedback } = e.decision {
                    self.reviews.push(feedback);
                    self.revisions += 1;
                    self.status = RunStatus::Running;
                    self.revision_pending = true;
                }
            }
            RunEvent::RunCompleted(_) => self.status = RunStatus::Completed,
            RunEvent::RunFailed(_) => self.status = RunStatus::Failed,
            RunEvent::RunCancelled(_) => self.status = RunStatus::Cancelled,
            RunEvent::RunBlocked(_) => self.status = RunStatus::Blocked,
            RunEvent::StagesReopened(e) => {
                for stage in &e.stages {
                    self.stages.remove(stage);
                }
                self.revision_pending = false;
            }
            RunEvent::RunNeedsClarification(_) => self.status = RunStatus::NeedsClarification,
        }
    }
}

/// A title from the requirement's first line, shortened on a character boundary.
fn default_title(requirement: &str) -> String {
    let first_line = requirement.lines().next().unwrap_or_default().trim();
    const MAX: usize = 80;
    if first_line.chars().count() <= MAX {
        first_line.to_string()
    } else {
        let cut: String = first_line.chars().take(MAX - 1).collect();
        format!("{}…", cut.trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::fixed;
    use cqrs_es::test::TestFramework;
    use uuid::Uuid;

    type RunTest = TestFramework<Run>;

    fn run() -> RunTest {
        TestFramework::with(fixed::services())
    }

    fn objective(n: u128) -> ObjectiveId {
        ObjectiveId(Uuid::from_u128(n))
    }

    fn submit(title: Option<&str>, requirement: &str, pipeline: &str) -> RunCommand {
        RunCommand::SubmitRequirement {
            title: title.map(str::to_string),
            requirement: requirement.to_string(),
            pipeline: pipeline.to_string(),
            pipeline_definition: String::new(),
            auto_approve: false,
            submitted_by: "tester".into(),
        }
    }

    fn submitted() -> RunEvent {
        RunEvent::RequirementSubmitted(RequirementSubmitted {
            title: "Todo app".into(),
            requirement: "Build a todo app".into(),
            pipeline: "phase1".into(),
            pipeline_definition: String::new(),
            auto_approve: false,
            submitted_by: "tester".into(),
            submitted_at: fixed::instant(),
        })
    }

    /// The title the run gets when `requirement` is submitted without one.
    fn title_of(requirement: &str) -> String {
        let events = run()
            .given_no_previous_events()
            .when(submit(Some(" \t "), requirement, "phase1"))
            .inspect_result()
            .unwrap();
        match events.as_slice() {
            [RunEvent::RequirementSubmitted(e)] => e.title.clone(),
            other => panic!("expected one RequirementSubmitted, got {other:?}"),
        }
    }

    fn started(stage: &str, n: u128) -> RunEvent {
        RunEvent::StageStarted(StageStarted {
            stage: stage.into(),
            team: format!("{stage}-team"),
            objective_id: objective(n),
        })
    }

    fn stage_completed(stage: &str, n: u128) -> RunEvent {
        RunEvent::StageCompleted(StageCompleted { stage: stage.into(), objective_id: objective(n) })
    }

    fn skipped(stage: &str) -> RunEvent {
        RunEvent::StageSkipped(StageSkipped { stage: stage.into(), reason: "not needed".into() })
    }

    fn awaiting_review(stages: &[&str]) -> RunEvent {
        RunEvent::RunAwaitingReview(RunAwaitingReview {
            completed_stages: stages.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn reviewed(decision: ReviewDecision) -> RunEvent {
        RunEvent::RunReviewed(RunReviewed { decision, reviewer: "ada".into() })
    }

    fn reopened(stages: &[&str]) -> RunEvent {
        RunEvent::StagesReopened(StagesReopened { stages: stages.iter().map(|s| s.to_string()).collect(), revision: 1 })
    }

    fn revise(feedback: &str) -> ReviewDecision {
        ReviewDecision::Revise { feedback: feedback.into() }
    }

    fn start(stage: &str, n: u128) -> RunCommand {
        RunCommand::StartStage { stage: stage.into(), team: format!("{stage}-team"), objective_id: objective(n) }
    }

    fn complete_stage(stage: &str, n: u128) -> RunCommand {
        RunCommand::CompleteStage { stage: stage.into(), objective_id: objective(n) }
    }

    fn skip(stage: &str) -> RunCommand {
        RunCommand::SkipStage { stage: stage.into(), reason: "not needed".into() }
    }

    fn review(decision: ReviewDecision) -> RunCommand {
        RunCommand::ReviewRun { decision, reviewer: "ada".into() }
    }

    /// Every command but `SubmitRequirement`, each valid in some RUNNING or AWAITING_REVIEW run.
    fn commands_after_submission() -> Vec<RunCommand> {
        vec![
            start("design", 1),
            complete_stage("design", 1),
            skip("design"),
            RunCommand::AwaitReview,
            review(ReviewDecision::Approve),
            review(revise("more tests")),
            RunCommand::CompleteRun,
            RunCommand::FailRun { reason: "broken".into() },
            RunCommand::CancelRun { reason: "changed my mind".into(), cancelled_by: "ada".into() },
        ]
    }

    /// The run's state after `events`, as the framework would rebuild it.
    fn state(events: Vec<RunEvent>) -> Run {
        let mut run = Run::default();
        for event in events {
            run.apply(event);
        }
        run
    }

    // ---- SubmitRequirement ----

    #[test]
    fn submitting_records_the_trimmed_requirement_at_the_clock_time() {
        run()
            .given_no_previous_events()
            .when(RunCommand::SubmitRequirement {
                title: Some("  Todo app ".into()),
                requirement: "\n  Build a todo app\nwith tags  \n".into(),
                pipeline: " phase1 ".into(),
                pipeline_definition: String::new(),
                auto_approve: true,
                submitted_by: "tester".into(),
            })
            .then_expect_events(vec![RunEvent::RequirementSubmitted(RequirementSubmitted {
                title: "Todo app".into(),
                requirement: "Build a todo app\nwith tags".into(),
                pipeline: "phase1".into(),
                pipeline_definition: String::new(),
                auto_approve: true,
                submitted_by: "tester".into(),
                submitted_at: fixed::instant(),
            })]);
    }

    fn fork(completed: Vec<ForkedStage>) -> RunCommand {
        RunCommand::ForkRun {
            title: "Todo app".into(),
            requirement: "Build a todo app".into(),
            pipeline: "phase1".into(),
            pipeline_definition: String::new(),
            auto_approve: false,
            submitted_by: "tester".into(),
            forked_from: RunId(Uuid::from_u128(77)),
            at_position: 42,
            completed,
        }
    }

    #[test]
    fn a_fork_starts_with_the_requirement_and_the_stages_completed_at_its_position() {
        let ba = ForkedStage { stage: "ba".into(), team: "ba-team".into(), objective_id: objective(1) };
        run()
            .given_no_previous_events()
            .when(fork(vec![ba]))
            .then_expect_events(vec![
                submitted(),
                RunEvent::RunForked(RunForked { forked_from: RunId(Uuid::from_u128(77)), at_position: 42, stages: vec!["ba".into()] }),
                started("ba", 1),
                RunEvent::StageCompleted(StageCompleted { stage: "ba".into(), objective_id: objective(1) }),
            ]);
    }

    #[test]
    fn a_fork_is_refused_onto_an_existing_run_or_without_a_requirement() {
        run().given(vec![submitted()]).when(fork(vec![])).then_expect_error(RunError::AlreadySubmitted);
        let mut empty = fork(vec![]);
        if let RunCommand::ForkRun { requirement, .. } = &mut empty {
            requirement.clear();
        }
        run().given_no_previous_events().when(empty).then_expect_error(RunError::EmptyRequirement);
    }

    #[test]
    fn a_submitted_run_is_running() {
        let run = state(vec![submitted()]);
        assert_eq!(run.status, RunStatus::Running);
        assert_eq!(run.title, "Todo app");
        assert_eq!(run.pipeline, "phase1");
        assert!(!run.auto_approve);
        assert!(run.stages.is_empty());
    }

    #[test]
    fn an_empty_or_blank_requirement_is_refused() {
        for requirement in ["", "   ", "\n\t \r\n"] {
            run()
                .given_no_previous_events()
                .when(submit(Some("Title"), requirement, "phase1"))
                .then_expect_error(RunError::EmptyRequirement);
        }
    }

    #[test]
    fn a_one_megabyte_requirement_is_refused_as_too_large() {
        let requirement = "a".repeat(1024 * 1024);
        run()
            .given_no_previous_events()
            .when(submit(None, &requirement, "phase1"))
            .then_expect_error(RunError::RequirementTooLarge(1024 * 1024));
        run()
            .given_no_previous_events()
            .when(submit(None, &requirement, "phase1"))
            .then_expect_error_message("the requirement is 1048576 bytes; at most 65536 are accepted");
    }

    #[test]
    fn the_size_limit_counts_bytes_of_the_trimmed_requirement() {
        // Exactly at the limit, with surrounding white space that is trimmed away: accepted.
        let at_limit = "é".repeat(MAX_REQUIREMENT_BYTES / 2);
        assert_eq!(at_limit.len(), MAX_REQUIREMENT_BYTES);
        let events = run()
            .given_no_previous_events()
            .when(submit(Some("Big"), &format!("  \n{at_limit}\n  "), "phase1"))
            .inspect_result()
            .unwrap();
        assert!(matches!(&events[..], [RunEvent::RequirementSubmitted(e)] if e.requirement == at_limit));

        // One byte over: refused, and the size reported is in bytes, not characters.
        let over = format!("{at_limit}a");
        run()
            .given_no_previous_events()
            .when(submit(Some("Big"), &over, "phase1"))
            .then_expect_error(RunError::RequirementTooLarge(MAX_REQUIREMENT_BYTES + 1));
    }

    #[test]
    fn a_missing_or_blank_title_falls_back_to_the_requirements_first_line() {
        for title in [None, Some(""), Some("   \t ")] {
            run()
                .given_no_previous_events()
                .when(submit(title, "  Build a todo app  \nIt must sync across devices.", "phase1"))
                .then_expect_events(vec![RunEvent::RequirementSubmitted(RequirementSubmitted {
                    title: "Build a todo app".into(),
                    requirement: "Build a todo app  \nIt must sync across devices.".into(),
                    pipeline: "phase1".into(),
                    pipeline_definition: String::new(),
                    auto_approve: false,
                    submitted_by: "tester".into(),
                    submitted_at: fixed::instant(),
                })]);
        }
    }

    #[test]
    fn a_default_title_of_80_characters_is_kept_whole() {
        let line = "x".repeat(80);
        assert_eq!(title_of(&format!("{line}\nsecond line")), line);
    }

    #[test]
    fn a_long_first_line_is_shortened_to_80_characters_with_an_ellipsis() {
        let title = title_of(&format!("{}\nsecond line", "x".repeat(81)));
        assert_eq!(title, format!("{}…", "x".repeat(79)));
        assert_eq!(title.chars().count(), 80);
    }

    #[test]
    fn a_long_first_line_is_shortened_on_a_character_boundary() {
        // Two bytes per character: cutting by bytes would split one or count wrong.
        let title = title_of(&"é".repeat(300));
        assert_eq!(title, format!("{}…", "é".repeat(79)));
    }

    #[test]
    fn a_shortened_title_does_not_end_in_a_space_before_the_ellipsis() {
        let line = format!("{} {}", "a".repeat(78), "b".repeat(30));
        assert_eq!(title_of(&line), format!("{}…", "a".repeat(78)));
    }

    #[test]
    fn a_title_of_200_characters_is_accepted_and_201_refused() {
        let longest = "é".repeat(MAX_TITLE_CHARS);
        let events = run()
            .given_no_previous_events()
            .when(submit(Some(&longest), "Build it", "phase1"))
            .inspect_result()
            .unwrap();
        assert!(matches!(&events[..], [RunEvent::RequirementSubmitted(e)] if e.title == longest));

        run()
            .given_no_previous_events()
            .when(submit(Some(&"t".repeat(MAX_TITLE_CHARS + 1)), "Build it", "phase1"))
            .then_expect_error(RunError::TitleTooLong);
    }

    #[test]
    fn white_space_around_a_title_does_not_count_towards_its_length() {
        let title = "t".repeat(MAX_TITLE_CHARS);
        let events = run()
            .given_no_previous_events()
            .when(submit(Some(&format!("   {title}   ")), "Build it", "phase1"))
            .inspect_result()
            .unwrap();
        assert!(matches!(&events[..], [RunEvent::RequirementSubmitted(e)] if e.title == title));
    }

    #[test]
    fn an_empty_pipeline_is_refused() {
        for pipeline in ["", "  \t"] {
            run()
                .given_no_previous_events()
                .when(submit(None, "Build it", pipeline))
                .then_expect_error(RunError::EmptyPipeline);
        }
    }

    #[test]
    fn submitting_twice_is_refused() {
        run()
            .given(vec![submitted()])
            .when(submit(None, "Build it again", "phase1"))
            .then_expect_error(RunError::AlreadySubmitted);
    }

    #[test]
    fn submitting_to_a_finished_run_is_refused_as_already_submitted() {
        let cancelled = RunEvent::RunCancelled(RunCancelled { reason: "no".into(), cancelled_by: "ada".into() });
        run()
            .given(vec![submitted(), cancelled])
            .when(submit(None, "Build it again", "phase1"))
            .then_expect_error(RunError::AlreadySubmitted);
    }

    // ---- any command before submission or after the end ----

    #[test]
    fn every_command_on_a_run_never_submitted_is_not_found() {
        for command in commands_after_submission() {
            let result = run().given_no_previous_events().when(command.clone()).inspect_result();
            assert_eq!(result, Err(RunError::NotFound), "{command:?}");
        }
        run()
            .given_no_previous_events()
            .when(RunCommand::CompleteRun)
            .then_expect_error_message("no run with this id exists");
    }

    #[test]
    fn every_command_on_a_completed_failed_or_cancelled_run_is_refused_as_terminal() {
        let ends = [
            (RunEvent::RunCompleted(RunCompleted {}), "COMPLETED"),
            (RunEvent::RunFailed(RunFailed { reason: "broken".into() }), "FAILED"),
            (RunEvent::RunCancelled(RunCancelled { reason: "no".into(), cancelled_by: "ada".into() }), "CANCELLED"),
        ];
        for (end, status) in ends {
            // A stage left in progress must not make any command valid.
            let history = vec![submitted(), started("design", 1), end];
            for command in commands_after_submission() {
                let result = run().given(history.clone()).when(command.clone()).inspect_result();
                assert_eq!(result, Err(RunError::Terminal(status)), "{status}: {command:?}");
            }
        }
    }

    #[test]
    fn an_approved_run_takes_no_further_commands() {
        let history = vec![
            submitted(),
            awaiting_review(&[]),
            reviewed(ReviewDecision::Approve),
            RunEvent::RunCompleted(RunCompleted {}),
        ];
        run()
            .given(history.clone())
            .when(RunCommand::CancelRun { reason: "late".into(), cancelled_by: "ada".into() })
            .then_expect_error(RunError::Terminal("COMPLETED"));
        run()
            .given(history)
            .when(RunCommand::FailRun { reason: "late".into() })
            .then_expect_error_message("the run is COMPLETED: it takes no further commands");
    }

    // ---- StartStage ----

    #[test]
    fn starting_a_stage_records_its_team_and_objective() {
        run().given(vec![submitted()]).when(start("design", 1)).then_expect_events(vec![started("design", 1)]);
    }

    #[test]
    fn several_stages_may_be_in_progress_at_once() {
        run()
            .given(vec![submitted(), started("frontend", 1)])
            .when(start("backend", 2))
            .then_expect_events(vec![started("backend", 2)]);
    }

    #[test]
    fn starting_a_stage_twice_is_refused() {
        run()
            .given(vec![submitted(), started("design", 1)])
            .when(start("design", 2))
            .then_expect_error(RunError::StageAlreadyStarted("design".into()));
    }

    #[test]
    fn starting_a_completed_or_skipped_stage_is_refused() {
        run()
            .given(vec![submitted(), started("design", 1), stage_completed("design", 1)])
            .when(start("design", 2))
            .then_expect_error(RunError::StageFinished("design".into()));
        run()
            .given(vec![submitted(), skipped("design")])
            .when(start("design", 2))
            .then_expect_error(RunError::StageFinished("design".into()));
    }

    #[test]
    fn starting_a_stage_while_awaiting_review_is_refused() {
        run()
            .given(vec![submitted(), awaiting_review(&[])])
            .when(start("design", 1))
            .then_expect_error(RunError::NotRunning("AWAITING_REVIEW"));
    }

    // ---- CompleteStage ----

    #[test]
    fn completing_a_stage_names_the_objective_it_was_started_with() {
        run()
            .given(vec![submitted(), started("design", 7)])
            .when(complete_stage("design", 7))
            .then_expect_events(vec![stage_completed("design", 7)]);
    }

    #[test]
    fn a_completion_naming_an_earlier_objective_of_a_reopened_stage_is_refused() {
        // Objective 1 completed the stage; a revision reopened it and objective 2 works it.
        // A redelivered completion of objective 1 must not complete objective 2's stage.
        run()
            .given(vec![
                submitted(),
                started("design", 1),
                stage_completed("design", 1),
                awaiting_review(&["design"]),
                reviewed(revise("more detail")),
                reopened(&["design"]),
                started("design", 2),
            ])
            .when(complete_stage("design", 1))
            .then_expect_error(RunError::NotTheStagesObjective {
                stage: "design".into(),
                named: objective(1),
                current: objective(2),
            });
    }

    #[test]
    fn after_a_revise_the_run_neither_finishes_nor_starts_until_its_stages_are_reopened() {
        // A late event must not send the run straight back to review on its old stages.
        let history = vec![
            submitted(),
            started("design", 1),
            stage_completed("design", 1),
            awaiting_review(&["design"]),
            reviewed(revise("more detail")),
        ];
        for command in [RunCommand::AwaitReview, RunCommand::CompleteRun, start("build", 2)] {
            run().given(history.clone()).when(command).then_expect_error(RunError::RevisionPending);
        }
        let mut reopened_history = history.clone();
        reopened_history.push(reopened(&["design"]));
        run().given(reopened_history).when(start("design", 2)).then_expect_events(vec![started("design", 2)]);
        run()
            .given(history)
            .when(RunCommand::FailRun { reason: "revised too often".into() })
            .then_expect_events(vec![RunEvent::RunFailed(RunFailed { reason: "revised too often".into() })]);
    }

    #[test]
    fn a_completed_stage_keeps_its_team() {
        let run = state(vec![submitted(), started("design", 7), stage_completed("design", 7)]);
        assert_eq!(
            run.stages.get("design"),
            Some(&StageState::Completed { team: "design-team".into(), objective_id: objective(7) })
        );
    }

    #[test]
    fn completing_a_stage_that_never_started_is_refused() {
        run()
            .given(vec![submitted(), started("design", 1)])
            .when(complete_stage("build", 1))
            .then_expect_error(RunError::StageNotStarted("build".into()));
    }

    #[test]
    fn completing_a_finished_stage_is_refused() {
        run()
            .given(vec![submitted(), started("design", 1), stage_completed("design", 1)])
            .when(complete_stage("design", 1))
            .then_expect_error(RunError::StageFinished("design".into()));
        run()
            .given(vec![submitted(), skipped("design")])
            .when(complete_stage("design", 1))
            .then_expect_error(RunError::StageFinished("design".into()));
    }

    // ---- SkipStage ----

    #[test]
    fn skipping_a_stage_that_never_started_records_the_reason() {
        run().given(vec![submitted()]).when(skip("docs")).then_expect_events(vec![skipped("docs")]);
    }

    #[test]
    fn a_stage_in_progress_can_be_skipped_and_then_cannot_complete() {
        // Skipping is how a stuck stage is given up on; its late answer must not count.
        run()
            .given(vec![submitted(), started("design", 1)])
            .when(skip("design"))
            .then_expect_events(vec![skipped("design")]);
        run()
            .given(vec![submitted(), started("design", 1), skipped("design")])
            .when(complete_stage("design", 1))
            .then_expect_error(RunError::StageFinished("design".into()));
    }

    #[test]
    fn skipping_a_finished_stage_is_refused() {
        run()
            .given(vec![submitted(), started("design", 1), stage_completed("design", 1)])
            .when(skip("design"))
            .then_expect_error(RunError::StageFinished("design".into()));
        run()
            .given(vec![submitted(), skipped("design")])
            .when(skip("design"))
            .then_expect_error(RunError::StageFinished("design".into()));
    }

    // ---- AwaitReview ----

    #[test]
    fn awaiting_review_lists_the_completed_stages_but_not_the_skipped_ones() {
        run()
            .given(vec![
                submitted(),
                started("business-analysis", 1),
                stage_completed("business-analysis", 1),
                started("solution-architecture", 2),
                stage_completed("solution-architecture", 2),
                skipped("devops"),
                started("backend-engineering", 3),
                stage_completed("backend-engineering", 3),
            ])
            .when(RunCommand::AwaitReview)
            // In name order (the stages are a BTreeMap), not in the order they ran.
            .then_expect_events(vec![awaiting_review(&[
                "backend-engineering",
                "business-analysis",
                "solution-architecture",
            ])]);
    }

    #[test]
    fn awaiting_review_with_stages_in_progress_is_refused_naming_them() {
        run()
            .given(vec![submitted(), started("qa", 1), started("docs", 2), started("build", 3), stage_completed("build", 3)])
            .when(RunCommand::AwaitReview)
            .then_expect_error(RunError::StagesInProgress("docs, qa".into()));
        run()
            .given(vec![submitted(), started("qa", 1)])
            .when(RunCommand::AwaitReview)
            .then_expect_error_message("stages are still in progress: qa");
    }

    #[test]
    fn awaiting_review_twice_is_refused() {
        run()
            .given(vec![submitted(), awaiting_review(&[])])
            .when(RunCommand::AwaitReview)
            .then_expect_error(RunError::NotRunning("AWAITING_REVIEW"));
    }

    // ---- ReviewRun ----

    #[test]
    fn approving_records_the_review_and_completes_the_run() {
        run()
            .given(vec![submitted(), started("design", 1), stage_completed("design", 1), awaiting_review(&["design"])])
            .when(review(ReviewDecision::Approve))
            .then_expect_events(vec![reviewed(ReviewDecision::Approve), RunEvent::RunCompleted(RunCompleted {})]);
    }

    #[test]
    fn revising_records_the_feedback_and_completes_nothing() {
        run()
            .given(vec![submitted(), awaiting_review(&[])])
            .when(review(revise("add dark mode")))
            .then_expect_events(vec![reviewed(revise("add dark mode"))]);
    }

    #[test]
    fn a_revised_run_is_running_again_with_one_more_revision() {
        let once = vec![submitted(), awaiting_review(&[]), reviewed(revise("add dark mode"))];
        let run_state = state(once.clone());
        assert_eq!(run_state.status, RunStatus::Running);
        assert_eq!(run_state.revisions, 1);

        let mut twice = once.clone();
        twice.extend([awaiting_review(&[]), reviewed(revise("and a light one"))]);
        let run_state = state(twice);
        assert_eq!(run_state.status, RunStatus::Running);
        assert_eq!(run_state.revisions, 2);

        // Running again: its stages reopened, it can stop for review again, and cannot be
        // reviewed until it does.
        let mut reopened_once = once.clone();
        reopened_once.push(reopened(&[]));
        run().given(reopened_once).when(RunCommand::AwaitReview).then_expect_events(vec![awaiting_review(&[])]);
        run().given(once).when(review(ReviewDecision::Approve)).then_expect_error(RunError::NotAwaitingReview("RUNNING"));
    }

    #[test]
    fn approving_does_not_count_as_a_revision() {
        let run_state = state(vec![
            submitted(),
            awaiting_review(&[]),
            reviewed(ReviewDecision::Approve),
            RunEvent::RunCompleted(RunCompleted {}),
        ]);
        assert_eq!(run_state.revisions, 0);
        assert_eq!(run_state.status, RunStatus::Completed);
    }

    #[test]
    fn reviewing_a_run_that_is_not_awaiting_review_is_refused() {
        run()
            .given(vec![submitted()])
            .when(review(ReviewDecision::Approve))
            .then_expect_error(RunError::NotAwaitingReview("RUNNING"));
        run()
            .given(vec![submitted()])
            .when(review(revise("more")))
            .then_expect_error_message("the run is RUNNING, not AWAITING_REVIEW: there is nothing to review");
    }

    #[test]
    fn revising_with_empty_feedback_is_refused() {
        for feedback in ["", "  \n "] {
            run()
                .given(vec![submitted(), awaiting_review(&[])])
                .when(review(revise(feedback)))
                .then_expect_error(RunError::EmptyFeedback);
        }
    }

    // ---- CompleteRun ----

    #[test]
    fn completing_a_running_run_with_no_stage_in_progress_completes_it() {
        run()
            .given(vec![submitted(), started("design", 1), stage_completed("design", 1), skipped("docs")])
            .when(RunCommand::CompleteRun)
            .then_expect_events(vec![RunEvent::RunCompleted(RunCompleted {})]);
    }

    #[test]
    fn completing_a_run_with_stages_in_progress_is_refused() {
        run()
            .given(vec![submitted(), started("design", 1)])
            .when(RunCommand::CompleteRun)
            .then_expect_error(RunError::StagesInProgress("design".into()));
    }

    #[test]
    fn completing_a_run_awaiting_review_is_refused_so_the_review_cannot_be_bypassed() {
        run()
            .given(vec![submitted(), awaiting_review(&[])])
            .when(RunCommand::CompleteRun)
            .then_expect_error(RunError::NotRunning("AWAITING_REVIEW"));
    }

    // ---- FailRun and CancelRun ----

    #[test]
    fn a_running_or_awaiting_run_can_fail() {
        for history in [vec![submitted(), started("design", 1)], vec![submitted(), awaiting_review(&[])]] {
            run()
                .given(history)
                .when(RunCommand::FailRun { reason: "budget exhausted".into() })
                .then_expect_events(vec![RunEvent::RunFailed(RunFailed { reason: "budget exhausted".into() })]);
        }
    }

    #[test]
    fn a_running_or_awaiting_run_can_be_cancelled() {
        let cancelled =
            RunEvent::RunCancelled(RunCancelled { reason: "changed my mind".into(), cancelled_by: "ada".into() });
        for history in [vec![submitted(), started("design", 1)], vec![submitted(), awaiting_review(&[])]] {
            run()
                .given(history)
                .when(RunCommand::CancelRun { reason: "changed my mind".into(), cancelled_by: "ada".into() })
                .then_expect_events(vec![cancelled.clone()]);
        }
    }

    #[test]
    fn the_end_events_set_the_terminal_status() {
        let cancelled = RunEvent::RunCancelled(RunCancelled { reason: "no".into(), cancelled_by: "ada".into() });
        assert_eq!(state(vec![submitted(), RunEvent::RunCompleted(RunCompleted {})]).status, RunStatus::Completed);
        assert_eq!(state(vec![submitted(), RunEvent::RunFailed(RunFailed { reason: "x".into() })]).status, RunStatus::Failed);
        assert_eq!(state(vec![submitted(), cancelled]).status, RunStatus::Cancelled);
    }

    // ---- RunStatus ----

    #[test]
    fn run_status_names_in_json_and_in_messages_agree() {
        let all = [
            RunStatus::New,
            RunStatus::Running,
            RunStatus::NeedsClarification,
            RunStatus::Blocked,
            RunStatus::AwaitingReview,
            RunStatus::Completed,
            RunStatus::Failed,
            RunStatus::Cancelled,
        ];
        for status in all {
            assert_eq!(serde_json::to_value(status).unwrap(), serde_json::json!(status.as_str()));
        }
        let terminal: Vec<_> = all.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal, [RunStatus::Completed, RunStatus::Failed, RunStatus::Cancelled]);
    }
}

#[cfg(test)]
mod stop_tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    struct Clock;
    impl crate::Services for Clock {
        fn now(&self) -> DateTime<Utc> {
            DateTime::UNIX_EPOCH
        }
    }

    fn given_a_started_stage() -> Vec<RunEvent> {
        vec![
            RunEvent::RequirementSubmitted(RequirementSubmitted {
                title: "t".into(),
                requirement: "r".into(),
                pipeline: "phase1".into(),
                pipeline_definition: String::new(),
                auto_approve: false,
                submitted_by: "tester".into(),
                submitted_at: DateTime::UNIX_EPOCH,
            }),
            RunEvent::StageStarted(StageStarted {
                stage: "backend".into(),
                team: "backend-engineering".into(),
                objective_id: ObjectiveId::default(),
            }),
        ]
    }

    fn run() -> TestFramework<Run> {
        let services: crate::SharedServices = std::sync::Arc::new(Clock);
        TestFramework::with(services)
    }

    #[test]
    fn a_blocked_stage_blocks_the_run_and_nothing_else_starts() {
        run()
            .given(given_a_started_stage())
            .when(RunCommand::BlockRun { stage: "backend".into(), reason: "no credentials".into(), objective_id: ObjectiveId::default() })
            .then_expect_events(vec![RunEvent::RunBlocked(RunBlocked {
                stage: "backend".into(),
                reason: "no credentials".into(),
            })]);
        let mut events = given_a_started_stage();
        events.push(RunEvent::RunBlocked(RunBlocked { stage: "backend".into(), reason: "x".into() }));
        run()
            .given(events)
            .when(RunCommand::StartStage { stage: "qa".into(), team: "qa-engineering".into(), objective_id: ObjectiveId::default() })
            .then_expect_error(RunError::NotRunning("BLOCKED"));
    }

    #[test]
    fn a_question_pauses_the_run() {
        run()
            .given(given_a_started_stage())
            .when(RunCommand::AwaitClarification { stage: "backend".into(), question: "which database?".into(), objective_id: ObjectiveId::default() })
            .then_expect_events(vec![RunEvent::RunNeedsClarification(RunNeedsClarification {
                stage: "backend".into(),
                question: "which database?".into(),
            })]);
    }

    #[test]
    fn only_a_stage_in_progress_can_block_or_ask() {
        run()
            .given(given_a_started_stage())
            .when(RunCommand::BlockRun { stage: "qa".into(), reason: "x".into(), objective_id: ObjectiveId::default() })
            .then_expect_error(RunError::StageNotStarted("qa".into()));
        run()
            .given(given_a_started_stage())
            .when(RunCommand::AwaitClarification { stage: "qa".into(), question: "x".into(), objective_id: ObjectiveId::default() })
            .then_expect_error(RunError::StageNotStarted("qa".into()));
    }

    #[test]
    fn only_the_stages_current_objective_can_block_or_ask() {
        // A redelivered answer of an objective replaced since (the stage was reopened).
        let stale = ObjectiveId(uuid::Uuid::from_u128(99));
        let expected = || RunError::NotTheStagesObjective { stage: "backend".into(), named: stale, current: ObjectiveId::default() };
        run()
            .given(given_a_started_stage())
            .when(RunCommand::BlockRun { stage: "backend".into(), reason: "x".into(), objective_id: stale })
            .then_expect_error(expected());
        run()
            .given(given_a_started_stage())
            .when(RunCommand::AwaitClarification { stage: "backend".into(), question: "x".into(), objective_id: stale })
            .then_expect_error(expected());
    }
}

#[cfg(test)]
mod revision_tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    struct Clock;
    impl crate::Services for Clock {
        fn now(&self) -> DateTime<Utc> {
            DateTime::UNIX_EPOCH
        }
    }

    fn run() -> TestFramework<Run> {
        let services: crate::SharedServices = std::sync::Arc::new(Clock);
        TestFramework::with(services)
    }

    fn revised() -> Vec<RunEvent> {
        let id = ObjectiveId::default();
        vec![
            RunEvent::RequirementSubmitted(RequirementSubmitted {
                title: "t".into(),
                requirement: "r".into(),
                pipeline: "phase1".into(),
                pipeline_definition: String::new(),
                auto_approve: false,
                submitted_by: "tester".into(),
                submitted_at: DateTime::UNIX_EPOCH,
            }),
            RunEvent::StageStarted(StageStarted { stage: "ba".into(), team: "business-analysis".into(), objective_id: id }),
            RunEvent::StageCompleted(StageCompleted { stage: "ba".into(), objective_id: id }),
            RunEvent::StageStarted(StageStarted { stage: "sa".into(), team: "solution-architecture".into(), objective_id: id }),
            RunEvent::StageCompleted(StageCompleted { stage: "sa".into(), objective_id: id }),
            RunEvent::RunAwaitingReview(RunAwaitingReview { completed_stages: vec!["ba".into(), "sa".into()] }),
            RunEvent::RunReviewed(RunReviewed {
                decision: ReviewDecision::Revise { feedback: "add expiry".into() },
                reviewer: "ada".into(),
            }),
        ]
    }

    #[test]
    fn a_revision_reopens_stages_which_can_then_start_again() {
        run()
            .given(revised())
            .when(RunCommand::ReopenStages { stages: vec!["sa".into()] })
            .then_expect_events(vec![RunEvent::StagesReopened(StagesReopened { stages: vec!["sa".into()], revision: 1 })]);
        let mut events = revised();
        events.push(RunEvent::StagesReopened(StagesReopened { stages: vec!["sa".into()], revision: 1 }));
        let again = ObjectiveId::new();
        run()
            .given(events)
            .when(RunCommand::StartStage { stage: "sa".into(), team: "solution-architecture".into(), objective_id: again })
            .then_expect_events(vec![RunEvent::StageStarted(StageStarted {
                stage: "sa".into(),
                team: "solution-architecture".into(),
                objective_id: again,
            })]);
    }

    #[test]
    fn reopening_needs_known_stages_and_a_running_run() {
        run()
            .given(revised())
            .when(RunCommand::ReopenStages { stages: vec![] })
            .then_expect_error(RunError::NothingToReopen);
        run()
            .given(revised())
            .when(RunCommand::ReopenStages { stages: vec!["qa".into()] })
            .then_expect_error(RunError::StageNotStarted("qa".into()));
        let mut awaiting = revised();
        awaiting.pop();
        run()
            .given(awaiting)
            .when(RunCommand::ReopenStages { stages: vec!["sa".into()] })
            .then_expect_error(RunError::NotRunning("AWAITING_REVIEW"));
    }
}
