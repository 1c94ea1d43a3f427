//! The NATS micro service `ordo`: one endpoint per command subject, all in one queue group, so
//! that any number of instances share the load and `nats micro ls|info|stats ordo` see them.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use async_nats::RequestErrorKind;
use futures::StreamExt;
use ordo_eventstore::{
    EventMetadata, EventStore, Ownership, OwnershipConfig, StreamId, ownership::OwnershipError,
    partition_of, trace,
};
use tokio::{
    sync::{Semaphore, oneshot},
    task::JoinSet,
};
use tracing::Instrument;

use crate::{
    backpressure::{BacklogLimits, Gate},
    handler::CommandHandler,
    intake::{self, Caller, ParsedRequest, bounded_header},
    micro::{EndpointInfo, Micro},
    ratelimit::{Admission, CustomerLimiter, CustomerRate},
    routing::{self, Job, Route, Router},
};
use ordo_contract::{
    Endpoint, ErrorCode, INTERNAL_SUBJECT_PREFIX, InvalidCommand, Reply, SUBJECT_PREFIX, headers,
};

pub const SERVICE_NAME: &str = "ordo";
pub const QUEUE_GROUP: &str = "ordo-commands";
/// The ownership group of the command service's partitions (docs/operations.md).
pub const PARTITION_GROUP: &str = "commands";
pub use ordo_eventstore::partition::DEFAULT_PARTITIONS;
/// How long a starting instance waits for every partition to have an owner: longer than a lease,
/// so that even the leases of an instance that is not found dead have run out.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Something it needs does not answer yet (JetStream, a stream, the partition leases).
    #[error("cannot start the command service: {0}")]
    NotYet(String),
    /// Started with settings the running instances do not share: waiting does not help.
    #[error("cannot start the command service: {0}")]
    Misconfigured(String),
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Requests handled at once by this instance; more wait in NATS.
    pub max_in_flight: usize,
    /// When `order.place` sheds load (none: never).
    pub backlog_limits: Option<BacklogLimits>,
    /// How fast one customer may place orders (none: no limit).
    pub customer_rate: Option<CustomerRate>,
    /// Replicas of the state the service keeps in JetStream (the rate-limit bucket).
    pub replicas: usize,
    /// How long a stopping instance gives the requests already delivered to it: those not
    /// started by then are dropped unrun (the client's retry is safe), so that a stop during a
    /// slow spell still ends, and flushes its replies, before a supervisor's SIGKILL would.
    pub drain_limit: std::time::Duration,
    /// How many partitions the aggregates are spread over; every instance must agree.
    pub partitions: u32,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            backlog_limits: Some(BacklogLimits::default()),
            customer_rate: None,
            replicas: 1,
            drain_limit: std::time::Duration::from_secs(5),
            partitions: DEFAULT_PARTITIONS,
        }
    }
}

/// What every request of one instance shares.
struct Serving {
    client: async_nats::Client,
    handler: Arc<CommandHandler>,
    gate: Gate,
    micro: Arc<Micro>,
    /// `order.place` requests shed, shown by `nats micro stats ordo`.
    shed: Arc<AtomicU64>,
    limiter: Option<CustomerLimiter>,
    router: Arc<Router>,
    /// Commands forwarded to this instance handled at once: apart from the intake's limit, so
    /// that two instances whose intakes wait on each other's owners cannot starve both.
    forwarded_limit: Arc<Semaphore>,
}

