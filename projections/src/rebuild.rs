//! Rebuilding a projection from the event store: its tables are built anew in a schema of
//! their own (`rebuild_<name>`), from the first event to the settled end of the store, while
//! the live tables keep serving; then, holding the projection's lock (the live runner waits),
//! the last events are folded in and the new tables replace the old ones in one transaction.
//! Readers see the old model or the new one, never half of either. Needs a role that owns the
//! tables (the migration role).

use crate::runner::{checkpoint, lock, set_checkpoint};
use crate::{Projection, ProjectionError};
use factory_commands::events::{range, settled_position};
use sqlx::{PgConnection, PgPool};

/// Events folded per transaction while building.
const CHUNK: i64 = 5_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    pub events_applied: u64,
    /// The position the rebuilt model covers (its checkpoint).
    pub position: i64,
}

fn schema(projection: Projection) -> String {
    format!("rebuild_{}", projection.name())
}

async fn use_schema(db: &mut PgConnection, projection: Projection) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("SET LOCAL search_path TO {}, public", schema(projection))).execute(db).await?;
    Ok(())
}

/// Folds events `(after, up_to]` into the rebuild tables on `db` (in its transaction).
async fn fold(
    pool: &PgPool,
    db: &mut PgConnection,
    projection: Projection,
    after: i64,
    up_to: i64,
) -> Result<(u64, i64), ProjectionError> {
    let events = range(pool, after, up_to, CHUNK).await?;
    let mut last = after;
    for event in &events {
        projection.apply(db, event).await?;
        last = event.position;
    }
    // Fewer than a chunk: everything up to `up_to` was read.
    let covered = if (events.len() as i64) < CHUNK { up_to } else { last };
    Ok((events.len() as u64, covered))
}

/// Rebuilds `projection`; `progress(events_applied, position, target)` is called after each
/// chunk. The target moves on if events keep arriving.
pub async fn rebuild(
    pool: &PgPool,
    projection: Projection,
    mut progress: impl FnMut(u64, i64, i64),
) -> Result<RebuildReport, ProjectionError> {
    let schema = schema(projection);
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(pool).await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(pool).await?;
    for table in projection.tables() {
        sqlx::query(&format!("CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)")).execute(pool).await?;
    }
    let mut applied = 0u64;
    let mut position = 0i64;
    // Build while the live model serves, chunk by chunk, until close to the end.
    loop {
        let target = settled_position(pool).await?;
        if target - position <= CHUNK {
            break;
        }
        while position < target {
            let mut tx = pool.begin().await?;
            use_schema(&mut tx, projection).await?;
            let (n, covered) = fold(pool, &mut tx, projection, position, target).await?;
            tx.commit().await?;
            applied += n;
            position = covered;
            progress(applied, position, target);
        }
    }
    // The rest with the live runner held off, then the swap.
    let mut tx = pool.begin().await?;
    lock(&mut tx, projection).await?;
    let target = settled_position(pool).await?;
    use_schema(&mut tx, projection).await?;
    while position < target {
        let (n, covered) = fold(pool, &mut tx, projection, position, target).await?;
        applied += n;
        position = covered;
    }
    sqlx::query("SET LOCAL search_path TO public").execute(&mut *tx).await?;
    let live = checkpoint(&mut tx, projection).await?;
    if live > position {
        // Cannot happen: the live runner only sees relayed events, all settled before `target`.
        return Err(ProjectionError::Apply {
            projection: projection.name(),
            position: live,
            event_type: "-".into(),
            problem: format!("the live model is at {live}, past the rebuild's {position}"),
        });
    }
    for table in projection.tables() {
        sqlx::query(&format!("DROP TABLE public.{table}")).execute(&mut *tx).await?;
        sqlx::query(&format!("ALTER TABLE {schema}.{table} SET SCHEMA public")).execute(&mut *tx).await?;
        sqlx::query(&format!("GRANT SELECT, INSERT, UPDATE, DELETE ON public.{table} TO factory")).execute(&mut *tx).await?;
    }
    sqlx::query(&format!("DROP SCHEMA {schema}")).execute(&mut *tx).await?;
    set_checkpoint(&mut tx, projection, position).await?;
    tx.commit().await?;
    progress(applied, position, position);
    Ok(RebuildReport { events_applied: applied, position })
}
