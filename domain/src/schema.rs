//! JSON Schemas of every event payload, for `factory schema events` and external consumers.

use crate::{objective, run};
use schemars::{JsonSchema, Schema, schema_for};

/// One event type's published shape.
#[derive(Debug, Clone)]
pub struct EventSchema {
    pub aggregate_type: &'static str,
    pub event_type: &'static str,
    pub event_version: &'static str,
    pub schema: Schema,
}

fn entry<T: JsonSchema>(aggregate_type: &'static str, event_type: &'static str) -> EventSchema {
    EventSchema {
        aggregate_type,
        event_type,
        event_version: crate::upcast::current_version(aggregate_type, event_type),
        schema: schema_for!(T),
    }
}

/// Older shapes, kept so that consumers of stored events can still validate them. Each is
/// read through [`crate::upcast::upcast`] into the current shape.
mod superseded {
    use chrono::{DateTime, Utc};
    use schemars::JsonSchema;

    /// `RequirementSubmitted` v1: before `submitted_by`.
    #[derive(JsonSchema)]
    #[allow(dead_code)] // only its schema is used
    #[schemars(rename = "RequirementSubmitted")]
    pub struct RequirementSubmittedV1 {
        pub title: String,
        pub requirement: String,
        pub pipeline: String,
        #[serde(default)]
        pub pipeline_definition: String,
        pub auto_approve: bool,
        pub submitted_at: DateTime<Utc>,
    }
}

/// Every version of every event type: the current ones ([`event_schemas`]), then the
/// superseded versions that stored events may still have.
pub fn all_event_schemas() -> Vec<EventSchema> {
    let mut all = event_schemas();
    all.push(EventSchema {
        aggregate_type: "run",
        event_type: "RequirementSubmitted",
        event_version: "1",
        schema: schema_for!(superseded::RequirementSubmittedV1),
    });
    all
}

