//! The saga's specification: the plan, each step's outcome, compensation, deadlines.

use super::*;

fn line(sku: &str, qty: u32) -> OrderLine {
    OrderLine {
        sku: Sku::parse(sku).unwrap(),
        qty,
        unit_price_cents: 100,
    }
}

/// A saga for an order of A1 ×2 and B2 ×1, 300 cents.
fn placed() -> Saga {
    Saga::start(
        OrderId::parse("o-1").unwrap(),
        CustomerId::parse("c-1").unwrap(),
        &[line("A1", 2), line("B2", 1)],
        300,
    )
}

fn sku(s: &str) -> Sku {
    Sku::parse(s).unwrap()
}

/// Runs the next step with `outcome` and returns the saga after it.
fn run(saga: Saga, outcome: Outcome) -> Saga {
    let (index, _) = saga.next_step().expect("a next step");
    saga.record(index, outcome, chrono::Utc::now())
}

fn next(saga: &Saga) -> Option<Step> {
    saga.next_step().map(|(_, planned)| planned.step.clone())
}

fn run_all_ok(mut saga: Saga) -> Saga {
    while saga.next_step().is_some() {
        saga = run(saga, Outcome::Succeeded);
    }
    saga
}

#[test]
fn a_placed_order_reserves_each_line_then_authorises_then_confirms() {
    let mut saga = placed();
    let mut seen = Vec::new();
    while let Some(step) = next(&saga) {
        seen.push(step);
        saga = run(saga, Outcome::Succeeded);
    }
    assert_eq!(
        seen,
        [
            Step::Reserve {
                sku: sku("A1"),
                qty: 2
            },
            Step::Reserve {
                sku: sku("B2"),
                qty: 1
            },
            Step::Authorize { amount_cents: 300 },
            Step::Confirm,
        ]
    );
    assert_eq!(saga.state, SagaState::Confirmed);
}

#[test]
fn a_line_out_of_stock_releases_the_reservations_made_in_reverse_order_and_rejects() {
    let saga = run(placed(), Outcome::Succeeded);
    let saga = run(saga, Outcome::Failed("insufficient stock for B2".into()));
    assert_eq!(saga.state, SagaState::Compensating);
    assert_eq!(next(&saga), Some(Step::Release { sku: sku("A1") }));
    let saga = run(saga, Outcome::Succeeded);
    assert_eq!(
        next(&saga),
        Some(Step::Reject {
            reason: "insufficient stock for B2".into()
        })
    );
    let saga = run(saga, Outcome::Succeeded);
    assert_eq!(saga.state, SagaState::Rejected);
    assert_eq!(saga.reason.as_deref(), Some("insufficient stock for B2"));
    let skipped: Vec<&str> = saga
        .steps
        .iter()
        .filter(|p| p.state == StepState::Skipped)
        .map(|p| p.step.kind())
        .collect();
    assert_eq!(skipped, ["authorize", "confirm"]);
}

#[test]
fn a_declined_payment_releases_every_line_in_reverse_and_rejects() {
    let saga = run(run(placed(), Outcome::Succeeded), Outcome::Succeeded);
    let mut saga = run(saga, Outcome::Failed("payment declined".into()));
    let mut undo = Vec::new();
    while let Some(step) = next(&saga) {
        undo.push(step);
        saga = run(saga, Outcome::Succeeded);
    }
    assert_eq!(
        undo,
        [
            Step::Release { sku: sku("B2") },
            Step::Release { sku: sku("A1") },
            Step::Reject {
                reason: "payment declined".into()
            },
        ]
    );
    assert_eq!(saga.state, SagaState::Rejected);
}

#[test]
fn a_decline_too_long_or_with_u0000_is_cut_to_a_reason_the_reject_can_carry() {
    let long = format!("card refused: {}", "é".repeat(600));
    for (decline, kept) in [
        // 14 bytes of text, then 2 bytes a character: cut at 1,020, the last boundary
        // that leaves room for the 3 bytes of "…".
        (long.clone(), format!("{}…", &long[..1020])),
        ("bad\0card".to_owned(), "bad\u{FFFD}card".to_owned()),
        ("short".to_owned(), "short".to_owned()),
    ] {
        let saga = run(run(placed(), Outcome::Succeeded), Outcome::Succeeded);
        let saga = run(saga, Outcome::Failed(decline));
        assert_eq!(saga.reason.as_deref(), Some(kept.as_str()));
        assert!(kept.len() <= crate::order::MAX_REASON_LEN);
        let reject = saga.steps.iter().find_map(|planned| match &planned.step {
            Step::Reject { reason } => Some(reason.clone()),
            _ => None,
        });
        assert_eq!(reject, Some(kept));
    }
}

