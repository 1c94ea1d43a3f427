//! Per-customer rate limits on `order.place`: a token bucket per customer, kept in the JetStream
//! key-value bucket `ordo_rate_limits` (stream `KV_ordo_rate_limits`), so that every
//! command-service instance draws from the same bucket. A take is a read and a conditional
//! write on the entry's revision; when another instance wrote first, it reads again.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};

/// The key-value bucket holding one entry per customer.
pub const BUCKET: &str = "ordo_rate_limits";

/// How fast one customer may place orders.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CustomerRate {
    /// Orders per second, sustained.
    pub per_second: f64,
    /// Orders at once, after a pause.
    pub burst: u32,
}

/// A customer's bucket as stored: the tokens left at `at_ms` (milliseconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

/// What a take decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    Admitted,
    /// Over the limit: the next token is there after `retry_after`.
    Limited {
        retry_after: Duration,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("the rate limits cannot be read or written: {0}")]
pub struct RateLimitError(String);

impl CustomerRate {
    /// Refills `bucket` up to `now_ms` and takes one token if there is one: the bucket to
    /// store, or how long until the next token.
    fn take(&self, bucket: Option<Bucket>, now_ms: i64) -> Result<Bucket, Duration> {
        let burst = f64::from(self.burst.max(1));
        let tokens = match bucket {
            None => burst,
            Some(bucket) => {
                let elapsed = (now_ms - bucket.at_ms).max(0) as f64 / 1000.0;
                (bucket.tokens + elapsed * self.per_second).min(burst)
            }
        };
        if tokens >= 1.0 {
            Ok(Bucket {
                tokens: tokens - 1.0,
                at_ms: now_ms,
            })
        } else {
            let wait = (1.0 - tokens) / self.per_second.max(f64::MIN_POSITIVE);
            Err(Duration::from_secs_f64(wait.min(3600.0)).max(Duration::from_millis(1)))
        }
    }
}

/// The limiter of one command-service instance.
pub struct CustomerLimiter {
    rate: CustomerRate,
    store: kv::Store,
}

impl CustomerLimiter {
    /// Opens the bucket, creating it when missing (an entry lives at most an hour: by then any
    /// bucket is full again, which is what no entry means).
    pub async fn open(
        js: &jetstream::Context,
        rate: CustomerRate,
        replicas: usize,
    ) -> Result<Self, RateLimitError> {
        let config = kv::Config {
            bucket: BUCKET.into(),
            description: "ordo: per-customer token buckets of order.place".into(),
            history: 1,
            max_age: Duration::from_secs(3600),
            // One small entry per customer who placed an order in the last hour.
            max_bytes: 64 * 1024 * 1024,
            num_replicas: replicas.max(1),
            ..Default::default()
        };
        let store = ordo_eventstore::key_value(js, config)
            .await
            .map_err(RateLimitError)?;
        Ok(Self { rate, store })
    }

    /// Takes one token of `customer_id`'s bucket.
    pub async fn take(&self, customer_id: &str) -> Result<Admission, RateLimitError> {
        let key = format!("customer.{customer_id}");
        for _ in 0..8 {
            let entry = self
                .store
                .entry(&key)
                .await
                .map_err(|err| RateLimitError(err.to_string()))?;
            let (bucket, revision) = match &entry {
                Some(entry) if entry.operation == kv::Operation::Put => (
                    serde_json::from_slice::<Bucket>(&entry.value).ok(),
                    Some(entry.revision),
                ),
                Some(entry) => (None, Some(entry.revision)),
                None => (None, None),
            };
            let now_ms = chrono::Utc::now().timestamp_millis();
            let taken = match self.rate.take(bucket, now_ms) {
                Ok(taken) => taken,
                Err(retry_after) => return Ok(Admission::Limited { retry_after }),
            };
            let value = serde_json::to_vec(&taken)
                .expect("buckets serialize")
                .into();
            let written = match revision {
                Some(revision) => self.store.update(&key, value, revision).await.is_ok(),
                None => self.store.create(&key, value).await.is_ok(),
            };
            if written {
                return Ok(Admission::Admitted);
            }
            // Another instance took from this bucket meanwhile: read it again.
        }
        Err(RateLimitError(format!(
            "the bucket of {customer_id} kept changing under 8 tries"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: CustomerRate = CustomerRate {
        per_second: 2.0,
        burst: 3,
    };

    #[test]
    fn a_new_customer_has_a_full_bucket_and_each_order_takes_one_token() {
        let mut bucket = None;
        for _ in 0..3 {
            bucket = Some(RATE.take(bucket, 0).expect("within the burst"));
        }
        let wait = RATE.take(bucket, 0).unwrap_err();
        assert_eq!(
            wait,
            Duration::from_millis(500),
            "2 per second: a token every 500 ms"
        );
    }

    #[test]
    fn tokens_come_back_at_the_rate_up_to_the_burst() {
        let empty = Some(Bucket {
            tokens: 0.0,
            at_ms: 0,
        });
        assert_eq!(
            RATE.take(empty, 250).unwrap_err(),
            Duration::from_millis(250)
        );
        let refilled = RATE.take(empty, 500).expect("one token after 500 ms");
        assert_eq!(refilled.tokens, 0.0);
        let after_a_long_pause = RATE.take(empty, 60_000).unwrap();
        assert_eq!(after_a_long_pause.tokens, 2.0, "never more than the burst");
    }
}
