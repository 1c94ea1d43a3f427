//! An aggregate's events as they are stored, for a person to read (the console and
//! `GET /orders/{id}/history`): each with the trace context it was written under. Read by direct
//! gets, one event after another, so the reader needs no consumer (the read API's NATS user may
//! create none).

use async_nats::jetstream::{self, stream::DirectGetErrorKind};

use crate::{EventEnvelope, LoadError, RecordedEvent, envelope::HEADER_TRACEPARENT};

/// An event with what its headers say of how it was written.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub recorded: RecordedEvent,
    /// The W3C `traceparent` of the command that wrote it, if it had one.
    pub traceparent: Option<String>,
}

impl StoredEvent {
    /// The trace id of its `traceparent` (`00-<trace id>-<span id>-<flags>`), when it is a valid
    /// one: 32 lowercase hex digits, not all zero.
    pub fn trace_id(&self) -> Option<&str> {
        let trace_id = self.traceparent.as_deref()?.split('-').nth(1)?;
        let valid = trace_id.len() == 32
            && trace_id
                .bytes()
                .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
            && trace_id.bytes().any(|byte| byte != b'0');
        valid.then_some(trace_id)
    }
}

/// The first events of a subject, oldest first.
#[derive(Debug, Clone)]
pub struct SubjectHistory {
    pub events: Vec<StoredEvent>,
    /// True when the subject has more events than were read.
    pub more: bool,
}

/// The events of `subject` in `stream`, oldest first, at most `at_most` of them, none after
/// sequence `up_to` when one is given.
pub async fn read_subject(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    up_to: Option<u64>,
    at_most: usize,
) -> Result<SubjectHistory, LoadError> {
    let unavailable = |err: &dyn std::fmt::Display| LoadError::Unavailable(err.to_string());
    let stream = js
        .get_stream_no_info(stream)
        .await
        .map_err(|err| unavailable(&err))?;
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let message = match stream
            .direct_get_next_for_subject(subject, Some(after + 1))
            .await
        {
            Ok(message) => message,
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => break,
            Err(err) => return Err(unavailable(&err)),
        };
        if up_to.is_some_and(|up_to| message.sequence > up_to) {
            break;
        }
        if events.len() == at_most {
            return Ok(SubjectHistory { events, more: true });
        }
        let envelope =
            EventEnvelope::from_bytes(&message.payload).map_err(|source| LoadError::Corrupt {
                subject: subject.to_owned(),
                seq: message.sequence,
                source,
            })?;
        after = message.sequence;
        events.push(StoredEvent {
            traceparent: message
                .headers
                .get(HEADER_TRACEPARENT)
                .map(|value| value.as_str().to_owned()),
            recorded: RecordedEvent {
                subject: message.subject.to_string(),
                seq: message.sequence,
                envelope,
            },
        });
    }
    Ok(SubjectHistory {
        events,
        more: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_traceparent(traceparent: Option<&str>) -> StoredEvent {
        StoredEvent {
            recorded: RecordedEvent {
                subject: "ordo.order.events.o-1".into(),
                seq: 1,
                envelope: EventEnvelope {
                    id: uuid::Uuid::nil(),
                    event_type: "OrderPlaced".into(),
                    schema: 1,
                    aggregate_id: "o-1".into(),
                    version: 1,
                    at: chrono::Utc::now(),
                    command_id: "c".into(),
                    correlation_id: "c".into(),
                    causation_id: None,
                    data: serde_json::json!({}),
                },
            },
            traceparent: traceparent.map(str::to_owned),
        }
    }

    #[test]
    fn the_trace_id_is_read_from_a_valid_traceparent_only() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let valid = format!("00-{id}-00f067aa0ba902b7-01");
        assert_eq!(with_traceparent(Some(&valid)).trace_id(), Some(id));
        for invalid in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-<script>-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(
                with_traceparent(Some(invalid)).trace_id(),
                None,
                "{invalid}"
            );
        }
        assert_eq!(with_traceparent(None).trace_id(), None);
    }
}
