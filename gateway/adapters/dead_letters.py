"""Dead letters of the Kafka consumer: each written once, none lost, none stalling its partition.

A message that is not a valid event goes, in this order of preference:

1. to ``<topic>.dlq`` as it is: its key, value and headers, plus ``dlq-reason`` (why) and
   ``dlq-source`` (``topic/partition/offset``);
2. if the client or the broker refuses that as too large: to ``<topic>.dlq`` as a bounded copy,
   key, value, reason and the original headers each cut to the sizes below, with a
   ``dlq-truncated`` header (JSON: for each part cut, its ``size`` and the bytes ``kept``);
   ``dlq-source`` is never cut. The original is kept whole in PostgreSQL when it answers;
3. if the DLQ takes neither (it refuses writes, or does not answer within the send timeout): in
   PostgreSQL, table ``kafka_dead_letters``, as the only copy;
4. only while PostgreSQL is unavailable too does the batch wait, retrying from 1 with backoff
   (0.5 s doubling to 5 s, as the supervisor's): its offsets stay uncommitted, nothing crashes
   and nothing is dropped.

Which PostgreSQL failures are temporary is the port's call (``gateway.adapters.postgres``): its
503s (:class:`Unavailable`: not connected, known down, timed out, the server unable to serve
now). Any other error will recur on every try (a constraint the row breaks, a table that is
not what the ledger expects): it is logged as an error and counted
(``gateway_kafka_dead_letter_record_failures_total``), and

- where it leaves a dead letter with no copy anywhere (the DLQ refused it too), it is raised:
  the consumer stops on that batch and its supervisor shows it (``worker_crashed``, the worker
  ``restarting`` in ``/readyz``) and restarts it, retrying every few seconds. The partition
  waits with the message safe in Kafka, uncommitted, until someone fixes the cause: committing
  past it would leave a log line as its only trace;
- where the DLQ holds the letter (only the record that it was written is missing, or the check
  whether it was), the batch goes on: nothing is lost, a replay may write that letter again.

Each dead letter is recorded in ``kafka_dead_letters`` by its source offset as soon as it is
written, before that offset is committed, and a replayed offset found there is not written
again, so a restart does not repeat dead letters. The window left: a crash between the DLQ's
acknowledgement and that record (one PostgreSQL round trip), or a replay of an offset whose dead
letter went out while PostgreSQL was down, writes that dead letter a second time. A DLQ send that
timed out may still land later, so a letter recorded in PostgreSQL may also appear in the DLQ.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal, Protocol

import asyncpg
import orjson
import structlog
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError
from prometheus_client import Counter

from gateway.errors import Unavailable
from gateway.metrics import KAFKA_DEAD_LETTER_WRITES, KAFKA_DLQ

log = structlog.get_logger(__name__)

DLQ_SUFFIX: Final = ".dlq"
# The bounded copy: about 82 KiB at most, far below Kafka's default 1 MiB message limit, and
# still enough of a message to see what was wrong with it.
MAX_KEY: Final = 1024
MAX_VALUE: Final = 64 * 1024
MAX_REASON: Final = 1024
MAX_HEADERS: Final = 16 * 1024  # the original headers' names and values, kept in order
RETRY_FIRST: Final = 0.5
RETRY_MAX: Final = 5.0
RECORD_FAILURES: Final = Counter(
    "gateway_kafka_dead_letter_record_failures_total",
    "Dead letters PostgreSQL refused to record with an error that will recur (not an outage), "
    "by source topic and what is missing: only_copy (the DLQ refused it too: its partition waits), "
    "record (the DLQ holds it; the record that it was written is missing)",
    ["topic", "missing"],
)

Destination = Literal["dlq", "dlq_truncated", "postgres"]
Source = tuple[str, int, int]
Headers = list[tuple[str, bytes | None]]


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    reason: str

    @classmethod
    def of(cls, record: ConsumerRecord[Any, Any], reason: str) -> DeadLetter:
        return cls(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value,
            tuple(record.headers or ()),
            _storable(reason),
        )

    @property
    def source(self) -> Source:
        return (self.topic, self.partition, self.offset)

    @property
    def source_text(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclasses.dataclass(frozen=True, slots=True)
class Copy:
    """What is sent to ``<topic>.dlq`` for a dead letter."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers


def full_copy(letter: DeadLetter) -> Copy:
    headers: Headers = [
        *letter.headers,
        ("dlq-reason", letter.reason.encode()),
        ("dlq-source", letter.source_text.encode()),
    ]
    return Copy(letter.topic + DLQ_SUFFIX, letter.key, letter.value, headers)


def bounded_copy(letter: DeadLetter) -> Copy:
    cut: dict[str, dict[str, int]] = {}
    key = _cut("key", letter.key, MAX_KEY, cut)
    value = _cut("value", letter.value, MAX_VALUE, cut)
    reason = _cut("reason", letter.reason.encode(), MAX_REASON, cut, text=True)
    headers: Headers = [
        *_cut_headers(letter.headers, cut),
        ("dlq-reason", reason),
        ("dlq-source", letter.source_text.encode()),
        ("dlq-truncated", orjson.dumps(cut)),
    ]
    return Copy(letter.topic + DLQ_SUFFIX, key, value, headers)