#[test]
fn a_forward_step_without_an_answer_is_retried_until_the_deadline_then_undone() {
    let mut saga = placed();
    for attempt in 1..=50 {
        saga = run(saga, Outcome::Unknown("no responders".into()));
        assert_eq!(saga.state, SagaState::Running, "attempt {attempt}");
        assert_eq!(
            next(&saga),
            Some(Step::Reserve {
                sku: sku("A1"),
                qty: 2
            }),
            "an outage is waited out: no count of attempts gives up"
        );
    }
    let saga = saga.time_out();
    assert_eq!(saga.state, SagaState::Compensating);
    // The reserve may have happened: it is sent again under its id to learn whether it
    // did (so that no copy of it can run later), then released.
    assert_eq!(
        next(&saga),
        Some(Step::ResolveReserve {
            sku: sku("A1"),
            qty: 2
        })
    );
    assert_eq!(
        saga.command_id(saga.next_step().unwrap().0),
        saga.command_id(0)
    );
    assert_eq!(saga.reason.as_deref(), Some("timeout"));
}

#[test]
fn confirm_is_the_point_of_no_return() {
    let saga = run(
        run(run(placed(), Outcome::Succeeded), Outcome::Succeeded),
        Outcome::Succeeded,
    );
    assert_eq!(next(&saga), Some(Step::Confirm));
    // The confirm may be in flight: the deadline no longer undoes anything.
    let mut saga = saga.time_out();
    assert_eq!(next(&saga), Some(Step::Confirm));
    for _ in 0..20 {
        saga = run(saga, Outcome::Unknown("timed out".into()));
        saga = run(saga, Outcome::Failed("order o-1 is pending".into())).time_out();
        assert_eq!(next(&saga), Some(Step::Confirm), "only ever forward");
    }
    assert_eq!(saga.state, SagaState::CompensationStuck, "and visible");
    assert!(
        !saga.steps.iter().any(|p| p.step.is_compensation()),
        "nothing was compensated"
    );
    let saga = run(saga, Outcome::Succeeded);
    assert_eq!(saga.state, SagaState::Confirmed);
    assert_eq!(saga.reason, None);
}

#[test]
fn a_deadline_while_a_step_may_be_in_flight_undoes_that_step_too() {
    // A1 is reserved; the reserve of B2 is the current step: a coordinator may have sent it
    // and died before recording it.
    let saga = run(placed(), Outcome::Succeeded).time_out();
    let mut saga = saga;
    let mut undo = Vec::new();
    while let Some(step) = next(&saga) {
        undo.push(step);
        saga = run(saga, Outcome::Succeeded);
    }
    assert_eq!(
        undo,
        [
            Step::ResolveReserve {
                sku: sku("B2"),
                qty: 1
            },
            Step::Release { sku: sku("B2") },
            Step::Release { sku: sku("A1") },
            Step::Reject {
                reason: "timeout".into()
            },
        ]
    );
}

#[test]
fn a_compensation_that_finds_nothing_to_undo_is_done() {
    let saga = run(
        run(placed(), Outcome::Succeeded),
        Outcome::Failed("out of stock".into()),
    );
    let saga = run(
        saga,
        Outcome::Failed("the reservation of order o-1 on A1 was already released".into()),
    );
    assert_eq!(
        next(&saga),
        Some(Step::Reject {
            reason: "out of stock".into()
        })
    );
}

#[test]
fn a_compensation_without_an_answer_shows_stuck_and_keeps_being_retried() {
    let mut saga = run(
        run(placed(), Outcome::Succeeded),
        Outcome::Failed("out of stock".into()),
    );
    for _ in 0..STUCK_AFTER_ATTEMPTS {
        saga = run(saga, Outcome::Unknown("stock service unavailable".into()));
    }
    assert_eq!(saga.state, SagaState::CompensationStuck);
    assert!(
        saga.shown_reason()
            .unwrap()
            .starts_with("release outcome unknown after 6 attempts"),
        "{:?}",
        saga.shown_reason()
    );
    assert_eq!(
        next(&saga),
        Some(Step::Release { sku: sku("A1") }),
        "a stuck saga is still driven"
    );
    let saga = run_all_ok(saga);
    assert_eq!(saga.state, SagaState::Rejected);
    assert_eq!(saga.reason.as_deref(), Some("out of stock"));
}

#[test]
fn an_operator_retry_of_a_stuck_saga_starts_a_fresh_count() {
    let mut saga = run(
        run(placed(), Outcome::Succeeded),
        Outcome::Failed("out of stock".into()),
    );
    for _ in 0..STUCK_AFTER_ATTEMPTS {
        saga = run(saga, Outcome::Unknown("no answer".into()));
    }
    let saga = saga.retry_stuck();
    assert_eq!(saga.state, SagaState::Compensating);
    assert_eq!(saga.next_step().unwrap().1.attempts, 0);
}

