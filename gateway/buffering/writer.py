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
import collections
import functools
import math
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Final

import structlog
from prometheus_client import Counter

from gateway.buffering.pacer import Pacer
from gateway.buffering.store import FlowStore, Grant, Outcome
from gateway.errors import GatewayError
from gateway.metrics import ERP_CALLS, ERP_SECONDS
from gateway.ports import ClaimedOrder, ErpClient, ErpReply, OrderQueue

log = structlog.get_logger(__name__)
_BACKOFF_BASE: Final = 0.5
_BACKOFF_CAP: Final = 60.0
_IDLE_WAIT: Final = 0.05
_ANSWER_WAIT: Final = 0.002
# No new ask while the pacer holds more than this many seconds of granted orders.
_MAX_BACKLOG: Final = 0.03  # for an ask's answer or a claim, when every ready order is asked for
_MAX_CLAIM: Final = 100
# Between two asks once the bucket is spent (at most: half the burst's worth of the rate).
_BATCH_WAIT: Final = 0.02
# Orders claimed ahead: this many seconds of the rate, at most _MAX_AHEAD.
_AHEAD_SECONDS: Final = 0.25
_MAX_AHEAD: Final = 1000
# Orders claimed ahead are handed back after this long without a grant.
_READY_MAX_AGE: Final = 1.0
_JITTER: Final = random.Random()


