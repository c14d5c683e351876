"""The ERP simulator (``gateway erp-sim``): what it accepts, refuses, records and pushes.

No Redis, PostgreSQL or Kafka: the sim is its own process in a real deployment of the tests, here
an in-process TestServer; the gateway it pushes to is a small fake that records the POSTs."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.atp.validation import decode_batch
from gateway.cli import main
from gateway.dev.erp_sim import STATE, Knobs, KnobsError, create_sim_app, knobs_from
from tests.helpers import eventually

Client = TestClient[Any, Any]
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FEED_KEY = "sim-feed-key"


@contextlib.asynccontextmanager
async def sim(knobs: Knobs | None = None, **options: Any) -> AsyncIterator[Client]:
    app = create_sim_app(knobs if knobs is not None else Knobs(), **options)
    async with TestClient(TestServer(app)) as client:
        yield client


async def order(
    client: Client, key: str | None, body: Any = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    payload = body if body is not None else {"order_id": key, "lines": []}
    resp = await client.post("/orders", json=payload, headers=headers)
    return resp.status, await resp.json(), dict(resp.headers)


async def get(client: Client, path: str) -> Any:
    resp = await client.get(path)
    assert resp.status == 200
    return await resp.json()


async def put_knobs(client: Client, **changes: Any) -> dict[str, Any]:
    resp = await client.put("/_sim/knobs", json=changes)
    assert resp.status == 200, await resp.text()
    knobs: dict[str, Any] = await resp.json()
    return knobs


async def test_accepts_once_per_key_and_counts_the_repeats() -> None:
    async with sim() as client:
        status, first, _ = await order(client, "o-1", {"order_id": "o-1", "total": 12.5})
        assert status == 201
        assert first["erp_order_id"] == "ERP-1"
        assert RFC3339_MS.match(first["accepted_at"]), first
        status, again, _ = await order(client, "o-1", {"order_id": "o-1", "changed": True})
        assert (status, again) == (409, first)
        await order(client, "o-1")
        status, second, _ = await order(client, "o-2")
        assert (status, second["erp_order_id"]) == (201, "ERP-2")

        received = await get(client, "/_sim/received")
        assert (received["accepted"], received["duplicates"]) == (2, 2)
        assert [(o["key"], o["deliveries"]) for o in received["orders"]] == [("o-1", 3), ("o-2", 1)]
        assert received["orders"][0]["body"] == {"order_id": "o-1", "total": 12.5}  # the first
        assert received["orders"][0]["accepted_at"] == first["accepted_at"]
        seconds = (await get(client, "/_sim/per_second"))["seconds"]
        assert sum(seconds.values()) == 2
        assert (await client.get("/healthz")).status == 200


async def test_a_missing_key_or_a_body_that_is_no_object_is_400() -> None:
    async with sim() as client:
        assert (await order(client, None))[0] == 400
        assert (await order(client, "   "))[0] == 400
        assert (await order(client, "o-1", [1, 2]))[0] == 400
        resp = await client.post("/orders", data=b"{not json", headers={"Idempotency-Key": "k"})
        assert resp.status == 400
        assert (await get(client, "/_sim/received"))["orders"] == []


async def test_every_order_fails_at_error_rate_one_and_none_is_recorded() -> None:
    async with sim(Knobs(error_rate=1.0)) as client:
        for _ in range(3):
            status, body, _ = await order(client, "o-1")
            assert (status, body["error"]) == (503, "erp_error")
        received = await get(client, "/_sim/received")
        assert (received["orders"], received["accepted"], received["errors_503"]) == ([], 0, 3)
        await put_knobs(client, error_rate=0)
        status, body, _ = await order(client, "o-1")
        assert (status, body["erp_order_id"]) == (201, "ERP-1")  # the failures took no id


async def test_orders_beyond_the_rate_limit_in_one_second_get_429() -> None:
    async with sim(Knobs(rate_limit_per_second=5)) as client:
        # All ten inside one wall-clock second: start early in one.
        if time.time() % 1 > 0.6:
            await asyncio.sleep(1.02 - time.time() % 1)
        answers = await asyncio.gather(*(order(client, f"o-{n}") for n in range(10)))
        statuses = sorted(status for status, _, _ in answers)
        assert statuses == [201] * 5 + [429] * 5
        assert all(h["Retry-After"] == "1" for status, _, h in answers if status == 429)
        received = await get(client, "/_sim/received")
        assert (received["accepted"], received["rejected_429"]) == (5, 5)
        per_second = await get(client, "/_sim/per_second")
        assert max(per_second["seconds"].values()) <= 5
        assert sum(per_second["requests"].values()) == 10


async def test_an_outage_switched_on_and_off_live() -> None:
    async with sim() as client:
        await put_knobs(client, outage=True)
        status, body, headers = await order(client, "o-1")
        assert (status, body["error"], headers["Retry-After"]) == (503, "outage", "1")
        assert (await put_knobs(client, outage=False))["outage"] is False
        assert (await order(client, "o-1"))[0] == 201
        received = await get(client, "/_sim/received")
        assert [o["deliveries"] for o in received["orders"]] == [1]
        assert received["errors_503"] == 1


async def test_an_outage_window_counts_from_the_start() -> None:
    async with sim(Knobs(outage_windows=((0.0, 0.5),))) as client:
        assert (await order(client, "o-1"))[0] == 503
        uptime = (await get(client, "/healthz"))["uptime_s"]
        await asyncio.sleep(max(0.0, 0.52 - uptime))
        assert (await order(client, "o-1"))[0] == 201


async def test_latency_is_added_to_each_order() -> None:
    async with sim(Knobs(latency_ms=150)) as client:
        start = time.monotonic()
        assert (await order(client, "o-1"))[0] == 201
        assert 0.14 <= time.monotonic() - start < 1.0
        await put_knobs(client, latency_ms=100, latency_jitter_ms=50)

        async def timed(key: str) -> float:
            start = time.monotonic()
            await order(client, key)
            return time.monotonic() - start

        waits = await asyncio.gather(*(timed(f"j-{n}") for n in range(5)))
        assert all(0.045 <= wait < 1.0 for wait in waits), waits


@pytest.mark.parametrize(
    "changes",
    [
        {"error_rate": 1.5},
        {"error_rate": "high"},
        {"latency_ms": -1},
        {"latency_jitter_ms": 120_000},
        {"rate_limit_per_second": 2.5},
        {"rate_limit_per_second": -1},
        {"outage": "yes"},
        {"outage_windows": [[5, 1]]},
        {"outage_windows": [[1]]},
        {"outage_windows": [[-1, 2]]},
        {"unknown_knob": 1},
    ],
)
async def test_a_bad_knob_is_422_and_changes_nothing(changes: dict[str, Any]) -> None:
    async with sim(Knobs(latency_ms=5)) as client:
        before = await get(client, "/_sim/knobs")
        resp = await client.put("/_sim/knobs", json=changes)
        assert resp.status == 422, await resp.text()
        assert await get(client, "/_sim/knobs") == before


async def test_knobs_update_in_part() -> None:
    async with sim(Knobs(latency_ms=5, outage_windows=((1.0, 2.0),))) as client:
        knobs = await put_knobs(client, error_rate=0.25)
        assert (knobs["latency_ms"], knobs["error_rate"]) == (5, 0.25)
        assert knobs["outage_windows"] == [[1, 2]]
        assert (await put_knobs(client, outage_windows=None))["outage_windows"] == []
        assert await get(client, "/_sim/knobs") == {**knobs, "outage_windows": []}
        resp = await client.put("/_sim/knobs", data=b"{oops")
        assert resp.status == 400


async def test_accepted_orders_decrement_the_stock_ledger() -> None:
    async with sim() as client:
        stock = {"items": [{"sku": "S1", "location": "DC", "on_hand": 10}]}
        resp = await client.put("/_sim/stock", json=stock)
        assert resp.status == 200
        lines = [
            {"sku": "S1", "location": "DC", "quantity": 3, "price": 9.99},
            {"sku": "S9", "location": "DC", "quantity": 1},  # not the ERP's position: ignored
        ]
        assert (await order(client, "o-1", {"lines": lines}))[0] == 201
        assert (await order(client, "o-1", {"lines": lines}))[0] == 409  # no second decrement
        await put_knobs(client, outage=True)
        assert (await order(client, "o-2", {"lines": lines}))[0] == 503  # nor a refused one
        await put_knobs(client, outage=False)
        bad = {"lines": [{"sku": "S1", "quantity": "lots"}]}
        assert (await order(client, "o-3", bad))[0] == 201  # any order; the ledger skips it
        big = {"lines": [{"sku": "S1", "location": "DC", "quantity": 9}]}
        assert (await order(client, "o-4", big))[0] == 201
        ledger = await get(client, "/_sim/stock")
        assert ledger == {"items": [{"sku": "S1", "location": "DC", "on_hand": -2}]}  # oversold
        bad_stock = {"items": [{"sku": "S1", "location": "DC", "on_hand": -5}]}
        assert (await client.put("/_sim/stock", json=bad_stock)).status == 422


async def test_reset_forgets_everything_but_the_knobs() -> None:
    async with sim(Knobs(latency_ms=1)) as client:
        await client.put(
            "/_sim/stock", json={"items": [{"sku": "S", "location": "L", "on_hand": 1}]}
        )
        await order(client, "o-1")
        assert (await client.post("/_sim/reset")).status == 200
        received = await get(client, "/_sim/received")
        assert (received["orders"], received["accepted"]) == ([], 0)
        assert await get(client, "/_sim/stock") == {"items": []}
        assert await get(client, "/_sim/per_second") == {"seconds": {}, "requests": {}}
        assert (await get(client, "/_sim/knobs"))["latency_ms"] == 1
        assert (await order(client, "o-1"))[1]["erp_order_id"] == "ERP-1"


class FakeGateway:
    """Records each ``POST /v1/stock-events``; answers ``statuses`` in turn, then 200."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.posts: list[tuple[int, str | None, bytes]] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/stock-events", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        self.posts.append((status, request.headers.get("Authorization"), await request.read()))
        return web.json_response({"applied": 1, "duplicate": 0, "stale": 0}, status=status)

    def delivered(self) -> list[bytes]:
        return [body for status, _, body in self.posts if status == 200]


