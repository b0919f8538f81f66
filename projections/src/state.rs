//! Time travel: a run as it was right after a given event, folded from the store by the same
//! statements the live projections use, into temporary tables (dropped at the end).

use crate::{Projection, ProjectionError};
use sqlx::PgPool;
use uuid::Uuid;

/// The run's read models (run, stages, graph, costs, activity) after `position` (`None`: now).
/// `Ok(None)` when the run has no events up to there.
pub async fn run_at(pool: &PgPool, run: Uuid, position: Option<i64>) -> Result<Option<serde_json::Value>, ProjectionError> {
    let events = factory_commands::events::run_events(pool, run, position).await?;
    if events.is_empty() {
        return Ok(None);
    }
    let mut tx = pool.begin().await?;
    for projection in Projection::ALL {
        for table in projection.tables() {
            // Temporary tables come first on the search path: the folds write here.
            sqlx::query(&format!("CREATE TEMP TABLE {table} (LIKE public.{table} INCLUDING ALL) ON COMMIT DROP"))
                .execute(&mut *tx)
                .await?;
        }
    }
    for event in &events {
        for projection in Projection::ALL {
            projection.apply(&mut tx, event).await?;
        }
    }
    let rows = |sql: &'static str| sqlx::query_scalar::<_, serde_json::Value>(sql);
    let state = serde_json::json!({
        "position": events.last().map(|e| e.position),
        "run": rows("SELECT to_jsonb(t) FROM pg_temp.rm_runs t").fetch_optional(&mut *tx).await?,
        "stages": rows("SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY ordinal), '[]') FROM pg_temp.rm_run_stages t").fetch_one(&mut *tx).await?,
        "nodes": rows("SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY node_id), '[]') FROM pg_temp.rm_graph_nodes t").fetch_one(&mut *tx).await?,
        "edges": rows("SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY edge_id), '[]') FROM pg_temp.rm_graph_edges t").fetch_one(&mut *tx).await?,
        "costs": rows("SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY team, alias, provider, model), '[]') FROM pg_temp.rm_costs t").fetch_one(&mut *tx).await?,
        "activity": rows("SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY position), '[]') FROM pg_temp.rm_activity t").fetch_one(&mut *tx).await?,
    });
    tx.rollback().await?;
    Ok(Some(state))
}
