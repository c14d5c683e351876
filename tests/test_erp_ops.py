"""Ops' control of the ERP flow against real Redis, PostgreSQL and ERP stand-ins: the state, the
limits (in force on every gateway within a second, kept in PostgreSQL, back after a FLUSHALL),
pause and resume, dead letters and their replay, and the audit of every change."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import datetime
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.buffering import keys
from gateway.errors import DependencyDown
from gateway.http.state import ERP_CONTROL, ERP_FLOW
from gateway.ports import FlowSettings
from tests.conftest import KEYS, auth
from tests.erp_flow import Client, all_accepted, erp_sim, gateway, place, received
from tests.helpers import assert_problem, eventually, stock

FINGERPRINT = hashlib.sha256(KEYS["ops"].encode()).hexdigest()[:16]
DEFAULTS = {"rate_per_second": 50.0, "burst": 10, "max_concurrency": 16}  # make_settings'
CHANGES = [
    ("PUT", "/v1/ops/erp/limits", {"rate_per_second": 5, "burst": 2, "max_concurrency": 3}),
    ("POST", "/v1/ops/erp/pause", None),
    ("POST", "/v1/ops/erp/resume", None),
    ("POST", "/v1/ops/dead-letters/replay", {"all": True}),
]
READS = [("GET", "/v1/ops/erp"), ("GET", "/v1/ops/dead-letters"), ("GET", "/v1/ops/audit")]


async def ops(
    client: Client, method: str, path: str, body: Any = None, *, status: int = 200, rid: str = ""
) -> Any:
    headers = {**auth("ops"), **({"X-Request-ID": rid} if rid else {})}
    resp = await client.request(method, path, json=body, headers=headers)
    assert resp.status == status, await resp.text()
    return await resp.json()


async def set_limits(client: Client, rate: float, burst: int = 1, concurrency: int = 50) -> float:
    """PUT the limits through ``client``; the wall-clock time its answer came back."""
    body = {"rate_per_second": rate, "burst": burst, "max_concurrency": concurrency}
    view = await ops(client, "PUT", "/v1/ops/erp/limits", body)
    assert view["limits"] == {**body, "rate_per_second": float(rate)}
    return time.time()


def sends_between(sim_orders: list[dict[str, Any]], start: float, end: float) -> int:
    """Orders the ERP stand-in accepted in [start, end) (its accept times, ms precision)."""
    stamps = [datetime.fromisoformat(o["accepted_at"]).timestamp() for o in sim_orders]
    return sum(start <= t < end for t in stamps)


# -- the state and the limits ----------------------------------------------------------------


async def test_the_flow_state_before_any_change_is_the_defaults(client: Client) -> None:
    view = await ops(client, "GET", "/v1/ops/erp")
    assert view == {
        "limits": DEFAULTS,
        "paused": False,
        "effective_rate_per_second": 50.0,
        "in_flight": 0,
        "breaker": "closed",
        "buffer_depth": 0,
        "oldest_age_seconds": 0.0,
        "dead_letters": 0,
        "sent_per_second": 0.0,
        "version": 0,
    }


@pytest.mark.parametrize(("method", "path", "body"), [*CHANGES, *((m, p, None) for m, p in READS)])
async def test_only_ops_keys_reach_the_flow(
    client: Client, pg: asyncpg.Connection, method: str, path: str, body: Any
) -> None:
    for headers, status in (
        ({}, 401),
        ({"Authorization": "Bearer not-a-key"}, 401),
        (auth("storefront"), 403),
        (auth("feed"), 403),
    ):
        resp = await client.request(method, path, json=body, headers=headers)
        assert resp.status == status
        assert resp.content_type == "application/problem+json"
        assert_problem(await resp.json(), status, "unauthorized" if status == 401 else "forbidden")
    assert await pg.fetchval("SELECT count(*) FROM ops_audit") == 0
    assert await pg.fetchval("SELECT count(*) FROM erp_limits") == 0


async def test_a_limit_change_is_recorded_set_in_redis_and_audited(
    client: Client, pg: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    body = {"rate_per_second": 12.5, "burst": 3, "max_concurrency": 4}
    view = await ops(client, "PUT", "/v1/ops/erp/limits", body, rid="change-1")
    assert view["limits"] == body
    assert view["effective_rate_per_second"] == 12.5
    assert view["version"] == 1
    row = await pg.fetchrow("SELECT * FROM erp_limits")
    assert (row["version"], row["rate_per_second"], row["burst"], row["max_concurrency"]) == (
        1,
        12.5,
        3,
        4,
    )
    assert await redis.hgetall(keys.LIMITS) == {
        "rate": "12.5",
        "burst": "3",
        "max_concurrency": "4",
        "paused": "0",
        "version": "1",
    }
    audit = await ops(client, "GET", "/v1/ops/audit")
    assert audit["next"] is None
    (entry,) = audit["items"]
    assert entry["action"] == "limits"
    assert entry["key_fingerprint"] == FINGERPRINT
    assert entry["request_id"] == "change-1"
    assert entry["before"] == {"version": 0, **DEFAULTS, "paused": False}
    assert entry["after"] == {"version": 1, **body, "paused": False}
    assert KEYS["ops"] not in str(entry)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rate_per_second": 0, "burst": 1, "max_concurrency": 1}, "rate_per_second"),
        ({"rate_per_second": -5, "burst": 1, "max_concurrency": 1}, "rate_per_second"),
        ({"rate_per_second": 100_001, "burst": 1, "max_concurrency": 1}, "rate_per_second"),
        ({"rate_per_second": "fast", "burst": 1, "max_concurrency": 1}, "rate_per_second"),
        ({"rate_per_second": 10, "burst": 0, "max_concurrency": 1}, "burst"),
        ({"rate_per_second": 10, "burst": 1.5, "max_concurrency": 1}, "burst"),
        ({"rate_per_second": 10, "burst": 1, "max_concurrency": 0}, "max_concurrency"),
        ({"rate_per_second": 10, "burst": 1, "max_concurrency": 10_001}, "max_concurrency"),
        ({"rate_per_second": 10, "burst": 1}, ""),
        ({"rate_per_second": 10, "burst": 1, "max_concurrency": 1, "x": 1}, ""),
    ],
)
async def test_bad_limits_are_422_and_change_nothing(
    client: Client, pg: asyncpg.Connection, body: dict[str, Any], field: str
) -> None:
    problem = await ops(client, "PUT", "/v1/ops/erp/limits", body, status=422)
    assert_problem(problem, 422, "validation_error")
    assert problem["errors"][0]["field"] == field
    assert (await ops(client, "GET", "/v1/ops/erp"))["limits"] == DEFAULTS
    assert await pg.fetchval("SELECT count(*) FROM erp_limits") == 0
    assert await pg.fetchval("SELECT count(*) FROM ops_audit") == 0


async def test_limits_come_back_from_postgres_to_a_new_gateway_and_after_a_flushall(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    async with gateway(redis_url, postgres_dsn, "") as first:
        await set_limits(first, 7, burst=2, concurrency=5)
        await ops(first, "POST", "/v1/ops/erp/pause")
    wanted = {"rate_per_second": 7.0, "burst": 2, "max_concurrency": 5}
    await redis.flushall()
    async with gateway(redis_url, postgres_dsn, "") as second:
        view = await ops(second, "GET", "/v1/ops/erp")  # copied before it served
        assert (view["limits"], view["paused"], view["version"]) == (wanted, True, 2)
        await redis.flushall()

        async def back() -> bool:
            view = await ops(second, "GET", "/v1/ops/erp")
            return (view["limits"], view["paused"], view["version"]) == (wanted, True, 2)

        waited = await eventually(back, 3, "the limits back in Redis after a FLUSHALL")
        assert waited < 2.0  # about once a second, jittered


async def test_redis_keeps_the_newest_version_unless_the_record_went_back(
    client: Client, pg: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    flow = client.app[ERP_FLOW]
    newer, older = FlowSettings(5, 30.0, 3, 4, False), FlowSettings(4, 9.0, 1, 1, True)
    assert await flow.apply(newer)
    assert not await flow.apply(older)  # a copy read before the change lands after it
    assert (await flow.state()).limits.rate_per_second == 30.0
    assert await flow.apply(older, force=True)
    assert await flow.held_version() == 4
    # The record has no row (version 0) while Redis holds 4: the record went back, it wins.
    assert await client.app[ERP_CONTROL].sync()
    state = await flow.state()
    assert (state.version, state.limits.rate_per_second, state.paused) == (0, 50.0, False)
    assert not await client.app[ERP_CONTROL].sync()  # equal now: nothing to do


async def test_racing_changes_from_two_gateways_leave_redis_as_the_record(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    async with (
        gateway(redis_url, postgres_dsn, "") as one,
        gateway(redis_url, postgres_dsn, "") as two,
    ):
        await asyncio.gather(*(set_limits((one, two)[i % 2], 10 + i) for i in range(12)))
    row = await pg.fetchrow("SELECT version, rate_per_second FROM erp_limits")
    assert row["version"] == 12
    held = await redis.hmget(keys.LIMITS, keys.VERSION, keys.RATE)
    assert held == [str(row["version"]), str(row["rate_per_second"])]
    assert await pg.fetchval("SELECT count(*) FROM ops_audit WHERE action = 'limits'") == 12


async def test_a_change_redis_did_not_take_is_outcome_unknown_and_synced_after(
    client: Client, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    flow = client.app[ERP_FLOW]
    apply = flow.apply

    async def refused(*args: Any, **kwargs: Any) -> bool:
        raise DependencyDown("redis: connection refused; nothing was applied", dependency="redis")

    monkeypatch.setattr(flow, "apply", refused)
    body = {"rate_per_second": 3, "burst": 1, "max_concurrency": 2}
    problem = await ops(client, "PUT", "/v1/ops/erp/limits", body, status=503)
    assert_problem(problem, 503, "outcome_unknown")
    assert await pg.fetchval("SELECT version FROM erp_limits") == 1  # committed, and audited
    assert await pg.fetchval("SELECT count(*) FROM ops_audit") == 1
    monkeypatch.setattr(flow, "apply", apply)

    async def synced() -> bool:
        return (await ops(client, "GET", "/v1/ops/erp"))["limits"]["rate_per_second"] == 3.0

    await eventually(synced, 3, "the committed change copied to Redis by the sync")


# -- pause and resume ------------------------------------------------------------------------


async def test_pause_stops_the_sends_of_every_gateway_and_resume_restarts_them(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    async with erp_sim() as sim:
        url = str(sim.make_url(""))
        async with (
            gateway(redis_url, postgres_dsn, url) as one,
            gateway(redis_url, postgres_dsn, url) as two,
        ):
            await stock(one, A__L1=100)
            paused = await ops(one, "POST", "/v1/ops/erp/pause", rid="pause-1")
            assert (paused["paused"], paused["effective_rate_per_second"]) == (True, 0.0)
            await asyncio.gather(*(place(one, f"p{i}", customer=f"c{i}") for i in range(10)))
            await asyncio.sleep(1.0)
            assert (await received(sim))["accepted"] == 0
            view = await ops(two, "GET", "/v1/ops/erp")
            assert (view["paused"], view["buffer_depth"]) == (True, 10)
            resumed = await ops(two, "POST", "/v1/ops/erp/resume", rid="resume-1")
            assert resumed["paused"] is False
            await all_accepted(sim, pg, 10, within=5)
            view = await ops(one, "GET", "/v1/ops/erp")
            assert (view["buffer_depth"], view["sent_per_second"]) == (0, 1.0)
    rows = await pg.fetch("SELECT action, key_fingerprint, request_id FROM ops_audit ORDER BY id")
    assert [tuple(r) for r in rows] == [
        ("pause", FINGERPRINT, "pause-1"),
        ("resume", FINGERPRINT, "resume-1"),
    ]


async def test_a_pause_holds_through_a_flushall(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    """Redis lost the pause with its data: until the sync puts ops' settings back, no permit is
    granted (reason ``unsynced``), so the writers never fall back to the unpaused defaults."""
    async with erp_sim() as sim, gateway(redis_url, postgres_dsn, str(sim.make_url(""))) as one:
        await stock(one, A__L1=100)
        await ops(one, "POST", "/v1/ops/erp/pause")
        await asyncio.gather(*(place(one, f"f{i}", customer=f"c{i}") for i in range(5)))
        await redis.flushall()
        flow = one.app[ERP_FLOW]
        assert (await flow.acquire(1, "t", 1000)).reason in ("unsynced", "paused")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert (await received(sim))["accepted"] == 0
            await asyncio.sleep(0.05)
        assert (await flow.state()).paused  # back from PostgreSQL
        await ops(one, "POST", "/v1/ops/erp/resume")
        await all_accepted(sim, pg, 5, within=5)


# -- dead letters ----------------------------------------------------------------------------


async def test_dead_letters_page_and_replay(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    """A test's own ERP that refuses every order (422) until told to take them."""
    taking = False

    async def orders(request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        if not taking:
            return web.json_response({"error": "no such customer"}, status=422)
        return web.json_response({"erp_order_id": f"E-{key}"}, status=201)

    app = web.Application()
    app.router.add_post("/orders", orders)
    async with (
        TestClient(TestServer(app)) as erp,
        gateway(redis_url, postgres_dsn, str(erp.make_url(""))) as client,
    ):
        await stock(client, A__L1=100)
        ids = [f"dl{i}" for i in range(5)]
        for order_id in ids:  # one by one: confirm order is page order
            await place(client, order_id, customer=order_id)

        async def all_dead() -> bool:
            return (await ops(client, "GET", "/v1/ops/erp"))["dead_letters"] == 5

        await eventually(all_dead, 10, "five dead letters")
        pages, after = [], None
        while True:
            query = "?limit=2" + (f"&after={after}" if after is not None else "")
            page = await ops(client, "GET", "/v1/ops/dead-letters" + query)
            pages.append([item["order_id"] for item in page["items"]])
            after = page["next"]
            if after is None:
                break
        assert pages == [ids[:2], ids[2:4], ids[4:]]
        item = page["items"][0]
        assert item.keys() == {
            "order_id",
            "reservation_id",
            "attempts",
            "last_error",
            "created_at",
            "updated_at",
        }
        assert (item["attempts"], "422" in item["last_error"]) == (1, True)
        # One of them inspected: the order as it would be sent again, and what it holds.
        detail = await ops(client, "GET", "/v1/ops/dead-letters/dl3")
        assert detail.keys() == item.keys() | {"order", "lines"}
        assert detail["order_id"] == "dl3"
        assert detail["order"] == {"customer_id": "dl3", "ref": "dl3"}
        assert detail["lines"] == [{"sku": "A", "location": "L1", "quantity": 1}]
        assert detail["last_error"] is not None
        assert detail["attempts"] == 1
        for missing in ("nope", "replay"):
            problem = await ops(client, "GET", f"/v1/ops/dead-letters/{missing}", status=404)
            assert problem["code"] == "not_found"

        taking = True
        asked = {"order_ids": ["dl0", "nope", "dl1", "dl0"]}
        result = await ops(client, "POST", "/v1/ops/dead-letters/replay", asked, rid="rp-1")
        assert result == {"replayed": 2, "not_dead_letters": ["nope"], "more": False}

        async def accepted(*order_ids: str) -> bool:
            rows = await pg.fetch(
                "SELECT status, attempts FROM orders WHERE order_id = ANY($1)", list(order_ids)
            )
            return [tuple(r) for r in rows] == [("accepted", 1)] * len(order_ids)

        await eventually(lambda: accepted("dl0", "dl1"), 5, "the replayed orders accepted")
        page = await ops(client, "GET", "/v1/ops/dead-letters")
        assert [i["order_id"] for i in page["items"]] == ids[2:]
        result = await ops(client, "POST", "/v1/ops/dead-letters/replay", {"all": True}, rid="rp-2")
        assert result == {"replayed": 3, "not_dead_letters": [], "more": False}
        await eventually(lambda: accepted(*ids), 5, "every replayed order accepted")
        assert (await ops(client, "GET", "/v1/ops/dead-letters"))["items"] == []
    rows = await pg.fetch("SELECT action, request_id, after FROM ops_audit ORDER BY id")
    assert [(r["action"], r["request_id"]) for r in rows] == [
        ("replay", "rp-1"),
        ("replay", "rp-2"),
    ]
    assert '"not_dead_letters": ["nope"]' in rows[0]["after"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"all": False},
        {"order_ids": []},
        {"order_ids": ["a"], "all": True},
        {"order_ids": [f"o{i}" for i in range(1001)]},
        {"order_ids": [""]},
        {"order_ids": ["a"], "extra": 1},
        {"order_ids": None},
        {"order_ids": None, "all": True},
    ],
)
async def test_a_bad_replay_is_422_and_audits_nothing(
    client: Client, pg: asyncpg.Connection, body: dict[str, Any]
) -> None:
    assert_problem(
        await ops(client, "POST", "/v1/ops/dead-letters/replay", body, status=422),
        422,
        "validation_error",
    )
    assert await pg.fetchval("SELECT count(*) FROM ops_audit") == 0


