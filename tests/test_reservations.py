"""Reservations through the HTTP contract: all or nothing, groups, idempotency, lifecycle."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from gateway.atp import keys as atp_keys
from gateway.metrics import STOCK_SHORTFALL
from gateway.reservation import keys
from tests.conftest import auth
from tests.helpers import event
from tests.test_api import assert_problem, availability, post_events

Client = TestClient[Any, Any]


async def stock(client: Client, **positions: int) -> None:
    """Positions as SKU__LOC=qty."""
    await post_events(
        client,
        [
            event(
                f"stock-{name}",
                "snapshot",
                qty,
                0,
                sku=name.split("__")[0],
                location=name.split("__")[1],
            )
            for name, qty in positions.items()
        ],
    )


async def reserve(client: Client, rid: str, lines: list[dict[str, Any]], **extra: Any) -> Any:
    return await client.post(
        "/v1/reservations",
        json={"reservation_id": rid, "lines": lines, **extra},
        headers=auth("storefront"),
    )


async def test_hold_counts_in_reserved_and_release(client: Client) -> None:
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


async def test_all_or_nothing(client: Client, redis: aioredis.Redis) -> None:
    await stock(client, A__L1=10, B__L1=2)
    resp = await reserve(
        client,
        "r2",
        [
            {"sku": "A", "location": "L1", "quantity": 3},
            {"sku": "B", "location": "L1", "quantity": 5},
        ],
    )
    assert resp.status == 409
    body = await resp.json()
    assert_problem(body, 409, "insufficient_stock")
    assert body["lines"] == [{"sku": "B", "location": "L1", "requested": 5, "available": 2}]
    items = (await availability(client, sku=["A", "B"], location="L1"))["items"]
    assert [i["reserved"] for i in items] == [0, 0]
    assert await redis.hlen(keys.holds("A")) == 0
    # The same request again gives the same 409, even though stock arrived meanwhile.
    await post_events(client, [event("more-b", "adjustment", 10, 5, sku="B", location="L1")])
    again = await reserve(
        client,
        "r2",
        [
            {"sku": "A", "location": "L1", "quantity": 3},
            {"sku": "B", "location": "L1", "quantity": 5},
        ],
    )
    assert again.status == 409
    assert (await again.json())["lines"] == body["lines"]
    assert (await client.get("/v1/reservations/r2", headers=auth("storefront"))).status == 404


async def test_lines_answer_in_request_order(client: Client) -> None:
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


async def test_safety_stock_limits_holds(client: Client) -> None:
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


async def test_group_allocation(client: Client) -> None:
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


async def test_location_and_group_lines_of_one_sku_do_not_double_count(client: Client) -> None:
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


async def test_idempotency(client: Client, redis: aioredis.Redis) -> None:
    await stock(client, A__L1=100)
    lines = [{"sku": "A", "location": "L1", "quantity": 7}]
    responses = await asyncio.gather(*(reserve(client, "same", lines) for _ in range(20)))
    assert [r.status for r in responses] == [201] * 20
    bodies = [await r.json() for r in responses]
    assert all(b == bodies[0] for b in bodies)
    assert (await availability(client, sku="A", location="L1"))["items"][0]["reserved"] == 7
    other = await reserve(client, "same", [{"sku": "A", "location": "L1", "quantity": 8}])
    assert other.status == 409
    assert_problem(await other.json(), 409, "idempotency_conflict")
    assert (await availability(client, sku="A", location="L1"))["items"][0]["reserved"] == 7


async def test_extend_and_expiry(client: Client) -> None:
    await stock(client, A__L1=10)
    await reserve(client, "e1", [{"sku": "A", "location": "L1", "quantity": 2}], ttl_seconds=1)
    await reserve(client, "e2", [{"sku": "A", "location": "L1", "quantity": 3}], ttl_seconds=1)
    ext = await client.post(
        "/v1/reservations/e2/extend", json={"ttl_seconds": 60}, headers=auth("storefront")
    )
    assert ext.status == 200
    assert (await ext.json())["status"] == "held"
    await asyncio.sleep(2.3)  # expiry (1 s) plus the sweeper's promise (within 1 s)
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
    metrics = await (await client.get("/metrics")).text()
    assert "\ngateway_reservations_due 0.0\n" in metrics  # the sweeper keeps up


async def test_confirm_moves_hold_to_committed(client: Client) -> None:
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


async def test_snapshot_below_reserved_keeps_holds(client: Client, redis: aioredis.Redis) -> None:
    await stock(client, A__L1=10)
    await reserve(client, "k1", [{"sku": "A", "location": "L1", "quantity": 8}])
    before = STOCK_SHORTFALL._value.get()
    await post_events(client, [event("recount", "snapshot", 5, 10, sku="A", location="L1")])
    assert STOCK_SHORTFALL._value.get() == before + 1
    item = (await availability(client, sku="A", location="L1"))["items"][0]
    assert (item["on_hand"], item["reserved"], item["available"]) == (5, 8, 0)
    assert await redis.hget(keys.holds("A"), "k1") == "L1=8"
    assert await redis.hget(atp_keys.position("A"), "res:L1") == "8"


@pytest.mark.parametrize(
    "body",
    [
        {"reservation_id": "", "lines": [{"sku": "A", "location": "L", "quantity": 1}]},
        {"reservation_id": "x", "lines": []},
        {"reservation_id": "x", "lines": [{"sku": "A", "location": "L", "quantity": 0}]},
        {"reservation_id": "x", "lines": [{"sku": "A", "quantity": 1}]},
        {
            "reservation_id": "x",
            "lines": [{"sku": "A", "location": "L", "location_group": "G", "quantity": 1}],
        },
        {"reservation_id": "x", "lines": [{"sku": "A", "location": "L", "quantity": 1}] * 2},
        {
            "reservation_id": "x",
            "lines": [{"sku": "A", "location": "L", "quantity": 1}],
            "ttl_seconds": 3601,
        },
        {
            "reservation_id": "x",
            "lines": [{"sku": f"S{i}", "location": "L", "quantity": 1} for i in range(101)],
        },
        {"reservation_id": "x", "lines": [{"sku": "A", "location_group": "nope", "quantity": 1}]},
        {"reservation_id": "x", "lines": [{"sku": "A/B", "location": "L", "quantity": 1}]},
        {"reservation_id": "x", "lines": [{"sku": "A", "location": "L\n", "quantity": 1}]},
        {"reservation_id": "x", "lines": [{"sku": "A", "location_group": "G G", "quantity": 1}]},
        {"reservation_id": "x", "lines": [{"sku": "Ä", "location": "L", "quantity": 1}]},
        {"reservation_id": "x", "lines": [{"sku": "A" * 65, "location": "L", "quantity": 1}]},
    ],
)
async def test_bad_reservations_change_nothing(
    client: Client, redis: aioredis.Redis, body: dict[str, Any]
) -> None:
    await stock(client, A__L=10)
    resp = await client.post("/v1/reservations", json=body, headers=auth("storefront"))
    assert resp.status == 422, await resp.text()
    assert_problem(await resp.json(), 422, "validation_error")
    assert [k async for k in redis.scan_iter(match="atp:rsv:*")] == []
    assert await redis.hget(atp_keys.position("A"), "res:L") is None


async def test_unknown_reservation(client: Client) -> None:
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


async def test_reservations_of_one_tick_stay_independent(
    client: Client, redis: aioredis.Redis
) -> None:
    # Requests answered in the same tick share one script call; each must still be all or nothing
    # on its own and be served in arrival order.
    await stock(client, A__L1=5, B__L1=100)
    lines_for = {
        i: [
            {"sku": "A", "location": "L1", "quantity": 1},
            {"sku": "B", "location": "L1", "quantity": 1},
        ]
        for i in range(12)
    }
    lines_for[3] = [
        {"sku": "B", "location": "L1", "quantity": 1000}
    ]  # short: must not disturb others
    responses = await asyncio.gather(
        *(reserve(client, f"t{i}", lines) for i, lines in lines_for.items())
    )
    statuses = [r.status for r in responses]
    assert statuses.count(201) == 5
    assert statuses[3] == 409
    items = (await availability(client, sku=["A", "B"], location="L1"))["items"]
    assert [i["reserved"] for i in items] == [5, 5]
    held = [f"t{i}" for i, s in enumerate(statuses) if s == 201]
    assert sorted(await redis.hkeys(keys.holds("A"))) == sorted(held)


async def test_reservations_survive_a_flushed_script_cache(
    client: Client, redis: aioredis.Redis
) -> None:
    # Full calls are written at once, outside the batcher: a Redis that lost its scripts
    # (restart, failover) must still hold each reservation exactly once.
    await stock(client, F__L1=100)
    assert (
        await reserve(client, "warm", [{"sku": "F", "location": "L1", "quantity": 1}])
    ).status == 201
    await redis.script_flush()
    responses = await asyncio.gather(
        *(
            reserve(client, f"f{i}", [{"sku": "F", "location": "L1", "quantity": 1}])
            for i in range(40)  # several calls' worth, in one tick
        )
    )
    assert [r.status for r in responses] == [201] * 40
    item = (await availability(client, sku="F", location="L1"))["items"][0]
    assert item["reserved"] == 41
    assert await redis.hlen(keys.holds("F")) == 41


def _outcomes(text: str) -> dict[str, float]:
    found = re.findall(r'^gateway_reservations_total\{outcome="(\w+)"\} (\S+)$', text, re.M)
    return {outcome: float(value) for outcome, value in found}


async def test_outcomes_are_counted(client: Client) -> None:
    before = _outcomes(await (await client.get("/metrics")).text())
    assert set(before) == {"held", "refused", "replayed", "released", "expired", "confirmed"}
    await stock(client, M__L1=1)
    line = [{"sku": "M", "location": "L1", "quantity": 1}]
    assert (await reserve(client, "m1", line)).status == 201
    assert (await reserve(client, "m1", line)).status == 201  # a replay holds nothing new
    assert (await reserve(client, "m2", line)).status == 409
    assert (await reserve(client, "m2", line)).status == 409
    await client.delete("/v1/reservations/m1", headers=auth("storefront"))
    after = _outcomes(await (await client.get("/metrics")).text())
    delta = {k: after[k] - before[k] for k in before}
    assert delta == {
        "held": 1,
        "refused": 1,
        "replayed": 2,
        "released": 1,
        "expired": 0,
        "confirmed": 0,
    }


async def test_any_id_is_a_record_never_an_index(client: Client) -> None:
    # An id spelling another key of its bucket ("expiry" once named the expiry index) must
    # neither fail nor stop expiry for the reservations around it.
    await stock(client, X__L1=30)
    line = [{"sku": "X", "location": "L1", "quantity": 1}]
    ids = ["expiry", "rsv-expiry", ":expiry", *(f"x{i}" for i in range(20))]
    answers = await asyncio.gather(*(reserve(client, rid, line, ttl_seconds=1) for rid in ids))
    assert [a.status for a in answers] == [201] * len(ids)
    assert (await availability(client, sku="X", location="L1"))["items"][0]["reserved"] == 23
    await asyncio.sleep(2.3)  # expiry (1 s) plus the sweeper's promise (within 1 s)
    assert (await availability(client, sku="X", location="L1"))["items"][0]["reserved"] == 0


async def test_release_racing_its_reserve_releases_what_it_held(
    client: Client, redis: aioredis.Redis
) -> None:
    # A release reads the reservation's SKUs, then settles by script. If the reservation is
    # made in between, the script must not mark it released while its holds stay.
    from gateway.adapters.redis import ScriptRegistry
    from gateway.http.state import REDIS
    from gateway.reservation.service import _record_keys

    await stock(client, Y__L1=10)
    assert (
        await reserve(client, "race", [{"sku": "Y", "location": "L1", "quantity": 4}])
    ).status == 201
    scripts = ScriptRegistry(client.app[REDIS], "gateway.reservation")
    stale = [_record_keys("race"), ["race", "release", "60", ""]]  # read before the reserve
    ((status,),) = await scripts.run("settle.lua", [(stale[0], stale[1])])
    assert status == b"retry"
    assert await redis.hget(keys.holds("Y"), "race") == "L1=4"
    rel = await client.delete("/v1/reservations/race", headers=auth("storefront"))
    assert (await rel.json())["status"] == "released"
    assert (await availability(client, sku="Y", location="L1"))["items"][0]["reserved"] == 0
    assert await redis.hget(keys.holds("Y"), "race") is None


async def test_a_failing_reservation_does_not_fail_its_call(
    client: Client, redis: aioredis.Redis
) -> None:
    # Damaged data under one SKU fails that reservation alone (500, nothing held), not the
    # others Redis ran in the same script call.
    await stock(client, G1__L1=10, G2__L1=10)
    await stock(client, HK__L1=10)
    await redis.set(atp_keys.position("BROKEN"), "not a hash")
    await redis.set(keys.holds("HK"), "not a hash either")
    answers = await asyncio.gather(
        reserve(client, "g1", [{"sku": "G1", "location": "L1", "quantity": 1}]),
        reserve(client, "bad", [{"sku": "BROKEN", "location": "L1", "quantity": 1}]),
        reserve(
            client,
            "bad-holds",
            [
                {"sku": "G1", "location": "L1", "quantity": 1},
                {"sku": "HK", "location": "L1", "quantity": 1},
            ],
        ),
        reserve(client, "g2", [{"sku": "G2", "location": "L1", "quantity": 1}]),
    )
    assert [a.status for a in answers] == [201, 500, 500, 201]
    assert_problem(await answers[1].json(), 500, "internal_error")
    assert await redis.exists(keys.record("bad"), keys.record("bad-holds")) == 0
    # No stock stays held by the failed ones (an orphan hold entry holds nothing).
    items = (await availability(client, sku=["G1", "G2", "HK"], location="L1"))["items"]
    assert [i["reserved"] for i in items] == [1, 1, 0]


async def test_holds_indexed_by_an_earlier_version_still_expire(
    client: Client, redis: aioredis.Redis
) -> None:
    # Versions before 2026-12 kept each bucket's expiry index under the records' namespace; the
    # sweeper takes over what it finds there and expires it as usual.
    await stock(client, O__L1=10)
    line = [{"sku": "O", "location": "L1", "quantity": 2}]
    assert (await reserve(client, "old-1", line, ttl_seconds=1)).status == 201
    bucket = keys.bucket("old-1")
    score = await redis.zscore(keys.expiry_index(bucket), "old-1")
    async with redis.pipeline(transaction=True) as pipe:  # as the earlier version had it
        pipe.zrem(keys.expiry_index(bucket), "old-1")
        pipe.zadd(keys.legacy_expiry_index(bucket), {"old-1": score})
        await pipe.execute()
    other = (bucket + 1) % keys.BUCKETS
    await redis.hset(keys.legacy_expiry_index(other), "st", "held")  # an old record "expiry"
    await asyncio.sleep(2.3)  # expiry (1 s) plus the sweeper's promise (within 1 s)
    assert (await availability(client, sku="O", location="L1"))["items"][0]["reserved"] == 0
    assert await redis.exists(keys.legacy_expiry_index(bucket)) == 0
    assert await redis.type(keys.legacy_expiry_index(other)) == "hash"  # left alone


async def test_lines_stored_by_an_earlier_version_answer_in_line_order(
    client: Client, redis: aioredis.Redis
) -> None:
    # An earlier cluster saga stored a reservation's lines SKU by SKU, each with its number.
    stored = (
        '[{"n":0,"sku":"A","location":"L1","quantity":1},'
        '{"n":2,"sku":"A","location":"L2","quantity":3},'
        '{"n":1,"sku":"B","location":"L1","quantity":2}]'
    )
    await redis.hset(
        keys.record("saga-1"),
        mapping={"st": "held", "fp": "x", "resp": stored, "exp": "9999999999999", "skus": "[]"},
    )
    got = await client.get("/v1/reservations/saga-1", headers=auth("storefront"))
    assert (await got.json())["lines"] == [
        {"sku": "A", "location": "L1", "quantity": 1},
        {"sku": "B", "location": "L1", "quantity": 2},
        {"sku": "A", "location": "L2", "quantity": 3},
    ]


async def test_redis_refusing_writes_is_a_503(client: Client, redis: aioredis.Redis) -> None:
    await stock(client, W__L1=10)
    await redis.config_set("maxmemory", "1")
    try:
        resp = await reserve(client, "oom", [{"sku": "W", "location": "L1", "quantity": 1}])
    finally:
        await redis.config_set("maxmemory", "0")
    assert resp.status == 503, await resp.text()
    assert_problem(await resp.json(), 503, "dependency_unavailable")
    assert (await availability(client, sku="W", location="L1"))["items"][0]["reserved"] == 0
