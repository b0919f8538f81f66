//! `rm_runs`, `rm_run_stages`: the runs list and each run's detail.

use crate::{Problem, pipeline_stages, run_of, text};
use factory_nats::EventEnvelope;
use sqlx::PgConnection;

pub(crate) async fn apply(db: &mut PgConnection, e: &EventEnvelope) -> Result<(), Problem> {
    if e.aggregate_type != "run" {
        return Ok(());
    }
    let run = run_of(e)?;
    let at = e.recorded_at;
    let set_status = |status: &'static str, reason: Option<String>, ended: bool| {
        sqlx::query(
            "UPDATE rm_runs SET status = $2, status_reason = $3, ended_at = CASE WHEN $4 THEN $5 ELSE ended_at END
             WHERE run_id = $1",
        )
        .bind(run)
        .bind(status)
        .bind(reason)
        .bind(ended)
        .bind(at)
    };
    match e.event_type.as_str() {
        "RequirementSubmitted" => {
            let stages = pipeline_stages(e)?;
            sqlx::query(
                "INSERT INTO rm_runs (run_id, title, pipeline, status, auto_approve, submitted_at, updated_at,
                                      stages_total, last_position, submitted_by)
                 VALUES ($1, $2, $3, 'RUNNING', $4, $5, $5, $6, $7, $8)",
            )
            .bind(run)
            .bind(text(e, "title")?)
            .bind(text(e, "pipeline")?)
            .bind(e.payload["auto_approve"].as_bool().unwrap_or(false))
            .bind(at)
            .bind(stages.len() as i32)
            .bind(e.position)
            .bind(text(e, "submitted_by")?)
            .execute(&mut *db)
            .await?;
            for (ordinal, (stage, team, _)) in stages.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO rm_run_stages (run_id, stage, team, ordinal, status) VALUES ($1, $2, $3, $4, 'PENDING')",
                )
                .bind(run)
                .bind(stage)
                .bind(team)
                .bind(ordinal as i32)
                .execute(&mut *db)
                .await?;
            }
        }
        "RunForked" => {
            let from: uuid::Uuid = text(e, "forked_from")?.parse().map_err(|_| Problem::Invalid("bad forked_from".into()))?;
            sqlx::query("UPDATE rm_runs SET forked_from = $2, forked_at = $3 WHERE run_id = $1")
                .bind(run)
                .bind(from)
                .bind(e.payload["at_position"].as_i64())
                .execute(&mut *db)
                .await?;
        }
        "StageStarted" => {
            let objective: uuid::Uuid = text(e, "objective_id")?.parse().map_err(|_| Problem::Invalid("bad objective_id".into()))?;
            sqlx::query(
                "UPDATE rm_run_stages SET status = 'RUNNING', team = $3, iterations = iterations + 1, objective_id = $4,
                        started_at = $5, ended_at = NULL
                 WHERE run_id = $1 AND stage = $2",
            )
            .bind(run)
            .bind(text(e, "stage")?)
            .bind(text(e, "team")?)
            .bind(objective)
            .bind(at)
            .execute(&mut *db)
            .await?;
        }
        "StageCompleted" | "StageSkipped" => {
            let status = if e.event_type == "StageCompleted" { "COMPLETED" } else { "SKIPPED" };
            sqlx::query("UPDATE rm_run_stages SET status = $3, ended_at = $4 WHERE run_id = $1 AND stage = $2")
                .bind(run)
                .bind(text(e, "stage")?)
                .bind(status)
                .bind(at)
                .execute(&mut *db)
                .await?;
        }
        "StagesReopened" => {
            let stages: Vec<String> = e.payload["stages"]
                .as_array()
                .ok_or_else(|| Problem::Invalid("`stages` is missing".into()))?
                .iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect();
            sqlx::query(
                "UPDATE rm_run_stages SET status = 'PENDING', ended_at = NULL WHERE run_id = $1 AND stage = ANY($2)",
            )
            .bind(run)
            .bind(&stages)
            .execute(&mut *db)
            .await?;
        }
        "RunAwaitingReview" => {
            set_status("AWAITING_REVIEW", None, false).execute(&mut *db).await?;
        }
        "RunReviewed" => {
            let revise = e.payload["decision"] == "REVISE";
            sqlx::query(
                "UPDATE rm_runs SET reviewed_by = $2, revisions = revisions + $3::int,
                        status = CASE WHEN $3::int = 1 THEN 'RUNNING' ELSE status END
                 WHERE run_id = $1",
            )
            .bind(run)
            .bind(text(e, "reviewer")?)
            .bind(i32::from(revise))
            .execute(&mut *db)
            .await?;
        }
        "RunCompleted" => {
            set_status("COMPLETED", None, true).execute(&mut *db).await?;
        }
        "RunFailed" => {
            set_status("FAILED", Some(text(e, "reason")?.to_string()), true).execute(&mut *db).await?;
        }
        "RunCancelled" => {
            let reason = format!("{} (by {})", text(e, "reason")?, text(e, "cancelled_by")?);
            set_status("CANCELLED", Some(reason), true).execute(&mut *db).await?;
        }
        "RunBlocked" => {
            let reason = format!("{}: {}", text(e, "stage")?, text(e, "reason")?);
            set_status("BLOCKED", Some(reason), false).execute(&mut *db).await?;
        }
        "RunNeedsClarification" => {
            let reason = format!("{}: {}", text(e, "stage")?, text(e, "question")?);
            set_status("NEEDS_CLARIFICATION", Some(reason), false).execute(&mut *db).await?;
        }
        _ => {}
    }
    let touched = sqlx::query(
        "UPDATE rm_runs SET updated_at = $2, last_position = $3,
                stages_completed = (SELECT count(*) FROM rm_run_stages s WHERE s.run_id = $1 AND s.status = 'COMPLETED')
         WHERE run_id = $1",
    )
    .bind(run)
    .bind(at)
    .bind(e.position)
    .execute(&mut *db)
    .await?;
    if touched.rows_affected() == 0 {
        return Err(Problem::Invalid(format!("run {run} has no RequirementSubmitted before this event")));
    }
    Ok(())
}
