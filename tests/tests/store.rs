//! The event store: optimistic concurrency, append-only, hash chains.

use factory_commands::{CommandError, Store, audit};
use factory_domain::{ObjectiveId, RunCommand, RunError, RunId, SystemServices};
use factory_testkit::TestStack;
use std::sync::Arc;

fn submit(requirement: &str) -> RunCommand {
    RunCommand::SubmitRequirement {
        title: None,
        requirement: requirement.into(),
        pipeline: "phase1".into(),
        pipeline_definition: String::new(),
        auto_approve: false,
        submitted_by: "tester".into(),
    }
}

async fn store(stack: &TestStack) -> Arc<Store> {
    Arc::new(Store::new(stack.pool.clone(), Arc::new(SystemServices)))
}

/// A submitted run with two started stages: three events in one chain.
async fn run_with_two_stages(store: &Store) -> RunId {
    let run = RunId::new();
    store.execute_run(run, submit("Build a URL shortener")).await.unwrap();
    for stage in ["ba", "sa"] {
        store
            .execute_run(run, RunCommand::StartStage { stage: stage.into(), team: "business-analysis".into(), objective_id: ObjectiveId::new() })
            .await
            .unwrap();
    }
    run
}

/// What only a superuser could do: switch off the append-only trigger, change the store.
async fn as_attacker(stack: &TestStack, statement: &str, run: RunId) {
    let mut tx = stack.admin.begin().await.unwrap();
    sqlx::query("ALTER TABLE events DISABLE TRIGGER events_append_only").execute(&mut *tx).await.unwrap();
    sqlx::query(statement).bind(run.to_string()).execute(&mut *tx).await.unwrap();
    sqlx::query("ALTER TABLE events ENABLE TRIGGER events_append_only").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
}

