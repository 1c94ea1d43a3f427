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

/// How long an action waits for its answer. A notification delivered again may take the
/// notifier's every attempt at a webhook that hangs (by default 5 × 2 s, the flushes and the
/// pauses between: about 20 s); an answer later than this is reported as not known yet.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// Refuses a request another site's page made the browser send: its `Origin` (or, without one,
/// `Sec-Fetch-Site`) must be this console's. With the session cookie SameSite=Strict, the
/// browser would not send it along anyway; without a token there is no cookie, and this is
/// what stops a page elsewhere from pressing the console's buttons. The console's host is the
/// `X-Forwarded-Host` a reverse proxy sets, else `Host` (a proxy may send its upstream's address
/// as `Host`). A page cannot set either across sites; one a rebinding name made same-origin can,
/// and is stopped before this (without a token, [`super::reached_by_name`] refuses a name in
/// either header; with one, it has no cookie).
pub(super) fn same_origin(headers: &HeaderMap) -> Result<(), Box<Response>> {
    let header_text = |name| headers.get(name).and_then(|value| value.to_str().ok());
    let host = header_text(header::HeaderName::from_static("x-forwarded-host"))
        .and_then(|hosts| hosts.split(',').next())
        .map(str::trim)
        .or_else(|| header_text(header::HOST));
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
        Err(refused(
            "This action was sent from another site's page: only the console's own forms may send it.",
        ))
    }
}

fn refused(why: &str) -> Box<Response> {
    Box::new((StatusCode::FORBIDDEN, super::message_page("Refused", why)).into_response())
}

/// Whether a `Host` header names this machine by an IP address, or as `localhost` (which
/// browsers resolve to a loopback address themselves), with or without a port.
pub(super) fn is_address(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // [::1]:8080
        Some(bracketed) => match bracketed.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.starts_with(':') => ip,
            _ => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.parse::<std::net::IpAddr>().is_ok() || name.eq_ignore_ascii_case("localhost")
}

/// Asks `subject` and reads its answer.
async fn ask(state: &ApiState, subject: &'static str, request: Vec<u8>) -> OperationReply {
    // The client's own request timeout (10 s by default) would end the wait first: the request
    // carries its own.
    let asked = async_nats::Request::new()
        .payload(request.into())
        .timeout(Some(ANSWER_WITHIN));
    match state.nats.send_request(subject, asked).await {
        Ok(answer) => {
            serde_json::from_slice(&answer.payload).unwrap_or_else(|err| OperationReply::Failed {
                message: format!("the answer could not be read: {err}"),
            })
        }
        Err(err) if err.kind() == async_nats::RequestErrorKind::NoResponders => {
            OperationReply::Failed {
                message: "no instance is running to answer it (is the component running?)".into(),
            }
        }
        Err(err) if err.kind() == async_nats::RequestErrorKind::TimedOut => {
            OperationReply::Unknown {
                message: format!(
                    "no answer within {} s: it may still be happening; look again in a moment",
                    ANSWER_WITHIN.as_secs()
                ),
            }
        }
        Err(err) => OperationReply::Failed {
            message: format!("NATS: {err}"),
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
        OperationReply::Unknown { message } => (
            StatusCode::GATEWAY_TIMEOUT,
            "unknown",
            format!("{what}: not known yet. {message}"),
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
    let reply = match super::rebuilds::may_rebuild(&state.pool, view).await {
        Ok(false) => OperationReply::Refused {
            message: format!(
                "this API connects to PostgreSQL as a role that may not create schemas or does \
                 not own the view's, as a rebuild needs: run `ordo projections rebuild {}` as \
                 the database's owner",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_an_ip_or_localhost_never_a_name() {
        for address in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "[::1]:8080",
            "[::1]",
            "localhost:18080",
            "10.0.0.7:80",
        ] {
            assert!(is_address(address), "{address}");
        }
        for name in [
            "evil.example:8080",
            "ordo.internal",
            "127.0.0.1.nip.io:8080",
            "[::1]x",
            "localhost.evil.example",
        ] {
            assert!(!is_address(name), "{name}");
        }
    }
}
