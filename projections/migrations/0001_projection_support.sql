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
