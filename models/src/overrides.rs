//! Chains changed at run time, kept in PostgreSQL (`model_routing`, with every change in
//! `model_routing_changes`). Every router reads them on start and then every few seconds, so
//! a change reaches all workers without a restart.

use crate::routing::{RoutingError, Target, parse_chain};
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum OverrideError {
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error("the routing table could not be read or written")]
    Database(#[from] sqlx::Error),
    #[error("stored routing for {alias} is invalid: {source}")]
    Stored { alias: String, source: RoutingError },
}

/// How often routers re-read the table.
pub const REFRESH: Duration = Duration::from_secs(2);

pub async fn load(pool: &PgPool) -> Result<BTreeMap<String, Vec<Target>>, OverrideError> {
    let rows: Vec<(String, Vec<String>)> = sqlx::query_as("SELECT alias, targets FROM model_routing ORDER BY alias")
        .fetch_all(pool)
        .await?;
    rows.into_iter()
        .map(|(alias, targets)| {
            let chain = parse_chain(&alias, &targets).map_err(|source| OverrideError::Stored { alias: alias.clone(), source })?;
            Ok((alias, chain))
        })
        .collect()
}

/// Routes `alias` to `targets` (validated first), recording who changed it.
pub async fn set(pool: &PgPool, alias: &str, targets: &[String], changed_by: &str) -> Result<Vec<Target>, OverrideError> {
    let chain = parse_chain(alias, targets)?;
    let texts: Vec<String> = chain.iter().map(ToString::to_string).collect();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO model_routing (alias, targets) VALUES ($1, $2)
         ON CONFLICT (alias) DO UPDATE SET targets = EXCLUDED.targets, updated_at = now()",
    )
    .bind(alias)
    .bind(&texts)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO model_routing_changes (alias, targets, changed_by) VALUES ($1, $2, $3)")
        .bind(alias)
        .bind(&texts)
        .bind(changed_by)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(chain)
}

/// Sends `alias` back to its configured chain. Returns whether it had been changed.
pub async fn reset(pool: &PgPool, alias: &str, changed_by: &str) -> Result<bool, OverrideError> {
    crate::routing::check_alias(alias)?;
    let mut tx = pool.begin().await?;
    let removed = sqlx::query("DELETE FROM model_routing WHERE alias = $1").bind(alias).execute(&mut *tx).await?;
    if removed.rows_affected() > 0 {
        sqlx::query("INSERT INTO model_routing_changes (alias, targets, changed_by) VALUES ($1, NULL, $2)")
            .bind(alias)
            .bind(changed_by)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(removed.rows_affected() > 0)
}

/// Loads the overrides into `router` now and then every [`REFRESH`], until the task is dropped.
/// A failed read keeps the chains the router has and is logged.
pub async fn follow(pool: PgPool, router: Arc<crate::Router>) {
    loop {
        match load(&pool).await {
            Ok(overrides) => router.set_overrides(overrides),
            Err(error) => tracing::warn!(error = %error, "could not read model routing overrides"),
        }
        tokio::time::sleep(REFRESH).await;
    }
}
