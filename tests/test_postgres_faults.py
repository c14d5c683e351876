"""PostgreSQL down or stalled: every ops write answers 503 with the right code within the
configured timeout plus one second, round after round; after recovery the record and the Redis
copy agree with what the answers said. A real PostgreSQL behind a proxy the test cuts or
black-holes (a stalled server: connections accepted, nothing answered)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from gateway.adapters.postgres import POOL_SIZE
from gateway.app import create_app
from gateway.devservices import start_redis
from gateway.http.state import POSTGRES
from tests.conftest import auth, make_settings
from tests.proxy import TcpProxy

TIMEOUT = 0.5
BOUND = TIMEOUT + 1.0
Client = TestClient[Any, Any]


@contextlib.asynccontextmanager
async def proxied(url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A proxy in front of the server of ``url``, and ``url`` rewritten to go through it."""
    target = urlsplit(url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 0)
    await proxy.start()
    try:
        yield proxy, url.replace(f":{target.port}/", f":{proxy.port}/", 1)
    finally:
        await proxy.close()


@contextlib.asynccontextmanager
async def gateway(**overrides: Any) -> AsyncIterator[Client]:
    settings = make_settings(postgres_timeout_seconds=TIMEOUT, **overrides)
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


async def timed(client: Client, method: str, path: str, **kwargs: Any) -> tuple[int, str, float]:
    """(status, problem code or "", seconds), asserting 503s carry Retry-After."""
    started = time.monotonic()
    resp = await client.request(method, path, headers=auth("ops"), **kwargs)
    elapsed = time.monotonic() - started
    code = ""
    if resp.status >= 400:
        code = (await resp.json())["code"]
    if resp.status == 503:
        assert resp.headers.get("Retry-After"), (method, path)
    return resp.status, code, elapsed


def put_group(client: Client, group: str, *locations: str) -> Any:
    return timed(client, "PUT", f"/v1/location-groups/{group}", json={"locations": locations})


def put_safety(client: Client, location: str, quantity: int) -> Any:
    return timed(
        client,
        "PUT",
        "/v1/safety-stock",
        json={"items": [{"location": location, "quantity": quantity}]},
    )


