//! Saves: a saga's row, read for update and written back, version-fenced, in batches.

use super::*;

/// The steps as the read model shows them.
pub(super) fn steps_json(saga: &Saga) -> Value {
    Value::Array(
        saga.steps
            .iter()
            .map(|planned| {
                let mut step = serde_json::to_value(&planned.step).expect("steps serialize");
                step["state"] = json!(planned.state);
                step["attempts"] = json!(planned.attempts);
                step["last_error"] = json!(planned.last_error);
                step["last_attempt_at"] = json!(planned.last_attempt_at);
                step
            })
            .collect(),
    )
}

pub(super) async fn load_for_update(
    tx: &mut Transaction<'_, Postgres>,
    order_id: &str,
) -> Result<Option<Saga>, sqlx::Error> {
    let data: Option<Value> =
        sqlx::query_scalar("SELECT data FROM sagas WHERE order_id = $1 FOR UPDATE")
            .bind(order_id)
            .fetch_optional(&mut **tx)
            .await?;
    data.map(|data| serde_json::from_value(data).map_err(|err| sqlx::Error::Decode(Box::new(err))))
        .transpose()
}

/// A saga's row as `save` and `save_batches` write it: `next_attempt_in` is how long from now
/// a coordinator should run it next (never, once finished); `start_deadline_in` starts the
/// deadline that bounds the steps before the confirm, if none has started. Every time is counted
/// from PostgreSQL's `now()`, never from a coordinator's clock.
pub(super) fn saga_row(
    saga: &Saga,
    expected: Option<i64>,
    next_attempt_in: Option<Duration>,
    start_deadline_in: Option<Duration>,
) -> Value {
    let next_attempt_in = next_attempt_in.filter(|_| saga.state.is_active());
    json!({
        "order_id": saga.order_id.as_str(),
        "state": saga.state.as_str(),
        "steps": steps_json(saga),
        "reason": saga.shown_reason(),
        "data": saga,
        "next_attempt_in": next_attempt_in.map(|d| d.as_secs_f64()),
        "before_pivot": saga.state == SagaState::Running && !saga.reached_pivot(),
        "expected": expected,
        "deadline_in": start_deadline_in.map(|d| d.as_secs_f64()),
    })
}

/// Writes the rows (of `saga_row`) whose version is still the one expected (any version when
/// none is) and returns, for each row written, its order id, the version expected and whether
/// its deadline has passed. The version tells apart two rows of one saga in one batch (two
/// drivers of it in one coordinator, after a lease ran out): only the one whose version matches
/// is written, and only it may be told so. A running saga is never due later than its deadline,
/// so that the claim's one range scan finds both retries and deadlines. `$2` holds the rows'
/// order ids again: matched with `= ANY($2)`, they give PostgreSQL an index scan where its guess
/// of 100 rows for any `jsonb_to_recordset` has it scan the whole table on every save until the
/// table is large enough (the first 20 s of a fresh system at 250 orders/s).
pub(super) const SAVE_SAGAS: &str = "
    UPDATE sagas s SET state = u.state, steps = u.steps, reason = u.reason, data = u.data,
           updated_at = now(),
           deadline_at = coalesce(s.deadline_at, now() + make_interval(secs => u.deadline_in)),
           next_attempt_at = CASE
               WHEN u.before_pivot
               THEN least(now() + make_interval(secs => u.next_attempt_in),
                          coalesce(s.deadline_at, now() + make_interval(secs => u.deadline_in)))
               ELSE now() + make_interval(secs => u.next_attempt_in) END,
           version = s.version + 1
    FROM jsonb_to_recordset($1) AS u(order_id text, state text, steps jsonb, reason text,
                                     data jsonb, next_attempt_in float8, before_pivot boolean,
                                     expected bigint, deadline_in float8)
    WHERE s.order_id = u.order_id AND (u.expected IS NULL OR s.version = u.expected)
      AND s.order_id = ANY($2)
    RETURNING s.order_id, u.expected, coalesce(s.deadline_at <= now(), false)";

