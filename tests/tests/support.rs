//! Helpers shared by the e2e tests.

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use factory_commands::relay::{Relay, RelayOptions};
use factory_nats::EventEnvelope;
use factory_testkit::TestStack;
use futures::StreamExt;
use std::time::Duration;
use uuid::Uuid;

/// Appends `count` single-event aggregates with plain SQL as the application role, the way
/// any writer must: the database fills in position, hash and the rest.
pub async fn append_raw(pool: &sqlx::PgPool, count: i64) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT 'test', gen_random_uuid()::text, 1, 'Tested', '1', \
                jsonb_build_object('Tested', jsonb_build_object('n', g)), \
                jsonb_build_object('run_id', $2::text) \
           FROM generate_series(1, $1) g",
    )
    .bind(count)
    .bind(Uuid::now_v7())
    .execute(pool)
    .await
    .expect("append events");
}

pub async fn store_count(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(pool).await.unwrap()
}

pub fn relay(stack: &TestStack, js: async_nats::jetstream::Context, batch_size: usize) -> Relay {
    Relay::new(
        stack.pool.clone(),
        js,
        stack.topology.clone(),
        RelayOptions { batch_size, poll_interval: Duration::from_millis(50), ..RelayOptions::default() },
    )
}

/// Every message of the test's events stream, in stream order, with its headers.
pub async fn read_stream(
    js: &async_nats::jetstream::Context,
    stack: &TestStack,
) -> Vec<(String, async_nats::HeaderMap, EventEnvelope)> {
    let mut stream = js.get_stream(&stack.topology.events_stream).await.unwrap();
    let total = stream.info().await.unwrap().state.messages;
    if total == 0 {
        return vec![];
    }
    let consumer = stream
        .create_consumer(OrderedConfig { deliver_policy: DeliverPolicy::All, ..Default::default() })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    while (out.len() as u64) < total {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("stream delivers")
            .unwrap()
            .unwrap();
        let envelope: EventEnvelope = serde_json::from_slice(&message.payload).expect("envelope JSON");
        out.push((message.subject.to_string(), message.headers.clone().unwrap_or_default(), envelope));
    }
    out
}

pub async fn stream_len(js: &async_nats::jetstream::Context, stack: &TestStack) -> u64 {
    match js.get_stream(&stack.topology.events_stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Exactly the store's events, each once, in position order.
pub async fn assert_stream_equals_store(js: &async_nats::jetstream::Context, stack: &TestStack) {
    let published = read_stream(js, stack).await;
    let stored: Vec<i64> = sqlx::query_scalar("SELECT position FROM events ORDER BY position")
        .fetch_all(&stack.pool)
        .await
        .unwrap();
    let positions: Vec<i64> = published.iter().map(|(_, _, e)| e.position).collect();
    assert_eq!(positions.len(), stored.len(), "stream and store hold different numbers of events");
    assert!(positions == stored, "stream order differs from store position order");
}

/// A bare COMPLETE answer, as a team gives it when it has nothing else to say.
pub fn completed_result() -> factory_domain::TaskResult {
    factory_domain::TaskResult::new(factory_domain::TaskStatus::Complete, "done")
}
