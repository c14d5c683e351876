"""A Redis that is slow yet alive (a fork or fsync stall, another client's heavy script, a
backlog): it keeps answering, so no silence trips the watchdog, yet no request may wait past the
Redis timeout (plus one second), and every answer tells the truth: what was never sent was not
applied (``dependency_unavailable``); what was sent and not answered in time may have been
(``outcome_unknown``).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.adapters.batcher import CommandBatcher
from gateway.adapters.records import RedisRecords
from gateway.adapters.redis import RedisPort
from gateway.adapters.reserve_coalescer import ReserveCoalescer
from gateway.adapters.scripts import ScriptRegistry
from gateway.atp import keys as atp_keys
from gateway.errors import DependencyDown, GatewayError, OutcomeUnknown
from gateway.reservation import keys
from gateway.reservation.schemas import LineRequest, ReservationRequest
from gateway.reservation.service import ReservationService
from tests.helpers import OwnRedis

TIMEOUT = 0.5
BOUND = TIMEOUT + 1.0

# Keeps Redis busy for ARGV[1] ms (TIME is the real clock, even inside a script); between two
# runs Redis serves its other clients, so it is slow, not silent.
_SPIN = """
local function us() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end
local start = us()
while us() - start < tonumber(ARGV[1]) * 1000 do end
return 1
"""


@pytest.fixture
async def port(own_redis: OwnRedis) -> AsyncIterator[RedisPort]:
    p = RedisPort.from_url(own_redis.url, cluster=False, timeout=TIMEOUT)
    yield p
    await p.close()


@pytest.fixture
async def batcher(port: RedisPort) -> AsyncIterator[CommandBatcher]:
    b = CommandBatcher(functools.partial(port.execute, raise_on_error=False), max_wait=TIMEOUT)
    runner = asyncio.create_task(b.run())
    yield b
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner


@pytest.fixture
async def direct(own_redis: OwnRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis.url)
    yield client
    await client.aclose()


async def _spin_until(stop: asyncio.Event, url: str, ms: int) -> int:
    """Another client's scripts, back to back, until ``stop``; how many ran."""
    busy = aioredis.Redis.from_url(url)
    runs = 0
    try:
        while not stop.is_set():
            await busy.eval(_SPIN, 0, ms)
            runs += 1
    finally:
        await busy.aclose()
    return runs


async def _timed(call: Any) -> tuple[Any, float]:
    started = time.monotonic()
    try:
        result = await call
    except GatewayError as exc:
        result = exc
    return result, time.monotonic() - started


async def test_a_backlog_on_a_busy_redis_never_holds_a_request_past_its_timeout(
    own_redis: OwnRedis, port: RedisPort, batcher: CommandBatcher, direct: aioredis.Redis
) -> None:
    """Redis runs another client's 100 ms scripts back to back, and this gateway's heavy reads
    (100 ms each) queue up behind one another: replies keep coming (never half a second of
    silence), but far more was asked of Redis than it gets through in the timeout. Before,
    requests waited their turn for seconds."""
    await direct.config_set("busy-reply-threshold", 60_000)  # slow, never BUSY
    # Redis reads a pipeline 16 kB at a time: a command this long is about one a read, so the
    # replies come one by one, 100 ms apart.
    pad = "k" * 17_000
    heavy = [batcher.call("EVAL_RO", _SPIN, 0, 100, f"{pad}{i}") for i in range(20)]
    reads = [*heavy, *(batcher.call("GET", f"k{i}") for i in range(500))]
    writes = [batcher.call_many([("SET", f"w{i}", "1")], dedupe=False) for i in range(300)]
    service = ReservationService(
        ScriptRegistry(port, "gateway.reservation", batcher),
        RedisRecords(batcher),
        ReserveCoalescer(ScriptRegistry(port, "gateway.reservation", batcher)),
        cluster=False,
        max_ttl_seconds=3600,
    )
    await direct.hset(atp_keys.position("A"), "oh:L1", 10_000)
    # Connected, the script loaded: reservations are written the moment they come.
    assert (await service.reserve(_request("warm"))).reservation is not None
    stop = asyncio.Event()
    spinner = asyncio.create_task(_spin_until(stop, own_redis.url, 100))
    try:
        await asyncio.sleep(0.1)  # the first script runs
        first = asyncio.gather(*(_timed(c) for c in [*reads, *writes]))
        await asyncio.sleep(0.05)  # written behind the heavy reads: they wait, then time out
        behind = asyncio.gather(*(_timed(service.reserve(_request(f"r{i}"))) for i in range(50)))
        await asyncio.sleep(0.7)  # Redis is now more than the timeout behind: none is sent
        refused = await asyncio.gather(
            *(_timed(service.reserve(_request(f"r{i}"))) for i in range(50, 100))
        )
        results = [*await first, *await behind, *refused]
    finally:
        stop.set()
        runs = await spinner
    assert runs >= 2  # Redis was busy throughout, and alive
    slowest = max(elapsed for _, elapsed in results)
    assert slowest <= BOUND, f"slowest answer after {slowest:.2f} s"
    read_results = [r for r, _ in results[: len(reads)]]
    write_results = [r for r, _ in results[len(reads) : len(reads) + len(writes)]]
    reserve_results = [r for r, _ in results[len(reads) + len(writes) :]]
    # Reads changed nothing whatever became of them: never an unknown outcome.
    assert all(isinstance(r, (int, bytes, type(None), DependencyDown)) for r in read_results)
    assert any(isinstance(r, DependencyDown) for r in read_results)  # it was a backlog
    await _drained(port)
    for i, r in enumerate(write_results):
        applied = await direct.exists(f"w{i}")
        if isinstance(r, DependencyDown):
            assert not applied, f"w{i} answered dependency_unavailable and was applied"
        elif not isinstance(r, OutcomeUnknown):
            assert r == [b"OK"]
            assert applied
    assert max(elapsed for _, elapsed in refused) < 0.1  # at once, not after a timeout
    assert all(isinstance(r, OutcomeUnknown) for r in reserve_results[:50]), reserve_results
    assert all(isinstance(r, DependencyDown) for r in reserve_results[50:]), reserve_results
    for i, r in enumerate(reserve_results):
        exists = await direct.exists(keys.record(f"r{i}")) or await direct.hexists(
            keys.holds("A"), f"r{i}"
        )
        if isinstance(r, DependencyDown):
            assert not exists, f"r{i} answered dependency_unavailable and was applied"
        # A retry answers the truth: the written one was made (a replay), the other is new.
        again = await service.reserve(_request(f"r{i}"))
        assert again.reservation is not None
        assert again.replayed == isinstance(r, OutcomeUnknown)
    await service.close()