impl Serving {
    /// The refusal of a placing that ordo will not take now, if it is one: while it sheds load,
    /// or over its customer's rate. A repeat of a placing that already has its outcome is
    /// neither shed nor charged a token: it gets that outcome whatever the load or the rate,
    /// since the client most likely to repeat an order is the one whose reply was lost, and the
    /// order it placed goes through.
    async fn admission(&self, parsed: &intake::ParsedRequest) -> Option<Reply> {
        let intake::Command::Order(ordo_domain::order::OrderCommand::Place { customer_id, .. }) =
            &parsed.command
        else {
            return None;
        };
        let overload = self.gate.overload();
        if overload.is_none() && self.limiter.is_none() {
            return None;
        }
        if let Ok(true) = self.handler.has_outcome(&parsed.command_id).await {
            return None;
        }
        if let Some(overload) = overload {
            self.shed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("ordo_commands_shed_total", "endpoint" => parsed.endpoint.name())
                .increment(1);
            return Some(Reply::Refused {
                code: ErrorCode::Unavailable,
                message: overload.message(),
                retry_after_ms: Some(overload.retry_after.as_millis() as u64),
            });
        }
        match self.limiter.as_ref()?.take(customer_id.as_str()).await {
            Ok(Admission::Admitted) => None,
            Ok(Admission::Limited { retry_after }) => {
                metrics::counter!("ordo_commands_rate_limited_total").increment(1);
                Some(Reply::Refused {
                    code: ErrorCode::RateLimited,
                    message: format!("customer {customer_id} places orders faster than its limit"),
                    retry_after_ms: Some(retry_after.as_millis() as u64),
                })
            }
            Err(err) => Some(Reply::refused(ErrorCode::Unavailable, err)),
        }
    }
}

/// The command service of one instance: subscribed, not yet serving.
pub struct CommandService {
    client: async_nats::Client,
    micro: Arc<Micro>,
    discovery: AbortOnDrop,
    subscriptions: Vec<(Endpoint, async_nats::Subscriber)>,
    handler: Arc<CommandHandler>,
    config: ServiceConfig,
    shed: Arc<AtomicU64>,
    limiter: Option<CustomerLimiter>,
    ownership: Ownership,
    router: Arc<Router>,
    /// Serves each partition this instance is granted.
    owning: AbortOnDrop,
    /// Commands other instances forwarded to this one, as the owner of their partition.
    forwarded: async_nats::Subscriber,
}

impl CommandService {
    /// The streams the command service loads from and appends to.
    pub const STREAMS: [StreamId; 3] =
        [StreamId::Orders, StreamId::Stock, StreamId::CommandOutcomes];

    /// The command service as every process runs it (`ordo up`, `ordo run commands`, the chaos
    /// drill through them, the benchmark and the tests): an event store over [`Self::STREAMS`]
    /// on `client`, a handler, and [`Self::start`].
    pub async fn assemble(
        client: async_nats::Client,
        config: ServiceConfig,
    ) -> Result<Self, ServiceError> {
        let store = EventStore::open(client.clone(), &Self::STREAMS)
            .await
            .map_err(|err| ServiceError::NotYet(format!("opening the event store: {err}")))?;
        Self::start(client, Arc::new(CommandHandler::new(store)), config).await
    }

