"""Reservation scenarios that hold on one Redis node and on a cluster alike: each takes the test
client and a Redis client of the same deployment, and both ``test_reservations`` and
``test_cluster`` run them all."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tests.conftest import auth
from tests.helpers import (
    SWEEP_PROMISE,
    Client,
    assert_problem,
    availability,
    backdate_expiry,
    eventually,
    reserve,
    stock,
)

Store = aioredis.Redis | RedisCluster


async def hold_counts_in_reserved_and_release(client: Client, redis: Store) -> None:
    await stock(client, A__L1=10, B__L1=5)
    resp = await reserve(
        client,
        "r1",
        [
            {"sku": "A", "location": "L1", "quantity": 3},
            {"sku": "B", "location": "L1", "quantity": 5},
        ],
    )
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["reservation_id"] == "r1"
    assert body["status"] == "held"
    assert body["lines"] == [
        {"sku": "A", "location": "L1", "quantity": 3},
        {"sku": "B", "location": "L1", "quantity": 5},
    ]
    assert body["expires_at"].endswith("+00:00")
    items = (await availability(client, sku=["A", "B"], location="L1"))["items"]
    assert [(i["reserved"], i["available"]) for i in items] == [(3, 7), (5, 0)]
    got = await client.get("/v1/reservations/r1", headers=auth("storefront"))
    assert (await got.json())["status"] == "held"
    for _ in range(2):  # repeating a release is fine
        rel = await client.delete("/v1/reservations/r1", headers=auth("storefront"))
        assert rel.status == 200
        assert (await rel.json())["status"] == "released"
    items = (await availability(client, sku=["A", "B"], location="L1"))["items"]
    assert [(i["reserved"], i["available"]) for i in items] == [(0, 10), (0, 5)]


async def lines_answer_in_request_order(client: Client, redis: Store) -> None:
    # Held lines and shortfalls come back in the order of the request, whichever SKUs (and, on
    # a cluster, nodes) they fall on, in the first answer and in replays.
    await stock(client, **{f"K{i}__L1": 1 for i in range(6)})
    order = [5, 0, 3, 1, 4, 2]
    ok = [{"sku": f"K{i}", "location": "L1", "quantity": 1} for i in order]
    short = [{**line, "quantity": 2} if n % 2 == 0 else line for n, line in enumerate(ok)]
    refused = await reserve(client, "order-short", short)
    assert refused.status == 409
    expected = [
        {"sku": f"K{i}", "location": "L1", "requested": 2, "available": 1} for i in order[::2]
    ]
    assert (await refused.json())["lines"] == expected
    assert (await (await reserve(client, "order-short", short)).json())["lines"] == expected
    held = await reserve(client, "order-ok", ok)
    assert held.status == 201
    expected_held = [{"sku": f"K{i}", "location": "L1", "quantity": 1} for i in order]
    assert (await held.json())["lines"] == expected_held
    assert (await (await reserve(client, "order-ok", ok)).json())["lines"] == expected_held
    got = await client.get("/v1/reservations/order-ok", headers=auth("storefront"))
    assert (await got.json())["lines"] == expected_held


async def safety_stock_limits_holds(client: Client, redis: Store) -> None:
    await stock(client, A__L1=10)
    await client.put(
        "/v1/safety-stock", json={"items": [{"location": "L1", "quantity": 4}]}, headers=auth("ops")
    )
    assert (
        await reserve(client, "s1", [{"sku": "A", "location": "L1", "quantity": 7}])
    ).status == 409
    assert (
        await reserve(client, "s2", [{"sku": "A", "location": "L1", "quantity": 6}])
    ).status == 201


async def group_allocation(client: Client, redis: Store) -> None:
    await stock(client, A__S1=4, A__S2=9, A__S3=6)
    await client.put(
        "/v1/location-groups/g", json={"locations": ["S1", "S2", "S3"]}, headers=auth("ops")
    )
    one = await reserve(client, "g1", [{"sku": "A", "location_group": "g", "quantity": 5}])
    assert (await one.json())["lines"] == [{"sku": "A", "location": "S2", "quantity": 5}]
    # Now S1=4, S2=4, S3=6: 12 needs all three, most available first, ties in group order.
    split = await reserve(client, "g2", [{"sku": "A", "location_group": "g", "quantity": 12}])
    assert split.status == 201
    assert (await split.json())["lines"] == [
        {"sku": "A", "location": "S3", "quantity": 6},
        {"sku": "A", "location": "S1", "quantity": 4},
        {"sku": "A", "location": "S2", "quantity": 2},
    ]
    short = await reserve(client, "g3", [{"sku": "A", "location_group": "g", "quantity": 3}])
    assert short.status == 409
    assert (await short.json())["lines"] == [
        {"sku": "A", "location_group": "g", "requested": 3, "available": 2}
    ]


async def location_and_group_lines_of_one_sku_do_not_double_count(
    client: Client, redis: Store
) -> None:
    await stock(client, A__S1=5, A__S2=1)
    await client.put("/v1/location-groups/g", json={"locations": ["S1", "S2"]}, headers=auth("ops"))
    resp = await reserve(
        client,
        "m1",
        [
            {"sku": "A", "location": "S1", "quantity": 5},
            {"sku": "A", "location_group": "g", "quantity": 2},
        ],
    )
    assert resp.status == 409
    body = await resp.json()
    assert body["lines"] == [{"sku": "A", "location_group": "g", "requested": 2, "available": 1}]


async def extend_and_expiry(client: Client, redis: Store) -> None:
    await stock(client, A__L1=10)
    await reserve(client, "e1", [{"sku": "A", "location": "L1", "quantity": 2}], ttl_seconds=30)
    await reserve(client, "e2", [{"sku": "A", "location": "L1", "quantity": 3}], ttl_seconds=30)
    ext = await client.post(
        "/v1/reservations/e2/extend", json={"ttl_seconds": 60}, headers=auth("storefront")
    )
    assert ext.status == 200
    assert (await ext.json())["status"] == "held"
    # 45 s pass (for the reservations): e1 is 15 s overdue, e2 (extended) has 15 s left.
    await backdate_expiry(redis, "e1", 45)
    await backdate_expiry(redis, "e2", 45)

    async def swept() -> bool:
        return (await availability(client, sku="A", location="L1"))["items"][0]["reserved"] == 3

    await eventually(swept, SWEEP_PROMISE, "the sweeper released e1 alone")
    assert (await (await client.get("/v1/reservations/e1", headers=auth("storefront"))).json())[
        "status"
    ] == "expired"
    assert (await availability(client, sku="A", location="L1"))["items"][0]["reserved"] == 3
    late = await client.post(
        "/v1/reservations/e1/extend", json={"ttl_seconds": 60}, headers=auth("storefront")
    )
    assert late.status == 409
    assert_problem(await late.json(), 409, "not_held")
    rel = await client.delete("/v1/reservations/e1", headers=auth("storefront"))
    assert (await rel.json())["status"] == "expired"

    async def nothing_due() -> bool:
        metrics = await (await client.get("/metrics")).text()
        return "\ngateway_reservations_due 0.0\n" in metrics

    await eventually(nothing_due, SWEEP_PROMISE, "no reservation left due")  # it keeps up


async def confirm_moves_hold_to_committed(client: Client, redis: Store) -> None:
    from gateway.http.state import RESERVATIONS_SERVICE

    await stock(client, A__L1=10)
    await reserve(client, "c1", [{"sku": "A", "location": "L1", "quantity": 4}])
    service = client.server.app[RESERVATIONS_SERVICE]
    assert await service.confirm("c1") == "confirmed"
    assert await service.confirm("c1") == "confirmed"  # idempotent
    item = (await availability(client, sku="A", location="L1"))["items"][0]
    assert (item["reserved"], item["committed"], item["available"]) == (0, 4, 6)
    rel = await client.delete("/v1/reservations/c1", headers=auth("storefront"))
    assert rel.status == 409
    assert_problem(await rel.json(), 409, "already_confirmed")


async def unknown_reservation(client: Client, redis: Store) -> None:
    for method, path in [
        ("GET", "/v1/reservations/nope"),
        ("DELETE", "/v1/reservations/nope"),
        ("POST", "/v1/reservations/nope/extend"),
    ]:
        resp = await client.request(
            method, path, json={"ttl_seconds": 5}, headers=auth("storefront")
        )
        assert resp.status == 404, (method, path)
        assert_problem(await resp.json(), 404, "not_found")


Scenario = Callable[[Client, Store], Awaitable[None]]
SCENARIOS: list[Scenario] = [
    hold_counts_in_reserved_and_release,
    lines_answer_in_request_order,
    safety_stock_limits_holds,
    group_allocation,
    location_and_group_lines_of_one_sku_do_not_double_count,
    extend_and_expiry,
    confirm_moves_hold_to_committed,
    unknown_reservation,
]
