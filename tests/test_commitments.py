"""Committed quantities after the confirm: they count until a snapshot of their position that
occurred at or after the ERP's acceptance, never on a timer; and they come back from the order
buffer when Redis loses its data (a real FLUSHALL)."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.adapters.lua import lua_source
from gateway.atp import keys as atp_keys
from gateway.reservation import keys as rsv_keys
from tests.conftest import auth
from tests.erp_flow import all_accepted, erp_sim, gateway, place
from tests.helpers import eventually, post_events

HOUR_US = 3600 * 1_000_000


def _script(name: str, package: str = "gateway.reservation") -> str:
    return lua_source(package, name)


async def _now_us(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1_000_000 + int(micros)


def _snapshot(event_id: str, qty: int, when: datetime, sku: str = "A") -> dict[str, Any]:
    return {
        "event_id": event_id,
        "type": "snapshot",
        "sku": sku,
        "location": "L1",
        "quantity": qty,
        "occurred_at": when.isoformat(),
    }


async def _available(client: Any, sku: str = "A") -> int:
    resp = await client.get(
        "/v1/availability", params={"sku": sku, "location": "L1"}, headers=auth("storefront")
    )
    body = await resp.json()
    assert resp.status == 200, body
    return int(body["items"][0]["available"])


# --- the scripts on their own ----------------------------------------------------------------


class Positions:
    """SKU A at L1: the scripts' keys, and a call for each script."""

    pos, holds = atp_keys.position("A"), rsv_keys.holds("A")
    ids, adj, acc = (
        atp_keys.event_ids("A"),
        atp_keys.adjustments("A", "L1"),
        atp_keys.accepted_commitments("A", "L1"),
    )

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def confirm(self, rid: str, qty: int) -> None:
        # What settle.lua leaves after a confirm (tested with the reservation scripts).
        await self.redis.hset(self.holds, rsv_keys.committed_field(rid), f"L1={qty}")
        await self.redis.hincrby(self.pos, "com:L1", qty)

    async def accept(self, rid: str, at_us: int) -> int:
        keys = [self.pos, self.holds, self.acc]
        return int(await self.redis.eval(_script("accept.lua"), 3, *keys, rid, at_us, "L1"))

    async def snapshot(self, event_id: str, qty: int, at_us: int) -> None:
        keys = [self.pos, self.ids, self.adj, self.acc]
        args = [HOUR_US, 1, 1, "L1", 1, "s", at_us, event_id, qty]
        await self.redis.eval(_script("apply_events.lua", "gateway.atp"), 4, *keys, *args)

    async def committed(self) -> int:
        return int(await self.redis.hget(self.pos, "com:L1") or 0)


async def test_a_confirm_keeps_a_committed_entry_the_acceptance_moves(
    redis: aioredis.Redis,
) -> None:
    p = Positions(redis)
    t = await _now_us(redis)
    await p.snapshot("s0", 10, t - 10)
    await p.confirm("r1", 3)
    assert await p.committed() == 3
    assert await p.accept("r1", t) == 1  # waits for a snapshot at or after t
    assert await redis.hget(p.holds, rsv_keys.committed_field("r1")) is None
    assert await redis.zrange(p.acc, 0, -1, withscores=True) == [("3|r1", float(t))]
    assert await p.accept("r1", t) == 1  # idempotent: the probe answers the same
    await p.snapshot("s1", 10, t - 1)  # before the acceptance: the ERP's count lacks it
    assert await p.committed() == 3
    await p.snapshot("s2", 7, t)  # at the acceptance: it includes it
    assert await p.committed() == 0
    assert await p.accept("r1", t) == 0
    assert await redis.zcard(p.acc) == 0


async def test_an_acceptance_after_its_snapshot_clears_at_once(redis: aioredis.Redis) -> None:
    p = Positions(redis)
    t = await _now_us(redis)
    await p.confirm("r1", 2)
    await p.snapshot("s1", 8, t + 5)  # the ERP counted the order before the gateway heard
    assert await p.accept("r1", t) == 0
    assert await p.committed() == 0


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    orders=st.lists(
        st.tuples(st.integers(1, 5), st.integers(0, 20)), min_size=1, max_size=8
    ),  # (units, acceptance time)
    snapshots=st.lists(st.integers(0, 25), max_size=5),  # snapshot times
    seed=st.integers(0, 2**32 - 1),
)
async def test_commitments_count_until_a_snapshot_after_their_acceptance(
    redis: aioredis.Redis,
    orders: list[tuple[int, int]],
    snapshots: list[int],
    seed: int,
) -> None:
    """In any order of acceptances and snapshots, each delivered more than once: committed is
    the sum of the orders no applied snapshot at or after their acceptance has seen."""
    await redis.flushdb()
    p = Positions(redis)
    base = await _now_us(redis) - 100
    for i, (units, _) in enumerate(orders):
        await p.confirm(f"r{i}", units)
    steps: list[tuple[str, int]] = [("accept", i) for i in range(len(orders))]
    steps += [("snapshot", i) for i in range(len(snapshots))]
    steps = steps * 2  # every message twice
    random.Random(seed).shuffle(steps)
    for kind, i in steps:
        if kind == "accept":
            await p.accept(f"r{i}", base + orders[i][1])
        else:
            await p.snapshot(f"s{i}", 100, base + snapshots[i])
    latest = max(snapshots, default=None)
    expected = sum(units for units, at in orders if latest is None or at > latest)
    assert await p.committed() == expected


