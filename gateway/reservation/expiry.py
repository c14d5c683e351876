"""The expiry sweeper: releases holds whose time is up, within a second, from any gateway.

Every gateway runs one. Expiry is an atomic, idempotent script per reservation, so two sweepers
that pick the same reservation release it once; the index lives in Redis, so a restart forgets
nothing. Each pass takes a bounded slice of each bucket.
"""

from __future__ import annotations

import asyncio
from typing import Final

import structlog

from gateway.errors import Unavailable
from gateway.metrics import RESERVATIONS, RESERVATIONS_DUE
from gateway.ports import Records
from gateway.reservation import keys
from gateway.reservation.service import ReservationService

log = structlog.get_logger(__name__)
SWEEP_INTERVAL: Final = 0.25
SLICE: Final = 200
_CONCURRENCY: Final = 32
_INDEXES: Final = tuple(keys.expiry_index(n) for n in range(keys.BUCKETS))


async def sweep_once(service: ReservationService, records: Records) -> int:
    """Expire what is due now; returns how many reservations this pass expired."""
    now_ms = await records.now_ms()
    due_lists = await records.due(_INDEXES, now_ms, SLICE)
    due = [rid for rids in due_lists for rid in rids]
    RESERVATIONS_DUE.set(len(due))
    if not due:
        return 0
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def one(rid: str) -> str:
        async with gate:
            return await service.expire(rid)

    results = await asyncio.gather(*(one(rid) for rid in due), return_exceptions=True)
    expired = 0
    for rid, result in zip(due, results, strict=True):
        if isinstance(result, BaseException):
            if isinstance(result, asyncio.CancelledError):
                raise result
            log.warning("expire_failed", reservation_id=rid, error=repr(result))
        elif result == "expired":
            expired += 1
    RESERVATIONS.inc("expired", expired)
    return expired


async def run_sweeper(service: ReservationService, records: Records) -> None:
    down = False
    while True:
        try:
            await sweep_once(service, records)
        except Unavailable as exc:
            # Redis down or stalled: the next pass tries again. Not a crash: the supervisor's
            # backoff (up to 30 s) would hold expiry back long after Redis came back.
            if not down:
                log.warning("sweep_skipped", reason=exc.detail)
            down = True
        else:
            down = False
        await asyncio.sleep(SWEEP_INTERVAL)