# -- the audit -------------------------------------------------------------------------------


async def test_the_audit_pages_newest_first(client: Client) -> None:
    await ops(client, "POST", "/v1/ops/erp/pause", rid="a1")
    await ops(client, "POST", "/v1/ops/erp/resume", rid="a2")
    await set_limits(client, 9)
    first = await ops(client, "GET", "/v1/ops/audit?limit=2")
    assert [i["action"] for i in first["items"]] == ["limits", "resume"]
    second = await ops(client, "GET", f"/v1/ops/audit?limit=2&before={first['next']}")
    assert [(i["action"], i["request_id"]) for i in second["items"]] == [("pause", "a1")]
    assert second["next"] is None
    assert second["items"][0]["after"]["paused"] is True


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=501", "limit=abc", "limit=1&limit=2", "before=-1", "after=1", "x=1"],
)
async def test_bad_page_queries_are_422(client: Client, query: str) -> None:
    problem = await ops(client, "GET", f"/v1/ops/audit?{query}", status=422)
    assert_problem(problem, 422, "validation_error")
    assert problem["errors"][0]["field"] == query.partition("=")[0]


# -- the judged one: a limit change in force on both gateways within a second ----------------


async def test_a_limit_change_changes_the_send_rate_of_both_gateways_within_a_second(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    """Two gateways share Redis and PostgreSQL, each with its writer and its own ERP stand-in,
    so each stand-in sees one process's sends. A change through either gateway's endpoint
    changes both processes' send rates within a second, up and down."""
    slow, fast, burst = 4, 40, 1
    async with erp_sim() as sim_one, erp_sim() as sim_two:
        limits = {"erp_rate_per_second": slow, "erp_burst": burst}
        async with (
            gateway(redis_url, postgres_dsn, str(sim_one.make_url("")), **limits) as one,
            gateway(redis_url, postgres_dsn, str(sim_two.make_url("")), **limits) as two,
        ):
            await stock(one, A__L1=10_000)
            await ops(one, "POST", "/v1/ops/erp/pause")
            for start in range(0, 200, 50):
                await asyncio.gather(
                    *(place(one, f"r{i}", customer=f"c{i}") for i in range(start, start + 50))
                )
            await ops(two, "POST", "/v1/ops/erp/resume")
            await asyncio.sleep(2.0)
            sped_up = await set_limits(one, fast, burst)
            await asyncio.sleep(2.0)
            slowed = await set_limits(two, slow, burst)
            await asyncio.sleep(1.5)
        sends = [(await received(sim))["orders"] for sim in (sim_one, sim_two)]

    def per_process(start: float, end: float) -> list[int]:
        return [sends_between(orders, start, end) for orders in sends]

    # Before: both together at most the slow rate (+ burst) in a second.
    assert sum(per_process(sped_up - 1.0, sped_up)) <= slow + burst
    # Sped up: each process alone sends far above the whole slow rate within the first second
    # (about fast/2 per second each; slow for both together is at most 0.75 * 4 + 1 here).
    quick = per_process(sped_up + 0.25, sped_up + 1.0)
    assert all(n >= 8 for n in quick), quick
    assert sum(per_process(sped_up, sped_up + 1.0)) <= fast + burst
    # Slowed down: within the first second both together are back at the slow rate.
    assert sum(per_process(slowed + 0.25, slowed + 1.25)) <= slow + burst + 1, per_process(
        slowed + 0.25, slowed + 1.25
    )
