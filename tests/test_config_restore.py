"""Redis loses the location config, the gateway notices: the copy comes back from PostgreSQL
within seconds, without a restart; and however writers and copies interleave, a copy is vouched
for (the marker names the record's version) only when it is the record."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from gateway.adapters.config_record import PostgresConfigRecord
from gateway.adapters.records import RedisRecords, RedisRecordWriter
from gateway.adapters.scripts import ScriptRegistry
from gateway.app import create_app
from gateway.atp import keys
from gateway.atp.config_store import MARKER, LocationConfig
from gateway.atp.store import AtpStore
from gateway.http.state import BATCHER, POSTGRES, REDIS
from gateway.ports import FieldWrite, RecordWriter, ValueWrite
from gateway.settings import Settings
from tests.conftest import auth, make_settings
from tests.helpers import private_database

Client = TestClient[Any, Any]


@pytest.fixture
async def two_clients(settings: Settings) -> AsyncIterator[list[Client]]:
    """Two gateways on one Redis and one PostgreSQL, as two processes would be."""
    async with (
        TestClient(TestServer(create_app(settings))) as one,
        TestClient(TestServer(create_app(settings))) as two,
    ):
        yield [one, two]


async def test_config_comes_back_after_flushall(
    client: Client, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    put = await client.put(
        "/v1/location-groups/north", json={"locations": ["S1", "S2"]}, headers=auth("ops")
    )
    assert put.status == 200
    items = [{"location": "S1", "quantity": 4}, {"location": "S2", "sku": "A", "quantity": 9}]
    put = await client.put("/v1/safety-stock", json={"items": items}, headers=auth("ops"))
    assert put.status == 200

    await redis.flushall()
    started = time.monotonic()
    while True:
        resp = await client.get("/v1/location-groups/north", headers=auth("ops"))
        if resp.status == 200:
            break
        # Until the copy is back the group is not "missing": 503, never a 404.
        assert resp.status == 503
        assert (await resp.json())["code"] == "dependency_unavailable"
        assert time.monotonic() - started < 5, "the config never came back"
        await asyncio.sleep(0.05)
    assert (await resp.json())["locations"] == ["S1", "S2"]
    assert await redis.hget(keys.LOCATION_SAFETY_STOCK, "S1") == "4"
    assert await redis.hget(keys.position("A"), keys.safety_stock_field("S2")) == "9"


async def test_racing_writers_and_copies_converge(
    two_clients: list[Client], redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    rng = random.Random(7)

    async def write(n: int) -> int:
        client = two_clients[n % 2]
        if n % 3 == 0:
            items = [{"location": "R1", "quantity": n}]
            resp = await client.put("/v1/safety-stock", json={"items": items}, headers=auth("ops"))
        else:
            members = [f"L{n}", f"L{rng.randrange(100)}x"]
            resp = await client.put(
                "/v1/location-groups/race", json={"locations": members}, headers=auth("ops")
            )
        return resp.status

    async def flush_midway() -> None:
        await asyncio.sleep(0.01)
        await redis.flushall()

    statuses = await asyncio.gather(*(write(n) for n in range(40)), flush_midway())
    assert set(statuses[:-1]) == {200}

    # Settled: the marker names the record's version, and then the copy is the record.
    deadline = time.monotonic() + 8
    while True:
        version = await pg.fetchval("SELECT version FROM config_version")
        if await redis.get(MARKER) == str(version):
            break
        assert time.monotonic() < deadline, (await redis.get(MARKER), version)
        await asyncio.sleep(0.05)
    group = await pg.fetchval("SELECT locations FROM location_groups WHERE group_name = 'race'")
    quantity = await pg.fetchval("SELECT quantity FROM safety_stock WHERE location = 'R1'")
    assert await redis.get(keys.location_group("race")) == ",".join(group)
    assert await redis.hget(keys.LOCATION_SAFETY_STOCK, "R1") == str(quantity)


class Stepper:
    """The gateway's Redis port, with the calls of one writer held at chosen points, so a test
    can interleave two writers as a slow network would."""

    def __init__(self, port: RecordWriter, group_key: str) -> None:
        self._port = port
        self._group_key = group_key
        self.at_data = asyncio.Event()  # set when the writer's copy is about to go
        self.data_done = asyncio.Event()  # set when its copy has landed
        self.before_data = _open_event()  # the copy waits for this
        self.after_data = _open_event()  # what follows the copy waits for this

    async def write(self, writes: Sequence[ValueWrite | FieldWrite]) -> None:
        is_data = any(w.key == self._group_key for w in writes)
        if is_data:
            self.at_data.set()
            await self.before_data.wait()
        elif self.data_done.is_set():
            await self.after_data.wait()
        await self._port.write(writes)
        if is_data:
            self.data_done.set()


def _open_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


async def test_an_older_copy_landing_late_is_never_vouched_for(
    client: Client, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    """W1 commits OLD, W2 commits NEW; NEW's copy lands, then OLD's over it, then W2 finishes
    last. Stamping the marker with the writer's version would vouch for OLD for good."""
    app = client.server.app
    group_key = keys.location_group("race")
    first = Stepper(RedisRecordWriter(app[REDIS]), group_key)
    second = Stepper(RedisRecordWriter(app[REDIS]), group_key)
    record = PostgresConfigRecord(app[POSTGRES])
    store = AtpStore(ScriptRegistry(app[REDIS], "gateway.atp"))
    records = RedisRecords(app[BATCHER])
    w1 = LocationConfig(record, store, first, records)
    w2 = LocationConfig(record, store, second, records)
    w1_done = asyncio.Event()
    first.before_data = second.data_done
    second.after_data = w1_done

    old = asyncio.create_task(w1.put_group("race", ["OLD"]))
    old.add_done_callback(lambda _: w1_done.set())
    await first.at_data.wait()  # OLD is committed; its copy is held
    await w2.put_group("race", ["NEW"])
    await old

    deadline = time.monotonic() + 5
    while True:
        version = await pg.fetchval("SELECT version FROM config_version")
        if await redis.get(MARKER) == str(version):
            break
        assert time.monotonic() < deadline, (await redis.get(MARKER), version)
        await asyncio.sleep(0.05)
    assert await redis.get(group_key) == "NEW"


