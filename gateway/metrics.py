"""Prometheus metrics of the gateway, defined once (prometheus-client's default registry).

Per-request HTTP counters live in ``gateway.http.request_metrics`` (cheaper on the hot path).

Under ``gateway serve --workers N`` the parent gives every worker one ``PROMETHEUS_MULTIPROC_DIR``:
prometheus-client then keeps each value in a file there, and :func:`exposition` (whichever
worker the scrape reaches) sums the files of all of them, so a scrape shows the whole group.
Gauges say how their workers' values combine (``multiprocess_mode``); the counters kept in plain
dicts for speed copy their growth into files at least once a second (:func:`flush`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector

# prometheus-client reads this variable once, at import, to decide where values live; the
# exporters below must make the same decision (the gateway's own settings never carry it: only
# the parent of a worker group sets it).
MULTIPROCESS: Final = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

REDIS_BATCH_SIZE: Final = Histogram(
    "gateway_redis_batch_commands",
    "Distinct Redis commands sent in one coalesced read batch",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
)
POSTGRES_BATCH_SIZE: Final = Histogram(
    "gateway_postgres_batch_writes",
    "Writes sent in one group-commit statement (many confirms share one WAL flush)",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)
RESERVATIONS_PER_CALL: Final = Histogram(
    "gateway_reservation_script_batch",
    "Reservations made by one reserve script call (those of one tick share calls)",
    buckets=(1, 2, 4, 8, 16, 32),
)
STOCK_EVENTS: Final = Counter(
    "gateway_stock_events_total",
    "Stock events processed, by where they came from and what became of them",
    ["source", "outcome"],
)
STOCK_LAST_EVENT: Final = Gauge(
    "gateway_stock_last_event_timestamp_seconds",
    "Unix time the gateway last took a batch of stock events from the source (http, kafka): "
    "time() minus it is how stale availability may be",
    ["source"],
    multiprocess_mode="max",  # the latest of any worker, a dead one's included
)
KAFKA_LAG: Final = Gauge(
    "gateway_kafka_consumer_lag",
    "Messages not yet applied and committed: high watermark minus committed offset",
    ["topic", "partition"],
    # The worker that owns a partition now set it last; one that lost it stops setting it.
    multiprocess_mode="livemostrecent",
)
KAFKA_DLQ: Final = Counter(
    "gateway_kafka_dead_letters_total", "Messages sent to a dead-letter topic", ["topic"]
)
KAFKA_BATCH_SECONDS: Final = Histogram(
    "gateway_kafka_batch_apply_seconds",
    "Time to apply and commit one consumed batch",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
)
RESERVATIONS_DUE: Final = Gauge(
    "gateway_reservations_due",
    "Overdue holds the last sweeper pass found (up to 200 a bucket, 3,200 in all): staying near "
    "the cap means expiry falls behind",
    multiprocess_mode="livemax",
)
DEPENDENCY_UP: Final = Gauge(
    "gateway_dependency_up",
    "1 when the last readiness check reached the dependency",
    ["dependency"],
    multiprocess_mode="livemin",  # down in any worker is down
)


_FLUSHES: list[Callable[[], None]] = []


def on_flush(flush: Callable[[], None]) -> None:
    """Have :func:`flush` call ``flush`` (a dict-kept metric copying itself into files)."""
    _FLUSHES.append(flush)


WORKER_CPU: Final = Counter(
    "gateway_worker_cpu_seconds",
    "CPU time (user + system) used by each worker process of the gateway; a restarted worker "
    "continues its slot's count",
    ["worker"],
)


class _CpuClock:
    def __init__(self) -> None:
        self.worker = "0"
        self._counted = 0.0

    def tick(self) -> None:
        used = time.process_time()
        WORKER_CPU.labels(self.worker).inc(used - self._counted)
        self._counted = used


_CPU: Final = _CpuClock()


def set_worker(index: int) -> None:
    """Name this process's slot in the worker group (label ``worker`` of the CPU counter)."""
    _CPU.worker = str(index)


def flush() -> None:
    """Bring the files of this worker up to date: the dict-kept counters and the CPU clock.

    Runs on the event loop (the dicts are only touched there): every second, before a scrape,
    and once more at shutdown."""
    _CPU.tick()
    for flush_one in _FLUSHES:
        flush_one()


def exposition() -> bytes:
    """The text a scrape gets: this process's registry, or under workers every worker's files
    summed. Reading the files blocks on disk: call this one off the event loop."""
    if not MULTIPROCESS:
        return generate_latest()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
    return generate_latest(registry)


class Tally(Collector):
    """A counter family of one label, counted in a plain dict and exported at scrape time.

    prometheus-client's Counter takes a lock per ``inc``; this one is bumped on every
    reservation, on the event loop's thread. The values named up front show as 0 from the start.
    """

    def __init__(self, name: str, documentation: str, label: str, values: Sequence[str]) -> None:
        self._name, self._documentation, self._label = name, documentation, label
        self._counts: dict[str, int] = dict.fromkeys(values, 0)
        REGISTRY.register(self)
        if MULTIPROCESS:
            self._shadow = Counter(name, documentation, [label], registry=None)
            self._flushed: dict[str, int] = {}
            for value in values:
                self._shadow.labels(value)  # shows as 0 from the start, as below
            on_flush(self.flush)

    def inc(self, value: str, amount: int = 1) -> None:
        self._counts[value] = self._counts.get(value, 0) + amount

    def flush(self) -> None:
        """Copy the growth since the last flush into the worker group's files."""
        for value, count in list(self._counts.items()):
            delta = count - self._flushed.get(value, 0)
            if delta:
                self._shadow.labels(value).inc(delta)
                self._flushed[value] = count

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, count in list(self._counts.items()):  # a copy: a scrape may run in a thread
            family.add_metric([value], count)
        yield family