@contextlib.asynccontextmanager
async def pushing_sim(fake: FakeGateway) -> AsyncIterator[Client]:
    async with TestServer(fake.app) as gateway:
        url = str(gateway.make_url(""))
        async with sim(gateway_url=url, feed_key=FEED_KEY, push_interval=0.05) as client:
            stock = [
                {"sku": "S1", "location": "DC", "on_hand": 10},
                {"sku": "S2", "location": "DC", "on_hand": 1},
            ]
            await client.put("/_sim/stock", json={"items": stock})
            yield client


async def test_accepted_orders_push_snapshots_to_the_gateway_and_retry() -> None:
    fake = FakeGateway(503)  # the first push fails: it must come again
    async with pushing_sim(fake) as client:
        line = {"sku": "S1", "location": "DC", "quantity": 2}
        oversold = {"sku": "S2", "location": "DC", "quantity": 5}
        await order(client, "o-1", {"lines": [line, oversold]})
        await eventually(lambda: _true(fake.posts), 2.0, "a first push")
        _, last, _ = await order(client, "o-2", {"lines": [line]})
        await eventually(lambda: _true(fake.delivered()), 2.0, "a push after the failure")

        assert {auth for _, auth, _ in fake.posts} == {f"Bearer {FEED_KEY}"}
        events = [e for body in fake.delivered() for e in decode_batch(body)]  # the real rule
        latest = {(e.sku, e.location): e for e in events}
        s1, s2 = latest["S1", "DC"], latest["S2", "DC"]
        assert (s1.type, s1.quantity, s1.source) == ("snapshot", 6, "erp-sim")
        assert s1.occurred_at.isoformat(timespec="milliseconds") == last["accepted_at"].replace(
            "Z", "+00:00"
        )
        assert s2.quantity == 0  # oversold: a snapshot is never negative
        failed = {(e.sku, e.location): e for e in decode_batch(fake.posts[0][2])}
        # A retry is the same event (a gateway that did apply the failed push skips it) ...
        assert {e.event_id for e in events if e.sku == "S2"} == {failed["S2", "DC"].event_id}
        # ... unless a newer order replaced it.
        assert s1.event_id != failed["S1", "DC"].event_id


