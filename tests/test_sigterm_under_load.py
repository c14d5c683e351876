"""SIGTERM to a gateway group while shoppers and feeds run: nothing admitted is lost or done twice.

A real group (``GATEWAY_WORKERS=2``) on Redis, PostgreSQL, tansu (a consumer group on a topic of
the test's own) and the ERP simulator (orders flowing to it under the gateway's rate limit)
serves shoppers (reserve then confirm, or one-step orders), HTTP feeds and a Kafka producer of
stock events. A few seconds in, SIGTERM goes to the parent (the whole group), or to one worker
alone (the parent starts it again while the other serves on; then the group is stopped too).
The signal comes while Redis holds every write for a moment (``CLIENT PAUSE WRITE``), so work is
surely admitted and in flight when it lands. Then, as an operator would see it:

- every request got its whole answer, or a connection-level refusal; never a 500, never a
  timeout; every answer is one the contract allows (503 ``shutting_down`` with Retry-After);
  those waiting in their handlers when the signal came were answered, not dropped;
- a request refused at the connection, or answered 503, did nothing: its hold, order or events
  are nowhere in Redis or PostgreSQL ("admitted" means: its work comes with its answer); each
  201 is held, each 202 is a row of the outbox, each 200's events are applied, and the outbox
  holds nothing else;
- the parent exits 0 with no worker left behind, within the drain's bound;
- the group's committed Kafka offsets cover exactly the applied events (each event below the
  committed offset of its partition is in its SKU's ids, none above it: the drain committed what
  it applied), and a gateway started afterwards from those offsets applies the rest: every
  on-hand is the sum of its events, each counted once;
- that gateway sends every order of the outbox to the ERP, each exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from gateway.atp import keys as atp_keys
from gateway.reservation import keys as reservation_keys
from tests.conftest import auth
from tests.erp_flow import erp_sim, received
from tests.gateway_proc import GatewayProcess
from tests.helpers import event
from tests.load_lifecycle import (
    CUT_SHORT,
    LOCATION,
    REFUSED,
    TIMED_OUT,
    KafkaLoad,
    Load,
    Outcome,
    committed,
    group_probe,
    hold_writes,
    http_feed,
    read_topic,
    seed_group,
    shopper,
    until,
)

pytestmark = pytest.mark.timeout(120)

WORKERS: Final = 2
PARTITIONS: Final = 4
SHOPPERS: Final = 8
FEEDS: Final = 2
LOAD_SECONDS: Final = 2.5
# SIGTERM comes while Redis holds the writes of the work in flight this long (admitted requests
# and Kafka batches wait in it through the drain); the gateways' Redis timeout is longer.
PAUSE_MS: Final = 1500
REDIS_TIMEOUT: Final = "5"
# A request sent this long before SIGTERM and not answered by then was read by its worker.
READ_BY: Final = 0.1
# The gateway's pace to the ERP (orders a second), and the simulator's own limit above it.
ERP_RATE: Final = 100
SIM_LIMIT: Final = 120
# The parent's bound: each worker's drain (GATEWAY_SHUTDOWN_TIMEOUT_SECONDS, 10) plus its margin.
STOP_WITHIN: Final = 30.0
# What each kind of request may answer: (status, problem code).
ALLOWED: Final = {
    "reserve": {(201, None), (409, "insufficient_stock"), (503, "shutting_down")},
    "confirm": {(202, None), (503, "shutting_down"), (503, "buffer_full")},
    "order": {
        (202, None),
        (409, "insufficient_stock"),
        (503, "shutting_down"),
        (503, "buffer_full"),
    },
    "events": {(200, None), (503, "shutting_down")},
}


def children(pid: int) -> set[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


def alive(pids: set[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


async def group_up(gateway: GatewayProcess, within: float = 30) -> set[int]:
    """Until every worker serves (each one's CPU counter shows in a scrape); their pids."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            pids = children(gateway.proc.pid)
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(
                    gateway.url + "/metrics", headers={"Connection": "close"}
                ) as resp:
                    text = await resp.text()
                found = set(re.findall(r'gateway_worker_cpu_seconds_total\{worker="(\d+)"\}', text))
                if found == {str(i) for i in range(WORKERS)} and len(pids) == WORKERS:
                    return pids
            await asyncio.sleep(0.1)
    raise AssertionError(f"the group never came up whole: {gateway.log_text()[-3000:]}")


@contextlib.asynccontextmanager
async def kafka_topic(bootstrap: str) -> AsyncIterator[tuple[str, AIOKafkaProducer]]:
    topic = f"term-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1), NewTopic(topic + ".dlq", 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all")
    await producer.start()
    try:
        yield topic, producer
    finally:
        await producer.stop()


