"""Kafka ingest through a Redis outage, and events the event rule refuses.

- Redis stalled, then gone (a black-holing TCP proxy in front of the test Redis, then a cut), for
  long enough that a consumer crashing into the supervisor's backoff would be seconds behind once
  Redis is back: the consumer retries its batch in place instead, never restarts, and applies and
  commits everything within a few seconds of recovery.
- An adjustment apply_events.lua refuses (outcome ``rejected``: the position would leave
  +-MAX_POSITION) is counted, answered over HTTP, and dead-lettered over Kafka; its valid
  neighbours apply.

Real tansu, Redis and PostgreSQL throughout (see tests/test_kafka.py for the feed helpers).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from gateway.atp import keys
from gateway.atp.schemas import MAX_POSITION
from gateway.http.state import LIFECYCLE
from gateway.settings import Settings
from tests.conftest import auth
from tests.helpers import event
from tests.kafka_feed import (
    PARTITIONS,
    Feed,
    Position,
    assert_state,
    encode,
    gateway,
    metrics_text,
    open_feed,
    read_dlq,
    rule,
    sample,
    wait_for,
)
from tests.proxy import TcpProxy

STALLED = 3.0  # seconds Redis answers nothing, then it refuses connections
OUTAGE = 10.0  # seconds at least, in all
# Applied and committed within this of Redis coming back. Retrying in place, each batch in flight
# tries again at most 2 s apart: measured 0.9-2.3 s. A consumer that crashes on the outage instead
# (each restart ~1.5 s here: a new consumer, a group rejoin, then the supervisor's backoff) is
# 10 s in at a backoff of 3.2 s; waiting that out and rejoining takes it ~4.7 s.
RECOVERY = 3.0
OUTCOMES = ("applied", "duplicate", "stale", "rejected")


@pytest.fixture
async def feed(kafka_bootstrap: str) -> AsyncIterator[Feed]:
    async with open_feed(kafka_bootstrap) as opened:
        yield opened


def consuming(settings: Settings, feed: Feed, **overrides: Any) -> Settings:
    return dataclasses.replace(
        settings,
        kafka_bootstrap=feed.bootstrap,
        kafka_topics=(feed.topic,),
        kafka_group=feed.group,
        **overrides,
    )


def outcomes(text: str, source: str) -> dict[str, int]:
    name = "gateway_stock_events_total"
    return {o: int(sample(text, name, source=source, outcome=o) or 0) for o in OUTCOMES}


def gained(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


async def near_the_bound(redis: aioredis.Redis, sku: str, location: str) -> None:
    """A position 5 below MAX_POSITION: an adjustment of +10 there is rejected."""
    figures = {"b": MAX_POSITION - 5, "oh": MAX_POSITION - 5, "ag": 0}
    await redis.hset(keys.position(sku), mapping={f"{k}:{location}": v for k, v in figures.items()})


# --- Redis stalled, then down: the consumer waits it out in place ---------------------------------


async def test_ingest_catches_up_within_seconds_of_a_redis_outage(
    feed: Feed, settings: Settings, redis_url: str
) -> None:
    target = urlsplit(redis_url)
    assert target.hostname is not None
    assert target.port is not None
    proxy = TcpProxy(target.hostname, target.port)
    await proxy.start()
    through_proxy = target._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
    config = consuming(settings, feed, redis_url=through_proxy, redis_timeout_seconds=0.5)
    before = outcomes(await metrics_text(), "kafka")
    published = [event(f"w{p}", "snapshot", 100, -100, sku=f"SKU-W{p}") for p in range(PARTITIONS)]
    states: list[str] = []
    restart_began = asyncio.Event()
    try:
        async with gateway(config) as client:
            workers = client.app[LIFECYCLE].workers

            async def watch() -> None:
                # Every state the consumer's supervisor reports; a restart shows for >= 0.1 s.
                while True:
                    state = workers.get("kafka-consumer", "")
                    if not states or states[-1] != state:
                        states.append(state)
                        if state.startswith("restarting"):
                            restart_began.set()
                    await asyncio.sleep(0.01)

            watcher = asyncio.create_task(watch())
            try:
                for p in range(PARTITIONS):
                    await feed.publish(p, [encode(published[p])])
                await feed.wait_committed()

                proxy.blackhole()
                outage = time.monotonic()
                # Batches keep coming on every partition while Redis is away: the first meet
                # the stall (a command timeout: outcome unknown), the later ones the refusal.
                for wave in range(4):
                    batch: list[dict[str, Any]] = []
                    for p in range(PARTITIONS):
                        adjustments = [
                            event(
                                f"a{wave}-{p}-{i}",
                                "adjustment",
                                wave + i + 1,
                                -90 + 10 * wave,
                                sku=f"SKU-W{p}",
                                location=f"L{i}",
                            )
                            for i in range(3)
                        ]
                        await feed.publish(p, [encode(e) for e in adjustments])
                        batch += adjustments
                    published += batch
                    if wave == 1:
                        await asyncio.sleep(outage + STALLED - time.monotonic())
                        await proxy.cut()
                    else:
                        await asyncio.sleep(1.0)
                await asyncio.sleep(outage + OUTAGE - time.monotonic())
                if restart_began.is_set():
                    # A consumer in a crash loop gets Redis back at the worst moment for it: just
                    # as it begins a restart wait. One that never restarted has none to wait out.
                    restart_began.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(4):
                            await restart_began.wait()
                assert await feed.committed() == [1] * PARTITIONS  # nothing applied meanwhile

                await proxy.heal()
                healed = time.monotonic()
                ends = list(feed.ends)
                await wait_for(feed.committed, lambda got: got == ends, f"committed == {ends}")
                caught_up = time.monotonic() - healed
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)

            assert caught_up <= RECOVERY, (
                f"applied and committed {caught_up:.2f}s after Redis came back; "
                f"consumer states: {states}"
            )
            assert all(not s.startswith("restarting") for s in states), states
            expected: dict[Position, int] = rule(published)
            await assert_state(client, expected)
            counted = gained(outcomes(await metrics_text(client), "kafka"), before)
            # Each event counted once, not once per try. (A batch sent into the stall and run by
            # Redis afterwards would count as duplicate on its retry; the cut drops it here.)
            assert counted["applied"] + counted["duplicate"] == len(published), counted
            assert (counted["stale"], counted["rejected"]) == (0, 0), counted
    finally:
        await proxy.close()


# --- adjustments the event rule refuses -----------------------------------------------------------


async def test_a_rejected_adjustment_is_dead_lettered_and_its_neighbours_apply(
    feed: Feed, settings: Settings, redis: aioredis.Redis
) -> None:
    await near_the_bound(redis, "SKU-R", "L1")
    refused = event("r-up", "adjustment", 10, -50, sku="SKU-R")
    good = [
        event("r-n1", "snapshot", 40, -100, sku="SKU-N"),
        event("r-down", "adjustment", -20, -40, sku="SKU-R"),  # after it, same position
        event("r-n2", "adjustment", 2, -30, sku="SKU-N"),
    ]
    offsets = await feed.publish(0, [encode(good[0]), encode(refused), encode(good[1])])
    await feed.publish(1, [encode(good[2])])
    before = outcomes(await metrics_text(), "kafka")

    async with gateway(consuming(settings, feed)) as client:
        await feed.wait_committed()
        await assert_state(client, {("SKU-R", "L1"): MAX_POSITION - 25, ("SKU-N", "L1"): 42})
        counted = gained(outcomes(await metrics_text(client), "kafka"), before)
        assert counted == {"applied": 3, "duplicate": 0, "stale": 0, "rejected": 1}

    records = await read_dlq(feed, 1)
    assert len(records) == 1
    headers = dict(records[0].headers)
    assert headers["dlq-source"] == f"{feed.topic}/0/{offsets[1]}".encode()
    assert headers["dlq-reason"].decode().startswith("quantity:")
    assert records[0].value == encode(refused)  # the original message, untouched
    # Not kept as seen: once the position has room, the same event applies.
    assert await redis.zscore(keys.event_ids("SKU-R"), "r-up") is None


async def test_a_rejected_adjustment_is_answered_and_counted_over_http(
    settings: Settings, redis: aioredis.Redis
) -> None:
    await near_the_bound(redis, "SKU-H", "L1")
    before = outcomes(await metrics_text(), "http")
    batch = {
        "events": [
            event("h-up", "adjustment", 10, -50, sku="SKU-H"),
            event("h-ok", "adjustment", 3, -40, sku="SKU-J"),
        ]
    }
    async with gateway(settings) as client:
        resp = await client.post("/v1/stock-events", json=batch, headers=auth("feed"))
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"applied": 1, "duplicate": 0, "stale": 0, "rejected": 1}
        counted = gained(outcomes(await metrics_text(client), "http"), before)
        assert counted == {"applied": 1, "duplicate": 0, "stale": 0, "rejected": 1}
        await assert_state(client, {("SKU-H", "L1"): MAX_POSITION - 5, ("SKU-J", "L1"): 3})


async def test_a_sku_whose_keys_are_damaged_does_not_stop_the_partition(
    feed: Feed, settings: Settings, redis: aioredis.Redis
) -> None:
    """An error retrying cannot cure (here WRONGTYPE: a SKU's position key holds a string) made
    the whole batch fail on every replay, so nothing behind it was ever committed. Now each SKU
    is applied on its own and only the damaged SKU's events are dead-lettered."""
    await redis.set(keys.position("SKU-BAD"), "not a hash")
    bad = event("d-bad", "adjustment", 3, -50, sku="SKU-BAD")
    good = [
        event("d-g1", "snapshot", 10, -100, sku="SKU-G"),
        event("d-g2", "adjustment", 1, -40, sku="SKU-G"),
    ]
    offsets = await feed.publish(0, [encode(good[0]), encode(bad), encode(good[1])])

    async with gateway(consuming(settings, feed)) as client:
        await feed.wait_committed()
        await assert_state(client, {("SKU-G", "L1"): 11})

    records = await read_dlq(feed, 1)
    assert len(records) == 1
    headers = dict(records[0].headers)
    assert headers["dlq-source"] == f"{feed.topic}/0/{offsets[1]}".encode()
    assert headers["dlq-reason"].decode().startswith("apply:")
    assert records[0].value == encode(bad)
