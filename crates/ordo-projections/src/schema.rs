//! Where the views live. Each projection has a schema of its own, `view_<name>`, holding its
//! tables and its `checkpoints`; the DDL runs with that schema as the search path, so a rebuild
//! can create the same tables in another schema and swap the two by renaming.

use sqlx::{AssertSqlSafe, PgPool, migrate::Migrator};

use crate::{Projection, runtime::ProjectorError};

/// Where the projections' migrations are recorded as applied (apart from the saga's).
pub const HISTORY_TABLE: &str = "_ordo_projection_migrations";

/// The table the projections share (`projections/migrations`), embedded in the binary.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("../../projections/migrations");
    migrator.dangerous_set_table_name(HISTORY_TABLE);
    migrator
}

/// The schema that serves a projection's view.
pub fn live_schema<P: Projection>() -> String {
    format!("view_{}", P::NAME)
}

/// Runs the projections' migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    migrator().run(pool).await
}

/// The versions of `migrator` not applied to the database (or applied from another text),
/// found by reading only.
pub async fn unapplied(pool: &PgPool, migrator: &Migrator) -> Result<Vec<i64>, sqlx::Error> {
    // Unqualified, as sqlx's migrator names it: the first schema of the search path.
    let table = migrator.table_name.as_ref();
    let has_table: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(pool)
        .await?;
    let applied: Vec<(i64, Vec<u8>)> = if has_table {
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT version, checksum FROM {table} WHERE success"
        )))
        .fetch_all(pool)
        .await?
    } else {
        Vec::new()
    };
    Ok(migrator
        .iter()
        .filter(|migration| !migration.migration_type.is_down_migration())
        .filter(|migration| {
            !applied.iter().any(|(version, checksum)| {
                *version == migration.version && **checksum == *migration.checksum
            })
        })
        .map(|migration| migration.version)
        .collect())
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

/// Creates the projection's schema, tables and checkpoint row if the schema is missing, marked
/// with the projection's definition. An existing schema is left as it is (a view built from
/// another definition must be rebuilt, not altered).
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
    if exists {
        // Nothing to create, and no DDL: the workers' role may not run any.
        return tx.commit().await;
    }
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut *tx)
        .await?;
    sqlx::query(AssertSqlSafe(format!(
        "COMMENT ON SCHEMA {schema} IS '{}'",
        definition::<P>()
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query(set_search_path(schema))
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(P::DDL).execute(&mut *tx).await?;
    sqlx::raw_sql(PARTITION_CHECKPOINTS_DDL)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO checkpoints (stream, seq) VALUES ($1, 0) ON CONFLICT DO NOTHING")
        .bind(P::STREAM)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Every view's checkpoint per partition, next to its tables (not part of its definition: the
/// same for every view). `projections/migrations/0002` adds it to views built before it.
const PARTITION_CHECKPOINTS_DDL: &str = "
CREATE TABLE IF NOT EXISTS partition_checkpoints (
    partition   integer PRIMARY KEY,
    seq         bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
)";

/// The checkpoint of each of the view's `partitions` partitions, in partition order. A view
/// that has none yet gets them, each at the view's single checkpoint (a new view's 0, or where
/// a view built before partitions was). A view that keeps another count is refused: its
/// partitions hold other aggregates.
pub async fn partition_checkpoints<P: Projection>(
    pool: &PgPool,
    schema: &str,
    partitions: u32,
) -> Result<Vec<u64>, ProjectorError> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {schema}.partition_checkpoints (partition, seq)
         SELECT partition, COALESCE((SELECT seq FROM {schema}.checkpoints WHERE stream = $1), 0)
         FROM generate_series(0, $2 - 1) AS partition
         WHERE NOT EXISTS (SELECT 1 FROM {schema}.partition_checkpoints)
         ON CONFLICT DO NOTHING"
    )))
    .bind(P::STREAM)
    .bind(partitions as i32)
    .execute(pool)
    .await?;
    let rows: Vec<(i32, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT partition, seq FROM {schema}.partition_checkpoints ORDER BY partition"
    )))
    .fetch_all(pool)
    .await?;
    let in_order = rows
        .iter()
        .enumerate()
        .all(|(index, (partition, _))| *partition as usize == index);
    if rows.len() != partitions as usize || !in_order {
        return Err(ProjectorError::PartitionCountDiffers {
            schema: schema.to_owned(),
            name: P::NAME.to_owned(),
            found: rows.len(),
            configured: partitions,
        });
    }
    Ok(rows.into_iter().map(|(_, seq)| seq as u64).collect())
}

/// Each partition's checkpoint in the view in `schema`, by partition (none for a view built
/// before partitions whose projector has not run since).
pub async fn checkpoints_by_partition(
    pool: &PgPool,
    schema: &str,
) -> Result<Vec<(u32, u64)>, sqlx::Error> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT partition, seq FROM {schema}.partition_checkpoints ORDER BY partition"
    )))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(partition, seq)| (partition as u32, seq as u64))
        .collect())
}

/// The view's checkpoint: every event of the stream at or below it is in the view (the
/// checkpoint of the partition furthest behind).
pub async fn checkpoint<P: Projection>(pool: &PgPool, schema: &str) -> Result<u64, sqlx::Error> {
    checkpoint_of(pool, schema, P::STREAM).await
}

/// The checkpoint of the view of `stream` in `schema` (0 before the first event). A view built
/// before partitions, whose projector has not run since, has its single checkpoint.
pub async fn checkpoint_of(pool: &PgPool, schema: &str, stream: &str) -> Result<u64, sqlx::Error> {
    let seq: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT COALESCE((SELECT min(seq) FROM {schema}.partition_checkpoints),
                         (SELECT seq FROM {schema}.checkpoints WHERE stream = $1))"
    )))
    .bind(stream)
    .fetch_one(pool)
    .await?;
    Ok(seq.unwrap_or(0) as u64)
}

