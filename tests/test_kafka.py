"""Kafka ingestion against the real tansu broker, Redis and PostgreSQL: never mocks.

Each test uses its own topic (several partitions, plus ``<topic>.dlq``) and consumer group. The
gateway consumes as its app's background worker (or, for the kill test, as a real ``gateway serve``
process). Progress is observed from outside: the group's committed offsets (a probe consumer),
on-hand over HTTP, and the counters on ``/metrics``; every wait polls against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.dev.services import free_port
from gateway.settings import Settings
from tests.conftest import KEYS, auth
from tests.helpers import event

PARTITIONS = 3
DEADLINE = 20.0
ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
Event = dict[str, Any]
Position = tuple[str, str]


# --- the feed: a fresh topic, a producer, and what was published ----------------------------------


@dataclasses.dataclass
class Feed:
    bootstrap: str
    topic: str
    group: str
    producer: AIOKafkaProducer
    probe: AIOKafkaConsumer  # in the group, never joins it: reads the committed offsets
    ends: list[int] = dataclasses.field(default_factory=lambda: [0] * PARTITIONS)

    @property
    def dlq(self) -> str:
        return self.topic + ".dlq"

    async def publish(
        self,
        partition: int,
        values: Sequence[bytes | None],
        headers: Sequence[tuple[str, bytes]] = (),
        keys: Sequence[bytes | None] | None = None,
    ) -> list[int]:
        """Publish ``values`` to one partition as one record batch (fetched as a whole);
        returns their offsets."""
        batch = self.producer.create_batch()
        for value, key in zip(values, keys or [None] * len(values), strict=True):
            appended = batch.append(key=key, value=value, timestamp=None, headers=list(headers))
            assert appended is not None, "record batch full: publish fewer values at once"
        await (await self.producer.send_batch(batch, self.topic, partition=partition))
        first = self.ends[partition]
        self.ends[partition] += len(values)
        return list(range(first, self.ends[partition]))

    async def publish_events(self, events: Iterable[Event], rng: random.Random) -> None:
        """Publish events scattered over the partitions (the event rule is order-free)."""
        by_partition: dict[int, list[bytes | None]] = {}
        for e in events:
            by_partition.setdefault(rng.randrange(PARTITIONS), []).append(encode(e))
        for partition, values in by_partition.items():
            for i in range(0, len(values), 40):
                await self.publish(partition, values[i : i + 40])

    async def committed(self) -> list[int]:
        offsets = []
        for p in range(PARTITIONS):
            offset = await self.probe.committed(TopicPartition(self.topic, p))
            offsets.append(offset or 0)
        return offsets

    async def wait_committed(self, expected: Sequence[int] | None = None) -> None:
        """Wait until the group committed exactly ``expected`` (default: all published)."""
        want = list(expected if expected is not None else self.ends)
        await wait_for(self.committed, lambda got: got == want, f"committed offsets == {want}")


@pytest.fixture
async def feed(kafka_bootstrap: str) -> AsyncIterator[Feed]:
    async with open_feed(kafka_bootstrap) as opened:
        yield opened


def new_topic() -> str:
    return f"stock-{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def open_feed(kafka_bootstrap: str, topic: str | None = None) -> AsyncIterator[Feed]:
    topic = topic or new_topic()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        # Created here, not left to auto-creation: production brokers usually disable it.
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1), NewTopic(topic + ".dlq", 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        enable_idempotence=False,
        acks="all",
        max_request_size=4 * 1024 * 1024,
    )
    group = f"gw-{uuid.uuid4().hex[:12]}"
    probe = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group)
    await producer.start()
    await probe.start()
    try:
        yield Feed(kafka_bootstrap, topic, group, producer, probe)
    finally:
        await probe.stop()
        await producer.stop()


@pytest.fixture
def kafka_settings(settings: Settings, feed: Feed) -> Settings:
    return dataclasses.replace(
        settings,
        kafka_bootstrap=feed.bootstrap,
        kafka_topics=(feed.topic,),
        kafka_group=feed.group,
    )


@contextlib.asynccontextmanager
async def gateway(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """The whole app: HTTP plus (when configured) the Kafka consumer as its background worker."""
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


# --- waiting and reading --------------------------------------------------------------------------


async def wait_for(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], what: str, within: float = DEADLINE
) -> T:
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:.0f}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(0.05)


def encode(e: Event) -> bytes:
    return json.dumps(e).encode()


async def on_hand(
    client: TestClient[Any, Any], positions: Iterable[Position]
) -> dict[Position, int]:
    by_location: dict[str, list[str]] = {}
    for sku, location in positions:
        by_location.setdefault(location, []).append(sku)
    found: dict[Position, int] = {}
    for location, skus in by_location.items():
        params = [("sku", sku) for sku in skus] + [("location", location)]
        resp = await client.get("/v1/availability", params=params, headers=auth("storefront"))
        assert resp.status == 200, await resp.text()
        for item in (await resp.json())["items"]:
            found[(item["sku"], location)] = int(item["on_hand"])
    return found


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


async def metrics_text(client: TestClient[Any, Any] | None = None) -> str:
    """What ``/metrics`` serves (this process's registry when no app is running yet)."""
    if client is None:
        return generate_latest().decode()
    resp = await client.get("/metrics")
    assert resp.status == 200
    return await resp.text()


async def kafka_outcomes(client: TestClient[Any, Any] | None = None) -> dict[str, int]:
    text = await metrics_text(client)
    return {
        outcome: int(
            sample(text, "gateway_stock_events_total", source="kafka", outcome=outcome) or 0
        )
        for outcome in ("applied", "duplicate", "stale")
    }


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


# --- the event rule, independently: the model the gateway's state must equal ----------------------


def rule(events: Iterable[Event]) -> dict[Position, int]:
    """On-hand per position: the newest snapshot (ties: greater event_id) plus the adjustments
    strictly after it; each event_id counts once."""
    unique = {e["event_id"]: e for e in reversed(list(events))}
    positions: dict[Position, list[Event]] = {}
    for e in unique.values():
        positions.setdefault((e["sku"], e["location"]), []).append(e)
    result = {}
    for pos, evs in positions.items():
        snapshots = [e for e in evs if e["type"] == "snapshot"]
        adjustments = [e for e in evs if e["type"] == "adjustment"]
        if snapshots:
            newest = max(snapshots, key=lambda e: (e["occurred_at"], e["event_id"]))
            base, since = newest["quantity"], newest["occurred_at"]
        else:
            base, since = 0, ""
        result[pos] = base + sum(e["quantity"] for e in adjustments if e["occurred_at"] > since)
    return result


def history(tag: str, n: int, rng: random.Random, skus: int = 3, locations: int = 2) -> list[Event]:
    """``n`` events with unique ids over a few positions, times in the recent past (with ties)."""
    events = []
    for i in range(n):
        sku, location = f"SKU-{tag}-{rng.randrange(skus)}", f"L{rng.randrange(locations)}"
        t = -10 * rng.randrange(300)  # whole seconds, so equal times happen
        if rng.random() < 0.3:
            events.append(
                event(f"{tag}-s{i}", "snapshot", rng.randrange(500), t, sku=sku, location=location)
            )
        else:
            quantity = rng.choice([-1, 1]) * rng.randrange(1, 20)
            events.append(
                event(f"{tag}-a{i}", "adjustment", quantity, t, sku=sku, location=location)
            )
    return events


async def assert_state(client: TestClient[Any, Any], expected: dict[Position, int]) -> None:
    assert await on_hand(client, expected) == expected


# --- 1. a new group starts at the earliest offset -------------------------------------------------


async def test_events_published_before_start_are_applied_once(
    feed: Feed, kafka_settings: Settings
) -> None:
    rng = random.Random(1)
    events = history("pre", 90, rng)
    await feed.publish_events(events, rng)
    before = await kafka_outcomes()

    async with gateway(kafka_settings) as client:
        await feed.wait_committed()
        # Offsets are committed only after applying: once they are, the state is final.
        await assert_state(client, rule(events))
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


async def read_dlq(feed: Feed, count: int) -> list[ConsumerRecord[Any, Any]]:
    consumer = AIOKafkaConsumer(
        feed.dlq,
        bootstrap_servers=feed.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    records: list[ConsumerRecord[Any, Any]] = []
    try:
        deadline = time.monotonic() + DEADLINE
        while len(records) < count and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=200)).values():
                records += recs
        # And nothing beyond: each poison message is dead-lettered exactly once here.
        for recs in (await consumer.getmany(timeout_ms=300)).values():
            records += recs
    finally:
        await consumer.stop()
    return records


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


def serve_env(kafka_settings: Settings, feed: Feed) -> dict[str, str]:
    """The environment of a ``gateway serve`` process consuming ``feed``."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | {
        "GATEWAY_PORT": str(free_port()),
        "GATEWAY_REDIS_URL": kafka_settings.redis_url,
        "GATEWAY_POSTGRES_DSN": kafka_settings.postgres_dsn,
        "GATEWAY_KAFKA_BOOTSTRAP": feed.bootstrap,
        "GATEWAY_KAFKA_TOPICS": feed.topic,
        "GATEWAY_KAFKA_GROUP": feed.group,
        "GATEWAY_KAFKA_SESSION_TIMEOUT_MS": "1000",
        "GATEWAY_API_KEYS": ",".join(f"{role}:{key}" for role, key in KEYS.items()),
        "GATEWAY_LOG_LEVEL": "warning",
    }


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
