"""Graceful shutdown of a real process: SIGTERM lets every request admitted before it finish with
its answer, refuses what comes after, and the process exits cleanly."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from gateway.atp import keys as atp_keys
from tests.conftest import auth
from tests.gateway_proc import GatewayProcess
from tests.helpers import event

REFUSED = -1  # no connection: the listener is closed, the client retries elsewhere
ADMITTED = 20  # requests in their handlers, waiting on Redis, when SIGTERM arrives
AFTER = 20  # requests sent once the gateway has begun refusing
PAUSE_MS = 2000  # how long Redis holds the admitted requests' writes


async def blocked_in_redis(redis: aioredis.Redis) -> bool:
    """Whether a client waits in the paused Redis on a script call: the gateway's writes."""
    return any(
        "b" in c["flags"] and c["cmd"] in {"evalsha", "eval", "fcall"}
        for c in await redis.client_list()
    )


async def test_sigterm_drains_and_exits_zero(
    redis_url: str, redis: aioredis.Redis, postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    # Redis may hold a write for the whole pause and more without the gateway giving up on it.
    gateway = GatewayProcess(redis_url, postgres_dsn, GATEWAY_REDIS_TIMEOUT_SECONDS="10")
    try:
        async with aiohttp.ClientSession() as session:

            async def call(method: str, path: str, **kwargs: Any) -> int:
                try:
                    async with session.request(method, gateway.url + path, **kwargs) as r:
                        await r.read()
                        return r.status
                except aiohttp.ClientError:
                    return REFUSED

            def read() -> asyncio.Future[int]:
                return asyncio.ensure_future(
                    call("GET", "/v1/availability?sku=A&location=L", headers=auth("storefront"))
                )

            def write(i: int) -> asyncio.Future[int]:
                body = {"events": [event(f"drain-{i}", "snapshot", i, 0, sku=f"D{i}")]}
                return asyncio.ensure_future(
                    call("POST", "/v1/stock-events", json=body, headers=auth("feed"))
                )

            before = await asyncio.gather(*(read() for _ in range(50)))
            assert before == [200] * 50
            # Admitted: past the guard, in their handlers, their writes held by a paused Redis
            # while SIGTERM arrives.
            await redis.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
            admitted = [write(i) for i in range(ADMITTED)]
            for _ in range(100):
                if await blocked_in_redis(redis):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the writes never reached Redis")
            await asyncio.sleep(0.2)  # the last of them are in their handlers too
            gateway.proc.send_signal(signal.SIGTERM)
            # The gateway's loop handles SIGTERM soon, not at once: an unknown route (no Redis
            # involved) answers 404 until then, then is refused like everything else.
            for _ in range(200):
                if await call("GET", "/v1/not-a-route", headers=auth("storefront")) != 404:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("still taking new requests 2 s after SIGTERM")
            after = await asyncio.gather(*(read() for _ in range(AFTER)))
            early = [w.result() for w in admitted if w.done()]
            assert early == [], "admitted requests ended before SIGTERM took effect"
            drained = await asyncio.gather(*admitted)
            # Every request admitted before SIGTERM got its answer, and only those after it were
            # refused (503 on a connection kept alive, else no connection); none hung.
            assert drained == [200] * ADMITTED
            assert set(after) <= {503, REFUSED}
        code = await asyncio.to_thread(gateway.proc.wait, 15)
        assert code == 0
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
        gateway.stop()
    # The drained requests' work was done, not only answered.
    for i in (1, ADMITTED - 1):
        assert await redis.hget(atp_keys.position(f"D{i}"), "oh:L1") == str(i)
