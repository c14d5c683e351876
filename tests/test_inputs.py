"""Inputs the event rule can hold exactly, and a fast path that accepts what the rule accepts.

- The availability query's fast path answers exactly what the thorough path answers, or defers
  to it (a property over raw query strings).
- ``occurred_at`` lies between the floor (2000-01-01) and the gateway's clock plus the allowed
  skew: a snapshot dated 2062 is refused instead of freezing its position.
- Quantities are at most 10^9, and apply_events.lua refuses an adjustment that would take a
  position beyond MAX_POSITION, so every sum Lua forms stays below 2^53 (its doubles' exact
  range).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from multidict import MultiDict
from yarl import URL

from gateway.adapters.redis import RedisPort
from gateway.adapters.scripts import ScriptRegistry
from gateway.app import create_app
from gateway.atp import keys
from gateway.atp.events import EventApplier
from gateway.atp.schemas import MAX_POSITION, MAX_QUANTITY, StockEvent
from gateway.atp.validation import decode_event, latest_allowed
from gateway.errors import ValidationFailed
from gateway.http.availability_query import _fast, _thorough
from gateway.settings import Settings
from tests.conftest import auth
from tests.helpers import event

Client = TestClient[Any, Any]
APPLIED, REJECTED = 0, 3

# --- the availability fast path -------------------------------------------------------------

# Raw query strings: plain ones (sku=..&location=..) with some of their values, names or parts
# made tricky from a small alphabet: near-miss names, code characters, and what is special in a
# query (= & % + ;), escaped or not. About a third stay plain enough for the fast path.
_NAMES = st.sampled_from(("sku", "location", "location_group", "", "SKU", "sku%3D", "x"))
_CODES = st.text(st.sampled_from("Ab1-._:"), min_size=1, max_size=3)
_CHARS = ("A", "b", "-", "=", "&", "%3D", "%41", "%", "+", ";", " ", "é", "\n")
_TRICKY = st.lists(st.sampled_from(_CHARS), max_size=4).map("".join) | st.just("A" * 65)
_SEPARATORS = st.sampled_from(("=", "", "=="))


@st.composite
def _queries(draw: st.DrawFn) -> str:
    values = _CODES | _CODES | _TRICKY
    parts = [f"sku={draw(values)}" for _ in range(draw(st.integers(1, 3)))]
    parts.append(f"{draw(st.sampled_from(('location', 'location_group')))}={draw(values)}")
    parts = list(draw(st.permutations(parts)))
    for _ in range(draw(st.integers(0, 2))):  # an extra part, anywhere
        extra = draw(_NAMES) + draw(_SEPARATORS) + draw(_CODES | _TRICKY)
        parts.insert(draw(st.integers(0, len(parts))), extra)
    return "&".join(parts)


def _decoded(raw: str) -> MultiDict[str]:
    """The query as aiohttp decodes it (its parser builds the URL the same way)."""
    return MultiDict(URL.build(path="/v1/availability", query_string=raw, encoded=True).query)


@hypothesis_settings(max_examples=500)
@given(_queries())
@example("sku=a=b&location=L1")
@example("sku=A&location=L1&")
@example("sku=A&&location=L1")
@example("sku=A&location=L1=")
@example("sku=A&location_group=G&location=L")
@example("location=L&sku=A&sku=B")
def test_fast_path_answers_as_the_thorough_one(raw: str) -> None:
    fast = _fast(raw)
    if fast is None:
        return  # deferred: the thorough path answers
    assert fast == _thorough(_decoded(raw)), raw


async def test_equals_sign_in_a_sku_is_refused(client: Client) -> None:
    for query in ("sku=a=b&location=L1", "sku=a%3Db&location=L1", "sku=A&location=L=1"):
        resp = await client.get(f"/v1/availability?{query}", headers=auth("storefront"))
        assert resp.status == 422, (query, await resp.text())


# --- occurred_at ------------------------------------------------------------------------------


async def post(client: Client, events: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/v1/stock-events", json={"events": events}, headers=auth("feed"))
    return resp.status, dict(await resp.json())


async def on_hand(client: Client, sku: str = "SKU-1") -> int:
    resp = await client.get(
        "/v1/availability", params={"sku": sku, "location": "L1"}, headers=auth("storefront")
    )
    return int((await resp.json())["items"][0]["on_hand"])


async def test_a_snapshot_from_2062_no_longer_freezes_its_position(client: Client) -> None:
    future = {**event("s-2062", "snapshot", 500, 0), "occurred_at": "2062-05-01T00:00:00Z"}
    status, problem = await post(client, [future])
    assert status == 422
    assert [(e["index"], e["field"]) for e in problem["errors"]] == [(0, "occurred_at")]
    # Real snapshots after it count, as they did not when the 2062 one was taken.
    assert (await post(client, [event("s-now", "snapshot", 7, 0)]))[1]["applied"] == 1
    assert await on_hand(client) == 7
    assert (await post(client, [event("s-later", "snapshot", 9, 1)]))[1]["applied"] == 1
    assert await on_hand(client) == 9


async def test_occurred_at_before_the_floor_is_refused(client: Client) -> None:
    for stamp in ("1999-12-31T23:59:59.999999Z", "1970-01-01T00:00:00Z", "0001-01-01T00:00:00Z"):
        status, problem = await post(
            client, [{**event("old", "snapshot", 1, 0), "occurred_at": stamp}]
        )
        assert status == 422, stamp
        assert problem["errors"][0]["field"] == "occurred_at"


@pytest.fixture
async def skew_60_client(settings: Settings) -> AsyncIterator[Client]:
    app = create_app(dataclasses.replace(settings, max_clock_skew_seconds=60))
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_the_clock_skew_setting_bounds_the_future(skew_60_client: Client) -> None:
    now = datetime.now(UTC)
    ahead_30 = {**event("a30", "snapshot", 3, 0), "occurred_at": (now + timedelta(seconds=30))}
    ahead_120 = {**event("a120", "snapshot", 4, 0), "occurred_at": now + timedelta(seconds=120)}
    for ev in (ahead_30, ahead_120):
        ev["occurred_at"] = ev["occurred_at"].isoformat()
    assert (await post(skew_60_client, [ahead_120]))[0] == 422
    assert (await post(skew_60_client, [ahead_30]))[0] == 200


def test_kafka_events_are_held_to_the_same_bounds() -> None:
    """decode_event (the Kafka path) refuses what HTTP refuses: a dead letter, not a freeze."""
    now = datetime.now(UTC)

    def encoded(when: datetime) -> bytes:
        return msgspec.json.encode({**event("k", "snapshot", 1, 0), "occurred_at": when})

    for when, skew in [
        (datetime(2062, 5, 1, tzinfo=UTC), 300),
        (now + timedelta(seconds=100), 60),
        (datetime(1999, 1, 1, tzinfo=UTC), 300),
    ]:
        with pytest.raises(ValidationFailed) as refused:
            decode_event(encoded(when), max_skew_seconds=skew)
        assert refused.value.errors[0]["field"] == "occurred_at"
    assert decode_event(encoded(now + timedelta(seconds=100))).quantity == 1  # default: 300 s


def test_a_batch_can_share_one_bound() -> None:
    """decode_event takes the bound computed once for a Kafka batch and holds each record to
    it instead of reading the clock per record."""
    now = datetime.now(UTC)
    latest = latest_allowed(60)
    assert now + timedelta(seconds=59) < latest <= datetime.now(UTC) + timedelta(seconds=60)

    def encoded(when: datetime) -> bytes:
        return msgspec.json.encode({**event("k", "snapshot", 1, 0), "occurred_at": when})

    an_hour_ahead = now + timedelta(hours=1)
    # The bound given wins over the default skew, either way.
    assert decode_event(encoded(an_hour_ahead), latest=now + timedelta(hours=2)).quantity == 1
    with pytest.raises(ValidationFailed) as refused:
        decode_event(encoded(now + timedelta(seconds=30)), latest=now)
    assert refused.value.errors[0]["field"] == "occurred_at"


# --- quantities and positions -----------------------------------------------------------------


async def test_quantities_beyond_the_bound_are_refused(client: Client) -> None:
    for quantity in (10**12, MAX_QUANTITY + 1, -MAX_QUANTITY - 1):
        status, _ = await post(client, [event("big", "adjustment", quantity, 0)])
        assert status == 422, quantity
    resp = await client.put(
        "/v1/safety-stock",
        json={"items": [{"location": "L1", "quantity": MAX_QUANTITY + 1}]},
        headers=auth("ops"),
    )
    assert resp.status == 422
    status, result = await post(client, [event("max", "adjustment", MAX_QUANTITY, 0)])
    assert (status, result) == (200, {"applied": 1, "duplicate": 0, "stale": 0})


@pytest.fixture
async def applier(redis_url: str, redis: aioredis.Redis) -> AsyncIterator[EventApplier]:
    port = RedisPort.from_url(redis_url, cluster=False)
    yield EventApplier(ScriptRegistry(port, "gateway.atp"), horizon_seconds=3600)
    await port.close()


def adjustment(event_id: str, quantity: int, seconds: float = 0) -> StockEvent:
    return StockEvent(
        event_id=event_id,
        type="adjustment",
        sku="X",
        location="L",
        quantity=quantity,
        occurred_at=datetime.now(UTC) + timedelta(seconds=seconds),
    )


async def test_many_maximal_adjustments_sum_exactly(
    applier: EventApplier, redis: aioredis.Redis
) -> None:
    """10,000 adjustments of the largest quantity, then +1: the +1 is not lost."""
    for batch in range(10):
        events = [adjustment(f"a{batch}-{i}", MAX_QUANTITY, -i / 1000) for i in range(1000)]
        assert set(await applier.apply_codes(events)) == {APPLIED}
    await applier.apply_codes([adjustment("one", 1)])
    assert int(await redis.hget(keys.position("X"), "oh:L")) == 10_000 * MAX_QUANTITY + 1


async def _position(redis: aioredis.Redis, **fields: int) -> None:
    await redis.hset(keys.position("X"), mapping={f"{k}:L": v for k, v in fields.items()})


async def test_an_adjustment_beyond_the_position_bound_is_rejected(
    applier: EventApplier, redis: aioredis.Redis
) -> None:
    """On-hand may not pass +-MAX_POSITION: the adjustment is refused, its id not kept."""
    await _position(redis, b=MAX_POSITION - 5, oh=MAX_POSITION - 5, ag=0)
    assert await applier.apply_codes([adjustment("up", 10)]) == [REJECTED]
    assert int(await redis.hget(keys.position("X"), "oh:L")) == MAX_POSITION - 5
    assert await redis.zscore(keys.event_ids("X"), "up") is None  # a retry is not a duplicate
    assert await applier.apply_codes([adjustment("down", -10), adjustment("up", 10)]) == [
        APPLIED,
        APPLIED,
    ]
    assert int(await redis.hget(keys.position("X"), "oh:L")) == MAX_POSITION - 5
    await _position(redis, b=-MAX_POSITION, oh=-MAX_POSITION, **{"as": 0}, ag=0)
    assert await applier.apply_codes([adjustment("below", -1)]) == [REJECTED]


async def test_kept_adjustments_are_bounded_by_magnitude(
    applier: EventApplier, redis: aioredis.Redis
) -> None:
    """Kept adjustments that cancel out can still not grow without bound: a snapshot or the
    horizon sums any subset of them, and that sum must stay exact too."""
    await _position(redis, ag=MAX_POSITION - 10)
    assert await applier.apply_codes([adjustment("p", 6), adjustment("n", -6)]) == [
        APPLIED,
        REJECTED,
    ]
    assert await redis.hget(keys.position("X"), "ag:L") == str(MAX_POSITION - 4)
