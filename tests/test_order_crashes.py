"""Orders through crashes, against real gateway processes (``python -m gateway serve``) and the
ERP simulator: a gateway SIGKILLed while orders and ERP calls are in flight, a gateway killed
between the order row's commit and the hold's move, and an ERP slower than the orders until the
buffer fills. After each: every order answered 202 reached the ERP once by its key, nothing is
left in the buffer, the rows and the Redis holds agree, and no second of ERP traffic exceeded
rate + burst.

The simulator runs in the test's loop; a gateway starts in a thread (``started``), so the
simulator keeps answering the writers of a gateway already running meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import aiohttp
import asyncpg
import msgspec
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.typedefs import Handler
from aiohttp.web_runner import BaseRunner

from gateway.adapters.outbox import PostgresOrderQueue, PostgresOutbox
from gateway.adapters.postgres import Postgres
from gateway.buffering.backpressure import BackPressure
from gateway.buffering.intake import ANSWER_SLACK_SECONDS, DIRECT_HOLD_SECONDS, OrderIntake
from gateway.buffering.mender import GRACE_SECONDS, INTERVAL
from gateway.buffering.schemas import OrderRequest
from gateway.dev.erp_sim import Knobs, create_sim_app
from gateway.errors import BufferFull
from gateway.http.state import POSTGRES, RESERVATIONS_SERVICE
from gateway.ports import NewOrder
from gateway.reservation import keys
from gateway.reservation.schemas import LineRequest
from gateway.settings import Settings
from tests.conftest import auth
from tests.erp_flow import busiest_second, erp_sim, received
from tests.gateway_proc import GatewayProcess
from tests.helpers import (
    ORDER_HOLDS,
    Client,
    OwnRedis,
    assert_problem,
    availability,
    backdate_expiry,
    event,
    eventually,
    metric_sum,
    stock,
)

RATE, BURST = 40, 5


def take_back_after(settings: Settings) -> float:
    """The mender's grace for a moved hold without a row (gateway/app.py)."""
    answer_within = (
        settings.redis_timeout_seconds + settings.postgres_timeout_seconds + ANSWER_SLACK_SECONDS
    )
    return answer_within + 3 * settings.postgres_timeout_seconds + 1


NO_ANSWER = None  # the request got no answer: the gateway died under it


def erp_env(sim: Client, **extra: Any) -> dict[str, str]:
    settings = {
        "GATEWAY_ERP_URL": str(sim.make_url("")).rstrip("/"),
        "GATEWAY_ERP_RATE_PER_SECOND": RATE,
        "GATEWAY_ERP_BURST": BURST,
        # An order's claim lease is the timeout + 5 s: short, so a dead writer's orders come
        # back within the test; long enough for the simulator's latency on a loaded machine.
        "GATEWAY_ERP_TIMEOUT_SECONDS": 2,
        **extra,
    }
    return {name: str(value) for name, value in settings.items()}


class Calls:
    """Orders the simulator holds now: their calls arrived whole and wait for its answer."""

    def __init__(self) -> None:
        self.inside: set[str] = set()


