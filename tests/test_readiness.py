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
from gateway.devservices import start_redis
from tests.conftest import auth, make_settings


class TcpProxy:
    """Forwards a local port to a real server; ``stop()`` makes the server unreachable."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        for coro in (pump(reader, up_writer), pump(up_reader, writer)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


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
        await proxy.stop()
        resp = await client.get("/readyz")
        assert resp.status == 503
        body = await resp.json()
        assert "postgres" in body["detail"]
        assert "redis" not in body["detail"]
        assert body["checks"]["redis"] == "up"
        # Reads do not depend on PostgreSQL and keep working.
        read = await client.get("/v1/availability?sku=A&location=L", headers=auth("storefront"))
        assert read.status == 200
