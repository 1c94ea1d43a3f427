-- The saga's intake reads ORDO_ORDERS by partition, without a durable consumer: how far each
-- partition's order events are taken in, and which ORDO_ORDERS that sequence is of (a stream
-- deleted and created again starts its sequences over). The first coordinator of a build with
-- this table fills it from the durable consumer `ordo-saga` of earlier builds, then deletes it.
CREATE TABLE IF NOT EXISTS saga_intake (
    partition      integer     PRIMARY KEY,
    seq            bigint      NOT NULL,
    stream_created timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- An order event the intake held back (it cannot read it, or an earlier event of its order is
-- held back) is tried again by itself, less and less often: when, by PostgreSQL's clock. The
-- notifier's rows leave it empty (its durable consumer delivers them again).
ALTER TABLE unreadable_events ADD COLUMN IF NOT EXISTS next_attempt_at timestamptz;
