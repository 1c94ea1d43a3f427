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
    /// How many messages an atomic batch stored (the batch's acknowledgement only).
    #[serde(default)]
    count: Option<u64>,
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

/// One message of an atomic batch.
#[derive(Debug, Clone)]
pub struct BatchMessage {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// Stores `messages` in their stream all together or not at all: a JetStream atomic batch
/// (nats-server 2.12+, the stream's `allow_atomic`). Each message's own conditions
/// (`Nats-Expected-Last-Subject-Sequence`, `Nats-Msg-Id`) are checked against the stream as it
/// was before the batch; one that fails fails the batch. Returns each message's stream sequence.
///
/// Sent once: the caller finds out what became of a batch whose answer was lost (every ordo
/// write is preceded by a record saying what it expected), rather than sending it again.
pub async fn atomic_publish(
    client: &async_nats::Client,
    messages: Vec<BatchMessage>,
    timeout: Duration,
) -> Result<Vec<u64>, PublishError> {
    let count = messages.len() as u64;
    let batch_id = uuid::Uuid::new_v4().simple().to_string();
    let mut commit = None;
    for (index, message) in messages.into_iter().enumerate() {
        let BatchMessage {
            subject,
            mut headers,
            payload,
        } = message;
        headers.insert("Nats-Batch-Id", batch_id.as_str());
        headers.insert("Nats-Batch-Sequence", (index + 1).to_string().as_str());
        if index as u64 + 1 == count {
            headers.insert("Nats-Batch-Commit", "1");
            commit = Some((subject, headers, payload));
        } else {
            client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|err| PublishError::Unavailable(err.to_string()))?;
        }
    }
    let Some((subject, headers, payload)) = commit else {
        return Ok(Vec::new());
    };
    let request = async_nats::Request::new()
        .payload(payload)
        .headers(headers)
        .timeout(Some(timeout));
    let answer = client
        .send_request(subject.clone(), request)
        .await
        .map_err(|err| PublishError::Unavailable(format!("batch on {subject}: {err}")))?;
    let ack: PubAckResponse = serde_json::from_slice(&answer.payload).map_err(|err| {
        PublishError::Unavailable(format!("unreadable answer from JetStream: {err}"))
    })?;
    if let Some(error) = ack.error {
        let code = ErrorCode(error.err_code);
        if CONFLICTS.contains(&code) {
            return Err(PublishError::Conflict {
                subject,
                expected: 0,
            });
        }
        return Err(PublishError::Refused {
            code: error.err_code,
            description: error.description,
        });
    }
    if ack.count != Some(count) || ack.seq < count {
        return Err(PublishError::Unavailable(format!(
            "JetStream acknowledged a batch of {count} as {:?} ending at {}",
            ack.count, ack.seq
        )));
    }
    Ok((ack.seq + 1 - count..=ack.seq).collect())
}