async def test_group_reads_and_reservations_wait_for_the_copy(
    client: Client, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    """While Redis lacks the config, "no such group" would be a guess: a group read and a
    reservation naming a group answer 503 (retry), never 404 or 422 (a wrong, final answer)."""
    put = await client.put(
        "/v1/location-groups/north", json={"locations": ["S1"]}, headers=auth("ops")
    )
    assert put.status == 200
    await redis.flushall()  # the sync task copies it back within about a second
    availability = await client.get(
        "/v1/availability?sku=A&location_group=north", headers=auth("storefront")
    )
    reserve = await client.post(
        "/v1/reservations",
        json={
            "reservation_id": "r-during-copy",
            "lines": [{"sku": "A", "location_group": "north", "quantity": 1}],
        },
        headers=auth("storefront"),
    )
    # 200 / 409 only if the copy won the race with these requests (a millisecond after it).
    assert availability.status in (503, 200), await availability.text()
    assert reserve.status in (503, 409), await reserve.text()
    for resp in (availability, reserve):
        if resp.status == 503:
            body = await resp.json()
            assert body["code"] == "dependency_unavailable"
            assert resp.headers["Retry-After"] == "1"


async def test_a_slow_copy_of_the_record_is_not_an_outage(
    redis_url: str, redis: aioredis.Redis, postgres_dsn: str
) -> None:
    """The copy reads the whole record, which for a big config takes longer than a request
    may (here: a table it must wait for, 4x the timeout). It gets its own, longer deadline, and
    while it runs PostgreSQL is not marked down: other calls are not failed for it."""
    timeout = 0.3
    async with private_database(postgres_dsn) as dsn:
        settings = make_settings(redis_url, dsn, postgres_timeout_seconds=timeout)
        async with TestClient(TestServer(create_app(settings))) as client:
            db = client.server.app[POSTGRES]
            put = await client.put(
                "/v1/location-groups/slow", json={"locations": ["S1"]}, headers=auth("ops")
            )
            assert put.status == 200
            blocker = await asyncpg.connect(dsn)
            try:
                async with blocker.transaction():
                    await blocker.execute("LOCK TABLE safety_stock IN ACCESS EXCLUSIVE MODE")
                    await redis.flushall()  # the sync starts a copy, which waits on the table
                    until = time.monotonic() + 4 * timeout
                    while time.monotonic() < until:
                        assert db.gate.up, db.gate.reason
                        await asyncio.sleep(0.02)
            finally:
                await blocker.close()
            started = time.monotonic()
            while (await client.get("/v1/location-groups/slow", headers=auth("ops"))).status != 200:
                assert time.monotonic() - started < 3, "the config never came back"
                await asyncio.sleep(0.05)
            assert db.gate.up
