//! The console's actions: each a POST from one of its own forms (confirmed in the browser before
//! it is sent), refused from another origin, asked of the component that owns the state over
//! NATS, and answered with a page that says what happened.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use maud::html;
use ordo_saga::operations::{
    OperationReply, RETRY_NOTIFICATION, RETRY_SAGA, RetryNotification, RetrySaga,
};

use super::{encode, layout};
use crate::ApiState;

/// How long an action waits for its answer (a notification's delivery is one webhook POST).
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// Refuses a request another site's page made the browser send: its `Origin` (or, without one,
/// `Sec-Fetch-Site`) must be this console's. With the session cookie SameSite=Strict, the
/// browser would not send it along anyway; without a token there is no cookie, and this is
/// what stops a page elsewhere from pressing the console's buttons.
pub(super) fn same_origin(headers: &HeaderMap) -> Result<(), Box<Response>> {
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok());
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|value| value.to_str().ok());
    let fetch_site = headers
        .get("sec-fetch-site")
        .and_then(|value| value.to_str().ok());
    let same_site = |site: &str| site == "same-origin" || site == "none";
    let same = match (origin, fetch_site) {
        // A browser sends `Origin: null` where it hides the origin (a sandboxed frame, a page
        // that sends no referrer): then `Sec-Fetch-Site` decides, and without it, no.
        (Some("null"), site) => site.is_some_and(same_site),
        (Some(origin), _) => {
            let origin_host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            origin_host.is_some() && origin_host == host
        }
        (None, Some(site)) => same_site(site),
        // Not a browser (curl, a script): nothing to forge.
        (None, None) => true,
    };
    if same {
        Ok(())
    } else {
        Err(Box::new(
            (
                StatusCode::FORBIDDEN,
            super::message_page(
                "Refused",
                "This action was sent from another site's page: only the console's own forms may send it.",
            ),
        )
                .into_response(),
        ))
    }
}

/// Asks `subject` and reads its answer.
async fn ask(state: &ApiState, subject: &'static str, request: Vec<u8>) -> OperationReply {
    let asked = state.nats.request(subject, request.into());
    match tokio::time::timeout(ANSWER_WITHIN, asked).await {
        Ok(Ok(answer)) => {
            serde_json::from_slice(&answer.payload).unwrap_or_else(|err| OperationReply::Failed {
                message: format!("the answer could not be read: {err}"),
            })
        }
        Ok(Err(err)) if err.kind() == async_nats::RequestErrorKind::NoResponders => {
            OperationReply::Failed {
                message: "no instance is running to answer it (is the component running?)".into(),
            }
        }
        Ok(Err(err)) => OperationReply::Failed {
            message: format!("NATS: {err}"),
        },
        Err(_) => OperationReply::Failed {
            message: format!(
                "no answer within {} s: it may still happen; look again in a moment",
                ANSWER_WITHIN.as_secs()
            ),
        },
    }
}

/// The page that says what an action did, with the way back.
fn answered(state: &ApiState, what: &str, reply: OperationReply, back: &str) -> Response {
    let (status, outcome, text) = match &reply {
        OperationReply::Done { status } => {
            (StatusCode::OK, "done", format!("{what}: now {status}."))
        }
        OperationReply::Refused { message } => (
            StatusCode::CONFLICT,
            "refused",
            format!("{what}: refused. {message}"),
        ),
        OperationReply::Failed { message } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "failed",
            format!("{what}: not done. {message}"),
        ),
    };
    (
        status,
        layout(
            what,
            state.tokens.api.is_some(),
            html! {
                p.outcome data-outcome=(outcome) role="status" { (text) }
                p { a href=(back) { "Back" } }
            },
        ),
    )
        .into_response()
}

pub(super) async fn retry_saga(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
) -> Response {
    if let Err(refused) = same_origin(&headers) {
        return *refused;
    }
    let request = serde_json::to_vec(&RetrySaga {
        order_id: order_id.clone(),
    })
    .expect("requests serialize");
    let reply = ask(&state, RETRY_SAGA, request).await;
    let back = format!("/ui/orders/{}", encode(&order_id));
    answered(
        &state,
        &format!("Retry of the saga of {order_id}"),
        reply,
        &back,
    )
}

pub(super) async fn retry_notification(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path((order_id, kind)): Path<(String, String)>,
) -> Response {
    if let Err(refused) = same_origin(&headers) {
        return *refused;
    }
    let request = serde_json::to_vec(&RetryNotification {
        order_id: order_id.clone(),
        kind: kind.clone(),
    })
    .expect("requests serialize");
    let reply = ask(&state, RETRY_NOTIFICATION, request).await;
    let back = format!("/ui/orders/{}", encode(&order_id));
    answered(
        &state,
        &format!("Delivery of the {kind} notification of {order_id} again"),
        reply,
        &back,
    )
}

pub(super) async fn rebuild_view(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(view): Path<String>,
) -> Response {
    if let Err(refused) = same_origin(&headers) {
        return *refused;
    }
    let what = format!("Rebuild of view {view}");
    let view: ordo_projections::View = match view.parse() {
        Ok(view) => view,
        Err(err) => {
            let reply = OperationReply::Refused {
                message: err.to_string(),
            };
            return answered(&state, &what, reply, "/ui/projections");
        }
    };
    let reply = match super::rebuilds::may_rebuild(&state.pool).await {
        Ok(false) => OperationReply::Refused {
            message: format!(
                "this API connects to PostgreSQL as a role that may not create schemas, as a \
                 rebuild does: run `ordo projections rebuild {}` as the database's owner",
                view.name()
            ),
        },
        Err(err) => OperationReply::Failed {
            message: format!("PostgreSQL: {err}"),
        },
        Ok(true) => match state.rebuilds.start(
            view,
            state.pool.clone(),
            state.nats.clone(),
            state.partitions,
        ) {
            Ok(()) => OperationReply::Done {
                status: "rebuilding (the projections page shows how far)".into(),
            },
            Err(running) => OperationReply::Refused {
                message: running.into(),
            },
        },
    };
    answered(&state, &what, reply, "/ui/projections")
}
