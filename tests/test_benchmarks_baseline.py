"""The benchmark's PostgreSQL baseline (``benchmarks/baseline_pg.py``) must be correct under
concurrency, or the gateway would be compared with something that oversells (FACTS.md: race-test
every "check then insert" path with hundreds of simultaneous claims on a capacity of 100).

Real PostgreSQL, database ``test_bench2`` (made when missing; ``GATEWAY_TEST_BASELINE_DSN``
overrides it), the baseline served over real HTTP on a free port.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from benchmarks import baseline_pg

DSN = os.environ.get(
    "GATEWAY_TEST_BASELINE_DSN", "postgresql://postgres@127.0.0.1:5432/test_bench2"
)
LOCATION = "DC1"
UNITS = 100
CLAIMS = 300


async def _connect() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(DSN)
    except asyncpg.InvalidCatalogNameError:
        base, _, name = DSN.partition("?")[0].rpartition("/")
        admin = await asyncpg.connect(f"{base}/postgres")
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        return await asyncpg.connect(DSN)


@pytest.fixture
async def db() -> AsyncIterator[asyncpg.Connection]:
    conn = await _connect()
    try:
        await baseline_pg.reset(conn)
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def base(db: asyncpg.Connection) -> AsyncIterator[str]:
    runner = web.AppRunner(baseline_pg.create_app(DSN), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def _claims(base: str, carts: list[list[str]]) -> Counter[int]:
    """POST one reservation per cart (1 unit of each SKU), all at once; the statuses."""
    connector = aiohttp.TCPConnector(limit=len(carts))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def claim(n: int, skus: list[str]) -> int:
            body = {
                "reservation_id": f"claim-{n}",
                "ttl_seconds": 600,
                "lines": [{"sku": s, "location": LOCATION, "quantity": 1} for s in skus],
            }
            async with session.post(f"{base}/v1/reservations", json=body) as response:
                payload = await response.json(content_type=None)
                if response.status == 409:
                    assert payload["code"] == "insufficient_stock"
                return response.status

        statuses = await asyncio.gather(*(claim(n, skus) for n, skus in enumerate(carts)))
    return Counter(statuses)


async def _position(db: asyncpg.Connection, sku: str) -> tuple[int, int]:
    row = await db.fetchrow(
        "SELECT on_hand, reserved FROM baseline_positions WHERE sku = $1 AND location = $2",
        sku,
        LOCATION,
    )
    assert row is not None
    return int(row["on_hand"]), int(row["reserved"])


async def test_300_claims_on_100_units_never_oversell(db: asyncpg.Connection, base: str) -> None:
    await baseline_pg.set_stock(db, LOCATION, {"HOT": UNITS})
    statuses = await _claims(base, [["HOT"]] * CLAIMS)
    assert statuses == {201: UNITS, 409: CLAIMS - UNITS}
    assert await _position(db, "HOT") == (UNITS, UNITS)
    assert await baseline_pg.held_units(db, "HOT", LOCATION) == UNITS


async def test_carts_in_opposite_orders_neither_deadlock_nor_oversell(
    db: asyncpg.Connection, base: str
) -> None:
    """Half the carts name A then B, half B then A: locks taken in key order never deadlock
    (a deadlock would surface as a 500), and all or nothing holds for both SKUs."""
    await baseline_pg.set_stock(db, LOCATION, {"A": UNITS, "B": UNITS})
    carts = [["A", "B"] if n % 2 else ["B", "A"] for n in range(CLAIMS)]
    statuses = await _claims(base, carts)
    assert statuses == {201: UNITS, 409: CLAIMS - UNITS}
    assert await _position(db, "A") == (UNITS, UNITS)
    assert await _position(db, "B") == (UNITS, UNITS)


async def test_availability_speaks_the_gateways_shape(db: asyncpg.Connection, base: str) -> None:
    await baseline_pg.set_stock(db, LOCATION, {"A": 7}, safety=2)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base}/v1/availability?sku=A&sku=NONE&location={LOCATION}") as response,
    ):
        assert response.status == 200
        items = (await response.json())["items"]
    assert items == [
        {
            "sku": "A",
            "location": LOCATION,
            "on_hand": 7,
            "reserved": 0,
            "committed": 0,
            "safety_stock": 2,
            "available": 5,
        },
        {
            "sku": "NONE",
            "location": LOCATION,
            "on_hand": 0,
            "reserved": 0,
            "committed": 0,
            "safety_stock": 0,
            "available": 0,
        },
    ]
