"""Dead letters the DLQ will not take as they are, or at all: the partition always moves on.

Against real brokers (tansu: the session's, or one of the test's own whose schema registry makes
``<topic>.dlq`` refuse every record), real Redis and PostgreSQL. Each test checks the promises of
``gateway.adapters.dead_letters``: the valid events applied, the offsets committed, each dead
letter written once, and where it went (``kafka_dead_letters``, the metric).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer, ConsumerRecord

from gateway.adapters.dead_letters import (
    MAX_HEADERS,
    MAX_KEY,
    MAX_REASON,
    MAX_VALUE,
    RETRY_MAX,
    DeadLetter,
    DeadLetterLedger,
    DeadLetterWriter,
    bounded_copy,
)
from gateway.adapters.kafka import run_consumer
from gateway.adapters.postgres import Postgres
from gateway.dev.services import free_port, reachable, tansu_binary
from gateway.http.state import APPLIER, LIFECYCLE, POSTGRES
from gateway.settings import Settings
from tests.helpers import NOW, event, private_database
from tests.kafka_feed import (
    ROOT,
    Feed,
    assert_state,
    encode,
    gateway,
    metrics_text,
    new_topic,
    on_hand,
    open_feed,
    read_dlq,
    rule,
    sample,
    serve_env,
    wait_for,
)

# A schema no record satisfies: tansu refuses every write to the topic it is named after.
REFUSE_ALL = {"type": "object", "properties": {"value": {"not": {}}}, "required": ["value"]}


@contextlib.asynccontextmanager
async def private_broker(
    directory: Path, refusing: Sequence[str] = ()
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """A tansu broker of the test's own; each topic in ``refusing`` refuses every write."""
    schemas = directory / "schema"
    schemas.mkdir()
    for topic in refusing:
        (schemas / f"{topic}.json").write_text(json.dumps(REFUSE_ALL))
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        tansu_binary(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--schema-registry",
        "file://./schema",  # tansu reads file:// URLs relative to its working directory
        cwd=directory,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_for(
            lambda: asyncio.to_thread(reachable, "127.0.0.1", port, 0.2), bool, "tansu", 10
        )
        yield f"127.0.0.1:{port}", proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)  # a stopped process ignores SIGKILL until resumed
            proc.kill()
            await proc.wait()


class TcpProxy:
    """A port that refuses connections until ``start``, then forwards them to the target."""

    def __init__(self, host: str, port: int) -> None:
        self.port = free_port()
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in list(self._writers):
            writer.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()
                self._writers.discard(sink)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def dead_letter_rows(pg: asyncpg.Connection, topic: str) -> list[asyncpg.Record]:
    return await pg.fetch(
        """SELECT * FROM kafka_dead_letters WHERE source_topic = $1
           ORDER BY source_partition, source_offset""",
        topic,
    )


def writes(text: str, topic: str, destination: str) -> float:
    name = "gateway_kafka_dead_letter_writes_total"
    return sample(text, name, topic=topic, destination=destination) or 0


def headers_of(record: ConsumerRecord[Any, Any]) -> dict[str, bytes]:
    return {name: value for name, value in record.headers}


def kafka_on(settings: Settings, source: Feed) -> Settings:
    return dataclasses.replace(
        settings,
        kafka_bootstrap=source.bootstrap,
        kafka_topics=(source.topic,),
        kafka_group=source.group,
    )


@pytest.fixture
async def feed(kafka_bootstrap: str) -> AsyncIterator[Feed]:
    async with open_feed(kafka_bootstrap) as opened:
        yield opened


@pytest.fixture
def kafka_settings(settings: Settings, feed: Feed) -> Settings:
    return kafka_on(settings, feed)


# --- the bounded copy, on its own -----------------------------------------------------------------


def letter(key: bytes | None, value: bytes | None, headers: Any, reason: str) -> DeadLetter:
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        "t", 2, 7, 0, 0, key, value, None, 0, 0, headers
    )
    return DeadLetter.of(record, reason)