RESERVATIONS: Final = Tally(
    "gateway_reservations_total",
    "Reservation outcomes: held, refused (insufficient stock), replayed (a retry answered the "
    "first outcome again), released, expired, confirmed",
    "outcome",
    ("held", "refused", "replayed", "released", "expired", "confirmed"),
)
STOCK_SHORTFALL: Final = Counter(
    "gateway_stock_shortfall_events_total",
    "Stock events that left a position with on-hand below what is reserved and committed",
)
KAFKA_DEAD_LETTER_WRITES: Final = Counter(
    "gateway_kafka_dead_letter_writes_total",
    "Dead letters written, by source topic and where: dlq (as is), dlq_truncated (a bounded copy; "
    "the original in PostgreSQL), postgres (the DLQ took neither, PostgreSQL holds the only copy)",
    ["topic", "destination"],
)
CONFIG_RESTORES: Final = Counter(
    "gateway_config_restores_total",
    "Copies of the whole ops config from PostgreSQL to Redis, made because Redis did not hold "
    "the record's version (it lost its data, or a write's Redis half failed)",
)
ORDERS_IN: Final = Counter(
    "gateway_orders_in_total",
    "Orders taken into the buffer, by route (confirm, direct) and answer: accepted (202), "
    "repeated (200, the buffer had it), refused (409 or 404)",
    ["route", "answer"],
)
ORDERS_MENDED: Final = Counter(
    "gateway_orders_mended_total",
    "Orders the mender finished: moved (the row's hold now counts as committed), discarded "
    "(the hold lapsed before it moved; the order was never acknowledged) or taken_back (a "
    "moved hold whose row was never committed is held again; never acknowledged either)",
    ["outcome"],
)
ERP_CALLS: Final = Counter(
    "gateway_erp_calls_total",
    "Orders sent to the ERP, by the status it answered (no_answer: timeout or connection error)",
    ["status"],
)
ERP_SECONDS: Final = Histogram(
    "gateway_erp_call_seconds",
    "How long the ERP took to answer one order",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BUFFER_DEPTH: Final = Gauge(
    "gateway_buffer_depth",
    "Orders in the buffer not yet accepted by the ERP (queued or sending)",
    multiprocess_mode="livemostrecent",
)
BUFFER_OLDEST_AGE: Final = Gauge(
    "gateway_buffer_oldest_age_seconds",
    "Age of the oldest order in the buffer not yet accepted",
    multiprocess_mode="livemostrecent",
)
BUFFER_DRAIN_RATE: Final = Gauge(
    "gateway_buffer_drain_rate",
    "Orders leaving the buffer per second (accepted or dead-lettered)",
    multiprocess_mode="livemostrecent",
)
ERP_BREAKER_OPEN: Final = Gauge(
    "gateway_erp_breaker_open",
    "1 while the shared breaker before the ERP is open or half open (probing), 0 when closed",
    multiprocess_mode="livemostrecent",
)
ERP_PAUSED: Final = Gauge(
    "gateway_erp_paused",
    "1 while ops have paused the ERP writers",
    multiprocess_mode="livemostrecent",
)
ERP_RATE_LIMIT: Final = Gauge(
    "gateway_erp_rate_limit_per_second",
    "The ERP send rate: configured (ops' limit) and effective (after the adaptive slow-down "
    "on 429s and the breaker; 0 while paused)",
    ["kind"],
    multiprocess_mode="livemostrecent",
)
ERP_DEAD_LETTERS: Final = Gauge(
    "gateway_erp_dead_letters",
    "Orders dead-lettered (the ERP refused them or attempts ran out), waiting for ops to replay",
    multiprocess_mode="livemostrecent",
)
BUFFER_REJECTIONS: Final = Counter(
    "gateway_buffer_rejections_total", "Orders refused with 503 buffer_full (back-pressure)"
)
COMMITMENTS_WAITING: Final = Gauge(
    "gateway_commitments_waiting",
    "Orders the ERP accepted whose committed quantities still count, waiting for a stock "
    "snapshot at or after the acceptance",
    multiprocess_mode="livemostrecent",
)
COMMITMENTS_OLDEST_AGE: Final = Gauge(
    "gateway_commitments_waiting_oldest_age_seconds",
    "Time since the ERP accepted the oldest order whose commitment still waits for a snapshot",
    multiprocess_mode="livemostrecent",
)
COMMITMENTS_RESTORED: Final = Counter(
    "gateway_commitments_restored_total",
    "Commitments (order x SKU x location) put back into Redis from the order buffer after Redis "
    "lost them",
)
ERP_OPS_CHANGES: Final = Counter(
    "gateway_erp_ops_changes_total",
    "Ops changes of the ERP flow committed (each audited), by action: limits, pause, resume",
    ["action"],
)
ERP_LIMITS_RESTORES: Final = Counter(
    "gateway_erp_limits_restores_total",
    "Copies of ops' ERP flow settings from PostgreSQL to Redis, made because Redis did not hold "
    "the record's version (it lost its data, or a change's Redis half failed)",
)
DEAD_LETTERS_REPLAYED: Final = Counter(
    "gateway_dead_letters_replayed_total",
    "Dead-lettered orders ops put back in the buffer (POST /v1/ops/dead-letters/replay)",
)
