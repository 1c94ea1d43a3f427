//! Operating the read side: projection status, health, readiness and Prometheus metrics.

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::{StatusCode, Uri, header},
    response::IntoResponse,
};
use ordo_projections::schema::{catalog, checkpoint_of, checkpoints_by_partition};
use serde_json::{Value, json};
use sqlx::Row;

use crate::{ApiState, error::ApiError};

/// What `/projections` and `ordo projections status` show for each projection.
pub async fn projection_status(
    pool: &sqlx::PgPool,
    nats: &async_nats::Client,
) -> Result<Vec<Value>, ApiError> {
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
        let parked = sqlx::query(
            // Those of the view that serves (a rebuild's new view parks its own, shown once
            // it is swapped in).
            "SELECT seq, subject, event_type, reason, attempts, parked_at FROM parked_events
             WHERE projection = $1 AND parked_in = $2 ORDER BY seq",
        )
        .bind(projection.name)
        .bind(projection.schema())
        .fetch_all(pool)
        .await?;
        let parked: Vec<Value> = parked
            .iter()
            .map(|row| {
                json!({
                    "seq": row.get::<i64, _>("seq"),
                    "subject": row.get::<String, _>("subject"),
                    "event_type": row.get::<Option<String>, _>("event_type"),
                    "reason": row.get::<String, _>("reason"),
                    "attempts": row.get::<i32, _>("attempts"),
                    "parked_at": row.get::<chrono::DateTime<chrono::Utc>, _>("parked_at"),
                })
            })
            .collect();
        status.push(json!({
            "name": projection.name,
            "stream": projection.stream,
            "checkpoint": checkpoint,
            "stream_head": head,
            "lag": head.map(|head| head.saturating_sub(checkpoint)),
            "partitions": partitions
                .iter()
                .map(|(partition, checkpoint)| json!({
                    "partition": partition,
                    "checkpoint": checkpoint,
                    "lag": head.map(|head| head.saturating_sub(*checkpoint)),
                }))
                .collect::<Vec<_>>(),
            "parked": parked.len(),
            "parked_events": parked,
        }));
    }
    Ok(status)
}

pub async fn projections(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"projections": projection_status(&state.pool, &state.nats).await?}),
    ))
}

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
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
pub async fn readyz(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
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
    let mut streams = serde_json::Map::new();
    if nats == "ok" {
        for definition in &state.streams {
            let shown = match definition.drift(&js).await {
                Ok(Some(fields)) if fields.is_empty() => "ok".to_owned(),
                Ok(Some(fields)) => format!("differs from its definition: {}", fields.join(", ")),
                Ok(None) => "missing".to_owned(),
                Err(err) => err.to_string(),
            };
            streams.insert(definition.config.name.clone(), shown.into());
        }
    }
    // Events a worker holds back because it cannot read them (a newer schema during a rolling
    // upgrade) do not make the read API unready either: it serves reads. They are shown, per
    // consumer, for an operator to finish the upgrade.
    let mut unreadable = serde_json::Map::new();
    if postgres == "ok"
        && let Ok(counts) = count_by(&state.pool, UNREADABLE_BY_CONSUMER).await
    {
        for (consumer, count) in counts {
            unreadable.insert(consumer, count.into());
        }
    }
    (
        status,
        Json(json!({
            "ready": ready,
            "checks": {"postgres": postgres, "nats": nats},
            "streams": streams,
            "unreadable_events": unreadable,
        })),
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
pub async fn metrics(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    match projection_status(&state.pool, &state.nats).await {
        Ok(projections) => {
            // Up only when both sides answered: PostgreSQL (the query above) and JetStream
            // (every stream's head). A head not read leaves the lag unknown: NaN, not the last
            // value, which would look like a view keeping up.
            let heads_read = projections
                .iter()
                .all(|projection| projection["stream_head"].is_u64());
            for projection in projections {
                let name = projection["name"].as_str().unwrap_or_default().to_owned();
                let gauge = |metric: &'static str, key: &str| {
                    let value = projection[key]
                        .as_u64()
                        .map_or(f64::NAN, |value| value as f64);
                    metrics::gauge!(metric, "projection" => name.clone()).set(value);
                };
                gauge("ordo_projection_checkpoint", "checkpoint");
                gauge("ordo_projection_stream_head", "stream_head");
                gauge("ordo_projection_lag_events", "lag");
                for partition in projection["partitions"].as_array().into_iter().flatten() {
                    if let Some(number) = partition["partition"].as_u64() {
                        let lag = partition["lag"].as_u64().map_or(f64::NAN, |lag| lag as f64);
                        metrics::gauge!(
                            "ordo_projection_partition_lag_events",
                            "projection" => name.clone(),
                            "partition" => number.to_string()
                        )
                        .set(lag);
                    }
                }
                gauge("ordo_projection_parked_events", "parked");
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