async def seed(url: str, skus: dict[str, int]) -> None:
    body = {
        "events": [
            event(f"seed-{sku}", "snapshot", qty, -600, sku=sku, location=LOCATION)
            for sku, qty in skus.items()
        ]
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/stock-events", json=body, headers=auth("feed")) as resp,
    ):
        assert resp.status == 200, await resp.text()


async def stop_group(gateway: GatewayProcess, workers: set[int]) -> list[str]:
    """SIGTERM to the parent; what went wrong with its stop (asserted once the requests' own
    checks have run, which say more about a broken drain): it must exit 0 within its bound,
    and no worker may outlive it."""
    started = time.monotonic()
    gateway.proc.send_signal(signal.SIGTERM)
    status = await asyncio.to_thread(gateway.proc.wait, STOP_WITHIN + 10)
    took = time.monotonic() - started
    wrong = []
    if status != 0:
        wrong.append(f"the parent exited {status}: {gateway.log_text()[-3000:]}")
    if took >= STOP_WITHIN:
        wrong.append(f"the group took {took:.1f} s to stop")
    if left := alive(workers):
        wrong.append(f"workers {left} outlived their parent")
    return wrong


async def sigterm_one_worker(
    gateway: GatewayProcess, workers: set[int], load: Load, redis: aioredis.Redis
) -> set[int]:
    """SIGTERM to one worker: it drains and exits, the parent starts another in its place, and
    the other serves on meanwhile. The group's pids after."""
    victim, survivor = sorted(workers)
    answered_before = sum(o.answered for o in load.outcomes)
    await hold_writes(redis, PAUSE_MS)
    load.signalled = time.monotonic()
    os.kill(victim, signal.SIGTERM)
    await until(lambda: _gone(victim), STOP_WITHIN, f"worker {victim} to drain and exit")

    async def replaced() -> bool:
        now = children(gateway.proc.pid)
        return len(now) == WORKERS and victim not in now

    await until(replaced, 30, "the parent to start a worker in the stopped one's place")
    died = [line for line in log_lines(gateway) if line.get("event") == "worker_died"]
    assert [(d["pid"], d["status"]) for d in died] == [(victim, 0)], "the drain did not end in 0"
    now = await group_up(gateway)
    assert survivor in now, "the worker that was not signalled stopped too"
    await asyncio.sleep(LOAD_SECONDS)  # the load runs on over the new group
    answered_after = sum(o.answered for o in load.outcomes) - answered_before
    assert answered_after > 50, "the group did not serve on while one worker was replaced"
    assert gateway.proc.poll() is None
    return now


def log_lines(gateway: GatewayProcess) -> list[dict[str, Any]]:
    """The group's JSON log lines so far."""
    found = []
    for line in gateway.log_text().splitlines():
        with contextlib.suppress(ValueError):
            found.append(json.loads(line))
    return [f for f in found if isinstance(f, dict)]


async def _gone(pid: int) -> bool:
    return not alive({pid})


