"""The Kafka tests' feed and observers: a fresh topic with a producer and a probe consumer, the
event rule as an independent model, waits against a deadline, and what ``/metrics`` says. Shared
by ``test_kafka``, ``test_kafka_dead_letters`` and ``test_kafka_recovery``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
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


@contextlib.asynccontextmanager
async def gateway(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """The whole app: HTTP plus (when configured) the Kafka consumer as its background worker."""
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


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
