//! `rm_costs`: model calls summed per run, team, alias, provider and model.

use crate::{Problem, run_of, text};
use factory_nats::EventEnvelope;
use sqlx::PgConnection;

pub(crate) async fn apply(db: &mut PgConnection, e: &EventEnvelope) -> Result<(), Problem> {
    if e.aggregate_type != "objective" {
        return Ok(());
    }
    let objective: uuid::Uuid = e.aggregate_id.parse().map_err(|_| Problem::Invalid("bad objective id".into()))?;
    match e.event_type.as_str() {
        "ObjectiveAssigned" => {
            sqlx::query("INSERT INTO rm_cost_objectives (objective_id, run_id, team) VALUES ($1, $2, $3)")
                .bind(objective)
                .bind(run_of(e)?)
                .bind(text(e, "team")?)
                .execute(&mut *db)
                .await?;
        }
        "ModelCalled" => {
            let team: Option<String> = sqlx::query_scalar("SELECT team FROM rm_cost_objectives WHERE objective_id = $1")
                .bind(objective)
                .fetch_optional(&mut *db)
                .await?;
            let team = team.ok_or_else(|| Problem::Invalid(format!("objective {objective} was never assigned")))?;
            let outcome = e.payload["outcome"].as_str().unwrap_or("ok");
            sqlx::query(
                "INSERT INTO rm_costs (run_id, team, alias, provider, model, calls, input_tokens, output_tokens, cost_usd,
                                       fallbacks, downgrades)
                 VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8, $9, $10)
                 ON CONFLICT (run_id, team, alias, provider, model) DO UPDATE SET
                    calls = rm_costs.calls + 1,
                    input_tokens = rm_costs.input_tokens + EXCLUDED.input_tokens,
                    output_tokens = rm_costs.output_tokens + EXCLUDED.output_tokens,
                    cost_usd = rm_costs.cost_usd + EXCLUDED.cost_usd,
                    fallbacks = rm_costs.fallbacks + EXCLUDED.fallbacks,
                    downgrades = rm_costs.downgrades + EXCLUDED.downgrades",
            )
            .bind(run_of(e)?)
            .bind(team)
            .bind(text(e, "alias")?)
            .bind(text(e, "provider")?)
            .bind(text(e, "model")?)
            .bind(e.payload["input_tokens"].as_i64().unwrap_or(0))
            .bind(e.payload["output_tokens"].as_i64().unwrap_or(0))
            .bind(e.payload["cost_usd"].as_f64().unwrap_or(0.0))
            .bind(i64::from(outcome.contains("fallback")))
            .bind(i64::from(outcome.contains("downgraded")))
            .execute(&mut *db)
            .await?;
        }
        _ => {}
    }
    Ok(())
}