def check_answers(load: Load) -> None:
    """Every request: an answer the contract allows, or a refusal at the connection; and those
    caught in flight by SIGTERM (waiting in the paused Redis) were answered, not dropped."""
    bad = [o for o in load.outcomes if o.status in (TIMED_OUT, CUT_SHORT)]
    assert bad == [], f"requests without a whole answer: {bad[:5]}"
    for o in load.outcomes:
        if o.status == REFUSED:
            continue
        assert (o.status, o.code) in ALLOWED[o.kind], f"not an answer the contract allows: {o}"
        if o.status == 503:
            assert o.retry_after is not None, f"a 503 without Retry-After: {o}"
    # Sent well before SIGTERM (on loopback, to a worker whose loop is free: read at once) and
    # still waiting for Redis when it came: admitted, in their handlers. Each gets its answer.
    caught = [o for o in load.in_flight_at(load.signalled) if o.sent < load.signalled - READ_BY]
    dropped = [o for o in caught if not o.answered]
    assert dropped == [], f"admitted before SIGTERM, never answered: {dropped[:3]}"
    assert len(caught) >= SHOPPERS // 2, f"too few requests in flight at SIGTERM: {caught}"


def did_nothing(o: Outcome) -> bool:
    return o.status == REFUSED or o.status == 503


async def check_effects(load: Load, redis: aioredis.Redis, pg: asyncpg.Connection) -> set[str]:
    """Each answer's work is done, and a request without one (or refused) did nothing. The
    order ids answered 202."""
    for o in load.of("reserve"):
        held = await redis.exists(reservation_keys.record(o.key))
        if o.status == 201:
            assert held, f"{o.key} answered 201 but holds nothing"
        elif did_nothing(o):
            assert not held, f"{o.key} holds stock but got no answer: {o}"
    rows = {r["order_id"] for r in await pg.fetch("SELECT order_id FROM orders")}
    accepted: set[str] = set()
    for o in load.of("confirm") + load.of("order"):
        rid = o.detail["reservation_id"]
        if o.status == 202:
            assert o.key in rows, f"{o.key} answered 202 but is not in the outbox"
            accepted.add(o.key)
        elif did_nothing(o):
            assert o.key not in rows, f"{o.key} is in the outbox but got no answer: {o}"
            committed_hold = await redis.hexists(
                reservation_keys.holds(o.detail["sku"]), reservation_keys.committed_field(rid)
            )
            assert not committed_hold, f"{rid}'s hold was committed but got no answer: {o}"
            if o.kind == "order":
                assert not await redis.exists(reservation_keys.record(rid)), (
                    f"{o.key} holds stock but got no answer: {o}"
                )
    assert rows == accepted, (
        f"outbox rows without a 202: {sorted(rows - accepted)[:5]}; "
        f"202s without a row: {sorted(accepted - rows)[:5]}"
    )
    for o in load.of("events"):
        ids = [(e["sku"], e["event_id"]) for e in o.detail["events"]]
        seen = [await redis.zscore(atp_keys.event_ids(sku), eid) is not None for sku, eid in ids]
        if o.status == 200:
            assert all(seen), f"{o.key}'s batch answered 200 but was not all applied"
        elif did_nothing(o):
            assert not any(seen), f"{o.key}'s batch was applied but got no answer: {o}"
    return accepted


async def applied(redis: aioredis.Redis, produced: dict[str, dict[str, Any]], eid: str) -> bool:
    sku = produced[eid]["sku"]
    return await redis.zscore(atp_keys.event_ids(sku), eid) is not None


async def check_committed_offsets(
    redis: aioredis.Redis, kafka: KafkaLoad, bootstrap: str, probe: AIOKafkaConsumer
) -> tuple[list[int], list[int]]:
    """After the group stopped: every event below a partition's committed offset was applied,
    and (the drain commits what it applied) none above it. The committed offsets and the ends."""
    topic = await read_topic(bootstrap, kafka.topic, PARTITIONS)
    assert sorted(eid for ids in topic.values() for eid in ids) == sorted(kafka.produced)
    offsets = await committed(probe, kafka.topic, PARTITIONS)
    for p, offset in enumerate(offsets):
        assert offset <= len(topic[p]), f"partition {p} committed past its end"
        done = [await applied(redis, kafka.produced, eid) for eid in topic[p]]
        unapplied = [eid for eid, ok in zip(topic[p][:offset], done, strict=False) if not ok]
        assert unapplied == [], (
            f"partition {p}: below the committed offset {offset} but never applied: {unapplied[:5]}"
        )
        uncommitted = [eid for eid, ok in zip(topic[p][offset:], done[offset:], strict=True) if ok]
        assert uncommitted == [], (
            f"partition {p}: applied but not committed by the drain (offset {offset}): "
            f"{uncommitted[:5]}"
        )
    return offsets, [len(topic[p]) for p in range(PARTITIONS)]


