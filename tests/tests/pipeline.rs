//! Teams at work: whole runs through the relay, the orchestrator and the workers, on real
//! NATS and PostgreSQL, answered by the scripted provider through the model router (demo
//! mode), as `up` runs them.

use crate::support::relay;
use factory_commands::Store;
use factory_domain::{RunCommand, RunId, RunStatus, SystemServices};
use factory_teams::Pipeline;
use factory_teams::orchestrator::Orchestrator;
use factory_teams::scripted::ScriptedProvider;
use factory_teams::worker::{Worker, WorkerOptions};
use factory_models::{ProviderSettings, Router, RoutingConfig};
use factory_testkit::{TestStack, wait_for};
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct Factory {
    pub(crate) stack: TestStack,
    pub(crate) store: Arc<Store>,
    pub(crate) tasks: Vec<tokio::task::JoinHandle<()>>,
    router: Arc<Router>,
    /// The worker's side of the in-memory handoff (set by `start_with`).
    local: Option<Arc<factory_teams::handoff::LocalWork>>,
}

/// Demo routing with short backoffs, so that fallbacks take milliseconds.
fn demo_routing() -> RoutingConfig {
    let mut config = RoutingConfig { demo: Some(true), ..RoutingConfig::default() };
    config.retry.base_backoff = Duration::from_millis(5);
    config.retry.max_backoff = Duration::from_millis(20);
    config
}

impl Factory {
    pub(crate) async fn start() -> Self {
        Self::start_with(demo_routing()).await
    }

    pub(crate) async fn start_with(routing: RoutingConfig) -> Self {
        let stack = TestStack::new().await;
        let store = Arc::new(Store::new(stack.pool.clone(), Arc::new(SystemServices)));
        let router = Arc::new(Router::new(routing, ProviderSettings::default(), Arc::new(ScriptedProvider::new())).unwrap());
        let mut factory = Self { store, tasks: vec![], stack, router, local: None };
        let relay = relay(&factory.stack, factory.stack.js.clone(), 500).with_wake(factory.store.committed());
        factory.tasks.push(tokio::spawn(relay.run()));
        // As `up` wires them: the objectives the orchestrator starts are handed to the worker.
        let worker = factory.worker(Duration::from_secs(30));
        let orchestrator = Orchestrator::new(factory.store.clone(), factory.stack.js.clone(), factory.stack.topology.clone())
            .with_local_work(worker.local_work());
        factory.local = Some(worker.local_work());
        factory.tasks.push(tokio::spawn(orchestrator.run()));
        factory.tasks.push(tokio::spawn(worker.run()));
        factory
    }

    pub(crate) fn worker(&self, ack_wait: Duration) -> Worker {
        // Workspaces in memory, as `up` keeps them by default (two tests below use folders).
        let mut options = WorkerOptions::new(
            factory_teams::TEAM_IDS.iter().map(|t| t.to_string()).collect(),
            factory_teams::tools::Scratch::Memory,
        );
        options.ack_wait = ack_wait;
        Worker::new(self.store.clone(), self.stack.js.clone(), self.stack.topology.clone(), self.router.clone(), options)
    }

    pub(crate) async fn submit(&self, requirement: &str, pipeline: &str, auto_approve: bool) -> RunId {
        let plan = Pipeline::load(pipeline).unwrap();
        let run = RunId::new();
        let command = RunCommand::SubmitRequirement {
            title: None,
            requirement: requirement.into(),
            pipeline: plan.name().into(),
            pipeline_definition: plan.source().into(),
            auto_approve,
            submitted_by: "tester".into(),
        };
        self.store.execute_run(run, command).await.unwrap();
        run
    }

    pub(crate) async fn wait_status(&self, run: RunId, status: RunStatus) {
        wait_for(&format!("run {run} to be {}", status.as_str()), Duration::from_secs(90), || async {
            (self.store.load_run(run).await.unwrap().status == status).then_some(())
        })
        .await;
    }

    pub(crate) async fn count(&self, run: RunId, event_type: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE run_id = $1 AND event_type = $2")
            .bind(run.0)
            .bind(event_type)
            .fetch_one(&self.stack.pool)
            .await
            .unwrap()
    }
}

