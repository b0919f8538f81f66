//! The `Objective` aggregate: one team's task within a run.
//!
//! An objective is assigned to a team, records each model call made for it and each
//! `TaskResult` the team gave, the artifacts it produced, and ends completed or blocked.
//! Results carry an idempotency key so that a redelivered work message cannot record a
//! second result.

use crate::{EVENT_VERSION_1, ObjectiveId, RunId, SharedServices, TaskResult, TaskStatus};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Clone, Debug, PartialEq)]
pub enum ObjectiveCommand {
    AssignObjective {
        /// Must equal the aggregate id the command is sent to.
        objective_id: ObjectiveId,
        run_id: RunId,
        stage: String,
        team: String,
        instructions: String,
        max_iterations: u32,
        /// The worker process that takes the objective from memory (see [`ObjectiveAssigned::claimed_by`]).
        claimed_by: Option<String>,
    },
    RecordModelCall(ModelCalled),
    RecordTaskResult {
        idempotency_key: String,
        result: TaskResult,
    },
    ProduceArtifact(ArtifactProduced),
    CompleteObjective,
    BlockObjective {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ObjectiveAssigned {
    pub objective_id: ObjectiveId,
    pub run_id: RunId,
    pub stage: String,
    pub team: String,
    pub instructions: String,
    pub max_iterations: u32,
    /// The worker process (its instance id) that takes the objective from memory, handed
    /// over in the process that assigned it; a worker of another process that is given
    /// the objective's work message leaves it to that one while it lives. `None`: whoever
    /// the work queue gives it to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
}

/// One call to a model, with what a deterministic re-run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ModelCalled {
    pub alias: String,
    pub provider: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    pub latency_ms: u64,
    /// `ok`, or what went wrong (`http_500`, `timeout`, ...).
    pub outcome: String,
    /// Targets of the alias's chain that failed before this one, as `provider:model`.
    #[serde(default)]
    pub failed_targets: Vec<String>,
    /// sha256 of the request, so a re-run can match answers to questions.
    pub request_digest: String,
    pub response: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskResultRecorded {
    pub idempotency_key: String,
    pub iteration: u32,
    pub result: TaskResult,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ObjectiveCompleted {
    pub iterations: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ObjectiveBlocked {
    pub reason: String,
}

/// A file a team produced; content is addressed by its sha256.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ArtifactProduced {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    pub media_type: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ObjectiveEvent {
    ObjectiveAssigned(ObjectiveAssigned),
    ModelCalled(ModelCalled),
    TaskResultRecorded(TaskResultRecorded),
    ArtifactProduced(ArtifactProduced),
    ObjectiveCompleted(ObjectiveCompleted),
    ObjectiveBlocked(ObjectiveBlocked),
}

impl DomainEvent for ObjectiveEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ObjectiveAssigned(_) => "ObjectiveAssigned",
            Self::ModelCalled(_) => "ModelCalled",
            Self::TaskResultRecorded(_) => "TaskResultRecorded",
            Self::ArtifactProduced(_) => "ArtifactProduced",
            Self::ObjectiveCompleted(_) => "ObjectiveCompleted",
            Self::ObjectiveBlocked(_) => "ObjectiveBlocked",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        EVENT_VERSION_1.to_string()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectiveError {
    #[error("this objective was already assigned")]
    AlreadyAssigned,
    #[error("no objective with this id exists")]
    NotFound,
    #[error("the objective is {0}: it takes no further commands")]
    Finished(&'static str),
    #[error("team is empty")]
    EmptyTeam,
    #[error("stage is empty")]
    EmptyStage,
    #[error("max_iterations must be at least 1")]
    NoIterations,
    #[error("the objective has used all {0} iterations")]
    IterationsExhausted(u32),
    #[error("the last result is {0:?}, not COMPLETE: the objective cannot complete")]
    NotComplete(Option<TaskStatus>),
    #[error("artifact path `{0}` must be relative, without `..`")]
    BadArtifactPath(String),
    #[error("artifact digest `{0}` is not a sha256 in hex")]
    BadDigest(String),
    #[error("model call cost `{0}` is not a finite, non-negative number of dollars")]
    BadCost(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectiveStatus {
    #[default]
    New,
    Assigned,
    Completed,
    Blocked,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Objective {
    pub status: ObjectiveStatus,
    pub run_id: RunId,
    pub stage: String,
    pub team: String,
    pub max_iterations: u32,
    pub iterations: u32,
    pub last_result: Option<TaskStatus>,
    /// Keys of recorded results; a repeat is accepted and records nothing.
    pub result_keys: BTreeSet<String>,
    /// The artifacts produced, in order: (path, sha256).
    #[serde(default)]
    pub artifacts: Vec<(String, String)>,
    /// The COMPLETE result's reasoning and the artifacts it names, once there is one.
    #[serde(default)]
    pub completed_with: Option<(String, Vec<String>)>,
    /// What its model calls cost, in USD.
    #[serde(default)]
    pub spent_usd: f64,
    /// The worker process that took it from memory (see [`ObjectiveAssigned::claimed_by`]).
    #[serde(default)]
    pub claimed_by: Option<String>,
}

impl Objective {
    fn require_open(&self) -> Result<(), ObjectiveError> {
        match self.status {
            ObjectiveStatus::New => Err(ObjectiveError::NotFound),
            ObjectiveStatus::Completed => Err(ObjectiveError::Finished("COMPLETED")),
            ObjectiveStatus::Blocked => Err(ObjectiveError::Finished("BLOCKED")),
            ObjectiveStatus::Assigned => Ok(()),
        }
    }
}

impl Aggregate for Objective {
    const TYPE: &'static str = "objective";
    type Command = ObjectiveCommand;
    type Event = ObjectiveEvent;
    type Error = ObjectiveError;
    type Services = SharedServices;

    async fn handle(
        &mut self,
        command: ObjectiveCommand,
        _services: &SharedServices,
        sink: &EventSink<Self>,
    ) -> Result<(), ObjectiveError> {
        let event = match command {
            ObjectiveCommand::AssignObjective { objective_id, run_id, stage, team, instructions, max_iterations, claimed_by } => {
                if self.status != ObjectiveStatus::New {
                    return Err(ObjectiveError::AlreadyAssigned);
                }
                if team.trim().is_empty() {
                    return Err(ObjectiveError::EmptyTeam);
                }
                if stage.trim().is_empty() {
                    return Err(ObjectiveError::EmptyStage);
                }
                if max_iterations == 0 {
                    return Err(ObjectiveError::NoIterations);
                }
                ObjectiveEvent::ObjectiveAssigned(ObjectiveAssigned {
                    objective_id,
                    run_id,
                    stage,
                    team,
                    instructions,
                    max_iterations,
                    claimed_by,
                })
            }
            ObjectiveCommand::RecordModelCall(call) => {
                self.require_open()?;
                // JSON has no NaN or infinity: such a cost would be stored as `null` and the
                // objective could never be loaded again.
                if !call.cost_usd.is_finite() || call.cost_usd < 0.0 {
                    return Err(ObjectiveError::BadCost(call.cost_usd.to_string()));
                }
                ObjectiveEvent::ModelCalled(call)
            }
            ObjectiveCommand::RecordTaskResult { idempotency_key, result } => {
                // A redelivered result is a no-op even once the objective has finished (the
                // usual case: the first delivery's result is what finished it).
                if self.result_keys.contains(&idempotency_key) {
                    return Ok(());
                }
                self.require_open()?;
                if self.iterations >= self.max_iterations {
                    return Err(ObjectiveError::IterationsExhausted(self.max_iterations));
                }
                ObjectiveEvent::TaskResultRecorded(TaskResultRecorded {
                    idempotency_key,
                    iteration: self.iterations + 1,
                    result,
                })
            }
            ObjectiveCommand::ProduceArtifact(artifact) => {
                self.require_open()?;
                let path = &artifact.path;
                if path.is_empty()
                    || path.starts_with('/')
                    || path.split(['/', '\\']).any(|part| part == "..")
                {
                    return Err(ObjectiveError::BadArtifactPath(artifact.path));
                }
                if artifact.sha256.len() != 64 || !artifact.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(ObjectiveError::BadDigest(artifact.sha256));
                }
                ObjectiveEvent::ArtifactProduced(artifact)
            }
            ObjectiveCommand::CompleteObjective => {
                self.require_open()?;
                if self.last_result != Some(TaskStatus::Complete) {
                    return Err(ObjectiveError::NotComplete(self.last_result));
                }
                ObjectiveEvent::ObjectiveCompleted(ObjectiveCompleted { iterations: self.iterations })
            }
            ObjectiveCommand::BlockObjective { reason } => {
                self.require_open()?;
                ObjectiveEvent::ObjectiveBlocked(ObjectiveBlocked { reason })
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: ObjectiveEvent) {
        match event {
            ObjectiveEvent::ObjectiveAssigned(e) => {
                self.status = ObjectiveStatus::Assigned;
                self.run_id = e.run_id;
                self.stage = e.stage;
                self.team = e.team;
                self.max_iterations = e.max_iterations;
                self.claimed_by = e.claimed_by;
            }
            ObjectiveEvent::ModelCalled(e) => self.spent_usd += e.cost_usd,
            ObjectiveEvent::ArtifactProduced(e) => self.artifacts.push((e.path, e.sha256)),
            ObjectiveEvent::TaskResultRecorded(e) => {
                if e.result.status == TaskStatus::Complete {
                    self.completed_with = Some((e.result.reasoning.clone(), e.result.artifacts.clone()));
                }
                self.iterations = e.iteration;
                self.last_result = Some(e.result.status);
                self.result_keys.insert(e.idempotency_key);
            }
            ObjectiveEvent::ObjectiveCompleted(_) => self.status = ObjectiveStatus::Completed,
            ObjectiveEvent::ObjectiveBlocked(_) => self.status = ObjectiveStatus::Blocked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::fixed;
    use cqrs_es::test::TestFramework;
    use uuid::Uuid;

    type ObjectiveTest = TestFramework<Objective>;

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn objective() -> ObjectiveTest {
        TestFramework::with(fixed::services())
    }

    fn ids() -> (ObjectiveId, RunId) {
        (ObjectiveId(Uuid::from_u128(1)), RunId(Uuid::from_u128(2)))
    }

    fn assign(stage: &str, team: &str, max_iterations: u32) -> ObjectiveCommand {
        let (objective_id, run_id) = ids();
        ObjectiveCommand::AssignObjective {
            objective_id,
            run_id,
            stage: stage.into(),
            team: team.into(),
            instructions: "Write the requirements list".into(),
            max_iterations,
            claimed_by: None,
        }
    }

    fn assigned(max_iterations: u32) -> ObjectiveEvent {
        let (objective_id, run_id) = ids();
        ObjectiveEvent::ObjectiveAssigned(ObjectiveAssigned {
            objective_id,
            run_id,
            stage: "analysis".into(),
            team: "business-analysis".into(),
            instructions: "Write the requirements list".into(),
            max_iterations,
            claimed_by: None,
        })
    }

    fn answer(status: TaskStatus) -> TaskResult {
        TaskResult { artifacts: vec!["requirements.md".into()], ..TaskResult::new(status, "because") }
    }

    fn record(key: &str, status: TaskStatus) -> ObjectiveCommand {
        ObjectiveCommand::RecordTaskResult { idempotency_key: key.into(), result: answer(status) }
    }

    fn recorded(key: &str, iteration: u32, status: TaskStatus) -> ObjectiveEvent {
        ObjectiveEvent::TaskResultRecorded(TaskResultRecorded {
            idempotency_key: key.into(),
            iteration,
            result: answer(status),
        })
    }

    fn model_call(cost_usd: f64) -> ModelCalled {
        ModelCalled {
            alias: "factory/fast".into(),
            provider: "scripted".into(),
            model: "demo".into(),
            input_tokens: 120,
            output_tokens: 80,
            cost_usd,
            latency_ms: 15,
            outcome: "ok".into(),
            failed_targets: vec!["openai:gpt-4o".into()],
            request_digest: SHA.into(),
            response: "{}".into(),
        }
    }

    fn artifact(path: &str, sha256: &str) -> ArtifactProduced {
        ArtifactProduced { path: path.into(), sha256: sha256.into(), bytes: 42, media_type: "text/markdown".into() }
    }

    fn completed(iterations: u32) -> ObjectiveEvent {
        ObjectiveEvent::ObjectiveCompleted(ObjectiveCompleted { iterations })
    }

    fn blocked() -> ObjectiveEvent {
        ObjectiveEvent::ObjectiveBlocked(ObjectiveBlocked { reason: "no database access".into() })
    }

    /// Every command but `AssignObjective`, each valid on an open objective whose last result is COMPLETE.
    fn commands_after_assignment() -> Vec<ObjectiveCommand> {
        vec![
            ObjectiveCommand::RecordModelCall(model_call(0.25)),
            record("fresh-key", TaskStatus::Complete),
            ObjectiveCommand::ProduceArtifact(artifact("docs/requirements.md", SHA)),
            ObjectiveCommand::CompleteObjective,
            ObjectiveCommand::BlockObjective { reason: "stuck".into() },
        ]
    }

    fn state(events: Vec<ObjectiveEvent>) -> Objective {
        let mut objective = Objective::default();
        for event in events {
            objective.apply(event);
        }
        objective
    }

    // ---- AssignObjective ----

    #[test]
    fn assigning_records_the_team_stage_and_limit() {
        objective()
            .given_no_previous_events()
            .when(assign("analysis", "business-analysis", 3))
            .then_expect_events(vec![assigned(3)]);
        let state = state(vec![assigned(3)]);
        assert_eq!(state.status, ObjectiveStatus::Assigned);
        assert_eq!(state.run_id, ids().1);
        assert_eq!((state.stage.as_str(), state.team.as_str()), ("analysis", "business-analysis"));
        assert_eq!((state.max_iterations, state.iterations, state.last_result), (3, 0, None));
    }

    #[test]
    fn assigning_twice_is_refused() {
        objective()
            .given(vec![assigned(3)])
            .when(assign("analysis", "business-analysis", 3))
            .then_expect_error(ObjectiveError::AlreadyAssigned);
        objective()
            .given(vec![assigned(1), recorded("k", 1, TaskStatus::Complete), completed(1)])
            .when(assign("analysis", "business-analysis", 3))
            .then_expect_error(ObjectiveError::AlreadyAssigned);
    }

    #[test]
    fn assigning_with_an_empty_team_is_refused() {
        for team in ["", "  "] {
            objective()
                .given_no_previous_events()
                .when(assign("analysis", team, 3))
                .then_expect_error(ObjectiveError::EmptyTeam);
        }
    }

    #[test]
    fn assigning_with_an_empty_stage_is_refused() {
        for stage in ["", "\t"] {
            objective()
                .given_no_previous_events()
                .when(assign(stage, "business-analysis", 3))
                .then_expect_error(ObjectiveError::EmptyStage);
        }
    }

    #[test]
    fn assigning_with_zero_iterations_is_refused() {
        objective()
            .given_no_previous_events()
            .when(assign("analysis", "business-analysis", 0))
            .then_expect_error(ObjectiveError::NoIterations);
    }

    // ---- before assignment, after the end ----

    #[test]
    fn every_command_on_an_objective_never_assigned_is_not_found() {
        for command in commands_after_assignment() {
            let result = objective().given_no_previous_events().when(command.clone()).inspect_result();
            assert_eq!(result, Err(ObjectiveError::NotFound), "{command:?}");
        }
    }

    #[test]
    fn every_command_on_a_completed_or_blocked_objective_is_refused() {
        let ends = [
            (vec![assigned(3), recorded("k1", 1, TaskStatus::Complete), completed(1)], "COMPLETED"),
            (vec![assigned(3), recorded("k1", 1, TaskStatus::Complete), blocked()], "BLOCKED"),
        ];
        for (history, status) in ends {
            for command in commands_after_assignment() {
                let result = objective().given(history.clone()).when(command.clone()).inspect_result();
                assert_eq!(result, Err(ObjectiveError::Finished(status)), "{status}: {command:?}");
            }
        }
        objective()
            .given(vec![assigned(3), blocked()])
            .when(ObjectiveCommand::BlockObjective { reason: "again".into() })
            .then_expect_error_message("the objective is BLOCKED: it takes no further commands");
    }

    // ---- RecordModelCall ----

    #[test]
    fn recording_a_model_call_records_it_unchanged() {
        objective()
            .given(vec![assigned(3)])
            .when(ObjectiveCommand::RecordModelCall(model_call(0.0042)))
            .then_expect_events(vec![ObjectiveEvent::ModelCalled(model_call(0.0042))]);
    }

    #[test]
    fn a_free_model_call_is_recorded() {
        objective()
            .given(vec![assigned(3)])
            .when(ObjectiveCommand::RecordModelCall(model_call(0.0)))
            .then_expect_events(vec![ObjectiveEvent::ModelCalled(model_call(0.0))]);
    }

    #[test]
    fn a_model_call_with_a_cost_json_cannot_hold_or_a_negative_cost_is_refused() {
        for cost in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.01] {
            let result = objective()
                .given(vec![assigned(3)])
                .when(ObjectiveCommand::RecordModelCall(model_call(cost)))
                .inspect_result();
            assert_eq!(result, Err(ObjectiveError::BadCost(cost.to_string())), "{cost}");
        }
    }

    // ---- RecordTaskResult ----

    #[test]
    fn results_are_numbered_by_iteration() {
        objective()
            .given(vec![assigned(3)])
            .when(record("k1", TaskStatus::NeedsClarification))
            .then_expect_events(vec![recorded("k1", 1, TaskStatus::NeedsClarification)]);
        objective()
            .given(vec![assigned(3), recorded("k1", 1, TaskStatus::NeedsClarification)])
            .when(record("k2", TaskStatus::Complete))
            .then_expect_events(vec![recorded("k2", 2, TaskStatus::Complete)]);
    }

    #[test]
    fn a_result_with_a_repeated_idempotency_key_records_nothing() {
        objective()
            .given(vec![assigned(3), recorded("k1", 1, TaskStatus::NeedsClarification)])
            .when(record("k1", TaskStatus::Complete))
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_repeated_result_is_a_no_op_even_when_iterations_are_used_up() {
        objective()
            .given(vec![assigned(1), recorded("k1", 1, TaskStatus::NeedsClarification)])
            .when(record("k1", TaskStatus::NeedsClarification))
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_result_redelivered_after_the_objective_finished_is_a_no_op() {
        // The worker acks only after its result committed; if it dies in between, the
        // message comes back after the orchestrator may already have finished the objective.
        for end in [completed(1), blocked()] {
            objective()
                .given(vec![assigned(3), recorded("k1", 1, TaskStatus::Complete), end])
                .when(record("k1", TaskStatus::Complete))
                .then_expect_events(vec![]);
        }
    }

    #[test]
    fn a_result_beyond_the_iteration_limit_is_refused() {
        objective()
            .given(vec![
                assigned(2),
                recorded("k1", 1, TaskStatus::NeedsClarification),
                recorded("k2", 2, TaskStatus::NeedsClarification),
            ])
            .when(record("k3", TaskStatus::Complete))
            .then_expect_error(ObjectiveError::IterationsExhausted(2));
        objective()
            .given(vec![assigned(1), recorded("k1", 1, TaskStatus::Blocked)])
            .when(record("k2", TaskStatus::Complete))
            .then_expect_error_message("the objective has used all 1 iterations");
    }

    #[test]
    fn recording_results_tracks_the_iteration_the_last_status_and_the_keys() {
        let state = state(vec![
            assigned(3),
            recorded("k1", 1, TaskStatus::Complete),
            recorded("k2", 2, TaskStatus::NeedsClarification),
        ]);
        assert_eq!(state.iterations, 2);
        assert_eq!(state.last_result, Some(TaskStatus::NeedsClarification));
        assert_eq!(state.result_keys, BTreeSet::from(["k1".to_string(), "k2".to_string()]));
    }

    // ---- ProduceArtifact ----

    #[test]
    fn producing_an_artifact_records_it_unchanged() {
        for path in ["requirements.md", "src/main.rs", "docs/..hidden/notes.md", "a/./b.txt"] {
            objective()
                .given(vec![assigned(3)])
                .when(ObjectiveCommand::ProduceArtifact(artifact(path, SHA)))
                .then_expect_events(vec![ObjectiveEvent::ArtifactProduced(artifact(path, SHA))]);
        }
    }

    #[test]
    fn an_artifact_path_that_is_empty_absolute_or_climbs_out_is_refused() {
        for path in ["", "/etc/passwd", "/", "..", "../secret", "src/../../etc/passwd", "src/..", "src\\..\\..\\x"] {
            objective()
                .given(vec![assigned(3)])
                .when(ObjectiveCommand::ProduceArtifact(artifact(path, SHA)))
                .then_expect_error(ObjectiveError::BadArtifactPath(path.into()));
        }
        objective()
            .given(vec![assigned(3)])
            .when(ObjectiveCommand::ProduceArtifact(artifact("/etc/passwd", SHA)))
            .then_expect_error_message("artifact path `/etc/passwd` must be relative, without `..`");
    }

    #[test]
    fn an_artifact_digest_that_is_not_a_hex_sha256_is_refused() {
        let bad = [
            String::new(),
            SHA[..63].to_string(),
            format!("{SHA}0"),
            format!("{}g", &SHA[..63]),
            format!("sha256:{}", &SHA[..57]),
            // 64 bytes, but not 64 hex digits.
            format!("{}é", &SHA[..62]),
        ];
        for sha in bad {
            objective()
                .given(vec![assigned(3)])
                .when(ObjectiveCommand::ProduceArtifact(artifact("a.md", &sha)))
                .then_expect_error(ObjectiveError::BadDigest(sha.clone()));
        }
    }

    #[test]
    fn a_bad_path_is_reported_before_a_bad_digest() {
        objective()
            .given(vec![assigned(3)])
            .when(ObjectiveCommand::ProduceArtifact(artifact("/abs", "nope")))
            .then_expect_error(ObjectiveError::BadArtifactPath("/abs".into()));
    }

    // ---- CompleteObjective ----

    #[test]
    fn completing_after_a_complete_result_records_the_iterations_used() {
        objective()
            .given(vec![
                assigned(3),
                recorded("k1", 1, TaskStatus::NeedsClarification),
                recorded("k2", 2, TaskStatus::Complete),
            ])
            .when(ObjectiveCommand::CompleteObjective)
            .then_expect_events(vec![completed(2)]);
    }

    #[test]
    fn completing_without_any_result_is_refused() {
        objective()
            .given(vec![assigned(3)])
            .when(ObjectiveCommand::CompleteObjective)
            .then_expect_error(ObjectiveError::NotComplete(None));
    }

    #[test]
    fn completing_when_the_last_result_is_not_complete_is_refused() {
        objective()
            .given(vec![assigned(3), recorded("k1", 1, TaskStatus::Blocked)])
            .when(ObjectiveCommand::CompleteObjective)
            .then_expect_error(ObjectiveError::NotComplete(Some(TaskStatus::Blocked)));
        // An earlier COMPLETE does not count once a later answer asks a question.
        objective()
            .given(vec![
                assigned(3),
                recorded("k1", 1, TaskStatus::Complete),
                recorded("k2", 2, TaskStatus::NeedsClarification),
            ])
            .when(ObjectiveCommand::CompleteObjective)
            .then_expect_error(ObjectiveError::NotComplete(Some(TaskStatus::NeedsClarification)));
    }

    #[test]
    fn a_completed_objective_is_completed() {
        let state = state(vec![assigned(3), recorded("k1", 1, TaskStatus::Complete), completed(1)]);
        assert_eq!(state.status, ObjectiveStatus::Completed);
    }

    // ---- BlockObjective ----

    #[test]
    fn blocking_records_the_reason_whatever_the_last_result() {
        for history in [vec![assigned(3)], vec![assigned(3), recorded("k1", 1, TaskStatus::Complete)]] {
            objective()
                .given(history)
                .when(ObjectiveCommand::BlockObjective { reason: "no database access".into() })
                .then_expect_events(vec![blocked()]);
        }
        assert_eq!(state(vec![assigned(3), blocked()]).status, ObjectiveStatus::Blocked);
    }
}
