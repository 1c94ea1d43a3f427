-- The saga's tables: sagas (the coordinator's), notifications (the notifier's), payments (the
-- simulated gateway's ledger) and unreadable_events (what the saga's intake and the notifier
-- hold back). Written so that it also adopts a database an earlier build set up, where these
-- tables came from the shared migrations (`_sqlx_migrations`, versions 1 to 7) at any of their
-- versions: what exists is kept and brought to this shape, what is missing is created.

-- One row per placed order: the saga's state, plan and schedule.
CREATE TABLE IF NOT EXISTS sagas (
    order_id     text PRIMARY KEY,
    state        text NOT NULL,
    steps        jsonb NOT NULL DEFAULT '[]',
    reason       text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    deadline_at  timestamptz
);
-- Its whole state, and when it runs next.
ALTER TABLE sagas ADD COLUMN IF NOT EXISTS data jsonb;
ALTER TABLE sagas ADD COLUMN IF NOT EXISTS next_attempt_at timestamptz;
CREATE INDEX IF NOT EXISTS sagas_due ON sagas (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
-- Bumped by every write: a coordinator whose lease ran out, or whose saga an order event changed
-- meanwhile, cannot overwrite it.
ALTER TABLE sagas ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0;
-- The order's trace context (W3C `traceparent`, from its OrderPlaced event): every step, after
-- any restart, continues the order's trace.
ALTER TABLE sagas ADD COLUMN IF NOT EXISTS traceparent text;

-- Exactly one notification per (order, kind), with the payload a retry sends again.
CREATE TABLE IF NOT EXISTS notifications (
    order_id     text NOT NULL,
    kind         text NOT NULL,
    customer_id  text NOT NULL,
    status       text NOT NULL,
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, kind)
);
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS payload jsonb;
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS sent_at timestamptz;

-- The simulated payment gateway's ledger: one row per order, what was authorised and refunded.
-- A refund is also a barrier: an authorisation that arrives after the refund (a late retry) is
-- declined, so a compensated order can never end up charged.
CREATE TABLE IF NOT EXISTS payments (
    order_id       text PRIMARY KEY,
    amount_cents   bigint NOT NULL,
    authorized_at  timestamptz,
    refunded_at    timestamptz
);

-- Events a worker (the saga's intake, the notifier) could not read: a newer schema written by a
-- newer build during a rolling upgrade, or a message that is not an event. Such an event is not
-- acknowledged (it is delivered again, less and less often, until a build that reads it takes it)
-- and shows here, in /readyz and in `ordo_unreadable_events`, until it is handled.
CREATE TABLE IF NOT EXISTS unreadable_events (
    consumer      text        NOT NULL,
    stream        text        NOT NULL,
    seq           bigint      NOT NULL,
    subject       text        NOT NULL,
    event_type    text,
    schema        bigint,
    reason        text        NOT NULL,
    deliveries    bigint      NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, stream, seq)
);
