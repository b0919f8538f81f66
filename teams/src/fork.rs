//! Fork (`factory run fork <run> --at <position>`): a new run that starts where another
//! stood right after the event at `position` — its requirement and pipeline, and the stages
//! completed by then — and runs live from there ("what if the architect had chosen
//! differently"). No recorded model call is repeated.
//!
//! Each completed stage's objective is copied into the new run (its assignment, artifacts
//! by content hash, and last TaskResult, then completed), so the teams that run next see
//! the same inputs and workspace. The copies are written first; then one command writes
//! the new run with those stages already completed (`RunForked` says from where), so the
//! orchestrator, reacting to its `RequirementSubmitted`, starts the next ready stages.
//!
//! Not carried over: stages in progress at that position (they run again, live), review
//! feedback given before it, and the model calls' costs (they belong to the source run).

use factory_commands::{CommandError, Store};
use factory_domain::objective::{ArtifactProduced, ObjectiveAssigned, TaskResultRecorded};
use factory_domain::run::{ForkedStage, RequirementSubmitted, StageState};
use factory_domain::{ObjectiveCommand, ObjectiveError, ObjectiveId, Run, RunCommand, RunError, RunEvent, RunId};
use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    #[error("run {0} has no events")]
    NotFound(RunId),
    #[error("run {run} has no event at or before position {at}; its first is at {first}")]
    BeforeStart { run: RunId, at: i64, first: i64 },
    #[error("the source run cannot be read: {0}")]
    Record(String),
    #[error("the event store failed")]
    Store(#[from] sqlx::Error),
    #[error("the fork was refused: {0}")]
    RunRefused(#[source] CommandError<RunError>),
    #[error("copying an objective was refused: {0}")]
    ObjectiveRefused(#[source] CommandError<ObjectiveError>),
}

#[derive(Debug, Clone, Serialize)]
pub struct Fork {
    pub run_id: RunId,
    pub forked_from: RunId,
    pub at_position: i64,
    /// The stages the fork starts with, completed.
    pub stages: Vec<String>,
}

#[derive(Default)]
struct CopiedObjective {
    /// Where it was assigned: copies keep the source's order (the next teams' inputs list
    /// earlier results in it).
    position: i64,
    assigned: Option<ObjectiveAssigned>,
    artifacts: Vec<ArtifactProduced>,
    result: Option<TaskResultRecorded>,
}

pub async fn fork(store: &Store, source: RunId, at: i64, submitted_by: String) -> Result<Fork, ForkError> {
    let all = factory_commands::events::run_events(store.pool(), source.0, None).await?;
    let Some(first) = all.first() else { return Err(ForkError::NotFound(source)) };
    if at < first.position {
        return Err(ForkError::BeforeStart { run: source, at, first: first.position });
    }
    let events: Vec<_> = all.into_iter().filter(|e| e.position <= at).collect();
    let bad = |e: &factory_nats::EventEnvelope, error: serde_json::Error| {
        ForkError::Record(format!("event {} ({}): {error}", e.position, e.event_type))
    };
    let mut run = Run::default();
    let mut submitted: Option<RequirementSubmitted> = None;
    let mut objectives: HashMap<String, CopiedObjective> = HashMap::new();
    for e in &events {
        let tagged = serde_json::json!({ e.event_type.clone(): e.payload.clone() });
        match (e.aggregate_type.as_str(), e.event_type.as_str()) {
            ("run", _) => {
                let event: RunEvent = serde_json::from_value(tagged).map_err(|error| bad(e, error))?;
                if let RunEvent::RequirementSubmitted(s) = &event {
                    submitted = Some(s.clone());
                }
                cqrs_es::Aggregate::apply(&mut run, event);
            }
            ("objective", "ObjectiveAssigned") => {
                let copy = objectives.entry(e.aggregate_id.clone()).or_default();
                copy.position = e.position;
                copy.assigned = Some(serde_json::from_value(e.payload.clone()).map_err(|error| bad(e, error))?);
            }
            ("objective", "ArtifactProduced") => {
                let artifact = serde_json::from_value(e.payload.clone()).map_err(|error| bad(e, error))?;
                objectives.entry(e.aggregate_id.clone()).or_default().artifacts.push(artifact);
            }
            ("objective", "TaskResultRecorded") => {
                objectives.entry(e.aggregate_id.clone()).or_default().result =
                    Some(serde_json::from_value(e.payload.clone()).map_err(|error| bad(e, error))?);
            }
            _ => {}
        }
    }
    let submitted = submitted.ok_or_else(|| ForkError::Record("the run has no RequirementSubmitted".into()))?;
    let run_id = RunId::new();
    let mut done: Vec<(&String, &String, ObjectiveId, CopiedObjective)> = run
        .stages
        .iter()
        .filter_map(|(stage, state)| match state {
            StageState::Completed { team, objective_id } => {
                objectives.remove(&objective_id.to_string()).map(|copy| (stage, team, *objective_id, copy))
            }
            _ => None,
        })
        .collect();
    done.sort_by_key(|(.., copy)| copy.position);
    let mut completed = Vec::new();
    for (stage, team, objective_id, copy) in done {
        let (Some(assigned), Some(result)) = (copy.assigned, copy.result) else { continue };
        let objective_id_new = ObjectiveId::new();
        let mut commands = vec![ObjectiveCommand::AssignObjective {
            objective_id: objective_id_new,
            run_id,
            stage: stage.clone(),
            team: team.clone(),
            instructions: assigned.instructions,
            max_iterations: assigned.max_iterations,
            claimed_by: None,
        }];
        commands.extend(copy.artifacts.into_iter().map(ObjectiveCommand::ProduceArtifact));
        commands.push(ObjectiveCommand::RecordTaskResult { idempotency_key: format!("fork:{objective_id}"), result: result.result });
        commands.push(ObjectiveCommand::CompleteObjective);
        // One commit per copy: a copy is there whole or not at all.
        store.execute_objective_all(objective_id_new, run_id, commands).await.map_err(ForkError::ObjectiveRefused)?;
        completed.push(ForkedStage { stage: stage.clone(), team: team.clone(), objective_id: objective_id_new });
    }
    let stages: Vec<String> = completed.iter().map(|s| s.stage.clone()).collect();
    let command = RunCommand::ForkRun {
        title: submitted.title,
        requirement: submitted.requirement,
        pipeline: submitted.pipeline,
        pipeline_definition: submitted.pipeline_definition,
        auto_approve: submitted.auto_approve,
        submitted_by,
        forked_from: source,
        at_position: at,
        completed,
    };
    store.execute_run(run_id, command).await.map_err(ForkError::RunRefused)?;
    Ok(Fork { run_id, forked_from: source, at_position: at, stages })
}
