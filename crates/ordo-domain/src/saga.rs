//! The order saga, as pure data and rules: which step comes next, and what an outcome means.
//!
//! A saga is a plan of steps run one after the other. For a placed order: reserve every line,
//! authorise the payment, confirm the order. When a forward step fails for a business reason
//! (out of stock, payment declined), or its outcome stays unknown after its retries, or the
//! deadline passes, the rest of the plan is replaced by compensations: release every
//! reservation that was (or may have been) made, in reverse order, refund the payment if it was
//! (or may have been) authorised, and reject the order with the reason. A compensation whose
//! outcome stays unknown stops the saga in `compensation_stuck`, visible, for an operator.
//!
//! Later events extend a finished plan: a cancelled order releases its stock and refunds; a
//! shipped order deducts its reservations. Notification is not a step: it cannot be undone, so
//! the notifier reacts to the order's final events instead.
//!
//! Every step has a deterministic command id (`saga:<order>:<index>:<kind>`), so running a step
//! again, after a crash or a lost reply, never acts twice.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{CustomerId, OrderId, Sku, order::OrderLine};

/// How often a step whose outcome is unknown is tried before the saga gives up on it.
pub const STEP_ATTEMPTS: u32 = 6;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    Reserve { sku: Sku, qty: u64 },
    Authorize { amount_cents: u64 },
    Confirm,
    Release { sku: Sku },
    Refund { amount_cents: u64 },
    Reject { reason: String },
    Deduct { sku: Sku },
}

impl Step {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Reserve { .. } => "reserve",
            Self::Authorize { .. } => "authorize",
            Self::Confirm => "confirm",
            Self::Release { .. } => "release",
            Self::Refund { .. } => "refund",
            Self::Reject { .. } => "reject",
            Self::Deduct { .. } => "deduct",
        }
    }

    /// Compensations undo; their business failures mean there was nothing (left) to undo.
    fn is_compensation(&self) -> bool {
        matches!(
            self,
            Self::Release { .. } | Self::Refund { .. } | Self::Reject { .. }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Succeeded,
    Failed,
    /// The step was tried and gave no answer; it may have happened.
    Unknown,
    /// Dropped from the plan before it ran.
    Skipped,
    /// Given up on while its outcome was unknown: it may have happened, so it is undone.
    Abandoned,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedStep {
    pub step: Step,
    pub state: StepState,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// When the step was last run (the caller's clock; the domain has none).
    #[serde(default)]
    pub last_attempt_at: Option<DateTime<Utc>>,
}

impl PlannedStep {
    fn new(step: Step) -> Self {
        Self {
            step,
            state: StepState::Pending,
            attempts: 0,
            last_error: None,
            last_attempt_at: None,
        }
    }

    /// True when the step happened or may have happened: it needs undoing.
    fn may_have_happened(&self) -> bool {
        matches!(
            self.state,
            StepState::Succeeded | StepState::Unknown | StepState::Abandoned
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaState {
    /// Reserving, authorising, confirming.
    Running,
    /// Undoing after a failure, then rejecting.
    Compensating,
    Confirmed,
    Rejected,
    /// Undoing after the customer cancelled.
    Cancelling,
    Cancelled,
    Shipping,
    Shipped,
    /// A compensation kept failing: an operator must look (and can retry).
    CompensationStuck,
}

impl SagaState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Confirmed => "confirmed",
            Self::Rejected => "rejected",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Shipping => "shipping",
            Self::Shipped => "shipped",
            Self::CompensationStuck => "compensation_stuck",
        }
    }

    /// True while the saga has steps to run.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::Running | Self::Compensating | Self::Cancelling | Self::Shipping
        )
    }
}

/// What running a step came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// A definite no (out of stock, declined, not allowed): retrying will not change it.
    Failed(String),
    /// No answer, or a transient error: it may or may not have happened.
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saga {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub total_cents: u64,
    pub state: SagaState,
    pub steps: Vec<PlannedStep>,
    /// Why the order was rejected or the saga is stuck.
    pub reason: Option<String>,
    /// The state a stuck saga goes back to when an operator retries it.
    pub stuck_from: Option<SagaState>,
}

