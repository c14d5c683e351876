"""The mender: finishes orders whose row is committed but whose hold did not move.

A gateway that crashed, or lost Redis or PostgreSQL, between committing an order row and moving
its hold leaves the row ``pending`` (see :mod:`gateway.buffering.intake`). Every gateway runs a
mender; each pass finishes rows older than a grace (so as not to race the request still doing
it): the hold moves, or the row goes if the hold lapsed before it could. Idempotent: two
menders on one row do the same thing twice.
"""

from __future__ import annotations

import asyncio
from typing import Final

import structlog

from gateway.buffering.intake import OrderIntake
from gateway.errors import GatewayError
from gateway.metrics import ORDERS_MENDED
from gateway.ports import OrderOutbox

log = structlog.get_logger(__name__)
INTERVAL: Final = 1.0
# Longer than a confirm takes within its timeouts, so the mender does not race the request.
GRACE_SECONDS: Final = 5.0
_SLICE: Final = 200


async def mend_once(intake: OrderIntake, outbox: OrderOutbox, grace: float = GRACE_SECONDS) -> int:
    """One pass; returns how many rows it finished."""
    done = 0
    for stored in await outbox.holds_pending(grace, _SLICE):
        try:
            moved = await intake.move_hold(stored)
        except GatewayError as exc:
            log.warning("order_mend_deferred", order_id=stored.order_id, error=exc.detail)
            continue
        ORDERS_MENDED.labels("moved" if moved else "discarded").inc()
        done += 1
    return done


async def run_mender(intake: OrderIntake, outbox: OrderOutbox) -> None:
    """Owned worker: a pass about every second; a dependency down skips a pass, not the task."""
    while True:
        try:
            await mend_once(intake, outbox)
        except GatewayError as exc:
            log.debug("order_mend_skipped", reason=exc.detail)
        await asyncio.sleep(INTERVAL)
