-- One row counting the writes of the ops configuration (location groups, safety stock). Every
-- write bumps it in its own transaction, and the Redis copy is stamped with the version it
-- reflects, so a gateway tells whether Redis still holds the record by comparing two numbers
-- (and copies the record back when they differ: Redis lost its data, or a write's Redis half
-- failed).
CREATE TABLE IF NOT EXISTS config_version (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version    bigint NOT NULL
);

INSERT INTO config_version (singleton, version) VALUES (true, 0) ON CONFLICT DO NOTHING;
