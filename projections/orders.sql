-- The orders view: one row per order, its lines, and the projection's checkpoint.
-- Applied to the projection's own schema (search_path), so that a rebuild can fill a fresh
-- schema and swap it in. Idempotent: every statement may run again.
CREATE TABLE IF NOT EXISTS orders (
    order_id      text PRIMARY KEY,
    customer_id   text NOT NULL,
    status        text NOT NULL,
    currency      text NOT NULL,
    total_cents   bigint NOT NULL,
    reason        text,
    version       bigint NOT NULL,
    -- The stream sequence of OrderPlaced: the keyset of paging, stable under inserts.
    placed_seq    bigint NOT NULL UNIQUE,
    placed_at     timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    last_seq      bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_by_customer ON orders (customer_id, placed_seq);
CREATE INDEX IF NOT EXISTS orders_by_status ON orders (status, placed_seq);

CREATE TABLE IF NOT EXISTS order_lines (
    order_id          text NOT NULL REFERENCES orders ON DELETE CASCADE,
    line_no           integer NOT NULL,
    sku               text NOT NULL,
    qty               bigint NOT NULL,
    unit_price_cents  bigint NOT NULL,
    PRIMARY KEY (order_id, line_no)
);

CREATE TABLE IF NOT EXISTS checkpoints (
    stream          text PRIMARY KEY,
    seq             bigint NOT NULL,
    -- When the stream the view was built from was created: a view never follows another stream
    -- (one recreated under the same name would restart at sequence 1, below the checkpoint).
    stream_created  timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
