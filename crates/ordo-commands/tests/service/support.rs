//! An engine for one test: its own nats-server, the streams applied, and command service
//! instances running in this process, each with its own connection and cache.

use std::time::Duration;

use async_nats::{HeaderMap, jetstream};
use futures::StreamExt;
use ordo_commands::CommandService;
use ordo_contract::{Endpoint, headers};
use ordo_eventstore::{EventEnvelope, StreamDefinition, streams::apply_all};
use ordo_testkit::NatsServer;
use serde_json::Value;
use tokio::{sync::oneshot, task::JoinHandle};

pub struct Engine {
    pub server: NatsServer,
    pub client: async_nats::Client,
    instances: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

/// One stored message, decoded.
pub struct Stored {
    pub seq: u64,
    pub subject: String,
    pub headers: HeaderMap,
    pub envelope: EventEnvelope,
}

impl Engine {
    pub async fn start() -> Self {
        Self::start_with(1, StreamDefinition::built_in()).await
    }

    pub async fn start_with(instances: usize, definitions: Vec<StreamDefinition>) -> Self {
        let server = NatsServer::start();
        let client = server.client().await;
        NatsServer::wait_for_jetstream(&client).await;
        apply_all(&jetstream::new(client.clone()), &definitions)
            .await
            .expect("apply the streams");
        let mut engine = Self {
            server,
            client,
            instances: Vec::new(),
        };
        for _ in 0..instances {
            engine.add_instance().await;
        }
        engine
    }

    pub async fn add_instance(&mut self) {
        self.add_instance_with(Default::default()).await;
    }

