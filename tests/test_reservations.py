"""Reservations through the HTTP contract: all or nothing, groups, idempotency, lifecycle."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from gateway.atp import keys as atp_keys
from gateway.metrics import STOCK_SHORTFALL
from gateway.reservation import keys
from tests.conftest import auth
from tests.helpers import (
    SWEEP_PROMISE,
    assert_problem,
    availability,
    backdate_expiry,
    event,
    eventually,
    post_events,
    reserve,
    stock,
)
from tests.reservation_scenarios import SCENARIOS, Scenario

Client = TestClient[Any, Any]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
async def test_contract(client: Client, redis: aioredis.Redis, scenario: Scenario) -> None:
    await scenario(client, redis)


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


async def test_a_hold_expires_on_the_real_clock(client: Client) -> None:
    # The one expiry test that waits for real time (the others back-date their reservations):
    # a 1 s hold is released by the sweeper no sooner than 1 s, and within its promise.
    await stock(client, RT__L1=5)
    started = time.monotonic()
    line = [{"sku": "RT", "location": "L1", "quantity": 2}]
    assert (await reserve(client, "real-time", line, ttl_seconds=1)).status == 201

    async def released() -> bool:
        return (await availability(client, sku="RT", location="L1"))["items"][0]["reserved"] == 0

    await eventually(released, 1 + SWEEP_PROMISE, "the 1 s hold expired")
    assert time.monotonic() - started >= 1.0
    got = await client.get("/v1/reservations/real-time", headers=auth("storefront"))
    assert (await got.json())["status"] == "expired"


async def test_any_id_is_a_record_never_an_index(client: Client, redis: aioredis.Redis) -> None:
    # An id spelling another key of its bucket ("expiry" once named the expiry index) must
    # neither fail nor stop expiry for the reservations around it.
    await stock(client, X__L1=30)
    line = [{"sku": "X", "location": "L1", "quantity": 1}]
    ids = ["expiry", "rsv-expiry", ":expiry", *(f"x{i}" for i in range(20))]
    answers = await asyncio.gather(*(reserve(client, rid, line, ttl_seconds=60) for rid in ids))
    assert [a.status for a in answers] == [201] * len(ids)
    assert (await availability(client, sku="X", location="L1"))["items"][0]["reserved"] == 23
    for rid in ids:
        await backdate_expiry(redis, rid, 120)

    async def all_released() -> bool:
        return (await availability(client, sku="X", location="L1"))["items"][0]["reserved"] == 0

    await eventually(all_released, SWEEP_PROMISE, "every reservation expired")


async def test_release_racing_its_reserve_releases_what_it_held(
    client: Client, redis: aioredis.Redis
) -> None:
    # A release reads the reservation's SKUs, then settles by script. If the reservation is
    # made in between, the script must not mark it released while its holds stay.
    from gateway.adapters.scripts import ScriptRegistry
    from gateway.http.state import REDIS
    from gateway.reservation.store import record_keys

    await stock(client, Y__L1=10)
    assert (
        await reserve(client, "race", [{"sku": "Y", "location": "L1", "quantity": 4}])
    ).status == 201
    scripts = ScriptRegistry(client.app[REDIS], "gateway.reservation")
    # Read before the reserve: no SKUs, so only the record's keys and the unverified index.
    stale = [[*record_keys("race"), keys.UNVERIFIED], ["race", "release", "60", ""]]
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
