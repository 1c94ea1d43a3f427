//! Finding and preparing PostgreSQL: the configured URL, the local defaults of `ordo up`, and a
//! first connection that waits for the server with backoff.

use std::{path::Path, time::Duration};

use anyhow::Context;
use ordo_eventstore::backoff::Backoff;
use ordo_local::PostgresServer;
pub use ordo_local::connect_options;
use ordo_projections::schema;
use sqlx::{AssertSqlSafe, ConnectOptions, PgPool, postgres::PgPoolOptions};

/// A local server with trust authentication, as Debian's and many developer set-ups have.
const LOCAL_SERVER: &str = "postgres://postgres@127.0.0.1:5432";
/// The database ordo uses on a server it picks itself.
const DATABASE: &str = "ordo";
/// Written by `ordo up` while it runs a PostgreSQL of its own, read by the other commands.
const URL_FILE: &str = "database.url";

/// The URL to use when one is configured, else the database `ordo up` started, else the local
/// default (`postgres://postgres@127.0.0.1:5432/ordo`).
pub fn configured_url(configured: Option<String>, home: &Path) -> String {
    let default = format!("{LOCAL_SERVER}/{DATABASE}");
    crate::connect::configured_or_recorded(configured, &home.join(URL_FILE), &default)
}

/// `ordo up`'s database: the configured URL; else database `ordo` (created if missing) on a local
/// server that accepts `postgres` without a password; else a private cluster under `<home>/pg`.
pub async fn url_for_up(
    configured: Option<String>,
    home: &Path,
) -> anyhow::Result<(String, Option<LocalPostgres>)> {
    if let Some(url) = configured {
        return Ok((url, None));
    }
    match create_database_if_missing(LOCAL_SERVER).await {
        Ok(url) => {
            tracing::info!(%url, "using the local PostgreSQL");
            return Ok((url, None));
        }
        Err(err) => tracing::info!(server = LOCAL_SERVER, %err, "not using it"),
    }
    let server = PostgresServer::start_kept(&home.join("pg"))
        .map_err(anyhow::Error::msg)
        .context("starting a private PostgreSQL")?;
    let url =
        create_database_if_missing(server.url("postgres").trim_end_matches("/postgres")).await?;
    std::fs::write(home.join(URL_FILE), &url).context("recording the local database URL")?;
    tracing::info!(%url, data = %home.join("pg").display(), "started a private PostgreSQL");
    Ok((
        url,
        Some(LocalPostgres {
            _server: server,
            url_file: home.join(URL_FILE),
        }),
    ))
}

/// A PostgreSQL `ordo up` started: it stops with `ordo up`, its data stays.
pub struct LocalPostgres {
    _server: PostgresServer,
    url_file: std::path::PathBuf,
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.url_file);
    }
}

async fn create_database_if_missing(server: &str) -> anyhow::Result<String> {
    let mut admin = tokio::time::timeout(
        Duration::from_secs(2),
        connect_options(&format!("{server}/postgres"))?.connect(),
    )
    .await
    .context("no answer")??;
    let exists: bool =
        sqlx::query_scalar("SELECT exists(SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DATABASE)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {DATABASE}")))
            .execute(&mut admin)
            .await?;
    }
    Ok(format!("{server}/{DATABASE}"))
}

/// `ordo migrate`: sets up the database at `url` (connected as its owner) and, given roles, lets
/// the workers' role read and write rows and the read API's role read them. Says what it did.
pub async fn migrate(
    url: &str,
    grant_to: Option<&str>,
    grant_read_to: Option<&str>,
) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(connect_options(url)?)
        .await
        .with_context(|| {
            format!(
                "connecting to PostgreSQL at {}",
                crate::connect::redacted(url)
            )
        })?;
    let missing = missing(&pool).await?;
    prepare(&pool).await?;
    if missing.is_empty() {
        println!("the database was already set up");
    } else {
        println!("created what was missing ({missing})");
    }
    if let Some(role) = grant_to {
        grant_rows_to(&pool, role, RowAccess::ReadWrite).await?;
        println!("role {role} may read and write ordo's rows, and nothing more");
    }
    if let Some(role) = grant_read_to {
        grant_rows_to(&pool, role, RowAccess::ReadOnly).await?;
        println!("role {role} may read ordo's rows, and nothing more");
    }
    Ok(())
}

