"""Kafka ingestion against the real tansu broker, Redis and PostgreSQL: never mocks.

Each test uses its own topic (several partitions, plus ``<topic>.dlq``) and consumer group. The
gateway consumes as its app's background worker (or, for the kill test, as a real ``gateway serve``
process). Progress is observed from outside: the group's committed offsets (a probe consumer),
on-hand over HTTP, and the counters on ``/metrics``; every wait polls against a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.settings import Settings
from tests.helpers import event, metric_sum
from tests.kafka_feed import (
    PARTITIONS,
    ROOT,
    Feed,
    assert_state,
    delta,
    encode,
    gateway,
    history,
    kafka_outcomes,
    metrics_text,
    on_hand,
    open_feed,
    read_dlq,
    rule,
    sample,
    serve_env,
    wait_for,
)

# --- the feed of each test: its own topic and consumer group (tests/kafka_feed.py) ---------------


@pytest.fixture
async def feed(kafka_bootstrap: str) -> AsyncIterator[Feed]:
    async with open_feed(kafka_bootstrap) as opened:
        yield opened


@pytest.fixture
def kafka_settings(settings: Settings, feed: Feed) -> Settings:
    return dataclasses.replace(
        settings,
        kafka_bootstrap=feed.bootstrap,
        kafka_topics=(feed.topic,),
        kafka_group=feed.group,
    )


# --- 1. a new group starts at the earliest offset -------------------------------------------------


async def test_events_published_before_start_are_applied_once(
    feed: Feed, kafka_settings: Settings
) -> None:
    rng = random.Random(1)
    events = history("pre", 90, rng)
    await feed.publish_events(events, rng)
    before = await kafka_outcomes()
    started = time.time()

    async with gateway(kafka_settings) as client:
        await feed.wait_committed()
        # Offsets are committed only after applying: once they are, the state is final.
        await assert_state(client, rule(events))
        # The feed's freshness: when its last batch came in (dashboards show time() minus it).
        last = metric_sum(
            await metrics_text(client), "gateway_stock_last_event_timestamp_seconds", source="kafka"
        )
        assert started <= last <= time.time()
        counted = delta(await kafka_outcomes(client), before)
        assert counted["applied"] + counted["stale"] == len(events)
        assert counted["duplicate"] == 0
        # Once caught up, every partition reports its lag, and it is zero.
        await wait_for(
            lambda: metrics_text(client),
            lambda text: all(
                sample(text, "gateway_kafka_consumer_lag", topic=feed.topic, partition=str(p)) == 0
                for p in range(PARTITIONS)
            ),
            "zero consumer lag on every partition",
        )


# --- 2. poison messages go to the DLQ and never stall their partition -----------------------------


async def test_poison_messages_go_to_the_dlq_and_never_stall_the_partition(
    feed: Feed, kafka_settings: Settings
) -> None:
    good = [
        event("g1", "snapshot", 50, -100, sku="SKU-P"),
        event("g2", "adjustment", -5, -90, sku="SKU-P"),
        event("g3", "adjustment", 7, -80, sku="SKU-P"),
        event("g4", "snapshot", 9, -100, sku="SKU-Q", location="L2"),
        event("g5", "adjustment", 1, -50, sku="SKU-Q", location="L2"),
    ]
    bad_field = {**event("b1", "adjustment", 1, -70, sku="SKU-P"), "quantity": "5"}
    zero = event("b2", "adjustment", 0, -60, sku="SKU-P")
    unknown = {**event("b3", "adjustment", 2, -60, sku="SKU-P"), "warehouse": "X"}
    # Poison interleaved with good events in partition 0, published before the gateway starts.
    offsets = await feed.publish(
        0,
        [
            encode(good[0]),
            b"{not json",
            encode(good[1]),
            encode(bad_field),
            None,  # a tombstone
            encode(zero),
            b"[" * 5000,  # nested too deep for the validator
            encode(unknown),
            encode(good[2]),
        ],
    )
    poison = {
        offsets[i]: value
        for i, value in [
            (1, b"{not json"),
            (3, encode(bad_field)),
            (4, None),
            (5, encode(zero)),
            (6, b"[" * 5000),
            (7, encode(unknown)),
        ]
    }
    # Partition 1: a poison message with headers, one too big to copy to the DLQ as is (1.5 MB;
    # the gateway's producer sends at most 1 MiB), then good events after them.
    traced = (await feed.publish(1, [b"\x00\xff binary"], headers=[("trace", b"t-1")]))[0]
    huge = (await feed.publish(1, [b"x" * 1_500_000]))[0]
    await feed.publish(1, [encode(good[3]), encode(good[4])])
    before = await kafka_outcomes()

    async with gateway(kafka_settings) as client:
        await feed.wait_committed()  # past every poison message: nothing stalled
        await assert_state(client, rule(good))
        counted = delta(await kafka_outcomes(client), before)
        assert counted == {"applied": len(good), "duplicate": 0, "stale": 0}
        text = await metrics_text(client)
        dead = len(poison) + 2
        assert sample(text, "gateway_kafka_dead_letters_total", topic=feed.topic) == dead

    records = await read_dlq(feed, dead)
    letters = {dict(r.headers)["dlq-source"].decode(): (r.value, dict(r.headers)) for r in records}
    assert len(records) == dead  # each exactly once
    assert set(letters) == {f"{feed.topic}/0/{o}" for o in poison} | {
        f"{feed.topic}/1/{traced}",
        f"{feed.topic}/1/{huge}",
    }
    reasons = {source: h["dlq-reason"].decode() for source, (_, h) in letters.items()}
    for o, value in poison.items():
        assert letters[f"{feed.topic}/0/{o}"][0] == value  # the original value, untouched
    src = f"{feed.topic}/0/"
    assert reasons[src + str(offsets[1])].startswith("event: malformed JSON")
    assert reasons[src + str(offsets[3])] == "quantity: Expected `int`, got `str`"
    assert reasons[src + str(offsets[4])] == "event: message has no value"
    assert reasons[src + str(offsets[5])] == "quantity: an adjustment's quantity must not be 0"
    assert reasons[src + str(offsets[6])].startswith("event: ")
    assert reasons[src + str(offsets[7])] == "warehouse: unknown field"
    value, headers = letters[f"{feed.topic}/1/{traced}"]
    assert value == b"\x00\xff binary"
    assert headers["trace"] == b"t-1"  # the original headers travel with it
    assert headers["dlq-reason"].decode().startswith("event: malformed JSON")
    value, headers = letters[f"{feed.topic}/1/{huge}"]
    assert value == b"x" * 65536  # a bounded copy (tests/test_kafka_dead_letters.py)
    assert json.loads(headers["dlq-truncated"]) == {"value": {"size": 1_500_000, "kept": 65536}}
    assert headers["dlq-reason"].decode().startswith("event: malformed JSON")


# --- 3. a consumer restart: nothing lost, nothing applied twice -----------------------------------


async def test_restart_resumes_at_the_committed_offset(
    feed: Feed, kafka_settings: Settings
) -> None:
    rng = random.Random(3)
    first, later = history("r1", 60, rng), history("r2", 40, rng)
    await feed.publish_events(first, rng)
    async with gateway(kafka_settings) as client:
        await feed.wait_committed()
        await assert_state(client, rule(first))
    consumed = list(feed.ends)
    assert await feed.committed() == consumed  # a clean stop leaves everything committed

    # While no gateway runs: new events, and a replay of some already applied (duplicates).
    replayed = rng.sample(first, 15)
    await feed.publish_events(later, rng)
    await feed.publish_events(replayed, rng)
    before = await kafka_outcomes()

    async with gateway(kafka_settings) as client:  # same group: resumes where it committed
        await feed.wait_committed()
        await assert_state(client, rule(first + later + replayed))
        counted = delta(await kafka_outcomes(client), before)
        # Only the new messages were read: none of the first run's is applied (or seen) again.
        assert counted["applied"] + counted["stale"] == len(later)
        assert counted["duplicate"] == len(replayed)


async def blocked_script(redis: aioredis.Redis) -> bool:
    """Whether a client waits in Redis (paused) on a script call: a batch is in flight."""
    return any(
        "b" in c["flags"] and c["cmd"] in {"evalsha", "eval", "fcall"}
        for c in await redis.client_list()
    )


async def test_kill_between_apply_and_commit_replays_harmlessly(
    feed: Feed, kafka_settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """A real ``gateway serve`` process is killed after applying a batch, before committing it:
    the next consumer replays the batch, and every replayed event is a harmless duplicate."""
    rng = random.Random(4)
    first = history("k1", 40, rng)
    # Same positions as the first part; one partition, one record batch: fetched in one go.
    in_flight = [
        event(
            f"k2-{i}",
            "adjustment",
            rng.randrange(1, 9),
            -5 * i,
            sku=f"SKU-k1-{i % 3}",
            location=f"L{i % 2}",
        )
        for i in range(20)
    ]
    await feed.publish_events(first, rng)
    env = serve_env(kafka_settings, feed)
    log_path = tmp_path / "gateway.log"
    reader_settings = dataclasses.replace(kafka_settings, kafka_bootstrap="")
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", env=env, cwd=ROOT, stdout=log, stderr=log
        )
    port = env["GATEWAY_PORT"]

    async def lag0() -> float | None:
        url = f"http://127.0.0.1:{port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            text = await resp.text()
        return sample(text, "gateway_kafka_consumer_lag", topic=feed.topic, partition="0")

    try:
        async with gateway(reader_settings) as reader:  # HTTP only, to read the state
            try:
                await feed.wait_committed()
            except pytest.fail.Exception:
                pytest.fail(
                    f"gateway process (exit {proc.returncode}) did not consume; its log:\n"
                    f"{log_path.read_text()[-3000:]}"
                )
            await assert_state(reader, rule(first))

            await redis.client_pause(30_000, all=False)  # writes wait; reads go on
            try:
                await feed.publish(0, [encode(e) for e in in_flight])
                # Fetched (its lag counts what is not applied yet), and its scripts wait in Redis.
                await wait_for(lag0, lambda lag: lag == len(in_flight), "the batch fetched")
                await wait_for(lambda: blocked_script(redis), bool, "the batch waiting in Redis")
                # Frozen: it can send nothing more, so it cannot commit.
                proc.send_signal(signal.SIGSTOP)
            finally:
                await redis.client_unpause()
            # Redis runs the frozen process's queued scripts: the batch is applied...
            full = rule(first + in_flight)
            await wait_for(lambda: on_hand(reader, full), lambda got: got == full, "batch applied")
            proc.kill()
            await proc.wait()
            # ...and never committed.
            committed = await feed.committed()
            assert committed[0] == feed.ends[0] - len(in_flight)
            assert committed[1:] == feed.ends[1:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    before = await kafka_outcomes()
    async with gateway(kafka_settings) as client:
        await feed.wait_committed()
        await assert_state(client, full)
        counted = delta(await kafka_outcomes(client), before)
        # The uncommitted batch, and only it, came again: all duplicates, none applied twice.
        assert counted == {"applied": 0, "duplicate": len(in_flight), "stale": 0}


# --- 4. consumer lag ------------------------------------------------------------------------------


async def test_consumer_lag_counts_what_is_not_yet_applied(
    feed: Feed, kafka_settings: Settings, redis: aioredis.Redis
) -> None:
    def lag(text: str, partition: int) -> float | None:
        name = "gateway_kafka_consumer_lag"
        return sample(text, name, topic=feed.topic, partition=str(partition))

    async with gateway(kafka_settings) as client:
        await feed.publish(0, [encode(event("l0", "snapshot", 10, -100, sku="SKU-L"))])
        await feed.wait_committed([1, 0, 0])
        await redis.client_pause(30_000, all=False)  # applying stalls; fetching goes on
        try:
            await feed.publish(
                0, [encode(event(f"l0-{i}", "adjustment", 1, -i, sku="SKU-L")) for i in range(5)]
            )
            await feed.publish(
                1, [encode(event(f"l1-{i}", "adjustment", 2, -i, sku="SKU-M")) for i in range(3)]
            )
            await wait_for(
                lambda: metrics_text(client),
                lambda text: (lag(text, 0), lag(text, 1)) == (5, 3),
                "lag 5 on partition 0 and 3 on partition 1",
            )
            assert await feed.committed() == [1, 0, 0]
        finally:
            await redis.client_unpause()
        await feed.wait_committed()
        await wait_for(
            lambda: metrics_text(client),
            lambda text: (lag(text, 0), lag(text, 1)) == (0, 0),
            "lag back to 0",
        )
        await assert_state(client, {("SKU-L", "L1"): 15, ("SKU-M", "L1"): 6})
