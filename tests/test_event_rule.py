"""The event rule as a property: any order, any repetition, the same on-hand as the model."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.adapters.redis import RedisPort
from gateway.adapters.scripts import ScriptRegistry
from gateway.atp import keys
from gateway.atp.events import EventApplier
from gateway.atp.schemas import StockEvent

BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
HORIZON = 7 * 24 * 3600


@dataclass(frozen=True)
class Ev:
    event_id: str
    kind: str
    sku: str
    location: str
    quantity: int
    t: int  # milliseconds after BASE: few values, so ties between snapshots happen

    def to_event(self) -> StockEvent:
        return StockEvent(
            event_id=self.event_id,
            type=self.kind,  # type: ignore[arg-type]
            sku=self.sku,
            location=self.location,
            quantity=self.quantity,
            occurred_at=BASE + timedelta(milliseconds=self.t),
        )


def model_on_hand(history: list[Ev], sku: str, location: str) -> int:
    """The rule, written the obvious way over the set of distinct events."""
    mine = [e for e in history if e.sku == sku and e.location == location]
    snapshots = [e for e in mine if e.kind == "snapshot"]
    if not snapshots:
        return sum(e.quantity for e in mine)
    newest = max(snapshots, key=lambda e: (e.t, e.event_id.encode()))
    return newest.quantity + sum(
        e.quantity for e in mine if e.kind == "adjustment" and e.t > newest.t
    )


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Ev], list[Ev]]:
    n = draw(st.integers(min_value=1, max_value=40))
    events = []
    for i in range(n):
        kind = draw(st.sampled_from(["snapshot", "adjustment"]))
        quantity = (
            draw(st.integers(0, 500))
            if kind == "snapshot"
            else draw(st.integers(-50, 50).filter(lambda q: q != 0))
        )
        events.append(
            Ev(
                # Ids are unique, but their order is random relative to time, to test tie-breaks.
                event_id=draw(st.sampled_from(["a", "B", "c", "é", "z9"])) + f"-{i}",
                kind=kind,
                sku=draw(st.sampled_from(["S1", "S2"])),
                location=draw(st.sampled_from(["L1", "L2"])),
                quantity=quantity,
                t=draw(st.integers(0, 6)),
            )
        )
    repeats = draw(st.lists(st.sampled_from(events), max_size=20))
    deliveries = events + repeats
    seed = draw(st.integers(0, 2**32 - 1))
    random.Random(seed).shuffle(deliveries)
    return events, deliveries


@pytest.fixture
async def applier(redis_url: str, redis: aioredis.Redis) -> AsyncIterator[EventApplier]:
    port = RedisPort.from_url(redis_url, cluster=False)
    yield EventApplier(ScriptRegistry(port, "gateway.atp"), horizon_seconds=HORIZON)
    await port.close()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=histories(), batch_size=st.integers(1, 15))
async def test_rule_holds_for_any_order_and_repetition(
    applier: EventApplier, redis: aioredis.Redis, data: tuple[list[Ev], list[Ev]], batch_size: int
) -> None:
    history, deliveries = data
    await redis.flushdb()
    total = {"applied": 0, "duplicate": 0, "stale": 0}
    for start in range(0, len(deliveries), batch_size):
        chunk = [e.to_event() for e in deliveries[start : start + batch_size]]
        result = await applier.apply(chunk)
        total["applied"] += result.applied
        total["duplicate"] += result.duplicate
        total["stale"] += result.stale
    assert total["duplicate"] == len(deliveries) - len(history)
    assert total["applied"] + total["stale"] == len(history)
    for sku in ("S1", "S2"):
        for location in ("L1", "L2"):
            stored = await redis.hget(keys.position(sku), f"oh:{location}")
            assert int(stored or 0) == model_on_hand(history, sku, location), (sku, location)
