-- What ops set for the ERP flow, the record every gateway's Redis copy must match: one row,
-- absent until the first change (until then each gateway runs on its GATEWAY_ERP_* defaults).
-- version grows by one with every change; the Redis copy carries the version it reflects, so a
-- gateway tells whether Redis still holds the record by comparing two numbers.
CREATE TABLE IF NOT EXISTS erp_limits (
    singleton        boolean          PRIMARY KEY DEFAULT true CHECK (singleton),
    version          bigint           NOT NULL,
    rate_per_second  double precision NOT NULL CHECK (rate_per_second > 0),
    burst            integer          NOT NULL CHECK (burst >= 1),
    max_concurrency  integer          NOT NULL CHECK (max_concurrency >= 1),
    paused           boolean          NOT NULL DEFAULT false,
    updated_at       timestamptz      NOT NULL DEFAULT now()
);

-- Every ops change, written in the transaction of the change itself: who (the first 16 hex
-- digits of the SHA-256 of the caller's key, never the key), which request, and the state
-- before and after (for a replay: what was replayed and what was not a dead letter).
CREATE TABLE IF NOT EXISTS ops_audit (
    id               bigserial   PRIMARY KEY,
    at               timestamptz NOT NULL DEFAULT now(),
    action           text        NOT NULL,
    key_fingerprint  text        NOT NULL,
    request_id       text        NOT NULL,
    before           jsonb,
    after            jsonb
);
