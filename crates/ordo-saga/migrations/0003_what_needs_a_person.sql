-- What the console's home page and the operators' queries look for: the sagas stuck undoing
-- their steps and the notifications given up on, oldest first. Both are a handful of rows in a
-- table of every order ever placed: partial indexes hold just those.
CREATE INDEX IF NOT EXISTS sagas_compensation_stuck ON sagas (updated_at)
    WHERE state = 'compensation_stuck';
CREATE INDEX IF NOT EXISTS notifications_dead_lettered ON notifications (recorded_at)
    WHERE status = 'dead_lettered';
