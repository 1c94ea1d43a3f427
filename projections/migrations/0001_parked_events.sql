-- The table every projection shares (each view lives in a schema of its own, `view_<name>`,
-- created from projections/<name>.sql, so that a rebuild can fill a new schema and swap it in).
-- Written so that it also adopts a database an earlier build set up, where this table came from
-- the shared migrations (`_sqlx_migrations`, versions 1 to 7) at any of their versions.

-- Events a projection could not apply after its retries: kept, shown, never skipped quietly.
-- `parked_in` is the view an event was parked in: the live view (`view_<projection>`) or a
-- rebuild's new one (`view_<projection>_next`). A rebuild's swap keeps exactly the events its new
-- view parked.
CREATE TABLE IF NOT EXISTS parked_events (
    projection  text NOT NULL,
    stream      text NOT NULL,
    seq         bigint NOT NULL,
    subject     text NOT NULL,
    event_type  text,
    reason      text NOT NULL,
    attempts    integer NOT NULL,
    payload     text NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT now(),
    parked_in   text NOT NULL,
    PRIMARY KEY (projection, stream, seq, parked_in)
);
-- A database set up before `parked_in` existed: its rows were parked in the live view.
ALTER TABLE parked_events ADD COLUMN IF NOT EXISTS parked_in text;
UPDATE parked_events SET parked_in = 'view_' || projection WHERE parked_in IS NULL;
ALTER TABLE parked_events ALTER COLUMN parked_in SET NOT NULL;
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_index
        WHERE indrelid = 'parked_events'::regclass AND indisprimary AND indnatts = 4
    ) THEN
        ALTER TABLE parked_events DROP CONSTRAINT parked_events_pkey;
        ALTER TABLE parked_events ADD PRIMARY KEY (projection, stream, seq, parked_in);
    END IF;
END $$;
