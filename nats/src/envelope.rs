//! What a message on `FACTORY_EVENTS` carries: a JSON body and CloudEvents headers.

use async_nats::HeaderMap;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The JSON body of every published event (contract §4).
///
/// Read with `payload` and `metadata` as `serde_json::Value`s. The relay writes them as the
/// store's JSON text ([`RawEnvelope`], [`EventEnvelope::to_body`]): the same body, without
/// parsing the payload only to write it again.
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
pub type RawEnvelope = EventEnvelope<JsonText>;

/// JSON text as the store gives it (valid JSON: the column's type checks it), kept as text: the
/// relay publishes it without parsing it, not even to check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonText(pub String);

impl EventEnvelope<JsonText> {
    /// The message body: what serialising the envelope with its payload and metadata parsed
    /// would give, field for field in the same order, with the payload and metadata written
    /// as the store's text.
    pub fn to_body(&self) -> Vec<u8> {
        /// `,"name":` (no comma before the first field) and the value as serde writes it.
        fn field<T: Serialize + ?Sized>(out: &mut Vec<u8>, name: &str, value: &T) {
            out.push(if out.is_empty() { b'{' } else { b',' });
            serde_json::to_writer(&mut *out, name).expect("strings serialise to memory");
            out.push(b':');
            serde_json::to_writer(out, value).expect("strings, numbers and times serialise to memory");
        }
        /// The same with the value's JSON text as it is.
        fn raw(out: &mut Vec<u8>, name: &str, text: &str) {
            out.push(b',');
            serde_json::to_writer(&mut *out, name).expect("strings serialise to memory");
            out.push(b':');
            out.extend_from_slice(text.as_bytes());
        }
        let mut out = Vec::with_capacity(self.payload.0.len() + self.metadata.0.len() + 384);
        field(&mut out, "position", &self.position);
        field(&mut out, "aggregate_type", &self.aggregate_type);
        field(&mut out, "aggregate_id", &self.aggregate_id);
        field(&mut out, "sequence", &self.sequence);
        field(&mut out, "event_type", &self.event_type);
        field(&mut out, "event_version", &self.event_version);
        field(&mut out, "run_id", &self.run_id);
        field(&mut out, "recorded_at", &self.recorded_at);
        raw(&mut out, "payload", &self.payload.0);
        raw(&mut out, "metadata", &self.metadata.0);
        field(&mut out, "hash", &self.hash);
        out.push(b'}');
        out
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope<P>(payload: P, metadata: P, run_id: Option<Uuid>) -> EventEnvelope<P> {
        EventEnvelope {
            position: 42,
            aggregate_type: "objective".into(),
            aggregate_id: "0193c0de-0000-7000-8000-000000000002".into(),
            sequence: 7,
            event_type: "ModelCalled".into(),
            event_version: "1".into(),
            run_id,
            recorded_at: "2026-12-01T18:30:00.123456Z".parse().unwrap(),
            payload,
            metadata,
            hash: "ab".repeat(32),
        }
    }

    #[test]
    fn the_relays_body_is_the_envelope_serialised_with_the_stores_text_kept_as_it_is() {
        let payload = serde_json::json!({"response": "say \"hi\"\n", "tokens": 12, "nested": {"a": [1, 2.5, null]}});
        let metadata = serde_json::json!({"run_id": "0193c0de-0000-7000-8000-000000000001"});
        for run_id in [None, Some(Uuid::parse_str("0193c0de-0000-7000-8000-000000000001").unwrap())] {
            let parsed = envelope(payload.clone(), metadata.clone(), run_id);
            // Compact text: byte for byte what serde writes for the parsed envelope.
            let compact = envelope(JsonText(payload.to_string()), JsonText(metadata.to_string()), run_id);
            assert_eq!(String::from_utf8(compact.to_body()).unwrap(), serde_json::to_string(&parsed).unwrap());
            // The store's own spacing is kept, and reads back as the same envelope.
            let spaced = envelope(JsonText(serde_json::to_string_pretty(&payload).unwrap()), JsonText("{\"run_id\": \"0193c0de-0000-7000-8000-000000000001\"}".into()), run_id);
            let body = spaced.to_body();
            assert!(String::from_utf8_lossy(&body).contains("\"run_id\": \"0193c0de"));
            assert_eq!(serde_json::from_slice::<EventEnvelope>(&body).unwrap(), parsed);
        }
    }
}
