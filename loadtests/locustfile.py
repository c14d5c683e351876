"""Locust load test of the gateway: storefront availability reads and a feed posting stock events.

Run it against ``./run demo`` (see loadtests/README.md)::

    .venv/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 \\
        --headless -u 50 -r 25 -t 60s

The SKUs, locations and groups are the ones ``gateway demo`` seeds. Keys come from
``ATP_STOREFRONT_KEY`` and ``ATP_FEED_KEY`` (default: the demo keys); ``ATP_FEED_BATCH`` sets the
events per POST (default 100) and ``ATP_WAIT_MAX`` the most seconds a user waits between
requests (default 0: as fast as the gateway answers).
"""

from __future__ import annotations

import itertools
import os
import random
import uuid
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlencode

from locust import FastHttpUser, between, task

SKUS: Final = [f"SKU-{n:04d}" for n in range(1, 301)]
DCS: Final = ["DC-EAST", "DC-WEST"]
STORES: Final = [f"STORE-{n:02d}" for n in range(1, 11)]
LOCATIONS: Final = [*DCS, *STORES]
GROUPS: Final = ["east", "west", "stores", "dcs"]

STOREFRONT_KEY: Final = os.environ.get("ATP_STOREFRONT_KEY", "demo-storefront")
FEED_KEY: Final = os.environ.get("ATP_FEED_KEY", "demo-feed")
FEED_BATCH: Final = int(os.environ.get("ATP_FEED_BATCH", "100"))
WAIT_MAX: Final = float(os.environ.get("ATP_WAIT_MAX", "0"))

if not 1 <= FEED_BATCH <= 1000:
    raise SystemExit("ATP_FEED_BATCH must be between 1 and 1000 (the gateway's batch limit)")


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _check(response: Any, expected_key: str) -> None:
    """Mark the request failed unless it is a 200 whose JSON carries ``expected_key``."""
    if response.status_code != 200:
        # Group failures by status and problem code (the body's request_id would make each unique).
        try:
            code = response.json().get("code", "?")
        except (ValueError, AttributeError):
            code = "no problem body"
        response.failure(f"HTTP {response.status_code} {code}")
        return
    try:
        body = response.json()
    except ValueError:
        response.failure("response is not JSON")
        return
    if expected_key not in body:
        response.failure(f"no {expected_key!r} in the response")


class StorefrontUser(FastHttpUser):
    """Availability reads, as product and cart pages make them."""

    weight = 9
    host = "http://127.0.0.1:8080"
    wait_time = between(0, WAIT_MAX)

    def _availability(self, skus: list[str], place: str, value: str, name: str) -> None:
        query = urlencode([*(("sku", sku) for sku in skus), (place, value)])
        with self.client.get(
            f"/v1/availability?{query}",
            headers=_bearer(STOREFRONT_KEY),
            name=name,
            catch_response=True,
        ) as response:
            _check(response, "items")

    @task(6)
    def one_sku_at_location(self) -> None:
        self._availability(
            [random.choice(SKUS)],
            "location",
            random.choice(LOCATIONS),
            "availability 1 sku @location",
        )

    @task(2)
    def twenty_skus_at_location(self) -> None:
        self._availability(
            random.sample(SKUS, 20),
            "location",
            random.choice(LOCATIONS),
            "availability 20 skus @location",
        )

    @task(3)
    def one_sku_in_group(self) -> None:
        self._availability(
            [random.choice(SKUS)],
            "location_group",
            random.choice(GROUPS),
            "availability 1 sku @group",
        )

    @task(1)
    def twenty_skus_in_group(self) -> None:
        self._availability(
            random.sample(SKUS, 20),
            "location_group",
            random.choice(GROUPS),
            "availability 20 skus @group",
        )


class FeedUser(FastHttpUser):
    """An ERP feed: batches of stock events, mostly sales and receipts, now and then a snapshot."""

    weight = 1
    host = "http://127.0.0.1:8080"
    wait_time = between(0, WAIT_MAX)

    def on_start(self) -> None:
        # Unique event ids across users and runs: a duplicate would be counted, not applied.
        self._ids = (f"lt-{uuid.uuid4().hex[:12]}-{n}" for n in itertools.count())

    def _event(self, occurred_at: str) -> dict[str, Any]:
        sku, location = random.choice(SKUS), random.choice(LOCATIONS)
        if random.random() < 0.05:
            kind, quantity = "snapshot", random.randint(0, 2000 if location in DCS else 40)
        else:
            kind, quantity = "adjustment", random.choice([-3, -2, -1, -1, -1, 1, 2, 5, 10])
        return {
            "event_id": next(self._ids),
            "type": kind,
            "sku": sku,
            "location": location,
            "quantity": quantity,
            "occurred_at": occurred_at,
            "source": "locust",
        }

    @task
    def post_stock_events(self) -> None:
        now = datetime.now(UTC).isoformat()
        events = [self._event(now) for _ in range(FEED_BATCH)]
        with self.client.post(
            "/v1/stock-events",
            json={"events": events},
            headers=_bearer(FEED_KEY),
            name=f"stock-events x{FEED_BATCH}",
            catch_response=True,
        ) as response:
            _check(response, "applied")
