"""Reservations: all-or-nothing holds that never oversell, idempotent per reservation id.

On a single Redis node every step is one script call (``reserve.lua``, ``settle.lua``), and the
reservations of one event-loop tick share one call (each still all or nothing on its own). On a
cluster a reservation's SKUs live on different nodes, so it runs as a saga: claim the id in the
record's slot, hold SKU by SKU (each SKU atomically), release what was held if any SKU says no,
then record the outcome. The record carries a lease, so the expiry sweeper releases whatever a
crashed request left behind.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import msgspec

from gateway.atp import keys as atp_keys
from gateway.atp.ports import CommandSender, ImmediateScriptRunner
from gateway.errors import (
    ConfigNotCopied,
    Conflict,
    GatewayError,
    NotFound,
    OutcomeUnknown,
    Unavailable,
    ValidationFailed,
)
from gateway.reservation import keys
from gateway.reservation.coalesce import ReserveCoalescer
from gateway.reservation.schemas import (
    DEFAULT_TTL_SECONDS,
    HELD_LINES,
    HeldLine,
    Reservation,
    ReservationRequest,
)

# Refused and settled records stay this long so retries and GETs still find them.
RETENTION_SECONDS: Final = 24 * 3600
# A cluster reservation whose request died is released by the sweeper after this.
CLUSTER_LEASE_MS: Final = 30_000
_RETENTION: Final = str(RETENTION_SECONDS)
# A settle retried this often is racing something that keeps changing the record.
_SETTLE_ATTEMPTS: Final = 5
_PENDING_POLL: Final = 0.02
_PENDING_WAIT: Final = 5.0
_json = msgspec.json.Encoder()
_lines_decoder: Final = msgspec.json.Decoder(list[dict[str, Any]])


class Outcome(NamedTuple):
    """What a reservation call answers: a reservation, or a refusal with its shortfalls."""

    reservation: Reservation | None = None
    shortfalls: list[dict[str, Any]] | None = None
    replayed: bool = False  # the answer of an earlier request with this id and body


_iso_second: list[Any] = [None, ""]


def _iso(ms: str | bytes | int) -> str:
    """RFC 3339 in UTC with milliseconds. Expiries of one busy second share their prefix, so it
    is formatted once a second rather than once a reservation."""
    second, millis = divmod(int(ms), 1000)
    if _iso_second[0] != second:
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _iso_second[:] = [second, prefix]
    return f"{_iso_second[1]}.{millis:03d}+00:00"


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class _Line(msgspec.Struct, array_like=True):
    """One request line as the scripts take it (see ``lib.lua``), encoded as a JSON array."""

    n: int  # its position in the request
    k: int  # which (position, holds) key pair of the call: the SKU's
    sku: str
    quantity: int
    label: str  # the location or group asked for
    group: int  # 1 when ``label`` is a group
    # Each [location] or, on a cluster, [location, default ss]; null (the label is the one
    # location) for a location line on a single node, the common case.
    members: list[list[str | int]] | None = None


def _held_lines(answer: Any) -> list[HeldLine]:
    # Stored in line order, as the API answers them. Records of versions before 2026-12 carry
    # each line's number ``n``, and a cluster saga of theirs stored its lines SKU by SKU.
    raw = answer if isinstance(answer, bytes) else str(answer).encode()
    if b'"n":' not in raw:  # codes cannot hold a quote: this is only ever the key
        return HELD_LINES.decode(raw)
    return [HeldLine(**e) for e in _line_ordered(_lines_decoder.decode(raw))]


def _shortfalls(answer: Any) -> list[dict[str, Any]]:
    # In line order, as the API answers them; numbered (a cluster saga's per-SKU answers, or
    # records of versions before 2026-12) when they still need merging into line order.
    raw = answer if isinstance(answer, bytes) else str(answer).encode()
    entries = _lines_decoder.decode(raw)
    return entries if b'"n":' not in raw else _line_ordered(entries)


def _line_ordered(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Numbered entries (``n``, the line) in line order, without their numbers."""
    return [{k: v for k, v in e.items() if k != "n"} for e in sorted(entries, key=lambda e: e["n"])]