impl Drop for Factory {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_phase1_demo_run_completes_each_objective_once_with_artifacts() {
    let factory = Factory::start().await;
    let run = factory.submit("Build a URL shortener with expiry", "phase1", false).await;
    factory.wait_status(run, RunStatus::AwaitingReview).await;
    for event in ["StageStarted", "StageCompleted", "ObjectiveAssigned", "TaskResultRecorded", "ObjectiveCompleted"] {
        assert_eq!(factory.count(run, event).await, 5, "{event}");
    }
    let paths: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT payload->'ArtifactProduced'->>'path' FROM events WHERE run_id = $1 AND event_type = 'ArtifactProduced'",
    )
    .bind(run.0)
    .fetch_all(&factory.stack.pool)
    .await
    .unwrap();
    for expected in ["docs/requirements.md", "docs/architecture.md", "docs/test-plan.md", "README.md"] {
        assert!(paths.iter().any(|p| p == expected), "{expected} missing from {paths:?}");
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM artifacts").fetch_one(&factory.stack.pool).await.unwrap();
    assert!(stored >= paths.len() as i64 / 2, "artifact contents are stored");

    // The review gate: approve completes the run.
    factory
        .store
        .execute_run(run, RunCommand::ReviewRun { decision: factory_domain::run::ReviewDecision::Approve, reviewer: "ada".into() })
        .await
        .unwrap();
    factory.wait_status(run, RunStatus::Completed).await;
    assert!(factory_commands::audit::verify(&factory.stack.pool).await.unwrap().broken.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_full_pipeline_runs_all_17_teams_with_parallel_stages() {
    let factory = Factory::start().await;
    let run = factory.submit("Build an online shop", "full", true).await;
    factory.wait_status(run, RunStatus::Completed).await;
    assert_eq!(factory.count(run, "ObjectiveCompleted").await, 17);
    // Stages whose inputs were ready together were started before any of them completed.
    let order: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_type, coalesce(payload->'StageStarted'->>'stage', payload->'StageCompleted'->>'stage') \
           FROM events WHERE run_id = $1 AND event_type IN ('StageStarted', 'StageCompleted') ORDER BY position",
    )
    .bind(run.0)
    .fetch_all(&factory.stack.pool)
    .await
    .unwrap();
    let started_before_completion = |a: &str, b: &str| {
        let start_b = order.iter().position(|(t, s)| t == "StageStarted" && s == b).unwrap();
        let done_a = order.iter().position(|(t, s)| t == "StageCompleted" && s == a).unwrap();
        start_b < done_a
    };
    assert!(
        started_before_completion("backend-engineering", "frontend-engineering")
            || started_before_completion("frontend-engineering", "backend-engineering"),
        "backend and frontend should run side by side: {order:?}"
    );
    // Every stage started and completed once, though parallel ends went through their run's
    // lane (teams/src/lanes.rs) and were committed together.
    for event_type in ["StageStarted", "StageCompleted"] {
        let mut stages: Vec<&str> = order.iter().filter(|(t, _)| t == event_type).map(|(_, s)| s.as_str()).collect();
        stages.sort();
        stages.dedup();
        assert_eq!(stages.len(), 17, "{event_type}: {order:?}");
        assert_eq!(order.iter().filter(|(t, _)| t == event_type).count(), 17, "{event_type}: {order:?}");
    }
    let most_ends_in_one_commit: i64 = sqlx::query_scalar(
        "SELECT max(n) FROM (SELECT count(*) AS n FROM events WHERE run_id = $1 AND event_type = 'StageCompleted' GROUP BY xid::text) AS c",
    )
    .bind(run.0)
    .fetch_one(&factory.stack.pool)
    .await
    .unwrap();
    // Five waves have parallel stages; the ends of one that come while the first of them is
    // committed go into one unit (a wave whose ends all came apart is possible, all five so
    // is not to be expected).
    assert!(most_ends_in_one_commit >= 2, "no two stage ends were committed together: {order:?}");
    assert!(factory_commands::audit::verify(&factory.stack.pool).await.unwrap().broken.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_answers_are_repaired_and_blocks_stop_the_run() {
    let factory = Factory::start().await;
    let malformed = factory.submit("Build a todo app #malformed", "phase1", true).await;
    let blocked = factory.submit("Build a todo app #block", "phase1", true).await;
    factory.wait_status(malformed, RunStatus::Completed).await;
    // Each team: the tool turn, the broken answer, the repaired one.
    assert_eq!(factory.count(malformed, "ModelCalled").await, 15);
    factory.wait_status(blocked, RunStatus::Blocked).await;
    assert_eq!(factory.count(blocked, "ObjectiveBlocked").await, 1);
    assert_eq!(factory.count(blocked, "StageStarted").await, 3, "nothing starts after the blocked stage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_question_pauses_the_run_as_needs_clarification() {
    let factory = Factory::start().await;
    let run = factory.submit("Build a chat #clarify", "phase1", true).await;
    factory.wait_status(run, RunStatus::NeedsClarification).await;
    let question: String = sqlx::query_scalar(
        "SELECT payload->'RunNeedsClarification'->>'question' FROM events WHERE run_id = $1 AND event_type = 'RunNeedsClarification'",
    )
    .bind(run.0)
    .fetch_one(&factory.stack.pool)
    .await
    .unwrap();
    assert!(question.starts_with("business-analysis:"), "{question}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_call_is_replaced_and_the_objective_completes_once() {
    let mut factory = Factory::start().await;
    // Replace the default worker with one whose messages come back quickly when it dies.
    factory.tasks.pop().unwrap().abort();
    let doomed = tokio::spawn(factory.worker(Duration::from_secs(2)).run());
    let run = factory.submit("Build a todo app #slow=2000", "phase1", true).await;
    wait_for("the first model call to be under way", Duration::from_secs(30), || async {
        (factory.count(run, "ObjectiveAssigned").await >= 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    doomed.abort();
    let _ = doomed.await;
    factory.tasks.push(tokio::spawn(factory.worker(Duration::from_secs(2)).run()));
    factory.wait_status(run, RunStatus::Completed).await;
    assert_eq!(factory.count(run, "TaskResultRecorded").await, 5);
    assert_eq!(factory.count(run, "ObjectiveCompleted").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revision_reruns_from_the_revision_stage_with_the_feedback_then_completes() {
    let factory = Factory::start().await;
    let run = factory.submit("Build a URL shortener", "phase1", false).await;
    factory.wait_status(run, RunStatus::AwaitingReview).await;
    let revise = factory_domain::run::ReviewDecision::Revise { feedback: "links must expire after 30 days".into() };
    factory
        .store
        .execute_run(run, RunCommand::ReviewRun { decision: revise, reviewer: "ada".into() })
        .await
        .unwrap();
    wait_for("the revised stages to finish", Duration::from_secs(90), || async {
        (factory.count(run, "RunAwaitingReview").await == 2).then_some(())
    })
    .await;
    // phase1 revises from solution-architecture: it and the three after it ran again.
    assert_eq!(factory.count(run, "StageCompleted").await, 5 + 4);
    let reopened: serde_json::Value = sqlx::query_scalar(
        "SELECT payload->'StagesReopened'->'stages' FROM events WHERE run_id = $1 AND event_type = 'StagesReopened'",
    )
    .bind(run.0)
    .fetch_one(&factory.stack.pool)
    .await
    .unwrap();
    assert_eq!(reopened, serde_json::json!(["solution-architecture", "backend-engineering", "qa-engineering", "documentation"]));
    factory
        .store
        .execute_run(run, RunCommand::ReviewRun { decision: factory_domain::run::ReviewDecision::Approve, reviewer: "ada".into() })
        .await
        .unwrap();
    factory.wait_status(run, RunStatus::Completed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_drops_the_work_in_flight_and_starts_nothing_more() {
    let factory = Factory::start().await;
    let run = factory.submit("Build a todo app #slow=3000", "phase1", true).await;
    wait_for("the first objective to be assigned", Duration::from_secs(30), || async {
        (factory.count(run, "ObjectiveAssigned").await >= 1).then_some(())
    })
    .await;
    factory
        .store
        .execute_run(run, RunCommand::CancelRun { reason: "changed my mind".into(), cancelled_by: "ada".into() })
        .await
        .unwrap();
    // The team was mid-call (3 s per call); nothing of its answer is recorded after the cancel.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(factory.store.load_run(run).await.unwrap().status, RunStatus::Cancelled);
    assert_eq!(factory.count(run, "TaskResultRecorded").await, 0);
    assert_eq!(factory.count(run, "StageStarted").await, 1);
}

/// The `ModelCalled` payloads of one stage, in order.
async fn model_calls(factory: &Factory, run: RunId, stage: &str) -> Vec<serde_json::Value> {
    sqlx::query_scalar(
        "SELECT m.payload->'ModelCalled' FROM events m
         JOIN events a ON a.aggregate_type = 'objective' AND a.aggregate_id = m.aggregate_id
                      AND a.event_type = 'ObjectiveAssigned' AND a.payload->'ObjectiveAssigned'->>'stage' = $2
         WHERE m.run_id = $1 AND m.event_type = 'ModelCalled' ORDER BY m.position",
    )
    .bind(run.0)
    .bind(stage)
    .fetch_all(&factory.stack.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_first_target_falls_back_and_the_events_name_both_targets() {
    let factory = Factory::start().await;
    let run = factory.submit("Build a URL shortener #fail=factory/coder", "phase1", true).await;
    factory.wait_status(run, RunStatus::Completed).await;
    for stage in ["backend-engineering", "qa-engineering"] {
        let calls = model_calls(&factory, run, stage).await;
        assert!(!calls.is_empty(), "{stage} called no model");
        for call in &calls {
            assert_eq!(call["alias"], "factory/coder", "{call}");
            assert_eq!(call["provider"], "scripted");
            assert_eq!(call["model"], "coder-fallback", "{call}");
            assert_eq!(call["outcome"], "fallback");
            let failed = call["failed_targets"].as_array().unwrap();
            assert_eq!(failed.len(), 1, "{call}");
            assert!(failed[0].as_str().unwrap().starts_with("scripted:coder (http_500 after 3 attempt(s))"), "{call}");
            assert!(call["cost_usd"].as_f64().unwrap() > 0.0, "the fallback is priced: {call}");
        }
    }
    // Other aliases are not affected.
    for call in model_calls(&factory, run, "solution-architecture").await {
        assert_eq!((call["model"].as_str(), call["outcome"].as_str()), (Some("architect"), Some("ok")), "{call}");
        assert!(call["failed_targets"].as_array().unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_team_over_budget_is_downgraded_then_blocked() {
    let mut routing = demo_routing();
    // business-analysis (factory/fast): its first call stays under the hard limit, but costs
    // more than the limit, so its next call goes to factory/cheap; priced here so that this
    // one call passes the hard limit.
    routing.budgets.teams.insert(
        "business-analysis".into(),
        factory_models::routing::Budget { limit_usd: 0.001, hard_limit_usd: 0.05 },
    );
    routing.pricing.insert(
        "scripted:fast".into(),
        factory_models::routing::Price { input_per_mtok: 2.0, output_per_mtok: 2.0 },
    );
    routing.pricing.insert(
        "scripted:cheap".into(),
        factory_models::routing::Price { input_per_mtok: 100.0, output_per_mtok: 100.0 },
    );
    let factory = Factory::start_with(routing).await;
    // #malformed: the team needs a third call (the repair), which the budget refuses.
    let run = factory.submit("Build a URL shortener #malformed", "phase1", true).await;
    factory.wait_status(run, RunStatus::Blocked).await;
    let calls = model_calls(&factory, run, "business-analysis").await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!((calls[0]["alias"].as_str(), calls[0]["outcome"].as_str()), (Some("factory/fast"), Some("ok")));
    let first = calls[0]["cost_usd"].as_f64().unwrap();
    assert!(first > 0.001 && first < 0.05, "first call ${first}");
    assert_eq!((calls[1]["alias"].as_str(), calls[1]["outcome"].as_str()), (Some("factory/cheap"), Some("downgraded")));
    assert_eq!(calls[1]["model"], "cheap");
    assert!(first + calls[1]["cost_usd"].as_f64().unwrap() > 0.05);
    let reason: String = sqlx::query_scalar(
        "SELECT payload->'RunBlocked'->>'reason' FROM events WHERE run_id = $1 AND event_type = 'RunBlocked'",
    )
    .bind(run.0)
    .fetch_one(&factory.stack.pool)
    .await
    .unwrap();
    assert!(reason.contains("budget"), "{reason}");
    assert_eq!(factory.count(run, "StageStarted").await, 1, "nothing starts after the blocked stage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_orchestrator_follows_its_own_process_commits_in_memory_and_the_stream_copies_change_nothing() {
    // No relay: nothing reaches FACTORY_EVENTS, so only the fast path can move the run.
    let mut factory = Factory::start().await;
    factory.tasks.remove(0).abort();
    let run = factory.submit("Build a URL shortener", "phase1", true).await;
    factory.wait_status(run, RunStatus::Completed).await;
    assert_eq!(crate::support::stream_len(&factory.stack.js, &factory.stack).await, 0);
    // Now the stream gets every event; the orchestrator takes each copy, does nothing twice.
    let relay = relay(&factory.stack, factory.stack.js.clone(), 500).with_wake(factory.store.committed());
    factory.tasks.push(tokio::spawn(relay.run()));
    let stored = crate::support::store_count(&factory.stack.pool).await as u64;
    wait_for("the orchestrator to have taken every stream copy", Duration::from_secs(60), || async {
        let mut stream = factory.stack.js.get_stream(&factory.stack.topology.events_stream).await.ok()?;
        let published = stream.info().await.ok()?.state.messages;
        let mut consumer = stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>("orchestrator").await.ok()?;
        let info = consumer.info().await.ok()?;
        (published == stored && info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (event_type, expected) in [("StageStarted", 5), ("ObjectiveAssigned", 5), ("StageCompleted", 5), ("RunCompleted", 1)] {
        assert_eq!(factory.count(run, event_type).await, expected, "{event_type}");
    }
    assert_eq!(crate::support::store_count(&factory.stack.pool).await as u64, stored, "the stream copies wrote nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_step_of_a_run_is_one_commit_and_the_orchestrator_is_sent_only_what_it_reacts_to() {
    let factory = Factory::start().await;
    let run = factory.submit("Build a URL shortener", "phase1", true).await;
    factory.wait_status(run, RunStatus::Completed).await;
    let rows: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT aggregate_type, event_type, xid::text, coalesce(payload->event_type->>'stage', '') \
           FROM events WHERE run_id = $1 ORDER BY position",
    )
    .bind(run.0)
    .fetch_all(&factory.stack.pool)
    .await
    .unwrap();
    let xid_of = |event_type: &str, stage: &str| {
        rows.iter()
            .find(|(_, e, _, s)| e == event_type && (stage.is_empty() || s.as_deref() == Some(stage)))
            .map(|(_, _, xid, _)| xid.clone())
            .unwrap_or_else(|| panic!("no {event_type} {stage}"))
    };
    let stages = ["business-analysis", "solution-architecture", "backend-engineering", "qa-engineering", "documentation"];
    // A stage's start and its objective's assignment, with the completion that made it ready.
    for (i, stage) in stages.iter().enumerate() {
        let started = xid_of("StageStarted", stage);
        let assigned: Vec<&String> = rows
            .iter()
            .filter(|(_, e, _, s)| e == "ObjectiveAssigned" && s.as_deref() == Some(*stage))
            .map(|(_, _, xid, _)| xid)
            .collect();
        assert_eq!(assigned, [&started], "{stage}: started and assigned in one commit");
        if i > 0 {
            assert_eq!(xid_of("StageCompleted", stages[i - 1]), started, "{stage} started by the commit that completed {}", stages[i - 1]);
        }
    }
    assert_eq!(xid_of("StageCompleted", "documentation"), xid_of("RunCompleted", ""), "the last completion finishes the run");
    // An objective's artifacts, result and end: one commit.
    let mut by_objective: std::collections::HashMap<&str, std::collections::HashSet<&str>> = Default::default();
    for (aggregate, event, xid, _) in &rows {
        if aggregate == "objective" && ["ArtifactProduced", "TaskResultRecorded", "ObjectiveCompleted"].contains(&event.as_str()) {
            by_objective.entry(xid.as_str()).or_default().insert(event.as_str());
        }
    }
    assert_eq!(by_objective.len(), 5, "{by_objective:?}");
    assert!(by_objective.values().all(|events| events.len() == 3), "{by_objective:?}");
    // ... and that commit is the worker's, taking the orchestrator's step with it: the
    // stage's completion (and the next stage's start, checked above) come with the end.
    for xid in by_objective.keys() {
        let with_it: Vec<&str> = rows.iter().filter(|(_, _, x, _)| x == xid).map(|(_, e, _, _)| e.as_str()).collect();
        assert!(with_it.contains(&"StageCompleted"), "the objective's end and its stage's completion in one commit: {with_it:?}");
    }

    // The orchestrator's consumer is given the events it reacts to, and no others.
    let reacted = rows
        .iter()
        .filter(|(a, e, _, _)| factory_teams::orchestrator::REACTS_TO.contains(&(a.as_str(), e.as_str())))
        .count() as u64;
    assert!(reacted < rows.len() as u64 / 2, "{reacted} of {}", rows.len());
    let stored = rows.len() as u64;
    let given = wait_for("the orchestrator's consumer to have been given every event of the run", Duration::from_secs(30), || async {
        let mut stream = factory.stack.js.get_stream(&factory.stack.topology.events_stream).await.ok()?;
        let published = stream.info().await.ok()?.state.messages;
        let mut consumer = stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>("orchestrator").await.ok()?;
        let info = consumer.info().await.ok()?;
        (published == stored && info.num_pending == 0 && info.num_ack_pending == 0)
            .then_some(info.delivered.consumer_sequence - info.num_redelivered as u64)
    })
    .await;
    assert_eq!(given, reacted, "delivered exactly the events it reacts to");
}

/// The messages on the team's work queue, by `Nats-Msg-Id` (the objective).
async fn queued_objectives(stack: &TestStack, team: &str) -> Vec<String> {
    let Ok(mut stream) = stack.js.get_stream(&stack.topology.work_stream).await else { return Vec::new() };
    let last = stream.info().await.map(|i| i.state.last_sequence).unwrap_or(0);
    let mut ids = Vec::new();
    for sequence in 1..=last {
        if let Ok(message) = stream.get_raw_message(sequence).await
            && message.subject.as_str() == stack.topology.work_subject(team)
            && let Some(id) = message.headers.get("Nats-Msg-Id")
        {
            ids.push(id.to_string());
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_completion_queues_the_work_its_step_started_but_never_queued() {
    // Nothing runs: the test plays the orchestrator's first attempt by hand.
    let (stack, store) = idle_stack().await;
    let (run, plan, done) = run_with_first_stage_started(&store, None).await;
    let [first, second] = [&plan.stages()[0], &plan.stages()[1]];
    let next = factory_domain::ObjectiveId::new();
    let result = crate::support::completed_result();
    store
        .execute_objective_all(done, run, vec![
            factory_domain::ObjectiveCommand::RecordTaskResult { idempotency_key: "work:1".into(), result },
            factory_domain::ObjectiveCommand::CompleteObjective,
        ])
        .await
        .unwrap();
    // The step for that completion commits, and its publish fails: the next stage is started
    // and assigned, its work never queued.
    let mut changes = store.changes();
    changes.execute_run(run, RunCommand::CompleteStage { stage: first.name.clone(), objective_id: done }).await.unwrap();
    changes.execute_run(run, RunCommand::StartStage { stage: second.name.clone(), team: second.team.clone(), objective_id: next }).await.unwrap();
    changes.new_objective(next, run);
    changes.execute_objective(next, run, factory_teams::orchestrator::assignment(run, next, second, None)).await.unwrap();
    changes.commit().await.unwrap();
    assert!(queued_objectives(&stack, &second.team).await.is_empty());

    // The completion comes back from the stream (it was not acked): its CompleteStage is
    // refused as done, and the stage in progress is queued.
    let events = factory_commands::events::run_events(&stack.pool, run.0, None).await.unwrap();
    let completed = events.iter().find(|e| e.event_type == "ObjectiveCompleted").unwrap();
    let orchestrator = Orchestrator::new(store.clone(), stack.js.clone(), stack.topology.clone());
    orchestrator.handle(completed).await.unwrap();
    assert_eq!(queued_objectives(&stack, &second.team).await, [next.to_string()]);
    let stored = crate::support::store_count(&stack.pool).await;
    orchestrator.handle(completed).await.unwrap();
    assert_eq!(queued_objectives(&stack, &second.team).await, [next.to_string()], "queued once: the repeat is dropped");
    assert_eq!(crate::support::store_count(&stack.pool).await, stored, "and nothing is written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_work_message_of_a_finished_objective_queues_the_stages_its_commit_started() {
    // Nothing runs: the test plays a worker whose final commit went through and whose
    // process died before it queued the next stage's work.
    let (stack, store) = idle_stack().await;
    let (run, plan, done) = run_with_first_stage_started(&store, None).await;
    let [first, second] = [&plan.stages()[0], &plan.stages()[1]];
    let next = factory_domain::ObjectiveId::new();
    // The worker's final commit: the result, the end, the stage's completion, the next start.
    let mut changes = store.changes();
    for command in [
        factory_domain::ObjectiveCommand::RecordTaskResult { idempotency_key: "work:1".into(), result: crate::support::completed_result() },
        factory_domain::ObjectiveCommand::CompleteObjective,
    ] {
        changes.execute_objective(done, run, command).await.unwrap();
    }
    changes.execute_run(run, RunCommand::CompleteStage { stage: first.name.clone(), objective_id: done }).await.unwrap();
    changes.execute_run(run, RunCommand::StartStage { stage: second.name.clone(), team: second.team.clone(), objective_id: next }).await.unwrap();
    changes.new_objective(next, run);
    changes.execute_objective(next, run, factory_teams::orchestrator::assignment(run, next, second, None)).await.unwrap();
    changes.commit().await.unwrap();
    assert!(queued_objectives(&stack, &second.team).await.is_empty());

    // Its work message comes back (never acked), to a worker of another process.
    let work_dir = tempfile::tempdir().unwrap();
    let other = Store::new(stack.pool.clone(), Arc::new(SystemServices));
    let worker = Worker::new(
        Arc::new(other),
        stack.js.clone(),
        stack.topology.clone(),
        Arc::new(ScriptedProvider::new()),
        WorkerOptions::new(vec![first.team.clone()], work_dir.path().to_path_buf()),
    );
    let item = factory_teams::orchestrator::WorkItem::new(run, done, first);
    let stored = crate::support::store_count(&stack.pool).await;
    worker.process(&item, "work:1", true).await.unwrap();
    assert_eq!(queued_objectives(&stack, &second.team).await, [next.to_string()], "the next stage's work is queued");
    assert_eq!(crate::support::store_count(&stack.pool).await, stored, "and nothing is recorded twice");
    // A first delivery of a finished objective (a repeat within the duplicate window) queues nothing.
    worker.process(&item, "work:1", false).await.unwrap();
    assert_eq!(queued_objectives(&stack, &second.team).await, [next.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn objectives_started_in_a_process_are_handed_to_its_worker_in_memory_without_a_work_message() {
    let factory = Factory::start().await;
    // Objectives are claimed only once the worker's presence is announced (it starts with
    // the worker's task): submitted before that, the first would go through the queue.
    let local = factory.local.clone().expect("the worker's handoff");
    wait_for("the worker's presence to be announced", Duration::from_secs(10), || {
        let local = local.clone();
        async move { local.claims_hold().then_some(()) }
    })
    .await;
    let run = factory.submit("Build a URL shortener", "phase1", true).await;
    factory.wait_status(run, RunStatus::Completed).await;
    let assigned: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT payload->'ObjectiveAssigned'->>'claimed_by' FROM events WHERE run_id = $1 AND event_type = 'ObjectiveAssigned'",
    )
    .bind(run.0)
    .fetch_all(&factory.stack.pool)
    .await
    .unwrap();
    assert_eq!(assigned.len(), 5);
    let claimant = assigned[0].clone().expect("claimed by the process's worker");
    assert!(assigned.iter().all(|c| c.as_ref() == Some(&claimant)), "{assigned:?}");
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT payload->'TaskResultRecorded'->>'idempotency_key' FROM events WHERE run_id = $1 AND event_type = 'TaskResultRecorded'",
    )
    .bind(run.0)
    .fetch_all(&factory.stack.pool)
    .await
    .unwrap();
    assert_eq!(keys, vec![format!("claim:{claimant}"); 5], "each worked once, by the handed-over attempt");
    // No work message was queued for them: the work queue never held one.
    let mut stream = factory.stack.js.get_stream(&factory.stack.topology.work_stream).await.unwrap();
    let state = &stream.info().await.unwrap().state;
    assert_eq!((state.last_sequence, state.messages), (0, 0), "no work message published");
    // The process's row comes to say that its claims have all ended: at a renewal, every
    // claim is at or below its position.
    wait_for("the row's position to pass every claim", Duration::from_secs(30), || async {
        let (since, last): (i64, i64) = sqlx::query_as(
            "SELECT since_position, (SELECT max(position) FROM events) FROM worker_instances WHERE instance = $1",
        )
        .bind(&claimant)
        .fetch_one(&factory.stack.pool)
        .await
        .unwrap();
        (since >= last).then_some(())
    })
    .await;
}

/// Real NATS and PostgreSQL with the streams made and a store on them; nothing runs.
async fn idle_stack() -> (TestStack, Arc<Store>) {
    let stack = TestStack::new().await;
    stack.topology.ensure_streams(&stack.js).await.unwrap();
    let store = Arc::new(Store::new(stack.pool.clone(), Arc::new(SystemServices)));
    (stack, store)
}

/// A phase1 run whose first stage is started and its objective assigned (claimed for
/// `claimant`'s process, if given), in one commit, as a step does it.
async fn run_with_first_stage_started(store: &Store, claimant: Option<&str>) -> (RunId, Pipeline, factory_domain::ObjectiveId) {
    let plan = Pipeline::load("phase1").unwrap();
    let run = RunId::new();
    store
        .execute_run(run, RunCommand::SubmitRequirement { title: None, requirement: "Build it".into(), pipeline: plan.name().into(), pipeline_definition: plan.source().into(), auto_approve: true, submitted_by: "tester".into() })
        .await
        .unwrap();
    let first = &plan.stages()[0];
    let objective = factory_domain::ObjectiveId::new();
    let mut changes = store.changes();
    changes.execute_run(run, RunCommand::StartStage { stage: first.name.clone(), team: first.team.clone(), objective_id: objective }).await.unwrap();
    changes.new_objective(objective, run);
    let assign = factory_teams::orchestrator::assignment(run, objective, first, claimant.map(str::to_string));
    changes.execute_objective(objective, run, assign).await.unwrap();
    changes.commit().await.unwrap();
    (run, plan, objective)
}

/// The work item of a phase1 run's first objective, claimed for `claimant`'s process.
async fn claimed_objective(store: &Store, claimant: &str) -> (factory_teams::orchestrator::WorkItem, factory_domain::ObjectiveId) {
    let (run, plan, objective) = run_with_first_stage_started(store, Some(claimant)).await;
    (factory_teams::orchestrator::WorkItem::new(run, objective, &plan.stages()[0]), objective)
}

/// A worker of another process than the one whose store made the test's commits (its own
/// store: nothing remembered).
fn other_process_worker(stack: &TestStack, scratch: impl Into<factory_teams::tools::Scratch>) -> Worker {
    Worker::new(
        Arc::new(Store::new(stack.pool.clone(), Arc::new(SystemServices))),
        stack.js.clone(),
        stack.topology.clone(),
        Arc::new(ScriptedProvider::new()),
        WorkerOptions::new(factory_teams::TEAM_IDS.iter().map(|t| t.to_string()).collect(), scratch),
    )
}

/// The objective completed as its claimant records it (`idempotency_key`).
async fn complete_as(store: &Store, objective: factory_domain::ObjectiveId, run: RunId, idempotency_key: &str) {
    store
        .execute_objective_all(objective, run, vec![
            factory_domain::ObjectiveCommand::RecordTaskResult { idempotency_key: idempotency_key.into(), result: crate::support::completed_result() },
            factory_domain::ObjectiveCommand::CompleteObjective,
        ])
        .await
        .unwrap();
}

/// A NEEDS_CLARIFICATION answer.
fn question() -> factory_domain::TaskResult {
    factory_domain::TaskResult {
        clarification_needed: Some("Which expiry?".into()),
        ..factory_domain::TaskResult::new(factory_domain::TaskStatus::NeedsClarification, "it depends")
    }
}

async fn results_of(stack: &TestStack, objective: factory_domain::ObjectiveId) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT payload->'TaskResultRecorded'->>'idempotency_key' FROM events \
          WHERE aggregate_id = $1 AND event_type = 'TaskResultRecorded' ORDER BY sequence",
    )
    .bind(objective.to_string())
    .fetch_all(&stack.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_leaves_an_objective_to_the_live_process_that_claimed_it_and_takes_over_from_a_dead_one() {
    let (stack, store) = idle_stack().await;
    let work_dir = tempfile::tempdir().unwrap();
    // A worker of another process than the claimant's (its own store: nothing remembered).
    let worker = other_process_worker(&stack, work_dir.path().to_path_buf());
    let presence = stack.js.get_key_value(&stack.topology.workers_bucket).await.unwrap();

    // The claimant lives: its work message is held, nothing is worked, until it ends there.
    presence.put("worker-alive", "alive".into()).await.unwrap();
    let (item, objective) = claimed_objective(&store, "worker-alive").await;
    let held = {
        let (worker, item) = (worker.clone(), item.clone());
        tokio::spawn(async move { worker.process(&item, "work:1", false).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!held.is_finished(), "held while the claimant works it");
    assert!(results_of(&stack, objective).await.is_empty(), "and not worked here");
    complete_as(&store, objective, item.run_id, "claim:worker-alive").await;
    tokio::time::timeout(Duration::from_secs(10), held).await.expect("settled once it ended").unwrap().unwrap();
    assert_eq!(results_of(&stack, objective).await, ["claim:worker-alive"], "the claimant's result only");

    // The claimant lives but nothing is left to work: its answer waits for a clarification,
    // or the run was cancelled. The message is settled without working the objective.
    let (item, objective) = claimed_objective(&store, "worker-alive").await;
    store
        .execute_objective(objective, item.run_id, factory_domain::ObjectiveCommand::RecordTaskResult { idempotency_key: "claim:worker-alive".into(), result: question() })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker.process(&item, "work:3", false)).await.expect("not held").unwrap();
    assert_eq!(results_of(&stack, objective).await, ["claim:worker-alive"], "the question is not worked again");
    let (item, objective) = claimed_objective(&store, "worker-alive").await;
    store
        .execute_run(item.run_id, RunCommand::CancelRun { reason: "changed my mind".into(), cancelled_by: "tester".into() })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker.process(&item, "work:4", false)).await.expect("not held").unwrap();
    assert!(results_of(&stack, objective).await.is_empty());

    // Claimed by this very worker, whose attempts have ended (none is in flight here). Its
    // answer waits for a clarification: a late message does not work it a second time.
    let own = worker.local_work().instance().to_string();
    let (item, objective) = claimed_objective(&store, &own).await;
    let asked = factory_domain::ObjectiveCommand::RecordTaskResult { idempotency_key: format!("claim:{own}"), result: question() };
    store.execute_objective(objective, item.run_id, asked).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker.process(&item, "work:5", false)).await.unwrap().unwrap();
    assert_eq!(results_of(&stack, objective).await, [format!("claim:{own}")]);
    // Still open otherwise (its attempts were abandoned): the message works it.
    let (item, objective) = claimed_objective(&store, &own).await;
    tokio::time::timeout(Duration::from_secs(30), worker.process(&item, "work:6", false)).await.unwrap().unwrap();
    assert_eq!(results_of(&stack, objective).await, ["work:6"]);

    // The claimant has gone (no presence): the objective is worked here.
    let (item, objective) = claimed_objective(&store, "worker-gone").await;
    tokio::time::timeout(Duration::from_secs(30), worker.process(&item, "work:2", false)).await.unwrap().unwrap();
    assert_eq!(results_of(&stack, objective).await, ["work:2"]);
    let status = store.load_objective(objective).await.unwrap().status;
    assert_eq!(status, factory_domain::objective::ObjectiveStatus::Completed);
}

/// Scripted answers, counting the calls, through a provider that says it answers inside the
/// process (as the scripted one does) or not (as every real one does).
struct Counting {
    scripted: ScriptedProvider,
    calls: std::sync::atomic::AtomicUsize,
    in_process: bool,
}

impl Counting {
    fn new(in_process: bool) -> Arc<Self> {
        Arc::new(Self { scripted: ScriptedProvider::new(), calls: Default::default(), in_process })
    }

    fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl factory_teams::model::ModelProvider for Counting {
    fn complete<'a>(&'a self, request: &'a factory_teams::model::ModelRequest) -> factory_teams::model::ModelFuture<'a> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.scripted.complete(request)
    }

    fn answers_in_process(&self) -> bool {
        self.in_process
    }
}

/// A worker of the test's own process (its store), running, with its presence announced.
async fn running_worker(stack: &TestStack, store: &Arc<Store>, provider: Arc<dyn factory_teams::model::ModelProvider>) -> (Worker, tokio::task::JoinHandle<()>) {
    let teams = factory_teams::TEAM_IDS.iter().map(|t| t.to_string()).collect();
    let worker = Worker::new(store.clone(), stack.js.clone(), stack.topology.clone(), provider, WorkerOptions::new(teams, factory_teams::tools::Scratch::Memory));
    let running = tokio::spawn(worker.clone().run());
    let local = worker.local_work();
    wait_for("the worker's presence", Duration::from_secs(10), || async { local.try_claim("business-analysis").map(drop) }).await;
    (worker, running)
}

/// Hands a phase1 run's first objective to `worker` ahead of the commit that starts its
/// stage and assigns it, as a step does, and returns that commit, unmade, with what tells
/// its outcome.
async fn handed_ahead<'s>(
    store: &'s Store,
    worker: &Worker,
) -> (factory_commands::store::Changes<'s>, factory_teams::handoff::Tell, RunId, factory_domain::ObjectiveId) {
    let plan = Pipeline::load("phase1").unwrap();
    let run = RunId::new();
    let submit = RunCommand::SubmitRequirement { title: None, requirement: "Build it".into(), pipeline: plan.name().into(), pipeline_definition: plan.source().into(), auto_approve: true, submitted_by: "tester".into() };
    store.execute_run(run, submit).await.unwrap();
    let first = &plan.stages()[0];
    let objective = factory_domain::ObjectiveId::new();
    let local = worker.local_work();
    let claim = local.try_claim(&first.team).expect("a free slot");
    let mut changes = store.changes();
    changes.execute_run(run, RunCommand::StartStage { stage: first.name.clone(), team: first.team.clone(), objective_id: objective }).await.unwrap();
    changes.new_objective(objective, run);
    let assign = factory_teams::orchestrator::assignment(run, objective, first, Some(local.instance().to_string()));
    changes.execute_objective(objective, run, assign).await.unwrap();
    let (ahead, tell) = factory_teams::handoff::Ahead::new(changes.staged());
    assert!(local.hand_off(claim, factory_teams::orchestrator::WorkItem::new(run, objective, first), Some(ahead)));
    (changes, tell, run, objective)
}

async fn events_of(stack: &TestStack, aggregate_id: String) -> Vec<String> {
    sqlx::query_scalar("SELECT event_type FROM events WHERE aggregate_id = $1 ORDER BY sequence")
        .bind(aggregate_id)
        .fetch_all(&stack.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_handed_over_ahead_of_its_commit_stands_or_falls_with_that_commit() {
    let (stack, store) = idle_stack().await;
    let inside = Counting::new(true);
    let (worker, running) = running_worker(&stack, &store, inside.clone()).await;
    let local = worker.local_work();
    let key = format!("claim:{}", local.instance());

    // Committed: the work is done meanwhile but records nothing until then, then completes
    // once (and its final commit takes the run on: the next stages are worked here too).
    let (changes, tell, run, objective) = handed_ahead(&store, &worker).await;
    wait_for("the work to go ahead of the commit", Duration::from_secs(10), || async { (inside.calls() > 0).then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let made = inside.calls();
    assert!(events_of(&stack, objective.to_string()).await.is_empty(), "nothing written before the commit");
    assert!(local.in_flight(objective).is_some(), "the work waits for the commit");
    let committed = changes.commit().await;
    tell.tell(factory_teams::orchestrator::outcome_of(&committed));
    committed.unwrap();
    tokio::time::timeout(Duration::from_secs(10), factory_teams::handoff::until_ended(local.in_flight(objective).unwrap_or_else(|| tokio::sync::watch::channel(true).1)))
        .await
        .unwrap();
    assert_eq!(results_of(&stack, objective).await, [key.clone()]);
    let recorded = events_of(&stack, objective.to_string()).await.iter().filter(|e| *e == "ModelCalled").count();
    assert_eq!(recorded, made, "each call made ahead recorded once, in the final commit");
    wait_for("the run to go on from the work that stood", Duration::from_secs(20), || async {
        (store.load_run(run).await.unwrap().status == RunStatus::Completed).then_some(())
    })
    .await;

    // Refused: the work is dropped, nothing of it is written, its claim is let go.
    let (changes, tell, run, objective) = handed_ahead(&store, &worker).await;
    drop(changes);
    tell.tell(factory_teams::handoff::Outcome::Refused);
    if let Some(ended) = local.in_flight(objective) {
        tokio::time::timeout(Duration::from_secs(10), factory_teams::handoff::until_ended(ended)).await.unwrap();
    }
    assert!(events_of(&stack, objective.to_string()).await.is_empty(), "no event of the objective");
    assert_eq!(events_of(&stack, run.to_string()).await, ["RequirementSubmitted"], "nor of its stage");

    // Not known, and it did commit: the store says so, and the work completes once.
    let (changes, tell, run, objective) = handed_ahead(&store, &worker).await;
    changes.commit().await.unwrap();
    drop(tell);
    wait_for("the objective worked once", Duration::from_secs(10), || async { (results_of(&stack, objective).await == [key.clone()]).then_some(()) }).await;
    // Its run goes on here; let it end before this worker stops (the next one would sweep
    // its open claims and work them).
    wait_for("the run to end", Duration::from_secs(20), || async { (store.load_run(run).await.unwrap().status == RunStatus::Completed).then_some(()) }).await;
    running.abort();

    // A provider outside the process is not called before the commit stands.
    let outside = Counting::new(false);
    let (worker, running) = running_worker(&stack, &store, outside.clone()).await;
    let (changes, tell, _, objective) = handed_ahead(&store, &worker).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(outside.calls(), 0, "no call while the commit is in flight");
    changes.commit().await.unwrap();
    tell.tell(factory_teams::handoff::Outcome::Committed);
    let key = format!("claim:{}", worker.local_work().instance());
    wait_for("the objective worked once", Duration::from_secs(10), || async { (results_of(&stack, objective).await == [key.clone()]).then_some(()) }).await;
    assert!(outside.calls() > 0, "called once it stood");
    running.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_orchestrator_can_never_act_on_is_terminated_not_redelivered_forever() {
    let factory = Factory::start().await;
    let run = RunId::new();
    let envelope: factory_nats::EventEnvelope = serde_json::from_value(serde_json::json!({
        "position": 1,
        "aggregate_type": "objective",
        "aggregate_id": "not-an-objective-id",
        "sequence": 2,
        "event_type": "ObjectiveCompleted",
        "event_version": "1",
        "run_id": run.to_string(),
        "recorded_at": "2026-12-01T00:00:00Z",
        "payload": { "iterations": 1 },
        "metadata": { "run_id": run.to_string() },
        "hash": "00",
    }))
    .unwrap();
    let subject = factory.stack.topology.event_subject(Some(&run.to_string()), "objective", "ObjectiveCompleted");
    factory
        .stack
        .js
        .publish_with_headers(subject, factory_nats::cloud_event_headers(&envelope), serde_json::to_vec(&envelope).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let settled = wait_for("the malformed event to be settled", Duration::from_secs(30), || async {
        let stream = factory.stack.js.get_stream(&factory.stack.topology.events_stream).await.ok()?;
        let mut consumer = stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>("orchestrator").await.ok()?;
        let info = consumer.info().await.ok()?;
        (info.delivered.stream_sequence >= 1 && info.num_pending == 0 && info.num_ack_pending == 0).then_some(info.num_redelivered)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let stream = factory.stack.js.get_stream(&factory.stack.topology.events_stream).await.unwrap();
    let mut consumer = stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>("orchestrator").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((settled, info.num_redelivered, info.num_ack_pending), (0, 0, 0), "terminated at its first delivery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_queues_the_open_claims_of_a_process_that_has_gone_and_only_those() {
    use factory_commands::claims;
    let (stack, store) = idle_stack().await;
    let pool = &stack.pool;
    let presence = stack.js.get_key_value(&stack.topology.workers_bucket).await.unwrap();
    let age = |instance: &'static str, by: &'static str| async move {
        sqlx::query("UPDATE worker_instances SET seen_at = now() - $2::interval WHERE instance = $1")
            .bind(instance)
            .bind(by)
            .execute(pool)
            .await
            .unwrap();
    };

    // A claim the dead process's row says had ended before its last renewal: not looked at.
    let (_, before) = claimed_objective(&store, "worker-dead").await;
    claims::renew(pool, "worker-dead", claims::last_position(pool).await.unwrap()).await.unwrap();
    // After it: one still open, one answered with a question, one completed, one whose run
    // was cancelled. Only the first is work left to do.
    let (open_item, open) = claimed_objective(&store, "worker-dead").await;
    let (item, asked) = claimed_objective(&store, "worker-dead").await;
    let question = factory_domain::ObjectiveCommand::RecordTaskResult { idempotency_key: "claim:worker-dead".into(), result: question() };
    store.execute_objective(asked, item.run_id, question).await.unwrap();
    let (item, done) = claimed_objective(&store, "worker-dead").await;
    complete_as(&store, done, item.run_id, "claim:worker-dead").await;
    let (item, _) = claimed_objective(&store, "worker-dead").await;
    store.execute_run(item.run_id, RunCommand::CancelRun { reason: "no".into(), cancelled_by: "tester".into() }).await.unwrap();
    // A process whose row is stale but whose presence lasts (it cannot reach the store, say),
    // and one whose row is fresh: both are left alone.
    let (_, lagging) = claimed_objective(&store, "worker-lagging").await;
    claims::renew(pool, "worker-lagging", 0).await.unwrap();
    presence.put("worker-lagging", "alive".into()).await.unwrap();
    let (_, fresh) = claimed_objective(&store, "worker-fresh").await;
    claims::renew(pool, "worker-fresh", 0).await.unwrap();
    // One gone for longer than the grace, its one claim ended: its row goes at the first sweep.
    let (item, long_done) = claimed_objective(&store, "worker-long-gone").await;
    store.execute_objective(long_done, item.run_id, factory_domain::ObjectiveCommand::BlockObjective { reason: "gave up".into() }).await.unwrap();
    claims::renew(pool, "worker-long-gone", 0).await.unwrap();
    age("worker-dead", "1 minute").await;
    age("worker-lagging", "1 minute").await;
    age("worker-long-gone", "10 minutes").await;

    // A worker of another process (its own store, nothing remembered).
    let worker = other_process_worker(&stack, factory_teams::tools::Scratch::Memory);
    assert_eq!(worker.sweep().await.unwrap(), 1);
    let team = open_item.team.clone();
    assert_eq!(queued_objectives(&stack, &team).await, [open.to_string()], "only the open claim is queued");
    let rows = || async {
        sqlx::query_scalar::<_, String>("SELECT instance FROM worker_instances ORDER BY instance").fetch_all(pool).await.unwrap()
    };
    assert_eq!(rows().await, ["worker-dead", "worker-fresh", "worker-lagging"], "the long-gone row is deleted, the dead one kept for its grace");
    assert_eq!(worker.sweep().await.unwrap(), 0, "nothing is queued twice");
    // A statement the dead process sent before it died commits late: the next sweep finds it.
    let (late_item, late) = claimed_objective(&store, "worker-dead").await;
    assert_eq!(worker.sweep().await.unwrap(), 1);
    assert_eq!(queued_objectives(&stack, &late_item.team).await, [open.to_string(), late.to_string()]);
    assert_eq!(worker.sweep().await.unwrap(), 0);
    // Past its grace, with nothing found, its row goes too.
    age("worker-dead", "10 minutes").await;
    assert_eq!(worker.sweep().await.unwrap(), 0);
    assert_eq!(rows().await, ["worker-fresh", "worker-lagging"]);
    for untouched in [before, lagging, fresh] {
        assert!(results_of(&stack, untouched).await.is_empty());
    }

    // The queued work is taken by the worker (the claimant has no presence) and done once.
    let running = tokio::spawn(worker.clone().run());
    for objective in [open, late] {
        wait_for("the dead process's open objectives to be completed", Duration::from_secs(60), || async {
            let status = store.load_objective(objective).await.unwrap().status;
            (status == factory_domain::objective::ObjectiveStatus::Completed).then_some(())
        })
        .await;
    }
    running.abort();
    assert_eq!(results_of(&stack, open).await, ["work:1"], "worked from the swept messages");
    assert_eq!(results_of(&stack, late).await, ["work:2"]);
    assert_eq!(results_of(&stack, asked).await, ["claim:worker-dead"], "the question is not worked again");
    assert_eq!(results_of(&stack, done).await, ["claim:worker-dead"]);
}

/// The scripted provider, each call answered only once two calls wait together: two
/// deliveries of one objective reach their ends at the same moment.
struct InStep {
    inner: ScriptedProvider,
    together: tokio::sync::Barrier,
}

impl factory_teams::model::ModelProvider for InStep {
    fn answers_in_process(&self) -> bool {
        true
    }

    fn complete<'a>(&'a self, request: &'a factory_teams::model::ModelRequest) -> factory_teams::model::ModelFuture<'a> {
        Box::pin(async move {
            self.together.wait().await;
            self.inner.complete(request).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deliveries_of_one_objective_ending_together_in_one_process_record_its_end_once_and_both_settle() {
    // Two work messages of one objective (a redelivery while the first attempt still runs)
    // reach one worker: both work it, in step, and end together. One end holds the run's
    // lane and commits; the other, waiting in it, is found finished when the holder decides
    // the ends that waited, and is told the holder's outcome (the lane's "riders").
    let (stack, store) = idle_stack().await;
    let (run, plan, done) = run_with_first_stage_started(&store, None).await;
    let [first, second] = [&plan.stages()[0], &plan.stages()[1]];
    let work_dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(InStep { inner: ScriptedProvider::new(), together: tokio::sync::Barrier::new(2) });
    let worker = Worker::new(
        store.clone(),
        stack.js.clone(),
        stack.topology.clone(),
        provider,
        WorkerOptions::new(vec![first.team.clone()], work_dir.path().to_path_buf()),
    );
    let item = factory_teams::orchestrator::WorkItem::new(run, done, first);
    let deadline = Duration::from_secs(30);
    let (a, b) = tokio::time::timeout(deadline, async {
        tokio::join!(worker.process(&item, "work:1", false), worker.process(&item, "work:2", true))
    })
    .await
    .expect("both deliveries settle");
    a.unwrap();
    b.unwrap();
    assert_eq!(results_of(&stack, done).await.len(), 1, "one result recorded");
    let completions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'StageCompleted'",
    )
    .bind(run.to_string())
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(completions, 1, "the stage completed once");
    let queued = queued_objectives(&stack, &second.team).await;
    assert_eq!(queued.len(), 1, "the next stage's work queued once: {queued:?}");
    let run_now = store.load_run(run).await.unwrap();
    match &run_now.stages[&second.name] {
        factory_domain::run::StageState::InProgress { objective_id, .. } => assert_eq!(objective_id.to_string(), queued[0]),
        other => panic!("the next stage is {other:?}"),
    }
}
