"""The ERP writers against a real ERP stand-in (the simulator, or a test's own): every order
answered 202 reaches the ERP exactly once by its key, nothing is left in the buffer, and no
second of ERP traffic exceeds rate + burst, whatever the ERP does (429 storms, outages), and
with two gateways sharing one limit."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.http.state import ERP_FLOW
from tests.conftest import auth, make_settings
from tests.erp_flow import (
    all_accepted,
    busiest_second,
    erp_sim,
    gateway,
    place,
    received,
)
from tests.helpers import eventually, stock


async def test_orders_reach_the_erp_once_within_rate_and_burst(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    async with (
        erp_sim() as sim,
        gateway(
            redis_url, postgres_dsn, str(sim.make_url("")), erp_rate_per_second=20, erp_burst=5
        ) as client,
    ):
        await stock(client, A__L1=1000)
        await asyncio.gather(*(place(client, f"o{i}", customer=f"c{i % 7}") for i in range(60)))
        started = time.monotonic()
        await all_accepted(sim, pg, 60, within=10)
        # 60 orders at 20/s after a burst of 5: about 2.75 s; never faster than the limit.
        assert time.monotonic() - started >= 2.0
        assert await busiest_second(sim) <= 25
        view = await (await client.get("/v1/orders/o3", headers=auth("storefront"))).json()
        assert view["status"] == "accepted"
        assert view["erp_order_id"].startswith("ERP-")
        assert view["attempts"] == 1
        assert "accepted_at" in view


async def test_the_bucket_names_when_its_next_token_is_whole(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis
) -> None:
    """With a burst of one the bucket holds a single token, so a writer that asks late loses
    the time it is late: an answer names when the next token is whole, to the fraction of a
    millisecond, whether it granted fewer than asked or none; asking then is granted. (No
    writer runs here: no ERP is set.)"""
    settings = make_settings(
        redis_url, postgres_dsn, erp_url="", erp_rate_per_second=10, erp_burst=1
    )
    async with TestClient(TestServer(create_app(settings))) as client:
        flow = client.app[ERP_FLOW]
        some = await flow.acquire(2, "a", 5000)
        assert (some.granted, some.reason) == (1, "ok")
        assert 0.099 < some.wait_seconds <= 0.1  # the bucket is empty: 100 ms of the rate
        none = await flow.acquire(1, "b", 5000)
        assert (none.granted, none.reason) == (0, "rate")
        assert 0 < none.wait_seconds < some.wait_seconds
        await asyncio.sleep(none.wait_seconds + 0.002)
        assert (await flow.acquire(1, "c", 5000)).granted == 1
        after = await flow.acquire(1, "d", 5000)  # ... and none is left before the next
        assert after.granted == 0
        assert after.wait_seconds > 0.09


async def test_a_429_storm_slows_the_writers_and_loses_nothing(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    async with (
        erp_sim(rate_limit_per_second=8) as sim,
        gateway(
            redis_url, postgres_dsn, str(sim.make_url("")), erp_rate_per_second=40, erp_burst=5
        ) as client,
    ):
        await stock(client, A__L1=1000)
        await asyncio.gather(*(place(client, f"s{i}", customer=f"c{i}") for i in range(40)))
        got = await all_accepted(sim, pg, 40, within=20)
        assert got["rejected_429"] > 0
        state = await client.app[ERP_FLOW].state()
        assert state.effective_rate < 40  # the writers slowed down on their own


async def test_an_erp_outage_opens_the_breaker_and_the_flow_resumes_after(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    async with (
        erp_sim(outage=True) as sim,
        gateway(redis_url, postgres_dsn, str(sim.make_url("")), erp_timeout_seconds=1) as client,
    ):
        await stock(client, A__L1=100)
        await asyncio.gather(*(place(client, f"d{i}", customer=f"c{i}") for i in range(10)))
        flow = client.app[ERP_FLOW]

        async def throttled_or_open() -> bool:
            return (await received(sim))["errors_503"] > 0

        await eventually(throttled_or_open, 5, "the writers tried the ERP while it was down")
        assert (await received(sim))["accepted"] == 0
        queued = await pg.fetchval("SELECT count(*) FROM orders WHERE status <> 'accepted'")
        assert queued == 10
        await sim.put("/_sim/knobs", json={"outage": False})
        await all_accepted(sim, pg, 10, within=15)
        assert (await flow.state()).breaker == "closed"


async def test_failing_erp_opens_the_breaker_and_a_refusal_dead_letters(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    """A test's own ERP: 500 for every order of customer 'bad', 422 for 'refused'."""
    calls: list[str] = []

    async def orders(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append(request.headers["Idempotency-Key"])
        if body["customer_id"] == "refused":
            return web.json_response({"error": "no such customer"}, status=422)
        return web.json_response({"error": "boom"}, status=500)

    app = web.Application()
    app.router.add_post("/orders", orders)
    async with (
        TestClient(TestServer(app)) as erp,
        gateway(redis_url, postgres_dsn, str(erp.make_url("")), erp_max_attempts=3) as client,
    ):
        await stock(client, A__L1=100)
        await place(client, "refused-1", customer="refused")
        await place(client, "bad-1", customer="bad")

        async def settled() -> bool:
            statuses = dict(await pg.fetch("SELECT order_id, status FROM orders"))
            return statuses == {"refused-1": "failed", "bad-1": "failed"}

        await eventually(settled, 15, "both orders dead-lettered")
        assert calls.count("refused-1") == 1  # a 4xx is permanent: no retry
        assert calls.count("bad-1") == 3  # GATEWAY_ERP_MAX_ATTEMPTS
        view = await (await client.get("/v1/orders/bad-1", headers=auth("storefront"))).json()
        assert view["status"] == "failed"
        assert "500" in view["last_error"]


async def test_two_gateways_share_one_limit(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    async with erp_sim() as sim:
        url = str(sim.make_url(""))
        limits = {"erp_rate_per_second": 10, "erp_burst": 2}
        async with (
            gateway(redis_url, postgres_dsn, url, **limits) as one,
            gateway(redis_url, postgres_dsn, url, **limits) as two,
        ):
            await stock(one, A__L1=1000)
            await asyncio.gather(
                *(place(one if i % 2 else two, f"t{i}", customer=f"c{i}") for i in range(36))
            )
            await all_accepted(sim, pg, 36, within=10)
            assert await busiest_second(sim) <= 12