class ReservationService:
    def __init__(
        self,
        scripts: ImmediateScriptRunner,
        redis: CommandSender,
        *,
        cluster: bool,
        max_ttl_seconds: int,
    ) -> None:
        self._scripts = scripts
        self._redis = redis
        self._cluster = cluster
        self._max_ttl = max_ttl_seconds
        self._coalescer = ReserveCoalescer(scripts)

    async def close(self) -> None:
        """Cancel reservation calls still in flight (their requests are being cancelled too)."""
        await self._coalescer.close()

    # --- reserve ------------------------------------------------------------------------------

    async def reserve(self, request: ReservationRequest) -> Outcome:
        ttl = request.ttl_seconds if request.ttl_seconds is not None else DEFAULT_TTL_SECONDS
        groups = self._check(request, ttl)
        fingerprint = self._fingerprint(request, ttl)
        members = await self._group_members(groups) if groups else {}
        default_ss = await self._default_safety_stock(request, members) if self._cluster else {}
        skus, lines = _plan(request, members, default_ss)
        rid = request.reservation_id
        if self._cluster:
            return await self._reserve_saga(rid, fingerprint, ttl, skus, lines)
        call_keys = [*_record_keys(rid), atp_keys.LOCATION_SAFETY_STOCK]
        for sku in skus:
            call_keys += _sku_keys(sku)
        values = [
            rid,
            fingerprint,
            str(ttl * 1000),
            _json.encode(lines),
            _json.encode(skus),
            _RETENTION,
        ]
        # Without groups each line checks one location.
        locations = (
            sum(len(ln.members) if ln.members else 1 for ln in lines) if groups else len(lines)
        )
        reply = await self._coalescer.submit(call_keys, values, locations)
        return self._outcome(rid, reply)

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
        canonical = _json.encode(
            [
                [(ln.sku, ln.location, ln.location_group, ln.quantity) for ln in request.lines],
                ttl,
                request.channel,
            ]
        )
        return hashlib.blake2b(canonical, digest_size=16).hexdigest()

    async def _group_members(self, groups: set[str]) -> dict[str, list[str]]:
        names = sorted(groups)
        *replies, marker = await self._redis.call_many(
            [*(("GET", atp_keys.location_group(g)) for g in names), ("GET", atp_keys.CONFIG_MARKER)]
        )
        members: dict[str, list[str]] = {}
        errors = []
        for group, raw in zip(names, replies, strict=True):
            if raw is None:
                if atp_keys.config_copy_missing(marker):
                    raise ConfigNotCopied()
                errors.append({"field": "location_group", "message": f"unknown group {group!r}"})
            else:
                members[group] = _text(raw).split(",")
        if errors:
            raise ValidationFailed(errors)
        return members

    async def _default_safety_stock(
        self, request: ReservationRequest, members: dict[str, list[str]]
    ) -> dict[str, int]:
        """Cluster only: the defaults live in another slot than the SKUs, so they are read here
        and sent along. (On a single node the script reads them itself, atomically with the
        check.)"""
        direct = {ln.location for ln in request.lines if ln.location}
        locations = sorted(direct.union(*members.values()))
        (defaults,) = await self._redis.call_many(
            [("HMGET", atp_keys.LOCATION_SAFETY_STOCK, *locations)]
        )
        return {
            loc: int(v) if v is not None else 0 for loc, v in zip(locations, defaults, strict=True)
        }

    def _outcome(self, rid: str, reply: Sequence[str | bytes]) -> Outcome:
        kind = _text(reply[0])
        if kind == "held":
            return Outcome(
                Reservation(
                    reservation_id=rid,
                    status="held",
                    expires_at=_iso(reply[2]),
                    # The script's answer is already the API's JSON for these lines.
                    lines=msgspec.Raw(reply[1]),
                ),
            )
        if kind == "short":
            return Outcome(shortfalls=_shortfalls(reply[1]))
        if kind == "error":
            # This reservation's script step raised; the others of its call went on. Redis
            # refusing a write (out of memory, a replica, a failover) is a 503 the adapter
            # names; damaged data or a defect, not the client's doing, a 500, logged.
            message = _text(reply[1])
            error = self._scripts.script_error(message)
            if isinstance(error, Unavailable):
                raise error
            raise GatewayError(f"reservation {rid!r} failed in Redis: {message}")
        if kind == "conflict":
            raise Conflict(
                "idempotency_conflict",
                f"reservation {rid!r} was already made with a different body",
            )
        # A replay: answer what the first call answered, with the status as it is now.
        status, answer, exp = _text(reply[1]), reply[2], _text(reply[3])
        if status == "rejected":
            return Outcome(shortfalls=_shortfalls(answer), replayed=True)
        return Outcome(
            Reservation(
                reservation_id=rid,
                status=_public_status(status, exp),  # type: ignore[arg-type]
                expires_at=_iso(exp),
                lines=_held_lines(answer),
            ),
            replayed=True,
        )

    async def _reserve_saga(
        self, rid: str, fingerprint: str, ttl: int, skus: list[str], lines: list[_Line]
    ) -> Outcome:
        record = _record_keys(rid)
        begin_args = [rid, fingerprint, str(CLUSTER_LEASE_MS), _json.encode(skus).decode()]
        (begin,) = await self._scripts.run("cluster_begin.lua", [(record, begin_args)])
        reply = [_text(r) for r in begin]
        if reply[0] != "new":
            if reply[0] == "replay" and reply[1] == "pending":
                return await self._await_pending(rid, fingerprint, ttl, skus, lines)
            return self._outcome(rid, reply)
        try:
            return await self._hold_and_finish(rid, ttl, skus, lines, record)
        except OutcomeUnknown:
            raise
        except Unavailable as exc:
            # The id is claimed and some SKUs may hold: whatever failed now, the reservation may
            # exist. A retry with the same id answers it (the sweeper settles a claim whose
            # lease ran out).
            raise _unknown(rid, exc) from exc

    async def _hold_and_finish(
        self, rid: str, ttl: int, skus: list[str], lines: list[_Line], record: list[str]
    ) -> Outcome:
        per_sku = [
            (
                [atp_keys.position(sku), keys.holds(sku)],
                [
                    rid,
                    _json.encode(
                        [msgspec.structs.replace(ln, k=1) for ln in lines if ln.sku == sku]
                    ).decode(),
                ],
            )
            for sku in skus
        ]
        results = [
            [_text(r) for r in res] for res in await self._scripts.run("cluster_hold.lua", per_sku)
        ]
        short = [r for r in results if r[0] == "short"]
        if short:
            held = [call for call, r in zip(per_sku, results, strict=True) if r[0] == "held"]
            await self._scripts.run("cluster_unhold.lua", [(k, [rid, "release"]) for k, _ in held])
            # Stored in line order, as a single node's script stores them.
            answer = _json.encode(
                _line_ordered(e for r in short for e in _lines_decoder.decode(r[1]))
            )
            await self._scripts.run(
                "cluster_mark.lua",
                [(record, [rid, "finish", "rejected", answer, "0", str(RETENTION_SECONDS)])],
            )
            return Outcome(shortfalls=_shortfalls(answer))
        # Stored in line order and as the API answers them, as a single node's script does.
        held_json = _json.encode(
            _line_ordered(e for r in results for e in _lines_decoder.decode(r[1]))
        )
        (done,) = await self._scripts.run(
            "cluster_mark.lua",
            [(record, [rid, "finish", "held", held_json, str(ttl * 1000), str(RETENTION_SECONDS)])],
        )
        done = [_text(r) for r in done]
        if done[0] != "held":
            # The lease ran out and the sweeper released the holds: the request took too long.
            raise Conflict("reservation_expired", f"reservation {rid!r} expired while being made")
        return self._outcome(rid, ["held", held_json, done[1]])

    async def _await_pending(
        self, rid: str, fingerprint: str, ttl: int, skus: list[str], lines: list[_Line]
    ) -> Outcome:
        """Another request with the same id and body is mid-saga: answer what it answers."""
        try:
            async with asyncio.timeout(_PENDING_WAIT):
                while True:
                    await asyncio.sleep(_PENDING_POLL)
                    reply = await self._redis.call_many(
                        [("HMGET", keys.record(rid), "st", "resp", "exp")]
                    )
                    status, answer, exp = reply[0]
                    if status is None or _text(status) != "pending":
                        break
        except TimeoutError:
            # Its request died mid-way, or is slow: the lease decides, within CLUSTER_LEASE_MS.
            raise OutcomeUnknown(
                f"reservation {rid!r} is still being made by an earlier request; retry later",
                reservation_id=rid,
                retry_after=1,
            ) from None
        if status is None:  # expired while pending: nothing holds, start afresh
            return await self._reserve_saga(rid, fingerprint, ttl, skus, lines)
        return self._outcome(
            rid, ["replay", _text(status), _text(answer or b"[]"), _text(exp or b"0")]
        )

    # --- read, release, confirm, extend --------------------------------------------------------

    async def get(self, rid: str) -> Reservation:
        ((status, answer, exp),) = await self._redis.call_many(
            [("HMGET", keys.record(rid), "st", "resp", "exp")]
        )
        if status is None or _text(status) in ("rejected", "pending"):
            raise NotFound(f"reservation {rid!r} does not exist", reservation_id=rid)
        return Reservation(
            reservation_id=rid,
            status=_public_status(_text(status), _text(exp)),  # type: ignore[arg-type]
            expires_at=_iso(exp),
            lines=_held_lines(answer),
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
            raise _unknown(rid, exc) from exc

    async def confirm(self, rid: str) -> str:
        """Move a held reservation into ``committed``; idempotent. Returns the status after."""
        return await self._settle(rid, "confirm")

    async def adopt_legacy_indexes(self, buckets: Sequence[int]) -> int:
        """Move these buckets' expiry entries from their pre-2026-12 key to today's."""
        calls: list[tuple[list[str], list[str]]] = [
            ([keys.legacy_expiry_index(n), keys.expiry_index(n)], []) for n in buckets
        ]
        return sum(int(moved) for moved in await self._scripts.run("adopt_index.lua", calls))

    async def expire(self, rid: str) -> str:
        return await self._settle(rid, "expire")

    async def extend(self, rid: str, ttl_seconds: int) -> Reservation:
        if ttl_seconds > self._max_ttl:
            raise ValidationFailed(
                [{"field": "ttl_seconds", "message": f"must be at most {self._max_ttl}"}]
            )
        record = _record_keys(rid)
        (reply,) = await self._scripts.run("extend.lua", [(record, [rid, str(ttl_seconds * 1000)])])
        status = _text(reply[0])
        if status == "missing":
            raise NotFound(f"reservation {rid!r} does not exist", reservation_id=rid)
        if status != "held":
            raise Conflict("not_held", f"reservation {rid!r} is {status}, not held")
        return await self._get_after_write(rid)

    async def _settle(self, rid: str, action: str) -> str:
        record = _record_keys(rid)
        if self._cluster:
            status = await self._settle_saga(rid, action, record)
        else:
            status = "retry"
            for _ in range(_SETTLE_ATTEMPTS):
                status = await self._settle_once(rid, action, record)
                if status != "retry":
                    break
            else:
                raise Unavailable(f"reservation {rid!r} kept changing; retry", retry_after=1)
        if status == "missing":
            raise NotFound(f"reservation {rid!r} does not exist", reservation_id=rid)
        return status

    async def _settle_once(self, rid: str, action: str, record: list[str]) -> str:
        # The script needs the SKUs' keys up front, so they are read first; if the reservation
        # is made between this read and the script (a release racing its own reserve), the
        # script sees other SKUs than were sent and answers 'retry' rather than lose holds.
        ((raw_skus,),) = await self._redis.call_many([("HMGET", record[0], "skus")])
        skus: list[str] = msgspec.json.decode(raw_skus) if raw_skus else []
        call_keys = list(record)
        for sku in skus:
            call_keys += _sku_keys(sku)
        (reply,) = await self._scripts.run(
            "settle.lua", [(call_keys, [rid, action, _RETENTION, raw_skus or b""])]
        )
        return _text(reply[0])

    async def _settle_saga(self, rid: str, action: str, record: list[str]) -> str:
        (mark,) = await self._scripts.run(
            "cluster_mark.lua", [(record, [rid, action, "", "", "0", str(RETENTION_SECONDS)])]
        )
        reply = [_text(r) for r in mark]
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
            raise _unknown(rid, exc) from exc
        return _text(done[0])


def _unknown(rid: str, cause: GatewayError) -> OutcomeUnknown:
    """A failure after a write of the request had been applied: not "nothing was applied"."""
    return OutcomeUnknown(
        f"reservation {rid!r} was being written when Redis failed ({cause.detail}); retry with "
        "the same reservation_id to learn the outcome",
        reservation_id=rid,
        dependency="redis",
        retry_after=1,
    )


def _plan(
    request: ReservationRequest, members: dict[str, list[str]], default_ss: dict[str, int]
) -> tuple[list[str], list[_Line]]:
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
        lines.append(_Line(n, k, line.sku, line.quantity, label, group, candidates))
    return skus, lines


@functools.lru_cache(maxsize=65_536)
def _sku_keys(sku: str) -> tuple[str, str]:
    """A SKU's (position, holds) keys: a hot SKU's are built once, not on every reservation."""
    return atp_keys.position(sku), keys.holds(sku)


def _record_keys(rid: str) -> list[str]:
    bucket = keys.bucket(rid)
    return [keys.record(rid, bucket), keys.expiry_index(bucket)]


def _public_status(status: str, exp: str) -> str:
    if status.startswith("settling:"):
        return status.removeprefix("settling:")
    if status == "held" and int(exp) <= int(datetime.now(UTC).timestamp() * 1000):
        return "expired"  # overdue; the sweeper releases it within a second
    return status
