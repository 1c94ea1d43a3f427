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

use rand::{
    Rng, SeedableRng,
    rngs::StdRng,
    seq::{IndexedRandom, SliceRandom},
};
use serde::Serialize;
use serde_json::{Value, json};

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
}

#[derive(Debug, Clone, Serialize)]
pub struct CommandCounts {
    pub sent: u64,
    pub acknowledged: u64,
    pub refused: BTreeMap<String, u64>,
    pub unanswered: u64,
    pub retries: u64,
}

impl History {
    pub fn counts(&self) -> CommandCounts {
        CommandCounts {
            sent: self.sent.load(Ordering::Relaxed),
            acknowledged: self.answered_ok.load(Ordering::Relaxed),
            refused: self.refused.lock().expect("not poisoned").clone(),
            unanswered: self.unanswered.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }
}

pub fn sku(index: usize) -> String {
    format!("sku-{index}")
}

/// One client: sends a command every `every` (or as fast as they are answered, if slower) until
/// `stop` is set, then finishes the one in hand.
pub async fn client(
    nats: async_nats::Client,
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
        let command_id = format!("chaos-{seed:x}-{client}-{n}");
        let roll: f64 = rng.random();
        let known_order = {
            let orders = history.orders.lock().expect("not poisoned");
            orders.choose(&mut rng).cloned()
        };
        let (subject, body, stream, key) = match (roll, known_order) {
            (r, _) if r < 0.15 => {
                let sku = sku(rng.random_range(0..SKUS));
                let body = json!({"sku": sku, "qty": rng.random_range(1..=6)});
                ("ordo.cmd.stock.receive", body, "ORDO_STOCK", "sku")
            }
            (r, Some(order_id)) if r < 0.27 => (
                "ordo.cmd.order.cancel",
                json!({"order_id": order_id, "reason": "chaos"}),
                "ORDO_ORDERS",
                "order_id",
            ),
            (r, Some(order_id)) if r < 0.40 => (
                "ordo.cmd.order.ship",
                json!({"order_id": order_id}),
                "ORDO_ORDERS",
                "order_id",
            ),
            _ => {
                let order_id = format!("o-{seed:x}-{client}-{n}");
                let count = rng.random_range(1..=3);
                let mut skus: Vec<usize> = (0..SKUS).collect();
                let (chosen, _) = skus.partial_shuffle(&mut rng, count);
                let lines: Vec<Value> = chosen
                    .iter()
                    .map(|index| {
                        json!({"sku": sku(*index), "qty": rng.random_range(1..=3), "unit_price_cents": rng.random_range(100..1000)})
                    })
                    .collect();
                let body = json!({"order_id": order_id, "customer_id": format!("c-{client}"), "lines": lines});
                ("ordo.cmd.order.place", body, "ORDO_ORDERS", "order_id")
            }
        };
        history.sent.fetch_add(1, Ordering::Relaxed);
        match send_until_answered(&nats, subject, &body, &command_id, &history).await {
            Some(reply) if reply["ok"] == true => {
                history.answered_ok.fetch_add(1, Ordering::Relaxed);
                let aggregate_id = reply[key].as_str().unwrap_or_default().to_owned();
                if subject == "ordo.cmd.order.place" {
                    history
                        .orders
                        .lock()
                        .expect("not poisoned")
                        .push(aggregate_id.clone());
                }
                history
                    .acknowledged
                    .lock()
                    .expect("not poisoned")
                    .push(Acknowledged {
                        command_id,
                        stream,
                        aggregate_id,
                        seq: reply["seq"].as_u64().unwrap_or(0),
                    });
            }
            Some(reply) => {
                let code = reply["error"]["code"]
                    .as_str()
                    .unwrap_or("unreadable")
                    .to_owned();
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

/// Sends the request until it is answered (other than `unavailable`), or gives up: `None`.
async fn send_until_answered(
    nats: &async_nats::Client,
    subject: &str,
    body: &Value,
    command_id: &str,
    history: &History,
) -> Option<Value> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", command_id);
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(serde_json::to_vec(body).expect("JSON").into())
            .timeout(Some(REQUEST_TIMEOUT));
        if let Ok(reply) = nats.send_request(subject.to_owned(), request).await
            && let Ok(reply) = serde_json::from_slice::<Value>(&reply.payload)
            && reply["error"]["code"] != "unavailable"
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
