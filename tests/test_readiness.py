"""Readiness names the dependency that is down, and recovers when it comes back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.dev.services import start_redis
from gateway.lifecycle import Readiness
from tests.conftest import auth, make_settings
from tests.proxy import TcpProxy


@contextlib.asynccontextmanager
async def app_client(**overrides: Any) -> AsyncIterator[TestClient[Any, Any]]:
    settings = make_settings(**overrides)
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


async def test_redis_down_then_back(postgres_dsn: str, pg: asyncpg.Connection) -> None:
    url, proc = start_redis()
    port = int(urlsplit(url).port or 0)
    try:
        async with app_client(redis_url=url, postgres_dsn=postgres_dsn) as client:
            assert (await client.get("/readyz")).status == 200
            proc.terminate()
            await asyncio.to_thread(proc.wait, 5)
            resp = await client.get("/readyz")
            assert resp.status == 503
            body = await resp.json()
            assert body["code"] == "not_ready"
            assert "redis" in body["detail"]
            assert "postgres" not in body["detail"]
            assert body["checks"]["redis"].startswith("down")
            assert body["checks"]["postgres"] == "up"
            # Requests that need Redis answer 503, not 500, while it is down.
            read = await client.get("/v1/availability?sku=A&location=L", headers=auth("storefront"))
            assert read.status == 503
            assert (await read.json())["code"] == "dependency_unavailable"
            assert (await client.get("/healthz")).status == 200
            _, proc = start_redis(port)
            for _ in range(50):
                if (await client.get("/readyz")).status == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await client.get("/readyz")).status == 200
            # The read path reconnects by itself.
            read = await client.get("/v1/availability?sku=A&location=L", headers=auth("storefront"))
            assert read.status == 200
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 5)


async def test_postgres_down(
    redis_url: str, redis: aioredis.Redis, postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    target = urlsplit(postgres_dsn)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    dsn = postgres_dsn.replace(f":{target.port}/", f":{proxy.port}/")
    async with app_client(redis_url=redis_url, postgres_dsn=dsn) as client:
        assert (await client.get("/readyz")).status == 200
        await proxy.cut()
        resp = await client.get("/readyz")
        assert resp.status == 503
        body = await resp.json()
        assert "postgres" in body["detail"]
        assert "redis" not in body["detail"]
        assert body["checks"]["redis"] == "up"
        assert body["gates"]["postgres"].startswith("down")
        # Reads do not depend on PostgreSQL and keep working.
        read = await client.get("/v1/availability?sku=A&location=L", headers=auth("storefront"))
        assert read.status == 200
        await proxy.heal()
        for _ in range(50):
            if (await client.get("/readyz")).status == 200:
                break
            await asyncio.sleep(0.1)
        assert (await client.get("/readyz")).status == 200
    await proxy.close()


async def test_a_check_slow_to_unwind_does_not_hold_the_answer() -> None:
    """A client library may take long to unwind a cancelled call (asyncpg did, against a
    stalled server): the answer comes at the timeout anyway, concurrent requests share the
    check still running instead of stacking more, and shutdown reaps it."""
    unwind = asyncio.Event()
    started = 0

    async def stuck() -> None:
        nonlocal started
        started += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await unwind.wait()
            raise

    async def fine() -> None:
        return None

    readiness = Readiness({"stuck": stuck, "fine": fine}, timeout=0.2)
    began = asyncio.get_running_loop().time()
    answers = await asyncio.gather(*(readiness.check() for _ in range(5)))
    assert asyncio.get_running_loop().time() - began < 0.2 + 0.3
    for answer in answers:
        assert answer["fine"] == "up"
        assert answer["stuck"].startswith("down")
    assert (await readiness.check())["stuck"].startswith("down")
    assert started == 1
    unwind.set()
    await readiness.close()
