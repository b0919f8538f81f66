//! The relay: order, the safe horizon, broker outages and crashes.

use crate::support::{append_raw, assert_stream_equals_store, read_stream, relay, store_count, stream_len};
use factory_commands::Store;
use factory_domain::{RunCommand, RunId, SystemServices};
use factory_testkit::{PrivateNats, TestStack, wait_for};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

async fn wait_published(stack: &TestStack, js: &async_nats::jetstream::Context, count: u64) {
    wait_for(&format!("{count} events in the stream"), DEADLINE, || async {
        (stream_len(js, stack).await >= count).then_some(())
    })
    .await;
}

#[tokio::test]
async fn publishes_every_event_in_order_with_the_contract_headers() {
    let stack = TestStack::new().await;
    let store = Store::new(stack.pool.clone(), Arc::new(SystemServices));
    let relay = relay(&stack, stack.js.clone(), 100).with_wake(store.committed());
    let task = tokio::spawn(relay.run());
    let run = RunId::new();
    store
        .execute_run(run, RunCommand::SubmitRequirement { title: Some("Shortener".into()), requirement: "Build a URL shortener".into(), pipeline: "phase1".into(), pipeline_definition: String::new(), auto_approve: true, submitted_by: "tester".into() })
        .await
        .unwrap();
    store.execute_run(run, RunCommand::CancelRun { reason: "test".into(), cancelled_by: "ada".into() }).await.unwrap();
    wait_published(&stack, &stack.js, 2).await;
    let published = read_stream(&stack.js, &stack).await;
    assert_eq!(published.len(), 2);
    let (subject, headers, envelope) = &published[0];
    let prefix = &stack.topology.events_prefix;
    assert_eq!(subject, &format!("{prefix}.{run}.run.RequirementSubmitted"));
    let header = |name: &str| headers.get(name).map(|v| v.to_string()).unwrap_or_default();
    assert_eq!(header("Nats-Msg-Id"), format!("run:{run}:1"));
    assert_eq!(header("ce-specversion"), "1.0");
    assert_eq!(header("ce-id"), format!("run:{run}:1"));
    assert_eq!(header("ce-type"), "factory.run.RequirementSubmitted.v2");
    assert_eq!(header("ce-source"), format!("/factory/run/{run}"));
    assert_eq!(header("ce-subject"), run.to_string());
    assert!(header("ce-time").ends_with('Z'));
    assert_eq!(envelope.sequence, 1);
    assert_eq!(envelope.run_id, Some(run.0));
    assert_eq!(envelope.payload["title"], "Shortener", "the body carries the event's own fields");
    assert_eq!(envelope.hash.len(), 64);
    assert_eq!(published[1].0, format!("{prefix}.{run}.run.RunCancelled"));
    assert!(published[1].2.position > envelope.position);
    // The checkpoint follows the acknowledgements.
    let last = published[1].2.position;
    wait_for("the checkpoint to reach the last event", DEADLINE, || async {
        let checkpoint: Option<i64> = sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE name = 'relay'")
            .fetch_optional(&stack.pool)
            .await
            .unwrap();
        (checkpoint == Some(last)).then_some(())
    })
    .await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_publishes_past_a_transaction_that_holds_a_lower_position() {
    let stack = TestStack::new().await;
    let task = tokio::spawn(relay(&stack, stack.js.clone(), 100).run());
    let insert = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
                  VALUES ('test', $1, 1, 'Tested', '1', '{}', '{}') RETURNING position";
    // T1 takes the lower position and stays open.
    let mut t1 = stack.pool.begin().await.unwrap();
    let p1: i64 = sqlx::query_scalar(insert).bind("t1").fetch_one(&mut *t1).await.unwrap();
    // T2 takes a higher position and commits first.
    let p2: i64 = sqlx::query_scalar(insert).bind("t2").fetch_one(&stack.pool).await.unwrap();
    assert!(p1 < p2);
    // The relay is woken by T2's commit and polls; it must publish nothing while T1 is open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(stream_len(&stack.js, &stack).await, 0, "published past an open transaction");
    t1.commit().await.unwrap();
    wait_published(&stack, &stack.js, 2).await;
    task.abort();
    let positions: Vec<i64> = read_stream(&stack.js, &stack).await.iter().map(|m| m.2.position).collect();
    assert_eq!(positions, vec![p1, p2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_leaves_a_gap_the_relay_passes() {
    let stack = TestStack::new().await;
    let task = tokio::spawn(relay(&stack, stack.js.clone(), 100).run());
    let mut aborted = stack.pool.begin().await.unwrap();
    append_raw(&stack.pool, 1).await;
    sqlx::query("INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) VALUES ('test', 'gone', 1, 'Tested', '1', '{}', '{}')")
        .execute(&mut *aborted)
        .await
        .unwrap();
    append_raw(&stack.pool, 1).await;
    aborted.rollback().await.unwrap();
    append_raw(&stack.pool, 1).await;
    wait_published(&stack, &stack.js, 3).await;
    task.abort();
    assert_stream_equals_store(&stack.js, &stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ten_second_broker_outage_loses_and_repeats_nothing() {
    let stack = TestStack::new().await;
    let mut nats = PrivateNats::start();
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(nats.url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let store = Arc::new(Store::new(stack.pool.clone(), Arc::new(SystemServices)));
    let relay = relay(&stack, js.clone(), 500).with_wake(store.committed());
    let task = tokio::spawn(relay.run());
    append_raw(&stack.pool, 100).await;
    wait_published(&stack, &js, 100).await;

    nats.stop();
    let started = std::time::Instant::now();
    // 5,000 events while the broker is down: commands from 8 writers plus raw appends.
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..250 {
                    let command = RunCommand::SubmitRequirement { title: None, requirement: "outage".into(), pipeline: "phase1".into(), pipeline_definition: String::new(), auto_approve: false, submitted_by: "tester".into() };
                    store.execute_run(RunId::new(), command).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    append_raw(&stack.pool, 3000).await;
    assert_eq!(store_count(&stack.pool).await, 5100);
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(started.elapsed())).await;
    nats.restart();

    wait_published(&stack, &js, 5100).await;
    // Give a confused relay the chance to publish more than it should.
    tokio::time::sleep(Duration::from_millis(500)).await;
    task.abort();
    assert_stream_equals_store(&js, &stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_mid_batch_resumes_without_loss_or_repeat() {
    let stack = TestStack::new().await;
    append_raw(&stack.pool, 20_000).await;
    let first = relay(&stack, stack.js.clone(), 500);
    let progress = first.progress();
    let task = tokio::spawn(first.run());
    wait_for("the relay to get going", DEADLINE, || async {
        (progress.published.load(Ordering::Relaxed) >= 3_000).then_some(())
    })
    .await;
    task.abort();
    let _ = task.await;
    let in_stream = stream_len(&stack.js, &stack).await;
    assert!(in_stream < 20_000, "killed too late to be mid-stream ({in_stream})");

    // As if it had died between PubAck and checkpoint: the checkpoint lags the stream.
    sqlx::query("UPDATE relay_checkpoints SET position = position - 1000, stream_sequence = stream_sequence - 1000")
        .execute(&stack.pool)
        .await
        .unwrap();

    let task = tokio::spawn(relay(&stack, stack.js.clone(), 500).run());
    wait_published(&stack, &stack.js, 20_000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    task.abort();
    assert_stream_equals_store(&stack.js, &stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_relay_is_active_at_a_time() {
    let stack = TestStack::new().await;
    let a = tokio::spawn(relay(&stack, stack.js.clone(), 50).run());
    let b = tokio::spawn(relay(&stack, stack.js.clone(), 50).run());
    for _ in 0..5 {
        append_raw(&stack.pool, 200).await;
    }
    wait_published(&stack, &stack.js, 1000).await;
    // Kill the active one (whichever it is): the standby takes over.
    a.abort();
    append_raw(&stack.pool, 500).await;
    wait_published(&stack, &stack.js, 1500).await;
    b.abort();
    assert_stream_equals_store(&stack.js, &stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_position_held_by_a_younger_transaction_is_waited_for() {
    // The trap of reading a snapshot's xmax as "the next id": T2 takes its id first, T1 then
    // takes a younger id and the lower position, T2 the higher position and commits. Now
    // nothing newer than T2 has completed, so T1 is invisible to a snapshot's xmin.
    let stack = TestStack::new().await;
    let insert = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
                  VALUES ('test', $1, 1, 'Tested', '1', '{}', '{}') RETURNING position";
    let mut t2 = stack.pool.begin().await.unwrap();
    let x2: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text").fetch_one(&mut *t2).await.unwrap();
    let mut t1 = stack.pool.begin().await.unwrap();
    let p1: i64 = sqlx::query_scalar(insert).bind("t1").fetch_one(&mut *t1).await.unwrap();
    let x1: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text").fetch_one(&mut *t1).await.unwrap();
    let p2: i64 = sqlx::query_scalar(insert).bind("t2").fetch_one(&mut *t2).await.unwrap();
    assert!(x2.parse::<i64>().unwrap() < x1.parse::<i64>().unwrap() && p1 < p2);
    t2.commit().await.unwrap();
    let task = tokio::spawn(relay(&stack, stack.js.clone(), 100).run());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(stream_len(&stack.js, &stack).await, 0, "published past an open transaction");
    t1.commit().await.unwrap();
    wait_published(&stack, &stack.js, 2).await;
    task.abort();
    let positions: Vec<i64> = read_stream(&stack.js, &stack).await.iter().map(|m| m.2.position).collect();
    assert_eq!(positions, vec![p1, p2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_is_woken_by_notify_long_before_its_backstop_poll() {
    let stack = TestStack::new().await;
    let relay = factory_commands::relay::Relay::new(
        stack.pool.clone(),
        stack.js.clone(),
        stack.topology.clone(),
        factory_commands::relay::RelayOptions {
            poll_interval: Duration::from_secs(30),
            ..Default::default()
        },
    );
    let task = tokio::spawn(relay.run());
    // Idle: it has asked writers to NOTIFY.
    wait_for("the relay to go idle and ask for NOTIFY", DEADLINE, || async {
        let requested: bool = sqlx::query_scalar("SELECT requested FROM relay_wake").fetch_one(&stack.pool).await.unwrap();
        requested.then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    append_raw(&stack.pool, 1).await;
    wait_published(&stack, &stack.js, 1).await;
    assert!(started.elapsed() < Duration::from_secs(5), "woken by the poll, not by NOTIFY");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_that_appends_nothing_does_not_hold_the_relay_back() {
    // Older than every append below and holding a transaction id: one in this database, one
    // in another database of the cluster. Neither appends an event, so neither is waited for.
    let stack = TestStack::new().await;
    let neighbour = TestStack::new().await;
    let mut here = stack.admin.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut *here).await.unwrap();
    let mut there = neighbour.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut *there).await.unwrap();
    let task = tokio::spawn(relay(&stack, stack.js.clone(), 100).run());
    append_raw(&stack.pool, 5).await;
    let published = std::time::Instant::now();
    wait_published(&stack, &stack.js, 5).await;
    assert!(published.elapsed() < Duration::from_secs(5), "took {:?}", published.elapsed());
    // An appender still is waited for: its position is lower than a committed one's.
    let mut appender = stack.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('test', 'open', 1, 'Tested', '1', '{}', '{}')",
    )
    .execute(&mut *appender)
    .await
    .unwrap();
    append_raw(&stack.pool, 1).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(stream_len(&stack.js, &stack).await, 5, "published past an open appender");
    appender.commit().await.unwrap();
    wait_published(&stack, &stack.js, 7).await;
    assert_stream_equals_store(&stack.js, &stack).await;
    here.rollback().await.unwrap();
    there.rollback().await.unwrap();
    task.abort();
}

#[tokio::test]
async fn the_stream_carries_each_event_as_the_store_holds_it() {
    let stack = TestStack::new().await;
    let store = Store::new(stack.pool.clone(), Arc::new(SystemServices));
    let relay = relay(&stack, stack.js.clone(), 100).with_wake(store.committed());
    let task = tokio::spawn(relay.run());
    let run = RunId::new();
    // Text that JSON escapes, numbers of every kind, a payload past a page (stored compressed).
    let requirement = format!("Build a \"URL\" shortener\\n\twith ünïcödé, 🚀 and {}", "long text ".repeat(1200));
    store
        .execute_run(run, RunCommand::SubmitRequirement { title: Some("Shortener".into()), requirement, pipeline: "phase1".into(), pipeline_definition: String::new(), auto_approve: true, submitted_by: "tester".into() })
        .await
        .unwrap();
    let objective = factory_domain::ObjectiveId::new();
    store
        .execute_objective_all(objective, run, vec![
            factory_domain::ObjectiveCommand::AssignObjective { objective_id: objective, run_id: run, stage: "qa".into(), team: "qa-engineering".into(), instructions: "test".into(), max_iterations: 3, claimed_by: None },
            factory_domain::ObjectiveCommand::RecordModelCall(factory_domain::objective::ModelCalled {
                alias: "factory/fast".into(), provider: "scripted".into(), model: "m".into(), input_tokens: u64::MAX, output_tokens: 0,
                cost_usd: 0.000_123_456_789, latency_ms: 7, outcome: "ok".into(), failed_targets: vec!["a:b".into()],
                request_digest: "0".repeat(64), response: "{\"content\": \"a\\u0000b\"}".into(),
            }),
        ])
        .await
        .unwrap();
    wait_published(&stack, &stack.js, 3).await;
    let published: Vec<_> = read_stream(&stack.js, &stack).await.into_iter().map(|(_, _, envelope)| envelope).collect();
    let stored = factory_commands::events::stored_range(&stack.pool, 0, i64::MAX, 100).await.unwrap();
    assert_eq!(published, stored, "what the stream carries, parsed, is what the store holds");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoints_skipped_flush_stays_with_its_own_transaction() {
    // Two pooled connections, one of which the relay's LISTEN keeps: every other statement
    // of the relay, the checkpoint included, and this test's check run on the same session.
    // (The test server runs with synchronous_commit off; these sessions set it on.)
    let stack = TestStack::new().await;
    let options: sqlx::postgres::PgConnectOptions = stack.app_url().parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.options([("synchronous_commit", "on")]))
        .await
        .unwrap();
    let relay = factory_commands::relay::Relay::new(
        pool.clone(),
        stack.js.clone(),
        stack.topology.clone(),
        factory_commands::relay::RelayOptions { poll_interval: Duration::from_millis(50), ..Default::default() },
    );
    let task = tokio::spawn(relay.run());
    let store = Store::new(stack.pool.clone(), Arc::new(SystemServices));
    let run = RunId::new();
    store
        .execute_run(run, RunCommand::SubmitRequirement { title: None, requirement: "Build a URL shortener".into(), pipeline: "phase1".into(), pipeline_definition: String::new(), auto_approve: true, submitted_by: "tester".into() })
        .await
        .unwrap();
    wait_for("the checkpoint past the event", DEADLINE, || async {
        let checkpoint: Option<i64> = sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE name = 'relay'")
            .fetch_optional(&pool)
            .await
            .unwrap();
        checkpoint.filter(|&p| p > 0)
    })
    .await;
    let setting: String = sqlx::query_scalar("SHOW synchronous_commit").fetch_one(&pool).await.unwrap();
    assert_eq!(setting, "on", "the session the checkpoint ran on commits as configured");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_close_together_wait_for_the_read_interval_and_one_after_a_quiet_spell_does_not() {
    let stack = TestStack::new().await;
    let store = Store::new(stack.pool.clone(), Arc::new(SystemServices));
    let interval = Duration::from_millis(300);
    // No backstop poll during the test: every look after the relay goes idle is one a
    // commit woke.
    let relay = factory_commands::relay::Relay::new(
        stack.pool.clone(),
        stack.js.clone(),
        stack.topology.clone(),
        factory_commands::relay::RelayOptions { read_interval: interval, poll_interval: Duration::from_secs(60), ..Default::default() },
    )
    .with_wake(store.committed());
    let task = tokio::spawn(relay.run());
    let submit = |run: RunId| {
        let store = &store;
        async move {
            store
                .execute_run(run, RunCommand::SubmitRequirement { title: None, requirement: "Build a URL shortener".into(), pipeline: "phase1".into(), pipeline_definition: String::new(), auto_approve: true, submitted_by: "tester".into() })
                .await
                .unwrap();
        }
    };
    // Until the stream holds `count` messages, polled often; the time it took.
    let published = |count: u64| {
        let stack = &stack;
        async move {
            let started = std::time::Instant::now();
            while stream_len(&stack.js, stack).await < count {
                assert!(started.elapsed() < DEADLINE, "{count} events were not published");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            started.elapsed()
        }
    };
    // Idle: past its quiet polls after start-up (8, one per interval at most), it looks
    // again only when woken. Its last look longer ago than the interval, the first commit
    // is looked at at once.
    tokio::time::sleep(interval * 13).await;
    let first_committed = std::time::Instant::now();
    submit(RunId::new()).await;
    let first = published(1).await;
    assert!(first < interval / 2, "a commit after a quiet spell waited {first:?}");
    // The next, right after: its look waits for the interval since the one that found the
    // first (which began after the first committed).
    submit(RunId::new()).await;
    submit(RunId::new()).await;
    published(3).await;
    let next = first_committed.elapsed();
    assert!(next >= interval - Duration::from_millis(50), "commits right after a look were read after {next:?}");
    assert_stream_equals_store(&stack.js, &stack).await;
    task.abort();
}
