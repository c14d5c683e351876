"""Orders in: a confirmed reservation becomes a row in the order buffer, then its hold moves.

Two stores, no transaction across them, so the order of the writes is the protocol:

1. the order row is committed to PostgreSQL, its hold pending (a row in ``order_holds_pending``);
2. the reservation is confirmed in Redis (held -> committed, idempotent);
3. the order is acknowledged (202), and the row is marked ``moved`` (in the background: the
   order is safe once 1 and 2 are done, so checkout does not wait for a second commit; until
   the mark lands, reads of the order ask Redis, and the writers do not take it yet).

A crash or an outage between any two steps leaves a pending row, which a retry of the same
confirm or the mender (:mod:`gateway.buffering.mender`) finishes: step 2 again (a confirmed
reservation answers ``confirmed`` again), then step 3. If the hold lapsed before step 2 ran
(expired or released), the order was never acknowledged and its row is discarded. A hold never
moves without its row, since step 2 only runs after step 1 committed.
"""

from __future__ import annotations

import asyncio
from typing import Final

import msgspec
import structlog

from gateway.buffering.backpressure import Admission, BackPressure
from gateway.buffering.schemas import (
    MAX_ORDER_BYTES,
    ConfirmRequest,
    OrderReceipt,
    OrderRequest,
    OrderView,
    customer_of,
)
from gateway.errors import Conflict, GatewayError, InsufficientStock, NotFound, ValidationFailed
from gateway.ports import NewOrder, OrderOutbox, StoredOrder
from gateway.reservation.schemas import ReservationRequest
from gateway.reservation.service import ReservationService

log = structlog.get_logger(__name__)

# A hold made for an order without a reservation lives this long if its confirm never comes.
DIRECT_HOLD_SECONDS: Final = 120


class Intake(msgspec.Struct, frozen=True):
    """An intake answer: 202 for a new order, 200 for one the buffer held already."""

    status: int
    receipt: OrderReceipt


