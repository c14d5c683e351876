-- What an order commits keeps counting against availability after the ERP accepted it, until a
-- stock snapshot of its position that occurred at or after the acceptance (Redis clears it then).
--   commitment  open (counts; the acceptance, if any, is not in Redis yet)
--               | waiting (the ERP accepted it; Redis waits for a snapshot)
--               | cleared (a snapshot includes it: it counts no more)
-- Redis's copy is rebuilt from here when Redis lost its data (gateway.buffering.commitments).
ALTER TABLE orders ADD COLUMN IF NOT EXISTS commitment text NOT NULL DEFAULT 'open'
    CHECK (commitment IN ('open', 'waiting', 'cleared'));

-- The settler's work list and the "waiting for a snapshot" figures.
CREATE INDEX IF NOT EXISTS orders_commitment_accepted ON orders (seq)
    WHERE status = 'accepted' AND commitment <> 'cleared';
-- What a restore puts back: every moved hold not cleared yet.
CREATE INDEX IF NOT EXISTS orders_commitment_counting ON orders (seq)
    WHERE hold_state = 'moved' AND commitment <> 'cleared';
