//! The one conditional append every write goes through: a JetStream publish with
//! `Nats-Expected-Last-Subject-Sequence` and `Nats-Msg-Id`, sent as a plain request so that every
//! error code of the answer can be told apart (async-nats only maps 10071).

use std::time::Duration;

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use serde::Deserialize;

use async_nats::jetstream::ErrorCode;

/// Answers that mean "another append got there first" (10164 on replicated streams).
const CONFLICTS: [ErrorCode; 2] = [
    ErrorCode::STREAM_WRONG_LAST_SEQUENCE,
    ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT,
];
/// Answers after which sending the same message again is right: the first publish of this id
/// is still being stored; the per-subject sequence is not known yet (replicated streams, 2.11+);
/// the stream is offline for a moment (a leader election, a restart).
const TRANSIENT: [ErrorCode; 4] = [
    ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT,
    ErrorCode::STREAM_EXPECTED_LAST_SEQ_PER_SUBJECT_NOT_READY,
    ErrorCode::STREAM_OFFLINE,
    ErrorCode::STREAM_OFFLINE_REASON,
];

/// How many times an append whose outcome is unknown is sent again. Safe, because the repeat
/// carries the same `Nats-Msg-Id` and is recognised as a duplicate if the first one was stored.
const ATTEMPTS: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The stream sequence of the stored message.
    pub seq: u64,
    /// True when the message id was already stored: `seq` is then the first message's sequence.
    pub duplicate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("{subject} has moved on: its last sequence is no longer {expected}")]
    Conflict { subject: String, expected: u64 },
    #[error("JetStream is unavailable: {0}")]
    Unavailable(String),
    #[error("JetStream refused the message: {description} (error {code})")]
    Refused { code: u64, description: String },
}

#[derive(Deserialize)]
struct PubAckResponse {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// Publishes `payload` to `subject` if the subject's last stream sequence is still
/// `expected_last_subject_seq` (0: the subject has no message yet).
pub async fn conditional_publish(
    client: &async_nats::Client,
    subject: &str,
    mut headers: HeaderMap,
    payload: Bytes,
    msg_id: &str,
    expected_last_subject_seq: u64,
    timeout: Duration,
) -> Result<Appended, PublishError> {
    headers.insert("Nats-Msg-Id", msg_id);
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        expected_last_subject_seq.to_string().as_str(),
    );
    let mut last_problem = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
        }
        let request = async_nats::Request::new()
            .payload(payload.clone())
            .headers(headers.clone())
            .timeout(Some(timeout));
        let answer = match client.send_request(subject.to_owned(), request).await {
            Ok(answer) => answer,
            Err(err) => {
                last_problem = match err.kind() {
                    RequestErrorKind::TimedOut => {
                        format!("no answer from JetStream within {timeout:?}")
                    }
                    RequestErrorKind::NoResponders => {
                        format!(
                            "no stream answers on {subject} (is JetStream up and the stream applied?)"
                        )
                    }
                    _ => err.to_string(),
                };
                tracing::debug!(subject, attempt, problem = %last_problem, "append outcome unknown, sending again");
                continue;
            }
        };
        let ack: PubAckResponse = serde_json::from_slice(&answer.payload).map_err(|err| {
            PublishError::Unavailable(format!("unreadable answer from JetStream: {err}"))
        })?;
        let Some(error) = ack.error else {
            return Ok(Appended {
                seq: ack.seq,
                duplicate: ack.duplicate,
            });
        };
        let code = ErrorCode(error.err_code);
        if CONFLICTS.contains(&code) {
            return Err(PublishError::Conflict {
                subject: subject.to_owned(),
                expected: expected_last_subject_seq,
            });
        }
        if !TRANSIENT.contains(&code) {
            return Err(PublishError::Refused {
                code: error.err_code,
                description: error.description,
            });
        }
        last_problem = error.description;
    }
    Err(PublishError::Unavailable(last_problem))
}
