"""Kafka stock-event consumer: batches in, applied pipelined, offsets committed after applying.

Delivery is at-least-once: a batch's offsets are committed only once its events are in Redis, and
applying is idempotent, so a crash or rebalance replays at most the uncommitted tail harmlessly.
A message that is not a valid event goes to ``<topic>.dlq`` (with the reason in a header) before
its offset is committed, so it never stalls its partition and is never silently dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Sequence
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from gateway.atp.events import OUTCOMES, EventApplier
from gateway.atp.schemas import StockEvent
from gateway.atp.validation import decode_event
from gateway.errors import ValidationFailed
from gateway.lifecycle import Lifecycle
from gateway.metrics import KAFKA_BATCH_SECONDS, KAFKA_DLQ, KAFKA_LAG, STOCK_EVENTS
from gateway.settings import Settings

log = structlog.get_logger(__name__)

MAX_RECORDS: Final = 5000
# Batches applied concurrently: the event rule makes order between batches irrelevant, and
# commits still happen strictly in fetch order.
PIPELINE_DEPTH: Final = 3
DRAIN_TIMEOUT: Final = 5.0
DLQ_SUFFIX: Final = ".dlq"

Offsets = dict[TopicPartition, int]


class _Drainer(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, ingest: KafkaIngest) -> None:
        self._ingest = ingest

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Finish and commit what was fetched before another member takes the partitions.
        await self._ingest.drain()

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        log.info(
            "kafka_partitions_assigned", partitions=[f"{t.topic}/{t.partition}" for t in assigned]
        )


class KafkaIngest:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        applier: EventApplier,
    ) -> None:
        self._consumer = consumer
        self._producer = producer
        self._applier = applier
        self._in_flight: collections.deque[tuple[asyncio.Task[None], Offsets]] = collections.deque()

    async def run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=500, max_records=MAX_RECORDS)
            # Commit what finished first: the pipeline stays bounded and offsets move in order.
            while self._in_flight and (
                self._in_flight[0][0].done() or len(self._in_flight) >= PIPELINE_DEPTH
            ):
                await self._commit_oldest()
            if not batches:
                continue
            records = [r for recs in batches.values() for r in recs]
            offsets = {tp: recs[-1].offset + 1 for tp, recs in batches.items() if recs}
            task = asyncio.create_task(self._process(records))
            self._in_flight.append((task, offsets))
            self._update_lag(offsets)

    async def drain(self) -> None:
        while self._in_flight:
            await self._commit_oldest()

    async def cancel_in_flight(self) -> None:
        for task, _ in self._in_flight:
            task.cancel()
        for task, _ in self._in_flight:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._in_flight.clear()

    async def _commit_oldest(self) -> None:
        task, offsets = self._in_flight[0]
        await task  # a failure propagates: nothing after it is committed; the batch is replayed
        self._in_flight.popleft()
        await self._consumer.commit(offsets)

    async def _process(self, records: list[ConsumerRecord[Any, Any]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        events: list[StockEvent] = []
        dead: list[asyncio.Future[Any]] = []
        for record in records:
            try:
                if record.value is None:
                    raise ValidationFailed([{"field": "", "message": "message has no value"}])
                events.append(decode_event(record.value))
            except ValidationFailed as exc:
                dead.append(await self._dead_letter(record, exc))
        if dead:
            await asyncio.gather(*dead)
        codes = await self._applier.apply_codes(events) if events else []
        for code, outcome in enumerate(OUTCOMES):
            STOCK_EVENTS.labels("kafka", outcome).inc(codes.count(code))
        KAFKA_BATCH_SECONDS.observe(loop.time() - started)

    async def _dead_letter(
        self, record: ConsumerRecord[Any, Any], exc: ValidationFailed
    ) -> asyncio.Future[Any]:
        reason = "; ".join(f"{e['field'] or 'event'}: {e['message']}" for e in exc.errors)
        log.warning(
            "kafka_dead_letter",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
        )
        KAFKA_DLQ.labels(record.topic).inc()
        headers = [
            *(record.headers or ()),
            ("dlq-reason", reason.encode()),
            ("dlq-source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        future: asyncio.Future[Any] = await self._producer.send(
            record.topic + DLQ_SUFFIX, value=record.value, key=record.key, headers=headers
        )
        return future

    def _update_lag(self, offsets: Offsets) -> None:
        # highwater() is right where end_offsets() is not (seen with tansu after batched produce).
        for tp, next_offset in offsets.items():
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                KAFKA_LAG.labels(tp.topic, str(tp.partition)).set(max(0, highwater - next_offset))


async def run_consumer(settings: Settings, applier: EventApplier, lifecycle: Lifecycle) -> None:
    """Consume until cancelled; on cancel, finish and commit in-flight batches within a deadline."""
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
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=False
    )
    ingest = KafkaIngest(consumer, producer, applier)
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
                log.warning("kafka_drain_incomplete", in_flight=len(ingest._in_flight))
            raise
        finally:
            await ingest.cancel_in_flight()
            await consumer.stop()
    finally:
        await producer.stop()
