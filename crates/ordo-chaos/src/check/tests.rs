//! The checker is tested the way Jepsen's are: a clean history passes, and each planted
//! anomaly is reported under its invariant. A check that cannot fail proves nothing.

use super::*;
use serde_json::json;

fn event(
    stream: &str,
    seq: u64,
    event_type: &str,
    id: &str,
    version: u64,
    command_id: &str,
    data: Value,
) -> StoredEvent {
    StoredEvent {
        stream: stream.into(),
        seq,
        event_type: event_type.into(),
        aggregate_id: id.into(),
        version,
        command_id: command_id.into(),
        data,
    }
}

/// A1 received 5; order o-1 (A1 ×2) reserved, paid and confirmed; o-2 (A1 ×9) rejected.
fn clean() -> (Vec<Acknowledged>, Observed) {
    let stock_events = vec![
        event(
            ordo_eventstore::StreamId::Stock.name(),
            1,
            "StockReceived",
            "A1",
            1,
            "r-1",
            json!({"qty": 5}),
        ),
        event(
            ordo_eventstore::StreamId::Stock.name(),
            2,
            "StockReserved",
            "A1",
            2,
            "saga:o-1:reserve:A1",
            json!({"order_id": "o-1", "qty": 2}),
        ),
        event(
            ordo_eventstore::StreamId::Stock.name(),
            3,
            "StockReleased",
            "A1",
            3,
            "saga:o-2:release:A1",
            json!({"order_id": "o-2", "qty": 0}),
        ),
    ];
    let order_events = vec![
        event(
            ordo_eventstore::StreamId::Orders.name(),
            1,
            "OrderPlaced",
            "o-1",
            1,
            "p-1",
            json!({"customer_id": "c1", "total_cents": 200, "lines": [{"sku": "A1", "qty": 2, "unit_price_cents": 100}]}),
        ),
        event(
            ordo_eventstore::StreamId::Orders.name(),
            2,
            "OrderPlaced",
            "o-2",
            1,
            "p-2",
            json!({"customer_id": "c1", "total_cents": 900, "lines": [{"sku": "A1", "qty": 9, "unit_price_cents": 100}]}),
        ),
        event(
            ordo_eventstore::StreamId::Orders.name(),
            3,
            "OrderConfirmed",
            "o-1",
            2,
            "saga:o-1:confirm",
            json!({}),
        ),
        event(
            ordo_eventstore::StreamId::Orders.name(),
            4,
            "OrderRejected",
            "o-2",
            2,
            "saga:o-2:reject#2d7e1d4c8d1b3a5f",
            json!({"reason": "insufficient stock"}),
        ),
    ];
    let order_row =
        |id: &str, status: &str, total: i64, qty: i64, version: i64, last_seq: i64| OrderRow {
            order_id: id.into(),
            customer_id: "c1".into(),
            status: status.into(),
            total_cents: total,
            version,
            last_seq,
            lines: vec![("A1".into(), qty, 100)],
        };
    let observed = Observed {
        order_events,
        stock_events,
        orders_view: vec![
            order_row("o-1", "confirmed", 200, 2, 2, 3),
            order_row("o-2", "rejected", 900, 9, 2, 4),
        ],
        stock_view: vec![StockRow {
            sku: "A1".into(),
            on_hand: 5,
            reserved: 2,
            version: 3,
            last_seq: 3,
        }],
        checkpoints: vec![("orders".into(), 4, 4), ("stock".into(), 3, 3)],
        parked_events: 0,
        sagas: [("o-1", "confirmed"), ("o-2", "rejected")]
            .map(|(o, s)| (o.to_owned(), s.to_owned()))
            .into(),
        notifications: [("o-1", "confirmed"), ("o-2", "rejected")]
            .map(|(o, k)| ((o.to_owned(), k.to_owned()), "sent".to_owned()))
            .into(),
        payments: [("o-1".to_owned(), (true, false))].into(),
    };
    let acknowledged = vec![
        Acknowledged {
            command_id: "r-1".into(),
            stream: ordo_eventstore::StreamId::Stock.name(),
            aggregate_id: "A1".into(),
            seq: 1,
        },
        Acknowledged {
            command_id: "p-1".into(),
            stream: ordo_eventstore::StreamId::Orders.name(),
            aggregate_id: "o-1".into(),
            seq: 1,
        },
    ];
    (acknowledged, observed)
}

fn invariants(acknowledged: &[Acknowledged], observed: &Observed) -> Vec<&'static str> {
    let mut names: Vec<&str> = check(acknowledged, observed)
        .iter()
        .map(|v| v.invariant)
        .collect();
    names.dedup();
    names
}

#[test]
fn a_consistent_history_passes() {
    let (acknowledged, observed) = clean();
    assert_eq!(check(&acknowledged, &observed), vec![]);
}

