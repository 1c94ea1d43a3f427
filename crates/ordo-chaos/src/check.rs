//! The checker: a pure function of what the drill saw (the replies it got) and what the system
//! holds afterwards (every event of both streams, the views, sagas, notifications and the payment
//! ledger). It folds the streams with its own code, written for the checker and not shared with
//! the projectors or the domain, so that a bug there cannot hide itself here.
//!
//! Each finding names the invariant it breaks (the README lists them, under "Chaos drills").

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde_json::Value;

/// An event as stored in a stream.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub stream: String,
    pub seq: u64,
    pub event_type: String,
    pub aggregate_id: String,
    pub version: u64,
    pub command_id: String,
    pub data: Value,
}

/// A command the drill sent and saw acknowledged with `ok`.
#[derive(Debug, Clone)]
pub struct Acknowledged {
    pub command_id: String,
    pub stream: &'static str,
    pub aggregate_id: String,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRow {
    pub order_id: String,
    pub customer_id: String,
    pub status: String,
    pub total_cents: i64,
    pub version: i64,
    pub last_seq: i64,
    /// (sku, qty, unit price), in line order.
    pub lines: Vec<(String, i64, i64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockRow {
    pub sku: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub version: i64,
    pub last_seq: i64,
}

/// Everything read back once the system is quiet.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub order_events: Vec<StoredEvent>,
    pub stock_events: Vec<StoredEvent>,
    pub orders_view: Vec<OrderRow>,
    pub stock_view: Vec<StockRow>,
    /// (projection, checkpoint, head of its stream)
    pub checkpoints: Vec<(String, i64, u64)>,
    pub parked_events: i64,
    /// order id → saga state
    pub sagas: BTreeMap<String, String>,
    /// (order id, kind) → status
    pub notifications: BTreeMap<(String, String), String>,
    /// order id → (authorised, refunded)
    pub payments: BTreeMap<String, (bool, bool)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Which invariant: a short stable name.
    pub invariant: &'static str,
    pub detail: String,
}

fn violation(invariant: &'static str, detail: impl Into<String>) -> Violation {
    Violation {
        invariant,
        detail: detail.into(),
    }
}

/// An order as its events tell it.
#[derive(Debug, Clone, Default)]
struct FoldedOrder {
    customer_id: String,
    status: String,
    total_cents: i64,
    lines: Vec<(String, i64, i64)>,
    version: u64,
    last_seq: u64,
    /// Every status it reached, for the notifications.
    reached: BTreeSet<String>,
}

/// A SKU as its events tell it.
#[derive(Debug, Clone, Default)]
struct FoldedStock {
    on_hand: i128,
    reserved: i128,
    version: u64,
    last_seq: u64,
    /// order → quantity held now
    held: BTreeMap<String, i128>,
    /// order → quantity deducted on shipping
    deducted: BTreeMap<String, i128>,
}

/// Every violation of the invariants in what was seen.
pub fn check(acknowledged: &[Acknowledged], observed: &Observed) -> Vec<Violation> {
    let mut found = Vec::new();
    check_acknowledged(acknowledged, observed, &mut found);
    check_command_ids(observed, &mut found);
    let orders = fold_orders(&observed.order_events, &mut found);
    let stock = fold_stock(&observed.stock_events, &mut found);
    check_views(observed, &orders, &stock, &mut found);
    check_orders(observed, &orders, &stock, &mut found);
    found
}

fn events(observed: &Observed) -> impl Iterator<Item = &StoredEvent> {
    observed.order_events.iter().chain(&observed.stock_events)
}

/// Invariant 1: an `ok` reply means the event is in its stream, once.
fn check_acknowledged(
    acknowledged: &[Acknowledged],
    observed: &Observed,
    found: &mut Vec<Violation>,
) {
    let by_position: HashMap<(&str, u64), &StoredEvent> = events(observed)
        .map(|event| ((event.stream.as_str(), event.seq), event))
        .collect();
    for ack in acknowledged {
        match by_position.get(&(ack.stream, ack.seq)) {
            None => found.push(violation(
                "acknowledged_event_stored",
                format!(
                    "command {} was acknowledged at {} seq {} but no event is there",
                    ack.command_id, ack.stream, ack.seq
                ),
            )),
            Some(event) if event.command_id != ack.command_id || event.aggregate_id != ack.aggregate_id => {
                found.push(violation(
                    "acknowledged_event_stored",
                    format!(
                        "command {} on {} was acknowledged at {} seq {}, which holds command {} on {}",
                        ack.command_id, ack.aggregate_id, ack.stream, ack.seq, event.command_id, event.aggregate_id
                    ),
                ))
            }
            Some(_) => {}
        }
    }
}

/// Invariant 1: no command id appended twice.
fn check_command_ids(observed: &Observed, found: &mut Vec<Violation>) {
    let mut seen: HashMap<&str, Vec<(&str, u64)>> = HashMap::new();
    for event in events(observed) {
        seen.entry(event.command_id.as_str())
            .or_default()
            .push((event.stream.as_str(), event.seq));
    }
    for (command_id, places) in seen {
        if places.len() > 1 {
            found.push(violation(
                "command_appended_once",
                format!(
                    "command {command_id} appended {} times: {places:?}",
                    places.len()
                ),
            ));
        }
    }
}

fn int(data: &Value, field: &str) -> i128 {
    data[field]
        .as_i64()
        .map(i128::from)
        .or_else(|| data[field].as_u64().map(i128::from))
        .unwrap_or(-1)
}

fn text(data: &Value, field: &str) -> String {
    data[field].as_str().unwrap_or_default().to_owned()
}

fn fold_orders(
    events: &[StoredEvent],
    found: &mut Vec<Violation>,
) -> BTreeMap<String, FoldedOrder> {
    let mut orders: BTreeMap<String, FoldedOrder> = BTreeMap::new();
    for event in events {
        let order = orders.entry(event.aggregate_id.clone()).or_default();
        if event.version != order.version + 1 {
            found.push(violation(
                "event_versions_contiguous",
                format!(
                    "order {} has version {} after {}",
                    event.aggregate_id, event.version, order.version
                ),
            ));
        }
        let allowed_from: &[&str] = match event.event_type.as_str() {
            "OrderPlaced" => &[""],
            "OrderConfirmed" | "OrderRejected" => &["pending"],
            "OrderCancelled" => &["pending", "confirmed"],
            "OrderShipped" => &["confirmed"],
            other => {
                found.push(violation(
                    "known_events",
                    format!("unknown order event {other} at seq {}", event.seq),
                ));
                continue;
            }
        };
        if !allowed_from.contains(&order.status.as_str()) {
            found.push(violation(
                "order_state_machine",
                format!(
                    "order {} got {} while {}",
                    event.aggregate_id, event.event_type, order.status
                ),
            ));
        }
        match event.event_type.as_str() {
            "OrderPlaced" => {
                order.customer_id = text(&event.data, "customer_id");
                order.total_cents = int(&event.data, "total_cents") as i64;
                order.lines = event.data["lines"]
                    .as_array()
                    .map(|lines| {
                        lines
                            .iter()
                            .map(|line| {
                                (
                                    text(line, "sku"),
                                    int(line, "qty") as i64,
                                    int(line, "unit_price_cents") as i64,
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                order.status = "pending".into();
            }
            "OrderConfirmed" => order.status = "confirmed".into(),
            "OrderRejected" => order.status = "rejected".into(),
            "OrderCancelled" => order.status = "cancelled".into(),
            _ => order.status = "shipped".into(),
        }
        order.reached.insert(order.status.clone());
        order.version = event.version;
        order.last_seq = event.seq;
    }
    orders
}

/// Invariant 2, at every stock event: `0 <= reserved <= on_hand`.
fn fold_stock(events: &[StoredEvent], found: &mut Vec<Violation>) -> BTreeMap<String, FoldedStock> {
    let mut stock: BTreeMap<String, FoldedStock> = BTreeMap::new();
    for event in events {
        let sku = stock.entry(event.aggregate_id.clone()).or_default();
        if event.version != sku.version + 1 {
            found.push(violation(
                "event_versions_contiguous",
                format!(
                    "sku {} has version {} after {}",
                    event.aggregate_id, event.version, sku.version
                ),
            ));
        }
        let qty = int(&event.data, "qty");
        let order = text(&event.data, "order_id");
        match event.event_type.as_str() {
            "StockReceived" => sku.on_hand += qty,
            "StockReserved" => {
                if sku.held.contains_key(&order) {
                    found.push(violation(
                        "reserved_once",
                        format!(
                            "order {order} reserved {} twice (seq {})",
                            event.aggregate_id, event.seq
                        ),
                    ));
                }
                sku.reserved += qty;
                *sku.held.entry(order).or_default() += qty;
            }
            "StockReleased" => {
                let held = sku.held.remove(&order).unwrap_or(0);
                if held != qty {
                    found.push(violation(
                        "release_matches_reservation",
                        format!(
                            "order {order} held {held} of {} but released {qty} (seq {})",
                            event.aggregate_id, event.seq
                        ),
                    ));
                }
                sku.reserved -= qty;
            }
            "StockDeducted" => {
                let held = sku.held.remove(&order).unwrap_or(0);
                if held != qty {
                    found.push(violation(
                        "release_matches_reservation",
                        format!(
                            "order {order} held {held} of {} but deducted {qty} (seq {})",
                            event.aggregate_id, event.seq
                        ),
                    ));
                }
                sku.reserved -= qty;
                sku.on_hand -= qty;
                sku.deducted.insert(order, qty);
            }
            other => {
                found.push(violation(
                    "known_events",
                    format!("unknown stock event {other} at seq {}", event.seq),
                ));
                continue;
            }
        }
        if !(0 <= sku.reserved && sku.reserved <= sku.on_hand) {
            found.push(violation(
                "no_oversell",
                format!(
                    "{} after seq {}: reserved {} of on hand {}",
                    event.aggregate_id, event.seq, sku.reserved, sku.on_hand
                ),
            ));
        }
        sku.version = event.version;
        sku.last_seq = event.seq;
    }
    stock
}

/// Invariant 4: every view equals the fold of its stream, row for row.
fn check_views(
    observed: &Observed,
    orders: &BTreeMap<String, FoldedOrder>,
    stock: &BTreeMap<String, FoldedStock>,
    found: &mut Vec<Violation>,
) {
    for (projection, checkpoint, head) in &observed.checkpoints {
        if *checkpoint != *head as i64 {
            found.push(violation(
                "views_equal_streams",
                format!("projection {projection} is at {checkpoint}, its stream at {head}"),
            ));
        }
    }
    if observed.parked_events > 0 {
        found.push(violation(
            "views_equal_streams",
            format!(
                "{} events are parked instead of applied",
                observed.parked_events
            ),
        ));
    }
    let rows: BTreeMap<&str, &OrderRow> = observed
        .orders_view
        .iter()
        .map(|row| (row.order_id.as_str(), row))
        .collect();
    for (order_id, order) in orders {
        let expected = OrderRow {
            order_id: order_id.clone(),
            customer_id: order.customer_id.clone(),
            status: order.status.clone(),
            total_cents: order.total_cents,
            version: order.version as i64,
            last_seq: order.last_seq as i64,
            lines: order.lines.clone(),
        };
        match rows.get(order_id.as_str()) {
            Some(row) if **row == expected => {}
            Some(row) => found.push(violation(
                "views_equal_streams",
                format!("orders view has {row:?}, the stream says {expected:?}"),
            )),
            None => found.push(violation(
                "views_equal_streams",
                format!("orders view lacks order {order_id}"),
            )),
        }
    }
    for row in &observed.orders_view {
        if !orders.contains_key(&row.order_id) {
            found.push(violation(
                "views_equal_streams",
                format!("orders view has {} that no event placed", row.order_id),
            ));
        }
    }
    let rows: BTreeMap<&str, &StockRow> = observed
        .stock_view
        .iter()
        .map(|row| (row.sku.as_str(), row))
        .collect();
    for (sku, folded) in stock {
        let expected = StockRow {
            sku: sku.clone(),
            on_hand: folded.on_hand as i64,
            reserved: folded.reserved as i64,
            version: folded.version as i64,
            last_seq: folded.last_seq as i64,
        };
        match rows.get(sku.as_str()) {
            Some(row) if **row == expected => {}
            Some(row) => found.push(violation(
                "views_equal_streams",
                format!("stock view has {row:?}, the stream says {expected:?}"),
            )),
            None => found.push(violation(
                "views_equal_streams",
                format!("stock view lacks {sku}"),
            )),
        }
    }
    for row in &observed.stock_view {
        if !stock.contains_key(&row.sku) {
            found.push(violation(
                "views_equal_streams",
                format!("stock view has {} that no event created", row.sku),
            ));
        }
    }
}

/// Invariants 3, 5 and 7, order by order.
fn check_orders(
    observed: &Observed,
    orders: &BTreeMap<String, FoldedOrder>,
    stock: &BTreeMap<String, FoldedStock>,
    found: &mut Vec<Violation>,
) {
    for (order_id, order) in orders {
        if order.status == "pending" {
            found.push(violation(
                "no_order_left_pending",
                format!("order {order_id} is still pending"),
            ));
            continue;
        }
        match observed.sagas.get(order_id) {
            Some(state) if *state == order.status => {}
            saga => found.push(violation(
                "saga_order_stock_payment_agree",
                format!(
                    "order {order_id} is {} but its saga is {saga:?}",
                    order.status
                ),
            )),
        }
        let holds = |sku: &str| {
            stock
                .get(sku)
                .and_then(|s| s.held.get(order_id))
                .copied()
                .unwrap_or(0)
        };
        let deducted = |sku: &str| {
            stock
                .get(sku)
                .and_then(|s| s.deducted.get(order_id))
                .copied()
                .unwrap_or(0)
        };
        let (authorised, refunded) = observed
            .payments
            .get(order_id)
            .copied()
            .unwrap_or((false, false));
        let mut disagree = |what: String| {
            found.push(violation(
                "saga_order_stock_payment_agree",
                format!("order {order_id} is {}: {what}", order.status),
            ))
        };
        match order.status.as_str() {
            "confirmed" | "shipped" => {
                for (sku, qty, _) in &order.lines {
                    let (held, gone) = (holds(sku), deducted(sku));
                    let expected = if order.status == "confirmed" {
                        (i128::from(*qty), 0)
                    } else {
                        (0, i128::from(*qty))
                    };
                    if (held, gone) != expected {
                        disagree(format!(
                            "{sku}: holds {held}, deducted {gone}; expected {expected:?} of {qty}"
                        ));
                    }
                }
                if !authorised || refunded {
                    disagree(format!(
                        "payment authorised {authorised}, refunded {refunded}"
                    ));
                }
            }
            _ => {
                for (sku, _, _) in &order.lines {
                    if holds(sku) != 0 || deducted(sku) != 0 {
                        disagree(format!(
                            "still holds {} of {sku} (deducted {})",
                            holds(sku),
                            deducted(sku)
                        ));
                    }
                }
                if authorised && !refunded {
                    disagree("charged and not refunded".into());
                }
            }
        }
        // Invariant 5: one notification recorded per state reached, and settled: sent, or
        // dead-lettered after its attempts (visible, and retried by an operator), never pending.
        for kind in order.reached.iter().filter(|kind| *kind != "pending") {
            match observed
                .notifications
                .get(&(order_id.clone(), kind.clone()))
            {
                Some(status) if status == "sent" || status == "dead_lettered" => {}
                status => found.push(violation(
                    "one_notification_per_outcome",
                    format!("order {order_id} reached {kind}; its notification is {status:?}"),
                )),
            }
        }
    }
    for (order_id, kind) in observed.notifications.keys() {
        if !orders
            .get(order_id)
            .is_some_and(|order| order.reached.contains(kind))
        {
            found.push(violation(
                "one_notification_per_outcome",
                format!("a {kind} notification for order {order_id}, which never was {kind}"),
            ));
        }
    }
    for (sku, folded) in stock {
        for (order_id, held) in &folded.held {
            if !orders.contains_key(order_id) && *held != 0 {
                found.push(violation(
                    "saga_order_stock_payment_agree",
                    format!("{sku}: {held} held by order {order_id}, which does not exist"),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests;