/// Writes one saga, if its version is still `expected` (any version when `None`), and says
/// whether it did.
pub(super) async fn save(
    executor: impl sqlx::PgExecutor<'_>,
    saga: &Saga,
    expected: Option<i64>,
    next_attempt_in: Option<Duration>,
    start_deadline_in: Option<Duration>,
) -> Result<bool, sqlx::Error> {
    let row = saga_row(saga, expected, next_attempt_in, start_deadline_in);
    let saved: Vec<(String, Option<i64>, bool)> = sqlx::query_as(SAVE_SAGAS)
        .bind(Value::Array(vec![row]))
        .bind(vec![saga.order_id.as_str()])
        .fetch_all(executor)
        .await?;
    Ok(!saved.is_empty())
}

/// A saga's save went in.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Written {
    /// Its deadline has passed, by PostgreSQL's clock.
    pub(super) deadline_passed: bool,
}

/// The driving tasks' way to [`save_batches`].
#[derive(Clone)]
pub(super) struct Saves(pub(super) mpsc::Sender<SaveRequest>);

pub(super) struct SaveRequest {
    order_id: String,
    expected: i64,
    row: Value,
    saved: oneshot::Sender<Result<Option<Written>, String>>,
}

impl Saves {
    /// Saves `saga` if its version is still `expected`; says whether it did (`None`: it moved).
    pub(super) async fn save(
        &self,
        saga: &Saga,
        expected: i64,
        next_attempt_in: Option<Duration>,
        start_deadline_in: Option<Duration>,
    ) -> Result<Option<Written>, String> {
        let (saved, answer) = oneshot::channel();
        let request = SaveRequest {
            order_id: saga.order_id.to_string(),
            expected,
            row: saga_row(saga, Some(expected), next_attempt_in, start_deadline_in),
            saved,
        };
        self.0
            .send(request)
            .await
            .map_err(|_| "stopping".to_owned())?;
        answer.await.map_err(|_| "stopping".to_owned())?
    }
}

/// Group commit: every save waiting is written in one statement, so that hundreds of sagas in
/// flight cost a few statements a step, not hundreds.
pub(super) async fn save_batches(pool: PgPool, mut requests: mpsc::Receiver<SaveRequest>) {
    let mut batch = Vec::new();
    while requests.recv_many(&mut batch, SAVE_BATCH).await > 0 {
        // Taken, not cloned: a request's row is not needed once it is sent.
        let rows = Value::Array(
            batch
                .iter_mut()
                .map(|request| std::mem::take(&mut request.row))
                .collect(),
        );
        let order_ids: Vec<&str> = batch
            .iter()
            .map(|request| request.order_id.as_str())
            .collect();
        let result: Result<Vec<(String, Option<i64>, bool)>, sqlx::Error> =
            sqlx::query_as(SAVE_SAGAS)
                .bind(rows)
                .bind(order_ids)
                .fetch_all(&pool)
                .await;
        metrics::histogram!("ordo_saga_save_batch_size").record(batch.len() as f64);
        match result {
            Ok(saved) => {
                let saved: HashMap<(String, Option<i64>), bool> = saved
                    .into_iter()
                    .map(|(order_id, expected, deadline_passed)| {
                        ((order_id, expected), deadline_passed)
                    })
                    .collect();
                for request in batch.drain(..) {
                    let written = saved
                        .get(&(request.order_id, Some(request.expected)))
                        .map(|&deadline_passed| Written { deadline_passed });
                    let _ = request.saved.send(Ok(written));
                }
            }
            Err(err) => {
                for request in batch.drain(..) {
                    let _ = request.saved.send(Err(err.to_string()));
                }
            }
        }
    }
}

