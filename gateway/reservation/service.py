"""Reservations: all-or-nothing holds that never oversell, idempotent per reservation id.

On a single Redis node every step is one script call (``reserve.lua``, ``settle.lua``), and the
reservations of one event-loop tick share one call (each still all or nothing on its own). On a
cluster a reservation's SKUs live on different nodes, so it runs as a saga
(:mod:`gateway.reservation.saga`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any, Final

import msgspec
import structlog

from gateway.atp import keys as atp_keys
from gateway.errors import (
    RETRY_AFTER,
    ConfigNotCopied,
    Conflict,
    GatewayError,
    NotFound,
    OutcomeUnknown,
    Unavailable,
    ValidationFailed,
)
from gateway.ports import Records, ReservationHolder, Scripts
from gateway.reservation.replies import (
    ENCODER,
    Line,
    Outcome,
    held_lines,
    iso,
    outcome,
    public_status,
    text,
    unknown,
)
from gateway.reservation.results import Held, Missing, NotHeld, Retry, Settled, SettleResult
from gateway.reservation.saga import ClusterSaga
from gateway.reservation.schemas import DEFAULT_TTL_SECONDS, Reservation, ReservationRequest
from gateway.reservation.store import Record, ReservationStore, record_keys, reserve_result

log = structlog.get_logger(__name__)

# Reservations made here whose confirm can skip reading them (see made_here), at most: a few
# minutes of reservations at a thousand a second, under a minute at a flash sale's peak; about
# 100 bytes each (the id; SKU sets are shared, see _SKU_SETS), so some 30 MB when full.
_MADE_KEPT: Final = 262_144
# Distinct SKU sets shared among those entries, at most (a flash sale's are few).
_SKU_SETS: Final = 4096
# A settle retried this often is racing something that keeps changing the record.
_SETTLE_ATTEMPTS: Final = 5
# Confirms whose rows committed are unlisted together at most this late: one script and one
# reply for all of them. Per event-loop tick, at moderate load nearly every confirm paid a Redis
# call of its own; the mender waits far longer (take_back_after) before it looks at a listing.
UNLIST_EVERY: Final = 0.02
# ... or as soon as this many wait: one script call stays short for Redis.
_UNLIST_BATCH: Final = 512


class ReservationService:
    def __init__(
        self,
        scripts: Scripts,
        records: Records,
        holder: ReservationHolder,
        *,
        cluster: bool,
        max_ttl_seconds: int,
    ) -> None:
        self._records = records
        self._cluster = cluster
        self._max_ttl = max_ttl_seconds
        self._store = ReservationStore(scripts, records, holder)
        self._saga = ClusterSaga(self._store, records)
        # What confirms need of the reservations made here lately, so that a confirm of one
        # moves its hold without reading it first (insertion order: the oldest go first).
        self._made: dict[str, bytes] = {}
        self._sku_sets: dict[bytes, bytes] = {}
        # Confirms whose rows committed, unlisted together every UNLIST_EVERY seconds.
        self._verified: list[str] = []
        self._unlist_due: asyncio.TimerHandle | None = None
        self._unlisting: set[asyncio.Task[None]] = set()

    @property
    def moves_first(self) -> bool:
        """Whether a confirm moves the hold before its order row is written (one script on a
        single node, undone by :meth:`unconfirm`); on a cluster the move is a saga, so the row
        goes first."""
        return not self._cluster

    def made_here(self, rid: str) -> bytes | None:
        """The SKUs (as recorded) of a reservation this process made, for a confirm to move
        its hold without reading it first (taken: a second confirm reads Redis), or None. A
        stale entry (the id lapsed and was made again with other SKUs) costs a 'retry' of
        settle.lua, never a wrong move."""
        return self._made.pop(rid, None)

    async def close(self) -> None:
        """Cancel reservation calls still in flight (their requests are being cancelled too)."""
        self._unlist()
        while self._unlisting:
            await asyncio.gather(*self._unlisting, return_exceptions=True)
        await self._store.close()

    # --- reserve ------------------------------------------------------------------------------

    async def reserve(self, request: ReservationRequest) -> Outcome:
        ttl = request.ttl_seconds if request.ttl_seconds is not None else DEFAULT_TTL_SECONDS
        groups = self._check(request, ttl)
        fingerprint = self._fingerprint(request, ttl)
        members = await self._group_members(groups) if groups else {}
        default_ss = (
            await self._saga.default_safety_stock(request, members) if self._cluster else {}
        )
        skus, lines = _plan(request, members, default_ss)
        rid = request.reservation_id
        record = record_keys(rid)
        if self._cluster:
            return await self._saga.reserve(rid, fingerprint, ttl, skus, lines, record)
        # Without groups each line checks one location.
        locations = (
            sum(len(ln.members) if ln.members else 1 for ln in lines) if groups else len(lines)
        )
        reply = await self._store.reserve(
            record, rid, fingerprint, ttl * 1000, lines, skus, locations
        )
        result = reserve_result(reply)
        if type(result) is Held:
            made = self._made
            if len(made) >= _MADE_KEPT:
                del made[next(iter(made))]
            encoded = ENCODER.encode(skus)
            shared = self._sku_sets.get(encoded)
            if shared is None:
                if len(self._sku_sets) >= _SKU_SETS:
                    self._sku_sets.clear()
                shared = self._sku_sets[encoded] = encoded
            made[rid] = shared
        return outcome(rid, result, self._store.script_error)

    def _check(self, request: ReservationRequest, ttl: int) -> set[str]:
        """What the schema cannot say; returns the location groups the lines name."""
        errors: list[dict[str, Any]] = []
        groups: set[str] = set()
        if ttl > self._max_ttl:
            errors.append({"field": "ttl_seconds", "message": f"must be at most {self._max_ttl}"})
        seen: set[tuple[str, str | None, str | None]] = set()
        for i, line in enumerate(request.lines):
            if (line.location is None) == (line.location_group is None):
                errors.append(
                    {
                        "field": f"lines[{i}]",
                        "message": "give exactly one of location or location_group",
                    }
                )
                continue
            if line.location_group is not None:
                groups.add(line.location_group)
            key = (line.sku, line.location, line.location_group)
            if key in seen:
                errors.append(
                    {
                        "field": f"lines[{i}]",
                        "message": "this sku appears twice for one location or group",
                    }
                )
            seen.add(key)
        if errors:
            raise ValidationFailed(errors)
        return groups

    @staticmethod
    def _fingerprint(request: ReservationRequest, ttl: int) -> str:
        canonical = ENCODER.encode(
            [
                [(ln.sku, ln.location, ln.location_group, ln.quantity) for ln in request.lines],
                ttl,
                request.channel,
            ]
        )
        return hashlib.blake2b(canonical, digest_size=16).hexdigest()

    async def _group_members(self, groups: set[str]) -> dict[str, list[str]]:
        names = sorted(groups)
        reads = [atp_keys.location_group(g) for g in names]
        replies = await self._records.values(reads)
        if None in replies:
            # Rare: only now is the config marker worth a round trip. The groups are read
            # again beside it, so that a copy landing between the two reads cannot make a
            # group that exists look unknown.
            *replies, marker = await self._records.values([*reads, atp_keys.CONFIG_MARKER])
            if None in replies and atp_keys.config_copy_missing(marker):
                raise ConfigNotCopied()
        members: dict[str, list[str]] = {}
        errors = []
        for group, raw in zip(names, replies, strict=True):
            if raw is None:
                errors.append({"field": "location_group", "message": f"unknown group {group!r}"})
            else:
                members[group] = text(raw).split(",")
        if errors:
            raise ValidationFailed(errors)
        return members

    # --- read, release, confirm, extend --------------------------------------------------------

    async def get(self, rid: str) -> Reservation:
        return _public(rid, await self._store.record(rid))

    async def get_to_confirm(self, rid: str) -> ToConfirm:
        """What a confirm needs of a reservation, in one read: its public status, its held
        lines as stored (JSON), and its SKUs as recorded for :meth:`confirm` (which then need
        not read them again)."""
        found = await self._store.record(rid, with_skus=True)
        if found is None or found.status in ("rejected", "pending"):
            raise NotFound(f"reservation {rid!r} does not exist", reservation_id=rid)
        assert found.expires_ms is not None
        answer = found.answer
        return ToConfirm(
            status=public_status(found.status, text(found.expires_ms)),
            lines=answer if isinstance(answer, bytes) else str(answer or "[]").encode(),
            skus=found.skus if found.skus is not None else b"",
        )

    async def release(self, rid: str) -> Reservation:
        status = await self._settle(rid, "release")
        if status == "confirmed":
            raise Conflict("already_confirmed", f"reservation {rid!r} is confirmed")
        return await self._get_after_write(rid)

    async def _get_after_write(self, rid: str) -> Reservation:
        """The reservation as a write just left it. If Redis fails now, the write stands: the
        answer is not "nothing was applied" but "retry to learn the outcome"."""
        try:
            return await self.get(rid)
        except OutcomeUnknown:
            raise
        except Unavailable as exc:
            raise unknown(rid, exc) from exc

    async def confirm(self, rid: str, skus: bytes | str | None = None) -> str:
        """Move a held reservation into ``committed``; idempotent. Returns the status after.
        ``skus``: what :meth:`get_to_confirm` answered (a stale one only costs a retry)."""
        return await self._settle(rid, "confirm", skus)

    async def confirm_tracked(self, rid: str, skus: bytes | str) -> Settled:
        """A confirm while the order row is written (single node): a move is listed, with its
        stamp, until :meth:`verified` or :meth:`unconfirm`."""
        return await self._settled(rid, "confirm", skus, track=True)

    async def unconfirm(self, rid: str, stamp: str) -> str:
        """Take back a tracked confirm whose row was never written: see ``unconfirm.lua``."""
        return await self._store.unconfirm(rid, stamp, record_keys(rid))

    async def unverified(self, age_seconds: float, limit: int) -> list[tuple[str, str]]:
        """Tracked confirms listed longer than ``age_seconds``: (reservation id, stamp)."""
        return await self._store.unverified(int(age_seconds * 1000), limit)

    async def verified(self, rids: Sequence[str]) -> None:
        await self._store.verified(rids)

    def verified_soon(self, rid: str) -> None:
        """Unlist a tracked confirm whose row committed, with the others of the next
        :data:`UNLIST_EVERY` seconds; one that stays listed (Redis failing now) is the mender's
        to unlist."""
        self._verified.append(rid)
        if len(self._verified) >= _UNLIST_BATCH:
            self._unlist()
        elif self._unlist_due is None:
            self._unlist_due = asyncio.get_running_loop().call_later(UNLIST_EVERY, self._unlist)

    def _unlist(self) -> None:
        if self._unlist_due is not None:
            self._unlist_due.cancel()
            self._unlist_due = None
        rids, self._verified = self._verified, []
        if rids:
            task = asyncio.create_task(self._unlist_now(rids), name="unlist-confirms")
            self._unlisting.add(task)
            task.add_done_callback(self._unlisting.discard)

    async def _unlist_now(self, rids: list[str]) -> None:
        try:
            await self._store.verified(rids)
        except GatewayError as exc:
            log.debug("confirm_unlist_deferred", count=len(rids), error=exc.detail)

    async def expire(self, rid: str) -> str:
        return await self._settle(rid, "expire")

    async def extend(self, rid: str, ttl_seconds: int) -> Reservation:
        if ttl_seconds > self._max_ttl:
            raise ValidationFailed(
                [{"field": "ttl_seconds", "message": f"must be at most {self._max_ttl}"}]
            )
        result = await self._store.extend(rid, ttl_seconds * 1000, record_keys(rid))
        if type(result) is Missing:
            raise NotFound(f"reservation {rid!r} does not exist", reservation_id=rid)
        if type(result) is NotHeld:
            raise Conflict("not_held", f"reservation {rid!r} is {result.status}, not held")
        return await self._get_after_write(rid)

    async def _settle(self, rid: str, action: str, skus: bytes | str | None = None) -> str:
        return (await self._settled(rid, action, skus)).status

    async def _settled(
        self, rid: str, action: str, skus: bytes | str | None, *, track: bool = False
    ) -> Settled:
        record = record_keys(rid)
        result: SettleResult
        if self._cluster:
            result = await self._saga.settle(rid, action, record)
        else:
            result = Retry()
            for _ in range(_SETTLE_ATTEMPTS):
                result = await self._store.settle(rid, action, record, skus, track=track)
                if type(result) is not Retry:
                    break
                skus = None  # read them afresh
            else:
                raise Unavailable(
                    f"reservation {rid!r} kept changing; retry", retry_after=RETRY_AFTER
                )
        if type(result) is Missing:
            raise NotFound(f"reservation {rid!r} does not exist", reservation_id=rid)
        assert type(result) is Settled
        return result


def _plan(
    request: ReservationRequest, members: dict[str, list[str]], default_ss: dict[str, int]
) -> tuple[list[str], list[Line]]:
    """Lay the lines out per SKU: the SKUs in first-seen order, each line with its SKU's index."""
    skus: list[str] = []
    index: dict[str, int] = {}
    lines = []
    for n, line in enumerate(request.lines):
        k = index.get(line.sku)
        if k is None:
            skus.append(line.sku)
            k = index[line.sku] = len(skus)
        location = line.location
        if location is None:
            assert line.location_group is not None
            label, group = line.location_group, 1
            locations = members[label]
            candidates: list[list[str | int]] | None = (
                [[loc, default_ss[loc]] for loc in locations]
                if default_ss
                else [[loc] for loc in locations]
            )
        else:
            label, group = location, 0
            candidates = [[location, default_ss[location]]] if default_ss else None
        lines.append(Line(n, k, line.sku, line.quantity, label, group, candidates))
    return skus, lines


class ToConfirm(msgspec.Struct, frozen=True, kw_only=True):
    status: str
    lines: bytes  # HeldLine JSON, in line order, as the reservation answers them
    skus: bytes | str


def _public(rid: str, found: Record | None) -> Reservation:
    if found is None or found.status in ("rejected", "pending"):
        raise NotFound(f"reservation {rid!r} does not exist", reservation_id=rid)
    assert found.expires_ms is not None
    return Reservation(
        reservation_id=rid,
        status=public_status(found.status, text(found.expires_ms)),  # type: ignore[arg-type]
        expires_at=iso(found.expires_ms),
        lines=held_lines(found.answer),
    )