impl Saga {
    /// The saga of a newly placed order.
    pub fn start(
        order_id: OrderId,
        customer_id: CustomerId,
        lines: &[OrderLine],
        total_cents: u64,
    ) -> Self {
        let mut steps: Vec<PlannedStep> = lines
            .iter()
            .map(|line| {
                PlannedStep::new(Step::Reserve {
                    sku: line.sku.clone(),
                    qty: u64::from(line.qty),
                })
            })
            .collect();
        steps.push(PlannedStep::new(Step::Authorize {
            amount_cents: total_cents,
        }));
        steps.push(PlannedStep::new(Step::Confirm));
        Self {
            order_id,
            customer_id,
            total_cents,
            state: SagaState::Running,
            steps,
            reason: None,
            stuck_from: None,
        }
    }

    /// The next step to run and its index, if the saga is active.
    pub fn next_step(&self) -> Option<(usize, &PlannedStep)> {
        if !self.state.is_active() {
            return None;
        }
        self.steps
            .iter()
            .enumerate()
            .find(|(_, planned)| matches!(planned.state, StepState::Pending | StepState::Unknown))
    }

    /// The command id of step `index`: the same every time the step runs.
    pub fn command_id(&self, index: usize) -> String {
        format!(
            "saga:{}:{index}:{}",
            self.order_id,
            self.steps[index].step.kind()
        )
    }

    /// Records what running step `index` at `at` came to, and moves the saga on.
    pub fn record(mut self, index: usize, outcome: Outcome, at: DateTime<Utc>) -> Self {
        let is_compensation = self.steps[index].step.is_compensation();
        let planned = &mut self.steps[index];
        planned.attempts += 1;
        planned.last_attempt_at = Some(at);
        match outcome {
            Outcome::Succeeded => {
                planned.state = StepState::Succeeded;
                planned.last_error = None;
            }
            Outcome::Failed(reason) if is_compensation => {
                // Nothing was there to undo (never reserved, already released…): undone.
                planned.state = StepState::Succeeded;
                planned.last_error = Some(reason);
            }
            Outcome::Failed(reason) => {
                planned.state = StepState::Failed;
                planned.last_error = Some(reason.clone());
                return self.compensate(reason);
            }
            Outcome::Unknown(error) => {
                planned.state = StepState::Unknown;
                planned.last_error = Some(error.clone());
                if planned.attempts >= STEP_ATTEMPTS {
                    let kind = planned.step.kind();
                    let reason =
                        format!("{kind} outcome unknown after {STEP_ATTEMPTS} attempts: {error}");
                    if is_compensation || self.state != SagaState::Running {
                        self.stuck_from = Some(self.state);
                        self.state = SagaState::CompensationStuck;
                        self.reason = Some(reason);
                        return self;
                    }
                    return self.compensate(reason);
                }
            }
        }
        self.finish_if_done()
    }

    /// The deadline passed: a running saga gives up and compensates.
    pub fn time_out(self) -> Self {
        if self.state == SagaState::Running {
            self.compensate("timeout".into())
        } else {
            self
        }
    }

    /// The customer cancelled: undo what was done, whatever the saga was doing.
    pub fn cancel(mut self) -> Self {
        match self.state {
            SagaState::Running | SagaState::Compensating | SagaState::Confirmed => {
                self.drop_pending();
                self.steps.extend(self.undo_steps());
                self.state = SagaState::Cancelling;
                self.finish_if_done()
            }
            _ => self,
        }
    }

    /// The order shipped: its reservations leave the warehouse.
    pub fn ship(mut self) -> Self {
        if self.state != SagaState::Confirmed {
            return self;
        }
        let deductions: Vec<PlannedStep> = self
            .reserved_skus()
            .into_iter()
            .map(|sku| PlannedStep::new(Step::Deduct { sku }))
            .collect();
        self.steps.extend(deductions);
        self.state = SagaState::Shipping;
        self.finish_if_done()
    }

    /// An operator retries a stuck saga: its unknown steps get a fresh budget.
    pub fn retry_stuck(mut self) -> Self {
        if self.state != SagaState::CompensationStuck {
            return self;
        }
        for planned in &mut self.steps {
            if planned.state == StepState::Unknown {
                planned.attempts = 0;
            }
        }
        self.state = self.stuck_from.take().unwrap_or(SagaState::Compensating);
        self.finish_if_done()
    }

    fn compensate(mut self, reason: String) -> Self {
        self.drop_pending();
        let mut undo = self.undo_steps();
        undo.push(PlannedStep::new(Step::Reject {
            reason: reason.clone(),
        }));
        self.steps.extend(undo);
        self.state = SagaState::Compensating;
        self.reason = Some(reason);
        self.finish_if_done()
    }

