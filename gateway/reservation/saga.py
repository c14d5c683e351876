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

import msgspec

from gateway.atp import keys as atp_keys
from gateway.errors import RETRY_AFTER, Conflict, OutcomeUnknown, Unavailable
from gateway.reservation import keys
from gateway.reservation.ports import RecordReader, ReservationScripts
from gateway.reservation.replies import (
    ENCODER,
    LINES,
    RETENTION_SECONDS,
    Line,
    Outcome,
    line_ordered,
    outcome,
    shortfalls,
    text,
    unknown,
)
from gateway.reservation.schemas import ReservationRequest

# A cluster reservation whose request died is released by the sweeper after this.
CLUSTER_LEASE_MS: Final = 30_000
_PENDING_POLL: Final = 0.02
# How long a retry waits for the request that is still making its reservation, at most; never
# longer than the Redis timeout (see ClusterSaga).
_PENDING_WAIT: Final = 5.0


class ClusterSaga:
    def __init__(self, scripts: ReservationScripts, redis: RecordReader) -> None:
        self._scripts = scripts
        self._redis = redis
        # The retry's own answer is due within the timeout (plus a second) like any other.
        self._pending_wait = min(_PENDING_WAIT, scripts.timeout)

    async def default_safety_stock(
        self, request: ReservationRequest, members: dict[str, list[str]]
    ) -> dict[str, int]:
        """The defaults live in another slot than the SKUs, so they are read here and sent
        along. (On a single node the script reads them itself, atomically with the check.)"""
        direct = {ln.location for ln in request.lines if ln.location}
        locations = sorted(direct.union(*members.values()))
        (defaults,) = await self._redis.call_many(
            [("HMGET", atp_keys.LOCATION_SAFETY_STOCK, *locations)]
        )
        return {
            loc: int(v) if v is not None else 0 for loc, v in zip(locations, defaults, strict=True)
        }

    def _outcome(self, rid: str, reply: list[str]) -> Outcome:
        return outcome(rid, reply, self._scripts.script_error)

    async def reserve(
        self,
        rid: str,
        fingerprint: str,
        ttl: int,
        skus: list[str],
        lines: list[Line],
        record: list[str],
    ) -> Outcome:
        begin_args = [rid, fingerprint, str(CLUSTER_LEASE_MS), ENCODER.encode(skus).decode()]
        (begin,) = await self._scripts.run("cluster_begin.lua", [(record, begin_args)])
        reply = [text(r) for r in begin]
        if reply[0] != "new":
            if reply[0] == "replay" and reply[1] == "pending":
                return await self._await_pending(rid, fingerprint, ttl, skus, lines, record)
            return self._outcome(rid, reply)
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
        per_sku = [
            (
                [atp_keys.position(sku), keys.holds(sku)],
                [
                    rid,
                    ENCODER.encode(
                        [msgspec.structs.replace(ln, k=1) for ln in lines if ln.sku == sku]
                    ).decode(),
                ],
            )
            for sku in skus
        ]
        results = [
            [text(r) for r in res] for res in await self._scripts.run("cluster_hold.lua", per_sku)
        ]
        short = [r for r in results if r[0] == "short"]
        if short:
            held = [call for call, r in zip(per_sku, results, strict=True) if r[0] == "held"]
            await self._scripts.run("cluster_unhold.lua", [(k, [rid, "release"]) for k, _ in held])
            # Stored in line order, as a single node's script stores them.
            answer = ENCODER.encode(line_ordered(e for r in short for e in LINES.decode(r[1])))
            await self._scripts.run(
                "cluster_mark.lua",
                [(record, [rid, "finish", "rejected", answer, "0", str(RETENTION_SECONDS)])],
            )
            return Outcome(shortfalls=shortfalls(answer))
        # Stored in line order and as the API answers them, as a single node's script does.
        held_json = ENCODER.encode(line_ordered(e for r in results for e in LINES.decode(r[1])))
        (done,) = await self._scripts.run(
            "cluster_mark.lua",
            [(record, [rid, "finish", "held", held_json, str(ttl * 1000), str(RETENTION_SECONDS)])],
        )
        done = [text(r) for r in done]
        if done[0] != "held":
            # The lease ran out and the sweeper released the holds: the request took too long.
            raise Conflict("reservation_expired", f"reservation {rid!r} expired while being made")
        return outcome(rid, ["held", held_json, done[1]], self._scripts.script_error)

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
                    reply = await self._redis.call_many(
                        [("HMGET", keys.record(rid), "st", "resp", "exp")]
                    )
                    status, answer, exp = reply[0]
                    if status is None or text(status) != "pending":
                        break
        except TimeoutError:
            # Its request died mid-way, or is slow: the lease decides, within CLUSTER_LEASE_MS.
            raise OutcomeUnknown(
                f"reservation {rid!r} is still being made by an earlier request; retry later",
                reservation_id=rid,
                retry_after=RETRY_AFTER,
            ) from None
        if status is None:  # expired while pending: nothing holds, start afresh
            return await self.reserve(rid, fingerprint, ttl, skus, lines, record)
        return self._outcome(
            rid, ["replay", text(status), text(answer or b"[]"), text(exp or b"0")]
        )

    async def settle(self, rid: str, action: str, record: list[str]) -> str:
        (mark,) = await self._scripts.run(
            "cluster_mark.lua", [(record, [rid, action, "", "", "0", str(RETENTION_SECONDS)])]
        )
        reply = [text(r) for r in mark]
        if reply[0] != "go":
            return reply[0]
        final, skus = reply[1], msgspec.json.decode(reply[2])
        how = "confirm" if final == "confirmed" else "release"
        try:
            await self._scripts.run(
                "cluster_unhold.lua",
                [([atp_keys.position(s), keys.holds(s)], [rid, how]) for s in skus],
            )
            (done,) = await self._scripts.run(
                "cluster_mark.lua", [(record, [rid, "done", "", "", "0", str(RETENTION_SECONDS)])]
            )
        except OutcomeUnknown:
            raise
        except Unavailable as exc:
            # Marked settling: a retry resumes the settlement where this one stopped.
            raise unknown(rid, exc) from exc
        return text(done[0])