async def on_hand(redis: aioredis.Redis, sku: str) -> int:
    return int(await redis.hget(atp_keys.position(sku), atp_keys.ON_HAND + LOCATION) or 0)


async def check_sums(
    redis: aioredis.Redis, events: list[dict[str, Any]], skus: list[str], what: str
) -> None:
    """Each SKU's on-hand is the sum of its events (each counted once)."""
    want = Counter[str]()
    for e in events:
        want[e["sku"]] += e["quantity"]
    for sku in skus:
        assert await on_hand(redis, sku) == want[sku], f"{what}: {sku}'s on-hand"


async def scenario(
    target: str,
    redis_url: str,
    redis: aioredis.Redis,
    postgres_dsn: str,
    pg: asyncpg.Connection,
    kafka_bootstrap: str,
) -> None:
    run = uuid.uuid4().hex[:8]
    shop_skus = [f"S-{run}-{i}" for i in range(6)]
    scarce = f"S-{run}-scarce"  # runs out: some carts are refused 409
    feed_skus = [f"H-{run}-{i}" for i in range(8)]
    kafka_skus = [f"K-{run}-{i}" for i in range(16)]
    group = f"term-{run}"
    async with (
        erp_sim(rate_limit_per_second=SIM_LIMIT) as sim,
        kafka_topic(kafka_bootstrap) as (topic, producer),
        group_probe(kafka_bootstrap, group) as probe,
    ):
        env = {
            "GATEWAY_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "GATEWAY_KAFKA_TOPICS": topic,
            "GATEWAY_KAFKA_GROUP": group,
            "GATEWAY_KAFKA_SESSION_TIMEOUT_MS": "1000",
            "GATEWAY_ERP_URL": str(sim.make_url("")),
            "GATEWAY_ERP_RATE_PER_SECOND": str(ERP_RATE),
            "GATEWAY_ERP_BURST": "10",
            "GATEWAY_REDIS_TIMEOUT_SECONDS": REDIS_TIMEOUT,
        }
        gateway = GatewayProcess(redis_url, postgres_dsn, GATEWAY_WORKERS=str(WORKERS), **env)
        load = Load(gateway.url, run)
        kafka = KafkaLoad(producer, topic, run)
        tasks: list[asyncio.Task[None]] = []
        stop_problems = ["the group was never stopped"]
        try:
            workers = await group_up(gateway)
            await seed(gateway.url, {**dict.fromkeys(shop_skus, 1_000_000), scarce: 40})
            tasks += [
                asyncio.create_task(shopper(load, n, [*shop_skus, scarce], seed=n))
                for n in range(SHOPPERS)
            ]
            tasks += [
                asyncio.create_task(http_feed(load, n, feed_skus, seed=100 + n))
                for n in range(FEEDS)
            ]
            tasks.append(asyncio.create_task(kafka.produce(load.stop, kafka_skus, seed=7)))
            await asyncio.sleep(LOAD_SECONDS)
            assert not any(t.done() for t in tasks), [t for t in tasks if t.done()]
            assert sum(o.status == 202 for o in load.outcomes) > 20, "the load never got going"
            if target == "worker":
                workers |= await sigterm_one_worker(gateway, workers, load, redis)
                load.stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 30)
                stop_problems = await stop_group(gateway, workers)
            else:
                await hold_writes(redis, PAUSE_MS)
                load.signalled = time.monotonic()
                stop_problems = await stop_group(gateway, workers)
            load.stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
        finally:
            await redis.client_unpause()
            load.stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            gateway.stop()

        check_answers(load)
        accepted = await check_effects(load, redis, pg)
        offsets, ends = await check_committed_offsets(redis, kafka, kafka_bootstrap, probe)
        waiting = await pg.fetchval("SELECT count(*) FROM orders WHERE status <> 'accepted'")
        report(target, load, accepted, waiting, offsets, ends)
        assert stop_problems == []

        # A gateway started afterwards finishes the work: the rest of the topic, every order.
        # It resumes where the group committed, as a group of its own seeded with those offsets:
        # tansu 0.6 never completes a rebalance for the next member of a group that lost a
        # member, gained one and then lost both (the joiner loops JoinGroup -> SyncGroup at the
        # same generation; seen in 4 of 9 runs of the worker case with the group itself).
        resumed = f"{group}-resumed"
        await seed_group(kafka_bootstrap, topic, resumed, offsets)
        env["GATEWAY_KAFKA_GROUP"] = resumed
        again = GatewayProcess(redis_url, postgres_dsn, **env, GATEWAY_LOG_LEVEL="info")
        try:
            async with group_probe(kafka_bootstrap, resumed) as resumed_probe:
                assert await committed(resumed_probe, topic, PARTITIONS) == offsets
                try:
                    await until(
                        lambda: _committed_all(resumed_probe, topic, ends),
                        30,
                        "the gateway to commit the rest of the topic",
                    )
                except AssertionError:
                    now = await committed(resumed_probe, topic, PARTITIONS)
                    raise AssertionError(
                        f"committed {now} of {ends}; log: {again.log_text()[-4000:]}"
                    ) from None
            applied_all = [await applied(redis, kafka.produced, e) for e in kafka.produced]
            assert all(applied_all), "an event below a committed offset was never applied"

            async def all_sent() -> bool:
                left = await pg.fetchval("SELECT count(*) FROM orders WHERE status <> 'accepted'")
                sent = int((await received(sim))["accepted"])
                return bool(left == 0 and sent >= len(accepted))

            await until(all_sent, 60, f"{len(accepted)} orders to reach the ERP")
        finally:
            status = again.stop()
        assert status == 0, again.log_text()[-3000:]
        got = await received(sim)
        deliveries = {o["key"]: o["deliveries"] for o in got["orders"]}
        assert set(deliveries) == accepted, "the ERP got other orders than those answered 202"
        assert set(deliveries.values()) <= {1}, {k: v for k, v in deliveries.items() if v != 1}
        assert got["duplicates"] == 0
        await check_sums(redis, list(kafka.produced.values()), kafka_skus, "kafka")
        fed = [e for o in load.of("events") if o.status == 200 for e in o.detail["events"]]
        await check_sums(redis, fed, feed_skus, "http feed")


