"""Start-up with a dependency down does not crash-loop: the process serves ``/healthz``,
``/readyz`` names what is down, requests that need it answer 503, and it connects (migrates,
copies the location config to Redis) once the dependency is there. ``gateway migrate`` with
PostgreSQL unreachable is one line and a non-zero exit. Real ``gateway serve`` processes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from gateway.adapters.migrations import MIGRATION_LOCK_ID
from gateway.app import create_app
from gateway.dev.services import free_port, start_redis
from tests.conftest import auth, make_settings
from tests.gateway_proc import GatewayProcess
from tests.helpers import private_database
from tests.proxy import TcpProxy

TIMEOUTS = {"GATEWAY_REDIS_TIMEOUT_SECONDS": "0.5", "GATEWAY_POSTGRES_TIMEOUT_SECONDS": "0.5"}


class LiveProcess(GatewayProcess):
    """A gateway process that is only waited for until it serves ``/healthz``: its readiness
    is what the test looks at."""

    ready_path = "/healthz"


async def start(redis_url: str, postgres_dsn: str) -> LiveProcess:
    # In a thread: the test's event loop runs the proxy while the process starts.
    return await asyncio.to_thread(LiveProcess, redis_url, postgres_dsn, **TIMEOUTS)


async def get(http: aiohttp.ClientSession, url: str, role: str | None = None) -> tuple[int, Any]:
    headers = auth(role) if role else {}
    async with http.get(url, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def put_group(http: aiohttp.ClientSession, url: str, group: str, *members: str) -> Any:
    async with http.put(
        f"{url}/v1/location-groups/{group}", json={"locations": members}, headers=auth("ops")
    ) as resp:
        return resp.status, await resp.json(content_type=None)


async def until_ready(http: aiohttp.ClientSession, url: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status, body = await get(http, url + "/readyz")
        if status == 200:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not ready within {within}s: {body}")


async def not_ready_naming(http: aiohttp.ClientSession, url: str, down: str, up: str) -> None:
    assert (await get(http, url + "/healthz"))[0] == 200
    status, body = await get(http, url + "/readyz")
    assert status == 503
    assert down in body["detail"]
    assert up not in body["detail"]
    assert body["checks"][down].startswith("down")
    assert body["checks"][up] == "up"


async def test_starts_without_redis_and_connects_when_it_comes(
    postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    # The record holds a group that no Redis has a copy of yet.
    async with pg.transaction():
        await pg.execute(
            "INSERT INTO location_groups (group_name, locations) VALUES ('st-g', $1)",
            ["S1", "S2"],
        )
        await pg.execute("UPDATE config_version SET version = version + 1")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    gateway = await start(url, postgres_dsn)
    proc = None
    try:
        async with aiohttp.ClientSession() as http:
            await not_ready_naming(http, gateway.url, "redis", "postgres")
            status, body = await get(
                http, gateway.url + "/v1/availability?sku=A&location=L", "storefront"
            )
            assert (status, body["code"]) == (503, "dependency_unavailable")
            status, body = await get(http, gateway.url + "/v1/location-groups/st-g", "ops")
            assert (status, body["code"]) == (503, "dependency_unavailable")

            _, proc = await asyncio.to_thread(start_redis, port)
            await until_ready(http, gateway.url)
            # The config was copied from PostgreSQL when Redis came: no restart.
            deadline = time.monotonic() + 5
            while (
                status := (await get(http, gateway.url + "/v1/location-groups/st-g", "ops"))[0]
            ) != 200:
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.1)
            assert (await get(http, gateway.url + "/v1/location-groups/st-g", "ops"))[1][
                "locations"
            ] == ["S1", "S2"]
    finally:
        gateway.stop()
        if proc is not None:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 5)


@pytest.mark.parametrize("fault", ["down", "stalled"])
async def test_starts_without_postgres_and_connects_when_it_comes(
    fault: str, redis_url: str, postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    target = urlsplit(postgres_dsn)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432, listen_port=free_port())
    if fault == "stalled":
        await proxy.start()
        proxy.blackhole()
    dsn = postgres_dsn.replace(f":{target.port}/", f":{proxy.port}/", 1)
    gateway = await start(redis_url, dsn)
    try:
        async with aiohttp.ClientSession() as http:
            await not_ready_naming(http, gateway.url, "postgres", "redis")
            status, body = await put_group(http, gateway.url, "st-p", "P1")
            assert (status, body["code"]) == (503, "dependency_unavailable")
            # What needs only Redis is served.
            status, _ = await get(
                http, gateway.url + "/v1/availability?sku=A&location=L", "storefront"
            )
            assert status == 200

            await proxy.heal()
            await until_ready(http, gateway.url)
            assert (await put_group(http, gateway.url, "st-p", "P1"))[0] == 200
            assert (await get(http, gateway.url + "/v1/location-groups/st-p", "ops"))[1][
                "locations"
            ] == ["P1"]
    finally:
        gateway.stop()
        await proxy.close()


def test_migrate_with_postgres_unreachable_is_one_line() -> None:
    with socket.socket() as stalled:
        # Listening, never accepting: connects hang, as with a black-holed server.
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(8)
        for port in (free_port(), stalled.getsockname()[1]):
            proc = subprocess.run(
                [sys.executable, "-m", "gateway", "migrate"],
                env={
                    **os.environ,
                    "GATEWAY_POSTGRES_DSN": f"postgresql://postgres:secret@127.0.0.1:{port}/x",
                    "GATEWAY_POSTGRES_TIMEOUT_SECONDS": "0.5",
                },
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert proc.returncode == 1
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1, proc.stderr
            assert "PostgreSQL" in lines[0]
            assert "secret" not in lines[0]


async def test_a_held_migration_lock_does_not_hold_up_start_up(
    redis_url: str, redis: aioredis.Redis, postgres_dsn: str
) -> None:
    """Another session holds the migration lock (a gateway partitioned away mid-migration, whose
    session the server keeps): start-up waits for it no longer than the PostgreSQL timeout,
    serves, says why PostgreSQL is missing, and connects once the lock is free."""
    async with private_database(postgres_dsn) as dsn:
        holder = await asyncpg.connect(dsn)
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
            settings = make_settings(redis_url, dsn, postgres_timeout_seconds=0.5)
            client = TestClient(TestServer(create_app(settings)))
            started = time.monotonic()
            async with asyncio.timeout(5):  # it waited for the lock: up to 300 s
                await client.start_server()
            try:
                assert time.monotonic() - started < 0.5 + 1.0
                assert (await client.get("/healthz")).status == 200
                deadline = time.monotonic() + 3
                while True:  # "not connected yet" until its first try for the lock gives up
                    resp = await client.get("/readyz")
                    assert resp.status == 503
                    if "migration lock" in (await resp.json())["checks"]["postgres"]:
                        break
                    assert time.monotonic() < deadline, await resp.text()
                    await asyncio.sleep(0.05)
                resp = await client.put(
                    "/v1/location-groups/ml", json={"locations": ["M1"]}, headers=auth("ops")
                )
                assert (resp.status, (await resp.json())["code"]) == (503, "dependency_unavailable")

                await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
                await until_ready(client.session, str(client.make_url("")).rstrip("/"))
                resp = await client.put(
                    "/v1/location-groups/ml", json={"locations": ["M1"]}, headers=auth("ops")
                )
                assert resp.status == 200
            finally:
                await client.close()
        finally:
            await holder.close()


async def test_migrate_gives_up_on_a_held_lock_and_says_so(postgres_dsn: str) -> None:
    """``gateway migrate`` waits for another session's migration, but not forever:
    ``--lock-wait`` bounds it (300 s by default), then one line says what held it up."""
    async with private_database(postgres_dsn) as dsn:
        holder = await asyncpg.connect(dsn)
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                "migrate",
                "--lock-wait",
                "1",
                env={**os.environ, "GATEWAY_POSTGRES_DSN": dsn},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            async with asyncio.timeout(30):
                _, err = await proc.communicate()
        finally:
            await holder.close()
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "migration lock" in lines[0]
    assert "--lock-wait" in lines[0]
