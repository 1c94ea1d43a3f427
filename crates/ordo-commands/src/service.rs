//! The NATS micro service `ordo`: one endpoint per command subject, all in one queue group, so
//! that any number of instances share the load and `nats micro ls|info|stats ordo` see them.

use std::{future::Future, sync::Arc};

use async_nats::service::{Request, ServiceExt};
use futures::StreamExt;
use ordo_eventstore::EventMetadata;
use tokio::{sync::Semaphore, task::JoinSet};
use tracing::Instrument;

use crate::{
    handler::CommandHandler,
    wire::{self, Endpoint, ErrorCode, SUBJECT_PREFIX, error_reply},
};

pub const SERVICE_NAME: &str = "ordo";
pub const QUEUE_GROUP: &str = "ordo-commands";
/// Sets the event's correlation id (default: the command id).
pub const HEADER_CORRELATION_ID: &str = "Ordo-Correlation-Id";
/// Sets the event's causation id (the saga sets it to the event that caused the command).
pub const HEADER_CAUSATION_ID: &str = "Ordo-Causation-Id";

#[derive(Debug, thiserror::Error)]
#[error("cannot start the command service: {0}")]
pub struct ServiceError(String);

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Requests handled at once by this instance; more wait in NATS.
    pub max_in_flight: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self { max_in_flight: 256 }
    }
}

/// The command service of one instance: subscribed, not yet serving.
pub struct CommandService {
    service: async_nats::service::Service,
    requests: futures::stream::SelectAll<futures::stream::BoxStream<'static, (Endpoint, Request)>>,
    handler: Arc<CommandHandler>,
    config: ServiceConfig,
}

impl CommandService {
    /// Registers the micro service and subscribes every command subject. Once this returns (and
    /// the client is flushed), requests reach this instance.
    pub async fn start(
        client: async_nats::Client,
        handler: Arc<CommandHandler>,
        config: ServiceConfig,
    ) -> Result<Self, ServiceError> {
        let service = client
            .service_builder()
            .description("ordo commands: orders and stock")
            .queue_group(QUEUE_GROUP)
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|err| ServiceError(err.to_string()))?;
        let group = service.group(SUBJECT_PREFIX);
        let mut endpoints = Vec::with_capacity(Endpoint::ALL.len());
        for endpoint in Endpoint::ALL {
            let requests = group
                .endpoint_builder()
                .name(endpoint.name().replace('.', "-"))
                .add(endpoint.name())
                .await
                .map_err(|err| ServiceError(format!("{}: {err}", endpoint.subject())))?;
            endpoints.push(requests.map(move |request| (endpoint, request)).boxed());
        }
        // A round trip on this connection after the subscriptions: once the service answers its
        // own PING, the server has registered every endpoint before it.
        let id = service.info().await.id;
        client
            .request(format!("$SRV.PING.{SERVICE_NAME}.{id}"), "".into())
            .await
            .map_err(|err| {
                ServiceError(format!("the service does not answer its own PING: {err}"))
            })?;
        tracing::info!(
            service = SERVICE_NAME,
            subjects = %format!("{SUBJECT_PREFIX}.>"),
            "command service ready"
        );
        Ok(Self {
            service,
            requests: futures::stream::select_all(endpoints),
            handler,
            config,
        })
    }

    /// Serves until `shutdown` completes, then finishes the requests in flight and leaves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServiceError> {
        let Self {
            service,
            mut requests,
            handler,
            config,
        } = self;
        let limit = Arc::new(Semaphore::new(config.max_in_flight));
        let mut in_flight = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                next = requests.next() => {
                    let Some((endpoint, request)) = next else { break };
                    let permit = limit.clone().acquire_owned().await.expect("the limit is never closed");
                    let handler = handler.clone();
                    in_flight.spawn(async move {
                        respond(&handler, endpoint, request).await;
                        drop(permit);
                    });
                }
            }
        }
        tracing::info!(in_flight = in_flight.len(), "command service stopping");
        while in_flight.join_next().await.is_some() {}
        service
            .stop()
            .await
            .map_err(|err| ServiceError(err.to_string()))
    }
}

async fn respond(handler: &CommandHandler, endpoint: Endpoint, request: Request) {
    let header = |name: &str| {
        request
            .message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(name))
            .map(|value| value.as_str().to_owned())
    };
    let span = tracing::info_span!(
        "command",
        endpoint = endpoint.name(),
        command_id = tracing::field::Empty
    );
    let reply = async {
        match wire::parse(
            endpoint,
            &request.message.payload,
            header("Nats-Msg-Id").as_deref(),
        ) {
            Err(invalid) => error_reply(ErrorCode::InvalidCommand, invalid),
            Ok(parsed) => {
                tracing::Span::current().record("command_id", parsed.command_id.as_str());
                let metadata = EventMetadata {
                    correlation_id: header(HEADER_CORRELATION_ID)
                        .unwrap_or_else(|| parsed.command_id.clone()),
                    causation_id: header(HEADER_CAUSATION_ID),
                    traceparent: Some(child_traceparent(header("traceparent").as_deref())),
                    command_id: parsed.command_id.clone(),
                };
                handler.execute(&parsed, &metadata).await
            }
        }
    }
    .instrument(span)
    .await;
    let body = serde_json::to_vec(&reply).expect("replies serialize");
    if let Err(err) = request.respond(Ok(body.into())).await {
        tracing::warn!(endpoint = endpoint.name(), %err, "could not send the reply");
    }
}

/// A W3C `traceparent` for the event: the caller's trace continues with a new span; a caller
/// without one starts a new trace.
pub fn child_traceparent(parent: Option<&str>) -> String {
    let span_id: u64 = rand::random::<u64>() | 1;
    let parts: Vec<&str> = parent.map(|p| p.split('-').collect()).unwrap_or_default();
    let valid = parts.len() == 4
        && parts[1].len() == 32
        && parts[2].len() == 16
        && parts[3].len() == 2
        && parts[1..]
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit()))
        && parts[1].bytes().any(|b| b != b'0');
    if valid {
        format!(
            "00-{}-{span_id:016x}-{}",
            parts[1].to_ascii_lowercase(),
            parts[3]
        )
    } else {
        let trace_id: u128 = rand::random::<u128>() | 1;
        format!("00-{trace_id:032x}-{span_id:016x}-01")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_keeps_its_trace_and_gets_a_new_span() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let child = child_traceparent(Some(parent));
        assert!(child.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
        assert!(child.ends_with("-01"));
        assert_ne!(child, parent);
    }

    #[test]
    fn a_missing_or_invalid_traceparent_starts_a_new_trace() {
        for parent in [
            None,
            Some("garbage"),
            Some("00-00000000000000000000000000000000-b7ad6b7169203331-01"),
        ] {
            let child = child_traceparent(parent);
            let parts: Vec<&str> = child.split('-').collect();
            assert_eq!(parts.len(), 4, "{child}");
            assert_eq!((parts[1].len(), parts[2].len()), (32, 16));
            assert_ne!(parts[1], "00000000000000000000000000000000");
        }
    }
}
