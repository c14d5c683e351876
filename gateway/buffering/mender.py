"""The mender: finishes confirms that stopped between their two writes.

A gateway that crashed, or lost Redis or PostgreSQL, in the middle of a confirm leaves one of
two things (see :mod:`gateway.buffering.intake`). Every gateway runs a mender; each pass
finishes what is older than a grace (so as not to race the request still doing it):

- a row ``pending`` (its hold did not move): the hold moves, or the row goes if the hold lapsed
  before it could;
- on a single node, a moved hold listed as unverified with no row in the buffer: the move is
  taken back (the reservation is held again), unless a retry restamped it meanwhile. Listed
  moves whose rows are there are unlisted.

Idempotent: two menders on one row or move do the same thing twice.
"""

from __future__ import annotations

import asyncio
from typing import Final

import structlog

from gateway.buffering.intake import OrderIntake
from gateway.errors import GatewayError
from gateway.metrics import ORDERS_MENDED
from gateway.ports import OrderOutbox
from gateway.reservation.service import ReservationService

log = structlog.get_logger(__name__)
INTERVAL: Final = 1.0
# Longer than a confirm takes within its timeouts, so the mender does not race the request.
GRACE_SECONDS: Final = 5.0
_SLICE: Final = 200


async def mend_once(intake: OrderIntake, outbox: OrderOutbox, grace: float = GRACE_SECONDS) -> int:
    """One pass; returns how many rows and moves it finished."""
    done = 0
    if intake.reservations.moves_first:
        # Longer than a row written in time can take to commit: a move older than that whose
        # row is not there now was never acknowledged, and its row can no longer land.
        done += await take_back_moves(intake.reservations, outbox, intake.take_back_after)
    for stored in await outbox.holds_pending(grace, _SLICE):
        try:
            moved = await intake.move_hold(stored)
        except GatewayError as exc:
            log.warning("order_mend_deferred", order_id=stored.order_id, error=exc.detail)
            continue
        ORDERS_MENDED.labels("moved" if moved else "discarded").inc()
        done += 1
    return done


async def take_back_moves(
    reservations: ReservationService, outbox: OrderOutbox, grace: float
) -> int:
    """Unlist the moves listed longer than ``grace`` whose rows are there; take back the
    others. Returns how many it took back."""
    listed = await reservations.unverified(grace, _SLICE)
    if not listed:
        return 0
    # Read after the moves were found old enough: a row committed in time is seen here.
    with_rows = await outbox.with_rows([rid for rid, _ in listed])
    if with_rows:
        await reservations.verified(sorted(with_rows))
    taken = 0
    for rid, stamp in listed:
        if rid in with_rows:
            continue
        try:
            status = await reservations.unconfirm(rid, stamp)
        except GatewayError as exc:
            log.warning("confirm_take_back_deferred", reservation_id=rid, error=exc.detail)
            continue
        if status == "held":
            log.warning("confirm_taken_back", reservation_id=rid)
            ORDERS_MENDED.labels("taken_back").inc()
            taken += 1
    return taken


async def run_mender(intake: OrderIntake, outbox: OrderOutbox) -> None:
    """Owned worker: a pass about every second; a dependency down skips a pass, not the task."""
    while True:
        try:
            await mend_once(intake, outbox)
        except GatewayError as exc:
            log.debug("order_mend_skipped", reason=exc.detail)
        await asyncio.sleep(INTERVAL)
