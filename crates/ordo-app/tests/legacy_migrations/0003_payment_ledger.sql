-- The simulated payment gateway's ledger: one row per order, what was authorised and refunded.
-- A refund is also a barrier: an authorisation that arrives after the refund (a late retry) is
-- declined, so a compensated order can never end up charged.
CREATE TABLE payments (
    order_id       text PRIMARY KEY,
    amount_cents   bigint NOT NULL,
    authorized_at  timestamptz,
    refunded_at    timestamptz
);
