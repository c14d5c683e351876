"""The ERP writers: drain the order buffer into the ERP as fast as the shared limit allows.

Each gateway runs one writer loop. It takes permits from the shared limit in Redis
(:class:`gateway.buffering.store.FlowStore`: rate + burst, max in flight, breaker, pause), claims
as many orders as it got permits (``FOR UPDATE SKIP LOCKED``: no order is held by two writers),
and sends each in a task of its own. A writer that dies holding orders leaves them to be claimed
again when their lease ends; the ERP de-duplicates them by ``Idempotency-Key``.

What an answer means: 200/201 and 409 (the ERP has it) accepted; 429 and 503 come back after
their ``Retry-After``; other 5xx and no answer retry with exponential backoff and full jitter;
other 4xx, or more than ``max_attempts`` attempts, dead-letter the order (``failed``).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime
from typing import Final

import structlog

from gateway.buffering.store import FlowStore, Outcome
from gateway.errors import GatewayError
from gateway.metrics import ERP_CALLS, ERP_SECONDS
from gateway.ports import ClaimedOrder, ErpClient, ErpReply, OrderQueue

log = structlog.get_logger(__name__)
_BACKOFF_BASE: Final = 0.5
_BACKOFF_CAP: Final = 60.0
_IDLE_WAIT: Final = 0.05
_MAX_CLAIM: Final = 100
_JITTER: Final = random.Random()


def backoff(attempt: int) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^attempt))."""
    return _JITTER.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** min(attempt, 20)))


class ErpWriter:
    def __init__(
        self,
        queue: OrderQueue,
        flow: FlowStore,
        erp: ErpClient,
        *,
        max_attempts: int,
        timeout_seconds: float,
    ) -> None:
        self._queue = queue
        self._flow = flow
        self._erp = erp
        self._max_attempts = max_attempts
        self._timeout = timeout_seconds
        # A permit's lease outlives the call it covers (its timeout), so it is freed by the
        # report, or by its lease only when this process died.
        self._lease_ms = int((timeout_seconds + 5) * 1000)
        self._sends: set[asyncio.Task[None]] = set()
        # Permits asked for per step: doubles while the buffer fills them, back to 1 when it is
        # empty, so an idle writer does not take (and hand back) a burst of tokens every tick.
        self._want = 1

    async def run(self) -> None:
        """Owned worker. On cancellation the sends in flight finish first (each bounded by the
        ERP timeout), so no order is left half-answered."""
        try:
            while True:
                try:
                    await self._step()
                except GatewayError as exc:  # Redis or PostgreSQL down: try again shortly
                    log.warning("erp_writer_waiting", reason=exc.detail)
                    await asyncio.sleep(0.5)
        finally:
            if self._sends:
                await asyncio.shield(asyncio.gather(*self._sends, return_exceptions=True))

    async def _step(self) -> None:
        prefix = uuid.uuid4().hex
        grant = await self._flow.acquire(self._want, prefix, self._lease_ms)
        if grant.granted == 0:
            await asyncio.sleep(min(grant.wait_seconds, 1.0))
            return
        permits = [f"{prefix}:{i}" for i in range(1, grant.granted + 1)]
        claim = asyncio.ensure_future(self._queue.claim(grant.granted, self._lease_ms / 1000))
        try:
            orders = await asyncio.shield(claim)
        except asyncio.CancelledError:
            # Stopping: what the claim took (it ends within the PostgreSQL deadline) goes back
            # to the queue now, not when its lease ends.
            await self._hand_back(claim, permits)
            raise
        except BaseException:
            await self._give_back(permits)
            raise
        await self._give_back(permits[len(orders) :])
        self._want = min(_MAX_CLAIM, self._want * 2) if len(orders) == len(permits) else 1
        for order, permit in zip(orders, permits, strict=False):
            task = asyncio.create_task(self._send(order, permit))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        if not orders:
            await asyncio.sleep(_IDLE_WAIT)

    async def _hand_back(
        self, claim: asyncio.Future[list[ClaimedOrder]], permits: list[str]
    ) -> None:
        try:
            orders = await claim
            await self._queue.hand_back([order.order_id for order in orders])
        except GatewayError as exc:
            log.warning("erp_claim_not_handed_back", error=exc.detail)  # leases end on their own
        await self._give_back(permits)

    async def _give_back(self, permits: list[str]) -> None:
        for permit in permits:
            try:
                await self._flow.report(permit, "unused")
            except GatewayError:
                return  # their leases end on their own

    async def _send(self, order: ClaimedOrder, permit: str) -> None:
        reply = await self._erp.send(order.order_id, order.body)
        outcome = await self._settle(order, reply)
        ERP_CALLS.labels(str(reply.status) if reply.status else "no_answer").inc()
        ERP_SECONDS.observe(reply.seconds)
        try:
            await self._flow.report(permit, outcome)
        except GatewayError as exc:
            log.warning("erp_report_lost", order_id=order.order_id, error=exc.detail)

    async def _settle(self, order: ClaimedOrder, reply: ErpReply) -> Outcome:
        status = reply.status
        try:
            if status in (200, 201, 409):
                at = reply.accepted_at or datetime.now(UTC)
                await self._queue.accepted(order.order_id, reply.erp_order_id, at)
                log.info("erp_order_accepted", order_id=order.order_id, status=status)
                return "slow" if reply.seconds > self._timeout / 2 else "ok"
            if status in (429, 503):
                delay = reply.retry_after if reply.retry_after is not None else backoff(1)
                await self._retry_or_fail(order, delay, reply.error)
                return "throttled"
            if 400 <= status < 500:
                await self._queue.fail(order.order_id, reply.error)
                log.warning("erp_order_refused", order_id=order.order_id, status=status)
                return "ok"  # the ERP is healthy; the order is not
            await self._retry_or_fail(order, backoff(order.attempts), reply.error)
            return "failed"
        except GatewayError as exc:
            # The outcome is not recorded: the lease ends and the order is sent again, which
            # the ERP answers 409 (it has it) if this call had reached it.
            log.warning("erp_outcome_unrecorded", order_id=order.order_id, error=exc.detail)
            return "ok" if status in (200, 201, 409) else "failed"

    async def _retry_or_fail(self, order: ClaimedOrder, delay: float, error: str) -> None:
        if order.attempts >= self._max_attempts:
            await self._queue.fail(
                order.order_id, f"gave up after {order.attempts} attempts: {error}"
            )
            log.warning("erp_order_dead_lettered", order_id=order.order_id, error=error)
        else:
            await self._queue.retry(order.order_id, delay, error)
