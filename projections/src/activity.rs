//! `rm_activity`: one human-readable line per event worth telling, by run and global.

use crate::Problem;
use factory_nats::EventEnvelope;
use sqlx::PgConnection;

/// The line an event becomes, if any.
pub(crate) fn describe(e: &EventEnvelope) -> Option<(&'static str, String)> {
    let p = &e.payload;
    let s = |field: &str| p[field].as_str().unwrap_or_default().to_string();
    let line = match (e.aggregate_type.as_str(), e.event_type.as_str()) {
        ("run", "RequirementSubmitted") => ("run", format!("Run submitted: \"{}\" (pipeline {})", s("title"), s("pipeline"))),
        ("run", "StageStarted") => ("stage", format!("{} started {}", s("team"), s("stage"))),
        ("run", "StageCompleted") => ("stage", format!("{} completed", s("stage"))),
        ("run", "StageSkipped") => ("stage", format!("{} skipped: {}", s("stage"), s("reason"))),
        ("run", "StagesReopened") => {
            let stages: Vec<&str> = p["stages"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
            ("review", format!("Revision {}: reopened {}", p["revision"], stages.join(", ")))
        }
        ("run", "RunForked") => {
            let stages: Vec<&str> = p["stages"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
            let kept = if stages.is_empty() { "no stage".to_string() } else { stages.join(", ") };
            ("run", format!("Forked from run {} at position {}, keeping {kept}", s("forked_from"), p["at_position"]))
        }
        ("run", "RunAwaitingReview") => ("review", "Waiting for a human review".to_string()),
        ("run", "RunReviewed") => ("review", format!("{} reviewed: {}", s("reviewer"), s("decision"))),
        ("run", "RunCompleted") => ("run", "Run completed".to_string()),
        ("run", "RunFailed") => ("run", format!("Run failed: {}", s("reason"))),
        ("run", "RunCancelled") => ("run", format!("Run cancelled by {}: {}", s("cancelled_by"), s("reason"))),
        ("run", "RunBlocked") => ("escalation", format!("{} is blocked: {}", s("stage"), s("reason"))),
        ("run", "RunNeedsClarification") => ("clarification", format!("{} asks: {}", s("stage"), s("question"))),
        ("objective", "TaskResultRecorded") => {
            let reasoning: String = p["result"]["reasoning"].as_str().unwrap_or_default().chars().take(200).collect();
            ("result", format!("Answer {} (iteration {}): {reasoning}", p["result"]["status"].as_str().unwrap_or("?"), p["iteration"]))
        }
        ("objective", "ArtifactProduced") => ("artifact", format!("Artifact {} ({} bytes)", s("path"), p["bytes"])),
        ("objective", "ModelCalled") if p["outcome"].as_str().is_some_and(|o| o != "ok") => (
            "model",
            format!("{} answered by {}:{} ({})", s("alias"), s("provider"), s("model"), s("outcome")),
        ),
        ("objective", "ObjectiveBlocked") => ("escalation", format!("Objective blocked: {}", s("reason"))),
        _ => return None,
    };
    Some(line)
}

pub(crate) async fn apply(db: &mut PgConnection, e: &EventEnvelope) -> Result<(), Problem> {
    let Some((kind, text)) = describe(e) else { return Ok(()) };
    sqlx::query("INSERT INTO rm_activity (position, run_id, at, kind, text) VALUES ($1, $2, $3, $4, $5)")
        .bind(e.position)
        .bind(e.run_id)
        .bind(e.recorded_at)
        .bind(kind)
        .bind(text)
        .execute(&mut *db)
        .await?;
    Ok(())
}