async def wait_ready(client: Client, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if (await client.get("/readyz")).status == 200:
            return
        await asyncio.sleep(0.1)
    last = await (await client.get("/readyz")).text()
    raise AssertionError(f"not ready within {within}s: {last}")


async def eventually_group(client: Client, group: str, locations: list[str]) -> None:
    """The Redis copy shows ``locations`` for ``group`` within a few seconds."""
    deadline = time.monotonic() + 5
    got: Any = None
    while time.monotonic() < deadline:
        resp = await client.get(f"/v1/location-groups/{group}", headers=auth("ops"))
        got = (resp.status, await resp.json())
        if resp.status == 200 and got[1]["locations"] == locations:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{group} never showed {locations}: last {got}")


async def record(pg: asyncpg.Connection, group: str) -> tuple[list[str] | None, int | None]:
    locations = await pg.fetchval(
        "SELECT locations FROM location_groups WHERE group_name = $1", group
    )
    quantity = await pg.fetchval(
        "SELECT quantity FROM safety_stock WHERE location = 'PF-L1' AND sku = ''"
    )
    return locations, quantity


async def fault_rounds(client: Client) -> None:
    """Two rounds of concurrent ops writes and reads while PostgreSQL fails: every write is 503
    ``dependency_unavailable`` (nothing applied) within the bound; reads, which need only Redis,
    still answer 200."""
    for _ in range(2):
        answers = await asyncio.gather(
            *(put_group(client, "pf", f"B{i}") for i in range(4)),
            *(put_safety(client, "PF-L1", 50 + i) for i in range(4)),
        )
        for status, code, elapsed in answers:
            assert (status, code) == (503, "dependency_unavailable")
            assert elapsed < BOUND, elapsed
        status, _, elapsed = await timed(client, "GET", "/v1/location-groups/pf")
        assert status == 200
        assert elapsed < BOUND, elapsed


@pytest.mark.parametrize("fault", ["down", "stalled"])
async def test_ops_writes_while_postgres_fails(
    fault: str, redis_url: str, redis: aioredis.Redis, postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    async with (
        proxied(postgres_dsn) as (proxy, dsn),
        gateway(redis_url=redis_url, postgres_dsn=dsn) as client,
    ):
        assert (await put_group(client, "pf", "A"))[:2] == (200, "")
        assert (await put_safety(client, "PF-L1", 1))[:2] == (200, "")
        if fault == "down":
            await proxy.cut()
        else:
            proxy.blackhole()
        await fault_rounds(client)
        await proxy.heal()
        await wait_ready(client)
        # Nothing answered 503 dependency_unavailable was applied, to the record or the copy.
        assert await record(pg, "pf") == (["A"], 1)
        await eventually_group(client, "pf", ["A"])
        # And the pool works again: no connection stayed stuck.
        for n in range(12):
            assert (await put_group(client, "pf", f"C{n}"))[:2] == (200, "")
        await eventually_group(client, "pf", ["C11"])


async def test_readyz_answers_in_time_while_postgres_is_stalled(
    redis_url: str, redis: aioredis.Redis, postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    async with (
        proxied(postgres_dsn) as (proxy, dsn),
        gateway(redis_url=redis_url, postgres_dsn=dsn) as client,
    ):
        assert (await client.get("/readyz")).status == 200
        proxy.blackhole()
        for _ in range(4):
            started = time.monotonic()
            resp = await client.get("/readyz")
            elapsed = time.monotonic() - started
            assert elapsed < 1.0 + 0.5, elapsed
            assert resp.status == 503
            body = await resp.json()
            assert "postgres" in body["detail"]
            assert "redis" not in body["detail"]
            assert body["checks"]["redis"] == "up"
            assert body["checks"]["postgres"].startswith("down")
            assert body["gates"]["postgres"].startswith("down")
        await proxy.heal()
        await wait_ready(client)


async def test_commit_sent_and_not_answered_is_outcome_unknown(
    redis_url: str, redis: aioredis.Redis, postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    async with (
        proxied(postgres_dsn) as (proxy, dsn),
        gateway(redis_url=redis_url, postgres_dsn=dsn) as client,
    ):
        assert (await put_group(client, "pf", "A"))[:2] == (200, "")
        # PostgreSQL stalls right after it was sent the COMMIT: it may or may not run it.
        proxy.blackhole_on(b"COMMIT;\x00")
        status, code, elapsed = await put_group(client, "pf", "D")
        assert (status, code) == (503, "outcome_unknown")
        assert elapsed < BOUND
        # Meanwhile PostgreSQL is known stalled: the next write fails at once, unapplied.
        status, code, elapsed = await put_group(client, "pf", "E")
        assert (status, code) == (503, "dependency_unavailable")
        assert elapsed < 0.2
        await proxy.heal()  # the held COMMIT runs: the write of the unknown outcome is applied
        await wait_ready(client)
        assert (await record(pg, "pf"))[0] == ["D"]
        # ...and the Redis copy follows the record without anyone writing again.
        await eventually_group(client, "pf", ["D"])


async def test_redis_half_failing_is_outcome_unknown_and_mended(
    postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    url, proc = start_redis()
    try:
        async with (
            proxied(url) as (proxy, redis_via_proxy),
            gateway(
                redis_url=redis_via_proxy, postgres_dsn=postgres_dsn, redis_timeout_seconds=TIMEOUT
            ) as client,
        ):
            assert (await put_group(client, "pf", "A"))[:2] == (200, "")
            # Redis stalls when it is sent the group's new copy: committed in PostgreSQL,
            # unconfirmed in Redis.
            proxy.blackhole_on(b"atp:lg:pf")
            status, code, _ = await put_group(client, "pf", "F")
            assert (status, code) == (503, "outcome_unknown")
            assert (await record(pg, "pf"))[0] == ["F"]
            await proxy.heal()
            await eventually_group(client, "pf", ["F"])
            direct = aioredis.Redis.from_url(url)
            try:
                version = await pg.fetchval("SELECT version FROM config_version")
                deadline = time.monotonic() + 5
                while await direct.get("atp:config:version") != str(version).encode():
                    assert time.monotonic() < deadline, "the copy was never vouched for"
                    await asyncio.sleep(0.1)
            finally:
                await direct.aclose()
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 5)


async def test_pool_exhausted_is_503_in_time(
    redis_url: str, redis: aioredis.Redis, postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    async with gateway(redis_url=redis_url, postgres_dsn=postgres_dsn) as client:
        db = client.server.app[POSTGRES]
        async with contextlib.AsyncExitStack() as held:
            for _ in range(POOL_SIZE):
                await held.enter_async_context(db.acquire())
            status, code, elapsed = await put_group(client, "pf", "X")
            assert (status, code) == (503, "dependency_unavailable")
            assert elapsed < BOUND
            assert db.gate.up  # busy is not down: the next request still tries
        assert (await put_group(client, "pf", "Y"))[:2] == (200, "")
        assert (await record(pg, "pf"))[0] == ["Y"]