def report(
    target: str,
    load: Load,
    accepted: set[str],
    waiting: int,
    offsets: list[int],
    ends: list[int],
) -> None:
    """What the run went through (shown with ``-s``): a pass with no refusals and nothing left
    to finish says little."""
    statuses = Counter(f"{o.kind}:{o.status}:{o.code or ''}" for o in load.outcomes)
    errors = Counter(o.error.split("(")[0] for o in load.outcomes if o.status == REFUSED)
    caught = Counter(str(o.status) for o in load.in_flight_at(load.signalled))
    print(
        f"\nSIGTERM to the {target}: {len(load.outcomes)} requests {dict(statuses)}; "
        f"refusals {dict(errors)}; in flight at SIGTERM {dict(caught)}; {len(accepted)} orders, "
        f"{waiting} not yet at the ERP; kafka committed {offsets} of {ends}"
    )


async def _committed_all(probe: AIOKafkaConsumer, topic: str, ends: list[int]) -> bool:
    return await committed(probe, topic, PARTITIONS) == ends


async def test_sigterm_to_the_parent_under_load(
    redis_url: str,
    redis: aioredis.Redis,
    postgres_dsn: str,
    pg: asyncpg.Connection,
    kafka_bootstrap: str,
) -> None:
    await scenario("parent", redis_url, redis, postgres_dsn, pg, kafka_bootstrap)


async def test_sigterm_to_one_worker_under_load(
    redis_url: str,
    redis: aioredis.Redis,
    postgres_dsn: str,
    pg: asyncpg.Connection,
    kafka_bootstrap: str,
) -> None:
    await scenario("worker", redis_url, redis, postgres_dsn, pg, kafka_bootstrap)