async def test_a_command_queued_past_the_timeout_is_not_sent(
    port: RedisPort, direct: aioredis.Redis
) -> None:
    """One slot, taken by a slow script: the write queued behind it has waited longer than
    the timeout when the slot frees, so it is refused (nothing sent), not sent late."""
    await direct.config_set("busy-reply-threshold", 60_000)
    batcher = CommandBatcher(
        functools.partial(port.execute, raise_on_error=False), in_flight=1, max_wait=0.3
    )
    runner = asyncio.create_task(batcher.run())
    try:
        slow = asyncio.ensure_future(
            batcher.call_many([("EVAL", _SPIN, 0, 450)], dedupe=False, raise_on_error=False)
        )
        await asyncio.sleep(0.05)  # the script's slice goes out first, alone
        late, elapsed = await _timed(batcher.call_many([("SET", "late", "1")], dedupe=False))
        assert await slow == [1]
        assert isinstance(late, DependencyDown), late
        assert elapsed < 0.45 + 0.2
        assert await direct.get("late") is None
        assert await batcher.call_many([("SET", "late", "2")], dedupe=False) == [b"OK"]
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def _drained(port: RedisPort) -> None:
    """Wait until Redis has run all this gateway sent it: a PING on the same connection is
    answered after everything written before it."""
    started = time.monotonic()
    while True:
        try:
            await port.execute([("PING",)])
            return
        except DependencyDown:  # still behind: nothing new is sent
            assert time.monotonic() - started < 30, "redis never caught up"
            await asyncio.sleep(0.05)


def _request(rid: str) -> ReservationRequest:
    return ReservationRequest(
        reservation_id=rid, lines=[LineRequest(sku="A", location="L1", quantity=1)]
    )


async def test_a_library_call_waits_for_its_turn_and_its_answer_within_one_timeout(
    port: RedisPort, own_redis: OwnRedis, direct: aioredis.Redis
) -> None:
    """redis-py's path (a cluster, TLS): the wait for a slot and the call share one deadline.
    Before, a call that waited its turn most of a timeout then had a whole timeout more."""
    await direct.config_set("busy-reply-threshold", 60_000)
    library = RedisPort(
        aioredis.Redis.from_url(own_redis.url), None, timeout=TIMEOUT, concurrency=1
    )
    try:
        first = asyncio.ensure_future(library.execute([("EVAL", _SPIN, 0, 400)]))
        await asyncio.sleep(0.02)  # it holds the one slot for 0.4 s
        late, elapsed = await _timed(library.execute([("EVAL", _SPIN, 0, 300)]))
        assert await first == [1]
        assert isinstance(late, OutcomeUnknown), late  # sent, cut short: it may still run
        assert elapsed < TIMEOUT + 0.15
        assert library.gate.up  # its turn came late: no stall of Redis
        # The connection cut mid-reply is not reused: no reply lands on the wrong call.
        assert await library.execute([("SET", "after", "1"), ("GET", "after")]) == [True, b"1"]
    finally:
        await library.close()
