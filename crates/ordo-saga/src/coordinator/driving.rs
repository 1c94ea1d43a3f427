//! Driving: a claimed saga's steps run one after the other, each outcome saved before the next
//! step is sent.

use super::*;

impl<G: PaymentGateway> Coordinator<G> {
    /// Drives the sagas the intake started and claims due ones, up to `in_flight` at once,
    /// until aborted.
    pub(super) async fn drive_forever(&self, mut started: mpsc::Receiver<Claimed>, saves: Saves) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut driving = tokio::task::JoinSet::new();
        let spawn = |driving: &mut tokio::task::JoinSet<()>, claimed| {
            let (driver, saves) = (self.clone(), saves.clone());
            driving.spawn(async move { driver.drive(claimed, &saves).await });
        };
        loop {
            while driving.try_join_next().is_some() {}
            metrics::gauge!("ordo_sagas_in_flight").set(driving.len() as f64);
            let room = self.config.in_flight.saturating_sub(driving.len());
            if room == 0 {
                driving.join_next().await;
                continue;
            }
            while driving.len() < self.config.in_flight
                && let Ok(claimed) = started.try_recv()
            {
                spawn(&mut driving, claimed);
            }
            let room = self.config.in_flight.saturating_sub(driving.len());
            if room == 0 {
                continue;
            }
            match self.claim(room.min(CLAIM_BATCH)).await {
                Ok(claimed) if claimed.is_empty() => {
                    backoff.reset();
                    tokio::select! {
                        () = tokio::time::sleep(self.config.poll) => {}
                        Some(claimed) = started.recv() => spawn(&mut driving, claimed),
                        Some(_) = driving.join_next(), if !driving.is_empty() => {}
                    }
                }
                Ok(claimed) => {
                    backoff.reset();
                    for claimed in claimed {
                        spawn(&mut driving, claimed);
                    }
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%err, retry_in = ?delay, "claiming sagas failed; pausing");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Runs the steps of a claimed saga one after the other, saving each outcome before the
    /// next step is sent, until the saga finishes, waits for a retry, or is no longer ours.
    pub(super) async fn drive(&self, mut claimed: Claimed, saves: &Saves) {
        loop {
            let state_before = claimed.saga.state;
            let mut next_attempt_in = None;
            let mut start_deadline_in = None;
            let mut keep_driving = false;
            if claimed.saga.state == SagaState::Running && claimed.deadline_passed {
                claimed.saga = claimed.saga.time_out();
            }
            if claimed.saga.state != state_before {
                // Timed out: the compensation plan is saved before any of it is sent, as every
                // plan change is. A coordinator that lost the saga meanwhile (its save is
                // refused) must not act on a plan that no one saved.
                tracing::info!(order_id = %claimed.saga.order_id, "saga deadline passed; compensating");
                keep_driving = true;
                next_attempt_in = Some(self.config.lease());
            } else if let Some((index, planned)) = claimed.saga.next_step() {
                let step = planned.step.clone();
                let span = tracing::info_span!(
                    "saga_step",
                    otel.name = %format_args!("saga {}", step.kind()),
                    order_id = %claimed.saga.order_id,
                    step = step.kind(),
                    index,
                    attempt = planned.attempts + 1,
                    outcome = tracing::field::Empty,
                    trace_id = tracing::field::Empty,
                );
                let passed_on = trace::follow(
                    &span,
                    trace::from_traceparent(claimed.traceparent.as_deref()),
                );
                let started = std::time::Instant::now();
                let outcome = self
                    .run_step(&claimed.saga, index, &step, &passed_on)
                    .instrument(span.clone())
                    .await;
                let outcome_name = outcome_name(&outcome);
                span.record("outcome", outcome_name);
                metrics::histogram!(
                    "ordo_saga_step_duration_seconds",
                    "step" => step.kind(),
                    "outcome" => outcome_name,
                )
                .record(started.elapsed().as_secs_f64());
                if step.is_compensation() && outcome_name == "succeeded" {
                    metrics::counter!("ordo_saga_compensations_total", "step" => step.kind())
                        .increment(1);
                }
                tracing::debug!(parent: &span, ?outcome, "saga step");
                let unknown = matches!(outcome, Outcome::Unknown(_));
                let before_pivot =
                    claimed.saga.state == SagaState::Running && !claimed.saga.reached_pivot();
                if unknown && before_pivot {
                    // The deadline starts at the first unanswered step; a later one keeps it.
                    start_deadline_in = Some(self.config.saga_timeout);
                }
                claimed.saga = claimed.saga.record(index, outcome, self.config.clock.now());
                let attempts = claimed.saga.steps[index].attempts;
                if claimed.saga.next_step().is_some() {
                    keep_driving = !unknown;
                    next_attempt_in = Some(if unknown {
                        self.backoff(attempts)
                    } else {
                        // Still leased: this coordinator goes on with the next step.
                        self.config.lease()
                    });
                }
            }
            match saves
                .save(
                    &claimed.saga,
                    claimed.version,
                    next_attempt_in,
                    start_deadline_in,
                )
                .await
            {
                Ok(Some(Written { deadline_passed })) => {
                    claimed.version += 1;
                    claimed.deadline_passed = deadline_passed;
                }
                Ok(None) => {
                    // Changed meanwhile (cancelled, shipped, or claimed by another coordinator
                    // after the lease ran out): whoever changed it made it due again.
                    tracing::debug!(order_id = %claimed.saga.order_id, "saga changed meanwhile; let go");
                    return;
                }
                Err(err) => {
                    tracing::warn!(order_id = %claimed.saga.order_id, %err, "saving a saga failed; it runs again once its lease ends");
                    return;
                }
            }
            if !claimed.saga.state.is_active() {
                metrics::counter!("ordo_sagas_finished_total", "state" => claimed.saga.state.as_str())
                    .increment(1);
            }
            let settled = matches!(
                claimed.saga.state,
                SagaState::Confirmed | SagaState::Rejected
            );
            if settled && state_before != claimed.saga.state {
                let took = (Utc::now() - claimed.placed_at)
                    .to_std()
                    .unwrap_or_default();
                metrics::histogram!("ordo_order_settle_seconds", "state" => claimed.saga.state.as_str())
                    .record(took.as_secs_f64());
            }
            if !keep_driving {
                return;
            }
        }
    }

    pub(super) fn backoff(&self, attempts: u32) -> Duration {
        let exponential = self.config.retry_base.saturating_mul(1 << attempts.min(16));
        let capped = exponential.min(self.config.retry_cap);
        // Full jitter: anywhere between half and all of it, so retries do not move in step.
        capped.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }

    /// Runs one step; `trace` is the step span's context, passed on to the command it sends.
    pub(super) async fn run_step(
        &self,
        saga: &Saga,
        index: usize,
        step: &Step,
        trace: &Context,
    ) -> Outcome {
        let order_id = saga.order_id.clone();
        // A step the contract cannot carry is refused as the service would refuse it.
        let reserve = |sku: &ordo_domain::Sku, qty: u64| {
            let qty = Quantity::new(qty).ok_or_else(|| format!("qty: {qty} is not a quantity"))?;
            Ok::<_, String>(CommandRequest::ReserveStock(ReserveStock {
                sku: sku.clone(),
                order_id: order_id.clone(),
                qty,
            }))
        };
        let request = match step {
            Step::Reserve { sku, qty } => reserve(sku, *qty),
            Step::ResolveReserve { sku, qty } => {
                // The reserve itself, under its id, voided if it has not run.
                return match reserve(sku, *qty) {
                    Ok(reserve) => {
                        self.send_command(saga, index, &reserve, trace, Void::IfNotRun)
                            .await
                    }
                    Err(refusal) => Outcome::Failed(refusal),
                };
            }
            Step::Release { sku } => Ok(CommandRequest::ReleaseStock(ReleaseStock {
                sku: sku.clone(),
                order_id,
            })),
            Step::Deduct { sku } => Ok(CommandRequest::DeductStock(DeductStock {
                sku: sku.clone(),
                order_id,
            })),
            // Cut here too: a saga an earlier build planned may hold a reason the reject
            // refuses (its id names the planned step, and the refused copy never ran).
            Step::Reject { reason } => {
                Reason::new(ordo_domain::saga::reason_an_order_can_keep(reason.clone()))
                    .map(|reason| CommandRequest::RejectOrder(RejectOrder { order_id, reason }))
                    .map_err(|refusal| refusal.to_string())
            }
            Step::Confirm => {
                let request = CommandRequest::ConfirmOrder(ConfirmOrder { order_id });
                return match self
                    .send_command(saga, index, &request, trace, Void::No)
                    .await
                {
                    Outcome::Succeeded => Outcome::Succeeded,
                    not_ok => self.resolve_confirm(&saga.order_id, not_ok).await,
                };
            }
            Step::Authorize { amount_cents } => {
                let call = self.gateway.authorize(&saga.order_id, *amount_cents);
                let span =
                    tracing::info_span!("payment", otel.name = "payment authorize", amount_cents);
                return payment_outcome(
                    tokio::time::timeout(self.config.step_timeout, call.instrument(span)).await,
                );
            }
            Step::Refund { amount_cents } => {
                let call = self.gateway.refund(&saga.order_id, *amount_cents);
                let span =
                    tracing::info_span!("payment", otel.name = "payment refund", amount_cents);
                return payment_outcome(
                    tokio::time::timeout(self.config.step_timeout, call.instrument(span)).await,
                );
            }
        };
        match request {
            Ok(request) => {
                self.send_command(saga, index, &request, trace, Void::No)
                    .await
            }
            Err(refusal) => Outcome::Failed(refusal),
        }
    }

    /// Sends step `index` of `saga` as a command and says what its reply means.
    pub(super) async fn send_command(
        &self,
        saga: &Saga,
        index: usize,
        command: &CommandRequest,
        trace: &Context,
        void: Void,
    ) -> Outcome {
        let subject = command.subject();
        let mut request_headers = async_nats::HeaderMap::new();
        trace::inject(trace, &mut request_headers);
        if void == Void::IfNotRun {
            request_headers.insert(headers::VOID_IF_NOT_RUN, "true");
        }
        request_headers.insert(headers::MSG_ID, saga.command_id(index).as_str());
        request_headers.insert(
            headers::CORRELATION_ID,
            format!("order:{}", saga.order_id).as_str(),
        );
        let request = async_nats::Request::new()
            .headers(request_headers)
            .payload(command.body_bytes().into())
            .timeout(Some(self.config.step_timeout));
        let reply = match self.nats.send_request(subject, request).await {
            Ok(reply) => reply,
            Err(err) => return Outcome::Unknown(format!("{subject}: {err}")),
        };
        match Reply::parse(&reply.payload) {
            Ok(Reply::Accepted { .. }) => Outcome::Succeeded,
            Ok(Reply::Refused { code, message, .. }) => match code {
                // Definite: retrying the same command gets the same answer.
                // The void itself was refused (not the reserve): nothing is settled, and a late
                // copy could still land. Tried again, and stuck in sight if it stays so.
                ErrorCode::InvalidCommand if void == Void::IfNotRun => {
                    Outcome::Unknown(format!("the void was refused: {message}"))
                }
                ErrorCode::InsufficientStock
                | ErrorCode::NotFound
                | ErrorCode::InvalidState
                | ErrorCode::InvalidCommand => Outcome::Failed(message),
                // Of the moment: it may work when sent again.
                ErrorCode::Conflict | ErrorCode::Unavailable | ErrorCode::RateLimited => {
                    Outcome::Unknown(format!("{}: {message}", code.as_str()))
                }
            },
            Err(err) => Outcome::Unknown(format!("{subject}: {err}")),
        }
    }

    /// A confirm that was not answered `ok` happened if the order's last event says it is
    /// confirmed or shipped. The read goes to the stream leader: a lagging replica's answer
    /// could say "pending" about a confirmed order.
    pub(super) async fn resolve_confirm(&self, order_id: &OrderId, not_ok: Outcome) -> Outcome {
        let js = jetstream::new(self.nats.clone());
        let subject = format!("ordo.order.events.{order_id}");
        let last = async {
            let stream = js
                .get_stream(ordo_eventstore::StreamId::Orders.name())
                .await
                .map_err(|e| e.to_string())?;
            let message = stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .map_err(|e| e.to_string())?;
            EventEnvelope::from_bytes(&message.payload).map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.config.step_timeout, last).await {
            Ok(Ok(envelope))
                if ["OrderConfirmed", "OrderShipped"].contains(&envelope.event_type.as_str()) =>
            {
                Outcome::Succeeded
            }
            Ok(Ok(envelope)) => Outcome::Unknown(format!(
                "confirm not answered ok ({}); the order's last event is {}",
                outcome_text(&not_ok),
                envelope.event_type
            )),
            Ok(Err(err)) => Outcome::Unknown(format!(
                "confirm not answered ok ({}); the order's events cannot be read: {err}",
                outcome_text(&not_ok)
            )),
            Err(_) => Outcome::Unknown(format!(
                "confirm not answered ok ({}); the order's events did not answer in time",
                outcome_text(&not_ok)
            )),
        }
    }
}

pub(super) fn outcome_text(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Succeeded => "ok",
        Outcome::Failed(reason) | Outcome::Unknown(reason) => reason,
    }
}

/// An outcome's name in metrics and spans.
pub(super) fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed(_) => "failed",
        Outcome::Unknown(_) => "unknown",
    }
}

pub(super) fn payment_outcome(
    result: Result<Result<(), PaymentError>, tokio::time::error::Elapsed>,
) -> Outcome {
    match result {
        Ok(Ok(())) => Outcome::Succeeded,
        Ok(Err(declined @ PaymentError::Declined(_))) => Outcome::Failed(declined.to_string()),
        Ok(Err(unavailable)) => Outcome::Unknown(unavailable.to_string()),
        Err(_) => Outcome::Unknown("the payment gateway did not answer in time".into()),
    }
}
