//! The database as ordo sets it up: each crate's tables from its own migrations, recorded apart;
//! and a database an earlier build set up (the shared migrations 1 to 7, which these fixtures
//! keep as they shipped) adopted at whatever version it is, its rows kept.

use ordo_app::database;
use ordo_testkit::TestDatabase;
use sqlx::{PgPool, migrate::Migrator};

/// The shared migrations of earlier builds, as they shipped, up to `version`, run by sqlx's
/// migrator as those builds ran them (recorded in `_sqlx_migrations`).
async fn set_up_as_earlier_builds_did(pool: &PgPool, version: i64) {
    let shipped = sqlx::migrate!("tests/legacy_migrations");
    let up_to = shipped
        .iter()
        .filter(|migration| migration.version <= version)
        .cloned()
        .collect();
    Migrator::with_migrations(up_to).run(pool).await.unwrap();
}

/// Each crate's first migration, run again by hand: they adopt what they find.
const FIRST_MIGRATIONS: [&str; 2] = [
    include_str!("../../ordo-saga/migrations/0001_saga_tables.sql"),
    include_str!("../../../projections/migrations/0001_parked_events.sql"),
];

/// Every column, index and constraint of ordo's tables in `public` (migration histories
/// aside), as text that two databases of the same shape share.
async fn shape(pool: &PgPool) -> Vec<String> {
    let columns: Vec<(String, String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text, column_default::text
         FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name NOT LIKE '\\_%'
         ORDER BY table_name, ordinal_position",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes
         WHERE schemaname = 'public' AND tablename NOT LIKE '\\_%' ORDER BY indexname",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let constraints: Vec<String> = sqlx::query_scalar(
        "SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
         FROM pg_constraint
         WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text NOT LIKE '\\_%'
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    columns
        .into_iter()
        .map(|(table, column, kind, nullable, default)| {
            format!("{table}.{column} {kind} nullable={nullable} default={default:?}")
        })
        .chain(indexes)
        .chain(constraints)
        .collect()
}

#[tokio::test]
async fn each_crate_s_migrations_are_recorded_apart_and_set_up_once() {
    let database = TestDatabase::create().await;
    database::prepare(database.pool()).await.unwrap();
    let histories: Vec<(String, i64)> = sqlx::query_as(
        "SELECT '_ordo_saga_migrations', count(*) FROM _ordo_saga_migrations
         UNION ALL SELECT '_ordo_projection_migrations', count(*) FROM _ordo_projection_migrations",
    )
    .fetch_all(database.pool())
    .await
    .unwrap();
    assert!(
        histories.iter().all(|(_, applied)| *applied > 0),
        "{histories:?}"
    );
    assert!(database::missing(database.pool()).await.unwrap().is_empty());
    let before = shape(database.pool()).await;
    for migration in FIRST_MIGRATIONS {
        sqlx::raw_sql(migration)
            .execute(database.pool())
            .await
            .unwrap();
    }
    assert_eq!(
        shape(database.pool()).await,
        before,
        "the first migrations, run again, change nothing"
    );
    for table in [
        "sagas",
        "notifications",
        "payments",
        "unreadable_events",
        "parked_events",
    ] {
        assert!(
            before
                .iter()
                .any(|line| line.starts_with(&format!("{table}."))),
            "{table} was not created"
        );
    }
}

#[tokio::test]
async fn a_database_an_earlier_build_set_up_is_adopted_at_any_version_with_its_rows() {
    let fresh = TestDatabase::create().await;
    database::prepare(fresh.pool()).await.unwrap();
    let expected = shape(fresh.pool()).await;

    for applied in 1..=7 {
        let database = TestDatabase::create().await;
        set_up_as_earlier_builds_did(database.pool(), applied).await;
        // A row in each table those versions had, to be kept. (From version 7 on, a parked event
        // names the view it was parked in; before, the adoption fills it in.)
        let parked = if applied >= 7 {
            "INSERT INTO parked_events (projection, stream, seq, subject, reason, attempts, payload, parked_in)
                 VALUES ('orders', 'ORDO_ORDERS', 7, 'ordo.order.events.o-1', 'broken', 5, '{}', 'view_orders');"
        } else {
            "INSERT INTO parked_events (projection, stream, seq, subject, reason, attempts, payload)
                 VALUES ('orders', 'ORDO_ORDERS', 7, 'ordo.order.events.o-1', 'broken', 5, '{}');"
        };
        sqlx::raw_sql(
            "INSERT INTO sagas (order_id, state) VALUES ('o-1', 'running');
             INSERT INTO notifications (order_id, kind, customer_id, status)
                 VALUES ('o-1', 'confirmed', 'c1', 'sent');",
        )
        .execute(database.pool())
        .await
        .unwrap();
        sqlx::raw_sql(parked)
            .execute(database.pool())
            .await
            .unwrap();

        let missing = database::missing(database.pool()).await.unwrap();
        assert_eq!(
            missing.migrations,
            [
                "saga 1",
                "saga 2",
                "saga 3",
                "projections 1",
                "projections 2"
            ],
            "after legacy migrations 1 to {applied}"
        );
        database::prepare(database.pool()).await.unwrap();
        assert_eq!(
            shape(database.pool()).await,
            expected,
            "after legacy migrations 1 to {applied}"
        );
        let kept: (String, String, String) = sqlx::query_as(
            "SELECT s.state, n.status, p.parked_in FROM sagas s, notifications n, parked_events p
             WHERE s.order_id = 'o-1' AND n.order_id = 'o-1' AND p.seq = 7",
        )
        .fetch_one(database.pool())
        .await
        .unwrap();
        assert_eq!(
            kept,
            ("running".into(), "sent".into(), "view_orders".into()),
            "after legacy migrations 1 to {applied}"
        );
    }
}