    pub async fn add_instance_with(&mut self, config: ordo_commands::ServiceConfig) {
        let service = CommandService::assemble(self.server.client().await, config)
            .await
            .expect("start the command service");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            service
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .expect("the command service runs");
        });
        self.instances.push((stop, task));
    }

    /// Stops the first running instance gracefully and waits until it has left.
    pub async fn stop_first_instance(&mut self) {
        let (stop, task) = self.instances.remove(0);
        let _ = stop.send(());
        task.await.expect("the instance stops cleanly");
    }

    /// Kills the first running instance: it stops at once, without handing anything on, as a
    /// SIGKILLed process does.
    pub async fn kill_first_instance(&mut self) {
        let (_stop, task) = self.instances.remove(0);
        task.abort();
        let _ = task.await;
    }

    /// The owner of each of the 16 partitions, from the lease bucket ("" for none).
    pub async fn owners(&self) -> Vec<String> {
        let kv = jetstream::new(self.client.clone())
            .get_key_value(ordo_eventstore::ownership::BUCKET)
            .await
            .unwrap();
        let mut owners = Vec::new();
        for partition in 0..16 {
            let owner = kv
                .get(format!("commands.owners.{partition}"))
                .await
                .unwrap()
                .map(|value| String::from_utf8(value.to_vec()).unwrap())
                .unwrap_or_default();
            owners.push(owner);
        }
        owners
    }

    /// Waits (at most 3 s) until every instance owns partitions and every partition is owned: a
    /// new instance serves as soon as every partition has an owner, and takes its share of
    /// them moments later.
    pub async fn partitions_shared(&self) {
        let started = std::time::Instant::now();
        loop {
            let owners = self.owners().await;
            let mut distinct = owners.clone();
            distinct.sort();
            distinct.dedup();
            if distinct.len() == self.instances.len() && !distinct.contains(&String::new()) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "partitions not shared by {} instances: {owners:?}",
                self.instances.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `body` to `endpoint` and returns the JSON reply; panics if there is none in 10 s.
    pub async fn request(&self, endpoint: Endpoint, body: Value) -> Value {
        self.request_bytes(endpoint.subject(), serde_json::to_vec(&body).unwrap(), None)
            .await
    }

    /// The same, with a `Nats-Msg-Id` header.
    pub async fn request_with_id(
        &self,
        endpoint: Endpoint,
        body: Value,
        command_id: &str,
    ) -> Value {
        self.request_bytes(
            endpoint.subject(),
            serde_json::to_vec(&body).unwrap(),
            Some(command_id),
        )
        .await
    }

    pub async fn request_bytes(
        &self,
        subject: &str,
        body: Vec<u8>,
        command_id: Option<&str>,
    ) -> Value {
        self.try_request(subject, body, command_id, Duration::from_secs(10))
            .await
            .unwrap_or_else(|err| panic!("no reply on {subject}: {err}"))
    }

    /// A request that may go unanswered (while the server is down, say).
    pub async fn try_request(
        &self,
        subject: &str,
        body: Vec<u8>,
        command_id: Option<&str>,
        timeout: Duration,
    ) -> Result<Value, String> {
        let mut headers = HeaderMap::new();
        if let Some(id) = command_id {
            headers.insert(headers::MSG_ID, id);
        }
        self.try_request_with_headers(subject, body, headers, timeout)
            .await
    }

    pub async fn try_request_with_headers(
        &self,
        subject: &str,
        body: Vec<u8>,
        headers: HeaderMap,
        timeout: Duration,
    ) -> Result<Value, String> {
        let request = async_nats::Request::new()
            .payload(body.into())
            .headers(headers)
            .timeout(Some(timeout));
        let reply = self
            .client
            .send_request(subject.to_owned(), request)
            .await
            .map_err(|err| err.to_string())?;
        serde_json::from_slice(&reply.payload).map_err(|err| err.to_string())
    }

    /// Every message of a stream, in order.
    pub async fn stored(&self, stream: &str) -> Vec<Stored> {
        let js = jetstream::new(self.client.clone());
        let mut stream = js.get_stream(stream).await.expect("the stream exists");
        let last = stream
            .info()
            .await
            .expect("stream info")
            .state
            .last_sequence;
        let mut stored = Vec::new();
        for seq in 1..=last {
            let Ok(message) = stream.direct_get(seq).await else {
                continue;
            };
            stored.push(Stored {
                seq,
                subject: message.subject.to_string(),
                headers: message.headers.clone(),
                envelope: EventEnvelope::from_bytes(&message.payload).expect("an event envelope"),
            });
        }
        stored
    }

    pub async fn message_count(&self, stream: &str) -> u64 {
        let js = jetstream::new(self.client.clone());
        let mut stream = js.get_stream(stream).await.expect("the stream exists");
        stream.info().await.expect("stream info").state.messages
    }

    /// For each running instance, (requests, refusals) on `endpoint` (`order-place`), as each
    /// answers `nats micro stats ordo`: a test of several instances shows that each one served.
    pub async fn served_by_each_instance(&self, endpoint: &str) -> Vec<(u64, u64)> {
        let inbox = self.client.new_inbox();
        let mut replies = self.client.subscribe(inbox.clone()).await.unwrap();
        self.client
            .publish_with_reply("$SRV.STATS.ordo", inbox, "".into())
            .await
            .unwrap();
        let mut served = Vec::new();
        while served.len() < self.instances.len() {
            let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
                .await
                .expect("every instance answers its stats")
                .unwrap();
            let stats: Value = serde_json::from_slice(&reply.payload).unwrap();
            let endpoint = stats["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .find(|stats| stats["name"] == endpoint)
                .cloned()
                .unwrap_or_default();
            served.push((
                endpoint["num_requests"].as_u64().unwrap_or(0),
                endpoint["num_errors"].as_u64().unwrap_or(0),
            ));
        }
        served
    }

    /// The counts of the event streams, to show a refused command appended nothing.
    pub async fn event_counts(&self) -> (u64, u64) {
        (
            self.message_count(ordo_eventstore::StreamId::Orders.name())
                .await,
            self.message_count(ordo_eventstore::StreamId::Stock.name())
                .await,
        )
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        for (stop, task) in self.instances.drain(..) {
            let _ = stop.send(());
            task.abort();
        }
    }
}

pub fn line(sku: &str, qty: i64, unit_price_cents: i64) -> Value {
    serde_json::json!({"sku": sku, "qty": qty, "unit_price_cents": unit_price_cents})
}

/// The error code of a reply, or "ok".
pub fn outcome(reply: &Value) -> String {
    if reply["ok"] == Value::Bool(true) {
        "ok".to_owned()
    } else {
        reply["error"]["code"]
            .as_str()
            .unwrap_or("no code")
            .to_owned()
    }
}
