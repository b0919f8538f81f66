//! Event evolution: `RequirementSubmitted` v1 (before `submitted_by`) stored as it was
//! written then, read at v2 by every reader: the aggregate, the store's readers, the
//! read models; the stream carries it as stored.

use factory_commands::Store;
use factory_domain::upcast::UNKNOWN_SUBMITTER;
use factory_domain::{RunId, RunStatus, SystemServices};
use factory_projections::Projection;
use factory_testkit::TestStack;
use std::sync::Arc;

/// A v1 event, written as the v1 code wrote it (cqrs-es's tagged payload, version "1").
async fn store_v1_requirement(stack: &TestStack, run: RunId) {
    let payload = serde_json::json!({"RequirementSubmitted": {
        "title": "Old run", "requirement": "Build a URL shortener", "pipeline": "phase1",
        "pipeline_definition": "", "auto_approve": false, "submitted_at": "2026-01-02T03:04:05Z"}});
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('run', $1, 1, 'RequirementSubmitted', '1', $2, $3)",
    )
    .bind(run.to_string())
    .bind(payload)
    .bind(serde_json::json!({"run_id": run.to_string()}))
    .execute(&stack.pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stored_v1_event_reads_as_v2_everywhere_and_is_published_as_stored() {
    let stack = TestStack::new().await;
    let run = RunId::new();
    store_v1_requirement(&stack, run).await;

    // The aggregate loads it (cqrs-es's upcaster hook) and takes commands after it.
    let store = Store::new(stack.pool.clone(), Arc::new(SystemServices));
    let loaded = store.load_run(run).await.unwrap();
    assert_eq!(loaded.status, RunStatus::Running);
    assert_eq!(loaded.title, "Old run");
    let command = factory_domain::RunCommand::CancelRun { reason: "old".into(), cancelled_by: "ada".into() };
    store.execute_run(run, command).await.unwrap();

    // The store's readers give the current version, with the hash of the row as stored.
    let events = factory_commands::events::run_events(&stack.pool, run.0, None).await.unwrap();
    assert_eq!(events[0].event_version, "2");
    assert_eq!(events[0].payload["submitted_by"], UNKNOWN_SUBMITTER);
    assert!(factory_commands::audit::verify(&stack.pool).await.unwrap().broken.is_empty(), "the chain is intact");

    // The read models fold it.
    factory_projections::rebuild::rebuild(&stack.admin, Projection::Runs, |_, _, _| {}).await.unwrap();
    let (title, status, by): (String, String, String) =
        sqlx::query_as("SELECT title, status, submitted_by FROM rm_runs WHERE run_id = $1").bind(run.0).fetch_one(&stack.pool).await.unwrap();
    assert_eq!((title.as_str(), status.as_str(), by.as_str()), ("Old run", "CANCELLED", UNKNOWN_SUBMITTER));

    // The stream carries what the store holds: version 1, as stored.
    let stored = factory_commands::events::stored_range(&stack.pool, 0, i64::MAX, 10).await.unwrap();
    assert_eq!(stored[0].event_version, "1");
    assert!(stored[0].payload.get("submitted_by").is_none());

    // A new submission is written at v2.
    let fresh = RunId::new();
    let submit = factory_domain::RunCommand::SubmitRequirement {
        title: None,
        requirement: "Build a todo app".into(),
        pipeline: "phase1".into(),
        pipeline_definition: String::new(),
        auto_approve: false,
        submitted_by: "ada".into(),
    };
    store.execute_run(fresh, submit).await.unwrap();
    let version: String = sqlx::query_scalar("SELECT event_version FROM events WHERE aggregate_id = $1 AND sequence = 1")
        .bind(fresh.to_string())
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(version, "2");
}