class _ErpServer(TestServer):
    """Serves as ``gateway erp-sim`` does, and as an ERP would: a call whose client went away
    is still carried out (aiohttp's test server would cancel its handler)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return await super()._make_runner(**{**kwargs, "handler_cancellation": False})


@contextlib.asynccontextmanager
async def watched_erp_sim(**knobs: Any) -> AsyncIterator[tuple[Client, Calls]]:
    """The simulator, naming the calls in its hands: a kill then cuts off calls the ERP still
    carries out, with their answers lost."""
    calls = Calls()

    @web.middleware
    async def watch(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/orders":
            return await handler(request)
        await request.read()  # whole (the handler's own read gets it again)
        key = request.headers["Idempotency-Key"]
        calls.inside.add(key)
        try:
            return await handler(request)
        finally:
            calls.inside.discard(key)

    app = create_sim_app(Knobs(**knobs))
    app.middlewares.append(watch)
    async with TestClient(_ErpServer(app)) as sim:
        yield sim, calls


async def started(redis_url: str, postgres_dsn: str, **env: str) -> GatewayProcess:
    return await asyncio.to_thread(GatewayProcess, redis_url, postgres_dsn, **env)


class Api:
    """The storefront and feed calls of one gateway process."""

    def __init__(self, http: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
        self.http = http
        self.url = gateway.url

    async def call(self, method: str, path: str, role: str, body: Any = None) -> Any:
        async with self.http.request(
            method, self.url + path, json=body, headers=auth(role)
        ) as resp:
            return resp.status, await resp.json(), resp.headers

    async def stock(self, quantity: int) -> None:
        body = {"events": [event("stock-A", "snapshot", quantity, 0, sku="A", location="L1")]}
        status, reply, _ = await self.call("POST", "/v1/stock-events", "feed", body)
        assert status == 200, reply

    async def place(self, order_id: str, customer: str) -> tuple[int, Any, Any]:
        body = {
            "order_id": order_id,
            "lines": [{"sku": "A", "location": "L1", "quantity": 1}],
            "order": {"customer_id": customer, "ref": order_id},
        }
        return await self.call("POST", "/v1/orders", "storefront", body)

    async def reserve(self, rid: str, quantity: int) -> None:
        line = {"sku": "A", "location": "L1", "quantity": quantity}
        body = {"reservation_id": rid, "lines": [line]}
        status, reply, _ = await self.call("POST", "/v1/reservations", "storefront", body)
        assert status == 201, reply

    async def confirm(self, rid: str, order_id: str) -> tuple[int, Any, Any]:
        body = {"order_id": order_id, "order": {"customer_id": f"cust-{rid}"}}
        return await self.call("POST", f"/v1/reservations/{rid}/confirm", "storefront", body)

    async def hold(self, rid: str) -> str:
        """A reservation's status; ``missing`` when there is none."""
        status, reply, _ = await self.call("GET", f"/v1/reservations/{rid}", "storefront")
        return "missing" if status == 404 else str(reply["status"])

    async def figures(self) -> tuple[int, int]:
        path = "/v1/availability?sku=A&location=L1"
        _, reply, _ = await self.call("GET", path, "storefront")
        return reply["items"][0]["reserved"], reply["items"][0]["committed"]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def buffer_empty(pg: asyncpg.Connection) -> bool:
    """No order left waiting, being sent, or with a hold not yet moved."""
    left = await pg.fetchval(
        f"SELECT count(*) FROM {ORDER_HOLDS} WHERE status IN ('queued', 'sending')"
        " OR hold_state = 'pending'"
    )
    return left == 0


