"""Locust users that behave like the gateway's real callers, and the scenario's load shape.

Run through ``python -m loadtests SCENARIO`` (see loadtests/README.md), which starts the stack,
writes the run's ``config.json`` and points ``ATP_LOADTEST_CONFIG`` at it; every Locust process
reads it at import.

- ``Browser``: listing pages (20 SKUs at a location or a group) and product pages (1 SKU, by
  location and by group).
- ``Shopper``: reads, holds a small cart (1-3 lines at a DC or the ``dcs`` group), then pays
  (confirm), abandons (release) or walks away (short TTL, never released; some come back too
  late and try to pay) in the run's proportions. A 503 ``buffer_full`` is retried after its
  ``Retry-After``, as a well-behaved checkout does, with the hold kept for it.
- ``FlashShopper``: races for the hot SKUs: reads one, holds 1-2 if any is left, then the same
  three endings.
- ``Marketplace``: ``POST /v1/orders`` (hold and confirm in one step), 503s retried likewise.
- ``Feed`` (fixed count): store POS adjustments and counts, and ERP snapshots of the DC SKUs
  not sold online, ``feed_events_per_second`` events in all, in one batch per second each.
- ``Operator`` (one): watches ``GET /v1/ops/erp`` and changes the limits at the scheduled times.

Every answer is judged against ``loadtests.contract``: what it does not allow is a failure in
Locust's stats, named ``HTTP <status> <code>``. What the users saw is also written to the run
folder (``loadtests.record``) for the report and the invariants.
"""

from __future__ import annotations

import itertools
import os
import random
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import urlencode

import gevent  # type: ignore[import-untyped]
from locust import FastHttpUser, LoadTestShape, between, constant, events, task

from loadtests.config import (
    DCS,
    FEED_DC_SKUS,
    GROUPS,
    LOCATIONS,
    ONLINE_SKUS,
    STORES,
    Limits,
    RunConfig,
)
from loadtests.contract import NEEDS_RETRY_AFTER, allowed, endpoint_of
from loadtests.record import Recorder
from loadtests.shapes import target

CONFIG = RunConfig.from_env()
RECORDER = Recorder(CONFIG.out_dir)
SF = {"Authorization": f"Bearer {CONFIG.storefront_key}"}
FEED = {"Authorization": f"Bearer {CONFIG.feed_key}"}
OPS = {"Authorization": f"Bearer {CONFIG.ops_key}"}
MAX_RETRY_AFTER = 30.0  # a checkout gives up rather than wait longer than this
RETRIES = 3


@events.init.add_listener  # type: ignore[untyped-decorator]
def _start_flusher(environment: Any, **_: Any) -> None:
    def flush_every_second() -> None:
        while True:
            gevent.sleep(1.0)
            RECORDER.flush()

    gevent.spawn(flush_every_second)


@events.test_stop.add_listener  # type: ignore[untyped-decorator]
def _flush_at_stop(environment: Any, **_: Any) -> None:
    RECORDER.flush()


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def _close_at_quit(environment: Any, **_: Any) -> None:
    RECORDER.close()


class Answer(NamedTuple):
    status: int
    code: str
    body: Any
    retry_after: float | None


def call(
    user: FastHttpUser,
    method: str,
    path: str,
    name: str,
    headers: dict[str, str],
    body: Any = None,
) -> Answer:
    """One request, judged by the contract; a failure in Locust's stats unless allowed."""
    endpoint = endpoint_of(name)
    started = time.perf_counter()
    with user.client.request(
        method, path, name=name, headers=headers, json=body, catch_response=True
    ) as resp:
        millis = (time.perf_counter() - started) * 1000
        status = resp.status_code or 0
        parsed: Any = None
        if status:
            try:
                parsed = resp.json() if resp.content else None
            except ValueError:
                parsed = None
        if status == 0:
            code = f"connection error {type(resp.error).__name__}"
        elif status >= 400:
            code = str(parsed.get("code", "?")) if isinstance(parsed, dict) else "no problem body"
        else:
            code = ""
        retry_after: float | None = None
        if status:
            header = resp.headers.get("Retry-After")
            if header is not None:
                try:
                    retry_after = float(header)
                except ValueError:
                    retry_after = None
        ok = allowed(endpoint, status, code)
        if ok and status in NEEDS_RETRY_AFTER and retry_after is None:
            ok, code = False, f"{code} without Retry-After"
        if ok and 200 <= status < 300 and not isinstance(parsed, dict):
            ok, code = False, "not a JSON object"
        if ok:
            resp.success()
        else:
            resp.failure(f"HTTP {status} {code}".strip())
        RECORDER.outcome(endpoint, status, code, millis, retry_after)
    return Answer(status, code, parsed, retry_after)


def think(low: float | None = None, high: float | None = None) -> None:
    gevent.sleep(random.uniform(low or CONFIG.think_min_s, high or CONFIG.think_max_s))


def new_id(kind: str) -> str:
    return f"{CONFIG.run_id}-{kind}-{uuid.uuid4().hex[:16]}"


