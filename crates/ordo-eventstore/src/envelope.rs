//! The stored event format. The domain's events say what happened; the envelope says which
//! aggregate, which version, when, why (command, correlation, causation) and in which schema.
//!
//! ```json
//! {"id": "…uuid…", "type": "OrderPlaced", "schema": 1, "aggregate_id": "o-1", "version": 1,
//!  "at": "2026-11-23T10:00:00Z", "command_id": "…", "correlation_id": "…",
//!  "causation_id": null, "data": {…}}
//! ```
//! The type and schema also travel as headers (`Ordo-Event-Type`, `Ordo-Schema`), so consumers can
//! route without parsing, together with `Nats-Msg-Id` (the command id) and W3C `traceparent`.

use async_nats::HeaderMap;
use chrono::{DateTime, Utc};
use ordo_domain::DomainEvent;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The schema version new events are written with.
pub const CURRENT_SCHEMA: u32 = 1;

pub const HEADER_EVENT_TYPE: &str = "Ordo-Event-Type";
pub const HEADER_SCHEMA: &str = "Ordo-Schema";
pub const HEADER_TRACEPARENT: &str = "traceparent";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventEnvelope {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    pub schema: u32,
    pub aggregate_id: String,
    /// 1 for an aggregate's first event, then +1 per event.
    pub version: u64,
    pub at: DateTime<Utc>,
    pub command_id: String,
    pub correlation_id: String,
    pub causation_id: Option<String>,
    pub data: Value,
}

/// Why an event was written: carried from the command into its event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventMetadata {
    pub command_id: String,
    pub correlation_id: String,
    pub causation_id: Option<String>,
    /// W3C trace context of the command, so one trace follows it through events and reactions.
    pub traceparent: Option<String>,
}

/// An event as read back from its stream.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub subject: String,
    pub seq: u64,
    pub envelope: EventEnvelope,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not an event envelope: {0}")]
    Envelope(String),
    #[error(
        "event {event_type} has schema {schema}, newer than this build understands ({CURRENT_SCHEMA})"
    )]
    FutureSchema { event_type: String, schema: u32 },
    #[error("event {event_type} (schema {schema}) does not match its type: {reason}")]
    Data {
        event_type: String,
        schema: u32,
        reason: String,
    },
}

impl EventEnvelope {
    pub fn new<E: DomainEvent>(
        aggregate_id: &str,
        version: u64,
        event: &E,
        metadata: &EventMetadata,
        at: DateTime<Utc>,
    ) -> Self {
        let mut tagged = serde_json::to_value(event).expect("domain events serialize");
        let data = tagged
            .get_mut("data")
            .map(Value::take)
            .unwrap_or_else(|| Value::Object(Default::default()));
        Self {
            id: Uuid::now_v7(),
            event_type: event.event_type().to_owned(),
            schema: CURRENT_SCHEMA,
            aggregate_id: aggregate_id.to_owned(),
            version,
            at,
            command_id: metadata.command_id.clone(),
            correlation_id: metadata.correlation_id.clone(),
            causation_id: metadata.causation_id.clone(),
            data,
        }
    }

    pub fn from_bytes(payload: &[u8]) -> Result<Self, DecodeError> {
        serde_json::from_slice(payload).map_err(|err| DecodeError::Envelope(err.to_string()))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("envelopes serialize")
    }

    /// The domain event, upcast from older schemas first.
    pub fn decode<E: DomainEvent>(&self) -> Result<E, DecodeError> {
        let data = upcast(&self.event_type, self.schema, self.data.clone())?;
        serde_json::from_value(serde_json::json!({"type": self.event_type, "data": data})).map_err(
            |err| DecodeError::Data {
                event_type: self.event_type.clone(),
                schema: self.schema,
                reason: err.to_string(),
            },
        )
    }

    /// The headers stored with the event. `Nats-Msg-Id` is added by the append itself.
    pub fn headers(&self, metadata: &EventMetadata) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_EVENT_TYPE, self.event_type.as_str());
        headers.insert(HEADER_SCHEMA, self.schema.to_string().as_str());
        if let Some(traceparent) = &metadata.traceparent {
            headers.insert(HEADER_TRACEPARENT, traceparent.as_str());
        }
        headers
    }
}

/// Brings `data` written under an older schema to the current one. Schema 1 is the first, so there
/// is nothing to convert yet; a change to an event's data adds a step here, never an edit of
/// stored events.
fn upcast(event_type: &str, schema: u32, data: Value) -> Result<Value, DecodeError> {
    if schema > CURRENT_SCHEMA {
        return Err(DecodeError::FutureSchema {
            event_type: event_type.to_owned(),
            schema,
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo_domain::{OrderId, stock::StockEvent};

    fn metadata() -> EventMetadata {
        EventMetadata {
            command_id: "cmd-1".into(),
            correlation_id: "corr-1".into(),
            causation_id: Some("cause-1".into()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    #[test]
    fn an_envelope_round_trips_its_event() {
        let event = StockEvent::StockReserved {
            order_id: OrderId::parse("o-1").unwrap(),
            qty: 2,
        };
        let envelope = EventEnvelope::new("A1", 3, &event, &metadata(), Utc::now());
        let stored = EventEnvelope::from_bytes(&envelope.to_bytes()).unwrap();
        assert_eq!(stored, envelope);
        assert_eq!(stored.decode::<StockEvent>().unwrap(), event);
        assert_eq!(stored.event_type, "StockReserved");
        assert_eq!(
            stored.data,
            serde_json::json!({"order_id": "o-1", "qty": 2})
        );
        let headers = envelope.headers(&metadata());
        assert_eq!(
            headers.get(HEADER_EVENT_TYPE).unwrap().as_str(),
            "StockReserved"
        );
        assert_eq!(headers.get(HEADER_SCHEMA).unwrap().as_str(), "1");
        assert!(headers.get(HEADER_TRACEPARENT).is_some());
    }

    #[test]
    fn an_event_from_a_newer_schema_is_refused_not_misread() {
        let mut envelope = EventEnvelope::new(
            "A1",
            1,
            &StockEvent::StockReceived { qty: 1 },
            &metadata(),
            Utc::now(),
        );
        envelope.schema = CURRENT_SCHEMA + 1;
        assert!(matches!(
            envelope.decode::<StockEvent>(),
            Err(DecodeError::FutureSchema { .. })
        ));
    }

    #[test]
    fn data_that_does_not_fit_its_type_is_a_decode_error() {
        let mut envelope = EventEnvelope::new(
            "A1",
            1,
            &StockEvent::StockReceived { qty: 1 },
            &metadata(),
            Utc::now(),
        );
        envelope.data = serde_json::json!({"qty": "lots"});
        assert!(matches!(
            envelope.decode::<StockEvent>(),
            Err(DecodeError::Data { .. })
        ));
    }
}
