//! The NATS micro service protocol (ADR-32) of the command service, so that `nats micro
//! ls|info|stats ordo` see every instance: it answers `$SRV.PING|INFO|STATS` (for all services,
//! for `ordo`, and for this instance's id) and keeps each endpoint's counts.
//!
//! Written here rather than taken from async-nats's `service` module: that module counts an
//! error only for a reply it sends with an empty body, and ordo's error replies keep their JSON
//! body (the wire contract) while carrying `Nats-Service-Error` and `Nats-Service-Error-Code`.
//! Counting them here makes `num_errors` tell the truth.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::{Value, json};

/// One endpoint as `nats micro info` shows it.
#[derive(Debug, Clone)]
pub struct EndpointInfo {
    pub name: String,
    pub subject: String,
    /// Strings about the endpoint (ADR-32's `metadata`): for ordo's, whether it is internal
    /// and the JSON Schemas of its request and reply.
    pub metadata: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, Default)]
struct EndpointStats {
    requests: u64,
    errors: u64,
    processing: Duration,
    last_error: String,
}

/// What one instance of a micro service says about itself.
pub struct Micro {
    name: &'static str,
    version: &'static str,
    description: &'static str,
    queue_group: &'static str,
    id: String,
    started: DateTime<Utc>,
    endpoints: Vec<EndpointInfo>,
    stats: Mutex<Vec<EndpointStats>>,
    /// Extra figures of an endpoint, shown as its `data` by `nats micro stats`.
    data: Box<dyn Fn(&str) -> Value + Send + Sync>,
}