async def test_a_gateway_killed_mid_flight_and_restarted_loses_and_repeats_nothing(
    redis_url: str,
    redis: aioredis.Redis,
    postgres_dsn: str,
    pg: asyncpg.Connection,
    http: aiohttp.ClientSession,
) -> None:
    # 24 clients place orders while the ERP takes 200 ms a call; the gateway is killed once 60
    # orders got their 202 and the writer has calls in flight. Customers c0..c7 keep their
    # order: a customer's call cut off by the kill holds its later orders until its lease ends.
    results: dict[str, int | None] = {}
    killing = asyncio.Event()
    async with watched_erp_sim(latency_ms=200) as (sim, calls):
        env = erp_env(sim)
        first = await started(redis_url, postgres_dsn, **env)
        try:
            api = Api(http, first)
            await api.stock(100_000)

            async def shopper(n: int) -> None:
                for i in range(50):  # until the kill; the bound only stops a runaway test
                    if killing.is_set():
                        return
                    order_id = f"k{n}-{i}"
                    results[order_id] = NO_ANSWER
                    try:
                        results[order_id] = (await api.place(order_id, f"c{n % 8}"))[0]
                    except aiohttp.ClientError:
                        return

            shoppers = [asyncio.create_task(shopper(n)) for n in range(24)]

            async def mid_flight() -> bool:
                answered = sum(status == 202 for status in results.values())
                return answered >= 60 and len(calls.inside) >= 2

            await eventually(mid_flight, 15, "orders answered and ERP calls in flight")
            killing.set()
            cut_off = set(calls.inside)
            first.kill()
            await asyncio.gather(*shoppers)
        finally:
            first.stop()
        # What the kill interrupted: ERP calls (their rows stay 'sending' until the lease
        # ends; the ERP may have taken the order already) and requests without an answer.
        in_flight = {
            r[0] for r in await pg.fetch("SELECT order_id FROM orders WHERE status = 'sending'")
        }
        unanswered = {oid for oid, status in results.items() if status is NO_ANSWER}
        answered = {oid for oid, status in results.items() if status is not NO_ANSWER}
        assert in_flight
        assert unanswered  # and requests cut off
        assert {results[oid] for oid in answered} == {202}

        second = await started(redis_url, postgres_dsn, **env)
        try:
            api = Api(http, second)

            # The lease of an interrupted call (timeout + 5 s), the mender's grace for a row
            # whose hold did not move, then the sends at the limit.
            await eventually(partial(buffer_empty, pg), 25, "the buffer empty after the restart")
            rows = dict(await pg.fetch("SELECT order_id, status FROM orders"))
            got = await received(sim)
            deliveries = {o["key"]: o["deliveries"] for o in got["orders"]}
            assert answered <= rows.keys()  # every 202 is an order
            assert rows.keys() - answered <= unanswered  # and nothing else but the unanswered
            assert set(rows.values()) == {"accepted"}
            assert deliveries.keys() == rows.keys()  # each reached the ERP, nothing else did
            assert got["accepted"] == len(rows)  # the ERP created each once
            # A key came twice only for a call the kill cut off: its lease ran out and the ERP
            # answered the resend 409 (it had it already).
            repeated = {key for key, n in deliveries.items() if n != 1}
            assert repeated & cut_off
            assert repeated <= in_flight
            assert all(n <= 2 for n in deliveries.values())
            assert got["duplicates"] == len(repeated)
            assert await busiest_second(sim) <= RATE + BURST

            # The holds agree with the rows: each order's hold committed, no other committed.
            # An unanswered order with no row holds nothing committed: a hold the kill left
            # moved without its row is taken back by the mender once its grace has passed
            # (longer than a row sent in time can take to commit), then waits out its
            # DIRECT_HOLD_SECONDS like a hold that never moved.
            by_order: dict[str, str] = {}

            async def holds_agree() -> bool:
                holds = await asyncio.gather(*(api.hold(f"order:{oid}") for oid in results))
                by_order.update(zip(results, holds, strict=True))
                others = {by_order[oid] for oid in results.keys() - rows.keys()}
                return others <= {"held", "missing"}

            grace = take_back_after(Settings())
            await eventually(holds_agree, grace + INTERVAL + 5, "moves without a row taken back")
            assert {by_order[oid] for oid in rows} == {"confirmed"}
            held = sum(by_order[oid] == "held" for oid in results)
            assert await api.figures() == (held, len(rows))
        finally:
            second.stop()
    assert DIRECT_HOLD_SECONDS > 30  # so no hold above lapsed while the test ran


