"""What the tests of orders to the ERP share: the simulator and gateways in this process, orders
placed through the API, and what the ERP stand-in observed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.dev.erp_sim import create_sim_app
from gateway.dev.erp_sim_state import Knobs
from tests.conftest import auth, make_settings
from tests.helpers import eventually

Client = TestClient[Any, Any]


@contextlib.asynccontextmanager
async def erp_sim(**knobs: Any) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_sim_app(Knobs(**knobs)))) as sim:
        yield sim


@contextlib.asynccontextmanager
async def gateway(
    redis_url: str, postgres_dsn: str, erp_url: str, **overrides: Any
) -> AsyncIterator[Client]:
    settings = make_settings(redis_url, postgres_dsn, erp_url=erp_url, **overrides)
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


async def place(client: Client, order_id: str, customer: str = "c") -> None:
    body = {
        "order_id": order_id,
        "lines": [{"sku": "A", "location": "L1", "quantity": 1}],
        "order": {"customer_id": customer, "ref": order_id},
    }
    resp = await client.post("/v1/orders", json=body, headers=auth("storefront"))
    assert resp.status == 202, await resp.text()


async def received(sim: TestClient[Any, Any]) -> dict[str, Any]:
    return await (await sim.get("/_sim/received")).json()


async def all_accepted(
    sim: TestClient[Any, Any], pg: asyncpg.Connection, n: int, within: float
) -> dict[str, Any]:
    async def done() -> bool:
        left = await pg.fetchval("SELECT count(*) FROM orders WHERE status <> 'accepted'")
        return left == 0 and (await received(sim))["accepted"] == n

    await eventually(done, within, f"{n} orders accepted by the ERP")
    got = await received(sim)
    assert sorted(o["deliveries"] for o in got["orders"]) == [1] * n  # once each by key
    return got


async def busiest_second(sim: TestClient[Any, Any]) -> int:
    seconds = (await (await sim.get("/_sim/per_second")).json())["requests"]
    return max(seconds.values(), default=0)
