//! What a message on `FACTORY_EVENTS` carries: a JSON body and CloudEvents headers.

use async_nats::HeaderMap;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The JSON body of every published event (contract §4).
///
/// Read with `payload` and `metadata` as `serde_json::Value`s. The relay writes them as the
/// store's JSON text (`EventEnvelope<Box<RawValue>>`, see [`RawEnvelope`]): the same body,
/// without parsing the payload only to write it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope<P = serde_json::Value> {
    pub position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub run_id: Option<Uuid>,
    pub recorded_at: DateTime<Utc>,
    /// The event's own fields (the store keeps them tagged by event type; this is the inner object).
    pub payload: P,
    pub metadata: P,
    /// The hash-chain link, hex.
    pub hash: String,
}

/// An envelope whose payload and metadata are JSON text, as the relay publishes it.
pub type RawEnvelope = EventEnvelope<Box<serde_json::value::RawValue>>;

impl<P> EventEnvelope<P> {
    /// `Nats-Msg-Id` and CloudEvents `ce-id`: unique per event, stable across republishing.
    pub fn message_id(&self) -> String {
        format!("{}:{}:{}", self.aggregate_type, self.aggregate_id, self.sequence)
    }

    /// CloudEvents `ce-type`.
    pub fn cloud_event_type(&self) -> String {
        format!("factory.{}.{}.v{}", self.aggregate_type, self.event_type, self.event_version)
    }
}

/// An envelope as received from the stream, with the stream's own sequence number.
#[derive(Debug, Clone)]
pub struct PublishedEvent {
    pub stream_sequence: u64,
    pub subject: String,
    pub envelope: EventEnvelope,
}

/// CloudEvents 1.0 binary-mode attributes plus `Nats-Msg-Id`.
pub fn cloud_event_headers<P>(envelope: &EventEnvelope<P>) -> HeaderMap {
    let id = envelope.message_id();
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.as_str());
    headers.insert("ce-specversion", "1.0");
    headers.insert("ce-id", id.as_str());
    headers.insert("ce-type", envelope.cloud_event_type().as_str());
    headers.insert(
        "ce-source",
        format!("/factory/{}/{}", envelope.aggregate_type, envelope.aggregate_id).as_str(),
    );
    headers.insert(
        "ce-time",
        envelope.recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true).as_str(),
    );
    let subject = envelope
        .run_id
        .map(|r| r.to_string())
        .unwrap_or_else(|| envelope.aggregate_id.clone());
    headers.insert("ce-subject", subject.as_str());
    headers.insert("Content-Type", "application/json");
    headers
}
