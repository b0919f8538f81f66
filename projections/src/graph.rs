//! `rm_graph_nodes`, `rm_graph_edges`: the run graph. A TEAM node per stage, HANDOFF edges
//! along the pipeline's inputs (delivered when the receiving stage starts), CLARIFICATION and
//! ESCALATION edges to the HUMAN node when a team asks or is blocked.

use crate::{Problem, pipeline_stages, run_of, text};
use factory_nats::EventEnvelope;
use sqlx::PgConnection;

const HUMAN: &str = "human";

async fn node_status(db: &mut PgConnection, e: &EventEnvelope, stage: &str, status: &str) -> Result<(), Problem> {
    sqlx::query(
        "UPDATE rm_graph_nodes SET status = $3,
                ended_at = CASE WHEN $3 IN ('COMPLETED', 'SKIPPED') THEN $4 ELSE ended_at END
         WHERE run_id = $1 AND node_id = $2",
    )
    .bind(run_of(e)?)
    .bind(stage)
    .bind(status)
    .bind(e.recorded_at)
    .execute(&mut *db)
    .await?;
    Ok(())
}

async fn to_human(db: &mut PgConnection, e: &EventEnvelope, kind: &str, label: &str) -> Result<(), Problem> {
    let run = run_of(e)?;
    sqlx::query(
        "INSERT INTO rm_graph_nodes (run_id, node_id, kind, label, status) VALUES ($1, $2, 'HUMAN', 'human', 'WAITING')
         ON CONFLICT (run_id, node_id) DO UPDATE SET status = 'WAITING'",
    )
    .bind(run)
    .bind(HUMAN)
    .execute(&mut *db)
    .await?;
    let hop: i32 = sqlx::query_scalar(
        "SELECT count(*)::int + 1 FROM rm_graph_edges WHERE run_id = $1 AND source = $2 AND kind = $3",
    )
    .bind(run)
    .bind(text(e, "stage")?)
    .bind(kind)
    .fetch_one(&mut *db)
    .await?;
    sqlx::query(
        "INSERT INTO rm_graph_edges (run_id, edge_id, kind, source, target, label, state, hop, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'OPEN', $7, $8)",
    )
    .bind(run)
    .bind(format!("{}:{}", kind.to_lowercase(), e.position))
    .bind(kind)
    .bind(text(e, "stage")?)
    .bind(HUMAN)
    .bind(label)
    .bind(hop)
    .bind(e.recorded_at)
    .execute(&mut *db)
    .await?;
    Ok(())
}

pub(crate) async fn apply(db: &mut PgConnection, e: &EventEnvelope) -> Result<(), Problem> {
    if e.aggregate_type != "run" {
        return Ok(());
    }
    let run = run_of(e)?;
    match e.event_type.as_str() {
        "RequirementSubmitted" => {
            for (stage, team, inputs) in pipeline_stages(e)? {
                sqlx::query(
                    "INSERT INTO rm_graph_nodes (run_id, node_id, kind, team, label, status) VALUES ($1, $2, 'TEAM', $3, $2, 'PENDING')",
                )
                .bind(run)
                .bind(&stage)
                .bind(&team)
                .execute(&mut *db)
                .await?;
                for input in inputs {
                    sqlx::query(
                        "INSERT INTO rm_graph_edges (run_id, edge_id, kind, source, target, state, created_at)
                         VALUES ($1, $2, 'HANDOFF', $3, $4, 'PENDING', $5)",
                    )
                    .bind(run)
                    .bind(format!("handoff:{input}->{stage}"))
                    .bind(&input)
                    .bind(&stage)
                    .bind(e.recorded_at)
                    .execute(&mut *db)
                    .await?;
                }
            }
        }
        "StageStarted" => {
            let stage = text(e, "stage")?;
            sqlx::query(
                "UPDATE rm_graph_nodes SET status = 'RUNNING', iterations = iterations + 1, started_at = $3, ended_at = NULL
                 WHERE run_id = $1 AND node_id = $2",
            )
            .bind(run)
            .bind(stage)
            .bind(e.recorded_at)
            .execute(&mut *db)
            .await?;
            sqlx::query("UPDATE rm_graph_edges SET state = 'DELIVERED' WHERE run_id = $1 AND kind = 'HANDOFF' AND target = $2")
                .bind(run)
                .bind(stage)
                .execute(&mut *db)
                .await?;
        }
        "StageCompleted" => node_status(db, e, text(e, "stage")?, "COMPLETED").await?,
        "StageSkipped" => node_status(db, e, text(e, "stage")?, "SKIPPED").await?,
        "StagesReopened" => {
            let stages: Vec<String> = e.payload["stages"]
                .as_array()
                .ok_or_else(|| Problem::Invalid("`stages` is missing".into()))?
                .iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect();
            sqlx::query("UPDATE rm_graph_nodes SET status = 'PENDING', ended_at = NULL WHERE run_id = $1 AND node_id = ANY($2)")
                .bind(run)
                .bind(&stages)
                .execute(&mut *db)
                .await?;
            sqlx::query("UPDATE rm_graph_edges SET state = 'PENDING' WHERE run_id = $1 AND kind = 'HANDOFF' AND target = ANY($2)")
                .bind(run)
                .bind(&stages)
                .execute(&mut *db)
                .await?;
        }
        "RunNeedsClarification" => {
            node_status(db, e, text(e, "stage")?, "WAITING").await?;
            to_human(db, e, "CLARIFICATION", text(e, "question")?).await?;
        }
        "RunBlocked" => {
            node_status(db, e, text(e, "stage")?, "BLOCKED").await?;
            to_human(db, e, "ESCALATION", text(e, "reason")?).await?;
        }
        "RunCompleted" | "RunFailed" | "RunCancelled" => {
            // Nothing is waiting on a human any more.
            sqlx::query("UPDATE rm_graph_edges SET state = 'CLOSED' WHERE run_id = $1 AND state = 'OPEN'")
                .bind(run)
                .execute(&mut *db)
                .await?;
            sqlx::query("UPDATE rm_graph_nodes SET status = 'IDLE' WHERE run_id = $1 AND kind = 'HUMAN'")
                .bind(run)
                .execute(&mut *db)
                .await?;
        }
        _ => {}
    }
    Ok(())
}