    /// Subscribes every command subject in the queue group and answers the micro service's
    /// discovery subjects. Once this returns, requests reach this instance.
    pub async fn start(
        client: async_nats::Client,
        handler: Arc<CommandHandler>,
        config: ServiceConfig,
    ) -> Result<Self, ServiceError> {
        let shed = Arc::new(AtomicU64::new(0));
        let shed_seen = shed.clone();
        let place = micro_name(Endpoint::OrderPlace);
        let endpoints = Endpoint::ALL
            .iter()
            .map(|endpoint| EndpointInfo {
                name: micro_name(*endpoint),
                subject: endpoint.subject().to_owned(),
                metadata: endpoint_metadata(*endpoint),
            })
            .collect();
        let micro = Arc::new(Micro::new(
            SERVICE_NAME,
            env!("CARGO_PKG_VERSION"),
            "ordo commands: orders and stock",
            QUEUE_GROUP,
            endpoints,
            move |endpoint| {
                if endpoint == place {
                    serde_json::json!({"shed": shed_seen.load(Ordering::Relaxed)})
                } else {
                    serde_json::Value::Null
                }
            },
        ));
        let limiter = match config.customer_rate {
            Some(rate) => Some(
                CustomerLimiter::open(
                    &async_nats::jetstream::new(client.clone()),
                    rate,
                    config.replicas,
                )
                .await
                .map_err(|err| ServiceError::NotYet(err.to_string()))?,
            ),
            None => None,
        };
        // Partitions first: by the time requests arrive, this instance knows who owns what.
        let (ownership, mut grants) = Ownership::join(
            &async_nats::jetstream::new(client.clone()),
            OwnershipConfig {
                replicas: config.replicas,
                ..OwnershipConfig::new(PARTITION_GROUP, config.partitions)
            },
        )
        .await
        .map_err(|err| match err {
            OwnershipError::PartitionCountDiffers(_) => {
                ServiceError::Misconfigured(err.to_string())
            }
            OwnershipError::Bucket(_) => ServiceError::NotYet(err.to_string()),
        })?;
        let forwarded = client
            .subscribe(routing::forwarded_to(ownership.instance()))
            .await
            .map_err(|err| ServiceError::NotYet(format!("the forwarded commands: {err}")))?;
        let router = Arc::new(Router::new(
            config.partitions,
            ownership.owners(),
            ownership.suspects(),
        ));
        let owning = {
            let (router, handler) = (router.clone(), handler.clone());
            AbortOnDrop(tokio::spawn(async move {
                let mut owners = JoinSet::new();
                while let Some(grant) = grants.recv().await {
                    owners.spawn(router.clone().own(grant, handler.clone()));
                    while owners.try_join_next().is_some() {}
                }
            }))
        };
        let mut subscriptions = Vec::with_capacity(Endpoint::ALL.len());
        for endpoint in Endpoint::ALL {
            let subscriber = client
                .queue_subscribe(endpoint.subject(), QUEUE_GROUP.into())
                .await
                .map_err(|err| ServiceError::NotYet(format!("{}: {err}", endpoint.subject())))?;
            subscriptions.push((endpoint, subscriber));
        }
        let discovery = micro
            .clone()
            .answer_discovery(client.clone())
            .await
            .map_err(|err| ServiceError::NotYet(format!("the discovery subjects: {err}")))?;
        // A round trip on this connection after the subscriptions: once the service answers its
        // own PING, the server has registered every endpoint before it.
        client
            .request(
                format!("$SRV.PING.{SERVICE_NAME}.{}", micro.id()),
                "".into(),
            )
            .await
            .map_err(|err| {
                ServiceError::NotYet(format!("the service does not answer its own PING: {err}"))
            })?;
        // Ready once every partition has an owner: a first instance takes them all at once; one
        // that starts after a crash takes the dead owner's once it has found it gone (within a
        // second), or once its leases run out.
        let waited = std::time::Instant::now();
        while !router.all_owned() && waited.elapsed() < READY_WITHIN {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        tracing::info!(
            service = SERVICE_NAME,
            subjects = %format!("{SUBJECT_PREFIX}.> {INTERNAL_SUBJECT_PREFIX}.>"),
            instance = ownership.instance(),
            partitions = config.partitions,
            owned_here = router.owned(),
            all_owned = router.all_owned(),
            "command service ready"
        );
        Ok(Self {
            client,
            micro,
            discovery: AbortOnDrop(discovery),
            subscriptions,
            handler,
            config,
            shed,
            limiter,
            ownership,
            router,
            owning,
            forwarded,
        })
    }

    /// Serves until `shutdown` completes. Then it stops taking requests (every endpoint
    /// unsubscribes, so new ones go to other instances), answers those already delivered to it,
    /// finishes those in flight, and leaves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServiceError> {
        let Self {
            client,
            micro,
            discovery,
            mut subscriptions,
            handler,
            config,
            shed,
            limiter,
            ownership,
            router,
            owning,
            mut forwarded,
        } = self;
        let gate = Gate::default();
        let _watch = config.backlog_limits.clone().map(|limits| {
            let js = async_nats::jetstream::new(client.clone());
            AbortOnDrop(tokio::spawn(gate.clone().watch(
                js,
                limits,
                config.partitions,
            )))
        });
        let limit = Arc::new(Semaphore::new(config.max_in_flight));
        let serving = Arc::new(Serving {
            client: client.clone(),
            handler,
            gate,
            micro,
            shed,
            limiter,
            router,
            forwarded_limit: Arc::new(Semaphore::new(config.max_in_flight)),
        });
        // Commands forwarded here by other instances, until the ownership has been left.
        let (stop_forwarded, forwarding_stopped) = oneshot::channel::<()>();
        let mut owner_side = {
            let serving = serving.clone();
            AbortOnDrop(tokio::spawn(async move {
                let mut running = JoinSet::new();
                let mut stopped = std::pin::pin!(forwarding_stopped);
                let mut subscribed = true;
                loop {
                    let message = tokio::select! {
                        _ = &mut stopped, if subscribed => {
                            // What was delivered before the unsubscribe is still answered.
                            subscribed = false;
                            if let Err(err) = forwarded.unsubscribe().await {
                                tracing::warn!(%err, "forwarded commands: unsubscribe not sent");
                            }
                            continue;
                        }
                        next = forwarded.next() => match next {
                            Some(message) => message,
                            None => break,
                        },
                    };
                    let Some((_, endpoint)) = routing::parse_forward_subject(&message.subject)
                    else {
                        // From an instance of another version, say: answered, so that it does
                        // not wait out its timeout.
                        tracing::warn!(subject = %message.subject, "a forwarded command on an unknown subject");
                        if let Some(reply_to) = message.reply {
                            let refusal = Reply::refused(
                                ErrorCode::Unavailable,
                                "this instance does not serve that subject",
                            );
                            let _ = serving
                                .client
                                .publish(reply_to, refusal.to_bytes().into())
                                .await;
                        }
                        continue;
                    };
                    let permit = serving
                        .forwarded_limit
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the limit is never closed");
                    let serving = serving.clone();
                    running.spawn(async move {
                        respond(&serving, endpoint, message, Arrival::Forwarded).await;
                        drop(permit);
                    });
                    while running.try_join_next().is_some() {}
                }
                while running.join_next().await.is_some() {}
            }))
        };
        let mut in_flight = JoinSet::new();
        let serve = |in_flight: &mut JoinSet<()>, endpoint, request, permit| {
            let serving = serving.clone();
            in_flight.spawn(async move {
                respond(&serving, endpoint, request, Arrival::Intake).await;
                drop(permit);
            });
        };
        tokio::pin!(shutdown);
        {
            let mut requests = merged(&mut subscriptions);
            loop {
                tokio::select! {
                    () = &mut shutdown => break,
                    Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                    next = requests.next() => {
                        let Some((endpoint, request)) = next else { break };
                        let permit = limit.clone().acquire_owned().await.expect("the limit is never closed");
                        serve(&mut in_flight, endpoint, request, permit);
                    }
                }
            }
        }
        tracing::info!(
            in_flight = in_flight.len(),
            "command service stopping: no new requests"
        );
        // Unsubscribes every endpoint; each subscription then yields what was already
        // delivered, and ends.
        drop(discovery);
        for (endpoint, subscriber) in &mut subscriptions {
            if let Err(err) = subscriber.unsubscribe().await {
                tracing::warn!(endpoint = endpoint.name(), %err, "unsubscribe not sent");
            }
        }
        // What was delivered before the unsubscribe is served, each in its turn, until the
        // drain limit; what has not started by then is dropped unrun. (The client drops what
        // the server routed after the unsubscribe: its sender retries, under the same id.)
        let delivered = async {
            let mut requests = merged(&mut subscriptions);
            while let Some((endpoint, request)) = requests.next().await {
                let permit = limit
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the limit is never closed");
                serve(&mut in_flight, endpoint, request, permit);
            }
        };
        if tokio::time::timeout(config.drain_limit, delivered)
            .await
            .is_err()
        {
            tracing::warn!(
                limit = ?config.drain_limit,
                "requests delivered before the stop were not all started in time; the rest are \
                 dropped unrun, for their senders to retry"
            );
        }
        // Those waiting on another instance's owner wait at most the drain limit once more.
        let finished = tokio::time::timeout(config.drain_limit, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                in_flight = in_flight.len(),
                "requests still waiting on their owners are left unanswered, for their senders to retry"
            );
            in_flight.abort_all();
        }
        // Hands every partition on: each owner answers what is queued with `unavailable` and a
        // retry delay, finishes what runs, and its lease is deleted so that the next owner takes
        // it at once. Commands forwarded here meanwhile are still served, or told to retry.
        ownership.leave().await;
        drop(owning);
        let _ = stop_forwarded.send(());
        if let Err(err) = (&mut owner_side.0).await {
            tracing::warn!(%err, "the forwarded commands' task failed");
        }
        // The last replies may still sit in the connection's write buffer.
        if let Err(err) = client.flush().await {
            tracing::warn!(%err, "the last replies may not have been sent");
        }
        tracing::info!("command service stopped");
        Ok(())
    }
}

