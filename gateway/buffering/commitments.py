"""Commitments after the confirm: counted until the ERP's own count includes them.

A confirmed order's quantities count as committed in Redis (the hold's ``committed`` entry).
They keep counting after the ERP accepts the order, until a stock snapshot of the position that
occurred at or after the acceptance arrives: the ERP's count includes the order from then on.
Nothing drops one on a timer. Every gateway runs a keeper; each pass (about every second):

1. **Restore.** When Redis lost its data (a flush, a failover without the last writes) the
   commitments marker is gone. One gateway claims the restore (a lease in Redis: a gateway that
   dies restoring leaves it to another), puts back every commitment the order buffer says still
   counts (``restore_commitment.lua``, idempotent), then marks the copy whole. The location config
   has its own restore (:mod:`gateway.atp.config_store`).
2. **Settle.** Acceptances the writers recorded in PostgreSQL (``commitment`` open) go to Redis
   (``accept.lua``: the committed entry becomes an accepted commitment scored by the acceptance
   time, or is cleared at once when a snapshot at or after it is in already); commitments waiting
   for a snapshot are probed in turns. PostgreSQL learns which wait and which a snapshot cleared,
   so the figures (how many wait, the oldest one's age) and a later restore are right. Nothing is
   marked while the copy is not whole: a probe then cannot tell "cleared" from "lost".
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Final

import msgspec
import structlog

from gateway.errors import GatewayError
from gateway.metrics import COMMITMENTS_OLDEST_AGE, COMMITMENTS_RESTORED, COMMITMENTS_WAITING
from gateway.ports import CommitmentLedger, CommittedOrder
from gateway.reservation.schemas import HeldLine
from gateway.reservation.store import Commitment, CommitmentStore

log = structlog.get_logger(__name__)
INTERVAL: Final = 1.0
_BATCH: Final = 500
# Long enough for a restore of a big buffer; short enough that a dead restorer is replaced soon.
_RESTORE_LEASE_MS: Final = 60_000
_LINES: Final = msgspec.json.Decoder(list[HeldLine])


def commitments_of(order: CommittedOrder) -> list[Commitment]:
    """An order's commitments per SKU, units summed by location, in line order."""
    per_sku: dict[str, dict[str, int]] = {}
    for line in _LINES.decode(order.lines):
        units = per_sku.setdefault(line.sku, {})
        units[line.location] = units.get(line.location, 0) + line.quantity
    at = order.accepted_at
    accepted_us = None if at is None else int(at.timestamp()) * 1_000_000 + at.microsecond
    return [
        Commitment(order.reservation_id, sku, units, accepted_us) for sku, units in per_sku.items()
    ]


class CommitmentKeeper:
    def __init__(self, ledger: CommitmentLedger, store: CommitmentStore) -> None:
        self._ledger = ledger
        self._store = store
        self._waiting_after = 0  # where the probe of waiting commitments goes on next

    async def run(self) -> None:
        """Owned worker: a pass about every second; a dependency down skips a pass."""
        while True:
            try:
                await self.pass_once()
            except GatewayError as exc:
                log.warning("commitments_pass_skipped", reason=exc.detail)
            await asyncio.sleep(INTERVAL)

    async def pass_once(self) -> None:
        if await self.restore_if_lost():
            return  # settling waits for the next pass: the probes need a whole copy
        await self.settle_once()
        figures = await self._ledger.waiting()
        COMMITMENTS_WAITING.set(figures.depth)
        COMMITMENTS_OLDEST_AGE.set(figures.oldest_age_seconds)

    async def restore_if_lost(self) -> bool:
        """Restore Redis's commitments from the buffer if Redis lost them; True when the copy
        was not whole (restored now, or another gateway is restoring it)."""
        claim = await self._store.marker("claim", _RESTORE_LEASE_MS)
        if claim == "whole":
            return False
        if claim != "claimed":
            return True
        orders = restored = 0
        after = 0
        while True:
            rows = await self._ledger.counting(after, _BATCH)
            if not rows:
                break
            counts = await self._store.restore([c for row in rows for c in commitments_of(row)])
            orders += len(rows)
            restored += sum(counts)
            after = rows[-1].seq
        await self._store.marker("whole")
        COMMITMENTS_RESTORED.inc(restored)
        log.warning("commitments_restored", orders=orders, positions=restored)
        return True

    async def settle_once(self) -> int:
        """Send open acceptances to Redis, then probe one slice of the waiting ones; returns
        how many orders changed state in PostgreSQL."""
        fresh = await self._ledger.accepted("open", 0, _BATCH)
        waiting = await self._ledger.accepted("waiting", self._waiting_after, _BATCH)
        self._waiting_after = waiting[-1].seq if len(waiting) == _BATCH else 0
        rows = [*fresh, *waiting]
        if not rows:
            return 0
        per_order = [commitments_of(row) for row in rows]
        counts = await self._store.accept([c for cs in per_order for c in cs])
        if await self._store.marker("state") != "whole":
            return 0  # lost meanwhile: "nothing waits" may mean "nothing is left"
        still, cleared = _sort(rows, per_order, counts)
        await self._ledger.mark(still, cleared)
        return len(still) + len(cleared)


def _sort(
    rows: Sequence[CommittedOrder], per_order: Sequence[list[Commitment]], counts: list[int]
) -> tuple[list[str], list[str]]:
    still: list[str] = []
    cleared: list[str] = []
    at = 0
    for row, commitments in zip(rows, per_order, strict=True):
        mine = counts[at : at + len(commitments)]
        at += len(commitments)
        if any(n < 0 for n in mine):
            # Redis holds this order's commitment under other locations than its row says:
            # left counting (never under-count) for someone to look at.
            log.error("commitment_mismatch", order_id=row.order_id)
        elif any(mine):
            still.append(row.order_id)
        else:
            cleared.append(row.order_id)
    return still, cleared