def _cut(
    part: str, data: bytes | None, limit: int, cut: dict[str, dict[str, int]], text: bool = False
) -> bytes | None:
    if data is None or len(data) <= limit:
        return data
    kept = data[:limit]
    if text:  # never split a UTF-8 character: the header stays valid text
        kept = kept.decode(errors="ignore").encode()
    cut[part] = {"size": len(data), "kept": len(kept)}
    return kept


def _cut_headers(
    headers: Iterable[tuple[str, bytes | None]], cut: dict[str, dict[str, int]]
) -> Headers:
    kept: Headers = []
    size = used = 0
    for name, value in headers:
        n = len(name.encode(errors="surrogatepass")) + len(value or b"")
        size += n
        if size <= MAX_HEADERS:  # a prefix: the first header that does not fit ends it
            kept.append((name, value))
            used += n
    if size > MAX_HEADERS:
        cut["headers"] = {"size": size, "kept": used}
    return kept


def _storable(reason: str) -> str:
    # A reason quotes field names from the message: lone surrogates would break UTF-8 encoding
    # (header and PostgreSQL) and NUL is refused by PostgreSQL text, each a dead letter stuck.
    return reason.encode(errors="backslashreplace").decode().replace("\x00", "\\x00")


class Database(Protocol):
    """What the ledger needs of PostgreSQL: ``gateway.adapters.postgres.Postgres``, whose calls
    are bounded by ``GATEWAY_POSTGRES_TIMEOUT_SECONDS``, fail at once while it is known down, and
    raise :class:`Unavailable` for exactly the failures that are temporary."""

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]: ...

    async def executemany(self, query: str, args: Iterable[Sequence[Any]]) -> None: ...