/// The requests of every endpoint, as they arrive.
fn merged(
    subscriptions: &mut [(Endpoint, async_nats::Subscriber)],
) -> impl futures::Stream<Item = (Endpoint, async_nats::Message)> + '_ {
    futures::stream::select_all(
        subscriptions
            .iter_mut()
            .map(|(endpoint, subscriber)| subscriber.map(|message| (*endpoint, message))),
    )
}

/// What `nats micro info ordo` says of an endpoint besides its subject: whether it is internal
/// (the saga's: no application may send it) and the JSON Schemas of its request and reply
/// (contracts/ holds the same as files).
fn endpoint_metadata(endpoint: Endpoint) -> serde_json::Map<String, serde_json::Value> {
    use ordo_contract::schema::{reply_schema, request_schema};
    let mut metadata = serde_json::Map::new();
    metadata.insert("internal".into(), endpoint.is_internal().to_string().into());
    metadata.insert(
        "request_schema".into(),
        request_schema(endpoint).to_string().into(),
    );
    metadata.insert("reply_schema".into(), reply_schema().to_string().into());
    metadata
}

/// An endpoint's name in the micro service (`order-place`): names there may not hold dots.
fn micro_name(endpoint: Endpoint) -> String {
    endpoint.name().replace('.', "-")
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether ordo may answer on `reply_to`: only a requester's inbox (`_INBOX…`, whatever prefix
/// the requester's user was given) or the server's mapping of a reply across accounts (`_R_`).
/// Any other reply subject would make ordo publish, with its own permissions, where the caller
/// chose: into an event stream, a rate-limit key, the JetStream API.
pub fn answerable(reply_to: &str) -> bool {
    let first = reply_to.split('.').next().unwrap_or_default();
    reply_to.contains('.') && (first == "_R_" || first.starts_with("_INBOX"))
}

/// How a request reached this instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// From the queue group: this instance reads it, admits it and routes it.
    Intake,
    /// From another instance's intake, to this instance as its partition's owner.
    Forwarded,
}

