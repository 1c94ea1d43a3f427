//! The saga's tables (`migrations/`): `sagas`, `notifications`, `payments` and
//! `unreadable_events`. Their history is recorded in [`HISTORY_TABLE`], apart from the
//! projections', so that each crate's migrations are its own. `ordo migrate` runs them, with the
//! projections' (`ordo_app::database`).

use sqlx::{
    PgPool,
    migrate::{MigrateError, Migrator},
};

/// Where the saga's migrations are recorded as applied.
pub const HISTORY_TABLE: &str = "_ordo_saga_migrations";

/// The saga's migrations, embedded in the binary.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.dangerous_set_table_name(HISTORY_TABLE);
    migrator
}

/// Creates the saga's tables, or brings them to this build's shape.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    migrator().run(pool).await
}