async def test_rows_left_pending_by_a_row_first_confirm_are_mended(
    own_redis: OwnRedis,
    postgres_dsn: str,
    pg: asyncpg.Connection,
    http: aiohttp.ClientSession,
) -> None:
    """The row-first order of the two writes (a cluster's, and every gateway's before moves
    went first on a single node): a gateway that died after committing two rows, before moving
    their holds, left them pending. A gateway finishes both as intake.py says: the hold still
    held moves to committed and its order is sent once; the hold that lapsed meanwhile is
    released and its row dropped, never acknowledged.

    The rows are written as that confirm writes them (``PostgresOutbox.add``): on a single node
    no confirm stops there any more, so no kill can leave them (the next test kills one
    between the writes of today's order)."""
    redis = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    db = Postgres(postgres_dsn, 3.0)
    await db.start()
    try:
        async with erp_sim() as sim:
            first = await started(own_redis.url, postgres_dsn)
            try:
                api = Api(http, first)
                await api.stock(10)
                await api.reserve("kept", 2)
                await api.reserve("lapsed", 3)
            finally:
                first.stop()
            outbox = PostgresOutbox(db)
            for rid in ("kept", "lapsed"):
                line = [{"sku": "A", "location": "L1", "quantity": 2 if rid == "kept" else 3}]
                order = NewOrder(f"o-{rid}", rid, f"cust-{rid}", b"{}", orjson.dumps(line))
                assert await outbox.add(order) is not None
            await backdate_expiry(redis, "lapsed", 3600)  # its hold lapses before anyone mends

            second = await started(own_redis.url, postgres_dsn, **erp_env(sim))
            restarted = time.monotonic()
            try:
                api = Api(http, second)

                async def mended() -> bool:
                    rows = await pg.fetch(f"SELECT order_id, hold_state, status FROM {ORDER_HOLDS}")
                    return [tuple(r) for r in rows] == [("o-kept", "moved", "accepted")]

                await eventually(mended, GRACE_SECONDS + 10, "the rows mended and the order sent")
                # Within seconds: the mender waits out its grace from the row's commit, then
                # passes about every INTERVAL.
                assert time.monotonic() - restarted <= GRACE_SECONDS + INTERVAL + 3
                orders = (await received(sim))["orders"]
                assert [(o["key"], o["deliveries"]) for o in orders] == [("o-kept", 1)]
                assert await api.hold("kept") == "confirmed"
                assert await api.hold("lapsed") == "expired"
                assert await api.figures() == (0, 2)  # kept's 2 committed; lapsed's 3 released
                status, view, _ = await api.call("GET", "/v1/orders/o-kept", "storefront")
                assert (status, view["status"], view["attempts"]) == (200, "accepted", 1)
                status, _, _ = await api.call("GET", "/v1/orders/o-lapsed", "storefront")
                assert status == 404
                # Checkout's retries learn the truth: the same receipt, or the hold is gone.
                status, receipt, _ = await api.confirm("kept", "o-kept")
                assert (status, receipt["status"]) == (200, "queued")
                status, problem, _ = await api.confirm("lapsed", "o-lapsed")
                assert_problem(problem, 409, "reservation_not_held")
            finally:
                second.stop()
    finally:
        await db.close()
        await redis.aclose()


