"""The PostgreSQL port's own connections (gateway.adapters.postgres.Connections): reused, aged
out when idle too long, dropped when the server closed them, and closed in order at shutdown."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from gateway.adapters import postgres
from gateway.adapters.postgres import Postgres
from gateway.errors import DependencyDown


async def _backend(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_backend_pid()"))


async def test_an_idle_connection_is_reused_and_aged_out(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Postgres(postgres_dsn, 3.0)
    await db.start()
    try:
        first = await db.read(_backend)
        assert await db.read(_backend) == first  # kept idle, used again
        monkeypatch.setattr(postgres, "IDLE_LIFETIME", 0.0)
        await asyncio.sleep(0.01)
        assert await db.read(_backend) != first  # too old: closed, a new one opened
    finally:
        await db.close()


async def test_a_connection_the_server_closed_is_not_used_again(
    postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    db = Postgres(postgres_dsn, 3.0)
    await db.start()
    try:
        first = await db.read(_backend)
        assert await pg.fetchval("SELECT pg_terminate_backend($1)", first)
        await asyncio.sleep(0.2)  # the socket's close reaches the idle connection
        assert await db.read(_backend) != first
    finally:
        await db.close()


async def test_close_waits_for_units_in_flight_and_refuses_new_ones(postgres_dsn: str) -> None:
    db = Postgres(postgres_dsn, 3.0)
    await db.start()
    pool = db._pool
    assert pool is not None
    started = asyncio.Event()

    async def slow(conn: asyncpg.Connection) -> str:
        started.set()
        return str(await conn.fetchval("SELECT 'done' FROM pg_sleep(0.3)"))

    unit = asyncio.create_task(db.write(slow))
    await started.wait()
    closing = asyncio.create_task(pool.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # waiting for the unit in flight
    with pytest.raises(DependencyDown, match="shutting down; nothing was applied"):
        await pool.acquire()
    assert await unit == "done"  # it finished, then close went on
    await asyncio.wait_for(closing, 2)
    await db.close()