/// Saga saves written per statement, at most.
pub(super) const SAVE_BATCH: usize = 256;

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use ordo_domain::{CustomerId, Sku, order::OrderLine};
    use ordo_testkit::TestDatabase;

    use super::*;

    fn saga(order_id: &str) -> Saga {
        let line = OrderLine {
            sku: Sku::parse("A1").unwrap(),
            qty: 1,
            unit_price_cents: 100,
        };
        Saga::start(
            OrderId::parse(order_id).unwrap(),
            CustomerId::parse("c1").unwrap(),
            &[line],
            100,
        )
    }

    /// A coordinator whose saga's deadline passed saves the compensation plan before it sends
    /// any of it: if the save is refused (another coordinator moved the saga meanwhile), it
    /// sends nothing, so that no compensation runs from a plan that no one saved.
    #[tokio::test]
    async fn a_plan_the_deadline_changed_is_saved_before_any_of_it_is_sent() {
        let server = ordo_testkit::NatsServer::start();
        let nats = server.client().await;
        let mut sent = nats.subscribe("ordo.>").await.unwrap();
        nats.flush().await.unwrap();
        let nowhere = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        let coordinator = Coordinator::new(
            nowhere,
            nats.clone(),
            crate::SimulatedGateway::default(),
            CoordinatorConfig::default(),
        );
        // Its reserve of A1 went unanswered, and the deadline has passed.
        let saga = saga("o-1").record(0, Outcome::Unknown("no answer".into()), Utc::now());
        let claimed = Claimed {
            saga,
            version: 3,
            deadline_passed: true,
            traceparent: None,
            placed_at: Utc::now(),
        };
        let (sender, mut requests) = mpsc::channel(8);
        let driving = tokio::spawn(async move { coordinator.drive(claimed, &Saves(sender)).await });
        let first = requests.recv().await.expect("a save");
        assert_eq!(first.row["state"], "compensating", "{}", first.row);
        assert_eq!(first.expected, 3);
        first.saved.send(Ok(None)).unwrap();
        driving.await.unwrap();
        // One connection: whatever it published came back to its subscription before the answer
        // to a request it sends after (the server answers in order, on this connection).
        nats.request("$JS.API.INFO", "".into()).await.unwrap();
        let anything = futures::FutureExt::now_or_never(sent.next());
        assert!(
            anything.is_none(),
            "sent before the plan was saved: {:?}",
            anything.flatten().map(|m| m.subject)
        );
    }

    /// Two drivers of one saga in one coordinator (the first one's lease ran out and the saga
    /// was claimed again) can have their saves in one batch: only the one holding the saga's
    /// version is written and told so; the stale one must stop, not go on as if saved.
    #[tokio::test]
    async fn in_one_batch_only_the_save_at_the_sagas_version_is_told_it_was_written() {
        let database = TestDatabase::create().await;
        crate::schema::migrate(database.pool()).await.unwrap();
        let pool = database.pool().clone();
        let stale = saga("o-1");
        sqlx::query(
            "INSERT INTO sagas (order_id, state, steps, data, version, next_attempt_at)
             VALUES ('o-1', 'running', '[]', $1, 7, now())",
        )
        .bind(serde_json::to_value(&stale).unwrap())
        .execute(&pool)
        .await
        .unwrap();
        let current = stale.clone().record(0, Outcome::Succeeded, Utc::now());

        let (sender, receiver) = mpsc::channel(8);
        let saver = tokio::spawn(save_batches(pool.clone(), receiver));
        let saves = Saves(sender);
        // Queued before the saver looks, so that both go in one statement.
        let (first, second) = tokio::join!(
            saves.save(&current, 6, Some(Duration::ZERO), None),
            saves.save(&current, 7, Some(Duration::ZERO), None),
        );
        assert_eq!(
            (first, second),
            (
                Ok(None),
                Ok(Some(Written {
                    deadline_passed: false
                }))
            )
        );
        let version: i64 = sqlx::query_scalar("SELECT version FROM sagas WHERE order_id = 'o-1'")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(version, 8);
        drop(saves);
        saver.await.unwrap();
    }

    /// A fresh system's sagas table is never analysed for its first thousands of rows; a save
    /// must still look its rows up by key rather than scan the table (as it did for the first
    /// 20 s at 250 orders/s, each save reading every saga).
    #[tokio::test]
    async fn a_save_looks_its_sagas_up_by_key_in_a_table_never_analysed() {
        let database = TestDatabase::create().await;
        crate::schema::migrate(database.pool()).await.unwrap();
        let pool = database.pool().clone();
        sqlx::query(
            "INSERT INTO sagas (order_id, state, steps, data, next_attempt_at)
             SELECT 'o-' || i, 'running', '[]', '{}', now() FROM generate_series(1, 5000) i",
        )
        .execute(&pool)
        .await
        .unwrap();
        let rows = Value::Array(vec![saga_row(&saga("o-7"), Some(0), None, None)]);
        let plan: Vec<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {SAVE_SAGAS}")))
                .bind(rows)
                .bind(vec!["o-7"])
                .fetch_all(&pool)
                .await
                .unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("sagas_pkey") && !plan.contains("Seq Scan on sagas"),
            "{plan}"
        );
    }
}