async def test_a_gateway_killed_after_the_move_before_the_row_is_mended_after_restart(
    own_redis: OwnRedis,
    postgres_dsn: str,
    pg: asyncpg.Connection,
    http: aiohttp.ClientSession,
) -> None:
    """The other order of the two writes (intake.py, single node): two confirms moved their
    holds, their rows never committed, and the gateway is SIGKILLed there. After a restart,
    checkout's retry of one writes its row (202, the hold stays committed); the other, never
    retried, is taken back by the mender once its grace has passed: held again, nothing
    committed, nothing sent, and checkout can still confirm it.

    How they stop there: the test locks ``orders``, so the rows' insert waits while the holds'
    scripts run; after the kill it ends the backend still waiting with the insert, so the rows
    never land (PostgreSQL would otherwise finish a statement whose client is gone)."""
    redis = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    async with erp_sim() as sim:
        crashing = await started(own_redis.url, postgres_dsn, **erp_env(sim))
        try:
            api = Api(http, crashing)
            await api.stock(10)
            await api.reserve("healed", 2)
            await api.reserve("abandoned", 3)
            locker = await asyncpg.connect(postgres_dsn)
            try:
                lock = locker.transaction()
                await lock.start()
                await locker.execute("LOCK TABLE orders IN EXCLUSIVE MODE")
                confirms = [
                    asyncio.create_task(api.confirm(rid, f"o-{rid}"))
                    for rid in ("healed", "abandoned")
                ]

                async def between_the_writes() -> bool:
                    listed = await redis.zrange(keys.UNVERIFIED, 0, -1)
                    waiting = await inserts_waiting(pg)
                    return sorted(listed) == ["abandoned", "healed"] and waiting >= 1

                await eventually(between_the_writes, 10, "both holds moved, the rows waiting")
                assert await api.figures() == (0, 5)
                assert not any(task.done() for task in confirms)
                crashing.kill()
                for task in confirms:
                    with pytest.raises(aiohttp.ClientError):
                        await task  # never answered: the order was not acknowledged
                await pg.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO orders%'"
                )
                await lock.rollback()
            finally:
                await locker.close()
        finally:
            crashing.stop()
        assert await pg.fetchval("SELECT count(*) FROM orders") == 0

        second = await started(own_redis.url, postgres_dsn, **erp_env(sim))
        restarted = time.monotonic()
        try:
            api = Api(http, second)
            for rid in ("healed", "abandoned"):
                assert await api.hold(rid) == "confirmed"  # moved, no row: not an order yet
            status, _, _ = await api.call("GET", "/v1/orders/o-abandoned", "storefront")
            assert status == 404
            # Checkout retries one: the row is written, the move restamped and then unlisted.
            status, receipt, _ = await api.confirm("healed", "o-healed")
            assert (status, receipt["status"]) == (202, "queued")

            async def mended() -> bool:
                return await api.hold("abandoned") == "held"

            grace = take_back_after(Settings())
            await eventually(mended, grace + INTERVAL + 5, "the move without a row taken back")
            # Within seconds: the grace from the move, then a pass about every INTERVAL.
            assert time.monotonic() - restarted <= grace + INTERVAL + 3
            assert await api.hold("healed") == "confirmed"
            assert await api.figures() == (3, 2)
            assert await redis.zrange(keys.UNVERIFIED, 0, -1) == []
            async with http.get(second.url + "/metrics") as resp:
                scrape = await resp.text()
            assert metric_sum(scrape, "gateway_orders_mended_total", outcome="taken_back") == 1

            async def sent() -> bool:
                return [o["key"] for o in (await received(sim))["orders"]] == ["o-healed"]

            await eventually(sent, 10, "the healed order sent")
            # The abandoned reservation is an ordinary hold again: checkout can confirm it.
            status, receipt, _ = await api.confirm("abandoned", "o-abandoned")
            assert (status, receipt["status"]) == (202, "queued")
            assert await api.figures() == (0, 5)
            await eventually(partial(buffer_empty, pg), 10, "both orders sent")
            orders = (await received(sim))["orders"]
            assert sorted((o["key"], o["deliveries"]) for o in orders) == [
                ("o-abandoned", 1),
                ("o-healed", 1),
            ]
        finally:
            second.stop()
    await redis.aclose()


async def inserts_waiting(pg: asyncpg.Connection) -> int:
    """Backends waiting on a lock with an insert into the order buffer."""
    return int(
        await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO orders%'"
        )
    )


async def test_an_erp_slower_than_the_orders_fills_the_buffer_then_intake_resumes(
    redis_url: str,
    redis: aioredis.Redis,
    postgres_dsn: str,
    pg: asyncpg.Connection,
    http: aiohttp.ClientSession,
) -> None:
    """Two calls at a time, half a second each: the ERP takes 4 orders a second, far fewer
    than checkout places. The buffer fills to GATEWAY_BUFFER_MAX_DEPTH, intake answers 503
    buffer_full with Retry-After and the hold stays; the ERP speeds up and intake resumes."""
    accepted: list[str] = []
    async with erp_sim(latency_ms=500) as sim:
        env = erp_env(
            sim,
            GATEWAY_ERP_MAX_CONCURRENCY=2,
            GATEWAY_BUFFER_MAX_DEPTH=20,
            GATEWAY_ERP_TIMEOUT_SECONDS=3,  # 500 ms is not "slow" (over half the timeout)
        )
        gateway = await started(redis_url, postgres_dsn, **env)
        try:
            api = Api(http, gateway)
            await api.stock(10_000)
            for i in range(500):
                status, reply, headers = await api.place(f"b{i}", f"c{i}")
                if status != 202:
                    break
                accepted.append(f"b{i}")
            else:
                pytest.fail("the buffer never filled")
            assert_problem(reply, 503, "buffer_full")
            assert 1 <= int(headers["Retry-After"]) <= 60
            assert len(accepted) >= 20
            assert await api.hold(f"order:b{len(accepted)}") == "missing"  # refused: no hold

            await api.reserve("cart", 1)
            status, problem, headers = await api.confirm("cart", "o-cart")
            assert_problem(problem, 503, "buffer_full")
            assert 1 <= int(headers["Retry-After"]) <= 60
            assert await api.hold("cart") == "held"  # still in place for the retry
            assert (await api.figures())[0] == 1

            await sim.put("/_sim/knobs", json={"latency_ms": 0})

            async def taken() -> bool:
                status, _, _ = await api.confirm("cart", "o-cart")
                return status in (200, 202)

            await eventually(taken, 15, "the retried confirm taken once the buffer drained")
            accepted.append("o-cart")
            assert await api.hold("cart") == "confirmed"
            for i in range(5):  # and new orders again
                status, reply, _ = await api.place(f"after{i}", f"after{i}")
                assert status == 202, reply
                accepted.append(f"after{i}")

            await eventually(partial(buffer_empty, pg), 15, "the buffer empty")
            rows = dict(await pg.fetch("SELECT order_id, status FROM orders"))
            assert rows == dict.fromkeys(accepted, "accepted")
            got = await received(sim)
            assert sorted((o["key"], o["deliveries"]) for o in got["orders"]) == sorted(
                (key, 1) for key in accepted
            )
            assert await busiest_second(sim) <= RATE + BURST
            assert await api.figures() == (0, len(accepted))
        finally:
            gateway.stop()