async fn sequences(stack: &TestStack, aggregate_id: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT sequence FROM events WHERE aggregate_id = $1 ORDER BY sequence")
        .bind(aggregate_id)
        .fetch_all(&stack.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_writers_on_one_aggregate_all_succeed_without_gaps() {
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    let run = RunId::new();
    store.execute_run(run, submit("Build a URL shortener")).await.unwrap();
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let (stage, objective_id) = (format!("stage-{i}"), ObjectiveId::new());
                store
                    .execute_run(run, RunCommand::StartStage { stage: stage.clone(), team: "qa-engineering".into(), objective_id })
                    .await?;
                store.execute_run(run, RunCommand::CompleteStage { stage, objective_id }).await
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap().expect("every command succeeds after retries");
    }
    assert_eq!(sequences(&stack, &run.to_string()).await, (1..=17).collect::<Vec<i64>>());
    assert!(audit::verify(&stack.pool).await.unwrap().broken.is_empty());
}

#[tokio::test]
async fn a_second_writer_of_the_same_sequence_gets_a_conflict() {
    let stack = TestStack::new().await;
    let insert = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
                  VALUES ('run', 'r1', 1, 'RequirementSubmitted', '1', '{}', '{}')";
    let mut first = stack.pool.begin().await.unwrap();
    sqlx::query(insert).execute(&mut *first).await.unwrap();
    let pool = stack.pool.clone();
    let second = tokio::spawn(async move { sqlx::query(insert).execute(&pool).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    first.commit().await.unwrap();
    let error = second.await.unwrap().expect_err("the second writer must lose");
    assert_eq!(
        error.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("23505"),
        "cqrs-es maps a unique violation to its optimistic-lock conflict: {error}"
    );
}

#[tokio::test]
async fn refused_commands_write_nothing_and_say_why() {
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    let run = RunId::new();
    let empty = store.execute_run(run, submit("   ")).await.unwrap_err();
    assert!(matches!(empty, CommandError::Refused(RunError::EmptyRequirement)), "{empty}");
    let huge = store.execute_run(run, submit(&"x".repeat(1 << 20))).await.unwrap_err();
    assert!(matches!(huge, CommandError::Refused(RunError::RequirementTooLarge(_))), "{huge}");
    let unknown = store.execute_run(RunId::new(), RunCommand::CompleteRun).await.unwrap_err();
    assert!(matches!(unknown, CommandError::Refused(RunError::NotFound)), "{unknown}");
    assert_eq!(crate::support::store_count(&stack.pool).await, 0);

    store.execute_run(run, submit("Build it")).await.unwrap();
    store.execute_run(run, RunCommand::CancelRun { reason: "changed my mind".into(), cancelled_by: "ada".into() }).await.unwrap();
    let after = store.execute_run(run, RunCommand::CompleteRun).await.unwrap_err();
    assert!(matches!(after, CommandError::Refused(RunError::Terminal("CANCELLED"))), "{after}");
    assert_eq!(crate::support::store_count(&stack.pool).await, 2);
}

#[tokio::test]
async fn the_database_fills_in_position_run_id_time_and_hash() {
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    let run = RunId::new();
    store.execute_run(run, submit("Build a URL shortener")).await.unwrap();
    store
        .execute_run(run, RunCommand::StartStage { stage: "ba".into(), team: "business-analysis".into(), objective_id: ObjectiveId::new() })
        .await
        .unwrap();
    let rows: Vec<(i64, Option<uuid::Uuid>, Vec<u8>)> =
        sqlx::query_as("SELECT position, run_id, hash FROM events ORDER BY position")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows[0].0 < rows[1].0);
    assert!(rows.iter().all(|r| r.1 == Some(run.0) && r.2.len() == 32));
    // A writer cannot choose its own position or hash: the trigger overwrites them.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, position, hash, xid, recorded_at) \
         VALUES ('run', 'forged', 1, 'X', '1', '{}', '{}', 1, '\\x00', '1', now())",
    )
    .execute(&stack.pool)
    .await
    .unwrap();
    let (position, hash): (i64, Vec<u8>) =
        sqlx::query_as("SELECT position, hash FROM events WHERE aggregate_id = 'forged'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert!(position > rows[1].0 && hash.len() == 32);
}

#[tokio::test]
async fn events_cannot_be_updated_deleted_or_truncated() {
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    store.execute_run(RunId::new(), submit("Build a URL shortener")).await.unwrap();
    for statement in [
        "UPDATE events SET payload = '{}'",
        "DELETE FROM events",
        "TRUNCATE events",
    ] {
        let error = sqlx::query(statement).execute(&stack.pool).await.expect_err(statement);
        let code = error.as_database_error().and_then(|e| e.code()).unwrap_or_default();
        assert_eq!(code, "42501", "{statement} as the application role: {error}");
        // Even the owner is stopped by the trigger.
        let error = sqlx::query(statement).execute(&stack.admin).await.expect_err(statement);
        assert!(error.to_string().contains("append-only"), "{statement} as superuser: {error}");
    }
    assert_eq!(crate::support::store_count(&stack.pool).await, 1);
}

#[tokio::test]
async fn audit_names_the_tampered_event() {
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    let run = run_with_two_stages(&store).await;
    let other = RunId::new();
    store.execute_run(other, submit("Something else")).await.unwrap();
    let report = audit::verify(&stack.pool).await.unwrap();
    assert_eq!((report.events, report.aggregates, report.broken.len()), (4, 2, 0));

    as_attacker(
        &stack,
        "UPDATE events SET payload = jsonb_set(payload::jsonb, '{StageStarted,team}', '\"security-engineering\"') \
         WHERE aggregate_id = $1 AND sequence = 2",
        run,
    )
    .await;

    let report = audit::verify(&stack.pool).await.unwrap();
    assert_eq!(report.broken.len(), 1, "{:?}", report.broken);
    let broken = &report.broken[0];
    assert_eq!((broken.aggregate_type.as_str(), broken.aggregate_id.clone(), broken.sequence), ("run", run.to_string(), 2));
    assert!(broken.reason.contains("hash mismatch"), "{}", broken.reason);
}

#[tokio::test]
async fn audit_finds_a_removed_event() {
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    let run = run_with_two_stages(&store).await;
    as_attacker(&stack, "DELETE FROM events WHERE aggregate_id = $1 AND sequence = 2", run).await;
    let report = audit::verify(&stack.pool).await.unwrap();
    assert_eq!(report.broken.len(), 1, "{:?}", report.broken);
    assert_eq!(report.broken[0].sequence, 3);
    assert!(report.broken[0].reason.contains("gap"), "{}", report.broken[0].reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_process_writing_an_aggregate_never_makes_a_command_act_on_stale_state() {
    let stack = TestStack::new().await;
    // Two stores are two processes: each remembers the state of its own last commits.
    let (a, b) = (store(&stack).await, store(&stack).await);
    let run = run_with_two_stages(&a).await;
    // b moves the run on behind a's back.
    b.execute_run(run, RunCommand::StartStage { stage: "qa".into(), team: "qa-engineering".into(), objective_id: ObjectiveId::new() })
        .await
        .unwrap();
    // a's remembered state is one event behind: its next command still lands after b's.
    a.execute_run(run, RunCommand::StartStage { stage: "docs".into(), team: "documentation".into(), objective_id: ObjectiveId::new() })
        .await
        .unwrap();
    assert_eq!(sequences(&stack, &run.to_string()).await, [1, 2, 3, 4, 5]);
    // A command a's stale state would accept is refused on the fresh one: b cancelled the run.
    b.execute_run(run, RunCommand::CancelRun { reason: "stop".into(), cancelled_by: "ada".into() }).await.unwrap();
    let refused = a
        .execute_run(run, RunCommand::StartStage { stage: "ops".into(), team: "devops".into(), objective_id: ObjectiveId::new() })
        .await;
    assert!(matches!(refused, Err(CommandError::Refused(RunError::Terminal(_)))), "{refused:?}");
    assert_eq!(sequences(&stack, &run.to_string()).await, [1, 2, 3, 4, 5, 6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_refused_on_remembered_state_is_asked_again_on_fresh_state() {
    let stack = TestStack::new().await;
    let (a, b) = (store(&stack).await, store(&stack).await);
    let run = RunId::new();
    a.execute_run(run, submit("Build a URL shortener")).await.unwrap();
    let first = ObjectiveId::new();
    let start = |objective_id| RunCommand::StartStage { stage: "ba".into(), team: "business-analysis".into(), objective_id };
    a.execute_run(run, start(first)).await.unwrap();
    // b completes and reopens the stage: a still remembers it as in progress.
    b.execute_run(run, RunCommand::CompleteStage { stage: "ba".into(), objective_id: first }).await.unwrap();
    b.execute_run(run, RunCommand::ReopenStages { stages: vec!["ba".into()] }).await.unwrap();
    a.execute_run(run, start(ObjectiveId::new())).await.expect("accepted on the fresh state, though refused on the remembered one");
    assert_eq!(sequences(&stack, &run.to_string()).await, [1, 2, 3, 4, 5]);
}

/// sqlx 0.8.6 (vendor/README.md): a `begin` dropped while its `BEGIN` is answered left the
/// session in a transaction that the pool handed to the next borrower, whose writes then
/// never committed. Dropped here at exactly that point, on a pool of one connection.
#[tokio::test]
async fn a_begin_dropped_in_flight_leaves_the_pooled_connection_outside_any_transaction() {
    use futures::FutureExt;
    use sqlx::Connection;
    let stack = TestStack::new().await;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&stack.app_url()).await.unwrap();
    let mut dropped_in_flight = 0;
    for _ in 0..20 {
        let mut conn = pool.acquire().await.unwrap();
        // One poll: `BEGIN` is sent and its answer awaited; then the future is dropped.
        if conn.begin().now_or_never().is_none() {
            dropped_in_flight += 1;
        }
        drop(conn);
        // The same connection again (the pool has one): idle, not idle in a transaction, and
        // what it writes is committed.
        let mut conn = pool.acquire().await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *conn).await.unwrap();
        let state: String = sqlx::query_scalar("SELECT state FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_one(&stack.admin)
            .await
            .unwrap();
        assert_eq!(state, "idle", "the pooled connection is still inside the dropped begin's transaction");
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             VALUES ('test', gen_random_uuid()::text, 1, 'Tested', '1', '{\"Tested\": {}}', jsonb_build_object('run_id', gen_random_uuid()::text))",
        )
        .execute(&mut *conn)
        .await
        .unwrap();
        drop(conn);
    }
    assert!(dropped_in_flight > 0, "no begin was caught in flight");
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&stack.admin).await.unwrap();
    assert_eq!(committed, 20, "the writes after the dropped begins were committed");
    pool.close().await;
}

/// The pool takes back a connection without a round trip when nothing is outstanding on it
/// (the vendored sqlx-postgres's ping, vendor/README.md). A connection whose statement was
/// dropped in flight, or whose rows were left unread, still owes answers: the next borrower
/// of that connection gets its own answer, never a stale one. On a pool of one connection.
#[tokio::test]
async fn a_statement_dropped_in_flight_or_rows_left_unread_do_not_leak_into_the_next_borrowers_answer() {
    use futures::{FutureExt, StreamExt};
    let stack = TestStack::new().await;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&stack.app_url()).await.unwrap();
    let mut dropped_in_flight = 0;
    for i in 0..20i32 {
        let mut conn = pool.acquire().await.unwrap();
        // One poll: the statement is sent and its answer awaited; then the future is dropped.
        if sqlx::query_scalar::<_, i32>("SELECT -1 FROM pg_sleep(0.01)").fetch_one(&mut *conn).now_or_never().is_none() {
            dropped_in_flight += 1;
        }
        drop(conn);
        let answer: i32 = sqlx::query_scalar("SELECT $1").bind(i).fetch_one(&pool).await.unwrap();
        assert_eq!(answer, i, "a dropped statement's answer reached the next borrower");
        // A result read in part: its other rows are still on the wire when it is given back.
        {
            let mut conn = pool.acquire().await.unwrap();
            let mut rows = sqlx::query_scalar::<_, i32>("SELECT -g FROM generate_series(1, 20000) g").fetch(&mut *conn);
            assert_eq!(rows.next().await.unwrap().unwrap(), -1);
        }
        let answer: i32 = sqlx::query_scalar("SELECT $1").bind(i).fetch_one(&pool).await.unwrap();
        assert_eq!(answer, i, "rows left unread reached the next borrower");
    }
    assert!(dropped_in_flight > 0, "no statement was caught in flight");
    pool.close().await;
}

fn assign(run: RunId, objective_id: ObjectiveId) -> factory_domain::ObjectiveCommand {
    factory_domain::ObjectiveCommand::AssignObjective {
        objective_id,
        run_id: run,
        stage: "ba".into(),
        team: "business-analysis".into(),
        instructions: "business-analysis for stage ba".into(),
        max_iterations: 3,
        claimed_by: None,
    }
}

/// A unit of work that starts stage `ba` of the run and assigns its objective, uncommitted.
async fn start_and_assign(store: &Store, run: RunId, objective: ObjectiveId) -> factory_commands::store::Changes<'_> {
    let mut changes = store.changes();
    changes
        .execute_run(run, RunCommand::StartStage { stage: "ba".into(), team: "business-analysis".into(), objective_id: objective })
        .await
        .unwrap();
    changes.new_objective(objective, run);
    changes.execute_objective(objective, run, assign(run, objective)).await.unwrap();
    changes
}

#[tokio::test]
async fn a_unit_of_work_commits_commands_on_several_aggregates_in_one_transaction_in_the_order_staged() {
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    let run = RunId::new();
    store.execute_run(run, submit("Build a URL shortener")).await.unwrap();
    let objective = ObjectiveId::new();
    let mut changes = start_and_assign(&store, run, objective).await;
    // A refused command stages nothing and leaves the rest of the unit as it was.
    let refused = changes
        .execute_run(run, RunCommand::StartStage { stage: "ba".into(), team: "business-analysis".into(), objective_id: ObjectiveId::new() })
        .await
        .unwrap_err();
    assert!(matches!(refused, CommandError::Refused(RunError::StageAlreadyStarted(_))), "{refused}");
    assert_eq!(changes.run(run).await.unwrap().stages.len(), 1, "the unit's state has its staged events applied");
    assert_eq!(crate::support::store_count(&stack.pool).await, 1, "nothing is written before the commit");
    changes.commit().await.unwrap();

    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT aggregate_type, event_type, xid::text FROM events WHERE sequence > 0 ORDER BY position",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let kinds: Vec<(&str, &str)> = rows.iter().map(|(a, e, _)| (a.as_str(), e.as_str())).collect();
    assert_eq!(kinds, [("run", "RequirementSubmitted"), ("run", "StageStarted"), ("objective", "ObjectiveAssigned")]);
    assert_eq!(rows[1].2, rows[2].2, "one transaction");
    assert_ne!(rows[0].2, rows[1].2);
    assert!(audit::verify(&stack.pool).await.unwrap().broken.is_empty());
}

#[tokio::test]
async fn a_unit_of_work_that_meets_a_conflict_writes_none_of_its_events() {
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    let run = RunId::new();
    store.execute_run(run, submit("Build a URL shortener")).await.unwrap();
    let objective = ObjectiveId::new();
    let changes = start_and_assign(&store, run, objective).await;
    // Another process (a store with nothing remembered) writes the run first.
    let other = store_of_another_process(&stack).await;
    other
        .execute_run(run, RunCommand::StartStage { stage: "sa".into(), team: "solution-architecture".into(), objective_id: ObjectiveId::new() })
        .await
        .unwrap();
    let error = changes.commit().await.unwrap_err();
    assert!(matches!(error, factory_commands::store::CommitError::Conflict), "{error}");
    assert_eq!(sequences(&stack, &objective.to_string()).await, Vec::<i64>::new(), "the objective's event went with the run's");
    assert_eq!(crate::support::store_count(&stack.pool).await, 2);
    // Asked again, the unit is staged on fresh state and commits.
    let changes = start_and_assign(&store, run, objective).await;
    changes.commit().await.unwrap();
    assert_eq!(sequences(&stack, &run.to_string()).await, [1, 2, 3]);
    assert_eq!(sequences(&stack, &objective.to_string()).await, [1]);
}

#[tokio::test]
async fn a_unit_that_loses_to_a_commit_of_its_own_process_starts_again_from_the_winners_state() {
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    let run = RunId::new();
    store.execute_run(run, submit("Build a URL shortener")).await.unwrap();
    // Two units staged on the same remembered state; the first commits.
    let loser = start_and_assign(&store, run, ObjectiveId::new()).await;
    let mut winner = store.changes();
    winner
        .execute_run(run, RunCommand::StartStage { stage: "sa".into(), team: "solution-architecture".into(), objective_id: ObjectiveId::new() })
        .await
        .unwrap();
    winner.commit().await.unwrap();
    let error = loser.commit().await.unwrap_err();
    assert!(matches!(error, factory_commands::store::CommitError::Conflict), "{error}");
    // The loser's failure leaves the winner's state remembered, for the next attempt.
    let remembered = store.with_remembered_run(run, |r| r.stages.keys().cloned().collect::<Vec<_>>());
    assert_eq!(remembered, Some(vec!["sa".to_string()]));
    let objective = ObjectiveId::new();
    start_and_assign(&store, run, objective).await.commit().await.unwrap();
    assert_eq!(sequences(&stack, &run.to_string()).await, [1, 2, 3]);
}

async fn store_of_another_process(stack: &TestStack) -> Store {
    Store::new(stack.pool.clone(), Arc::new(SystemServices))
}

/// A submitted run and an assigned objective of it.
async fn assigned_objective(store: &Store) -> (RunId, ObjectiveId) {
    let run = RunId::new();
    store.execute_run(run, submit("Build a URL shortener")).await.unwrap();
    let objective = ObjectiveId::new();
    store.execute_objective(objective, run, assign(run, objective)).await.unwrap();
    (run, objective)
}

#[tokio::test]
async fn artifact_contents_are_stored_by_the_commit_that_names_them() {
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    let (run, objective) = assigned_objective(&store).await;
    let content = b"# Requirements\n".to_vec();
    let produced = factory_teams::worker::artifact_of("docs/requirements.md".into(), &content);
    let sha256 = produced.sha256.clone();
    let produced = factory_domain::ObjectiveCommand::ProduceArtifact(produced);
    let artifact = factory_commands::store::ArtifactContent { sha256: sha256.clone(), content: content.clone() };
    store.record_objective(objective, run, vec![produced.clone()], vec![artifact.clone()]).await.unwrap();
    // The same content again is left as stored.
    store.record_objective(objective, run, vec![produced], vec![artifact]).await.unwrap();
    let stored: Vec<(Vec<u8>, i64)> = sqlx::query_as("SELECT content, bytes FROM artifacts WHERE sha256 = $1")
        .bind(&sha256)
        .fetch_all(&stack.pool)
        .await
        .unwrap();
    assert_eq!(stored, [(content.clone(), content.len() as i64)]);
    assert_eq!(sequences(&stack, &objective.to_string()).await, [1, 2, 3]);
}

fn model_call(response: &str) -> factory_domain::ObjectiveCommand {
    factory_domain::ObjectiveCommand::RecordModelCall(factory_domain::objective::ModelCalled {
        alias: "factory/fast".into(),
        provider: "scripted".into(),
        model: "scripted-fast".into(),
        input_tokens: 10,
        output_tokens: 20,
        cost_usd: 0.25,
        latency_ms: 1,
        outcome: "ok".into(),
        failed_targets: Vec::new(),
        request_digest: "0".repeat(64),
        response: response.into(),
    })
}

#[tokio::test]
async fn artifact_contents_come_back_by_digest_from_memory_or_the_store() {
    let stack = TestStack::new().await;
    let writer = store(&stack).await;
    let (run, objective) = assigned_objective(&writer).await;
    let content = b"fn main() {}\n".to_vec();
    let produced = factory_teams::worker::artifact_of("src/main.rs".into(), &content);
    let sha256 = produced.sha256.clone();
    let artifact = factory_commands::store::ArtifactContent { sha256: sha256.clone(), content: content.clone() };
    writer
        .record_objective(objective, run, vec![factory_domain::ObjectiveCommand::ProduceArtifact(produced)], vec![artifact])
        .await
        .unwrap();
    let unknown = "f".repeat(64);
    // The process that stored it, and another that must read it.
    for store in [writer.clone(), Arc::new(store_of_another_process(&stack).await)] {
        let found = store.artifact_contents(&[sha256.as_str(), unknown.as_str()]).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[&sha256].as_slice(), content.as_slice());
    }
}

#[tokio::test]
async fn a_nul_in_an_events_text_is_stored_as_the_replacement_character_and_the_state_follows_it() {
    let stack = TestStack::new().await;
    let writer = store(&stack).await;
    let (run, objective) = assigned_objective(&writer).await;
    // U+0000 from a model's answer (jsonb refuses it, and with it the whole unit), next to
    // the six characters `\u0000` written as text, which are kept.
    let answer = "{\"content\":\"a\u{0}b \\u0000 c\u{0}\"}";
    writer.execute_objective_all(objective, run, vec![model_call(answer)]).await.unwrap();
    let stored: String = sqlx::query_scalar("SELECT payload->'ModelCalled'->>'response' FROM events WHERE event_type = 'ModelCalled'")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    let expected = "{\"content\":\"a\u{FFFD}b \\u0000 c\u{FFFD}\"}";
    assert_eq!(stored, expected);
    // A requirement too; the state the process remembers is the stored one, not the sent one.
    let other_run = RunId::new();
    writer.execute_run(other_run, submit("Build\u{0} it")).await.unwrap();
    let remembered = writer.remembered_run(other_run).expect("remembered after its commit");
    assert_eq!(remembered.requirement, "Build\u{FFFD} it");
    let loaded = store_of_another_process(&stack).await.load_run(other_run).await.unwrap();
    assert_eq!(loaded.requirement, remembered.requirement);
    assert!(audit::verify(&stack.pool).await.unwrap().broken.is_empty());
}

#[tokio::test]
async fn payloads_up_to_a_page_are_stored_uncompressed() {
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    let run = RunId::new();
    store.execute_run(run, submit("Build a URL shortener")).await.unwrap();
    let objective = ObjectiveId::new();
    let answer = "A model's answer, long enough to be compressed by default. ".repeat(70);
    store.execute_objective_all(objective, run, vec![assign(run, objective), model_call(&answer)]).await.unwrap();
    let (compression, size): (Option<String>, i32) = sqlx::query_as(
        "SELECT pg_column_compression(payload), pg_column_size(payload) FROM events WHERE event_type = 'ModelCalled'",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert!(size > 4000, "{size}");
    assert_eq!(compression, None, "{size} bytes stored as they are");
}

/// Submitted runs, remembered by `store`.
async fn submitted_runs(store: &Store, n: usize) -> Vec<RunId> {
    let mut runs = Vec::new();
    for _ in 0..n {
        let run = RunId::new();
        store.execute_run(run, submit("Build a URL shortener")).await.unwrap();
        runs.push(run);
    }
    runs
}

/// Every append waits (the table locked against inserts) until the transaction ends.
async fn hold_appends(stack: &TestStack) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut held = stack.admin.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE").execute(&mut *held).await.unwrap();
    held
}

/// A unit starting the run's first stage on what `store` remembers, committed.
async fn start_first_stage(store: Arc<Store>, run: RunId) -> Result<(), factory_commands::store::CommitError> {
    let mut unit = store.changes();
    unit.execute_run(run, RunCommand::StartStage { stage: "ba".into(), team: "business-analysis".into(), objective_id: ObjectiveId::new() })
        .await
        .unwrap();
    unit.commit().await
}

/// A unit per run (see [`start_first_stage`]), each polled once: with appends held, the
/// first four are then appending (each alone, waiting in the database), the rest queued.
async fn polled_once(
    store: &Arc<Store>,
    runs: &[RunId],
) -> Vec<std::pin::Pin<Box<impl Future<Output = Result<(), factory_commands::store::CommitError>> + use<>>>> {
    let mut units: Vec<_> = runs.iter().map(|&run| Box::pin(start_first_stage(store.clone(), run))).collect();
    for unit in &mut units {
        assert!(futures::poll!(unit.as_mut()).is_pending(), "appends are held");
    }
    units
}

/// A unit per run (a run twice, twice), each starting its first stage on what `store`
/// remembers, all committed at once: how many committed and how many met a conflict.
async fn start_all_at_once(stack: &TestStack, store: &Arc<Store>, runs: &[RunId]) -> (usize, usize) {
    // Appends held back while each unit is polled once: the first four start appending
    // alone (and wait in the database), the rest queue behind them. Then all end.
    let held = hold_appends(stack).await;
    let units = polled_once(store, runs).await;
    held.rollback().await.unwrap();
    let outcomes = futures::future::join_all(units).await;
    let (mut committed, mut conflicts) = (0, 0);
    for outcome in outcomes {
        match outcome {
            Ok(()) => committed += 1,
            Err(factory_commands::store::CommitError::Conflict) => conflicts += 1,
            Err(other) => panic!("{other}"),
        }
    }
    (committed, conflicts)
}

/// The transactions that appended the runs' second events.
async fn transactions_of(stack: &TestStack, runs: &[RunId]) -> i64 {
    let ids: Vec<String> = runs.iter().map(ToString::to_string).collect();
    sqlx::query_scalar("SELECT count(DISTINCT xid::text) FROM events WHERE aggregate_id = ANY($1) AND sequence = 2")
        .bind(&ids)
        .fetch_one(&stack.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_committed_at_the_same_moment_share_statements_and_one_that_loses_a_race_loses_it_alone() {
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    let runs = submitted_runs(&store, 40).await;
    // The contested run twice, both units on the same state.
    let mut units = runs.clone();
    units.push(runs[20]);
    let before = store.group_commit_stats();
    assert_eq!(start_all_at_once(&stack, &store, &units).await, (40, 1), "only one of the contested run's units lost");
    let after = store.group_commit_stats();
    // The loser was told without failing a shared statement; and 41 units took few statements.
    assert_eq!(after.refused_shared, before.refused_shared);
    assert!(after.shared > before.shared);
    assert!(after.statements - before.statements <= 10, "{before:?} -> {after:?}");
    for run in &runs {
        assert_eq!(sequences(&stack, &run.to_string()).await, [1, 2]);
    }
    let transactions = transactions_of(&stack, &runs).await;
    assert!(transactions <= 10, "{transactions} transactions for 40 units");
    let report = audit::verify(&stack.pool).await.unwrap();
    assert_eq!((report.events, report.broken.len()), (80, 0), "{:?}", report.broken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_that_lost_to_another_process_inside_a_shared_statement_is_told_so_and_the_others_commit() {
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    let runs = submitted_runs(&store, 40).await;
    // Another process starts a stage of one run first; this one still remembers it unstarted.
    let contested = runs[25];
    store_of_another_process(&stack)
        .await
        .execute_run(contested, RunCommand::StartStage { stage: "sa".into(), team: "solution-architecture".into(), objective_id: ObjectiveId::new() })
        .await
        .unwrap();
    let before = store.group_commit_stats();
    assert_eq!(start_all_at_once(&stack, &store, &runs).await, (39, 1));
    assert!(store.group_commit_stats().refused_shared > before.refused_shared, "the loser was in a shared statement");
    let transactions = transactions_of(&stack, &runs).await;
    assert!(transactions <= 20, "{transactions} transactions for 40 units: the refused statement was split, not undone unit by unit");
    let stages: Vec<String> = sqlx::query_scalar("SELECT payload->'StageStarted'->>'stage' FROM events WHERE aggregate_id = $1 AND sequence = 2")
        .bind(contested.to_string())
        .fetch_all(&stack.pool)
        .await
        .unwrap();
    assert_eq!(stages, ["sa"], "the other process's event stands");
    let report = audit::verify(&stack.pool).await.unwrap();
    assert_eq!((report.events, report.broken.len()), (80, 0), "{:?}", report.broken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_whose_caller_went_away_while_it_was_queued_is_not_appended() {
    use futures::FutureExt;
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    let runs = submitted_runs(&store, 5).await;
    let start = |run: RunId| start_first_stage(store.clone(), run);
    // Four units in flight, each appending alone (held in the database): every statement
    // place is taken.
    let held = hold_appends(&stack).await;
    let in_flight = polled_once(&store, &runs[..4]).await;
    let before = store.group_commit_stats();
    // A fifth queues; its caller gives up before any statement takes it.
    assert!(start(runs[4]).now_or_never().is_none());
    held.rollback().await.unwrap();
    for unit in in_flight {
        unit.await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(sequences(&stack, &runs[4].to_string()).await, [1], "the abandoned unit wrote nothing");
    assert_eq!(store.group_commit_stats().statements, before.statements, "and no statement was sent for it");
    // The store goes on appending.
    start(runs[4]).await.unwrap();
    assert_eq!(sequences(&stack, &runs[4].to_string()).await, [1, 2]);
}

/// A caller appending alone (in its own task) that goes away while its statement waits in
/// the database gives its statement place on: the units queued behind it are appended by a
/// task of their own, not left waiting for ever. (The abandoned statements were sent; the
/// database may still commit them, as it would any statement whose client stopped
/// listening: their outcome is unknown, and the store's chains stay whole either way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_went_away_mid_statement_hand_their_places_to_the_units_queued_behind_them() {
    let stack = TestStack::new().await;
    let store = store(&stack).await;
    let runs = submitted_runs(&store, 7).await;
    let start = |run: RunId| start_first_stage(store.clone(), run);
    let held = hold_appends(&stack).await;
    // Four in flight, each appending alone in its caller's task (held in the database).
    let in_flight = polled_once(&store, &runs[..4]).await;
    // Three queue behind them.
    let queued = polled_once(&store, &runs[4..]).await;
    // The four callers go away mid-statement.
    drop(in_flight);
    held.rollback().await.unwrap();
    let outcomes = tokio::time::timeout(std::time::Duration::from_secs(10), futures::future::join_all(queued))
        .await
        .expect("the queued units were appended, not left waiting");
    for outcome in outcomes {
        outcome.unwrap();
    }
    for run in &runs[4..] {
        assert_eq!(sequences(&stack, &run.to_string()).await, [1, 2]);
    }
    // Whatever became of the abandoned statements, every chain is whole.
    assert!(audit::verify(&stack.pool).await.unwrap().broken.is_empty());
    // And the store goes on: a new unit on a run nobody touched.
    let [fresh] = submitted_runs(&store, 1).await[..] else { unreachable!() };
    start(fresh).await.unwrap();
    assert_eq!(sequences(&stack, &fresh.to_string()).await, [1, 2]);
}

/// Every hash recomputed outside the database by the recipe of docs/architecture.md ("The
/// hash chain"): the recipe's query, the ten fields joined by 0x1F, the previous raw hash
/// prepended within an aggregate, SHA-256. Returns how many rows were checked.
async fn recompute_every_hash_outside_the_database(pool: &sqlx::PgPool) -> usize {
    use sha2::{Digest, Sha256};
    type Recipe = (String, String, i64, String, String, i64, i64, String, String, String, String);
    let rows: Vec<Recipe> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, position, \
                (extract(epoch FROM recorded_at) * 1000000)::bigint, coalesce(run_id::text, ''), \
                payload::text, metadata::text, encode(hash, 'hex') \
           FROM events ORDER BY aggregate_type, aggregate_id, sequence",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut previous: Option<(String, String, Vec<u8>)> = None;
    for row in &rows {
        let (aggregate_type, aggregate_id, sequence, event_type, event_version, position, micros, run_id, payload, metadata, stored) = row;
        let fields = [aggregate_type.clone(), aggregate_id.clone(), sequence.to_string(), event_type.clone(), event_version.clone(), position.to_string(), micros.to_string(), run_id.clone(), payload.clone(), metadata.clone()];
        let mut hasher = Sha256::new();
        if let Some((t, id, hash)) = &previous
            && (t, id) == (aggregate_type, aggregate_id)
        {
            hasher.update(hash);
        }
        hasher.update(fields.join("\u{1f}").as_bytes());
        let hash = hasher.finalize().to_vec();
        assert_eq!(&factory_commands::events::hex(&hash), stored, "{aggregate_type}/{aggregate_id} #{sequence}");
        previous = Some((aggregate_type.clone(), aggregate_id.clone(), hash));
    }
    rows.len()
}

#[tokio::test]
async fn chains_written_before_payloads_were_stored_as_text_hold_after_it_and_go_on() {
    // A store as the release before migration 0011 left it: payloads in jsonb.
    let stack = TestStack::migrated_to(Some(10)).await;
    let store = store(&stack).await;
    let run = run_with_two_stages(&store).await;
    let jsonb_text: String = sqlx::query_scalar("SELECT payload::text FROM events WHERE aggregate_id = $1 AND sequence = 2")
        .bind(run.to_string())
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert!(jsonb_text.contains("\": "), "jsonb's text form: {jsonb_text}");

    factory_commands::migrate(&stack.admin).await.unwrap();
    // Restarted on this release (docs/operations.md): a fresh pool, so that no statement
    // prepared for jsonb is reused. The same aggregate's chain goes on; a new one starts.
    let pool = factory_commands::connect(&stack.app_url(), 4).await.unwrap();
    let store = Arc::new(Store::new(pool.clone(), Arc::new(SystemServices)));
    store
        .execute_run(run, RunCommand::StartStage { stage: "be".into(), team: "backend".into(), objective_id: ObjectiveId::new() })
        .await
        .unwrap();
    run_with_two_stages(&store).await;

    let (old_text, new_text): (String, String) = sqlx::query_as(
        "SELECT (SELECT payload::text FROM events WHERE aggregate_id = $1 AND sequence = 2), \
                (SELECT payload::text FROM events WHERE aggregate_id = $1 AND sequence = 4)",
    )
    .bind(run.to_string())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(old_text, jsonb_text, "a row stored before keeps its text");
    assert!(new_text.starts_with("{\"StageStarted\":{"), "a row stored after keeps the writer's text: {new_text}");

    let report = audit::verify(&pool).await.unwrap();
    assert_eq!((report.events, report.aggregates, report.broken.len()), (7, 2, 0), "{:?}", report.broken);
    assert_eq!(recompute_every_hash_outside_the_database(&pool).await, 7);
}