# --- end to end ------------------------------------------------------------------------------


async def test_an_accepted_order_counts_until_a_snapshot_after_its_acceptance(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    async with (
        erp_sim() as sim,
        gateway(redis_url, postgres_dsn, str(sim.make_url(""))) as client,
    ):
        before = datetime.now(UTC) - timedelta(seconds=30)
        await post_events(client, [_snapshot("s0", 10, before)])
        await place(client, "o1")
        await all_accepted(sim, pg, 1, within=10)

        async def waiting() -> bool:
            state = await pg.fetchval("SELECT commitment FROM orders WHERE order_id = 'o1'")
            return bool(state == "waiting")

        await eventually(waiting, 5, "the acceptance reached Redis")
        assert await _available(client) == 9
        # A snapshot from before the acceptance does not include the order: it still counts.
        accepted_at = await pg.fetchval("SELECT accepted_at FROM orders WHERE order_id = 'o1'")
        await post_events(client, [_snapshot("s1", 10, accepted_at - timedelta(seconds=1))])
        assert await _available(client) == 9
        metrics = await (await client.get("/metrics")).text()
        assert "gateway_commitments_waiting 1.0" in metrics
        # The ERP's count at the acceptance includes it: committed no more.
        await post_events(client, [_snapshot("s2", 9, accepted_at)])
        assert await _available(client) == 9
        assert await redis.hget(atp_keys.position("A"), "com:L1") == "0"

        async def cleared() -> bool:
            state = await pg.fetchval("SELECT commitment FROM orders WHERE order_id = 'o1'")
            return bool(state == "cleared")

        await eventually(cleared, 5, "the ledger learnt the snapshot cleared it")


async def test_commitments_come_back_after_a_flushall(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    """Three orders: one the ERP accepted and a snapshot cleared, one accepted and waiting, one
    the ERP has not taken (paused writers: no ERP at all). After FLUSHALL the two that count are
    back, without anyone asking, and the cleared one is not."""
    async with (
        erp_sim() as sim,
        gateway(redis_url, postgres_dsn, str(sim.make_url(""))) as client,
    ):
        old = datetime.now(UTC) - timedelta(seconds=30)
        await post_events(client, [_snapshot("s0", 100, old)])
        await place(client, "cleared")
        await all_accepted(sim, pg, 1, within=10)
        at = await pg.fetchval("SELECT accepted_at FROM orders WHERE order_id = 'cleared'")
        await place(client, "waiting")
        await all_accepted(sim, pg, 2, within=10)

        async def settled() -> bool:
            states = dict(await pg.fetch("SELECT order_id, commitment FROM orders"))
            return states == {"cleared": "waiting", "waiting": "waiting"}

        await eventually(settled, 5, "both acceptances in Redis")
        # Cleared by a snapshot at its acceptance; "waiting" was accepted after that.
        await post_events(client, [_snapshot("s1", 99, at)])
        assert await redis.hget(atp_keys.position("A"), "com:L1") == "1"

    async with gateway(redis_url, postgres_dsn, "") as client:  # no writers: stays queued
        await place(client, "queued")
        assert await redis.hget(atp_keys.position("A"), "com:L1") == "2"

        async def cleared_in_ledger() -> bool:
            row = await pg.fetchval("SELECT commitment FROM orders WHERE order_id = 'cleared'")
            return bool(row == "cleared")

        await eventually(cleared_in_ledger, 5, "the ledger learnt what the snapshot cleared")
        await redis.flushall()

        async def restored() -> bool:
            return await redis.hget(atp_keys.position("A"), "com:L1") == "2"

        await eventually(restored, 5, "commitments restored from the order buffer")
        holds = await redis.hgetall(rsv_keys.holds("A"))
        assert list(holds) == [rsv_keys.committed_field("order:queued")]
        accepted = await redis.zrange(atp_keys.accepted_commitments("A", "L1"), 0, -1)
        assert accepted == ["1|order:waiting"]
        # The on-hand comes back with the next snapshot; what counts is taken off it.
        await post_events(client, [_snapshot("s2", 50, datetime.now(UTC) - timedelta(hours=1))])
        assert await _available(client) == 48
        metrics = await (await client.get("/metrics")).text()
        assert "gateway_commitments_restored_total" in metrics
        await asyncio.sleep(1.2)  # a second pass restores nothing twice
        assert await redis.hget(atp_keys.position("A"), "com:L1") == "2"
