-- Tables shared by every projection (the views themselves live in one schema per projection,
-- created from projections/<name>.sql, so that a rebuild can fill a new schema and swap it in).

-- Events a projection could not apply after its retries: kept, shown, never skipped quietly.
CREATE TABLE parked_events (
    projection  text NOT NULL,
    stream      text NOT NULL,
    seq         bigint NOT NULL,
    subject     text NOT NULL,
    event_type  text,
    reason      text NOT NULL,
    attempts    integer NOT NULL,
    payload     text NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, stream, seq)
);

-- Saga state, one row per placed order; the saga coordinator fills it.
CREATE TABLE sagas (
    order_id     text PRIMARY KEY,
    state        text NOT NULL,
    steps        jsonb NOT NULL DEFAULT '[]',
    reason       text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    deadline_at  timestamptz
);

-- Notifications, exactly one per (order, kind); the notifier fills it.
CREATE TABLE notifications (
    order_id     text NOT NULL,
    kind         text NOT NULL,
    customer_id  text NOT NULL,
    status       text NOT NULL,
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, kind)
);
