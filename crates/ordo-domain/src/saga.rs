//! The order saga, as pure data and rules: which step comes next, and what an outcome means.
//!
//! A saga is a plan of steps run one after the other. For a placed order: reserve every line,
//! authorise the payment, confirm the order. When a forward step fails for a business reason
//! (out of stock, payment declined), or the deadline passes before the confirm, the rest of the
//! plan is replaced by compensations: release every reservation that was (or may have been)
//! made, in reverse order, refund the payment if it was (or may have been) authorised, and
//! reject the order with the reason.
//!
//! Three outcomes per step: success, a definite no, or unknown (no answer, no responders, a
//! transient error). An unknown step is run again with the same command id until it is known;
//! there is no count after which a forward step is given up: the deadline bounds the steps
//! before the confirm, and an outage is waited out.
//!
//! **Confirm is the point of no return.** Once a confirm may have been sent, the saga only goes
//! forward: a confirm that is refused or unanswered is run again (the coordinator resolves it by
//! reading the order's events), the deadline no longer applies, and nothing is compensated.
//! Steps after it (deductions on shipping) and compensations are retried until they are known;
//! after [`STUCK_AFTER_ATTEMPTS`] unknown outcomes the saga shows `compensation_stuck` so that an
//! operator sees it, and it keeps being retried (with capped back-off) on its own.
//!
//! A step that is about to run may have run already: a coordinator can die after sending it and
//! before recording it. So when the saga is interrupted from outside (deadline, cancellation),
//! its current step counts as possibly done and is undone too. A refund of a payment that never
//! happened is a no-op (and bars a late authorisation, by the payment ledger). A reservation
//! whose reserve has no answer is resolved before it is released: the reserve is sent again
//! under its own command id, asked to be voided if it has not run, so that the id is answered
//! once and for all (it ran, or it is recorded as refused without running), and a late copy of
//! it, run after the release, finds that answer and holds nothing. The stock keeps no history of
//! settled orders for that.
//!
//! Later events extend a plan: a cancelled order releases its stock and refunds; a shipped order
//! deducts its reservations, also when the shipping arrives while the saga is still confirming.
//! Notification is not a step: it cannot be undone, so the notifier reacts to the order's final
//! events instead.
//!
//! Every step has a deterministic command id that names what it does (`saga:<order>:release:<sku>`),
//! so running a step again, after a crash or a lost reply, never acts twice, and one id is never
//! two different commands: two coordinators that raced over a plan change may have planned
//! different steps at one index, never different commands under one id.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{CustomerId, OrderId, Sku, ids::MAX_COMMAND_ID_LEN, order::OrderLine};

/// The start of every command id a saga sends: reserved for the saga, so that no caller can
/// store an outcome under a step's id before the step runs.
pub const COMMAND_ID_PREFIX: &str = "saga:";

/// The first 16 bytes of SHA-256 of `text`, in hex: names a text that cannot be an id token.
fn short_digest(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Unknown outcomes of a compensation (or a step after the confirm) after which the saga shows
/// `compensation_stuck`. It keeps being retried; the state is there to be seen.
pub const STUCK_AFTER_ATTEMPTS: u32 = 6;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    Reserve {
        sku: Sku,
        qty: u64,
    },
    /// The reserve of `sku` again, under its own command id, asked to be voided if it has not
    /// run: it ran (and its reservation is released next), or it is recorded as refused without
    /// running. Either way the id is answered once and for all, so a late copy of the reserve
    /// (sent before, run after the release) finds that answer and cannot hold stock.
    ResolveReserve {
        sku: Sku,
        qty: u64,
    },
    Authorize {
        amount_cents: u64,
    },
    Confirm,
    Release {
        sku: Sku,
    },
    Refund {
        amount_cents: u64,
    },
    Reject {
        reason: String,
    },
    Deduct {
        sku: Sku,
    },
}

