//! `{"error": {"code", "message"}}` ([`ErrorBody`]) with the status that goes with the code.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};

use crate::bodies::{ErrorBody, ErrorCode, ErrorDetail};

/// How long a shed read is asked to wait before it tries again.
const RETRY_OVERLOADED_AFTER_SECS: u64 = 1;

#[derive(Debug)]
pub enum ApiError {
    /// 400: a path or query parameter is not valid; the message says which and why.
    InvalidQuery(String),
    /// 404
    NotFound(String),
    /// 504: the view did not reach `min_seq` in time.
    NotCaughtUp { min_seq: u64, checkpoint: u64 },
    /// 503: PostgreSQL (or NATS) does not answer.
    Unavailable(String),
    /// 503 with `Retry-After`: too many reads are in flight already; nothing is wrong with this
    /// one, it is shed.
    Overloaded(String),
    /// 401: a bearer token is required and was missing or wrong.
    Unauthorized(String),
    /// 500: a row this build cannot read (a newer build wrote it, during a rolling upgrade).
    Internal(String),
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        tracing::warn!(%err, "read failed");
        match err {
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::Decode(_) => Self::Internal(format!("a row could not be read: {err}")),
            _ => Self::Unavailable(format!("PostgreSQL is unavailable: {err}")),
        }
    }
}

impl ApiError {
    fn status_and_body(self) -> (StatusCode, ErrorDetail) {
        let detail = |code, message| ErrorDetail {
            code,
            message,
            checkpoint: None,
            retry_after_ms: None,
        };
        match self {
            Self::InvalidQuery(message) => (
                StatusCode::BAD_REQUEST,
                detail(ErrorCode::InvalidQuery, message),
            ),
            Self::NotFound(message) => {
                (StatusCode::NOT_FOUND, detail(ErrorCode::NotFound, message))
            }
            Self::NotCaughtUp {
                min_seq,
                checkpoint,
            } => (
                StatusCode::GATEWAY_TIMEOUT,
                ErrorDetail {
                    checkpoint: Some(checkpoint),
                    ..detail(
                        ErrorCode::NotCaughtUp,
                        format!(
                            "the view has not reached sequence {min_seq} yet (it is at {checkpoint}); try again"
                        ),
                    )
                },
            ),
            Self::Unavailable(message) => (
                StatusCode::SERVICE_UNAVAILABLE,
                detail(ErrorCode::Unavailable, message),
            ),
            Self::Overloaded(message) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorDetail {
                    retry_after_ms: Some(RETRY_OVERLOADED_AFTER_SECS * 1000),
                    ..detail(ErrorCode::Unavailable, message)
                },
            ),
            Self::Unauthorized(message) => (
                StatusCode::UNAUTHORIZED,
                detail(ErrorCode::Unauthorized, message),
            ),
            Self::Internal(message) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                detail(ErrorCode::Internal, message),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use axum::http::{HeaderValue, header};
        let shed = matches!(self, Self::Overloaded(_));
        let (status, error) = self.status_and_body();
        let mut response = (status, Json(ErrorBody { error })).into_response();
        let headers = response.headers_mut();
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if shed {
            headers.insert(header::RETRY_AFTER, RETRY_OVERLOADED_AFTER_SECS.into());
        }
        response
    }
}