class OrderIntake:
    def __init__(
        self,
        reservations: ReservationService,
        outbox: OrderOutbox,
        pressure: BackPressure | None = None,
    ) -> None:
        self._reservations = reservations
        self._outbox = outbox
        self._pressure = pressure
        self._marks: set[asyncio.Future[None]] = set()

    async def close(self) -> None:
        """Wait for the marks in flight (each bounded by PostgreSQL's deadline)."""
        while self._marks:
            await asyncio.gather(*self._marks, return_exceptions=True)

    async def confirm(
        self, rid: str, request: ConfirmRequest, admission: Admission | None = None
    ) -> Intake:
        """``admission``: the order's place in the buffer, when the caller took it already."""
        _check_order(request.order)
        # The common case first, with no read of the buffer: a held reservation's row is
        # inserted at once, and only an insert that finds its ids taken reads what took them.
        try:
            reservation = await self._reservations.get_to_confirm(rid)
        except NotFound:
            # Settled and aged out of Redis: a repeat of its confirm still has its answer.
            existing = await self._outbox.find(request.order_id)
            if existing is None:
                raise
            return await self._repeat(existing, rid)
        if reservation.status == "held":
            # Before anything changes: when refused, the hold stays for a retry.
            admission = admission or self._admit()
            order = NewOrder(
                order_id=request.order_id,
                reservation_id=rid,
                customer_id=customer_of(request.order),
                body=bytes(request.order),
                lines=reservation.lines,
            )
            stored = None
            try:
                stored = await self._outbox.add(order)
            finally:
                admission.close(added=stored is not None)
            if stored is not None:
                if not await self.move_hold(stored, reservation.skus, wait=False):
                    raise _not_held(rid, "no longer held")
                return Intake(202, _receipt(stored))
        existing = await self._outbox.find(request.order_id)
        if existing is not None:
            return await self._repeat(existing, rid)
        if reservation.status == "held":  # the insert met this reservation under another id
            raise _confirmed_elsewhere(rid)
        if reservation.status == "confirmed":
            other = await self._outbox.find_by_reservation(rid)
            if other is not None:
                raise _confirmed_elsewhere(rid)
        raise _not_held(rid, reservation.status)

    async def place(self, request: OrderRequest) -> Intake:
        """Hold and confirm in one step, all or nothing (``POST /v1/orders``)."""
        _check_order(request.order)
        existing = await self._outbox.find(request.order_id)
        if existing is not None:
            return await self._repeat(existing, direct_reservation_id(request.order_id))
        # Taken before the hold and kept through the confirm: a refused order holds nothing,
        # and an order that holds is not refused afterwards.
        admission = self._admit()
        try:
            return await self._place(request, admission)
        finally:
            admission.close(added=False)  # when the confirm did not write a row

    async def _place(self, request: OrderRequest, admission: Admission) -> Intake:
        hold = ReservationRequest(
            reservation_id=direct_reservation_id(request.order_id),
            lines=request.lines,
            ttl_seconds=DIRECT_HOLD_SECONDS,
            channel="order",
        )
        outcome = await self._reservations.reserve(hold)
        if outcome.reservation is None:
            raise InsufficientStock(
                "not every line fits into what is available; nothing was ordered",
                order_id=request.order_id,
                lines=outcome.shortfalls,
            )
        return await self.confirm(
            hold.reservation_id,
            ConfirmRequest(order_id=request.order_id, order=request.order),
            admission,
        )

    def _admit(self) -> Admission:
        return Admission(None) if self._pressure is None else self._pressure.admit()

    async def get(self, order_id: str) -> OrderView:
        stored = await self._outbox.find(order_id)
        if stored is None or (stored.hold_state == "pending" and not await self._moved(stored)):
            # A pending row whose hold did not move is not an order yet: it was never
            # acknowledged, and may be dropped.
            raise NotFound(f"order {order_id!r} does not exist", order_id=order_id)
        return OrderView(
            order_id=stored.order_id,
            reservation_id=stored.reservation_id,
            status=stored.status,  # type: ignore[arg-type]
            attempts=stored.attempts,
            created_at=stored.created_at.isoformat(timespec="milliseconds"),
            updated_at=stored.updated_at.isoformat(timespec="milliseconds"),
            erp_order_id=stored.erp_order_id,
            accepted_at=(
                stored.accepted_at.isoformat(timespec="milliseconds")
                if stored.accepted_at
                else None
            ),
            last_error=stored.last_error,
        )

    async def _moved(self, stored: StoredOrder) -> bool:
        """Whether a pending row's hold moved (its mark may not have landed yet)."""
        try:
            reservation = await self._reservations.get(stored.reservation_id)
        except NotFound:
            return False
        return reservation.status == "confirmed"

    async def move_hold(
        self, stored: StoredOrder, skus: bytes | str | None = None, *, wait: bool = True
    ) -> bool:
        """Steps 2 and 3 for a committed row: True once its hold counts as committed, False
        when the hold lapsed first (the row is discarded then). Raises when Redis or PostgreSQL
        cannot tell now: the row stays pending for a retry or the mender. Without ``wait`` the
        mark is written in the background (a failure of it is the mender's to finish)."""
        try:
            status = await self._reservations.confirm(stored.reservation_id, skus)
        except NotFound:
            # Settled and aged out of Redis, or never there: nothing can tell which, so the row
            # stays for an operator rather than be dropped on a guess.
            log.error("order_hold_unknown", order_id=stored.order_id)
            raise
        if status == "confirmed":
            if wait:
                await self._outbox.hold_moved(stored.order_id)
            else:
                try:
                    mark = self._outbox.hold_moved_soon(stored.order_id)
                except GatewayError as exc:
                    # Row and hold are done: the order stands; the mender writes the mark.
                    log.warning("order_mark_deferred", order_id=stored.order_id, error=exc.detail)
                    return True
                self._marks.add(mark)
                mark.add_done_callback(self._marked)
            return True
        if await self._outbox.discard(stored.order_id):
            log.info("order_discarded", order_id=stored.order_id, reservation_status=status)
            return False
        return True  # moved by a racing request or the mender meanwhile

    def _marked(self, mark: asyncio.Future[None]) -> None:
        self._marks.discard(mark)
        if not mark.cancelled() and (exc := mark.exception()) is not None:
            # The mender finishes it: the row stays pending until then.
            log.warning("order_mark_deferred", error=str(exc))

    async def _repeat(self, existing: StoredOrder, rid: str) -> Intake:
        if existing.reservation_id != rid:
            raise Conflict(
                "idempotency_conflict",
                f"order {existing.order_id!r} was placed for another reservation",
                order_id=existing.order_id,
            )
        if existing.hold_state == "pending" and not await self.move_hold(existing):
            raise _not_held(rid, "no longer held")
        return Intake(200, _receipt(existing))


def direct_reservation_id(order_id: str) -> str:
    """The hold an order without a reservation makes: named for the order, so a retry finds it."""
    return f"order:{order_id}"


def _receipt(stored: StoredOrder) -> OrderReceipt:
    return OrderReceipt(order_id=stored.order_id, reservation_id=stored.reservation_id)


def _check_order(order: msgspec.Raw) -> None:
    raw = bytes(order)
    if len(raw) > MAX_ORDER_BYTES:
        raise ValidationFailed(
            [{"field": "order", "message": f"at most {MAX_ORDER_BYTES // 1024} KiB"}]
        )
    if not raw.lstrip().startswith(b"{"):
        raise ValidationFailed([{"field": "order", "message": "must be a JSON object"}])


def _not_held(rid: str, status: str) -> Conflict:
    return Conflict(
        "reservation_not_held",
        f"reservation {rid!r} is {status}: only a held reservation can be confirmed",
        reservation_id=rid,
    )


def _confirmed_elsewhere(rid: str) -> Conflict:
    return Conflict(
        "idempotency_conflict",
        f"reservation {rid!r} was confirmed under another order id",
        reservation_id=rid,
    )
