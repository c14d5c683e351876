-- Durable record of the ops configuration that availability reads from Redis.
-- Redis holds the hot copy; these tables let it be rebuilt after Redis loses its data.
CREATE TABLE IF NOT EXISTS location_groups (
    group_name  text PRIMARY KEY,
    locations   text[] NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- sku = '' is the location's default; a row for a sku wins over it.
CREATE TABLE IF NOT EXISTS safety_stock (
    location    text NOT NULL,
    sku         text NOT NULL DEFAULT '',
    quantity    bigint NOT NULL CHECK (quantity >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (location, sku)
);
