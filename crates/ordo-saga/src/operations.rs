//! What a person asks of the running saga coordinators and notifiers (the console's buttons),
//! over NATS: a retry is answered by one instance of the component that owns the state, with
//! that component's rights on the database and its settings (the notifier's webhook). The one
//! who asks needs neither: the read API connects as a role that may only read.
//!
//! Each request is JSON and so is its answer ([`OperationReply`]). Only the read API's and the
//! operator's NATS users may publish these subjects (docker/nats-accounts.conf), and the
//! components may answer only in inboxes (those two users', and `_INBOX.`, which in ordo's
//! account only the operator reads); without permissions (`ordo up`), an answer still goes only
//! to an inbox, so a request cannot make a component publish into ordo's own subjects.

use std::future::Future;

use futures::StreamExt;
use ordo_domain::OrderId;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{Coordinator, Notifier, PaymentGateway, StuckRetry};

/// Retry a saga shown as `compensation_stuck` ([`RetrySaga`]).
pub const RETRY_SAGA: &str = "ordo.ops.saga.retry";
/// Deliver a dead-lettered notification again ([`RetryNotification`]).
pub const RETRY_NOTIFICATION: &str = "ordo.ops.notification.retry";
/// Every instance of a component answers in one queue group: one answer per request.
const QUEUE: &str = "ordo-ops";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySaga {
    pub order_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryNotification {
    pub order_id: String,
    /// confirmed, rejected, cancelled or shipped
    pub kind: String,
}

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum OperationReply {
    /// Done: `status` is the saga's state or the notification's status now.
    Done { status: String },
    /// There was nothing to act on (no such saga or notification, or it is not stuck).
    Refused { message: String },
    /// It could not be done now (the database did not answer); nothing changed, or the retry
    /// is left for the next attempt.
    Failed { message: String },
    /// The one who asked got no answer in time: it may have been done, or may still be being
    /// done. (Never sent by a component; what the asking side makes of its own timeout.)
    Unknown { message: String },
}

/// Answers [`RETRY_SAGA`] with `coordinator` until `shutdown`.
pub async fn answer_saga_retries<G: PaymentGateway>(
    nats: async_nats::Client,
    coordinator: Coordinator<G>,
    shutdown: impl Future<Output = ()>,
) {
    answer(nats, RETRY_SAGA, shutdown, |request: RetrySaga| {
        let coordinator = coordinator.clone();
        async move {
            let order_id = match OrderId::parse(request.order_id) {
                Ok(order_id) => order_id,
                Err(err) => {
                    return OperationReply::Refused {
                        message: err.to_string(),
                    };
                }
            };
            match coordinator.retry_stuck(&order_id).await {
                Ok(StuckRetry::Retried(state)) => OperationReply::Done {
                    status: state.as_str().to_owned(),
                },
                Ok(StuckRetry::NotStuck(state)) => OperationReply::Refused {
                    message: format!(
                        "the saga of {order_id} is {}, not compensation_stuck: nothing to retry",
                        state.as_str()
                    ),
                },
                Ok(StuckRetry::NoSaga) => OperationReply::Refused {
                    message: format!("no saga for order {order_id}"),
                },
                Err(err) => OperationReply::Failed {
                    message: err.to_string(),
                },
            }
        }
    })
    .await;
}

/// Answers [`RETRY_NOTIFICATION`] with `notifier` until `shutdown`.
pub async fn answer_notification_retries(
    nats: async_nats::Client,
    notifier: Notifier,
    shutdown: impl Future<Output = ()>,
) {
    answer(
        nats,
        RETRY_NOTIFICATION,
        shutdown,
        |request: RetryNotification| {
            let notifier = notifier.clone();
            async move {
                let order_id = match OrderId::parse(request.order_id) {
                    Ok(order_id) => order_id,
                    Err(err) => {
                        return OperationReply::Refused {
                            message: err.to_string(),
                        };
                    }
                };
                let kind = request.kind;
                if !crate::notifier::KINDS.contains(&kind.as_str()) {
                    return OperationReply::Refused {
                        message: format!(
                            "{kind:?} is not a kind of notification (there are: {})",
                            crate::notifier::KINDS.join(", ")
                        ),
                    };
                }
                match notifier.retry_dead_lettered(order_id.as_str(), &kind).await {
                    Ok(crate::notifier::Redelivery::Delivered(status)) => {
                        OperationReply::Done { status }
                    }
                    Ok(crate::notifier::Redelivery::NotDeadLettered(status)) => {
                        OperationReply::Refused {
                            message: format!(
                                "the {kind} notification of {order_id} is {status}, not \
                                 dead_lettered: nothing to deliver again"
                            ),
                        }
                    }
                    Ok(crate::notifier::Redelivery::NoNotification) => OperationReply::Refused {
                        message: format!("no {kind} notification for order {order_id}"),
                    },
                    Err(err) => OperationReply::Failed {
                        message: err.to_string(),
                    },
                }
            }
        },
    )
    .await;
}

/// Requests one instance works on at once: a slow one (a webhook that times out) does not hold
/// up the others, and a flood of them does not take every database connection.
const AT_ONCE: usize = 4;

/// Answers each request on `subject` with `handle` until `shutdown`, [`AT_ONCE`] at a time. A
/// request that is not valid JSON of `R` is refused; one whose reply subject is not an inbox
/// (`_INBOX.…`, or a user's `_INBOX_<user>.…`) gets no answer, so that no request makes a
/// component publish on one of ordo's subjects.
async fn answer<R, F, Fut>(
    nats: async_nats::Client,
    subject: &'static str,
    shutdown: impl Future<Output = ()>,
    handle: F,
) where
    R: DeserializeOwned,
    F: Fn(R) -> Fut,
    Fut: Future<Output = OperationReply>,
{
    tokio::pin!(shutdown);
    let requests = loop {
        match nats.queue_subscribe(subject, QUEUE.into()).await {
            Ok(requests) => break requests,
            Err(err) => {
                tracing::warn!(%err, subject, "cannot listen for operations; trying again");
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let (nats, handle) = (&nats, &handle);
    requests
        .take_until(shutdown)
        .for_each_concurrent(AT_ONCE, |request| async move {
            let Some(reply_to) = request.reply.filter(|reply| is_inbox(reply)) else {
                tracing::warn!(
                    subject,
                    "an operation request without an inbox to answer: ignored"
                );
                return;
            };
            let reply = match serde_json::from_slice::<R>(&request.payload) {
                Ok(parsed) => handle(parsed).await,
                Err(err) => OperationReply::Refused {
                    message: format!("not a valid request of {subject}: {err}"),
                },
            };
            tracing::info!(subject, ?reply, "operation answered");
            let body = serde_json::to_vec(&reply).expect("replies serialize");
            if let Err(err) = nats.publish(reply_to, body.into()).await {
                tracing::warn!(%err, subject, "the answer to an operation was not sent");
            }
        })
        .await;
}

/// A reply subject a NATS client makes for a request: `_INBOX.<token>…`, or with a custom
/// prefix per user as docker/nats-accounts.conf gives them, `_INBOX_<user>.<token>…`.
fn is_inbox(subject: &str) -> bool {
    let Some((prefix, rest)) = subject.split_once('.') else {
        return false;
    };
    let prefixed = prefix == "_INBOX"
        || prefix
            .strip_prefix("_INBOX_")
            .is_some_and(|user| !user.is_empty());
    prefixed && !rest.is_empty() && rest.split('.').all(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_go_only_to_inboxes() {
        assert!(is_inbox("_INBOX.abc.1"));
        assert!(is_inbox("_INBOX_ordo-api.abc"));
        for not_an_inbox in [
            "ordo.stock.events.A1",
            "_INBOX",
            "_INBOX.",
            "_INBOX_.abc",
            "_INBOXordo.abc",
            "_INBOX..abc",
            "$JS.API.STREAM.DELETE.ORDO_ORDERS",
        ] {
            assert!(!is_inbox(not_an_inbox), "{not_an_inbox}");
        }
    }
}
