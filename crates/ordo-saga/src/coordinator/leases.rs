//! Leases: due sagas claimed in batches, each leased to this coordinator.

use super::*;

/// Sagas claimed per statement, at most.
pub(super) const CLAIM_BATCH: usize = 64;

impl<G: PaymentGateway> Coordinator<G> {
    /// Leases up to `limit` due sagas to this coordinator.
    pub(super) async fn claim(&self, limit: usize) -> Result<Vec<Claimed>, CoordinatorError> {
        let rows = sqlx::query(
            // A running saga is never due later than its deadline (see `save`), so one range
            // scan of the `sagas_due` index finds both retries and deadlines.
            "UPDATE sagas s
             SET next_attempt_at = now() + make_interval(secs => $2), version = s.version + 1
             FROM (SELECT order_id FROM sagas
                   WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= now()
                   ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) due
             WHERE s.order_id = due.order_id
             RETURNING s.order_id, s.data, coalesce(s.deadline_at <= now(), false) AS deadline_passed,
                       s.version, s.traceparent, s.started_at",
        )
        .bind(limit as i64)
        .bind(self.config.lease().as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            match serde_json::from_value(row.get("data")) {
                Ok(saga) => claimed.push(Claimed {
                    saga,
                    version: row.get("version"),
                    deadline_passed: row.get("deadline_passed"),
                    traceparent: row.get("traceparent"),
                    placed_at: row.get("started_at"),
                }),
                Err(err) => {
                    // Claiming it again would fail the same way: set it aside, visibly.
                    let order_id: String = row.get("order_id");
                    tracing::error!(order_id, %err, "unreadable saga state; set aside for an operator");
                    metrics::counter!("ordo_sagas_unreadable_total").increment(1);
                    sqlx::query(
                        "UPDATE sagas SET next_attempt_at = NULL, reason = $2, updated_at = now()
                         WHERE order_id = $1",
                    )
                    .bind(&order_id)
                    .bind(format!("unreadable saga state: {err}"))
                    .execute(&self.pool)
                    .await?;
                }
            }
        }
        Ok(claimed)
    }
}
