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

from gateway.adapters.postgres import POOL_SIZE, Postgres
from gateway.app import create_app
from gateway.dev.services import start_redis
from gateway.errors import DependencyDown, GatewayError, OutcomeUnknown
from gateway.http.state import POSTGRES
from tests.conftest import auth, make_settings
from tests.helpers import private_database
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
async def port(dsn: str, seconds: float = 1.0) -> AsyncIterator[Postgres]:
    """The gateway's PostgreSQL port on its own, with a timeout of ``seconds``."""
    db = Postgres(dsn, seconds)
    await db.start()
    assert db.connected
    try:
        yield db
    finally:
        await db.close()


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


# --- what the server answers: the request's fault, or "cannot serve you now" ----------------------


def raising(sqlstate: str) -> str:
    return f"DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '{sqlstate}'; END $$"


@pytest.mark.parametrize(
    ("sqlstate", "closes_gate"),
    [
        ("25006", False),  # read-only: a standby after a failover (its probe would succeed)
        ("28P01", True),  # credentials rotated
        ("28000", True),  # role may not log in
        ("3D000", True),  # the database is gone
        ("55P03", False),  # lock not available: another session's lock
        ("53300", False),  # too many connections
        ("40001", False),  # serialization failure
        ("57P01", True),  # admin shutdown
        ("58030", False),  # I/O error
    ],
)
async def test_a_server_that_cannot_serve_now_is_503(
    sqlstate: str, closes_gate: bool, postgres_dsn: str
) -> None:
    async with port(postgres_dsn) as db:
        with pytest.raises(DependencyDown) as caught:
            await db.write(lambda conn: conn.execute(raising(sqlstate)))
        assert caught.value.extra["dependency"] == "postgres"
        assert caught.value.extra["retry_after"] >= 1
        assert "nothing was applied" in caught.value.detail
        assert db.gate.up is not closes_gate


@pytest.mark.parametrize("sqlstate", ["23505", "42601", "22003"])
async def test_an_error_of_the_request_stays_its_own(sqlstate: str, postgres_dsn: str) -> None:
    async with port(postgres_dsn) as db:
        with pytest.raises(asyncpg.PostgresError) as caught:
            await db.write(lambda conn: conn.execute(raising(sqlstate)))
        assert not isinstance(caught.value, GatewayError)
        assert caught.value.sqlstate == sqlstate
        assert db.gate.up


# --- after COMMIT was sent: only an answered ERROR proves it failed ------------------------------


async def refused_at_commit(conn: asyncpg.Connection, sqlstate: str) -> None:
    """Makes the server answer this transaction's COMMIT with ``sqlstate`` (a deferred trigger on
    a temporary table: nothing outside the session is touched)."""
    await conn.execute(
        """CREATE FUNCTION pg_temp.at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'at commit' USING ERRCODE = TG_ARGV[0]; END $$;
           CREATE TEMP TABLE at_commit (x int)"""
    )
    await conn.execute(
        f"""CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON at_commit
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
            EXECUTE FUNCTION pg_temp.at_commit('{sqlstate}');
            INSERT INTO at_commit VALUES (1)"""
    )


@pytest.mark.parametrize(
    ("sqlstate", "expected"),
    [
        ("23505", asyncpg.UniqueViolationError),  # answered: rolled back, the request's fault
        ("40001", DependencyDown),  # answered: rolled back, try again
        ("57P01", OutcomeUnknown),  # a shutdown may land as the commit completes
        ("57014", OutcomeUnknown),  # so may a cancel
    ],
)
async def test_an_error_answered_to_commit(
    sqlstate: str, expected: type[BaseException], postgres_dsn: str
) -> None:
    async with port(postgres_dsn) as db:
        with pytest.raises(expected):
            await db.write(lambda conn: refused_at_commit(conn, sqlstate))


