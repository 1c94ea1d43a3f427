-- What the saga coordinator needs to drive a saga: its whole state, and when it runs next.
ALTER TABLE sagas ADD COLUMN data jsonb;
ALTER TABLE sagas ADD COLUMN next_attempt_at timestamptz;
CREATE INDEX sagas_due ON sagas (next_attempt_at) WHERE next_attempt_at IS NOT NULL;

-- A notification's payload, kept with its record so that a retry sends the same thing.
ALTER TABLE notifications ADD COLUMN payload jsonb;
ALTER TABLE notifications ADD COLUMN sent_at timestamptz;
