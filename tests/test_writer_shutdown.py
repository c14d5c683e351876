"""Writers on a graceful stop (what SIGTERM does: the app's cleanup): the sends in flight finish
and their outcomes are recorded, so no order is left ``sending`` under a lease and none reaches
the ERP twice when another gateway takes over."""

from __future__ import annotations

import asyncio

import asyncpg
import redis.asyncio as aioredis

from tests.erp_flow import all_accepted, erp_sim, gateway, place, received
from tests.helpers import eventually, stock


async def test_a_stopping_gateway_finishes_its_sends_and_records_them(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    async with erp_sim(latency_ms=800) as sim:
        erp = str(sim.make_url(""))
        async with gateway(redis_url, postgres_dsn, erp, erp_rate_per_second=100) as client:
            await stock(client, A__L1=100)
            await asyncio.gather(*(place(client, f"t{i}", customer=f"c{i}") for i in range(12)))

            async def sending() -> bool:
                n = await pg.fetchval("SELECT count(*) FROM orders WHERE status = 'sending'")
                return bool(n > 0)

            await eventually(sending, 5, "orders in flight to the slow ERP")
        # Stopped mid-flight: what was in flight was answered and recorded before the end.
        assert await pg.fetchval("SELECT count(*) FROM orders WHERE status = 'sending'") == 0
        accepted = await pg.fetchval("SELECT count(*) FROM orders WHERE status = 'accepted'")
        assert accepted == (await received(sim))["accepted"] > 0
        # Another gateway takes the rest; nothing is sent twice.
        async with gateway(redis_url, postgres_dsn, erp, erp_rate_per_second=100):
            await all_accepted(sim, pg, 12, within=15)
