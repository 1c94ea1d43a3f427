//! One trace per order. W3C trace context travels in NATS headers (`traceparent`,
//! `tracestate`), read and written by OpenTelemetry's own [`TraceContextPropagator`]; an event
//! keeps the context of the command that wrote it and a saga keeps its own in its row, so whatever
//! reacts to them later, after any restart, continues the same trace.
//!
//! Every span that takes part declares a `trace_id` field, which [`follow`] fills in, so that
//! each log line written inside it names its trace. Without an exporter (no
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) spans have no OpenTelemetry ids; [`follow`] then makes up a
//! span id under the trace it continues (or a new trace), so the chain of `traceparent`s still
//! holds for the logs and for whoever turns exporting on later.

use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::HeaderMap;
use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Says that spans are exported (set once at start-up): work done only for the trace viewer,
/// such as a span per projected event, is skipped when they are not.
pub fn set_exporting(exporting: bool) {
    EXPORTING.store(exporting, Ordering::Relaxed);
}

pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// A `traceparent` alone, as a saga row keeps it.
struct Traceparent<'a>(&'a str);

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// The trace context a message carries; empty when it carries none, or none that is valid.
pub fn extract(headers: Option<&HeaderMap>) -> Context {
    match headers {
        Some(headers) => TraceContextPropagator::new().extract(&HeaderExtractor(headers)),
        None => Context::new(),
    }
}

/// The trace context a stored `traceparent` names; empty for none or an invalid one.
pub fn from_traceparent(traceparent: Option<&str>) -> Context {
    match traceparent {
        Some(value) => TraceContextPropagator::new().extract(&Traceparent(value)),
        None => Context::new(),
    }
}

/// Adds `context` to the headers of a message that continues its trace.
pub fn inject(context: &Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(context, &mut HeaderInjector(headers));
}

/// `context` as a `traceparent` value; `None` when it holds no valid span.
pub fn traceparent(context: &Context) -> Option<String> {
    let mut headers = HeaderMap::new();
    inject(context, &mut headers);
    headers
        .get("traceparent")
        .map(|value| value.as_str().to_owned())
}

/// Makes `span` a child of `parent` and returns the context to pass on to what `span` causes
/// (events it appends, messages it sends): the span's own when spans are exported, else a
/// made-up span under `parent`'s trace, or under a new trace when `parent` is empty. Records
/// the trace id in the span's `trace_id` field.
pub fn follow(span: &tracing::Span, parent: Context) -> Context {
    let parent_span = parent.span().span_context().clone();
    // Fails only when no OpenTelemetry layer is installed: then there is nothing to link.
    let _ = span.set_parent(parent);
    let own = span.context();
    let passed_on = if own.span().span_context().is_valid() {
        own
    } else {
        let trace_id = if parent_span.is_valid() {
            parent_span.trace_id()
        } else {
            TraceId::from(rand::random::<u128>() | 1)
        };
        let flags = if parent_span.is_valid() {
            parent_span.trace_flags()
        } else {
            TraceFlags::SAMPLED
        };
        Context::new().with_remote_span_context(SpanContext::new(
            trace_id,
            SpanId::from(rand::random::<u64>() | 1),
            flags,
            true,
            TraceState::default(),
        ))
    };
    span.record(
        "trace_id",
        passed_on.span().span_context().trace_id().to_string(),
    );
    passed_on
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn headers_with(traceparent: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", traceparent);
        headers
    }

    #[test]
    fn a_traceparent_round_trips_through_headers() {
        let context = extract(Some(&headers_with(CALLER)));
        assert_eq!(traceparent(&context).as_deref(), Some(CALLER));
        assert_eq!(
            traceparent(&from_traceparent(Some(CALLER))).as_deref(),
            Some(CALLER)
        );
    }

    #[test]
    fn malformed_or_all_zero_traceparents_are_ignored() {
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        ] {
            assert_eq!(
                traceparent(&extract(Some(&headers_with(bad)))),
                None,
                "{bad}"
            );
        }
        assert_eq!(traceparent(&extract(None)), None);
    }

    #[test]
    fn without_an_exporter_a_span_passes_on_the_callers_trace_with_a_new_span_id() {
        let span = tracing::info_span!("command", trace_id = tracing::field::Empty);
        let passed_on = follow(&span, extract(Some(&headers_with(CALLER))));
        let passed_on = passed_on.span().span_context().clone();
        assert_eq!(
            passed_on.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_ne!(passed_on.span_id().to_string(), "b7ad6b7169203331");
        assert!(passed_on.is_sampled());
    }

    #[test]
    fn without_a_caller_a_span_starts_a_trace() {
        let span = tracing::info_span!("command", trace_id = tracing::field::Empty);
        let passed_on = follow(&span, Context::new());
        assert!(traceparent(&passed_on).is_some());
    }
}