/// The current version of every event type of every aggregate, in a stable order.
pub fn event_schemas() -> Vec<EventSchema> {
    vec![
        entry::<run::RequirementSubmitted>("run", "RequirementSubmitted"),
        entry::<run::StageStarted>("run", "StageStarted"),
        entry::<run::StageCompleted>("run", "StageCompleted"),
        entry::<run::StageSkipped>("run", "StageSkipped"),
        entry::<run::RunAwaitingReview>("run", "RunAwaitingReview"),
        entry::<run::RunReviewed>("run", "RunReviewed"),
        entry::<run::RunCompleted>("run", "RunCompleted"),
        entry::<run::RunFailed>("run", "RunFailed"),
        entry::<run::RunCancelled>("run", "RunCancelled"),
        entry::<run::RunBlocked>("run", "RunBlocked"),
        entry::<run::RunNeedsClarification>("run", "RunNeedsClarification"),
        entry::<run::StagesReopened>("run", "StagesReopened"),
        entry::<run::RunForked>("run", "RunForked"),
        entry::<objective::ObjectiveAssigned>("objective", "ObjectiveAssigned"),
        entry::<objective::ModelCalled>("objective", "ModelCalled"),
        entry::<objective::TaskResultRecorded>("objective", "TaskResultRecorded"),
        entry::<objective::ArtifactProduced>("objective", "ArtifactProduced"),
        entry::<objective::ObjectiveCompleted>("objective", "ObjectiveCompleted"),
        entry::<objective::ObjectiveBlocked>("objective", "ObjectiveBlocked"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objective::*;
    use crate::run::*;
    use crate::{ObjectiveId, RunId, TaskResult, TaskStatus};
    use chrono::{TimeZone, Utc};
    use cqrs_es::{Aggregate, DomainEvent};
    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use serde_json::Value;
    use std::collections::BTreeSet;
    use std::fmt::Debug;
    use uuid::Uuid;

    fn objective_id() -> ObjectiveId {
        ObjectiveId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001))
    }

    fn task_result() -> TaskResult {
        TaskResult {
            status: TaskStatus::NeedsClarification,
            reasoning: "the requirement does not say who the users are".into(),
            blockers: vec!["no user list".into()],
            assumptions_made: vec!["single tenant".into()],
            verified_facts: vec!["postgres is available".into()],
            clarification_needed: Some("Who are the users?".into()),
            artifacts: vec!["docs/requirements.md".into()],
        }
    }

    /// One event of each run event type, in the order `event_schemas` lists them.
    fn run_events() -> Vec<RunEvent> {
        vec![
            RunEvent::RequirementSubmitted(RequirementSubmitted {
                title: "Todo app".into(),
                requirement: "Build a todo app\nwith tags — and “quotes”".into(),
                pipeline: "phase1".into(),
                pipeline_definition: String::new(),
                auto_approve: true,
                submitted_by: "tester".into(),
                submitted_at: Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap()
                    + chrono::Duration::nanoseconds(123_456_789),
            }),
            RunEvent::StageStarted(StageStarted {
                stage: "analysis".into(),
                team: "business-analysis".into(),
                objective_id: objective_id(),
            }),
            RunEvent::StageCompleted(StageCompleted { stage: "analysis".into(), objective_id: objective_id() }),
            RunEvent::StageSkipped(StageSkipped { stage: "devops".into(), reason: "nothing to deploy".into() }),
            RunEvent::RunAwaitingReview(RunAwaitingReview { completed_stages: vec!["analysis".into()] }),
            RunEvent::RunReviewed(RunReviewed {
                decision: ReviewDecision::Revise { feedback: "add dark mode".into() },
                reviewer: "ada".into(),
            }),
            RunEvent::RunCompleted(RunCompleted {}),
            RunEvent::RunFailed(RunFailed { reason: "budget exhausted".into() }),
            RunEvent::RunCancelled(RunCancelled { reason: "changed my mind".into(), cancelled_by: "ada".into() }),
            RunEvent::RunBlocked(RunBlocked { stage: "backend".into(), reason: "no database credentials".into() }),
            RunEvent::RunNeedsClarification(RunNeedsClarification {
                stage: "architecture".into(),
                question: "business-analysis: who are the users?".into(),
            }),
            RunEvent::StagesReopened(StagesReopened { stages: vec!["architecture".into()], revision: 1 }),
            RunEvent::RunForked(RunForked {
                forked_from: RunId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0003)),
                at_position: 42,
                stages: vec!["analysis".into()],
            }),
        ]
    }

    /// One event of each objective event type, in the order `event_schemas` lists them.
    fn objective_events() -> Vec<ObjectiveEvent> {
        vec![
            ObjectiveEvent::ObjectiveAssigned(ObjectiveAssigned {
                objective_id: objective_id(),
                run_id: RunId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0002)),
                stage: "analysis".into(),
                team: "business-analysis".into(),
                instructions: "Write the requirements list".into(),
                max_iterations: 3,
                claimed_by: None,
            }),
            ObjectiveEvent::ModelCalled(ModelCalled {
                alias: "factory/fast".into(),
                provider: "openai".into(),
                model: "gpt-4o-mini".into(),
                input_tokens: 1_234,
                output_tokens: 567,
                cost_usd: 0.000_421_5,
                latency_ms: 842,
                outcome: "ok".into(),
                failed_targets: vec!["anthropic:claude-3-5-haiku".into()],
                request_digest: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
                response: "{\"status\":\"COMPLETE\"}".into(),
            }),
            ObjectiveEvent::TaskResultRecorded(TaskResultRecorded {
                idempotency_key: "42:analysis".into(),
                iteration: 1,
                result: task_result(),
            }),
            ObjectiveEvent::ArtifactProduced(ArtifactProduced {
                path: "docs/requirements.md".into(),
                sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
                bytes: 2_048,
                media_type: "text/markdown".into(),
            }),
            ObjectiveEvent::ObjectiveCompleted(ObjectiveCompleted { iterations: 2 }),
            ObjectiveEvent::ObjectiveBlocked(ObjectiveBlocked { reason: "no database access".into() }),
        ]
    }

    /// (aggregate type, event type, event version, payload as stored) of each sample, in order.
    fn samples() -> Vec<(&'static str, String, String, Value)> {
        fn describe<A: Aggregate>(events: Vec<A::Event>) -> Vec<(&'static str, String, String, Value)> {
            events
                .into_iter()
                .map(|e| (A::TYPE, e.event_type(), e.event_version(), payload(&e)))
                .collect()
        }
        let mut all = describe::<Run>(run_events());
        all.extend(describe::<Objective>(objective_events()));
        all
    }

    /// The inner payload of an externally tagged event, checking the tag is the event type.
    fn payload<E: DomainEvent>(event: &E) -> Value {
        let Value::Object(outer) = serde_json::to_value(event).unwrap() else {
            panic!("{} is not stored as a JSON object", event.event_type());
        };
        assert_eq!(outer.len(), 1, "{outer:?}");
        let (tag, inner) = outer.into_iter().next().unwrap();
        assert_eq!(tag, event.event_type(), "the stored tag must be the event type");
        inner
    }

    #[test]
    fn every_version_that_ever_existed_has_a_schema() {
        let all = all_event_schemas();
        for (aggregate_type, event_type, versions) in crate::upcast::versioned_types() {
            for version in *versions {
                assert!(
                    all.iter().any(|s| s.aggregate_type == *aggregate_type && s.event_type == *event_type && s.event_version == *version),
                    "{aggregate_type}.{event_type} v{version} has no schema"
                );
            }
        }
        let v1 = all.iter().find(|s| s.event_type == "RequirementSubmitted" && s.event_version == "1").unwrap();
        assert!(v1.schema.get("properties").unwrap().get("submitted_by").is_none());
        assert_eq!(all.len(), 20);
    }

    #[test]
    fn there_is_one_schema_for_each_of_the_19_event_types() {
        let schemas = event_schemas();
        assert_eq!(schemas.len(), 19);
        let names: BTreeSet<_> = schemas.iter().map(|s| s.event_type).collect();
        assert_eq!(names.len(), 19, "event types repeat: {names:?}");
    }

    #[test]
    fn schema_names_and_versions_are_what_the_events_report() {
        let listed: Vec<_> =
            event_schemas().into_iter().map(|s| (s.aggregate_type, s.event_type.to_string(), s.event_version.to_string())).collect();
        let reported: Vec<_> = samples().into_iter().map(|(a, t, v, _)| (a, t, v)).collect();
        assert_eq!(listed, reported);
    }

    #[test]
    fn each_schema_describes_the_payload_of_its_own_type() {
        for (schema, (_, event_type, _, payload)) in event_schemas().into_iter().zip(samples()) {
            // schemars titles a schema with the Rust type's name: catches a schema entry that
            // pairs an event type's name with another type's shape.
            assert_eq!(schema.schema.get("title"), Some(&Value::from(event_type.clone())));

            let Value::Object(fields) = payload else { panic!("{event_type}: payload is not an object") };
            let mut declared: BTreeSet<String> = BTreeSet::new();
            let mut property_names = |schema: &Value| {
                if let Some(Value::Object(properties)) = schema.get("properties") {
                    declared.extend(properties.keys().cloned());
                }
            };
            property_names(schema.schema.as_value());
            // A flattened enum (RunReviewed's decision) puts its fields in `oneOf` branches.
            if let Some(Value::Array(branches)) = schema.schema.get("oneOf") {
                branches.iter().for_each(&mut property_names);
            }
            for field in fields.keys() {
                assert!(declared.contains(field), "{event_type}: `{field}` is published but not in the schema");
            }
            if let Some(Value::Array(required)) = schema.schema.get("required") {
                for field in required {
                    let field = field.as_str().unwrap();
                    assert!(fields.contains_key(field), "{event_type}: required `{field}` is not published");
                }
            }
        }
    }

    fn assert_round_trips<E: Serialize + DeserializeOwned + PartialEq + Debug>(event: &E) {
        let text = serde_json::to_string(event).unwrap();
        let from_text: E = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(&from_text, event, "{text}");
        // Consumers (the relay's readers, replay) work on parsed JSON values, not the text.
        let value = serde_json::to_value(event).unwrap();
        let from_value: E = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{value}: {e}"));
        assert_eq!(&from_value, event, "{value}");
    }

    #[test]
    fn every_run_event_round_trips_through_json() {
        let mut events = run_events();
        // The other shapes of the variants with more than one.
        events.push(RunEvent::RunReviewed(RunReviewed { decision: ReviewDecision::Approve, reviewer: "ada".into() }));
        events.push(RunEvent::RunAwaitingReview(RunAwaitingReview { completed_stages: vec![] }));
        for event in &events {
            assert_round_trips(event);
        }
    }

    #[test]
    fn every_objective_event_round_trips_through_json() {
        let mut events = objective_events();
        let bare = TaskResult::new(TaskStatus::Complete, "done");
        events.push(ObjectiveEvent::TaskResultRecorded(TaskResultRecorded {
            idempotency_key: "k".into(),
            iteration: u32::MAX,
            result: bare,
        }));
        for event in &events {
            assert_round_trips(event);
        }
    }

    #[test]
    fn a_review_is_published_with_its_decision_flattened_beside_the_reviewer() {
        // Consumers read `decision` and `feedback` at the top of the payload.
        let approve = RunEvent::RunReviewed(RunReviewed { decision: ReviewDecision::Approve, reviewer: "ada".into() });
        assert_eq!(payload(&approve), serde_json::json!({"decision": "APPROVE", "reviewer": "ada"}));
        let revise = RunEvent::RunReviewed(RunReviewed {
            decision: ReviewDecision::Revise { feedback: "more".into() },
            reviewer: "ada".into(),
        });
        assert_eq!(payload(&revise), serde_json::json!({"decision": "REVISE", "feedback": "more", "reviewer": "ada"}));
    }
}
