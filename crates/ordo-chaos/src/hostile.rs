//! The drill's hostile client: while the load runs, the applications' own users (`shop`,
//! `warehouse`) send what an attacker would: reply subjects that point into ordo's streams, the
//! saga's predicted command ids and the other application's, the saga's internal commands,
//! headers far over their bound, and strings no view can store.
//!
//! An attack that ordo accepts is a violation at once. Those that are refused or go unanswered
//! are counted; whatever they could have broken (an event stream, a view, an order, a command
//! id of the load) is then checked by the drill's checker like everything else.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ordo_contract::{Endpoint, ErrorCode, Reply, headers};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use serde_json::{Value, json};

use super::{
    check::{Observed, Violation},
    load::{Callers, History, SKUS},
};

/// How often an attack is sent.
const EVERY: Duration = Duration::from_millis(100);
/// How long an attack waits for an answer it should not get.
const WAIT: Duration = Duration::from_millis(500);

/// What the hostile client sent and what got through.
#[derive(Default)]
pub struct Attacks {
    pub sent: Mutex<BTreeMap<&'static str, u64>>,
    pub succeeded: Mutex<Vec<Violation>>,
}

impl Attacks {
    fn count(&self, kind: &'static str) {
        *self
            .sent
            .lock()
            .expect("not poisoned")
            .entry(kind)
            .or_default() += 1;
    }

    fn got_through(&self, kind: &'static str, detail: String) {
        self.succeeded
            .lock()
            .expect("not poisoned")
            .push(Violation {
                invariant: "caller_acts_only_on_its_own_behalf",
                detail: format!("{kind}: {detail}"),
            });
    }
}

/// Attacks until `stop` is set.
pub async fn attack(
    callers: Callers,
    seed: u64,
    history: Arc<History>,
    attacks: Arc<Attacks>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6a09_e667_f3bc_c908);
    let (shop, warehouse) = (&callers.shop.client, &callers.warehouse.client);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(EVERY).await;
        n += 1;
        let known = history
            .known_order(&mut rng)
            .unwrap_or_else(|| format!("o-{seed:x}-0-1"));
        match rng.random_range(0..6) {
            0 => {
                // The reply would be written where the reply subject says.
                let crafted = [
                    format!("ordo.stock.events.sku-{}", rng.random_range(0..SKUS)),
                    format!("ordo.order.events.{known}"),
                    "ordo.outcomes.0000".to_owned(),
                    "$JS.API.STREAM.PURGE.ORDO_COMMAND_OUTCOMES".to_owned(),
                    "$JS.API.STREAM.DELETE.ORDO_STOCK".to_owned(),
                    "$KV.ordo_rate_limits.customer.c-0".to_owned(),
                ]
                .choose(&mut rng)
                .cloned()
                .expect("not empty");
                let body = json!({"order_id": "hostile-nope"}).to_string();
                let _ = shop
                    .publish_with_reply(
                        Endpoint::OrderCancel.subject(),
                        crafted.clone(),
                        body.clone().into(),
                    )
                    .await;
                let _ = warehouse
                    .publish_with_reply(Endpoint::OrderShip.subject(), crafted, body.into())
                    .await;
                attacks.count("reply_subject");
            }
            1 => {
                // A refusal stored under a step id the saga has yet to use.
                let kind = [
                    "reserve",
                    "authorize",
                    "confirm",
                    "release",
                    "refund",
                    "reject",
                ]
                .choose(&mut rng)
                .expect("not empty");
                let order = if rng.random_bool(0.5) {
                    known
                } else {
                    format!("o-{seed:x}-{}-{}", rng.random_range(0..16), n)
                };
                let id = format!("saga:{order}:{kind}:sku-{}", rng.random_range(0..4));
                let reply = request(
                    shop,
                    Endpoint::OrderCancel.subject(),
                    &json!({"order_id": "hostile-nope"}),
                    &[(headers::MSG_ID, &id)],
                )
                .await;
                expect_refused(
                    &attacks,
                    "predicted_saga_id",
                    &reply,
                    &[ErrorCode::InvalidCommand],
                );
            }
            2 => {
                // An id the other application will send: stored first under this one's name.
                let victim_client = rng.random_range(0..16);
                let victim_n = n + rng.random_range(0..20);
                let (thief, subject, victim_tag) = if rng.random_bool(0.5) {
                    (shop, Endpoint::OrderCancel.subject(), callers.warehouse.tag)
                } else {
                    (warehouse, Endpoint::OrderShip.subject(), callers.shop.tag)
                };
                let id = format!("{victim_tag}-{seed:x}-{victim_client}-{victim_n}");
                let reply = request(
                    thief,
                    subject,
                    &json!({"order_id": "hostile-nope"}),
                    &[(headers::MSG_ID, &id)],
                )
                .await;
                expect_refused(
                    &attacks,
                    "stolen_command_id",
                    &reply,
                    &[ErrorCode::NotFound],
                );
            }
            3 => {
                // The saga's commands, on their subjects and on the ones they had before, and
                // the other application's commands. None may be answered.
                let sku = format!("sku-{}", rng.random_range(0..SKUS));
                let either = if rng.random_bool(0.5) {
                    shop
                } else {
                    warehouse
                };
                let (client, subject, body) = [
                    (
                        either,
                        Endpoint::StockReserve.subject(),
                        json!({"sku": sku, "order_id": known, "qty": 50}),
                    ),
                    (
                        either,
                        Endpoint::OrderConfirm.subject(),
                        json!({"order_id": known}),
                    ),
                    (
                        either,
                        Endpoint::StockRelease.subject(),
                        json!({"sku": sku, "order_id": known}),
                    ),
                    (
                        either,
                        "ordo.cmd.stock.reserve",
                        json!({"sku": sku, "order_id": known, "qty": 50}),
                    ),
                    (either, "ordo.cmd.order.confirm", json!({"order_id": known})),
                    (
                        shop,
                        Endpoint::StockReceive.subject(),
                        json!({"sku": sku, "qty": 1000}),
                    ),
                    (
                        warehouse,
                        Endpoint::OrderCancel.subject(),
                        json!({"order_id": known}),
                    ),
                ]
                .choose(&mut rng)
                .cloned()
                .expect("not empty");
                attacks.count("internal_or_foreign_command");
                if let Some(reply) = request(client, subject, &body, &[]).await {
                    attacks.got_through(
                        "internal_or_foreign_command",
                        format!("{subject} {body} was answered {reply}"),
                    );
                }
            }
            4 => {
                // A header ordo copies into the event, far over its bound.
                let huge = "h".repeat(60 * 1024);
                let header = if rng.random_bool(0.5) {
                    "Ordo-Correlation-Id"
                } else {
                    "Ordo-Causation-Id"
                };
                let body = json!({"order_id": format!("hostile-{seed:x}-{n}"), "customer_id": "c-hostile",
                                  "lines": [{"sku": "sku-0", "qty": 1, "unit_price_cents": 1}]});
                let reply = request(
                    shop,
                    Endpoint::OrderPlace.subject(),
                    &body,
                    &[(header, &huge)],
                )
                .await;
                expect_refused(
                    &attacks,
                    "oversized_header",
                    &reply,
                    &[ErrorCode::InvalidCommand],
                );
            }
            _ => {
                // A reason PostgreSQL cannot store (U+0000 anywhere in any text), on a real
                // order.
                let mut reason: Vec<char> = (0..rng.random_range(0..12))
                    .map(|_| rng.random::<char>())
                    .collect();
                let at = rng.random_range(0..=reason.len());
                reason.insert(at, '\0');
                let reason: String = reason.into_iter().collect();
                let body = json!({"order_id": known, "reason": reason});
                let reply = request(shop, Endpoint::OrderCancel.subject(), &body, &[]).await;
                expect_refused(
                    &attacks,
                    "unstorable_string",
                    &reply,
                    &[ErrorCode::InvalidCommand],
                );
            }
        }
    }
}

