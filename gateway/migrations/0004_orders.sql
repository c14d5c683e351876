-- The order buffer (outbox): one row per confirmed order, committed before the order is
-- acknowledged, drained to the ERP by the writers of every gateway.
--   status      queued (waiting its turn) | sending (claimed by a writer until lease_until)
--               | accepted (the ERP has it) | failed (dead-lettered; last_error says why)
--   hold_state  pending (the row is committed, the Redis hold not yet moved to committed)
--               | moved (the hold counts as committed)
-- seq gives the confirm order: orders of one customer go to the ERP in it.
CREATE TABLE IF NOT EXISTS orders (
    order_id        text        PRIMARY KEY,
    seq             bigserial   NOT NULL UNIQUE,
    reservation_id  text        NOT NULL UNIQUE,
    customer_id     text,
    body            bytea       NOT NULL,
    lines           jsonb       NOT NULL,
    status          text        NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'sending', 'accepted', 'failed')),
    hold_state      text        NOT NULL DEFAULT 'pending'
                    CHECK (hold_state IN ('pending', 'moved')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,
    last_error      text,
    erp_order_id    text,
    accepted_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- What the writers claim next, and what the buffer's depth and age are read from.
CREATE INDEX IF NOT EXISTS orders_waiting ON orders (seq) WHERE status IN ('queued', 'sending');
-- An earlier order of the same customer still waiting holds a later one back.
CREATE INDEX IF NOT EXISTS orders_customer_waiting ON orders (customer_id, seq)
    WHERE status IN ('queued', 'sending');
-- Rows whose Redis half is not done yet: the mender's work list.
CREATE INDEX IF NOT EXISTS orders_hold_pending ON orders (created_at) WHERE hold_state = 'pending';
-- Dead letters (ops lists them) and what left the buffer lately (its drain rate).
CREATE INDEX IF NOT EXISTS orders_failed ON orders (seq) WHERE status = 'failed';
CREATE INDEX IF NOT EXISTS orders_settled ON orders (updated_at)
    WHERE status IN ('accepted', 'failed');