async def test_intake_refuses_the_order_past_the_max_depth(
    redis_url: str,
    redis: aioredis.Redis,
    postgres_dsn: str,
    pg: asyncpg.Connection,
    http: aiohttp.ClientSession,
) -> None:
    """No ERP, so nothing drains: orders placed one after another, the buffer holds exactly
    what was taken, and the README's promise (503 once it holds GATEWAY_BUFFER_MAX_DEPTH)
    means the 21st is refused, though the depth is read only every half second."""
    gateway = await started(redis_url, postgres_dsn, GATEWAY_BUFFER_MAX_DEPTH="20")
    try:
        api = Api(http, gateway)
        await api.stock(10_000)
        taken = 0
        for i in range(200):
            status, reply, _ = await api.place(f"d{i}", f"c{i}")
            if status != 202:
                assert_problem(reply, 503, "buffer_full")
                break
            taken += 1
        assert taken == 20
    finally:
        gateway.stop()


class _FillsWhileHolding:
    """The reservation service, with the buffer's depth read finding it full just after an
    order's hold is made, before its row is written."""

    def __init__(self, inner: Any, pressure: BackPressure) -> None:
        self._inner = inner
        self._pressure = pressure

    async def reserve(self, request: Any) -> Any:
        outcome = await self._inner.reserve(request)
        self._pressure.full = True
        return outcome

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_a_depth_read_between_hold_and_row_leaves_no_stray_hold(
    client: Client, pg: asyncpg.Connection
) -> None:
    """In-process, to place the depth read exactly where a real one may land: between the
    order's hold and its row. The README: a refused order holds nothing, and an order that
    holds is not refused afterwards."""
    await stock(client, A__L1=10)
    app = client.server.app
    pressure = BackPressure(PostgresOrderQueue(app[POSTGRES]), max_depth=1, max_age_seconds=60)
    reservations = _FillsWhileHolding(app[RESERVATIONS_SERVICE], pressure)
    intake = OrderIntake(reservations, PostgresOutbox(app[POSTGRES]), pressure)  # type: ignore[arg-type]
    request = OrderRequest(
        order_id="late",
        lines=[LineRequest(sku="A", location="L1", quantity=4)],
        order=msgspec.Raw(b"{}"),
    )
    try:
        await intake.place(request)
    except BufferFull:
        expected = (0, 0, 0)  # refused: no row, nothing held
    else:
        expected = (1, 0, 4)  # taken: its row, its hold committed
    rows = await pg.fetchval("SELECT count(*) FROM orders")
    (item,) = (await availability(client, sku="A", location="L1"))["items"]
    assert (rows, item["reserved"], item["committed"]) == expected