async def test_a_session_ended_during_commit_is_outcome_unknown(
    postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    """The real thing: the backend is terminated (FATAL 57P01) while it runs the COMMIT."""
    pids: list[int] = []

    async def slow_commit(conn: asyncpg.Connection) -> None:
        pids.append(conn.get_server_pid())
        await conn.execute(
            """CREATE FUNCTION pg_temp.slow() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$;
               CREATE TEMP TABLE slow (x int);
               CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON slow DEFERRABLE INITIALLY DEFERRED
                   FOR EACH ROW EXECUTE FUNCTION pg_temp.slow();
               INSERT INTO slow VALUES (1)"""
        )

    async def terminate_in_commit() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            query = pids and await pg.fetchval(
                "SELECT query FROM pg_stat_activity WHERE pid = $1", pids[0]
            )
            if query and str(query).startswith("COMMIT"):
                await pg.execute("SELECT pg_terminate_backend($1)", pids[0])
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the COMMIT never ran")

    async with port(postgres_dsn, seconds=3.0) as db:
        killer = asyncio.create_task(terminate_in_commit())
        with pytest.raises(OutcomeUnknown):
            await db.write(slow_commit)
        await killer


# --- load and locks are not an outage: the gate stays open ----------------------------------------


@contextlib.asynccontextmanager
async def pool_held(db: Postgres) -> AsyncIterator[list[asyncio.Event]]:
    """Every connection of ``db``'s pool in use (bulk reads, whose long deadline outlasts the
    test's requests), until the test sets the event of each."""
    releases = [asyncio.Event() for _ in range(POOL_SIZE)]
    held = asyncio.Event()
    count = 0

    async def hold(release: asyncio.Event, conn: asyncpg.Connection) -> None:
        nonlocal count
        count += 1
        if count == POOL_SIZE:
            held.set()
        await release.wait()

    holders = [
        asyncio.create_task(db.read(lambda conn, r=r: hold(r, conn), bulk=True)) for r in releases
    ]
    try:
        async with asyncio.timeout(5):
            await held.wait()
        yield releases
    finally:
        for release in releases:
            release.set()
        await asyncio.gather(*holders)


async def test_pool_exhausted_is_overloaded_in_time(
    redis_url: str, redis: aioredis.Redis, postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    async with gateway(redis_url=redis_url, postgres_dsn=postgres_dsn) as client:
        db = client.server.app[POSTGRES]
        async with pool_held(db):
            status, code, elapsed = await put_group(client, "pf", "X")
            assert (status, code) == (503, "overloaded")  # Retry-After checked by timed()
            assert elapsed < BOUND
            assert db.gate.up  # busy is not down: the next request still tries
        assert (await put_group(client, "pf", "Y"))[:2] == (200, "")
        assert (await record(pg, "pf"))[0] == ["Y"]


async def test_a_unit_that_waited_its_turn_does_not_close_the_gate(postgres_dsn: str) -> None:
    """It got a connection with little of its deadline left and ran out of time in its
    statement: that says nothing about the server."""
    async with port(postgres_dsn, seconds=1.0) as db, pool_held(db) as releases:
        slow = asyncio.create_task(db.fetchval("SELECT pg_sleep(1.5)"))
        await asyncio.sleep(0.7)
        releases[0].set()
        with pytest.raises(DependencyDown):
            await slow
        assert db.gate.up


async def test_a_lock_held_by_another_session_does_not_close_the_gate(
    redis_url: str, redis: aioredis.Redis, postgres_dsn: str
) -> None:
    """Another gateway's config write holds ``config_version`` (its connection gone quiet):
    writes here answer 503 in time, and PostgreSQL is not marked down for everything else."""
    async with (
        private_database(postgres_dsn) as dsn,
        gateway(redis_url=redis_url, postgres_dsn=dsn) as client,
    ):
        db = client.server.app[POSTGRES]
        other = await asyncpg.connect(dsn)
        try:
            async with other.transaction():
                await other.execute("UPDATE config_version SET version = version")
                for _ in range(2):
                    status, code, elapsed = await put_group(client, "pf", "L")
                    assert (status, code) == (503, "dependency_unavailable")
                    assert elapsed < BOUND
                    assert db.gate.up
                    assert (await client.get("/readyz")).status == 200
        finally:
            await other.close()
        assert (await put_group(client, "pf", "L"))[:2] == (200, "")


async def wait_gate_up(db: Postgres, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not db.gate.up:
        assert time.monotonic() < deadline, db.gate.reason
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("fault", ["read_only", "dropped"])
async def test_a_standby_or_a_dropped_database_is_503(
    fault: str, redis_url: str, redis: aioredis.Redis, postgres_dsn: str
) -> None:
    """After a failover to a read-only standby, or with the database gone, writes answer 503
    ``dependency_unavailable``, not 500."""
    async with (
        private_database(postgres_dsn) as dsn,
        gateway(redis_url=redis_url, postgres_dsn=dsn) as client,
    ):
        db = client.server.app[POSTGRES]
        assert (await put_group(client, "pf", "A"))[:2] == (200, "")
        name = urlsplit(dsn).path.lstrip("/")
        admin = await asyncpg.connect(postgres_dsn)
        try:
            if fault == "read_only":
                # New sessions of the database are read-only, as on a standby; the gateway's
                # are ended, so it reconnects to what is now a "standby".
                await admin.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    name,
                )
            else:
                await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        finally:
            await admin.close()
        await asyncio.sleep(0.2)  # the gateway sees its connections closed
        if fault == "read_only":
            await wait_gate_up(db)  # a lost connection may have closed it: it reopens
        for _ in range(2):
            status, code, elapsed = await put_group(client, "pf", "B")
            assert (status, code) == (503, "dependency_unavailable")
            assert elapsed < BOUND