    /// Forward steps not run yet are dropped; those still unknown are given up on.
    fn drop_pending(&mut self) {
        for planned in &mut self.steps {
            planned.state = match planned.state {
                StepState::Pending => StepState::Skipped,
                StepState::Unknown => StepState::Abandoned,
                done => done,
            };
        }
    }

    fn reserved_skus(&self) -> Vec<Sku> {
        self.steps
            .iter()
            .filter(|planned| planned.may_have_happened())
            .filter_map(|planned| match &planned.step {
                Step::Reserve { sku, .. } => Some(sku.clone()),
                _ => None,
            })
            .collect()
    }

    /// Releases (in reverse order) and a refund for what happened or may have happened.
    fn undo_steps(&self) -> Vec<PlannedStep> {
        let mut undo: Vec<PlannedStep> = self
            .reserved_skus()
            .into_iter()
            .rev()
            .map(|sku| PlannedStep::new(Step::Release { sku }))
            .collect();
        let authorised = self.steps.iter().any(|planned| {
            matches!(planned.step, Step::Authorize { .. }) && planned.may_have_happened()
        });
        if authorised {
            undo.push(PlannedStep::new(Step::Refund {
                amount_cents: self.total_cents,
            }));
        }
        undo
    }

    fn finish_if_done(mut self) -> Self {
        if self.next_step().is_some() {
            return self;
        }
        self.state = match self.state {
            SagaState::Running => SagaState::Confirmed,
            SagaState::Compensating => SagaState::Rejected,
            SagaState::Cancelling => SagaState::Cancelled,
            SagaState::Shipping => SagaState::Shipped,
            done => done,
        };
        self
    }
}

#[cfg(test)]
mod specification {
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
    fn a_step_with_an_unknown_outcome_is_retried_then_compensated_as_if_it_happened() {
        let mut saga = placed();
        for attempt in 1..STEP_ATTEMPTS {
            saga = run(saga, Outcome::Unknown("no answer".into()));
            assert_eq!(
                saga.state,
                SagaState::Running,
                "attempt {attempt} is retried"
            );
            assert_eq!(
                next(&saga),
                Some(Step::Reserve {
                    sku: sku("A1"),
                    qty: 2
                })
            );
        }
        let saga = run(saga, Outcome::Unknown("no answer".into()));
        assert_eq!(saga.state, SagaState::Compensating);
        // The reserve may have happened: it is released (a no-op if it never ran).
        assert_eq!(next(&saga), Some(Step::Release { sku: sku("A1") }));
        assert!(
            saga.reason
                .as_deref()
                .unwrap()
                .starts_with("reserve outcome unknown after 6 attempts")
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
    fn a_compensation_that_never_answers_leaves_the_saga_stuck_and_visible_until_retried() {
        let mut saga = run(
            run(placed(), Outcome::Succeeded),
            Outcome::Failed("out of stock".into()),
        );
        for _ in 0..STEP_ATTEMPTS {
            saga = run(saga, Outcome::Unknown("stock service unavailable".into()));
        }
        assert_eq!(saga.state, SagaState::CompensationStuck);
        assert!(
            saga.next_step().is_none(),
            "a stuck saga runs nothing by itself"
        );
        let saga = run_all_ok(saga.retry_stuck());
        assert_eq!(saga.state, SagaState::Rejected);
    }

    #[test]
    fn the_deadline_rejects_a_running_saga_with_reason_timeout_after_compensating() {
        let saga = run(placed(), Outcome::Succeeded).time_out();
        assert_eq!(next(&saga), Some(Step::Release { sku: sku("A1") }));
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
        assert_eq!(next(&saga), Some(Step::Release { sku: sku("A1") }));
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
        for _ in 0..STEP_ATTEMPTS {
            saga = run(saga, Outcome::Unknown("no answer".into()));
        }
        assert_eq!(saga.state, SagaState::CompensationStuck);
        assert_eq!(run_all_ok(saga.retry_stuck()).state, SagaState::Shipped);
    }

    #[test]
    fn every_step_has_its_own_command_id_that_never_changes() {
        let saga = run(placed(), Outcome::Failed("x".into()));
        let ids: Vec<String> = (0..saga.steps.len()).map(|i| saga.command_id(i)).collect();
        assert_eq!(ids[0], "saga:o-1:0:reserve");
        assert_eq!(
            ids.last().unwrap(),
            &format!("saga:o-1:{}:reject", saga.steps.len() - 1)
        );
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }
}
