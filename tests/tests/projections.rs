//! Read models: the live runners against JetStream, rebuilds with a swap, time travel; on
//! real NATS and PostgreSQL, with runs worked by the demo teams.

use crate::pipeline::Factory;
use cqrs_es::Aggregate;
use factory_domain::{Run, RunEvent, RunStatus};
use factory_projections::Projection;
use factory_projections::runner::{ProjectionRunner, apply_batch};
use factory_testkit::wait_for;
use std::time::Duration;

/// Every read-model row, as sorted JSON text: two models are equal when these are.
async fn snapshot(pool: &sqlx::PgPool) -> Vec<String> {
    let mut rows = Vec::new();
    for projection in Projection::ALL {
        for table in projection.tables() {
            let mut table_rows: Vec<String> =
                sqlx::query_scalar(&format!("SELECT '{table} ' || to_jsonb(t)::text FROM {table} t"))
                    .fetch_all(pool)
                    .await
                    .unwrap();
            table_rows.sort();
            rows.extend(table_rows);
        }
    }
    rows
}

fn start_runners(factory: &Factory) -> Vec<tokio::task::JoinHandle<()>> {
    Projection::ALL
        .into_iter()
        .map(|p| {
            let runner = ProjectionRunner::new(factory.stack.pool.clone(), factory.stack.js.clone(), factory.stack.topology.clone(), p);
            tokio::spawn(async move {
                runner.run().await;
            })
        })
        .collect()
}

/// Waits until every projection has applied every event of the store.
async fn caught_up(factory: &Factory) {
    let pool = &factory.stack.pool;
    wait_for("the projections to catch up", Duration::from_secs(60), || async {
        let head: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events").fetch_one(pool).await.unwrap();
        let behind: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_checkpoints WHERE position < $1")
            .bind(head)
            .fetch_one(pool)
            .await
            .unwrap();
        let known: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_checkpoints").fetch_one(pool).await.unwrap();
        (behind == 0 && known == 4).then_some(())
    })
    .await;
}

