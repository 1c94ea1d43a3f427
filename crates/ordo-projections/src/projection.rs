//! What a projection is: a view fed by one stream.

use ordo_eventstore::RecordedEvent;
use sqlx::PgConnection;

/// Why one event could not be applied. Distinguishes what retrying may fix (the database is
/// unreachable) from what it will not (the event does not fit the view): only the second is
/// ever parked.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("PostgreSQL is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Rejected(String),
}

impl From<sqlx::Error> for ApplyError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            // Errors of the moment (a serialization failure, a deadlock, the server shutting
            // down or out of resources): the same statement may well work when tried again.
            sqlx::Error::Database(err) if err.code().is_some_and(|code| is_transient(&code)) => {
                Self::Unavailable(err.to_string())
            }
            // The database answered and refused (a constraint, a type): the event does not fit.
            sqlx::Error::Database(err) => Self::Rejected(err.to_string()),
            sqlx::Error::RowNotFound
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::TypeNotFound { .. } => Self::Rejected(err.to_string()),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

/// SQLSTATEs that say "not now" rather than "never": transaction rollbacks (40: serialization
/// failure, deadlock), connection exceptions (08), insufficient resources (53), operator
/// intervention (57: admin shutdown, query cancelled, cannot connect now), lock not available.
fn is_transient(code: &str) -> bool {
    ["40", "08", "53", "57"]
        .iter()
        .any(|class| code.starts_with(class))
        || code == "55P03"
}

/// A count or amount as the views store it (bigint); the domain never makes one larger.
pub fn bigint(value: u64, what: &str) -> Result<i64, ApplyError> {
    i64::try_from(value)
        .map_err(|_| ApplyError::Rejected(format!("{what} {value} does not fit a bigint")))
}

pub trait Projection: Send + Sync + 'static {
    /// Names the projection and its schema (`view_<NAME>`).
    const NAME: &'static str;
    /// Its durable consumer, whose name is also its projectors' leader lock.
    const CONSUMER: ordo_eventstore::ConsumerId;
    /// The stream it reads, from its first event: its consumer's.
    const STREAM: &'static str = Self::CONSUMER.stream().name();
    /// Idempotent DDL of its tables (including `checkpoints`), run with the schema as search path.
    const DDL: &'static str;

    /// Applies one event inside the batch's transaction (search path set to the view's schema).
    fn apply(
        connection: &mut PgConnection,
        event: &RecordedEvent,
    ) -> impl std::future::Future<Output = Result<(), ApplyError>> + Send;

    /// Applies a whole batch (contiguous, in stream order) set-wise, in a few statements, when
    /// every event fits: `Ok(false)` or `Rejected` when one does not, and the runtime then
    /// applies the batch event by event (with `apply`) to find and park it. The result must be
    /// the same as applying the events one by one.
    fn apply_all(
        connection: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> impl std::future::Future<Output = Result<bool, ApplyError>> + Send {
        let _ = (connection, events);
        async { Ok(false) }
    }
}

/// Runs `sql` with `rows` as its `$1` (a JSON array, read with `jsonb_to_recordset`) and says
/// whether it wrote every row. Set-wise `apply_all`s are built of these.
pub async fn write_all(
    connection: &mut PgConnection,
    sql: &'static str,
    rows: Vec<serde_json::Value>,
) -> Result<bool, ApplyError> {
    write_rows(connection, sql, rows, None).await
}

/// Runs the update `sql` with `rows` as its `$1` (a JSON array, read with `jsonb_to_recordset`)
/// and the rows' keys as its `$2` (`text[]`), and says whether it wrote every row. The statement
/// must also match the key against `= ANY($2)`: PostgreSQL guesses 100 rows for any
/// `jsonb_to_recordset`, and against that guess it scans a table of a few thousand rows whole
/// rather than look each row up by its key, on every batch, until the table is large enough.
/// The keys give it an index scan at any size.
pub async fn update_all(
    connection: &mut PgConnection,
    sql: &'static str,
    rows: Vec<serde_json::Value>,
    keys: Vec<String>,
) -> Result<bool, ApplyError> {
    write_rows(connection, sql, rows, Some(keys)).await
}

async fn write_rows(
    connection: &mut PgConnection,
    sql: &'static str,
    rows: Vec<serde_json::Value>,
    keys: Option<Vec<String>>,
) -> Result<bool, ApplyError> {
    if rows.is_empty() {
        return Ok(true);
    }
    let expected = rows.len() as u64;
    let mut query = sqlx::query(sql).bind(serde_json::Value::Array(rows));
    if let Some(keys) = keys {
        query = query.bind(keys);
    }
    let written = query.execute(connection).await?;
    Ok(written.rows_affected() == expected)
}

/// A timestamp as PostgreSQL stores it (microseconds, truncated as sqlx binds them), for rows
/// sent as JSON.
pub fn timestamp(at: &chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_of_the_moment_are_retried_and_refusals_are_parked() {
        // serialization failure, deadlock, admin shutdown, cannot connect now, lock not available
        for code in [
            "40001", "40P01", "57P01", "57P03", "08006", "53300", "55P03",
        ] {
            assert!(is_transient(code), "{code} is retried");
        }
        // unique violation, check violation, numeric out of range, undefined table
        for code in ["23505", "23514", "22003", "42P01"] {
            assert!(!is_transient(code), "{code} does not fit: parked");
        }
    }
}
