//! Verifying the event store's hash chains.
//!
//! Each event's hash is sha256(previous hash of the same aggregate || canonical bytes),
//! computed by the database on insert. Verification recomputes every link from the stored
//! columns with the same function and checks that sequences have no gaps: a changed
//! payload, a changed hash or a removed event breaks the chain at a named place.

use futures::TryStreamExt;
use sqlx::{PgPool, Row};

/// The first place a chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenLink {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub position: i64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditReport {
    pub events: u64,
    pub aggregates: u64,
    /// In position order; empty when every chain is intact.
    pub broken: Vec<BrokenLink>,
}

const VERIFY_SQL: &str = r#"
SELECT aggregate_type, aggregate_id, sequence, position, hash,
       sha256(coalesce(lag(hash) OVER w, ''::bytea) || event_canonical_bytes(
           aggregate_type, aggregate_id, sequence, event_type, event_version, payload,
           metadata, position, recorded_at, run_id)) AS expected,
       lag(sequence) OVER w AS previous_sequence
  FROM events
WINDOW w AS (PARTITION BY aggregate_type, aggregate_id ORDER BY sequence)
"#;

/// Checks every chain. Reads the whole store once, streaming.
pub async fn verify(pool: &PgPool) -> Result<AuditReport, sqlx::Error> {
    let mut report = AuditReport::default();
    let mut rows = sqlx::query(VERIFY_SQL).fetch(pool);
    while let Some(row) = rows.try_next().await? {
        report.events += 1;
        let sequence: i64 = row.try_get("sequence")?;
        let previous: Option<i64> = row.try_get("previous_sequence")?;
        if previous.is_none() {
            report.aggregates += 1;
        }
        let stored: Vec<u8> = row.try_get("hash")?;
        let expected: Vec<u8> = row.try_get("expected")?;
        let expected_previous = sequence - 1;
        let reason = if previous.unwrap_or(0) != expected_previous {
            Some(format!(
                "sequence gap: previous stored event is {}, expected {expected_previous}",
                previous.unwrap_or(0)
            ))
        } else if stored != expected {
            Some(format!(
                "hash mismatch: stored {}, recomputed {}",
                crate::events::hex(&stored),
                crate::events::hex(&expected)
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            report.broken.push(BrokenLink {
                aggregate_type: row.try_get("aggregate_type")?,
                aggregate_id: row.try_get("aggregate_id")?,
                sequence,
                position: row.try_get("position")?,
                reason,
            });
        }
    }
    report.broken.sort_by_key(|b| b.position);
    Ok(report)
}
