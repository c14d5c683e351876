"""The availability store: apply_events.lua's replies come back typed, per SKU, in call order."""

from __future__ import annotations

import redis.asyncio as aioredis

from gateway.adapters.redis import RedisPort
from gateway.adapters.scripts import ScriptRegistry
from gateway.atp import keys
from gateway.atp.store import ApplyCall, AtpStore, Shortfall, SkuOutcome

HOUR_US = str(3600 * 1_000_000)


async def test_apply_events_answers_typed_outcomes(redis_url: str, redis: aioredis.Redis) -> None:
    await redis.hset(keys.position("T2"), keys.figure_fields("L")[1], 5)  # reserved 5
    seconds = int((await redis.time())[0])
    now_us, later_us = str(seconds * 1_000_000), str(seconds * 1_000_000 + 1)
    port = RedisPort.from_url(redis_url, cluster=False)
    try:
        store = AtpStore(ScriptRegistry(port, "gateway.atp"))
        sku_1 = [
            keys.position("T1"),
            keys.event_ids("T1"),
            keys.adjustments("T1", "L"),
            keys.accepted_commitments("T1", "L"),
        ]
        sku_2 = [
            keys.position("T2"),
            keys.event_ids("T2"),
            keys.adjustments("T2", "L"),
            keys.accepted_commitments("T2", "L"),
        ]
        snapshot = ["1", "s", now_us, "e1", "3"]
        outcomes = await store.apply_events(
            [
                # Two SKUs in one call, the first with an event delivered twice.
                ApplyCall(
                    [*sku_1, *sku_2],
                    [HOUR_US, "1", "2", "L", *snapshot, *snapshot, "1", "1", "L", *snapshot],
                ),
                ApplyCall(sku_1, [HOUR_US, "1", "1", "L", "1", "a", later_us, "e2", "4"]),
            ]
        )
        assert outcomes == [
            SkuOutcome(codes=[0, 1], shortfalls=[]),
            SkuOutcome(codes=[0], shortfalls=[Shortfall("L", 2)]),
            SkuOutcome(codes=[0], shortfalls=[]),
        ]
        assert await redis.hget(keys.position("T1"), keys.figure_fields("L")[0]) == "7"
    finally:
        await port.close()


async def test_swap_config_marker_is_a_compare_and_set(
    redis_url: str, redis: aioredis.Redis
) -> None:
    port = RedisPort.from_url(redis_url, cluster=False)
    try:
        store = AtpStore(ScriptRegistry(port, "gateway.atp"))
        await redis.set(keys.CONFIG_MARKER, "3")
        assert await store.swap_config_marker("3", "4") is True
        assert await redis.get(keys.CONFIG_MARKER) == "4"
        # Another writer came in between: nobody can vouch for the copy any more.
        assert await store.swap_config_marker("3", "5") is False
        assert await redis.get(keys.CONFIG_MARKER) == "dirty"
    finally:
        await port.close()
