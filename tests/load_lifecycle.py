"""Load for the life-cycle tests (``test_sigterm_under_load``): shoppers, HTTP feeds and a Kafka
producer that run against a gateway group until told to stop, and a record of every request
they made: its full answer, or how the connection failed.

What "admitted" means is checked from these records: a request that got no answer (a
connection refused, reset or closed on it) must have left nothing behind, and a request with an
answer must have one the contract allows. The records keep what each request would have done
(its reservation, order and event ids) so the test can look for it in Redis and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import aiohttp
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.conftest import auth
from tests.helpers import event

LOCATION: Final = "L1"
# An answer arrives within this, drain included (the shutdown timeout is 10 s): a request
# still unanswered then is a timeout, which the contract never allows.
REQUEST_TIMEOUT: Final = 20.0
# The connection failed: no answer. Only allowed on a request the server never read.
REFUSED: Final = "refused"
# Failures the contract never allows: no answer in time, or an answer cut short.
TIMED_OUT: Final = "timed-out"
CUT_SHORT: Final = "cut-short"
THINK_SECONDS: Final = 0.03


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """One request and what came of it."""

    kind: str  # reserve | confirm | order | events
    key: str  # the reservation id, order id or first event id
    status: int | str  # the HTTP status, or REFUSED / TIMED_OUT / CUT_SHORT
    code: str | None = None  # the problem's code
    retry_after: str | None = None
    error: str = ""  # the exception, for a connection-level failure
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    # When it was sent and when its outcome came (time.monotonic()).
    sent: float = 0.0
    done: float = 0.0

    @property
    def answered(self) -> bool:
        return isinstance(self.status, int)


@dataclasses.dataclass
class Load:
    """Every request made, in the order their outcomes came."""

    url: str
    run: str
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    stop: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # When SIGTERM was sent (time.monotonic()).
    signalled: float = 0.0

    def of(self, kind: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == kind]

    async def call(
        self,
        session: aiohttp.ClientSession,
        kind: str,
        key: str,
        path: str,
        body: dict[str, Any],
        role: str,
        **detail: Any,
    ) -> Outcome:
        sent = time.monotonic()
        try:
            async with session.post(
                self.url + path,
                json=body,
                headers=auth(role),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            ) as resp:
                payload = await resp.json(content_type=None)
                code = payload.get("code") if isinstance(payload, dict) else None
                outcome = Outcome(
                    kind, key, resp.status, code, resp.headers.get("Retry-After"), detail=detail
                )
        except TimeoutError as exc:  # first: aiohttp's timeouts are connection errors too
            outcome = Outcome(kind, key, TIMED_OUT, error=repr(exc), detail=detail)
        except aiohttp.ClientPayloadError as exc:
            outcome = Outcome(kind, key, CUT_SHORT, error=repr(exc), detail=detail)
        except aiohttp.ClientConnectionError as exc:
            outcome = Outcome(kind, key, REFUSED, error=repr(exc), detail=detail)
        outcome = dataclasses.replace(outcome, sent=sent, done=time.monotonic())
        self.outcomes.append(outcome)
        return outcome

    def in_flight_at(self, moment: float) -> list[Outcome]:
        """The requests sent before ``moment`` whose outcome came after it."""
        return [o for o in self.outcomes if o.sent < moment < o.done]

    async def pause_after(self, outcome: Outcome) -> None:
        # No spinning against a closed port; a refused client backs off like a real one.
        await asyncio.sleep(0.05 if outcome.status == REFUSED else 0)


def lines(sku: str, quantity: int = 1) -> list[dict[str, Any]]:
    return [{"sku": sku, "location": LOCATION, "quantity": quantity}]


async def shopper(load: Load, n: int, skus: list[str], seed: int) -> None:
    """Reserve then confirm (two in three carts), or order in one step, on a keep-alive pool,
    until ``load.stop``. A shopper thinks a little between carts: the orders (which the ERP
    takes at its own pace afterwards) stay as many on a fast machine as on a slow one."""
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as session:
        for i in itertools.count():
            if load.stop.is_set():
                return
            await asyncio.sleep(THINK_SECONDS)
            sku = rng.choice(skus)
            quantity = rng.randrange(1, 4)
            order = {"customer_id": f"c-{n}", "ref": f"{load.run}-{n}-{i}"}
            if rng.random() < 2 / 3:
                rid = f"r-{load.run}-{n}-{i}"
                body: dict[str, Any] = {"reservation_id": rid, "lines": lines(sku, quantity)}
                held = await load.call(
                    session, "reserve", rid, "/v1/reservations", body, "storefront", sku=sku
                )
                await load.pause_after(held)
                if held.status != 201 or load.stop.is_set():
                    continue
                oid = f"o-{load.run}-{n}-{i}"
                body = {"order_id": oid, "order": order}
                confirmed = await load.call(
                    session,
                    "confirm",
                    oid,
                    f"/v1/reservations/{rid}/confirm",
                    body,
                    "storefront",
                    sku=sku,
                    reservation_id=rid,
                )
                await load.pause_after(confirmed)
            else:
                oid = f"d-{load.run}-{n}-{i}"
                body = {"order_id": oid, "lines": lines(sku, quantity), "order": order}
                placed = await load.call(
                    session,
                    "order",
                    oid,
                    "/v1/orders",
                    body,
                    "storefront",
                    sku=sku,
                    reservation_id=f"order:{oid}",
                )
                await load.pause_after(placed)


async def http_feed(load: Load, n: int, skus: list[str], seed: int) -> None:
    """Batches of adjustments with unique ids over ``POST /v1/stock-events`` until stopped."""
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as session:
        for i in itertools.count():
            if load.stop.is_set():
                return
            events = [
                event(
                    f"h-{load.run}-{n}-{i}-{j}",
                    "adjustment",
                    rng.randrange(1, 10),
                    0,
                    sku=rng.choice(skus),
                    location=LOCATION,
                )
                for j in range(rng.randrange(1, 6))
            ]
            sent = await load.call(
                session,
                "events",
                events[0]["event_id"],
                "/v1/stock-events",
                {"events": events},
                "feed",
                events=events,
            )
            await load.pause_after(sent)
            await asyncio.sleep(0.01)


@dataclasses.dataclass
class KafkaLoad:
    """Stock events produced to the group's topic, keyed by SKU, one acknowledged send at a
    time (acks=all): ``produced`` is what the broker has."""

    producer: AIOKafkaProducer
    topic: str
    run: str
    produced: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    async def produce(self, stop: asyncio.Event, skus: list[str], seed: int) -> None:
        rng = random.Random(seed)
        for i in itertools.count():
            if stop.is_set():
                return
            sku = rng.choice(skus)
            e = event(
                f"k-{self.run}-{i}",
                "adjustment",
                rng.randrange(1, 10),
                0,
                sku=sku,
                location=LOCATION,
            )
            await self.producer.send_and_wait(self.topic, value=_encode(e), key=sku.encode())
            self.produced[e["event_id"]] = e
            await asyncio.sleep(0.005)


def _encode(e: dict[str, Any]) -> bytes:
    return json.dumps(e).encode()


async def read_topic(bootstrap: str, topic: str, partitions: int) -> dict[int, list[str]]:
    """Per partition, the event id at each offset: everything the topic holds, read without a
    group (so nothing is committed)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        found: dict[int, list[str]] = {p: [] for p in range(partitions)}
        idle = 0
        while idle < 3:
            batches = await consumer.getmany(timeout_ms=300)
            idle = 0 if batches else idle + 1
            for tp, records in batches.items():
                for record in records:
                    assert record.offset == len(found[tp.partition]), "a gap in the partition"
                    assert record.value is not None
                    found[tp.partition].append(_event_id(record.value))
        return found
    finally:
        await consumer.stop()


