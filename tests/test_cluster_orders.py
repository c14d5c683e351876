"""Orders on a real 3-master Redis Cluster: confirms across nodes, the writers' shared limit (its
keys share the {erp} slot), commitments cleared by snapshots and restored after a FLUSHALL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from redis.asyncio.cluster import RedisCluster

from gateway.atp import keys as atp_keys
from gateway.buffering import keys as flow_keys
from tests.conftest import auth
from tests.erp_flow import all_accepted, busiest_second, erp_sim, gateway
from tests.helpers import eventually, post_events

SKUS = [f"SKU-{i}" for i in range(6)]


def _snapshot(sku: str, qty: int, when: datetime, tag: str) -> dict[str, Any]:
    return {
        "event_id": f"{tag}-{sku}",
        "type": "snapshot",
        "sku": sku,
        "location": "L",
        "quantity": qty,
        "occurred_at": when.isoformat(),
    }


async def _committed(cluster: RedisCluster) -> dict[str, int]:
    return {s: int(await cluster.hget(atp_keys.position(s), "com:L") or 0) for s in SKUS}


async def test_orders_across_nodes_reach_the_erp_once_within_the_shared_limit(
    cluster: RedisCluster, cluster_url: str, postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    nodes = {cluster.get_node_from_key(atp_keys.position(s)).name for s in SKUS}
    assert len(nodes) == 3  # the orders' lines really span the nodes
    async with (
        erp_sim() as sim,
        gateway(
            cluster_url,
            postgres_dsn,
            str(sim.make_url("")),
            redis_cluster=True,
            erp_rate_per_second=15,
            erp_burst=3,
        ) as client,
    ):
        old = datetime.now(UTC) - timedelta(seconds=30)
        await post_events(client, [_snapshot(s, 100, old, "s0") for s in SKUS])
        lines = [{"sku": s, "location": "L", "quantity": 1} for s in SKUS]

        async def place(i: int) -> None:
            body = {"order_id": f"o{i}", "lines": lines, "order": {"customer_id": f"c{i % 5}"}}
            resp = await client.post("/v1/orders", json=body, headers=auth("storefront"))
            assert resp.status == 202, await resp.text()

        await asyncio.gather(*(place(i) for i in range(30)))
        assert await _committed(cluster) == dict.fromkeys(SKUS, 30)
        await all_accepted(sim, pg, 30, within=15)
        assert await busiest_second(sim) <= 15 + 3
        assert await cluster.exists(flow_keys.FLOW) == 1  # the limiter ran on the cluster

        async def all_waiting() -> bool:
            left = await pg.fetchval("SELECT count(*) FROM orders WHERE commitment <> 'waiting'")
            return bool(left == 0)

        await eventually(all_waiting, 5, "every acceptance in Redis")
        # Lost: the whole cluster flushed. The keeper puts every commitment back.
        await cluster.flushall()

        async def restored() -> bool:
            return await _committed(cluster) == dict.fromkeys(SKUS, 30)

        await eventually(restored, 5, "commitments restored on every node")
        # A snapshot after every acceptance clears them all, on every node.
        await post_events(client, [_snapshot(s, 70, datetime.now(UTC), "s1") for s in SKUS])
        assert await _committed(cluster) == dict.fromkeys(SKUS, 0)

        async def cleared() -> bool:
            left = await pg.fetchval("SELECT count(*) FROM orders WHERE commitment <> 'cleared'")
            return bool(left == 0)

        await eventually(cleared, 5, "the ledger learnt the snapshots cleared them")
