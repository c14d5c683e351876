-- One row per Kafka message that was not a valid event, keyed by its source offset: the consumer
-- checks it before writing a dead letter (a replayed offset is not dead-lettered twice) and writes
-- it once the dead letter is written. Where the dead letter went:
--   dlq            <topic>.dlq holds it whole; key, value and headers are not repeated here
--   dlq_truncated  <topic>.dlq holds a bounded copy; the original is here whole
--   postgres       the DLQ would not take it; this row is the only copy
-- Rows are never needed once the source offset is older than the source topic's retention, and
-- may be deleted then.
CREATE TABLE IF NOT EXISTS kafka_dead_letters (
    source_topic      text        NOT NULL,
    source_partition  integer     NOT NULL,
    source_offset     bigint      NOT NULL,
    destination       text        NOT NULL
                      CHECK (destination IN ('dlq', 'dlq_truncated', 'postgres')),
    reason            text        NOT NULL,
    -- Where the dead letter landed in <topic>.dlq (null for destination 'postgres').
    dlq_partition     integer,
    dlq_offset        bigint,
    key               bytea,
    value             bytea,
    -- Kafka headers, in order: names (UTF-8) and values side by side; a value may be null.
    header_names      bytea[],
    header_values     bytea[],
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_topic, source_partition, source_offset)
);

-- "What did the DLQ not take" is the question an operator asks first.
CREATE INDEX IF NOT EXISTS kafka_dead_letters_destination
    ON kafka_dead_letters (destination, recorded_at)
    WHERE destination <> 'dlq';