async fn rebuild_all(factory: &Factory) {
    for projection in Projection::ALL {
        factory_projections::rebuild::rebuild(&factory.stack.admin, projection, |_, _, _| {}).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projection_killed_mid_stream_and_restarted_equals_a_rebuild() {
    let mut factory = Factory::start().await;
    let mut runners = start_runners(&factory);
    let first = factory.submit("Build a URL shortener #fail=factory/coder", "phase1", true).await;
    let second = factory.submit("Build a todo app #block", "phase1", true).await;
    // Kill the runners while the runs are being worked, then start them again.
    wait_for("some events to be projected", Duration::from_secs(30), || async {
        let position: Option<i64> = sqlx::query_scalar("SELECT min(position) FROM projection_checkpoints")
            .fetch_one(&factory.stack.pool)
            .await
            .unwrap();
        position.filter(|p| *p > 5)
    })
    .await;
    runners.iter().for_each(|r| r.abort());
    let third = factory.submit("Build a chat #clarify", "phase1", false).await;
    factory.wait_status(first, RunStatus::Completed).await;
    factory.wait_status(second, RunStatus::Blocked).await;
    factory.wait_status(third, RunStatus::NeedsClarification).await;
    runners = start_runners(&factory);
    caught_up(&factory).await;
    let live = snapshot(&factory.stack.pool).await;

    // What the runs list, the graph, the costs and the feed say.
    let status: String = sqlx::query_scalar("SELECT status FROM rm_runs WHERE run_id = $1").bind(first.0).fetch_one(&factory.stack.pool).await.unwrap();
    assert_eq!(status, "COMPLETED");
    let (blocked, reason): (String, String) = sqlx::query_as("SELECT status, status_reason FROM rm_runs WHERE run_id = $1")
        .bind(second.0)
        .fetch_one(&factory.stack.pool)
        .await
        .unwrap();
    assert_eq!(blocked, "BLOCKED");
    assert!(reason.starts_with("backend-engineering:"), "{reason}");
    let escalations: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM rm_graph_edges WHERE run_id = $1 AND kind = 'ESCALATION' AND source = 'backend-engineering' AND target = 'human' AND state = 'OPEN'",
    )
    .bind(second.0)
    .fetch_one(&factory.stack.pool)
    .await
    .unwrap();
    assert_eq!(escalations, 1);
    let handoffs: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_graph_edges WHERE run_id = $1 AND kind = 'HANDOFF' AND state = 'DELIVERED'")
        .bind(first.0)
        .fetch_one(&factory.stack.pool)
        .await
        .unwrap();
    assert_eq!(handoffs, 4, "phase1 is a chain of five");
    let (fallbacks, cost): (i64, f64) = sqlx::query_as(
        "SELECT sum(fallbacks)::bigint, sum(cost_usd) FROM rm_costs WHERE run_id = $1 AND alias = 'factory/coder'",
    )
    .bind(first.0)
    .fetch_one(&factory.stack.pool)
    .await
    .unwrap();
    let coder_calls: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE run_id = $1 AND event_type = 'ModelCalled' AND payload->'ModelCalled'->>'alias' = 'factory/coder'",
    )
    .bind(first.0)
    .fetch_one(&factory.stack.pool)
    .await
    .unwrap();
    assert_eq!(fallbacks, coder_calls, "every coder call fell back");
    assert!(cost > 0.0);
    let asked: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_activity WHERE run_id = $1 AND kind = 'clarification'")
        .bind(third.0)
        .fetch_one(&factory.stack.pool)
        .await
        .unwrap();
    assert_eq!(asked, 1);

    rebuild_all(&factory).await;
    assert_eq!(snapshot(&factory.stack.pool).await, live, "the live model equals a rebuild");
    runners.iter().for_each(|r| r.abort());
    factory.tasks.extend(runners);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_event_delivered_twice_is_applied_once() {
    let factory = Factory::start().await;
    let run = factory.submit("Build a URL shortener", "phase1", true).await;
    factory.wait_status(run, RunStatus::Completed).await;
    let events = factory_commands::events::run_events(&factory.stack.pool, run.0, None).await.unwrap();
    for projection in Projection::ALL {
        let first = apply_batch(&factory.stack.pool, projection, &events).await.unwrap();
        assert!(first > 0 || projection == Projection::Activity);
        let once = snapshot(&factory.stack.pool).await;
        assert_eq!(apply_batch(&factory.stack.pool, projection, &events).await.unwrap(), 0, "{projection:?}");
        assert_eq!(apply_batch(&factory.stack.pool, projection, &events[events.len() / 2..]).await.unwrap(), 0);
        assert_eq!(snapshot(&factory.stack.pool).await, once, "{projection:?}");
        // The runner's path: a redelivered batch names positions the checkpoint covers.
        let last = events.last().unwrap().position;
        assert_eq!(factory_projections::runner::catch_up(&factory.stack.pool, projection, last).await.unwrap(), 0);
        assert_eq!(snapshot(&factory.stack.pool).await, once, "{projection:?}");
    }
    let (stages, completed): (i32, i32) = sqlx::query_as("SELECT stages_total, stages_completed FROM rm_runs WHERE run_id = $1")
        .bind(run.0)
        .fetch_one(&factory.stack.pool)
        .await
        .unwrap();
    assert_eq!((stages, completed), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_while_runs_are_written_swaps_in_a_complete_model_without_reader_errors() {
    let mut factory = Factory::start().await;
    let runners = start_runners(&factory);
    let mut runs = Vec::new();
    for i in 0..3 {
        runs.push(factory.submit(&format!("Build service {i}"), "phase1", true).await);
    }
    caught_up(&factory).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A reader that must never see an error or a missing table.
    let reader = {
        let (pool, stop) = (factory.stack.pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM rm_runs r JOIN rm_run_stages s USING (run_id)")
                    .fetch_one(&pool)
                    .await
                    .expect("readers see the old model or the new one");
                reads += 1;
            }
            reads
        })
    };
    // Runs keep arriving while the rebuild works.
    let writer = {
        let store = factory.store.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut submitted = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let plan = factory_teams::Pipeline::load("phase1").unwrap();
                let command = factory_domain::RunCommand::SubmitRequirement {
                    title: None,
                    requirement: format!("Build tool {}", submitted.len()),
                    pipeline: plan.name().into(),
                    pipeline_definition: plan.source().into(),
                    auto_approve: true,
                    submitted_by: "tester".into(),
                };
                let run = factory_domain::RunId::new();
                store.execute_run(run, command).await.unwrap();
                submitted.push(run);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            submitted
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = factory_projections::rebuild::rebuild(&factory.stack.admin, Projection::Runs, |_, _, _| {}).await.unwrap();
    // Complete: every run submitted at or before the swap's position is in the new model.
    let missing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events e WHERE e.event_type = 'RequirementSubmitted' AND e.position <= $1
           AND NOT EXISTS (SELECT 1 FROM rm_runs r WHERE r.run_id = e.run_id)",
    )
    .bind(report.position)
    .fetch_one(&factory.stack.pool)
    .await
    .unwrap();
    assert_eq!(missing, 0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    runs.extend(writer.await.unwrap());
    assert!(reader.await.unwrap() > 0);
    // The live runner goes on from the swapped-in model; once the runs are over and it has
    // caught up, it ends where a fresh rebuild does.
    for run in runs {
        factory.wait_status(run, RunStatus::Completed).await;
    }
    caught_up(&factory).await;
    let live = snapshot(&factory.stack.pool).await;
    rebuild_all(&factory).await;
    assert_eq!(snapshot(&factory.stack.pool).await, live);
    factory.tasks.extend(runners);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn time_travel_at_every_position_matches_the_run_folded_by_hand() {
    let factory = Factory::start().await;
    let run = factory.submit("Build a URL shortener", "phase1", false).await;
    factory.wait_status(run, RunStatus::AwaitingReview).await;
    factory
        .store
        .execute_run(run, factory_domain::RunCommand::ReviewRun {
            decision: factory_domain::run::ReviewDecision::Revise { feedback: "Add rate limits".into() },
            reviewer: "ada".into(),
        })
        .await
        .unwrap();
    factory.wait_status(run, RunStatus::AwaitingReview).await;
    let events = factory_commands::events::run_events(&factory.stack.pool, run.0, None).await.unwrap();
    let mut by_hand = Run::default();
    for event in &events {
        if event.aggregate_type == "run" {
            let tagged = serde_json::json!({ event.event_type.clone(): event.payload.clone() });
            by_hand.apply(serde_json::from_value::<RunEvent>(tagged).unwrap());
        }
        let state = factory_projections::state::run_at(&factory.stack.pool, run.0, Some(event.position)).await.unwrap().unwrap();
        assert_eq!(state["position"], event.position);
        assert_eq!(state["run"]["status"], by_hand.status.as_str(), "at {}", event.position);
        for stage in state["stages"].as_array().unwrap() {
            let name = stage["stage"].as_str().unwrap();
            let expected = match by_hand.stages.get(name) {
                None => "PENDING",
                Some(factory_domain::run::StageState::InProgress { .. }) => "RUNNING",
                Some(factory_domain::run::StageState::Completed { .. }) => "COMPLETED",
                Some(factory_domain::run::StageState::Skipped) => "SKIPPED",
            };
            assert_eq!(stage["status"], expected, "{name} at {}", event.position);
        }
        let calls = events.iter().filter(|e| e.position <= event.position && e.event_type == "ModelCalled").count() as i64;
        let counted: i64 = state["costs"].as_array().unwrap().iter().map(|c| c["calls"].as_i64().unwrap()).sum();
        assert_eq!(counted, calls, "at {}", event.position);
    }
    assert_eq!(by_hand.revisions, 1);
    // Before the run existed there is nothing to show.
    assert!(factory_projections::state::run_at(&factory.stack.pool, run.0, Some(events[0].position - 1)).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projection_that_cannot_apply_an_event_stops_and_names_it() {
    let mut factory = Factory::start().await;
    let runner = ProjectionRunner::new(factory.stack.pool.clone(), factory.stack.js.clone(), factory.stack.topology.clone(), Projection::Runs);
    let stopped = tokio::spawn(runner.run());
    // A stage of a run that was never submitted (written past the domain, as any writer could).
    let orphan = uuid::Uuid::now_v7();
    let position: i64 = sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('run', $1::text, 1, 'StageStarted', '1',
                 jsonb_build_object('StageStarted', jsonb_build_object('stage', 'x', 'team', 'devops', 'objective_id', $1::text)),
                 jsonb_build_object('run_id', $1::text))
         RETURNING position",
    )
    .bind(orphan)
    .fetch_one(&factory.stack.pool)
    .await
    .unwrap();
    let error = tokio::time::timeout(Duration::from_secs(30), stopped).await.expect("the projection stops").unwrap();
    assert!(error.to_string().contains(&format!("event {position} (StageStarted)")), "{error}");
    let (failed, text): (Option<i64>, Option<String>) =
        sqlx::query_as("SELECT failed_position, error FROM projection_checkpoints WHERE name = 'runs'")
            .fetch_one(&factory.stack.pool)
            .await
            .unwrap();
    assert_eq!(failed, Some(position));
    assert!(text.unwrap().contains("no RequirementSubmitted"));
    factory.tasks.clear();
}

/// Random commands against the domain: the refused ones leave nothing, so what is stored is a
/// valid history by construction, with every kind of event in any order the domain allows.
/// The stage's latest objective in a random history, as the orchestrator would name it (a
/// fresh one when none was assigned: the command is then refused, as it should be).
fn latest(objectives: &[(factory_domain::ObjectiveId, factory_domain::RunId, String)], run: factory_domain::RunId, stage: &str) -> factory_domain::ObjectiveId {
    objectives.iter().rev().find(|(_, r, s)| *r == run && s == stage).map_or_else(factory_domain::ObjectiveId::new, |(o, _, _)| *o)
}

async fn random_history(store: &factory_commands::Store, rng: &mut rand::rngs::StdRng, steps: usize) {
    use factory_domain::objective::{ArtifactProduced, ModelCalled};
    use factory_domain::run::ReviewDecision;
    use factory_domain::{ObjectiveCommand, ObjectiveId, RunCommand, RunId, TaskResult, TaskStatus};
    use rand::Rng;
    use rand::seq::IndexedRandom;
    let pipelines = [factory_teams::Pipeline::load("phase1").unwrap(), factory_teams::Pipeline::load("full").unwrap()];
    let mut runs: Vec<(RunId, usize)> = Vec::new();
    let mut objectives: Vec<(ObjectiveId, RunId, String)> = Vec::new();
    for step in 0..steps {
        if runs.is_empty() || rng.random_ratio(1, 12) {
            let which = rng.random_range(0..2);
            let plan = &pipelines[which];
            let run = RunId::new();
            let command = RunCommand::SubmitRequirement {
                title: None,
                requirement: format!("Random requirement {step}"),
                pipeline: plan.name().into(),
                pipeline_definition: plan.source().into(),
                auto_approve: rng.random_bool(0.5),
                submitted_by: "tester".into(),
            };
            store.execute_run(run, command).await.unwrap();
            runs.push((run, which));
            continue;
        }
        let &(run, which) = runs.choose(rng).unwrap();
        let stage = pipelines[which].stages().choose(rng).unwrap().clone();
        let run_command = |command| async move { store.execute_run(run, command).await.is_ok() };
        match rng.random_range(0..14) {
            0..=2 => {
                let objective = ObjectiveId::new();
                let assigned = store
                    .execute_objective(objective, run, ObjectiveCommand::AssignObjective {
                        objective_id: objective,
                        run_id: run,
                        stage: stage.name.clone(),
                        team: stage.team.clone(),
                        instructions: "do it".into(),
                        max_iterations: 3,
                        claimed_by: None,
                    })
                    .await
                    .is_ok();
                if assigned {
                    objectives.push((objective, run, stage.name.clone()));
                    run_command(RunCommand::StartStage { stage: stage.name.clone(), team: stage.team.clone(), objective_id: objective }).await;
                }
            }
            3 => {
                let objective_id = latest(&objectives, run, &stage.name);
                let _ = run_command(RunCommand::CompleteStage { stage: stage.name.clone(), objective_id }).await;
            }
            4 => { let _ = run_command(RunCommand::SkipStage { stage: stage.name.clone(), reason: "not needed".into() }).await; },
            5 => { let _ = run_command(RunCommand::AwaitReview).await; },
            6 => {
                let decision = if rng.random_bool(0.5) {
                    ReviewDecision::Approve
                } else {
                    ReviewDecision::Revise { feedback: "again".into() }
                };
                let _ = run_command(RunCommand::ReviewRun { decision, reviewer: "ada".into() }).await;
            }
            7 => {
                let command = match rng.random_range(0..5) {
                    0 => RunCommand::CompleteRun,
                    1 => RunCommand::FailRun { reason: "broken".into() },
                    2 => RunCommand::CancelRun { reason: "enough".into(), cancelled_by: "ada".into() },
                    3 => RunCommand::BlockRun { stage: stage.name.clone(), reason: "stuck".into(), objective_id: latest(&objectives, run, &stage.name) },
                    _ => RunCommand::AwaitClarification { stage: stage.name.clone(), question: "which one?".into(), objective_id: latest(&objectives, run, &stage.name) },
                };
                let _ = run_command(command).await;
            }
            8 => { let _ = run_command(RunCommand::ReopenStages { stages: vec![stage.name.clone()] }).await; },
            _ => {
                let Some((objective, run, _)) = objectives.choose(rng).cloned() else { continue };
                let command = match rng.random_range(0..6) {
                    0 | 1 => ObjectiveCommand::RecordModelCall(ModelCalled {
                        alias: ["factory/coder", "factory/cheap"].choose(rng).unwrap().to_string(),
                        provider: "scripted".into(),
                        model: ["coder", "coder-fallback"].choose(rng).unwrap().to_string(),
                        input_tokens: rng.random_range(0..5_000),
                        output_tokens: rng.random_range(0..2_000),
                        cost_usd: f64::from(rng.random_range(0..1_000u32)) / 10_000.0,
                        latency_ms: rng.random_range(0..500),
                        outcome: ["ok", "fallback", "downgraded"].choose(rng).unwrap().to_string(),
                        failed_targets: vec![],
                        request_digest: "0".repeat(64),
                        response: "{}".into(),
                    }),
                    2 => ObjectiveCommand::RecordTaskResult {
                        idempotency_key: format!("k{step}"),
                        result: TaskResult {
                            status: *[TaskStatus::Complete, TaskStatus::Blocked, TaskStatus::NeedsClarification].choose(rng).unwrap(),
                            reasoning: "because".into(),
                            blockers: vec![],
                            assumptions_made: vec![],
                            verified_facts: vec![],
                            clarification_needed: Some("what?".into()),
                            artifacts: vec![],
                        },
                    },
                    3 => ObjectiveCommand::ProduceArtifact(ArtifactProduced {
                        path: format!("src/f{step}.rs"),
                        sha256: "a".repeat(64),
                        bytes: rng.random_range(0..10_000),
                        media_type: "text/x-rust".into(),
                    }),
                    4 => ObjectiveCommand::CompleteObjective,
                    _ => ObjectiveCommand::BlockObjective { reason: "no".into() },
                };
                let _ = store.execute_objective(objective, run, command).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn for_random_histories_incremental_application_equals_a_rebuild() {
    use rand::{Rng, SeedableRng};
    let stack = factory_testkit::TestStack::new().await;
    let store = factory_commands::Store::new(stack.pool.clone(), std::sync::Arc::new(factory_domain::SystemServices));
    for seed in 0..4u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        random_history(&store, &mut rng, 250).await;
        let events = factory_commands::events::range(&stack.pool, 0, i64::MAX, i64::MAX).await.unwrap();
        // Incrementally, in random batches, some delivered again.
        for projection in Projection::ALL {
            let mut at = 0;
            while at < events.len() {
                let end = (at + rng.random_range(1..40)).min(events.len());
                apply_batch(&stack.pool, projection, &events[at..end]).await.unwrap();
                if rng.random_ratio(1, 4) {
                    let again = rng.random_range(0..end);
                    apply_batch(&stack.pool, projection, &events[again..end]).await.unwrap();
                }
                at = end;
            }
        }
        let incremental = snapshot(&stack.pool).await;
        assert!(incremental.len() > 50, "seed {seed}: a history worth comparing");
        for projection in Projection::ALL {
            factory_projections::rebuild::rebuild(&stack.admin, projection, |_, _, _| {}).await.unwrap();
        }
        assert_eq!(snapshot(&stack.pool).await, incremental, "seed {seed}");
    }
}