/// What became of a request here.
enum Handled {
    Answer(Reply),
    /// Its partition is moving: answered `unavailable`, marked so that an intake waits for the
    /// next owner.
    Moving(u32),
    /// The answer of the partition's owner, which ran it, to pass on as it is.
    Relay(async_nats::Message),
}

/// The request's command and the metadata its event will carry.
fn read_request(
    endpoint: Endpoint,
    message: &async_nats::Message,
    traceparent: Option<String>,
) -> Result<(ParsedRequest, EventMetadata), InvalidCommand> {
    let header = |name: &str| ordo_eventstore::header(message, name);
    let caller = Caller::from_request_info(header(headers::REQUEST_INFO).as_deref())?;
    let mut parsed = intake::parse(
        endpoint,
        &message.payload,
        header(headers::MSG_ID).as_deref(),
        &caller,
    )?;
    match header(headers::VOID_IF_NOT_RUN).as_deref() {
        Some("true") => parsed = parsed.void_if_not_run(&caller)?,
        Some(other) => {
            return Err(InvalidCommand(format!(
                "{} must be \"true\", got {other:?}",
                headers::VOID_IF_NOT_RUN
            )));
        }
        None => {}
    }
    let bounded = |name: &str| header(name).map(|value| bounded_header(name, &value));
    let correlation_id = bounded(headers::CORRELATION_ID).transpose()?;
    let causation_id = bounded(headers::CAUSATION_ID).transpose()?;
    let metadata = EventMetadata {
        correlation_id: correlation_id.unwrap_or_else(|| parsed.command_id.clone()),
        causation_id,
        traceparent,
        command_id: parsed.command_id.clone(),
    };
    Ok((parsed, metadata))
}