/// A pool on `url` with the migrations run and the views created, waiting for the database with
/// exponential backoff (capped at 30 s) and saying so; also while the database is not set up
/// yet (`ordo migrate` may be running). A server that refuses the credentials ends it at once:
/// retrying cannot help.
pub async fn connect_and_prepare(url: &str) -> anyhow::Result<PgPool> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        let attempt = async {
            // The notifier's pull holds a connection while it waits on NATS or a webhook;
            // the saga coordinator (it holds none across a step), projectors and the API need
            // theirs too.
            let pool = PgPoolOptions::new()
                .max_connections(32)
                .acquire_timeout(Duration::from_secs(3))
                .connect_with(connect_options(url)?)
                .await?;
            prepare(&pool).await?;
            Ok::<_, schema::PrepareError>(pool)
        };
        match attempt.await {
            Ok(pool) => return Ok(pool),
            Err(schema::PrepareError::Sql(sqlx::Error::Configuration(err))) => {
                anyhow::bail!(
                    "ORDO_DATABASE_URL is not a usable PostgreSQL URL ({err}). Not retrying."
                )
            }
            Err(schema::PrepareError::Sql(err)) if credentials_refused(&err) => {
                anyhow::bail!(
                    "PostgreSQL at {} does not accept this connection ({err}): check the user and \
                     password in ORDO_DATABASE_URL. Not retrying.",
                    crate::connect::redacted(url)
                )
            }
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(%err, retry_in = ?delay, "PostgreSQL is unreachable or not ready; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// What [`prepare`] would create, found by reading only: the saga's migrations and the
/// projections' (with their views).
pub async fn missing(pool: &PgPool) -> Result<schema::Missing, sqlx::Error> {
    let saga = schema::unapplied(pool, &ordo_saga::schema::migrator()).await?;
    let mut missing = schema::missing(pool).await?;
    missing.migrations.splice(
        0..0,
        saga.into_iter().map(|version| format!("saga {version}")),
    );
    Ok(missing)
}

/// Makes the database ready for every component: each crate's migrations (the saga's, the
/// projections') and the views. When nothing is missing it runs no DDL at all, so workers
/// connected as a role that may only read and write rows (`ordo migrate --grant-to`) start on a
/// database the owner set up; on one that is not set up they get
/// [`schema::PrepareError::NotSetUp`].
pub async fn prepare(pool: &PgPool) -> Result<(), schema::PrepareError> {
    let missing = match missing(pool).await {
        Err(err) if schema::is_insufficient_privilege(&err) => {
            return Err(schema::PrepareError::NotGranted);
        }
        found => found?,
    };
    if missing.is_empty() {
        return Ok(());
    }
    let created = async {
        ordo_saga::schema::migrate(pool).await?;
        schema::prepare(pool).await
    };
    match created.await {
        Err(err) if err.is_insufficient_privilege() => {
            Err(schema::PrepareError::NotSetUp { missing })
        }
        other => other,
    }
}

/// Class 28 (invalid authorization): a wrong password, an unknown role, no pg_hba.conf entry.
fn credentials_refused(err: &sqlx::Error) -> bool {
    schema::sqlstate(err).is_some_and(|code| code.starts_with("28"))
}

/// What a role may do with ordo's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowAccess {
    /// Read and write rows: the workers.
    ReadWrite,
    /// Read rows: the read API.
    ReadOnly,
}

/// Lets `role` read (and, with [`RowAccess::ReadWrite`], write) the rows of every ordo table,
/// those that exist and those that later migrations and rebuilds create (run as the owner,
/// which creates them), and nothing more: no DDL, no write to the migration history. The role
/// must exist.
pub async fn grant_rows_to(pool: &PgPool, role: &str, access: RowAccess) -> Result<(), GrantError> {
    let exists: bool =
        sqlx::query_scalar("SELECT exists(SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role)
            .fetch_one(pool)
            .await?;
    if !exists {
        return Err(GrantError::NoSuchRole(role.to_owned()));
    }
    let role = quote_identifier(role);
    let schemas: Vec<String> = std::iter::once("public".to_owned())
        .chain(schema::catalog().iter().map(schema::ProjectionInfo::schema))
        .collect();
    let schemas = schemas.join(", ");
    // A reader may not draw from a sequence either (`nextval` needs USAGE).
    let (rows, sequences) = match access {
        RowAccess::ReadWrite => ("SELECT, INSERT, UPDATE, DELETE", "USAGE, SELECT"),
        RowAccess::ReadOnly => ("SELECT", "SELECT"),
    };
    let mut histories = vec![ordo_saga::schema::HISTORY_TABLE, schema::HISTORY_TABLE];
    let legacy: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if legacy {
        histories.push("_sqlx_migrations");
    }
    let histories = histories.join(", ");
    let mut tx = pool.begin().await?;
    for statement in [
        format!("GRANT USAGE ON SCHEMA {schemas} TO {role}"),
        format!("GRANT {rows} ON ALL TABLES IN SCHEMA {schemas} TO {role}"),
        format!("GRANT {sequences} ON ALL SEQUENCES IN SCHEMA {schemas} TO {role}"),
        // The workers read which migrations ran (to know the database is set up), never write it;
        // nor the history earlier builds kept, where a database has it.
        format!("REVOKE INSERT, UPDATE, DELETE ON {histories} FROM {role}"),
        // What the owner creates later: the schemas and tables of a rebuild, new migrations.
        format!("ALTER DEFAULT PRIVILEGES GRANT USAGE ON SCHEMAS TO {role}"),
        format!("ALTER DEFAULT PRIVILEGES GRANT {rows} ON TABLES TO {role}"),
        format!("ALTER DEFAULT PRIVILEGES GRANT {sequences} ON SEQUENCES TO {role}"),
    ] {
        sqlx::query(AssertSqlSafe(statement))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error(
        "role {0:?} does not exist: create it first (CREATE ROLE {0} LOGIN PASSWORD '…'), then \
         run this again"
    )]
    NoSuchRole(String),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// `name` as a quoted SQL identifier, whatever it contains.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
