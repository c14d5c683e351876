"""Orders in: a confirmed reservation becomes a row in the order buffer, and its hold moves.

Two stores, no transaction across them, so the order of the writes is the protocol. On a single
Redis node the hold moves first, so a confirm is two round trips (the SKUs of a reservation made
by this process are known without reading it):

1. the reservation is confirmed in Redis (held -> committed, one script), and the move listed in
   Redis's unverified index with the time it was made;
2. the order row is committed to PostgreSQL (with its hold moved already: nothing to mark);
3. the order is acknowledged (202), and the move unlisted in the background.

Whatever stops a confirm half-way leaves a listed move, which is finished:

- a row write that applied nothing takes the move back at once (the hold stays for a retry);
- otherwise a retry of the confirm writes the row (and restamps the move), or, after a grace,
  the mender (:mod:`gateway.buffering.mender`) reads the buffer for the listed moves and takes
  back those without a row. A row not sent within :attr:`OrderIntake.answer_within` of the
  confirm's start is not sent at all, and one sent is bounded by PostgreSQL's statement
  timeout, so the grace (:attr:`OrderIntake.take_back_after`) is longer than any row can take
  to land: a move the mender takes back has no row and never will, and was never acknowledged
  (a confirm past ``answer_within`` answers 503 ``outcome_unknown``, never 202). The mender
  takes back only the stamp it read, so a retry that restamped the move meanwhile keeps it.
  (The grace is measured by Redis's clock, which stamps the moves: a jump of that clock, or
  a PostgreSQL server that stops reading its sockets for longer than the grace, is outside
  what this protects.)

On a cluster the move is a saga of several scripts, whose undo would be another saga: there the
row is committed first with its hold pending (a row in ``order_holds_pending``), the hold moves
after it (a hold never moves without its row), then the order is acknowledged and the row
marked ``moved`` in the background. A crash in between leaves a pending row, which a retry of
the same confirm or the mender finishes: the hold moves, or, if it lapsed first, the row goes
(it was never acknowledged).
"""

from __future__ import annotations

import asyncio
from typing import Final, NoReturn

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
from gateway.errors import (
    RETRY_AFTER,
    Conflict,
    GatewayError,
    InsufficientStock,
    NotFound,
    OutcomeUnknown,
    Unavailable,
    ValidationFailed,
)
from gateway.ports import NewOrder, OrderOutbox, StoredOrder
from gateway.reservation.results import Settled
from gateway.reservation.schemas import ReservationRequest
from gateway.reservation.service import ReservationService

log = structlog.get_logger(__name__)

