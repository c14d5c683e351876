"""The Redis adapter: tick batching, dedup, failures reach every waiter, NOSCRIPT recovery."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.adapters import scripts as scripts_module
from gateway.adapters.batcher import CommandBatcher
from gateway.adapters.redis import RedisPort
from gateway.adapters.reserve_coalescer import ReserveCoalescer
from gateway.adapters.scripts import ScriptRegistry
from gateway.atp.events import EventApplier
from gateway.errors import (
    DependencyDown,
    GatewayError,
    OutcomeUnknown,
    Overloaded,
    ShuttingDown,
)
from gateway.reservation.keys import UNVERIFIED
from tests.helpers import stock_event


@pytest.fixture
async def port(redis_url: str, redis: aioredis.Redis) -> AsyncIterator[RedisPort]:
    p = RedisPort.from_url(redis_url, cluster=False)
    yield p
    await p.close()


async def test_one_round_trip_per_tick_with_dedup(port: RedisPort, redis: aioredis.Redis) -> None:
    await redis.set("k", "v")
    sent: list[int] = []

    async def counting(commands: Sequence[tuple[Any, ...]], since: float) -> list[Any]:
        sent.append(len(commands))
        return await port.execute(commands, since, raise_on_error=False)

    batcher = CommandBatcher(counting)
    runner = asyncio.create_task(batcher.run())
    try:
        replies = await asyncio.gather(
            *(batcher.call("GET", "k") for _ in range(200)),
            batcher.call_many([("GET", "missing"), ("GET", "k")]),
        )
        assert replies[:200] == [b"v"] * 200
        assert replies[200] == [None, b"v"]
        assert sent == [2]  # 201 requests, one round trip, two distinct commands
        with pytest.raises(GatewayError, match="WRONGTYPE") as failed:
            await batcher.call("HGET", "k", "field")  # WRONGTYPE reaches its waiter
        assert failed.value.http_status == 500  # damaged data, not an outage
        assert await batcher.call("GET", "k") == b"v"  # and the batcher goes on
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def test_overload_is_refused_not_queued(port: RedisPort) -> None:
    batcher = CommandBatcher(port.execute, max_pending=5)
    waiting = [asyncio.ensure_future(batcher.call("PING")) for _ in range(5)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await batcher.call("PING")
    for w in waiting:
        w.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_scripts_survive_a_flushed_script_cache(
    port: RedisPort, redis: aioredis.Redis
) -> None:
    applier = EventApplier(ScriptRegistry(port, "gateway.atp"), horizon_seconds=3600)
    now = datetime.now(UTC)
    assert (await applier.apply([stock_event("e1", "snapshot", 5, now)])).applied == 1
    await redis.script_flush()
    assert (
        await applier.apply([stock_event("e2", "adjustment", 2, now + timedelta(milliseconds=1))])
    ).applied == 1
    assert await redis.hget("atp:{H}:p", "oh:L") == "7"


async def test_a_call_run_at_once_skips_the_batch_and_survives_a_flushed_script_cache(
    port: RedisPort, redis: aioredis.Redis
) -> None:
    batched: list[int] = []

    async def counting(commands: Sequence[tuple[Any, ...]], since: float) -> list[Any]:
        batched.append(len(commands))
        return await port.execute(commands, since, raise_on_error=False)

    batcher = CommandBatcher(counting)
    runner = asyncio.create_task(batcher.run())
    scripts = ScriptRegistry(port, "gateway.reservation", batcher)
    await redis.zadd(UNVERIFIED, {"r1": 1})
    try:
        await scripts.run("unverified.lua", [([UNVERIFIED], ["0", "10"])])  # loaded, connected
        batched.clear()
        assert await scripts.run_at_once("unverified.lua", [UNVERIFIED], ["0", "10"]) == [
            b"r1",
            b"1",
        ]
        assert batched == []  # written by the caller, not with the next batch
        await redis.script_flush()
        assert await scripts.run_at_once("unverified.lua", [UNVERIFIED], ["0", "10"]) == [
            b"r1",
            b"1",
        ]
        # NOSCRIPT: it never ran, so the general path ran it (NOSCRIPT again, load, run).
        assert batched == [1, 1]
        with pytest.raises(GatewayError) as failed:
            await scripts.run_at_once("unverified.lua", [UNVERIFIED], ["not a number", "10"])
        assert failed.value.http_status == 500  # a script error is a defect, not an outage
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def test_calls_run_at_once_are_bounded(
    port: RedisPort, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripts = ScriptRegistry(port, "gateway.reservation")
    await scripts.run("unverified.lua", [([UNVERIFIED], ["0", "1"])])  # loaded, connected
    monkeypatch.setattr(scripts_module, "MAX_AT_ONCE", 2)
    calls = [
        asyncio.ensure_future(scripts.run_at_once("unverified.lua", [UNVERIFIED], ["0", "1"]))
        for _ in range(2)
    ]
    await asyncio.sleep(0)  # both written, their replies not read yet
    with pytest.raises(Overloaded):  # refused before anything is written
        await scripts.run_at_once("unverified.lua", [UNVERIFIED], ["0", "1"])
    assert await asyncio.gather(*calls) == [[], []]
    assert await scripts.run_at_once("unverified.lua", [UNVERIFIED], ["0", "1"]) == []


async def test_heavy_commands_go_out_in_slices(port: RedisPort) -> None:
    sent: list[int] = []

    async def counting(commands: Sequence[tuple[Any, ...]], since: float) -> list[Any]:
        sent.append(len(commands))
        return await port.execute(commands, since, raise_on_error=False)

    batcher = CommandBatcher(counting, slice_cost=64)
    runner = asyncio.create_task(batcher.run())
    try:
        replies = await asyncio.gather(
            *(
                batcher.call_many([("EVAL", "return ARGV[1]", 0, str(i))], dedupe=False)
                for i in range(20)
            )
        )
        assert replies == [[str(i).encode()] for i in range(20)]
        assert sent == [4] * 5  # 16 "reads" each: Redis starts on one slice while we send more
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def test_lean_connection_authenticates_and_selects_db() -> None:
    import shutil

    from gateway.adapters.resp import RespConnection
    from gateway.dev.services import _spawn_redis, _wait_for, free_port

    binary = shutil.which("redis-server")
    assert binary is not None
    port = free_port()
    proc = _spawn_redis(binary, port, "--requirepass", "s3cret")
    try:
        await asyncio.to_thread(_wait_for, "127.0.0.1", port, proc, "redis-server")
        good = RespConnection(f"redis://:s3cret@127.0.0.1:{port}/3")
        assert await good.execute([("SET", "k", "v"), ("GET", "k")]) == [b"OK", b"v"]
        assert b" db=3 " in (await good.execute([("CLIENT", "INFO")]))[0]
        await good.close()
        bad = RespConnection(f"redis://:wrong@127.0.0.1:{port}/0")
        with pytest.raises(DependencyDown, match="setup failed"):
            await bad.execute([("PING",)])
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 5)


async def test_closing_the_coalescer_ends_every_waiter(redis_url: str) -> None:
    # Without the lean connection every call waits on the general path, as a task; closing
    # before those tasks ever ran must still end each reservation's wait, and refuse new ones.
    port = RedisPort(aioredis.Redis.from_url(redis_url), None)
    coalescer = ReserveCoalescer(ScriptRegistry(port, "gateway.reservation"))
    try:
        futures = [coalescer.hold([f"k{i}"], ["v"] * 7, 1) for i in range(40)]
        await asyncio.sleep(0)  # the end-of-tick flush starts the last call's task
        await coalescer.close()
        assert all(f.cancelled() for f in futures)
        assert coalescer._waiting == 0
        with pytest.raises(ShuttingDown):
            coalescer.hold(["k"], ["v"] * 7, 1)
    finally:
        await port.close()


async def test_stopping_the_batcher_ends_every_waiter(port: RedisPort) -> None:
    batcher = CommandBatcher(port.execute, slice_cost=4)
    runner = asyncio.create_task(batcher.run())
    waiting = [asyncio.ensure_future(batcher.call("PING", str(i))) for i in range(40)]
    await asyncio.sleep(0)  # the callers queue their commands
    await asyncio.sleep(0)  # the runner starts slices (tasks that have not run yet)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)


async def test_a_stalled_redis_fails_its_waiters_and_is_replaced() -> None:
    # A server that stops answering (SIGSTOP: the socket stays open, as on a half-open link)
    # must fail the waiting commands after the reply timeout, then a new connection serves.
    import shutil
    import signal

    from gateway.adapters.resp import RespConnection
    from gateway.dev.services import _spawn_redis, _wait_for, free_port

    binary = shutil.which("redis-server")
    assert binary is not None
    port = free_port()
    proc = _spawn_redis(binary, port)
    try:
        await asyncio.to_thread(_wait_for, "127.0.0.1", port, proc, "redis-server")
        conn = RespConnection(f"redis://127.0.0.1:{port}/0", reply_timeout=0.4)
        assert await conn.execute([("PING",)]) == [b"PONG"]
        proc.send_signal(signal.SIGSTOP)
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(DependencyDown, match="no reply from redis"):
                await asyncio.wait_for(conn.execute([("PING",)]), 5)
            assert asyncio.get_running_loop().time() - started < 1.5
        finally:
            proc.send_signal(signal.SIGCONT)
        assert await conn.execute([("PING",)]) == [b"PONG"]
        await conn.close()
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 5)


async def test_a_write_whose_request_is_gone_is_never_sent(
    port: RedisPort, redis: aioredis.Redis
) -> None:
    batcher = CommandBatcher(port.execute)
    write = asyncio.ensure_future(batcher.call_many([("SET", "ghost", "1")], dedupe=False))
    await asyncio.sleep(0)  # queued
    write.cancel()  # its request stopped waiting (a 503 elsewhere, a client gone)
    runner = asyncio.create_task(batcher.run())
    try:
        assert await batcher.call("PING") == b"PONG"  # the batch after it has gone out
        assert await redis.get("ghost") is None
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def test_a_stall_closes_the_gate_and_a_probe_reopens_it() -> None:
    """Sent and unanswered: writes are outcome_unknown, reads of the same batch
    dependency_unavailable; while the gate is closed nothing is sent and every call fails at
    once; the probe, on a fresh connection, opens it when Redis answers again."""
    import shutil
    import signal

    from gateway.dev.services import _spawn_redis, _wait_for, free_port

    binary = shutil.which("redis-server")
    assert binary is not None
    number = free_port()
    proc = _spawn_redis(binary, number)
    port = RedisPort.from_url(f"redis://127.0.0.1:{number}/0", cluster=False, timeout=0.3)
    batcher = CommandBatcher(functools.partial(port.execute, raise_on_error=False))
    runner = asyncio.create_task(batcher.run())
    scripts = ScriptRegistry(port, "gateway.reservation", batcher)
    direct = aioredis.Redis.from_url(f"redis://127.0.0.1:{number}/0")
    try:
        await asyncio.to_thread(_wait_for, "127.0.0.1", number, proc, "redis-server")
        assert await port.ping()
        await scripts.run("unverified.lua", [([UNVERIFIED], ["0", "1"])])  # loaded
        proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            read, write, script = await asyncio.gather(
                batcher.call("GET", "k"),
                batcher.call_many([("SET", "k", "sent")], dedupe=False),
                scripts.run_at_once("unverified.lua", [UNVERIFIED], ["0", "1"]),
                return_exceptions=True,
            )
            assert time.monotonic() - started < 0.3 + 0.25 + 0.2
            assert isinstance(read, DependencyDown)
            assert isinstance(write, OutcomeUnknown)
            assert isinstance(script, OutcomeUnknown)  # written at once, unanswered
            assert not port.gate.up
            started = time.monotonic()
            with pytest.raises(DependencyDown, match="no reply"):
                await port.execute([("SET", "k", "never")])
            with pytest.raises(DependencyDown):
                port.send_now([("SET", "k", "never")])
            with pytest.raises(DependencyDown):  # nothing written while the gate is closed
                await scripts.run_at_once("unverified.lua", [UNVERIFIED], ["0", "1"])
            assert time.monotonic() - started < 0.05  # at once
        finally:
            proc.send_signal(signal.SIGCONT)
        started = time.monotonic()
        while not port.gate.up:
            assert time.monotonic() - started < 2, "the probe did not reopen the gate"
            await asyncio.sleep(0.02)
        assert await direct.get("k") == b"sent"  # what was written ran when Redis woke
        assert await port.execute([("GET", "k")]) == [b"sent"]
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
        await port.close()
        await direct.aclose()
        proc.terminate()
        await asyncio.to_thread(proc.wait, 5)
    assert port.gate._task is None  # closing the port ended its probe


async def test_redis_down_closes_the_gate_and_refusals_are_not_retried() -> None:
    import shutil

    from gateway.dev.services import _spawn_redis, _wait_for, free_port

    number = free_port()
    port = RedisPort.from_url(f"redis://127.0.0.1:{number}/0", cluster=False, timeout=0.3)
    try:
        with pytest.raises(DependencyDown, match="cannot connect"):
            await asyncio.gather(*(port.execute([("SET", "k", str(i))]) for i in range(50)))
        assert not port.gate.up
        binary = shutil.which("redis-server")
        assert binary is not None
        proc = _spawn_redis(binary, number)
        try:
            await asyncio.to_thread(_wait_for, "127.0.0.1", number, proc, "redis-server")
            started = time.monotonic()
            while not port.gate.up:
                assert time.monotonic() - started < 2, "the probe did not reopen the gate"
                await asyncio.sleep(0.02)
            assert await port.execute([("GET", "k")]) == [None]  # none of the 50 was sent
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 5)
    finally:
        await port.close()


async def test_library_calls_beyond_the_pool_wait_then_are_shed(redis_url: str) -> None:
    # The redis-py path (a cluster, TLS): calls beyond the pool's size wait their turn, up to
    # the timeout, then answer 503 overloaded instead of exhausting the pool (a 500).
    port = RedisPort(aioredis.Redis.from_url(redis_url), None, timeout=0.2, concurrency=2)
    try:
        results = await asyncio.gather(*(port.execute([("PING",)]) for _ in range(50)))
        assert results == [[True]] * 50  # a burst waits its turn
        later = asyncio.get_running_loop().time() + 60
        await port._limiter.acquire(later)
        await port._limiter.acquire(later)  # the pool is busy for longer than the wait
        try:
            started = time.monotonic()
            with pytest.raises(Overloaded):
                await port.execute([("PING",)])
            assert 0.15 < time.monotonic() - started < 0.5
        finally:
            port._limiter.release()
            port._limiter.release()
    finally:
        await port.close()
