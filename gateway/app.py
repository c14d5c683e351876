"""The application factory: wires settings, adapters and domain services into an aiohttp app.

Resources open in ``cleanup_ctx`` order (Redis -> PostgreSQL -> services -> Kafka consumer) and
close in reverse, so the consumer's last commit still finds Redis open. Nothing connects at import.

A dependency that is down at start does not stop the process: it serves ``/healthz``, ``/readyz``
names what is missing, requests that need it answer 503, and it connects (PostgreSQL: migrates;
the location config: copied to Redis) in the background once the dependency is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
from collections.abc import AsyncIterator
from typing import Final

import structlog
from aiohttp import web

from gateway.adapters.batcher import CommandBatcher
from gateway.adapters.commitments import PostgresCommitments
from gateway.adapters.config_record import PostgresConfigRecord
from gateway.adapters.erp import HttpErpClient
from gateway.adapters.erp_control_record import PostgresErpControl
from gateway.adapters.group_commit import GroupCommit
from gateway.adapters.kafka import run_consumer
from gateway.adapters.outbox import PostgresOrderQueue, PostgresOutbox
from gateway.adapters.postgres import Postgres
from gateway.adapters.records import RedisRecords, RedisRecordWriter
from gateway.adapters.redis import RedisPort
from gateway.adapters.reserve_coalescer import ReserveCoalescer
from gateway.adapters.scripts import ScriptRegistry
from gateway.atp.availability import AvailabilityReader
from gateway.atp.config_store import LocationConfig
from gateway.atp.events import EventApplier
from gateway.atp.store import AtpStore
from gateway.buffering.backpressure import BackPressure
from gateway.buffering.commitments import CommitmentKeeper
from gateway.buffering.control import ErpControl
from gateway.buffering.intake import ANSWER_SLACK_SECONDS, OrderIntake
from gateway.buffering.mender import run_mender
from gateway.buffering.store import FlowStore, Limits
from gateway.buffering.writer import ErpWriter
from gateway.http import (
    atp_routes,
    console_routes,
    erp_ops_routes,
    health,
    ops_routes,
    order_routes,
    reservation_routes,
)
from gateway.http.auth import Authenticator
from gateway.http.codec import MAX_BODY
from gateway.http.guard import Guard
from gateway.http.state import (
    APPLIER,
    AVAILABILITY,
    BATCHER,
    ERP_CONTROL,
    ERP_FLOW,
    LIFECYCLE,
    LOCATION_CONFIG,
    ORDER_INTAKE,
    POSTGRES,
    READINESS,
    REDIS,
    RESERVATIONS_SERVICE,
    SETTINGS,
)
from gateway.lifecycle import Lifecycle, Readiness
from gateway.metrics import flush as flush_metrics
from gateway.reservation.expiry import run_sweeper
from gateway.reservation.service import ReservationService
from gateway.reservation.store import CommitmentStore
from gateway.settings import Settings
from gateway.supervisor import supervised

log = structlog.get_logger(__name__)
# How stale another worker's share of a scrape may be (see gateway.metrics).
METRICS_FLUSH_SECONDS: Final = 1.0


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    port = RedisPort.from_url(
        settings.redis_url, cluster=settings.redis_cluster, timeout=settings.redis_timeout_seconds
    )
    batcher = CommandBatcher(
        functools.partial(port.execute, raise_on_error=False),
        max_wait=settings.redis_timeout_seconds,
    )
    app[REDIS] = port
    app[BATCHER] = batcher
    try:
        async with supervised("redis-batcher", batcher.run, app[LIFECYCLE]):
            yield
    finally:
        await port.close()


async def _postgres_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    db = Postgres(settings.postgres_dsn, settings.postgres_timeout_seconds)
    app[POSTGRES] = db
    try:
        # Waits for the first attempt (migrations first) at most one timeout; what is left, the
        # port finishes and retries in the background while /healthz is served.
        await db.start()
        yield
    finally:
        await db.close()


async def _readiness_ctx(app: web.Application) -> AsyncIterator[None]:
    readiness = Readiness(
        {"redis": functools.partial(_ping_redis, app[REDIS]), "postgres": app[POSTGRES].ping}
    )
    app[READINESS] = readiness
    try:
        yield
    finally:
        await readiness.close()


async def _ping_redis(port: RedisPort) -> None:
    port.gate.check()  # known down: say so at once, with the reason
    await port.ping()


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    scripts = ScriptRegistry(app[REDIS], "gateway.atp")
    records = RedisRecords(app[BATCHER])
    app[APPLIER] = EventApplier(
        scripts,
        horizon_seconds=settings.event_horizon_seconds,
        shared_slots=not settings.redis_cluster,
    )
    app[AVAILABILITY] = AvailabilityReader(records)
    config = LocationConfig(
        PostgresConfigRecord(app[POSTGRES]),
        AtpStore(scripts),
        RedisRecordWriter(app[REDIS]),
        records,
        redis_check=app[REDIS].gate.check,
    )
    app[LOCATION_CONFIG] = config
    if app[POSTGRES].connected:
        # Redis's copy made whole before serving when both are there (as before); otherwise the
        # sync worker does it as soon as they are.
        try:
            # Bounded like the rest of start-up: a big copy goes on in the sync worker.
            async with asyncio.timeout(settings.postgres_timeout_seconds):
                await config.sync()
        except Exception as exc:  # noqa: BLE001 - not there yet, or slow: the worker retries
            log.warning("config_sync_deferred", error=f"{type(exc).__name__}: {exc}")
    reservation_scripts = ScriptRegistry(app[REDIS], "gateway.reservation", app[BATCHER])
    reservations = ReservationService(
        reservation_scripts,
        records,
        ReserveCoalescer(reservation_scripts),
        cluster=settings.redis_cluster,
        max_ttl_seconds=settings.reservation_max_ttl,
    )
    app[RESERVATIONS_SERVICE] = reservations
    try:
        async with supervised("config-sync", config.keep_in_sync, app[LIFECYCLE]):
            yield
    finally:
        await reservations.close()


async def _orders_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # One group commit for the buffer's writes: confirms and the writers' outcomes share
    # transactions.
    commits = GroupCommit(app[POSTGRES])
    outbox = PostgresOutbox(app[POSTGRES], commits)
    queue = PostgresOrderQueue(app[POSTGRES], commits)
    pressure = BackPressure(
        queue,
        max_depth=settings.buffer_max_depth,
        max_age_seconds=settings.buffer_max_age_seconds,
    )
    answer_within = (
        settings.redis_timeout_seconds + settings.postgres_timeout_seconds + ANSWER_SLACK_SECONDS
    )
    intake = OrderIntake(
        app[RESERVATIONS_SERVICE],
        outbox,
        pressure,
        answer_within=answer_within,
        # Sent by answer_within, a connection within the PostgreSQL timeout and the statement
        # within its statement_timeout (twice it): committed by then, or never.
        take_back_after=answer_within + 3 * settings.postgres_timeout_seconds + 1,
    )
    app[ORDER_INTAKE] = intake
    flow = FlowStore(
        ScriptRegistry(app[REDIS], "gateway.buffering", app[BATCHER]),
        RedisRecords(app[BATCHER]),
        Limits(
            rate_per_second=settings.erp_rate_per_second,
            burst=settings.erp_burst,
            max_concurrency=settings.erp_max_concurrency,
        ),
    )
    app[ERP_FLOW] = flow
    control = ErpControl(
        PostgresErpControl(app[POSTGRES]), flow, queue, redis_check=app[REDIS].gate.check
    )
    app[ERP_CONTROL] = control
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(commits.close)  # last out: the workers below write through it
        stack.push_async_callback(intake.close)  # its background marks go through commits
        # Ops' settings in Redis before any writer asks for a permit under them.
        await control.start(settings.postgres_timeout_seconds)
        sync = supervised("erp-flow-sync", control.keep_in_sync, app[LIFECYCLE])
        await stack.enter_async_context(sync)
        await stack.enter_async_context(supervised("erp-flow-watch", control.watch, app[LIFECYCLE]))
        mender = functools.partial(run_mender, intake, outbox)
        await stack.enter_async_context(supervised("order-mender", mender, app[LIFECYCLE]))
        await stack.enter_async_context(supervised("buffer-watch", pressure.watch, app[LIFECYCLE]))
        keeper = CommitmentKeeper(
            PostgresCommitments(app[POSTGRES]),
            CommitmentStore(ScriptRegistry(app[REDIS], "gateway.reservation", app[BATCHER])),
        )
        await stack.enter_async_context(supervised("commitments", keeper.run, app[LIFECYCLE]))
        if settings.erp_url:
            erp = HttpErpClient(settings.erp_url, settings.erp_timeout_seconds)
            await erp.start()
            stack.push_async_callback(erp.close)
            writer = ErpWriter(
                queue,
                flow,
                erp,
                max_attempts=settings.erp_max_attempts,
                timeout_seconds=settings.erp_timeout_seconds,
            )
            await stack.enter_async_context(supervised("erp-writer", writer.run, app[LIFECYCLE]))
        yield


async def _flush_metrics_forever() -> None:
    while True:
        flush_metrics()
        await asyncio.sleep(METRICS_FLUSH_SECONDS)


async def _metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    # Under workers a scrape reaches one of them and reads the others' files: they must be
    # fresh without waiting for a scrape of their own. The last flush follows the drain.
    async with supervised("metrics-flush", _flush_metrics_forever, app[LIFECYCLE]):
        yield
    flush_metrics()


async def _sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    worker = functools.partial(run_sweeper, app[RESERVATIONS_SERVICE], RedisRecords(app[BATCHER]))
    async with supervised("expiry-sweeper", worker, app[LIFECYCLE]):
        yield


async def _kafka_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if not settings.kafka_bootstrap:
        yield
        return
    # PostgreSQL may not be there yet: only a dead letter the DLQ refuses needs it.
    worker = functools.partial(run_consumer, settings, app[APPLIER], app[POSTGRES])
    async with supervised("kafka-consumer", worker, app[LIFECYCLE]):
        yield


async def _on_shutdown(app: web.Application) -> None:
    # Phase one of shutdown: refuse new work; the server drains what is in flight.
    app[LIFECYCLE].draining = True
    log.info("draining")


# The young generation is collected after this many more container allocations than frees.
# At CPython's default of 700 a busy gateway collected it ~300 times a second, each pass walking
# every object of the requests in flight: 5-18% of the process's time at saturation. At 20,000
# it collects under once a second, under 1% of the time (confirms/s +30-40% at 64 connections).
# Garbage in cycles is rare here (no ORM, no object graphs per request), so little waits longer.
GC_YOUNG_THRESHOLD: Final = 20_000


async def _freeze_gc(app: web.Application) -> None:
    # Everything built at start-up lives as long as the process: move it out of the collector's
    # reach, or each full collection rescans it (~20 ms pauses at saturation, the p99 tail).
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def create_app(settings: Settings) -> web.Application:
    lifecycle = Lifecycle()
    auth = Authenticator(settings.api_keys)
    app = web.Application(client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    app[LIFECYCLE] = lifecycle
    app.cleanup_ctx.extend(
        [
            _metrics_ctx,
            _redis_ctx,
            _postgres_ctx,
            _readiness_ctx,
            _services_ctx,
            _orders_ctx,
            _sweeper_ctx,
            _kafka_ctx,
        ]
    )
    app.on_startup.append(_freeze_gc)  # after the cleanup contexts: they run first
    app.on_shutdown.append(_on_shutdown)
    Guard(lifecycle, auth, settings).add_routes(
        app,
        [
            health.routes,
            atp_routes.routes,
            ops_routes.routes,
            erp_ops_routes.routes,
            reservation_routes.routes,
            order_routes.routes,
            console_routes.routes,
        ],
    )
    return app