def test_the_bounded_copy_cuts_each_part_and_says_so() -> None:
    headers = [("a", b"1"), ("big", b"z" * MAX_HEADERS), ("c", b"3")]
    reason = "€" * MAX_REASON  # 3 bytes a character: the cut must not split one
    copy = bounded_copy(letter(b"k" * 5000, b"v" * 100_000, headers, reason))
    assert copy.topic == "t.dlq"
    assert copy.key == b"k" * MAX_KEY
    assert copy.value == b"v" * MAX_VALUE
    named = dict(copy.headers)
    kept_reason = named["dlq-reason"]
    assert kept_reason is not None
    assert kept_reason.decode() == "€" * (MAX_REASON // 3)
    assert named["dlq-source"] == b"t/2/7"
    # The original headers: a prefix that fits (the one that does not fit ends it).
    assert [name for name, _ in copy.headers] == [
        "a",
        "dlq-reason",
        "dlq-source",
        "dlq-truncated",
    ]
    truncated = named["dlq-truncated"]
    assert truncated is not None
    assert json.loads(truncated) == {
        "key": {"size": 5000, "kept": MAX_KEY},
        "value": {"size": 100_000, "kept": MAX_VALUE},
        "reason": {"size": 3 * MAX_REASON, "kept": 3 * (MAX_REASON // 3)},
        "headers": {"size": 2 + 3 + MAX_HEADERS + 2, "kept": 2},
    }
    # What is within bounds is not touched, and a tombstone stays a tombstone.
    small = bounded_copy(letter(None, None, [], "event: message has no value"))
    assert (small.key, small.value) == (None, None)
    assert dict(small.headers)["dlq-truncated"] == b"{}"


def test_a_reason_is_storable_whatever_the_message_quoted() -> None:
    # NUL (refused by PostgreSQL text) and a lone surrogate (no UTF-8 for it) in a field name.
    dead = letter(None, b"{}", [], "a\x00b\ud800: unknown field")
    assert dead.reason == "a\\x00b\\ud800: unknown field"
    dead.reason.encode()  # a header value, and PostgreSQL text


# --- too large for the DLQ as is: a bounded copy, the original in PostgreSQL ----------------------


async def test_dead_letters_too_large_for_the_dlq_go_as_bounded_copies(
    feed: Feed, kafka_settings: Settings, pg: asyncpg.Connection
) -> None:
    good = [
        event("o1", "snapshot", 30, -100, sku="SKU-O"),
        event("o2", "adjustment", -4, -90, sku="SKU-O"),
        event("o3", "adjustment", 6, -80, sku="SKU-O", location="L2"),
    ]
    big_key = b"k" * 1_500_000  # with a bad value: the copy's key alone exceeds 1 MiB
    wide = json.dumps({"f" * 1_100_000: 1}).encode()  # the name is quoted in dlq-reason
    trace = [("trace", b"t-1"), ("blob", b"z" * 20_000)]
    await feed.publish(0, [encode(good[0])])
    keyed = (await feed.publish(0, [b"{bad"], keys=[big_key]))[0]
    await feed.publish(0, [encode(good[1])])
    named = (await feed.publish(1, [wide], headers=trace))[0]
    await feed.publish(1, [encode(good[2])])

    async with gateway(kafka_settings) as client:
        await feed.wait_committed()  # past both: nothing stalled
        await assert_state(client, rule(good))
        text = await metrics_text(client)
    assert writes(text, feed.topic, "dlq_truncated") == 2
    assert writes(text, feed.topic, "dlq") == writes(text, feed.topic, "postgres") == 0

    records = await read_dlq(feed, 2)
    assert len(records) == 2
    by_source = {headers_of(r)["dlq-source"].decode(): r for r in records}
    first = by_source[f"{feed.topic}/0/{keyed}"]
    assert first.key == b"k" * MAX_KEY
    assert first.value == b"{bad"
    assert headers_of(first)["dlq-reason"].startswith(b"event: malformed JSON")
    assert json.loads(headers_of(first)["dlq-truncated"]) == {
        "key": {"size": 1_500_000, "kept": MAX_KEY}
    }
    second = by_source[f"{feed.topic}/1/{named}"]
    assert second.key is None
    assert second.value == wide[:MAX_VALUE]
    reason = headers_of(second)["dlq-reason"]
    assert len(reason) == MAX_REASON
    assert headers_of(second)["trace"] == b"t-1"
    assert "blob" not in headers_of(second)

    # PostgreSQL holds the originals whole, and where their copies landed.
    rows = {
        (r["source_partition"], r["source_offset"]): r
        for r in await dead_letter_rows(pg, feed.topic)
    }
    assert set(rows) == {(0, keyed), (1, named)}
    assert {r["destination"] for r in rows.values()} == {"dlq_truncated"}
    assert (rows[0, keyed]["key"], rows[0, keyed]["value"]) == (big_key, b"{bad")
    assert rows[0, keyed]["dlq_offset"] == first.offset
    full = rows[1, named]
    assert full["value"] == wide
    assert "; " + "f" * 1_100_000 + ": unknown field" in full["reason"]
    assert reason == full["reason"].encode()[:MAX_REASON]
    assert full["header_names"] == [b"trace", b"blob"]
    assert full["header_values"] == [b"t-1", b"z" * 20_000]
    assert json.loads(headers_of(second)["dlq-truncated"]) == {
        "value": {"size": len(wide), "kept": MAX_VALUE},
        "reason": {"size": len(full["reason"]), "kept": MAX_REASON},
        "headers": {"size": 5 + 3 + 4 + 20_000, "kept": 8},
    }


# --- the DLQ refuses writes: PostgreSQL holds the dead letters ------------------------------------


async def test_a_dlq_that_refuses_writes_leaves_dead_letters_in_postgres(
    settings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    topic = new_topic()
    async with (
        private_broker(tmp_path, refusing=[topic + ".dlq"]) as (bootstrap, _),
        open_feed(bootstrap, topic) as source,
    ):
        good = [
            event("r1", "snapshot", 20, -100, sku="SKU-R"),
            event("r2", "adjustment", -3, -90, sku="SKU-R"),
        ]
        offsets = await source.publish(
            0,
            [encode(good[0]), b"{not json", None, encode(good[1])],
            headers=[("trace", b"t-9")],
            keys=[b"k0", b"k1", b"k2", b"k3"],
        )
        async with gateway(kafka_on(settings, source)) as client:
            await source.wait_committed()
            await assert_state(client, rule(good))
            text = await metrics_text(client)
    assert writes(text, topic, "postgres") == 2
    assert writes(text, topic, "dlq") == writes(text, topic, "dlq_truncated") == 0
    rows = await dead_letter_rows(pg, topic)
    assert [(r["source_offset"], r["destination"]) for r in rows] == [
        (offsets[1], "postgres"),
        (offsets[2], "postgres"),
    ]
    bad_json, tombstone = rows
    assert (bad_json["key"], bad_json["value"]) == (b"k1", b"{not json")
    assert bad_json["reason"].startswith("event: malformed JSON")
    assert (bad_json["header_names"], bad_json["header_values"]) == ([b"trace"], [b"t-9"])
    assert (bad_json["dlq_partition"], bad_json["dlq_offset"]) == (None, None)
    assert (tombstone["key"], tombstone["value"]) == (b"k2", None)
    assert tombstone["reason"] == "event: message has no value"


async def test_a_dlq_that_does_not_answer_falls_back_to_postgres_within_seconds(
    feed: Feed, kafka_settings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """The DLQ on a broker that stops answering (SIGSTOP); the source broker is fine."""
    dlq_timeout = 1.0
    good = [
        event("s1", "snapshot", 8, -100, sku="SKU-S"),
        event("s2", "adjustment", 1, -90, sku="SKU-S"),
    ]
    reader = dataclasses.replace(kafka_settings, kafka_bootstrap="")
    async with private_broker(tmp_path) as (dlq_bootstrap, dlq_broker), gateway(reader) as client:
        consumer = asyncio.create_task(
            run_consumer(
                kafka_settings,
                client.app[APPLIER],
                client.app[POSTGRES],
                dlq_bootstrap=dlq_bootstrap,
                dlq_timeout=dlq_timeout,
            )
        )
        try:
            await feed.publish(0, [encode(good[0])])
            await feed.wait_committed()  # consuming, so its DLQ producer is connected
            dlq_broker.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            poison = (await feed.publish(0, [b"{stalled", encode(good[1])]))[0]
            await feed.wait_committed()
            took = time.monotonic() - started
            await assert_state(client, rule(good))
        finally:
            dlq_broker.send_signal(signal.SIGCONT)
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
    assert took < dlq_timeout + 2.0, f"fell back after {took:.1f}s"
    rows = await dead_letter_rows(pg, feed.topic)
    assert [(r["source_offset"], r["destination"], r["value"]) for r in rows] == [
        (poison, "postgres", b"{stalled")
    ]
    assert writes(await metrics_text(), feed.topic, "postgres") == 1


async def test_with_the_dlq_and_postgres_both_down_the_batch_waits_then_moves_on(
    settings: Settings, postgres_dsn: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """The one case where a partition waits: the gateway starts with PostgreSQL down and the
    DLQ refusing; no crash, valid events applied meanwhile, and the dead letter recorded (then
    the offsets committed) once PostgreSQL answers."""
    target = urlsplit(postgres_dsn)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)  # down: refuses
    proxied = target._replace(netloc=f"{target.username}@127.0.0.1:{proxy.port}").geturl()
    topic = new_topic()
    good = [
        event("w1", "snapshot", 11, -100, sku="SKU-W"),
        event("w2", "adjustment", 4, -90, sku="SKU-W"),
    ]
    try:
        async with (
            private_broker(tmp_path, refusing=[topic + ".dlq"]) as (bootstrap, _),
            open_feed(bootstrap, topic) as source,
        ):
            poison = (await source.publish(0, [encode(good[0]), b"{bad", encode(good[1])]))[1]
            kafka = dataclasses.replace(
                kafka_on(settings, source), postgres_dsn=proxied, postgres_timeout_seconds=0.5
            )
            async with gateway(kafka) as client:
                expected = rule(good)
                await wait_for(
                    lambda: on_hand(client, expected), lambda got: got == expected, "applied"
                )
                await asyncio.sleep(1.0)  # a few retries: still waiting, not crashing
                assert await source.committed() == [0, 0, 0]
                workers = client.app[LIFECYCLE].workers
                assert workers["kafka-consumer"] == "running", workers
                await proxy.start()
                await source.wait_committed()
    finally:
        await proxy.close()
    rows = await dead_letter_rows(pg, topic)
    assert [(r["source_offset"], r["destination"], r["value"]) for r in rows] == [
        (poison, "postgres", b"{bad")
    ]


def test_the_stuck_wait_retries_at_least_every_five_seconds() -> None:
    # As the supervisor's backoff: the partition moves within seconds of PostgreSQL's return.
    assert RETRY_MAX == 5.0


async def test_a_dead_letter_postgres_refuses_for_good_is_raised_not_retried_forever(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """The DLQ refuses the letter and PostgreSQL answers with an error that will recur (here a
    constraint every row breaks): retrying in place would wait forever, unseen. It is logged,
    counted and raised, for the consumer's supervisor to show; the offset stays uncommitted."""
    topic = new_topic()
    async with (
        private_database(postgres_dsn) as dsn,
        private_broker(tmp_path, refusing=[topic + ".dlq"]) as (bootstrap, _),
        open_feed(bootstrap, topic),
    ):
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(
                "ALTER TABLE kafka_dead_letters ADD CONSTRAINT refuse_all CHECK (false) NOT VALID"
            )
        finally:
            await admin.close()
        db = Postgres(dsn, 1.0)
        await db.start()
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, enable_idempotence=False, request_timeout_ms=2000
        )
        await producer.start()
        try:
            writer = DeadLetterWriter(producer, DeadLetterLedger(db), send_timeout=2.0)
            dead = DeadLetter(topic, 0, 7, b"k", b"{bad", (), "event: malformed JSON")
            async with asyncio.timeout(8):
                with pytest.raises(asyncpg.CheckViolationError):
                    await writer.write([dead])
            assert db.gate.up  # an error of the row, not an outage
        finally:
            await producer.stop()
            await db.close()
    failures = sample(
        await metrics_text(),
        "gateway_kafka_dead_letter_record_failures_total",
        topic=topic,
        missing="only_copy",
    )
    assert failures == 1


# --- a restart between writing dead letters and committing: none written twice -------------------


async def test_a_restart_after_dead_letters_are_written_does_not_write_them_again(
    feed: Feed,
    kafka_settings: Settings,
    redis: aioredis.Redis,
    pg: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    """A real ``gateway serve`` writes a batch's dead letters while its valid events wait in
    Redis (writes paused), and is killed before committing; the next consumer replays the
    batch: its valid events applied, its dead letters not written again."""
    valid = [
        event("x0", "snapshot", 40, -100, sku="SKU-X"),
        event("x1", "adjustment", -2, -90, sku="SKU-X"),
        event("x2", "adjustment", 5, -80, sku="SKU-X"),
        event("x3", "adjustment", 1, -70, sku="SKU-X", location="L2"),
    ]
    bad_field = {**event("x9", "adjustment", 1, -60, sku="SKU-X"), "quantity": "5"}
    await feed.publish(0, [encode(valid[0])])
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "serve",
            env=serve_env(kafka_settings, feed),
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
    try:
        try:
            await feed.wait_committed()
        except pytest.fail.Exception:
            pytest.fail(f"gateway did not consume; its log:\n{log_path.read_text()[-3000:]}")
        await redis.client_pause(30_000, all=False)  # writes wait: the batch cannot be applied
        try:
            offsets = await feed.publish(
                0,
                [encode(valid[1]), b"{bad", encode(valid[2]), None, encode(bad_field)],
            )
            await feed.publish(1, [encode(valid[3])])
            await wait_for(
                lambda: dead_letter_rows(pg, feed.topic),
                lambda rows: len(rows) == 3,
                "the batch's dead letters written and recorded",
            )
            proc.kill()
            await proc.wait()
        finally:
            await redis.client_unpause()
        assert (await feed.committed())[0] == offsets[0]  # the batch was not committed
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    async with gateway(kafka_settings) as client:
        await feed.wait_committed()
        await assert_state(client, rule(valid))
        text = await metrics_text(client)
    for destination in ("dlq", "dlq_truncated", "postgres"):
        assert writes(text, feed.topic, destination) == 0  # this consumer wrote none again
    records = await read_dlq(feed, 3)
    sources = sorted(headers_of(r)["dlq-source"].decode() for r in records)
    assert sources == sorted(f"{feed.topic}/0/{offsets[i]}" for i in (1, 3, 4))  # each once
    rows = await dead_letter_rows(pg, feed.topic)
    assert [(r["source_offset"], r["destination"]) for r in rows] == [
        (offsets[i], "dlq") for i in (1, 3, 4)
    ]
    assert [r["dlq_offset"] for r in rows] == sorted(r.offset for r in records)


# --- a far-future event is a dead letter, by the configured clock skew ----------------------------


async def test_an_event_too_far_in_the_future_is_a_dead_letter(
    feed: Feed, kafka_settings: Settings
) -> None:
    """Beyond ``GATEWAY_MAX_CLOCK_SKEW_SECONDS`` (here 30 s, not the default 300 s) an event
    would outrank every real one: it is refused, as over HTTP; within it, it is applied."""
    skewed = dataclasses.replace(kafka_settings, max_clock_skew_seconds=30)
    base = event("f0", "snapshot", 5, -100, sku="SKU-F")
    # Event times count from the run's reference time, which is minutes old late in the suite.
    now = (datetime.now(UTC) - NOW).total_seconds()
    beyond = event("f1", "snapshot", 99, now + 120, sku="SKU-F")  # beyond 30 s, within 300 s
    year = event("f2", "snapshot", 99, now + 365 * 86_400, sku="SKU-F")
    near = event("f3", "adjustment", 2, now + 10, sku="SKU-F")
    offsets = await feed.publish(0, [encode(e) for e in (base, beyond, year, near)])
    async with gateway(skewed) as client:
        await feed.wait_committed()
        await assert_state(client, {("SKU-F", "L1"): 7})
    records = await read_dlq(feed, 2)
    sources = [headers_of(r)["dlq-source"].decode() for r in records]
    assert sources == [f"{feed.topic}/0/{offsets[1]}", f"{feed.topic}/0/{offsets[2]}"]
    for record in records:
        assert headers_of(record)["dlq-reason"].startswith(b"occurred_at: ")
