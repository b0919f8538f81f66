//! Reading the event store directly: one run's events in order, ranges by position.
//! Used by the relay, audit and replay tooling; queries never read events otherwise.
//!
//! Readers get every event at the current version of its type (older payloads go through
//! `factory_domain::upcast`), with the hash of the row as stored. The relay alone reads
//! events exactly as stored ([`stored_range`]): the stream carries what the store holds.

use chrono::{DateTime, Utc};
use factory_nats::{EventEnvelope, JsonText, RawEnvelope};
use sqlx::postgres::PgRow;
use sqlx::{PgExecutor, Row};
use uuid::Uuid;

pub(crate) const ENVELOPE_COLUMNS: &str = "position, aggregate_type, aggregate_id, sequence, \
     event_type, event_version, run_id, recorded_at, payload, metadata, hash";

/// The store keeps cqrs-es's externally tagged form `{"EventType": {..}}`; readers get the
/// inner object.
pub(crate) fn untag(event_type: &str, payload: serde_json::Value) -> serde_json::Value {
    match payload {
        serde_json::Value::Object(mut map) if map.len() == 1 && map.contains_key(event_type) => {
            map.remove(event_type).unwrap_or_default()
        }
        other => other,
    }
}

/// [`untag`] on JSON text: the inner value's text, sliced out of the stored text without
/// building it (the relay's read). Whatever is not a one-key object keyed by the event type
/// comes back as stored, byte for byte.
pub(crate) fn untag_text(event_type: &str, payload: String) -> String {
    // Keys as `String` (unescaped), values borrowed: one pass over the text, no tree.
    match serde_json::from_str::<std::collections::BTreeMap<String, &serde_json::value::RawValue>>(&payload) {
        Ok(map) if map.len() == 1 => match map.get(event_type) {
            Some(inner) => inner.get().to_owned(),
            None => payload,
        },
        _ => payload,
    }
}

pub(crate) fn envelope_from_row(row: &PgRow) -> Result<EventEnvelope, sqlx::Error> {
    let event_type: String = row.try_get("event_type")?;
    let payload: serde_json::Value = row.try_get("payload")?;
    let hash: Vec<u8> = row.try_get("hash")?;
    Ok(EventEnvelope {
        position: row.try_get("position")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        payload: untag(&event_type, payload),
        event_type,
        event_version: row.try_get("event_version")?,
        run_id: row.try_get::<Option<Uuid>, _>("run_id")?,
        recorded_at: row.try_get::<DateTime<Utc>, _>("recorded_at")?,
        metadata: row.try_get("metadata")?,
        hash: hex(&hash),
    })
}

/// Brings a stored event to the current version of its type (see `factory_domain::upcast`).
pub fn upcast(envelope: &mut EventEnvelope) -> Result<(), factory_domain::upcast::UpcastError> {
    let version = factory_domain::upcast::upcast(
        &envelope.aggregate_type,
        &envelope.event_type,
        &envelope.event_version,
        &mut envelope.payload,
    )?;
    if envelope.event_version != version {
        envelope.event_version = version.to_string();
    }
    Ok(())
}

fn upcast_row(row: &PgRow) -> Result<EventEnvelope, sqlx::Error> {
    let mut envelope = envelope_from_row(row)?;
    upcast(&mut envelope).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Ok(envelope)
}

/// An aggregate as these events (its own, in order) make it: for readers that already hold
/// a run's events and need one of its aggregates without another query.
pub fn fold<'a, A: cqrs_es::Aggregate>(events: impl IntoIterator<Item = &'a EventEnvelope>) -> Result<A, serde_json::Error> {
    let mut aggregate = A::default();
    for e in events {
        let tagged = serde_json::json!({ e.event_type.clone(): e.payload.clone() });
        aggregate.apply(serde_json::from_value(tagged)?);
    }
    Ok(aggregate)
}

/// Lower-case hex, two digits per byte.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        text.push(DIGITS[usize::from(b >> 4)] as char);
        text.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    text
}

/// Every event of one run, in position order. Empty when the run does not exist.
pub async fn run_events<'e>(
    db: impl PgExecutor<'e>,
    run_id: Uuid,
    up_to: Option<i64>,
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    let sql = format!(
        "SELECT {ENVELOPE_COLUMNS} FROM events WHERE run_id = $1 AND position <= $2 ORDER BY position"
    );
    sqlx::query(&sql)
        .bind(run_id)
        .bind(up_to.unwrap_or(i64::MAX))
        .fetch_all(db)
        .await?
        .iter()
        .map(upcast_row)
        .collect()
}

/// Events with `after < position <= up_to`, in order, at most `limit`, at their current versions.
pub async fn range<'e>(
    db: impl PgExecutor<'e>,
    after: i64,
    up_to: i64,
    limit: i64,
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    let mut events = stored_range(db, after, up_to, limit).await?;
    for envelope in &mut events {
        upcast(envelope).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    }
    Ok(events)
}

