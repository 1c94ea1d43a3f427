//! A running ordo for the integration tests of the crates downstream of the command service: a
//! nats-server of the test's own, the streams applied, and command service instances in the
//! test's process. (The command service's own tests cannot use it: it depends on them.)

use async_nats::jetstream;
use ordo_commands::CommandService;
use ordo_contract::{CommandRequest, Endpoint, Reply};
use ordo_eventstore::{EventStore, StreamDefinition, streams::apply_all};
use ordo_testkit::NatsServer;
use serde_json::Value;
use std::time::Duration;

pub struct Engine {
    pub server: NatsServer,
    pub client: async_nats::Client,
    pub store: EventStore,
}

impl Engine {
    /// A nats-server with the streams and one command service instance.
    pub async fn start() -> Self {
        Self::start_with_instances(1).await
    }

    /// The same with `instances` command service instances, each on its own connection.
    pub async fn start_with_instances(instances: usize) -> Self {
        let server = NatsServer::start();
        let client = server.client().await;
        apply_all(
            &jetstream::new(client.clone()),
            &StreamDefinition::built_in(),
        )
        .await
        .expect("apply the streams");
        let store = EventStore::open(client.clone(), &CommandService::STREAMS)
            .await
            .expect("open the event store");
        for _ in 0..instances {
            let service = CommandService::assemble(server.client().await, Default::default())
                .await
                .expect("start the command service");
            tokio::spawn(service.run(std::future::pending()));
        }
        Self {
            server,
            client,
            store,
        }
    }

    /// Waits, after a start or a restart of the server, until JetStream answers and a command
    /// service instance has subscribed again: a command sent before then gets "no responders".
    pub async fn wait_until_serving(&self) {
        NatsServer::wait_for_jetstream(&self.client).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ping = async_nats::Request::new().timeout(Some(Duration::from_millis(500)));
            match self.client.send_request("$SRV.PING.ordo", ping).await {
                Ok(_) => return,
                Err(err) => assert!(
                    std::time::Instant::now() < deadline,
                    "no command service answered within 30 s: {err}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a typed command of the contract and returns its typed reply.
    pub async fn request(&self, command: &CommandRequest) -> Reply {
        let subject = command.subject();
        let reply = self
            .client
            .request(subject, command.body_bytes().into())
            .await
            .unwrap_or_else(|err| panic!("no reply on {subject}: {err}"));
        Reply::parse(&reply.payload).unwrap_or_else(|err| panic!("{subject}: {err}"))
    }

    /// Sends a typed command that must be accepted; returns its (aggregate id, version, seq).
    pub async fn accepted(&self, command: &CommandRequest) -> (String, u64, u64) {
        match self.request(command).await {
            Reply::Accepted {
                aggregate,
                version,
                seq,
            } => (aggregate.to_string(), version, seq),
            refused => panic!("{command:?} was refused: {refused:?}"),
        }
    }

    /// Sends raw JSON to `endpoint` (for tests of what clients may send) and returns its
    /// reply, whatever it says.
    pub async fn send(&self, endpoint: Endpoint, body: Value) -> Value {
        let subject = endpoint.subject();
        let reply = self
            .client
            .request(subject, serde_json::to_vec(&body).expect("JSON").into())
            .await
            .unwrap_or_else(|err| panic!("no reply on {subject}: {err}"));
        serde_json::from_slice(&reply.payload).expect("a JSON reply")
    }

    /// Sends a command that must succeed, and returns its reply.
    pub async fn command(&self, endpoint: Endpoint, body: Value) -> Value {
        let reply = self.send(endpoint, body.clone()).await;
        assert_eq!(reply["ok"], true, "{} {body}: {reply}", endpoint.subject());
        reply
    }
}
