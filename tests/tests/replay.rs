//! Deterministic re-run: a recorded demo run executed again from its `ModelCalled` events
//! gives the same decisions, calls no model and writes nothing; a record whose results do
//! not follow from its answers is reported where it diverges.

use crate::pipeline::Factory;
use factory_domain::objective::ModelCalled;
use factory_domain::run::ReviewDecision;
use factory_domain::{ObjectiveCommand, ObjectiveId, RunCommand, RunId, RunStatus, SystemServices};
use factory_teams::rerun::{RerunReport, rerun};
use std::sync::Arc;

async fn event_count(factory: &Factory) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&factory.stack.pool).await.unwrap()
}

async fn rerun_of(factory: &Factory, run: RunId) -> RerunReport {
    let scratch = tempfile::tempdir().unwrap();
    let before = event_count(factory).await;
    let report = rerun(&factory.stack.pool, run, scratch.path().to_path_buf(), Arc::new(SystemServices)).await.unwrap();
    assert_eq!(event_count(factory).await, before, "a re-run writes nothing to the store");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recorded_run_with_repairs_and_a_revision_reruns_identically_without_calling_a_model() {
    let factory = Factory::start().await;
    let run = factory.submit("Build a URL shortener #malformed", "phase1", false).await;
    factory.wait_status(run, RunStatus::AwaitingReview).await;
    let revise = ReviewDecision::Revise { feedback: "links must expire after 30 days".into() };
    factory.store.execute_run(run, RunCommand::ReviewRun { decision: revise, reviewer: "ada".into() }).await.unwrap();
    factory_testkit::wait_for("the revision to reach review", std::time::Duration::from_secs(90), || async {
        (factory.count(run, "RunAwaitingReview").await == 2).then_some(())
    })
    .await;
    factory.store.execute_run(run, RunCommand::ReviewRun { decision: ReviewDecision::Approve, reviewer: "ada".into() }).await.unwrap();
    factory.wait_status(run, RunStatus::Completed).await;

    let report = rerun_of(&factory, run).await;
    assert!(report.identical(), "{:#?}", report.divergences);
    assert_eq!(report.recorded_status, "COMPLETED");
    assert_eq!(report.rerun_status, "COMPLETED");
    assert_eq!(report.objectives, 5 + 4, "five stages, then four again after the revision");
    assert_eq!(report.answers_replayed as i64, factory.count(run, "ModelCalled").await, "every recorded answer was used");
    assert_eq!(report.unanswered, 0, "every request found its recorded answer");
    assert!(report.decisions > 50, "{} decisions compared", report.decisions);
    assert_eq!(report.stopped, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_full_pipeline_with_parallel_stages_reruns_identically() {
    let factory = Factory::start().await;
    let run = factory.submit("Build an online shop #fail=factory/coder", "full", true).await;
    factory.wait_status(run, RunStatus::Completed).await;
    let report = rerun_of(&factory, run).await;
    assert!(report.identical(), "{:#?}", report.divergences);
    assert_eq!(report.objectives, 17);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_run_reruns_to_the_same_block() {
    let factory = Factory::start().await;
    let run = factory.submit("Build a todo app #block", "phase1", true).await;
    factory.wait_status(run, RunStatus::Blocked).await;
    let report = rerun_of(&factory, run).await;
    assert!(report.identical(), "{:#?}", report.divergences);
    assert_eq!(report.rerun_status, "BLOCKED");
    assert!(report.stopped.as_deref().unwrap_or_default().contains("waits for a human"), "{:?}", report.stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_whose_result_does_not_follow_from_its_answer_diverges_there() {
    let factory = Factory::start().await;
    // A record made by hand: the model answered BLOCKED, but COMPLETE was recorded.
    // Nothing but the store: no orchestrator or worker adds to this record.
    factory.tasks.iter().for_each(|t| t.abort());
    let run = factory.submit("Build a todo app", "phase1", true).await;
    let objective = ObjectiveId::new();
    let command = RunCommand::StartStage { stage: "business-analysis".into(), team: "business-analysis".into(), objective_id: objective };
    factory.store.execute_run(run, command).await.unwrap();
    let assign = ObjectiveCommand::AssignObjective {
        objective_id: objective,
        run_id: run,
        stage: "business-analysis".into(),
        team: "business-analysis".into(),
        instructions: "by hand".into(),
        max_iterations: 3,
        claimed_by: None,
    };
    factory.store.execute_objective(objective, run, assign).await.unwrap();
    let answer = serde_json::json!({"status": "BLOCKED", "reasoning": "no users named", "blockers": ["who are the users?"],
                                    "assumptions_made": [], "verified_facts": [], "clarification_needed": null, "artifacts": []});
    let call = ModelCalled {
        alias: "factory/fast".into(),
        provider: "scripted".into(),
        model: "demo".into(),
        input_tokens: 10,
        output_tokens: 10,
        cost_usd: 0.0,
        latency_ms: 1,
        outcome: "ok".into(),
        failed_targets: vec![],
        request_digest: "0".repeat(64),
        response: serde_json::json!({"content": answer.to_string(), "tool_calls": []}).to_string(),
    };
    factory.store.execute_objective(objective, run, ObjectiveCommand::RecordModelCall(call)).await.unwrap();
    let complete = crate::support::completed_result();
    let record = ObjectiveCommand::RecordTaskResult { idempotency_key: "by-hand".into(), result: complete };
    factory.store.execute_objective(objective, run, record).await.unwrap();

    let report = rerun_of(&factory, run).await;
    assert!(!report.identical());
    let at_result = report
        .divergences
        .iter()
        .find(|d| d.at == "business-analysis objective #1")
        .unwrap_or_else(|| panic!("no divergence at the objective: {:#?}", report.divergences));
    assert!(at_result.recorded.as_deref().unwrap().starts_with("result COMPLETE"), "{at_result:?}");
    assert!(at_result.rerun.as_deref().unwrap().starts_with("result BLOCKED"), "{at_result:?}");
    assert!(
        report.divergences.iter().any(|d| d.rerun.as_deref().unwrap_or_default().contains("the prompt differs")),
        "the recorded request digest is not the re-run's: {:#?}",
        report.divergences
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fork_keeps_the_stages_completed_at_its_position_and_runs_the_rest_live() {
    let factory = Factory::start().await;
    let source = factory.submit("Build a URL shortener with expiry", "phase1", true).await;
    factory.wait_status(source, RunStatus::Completed).await;
    let at: i64 = sqlx::query_scalar(
        "SELECT position FROM events WHERE run_id = $1 AND event_type = 'StageCompleted'
            AND payload->'StageCompleted'->>'stage' = 'solution-architecture'",
    )
    .bind(source.0)
    .fetch_one(&factory.stack.pool)
    .await
    .unwrap();

    let fork = factory_teams::fork::fork(&factory.store, source, at, "ada".into()).await.unwrap();
    assert_eq!(fork.stages, ["business-analysis", "solution-architecture"]);
    let run = fork.run_id;
    factory.wait_status(run, RunStatus::Completed).await;

    // Two objectives copied (no model call), three worked live.
    assert_eq!(factory.count(run, "ObjectiveAssigned").await, 5);
    assert_eq!(factory.count(run, "ObjectiveCompleted").await, 5);
    let live: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT aggregate_id) FROM events WHERE run_id = $1 AND event_type = 'ModelCalled'",
    )
    .bind(run.0)
    .fetch_one(&factory.stack.pool)
    .await
    .unwrap();
    assert_eq!(live, 3, "only the stages after the fork's position call models");
    // The kept stages' artifacts are the source's, by content hash.
    let pool = factory.stack.pool.clone();
    let artifacts = |run: RunId| {
        let pool = pool.clone();
        async move {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT payload->'ArtifactProduced'->>'path', payload->'ArtifactProduced'->>'sha256' FROM events
              WHERE run_id = $1 AND event_type = 'ArtifactProduced' ORDER BY position",
        )
        .bind(run.0)
        .fetch_all(&pool)
        .await
        .unwrap();
        rows
        }
    };
    let (source_artifacts, fork_artifacts) = (artifacts(source).await, artifacts(run).await);
    for kept in ["docs/requirements.md", "docs/architecture.md"] {
        let of = |list: &[(String, String)]| list.iter().find(|(p, _)| p == kept).cloned();
        assert_eq!(of(&fork_artifacts), of(&source_artifacts), "{kept}");
    }
    let forked: serde_json::Value = sqlx::query_scalar("SELECT payload->'RunForked' FROM events WHERE run_id = $1 AND event_type = 'RunForked'")
        .bind(run.0)
        .fetch_one(&factory.stack.pool)
        .await
        .unwrap();
    assert_eq!(forked["forked_from"], source.to_string());
    assert_eq!(forked["at_position"], at);
    // The runs read model says where the fork came from and who made it.
    factory_projections::rebuild::rebuild(&factory.stack.admin, factory_projections::Projection::Runs, |_, _, _| {}).await.unwrap();
    let (from, from_at, by): (Option<uuid::Uuid>, Option<i64>, String) =
        sqlx::query_as("SELECT forked_from, forked_at, submitted_by FROM rm_runs WHERE run_id = $1")
            .bind(run.0)
            .fetch_one(&factory.stack.pool)
            .await
            .unwrap();
    assert_eq!((from, from_at, by.as_str()), (Some(source.0), Some(at), "ada"));

    // Bad positions and runs are refused by name.
    let first: i64 = sqlx::query_scalar("SELECT min(position) FROM events WHERE run_id = $1").bind(source.0).fetch_one(&factory.stack.pool).await.unwrap();
    let error = factory_teams::fork::fork(&factory.store, source, first - 1, "ada".into()).await.unwrap_err();
    assert!(error.to_string().contains("no event at or before position"), "{error}");
    let error = factory_teams::fork::fork(&factory.store, RunId::new(), at, "ada".into()).await.unwrap_err();
    assert!(error.to_string().contains("has no events"), "{error}");
}
