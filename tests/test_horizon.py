"""Memory stays bounded: what falls behind the horizon is folded, and older events are stale."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis

from gateway.adapters.redis import RedisPort
from gateway.adapters.scripts import ScriptRegistry
from gateway.atp import keys
from gateway.atp.events import EventApplier
from tests.helpers import stock_event


async def test_fold_at_horizon(redis_url: str, redis: aioredis.Redis) -> None:
    port = RedisPort.from_url(redis_url, cluster=False)
    applier = EventApplier(ScriptRegistry(port, "gateway.atp"), horizon_seconds=1)
    try:
        now = datetime.now(UTC)
        first = await applier.apply(
            [
                stock_event("s", "snapshot", 10, now - timedelta(milliseconds=500)),
                stock_event("a1", "adjustment", 5, now - timedelta(milliseconds=400)),
                stock_event("too-old", "adjustment", 100, now - timedelta(seconds=5)),
            ]
        )
        assert (first.applied, first.stale) == (2, 1)
        assert await redis.zcard(keys.adjustments("H", "L")) == 1
        await asyncio.sleep(1.2)
        later = datetime.now(UTC)
        second = await applier.apply(
            [
                stock_event("a2", "adjustment", 3, later),
                # Redelivered after the horizon: its id is gone, but it is stale, not applied again.
                stock_event("a1", "adjustment", 5, now - timedelta(milliseconds=400)),
                # A snapshot older than the horizon cannot override the folded checkpoint.
                stock_event("s-old", "snapshot", 999, now - timedelta(milliseconds=300)),
            ]
        )
        assert (second.applied, second.duplicate, second.stale) == (1, 0, 2)
        position = await redis.hgetall(keys.position("H"))
        assert position["oh:L"] == "18"
        assert position["b:L"] == "15"  # snapshot 10 + folded adjustment 5
        assert await redis.zcard(keys.adjustments("H", "L")) == 1
        assert await redis.zrange(keys.event_ids("H"), 0, -1) == ["a2"]
        # A snapshot after the fold still wins over everything before it.
        third = await applier.apply(
            [stock_event("s2", "snapshot", 7, later + timedelta(milliseconds=1))]
        )
        assert third.applied == 1
        assert await redis.hget(keys.position("H"), "oh:L") == "7"
    finally:
        await port.close()