class DeadLetterLedger:
    """``kafka_dead_letters``: which source offsets have their dead letter, and the copies
    the DLQ does not hold whole. A call that did not happen raises :class:`Unavailable` when
    PostgreSQL is unavailable, any other exception when the failure will recur."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def written(self, letters: Sequence[DeadLetter]) -> set[Source]:
        rows = await self._db.fetch(
            """SELECT d.source_topic, d.source_partition, d.source_offset
               FROM unnest($1::text[], $2::integer[], $3::bigint[]) AS s(t, p, o)
               JOIN kafka_dead_letters d
                 ON (d.source_topic, d.source_partition, d.source_offset) = (s.t, s.p, s.o)""",
            [x.topic for x in letters],
            [x.partition for x in letters],
            [x.offset for x in letters],
        )
        return {(r[0], r[1], r[2]) for r in rows}

    async def record(self, entries: Sequence[tuple[DeadLetter, Destination, Any]]) -> None:
        """Record dead letters as written (``Any``: the DLQ's RecordMetadata, or None)."""
        rows = []
        for letter, destination, landed in entries:
            whole = destination != "dlq"  # the DLQ lacks the original: keep it here
            rows.append(
                (
                    letter.topic,
                    letter.partition,
                    letter.offset,
                    destination,
                    letter.reason,
                    None if landed is None else landed.partition,
                    None if landed is None else landed.offset,
                    letter.key if whole else None,
                    letter.value if whole else None,
                    [n.encode(errors="surrogatepass") for n, _ in letter.headers]
                    if whole
                    else None,
                    [v for _, v in letter.headers] if whole else None,
                )
            )
        await self._db.executemany(
            """INSERT INTO kafka_dead_letters (source_topic, source_partition, source_offset,
                   destination, reason, dlq_partition, dlq_offset, key, value, header_names,
                   header_values)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
               ON CONFLICT DO NOTHING""",
            rows,
        )


class DeadLetterWriter:
    def __init__(
        self, producer: AIOKafkaProducer, ledger: DeadLetterLedger, *, send_timeout: float
    ) -> None:
        self._producer = producer
        self._ledger = ledger
        self._send_timeout = send_timeout

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        """Return once each letter is in the DLQ or PostgreSQL (or was before a restart); wait,
        retrying with backoff, only while neither takes one."""
        for letter in letters:
            log.warning(
                "kafka_dead_letter",
                topic=letter.topic,
                partition=letter.partition,
                offset=letter.offset,
                reason=letter.reason[:MAX_REASON],
            )
        todo = await self._unwritten(letters)
        backoff = RETRY_FIRST
        while todo:
            refused = await self._to_dlq(todo)
            if not refused:
                return
            try:
                await self._ledger.record([(letter, "postgres", None) for letter, _ in refused])
            except Unavailable as exc:
                # Neither the DLQ nor PostgreSQL takes them: the one case where the batch waits.
                log.error(
                    "kafka_dead_letters_stuck",
                    count=len(refused),
                    first=refused[0][0].source_text,
                    dlq_error=repr(refused[0][1]),
                    postgres_error=repr(exc),
                    retry_in=backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)
                todo = [letter for letter, _ in refused]
                continue
            except Exception as exc:
                # It will recur: not retried here, but raised to the supervisor (module doc).
                _refused_for_good("only_copy", [letter for letter, _ in refused], exc)
                raise
            for letter, error in refused:
                log.warning(
                    "kafka_dead_letter_in_postgres",
                    source=letter.source_text,
                    dlq_error=repr(error),
                )
                KAFKA_DEAD_LETTER_WRITES.labels(letter.topic, "postgres").inc()
            return

    async def _unwritten(self, letters: Sequence[DeadLetter]) -> list[DeadLetter]:
        try:
            done = await self._ledger.written(letters)
        except Unavailable as exc:
            # Not knowing is no reason to stall the partition: write them (a replay of an
            # offset written before PostgreSQL went down writes its dead letter again).
            log.warning("kafka_dead_letters_unchecked", count=len(letters), error=repr(exc))
            return list(letters)
        except Exception as exc:  # noqa: BLE001 - as above; recording them will tell (module doc)
            log.error("kafka_dead_letters_unchecked", count=len(letters), error=repr(exc))
            return list(letters)
        for letter in letters:
            if letter.source in done:
                log.info("kafka_dead_letter_already_written", source=letter.source_text)
        return [letter for letter in letters if letter.source not in done]

    async def _to_dlq(self, letters: Sequence[DeadLetter]) -> list[tuple[DeadLetter, Exception]]:
        """Send each letter to the DLQ, bounded if need be; returns those it would not take."""
        written: list[tuple[DeadLetter, Destination, Any]] = []
        too_large: list[DeadLetter] = []
        refused: list[tuple[DeadLetter, Exception]] = []
        for letter, result in zip(letters, await self._send(map(full_copy, letters)), strict=True):
            if not isinstance(result, Exception):
                written.append((letter, "dlq", result))
            elif isinstance(result, MessageSizeTooLargeError | RecordListTooLargeError):
                too_large.append(letter)
            else:
                refused.append((letter, result))
        if too_large:
            sent = await self._send(map(bounded_copy, too_large))
            for letter, result in zip(too_large, sent, strict=True):
                if isinstance(result, Exception):
                    refused.append((letter, result))
                else:
                    written.append((letter, "dlq_truncated", result))
        if written:
            try:
                await self._ledger.record(written)
            except Unavailable as exc:
                # They are in the DLQ, which is what matters; only a replay of these offsets
                # before their commit would write them again.
                log.warning("kafka_dead_letters_unrecorded", count=len(written), error=repr(exc))
            except Exception as exc:  # noqa: BLE001 - in the DLQ all the same (module doc)
                _refused_for_good("record", [letter for letter, _, _ in written], exc)
            for letter, destination, _ in written:
                KAFKA_DEAD_LETTER_WRITES.labels(letter.topic, destination).inc()
                KAFKA_DLQ.labels(letter.topic).inc()
        return refused

    async def _send(self, copies: Iterable[Copy]) -> list[Any]:
        """Each copy's RecordMetadata, or the exception that refused it; all within one send
        timeout. Queued one after another, so the DLQ keeps the source order."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._send_timeout
        pending: list[asyncio.Future[Any] | Exception] = []
        for copy in copies:
            # The client refuses a record with neither key nor value (a tombstone without a
            # key): an empty key lets it through, its value still null like the original's.
            key = b"" if copy.key is None and copy.value is None else copy.key
            try:
                # Cancelling send() (the deadline) withdraws the record; nothing is left behind.
                async with asyncio.timeout_at(deadline):
                    sent = await self._producer.send(
                        copy.topic, value=copy.value, key=key, headers=copy.headers
                    )
            except Exception as exc:  # noqa: BLE001 - what the DLQ will not take goes elsewhere;
                # raising here would fail the batch on every retry: a partition stuck for good.
                pending.append(exc)
            else:
                sent.add_done_callback(_retrieve)
                pending.append(sent)
        results: list[Any] = []
        for item in pending:
            if isinstance(item, Exception):
                results.append(item)
                continue
            try:
                # Shielded: the producer owns the future; a late result is still retrieved.
                async with asyncio.timeout_at(deadline):
                    results.append(await asyncio.shield(item))
            except (KafkaError, TimeoutError) as exc:
                results.append(exc)
        return results


def _refused_for_good(missing: str, letters: Sequence[DeadLetter], exc: Exception) -> None:
    log.error(
        "kafka_dead_letters_refused_by_postgres",
        missing=missing,
        count=len(letters),
        first=letters[0].source_text,
        error=repr(exc),
    )
    for letter in letters:
        RECORD_FAILURES.labels(letter.topic, missing).inc()


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A send given up on at the deadline may still fail later: its error is known and handled.
    if not future.cancelled():
        future.exception()