@functools.cache
def _calls(status: int) -> Counter:
    """The call counter's child for a status, looked up once per status."""
    return ERP_CALLS.labels(str(status) if status else "no_answer")


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
        # Orders claimed ahead, so a grant is sent at once rather than after a claim's round
        # trip (tokens that come meanwhile beyond the burst would be lost): each with when it
        # was claimed; handed back when not sent soon, long before its lease ends.
        self._ready: collections.deque[tuple[float, ClaimedOrder]] = collections.deque()
        self._prefetch: asyncio.Task[None] | None = None
        self._ready_max_age = min(_READY_MAX_AGE, self._lease_ms / 4000)
        # Asks for permits for orders claimed ahead, in flight, and how many of those orders
        # they asked for: the next ask goes out on time without waiting for their answers.
        self._asks: set[asyncio.Task[None]] = set()
        self._promised = 0
        # Before the next ask: what the last answer said, kept as the cadence while the next
        # answers are out; and the time it named, measured from when its ask left (the bucket
        # answered about half a round trip later, so the next ask lands as the token is whole).
        self._pause = 0.0
        self._not_before = 0.0
        # Granted orders wait here for their turn to leave (see gateway.buffering.pacer).
        self._pacer: Pacer[tuple[ClaimedOrder, str]] = Pacer()

    async def run(self) -> None:
        """Owned worker. On cancellation the sends in flight finish first (each bounded by the
        ERP timeout), so no order is left half-answered; orders granted but not yet sent go
        back to the buffer."""
        pacer = asyncio.create_task(self._pacer.run(self._launch))
        try:
            while not pacer.done():
                try:
                    await self._step()
                except GatewayError as exc:  # Redis or PostgreSQL down: try again shortly
                    log.warning("erp_writer_waiting", reason=exc.detail)
                    await asyncio.sleep(0.5)
            pacer.result()  # the pacer failed: so does the writer (its supervisor restarts it)
        finally:
            if self._prefetch is not None:
                self._prefetch.cancel()
                await asyncio.gather(self._prefetch, return_exceptions=True)
            if self._asks:  # each ends within the Redis timeout; what it was granted is queued
                await asyncio.shield(asyncio.gather(*self._asks, return_exceptions=True))
            pacer.cancel()
            await asyncio.gather(pacer, return_exceptions=True)
            unsent = self._pacer.take_all()
            await self._hand_back([order.order_id for order, _ in unsent] + self._pop_stale(0.0))
            await self._give_back([permit for _, permit in unsent])
            if self._sends:
                await asyncio.shield(asyncio.gather(*self._sends, return_exceptions=True))

    async def _step(self) -> None:
        await self._hand_back(self._pop_stale(self._ready_max_age))
        if self._pacer.backlog_seconds > self._ready_max_age:
            # The rate was cut with orders queued at the old one: what would wait longer than
            # a claimed-ahead order may goes back, with its permit, long before its lease ends.
            late = self._pacer.trim(self._ready_max_age)
            await self._hand_back([order.order_id for order, _ in late])
            await self._give_back([permit for _, permit in late])
        free = len(self._ready) - self._promised
        if self._pacer.backlog_seconds > _MAX_BACKLOG:
            # Granted orders still wait their turn (the loop was held up): asking now would
            # only lengthen the queue; the bucket keeps up to a burst of tokens meanwhile.
            await asyncio.sleep(_ANSWER_WAIT)
        elif free > 0:
            early = self._not_before - time.monotonic()
            if early > 0:
                # The last answer named when a token is whole again: asking sooner would only
                # be refused, asking later loses tokens once the bucket is full.
                await asyncio.sleep(early)
            else:
                await self._ask_on_time(min(self._want, free))
        elif self._asks or self._prefetch is not None:
            # Every order claimed ahead is asked for, or the next ones are being claimed.
            await asyncio.sleep(_ANSWER_WAIT)
        else:
            await self._ask_and_claim()

    async def _ask_on_time(self, n: int) -> None:
        """Ask for permits for ``n`` orders claimed ahead, then wait for this answer or the
        next ask's turn, whichever comes first: the asks keep their pace however long Redis
        takes to answer while the event loop is busy (the bucket never fills up and drops
        tokens), and an answer that comes sooner says when to ask next (a refusal whose
        token is whole in a millisecond is not left waiting a whole turn)."""
        asked_at = time.monotonic()
        self._promised += n
        task = asyncio.create_task(self._ask_for_ready(n, asked_at))
        self._asks.add(task)
        task.add_done_callback(self._asks.discard)
        turn = asked_at + self._pause - time.monotonic()
        if turn > 0:
            await asyncio.wait((task,), timeout=turn)

    async def _ask_for_ready(self, n: int, asked_at: float) -> None:
        prefix = uuid.uuid4().hex
        try:
            grant = await self._flow.acquire(n, prefix, self._lease_ms)
        except GatewayError as exc:
            log.warning("erp_writer_waiting", reason=exc.detail)
            self._wait(time.monotonic(), 0.5)
            return
        finally:
            self._promised -= n
        if grant.granted == 0:
            self._wait(asked_at, min(grant.wait_seconds, 1.0))
            return
        permits = [f"{prefix}:{i}" for i in range(1, grant.granted + 1)]
        # Fewer may be left: orders handed back as stale while this was asked for.
        orders = [self._ready.popleft()[1] for _ in range(min(grant.granted, len(self._ready)))]
        self._start_sends(orders, permits, grant)
        self._wait(asked_at, self._after(grant, n))
        if len(orders) == grant.granted:
            self._want = min(_MAX_CLAIM, self._want * 2)
            self._keep_ready(grant)
        await self._give_back(permits[len(orders) :])

    async def _ask_and_claim(self) -> None:
        """Nothing claimed ahead: ask, then claim as many orders as were granted."""
        prefix = uuid.uuid4().hex
        want = self._want
        grant = await self._flow.acquire(want, prefix, self._lease_ms)
        if grant.granted == 0:
            await asyncio.sleep(min(grant.wait_seconds, 1.0))
            return
        permits = [f"{prefix}:{i}" for i in range(1, grant.granted + 1)]
        orders: list[ClaimedOrder] = []
        try:
            orders = await self._claim(grant.granted)
        finally:
            # Before any other wait: from here the send tasks own the orders, so a stop that
            # comes now cannot leave one claimed and neither sent nor handed back.
            self._start_sends(orders, permits, grant)
            await self._give_back(permits[len(orders) :])
        filled = len(orders) == len(permits)
        self._want = min(_MAX_CLAIM, want * 2) if filled else 1
        if filled:
            self._keep_ready(grant)
        if not orders:
            await asyncio.sleep(_IDLE_WAIT)
        else:
            await asyncio.sleep(self._after(grant, want))

    def _wait(self, asked_at: float, pause: float) -> None:
        self._pause = pause
        self._not_before = asked_at + pause

    @staticmethod
    def _after(grant: Grant, asked: int) -> float:
        """How long before the next ask: when the grant was whole, until the bucket holds a
        token again (no time if it still does). When it was not, the bucket is spent: let a
        batch of tokens build up rather than ask for one or two each millisecond, for less
        than half the burst's worth of time so the bucket never fills and drops tokens
        meanwhile, but at least until the next token is whole (with a burst of one, that is
        all the bucket can hold)."""
        if grant.granted >= asked or grant.rate <= 0:
            return grant.wait_seconds
        return max(grant.wait_seconds, min(_BATCH_WAIT, 0.5 * grant.burst / grant.rate))

    def _keep_ready(self, grant: Grant) -> None:
        """The buffer had enough for this grant: keep the next grants' orders claimed ahead,
        about ``_AHEAD_SECONDS`` of the rate (more would hold leases for nothing), claimed
        again when under half of that."""
        target = min(_MAX_AHEAD, max(grant.granted, math.ceil(grant.rate * _AHEAD_SECONDS)))
        if self._prefetch is None and len(self._ready) < target / 2:
            self._prefetch = asyncio.create_task(self._claim_ahead(target - len(self._ready)))

    def _start_sends(self, orders: list[ClaimedOrder], permits: list[str], grant: Grant) -> None:
        self._pacer.push(list(zip(orders, permits, strict=False)), grant.rate, grant.burst)

    def _launch(self, item: tuple[ClaimedOrder, str]) -> None:
        task = asyncio.create_task(self._send(*item))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _claim(self, n: int) -> list[ClaimedOrder]:
        claim = asyncio.ensure_future(self._queue.claim(n, self._lease_ms / 1000))
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            # Stopping: what the claim took (it ends within the PostgreSQL deadline) goes back
            # to the queue now, not when its lease ends.
            try:
                orders = await claim
            except GatewayError:
                raise asyncio.CancelledError from None  # nothing claimed, or leases end alone
            await self._hand_back([order.order_id for order in orders])
            raise

    async def _claim_ahead(self, n: int) -> None:
        try:
            orders = await self._claim(n)
        except GatewayError as exc:
            log.debug("erp_claim_ahead_failed", reason=exc.detail)
            return
        finally:
            self._prefetch = None
        now = time.monotonic()
        self._ready.extend((now, order) for order in orders)

    def _pop_stale(self, older_than: float) -> list[str]:
        """The orders claimed ahead more than ``older_than`` seconds ago, out of the ready
        queue: no grant came for them soon (a pause, an open breaker, a lower rate)."""
        cutoff = time.monotonic() - older_than
        stale: list[str] = []
        while self._ready and self._ready[0][0] <= cutoff:
            stale.append(self._ready.popleft()[1].order_id)
        return stale

    async def _hand_back(self, order_ids: list[str]) -> None:
        if not order_ids:
            return
        try:
            # Shielded: a stop while it is written must not drop it (they would stay sending
            # until their leases end).
            await asyncio.shield(self._queue.hand_back(order_ids))
        except GatewayError as exc:
            log.warning("erp_claim_not_handed_back", error=exc.detail)  # leases end on their own

    async def _give_back(self, permits: list[str]) -> None:
        for permit in permits:
            try:
                await self._flow.report(permit, "unused")
            except GatewayError:
                return  # their leases end on their own

    async def _send(self, order: ClaimedOrder, permit: str) -> None:
        reply = await self._erp.send(order.order_id, order.body)
        outcome = await self._settle(order, reply)
        _calls(reply.status).inc()
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
                # Debug: at thousands a second a line each would cost more than the send; the
                # order's row (GET /v1/orders/{id}) and the call metrics keep the record.
                log.debug("erp_order_accepted", order_id=order.order_id, status=status)
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