#[test]
fn a_lost_acknowledged_write_is_reported() {
    let (mut acknowledged, observed) = clean();
    acknowledged.push(Acknowledged {
        command_id: "r-2".into(),
        stream: ordo_eventstore::StreamId::Stock.name(),
        aggregate_id: "A1".into(),
        seq: 9,
    });
    assert_eq!(
        invariants(&acknowledged, &observed),
        ["acknowledged_event_stored"]
    );
}

#[test]
fn a_command_appended_twice_is_reported() {
    let (acknowledged, mut observed) = clean();
    observed.stock_events.push(event(
        ordo_eventstore::StreamId::Stock.name(),
        4,
        "StockReceived",
        "A1",
        4,
        "r-1",
        json!({"qty": 5}),
    ));
    observed.stock_view[0] = StockRow {
        sku: "A1".into(),
        on_hand: 10,
        reserved: 2,
        version: 4,
        last_seq: 4,
    };
    observed.checkpoints[1] = ("stock".into(), 4, 4);
    assert_eq!(
        invariants(&acknowledged, &observed),
        ["command_appended_once"]
    );
}

#[test]
fn an_oversold_sku_is_reported() {
    let (acknowledged, mut observed) = clean();
    observed.stock_events[1].data = json!({"order_id": "o-1", "qty": 7});
    let names = invariants(&acknowledged, &observed);
    assert!(names.contains(&"no_oversell"), "{names:?}");
}

#[test]
fn a_view_that_differs_from_its_stream_is_reported() {
    let (acknowledged, mut observed) = clean();
    observed.orders_view[1].status = "pending".into();
    assert_eq!(
        invariants(&acknowledged, &observed),
        ["views_equal_streams"]
    );
    let (acknowledged, mut observed) = clean();
    observed.checkpoints[0].1 = 3;
    assert_eq!(
        invariants(&acknowledged, &observed),
        ["views_equal_streams"]
    );
}

#[test]
fn an_order_left_pending_is_reported() {
    let (acknowledged, mut observed) = clean();
    observed.order_events.pop();
    observed.orders_view[1] = OrderRow {
        status: "pending".into(),
        version: 1,
        last_seq: 2,
        ..observed.orders_view[1].clone()
    };
    observed.checkpoints[0] = ("orders".into(), 3, 3);
    observed
        .notifications
        .remove(&("o-2".to_owned(), "rejected".to_owned()));
    assert_eq!(
        invariants(&acknowledged, &observed),
        ["no_order_left_pending"]
    );
}

#[test]
fn a_confirmed_order_whose_stock_was_released_and_payment_refunded_is_reported() {
    // The bug the first drills found: the saga compensated past its pivot.
    let (acknowledged, mut observed) = clean();
    observed.stock_events.push(event(
        ordo_eventstore::StreamId::Stock.name(),
        4,
        "StockReleased",
        "A1",
        4,
        "saga:o-1:release:A1",
        json!({"order_id": "o-1", "qty": 2}),
    ));
    observed.stock_view[0] = StockRow {
        sku: "A1".into(),
        on_hand: 5,
        reserved: 0,
        version: 4,
        last_seq: 4,
    };
    observed.checkpoints[1] = ("stock".into(), 4, 4);
    observed.sagas.insert("o-1".into(), "rejected".into());
    observed.payments.insert("o-1".into(), (true, true));
    let violations = check(&acknowledged, &observed);
    assert_eq!(violations.len(), 3, "{violations:#?}");
    assert!(
        violations
            .iter()
            .all(|v| v.invariant == "saga_order_stock_payment_agree")
    );
}

#[test]
fn a_rejected_order_that_was_charged_and_not_refunded_is_reported() {
    let (acknowledged, mut observed) = clean();
    observed.payments.insert("o-2".into(), (true, false));
    assert_eq!(
        invariants(&acknowledged, &observed),
        ["saga_order_stock_payment_agree"]
    );
}

#[test]
fn a_dead_lettered_notification_is_recorded_but_a_pending_one_is_reported() {
    let (acknowledged, mut observed) = clean();
    let key = ("o-1".to_owned(), "confirmed".to_owned());
    observed
        .notifications
        .insert(key.clone(), "dead_lettered".into());
    assert_eq!(check(&acknowledged, &observed), vec![]);
    observed.notifications.insert(key, "pending".into());
    assert_eq!(
        invariants(&acknowledged, &observed),
        ["one_notification_per_outcome"]
    );
}

#[test]
fn a_missing_or_extra_notification_is_reported() {
    let (acknowledged, mut observed) = clean();
    observed
        .notifications
        .remove(&("o-1".to_owned(), "confirmed".to_owned()));
    observed
        .notifications
        .insert(("o-2".into(), "shipped".into()), "sent".into());
    let violations = check(&acknowledged, &observed);
    assert_eq!(violations.len(), 2, "{violations:#?}");
    assert!(
        violations
            .iter()
            .all(|v| v.invariant == "one_notification_per_outcome")
    );
}
