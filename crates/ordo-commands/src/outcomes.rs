//! The first outcome of every command id, so that a repeated command returns it and appends
//! nothing, also after JetStream's 2-minute duplicate window.
//!
//! Each command id has one subject, `ordo.outcomes.<sha256(command id)>`, holding one message
//! (its revision is the stream sequence; writes are conditional on it). The record is written
//! *before* the event is appended:
//! - `appending {category, aggregate_id, expected_last_seq}`: the event, if it was stored, is the
//!   first message on the aggregate's subject after `expected_last_seq` (the append was conditional on exactly that),
//!   so a retry can tell whether the append happened even if the process died right after it.
//! - `rejected {reply}`: the domain refused; the refusal is the outcome.
//!
//! Successful outcomes are read back from the event itself: the event stream stays the one truth.

use std::collections::HashMap;

use ordo_contract::Reply;
use ordo_eventstore::{EventStore, LoadError, PublishError};
use serde::{Deserialize, Serialize};

use crate::intake::hex_digest;

pub const OUTCOMES_STREAM: &str = ordo_eventstore::StreamId::CommandOutcomes.name();

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeRecord {
    pub command_id: String,
    pub fingerprint: String,
    #[serde(flatten)]
    pub state: OutcomeState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum OutcomeState {
    Appending {
        category: String,
        aggregate_id: String,
        expected_last_seq: u64,
        /// The writer's batch the event goes in (its `Ordo-Batch-Id`), when a batch sends it:
        /// only that batch's chain, cut short, may still be followed by this event.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        batch: Option<String>,
    },
    Rejected {
        reply: Reply,
    },
}

#[derive(Clone)]
pub struct Outcomes {
    store: EventStore,
}

impl Outcomes {
    pub fn new(store: EventStore) -> Self {
        Self { store }
    }

    fn subject(command_id: &str) -> String {
        format!("ordo.outcomes.{}", hex_digest(command_id))
    }

    /// The command id's record and its revision (the stream sequence it was written at; 0 when
    /// there is none). An unreadable record comes back as `None` with its revision, so that it is
    /// overwritten rather than blocking the command id forever.
    pub async fn get(&self, command_id: &str) -> Result<(u64, Option<OutcomeRecord>), LoadError> {
        let Some((revision, payload)) = self
            .store
            .last_message(OUTCOMES_STREAM, &Self::subject(command_id))
            .await?
        else {
            return Ok((0, None));
        };
        match serde_json::from_slice::<OutcomeRecord>(&payload) {
            Ok(record) => Ok((revision, Some(record))),
            Err(err) => {
                tracing::warn!(command_id, %err, "unreadable command outcome record; overwriting it");
                Ok((revision, None))
            }
        }
    }

    /// The records of many command ids in one request: `command id → (revision, record)`, for
    /// those that have one (an unreadable record comes back as `None` with its revision).
    pub async fn get_many(
        &self,
        command_ids: &[&str],
    ) -> Result<HashMap<String, (u64, Option<OutcomeRecord>)>, LoadError> {
        let subjects: Vec<String> = command_ids.iter().map(|id| Self::subject(id)).collect();
        let found = self.store.last_messages(OUTCOMES_STREAM, &subjects).await?;
        Ok(command_ids
            .iter()
            .zip(&subjects)
            .filter_map(|(command_id, subject)| {
                let (revision, payload) = found.get(subject)?;
                let record = serde_json::from_slice::<OutcomeRecord>(payload).ok();
                Some(((*command_id).to_owned(), (*revision, record)))
            })
            .collect())
    }

    fn msg_id(subject: &str, revision: u64, payload: &str) -> String {
        format!("{subject}@{revision}#{}", &hex_digest(payload)[..32])
    }

    /// Writes `record` if the command id's record is still at `revision` (0: none yet).
    ///
    /// The message id names the revision and the record's bytes, so that a *different* record
    /// at the same revision (two runs of one command id racing, or a void racing a late
    /// reserve) can never be taken for a repeat of the first and told it was written, whichever
    /// check a server makes first. (nats-server 2.15 checks the expected sequence before the
    /// message id; a server that checked the id first would have answered "duplicate" to a
    /// message id of the revision alone.) A write sent again after a lost acknowledgement is a
    /// conflict or a repeat; either way the caller reads the record again.
    pub async fn put(&self, record: &OutcomeRecord, revision: u64) -> Result<u64, PublishError> {
        let subject = Self::subject(&record.command_id);
        let payload = serde_json::to_string(record).expect("outcome records serialize");
        let msg_id = Self::msg_id(&subject, revision, &payload);
        self.store
            .publish_if_last(&subject, payload.into_bytes(), &msg_id, revision)
            .await
            .map(|appended| appended.seq)
    }
}
