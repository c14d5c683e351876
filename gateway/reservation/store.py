"""The reservation scripts, one method each: typed arguments in, a tagged result out.

This is the only module that calls the reservation scripts or reads their replies; the service
(:mod:`gateway.reservation.service`) and the cluster saga (:mod:`gateway.reservation.saga`)
match on the results below and never see a reply's layout. The replies' shapes are those the
scripts document at their top.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Sequence
from typing import Any, Final

import msgspec

from gateway.atp import keys as atp_keys
from gateway.errors import GatewayError
from gateway.ports import FieldsRead, Records, ReservationHolder, Scripts
from gateway.reservation import keys
from gateway.reservation.replies import ENCODER, RETENTION_SECONDS, Line, text
from gateway.reservation.results import (
    BeginResult,
    Begun,
    Extended,
    ExtendResult,
    Failed,
    FinishResult,
    Go,
    Held,
    Marked,
    MarkResult,
    Mismatch,
    Missing,
    NotHeld,
    Replayed,
    ReserveResult,
    Retry,
    Settled,
    SettleResult,
    Short,
    SkuHeld,
    SkuResult,
    SkuShort,
)

_RETENTION: Final = str(RETENTION_SECONDS)
_RECORD_FIELDS: Final = (keys.STATUS, keys.ANSWER, keys.EXPIRES)
_RECORD_AND_SKUS: Final = (*_RECORD_FIELDS, keys.SKUS)
_SKUS_FIELD: Final = (keys.SKUS,)
# Reservations unlisted per script call, at most (a call's keys are sent and checked whole).
_UNLIST_SLICE: Final = 500
# An unconfirm that keeps meeting other SKUs than it read is racing a reserve of the same id.
_UNCONFIRM_ATTEMPTS: Final = 3


class Record(msgspec.Struct):
    """A reservation record as stored: its status, stored answer (JSON) and expiry; its SKUs
    (JSON) when asked for."""

    status: str
    answer: bytes | str | None
    expires_ms: bytes | str | None
    skus: bytes | str | None = None


def reserve_result(reply: Sequence[Any]) -> ReserveResult:
    """What a ``reserve.lua`` reply for one reservation (what :meth:`ReservationStore.reserve`
    answers) says."""
    kind = text(reply[0])
    if kind == "held":
        return Held(reply[1], reply[2])
    if kind == "short":
        return Short(reply[1])
    if kind == "error":
        return Failed(text(reply[1]))
    if kind == "conflict":
        return Mismatch()
    return Replayed(text(reply[1]), reply[2], text(reply[3]))


class ReservationStore:
    def __init__(self, scripts: Scripts, records: Records, holder: ReservationHolder) -> None:
        self._scripts = scripts
        self._records = records
        self._holder = holder

    @property
    def timeout(self) -> float:
        return self._scripts.timeout

    def script_error(self, message: str) -> GatewayError:
        """What a :class:`Failed` reservation's message means (see the port)."""
        return self._scripts.script_error(message)

    async def close(self) -> None:
        await self._holder.close()

    def reserve(
        self,
        record: list[str],
        rid: str,
        fingerprint: str,
        ttl_ms: int,
        lines: list[Line],
        skus: list[str],
        locations: int,
    ) -> Awaitable[Any]:
        """Hold one reservation on a single node (``reserve.lua``); ``locations``: how many its
        lines check. Read the reply with :func:`reserve_result`. Not a coroutine: the hot path
        awaits the holder's answer directly, one frame less to resume."""
        call_keys = [*record, atp_keys.LOCATION_SAFETY_STOCK]
        for sku in skus:
            call_keys += sku_keys(sku)
        values = [
            rid,
            fingerprint,
            str(ttl_ms),
            ENCODER.encode(lines),
            ENCODER.encode(skus),
            _RETENTION,
        ]
        return self._holder.hold(call_keys, values, locations)

    async def record(self, rid: str, *, with_skus: bool = False) -> Record | None:
        fields = _RECORD_AND_SKUS if with_skus else _RECORD_FIELDS
        (values,) = await self._records.fields([FieldsRead(keys.record(rid), fields)])
        if values[0] is None:
            return None
        return Record(text(values[0]), *values[1:])

    async def settle(
        self,
        rid: str,
        action: str,
        record: list[str],
        raw_skus: bytes | str | None = None,
        *,
        track: bool = False,
    ) -> SettleResult:
        """``raw_skus``: the record's SKUs as the caller read them (else read here). ``track``:
        a confirm whose order row is being written meanwhile (see ``settle.lua``)."""
        # The script needs the SKUs' keys up front, so they are read first; if the reservation
        # is made between this read and the script (a release racing its own reserve), the
        # script sees other SKUs than were sent and answers 'retry' rather than lose holds.
        if raw_skus is None:
            ((raw_skus,),) = await self._records.fields([FieldsRead(record[0], _SKUS_FIELD)])
        call_keys = self._with_skus(record, raw_skus)
        args = [rid, action, _RETENTION, raw_skus or b"", "1" if track else ""]
        if track:
            # A confirm, the storefront waiting on it and its order row written after it.
            reply = await self._scripts.run_at_once("settle.lua", call_keys, args)
        else:
            (reply,) = await self._scripts.run("settle.lua", [(call_keys, args)])
        status = text(reply[0])
        if status == "missing":
            return Missing()
        if status == "retry":
            return Retry()
        if len(reply) > 1:
            lines = reply[3]
            return Settled(
                status,
                text(reply[1]),
                int(reply[2]) == 1,
                lines if isinstance(lines, bytes) else str(lines).encode(),
            )
        return Settled(status)

    async def unconfirm(self, rid: str, stamp: str, record: list[str]) -> str:
        """Take back the confirm stamped ``stamp`` (``unconfirm.lua``): ``held`` when it did,
        ``kept`` when a later confirm restamped it, else the record's status."""
        for _ in range(_UNCONFIRM_ATTEMPTS):
            ((raw_skus,),) = await self._records.fields([FieldsRead(record[0], _SKUS_FIELD)])
            args = [rid, stamp, raw_skus or b""]
            (reply,) = await self._scripts.run(
                "unconfirm.lua", [(self._with_skus(record, raw_skus), args)]
            )
            status = text(reply[0])
            if status != "retry":
                return status
        return "kept"  # the record keeps changing: the mender's next pass tries again

    async def unverified(self, age_ms: int, limit: int) -> list[tuple[str, str]]:
        """Confirms listed longer than ``age_ms`` (oldest first): (reservation id, stamp)."""
        (reply,) = await self._scripts.run(
            "unverified.lua", [([keys.UNVERIFIED], [str(age_ms), str(limit)])]
        )
        pairs = [text(v) for v in reply]
        return list(zip(pairs[::2], pairs[1::2], strict=True))

    async def verified(self, rids: Sequence[str]) -> None:
        """Unlist confirms whose order rows are committed."""
        calls = []
        for i in range(0, len(rids), _UNLIST_SLICE):
            some = rids[i : i + _UNLIST_SLICE]
            calls.append(([keys.UNVERIFIED, *map(keys.record, some)], [_RETENTION, *some]))
        await self._scripts.run("verified.lua", calls)

    @staticmethod
    def _with_skus(record: list[str], raw_skus: bytes | str | None) -> list[str]:
        """The keys of a single-node settle: the record's, the unverified index, then each
        SKU's (position, holds)."""
        skus: list[str] = msgspec.json.decode(raw_skus) if raw_skus else []
        call_keys = [*record, keys.UNVERIFIED]
        for sku in skus:
            call_keys += sku_keys(sku)
        return call_keys

    async def extend(self, rid: str, ttl_ms: int, record: list[str]) -> ExtendResult:
        (reply,) = await self._scripts.run("extend.lua", [(record, [rid, str(ttl_ms)])])
        status = text(reply[0])
        if status == "missing":
            return Missing()
        if status == "held":
            return Extended(text(reply[1]))
        return NotHeld(status)

    # --- the cluster saga's steps ---------------------------------------------------------------

    async def begin(
        self, rid: str, fingerprint: str, lease_ms: int, skus: list[str], record: list[str]
    ) -> BeginResult:
        args = [rid, fingerprint, str(lease_ms), ENCODER.encode(skus).decode()]
        (reply,) = await self._scripts.run("cluster_begin.lua", [(record, args)])
        kind = text(reply[0])
        if kind == "new":
            return Begun()
        if kind == "conflict":
            return Mismatch()
        return Replayed(text(reply[1]), text(reply[2]), text(reply[3]))

    async def hold_skus(self, rid: str, skus: list[str], lines: list[Line]) -> list[SkuResult]:
        """Hold each SKU's lines atomically on its own (``cluster_hold.lua``), in ``skus``
        order."""
        per_sku = [
            (
                list(sku_keys(sku)),
                [
                    rid,
                    ENCODER.encode(
                        [msgspec.structs.replace(ln, k=1) for ln in lines if ln.sku == sku]
                    ).decode(),
                ],
            )
            for sku in skus
        ]
        replies = await self._scripts.run("cluster_hold.lua", per_sku)
        return [
            SkuHeld(text(r[1])) if text(r[0]) == "held" else SkuShort(text(r[1])) for r in replies
        ]

    async def unhold(self, rid: str, how: str, skus: Sequence[str]) -> None:
        """Release (``release``) or confirm (``confirm``) the SKUs' holds of a reservation."""
        await self._scripts.run(
            "cluster_unhold.lua", [(list(sku_keys(sku)), [rid, how]) for sku in skus]
        )

    async def finish(
        self, rid: str, status: str, answer: bytes, ttl_ms: int, record: list[str]
    ) -> FinishResult:
        """Record a cluster reservation's outcome (``held`` or ``rejected``)."""
        kind, reply = await self._mark(record, [rid, "finish", status, answer, str(ttl_ms)])
        if kind == "missing":
            return Missing()
        if kind == "held":
            return Marked(text(reply[1]))
        return Settled(kind)

    async def mark(self, rid: str, action: str, record: list[str]) -> MarkResult:
        """Mark a cluster settlement (``release``, ``confirm``, ``expire``) before its SKUs are
        settled."""
        kind, reply = await self._mark(record, [rid, action, "", "", "0"])
        if kind == "missing":
            return Missing()
        if kind == "go":
            return Go(text(reply[1]), msgspec.json.decode(reply[2]))
        return Settled(kind)

    async def done(self, rid: str, record: list[str]) -> Settled | Missing:
        """Mark a cluster settlement done once its SKUs are settled."""
        kind, _ = await self._mark(record, [rid, "done", "", "", "0"])
        return Missing() if kind == "missing" else Settled(kind)

    async def _mark(self, record: list[str], args: list[Any]) -> tuple[str, Sequence[Any]]:
        (reply,) = await self._scripts.run("cluster_mark.lua", [(record, [*args, _RETENTION])])
        return text(reply[0]), reply


