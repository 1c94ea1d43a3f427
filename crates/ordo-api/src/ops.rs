//! Operating the read side: projection status, health, readiness and Prometheus metrics.

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::{StatusCode, Uri, header},
    response::IntoResponse,
};
use ordo_projections::schema::{catalog, checkpoint_of, checkpoints_by_partition};
use serde_json::json;

use crate::{
    ApiState,
    bodies::{
        ErrorBody, Health, ParkedEvent, PartitionStatus, ProjectionStatus, Projections, Readiness,
        ReadinessChecks,
    },
    error::ApiError,
};

/// Parked events listed per view (all are counted).
const PARKED_SHOWN: i64 = 100;

/// What `/projections` and `ordo projections status` show for each projection.
pub async fn projection_status(
    pool: &sqlx::PgPool,
    nats: &async_nats::Client,
) -> Result<Vec<ProjectionStatus>, ApiError> {
    let js = async_nats::jetstream::new(nats.clone());
    let mut status = Vec::new();
    for projection in catalog() {
        let checkpoint = checkpoint_of(pool, &projection.schema(), projection.stream).await?;
        let partitions = checkpoints_by_partition(pool, &projection.schema()).await?;
        let head = match js.get_stream(projection.stream).await {
            Ok(mut stream) => stream
                .info()
                .await
                .ok()
                .map(|info| info.state.last_sequence),
            Err(_) => None,
        };
        // Those of the view that serves (a rebuild's new view parks its own, shown once it is
        // swapped in).
        // A few shown, all counted: a projector that parks every event (a bad release) must not
        // make this answer, or the console's live page that reads it every 2 s, grow with them.
        let parked_events: Vec<ParkedEvent> = sqlx::query_as(
            "SELECT seq, subject, event_type, reason, attempts, parked_at FROM parked_events
             WHERE projection = $1 AND parked_in = $2 ORDER BY seq LIMIT $3",
        )
        .bind(projection.name)
        .bind(projection.schema())
        .bind(PARKED_SHOWN)
        .fetch_all(pool)
        .await?;
        let parked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM parked_events WHERE projection = $1 AND parked_in = $2",
        )
        .bind(projection.name)
        .bind(projection.schema())
        .fetch_one(pool)
        .await?;
        let lag = |checkpoint: u64| head.map(|head| head.saturating_sub(checkpoint));
        status.push(ProjectionStatus {
            name: projection.name.to_owned(),
            stream: projection.stream.to_owned(),
            checkpoint,
            stream_head: head,
            lag: lag(checkpoint),
            partitions: partitions
                .iter()
                .map(|(partition, checkpoint)| PartitionStatus {
                    partition: *partition,
                    checkpoint: *checkpoint,
                    lag: lag(*checkpoint),
                })
                .collect(),
            parked: usize::try_from(parked).unwrap_or(0),
            parked_events,
        });
    }
    Ok(status)
}

/// Each view's checkpoint, its stream's head, the lag between them (per partition too) and the
/// events it parked.
#[utoipa::path(
    get,
    path = "/projections",
    tag = "operations",
    responses(
        (status = 200, description = "Every projection", body = Projections),
        (status = 503, description = "PostgreSQL does not answer", body = ErrorBody),
    ),
)]
pub async fn projections(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<Projections>, ApiError> {
    Ok(Json(Projections {
        projections: projection_status(&state.pool, &state.nats).await?,
    }))
}

/// Liveness: the process answers. Never asks for a token.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    security(()),
    responses((status = 200, description = "Alive", body = Health)),
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
    })
}

/// Whether PostgreSQL answers a query, and if not, why.
async fn postgres_answers(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
}

/// "ok", or the state of a NATS connection that is not up.
fn nats_check(nats: &async_nats::Client) -> String {
    match nats.connection_state() {
        async_nats::connection::State::Connected => "ok".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A worker's readiness on its metrics port: its NATS connection up and, if it has a database,
/// the database answering. 503 with the failing check otherwise. It answers without a token,
/// so it says only "ok" or "unavailable" of the database (the error goes to the log) and asks
/// it at most once a second.
pub async fn worker_readyz(checks: &crate::WorkerChecks) -> axum::response::Response {
    let mut shown = serde_json::Map::new();
    shown.insert("nats".into(), nats_check(&checks.nats).into());
    if let Some(pool) = &checks.pool {
        let mut last = checks.postgres.lock().await;
        let answers = match *last {
            Some((asked, answers)) if asked.elapsed() < std::time::Duration::from_secs(1) => {
                answers
            }
            _ => {
                let check = postgres_answers(pool);
                let answers =
                    match tokio::time::timeout(std::time::Duration::from_secs(2), check).await {
                        Ok(Ok(_)) => true,
                        Ok(Err(err)) => {
                            tracing::warn!(%err, "readiness: PostgreSQL does not answer");
                            false
                        }
                        Err(_) => {
                            tracing::warn!("readiness: PostgreSQL did not answer within 2 s");
                            false
                        }
                    };
                *last = Some((std::time::Instant::now(), answers));
                answers
            }
        };
        let postgres = if answers { "ok" } else { "unavailable" };
        shown.insert("postgres".into(), postgres.into());
    }
    let ready = shown.values().all(|check| check == "ok");
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ready, "checks": shown}))).into_response()
}

