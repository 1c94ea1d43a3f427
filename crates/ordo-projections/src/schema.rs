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

/// The mark a view's schema carries: the projection and a digest of the SQL that built it.
pub fn definition<P: Projection>() -> String {
    // FNV-1a: stable across builds and platforms, unlike the standard library's hasher.
    let digest = P::DDL
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("ordo projection {} definition {digest:016x}", P::NAME)
}

/// The definition mark of `schema`, if it has one.
pub async fn definition_of(pool: &PgPool, schema: &str) -> Result<Option<String>, sqlx::Error> {
    let mark: Option<Option<String>> = sqlx::query_scalar(
        "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = $1",
    )
    .bind(schema)
    .fetch_optional(pool)
    .await?;
    Ok(mark.flatten())
}

/// Creates the projection's schema, tables and checkpoint row if they are missing. A schema it
/// creates is marked with the projection's definition; an existing one keeps its mark (a view
/// built from another definition must be rebuilt, not altered).
pub async fn ensure_view<P: Projection>(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Instances start together: one at a time creates the tables.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('ordo-projection-ddl'))")
        .execute(&mut *tx)
        .await?;
    let exists: bool =
        sqlx::query_scalar("SELECT exists(SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&mut *tx)
            .await?;
    if !exists {
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "COMMENT ON SCHEMA {schema} IS '{}'",
            definition::<P>()
        )))
        .execute(&mut *tx)
        .await?;
    }
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
    checkpoint_of(pool, schema, P::STREAM).await
}

/// The checkpoint of `stream` in `schema` (0 before the first event).
pub async fn checkpoint_of(pool: &PgPool, schema: &str, stream: &str) -> Result<u64, sqlx::Error> {
    let seq: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT seq FROM {schema}.checkpoints WHERE stream = $1"
    )))
    .bind(stream)
    .fetch_optional(pool)
    .await?;
    Ok(seq.unwrap_or(0) as u64)
}

/// The checkpoint of `stream` in `schema`, read inside a transaction of the caller's.
pub async fn checkpoint_of_in(
    connection: &mut sqlx::PgConnection,
    schema: &str,
    stream: &str,
) -> Result<u64, sqlx::Error> {
    let seq: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT seq FROM {schema}.checkpoints WHERE stream = $1"
    )))
    .bind(stream)
    .fetch_optional(connection)
    .await?;
    Ok(seq.unwrap_or(0) as u64)
}

/// A projection as data, for code that handles all of them alike (status, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionInfo {
    pub name: &'static str,
    pub stream: &'static str,
}

impl ProjectionInfo {
    pub fn of<P: Projection>() -> Self {
        Self {
            name: P::NAME,
            stream: P::STREAM,
        }
    }

    pub fn schema(&self) -> String {
        format!("view_{}", self.name)
    }
}

/// Every projection of ordo.
pub fn catalog() -> Vec<ProjectionInfo> {
    crate::View::ALL.iter().map(|view| view.info()).collect()
}

/// Runs the migrations and creates every view that is missing: what a reader needs first.
pub async fn prepare(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    migrate(pool).await?;
    for view in crate::View::ALL {
        view.ensure_live(pool).await?;
    }
    Ok(())
}
