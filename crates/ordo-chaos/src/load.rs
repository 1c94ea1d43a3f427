//! The drill's clients: a mixed load sent as NATS requests, as real clients send it. Each
//! command carries its own id in `Nats-Msg-Id`; a request that gets no answer (a timeout, no
//! responders, a server down) is sent again with the same id, with back-off, until it is
//! answered or the client gives up on it: then its outcome is unknown (Jepsen's `info`).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ordo_contract::{
    CancelOrder, CommandRequest, Endpoint, ErrorCode, InvalidReply, Line, PlaceOrder, Quantity,
    Reason, ReceiveStock, Reply, ShipOrder, headers,
};
use ordo_domain::{CustomerId, OrderId, Sku};
use rand::{
    Rng, SeedableRng,
    rngs::StdRng,
    seq::{IndexedRandom, SliceRandom},
};
use serde::Serialize;

use super::check::Acknowledged;

/// SKUs the load spreads over: few, so that stock is scarce and orders compete for it.
pub const SKUS: usize = 8;
/// How long one command is retried before its outcome counts as unknown.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// What the clients saw, shared between them.
#[derive(Default)]
pub struct History {
    pub acknowledged: Mutex<Vec<Acknowledged>>,
    pub refused: Mutex<BTreeMap<String, u64>>,
    pub sent: AtomicU64,
    pub answered_ok: AtomicU64,
    pub unanswered: AtomicU64,
    pub retries: AtomicU64,
    orders: Mutex<Vec<String>>,
    /// Accepted orders sent once more with their id (as a client whose reply was lost would):
    /// how many, and those whose repeat was not answered with the same outcome.
    pub repeats: AtomicU64,
    pub repeats_answered_otherwise: Mutex<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CommandCounts {
    pub sent: u64,
    pub acknowledged: u64,
    pub refused: BTreeMap<String, u64>,
    pub unanswered: u64,
    pub retries: u64,
    /// Accepted orders sent once more under their id.
    pub repeats: u64,
}

impl History {
    pub fn counts(&self) -> CommandCounts {
        CommandCounts {
            sent: self.sent.load(Ordering::Relaxed),
            acknowledged: self.answered_ok.load(Ordering::Relaxed),
            refused: self.refused.lock().expect("not poisoned").clone(),
            unanswered: self.unanswered.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            repeats: self.repeats.load(Ordering::Relaxed),
        }
    }
}

/// One application the load sends as, and the account the server names it by (its command
/// ids live in that account's space: `SHOP/<id>`). Without accounts, no account.
#[derive(Clone)]
pub struct Caller {
    pub client: async_nats::Client,
    pub account: Option<&'static str>,
    /// Starts the command ids it sends, so that each application's ids are told apart.
    pub tag: &'static str,
}

impl Caller {
    /// `command_id` as the command service records it for this caller.
    pub fn scoped(&self, command_id: &str) -> String {
        match self.account {
            Some(account) => format!("{account}/{command_id}"),
            None => command_id.to_owned(),
        }
    }
}

/// The applications of the load: the shop places and cancels, the warehouse receives and ships,
/// as docker/nats-accounts.conf allows them.
#[derive(Clone)]
pub struct Callers {
    pub shop: Caller,
    pub warehouse: Caller,
}

impl Callers {
    pub fn for_endpoint(&self, endpoint: Endpoint) -> &Caller {
        match endpoint {
            Endpoint::OrderPlace | Endpoint::OrderCancel => &self.shop,
            _ => &self.warehouse,
        }
    }
}

impl History {
    /// An order the load placed, if any yet.
    pub fn known_order(&self, rng: &mut impl Rng) -> Option<String> {
        self.orders
            .lock()
            .expect("not poisoned")
            .choose(rng)
            .cloned()
    }
}

pub fn sku(index: usize) -> Sku {
    Sku::parse(format!("sku-{index}")).expect("a valid SKU")
}

/// One client: sends a command every `every` (or as fast as they are answered, if slower) until
/// `stop` is set, then finishes the one in hand.
pub async fn client(
    callers: Callers,
    seed: u64,
    client: usize,
    every: Duration,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (client as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut pace = tokio::time::interval(every);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        pace.tick().await;
        n += 1;
        let roll: f64 = rng.random();
        let known_order = {
            let orders = history.orders.lock().expect("not poisoned");
            orders.choose(&mut rng).cloned()
        };
        let id = |text: String| OrderId::parse(text).expect("generated ids are valid");
        let request = match (roll, known_order) {
            (r, _) if r < 0.15 => CommandRequest::ReceiveStock(ReceiveStock {
                sku: sku(rng.random_range(0..SKUS)),
                qty: Quantity::new(rng.random_range(1..=6)).expect("positive"),
            }),
            (r, Some(order_id)) if r < 0.27 => CommandRequest::CancelOrder(CancelOrder {
                order_id: id(order_id),
                reason: Some(Reason::new("chaos").expect("a valid reason")),
            }),
            (r, Some(order_id)) if r < 0.40 => CommandRequest::ShipOrder(ShipOrder {
                order_id: id(order_id),
            }),
            _ => {
                let count = rng.random_range(1..=3);
                let mut skus: Vec<usize> = (0..SKUS).collect();
                let (chosen, _) = skus.partial_shuffle(&mut rng, count);
                let lines = chosen
                    .iter()
                    .map(|index| Line {
                        sku: sku(*index),
                        qty: Quantity::new(rng.random_range(1..=3)).expect("positive"),
                        unit_price_cents: rng.random_range(100..1000),
                    })
                    .collect();
                CommandRequest::PlaceOrder(PlaceOrder {
                    order_id: Some(id(format!("o-{seed:x}-{client}-{n}"))),
                    customer_id: CustomerId::parse(format!("c-{client}")).expect("a valid id"),
                    lines,
                    currency: None,
                })
            }
        };
        let caller = callers.for_endpoint(request.endpoint());
        let command_id = format!("{}-{seed:x}-{client}-{n}", caller.tag);
        history.sent.fetch_add(1, Ordering::Relaxed);
        match send_until_answered(&caller.client, &request, &command_id, &history).await {
            Some(Reply::Accepted { aggregate, seq, .. }) => {
                let aggregate_id = aggregate.to_string();
                history.answered_ok.fetch_add(1, Ordering::Relaxed);
                let stream = ordo_eventstore::stream_for_category(request.endpoint().category())
                    .expect("every endpoint acts on a category with a stream");
                if let CommandRequest::PlaceOrder(_) = request {
                    history
                        .orders
                        .lock()
                        .expect("not poisoned")
                        .push(aggregate_id.clone());
                    if rng.random_bool(REPEAT_SHARE) {
                        repeat_accepted(&caller.client, &request, &command_id, seq, &history).await;
                    }
                }
                history
                    .acknowledged
                    .lock()
                    .expect("not poisoned")
                    .push(Acknowledged {
                        command_id: caller.scoped(&command_id),
                        stream,
                        aggregate_id,
                        seq,
                    });
            }
            Some(Reply::Refused { code, .. }) => {
                let code = code.as_str().to_owned();
                *history
                    .refused
                    .lock()
                    .expect("not poisoned")
                    .entry(code)
                    .or_default() += 1;
            }
            None => {
                history.unanswered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The share of accepted orders sent once more with their command id.
const REPEAT_SHARE: f64 = 0.1;

/// Sends an accepted command once more with its id: its recorded outcome must come back (the
/// same sequence), whatever the load, also while ordo sheds or rate-limits. No answer, or
/// `unavailable` (the record could not be read), is no answer; any other answer is noted.
async fn repeat_accepted(
    nats: &async_nats::Client,
    command: &CommandRequest,
    command_id: &str,
    accepted_seq: u64,
    history: &History,
) {
    history.repeats.fetch_add(1, Ordering::Relaxed);
    match send_once(nats, command, command_id).await {
        None => {}
        Some(Ok(Reply::Accepted { seq, .. })) if seq == accepted_seq => {}
        // The service could not read the record (NATS restarting, its outcome read timed out):
        // no answer, as for any request. Shedding and rate limits never answer a repeat so.
        Some(Ok(Reply::Refused {
            code: ErrorCode::Unavailable,
            ..
        })) => {}
        Some(other) => history
            .repeats_answered_otherwise
            .lock()
            .expect("not poisoned")
            .push(format!(
                "{command_id} (accepted at seq {accepted_seq}) repeated: {other:?}"
            )),
    }
}

/// Sends the command once under `command_id`: `None` when no reply came, else the reply as
/// read.
async fn send_once(
    nats: &async_nats::Client,
    command: &CommandRequest,
    command_id: &str,
) -> Option<Result<Reply, InvalidReply>> {
    let mut request_headers = async_nats::HeaderMap::new();
    request_headers.insert(headers::MSG_ID, command_id);
    let request = async_nats::Request::new()
        .headers(request_headers)
        .payload(command.body_bytes().into())
        .timeout(Some(REQUEST_TIMEOUT));
    let reply = nats.send_request(command.subject(), request).await.ok()?;
    Some(Reply::parse(&reply.payload))
}

/// Sends the request until it is answered (other than `unavailable`), or gives up: `None`.
async fn send_until_answered(
    nats: &async_nats::Client,
    command: &CommandRequest,
    command_id: &str,
    history: &History,
) -> Option<Reply> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        if let Some(Ok(reply)) = send_once(nats, command, command_id).await
            && !matches!(
                reply,
                Reply::Refused {
                    code: ErrorCode::Unavailable,
                    ..
                }
            )
        {
            return Some(reply);
        }
        if started.elapsed() > GIVE_UP_AFTER {
            return None;
        }
        history.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}
