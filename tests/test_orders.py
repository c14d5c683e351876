"""Orders in: confirming a reservation into the order buffer, ordering without a hold, reading an
order, and the mender that finishes a row whose hold did not move (a crash between the writes)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from gateway.adapters.outbox import PostgresOutbox
from gateway.app import create_app
from gateway.buffering.intake import OrderIntake
from gateway.buffering.mender import mend_once, take_back_moves
from gateway.buffering.schemas import ConfirmRequest
from gateway.errors import DependencyDown, GatewayError, OutcomeUnknown
from gateway.http.state import ORDER_INTAKE, POSTGRES, RESERVATIONS_SERVICE
from gateway.reservation import keys
from tests.conftest import auth, make_settings
from tests.helpers import (
    ORDER_HOLDS,
    SWEEP_PROMISE,
    assert_problem,
    availability,
    backdate_expiry,
    eventually,
    insert_pending_order,
    reserve,
    stock,
)

Client = TestClient[Any, Any]
LINE = [{"sku": "A", "location": "L1", "quantity": 3}]


async def confirm(client: Client, rid: str, order_id: str, order: Any = None) -> Any:
    body = {"order_id": order_id, "order": {"customer_id": "c1"} if order is None else order}
    return await client.post(
        f"/v1/reservations/{rid}/confirm", json=body, headers=auth("storefront")
    )


async def figures(client: Client) -> tuple[int, int]:
    (item,) = (await availability(client, sku="A", location="L1"))["items"]
    return item["reserved"], item["committed"]


async def test_confirm_commits_the_hold_and_queues_the_order(
    client: Client, pg: asyncpg.Connection
) -> None:
    await stock(client, A__L1=10)
    assert (await reserve(client, "r1", LINE)).status == 201
    order = {"customer_id": "c1", "total": {"amount": "12.50", "currency": "EUR"}, "x": [1, 2]}
    resp = await confirm(client, "r1", "o1", order)
    assert resp.status == 202
    receipt = await resp.json()
    assert receipt == {"order_id": "o1", "reservation_id": "r1", "status": "queued"}
    assert await figures(client) == (0, 3)

    # The moved mark is written after the answer (the order is safe once row and hold are done).
    async def marked() -> bool:
        return await pg.fetchval(f"SELECT hold_state FROM {ORDER_HOLDS}") == "moved"

    await eventually(marked, 2, "the row marked moved")
    row = await pg.fetchrow(f"SELECT body, lines, hold_state, customer_id FROM {ORDER_HOLDS}")
    assert row["customer_id"] == "c1"
    assert json.loads(row["body"]) == order  # passed on as received
    assert json.loads(row["lines"]) == [{"sku": "A", "location": "L1", "quantity": 3}]
    # The same confirm again: the same order, the same body, nothing committed twice.
    again = await confirm(client, "r1", "o1", order)
    assert again.status == 200
    assert await again.json() == receipt
    assert await figures(client) == (0, 3)
    got = await client.get("/v1/orders/o1", headers=auth("storefront"))
    view = await got.json()
    assert got.status == 200, view
    assert view["status"] == "queued"
    assert view["attempts"] == 0
    assert view["reservation_id"] == "r1"
    assert "created_at" in view
    reservation = await client.get("/v1/reservations/r1", headers=auth("storefront"))
    assert (await reservation.json())["status"] == "confirmed"


async def test_confirmed_moves_are_unlisted_together_soon(
    client: Client, redis: aioredis.Redis
) -> None:
    """A confirm's move is listed until its row is known to be written; the listings of many
    confirms go in one unlisting call shortly after their answers, not one call each, and
    not only when the mender passes (its grace is many seconds)."""
    await stock(client, A__L1=100)
    rids = [f"u{i}" for i in range(20)]
    for rid in rids:
        assert (
            await reserve(client, rid, [{"sku": "A", "location": "L1", "quantity": 1}])
        ).status == 201
    before = (await redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    batches = await _postgres_batches(client)
    answers = await asyncio.gather(*(confirm(client, rid, f"o-{rid}") for rid in rids))
    assert [r.status for r in answers] == [202] * len(rids)
    after = await _postgres_batches(client)
    statements, writes = after[0] - batches[0], after[1] - batches[1]
    assert writes == len(rids)  # every row, group-committed
    assert 1 <= statements <= writes

    async def unlisted() -> bool:
        return await redis.zcard(keys.UNVERIFIED) == 0

    await eventually(unlisted, 2, "the confirmed moves unlisted")
    scripts = (await redis.info("commandstats"))["cmdstat_evalsha"]["calls"] - before
    # One settle script per confirm, and far fewer unlisting calls than confirms.
    assert len(rids) < scripts <= len(rids) + 3
    # Unlisted, a confirmed record ages out like any settled one.
    assert all([await redis.pttl(keys.record(rid)) > 0 for rid in rids])


async def _postgres_batches(client: Client) -> tuple[float, float]:
    """The group-commit statements so far, and the writes they carried (/metrics)."""
    text = await (await client.get("/metrics")).text()
    figures = dict(
        line.rsplit(" ", 1)
        for line in text.splitlines()
        if line.startswith("gateway_postgres_batch_writes_")
    )
    return (
        float(figures.get("gateway_postgres_batch_writes_count", 0)),
        float(figures.get("gateway_postgres_batch_writes_sum", 0)),
    )


async def test_racing_confirms_make_one_order(client: Client, pg: asyncpg.Connection) -> None:
    await stock(client, A__L1=10)
    assert (await reserve(client, "r1", LINE)).status == 201
    answers = await asyncio.gather(*(confirm(client, "r1", "o1") for _ in range(10)))
    bodies = [await r.text() for r in answers]
    assert sorted(r.status for r in answers) == [200] * 9 + [202], [
        (r.status, b) for r, b in zip(answers, bodies, strict=True) if r.status != 200
    ]
    assert await pg.fetchval("SELECT count(*) FROM orders") == 1
    assert await figures(client) == (0, 3)


async def test_idempotency_conflicts(client: Client) -> None:
    await stock(client, A__L1=10)
    for rid in ("r1", "r2"):
        assert (await reserve(client, rid, [{**LINE[0], "quantity": 1}])).status == 201
    assert (await confirm(client, "r1", "o1")).status == 202
    other_reservation = await confirm(client, "r2", "o1")
    assert_problem(await other_reservation.json(), 409, "idempotency_conflict")
    other_order = await confirm(client, "r1", "o2")
    assert_problem(await other_order.json(), 409, "idempotency_conflict")
    assert await figures(client) == (1, 1)  # r2 still held, r1 committed once


async def test_a_reservation_not_held_is_refused(client: Client, redis: aioredis.Redis) -> None:
    await stock(client, A__L1=10)
    missing = await confirm(client, "nope", "o0")
    assert_problem(await missing.json(), 404, "not_found")
    assert (await reserve(client, "released", LINE)).status == 201
    await client.delete("/v1/reservations/released", headers=auth("storefront"))
    refused = await confirm(client, "released", "o1")
    assert_problem(await refused.json(), 409, "reservation_not_held")
    assert (await reserve(client, "late", LINE)).status == 201
    await backdate_expiry(redis, "late", 3600)
    expired = await confirm(client, "late", "o2")
    assert_problem(await expired.json(), 409, "reservation_not_held")

    async def nothing_committed() -> bool:
        return await figures(client) == (0, 0)  # the sweeper releases the lapsed hold

    await eventually(nothing_committed, SWEEP_PROMISE, "the lapsed hold released, none committed")
    for order_id in ("o0", "o1", "o2"):
        got = await client.get(f"/v1/orders/{order_id}", headers=auth("storefront"))
        assert got.status == 404


async def test_bad_orders_change_nothing(client: Client) -> None:
    await stock(client, A__L1=10)
    assert (await reserve(client, "r1", LINE)).status == 201
    for body in (
        {"order_id": "o1", "order": [1, 2]},
        {"order_id": "o1", "order": "text"},
        {"order_id": "o1", "order": {"blob": "x" * (256 * 1024)}},
        {"order_id": "", "order": {}},
        {"order": {}},
        {"order_id": "o1", "order": {}, "extra": 1},
    ):
        resp = await client.post(
            "/v1/reservations/r1/confirm", json=body, headers=auth("storefront")
        )
        assert_problem(await resp.json(), 422, "validation_error")
    assert await figures(client) == (3, 0)
    wrong_role = await client.post(
        "/v1/reservations/r1/confirm", json={"order_id": "o1", "order": {}}, headers=auth("feed")
    )
    assert wrong_role.status == 403


async def test_an_order_without_a_hold(client: Client) -> None:
    await stock(client, A__L1=5)
    body = {"order_id": "m1", "lines": LINE, "order": {"channel": "marketplace"}}
    resp = await client.post("/v1/orders", json=body, headers=auth("storefront"))
    receipt = await resp.json()
    assert resp.status == 202, receipt
    assert receipt["order_id"] == "m1"
    assert receipt["status"] == "queued"
    again = await client.post("/v1/orders", json=body, headers=auth("storefront"))
    assert again.status == 200
    assert await again.json() == receipt
    assert await figures(client) == (0, 3)
    too_many = {"order_id": "m2", "lines": [{**LINE[0], "quantity": 3}], "order": {}}
    short = await client.post("/v1/orders", json=too_many, headers=auth("storefront"))
    problem = await short.json()
    assert_problem(problem, 409, "insufficient_stock")
    assert problem["lines"] == [{"sku": "A", "location": "L1", "requested": 3, "available": 2}]
    assert await figures(client) == (0, 3)


async def test_the_mender_finishes_a_row_whose_hold_did_not_move(
    client: Client, pg: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    """The state a crash between the two writes leaves (row committed, hold not moved), made
    directly: the mender moves the hold, or drops the row when the hold lapsed first."""
    await stock(client, A__L1=10)
    for rid in ("kept", "lapsed"):
        assert (await reserve(client, rid, [{**LINE[0], "quantity": 2}])).status == 201
    # Old enough for the pass below (grace 1 s), too young for the app's own mender (its grace
    # is GRACE_SECONDS): a pass of that one between here and the read would move the hold first.
    for order_id, rid in (("o-kept", "kept"), ("o-lapsed", "lapsed")):
        await insert_pending_order(pg, order_id, rid, age_seconds=2)
    await backdate_expiry(redis, "lapsed", 3600)
    assert (await client.get("/v1/orders/o-kept", headers=auth("storefront"))).status == 404
    app = client.server.app
    done = await mend_once(app[ORDER_INTAKE], PostgresOutbox(app[POSTGRES]), grace=1)
    assert done == 2
    rows = dict(await pg.fetch(f"SELECT order_id, hold_state FROM {ORDER_HOLDS}"))
    assert rows == {"o-kept": "moved"}
    assert (await figures(client))[1] == 2  # kept's 2 committed; lapsed's never
    assert (await client.get("/v1/orders/o-kept", headers=auth("storefront"))).status == 200
    # A retry of the lapsed confirm now learns the truth.
    late = await confirm(client, "lapsed", "o-lapsed")
    assert_problem(await late.json(), 409, "reservation_not_held")


async def test_an_order_reads_as_queued_before_its_mark_lands(
    client: Client, pg: asyncpg.Connection
) -> None:
    """The moved mark is written after the 202: until it lands, a read asks Redis, so an
    acknowledged order is never a 404 (and an unacknowledged pending row stays one)."""
    await stock(client, A__L1=10)
    assert (await reserve(client, "r1", LINE)).status == 201
    await insert_pending_order(pg, "o1", "r1")
    assert (await client.get("/v1/orders/o1", headers=auth("storefront"))).status == 404
    assert await client.app[RESERVATIONS_SERVICE].confirm("r1") == "confirmed"  # the hold moved
    resp = await client.get("/v1/orders/o1", headers=auth("storefront"))
    assert resp.status == 200
    assert (await resp.json())["status"] == "queued"
    assert await pg.fetchval(f"SELECT hold_state FROM {ORDER_HOLDS}") == "pending"  # not marked yet


async def test_a_full_buffer_refuses_honestly_and_resumes_below_low_water(
    redis_url: str, postgres_dsn: str, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    """No ERP here: orders stay in the buffer. Past GATEWAY_BUFFER_MAX_DEPTH intake answers 503
    buffer_full with Retry-After and the hold stays; once the buffer drains below the low-water
    mark, the same confirm is taken."""
    settings = make_settings(redis_url, postgres_dsn, buffer_max_depth=5)
    async with TestClient(TestServer(create_app(settings))) as client:
        await stock(client, A__L1=100)
        for i in range(5):
            body = {"order_id": f"f{i}", "lines": LINE, "order": {}}
            assert (
                await client.post("/v1/orders", json=body, headers=auth("storefront"))
            ).status == 202
        assert (await reserve(client, "waiting", LINE)).status == 201

        async def seen_full() -> bool:
            metrics = await (await client.get("/metrics")).text()
            return "gateway_buffer_depth 5.0" in metrics

        await eventually(seen_full, 3, "the buffer's depth read")
        resp = await confirm(client, "waiting", "late")
        assert_problem(await resp.json(), 503, "buffer_full")
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        assert await figures(client) == (3, 15)  # the hold stays in place for a retry
        direct = await client.post(
            "/v1/orders",
            json={"order_id": "f9", "lines": LINE, "order": {}},
            headers=auth("storefront"),
        )
        assert_problem(await direct.json(), 503, "buffer_full")
        assert await figures(client) == (3, 15)  # and an order without a hold held nothing
        await pg.execute("UPDATE orders SET status = 'accepted' WHERE order_id IN ('f0', 'f1')")

        async def taken() -> bool:
            return (await confirm(client, "waiting", "late")).status in (200, 202)

        await eventually(taken, 3, "intake resumed below the low-water mark")
        assert await figures(client) == (0, 18)


class _FailingRows:
    """The order buffer, with the row write failing as ``error`` says (a dependency fault as
    PostgreSQL's port reports it), after the hold moved."""

    def __init__(self, inner: PostgresOutbox, error: GatewayError) -> None:
        self._inner = inner
        self.error: GatewayError | None = error

    async def add_moved(self, order: Any, send_by: float) -> Any:
        if self.error is not None:
            raise self.error
        return await self._inner.add_moved(order, send_by)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _intake(client: Client, rows: _FailingRows) -> OrderIntake:
    app = client.server.app
    return OrderIntake(app[RESERVATIONS_SERVICE], rows, answer_within=6.0)  # type: ignore[arg-type]


async def test_a_row_write_that_applied_nothing_takes_the_move_back_at_once(
    client: Client, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    await stock(client, A__L1=10)
    assert (await reserve(client, "r1", LINE)).status == 201
    down = DependencyDown("postgres: not reachable; nothing was applied", dependency="postgres")
    rows = _FailingRows(PostgresOutbox(client.server.app[POSTGRES]), down)
    intake = _intake(client, rows)
    request = ConfirmRequest(order_id="o1", order=msgspec.Raw(b'{"customer_id":"c1"}'))
    with pytest.raises(DependencyDown):
        await intake.confirm("r1", request)
    # Nothing applied: the hold is held as before, nothing listed, no row.
    assert await figures(client) == (3, 0)
    assert await redis.hget(keys.record("r1"), keys.STATUS) == "held"
    assert await redis.zcard(keys.UNVERIFIED) == 0
    assert await pg.fetchval("SELECT count(*) FROM orders") == 0
    # Checkout's retry goes through.
    rows.error = None
    assert (await intake.confirm("r1", request)).status == 202
    assert await figures(client) == (0, 3)


async def test_a_move_whose_row_is_unknown_is_finished_by_a_retry_or_taken_back(
    client: Client, redis: aioredis.Redis, pg: asyncpg.Connection
) -> None:
    await stock(client, A__L1=10)
    for rid in ("kept", "dropped"):
        assert (await reserve(client, rid, LINE)).status == 201
    unknown = OutcomeUnknown("postgres: no answer to COMMIT", dependency="postgres")
    rows = _FailingRows(PostgresOutbox(client.server.app[POSTGRES]), unknown)
    intake = _intake(client, rows)

    def request(order_id: str) -> ConfirmRequest:
        return ConfirmRequest(order_id=order_id, order=msgspec.Raw(b'{"customer_id":"c1"}'))

    for rid in ("kept", "dropped"):
        with pytest.raises(OutcomeUnknown):
            await intake.confirm(rid, request(f"o-{rid}"))
    # Moved and listed, no rows: not orders yet.
    assert await figures(client) == (0, 6)
    assert sorted(await redis.zrange(keys.UNVERIFIED, 0, -1)) == ["dropped", "kept"]
    rows.error = None
    assert (await intake.confirm("kept", request("o-kept"))).status == 202  # the retry
    outbox = PostgresOutbox(client.server.app[POSTGRES])
    # Young moves are left alone (their confirms may still be writing the rows).
    assert await take_back_moves(intake.reservations, outbox, grace=60) == 0
    assert await figures(client) == (0, 6)
    assert await take_back_moves(intake.reservations, outbox, grace=0) == 1
    assert await redis.zcard(keys.UNVERIFIED) == 0
    assert await redis.hget(keys.record("dropped"), keys.STATUS) == "held"
    assert await redis.hget(keys.record("kept"), keys.STATUS) == "confirmed"
    assert await figures(client) == (3, 3)
    rows_now = await pg.fetch("SELECT order_id FROM orders ORDER BY order_id")
    assert [r[0] for r in rows_now] == ["o-kept"]
    # The held reservation can be confirmed again.
    assert (await intake.confirm("dropped", request("o-dropped"))).status == 202
    assert await figures(client) == (0, 6)
