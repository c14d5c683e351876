"""The same contract on a real 3-master Redis Cluster (GATEWAY_REDIS_CLUSTER=1)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio.cluster import RedisCluster

from gateway.app import create_app
from gateway.atp import keys as atp_keys
from gateway.reservation import keys
from tests.conftest import auth, make_settings
from tests.helpers import availability, event, post_events, reserve, stock
from tests.reservation_scenarios import SCENARIOS, Scenario

Client = TestClient[Any, Any]


@pytest.fixture
async def cluster_client(
    cluster: RedisCluster, cluster_url: str, postgres_dsn: str, pg: asyncpg.Connection
) -> AsyncIterator[Client]:
    settings = make_settings(cluster_url, postgres_dsn, redis_cluster=True)
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


async def _nodes_of(cluster: RedisCluster, skus: list[str]) -> set[str]:
    return {cluster.get_node_from_key(atp_keys.position(s)).name for s in skus}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
async def test_reservation_contract_on_cluster(
    cluster_client: Client, cluster: RedisCluster, scenario: Scenario
) -> None:
    await scenario(cluster_client, cluster)


async def test_multi_node_all_or_nothing(cluster_client: Client, cluster: RedisCluster) -> None:
    skus = [f"SKU-{i}" for i in range(12)]
    assert len(await _nodes_of(cluster, skus)) == 3  # the lines really span the nodes
    await post_events(
        cluster_client,
        [
            event(f"s-{s}", "snapshot", 1 if s == "SKU-11" else 5, 0, sku=s, location="L")
            for s in skus
        ],
    )
    lines = [{"sku": s, "location": "L", "quantity": 2} for s in skus]
    resp = await reserve(cluster_client, "multi", lines)
    assert resp.status == 409
    assert (await resp.json())["lines"] == [
        {"sku": "SKU-11", "location": "L", "requested": 2, "available": 1}
    ]
    for s in skus:  # what was held on the other nodes was released
        assert await cluster.hlen(keys.holds(s)) == 0
        assert await cluster.hget(atp_keys.position(s), "res:L") in (None, "0")
    ok = await reserve(cluster_client, "multi-ok", lines[:11])
    assert ok.status == 201
    items = (await availability(cluster_client, sku=skus, location="L"))["items"]
    assert [i["reserved"] for i in items] == [2] * 11 + [0]
    rel = await cluster_client.delete("/v1/reservations/multi-ok", headers=auth("storefront"))
    assert (await rel.json())["status"] == "released"
    items = (await availability(cluster_client, sku=skus, location="L"))["items"]
    assert [i["reserved"] for i in items] == [0] * 12


async def test_idempotent_retries_on_cluster(cluster_client: Client) -> None:
    await stock(cluster_client, A__L1=100, B__L1=100)
    lines = [
        {"sku": "A", "location": "L1", "quantity": 3},
        {"sku": "B", "location": "L1", "quantity": 4},
    ]
    responses = await asyncio.gather(*(reserve(cluster_client, "same", lines) for _ in range(20)))
    assert [r.status for r in responses] == [201] * 20
    items = (await availability(cluster_client, sku=["A", "B"], location="L1"))["items"]
    assert [i["reserved"] for i in items] == [3, 4]


async def test_a_burst_waits_its_turn_instead_of_failing(
    cluster_client: Client, cluster: RedisCluster
) -> None:
    """Item 8: 400 reservations at once, each over SKUs of every node. redis-py's cluster client
    raises MaxConnectionsError (a 500) when a node's pool runs dry; in front of it, calls wait
    their turn (or are shed as 503 overloaded, with Retry-After), never fail."""
    skus = [f"B-{i}" for i in range(6)]
    assert len(await _nodes_of(cluster, skus)) == 3
    await stock(cluster_client, **{f"{s}__L1": 1_000 for s in skus})
    lines = [{"sku": s, "location": "L1", "quantity": 1} for s in skus[:3]]
    responses = await asyncio.gather(
        *(reserve(cluster_client, f"burst-{i}", lines) for i in range(400))
    )
    statuses: dict[int, int] = {}
    for resp in responses:
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        if resp.status == 503:
            body = await resp.json()
            assert body["code"] == "overloaded", body
            assert resp.headers["Retry-After"] == "1"
    assert set(statuses) <= {201, 503}, statuses
    granted = statuses.get(201, 0)
    assert granted >= 300, statuses  # a burst of this size is mostly served, not shed
    items = (await availability(cluster_client, sku=skus[:3], location="L1"))["items"]
    assert [i["reserved"] for i in items] == [granted] * 3


async def test_a_saga_left_pending_is_answered_as_unknown(
    cluster: RedisCluster, cluster_url: str, postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    """A retry that finds its reservation still claimed by a request that died mid-saga waits a
    while, then answers 503 outcome_unknown (retry later), not a 500 from its own timeout; and
    within the Redis timeout plus a second, like every answer (it waited 5 s before)."""
    import msgspec

    from gateway.reservation.schemas import DEFAULT_TTL_SECONDS, ReservationRequest
    from gateway.reservation.service import ReservationService

    lines = [{"sku": "P", "location": "L1", "quantity": 1}]
    request = msgspec.convert({"reservation_id": "left", "lines": lines}, ReservationRequest)
    fingerprint = ReservationService._fingerprint(request, DEFAULT_TTL_SECONDS)
    lease_ends = "99999999999999"  # the year 5138: the sweeper leaves it alone
    await cluster.hset(
        keys.record("left"),
        mapping={"st": "pending", "fp": fingerprint, "exp": lease_ends, "skus": '["P"]'},
    )
    timeout = 0.5
    settings = make_settings(
        cluster_url, postgres_dsn, redis_cluster=True, redis_timeout_seconds=timeout
    )
    async with TestClient(TestServer(create_app(settings))) as client:
        started = time.monotonic()
        resp = await reserve(client, "left", lines)
        elapsed = time.monotonic() - started
        assert resp.status == 503, await resp.text()
        assert (await resp.json())["code"] == "outcome_unknown"
        assert resp.headers["Retry-After"] == "1"
    assert timeout <= elapsed <= timeout + 1.0
