//! The payment step's gateway. Pluggable; the default is a simulation whose decline rate and
//! latency are configurable, so the saga's failure paths can be exercised end to end. With a
//! ledger (the `payments` table), it keeps what it authorised and refunded, as a real gateway
//! would, so that a drill can check every order's payment against its outcome.

use std::time::Duration;

use ordo_domain::OrderId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// A definite no: the saga compensates.
    #[error("payment declined: {0}")]
    Declined(String),
    /// No answer: the saga retries, then compensates as if it had been authorised.
    #[error("payment gateway unavailable: {0}")]
    Unavailable(String),
}

/// Authorises and refunds an order's payment. Both must be idempotent per order: the saga may
/// call them again after a crash or a lost answer.
pub trait PaymentGateway: Send + Sync + 'static {
    fn authorize(
        &self,
        order_id: &OrderId,
        amount_cents: u64,
    ) -> impl Future<Output = Result<(), PaymentError>> + Send;

    fn refund(
        &self,
        order_id: &OrderId,
        amount_cents: u64,
    ) -> impl Future<Output = Result<(), PaymentError>> + Send;
}

/// A gateway that answers after `latency` and declines a `decline_rate` share of orders. Whether
/// an order is declined depends on its id only, so asking again gives the same answer.
#[derive(Debug, Clone)]
pub struct SimulatedGateway {
    pub decline_rate: f64,
    pub latency: Duration,
    /// Where authorisations and refunds are recorded; none: they are only simulated.
    pub ledger: Option<sqlx::PgPool>,
}

impl Default for SimulatedGateway {
    fn default() -> Self {
        Self {
            decline_rate: 0.0,
            latency: Duration::from_millis(5),
            ledger: None,
        }
    }
}

impl SimulatedGateway {
    fn declines(&self, order_id: &OrderId) -> bool {
        // FNV-1a of the order id, as a number in [0, 1).
        let hash = order_id
            .as_str()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            });
        (hash % 10_000) as f64 / 10_000.0 < self.decline_rate
    }
}

impl PaymentGateway for SimulatedGateway {
    async fn authorize(&self, order_id: &OrderId, amount_cents: u64) -> Result<(), PaymentError> {
        tokio::time::sleep(self.latency).await;
        if self.declines(order_id) {
            return Err(PaymentError::Declined(format!(
                "the simulated gateway declined {amount_cents} cents for order {order_id}"
            )));
        }
        let Some(ledger) = &self.ledger else {
            return Ok(());
        };
        let refunded: Option<bool> = sqlx::query_scalar(
            "INSERT INTO payments (order_id, amount_cents, authorized_at) VALUES ($1, $2, now())
             ON CONFLICT (order_id) DO UPDATE SET amount_cents = payments.amount_cents
             RETURNING refunded_at IS NOT NULL AND authorized_at IS NULL",
        )
        .bind(order_id.as_str())
        .bind(cents(amount_cents)?)
        .fetch_optional(ledger)
        .await
        .map_err(unavailable)?;
        if refunded == Some(true) {
            return Err(PaymentError::Declined(format!(
                "the payment of order {order_id} was refunded before it was authorised"
            )));
        }
        Ok(())
    }

    async fn refund(&self, order_id: &OrderId, amount_cents: u64) -> Result<(), PaymentError> {
        tokio::time::sleep(self.latency).await;
        let Some(ledger) = &self.ledger else {
            return Ok(());
        };
        sqlx::query(
            "INSERT INTO payments (order_id, amount_cents, refunded_at) VALUES ($1, $2, now())
             ON CONFLICT (order_id) DO UPDATE SET refunded_at = coalesce(payments.refunded_at, now())",
        )
        .bind(order_id.as_str())
        .bind(cents(amount_cents)?)
        .execute(ledger)
        .await
        .map_err(unavailable)?;
        Ok(())
    }
}

fn cents(amount_cents: u64) -> Result<i64, PaymentError> {
    i64::try_from(amount_cents).map_err(|_| {
        PaymentError::Declined(format!(
            "{amount_cents} cents is more than the ledger holds"
        ))
    })
}

fn unavailable(err: sqlx::Error) -> PaymentError {
    PaymentError::Unavailable(format!("the ledger: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decline_rate_is_about_the_share_declined_and_each_order_always_gets_the_same_answer() {
        let gateway = SimulatedGateway {
            decline_rate: 0.3,
            latency: Duration::ZERO,
            ledger: None,
        };
        let orders: Vec<OrderId> = (0..2000)
            .map(|i| OrderId::parse(format!("o-{i}")).unwrap())
            .collect();
        let declined = orders
            .iter()
            .filter(|order| gateway.declines(order))
            .count();
        assert!((500..700).contains(&declined), "{declined} of 2000");
        assert!(
            orders
                .iter()
                .all(|order| gateway.declines(order) == gateway.declines(order))
        );
        let never = SimulatedGateway::default();
        assert!(orders.iter().all(|order| !never.declines(order)));
        let always = SimulatedGateway {
            decline_rate: 1.0,
            latency: Duration::ZERO,
            ledger: None,
        };
        assert!(orders.iter().all(|order| always.declines(order)));
    }
}
