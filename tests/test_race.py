"""Flash sale: 500 clients, 2 gateway processes, 10 SKUs of small stock, and a process killed;
the same sale on a 3-master Redis Cluster.

Checks, for every position: holds never exceed on-hand minus safety stock (sampled all along),
every 201 is backed by a hold when it is answered, every 409 left nothing behind, and once all
holds are released or expired, ``reserved`` is 0 everywhere.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from gateway.atp import keys as atp_keys
from gateway.reservation import keys
from tests.conftest import auth
from tests.gateway_proc import GatewayProcess
from tests.helpers import event

SKUS = [f"HOT-{i}" for i in range(10)]
LOCATIONS = ["L1", "L2"]
CLIENTS = 500
DURATION = 6.0
SAFETY = 2


async def _seed(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], int]:
    rng = random.Random(7)
    stock = {(s, loc): rng.randint(3, 25) for s in SKUS for loc in LOCATIONS}
    events = [
        event(f"seed-{s}-{loc}", "snapshot", q, 0, sku=s, location=loc)
        for (s, loc), q in stock.items()
    ]
    async with session.post(
        f"{url}/v1/stock-events", json={"events": events}, headers=auth("feed")
    ) as r:
        assert r.status == 200
    async with session.put(
        f"{url}/v1/safety-stock",
        json={"items": [{"location": "L2", "quantity": SAFETY}]},
        headers=auth("ops"),
    ) as r:
        assert r.status == 200
    return stock


async def test_flash_sale_two_processes(
    redis_url: str, redis: aioredis.Redis, postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    # The checks of 500 shoppers share a bounded pool, queueing rather than failing.
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_url, decode_responses=True, max_connections=32
    )
    checker = aioredis.Redis(connection_pool=pool)
    try:
        await _flash_sale(checker, [GatewayProcess(redis_url, postgres_dsn) for _ in range(2)])
    finally:
        await checker.aclose()
        await pool.aclose()


async def test_flash_sale_two_processes_on_cluster(
    cluster_url: str,
    cluster: RedisCluster,
    postgres_dsn: str,
    pg: asyncpg.Connection,
) -> None:
    """The same sale, each reservation a saga over the SKUs' nodes. No process is killed here:
    a saga cut short holds its SKUs until its 30 s lease runs out, longer than this test."""
    gateways = [
        GatewayProcess(cluster_url, postgres_dsn, GATEWAY_REDIS_CLUSTER="1") for _ in range(2)
    ]
    await _flash_sale(cluster, gateways, kill=False)


async def _flash_sale(
    redis: aioredis.Redis | RedisCluster, gateways: list[GatewayProcess], *, kill: bool = True
) -> None:
    # The test's own reads of Redis, bounded: a cluster client's pool fails when it runs dry.
    checks = asyncio.Semaphore(32)
    granted: list[tuple[str, list[dict[str, Any]]]] = []
    refused: list[str] = []
    unbacked: list[str] = []
    violations: list[str] = []
    errors: list[str] = []
    stop = asyncio.Event()
    try:
        connector = aiohttp.TCPConnector(limit=CLIENTS)
        async with aiohttp.ClientSession(connector=connector) as session:
            stock = await _seed(session, gateways[0].url)

            async def monitor() -> None:
                while not stop.is_set():
                    for sku in SKUS:
                        fields = [
                            f for loc in LOCATIONS for f in (f"oh:{loc}", f"res:{loc}", f"ss:{loc}")
                        ]
                        values = await redis.hmget(atp_keys.position(sku), fields)
                        for i, loc in enumerate(LOCATIONS):
                            oh, res = int(values[3 * i] or 0), int(values[3 * i + 1] or 0)
                            ss = SAFETY if loc == "L2" else 0
                            if res > oh - ss:
                                violations.append(f"{sku}@{loc}: reserved {res} > {oh} - {ss}")
                    await asyncio.sleep(0.005)

            async def shopper(n: int) -> None:
                rng = random.Random(n)
                i = 0
                while not stop.is_set():
                    i += 1
                    rid = f"c{n}-{i}"
                    chosen = rng.sample(SKUS, rng.randint(1, 3))
                    lines = [
                        {"sku": s, "location": rng.choice(LOCATIONS), "quantity": rng.randint(1, 3)}
                        for s in chosen
                    ]
                    gw = gateways[n % 2]
                    body = {"reservation_id": rid, "lines": lines, "ttl_seconds": rng.randint(1, 2)}
                    try:
                        async with session.post(
                            f"{gw.url}/v1/reservations", json=body, headers=auth("storefront")
                        ) as r:
                            status = r.status
                            await r.read()
                    except aiohttp.ClientError:
                        continue  # the killed process: outcome unknown, covered by the end state
                    if status == 201:
                        async with checks:
                            held = [await redis.hget(keys.holds(ln["sku"]), rid) for ln in lines]
                            record = await redis.hget(keys.record(rid), "st")
                        # Released or expired already (TTL >= 1 s makes that rare) is fine.
                        if None in held and record == "held":
                            unbacked.append(rid)
                        granted.append((rid, lines))
                        if rng.random() < 0.5:
                            try:
                                async with session.delete(
                                    f"{gw.url}/v1/reservations/{rid}", headers=auth("storefront")
                                ) as r:
                                    if r.status != 200:
                                        errors.append(f"DELETE {rid}: HTTP {r.status}")
                            except aiohttp.ClientError:
                                continue
                    elif status == 409:
                        refused.append(rid)
                        async with checks:
                            for ln in lines:
                                if await redis.hexists(keys.holds(ln["sku"]), rid):
                                    violations.append(f"409 {rid} left a hold on {ln['sku']}")
                    else:
                        errors.append(f"{rid}: HTTP {status}")

            async def killer() -> None:
                await asyncio.sleep(DURATION / 2)
                if kill:
                    gateways[1].kill()

            async def timer() -> None:
                await asyncio.sleep(DURATION)
                stop.set()

            async with asyncio.TaskGroup() as tasks:
                for job in (monitor(), killer(), timer(), *(shopper(n) for n in range(CLIENTS))):
                    tasks.create_task(job)

            # Everything granted is released or expired by now plus the sweeper's second.
            deadline = asyncio.get_running_loop().time() + 6
            while True:
                reserved = {
                    (s, loc): int(await redis.hget(atp_keys.position(s), f"res:{loc}") or 0)
                    for s in SKUS
                    for loc in LOCATIONS
                }
                if not any(reserved.values()) or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.2)
    finally:
        for gw in gateways:
            gw.stop()

    assert violations == []
    assert unbacked == []
    assert errors == []
    assert len(granted) > 100
    assert len(refused) > 100  # the sale really ran out
    assert reserved == dict.fromkeys(stock, 0)
    for sku in SKUS:
        assert await redis.hlen(keys.holds(sku)) == 0
    for n in range(keys.BUCKETS):
        assert await redis.zcard(keys.expiry_index(n)) == 0
