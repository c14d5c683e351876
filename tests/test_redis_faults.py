"""Redis faults through the HTTP contract: down (killed) and stalled (SIGSTOP), on a Redis of the
test's own. Every answer is a 503 with the right code within the Redis timeout plus one second;
while Redis is known stalled, requests fail at once; after recovery the state agrees with what
the answers said: ``dependency_unavailable`` was not applied, ``outcome_unknown`` may have been,
and a retry with the same ids answers the truth.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio.cluster import RedisCluster

from gateway.adapters.batcher import CommandBatcher
from gateway.adapters.records import RedisRecords
from gateway.adapters.redis import RedisPort
from gateway.adapters.reserve_coalescer import ReserveCoalescer
from gateway.adapters.scripts import ScriptRegistry
from gateway.app import create_app
from gateway.atp import keys as atp_keys
from gateway.dev.services import free_port, start_redis_cluster
from gateway.reservation import keys
from gateway.reservation.expiry import run_sweeper
from gateway.reservation.service import ReservationService
from tests.conftest import auth, make_settings
from tests.helpers import OwnRedis, event

Client = TestClient[Any, Any]
TIMEOUT = 0.5
BOUND = TIMEOUT + 1.0  # every answer within the Redis timeout plus one second
FAST = 0.3  # "at once", with room for a loaded CI machine


@pytest.fixture
async def gw(
    own_redis: OwnRedis, postgres_dsn: str, pg: asyncpg.Connection
) -> AsyncIterator[Client]:
    settings = make_settings(own_redis.url, postgres_dsn, redis_timeout_seconds=TIMEOUT)
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


@pytest.fixture
async def direct(own_redis: OwnRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    yield client
    await client.aclose()


async def _seed(gw: Client) -> None:
    resp = await gw.post(
        "/v1/stock-events",
        json={"events": [event("seed", "snapshot", 100, 0, sku="A", location="L1")]},
        headers=auth("feed"),
    )
    assert resp.status == 200, await resp.text()
    resp = await gw.put(
        "/v1/location-groups/g", json={"locations": ["L1", "L2"]}, headers=auth("ops")
    )
    assert resp.status == 200, await resp.text()
    resp = await _reserve(gw, "r0")
    assert resp.status == 201, await resp.text()


_serial = iter(range(1_000_000))


async def _reserve(gw: Client, rid: str, quantity: int = 1) -> Any:
    return await gw.post(
        "/v1/reservations",
        json={
            "reservation_id": rid,
            "lines": [{"sku": "A", "location": "L1", "quantity": quantity}],
        },
        headers=auth("storefront"),
    )


def _endpoints() -> dict[str, Callable[[Client], Awaitable[Any]]]:
    """Each endpoint that reaches Redis, as one request."""
    return {
        "POST /v1/stock-events": lambda gw: gw.post(
            "/v1/stock-events",
            json={
                "events": [event(f"e{next(_serial)}", "adjustment", 1, 5, sku="A", location="L1")]
            },
            headers=auth("feed"),
        ),
        "GET /v1/availability": lambda gw: gw.get(
            "/v1/availability?sku=A&location=L1", headers=auth("storefront")
        ),
        "GET /v1/availability (group)": lambda gw: gw.get(
            "/v1/availability?sku=A&location_group=g", headers=auth("storefront")
        ),
        "POST /v1/reservations": lambda gw: _reserve(gw, f"new-{next(_serial)}"),
        "GET /v1/reservations/{id}": lambda gw: gw.get(
            "/v1/reservations/r0", headers=auth("storefront")
        ),
        "DELETE /v1/reservations/{id}": lambda gw: gw.delete(
            "/v1/reservations/r0", headers=auth("storefront")
        ),
        "POST /v1/reservations/{id}/extend": lambda gw: gw.post(
            "/v1/reservations/r0/extend", json={"ttl_seconds": 60}, headers=auth("storefront")
        ),
        "GET /v1/location-groups/{g}": lambda gw: gw.get(
            "/v1/location-groups/g", headers=auth("ops")
        ),
        "PUT /v1/location-groups/{g}": lambda gw: gw.put(
            "/v1/location-groups/g2", json={"locations": ["L1"]}, headers=auth("ops")
        ),
        "PUT /v1/safety-stock": lambda gw: gw.put(
            "/v1/safety-stock",
            json={"items": [{"location": "L9", "quantity": 1}]},
            headers=auth("ops"),
        ),
    }


# What a request whose command reached a stalled Redis answers: a write may have been applied.
_WRITTEN_WHEN_STALLED = {
    "POST /v1/stock-events": "outcome_unknown",
    "POST /v1/reservations": "outcome_unknown",
    "POST /v1/reservations/{id}/extend": "outcome_unknown",
    # PostgreSQL first, then Redis: the code of the Redis half is the other writes' rule.
    "PUT /v1/location-groups/{g}": "outcome_unknown",
    "PUT /v1/safety-stock": "outcome_unknown",
}


async def _timed(gw: Client, request: Callable[[Client], Awaitable[Any]]) -> tuple[Any, float]:
    started = time.monotonic()
    resp = await request(gw)
    body = await resp.json()
    return (resp, body), time.monotonic() - started


async def _wait_until_served(gw: Client, limit: float = 5.0) -> float:
    started = time.monotonic()
    while True:
        resp = await gw.get("/v1/availability?sku=A&location=L1", headers=auth("storefront"))
        await resp.read()
        if resp.status == 200:
            return time.monotonic() - started
        assert time.monotonic() - started < limit, "Redis answers again, the gateway does not"
        await asyncio.sleep(0.05)


def _problems(results: list[tuple[tuple[Any, Any], float]]) -> dict[str, tuple[int, str, float]]:
    names = list(_endpoints())
    return {
        name: (resp.status, body.get("code", ""), round(elapsed, 3))
        for name, ((resp, body), elapsed) in zip(names, results, strict=True)
    }


async def test_every_endpoint_with_redis_stalled(gw: Client, own_redis: OwnRedis) -> None:
    await _seed(gw)
    endpoints = _endpoints()
    own_redis.stall()
    try:
        # First wave: Redis accepts the bytes and says nothing. Writes that reached it may run
        # when it wakes (outcome_unknown); reads changed nothing (dependency_unavailable).
        first = _problems(await asyncio.gather(*(_timed(gw, r) for r in endpoints.values())))
        expected = {
            name: (503, _WRITTEN_WHEN_STALLED.get(name, "dependency_unavailable"))
            for name in endpoints
        }
        assert {n: s[:2] for n, s in first.items()} == expected, first
        assert all(s[2] <= BOUND for s in first.values()), first
        # Redis is now known stalled: nothing is sent, every request fails at once.
        second = _problems([await _timed(gw, r) for r in endpoints.values()])
        assert {n: s[:2] for n, s in second.items()} == {
            n: (503, "dependency_unavailable") for n in endpoints
        }, second
        assert all(s[2] <= FAST for s in second.values()), second
        for (resp, _), _ in [await _timed(gw, endpoints["GET /v1/availability"])]:
            assert resp.headers["Retry-After"] == "1"
    finally:
        own_redis.resume()
    assert await _wait_until_served(gw) < 1.0


async def test_every_endpoint_with_redis_down(gw: Client, own_redis: OwnRedis) -> None:
    await _seed(gw)
    endpoints = _endpoints()
    own_redis.kill()
    # Down before the requests come: the gateway has seen its connection close. (A write sent
    # in the instant before that is outcome_unknown, rightly: the test stall covers it.)
    await asyncio.sleep(0.1)
    for _ in range(2):  # the first finds the connection refused, the second the gate closed
        results = _problems([await _timed(gw, r) for r in endpoints.values()])
        assert {n: s[:2] for n, s in results.items()} == {
            n: (503, "dependency_unavailable") for n in endpoints
        }, results
        assert all(s[2] <= BOUND for s in results.values()), results
    own_redis.restart()
    assert await _wait_until_served(gw) < 1.0


async def test_300_reads_during_a_stall_all_answer_in_time(gw: Client, own_redis: OwnRedis) -> None:
    await _seed(gw)

    async def read() -> tuple[int, float]:
        started = time.monotonic()
        resp = await gw.get("/v1/availability?sku=A&location=L1", headers=auth("storefront"))
        await resp.read()
        return resp.status, time.monotonic() - started

    own_redis.stall()
    try:
        results = await asyncio.gather(*(read() for _ in range(300)))
    finally:
        own_redis.resume()
    assert {status for status, _ in results} == {503}
    slowest = max(elapsed for _, elapsed in results)
    assert slowest <= BOUND, f"slowest of 300 reads: {slowest:.2f} s"


async def test_answers_after_a_stall_agree_with_the_state(
    gw: Client, own_redis: OwnRedis, direct: aioredis.Redis
) -> None:
    """Item 3: what answered 503 dependency_unavailable was never applied; what answered
    outcome_unknown may have been, and its retry answers the truth (a replay, duplicates)."""
    await _seed(gw)
    before = int(await direct.hget(atp_keys.position("A"), "oh:L1") or 0)

    async def events(prefix: str) -> Any:
        return await gw.post(
            "/v1/stock-events",
            json={
                "events": [
                    event(f"{prefix}-{i}", "adjustment", 1, 10 + i, sku="A", location="L1")
                    for i in range(3)
                ]
            },
            headers=auth("feed"),
        )

    own_redis.stall()
    try:
        # Written to the stalled server: they run when it wakes.
        sent = await asyncio.gather(*(_reserve(gw, f"sent-{i}") for i in range(20)), events("sent"))
        # Redis is known stalled now: these are refused before anything is written.
        unsent = await asyncio.gather(
            *(_reserve(gw, f"unsent-{i}") for i in range(20)), events("unsent")
        )
        sent_codes = [(r.status, (await r.json())["code"]) for r in sent]
        unsent_codes = [(r.status, (await r.json())["code"]) for r in unsent]
    finally:
        own_redis.resume()
    assert sent_codes == [(503, "outcome_unknown")] * 21
    assert unsent_codes == [(503, "dependency_unavailable")] * 21
    await _wait_until_served(gw)
    await asyncio.sleep(0.2)  # nothing queued may still reach Redis later
    for i in range(20):
        assert not await direct.exists(keys.record(f"unsent-{i}")), f"unsent-{i} was applied"
        assert not await direct.hexists(keys.holds("A"), f"unsent-{i}")
    # The retries answer the truth: each reservation held once, the events counted once.
    for i in range(20):
        resp = await _reserve(gw, f"sent-{i}")
        assert resp.status == 201, await resp.text()
    held = await direct.hlen(keys.holds("A"))
    assert held == 21  # r0 and the twenty
    assert int(await direct.hget(atp_keys.position("A"), "res:L1")) == 21
    retried = await events("sent")
    assert retried.status == 200
    counts = await retried.json()
    assert counts["applied"] + counts["duplicate"] == 3
    assert int(await direct.hget(atp_keys.position("A"), "oh:L1")) == before + 3
    again = await events("unsent")
    assert (await again.json())["applied"] == 3  # never applied before
    for i in range(20):  # and the refused reservations can now be made
        assert (await _reserve(gw, f"unsent-{i}")).status == 201


# --- a Redis Cluster node stalled (the redis-py path) ------------------------------------------


@pytest.fixture
def own_cluster() -> Iterator[tuple[str, dict[int, subprocess.Popen[bytes]]]]:
    url, procs = start_redis_cluster(3)
    by_port = {int(p.args[p.args.index("--port") + 1]): p for p in procs}  # type: ignore[union-attr]
    try:
        yield url, by_port
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        for proc in procs:
            proc.wait(5)


async def test_a_stalled_cluster_node_is_answered_in_time(
    own_cluster: tuple[str, dict[int, subprocess.Popen[bytes]]],
    postgres_dsn: str,
    pg: asyncpg.Connection,
) -> None:
    """redis-py's cluster client, as configured before, retried a timed-out call ten times
    (and had no socket timeout at all): a stalled node held requests for good."""
    url, procs = own_cluster
    settings = make_settings(url, postgres_dsn, redis_cluster=True, redis_timeout_seconds=TIMEOUT)
    probe = await RedisCluster.from_url(url).initialize()
    skus = [f"C-{i}" for i in range(12)]
    node_of = {s: probe.get_node_from_key(atp_keys.position(s)).port for s in skus}
    await probe.aclose()
    stalled_port = node_of["C-0"]
    on_stalled = [s for s in skus if node_of[s] == stalled_port]
    async with TestClient(TestServer(create_app(settings))) as gw:
        resp = await gw.post(
            "/v1/stock-events",
            json={
                "events": [event(f"s-{s}", "snapshot", 50, 0, sku=s, location="L1") for s in skus]
            },
            headers=auth("feed"),
        )
        assert resp.status == 200, await resp.text()

        async def bounded(request: Callable[[], Awaitable[Any]]) -> tuple[int, str, float]:
            started = time.monotonic()
            async with asyncio.timeout(BOUND + 5):  # the old client waited without end
                resp = await request()
                body = await resp.json()
            return resp.status, body.get("code", ""), time.monotonic() - started

        requests: dict[str, Callable[[], Awaitable[Any]]] = {
            "read": lambda: gw.get(
                f"/v1/availability?sku={on_stalled[0]}&location=L1", headers=auth("storefront")
            ),
            "events": lambda: gw.post(
                "/v1/stock-events",
                json={
                    "events": [
                        event(f"a{next(_serial)}", "adjustment", 1, 5, sku=s, location="L1")
                        for s in on_stalled
                    ]
                },
                headers=auth("feed"),
            ),
            "reserve": lambda: gw.post(
                "/v1/reservations",
                json={
                    "reservation_id": f"c{next(_serial)}",
                    "lines": [{"sku": s, "location": "L1", "quantity": 1} for s in skus],
                },
                headers=auth("storefront"),
            ),
        }
        procs[stalled_port].send_signal(signal.SIGSTOP)
        try:
            first = await asyncio.gather(*(bounded(r) for r in requests.values()))
            second = [await bounded(r) for r in requests.values()]
        finally:
            procs[stalled_port].send_signal(signal.SIGCONT)
        read, events, reserve = first
        assert read[:2] == (503, "dependency_unavailable"), first
        assert events[:2] == (503, "outcome_unknown"), first
        assert reserve[0] == 503, first
        assert reserve[1] in ("outcome_unknown", "dependency_unavailable"), first
        assert all(elapsed <= BOUND for _, _, elapsed in first), first
        # Known stalled: the next ones are not sent at all.
        assert [s[:2] for s in second] == [(503, "dependency_unavailable")] * 3, second
        assert all(elapsed <= FAST for _, _, elapsed in second), second
        started = time.monotonic()
        while (await bounded(requests["read"]))[0] != 200:
            assert time.monotonic() - started < 5, "the cluster answers again, the gateway not"
            await asyncio.sleep(0.05)


async def test_the_sweeper_rides_out_an_outage() -> None:
    """A sweeper pass that meets Redis down is skipped, not raised: a crashing worker is
    restarted with a backoff that doubles up to 30 s, and expiry would lag that long after a
    long outage. With the gate closed passes fail at once, so the old crash loop ran hot."""
    number = free_port()
    port = RedisPort.from_url(f"redis://127.0.0.1:{number}/0", cluster=False, timeout=0.3)
    batcher = CommandBatcher(functools.partial(port.execute, raise_on_error=False))
    service = ReservationService(
        ScriptRegistry(port, "gateway.reservation", batcher),
        RedisRecords(batcher),
        ReserveCoalescer(ScriptRegistry(port, "gateway.reservation", batcher)),
        cluster=False,
        max_ttl_seconds=3600,
    )
    runner = asyncio.create_task(batcher.run())
    sweeper = asyncio.create_task(run_sweeper(service, RedisRecords(batcher)))
    try:
        await asyncio.sleep(1)  # four passes with Redis down
        assert not sweeper.done(), sweeper.exception()
    finally:
        for task in (sweeper, runner):
            task.cancel()
        await asyncio.gather(sweeper, runner, return_exceptions=True)
        await service.close()
        await port.close()


# Keeps Redis running one script for 1.5 s (TIME is the real clock, even inside a script).
_SPIN_1_5_S = """
local function us() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end
local start = us()
while us() - start < 1500000 do end
return 1
"""


async def test_a_busy_redis_refuses_and_nothing_is_applied(
    gw: Client, own_redis: OwnRedis, direct: aioredis.Redis
) -> None:
    """Redis refusing commands (here BUSY: another client's script runs long) answers them
    with an error at once: dependency_unavailable, and nothing ran."""
    await _seed(gw)
    await direct.config_set("busy-reply-threshold", 50)  # ms: BUSY soon after a script starts
    busy = aioredis.Redis.from_url(own_redis.url)
    spin = asyncio.ensure_future(busy.eval(_SPIN_1_5_S, 0))
    try:
        await asyncio.sleep(0.3)
        answers = await asyncio.gather(
            _reserve(gw, "while-busy"),
            gw.post(
                "/v1/stock-events",
                json={"events": [event("busy-1", "adjustment", 7, 30, sku="A", location="L1")]},
                headers=auth("feed"),
            ),
            gw.get("/v1/availability?sku=A&location=L1", headers=auth("storefront")),
        )
        codes = [(r.status, (await r.json())["code"]) for r in answers]
    finally:
        assert await spin == 1
        await busy.aclose()
    assert codes == [(503, "dependency_unavailable")] * 3
    assert not await direct.exists(keys.record("while-busy"))
    assert int(await direct.hget(atp_keys.position("A"), "oh:L1")) == 100
    again = await _reserve(gw, "while-busy")
    assert again.status == 201  # made now, not replayed
