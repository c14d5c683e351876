"""Synthetic stock events for the ingest benchmarks: unique ids, many SKUs and locations.

Nine in ten events are adjustments on (sku, location) pairs that never get a snapshot; the rest are
snapshots, each on a pair of its own. Under the event rule none of them can be stale or a
duplicate, whatever order batches and partitions are applied in, so every event must be applied
and ``applied / elapsed`` is the ingest rate.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

SNAPSHOT_EVERY = 10


def make_events(
    count: int,
    *,
    prefix: str,
    skus: int = 10_000,
    locations: int = 20,
    seed: int = 1,
    start: int = 0,
) -> list[dict[str, Any]]:
    """Events ``start .. start + count - 1`` of a deterministic stream; ``prefix`` keeps streams
    of different runs or transports apart (event ids and SKU names)."""
    rng = random.Random(seed * 1_000_003 + start)
    base = datetime.now(UTC) - timedelta(minutes=30)
    # A few distinct timestamps are enough (the rule cannot make these events stale), and
    # formatting one per event would dominate building 300k of them.
    stamps = [(base + timedelta(milliseconds=k)).isoformat() for k in range(1000)]
    out: list[dict[str, Any]] = []
    for i in range(start, start + count):
        sku = f"{prefix}SKU-{rng.randrange(skus):05d}"
        if i % SNAPSHOT_EVERY == 0:
            event = {
                "event_id": f"{prefix}e{i}",
                "type": "snapshot",
                "sku": sku,
                "location": f"S{i}",  # a pair of its own: one snapshot per pair
                "quantity": rng.randrange(0, 500),
                "occurred_at": stamps[i % 1000],
            }
        else:
            event = {
                "event_id": f"{prefix}e{i}",
                "type": "adjustment",
                "sku": sku,
                "location": f"L{rng.randrange(locations):02d}",
                "quantity": rng.choice((-3, -2, -1, 1, 2, 5)),
                "occurred_at": stamps[i % 1000],
            }
        out.append(event)
    return out


def batch_bodies(events: list[dict[str, Any]], batch_size: int) -> list[bytes]:
    """``POST /v1/stock-events`` bodies of ``batch_size`` events each."""
    return [
        orjson.dumps({"events": events[i : i + batch_size]})
        for i in range(0, len(events), batch_size)
    ]