impl Micro {
    pub fn new(
        name: &'static str,
        version: &'static str,
        description: &'static str,
        queue_group: &'static str,
        endpoints: Vec<EndpointInfo>,
        data: impl Fn(&str) -> Value + Send + Sync + 'static,
    ) -> Self {
        let stats = Mutex::new(vec![EndpointStats::default(); endpoints.len()]);
        Self {
            name,
            version,
            description,
            queue_group,
            id: uuid::Uuid::new_v4().simple().to_string(),
            started: Utc::now(),
            endpoints,
            stats,
            data: Box::new(data),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Counts one request of endpoint `index` that took `took`; `error` when it was answered
    /// with an error.
    pub fn record(&self, index: usize, took: Duration, error: Option<&str>) {
        let mut stats = self.stats.lock().expect("stats lock");
        let stats = &mut stats[index];
        stats.requests += 1;
        stats.processing += took;
        if let Some(error) = error {
            stats.errors += 1;
            stats.last_error = error.to_owned();
        }
    }

    /// The subjects of the discovery verbs this instance answers.
    fn control_subjects(&self) -> Vec<(Verb, String)> {
        [Verb::Ping, Verb::Info, Verb::Stats]
            .into_iter()
            .flat_map(|verb| {
                let prefix = format!("$SRV.{}", verb.as_str());
                [
                    (verb, prefix.clone()),
                    (verb, format!("{prefix}.{}", self.name)),
                    (verb, format!("{prefix}.{}.{}", self.name, self.id)),
                ]
            })
            .collect()
    }

    fn identity(&self, kind: &str) -> Value {
        json!({
            "type": format!("io.nats.micro.v1.{kind}_response"),
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "metadata": {},
        })
    }

    pub fn ping(&self) -> Value {
        self.identity("ping")
    }

    pub fn info(&self) -> Value {
        let mut info = self.identity("info");
        info["description"] = self.description.into();
        info["endpoints"] = self
            .endpoints
            .iter()
            .map(|endpoint| {
                json!({
                    "name": endpoint.name,
                    "subject": endpoint.subject,
                    "queue_group": self.queue_group,
                    "metadata": endpoint.metadata,
                })
            })
            .collect();
        info
    }

    pub fn stats(&self) -> Value {
        let stats = self.stats.lock().expect("stats lock").clone();
        let mut response = self.identity("stats");
        response["started"] = self
            .started
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            .into();
        response["endpoints"] = self
            .endpoints
            .iter()
            .zip(stats)
            .map(|(endpoint, stats)| {
                let average = stats
                    .processing
                    .checked_div(stats.requests.max(1) as u32)
                    .unwrap_or_default();
                json!({
                    "name": endpoint.name,
                    "subject": endpoint.subject,
                    "queue_group": self.queue_group,
                    "num_requests": stats.requests,
                    "num_errors": stats.errors,
                    "last_error": stats.last_error,
                    "processing_time": stats.processing.as_nanos() as u64,
                    "average_processing_time": average.as_nanos() as u64,
                    "data": (self.data)(&endpoint.name),
                })
            })
            .collect();
        response
    }

    /// Subscribes the discovery subjects and answers them until the subscriptions end (the
    /// returned task is aborted when the service stops).
    pub async fn answer_discovery(
        self: Arc<Self>,
        client: async_nats::Client,
    ) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
        let mut subscriptions = Vec::new();
        for (verb, subject) in self.control_subjects() {
            let subscriber = client.subscribe(subject).await?;
            subscriptions.push(subscriber.map(move |message| (verb, message)).boxed());
        }
        let mut requests = futures::stream::select_all(subscriptions);
        Ok(tokio::spawn(async move {
            while let Some((verb, message)) = requests.next().await {
                let Some(reply) = message.reply else { continue };
                let body = match verb {
                    Verb::Ping => self.ping(),
                    Verb::Info => self.info(),
                    Verb::Stats => self.stats(),
                };
                let body = serde_json::to_vec(&body).expect("responses serialize");
                if let Err(err) = client.publish(reply, body.into()).await {
                    tracing::debug!(%err, "a discovery answer was not sent");
                }
            }
        }))
    }
}

#[derive(Debug, Clone, Copy)]
enum Verb {
    Ping,
    Info,
    Stats,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ping => "PING",
            Self::Info => "INFO",
            Self::Stats => "STATS",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micro() -> Micro {
        let endpoints = vec![EndpointInfo {
            name: "order-place".into(),
            subject: ordo_contract::Endpoint::OrderPlace.subject().into(),
            metadata: serde_json::Map::new(),
        }];
        Micro::new(
            "ordo",
            "1.2.3",
            "test",
            "q",
            endpoints,
            |name| json!({"endpoint": name}),
        )
    }

    #[test]
    fn stats_count_requests_errors_and_time_per_endpoint() {
        let micro = micro();
        micro.record(0, Duration::from_millis(2), None);
        micro.record(0, Duration::from_millis(4), Some("invalid_command: bad"));
        let stats = micro.stats();
        assert_eq!(stats["type"], "io.nats.micro.v1.stats_response");
        let endpoint = &stats["endpoints"][0];
        assert_eq!(endpoint["num_requests"], 2);
        assert_eq!(endpoint["num_errors"], 1);
        assert_eq!(endpoint["last_error"], "invalid_command: bad");
        assert_eq!(endpoint["processing_time"], 6_000_000);
        assert_eq!(endpoint["average_processing_time"], 3_000_000);
        assert_eq!(endpoint["data"]["endpoint"], "order-place");
    }

    #[test]
    fn every_verb_is_answered_for_all_services_the_name_and_the_instance() {
        let micro = micro();
        let subjects: Vec<String> = micro
            .control_subjects()
            .into_iter()
            .map(|(_, subject)| subject)
            .collect();
        let id = micro.id().to_owned();
        for verb in ["PING", "INFO", "STATS"] {
            for subject in [
                format!("$SRV.{verb}"),
                format!("$SRV.{verb}.ordo"),
                format!("$SRV.{verb}.ordo.{id}"),
            ] {
                assert!(subjects.contains(&subject), "{subject}");
            }
        }
        assert_eq!(micro.info()["endpoints"][0]["queue_group"], "q");
    }
}
