//! The stock view: on hand, reserved and available per SKU.

use ordo_domain::stock::StockEvent;
use ordo_eventstore::RecordedEvent;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgConnection;

use crate::{
    ApplyError, Projection,
    projection::{bigint, timestamp, update_all, write_all},
};

pub struct StockView;

impl Projection for StockView {
    const NAME: &'static str = "stock";
    const CONSUMER: ordo_eventstore::ConsumerId = ordo_eventstore::ConsumerId::StockView;
    const DDL: &'static str = include_str!("../../../projections/stock.sql");

    async fn apply(
        connection: &mut PgConnection,
        recorded: &RecordedEvent,
    ) -> Result<(), ApplyError> {
        let envelope = &recorded.envelope;
        let event: StockEvent = envelope
            .decode()
            .map_err(|err| ApplyError::Rejected(err.to_string()))?;
        // (change of on hand, change of reserved)
        let (on_hand, reserved) = changes(&event)?;
        let (sku, version, seq) = (
            &envelope.aggregate_id,
            bigint(envelope.version, "version")?,
            bigint(recorded.seq, "seq")?,
        );
        let changed = if version == 1 {
            sqlx::query(
                "INSERT INTO stock (sku, on_hand, reserved, version, updated_at, last_seq)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(sku)
            .bind(on_hand)
            .bind(reserved)
            .bind(version)
            .bind(envelope.at)
            .bind(seq)
            .execute(&mut *connection)
            .await?
        } else {
            sqlx::query(
                "UPDATE stock SET on_hand = on_hand + $2, reserved = reserved + $3, version = $4,
                                  updated_at = $5, last_seq = $6
                 WHERE sku = $1 AND version = $4 - 1",
            )
            .bind(sku)
            .bind(on_hand)
            .bind(reserved)
            .bind(version)
            .bind(envelope.at)
            .bind(seq)
            .execute(&mut *connection)
            .await?
        };
        if changed.rows_affected() != 1 {
            return Err(ApplyError::Rejected(format!(
                "{} of {sku} (version {version}) does not follow the SKU's version in the view",
                envelope.event_type
            )));
        }
        Ok(())
    }

    async fn apply_all(
        connection: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<bool, ApplyError> {
        let Some(folded) = fold(events) else {
            return Ok(false);
        };
        let (mut new, mut changed, mut changed_skus) = (Vec::new(), Vec::new(), Vec::new());
        for sku in folded {
            let row = json!({
                "sku": sku.sku,
                "on_hand": sku.on_hand,
                "reserved": sku.reserved,
                "first_version": sku.first_version,
                "version": sku.version,
                "updated_at": timestamp(&sku.updated_at),
                "last_seq": sku.last_seq,
            });
            if sku.first_version == 1 {
                new.push(row);
            } else {
                changed.push(row);
                changed_skus.push(sku.sku);
            }
        }
        // Any row not written (a SKU already there, a version that does not follow, a count
        // out of bounds): the batch goes event by event, which finds the event and parks it.
        Ok(write_all(connection, INSERT_STOCK, new).await?
            && update_all(connection, UPDATE_STOCK, changed, changed_skus).await?)
    }
}

const INSERT_STOCK: &str = "
    INSERT INTO stock (sku, on_hand, reserved, version, updated_at, last_seq)
    SELECT sku, on_hand, reserved, version, updated_at, last_seq
    FROM jsonb_to_recordset($1) AS r(sku text, on_hand bigint, reserved bigint, version bigint,
         updated_at timestamptz, last_seq bigint)";

const UPDATE_STOCK: &str = "
    UPDATE stock s SET on_hand = s.on_hand + u.on_hand, reserved = s.reserved + u.reserved,
           version = u.version, updated_at = u.updated_at, last_seq = u.last_seq
    FROM jsonb_to_recordset($1) AS u(sku text, on_hand bigint, reserved bigint,
         first_version bigint, version bigint, updated_at timestamptz, last_seq bigint)
    WHERE s.sku = u.sku AND s.version = u.first_version - 1 AND s.sku = ANY($2)";

/// What a batch's events come to for one SKU: the changes of its counts, summed.
struct FoldedSku {
    sku: String,
    on_hand: i64,
    reserved: i64,
    first_version: i64,
    version: i64,
    updated_at: DateTime<Utc>,
    last_seq: i64,
}

/// The batch's events folded per SKU; `None` when an event cannot be read, does not follow the
/// SKU's previous event in the batch, or a sum would not fit.
fn fold(events: &[RecordedEvent]) -> Option<Vec<FoldedSku>> {
    let mut skus: Vec<FoldedSku> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for recorded in events {
        let envelope = &recorded.envelope;
        let (on_hand, reserved) = changes(&envelope.decode().ok()?).ok()?;
        let version = i64::try_from(envelope.version).ok()?;
        let last_seq = i64::try_from(recorded.seq).ok()?;
        match index.get(envelope.aggregate_id.as_str()) {
            Some(&at) => {
                let sku = &mut skus[at];
                if version != sku.version + 1 {
                    return None;
                }
                sku.on_hand = sku.on_hand.checked_add(on_hand)?;
                sku.reserved = sku.reserved.checked_add(reserved)?;
                sku.version = version;
                sku.updated_at = envelope.at;
                sku.last_seq = last_seq;
            }
            None => {
                index.insert(&envelope.aggregate_id, skus.len());
                skus.push(FoldedSku {
                    sku: envelope.aggregate_id.clone(),
                    on_hand,
                    reserved,
                    first_version: version,
                    version,
                    updated_at: envelope.at,
                    last_seq,
                });
            }
        }
    }
    Some(skus)
}

/// How an event changes (on hand, reserved).
fn changes(event: &StockEvent) -> Result<(i64, i64), ApplyError> {
    Ok(match event {
        StockEvent::StockReceived { qty } => (bigint(*qty, "qty")?, 0),
        StockEvent::StockReserved { qty, .. } => (0, bigint(*qty, "qty")?),
        StockEvent::StockReleased { qty, .. } => (0, -bigint(*qty, "qty")?),
        StockEvent::StockDeducted { qty, .. } => (-bigint(*qty, "qty")?, -bigint(*qty, "qty")?),
    })
}