#[test]
fn the_deadline_rejects_a_running_saga_with_reason_timeout_after_compensating() {
    let saga = run(placed(), Outcome::Succeeded).time_out();
    assert_eq!(
        next(&saga),
        Some(Step::ResolveReserve {
            sku: sku("B2"),
            qty: 1
        })
    );
    let saga = run_all_ok(saga);
    assert_eq!(
        (saga.state, saga.reason.as_deref()),
        (SagaState::Rejected, Some("timeout"))
    );
    // A deadline for a saga that already finished does nothing.
    let confirmed = run_all_ok(placed());
    assert_eq!(confirmed.clone().time_out(), confirmed);
}

#[test]
fn cancelling_a_confirmed_order_releases_its_stock_and_refunds() {
    let saga = run_all_ok(placed()).cancel();
    assert_eq!(saga.state, SagaState::Cancelling);
    let mut undo = Vec::new();
    let mut saga = saga;
    while let Some(step) = next(&saga) {
        undo.push(step);
        saga = run(saga, Outcome::Succeeded);
    }
    assert_eq!(
        undo,
        [
            Step::Release { sku: sku("B2") },
            Step::Release { sku: sku("A1") },
            Step::Refund { amount_cents: 300 },
        ]
    );
    assert_eq!(saga.state, SagaState::Cancelled);
}

#[test]
fn cancelling_while_reserving_drops_the_rest_and_releases_what_was_reserved() {
    let saga = run(placed(), Outcome::Succeeded).cancel();
    // B2's reserve was about to run, so it may have: resolved, then released.
    assert_eq!(
        next(&saga),
        Some(Step::ResolveReserve {
            sku: sku("B2"),
            qty: 1
        })
    );
    assert_eq!(run_all_ok(saga).state, SagaState::Cancelled);
}

#[test]
fn shipping_deducts_every_reservation() {
    let mut saga = run_all_ok(placed()).ship();
    let mut deducted = Vec::new();
    while let Some(step) = next(&saga) {
        deducted.push(step);
        saga = run(saga, Outcome::Succeeded);
    }
    assert_eq!(
        deducted,
        [
            Step::Deduct { sku: sku("A1") },
            Step::Deduct { sku: sku("B2") }
        ]
    );
    assert_eq!(saga.state, SagaState::Shipped);
}

#[test]
fn a_saga_stuck_while_shipping_resumes_shipping_when_retried() {
    let mut saga = run_all_ok(placed()).ship();
    for _ in 0..STUCK_AFTER_ATTEMPTS {
        saga = run(saga, Outcome::Unknown("no answer".into()));
    }
    assert_eq!(saga.state, SagaState::CompensationStuck);
    assert_eq!(run_all_ok(saga.retry_stuck()).state, SagaState::Shipped);
}

#[test]
fn a_shipping_that_arrives_while_the_confirm_is_unanswered_is_applied_once_confirmed() {
    let saga = run(
        run(run(placed(), Outcome::Succeeded), Outcome::Succeeded),
        Outcome::Succeeded,
    );
    let saga = run(saga, Outcome::Unknown("timed out".into())).ship();
    assert_eq!(next(&saga), Some(Step::Confirm));
    let saga = run(saga, Outcome::Succeeded);
    assert_eq!(saga.state, SagaState::Shipping);
    assert_eq!(next(&saga), Some(Step::Deduct { sku: sku("A1") }));
    assert_eq!(run_all_ok(saga).state, SagaState::Shipped);
}

#[test]
fn a_refused_deduction_is_recorded_and_never_compensated() {
    let saga = run_all_ok(placed()).ship();
    let saga = run(saga, Outcome::Failed("no reservation to deduct".into()));
    let saga = run_all_ok(saga);
    assert_eq!(saga.state, SagaState::Shipped);
    assert!(!saga.steps.iter().any(|p| p.step.is_compensation()));
}

#[test]
fn an_operators_reject_while_the_saga_stands_at_the_confirm_undoes_it_and_ends_rejected() {
    let saga = run(
        run(run(placed(), Outcome::Succeeded), Outcome::Succeeded),
        Outcome::Succeeded,
    );
    // The confirm is refused: the order was rejected meanwhile.
    let saga = run(saga, Outcome::Failed("order o-1 is rejected".into()));
    assert_eq!(next(&saga), Some(Step::Confirm));
    let mut saga = saga.order_rejected("fraud suspected");
    let mut undo = Vec::new();
    while let Some(step) = next(&saga) {
        undo.push(step);
        saga = run(saga, Outcome::Succeeded);
    }
    assert_eq!(
        undo,
        [
            Step::Release { sku: sku("B2") },
            Step::Release { sku: sku("A1") },
            Step::Refund { amount_cents: 300 },
        ],
        "the stock and the charge are given back; no reject is sent again"
    );
    assert_eq!(saga.state, SagaState::Rejected);
    assert_eq!(
        saga.reason.as_deref(),
        Some("the order was rejected: fraud suspected")
    );
    // The saga's own reject, arriving while it compensates or after, changes nothing.
    let own = run(placed(), Outcome::Failed("out of stock".into()));
    assert_eq!(own.clone().order_rejected("out of stock"), own);
}