@functools.lru_cache(maxsize=65_536)
def sku_keys(sku: str) -> tuple[str, str]:
    """A SKU's (position, holds) keys: a hot SKU's are built once, not on every reservation."""
    return atp_keys.position(sku), keys.holds(sku)


def record_keys(rid: str) -> list[str]:
    """A reservation's record and the expiry index of its bucket."""
    bucket = keys.bucket(rid)
    return [keys.record(rid, bucket), keys.expiry_index(bucket)]


class Commitment(msgspec.Struct, frozen=True):
    """What a confirmed order commits of one SKU: units by location (each location once), and
    when the ERP accepted the order (µs since the epoch; None while it has not)."""

    reservation_id: str
    sku: str
    units: dict[str, int]
    accepted_us: int | None = None


def _commitment_keys(c: Commitment) -> list[str]:
    return [
        *sku_keys(c.sku),
        *(atp_keys.accepted_commitments(c.sku, loc) for loc in c.units),
    ]


class CommitmentStore:
    """The scripts behind a committed quantity's life after the confirm (``accept.lua``,
    ``restore_commitment.lua``): many orders' SKUs in one round trip."""

    def __init__(self, scripts: Scripts) -> None:
        self._scripts = scripts

    async def accept(self, accepted: Sequence[Commitment]) -> list[int]:
        """Record the ERP's acceptance; per commitment, how many of its locations still wait
        for a snapshot (0: cleared; -1: the committed entry names other locations)."""
        if not accepted:
            return []
        calls = [
            (_commitment_keys(c), [c.reservation_id, str(c.accepted_us), *c.units])
            for c in accepted
        ]
        return [int(n) for n in await self._scripts.run("accept.lua", calls)]

    async def marker(self, action: str, lease_ms: int = 0) -> str:
        """``state`` (whole | restoring | lost), ``claim`` a restore (claimed | whole |
        restoring), or mark the copy ``whole``: see ``commitments_marker.lua``."""
        (reply,) = await self._scripts.run(
            "commitments_marker.lua", [([keys.COMMITMENTS_MARKER], [action, str(lease_ms)])]
        )
        return text(reply)

    async def restore(self, commitments: Sequence[Commitment]) -> list[int]:
        """Put back what Redis lost; per commitment, how many locations count again."""
        if not commitments:
            return []
        calls = []
        for c in commitments:
            at = "" if c.accepted_us is None else str(c.accepted_us)
            pairs = [v for loc, units in c.units.items() for v in (loc, str(units))]
            calls.append((_commitment_keys(c), [c.reservation_id, at, *pairs]))
        return [int(n) for n in await self._scripts.run("restore_commitment.lua", calls)]
