//! The stock view: on hand, reserved and available per SKU.

use ordo_domain::stock::StockEvent;
use ordo_eventstore::RecordedEvent;
use sqlx::PgConnection;

use crate::{ApplyError, Projection, projection::bigint};

pub struct StockView;

impl Projection for StockView {
    const NAME: &'static str = "stock";
    const STREAM: &'static str = "ORDO_STOCK";
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
        let (on_hand, reserved): (i64, i64) = match &event {
            StockEvent::StockReceived { qty } => (bigint(*qty, "qty")?, 0),
            StockEvent::StockReserved { qty, .. } => (0, bigint(*qty, "qty")?),
            StockEvent::StockReleased { qty, .. } => (0, -bigint(*qty, "qty")?),
            StockEvent::StockDeducted { qty, .. } => (-bigint(*qty, "qty")?, -bigint(*qty, "qty")?),
        };
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
}
