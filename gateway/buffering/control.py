"""Ops' control of the ERP flow: the shared limit, pause and resume, dead letters and their
replay; every change audited with who asked (a fingerprint of their key) and in which request.

PostgreSQL is the record, Redis the copy every gateway's writers obey
(:class:`gateway.buffering.store.FlowStore`). A change commits to the record first, with its new
version and its audit entry in one transaction, then is set in Redis, where the next permit any
writer asks for reads it: in force on every process at once, well within a second. Its answer
is honest, as the location config's: a failure before the commit applied nothing (503
``dependency_unavailable``); a committed change whose Redis half failed is 503
``outcome_unknown``, and the sync below brings it to Redis.

Keeping the copy: Redis holds the version of the record it reflects, and each gateway compares
the two about once a second (:meth:`ErpControl.keep_in_sync`), setting the record again where
they differ: Redis lost its data (a FLUSHALL, a failover to an empty replica) or a change's
Redis half failed. Redis never takes an older version over a newer one (``limits.lua``), so a
copy read before a change and landing after it does not undo it. Redis is read before the
record: a version Redis holds was committed before it was set, so Redis is ahead of the record
read after it only when the record itself went back (restored from a backup), and then the
record wins. Until the copy is back after Redis lost its data, about a second, no writer gets a
permit (``acquire.lua`` answers ``unsynced``): running on the gateway's defaults could undo a
pause.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Final

import msgspec
import structlog

from gateway.buffering.control_schemas import (
    AuditPage,
    AuditView,
    DeadLetterDetailView,
    DeadLetterPage,
    DeadLetterView,
    ErpView,
    ReplayRequest,
    ReplayResult,
)
from gateway.buffering.store import FlowStore, Limits
from gateway.errors import (
    RETRY_AFTER,
    GatewayError,
    NotFound,
    OutcomeUnknown,
    ValidationFailed,
)
from gateway.metrics import (
    DEAD_LETTERS_REPLAYED,
    ERP_BREAKER_OPEN,
    ERP_DEAD_LETTERS,
    ERP_LIMITS_RESTORES,
    ERP_OPS_CHANGES,
    ERP_PAUSED,
    ERP_RATE_LIMIT,
)
from gateway.ports import Caller, ErpControlRecord, FlowSettings, OrderQueue

log = structlog.get_logger(__name__)

SYNC_INTERVAL: Final = 1.0
SENT_WINDOW: Final = 10.0
# How often the flow's figures (what GET /v1/ops/erp shows) are exported as metrics.
WATCH_INTERVAL: Final = 2.0
# "all" replays in batches of one transaction each (a lock on a few rows, briefly), and at most
# this many per request: the rest is for the next, which the answer says.
REPLAY_BATCH: Final = 1000
REPLAY_ALL_MAX: Final = 50_000
# Its own generator: the global one is shared state (and property tests watch it).
_JITTER: Final = random.Random()


class ErpControl:
    def __init__(
        self,
        record: ErpControlRecord,
        flow: FlowStore,
        queue: OrderQueue,
        *,
        redis_check: Callable[[], None] | None = None,
    ) -> None:
        self._record = record
        self._flow = flow
        self._queue = queue
        # Raises DependencyDown while Redis is known down: a change then fails before it
        # touches the record, and answers "nothing applied" instead of "outcome unknown".
        self._redis_check = redis_check
        d = flow.defaults
        self._defaults = FlowSettings(0, d.rate_per_second, d.burst, d.max_concurrency, False)
        self._sync_failing = False

    # -- reads -------------------------------------------------------------------------------

    async def view(self) -> ErpView:
        state = await self._flow.state()
        depth = await self._queue.depth()
        sent, dead = await self._record.sent_and_dead(SENT_WINDOW)
        return ErpView(
            limits=state.limits,
            paused=state.paused,
            effective_rate_per_second=0.0 if state.paused else state.effective_rate,
            in_flight=state.in_flight,
            breaker=state.breaker,
            buffer_depth=depth.depth,
            oldest_age_seconds=round(depth.oldest_age_seconds, 3),
            dead_letters=dead,
            sent_per_second=sent / SENT_WINDOW,
            version=state.version,
        )

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Owned worker: the flow as ops see it, as metrics (breaker, pause, rates, dead
        letters), so alerts need no call to the ops API. The buffer's depth is the buffer
        watch's to read; Redis' figures and PostgreSQL's are read apart, so one dependency
        down keeps only its own figures at their last values."""
        while True:
            try:
                state = await self._flow.state()
            except GatewayError as exc:
                log.debug("erp_flow_watch_skipped", reason=exc.detail)
            else:
                ERP_BREAKER_OPEN.set(0 if state.breaker == "closed" else 1)
                ERP_PAUSED.set(1 if state.paused else 0)
                ERP_RATE_LIMIT.labels("configured").set(state.limits.rate_per_second)
                ERP_RATE_LIMIT.labels("effective").set(
                    0.0 if state.paused else state.effective_rate
                )
            try:
                _, dead = await self._record.sent_and_dead(SENT_WINDOW)
            except GatewayError as exc:
                log.debug("erp_flow_watch_skipped", reason=exc.detail)
            else:
                ERP_DEAD_LETTERS.set(dead)
            await asyncio.sleep(interval)

    async def dead_letters(self, after: int, limit: int) -> DeadLetterPage:
        found = await self._record.dead_letters(after, limit + 1)
        page = found[:limit]
        items = [
            DeadLetterView(
                order_id=d.order_id,
                reservation_id=d.reservation_id,
                attempts=d.attempts,
                last_error=d.last_error,
                created_at=d.created_at.isoformat(timespec="milliseconds"),
                updated_at=d.updated_at.isoformat(timespec="milliseconds"),
            )
            for d in page
        ]
        return DeadLetterPage(items=items, next=page[-1].seq if len(found) > limit else None)

    async def dead_letter(self, order_id: str) -> DeadLetterDetailView:
        """One dead letter with the order as it would be sent again; 404 if it is not one."""
        found = await self._record.dead_letter(order_id)
        if found is None:
            raise NotFound(f"no dead letter {order_id!r} (unknown, or not failed)")
        d = found.letter
        return DeadLetterDetailView(
            order_id=d.order_id,
            reservation_id=d.reservation_id,
            attempts=d.attempts,
            last_error=d.last_error,
            created_at=d.created_at.isoformat(timespec="milliseconds"),
            updated_at=d.updated_at.isoformat(timespec="milliseconds"),
            lines=msgspec.Raw(found.lines),
            order=msgspec.Raw(found.order),
        )

    async def audit(self, before: int | None, limit: int) -> AuditPage:
        found = await self._record.audit(before, limit + 1)
        page = found[:limit]
        items = [
            AuditView(
                id=e.id,
                at=e.at.isoformat(timespec="milliseconds"),
                action=e.action,
                key_fingerprint=e.key_fingerprint,
                request_id=e.request_id,
                before=None if e.before is None else msgspec.Raw(e.before),
                after=None if e.after is None else msgspec.Raw(e.after),
            )
            for e in page
        ]
        return AuditPage(items=items, next=page[-1].id if len(found) > limit else None)

    # -- changes -----------------------------------------------------------------------------

    async def set_limits(self, limits: Limits, caller: Caller) -> ErpView:
        after = await self._change(
            "limits",
            lambda s: s._replace(
                rate_per_second=limits.rate_per_second,
                burst=limits.burst,
                max_concurrency=limits.max_concurrency,
            ),
            caller,
        )
        return await self._view_of(after)

    async def pause(self, caller: Caller) -> ErpView:
        return await self._view_of(
            await self._change("pause", lambda s: s._replace(paused=True), caller)
        )

    async def resume(self, caller: Caller) -> ErpView:
        return await self._view_of(
            await self._change("resume", lambda s: s._replace(paused=False), caller)
        )

    async def _view_of(self, change: FlowSettings) -> ErpView:
        """The answer to a change: the settings it committed (its version), with the live
        figures. Read back instead, a change racing it from another gateway could show in its
        place, and ops would think theirs was lost; GET shows whichever came last."""
        view = await self.view()
        return msgspec.structs.replace(
            view,
            limits=Limits(
                rate_per_second=change.rate_per_second,
                burst=change.burst,
                max_concurrency=change.max_concurrency,
            ),
            paused=change.paused,
            effective_rate_per_second=0.0 if change.paused else view.effective_rate_per_second,
            version=change.version,
        )

    async def _change(
        self, action: str, update: Callable[[FlowSettings], FlowSettings], caller: Caller
    ) -> FlowSettings:
        """Commit the change (PostgreSQL, audited), then copy it to Redis; what it committed."""
        if self._redis_check is not None:
            self._redis_check()
        before, after = await self._record.change(action, update, self._defaults, caller)
        ERP_OPS_CHANGES.labels(action).inc()
        log.info(
            "erp_flow_changed",
            action=action,
            key_fingerprint=caller.key_fingerprint,
            request_id=caller.request_id,
            before=before._asdict(),
            after=after._asdict(),
        )
        try:
            await self._flow.apply(after)
        except GatewayError as exc:
            # Committed: whatever Redis did or did not do, the sync makes the copy whole.
            log.warning("erp_flow_copy_failed", version=after.version, error=exc.detail)
            raise OutcomeUnknown(
                "the change is in the record (PostgreSQL) but Redis did not confirm it; every "
                "gateway copies the record to Redis within seconds. Retrying is safe",
                dependency="redis",
                retry_after=RETRY_AFTER,
            ) from exc
        return after

    async def replay(self, request: ReplayRequest, caller: Caller) -> ReplayResult:
        """Put dead letters back in the buffer, due now with their attempts from zero."""
        if (request.everything is True) == (request.order_ids is not msgspec.UNSET):
            raise ValidationFailed(
                [{"field": "", "message": 'send either "order_ids" or "all": true'}]
            )
        if request.order_ids is not msgspec.UNSET:
            done = await self._record.replay(request.order_ids, caller)
            self._replayed(caller, len(done.order_ids), len(done.not_dead_letters))
            return ReplayResult(
                replayed=len(done.order_ids), not_dead_letters=done.not_dead_letters, more=False
            )
        total, after = 0, 0
        while total < REPLAY_ALL_MAX:
            batch = await self._record.replay_next(after, REPLAY_BATCH, caller)
            total += len(batch.order_ids)
            if len(batch.order_ids) < REPLAY_BATCH:
                break
            after = batch.last_seq
        more = total >= REPLAY_ALL_MAX and bool(await self._record.dead_letters(after, 1))
        self._replayed(caller, total, 0)
        return ReplayResult(replayed=total, not_dead_letters=[], more=more)

    def _replayed(self, caller: Caller, replayed: int, not_dead_letters: int) -> None:
        DEAD_LETTERS_REPLAYED.inc(replayed)
        log.info(
            "dead_letters_replayed",
            replayed=replayed,
            not_dead_letters=not_dead_letters,
            key_fingerprint=caller.key_fingerprint,
            request_id=caller.request_id,
        )

    # -- keeping the copy --------------------------------------------------------------------

    async def start(self, within: float) -> None:
        """Make Redis's copy whole before the writers start, waiting at most ``within``
        seconds; what is not done then (a dependency down or slow), the sync worker does."""
        try:
            async with asyncio.timeout(within):
                await self.sync()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - not there yet, or slow: the worker retries
            log.warning("erp_flow_sync_deferred", error=f"{type(exc).__name__}: {exc}")

    async def keep_in_sync(self, interval: float = SYNC_INTERVAL) -> None:
        """Owned worker: compare the copy with the record about every ``interval`` seconds
        (jittered, so gateways started together do not all copy at once)."""
        while True:
            try:
                await self.sync()
            except GatewayError as exc:
                if not self._sync_failing:
                    log.warning("erp_flow_sync_failed", error=exc.detail)
                self._sync_failing = True
            else:
                if self._sync_failing:
                    log.info("erp_flow_sync_recovered")
                self._sync_failing = False
            await asyncio.sleep(interval * _JITTER.uniform(0.5, 1.5))

    async def sync(self) -> bool:
        """Set the record in Redis if Redis does not hold its version; True if it did."""
        held = await self._flow.held_version()  # first: see the module's docstring
        settings = await self._record.settings() or self._defaults
        if held == settings.version:
            return False
        applied = await self._flow.apply(settings, force=held > settings.version)
        if applied:
            ERP_LIMITS_RESTORES.inc()
            log.info("erp_flow_restored", held=held, **settings._asdict())
        return applied
