"""Reservations on a Redis Cluster: a saga, since a reservation's SKUs live on different nodes.

Claim the id in the record's slot (``cluster_begin.lua``), hold SKU by SKU, each SKU atomically
(``cluster_hold.lua``), release what was held if any SKU says no (``cluster_unhold.lua``), then
record the outcome (``cluster_mark.lua``). The record carries a lease, so the expiry sweeper
releases whatever a crashed request left behind. Settling marks the record first, so a retry
resumes a settlement where a failed one stopped.
"""

from __future__ import annotations

import asyncio
from typing import Final

from gateway.atp import keys as atp_keys
from gateway.errors import RETRY_AFTER, Conflict, OutcomeUnknown, Unavailable
from gateway.ports import FieldsRead, Records
from gateway.reservation.replies import (
    ENCODER,
    LINES,
    Line,
    Outcome,
    line_ordered,
    outcome,
    shortfalls,
    text,
    unknown,
)
from gateway.reservation.results import (
    Go,
    Held,
    Marked,
    Mismatch,
    Missing,
    Replayed,
    ReserveResult,
    Settled,
    SkuHeld,
    SkuShort,
)
from gateway.reservation.schemas import ReservationRequest
from gateway.reservation.store import ReservationStore

# A cluster reservation whose request died is released by the sweeper after this.
CLUSTER_LEASE_MS: Final = 30_000
_PENDING_POLL: Final = 0.02
# How long a retry waits for the request that is still making its reservation, at most; never
# longer than the Redis timeout (see ClusterSaga).
_PENDING_WAIT: Final = 5.0


class ClusterSaga:
    def __init__(self, store: ReservationStore, records: Records) -> None:
        self._store = store
        self._records = records
        # The retry's own answer is due within the timeout (plus a second) like any other.
        self._pending_wait = min(_PENDING_WAIT, store.timeout)

    async def default_safety_stock(
        self, request: ReservationRequest, members: dict[str, list[str]]
    ) -> dict[str, int]:
        """The defaults live in another slot than the SKUs, so they are read here and sent
        along. (On a single node the script reads them itself, atomically with the check.)"""
        direct = {ln.location for ln in request.lines if ln.location}
        locations = sorted(direct.union(*members.values()))
        (defaults,) = await self._records.fields(
            [FieldsRead(atp_keys.LOCATION_SAFETY_STOCK, locations)]
        )
        return {
            loc: int(v) if v is not None else 0 for loc, v in zip(locations, defaults, strict=True)
        }

    def _outcome(self, rid: str, result: ReserveResult) -> Outcome:
        return outcome(rid, result, self._store.script_error)

    async def reserve(
        self,
        rid: str,
        fingerprint: str,
        ttl: int,
        skus: list[str],
        lines: list[Line],
        record: list[str],
    ) -> Outcome:
        begun = await self._store.begin(rid, fingerprint, CLUSTER_LEASE_MS, skus, record)
        if type(begun) is Replayed and begun.status == "pending":
            return await self._await_pending(rid, fingerprint, ttl, skus, lines, record)
        if type(begun) is Replayed or type(begun) is Mismatch:
            return self._outcome(rid, begun)
        try:
            return await self._hold_and_finish(rid, ttl, skus, lines, record)
        except OutcomeUnknown:
            raise
        except Unavailable as exc:
            # The id is claimed and some SKUs may hold: whatever failed now, the reservation may
            # exist. A retry with the same id answers it (the sweeper settles a claim whose
            # lease ran out).
            raise unknown(rid, exc) from exc

    async def _hold_and_finish(
        self, rid: str, ttl: int, skus: list[str], lines: list[Line], record: list[str]
    ) -> Outcome:
        results = await self._store.hold_skus(rid, skus, lines)
        short = [r for r in results if type(r) is SkuShort]
        if short:
            held = [sku for sku, r in zip(skus, results, strict=True) if type(r) is SkuHeld]
            await self._store.unhold(rid, "release", held)
            # Stored in line order, as a single node's script stores them.
            answer = ENCODER.encode(line_ordered(e for r in short for e in LINES.decode(r.entries)))
            await self._store.finish(rid, "rejected", answer, 0, record)
            return Outcome(shortfalls=shortfalls(answer))
        # Stored in line order and as the API answers them, as a single node's script does.
        held_json = ENCODER.encode(
            line_ordered(e for r in results for e in LINES.decode(r.entries))
        )
        done = await self._store.finish(rid, "held", held_json, ttl * 1000, record)
        if type(done) is not Marked:
            # The lease ran out and the sweeper released the holds: the request took too long.
            raise Conflict("reservation_expired", f"reservation {rid!r} expired while being made")
        return self._outcome(rid, Held(held_json, done.expires_ms))

    async def _await_pending(
        self,
        rid: str,
        fingerprint: str,
        ttl: int,
        skus: list[str],
        lines: list[Line],
        record: list[str],
    ) -> Outcome:
        """Another request with the same id and body is mid-saga: answer what it answers."""
        try:
            async with asyncio.timeout(self._pending_wait):
                while True:
                    await asyncio.sleep(_PENDING_POLL)
                    found = await self._store.record(rid)
                    if found is None or found.status != "pending":
                        break
        except TimeoutError:
            # Its request died mid-way, or is slow: the lease decides, within CLUSTER_LEASE_MS.
            raise OutcomeUnknown(
                f"reservation {rid!r} is still being made by an earlier request; retry later",
                reservation_id=rid,
                retry_after=RETRY_AFTER,
            ) from None
        if found is None:  # expired while pending: nothing holds, start afresh
            return await self.reserve(rid, fingerprint, ttl, skus, lines, record)
        return self._outcome(
            rid,
            Replayed(found.status, text(found.answer or b"[]"), text(found.expires_ms or b"0")),
        )

    async def settle(self, rid: str, action: str, record: list[str]) -> Settled | Missing:
        mark = await self._store.mark(rid, action, record)
        if not isinstance(mark, Go):
            return mark
        how = "confirm" if mark.final == "confirmed" else "release"
        try:
            await self._store.unhold(rid, how, mark.skus)
            done = await self._store.done(rid, record)
        except OutcomeUnknown:
            raise
        except Unavailable as exc:
            # Marked settling: a retry resumes the settlement where this one stopped.
            raise unknown(rid, exc) from exc
        return done
