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

pub trait Projection: Send + Sync + 'static {
    /// Names the projection, its schema (`view_<NAME>`) and its durable consumer.
    const NAME: &'static str;
    /// The stream it reads, from its first event.
    const STREAM: &'static str;
    /// Idempotent DDL of its tables (including `checkpoints`), run with the schema as search path.
    const DDL: &'static str;

    /// Applies one event inside the batch's transaction (search path set to the view's schema).
    fn apply(
        connection: &mut PgConnection,
        event: &RecordedEvent,
    ) -> impl std::future::Future<Output = Result<(), ApplyError>> + Send;
}
