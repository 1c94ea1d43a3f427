//! `{"error": {"code", "message"}}` with the status that goes with the code.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

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
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        tracing::warn!(%err, "read failed");
        Self::Unavailable(format!("PostgreSQL is unavailable: {err}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            Self::InvalidQuery(message) => (
                StatusCode::BAD_REQUEST,
                json!({"error": {"code": "invalid_query", "message": message}}),
            ),
            Self::NotFound(message) => (
                StatusCode::NOT_FOUND,
                json!({"error": {"code": "not_found", "message": message}}),
            ),
            Self::NotCaughtUp {
                min_seq,
                checkpoint,
            } => (
                StatusCode::GATEWAY_TIMEOUT,
                json!({"error": {
                    "code": "not_caught_up",
                    "message": format!("the view has not reached sequence {min_seq} yet (it is at {checkpoint}); try again"),
                    "checkpoint": checkpoint
                }}),
            ),
            Self::Unavailable(message) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": {"code": "unavailable", "message": message}}),
            ),
            Self::Overloaded(message) => {
                let body = json!({"error": {
                    "code": "unavailable",
                    "message": message,
                    "retry_after_ms": RETRY_OVERLOADED_AFTER_SECS * 1000
                }});
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(
                        axum::http::header::RETRY_AFTER,
                        RETRY_OVERLOADED_AFTER_SECS.to_string(),
                    )],
                    Json(body),
                )
                    .into_response();
            }
            Self::Unauthorized(message) => {
                let body = json!({"error": {"code": "unauthorized", "message": message}});
                return (
                    StatusCode::UNAUTHORIZED,
                    [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                    Json(body),
                )
                    .into_response();
            }
        };
        (status, Json(body)).into_response()
    }
}
