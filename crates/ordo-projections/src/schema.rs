//! Where the views live. Each projection has a schema of its own, `view_<name>`, holding its
//! tables and its `checkpoints`; the DDL runs with that schema as the search path, so a rebuild
//! can create the same tables in another schema and swap the two by renaming.

use sqlx::{AssertSqlSafe, PgPool, migrate::Migrator};

use crate::Projection;

/// The shared tables (`projections/migrations`), embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../projections/migrations");

/// The schema that serves a projection's view.
pub fn live_schema<P: Projection>() -> String {
    format!("view_{}", P::NAME)
}

/// Runs the shared migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// `SET LOCAL search_path` for a transaction that works on `schema`.
pub fn set_search_path(schema: &str) -> AssertSqlSafe<String> {
    debug_assert!(schema.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
    AssertSqlSafe(format!("SET LOCAL search_path TO {schema}, public"))
}

/// Creates the projection's schema, tables and checkpoint row if they are missing.
pub async fn ensure_view<P: Projection>(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Instances start together: one at a time creates the tables.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('ordo-projection-ddl'))")
        .execute(&mut *tx)
        .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}"
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query(set_search_path(schema))
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(P::DDL).execute(&mut *tx).await?;
    sqlx::query("INSERT INTO checkpoints (stream, seq) VALUES ($1, 0) ON CONFLICT DO NOTHING")
        .bind(P::STREAM)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// The stream sequence of the last event the view in `schema` applied.
pub async fn checkpoint<P: Projection>(pool: &PgPool, schema: &str) -> Result<u64, sqlx::Error> {
    let seq: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT seq FROM {schema}.checkpoints WHERE stream = $1"
    )))
    .bind(P::STREAM)
    .fetch_one(pool)
    .await?;
    Ok(seq as u64)
}
