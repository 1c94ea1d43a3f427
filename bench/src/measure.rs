//! Latencies and outcomes of one scenario, and the closed-loop driver that collects them.

use ordo_contract::Endpoint;
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use serde_json::Value;

/// What one scenario measured.
#[derive(Debug, Clone)]
pub struct Figures {
    pub scenario: String,
    /// Operations that got an answer (errors included).
    pub operations: usize,
    pub elapsed: Duration,
    /// Sorted.
    pub latencies: Vec<Duration>,
    /// Answers by kind: `ok`, an error code, or `no reply`.
    pub outcomes: BTreeMap<String, usize>,
}

impl Figures {
    pub fn new(
        scenario: impl Into<String>,
        elapsed: Duration,
        samples: Vec<(Duration, String)>,
    ) -> Self {
        let mut latencies: Vec<Duration> = samples.iter().map(|(latency, _)| *latency).collect();
        latencies.sort();
        let mut outcomes = BTreeMap::new();
        for (_, outcome) in samples {
            *outcomes.entry(outcome).or_insert(0) += 1;
        }
        Self {
            scenario: scenario.into(),
            operations: latencies.len(),
            elapsed,
            latencies,
            outcomes,
        }
    }

    pub fn per_second(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency below which a share `p` of the operations fall (nearest rank).
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((self.latencies.len() as f64) * p).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1]
    }

    pub fn max(&self) -> Duration {
        self.latencies.last().copied().unwrap_or_default()
    }

    /// Answers other than `ok` (or, for sagas, `confirmed`).
    pub fn errors(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|(outcome, _)| !["ok", "confirmed"].contains(&outcome.as_str()))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn outcomes_text(&self) -> String {
        self.outcomes
            .iter()
            .map(|(outcome, n)| format!("{outcome}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub fn ms(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1000.0)
}

/// The outcome of a command reply: `ok` or its error code.
pub fn reply_outcome(payload: &[u8]) -> String {
    let reply: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    if reply["ok"] == true {
        "ok".to_owned()
    } else {
        reply["error"]["code"]
            .as_str()
            .unwrap_or("unreadable reply")
            .to_owned()
    }
}

/// Sends every request as a NATS request, `concurrency` at a time, as clients would.
pub async fn closed_loop(
    client: &async_nats::Client,
    scenario: impl Into<String>,
    concurrency: usize,
    requests: Vec<(Endpoint, Value)>,
) -> Figures {
    let started = Instant::now();
    let samples: Vec<(Duration, String)> = stream::iter(requests)
        .map(|(endpoint, body)| async move {
            let sent = Instant::now();
            let reply = client
                .request(
                    endpoint.subject(),
                    serde_json::to_vec(&body).expect("json").into(),
                )
                .await;
            let outcome = match reply {
                Ok(reply) => reply_outcome(&reply.payload),
                Err(_) => "no reply".to_owned(),
            };
            (sent.elapsed(), outcome)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    Figures::new(scenario, started.elapsed(), samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples = (1..=100)
            .map(|i| (Duration::from_millis(i), "ok".to_owned()))
            .collect();
        let figures = Figures::new("x", Duration::from_secs(1), samples);
        assert_eq!(figures.percentile(0.5), Duration::from_millis(50));
        assert_eq!(figures.percentile(0.99), Duration::from_millis(99));
        assert_eq!(figures.max(), Duration::from_millis(100));
        assert_eq!(figures.per_second(), 100.0);
        assert_eq!(figures.errors(), 0);
    }
}
