from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import auth
from tests.helpers import event


async def _post(client: TestClient[Any, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    resp = await client.post("/v1/stock-events", json={"events": events}, headers=auth("feed"))
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def _on_hand(client: TestClient[Any, Any], sku: str = "SKU-1", location: str = "L1") -> int:
    resp = await client.get(
        "/v1/availability", params={"sku": sku, "location": location}, headers=auth("storefront")
    )
    assert resp.status == 200, await resp.text()
    return int((await resp.json())["items"][0]["on_hand"])


async def test_snapshot_then_adjustments(client: TestClient[Any, Any]) -> None:
    result = await _post(
        client,
        [
            event("s1", "snapshot", 100, 0),
            event("a1", "adjustment", -3, 10),
            event("a0", "adjustment", 5, -10),
        ],
    )
    assert result == {"applied": 2, "duplicate": 0, "stale": 1}
    assert await _on_hand(client) == 97
    again = await _post(
        client, [event("s1", "snapshot", 100, 0), event("a1", "adjustment", -3, 10)]
    )
    assert again == {"applied": 0, "duplicate": 2, "stale": 0}
    assert await _on_hand(client) == 97
