-- The trace context of the order a saga serves (W3C `traceparent`, from its OrderPlaced event),
-- kept with the saga so that every step, after any restart, continues the order's trace.
ALTER TABLE sagas ADD COLUMN traceparent text;