#[test]
fn a_cancellation_that_beat_the_reject_ends_the_saga_cancelled() {
    let saga = run(
        run(placed(), Outcome::Succeeded),
        Outcome::Failed("out of stock".into()),
    );
    let saga = run(saga, Outcome::Succeeded); // release A1
    let saga = run(saga, Outcome::Failed("order o-1 is cancelled".into())); // reject refused
    assert_eq!(saga.state, SagaState::Rejected);
    assert_eq!(saga.cancel().state, SagaState::Cancelled);
}

#[test]
fn a_cancellation_while_a_compensation_is_stuck_takes_over() {
    let mut saga = run(
        run(placed(), Outcome::Succeeded),
        Outcome::Failed("out of stock".into()),
    );
    for _ in 0..STUCK_AFTER_ATTEMPTS {
        saga = run(saga, Outcome::Unknown("no answer".into()));
    }
    let saga = saga.cancel();
    assert_eq!(saga.state, SagaState::Cancelling);
    assert_eq!(next(&saga), Some(Step::Release { sku: sku("A1") }));
    assert_eq!(run_all_ok(saga).state, SagaState::Cancelled);
}

#[test]
fn a_steps_command_id_names_what_it_does_not_where_it_stands_in_the_plan() {
    let saga = run(placed(), Outcome::Failed("x".into()));
    let ids: Vec<String> = (0..saga.steps.len()).map(|i| saga.command_id(i)).collect();
    assert_eq!(
        ids[..4],
        [
            "saga:o-1:reserve:A1",
            "saga:o-1:reserve:B2",
            "saga:o-1:authorize:300",
            "saga:o-1:confirm"
        ]
    );
    assert!(ids.last().unwrap().starts_with("saga:o-1:reject#"));
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
    // The same release, wherever a plan puts it, is one command id.
    let release = Step::Release { sku: sku("A1") };
    assert_eq!(release.command_id(&saga.order_id), "saga:o-1:release:A1");
    // Two rejects for different reasons are two commands.
    let reject = |reason: &str| {
        Step::Reject {
            reason: reason.into(),
        }
        .command_id(&saga.order_id)
    };
    assert_ne!(reject("timeout"), reject("out of stock"));
}

#[test]
fn a_saga_stored_by_an_earlier_build_keeps_the_ids_its_steps_were_sent_under() {
    // Its reserve of B2 was sent as saga:o-1:1:reserve and had no answer; then the deadline.
    let mut stored = serde_json::to_value(run(placed(), Outcome::Succeeded)).unwrap();
    stored.as_object_mut().unwrap().remove("step_ids");
    let saga: Saga = serde_json::from_value(stored).unwrap();
    let saga = run(saga, Outcome::Unknown("no answer".into())).time_out();
    let ids: Vec<String> = (0..saga.steps.len()).map(|i| saga.command_id(i)).collect();
    assert_eq!(ids[1], "saga:o-1:1:reserve");
    let (resolve, _) = saga.next_step().unwrap();
    assert_eq!(
        saga.steps[resolve].step,
        Step::ResolveReserve {
            sku: sku("B2"),
            qty: 1
        }
    );
    assert_eq!(
        ids[resolve], "saga:o-1:1:reserve",
        "the resolve is that reserve"
    );
    assert_eq!(
        ids[resolve + 1],
        format!("saga:o-1:{}:release", resolve + 1)
    );
}

#[test]
fn a_command_id_fits_the_command_service_whatever_the_ids_lengths() {
    let long = "x".repeat(crate::ids::MAX_ID_LEN);
    let order = OrderId::parse(long.clone()).unwrap();
    let steps = [
        Step::Reserve {
            sku: Sku::parse(long.clone()).unwrap(),
            qty: 1,
        },
        Step::Release {
            sku: Sku::parse(long.clone()).unwrap(),
        },
        Step::Deduct {
            sku: Sku::parse(long).unwrap(),
        },
        Step::Reject {
            reason: "r".repeat(10_000),
        },
        Step::Authorize {
            amount_cents: u64::MAX,
        },
        Step::Confirm,
    ];
    for step in steps {
        let id = step.command_id(&order);
        assert!(id.len() <= MAX_COMMAND_ID_LEN, "{id} is {} bytes", id.len());
        assert!(
            id.bytes().all(|b| b.is_ascii_graphic() && b != b'/'),
            "{id}"
        );
    }
}