/// What an attack that got through would have left in the streams, whether or not its reply
/// came in time: an order the oversized headers placed, a reason no view can store.
pub fn traces(observed: &Observed) -> Vec<Violation> {
    observed
        .order_events
        .iter()
        .filter(|event| {
            event.aggregate_id.starts_with("hostile-")
                || event.data["reason"]
                    .as_str()
                    .is_some_and(|reason| reason.contains('\0'))
        })
        .map(|event| Violation {
            invariant: "caller_acts_only_on_its_own_behalf",
            detail: format!(
                "an attack's {} is stored at {} seq {} (command {})",
                event.event_type, event.stream, event.seq, event.command_id
            ),
        })
        .collect()
}

/// The reply to one request, if one came within [`WAIT`].
async fn request(
    client: &async_nats::Client,
    subject: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Option<Value> {
    let mut map = async_nats::HeaderMap::new();
    for (name, value) in headers {
        map.insert(*name, *value);
    }
    let request = async_nats::Request::new()
        .payload(body.to_string().into())
        .headers(map)
        .timeout(Some(WAIT));
    let reply = client
        .send_request(subject.to_owned(), request)
        .await
        .ok()?;
    serde_json::from_slice(&reply.payload).ok()
}

/// Counts the attack; it got through unless it went unanswered, was shed, or was refused with
/// one of `expected`.
fn expect_refused(
    attacks: &Attacks,
    kind: &'static str,
    reply: &Option<Value>,
    expected: &[ErrorCode],
) {
    attacks.count(kind);
    let Some(reply) = reply else { return };
    match serde_json::from_value::<Reply>(reply.clone()) {
        Ok(Reply::Refused { code, .. })
            if expected.contains(&code) || code == ErrorCode::Unavailable => {}
        _ => attacks.got_through(kind, format!("answered {reply}")),
    }
}