/// Ready when PostgreSQL answers (the views were prepared before the API started) and NATS is
/// connected.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to serve reads", body = Readiness),
        (status = 503, description = "Not ready: `checks` says which check failed", body = Readiness),
    ),
)]
pub async fn readyz(State(state): State<Arc<ApiState>>) -> (StatusCode, Json<Readiness>) {
    let postgres = match postgres_answers(&state.pool).await {
        Ok(()) => "ok".to_owned(),
        Err(err) => err.to_string(),
    };
    let nats = nats_check(&state.nats);
    let ready = postgres == "ok" && nats == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // A stream that differs from its definition does not make ordo unready; it is shown, for an
    // operator to decide whether to run `ordo streams apply`.
    let js = async_nats::jetstream::new(state.nats.clone());
    let mut streams = std::collections::BTreeMap::new();
    if nats == "ok" {
        for definition in &state.streams {
            let shown = match definition.drift(&js).await {
                Ok(Some(fields)) if fields.is_empty() => "ok".to_owned(),
                Ok(Some(fields)) => format!("differs from its definition: {}", fields.join(", ")),
                Ok(None) => "missing".to_owned(),
                Err(err) => err.to_string(),
            };
            streams.insert(definition.config.name.clone(), shown);
        }
    }
    // Events a worker holds back because it cannot read them (a newer schema during a rolling
    // upgrade) do not make the read API unready either: it serves reads. They are shown, per
    // consumer, for an operator to finish the upgrade.
    let mut unreadable_events = std::collections::BTreeMap::new();
    if postgres == "ok"
        && let Ok(counts) = count_by(&state.pool, UNREADABLE_BY_CONSUMER).await
    {
        unreadable_events.extend(counts);
    }
    (
        status,
        Json(Readiness {
            ready,
            checks: ReadinessChecks { postgres, nats },
            streams,
            unreadable_events,
        }),
    )
}

const UNREADABLE_BY_CONSUMER: &str =
    "SELECT consumer, count(*) FROM unreadable_events GROUP BY consumer";

/// The consumers that hold back events they cannot read (see `ordo_saga::unreadable`).
fn holding_consumers() -> impl Iterator<Item = &'static str> {
    ordo_eventstore::ConsumerId::ALL
        .into_iter()
        .filter(|consumer| consumer.holds_back_unreadable())
        .map(ordo_eventstore::ConsumerId::name)
}

/// Prometheus text: the gauges of every projection, read now, and what this process recorded.
/// Asks for the metrics token when one is set, else the API's.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain")),
)]
pub async fn metrics(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    match projection_status(&state.pool, &state.nats).await {
        Ok(projections) => {
            // Up only when both sides answered: PostgreSQL (the query above) and JetStream
            // (every stream's head). A head not read leaves the lag unknown: NaN, not the last
            // value, which would look like a view keeping up.
            let heads_read = projections
                .iter()
                .all(|projection| projection.stream_head.is_some());
            let known = |value: Option<u64>| value.map_or(f64::NAN, |value| value as f64);
            for projection in projections {
                let gauge = |metric: &'static str, value: f64| {
                    metrics::gauge!(metric, "projection" => projection.name.clone()).set(value);
                };
                gauge("ordo_projection_checkpoint", projection.checkpoint as f64);
                gauge("ordo_projection_stream_head", known(projection.stream_head));
                gauge("ordo_projection_lag_events", known(projection.lag));
                for partition in &projection.partitions {
                    metrics::gauge!(
                        "ordo_projection_partition_lag_events",
                        "projection" => projection.name.clone(),
                        "partition" => partition.partition.to_string()
                    )
                    .set(known(partition.lag));
                }
                gauge("ordo_projection_parked_events", projection.parked as f64);
            }
            metrics::gauge!("ordo_read_model_up").set(if heads_read { 1.0 } else { 0.0 });
            if let Ok(sagas) = count_by(
                &state.pool,
                "SELECT state, count(*) FROM sagas GROUP BY state",
            )
            .await
            {
                // Every state, so that one that emptied shows 0 rather than its last count.
                for saga_state in ordo_domain::saga::SagaState::ALL {
                    let count = sagas.iter().find(|(state, _)| state == saga_state.as_str());
                    let count = count.map_or(0, |(_, count)| *count);
                    metrics::gauge!("ordo_sagas", "state" => saga_state.as_str()).set(count as f64);
                }
            }
            if let Ok(unreadable) = count_by(&state.pool, UNREADABLE_BY_CONSUMER).await {
                for consumer in holding_consumers() {
                    let count = unreadable.iter().find(|(known, _)| known == consumer);
                    let count = count.map_or(0, |(_, count)| *count);
                    metrics::gauge!("ordo_unreadable_events", "consumer" => consumer)
                        .set(count as f64);
                }
            }
            if let Ok(notifications) = count_by(
                &state.pool,
                "SELECT status, count(*) FROM notifications GROUP BY status",
            )
            .await
            {
                for status in ["pending", "sent", "dead_lettered"] {
                    let count = notifications.iter().find(|(known, _)| known == status);
                    let count = count.map_or(0, |(_, count)| *count);
                    metrics::gauge!("ordo_notifications", "status" => status).set(count as f64);
                }
            }
        }
        Err(_) => metrics::gauge!("ordo_read_model_up").set(0.0),
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn count_by(
    pool: &sqlx::PgPool,
    query: &'static str,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(query).fetch_all(pool).await
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}