/// As [`stored_range`], with payload and metadata as the store's JSON text (the payload
/// untagged by [`untag_text`]), for the relay to publish as text, never built into values.
pub async fn stored_range_raw<'e>(
    db: impl PgExecutor<'e>,
    after: i64,
    up_to: i64,
    limit: i64,
) -> Result<Vec<RawEnvelope>, sqlx::Error> {
    const SQL: &str = "SELECT position, aggregate_type, aggregate_id, sequence, event_type, event_version, \
            run_id, recorded_at, hash, metadata::text AS metadata, \
            payload::text AS payload \
       FROM events WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3";
    sqlx::query(SQL)
        .bind(after)
        .bind(up_to)
        .bind(limit)
        .fetch_all(db)
        .await?
        .iter()
        .map(|row| {
            let hash: Vec<u8> = row.try_get("hash")?;
            let event_type: String = row.try_get("event_type")?;
            Ok(RawEnvelope {
                position: row.try_get("position")?,
                aggregate_type: row.try_get("aggregate_type")?,
                aggregate_id: row.try_get("aggregate_id")?,
                sequence: row.try_get("sequence")?,
                payload: JsonText(untag_text(&event_type, row.try_get("payload")?)),
                event_type,
                event_version: row.try_get("event_version")?,
                run_id: row.try_get::<Option<Uuid>, _>("run_id")?,
                recorded_at: row.try_get::<DateTime<Utc>, _>("recorded_at")?,
                metadata: JsonText(row.try_get("metadata")?),
                hash: hex(&hash),
            })
        })
        .collect()
}

/// Events with `after < position <= up_to`, in order, at most `limit`, exactly as stored
/// (for the relay: the stream carries what the store holds, hashes included).
pub async fn stored_range<'e>(
    db: impl PgExecutor<'e>,
    after: i64,
    up_to: i64,
    limit: i64,
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    let sql = format!(
        "SELECT {ENVELOPE_COLUMNS} FROM events WHERE position > $1 AND position <= $2 \
         ORDER BY position LIMIT $3"
    );
    sqlx::query(&sql)
        .bind(after)
        .bind(up_to)
        .bind(limit)
        .fetch_all(db)
        .await?
        .iter()
        .map(envelope_from_row)
        .collect()
}

/// A position below which every event is settled (committed or rolled back): an event at or
/// below it that is not visible now never will be. Waits for the transactions that were
/// running when it was read that append events, as the relay's horizon does. Call it on a
/// connection whose transaction has appended no event, or it waits for itself.
pub async fn settled_position(pool: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    let (drawn, bound, mut xmin): (i64, i64, i64) =
        sqlx::query_as("SELECT last_position, bound, xmin FROM events_horizon()").fetch_one(pool).await?;
    while xmin < bound {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        xmin = sqlx::query_scalar("SELECT events_oldest_appender($1)").bind(bound).fetch_one(pool).await?;
    }
    Ok(drawn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untag_takes_the_inner_object_only_when_tagged_by_the_event_type() {
        let tagged = serde_json::json!({"StageStarted": {"stage": "ba"}});
        assert_eq!(untag("StageStarted", tagged), serde_json::json!({"stage": "ba"}));
        let other = serde_json::json!({"Other": {"stage": "ba"}});
        assert_eq!(untag("StageStarted", other.clone()), other);
    }

    #[test]
    fn untag_text_answers_as_untag_does() {
        let cases = [
            ("StageStarted", r#"{"StageStarted":{"stage":"ba","n":[1,2]}}"#),
            ("StageStarted", r#"{"StageStarted": {"stage": "ba"}}"#),
            ("StageStarted", r#"{"StageStarted":{"stage":"ba"},"other":1}"#),
            ("StageStarted", r#"{"Other":{"stage":"ba"}}"#),
            ("StageStarted", r#"{"StageStarted":{"stage":"ba"}}"#),
            ("StageStarted", r#"{"StageStarted":"text"}"#),
            ("StageStarted", r#"[1,2]"#),
            ("StageStarted", r#""text""#),
            ("StageStarted", r#"{}"#),
        ];
        for (event_type, text) in cases {
            let by_value = untag(event_type, serde_json::from_str(text).unwrap());
            let by_text: serde_json::Value = serde_json::from_str(&untag_text(event_type, text.to_string())).unwrap();
            assert_eq!(by_text, by_value, "{text}");
        }
        // Sliced or kept as stored, not rewritten.
        assert_eq!(untag_text("A", r#"{"A": {"b": 1.50}}"#.into()), r#"{"b": 1.50}"#);
        assert_eq!(untag_text("A", r#"[1.50, 2]"#.into()), r#"[1.50, 2]"#);
        assert_eq!(untag_text("A", r#"{"B": 1.50}"#.into()), r#"{"B": 1.50}"#);
    }

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
    }
}