# A hold made for an order without a reservation lives this long if its confirm never comes.
DIRECT_HOLD_SECONDS: Final = 120
# How long a confirm may take and still answer 202 (the mender's grace for moves without a row
# is longer): the app passes the Redis and PostgreSQL timeouts plus this.
ANSWER_SLACK_SECONDS: Final = 1.0


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
        *,
        answer_within: float = 6.0,
        take_back_after: float = 16.0,
    ) -> None:
        self._reservations = reservations
        self._outbox = outbox
        self._pressure = pressure
        self._marks: set[asyncio.Future[None]] = set()
        self.answer_within = answer_within
        # The mender's grace for a move without a row: longer than a row written in time can
        # take to commit (sent within answer_within, then a connection and the statement,
        # each bounded by PostgreSQL's timeouts).
        self.take_back_after = take_back_after

    @property
    def reservations(self) -> ReservationService:
        return self._reservations

    async def close(self) -> None:
        """Wait for the marks in flight (each bounded by PostgreSQL's deadline)."""
        while self._marks:
            await asyncio.gather(*self._marks, return_exceptions=True)

    async def confirm(
        self, rid: str, request: ConfirmRequest, admission: Admission | None = None
    ) -> Intake:
        """``admission``: the order's place in the buffer, when the caller took it already."""
        _check_order(request.order)
        if self._reservations.moves_first:
            return await self._move_then_write(rid, request, admission)
        # The common case first, with no read of the buffer: a held reservation's row is
        # inserted at once, and only an insert that finds its ids taken reads what took them.
        try:
            reservation = await self._reservations.get_to_confirm(rid)
        except NotFound:
            return await self._aged_out(rid, request)
        if reservation.status == "held":
            # Before anything changes: when refused, the hold stays for a retry.
            admission = admission or self._admit()
            stored = None
            try:
                stored = await self._outbox.add(_new_order(rid, request, reservation.lines))
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
            mine = await self._confirmed_by_another(rid, request.order_id)
            if mine is not None:
                return await self._repeat(mine, rid)
        raise _not_held(rid, reservation.status)

    async def _confirmed_by_another(self, rid: str, order_id: str) -> StoredOrder | None:
        """Raise 409 when the reservation's row is another order's; else its row, if any.
        Read after the order's own lookup found nothing: a racing confirm of this same order
        may commit in between, and is then found here as the reservation's row."""
        row = await self._outbox.find_by_reservation(rid)
        if row is not None and row.order_id != order_id:
            raise _confirmed_elsewhere(rid)
        return row

    async def _aged_out(self, rid: str, request: ConfirmRequest) -> Intake:
        """Settled and aged out of Redis: a repeat of its confirm still has its answer."""
        existing = await self._outbox.find(request.order_id)
        if existing is None:
            raise NotFound(f"reservation {rid!r} does not exist", reservation_id=rid)
        return await self._repeat(existing, rid)

    async def _move_then_write(
        self, rid: str, request: ConfirmRequest, admission: Admission | None
    ) -> Intake:
        """Single node: move the hold, then write the row (see the module's doc)."""
        # The SKUs of a reservation made by this process are known: one round trip less.
        skus: bytes | str | None = self._reservations.made_here(rid)
        if skus is None:
            try:
                known = await self._reservations.get_to_confirm(rid)
            except NotFound:
                return await self._aged_out(rid, request)
            if known.status not in ("held", "confirmed"):
                return await self._not_moved(rid, request, known.status)
            skus = known.skus
        loop = asyncio.get_running_loop()
        answer_by = loop.time() + self.answer_within
        # Before anything changes: when refused, the hold stays for a retry.
        admission = admission or self._admit()
        added = False
        try:
            try:
                moved = await self._reservations.confirm_tracked(rid, skus)
            except NotFound:
                return await self._aged_out(rid, request)
            if moved.status != "confirmed":
                return await self._not_moved(rid, request, moved.status)
            if not moved.moved:
                # Confirmed before: by this order (a repeat), by another, or by a confirm that
                # stopped before its row, whose row this one writes (the move was restamped,
                # so the mender keeps it).
                existing = await self._outbox.find(request.order_id)
                if existing is None:
                    existing = await self._confirmed_by_another(rid, request.order_id)
                if existing is not None:
                    return await self._repeat(existing, rid)
            try:
                assert moved.lines is not None  # a tracked confirm's answer carries them
                order = _new_order(rid, request, moved.lines)
                added = await self._outbox.add_moved(order, send_by=answer_by)
            except GatewayError as exc:
                await self._row_failed(rid, moved, exc)
        finally:
            admission.close(added=added)
        if not added:  # its ids are taken: by this order (a repeat) or by another
            await self._stray_move(rid, moved)
            existing = await self._outbox.find(request.order_id)
            if existing is not None:
                return await self._repeat(existing, rid)
            raise _confirmed_elsewhere(rid)
        if loop.time() > answer_by:
            # Too late to be sure the mender left the move alone: the retry tells.
            raise _row_written(rid, None)
        self._reservations.verified_soon(rid)
        return Intake(202, OrderReceipt(order_id=request.order_id, reservation_id=rid))

    async def _not_moved(self, rid: str, request: ConfirmRequest, status: str) -> Intake:
        """The reservation is not held (expired, released): a repeat has its answer."""
        existing = await self._outbox.find(request.order_id)
        if existing is not None:
            return await self._repeat(existing, rid)
        raise _not_held(rid, status)

    async def _row_failed(self, rid: str, moved: Settled, exc: GatewayError) -> NoReturn:
        """The row's write failed. One that applied nothing takes this confirm's move back, so
        the answer stays "nothing applied" and the hold stays for a retry."""
        if isinstance(exc, OutcomeUnknown) or not isinstance(exc, Unavailable):
            raise exc
        if moved.moved and moved.stamp is not None:
            try:
                status = await self._reservations.unconfirm(rid, moved.stamp)
            except GatewayError as undo:
                log.warning("confirm_undo_deferred", reservation_id=rid, error=undo.detail)
                raise _row_written(rid, exc, written=False) from exc
            if status != "held":
                raise _row_written(rid, exc, written=False) from exc
        raise exc

    async def _stray_move(self, rid: str, moved: Settled) -> None:
        """This confirm lost its row to another order: a move it made goes back unless the
        reservation has a row of its own (whose hold it then is)."""
        if moved.stamp is None:
            return
        if await self._outbox.find_by_reservation(rid) is not None:
            self._reservations.verified_soon(rid)
        elif moved.moved:
            try:
                await self._reservations.unconfirm(rid, moved.stamp)
            except GatewayError as exc:
                # Still listed, without a row: the mender takes it back after its grace.
                log.warning("confirm_undo_deferred", reservation_id=rid, error=exc.detail)

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


def _new_order(rid: str, request: ConfirmRequest, lines: bytes) -> NewOrder:
    return NewOrder(
        order_id=request.order_id,
        reservation_id=rid,
        customer_id=customer_of(request.order),
        body=bytes(request.order),
        lines=lines,
    )


def _row_written(rid: str, cause: GatewayError | None, *, written: bool = True) -> OutcomeUnknown:
    what = (
        "its order row is written but the confirm did not finish in time"
        if cause is None
        else f"the confirm stopped half-way ({cause.detail})"
    )
    return OutcomeUnknown(
        f"reservation {rid!r}: {what}; retry the same confirm to learn the outcome"
        if written
        else f"reservation {rid!r}: {what}; retry the same confirm to finish it",
        reservation_id=rid,
        retry_after=RETRY_AFTER,
    )


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