def availability(user: FastHttpUser, skus: list[str], where: str, value: str, name: str) -> Answer:
    query = urlencode([*(("sku", sku) for sku in skus), (where, value)])
    return call(user, "GET", f"/v1/availability?{query}", name, SF)


def place(user: FastHttpUser, path: str, body: dict[str, Any], name: str, deadline: float) -> bool:
    """Send an order (confirm or marketplace) until it is acknowledged, refused for good, or
    the gateway's ``Retry-After`` would pass ``deadline`` (the hold's end, or patience)."""
    order_id = body["order_id"]
    RECORDER.order("a", order_id)
    for attempt in range(RETRIES + 1):
        answer = call(user, "POST", path, name, SF, body)
        if answer.status in (200, 202):
            RECORDER.order("k", order_id)
            return True
        if answer.status != 503 or attempt == RETRIES or answer.retry_after is None:
            return False
        wait = min(answer.retry_after, MAX_RETRY_AFTER)
        if time.time() + wait >= deadline:
            return False
        gevent.sleep(wait)
    return False


class Browser(FastHttpUser):
    """Product and listing pages; in a flash sale half the product pages are the hot SKUs."""

    weight = max(CONFIG.mix.browser, 1)
    wait_time = between(CONFIG.think_min_s, CONFIG.think_max_s)

    def _sku(self) -> str:
        if CONFIG.hot_skus and random.random() < 0.5:
            return random.choice(CONFIG.hot_skus)
        return random.choice(ONLINE_SKUS)

    @task(3)
    def listing_page(self) -> None:
        skus = random.sample(ONLINE_SKUS, 20)
        if random.random() < 0.5:
            availability(self, skus, "location", random.choice(LOCATIONS), "availability 20 @loc")
        else:
            availability(
                self, skus, "location_group", random.choice(list(GROUPS)), "availability 20 @group"
            )

    @task(5)
    def product_page_location(self) -> None:
        where = CONFIG.hot_location if random.random() < 0.5 else random.choice(LOCATIONS)
        availability(self, [self._sku()], "location", where, "availability 1 @loc")

    @task(2)
    def product_page_group(self) -> None:
        group = random.choice(list(GROUPS))
        availability(self, [self._sku()], "location_group", group, "availability 1 @group")


class _Checkout(FastHttpUser):
    """Hold a cart, then pay, abandon or walk away (the run's ``Flow``)."""

    abstract = True
    wait_time = between(CONFIG.think_min_s, CONFIG.think_max_s)

    def checkout(self, lines: list[dict[str, Any]]) -> None:
        flow = CONFIG.flow
        ending = random.choices(
            ("pay", "abandon", "walk_away"), (flow.pay, flow.abandon, flow.walk_away)
        )[0]
        ttl = flow.walk_away_ttl_seconds if ending == "walk_away" else flow.ttl_seconds
        reservation_id = new_id("cart")
        body = {"reservation_id": reservation_id, "ttl_seconds": ttl, "lines": lines}
        held = call(self, "POST", "/v1/reservations", "reserve", SF, body)
        if held.status != 201:
            return  # 409 insufficient_stock: the shopper sees "sold out" and leaves
        expires = time.time() + ttl
        think()
        if ending == "abandon":
            call(self, "DELETE", f"/v1/reservations/{reservation_id}", "release", SF)
            return
        if ending == "walk_away":
            if random.randrange(100) >= flow.late_payers:
                return
            # Back from the coffee break after the hold lapsed (and the sweeper's second).
            gevent.sleep(max(0.0, expires - time.time()) + 2.0)
            expires = time.time() + MAX_RETRY_AFTER
        self.pay(reservation_id, held.body.get("lines", []), expires)

    def pay(self, reservation_id: str, lines: list[dict[str, Any]], deadline: float) -> None:
        order_id = new_id("ord")
        order = {"customer_id": f"cust-{random.randrange(100_000)}", "lines": lines}
        body = {"order_id": order_id, "order": order}
        path = f"/v1/reservations/{reservation_id}/confirm"
        if not place(self, path, body, "confirm", deadline) and time.time() < deadline:
            # Gave up on a full buffer: let the stock go rather than leave it held.
            call(self, "DELETE", f"/v1/reservations/{reservation_id}", "release", SF)


class Shopper(_Checkout):
    weight = max(CONFIG.mix.shopper, 1)

    @task
    def shop(self) -> None:
        skus = random.sample(ONLINE_SKUS, random.choice((1, 1, 2, 3)))
        by_group = random.random() < 0.3
        if by_group:
            availability(self, skus, "location_group", "dcs", "availability cart @group")
        else:
            location = random.choice(DCS)
            availability(self, skus, "location", location, "availability cart @loc")
        think()
        where = {"location_group": "dcs"} if by_group else {"location": random.choice(DCS)}
        self.checkout([{"sku": s, **where, "quantity": random.choice((1, 1, 2))} for s in skus])