impl Step {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Reserve { .. } => "reserve",
            Self::ResolveReserve { .. } => "resolve_reserve",
            Self::Authorize { .. } => "authorize",
            Self::Confirm => "confirm",
            Self::Release { .. } => "release",
            Self::Refund { .. } => "refund",
            Self::Reject { .. } => "reject",
            Self::Deduct { .. } => "deduct",
        }
    }

    /// The step's command id for `order`: it begins with [`COMMAND_ID_PREFIX`] (which the command
    /// service refuses from anyone but the saga) and names the step by everything that makes it
    /// the command it is, never by its place in a plan, so that one id is never two commands.
    /// Within one order a SKU is reserved once, released or deducted once, and the amount is
    /// always the order's total, so kind and SKU say it; a reject also carries its reason,
    /// named by a digest. A SKU that would make the id too long is named by a digest too
    /// (`#` never appears in a SKU, so the two forms cannot meet).
    pub fn command_id(&self, order: &OrderId) -> String {
        let kind = match self {
            // The same command as the reserve it resolves.
            Self::ResolveReserve { .. } => "reserve",
            step => step.kind(),
        };
        let base = format!("{COMMAND_ID_PREFIX}{order}:{kind}");
        match self {
            Self::Reserve { sku, .. }
            | Self::ResolveReserve { sku, .. }
            | Self::Release { sku }
            | Self::Deduct { sku } => {
                let readable = format!("{base}:{sku}");
                if readable.len() <= MAX_COMMAND_ID_LEN {
                    readable
                } else {
                    format!("{base}#{}", short_digest(sku.as_str()))
                }
            }
            Self::Authorize { amount_cents } | Self::Refund { amount_cents } => {
                format!("{base}:{amount_cents}")
            }
            Self::Confirm => base,
            Self::Reject { reason } => format!("{base}#{}", short_digest(reason)),
        }
    }

    /// Compensations undo; their business failures mean there was nothing (left) to undo.
    pub fn is_compensation(&self) -> bool {
        matches!(
            self,
            Self::ResolveReserve { .. }
                | Self::Release { .. }
                | Self::Refund { .. }
                | Self::Reject { .. }
        )
    }

    /// Steps run before the confirm: the only ones a deadline or a refusal undoes.
    fn is_before_pivot(&self) -> bool {
        matches!(self, Self::Reserve { .. } | Self::Authorize { .. })
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
    /// A compensation (or a deduction) has had no answer for a while: it keeps being retried
    /// with capped back-off, and shows here so that an operator can look (and retry it now).
    CompensationStuck,
}

impl SagaState {
    pub const ALL: [SagaState; 9] = [
        Self::Running,
        Self::Compensating,
        Self::Confirmed,
        Self::Rejected,
        Self::Cancelling,
        Self::Cancelled,
        Self::Shipping,
        Self::Shipped,
        Self::CompensationStuck,
    ];

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

    /// True while the saga has steps to run (a stuck saga too: it keeps being retried).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::Running
                | Self::Compensating
                | Self::Cancelling
                | Self::Shipping
                | Self::CompensationStuck
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
    /// The state a stuck saga goes back to once its step is known.
    pub stuck_from: Option<SagaState>,
    /// The order shipped while the saga was still confirming it: deduct once it is confirmed.
    #[serde(default)]
    pub ship_requested: bool,
    /// Why the saga shows `compensation_stuck`: the step that has had no answer.
    #[serde(default)]
    pub stuck_on: Option<String>,
    /// How this saga's steps are named in their command ids. Sagas stored by earlier builds
    /// have none and keep the ids their steps were sent under.
    #[serde(default)]
    pub step_ids: StepIds,
}

