-- Sagas are claimed in batches and driven in memory: a claim leases the saga (its
-- next_attempt_at moves past the lease) and every write bumps `version`, so that a coordinator
-- whose lease ran out, or whose saga an order event changed meanwhile, cannot overwrite it.
ALTER TABLE sagas ADD COLUMN version bigint NOT NULL DEFAULT 0;