impl Serving {
    /// Runs the command here, as its partition's owner, or sends it to the owner.
    async fn route(
        &self,
        parsed: ParsedRequest,
        metadata: EventMetadata,
        message: &async_nats::Message,
        arrival: Arrival,
    ) -> Handled {
        let partition = partition_of(parsed.aggregate().as_str(), self.router.partitions);
        // While the partition moves (its owner handing it on, or found dead), the intake waits
        // for the next owner a moment rather than answering `unavailable` at once.
        let give_up = std::time::Instant::now() + routing::MOVE_WAIT;
        loop {
            match self.router.route(partition) {
                Route::Here(jobs) => {
                    let (reply, replied) = oneshot::channel();
                    let job = Job {
                        request: parsed.clone(),
                        metadata: metadata.clone(),
                        reply,
                        span: tracing::Span::current(),
                    };
                    // Not queued, or answered `moving`: it did not run, and goes to the next owner.
                    if jobs.send(job).await.is_ok() {
                        match replied.await {
                            Ok(reply) if reply == routing::moving(partition) => {}
                            Ok(reply) => return Handled::Answer(reply),
                            // The owner stopped while it ran: it may have happened.
                            Err(_) => {
                                return Handled::Answer(Reply::refused(
                                    ErrorCode::Unavailable,
                                    format!(
                                        "the owner of partition {partition} stopped while it ran \
                                         the command, which may or may not have happened; send \
                                         it again with the same command id to learn which"
                                    ),
                                ));
                            }
                        }
                    }
                }
                // Sent on once only: an owner that no longer holds the partition says so. The
                // owner answers this instance, which passes the answer on: a requester's reply
                // subject may be the server's mapping of a reply across accounts (`_R_`), which
                // only the connection the request arrived on may publish to.
                Route::There(owner) if arrival == Arrival::Intake => {
                    let subject = routing::forward_subject(partition, &owner, parsed.endpoint);
                    let request = async_nats::Request::new()
                        .payload(parsed.body_to_forward(&message.payload))
                        .headers(message.headers.clone().unwrap_or_default())
                        .timeout(Some(routing::FORWARD_TIMEOUT));
                    match self.client.send_request(subject, request).await {
                        Ok(answer) if !routing::is_moving(&answer) => {
                            return Handled::Relay(answer);
                        }
                        Ok(_) => {}
                        Err(err) if err.kind() == RequestErrorKind::NoResponders => {
                            self.router.suspect(&owner);
                        }
                        Err(err) => {
                            return Handled::Answer(Reply::refused(
                                ErrorCode::Unavailable,
                                format!("the owner of partition {partition} did not answer: {err}"),
                            ));
                        }
                    }
                }
                Route::There(_) | Route::Nobody => {}
            }
            if arrival == Arrival::Forwarded || std::time::Instant::now() >= give_up {
                return Handled::Moving(partition);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

async fn respond(
    serving: &Serving,
    endpoint: Endpoint,
    message: async_nats::Message,
    arrival: Arrival,
) {
    let started = std::time::Instant::now();
    if let Some(reply_to) = &message.reply
        && !answerable(reply_to)
    {
        // Neither decided nor answered: the request was crafted to turn the reply into a write.
        // Counted, and shown by `nats micro stats ordo` as an error of its endpoint.
        metrics::counter!("ordo_commands_dropped_total", "reason" => "reply_subject").increment(1);
        serving.micro.record(
            endpoint.index(),
            started.elapsed(),
            Some("dropped: the reply subject is not an inbox"),
        );
        tracing::warn!(
            endpoint = endpoint.name(),
            reply_to = %reply_to.chars().take(80).collect::<String>(),
            "dropped a request whose reply subject is not an inbox"
        );
        return;
    }
    let span = tracing::info_span!(
        "command",
        otel.name = %endpoint.subject(),
        endpoint = endpoint.name(),
        command_id = tracing::field::Empty,
        outcome = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    // The event keeps the command's context: what reacts to it continues this trace.
    let passed_on = trace::follow(&span, trace::extract(message.headers.as_ref()));
    let traceparent = trace::traceparent(&passed_on);
    let handled = async {
        let (parsed, metadata) = match read_request(endpoint, &message, traceparent) {
            Ok(read) => read,
            Err(invalid) => {
                return Handled::Answer(Reply::refused(ErrorCode::InvalidCommand, invalid));
            }
        };
        if arrival == Arrival::Intake
            && let Some(refusal) = serving.admission(&parsed).await
        {
            return Handled::Answer(refusal);
        }
        tracing::Span::current().record("command_id", parsed.command_id.as_str());
        serving.route(parsed, metadata, &message, arrival).await
    }
    .instrument(span.clone())
    .await;
    let mut moving = false;
    let reply = match handled {
        Handled::Answer(reply) => reply,
        Handled::Moving(partition) => {
            moving = true;
            routing::moving(partition)
        }
        Handled::Relay(answer) => {
            // Counted by the owner, which ran it.
            span.record("outcome", "forwarded");
            metrics::counter!("ordo_commands_forwarded_total", "endpoint" => endpoint.name())
                .increment(1);
            if let Some(reply_to) = message.reply {
                let headers = answer.headers.unwrap_or_default();
                if let Err(err) = serving
                    .client
                    .publish_with_headers(reply_to, headers, answer.payload)
                    .await
                {
                    tracing::warn!(endpoint = endpoint.name(), %err, "could not pass the reply on");
                }
            }
            return;
        }
    };
    let error = match &reply {
        Reply::Accepted { .. } => None,
        // One line: a header value may not hold a line break.
        Reply::Refused { code, message, .. } => Some((
            *code,
            format!("{code}: {message}").replace(['\r', '\n'], " "),
        )),
    };
    let outcome = error.as_ref().map_or("ok", |(code, _)| code.as_str());
    span.record("outcome", outcome);
    metrics::counter!("ordo_commands_total", "endpoint" => endpoint.name(), "outcome" => outcome)
        .increment(1);
    let took = started.elapsed();
    metrics::histogram!("ordo_command_duration_seconds", "endpoint" => endpoint.name())
        .record(took.as_secs_f64());
    serving.micro.record(
        endpoint.index(),
        took,
        error.as_ref().map(|(_, line)| line.as_str()),
    );
    let Some(reply_to) = message.reply else {
        return; // Published, not requested: nobody to answer.
    };
    let mut reply_headers = async_nats::HeaderMap::new();
    if moving {
        reply_headers.insert(routing::MOVING_HEADER, "true");
    }
    if let Some((code, line)) = &error {
        // The micro service convention, so that tools can tell an error without the body.
        reply_headers.insert(headers::SERVICE_ERROR, line.as_str());
        reply_headers.insert(
            headers::SERVICE_ERROR_CODE,
            code.status().to_string().as_str(),
        );
    }
    if let Err(err) = serving
        .client
        .publish_with_headers(reply_to, reply_headers, reply.to_bytes().into())
        .await
    {
        tracing::warn!(endpoint = endpoint.name(), %err, "could not send the reply");
    }
}

#[cfg(test)]
mod tests {
    use super::answerable;

    #[test]
    fn only_inboxes_and_cross_account_replies_are_answered() {
        for inbox in [
            "_INBOX.abc.1",
            "_INBOX_shop.abc.1",
            "_INBOX_ordo_saga.x",
            "_R_.a1.b2",
        ] {
            assert!(answerable(inbox), "{inbox}");
        }
        for crafted in [
            "ordo.stock.events.A1",
            "ordo.order.events.o-1",
            "ordo.outcomes.ab12",
            "$JS.API.STREAM.PURGE.ORDO_COMMAND_OUTCOMES",
            "$KV.ordo_rate_limits.c1",
            "ordo.notifications.c1",
            "_INBOX",
            "_R_",
            "inbox._INBOX.x",
        ] {
            assert!(!answerable(crafted), "{crafted}");
        }
    }
}
