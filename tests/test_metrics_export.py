"""The metrics operators' dashboards and alerts read, checked from a scrape as Prometheus sees it:
errors by their problem code, how fresh each feed is, and the ERP flow as ops set it."""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import auth
from tests.helpers import event, eventually
from tests.helpers import metric_sum as total

Client = TestClient[Any, Any]


async def scrape(client: Client) -> str:
    resp = await client.get("/metrics")
    assert resp.status == 200
    return await resp.text()


async def test_problems_are_counted_by_route_and_code(client: Client) -> None:
    run = uuid.uuid4().hex[:8]
    before = await scrape(client)
    for _ in range(3):
        resp = await client.get("/v1/availability?sku=A&location=L")  # no key
        assert resp.status == 401
    lines = [{"sku": f"P-{run}", "location": "L1", "quantity": 1}]
    resp = await client.post(
        "/v1/reservations",
        json={"reservation_id": f"p-{run}", "lines": lines},
        headers=auth("storefront"),
    )
    assert resp.status == 409
    after = await scrape(client)

    def grew(**labels: str) -> float:
        name = "gateway_http_problems_total"
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew(route="/v1/availability", code="unauthorized") == 3
    assert grew(route="/v1/reservations", code="insufficient_stock") == 1
    assert grew(code="insufficient_stock") == 1  # and nowhere else


async def test_the_last_event_of_a_feed_is_a_timestamp(client: Client) -> None:
    started = time.time()
    body = {"events": [event(f"fresh-{uuid.uuid4().hex[:8]}", "snapshot", 5, 0)]}
    resp = await client.post("/v1/stock-events", json=body, headers=auth("feed"))
    assert resp.status == 200
    seen = total(await scrape(client), "gateway_stock_last_event_timestamp_seconds", source="http")
    assert started <= seen <= time.time()


async def test_the_erp_flow_is_exported_as_ops_set_it(client: Client) -> None:
    headers = auth("ops")
    limits = {"rate_per_second": 7.5, "burst": 3, "max_concurrency": 4}
    resp = await client.put("/v1/ops/erp/limits", json=limits, headers=headers)
    assert resp.status == 200
    resp = await client.post("/v1/ops/erp/pause", headers=headers)
    assert resp.status == 200
    try:

        async def exported() -> bool:
            text = await scrape(client)
            return (
                total(text, "gateway_erp_paused") == 1
                and total(text, "gateway_erp_rate_limit_per_second", kind="configured") == 7.5
                and total(text, "gateway_erp_rate_limit_per_second", kind="effective") == 0
                and "gateway_erp_breaker_open 0.0" in text.splitlines()
                and "gateway_erp_dead_letters 0.0" in text.splitlines()
            )

        await eventually(exported, 5, "the flow figures in the metrics")
    finally:
        resp = await client.post("/v1/ops/erp/resume", headers=headers)
        assert resp.status == 200

    async def resumed() -> bool:
        return total(await scrape(client), "gateway_erp_paused") == 0

    await eventually(resumed, 5, "the resume in the metrics")