/// The checkpoint of the partition `partition` of `partitions`, which the events of an
/// aggregate of that partition wait for: the view's own checkpoint if the view keeps another
/// count of partitions (or none yet).
pub async fn checkpoint_of_partition(
    pool: &PgPool,
    schema: &str,
    stream: &str,
    partitions: u32,
    partition: u32,
) -> Result<u64, sqlx::Error> {
    let seq: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT COALESCE(
             (SELECT CASE WHEN count(*) = $2 THEN max(seq) FILTER (WHERE partition = $3) ELSE min(seq) END
              FROM {schema}.partition_checkpoints),
             (SELECT seq FROM {schema}.checkpoints WHERE stream = $1))"
    )))
    .bind(stream)
    .bind(i64::from(partitions))
    .bind(partition as i32)
    .fetch_one(pool)
    .await?;
    Ok(seq.unwrap_or(0) as u64)
}

/// The checkpoint of the partition furthest ahead in the view of `stream` in `schema`, read
/// inside a transaction of the caller's: every event past it is still to be applied.
pub async fn furthest_checkpoint_in(
    connection: &mut sqlx::PgConnection,
    schema: &str,
    stream: &str,
) -> Result<u64, sqlx::Error> {
    let seq: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT COALESCE((SELECT max(seq) FROM {schema}.partition_checkpoints),
                         (SELECT seq FROM {schema}.checkpoints WHERE stream = $1))"
    )))
    .bind(stream)
    .fetch_one(connection)
    .await?;
    Ok(seq.unwrap_or(0) as u64)
}

/// A projection as data, for code that handles all of them alike (status, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionInfo {
    pub name: &'static str,
    pub stream: &'static str,
    pub consumer: ordo_eventstore::ConsumerId,
}

impl ProjectionInfo {
    pub fn of<P: Projection>() -> Self {
        Self {
            name: P::NAME,
            stream: P::STREAM,
            consumer: P::CONSUMER,
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

/// What a database lacks before ordo can use it: migrations not applied (or applied from another
/// text), named by their owner (`saga 1`, `projections 1`), and live views that do not exist.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Missing {
    pub migrations: Vec<String>,
    pub views: Vec<String>,
}

impl Missing {
    pub fn is_empty(&self) -> bool {
        self.migrations.is_empty() && self.views.is_empty()
    }
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.migrations.is_empty() {
            parts.push(format!(
                "migrations {} not applied",
                self.migrations.join(", ")
            ));
        }
        if !self.views.is_empty() {
            parts.push(format!("views {} missing", self.views.join(", ")));
        }
        f.write_str(&parts.join("; "))
    }
}

/// Why a database could not be made ready for ordo.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(
        "the database is not set up ({missing}) and this role may not create tables: run \
         `ordo migrate` as the database owner"
    )]
    NotSetUp { missing: Missing },
    #[error(
        "this role may not read ordo's tables: run `ordo migrate --grant-to <this role>` as the \
         database owner"
    )]
    NotGranted,
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// What [`prepare`] would create, found by reading only: a role that may not create tables can
/// ask.
pub async fn missing(pool: &PgPool) -> Result<Missing, sqlx::Error> {
    let migrations = unapplied(pool, &migrator())
        .await?
        .into_iter()
        .map(|version| format!("projections {version}"))
        .collect();
    let schemas: Vec<String> = catalog().iter().map(ProjectionInfo::schema).collect();
    let existing: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname = ANY($1)")
            .bind(&schemas)
            .fetch_all(pool)
            .await?;
    let views = catalog()
        .iter()
        .filter(|view| !existing.contains(&view.schema()))
        .map(|view| view.name.to_owned())
        .collect();
    Ok(Missing { migrations, views })
}

/// Makes the projections' part of the database ready: runs their migrations and creates the
/// views that are missing (`ordo_app::database::prepare` adds the saga's tables). When nothing is missing it runs no DDL at all, so workers connected as a role
/// that may only read and write rows (`ordo migrate --grant-to`) start on a database the owner
/// set up; on one that is not set up they get [`PrepareError::NotSetUp`].
pub async fn prepare(pool: &PgPool) -> Result<(), PrepareError> {
    let missing = match missing(pool).await {
        Err(err) if is_insufficient_privilege(&err) => return Err(PrepareError::NotGranted),
        found => found?,
    };
    if missing.is_empty() {
        return Ok(());
    }
    let created = async {
        migrate(pool).await?;
        for view in crate::View::ALL {
            view.ensure_live(pool).await?;
        }
        Ok::<_, PrepareError>(())
    };
    match created.await {
        Err(err) if err.is_insufficient_privilege() => Err(PrepareError::NotSetUp { missing }),
        other => other,
    }
}

impl PrepareError {
    pub fn is_insufficient_privilege(&self) -> bool {
        use sqlx::migrate::MigrateError;
        let sql = match self {
            Self::Sql(err)
            | Self::Migrate(MigrateError::Execute(err))
            | Self::Migrate(MigrateError::ExecuteMigration(err, _)) => err,
            _ => return false,
        };
        is_insufficient_privilege(sql)
    }
}

pub fn is_insufficient_privilege(err: &sqlx::Error) -> bool {
    sqlstate(err).as_deref() == Some("42501")
}

/// The SQLSTATE of an error the server returned (none for I/O and client-side errors).
pub fn sqlstate(err: &sqlx::Error) -> Option<std::borrow::Cow<'_, str>> {
    err.as_database_error().and_then(|err| err.code())
}
