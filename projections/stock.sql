-- The stock view: one row per SKU, and the projection's checkpoint.
CREATE TABLE IF NOT EXISTS stock (
    sku         text PRIMARY KEY,
    on_hand     bigint NOT NULL,
    reserved    bigint NOT NULL,
    available   bigint GENERATED ALWAYS AS (on_hand - reserved) STORED,
    version     bigint NOT NULL,
    updated_at  timestamptz NOT NULL,
    last_seq    bigint NOT NULL,
    CHECK (0 <= reserved AND reserved <= on_hand)
);

CREATE TABLE IF NOT EXISTS checkpoints (
    stream          text PRIMARY KEY,
    seq             bigint NOT NULL,
    -- When the stream the view was built from was created: a view never follows another stream
    -- (one recreated under the same name would restart at sequence 1, below the checkpoint).
    stream_created  timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
