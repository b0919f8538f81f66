//! Event evolution. Stored events are never rewritten: an event type that changes shape gets
//! a new version, and readers bring older payloads up to the current one here, on the way
//! in. Every reader of the store goes through this one function (the aggregates through
//! cqrs-es's upcaster hook, projections, time travel and replay through the store's
//! readers), so a v1 event in the store reads exactly like the v2 event it would be today.
//! The stream carries events as stored (their hashes must check): its consumers see the
//! version in `event_version` and the schemas of every version in `schema events`, and the
//! Factory's own stream consumers read only fields every version has.
//!
//! Versions so far:
//! - `run.RequirementSubmitted` v1 -> v2: adds `submitted_by` (who submitted it). v1 events
//!   predate the field; they read as submitted by [`UNKNOWN_SUBMITTER`].

use serde_json::Value;

/// `submitted_by` of a requirement recorded before the field existed.
pub const UNKNOWN_SUBMITTER: &str = "unknown";

/// The version each event type is written at now ("1" unless listed here).
pub fn current_version(aggregate_type: &str, event_type: &str) -> &'static str {
    match (aggregate_type, event_type) {
        ("run", "RequirementSubmitted") => "2",
        _ => crate::EVENT_VERSION_1,
    }
}

/// Why a stored payload could not be brought to the current version.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpcastError {
    #[error("{aggregate_type}.{event_type} has no version `{version}` (the newest is {current})")]
    UnknownVersion { aggregate_type: String, event_type: String, version: String, current: &'static str },
    #[error("{aggregate_type}.{event_type} v{version} is not a JSON object")]
    NotAnObject { aggregate_type: String, event_type: String, version: String },
}

/// Brings one event's payload (the inner object, not cqrs-es's `{"EventType": {..}}` tag)
/// from `version` to the current version of its type. Returns the version it now has.
pub fn upcast(aggregate_type: &str, event_type: &str, version: &str, payload: &mut Value) -> Result<&'static str, UpcastError> {
    let current = current_version(aggregate_type, event_type);
    if version == current {
        return Ok(current);
    }
    let unknown = || UpcastError::UnknownVersion {
        aggregate_type: aggregate_type.into(),
        event_type: event_type.into(),
        version: version.into(),
        current,
    };
    match (aggregate_type, event_type, version) {
        ("run", "RequirementSubmitted", "1") => {
            let Some(object) = payload.as_object_mut() else {
                return Err(UpcastError::NotAnObject {
                    aggregate_type: aggregate_type.into(),
                    event_type: event_type.into(),
                    version: version.into(),
                });
            };
            object.entry("submitted_by").or_insert_with(|| Value::String(UNKNOWN_SUBMITTER.into()));
            Ok("2")
        }
        _ => Err(unknown()),
    }
}

/// The event types that have had more than one version, with every version they had:
/// `schema events` publishes a schema for each.
pub fn versioned_types() -> &'static [(&'static str, &'static str, &'static [&'static str])] {
    &[("run", "RequirementSubmitted", &["1", "2"])]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_v1_requirement_reads_as_v2_submitted_by_nobody_known() {
        let mut payload = json!({"title": "t", "requirement": "r", "pipeline": "phase1", "auto_approve": false,
                                  "submitted_at": "2025-01-01T00:00:00Z"});
        assert_eq!(upcast("run", "RequirementSubmitted", "1", &mut payload), Ok("2"));
        assert_eq!(payload["submitted_by"], UNKNOWN_SUBMITTER);
        let event: crate::run::RequirementSubmitted = serde_json::from_value(payload).unwrap();
        assert_eq!(event.submitted_by, UNKNOWN_SUBMITTER);
    }

    #[test]
    fn current_events_pass_unchanged() {
        let mut payload = json!({"submitted_by": "ada"});
        assert_eq!(upcast("run", "RequirementSubmitted", "2", &mut payload), Ok("2"));
        assert_eq!(payload, json!({"submitted_by": "ada"}));
        let mut other = json!({"stage": "ba"});
        assert_eq!(upcast("run", "StageStarted", "1", &mut other), Ok("1"));
        assert_eq!(other, json!({"stage": "ba"}));
    }

    #[test]
    fn versions_that_never_existed_are_refused_by_name() {
        let mut payload = json!({});
        let error = upcast("run", "RequirementSubmitted", "7", &mut payload).unwrap_err();
        assert!(error.to_string().contains("no version `7`"), "{error}");
        assert!(upcast("run", "StageStarted", "2", &mut payload).is_err());
        assert!(upcast("run", "RequirementSubmitted", "1", &mut json!("text")).is_err());
    }
}