/// How a saga names its steps' command ids.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepIds {
    /// `saga:<order>:<index>:<kind>`: sagas started by builds before the ids named the step.
    /// A step of theirs may have been sent under it, so it stays theirs to the end.
    #[default]
    ByIndex,
    /// [`Step::command_id`]: what the step does.
    ByStep,
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
            ship_requested: false,
            stuck_on: None,
            step_ids: StepIds::ByStep,
        }
    }

    /// The next step to run and its index, if the saga is active.
    pub fn next_step(&self) -> Option<(usize, &PlannedStep)> {
        if !self.state.is_active() {
            return None;
        }
        self.current_index()
            .map(|index| (index, &self.steps[index]))
    }

    fn current_index(&self) -> Option<usize> {
        self.steps
            .iter()
            .position(|planned| matches!(planned.state, StepState::Pending | StepState::Unknown))
    }

    /// The command id of step `index`: the same every time the step runs, and the same for
    /// the same step in any plan (see [`Step::command_id`]).
    pub fn command_id(&self, index: usize) -> String {
        match self.step_ids {
            StepIds::ByStep => self.steps[index].step.command_id(&self.order_id),
            StepIds::ByIndex => {
                // A resolve sends its reserve's command, under that reserve's id.
                let index = match &self.steps[index].step {
                    Step::ResolveReserve { sku, .. } => self
                        .steps
                        .iter()
                        .position(|planned| {
                            matches!(&planned.step, Step::Reserve { sku: reserved, .. } if reserved == sku)
                        })
                        .unwrap_or(index),
                    _ => index,
                };
                let kind = self.steps[index].step.kind();
                format!("{COMMAND_ID_PREFIX}{}:{index}:{kind}", self.order_id)
            }
        }
    }

    /// True once a confirm may have been sent: from then on the saga only goes forward.
    pub fn reached_pivot(&self) -> bool {
        let current = self.current_index();
        self.steps.iter().enumerate().any(|(index, planned)| {
            planned.step == Step::Confirm && (planned.may_have_happened() || Some(index) == current)
        })
    }

    /// What the read model shows as the saga's reason: why it is stuck, else why it failed.
    pub fn shown_reason(&self) -> Option<&str> {
        match self.state {
            SagaState::CompensationStuck => self.stuck_on.as_deref().or(self.reason.as_deref()),
            _ => self.reason.as_deref(),
        }
    }

    /// Records what running step `index` at `at` came to, and moves the saga on.
    pub fn record(mut self, index: usize, outcome: Outcome, at: DateTime<Utc>) -> Self {
        // The texts come from outside (a payment provider, a server's error): a saga row and a
        // view must be able to hold them.
        let outcome = match outcome {
            Outcome::Succeeded => Outcome::Succeeded,
            Outcome::Failed(text) => Outcome::Failed(text_a_row_can_hold(text)),
            Outcome::Unknown(text) => Outcome::Unknown(text_a_row_can_hold(text)),
        };
        let step = self.steps[index].step.clone();
        let planned = &mut self.steps[index];
        planned.attempts += 1;
        planned.last_attempt_at = Some(at);
        let unknown = match outcome {
            Outcome::Succeeded => {
                planned.state = StepState::Succeeded;
                planned.last_error = None;
                None
            }
            Outcome::Failed(reason) if step.is_compensation() => {
                // Nothing was there to undo (never reserved, already released…): undone.
                planned.state = StepState::Succeeded;
                planned.last_error = Some(reason);
                None
            }
            Outcome::Failed(reason) if step.is_before_pivot() => {
                planned.state = StepState::Failed;
                planned.last_error = Some(reason.clone());
                return self.compensate(reason, false);
            }
            Outcome::Failed(reason) if step == Step::Confirm => {
                // The pivot is never compensated: a refused confirm is run again until the
                // order's events say how it ended (a cancellation then takes over).
                Some(reason)
            }
            Outcome::Failed(reason) => {
                // A deduction refused after shipping: nothing to undo, nothing to retry.
                planned.state = StepState::Failed;
                planned.last_error = Some(reason);
                None
            }
            Outcome::Unknown(error) => Some(error),
        };
        if let Some(error) = unknown {
            let planned = &mut self.steps[index];
            planned.state = StepState::Unknown;
            planned.last_error = Some(error.clone());
            let attempts = planned.attempts;
            let flags_stuck = step.is_compensation() || !step.is_before_pivot();
            if flags_stuck
                && attempts >= STUCK_AFTER_ATTEMPTS
                && self.state != SagaState::CompensationStuck
            {
                self.stuck_from = Some(self.state);
                self.state = SagaState::CompensationStuck;
                self.stuck_on = Some(format!(
                    "{} outcome unknown after {attempts} attempts: {error}",
                    step.kind()
                ));
            }
            return self;
        }
        if self.state == SagaState::CompensationStuck {
            self.state = self.stuck_from.take().unwrap_or(SagaState::Compensating);
            self.stuck_on = None;
        }
        self.finish_if_done()
    }

    /// The deadline passed: a saga that has not reached the confirm gives up and compensates.
    pub fn time_out(self) -> Self {
        if self.state == SagaState::Running && !self.reached_pivot() {
            self.compensate("timeout".into(), true)
        } else {
            self
        }
    }

    /// The customer cancelled: undo what was done, whatever the saga was doing.
    pub fn cancel(mut self) -> Self {
        let state = match self.state {
            SagaState::CompensationStuck => self.stuck_from.unwrap_or(SagaState::Compensating),
            state => state,
        };
        match state {
            SagaState::Running | SagaState::Compensating | SagaState::Confirmed => {
                self.drop_pending(true);
                self.steps.extend(self.undo_steps());
                self.state = SagaState::Cancelling;
                self.stuck_from = None;
                self.stuck_on = None;
                self.finish_if_done()
            }
            // The compensation had undone everything; its reject was refused because the
            // customer's cancellation got there first. The order is cancelled, and so is this.
            SagaState::Rejected if self.reject_was_refused() => {
                self.state = SagaState::Cancelled;
                self
            }
            _ => self,
        }
    }

    /// The order was rejected by someone other than this saga (an operator's `order.reject`)
    /// while the saga was still running, at the confirm or before it: the confirm can no longer
    /// happen, so what was done is undone (releases, refund) and the saga ends rejected. A
    /// reject the saga sent itself arrives while it compensates, and changes nothing.
    pub fn order_rejected(mut self, reason: &str) -> Self {
        let state = match self.state {
            SagaState::CompensationStuck => self.stuck_from.unwrap_or(SagaState::Compensating),
            state => state,
        };
        if state != SagaState::Running {
            return self;
        }
        self.drop_pending(true);
        self.steps.extend(self.undo_steps());
        self.state = SagaState::Compensating;
        self.reason = Some(format!("the order was rejected: {reason}"));
        self.stuck_from = None;
        self.stuck_on = None;
        self.finish_if_done()
    }

    /// The order shipped: its reservations leave the warehouse. A shipping that arrives while
    /// the confirm is still unanswered is kept and applied once the saga is confirmed.
    pub fn ship(mut self) -> Self {
        match self.state {
            SagaState::Confirmed => {
                let deductions: Vec<PlannedStep> = self
                    .reserved_skus()
                    .into_iter()
                    .map(|(sku, _)| PlannedStep::new(Step::Deduct { sku }))
                    .collect();
                self.steps.extend(deductions);
                self.state = SagaState::Shipping;
                self.ship_requested = false;
                self.finish_if_done()
            }
            SagaState::Running | SagaState::CompensationStuck => {
                self.ship_requested = true;
                self
            }
            _ => self,
        }
    }

    /// An operator retries a stuck saga now: its unknown steps start a fresh count.
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
        self.stuck_on = None;
        self.finish_if_done()
    }

    fn compensate(mut self, reason: String, current_may_have_run: bool) -> Self {
        let reason = reason_an_order_can_keep(reason);
        self.drop_pending(current_may_have_run);
        let mut undo = self.undo_steps();
        undo.push(PlannedStep::new(Step::Reject {
            reason: reason.clone(),
        }));
        self.steps.extend(undo);
        self.state = SagaState::Compensating;
        self.reason = Some(reason);
        self.finish_if_done()
    }

    /// Steps not run yet are dropped; those still unknown are given up on (they may have
    /// happened, so they are undone). With `current_may_have_run`, so is the step that was
    /// about to run: a coordinator may have sent it and died before recording it.
    fn drop_pending(&mut self, current_may_have_run: bool) {
        let current = self.current_index();
        for (index, planned) in self.steps.iter_mut().enumerate() {
            planned.state = match planned.state {
                StepState::Pending if current_may_have_run && Some(index) == current => {
                    StepState::Abandoned
                }
                StepState::Pending => StepState::Skipped,
                StepState::Unknown => StepState::Abandoned,
                done => done,
            };
        }
    }

    fn reject_was_refused(&self) -> bool {
        self.steps.iter().any(|planned| {
            matches!(planned.step, Step::Reject { .. })
                && planned.state == StepState::Succeeded
                && planned.last_error.is_some()
        })
    }

    /// SKUs (with the quantity reserved) whose reservation happened or may have happened, and
    /// that no later step of the plan is known to have released or deducted.
    fn reserved_skus(&self) -> Vec<(Sku, u64)> {
        let mut held: Vec<(Sku, u64)> = Vec::new();
        for planned in &self.steps {
            match &planned.step {
                Step::Reserve { sku, qty } if planned.may_have_happened() => {
                    held.push((sku.clone(), *qty))
                }
                Step::Release { sku } | Step::Deduct { sku }
                    if planned.state == StepState::Succeeded =>
                {
                    held.retain(|(held, _)| held != sku)
                }
                _ => {}
            }
        }
        held
    }

    /// Whether the reserve of `sku` has had its answer (from its first run or a resolve).
    fn reserve_answered(&self, sku: &Sku) -> bool {
        self.steps.iter().any(|planned| {
            matches!(&planned.step, Step::Reserve { sku: reserved, .. } | Step::ResolveReserve { sku: reserved, .. } if reserved == sku)
                && matches!(planned.state, StepState::Succeeded | StepState::Failed)
        })
    }

    /// Releases (in reverse order) and a refund for what happened or may have happened and is
    /// not undone already. A reservation whose reserve has no answer is resolved first (the
    /// reserve is sent again under its id) and then released.
    fn undo_steps(&self) -> Vec<PlannedStep> {
        let mut undo: Vec<PlannedStep> = Vec::new();
        for (sku, qty) in self.reserved_skus().into_iter().rev() {
            if !self.reserve_answered(&sku) {
                undo.push(PlannedStep::new(Step::ResolveReserve {
                    sku: sku.clone(),
                    qty,
                }));
            }
            undo.push(PlannedStep::new(Step::Release { sku }));
        }
        let authorised = self.steps.iter().any(|planned| {
            matches!(planned.step, Step::Authorize { .. }) && planned.may_have_happened()
        });
        let refunded = self.steps.iter().any(|planned| {
            matches!(planned.step, Step::Refund { .. }) && planned.state == StepState::Succeeded
        });
        if authorised && !refunded {
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
        if self.state == SagaState::Confirmed && self.ship_requested {
            return self.ship();
        }
        self
    }
}

/// `text` without U+0000, which PostgreSQL's text and jsonb cannot hold.
fn text_a_row_can_hold(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// `reason` as the reject command accepts it and a view can store it: a payment provider's
/// decline may be long or hold U+0000, and a reject refused for its reason would leave the saga
/// rejected and its order pending.
pub fn reason_an_order_can_keep(reason: String) -> String {
    let reason = text_a_row_can_hold(reason);
    if reason.len() <= crate::order::MAX_REASON_LEN {
        return reason;
    }
    const CUT: &str = "…";
    let mut end = crate::order::MAX_REASON_LEN - CUT.len();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT}", &reason[..end])
}

#[cfg(test)]
mod specification;
