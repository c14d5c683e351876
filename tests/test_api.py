"""The HTTP contract as a client sees it: auth, validation, availability, ops, errors."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from gateway.atp import keys
from tests.conftest import KEYS, auth
from tests.gateway_proc import GatewayProcess
from tests.helpers import assert_problem, availability, event, post_events

Client = TestClient[Any, Any]
# Raw bodies need it: aiohttp's client labels bytes application/octet-stream (a 415).
JSON = {"Content-Type": "application/json"}


async def stock_keys(redis: aioredis.Redis) -> list[str]:
    return [k async for k in redis.scan_iter(match="atp:{*")]


# --- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("POST", "/v1/stock-events", "feed"),
        ("GET", "/v1/availability?sku=A&location=L", "storefront"),
        ("PUT", "/v1/location-groups/g", "ops"),
        ("GET", "/v1/location-groups/g", "ops"),
        ("PUT", "/v1/safety-stock", "ops"),
        ("POST", "/v1/reservations", "storefront"),
        ("GET", "/v1/reservations/r1", "storefront"),
        ("DELETE", "/v1/reservations/r1", "storefront"),
        ("POST", "/v1/reservations/r1/extend", "storefront"),
    ],
)
async def test_auth_roles(client: Client, method: str, path: str, role: str) -> None:
    for headers, status in [
        ({}, 401),
        ({"Authorization": "Bearer nope"}, 401),
        ({"Authorization": "Basic sf-key"}, 401),
        *((auth(other), 403) for other in ("storefront", "feed", "ops") if other != role),
    ]:
        resp = await client.request(method, path, headers=headers, data=b"{}")
        assert resp.status == status, (headers, await resp.text())
        assert resp.content_type == "application/problem+json"
        assert_problem(await resp.json(), status, "unauthorized" if status == 401 else "forbidden")
    resp = await client.request(method, path, headers=auth(role), data=b"{}")
    assert resp.status not in (401, 403)


async def test_open_endpoints(client: Client) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["checks"] == {"redis": "up", "postgres": "up"}
    metrics = await client.get("/metrics")
    assert metrics.status == 200
    assert "gateway_http_requests_total" in await metrics.text()


async def test_keys_never_logged(
    redis_url: str, redis: aioredis.Redis, postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    # A real ``gateway serve``: the gateway's own logging config (structlog, JSON lines on
    # stderr) with the access log on, so each request below is logged, and the keys are not.
    gateway = GatewayProcess(
        redis_url, postgres_dsn, GATEWAY_ACCESS_LOG="1", GATEWAY_LOG_LEVEL="info"
    )
    try:
        url = f"{gateway.url}/v1/availability?sku=A&location=L"
        async with aiohttp.ClientSession() as session:
            for request_id, key, status in [
                ("keys-401", "secret-xyz", 401),
                ("keys-200", KEYS["storefront"], 200),
            ]:
                headers = {"Authorization": f"Bearer {key}", "X-Request-ID": request_id}
                async with session.get(url, headers=headers) as resp:
                    assert resp.status == status
        gateway.proc.terminate()  # its shutdown lines too
        assert await asyncio.to_thread(gateway.proc.wait, 15) == 0
        text = gateway.log_text()
    finally:
        gateway.stop()
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    logged = {(e.get("request_id"), e.get("status")) for e in lines if e["event"] == "http_request"}
    assert {("keys-401", 401), ("keys-200", 200)} <= logged, text[-2000:]
    for key in ["secret-xyz", *KEYS.values()]:
        assert key not in text


# --- stock events ---------------------------------------------------------------------------


async def test_batch_is_validated_whole(client: Client, redis: aioredis.Redis) -> None:
    good = event("g1", "snapshot", 10, 0)
    events = [
        good,
        event("b1", "adjustment", 0, 1),
        event("b2", "snapshot", -1, 1),
        {**event("b3", "snapshot", 1, 1), "sku": "has space", "location": ""},
        {**event("b4", "snapshot", 1, 1), "occurred_at": "2026-01-01T00:00:00"},
        {**event("b5", "snapshot", 1, 1), "type": "recount", "extra": True},
        {k: v for k, v in event("b6", "snapshot", 1, 1).items() if k != "quantity"},
        {**event("", "snapshot", 1, 1)},
    ]
    resp = await client.post("/v1/stock-events", json={"events": events}, headers=auth("feed"))
    assert resp.status == 422
    body = await resp.json()
    assert_problem(body, 422, "validation_error")
    failing = {(e["index"], e["field"]) for e in body["errors"]}
    assert failing == {
        (1, "quantity"),
        (2, "quantity"),
        (3, "sku"),
        (3, "location"),
        (4, "occurred_at"),
        (5, "type"),
        (5, "extra"),
        (6, "quantity"),
        (7, "event_id"),
    }
    assert await stock_keys(redis) == []  # nothing applied, not even the good event


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"events": []}',
        b'{"events": {}}',
        b'{"evts": []}',
        b'{"events": [1]}',
    ],
)
async def test_malformed_batches(client: Client, body: bytes, redis: aioredis.Redis) -> None:
    resp = await client.post("/v1/stock-events", data=body, headers=auth("feed") | JSON)
    assert resp.status == 422
    assert_problem(await resp.json(), 422, "validation_error")
    assert await stock_keys(redis) == []


async def test_batch_limits(client: Client) -> None:
    too_many = [event(f"e{i}", "snapshot", 1, 0, sku=f"S{i}") for i in range(1001)]
    resp = await client.post("/v1/stock-events", json={"events": too_many}, headers=auth("feed"))
    assert resp.status == 422
    assert (await post_events(client, too_many[:1000]))["applied"] == 1000
    huge = b'{"events": [' + b" " * (1024 * 1024) + b"]}"
    resp = await client.post("/v1/stock-events", data=io.BytesIO(huge), headers=auth("feed") | JSON)
    assert resp.status == 413
    assert_problem(await resp.json(), 413, "payload_too_large")


async def test_events_in_order_and_outcomes(client: Client) -> None:
    result = await post_events(
        client,
        [
            event("a1", "adjustment", 4, 5),  # no snapshot yet: counts from 0
            event("s1", "snapshot", 50, 10),
            event("a2", "adjustment", -5, 20),
            event("a1", "adjustment", 4, 5),  # duplicate within the batch
            event("s0", "snapshot", 70, 1),  # older snapshot: stale
            event("a3", "adjustment", 9, 10),  # at the snapshot's time: stale
        ],
    )
    assert result == {"applied": 3, "duplicate": 1, "stale": 2}
    item = (await availability(client, sku="SKU-1", location="L1"))["items"][0]
    assert item["on_hand"] == 45
    # A newer snapshot arriving late supersedes what came before it, but not what came after.
    await post_events(client, [event("s2", "snapshot", 30, 15)])
    assert (await availability(client, sku="SKU-1", location="L1"))["items"][0]["on_hand"] == 25


async def test_snapshot_tie_goes_to_greater_event_id(client: Client) -> None:
    await post_events(
        client, [event("snap-b", "snapshot", 7, 0), event("snap-a", "snapshot", 9, 0)]
    )
    assert (await availability(client, sku="SKU-1", location="L1"))["items"][0]["on_hand"] == 7
    await post_events(client, [event("snap-c", "snapshot", 3, 0)])
    assert (await availability(client, sku="SKU-1", location="L1"))["items"][0]["on_hand"] == 3


# --- availability ---------------------------------------------------------------------------


async def test_availability_fields_and_safety_stock(client: Client) -> None:
    await post_events(
        client,
        [
            event("x1", "snapshot", 20, 0, sku="A", location="DC"),
            event("x2", "snapshot", 3, 0, sku="B", location="DC"),
        ],
    )
    resp = await client.put(
        "/v1/safety-stock",
        json={
            "items": [
                {"location": "DC", "quantity": 5},
                {"location": "DC", "sku": "B", "quantity": 1},
            ]
        },
        headers=auth("ops"),
    )
    assert resp.status == 200
    assert await resp.json() == {"updated": 2}
    body = await availability(client, sku=["B", "A", "UNKNOWN"], location="DC")
    assert body["items"] == [
        {
            "sku": "B",
            "location": "DC",
            "on_hand": 3,
            "reserved": 0,
            "committed": 0,
            "safety_stock": 1,
            "available": 2,
        },
        {
            "sku": "A",
            "location": "DC",
            "on_hand": 20,
            "reserved": 0,
            "committed": 0,
            "safety_stock": 5,
            "available": 15,
        },
        {
            "sku": "UNKNOWN",
            "location": "DC",
            "on_hand": 0,
            "reserved": 0,
            "committed": 0,
            "safety_stock": 5,
            "available": 0,
        },
    ]
    unknown_location = await availability(client, sku="A", location="NOWHERE")
    assert unknown_location["items"][0]["on_hand"] == 0
    assert unknown_location["items"][0]["available"] == 0


async def test_negative_on_hand_reads_as_zero_available(client: Client) -> None:
    await post_events(client, [event("n1", "adjustment", -4, 0)])
    item = (await availability(client, sku="SKU-1", location="L1"))["items"][0]
    assert (item["on_hand"], item["available"]) == (-4, 0)


async def test_location_groups(client: Client) -> None:
    await post_events(
        client,
        [
            event("g1", "snapshot", 10, 0, sku="A", location="S1"),
            event("g2", "snapshot", 4, 0, sku="A", location="S2"),
        ],
    )
    resp = await client.put(
        "/v1/location-groups/north", json={"locations": ["S1", "S2", "S3"]}, headers=auth("ops")
    )
    assert resp.status == 200
    assert await resp.json() == {"group": "north", "locations": ["S1", "S2", "S3"]}
    got = await client.get("/v1/location-groups/north", headers=auth("ops"))
    assert await got.json() == {"group": "north", "locations": ["S1", "S2", "S3"]}
    await client.put(
        "/v1/safety-stock", json={"items": [{"location": "S2", "quantity": 5}]}, headers=auth("ops")
    )
    body = await availability(client, sku="A", location_group="north")
    assert body["items"] == [
        {
            "sku": "A",
            "location_group": "north",
            "available": 10,
            "locations": [
                {"location": "S1", "available": 10},
                {"location": "S2", "available": 0},
                {"location": "S3", "available": 0},
            ],
        }
    ]
    missing = await client.get(
        "/v1/availability",
        params={"sku": "A", "location_group": "nope"},
        headers=auth("storefront"),
    )
    assert missing.status == 404
    assert_problem(await missing.json(), 404, "not_found")
    missing_group = await client.get("/v1/location-groups/nope", headers=auth("ops"))
    assert missing_group.status == 404


@pytest.mark.parametrize(
    "query",
    [
        "location=L",
        "sku=A",
        "sku=A&location=L&location_group=G",
        "sku=A&location=L&location=M",
        "sku=bad%20sku&location=L",
        "sku=A&location=" + "x" * 65,
        "sku=A&location=L&foo=1",
        "&".join(f"sku=S{i}" for i in range(101)) + "&location=L",
    ],
)
async def test_availability_validation(client: Client, query: str) -> None:
    resp = await client.get(f"/v1/availability?{query}", headers=auth("storefront"))
    assert resp.status == 422, await resp.text()
    body = await resp.json()
    assert_problem(body, 422, "validation_error")
    assert body["errors"]


async def test_availability_accepts_100_skus(client: Client) -> None:
    query = "&".join(f"sku=S{i}" for i in range(100)) + "&location=L"
    resp = await client.get(f"/v1/availability?{query}", headers=auth("storefront"))
    assert resp.status == 200
    assert [i["sku"] for i in (await resp.json())["items"]] == [f"S{i}" for i in range(100)]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/location-groups/g", {"locations": []}),
        ("/v1/location-groups/g", {"locations": ["a"] * 2}),
        ("/v1/location-groups/g", {"locations": [f"L{i}" for i in range(501)]}),
        ("/v1/location-groups/g", {"locations": ["bad loc"]}),
        ("/v1/location-groups/" + "g" * 65, {"locations": ["a"]}),
        ("/v1/safety-stock", {"items": [{"location": "L", "quantity": -1}]}),
        ("/v1/safety-stock", {"items": []}),
        ("/v1/safety-stock", {"items": [{"location": "L"}]}),
    ],
)
async def test_ops_validation_changes_nothing(
    client: Client, redis: aioredis.Redis, path: str, body: dict[str, Any]
) -> None:
    resp = await client.put(path, json=body, headers=auth("ops"))
    assert resp.status == 422, await resp.text()
    assert_problem(await resp.json(), 422, "validation_error")
    assert await redis.exists(keys.location_group("g"), keys.LOCATION_SAFETY_STOCK) == 0


async def test_unknown_route_and_method_are_problems(client: Client) -> None:
    resp = await client.get("/v1/nothing-here")
    assert resp.status == 404
    assert_problem(await resp.json(), 404, "not_found")
    resp = await client.delete("/v1/stock-events", headers=auth("feed"))
    assert resp.status == 405
    assert_problem(await resp.json(), 405, "method_not_allowed")


async def test_request_id_echoed(client: Client) -> None:
    resp = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    resp = await client.get("/v1/availability", headers={"X-Request-ID": "bad id!"})
    generated = resp.headers["X-Request-ID"]
    assert generated != "bad id!"
    assert (await resp.json())["request_id"] == generated
