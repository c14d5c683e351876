"""Kafka stock-event consumer: batches in, applied pipelined, offsets committed after applying.

Delivery is at-least-once: a batch's offsets are committed only once its events are in Redis, and
applying is idempotent, so a crash or rebalance replays at most the uncommitted tail harmlessly.
A message that is not a valid event is dead-lettered (``gateway.adapters.dead_letters``: to
``<topic>.dlq``, as a bounded copy if too large, else to PostgreSQL; once per source offset)
before its offset is committed, so it never stalls its partition and is never silently dropped.
The valid events of its batch are applied meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Sequence
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from gateway.adapters.dead_letters import (
    Database,
    DeadLetter,
    DeadLetterLedger,
    DeadLetterWriter,
)
from gateway.atp.events import OUTCOMES, REJECTED, EventApplier
from gateway.atp.schemas import StockEvent
from gateway.atp.validation import decode_event, latest_allowed
from gateway.errors import Unavailable, ValidationFailed
from gateway.metrics import KAFKA_BATCH_SECONDS, KAFKA_LAG, STOCK_EVENTS, STOCK_LAST_EVENT
from gateway.settings import Settings

log = structlog.get_logger(__name__)

MAX_RECORDS: Final = 5000
# Applying a batch while Redis is down is retried after these many seconds, doubling.
_APPLY_RETRY_FIRST: Final = 0.25
_APPLY_RETRY_MAX: Final = 2.0
_REJECTED_REASON: Final = (
    "quantity: the position would leave the bounds the event rule sums exactly (+-10^15)"
)
# Batches applied concurrently: the event rule makes order between batches irrelevant, and
# commits still happen strictly in fetch order.
PIPELINE_DEPTH: Final = 3
DRAIN_TIMEOUT: Final = 5.0
# A dead letter the DLQ has not acknowledged within this goes to PostgreSQL instead.
DLQ_TIMEOUT: Final = 5.0
# The producer's own limit (Kafka's default broker limit too): a bigger dead letter is sent as a
# bounded copy.
DLQ_MAX_REQUEST: Final = 1024 * 1024

Offsets = dict[TopicPartition, int]


class _Drainer(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, ingest: KafkaIngest) -> None:
        self._ingest = ingest

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Finish and commit what was fetched before another member takes the partitions.
        try:
            await self._ingest.drain()
        finally:
            self._ingest.forget(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        names = [f"{t.topic}/{t.partition}" for t in assigned]
        log.info("kafka_partitions_assigned", partitions=names)


class KafkaIngest:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetterWriter,
        applier: EventApplier,
        max_skew_seconds: int = 300,
    ) -> None:
        self._consumer = consumer
        self._dead_letters = dead_letters
        self._applier = applier
        self._max_skew = max_skew_seconds
        self._in_flight: collections.deque[tuple[asyncio.Task[None], Offsets]] = collections.deque()
        # The consumer loop and a rebalance's drain both commit; one at a time, in fetch order.
        self._commit_lock = asyncio.Lock()
        # Per partition: the offset below which everything is applied and committed (or, before
        # the first commit, where this member started reading). The lag is measured from it.
        self._done: Offsets = {}

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self) -> None:
        while True:
            # Commit what finished first: the pipeline stays bounded and offsets move in order.
            while self._in_flight and (
                self._in_flight[0][0].done() or len(self._in_flight) >= PIPELINE_DEPTH
            ):
                await self._commit_oldest()
            batches = await self._consumer.getmany(timeout_ms=500, max_records=MAX_RECORDS)
            # No await until the batch is queued: a rebalance's drain must see every record
            # handed out, or a revoked partition's records would be committed by a later owner.
            if batches:
                records = [r for recs in batches.values() for r in recs]
                offsets = {tp: recs[-1].offset + 1 for tp, recs in batches.items() if recs}
                for tp, recs in batches.items():
                    if recs:
                        self._done.setdefault(tp, recs[0].offset)
                task = asyncio.create_task(self._process(records))
                self._in_flight.append((task, offsets))
            self._update_lag()

    async def drain(self) -> None:
        while self._in_flight:
            await self._commit_oldest()

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        """Stop reporting partitions another member now owns."""
        for tp in partitions:
            self._done.pop(tp, None)
            with contextlib.suppress(KeyError):
                KAFKA_LAG.remove(tp.topic, str(tp.partition))

    async def cancel_in_flight(self) -> None:
        for task, _ in self._in_flight:
            task.cancel()
        for task, _ in self._in_flight:
            # A batch's failure already ended the loop (and is logged by the supervisor).
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._in_flight.clear()

    async def _commit_oldest(self) -> None:
        async with self._commit_lock:
            if not self._in_flight:
                return  # a concurrent drain committed it
            task, offsets = self._in_flight[0]
            # Shielded: cancelling the consumer must not cancel a batch half-way through Redis;
            # the shutdown drain waits for it instead. A failure propagates: nothing after it is
            # committed and the batch is replayed.
            await asyncio.shield(task)
            await self._consumer.commit(offsets)
            self._in_flight.popleft()
            self._done.update(offsets)

    async def _process(self, records: list[ConsumerRecord[Any, Any]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        events: list[StockEvent] = []
        sources: list[ConsumerRecord[Any, Any]] = []  # the record of each event
        dead: list[DeadLetter] = []
        # A far-future occurred_at is refused here as over HTTP: it would outrank every real
        # event. The bound is read from the clock once a batch, not once an event.
        latest = latest_allowed(self._max_skew)
        for record in records:
            try:
                if record.value is None:
                    raise ValidationFailed([{"field": "", "message": "message has no value"}])
                events.append(decode_event(record.value, latest=latest))
                sources.append(record)
            except ValidationFailed as exc:
                reason = "; ".join(f"{e['field'] or 'event'}: {e['message']}" for e in exc.errors)
                dead.append(DeadLetter.of(record, reason or "event: invalid"))
            except Exception as exc:  # noqa: BLE001 - whatever cannot be decoded is dead-lettered
                # (e.g. JSON nested deeper than the validator recurses): never stall the partition.
                dead.append(DeadLetter.of(record, f"event: undecodable: {exc!r}"))
        if dead:
            # Side by side: valid events are applied even while their dead neighbours wait for
            # a place to go (the DLQ and PostgreSQL both down).
            async with asyncio.TaskGroup() as group:
                group.create_task(self._dead_letters.write(dead))
                applying = group.create_task(self._apply(events))
            codes = applying.result()
        else:
            codes = await self._apply(events)
        after: list[DeadLetter] = []
        for record, code in zip(sources, codes, strict=True):
            if code == REJECTED:
                after.append(DeadLetter.of(record, _REJECTED_REASON))
            elif isinstance(code, str):
                after.append(DeadLetter.of(record, code))
        if after:
            await self._dead_letters.write(after)
        codes = [c for c in codes if isinstance(c, int)]
        if sources:
            STOCK_LAST_EVENT.labels("kafka").set(time.time())
        for code, outcome in enumerate(OUTCOMES):
            STOCK_EVENTS.labels("kafka", outcome).inc(codes.count(code))
        KAFKA_BATCH_SECONDS.observe(loop.time() - started)

    async def _apply(self, events: list[StockEvent]) -> list[int | str]:
        """Each event's outcome code, or, for an event that cannot be applied at all, the reason
        to dead-letter it with."""
        if not events:
            return []
        try:
            return list(await self._apply_retrying(events))
        except Exception as exc:  # noqa: BLE001 - whatever retrying cannot cure
            # Damaged data under one SKU (a wrong-typed key) or a defect: the whole batch would
            # fail on every replay and stop every partition behind it. Each SKU's events are
            # applied on their own instead, and only those of the SKUs that still fail are
            # dead-lettered. Applying is idempotent, so what the failed call did is harmless.
            log.error("kafka_batch_failed", error=repr(exc), events=len(events))
        by_sku: dict[str, list[int]] = {}
        for index, event in enumerate(events):
            by_sku.setdefault(event.sku, []).append(index)
        codes: list[int | str] = [0] * len(events)
        for sku, indexes in by_sku.items():
            try:
                sku_codes: list[int | str] = list(
                    await self._apply_retrying([events[i] for i in indexes])
                )
            except Exception as exc:  # noqa: BLE001 - this SKU's events go to the DLQ
                log.error("kafka_sku_failed", sku=sku, error=repr(exc), events=len(indexes))
                sku_codes = [f"apply: failed in Redis: {exc}"] * len(indexes)
            for index, code in zip(indexes, sku_codes, strict=True):
                codes[index] = code
        return codes

    async def _apply_retrying(self, events: list[StockEvent]) -> list[int]:
        delay = _APPLY_RETRY_FIRST
        while True:
            try:
                return await self._applier.apply_codes(events)
            except Unavailable as exc:
                # Redis down or stalled (a 503 of any kind, outcome unknown included): applying
                # is idempotent, so the batch is tried again until Redis is back; nothing after
                # it is committed meanwhile. Crashing instead would put the consumer behind the
                # supervisor's backoff (up to 5 s, plus a group rejoin) after the outage ends.
                log.warning("kafka_apply_retry", code=exc.code, detail=exc.detail, retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _APPLY_RETRY_MAX)

    def _update_lag(self) -> None:
        # highwater() is right where end_offsets() is not (seen with tansu after batched produce).
        # Lag counts what is not yet applied and committed, so it includes batches in flight.
        assigned = self._consumer.assignment()
        for tp, done in self._done.items():
            if tp not in assigned:
                continue
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                KAFKA_LAG.labels(tp.topic, str(tp.partition)).set(max(0, highwater - done))


async def run_consumer(
    settings: Settings,
    applier: EventApplier,
    db: Database,
    *,
    dlq_bootstrap: str | None = None,
    dlq_timeout: float = DLQ_TIMEOUT,
) -> None:
    """Consume until cancelled; on cancel, finish and commit in-flight batches within a deadline.

    ``db`` need not be connected: PostgreSQL down only matters to a dead letter the DLQ will not
    take either (see ``gateway.adapters.dead_letters``).
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.kafka_group,
        enable_auto_commit=False,
        # A new group starts at the beginning: a feed must not lose events sent before we joined.
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=max(100, settings.kafka_session_timeout_ms // 3),
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=dlq_bootstrap or settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=False,
        max_request_size=DLQ_MAX_REQUEST,
        # Bounds metadata waits and delivery (a batch not acknowledged in time expires), so a
        # DLQ that never answers is given up on and PostgreSQL takes the dead letter.
        request_timeout_ms=int(dlq_timeout * 1000),
    )
    ledger = DeadLetterLedger(db)
    dead_letters = DeadLetterWriter(producer, ledger, send_timeout=dlq_timeout)
    ingest = KafkaIngest(consumer, dead_letters, applier, settings.max_clock_skew_seconds)
    await producer.start()
    try:
        consumer.subscribe(list(settings.kafka_topics), listener=_Drainer(ingest))
        await consumer.start()
        log.info("kafka_consumer_started", topics=settings.kafka_topics, group=settings.kafka_group)
        try:
            await ingest.run()
        except asyncio.CancelledError:
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT):
                    await ingest.drain()
            except (TimeoutError, Exception):  # noqa: BLE001 - uncommitted work is replayed
                log.warning("kafka_drain_incomplete", in_flight=ingest.in_flight)
            raise
        finally:
            await ingest.cancel_in_flight()
            await consumer.stop()
    finally:
        await producer.stop()