class FlashShopper(_Checkout):
    weight = max(CONFIG.mix.flash_shopper, 1)

    @task
    def race(self) -> None:
        sku = random.choice(CONFIG.hot_skus)
        seen = availability(self, [sku], "location", CONFIG.hot_location, "availability hot")
        items = seen.body.get("items", []) if isinstance(seen.body, dict) else []
        if not items or items[0].get("available", 0) <= 0:
            return  # sold out for now: refresh after the think time (expired holds come back)
        think(0.1, 1.0)  # racing: a quick click
        quantity = 1 if random.random() < 0.9 else 2
        self.checkout([{"sku": sku, "location": CONFIG.hot_location, "quantity": quantity}])


class Marketplace(FastHttpUser):
    weight = max(CONFIG.mix.marketplace, 1)
    wait_time = between(CONFIG.think_min_s, CONFIG.think_max_s)

    @task
    def order(self) -> None:
        if CONFIG.hot_skus and random.random() < 0.5:
            places = [(random.choice(CONFIG.hot_skus), CONFIG.hot_location)]
        else:
            places = [
                (s, random.choice(DCS)) for s in random.sample(ONLINE_SKUS, random.choice((1, 2)))
            ]
        lines = [{"sku": sku, "location": loc, "quantity": 1} for sku, loc in places]
        order_id = new_id("mkt")
        body = {
            "order_id": order_id,
            "lines": lines,
            "order": {"channel": "marketplace", "lines": lines},
        }
        place(self, "/v1/orders", body, "order", time.time() + MAX_RETRY_AFTER)


class Feed(FastHttpUser):
    """Store systems (POS sales and returns, shelf counts) and the ERP's DC snapshots of the
    SKUs not sold online: never a position a hold or an order counts against."""

    fixed_count = CONFIG.feed_users
    wait_time = constant(0)

    def on_start(self) -> None:
        self._ids = (f"{CONFIG.run_id}-ev-{os.getpid()}-{id(self)}-{n}" for n in itertools.count())
        self._batch = max(1, CONFIG.feed_events_per_second // max(1, CONFIG.feed_users))

    def _event(self, now: str) -> dict[str, Any]:
        roll = random.random()
        if roll < 0.8:
            sku, location = random.choice(ONLINE_SKUS), random.choice(STORES)
            kind, quantity = "adjustment", random.choice((-3, -2, -1, -1, -1, 1))
        elif roll < 0.9:
            sku, location = random.choice(ONLINE_SKUS), random.choice(STORES)
            kind, quantity = "snapshot", random.randint(0, 40)
        else:
            sku, location = random.choice(FEED_DC_SKUS), random.choice(DCS)
            kind, quantity = "snapshot", random.randint(200, 2000)
        return {
            "event_id": next(self._ids),
            "type": kind,
            "sku": sku,
            "location": location,
            "quantity": quantity,
            "occurred_at": now,
            "source": "pos" if kind == "adjustment" else "count",
        }

    @task
    def push(self) -> None:
        started = time.monotonic()
        now = datetime.now(UTC).isoformat()
        events_ = [self._event(now) for _ in range(self._batch)]
        call(
            self,
            "POST",
            "/v1/stock-events",
            f"stock-events x{self._batch}",
            FEED,
            {"events": events_},
        )
        gevent.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


class Operator(FastHttpUser):
    """Watches the ERP flow as a dashboard would, and changes the limits mid-run."""

    fixed_count = 1
    wait_time = constant(2)

    def on_start(self) -> None:
        self._pending = sorted(CONFIG.limit_changes, key=lambda c: c.at)
        self._base: Limits | None = None

    @task
    def watch(self) -> None:
        flow = call(self, "GET", "/v1/ops/erp", "ops erp", OPS)
        if self._base is None and isinstance(flow.body, dict) and "limits" in flow.body:
            self._base = Limits(**flow.body["limits"])  # what to come back to
        while self._pending and time.time() - CONFIG.started_at >= self._pending[0].at:
            limits = self._pending.pop(0).applied_to(self._base or CONFIG.erp_limits)
            sent = time.time()
            answer = call(self, "PUT", "/v1/ops/erp/limits", "ops limits", OPS, asdict(limits))
            RECORDER.ops(
                {"sent": sent, "answered": time.time(), "status": answer.status} | asdict(limits)
            )


class ScenarioShape(LoadTestShape):
    """The scenario's curve (``loadtests.shapes``) plus the fixed feed and operator users."""

    def tick(self) -> tuple[int, float] | None:
        wanted = target(
            CONFIG.shape,
            time.time() - CONFIG.started_at,
            CONFIG.duration_s,
            CONFIG.users,
            CONFIG.spawn_rate,
        )
        if wanted is None:
            return None
        users, rate = wanted
        return users + CONFIG.feed_users + int(CONFIG.operator), rate


# Kinds this run has none of are taken out (Locust runs every non-abstract User it finds).
for _cls, _weight in (
    (Browser, CONFIG.mix.browser),
    (Shopper, CONFIG.mix.shopper),
    (FlashShopper, CONFIG.mix.flash_shopper if CONFIG.hot_skus else 0),
    (Marketplace, CONFIG.mix.marketplace),
    (Feed, CONFIG.feed_users),
    (Operator, int(CONFIG.operator)),
):
    _cls.abstract = _weight <= 0
del _cls, _weight  # Locust collects every User class bound at module level
