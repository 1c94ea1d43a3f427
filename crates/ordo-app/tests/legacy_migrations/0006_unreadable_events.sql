-- Events a worker (the saga's intake, the notifier) could not read: a newer schema written by a
-- newer build during a rolling upgrade, or a message that is not an event. Such an event is not
-- acknowledged (it is delivered again, less and less often, until a build that reads it takes it)
-- and shows here, in /readyz and in `ordo_unreadable_events`, until it is handled.
CREATE TABLE unreadable_events (
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