def _event_id(value: bytes) -> str:
    return str(json.loads(value)["event_id"])


@contextlib.asynccontextmanager
async def group_probe(bootstrap: str, group: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer of the group that never joins it (it subscribes to nothing): it reads the
    committed offsets. One for the whole test: a probe started and stopped every poll would
    keep the broker's group coordinator busy."""
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await probe.start()
    try:
        yield probe
    finally:
        await probe.stop()


async def committed(probe: AIOKafkaConsumer, topic: str, partitions: int) -> list[int]:
    """The group's committed offset per partition (0 where none)."""
    return [(await probe.committed(TopicPartition(topic, p))) or 0 for p in range(partitions)]


async def seed_group(bootstrap: str, topic: str, group: str, offsets: list[int]) -> None:
    """Commit ``offsets`` (per partition; 0: none) for ``group``, which has no members."""
    seeder = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await seeder.start()
    try:
        tps = {TopicPartition(topic, p): offset for p, offset in enumerate(offsets) if offset}
        seeder.assign(list(tps))
        if tps:
            await seeder.commit(tps)
    finally:
        await seeder.stop()


async def hold_writes(redis: aioredis.Redis, ms: int) -> None:
    """Redis holds every write for ``ms`` (then lets them through by itself); returns once a
    client waits in it on a script: work admitted and in flight, for a signal to find there."""
    await redis.client_pause(ms, all=False)  # WRITE

    async def blocked() -> bool:
        return any(
            "b" in c["flags"] and c["cmd"] in {"evalsha", "eval", "fcall"}
            for c in await redis.client_list()
        )

    await until(blocked, ms / 1000 / 2, "a gateway's write to wait in the paused Redis")
    await asyncio.sleep(ms / 1000 / 3)  # and every client's next request behind it


async def until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within:g} s: {what}")
        await asyncio.sleep(0.1)