async def test_a_push_the_gateway_refuses_is_dropped_not_retried() -> None:
    fake = FakeGateway(422)
    async with pushing_sim(fake) as client:
        await order(client, "o-1", {"lines": [{"sku": "S1", "location": "DC", "quantity": 1}]})
        await eventually(lambda: _true(fake.posts), 2.0, "a push")
        await asyncio.sleep(0.2)  # four push intervals
        assert len(fake.posts) == 1
        assert client.app is not None
        assert client.app[STATE].take_snapshots() == []


async def test_the_sim_keeps_serving_while_the_gateway_is_unreachable() -> None:
    app = create_sim_app(
        Knobs(), gateway_url="http://127.0.0.1:9", feed_key="k", push_interval=0.05
    )
    async with TestClient(TestServer(app)) as client:
        await client.put(
            "/_sim/stock", json={"items": [{"sku": "S", "location": "L", "on_hand": 5}]}
        )
        for n in range(3):
            body = {"lines": [{"sku": "S", "location": "L", "quantity": 1}]}
            assert (await order(client, f"o-{n}", body))[0] == 201
            await asyncio.sleep(0.06)
        assert (await get(client, "/_sim/stock"))["items"][0]["on_hand"] == 2


async def _true(items: list[Any]) -> bool:
    return bool(items)


def test_command_line_knobs() -> None:
    knobs = knobs_from(latency_ms=20, error_rate=0.1, outage_windows=["5:10", "20:25.5"])
    assert knobs == Knobs(latency_ms=20, error_rate=0.1, outage_windows=((5, 10), (20, 25.5)))
    for bad in ({"error_rate": 2.0}, {"outage_windows": ["5"]}, {"outage_windows": ["9:3"]}):
        with pytest.raises(KnobsError):
            knobs_from(**bad)
    assert main(["erp-sim", "--error-rate", "2"]) == 2  # refused before serving
    with pytest.raises(SystemExit):
        main(["erp-sim", "--gateway-url", "http://127.0.0.1:8080"])  # without --feed-key
