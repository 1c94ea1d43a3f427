//! W3C trace context for commands. The command's span continues the caller's trace (its
//! `traceparent` header), and the event stores the command span's own context, so that whatever
//! reacts to the event (projections, the saga) continues the same trace. Without an OpenTelemetry
//! exporter, spans have no ids; the event then gets a new child of the caller's trace (or a new
//! trace), so the chain still holds for whoever reads it.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Parses `00-<trace id>-<span id>-<flags>`; `None` for anything else or all-zero ids.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let parts: Vec<&str> = value.trim().split('-').collect();
    let [version, trace_id, span_id, flags] = parts[..] else {
        return None;
    };
    if version != "00" || trace_id.len() != 32 || span_id.len() != 16 || flags.len() != 2 {
        return None;
    }
    let context = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

pub fn format_traceparent(context: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    )
}

/// Makes `span` a child of the caller's span, when the caller sent a valid `traceparent`.
pub fn continue_trace(span: &tracing::Span, caller: Option<&str>) {
    if let Some(parent) = caller.and_then(parse_traceparent) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
}

/// The `traceparent` to store with the event `span` produces.
pub fn event_traceparent(span: &tracing::Span, caller: Option<&str>) -> String {
    let own = span.context().span().span_context().clone();
    if own.is_valid() {
        return format_traceparent(&own);
    }
    let span_id = SpanId::from(rand::random::<u64>() | 1);
    match caller.and_then(parse_traceparent) {
        Some(parent) => format_traceparent(&SpanContext::new(
            parent.trace_id(),
            span_id,
            parent.trace_flags(),
            false,
            TraceState::default(),
        )),
        None => format_traceparent(&SpanContext::new(
            TraceId::from(rand::random::<u128>() | 1),
            span_id,
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_traceparent_round_trips() {
        let context = parse_traceparent(CALLER).unwrap();
        assert_eq!(format_traceparent(&context), CALLER);
    }

    #[test]
    fn malformed_or_all_zero_traceparents_are_ignored() {
        for bad in [
            "garbage",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn without_an_exporter_the_event_continues_the_callers_trace_with_a_new_span() {
        let span = tracing::info_span!("command");
        continue_trace(&span, Some(CALLER));
        let event = event_traceparent(&span, Some(CALLER));
        let (event, caller) = (
            parse_traceparent(&event).unwrap(),
            parse_traceparent(CALLER).unwrap(),
        );
        assert_eq!(event.trace_id(), caller.trace_id());
        assert_ne!(event.span_id(), caller.span_id());
    }

    #[test]
    fn without_a_caller_the_event_starts_a_trace() {
        let event = event_traceparent(&tracing::info_span!("command"), None);
        assert!(parse_traceparent(&event).is_some(), "{event}");
    }
}
