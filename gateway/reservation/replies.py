"""What the reservation scripts' results answer, read as the API answers it; shared by the
single-node path (:mod:`gateway.reservation.service`) and the cluster saga
(:mod:`gateway.reservation.saga`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import msgspec

from gateway.errors import RETRY_AFTER, Conflict, GatewayError, OutcomeUnknown, Unavailable
from gateway.reservation.results import Failed, Held, Mismatch, Replayed, ReserveResult, Short
from gateway.reservation.schemas import HELD_LINES, HeldLine, Reservation

# Refused and settled records stay this long so retries and GETs still find them.
RETENTION_SECONDS: Final = 24 * 3600
ENCODER: Final = msgspec.json.Encoder()
LINES: Final = msgspec.json.Decoder(list[dict[str, Any]])


class Outcome(NamedTuple):
    """What a reservation call answers: a reservation, or a refusal with its shortfalls."""

    reservation: Reservation | None = None
    shortfalls: list[dict[str, Any]] | None = None
    replayed: bool = False  # the answer of an earlier request with this id and body


class Line(msgspec.Struct, array_like=True):
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


_iso_second: list[Any] = [None, ""]


def iso(ms: str | bytes | int) -> str:
    """RFC 3339 in UTC with milliseconds. Expiries of one busy second share their prefix, so it
    is formatted once a second rather than once a reservation."""
    second, millis = divmod(int(ms), 1000)
    if _iso_second[0] != second:
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _iso_second[:] = [second, prefix]
    return f"{_iso_second[1]}.{millis:03d}+00:00"


def text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def held_lines(answer: Any) -> list[HeldLine]:
    # Stored in line order, as the API answers them (the cluster saga merges its per-SKU
    # answers before it stores them).
    return HELD_LINES.decode(answer if isinstance(answer, bytes) else str(answer).encode())


def shortfalls(answer: Any) -> list[dict[str, Any]]:
    # Stored and answered in line order, as the API answers them.
    return LINES.decode(answer if isinstance(answer, bytes) else str(answer).encode())


def line_ordered(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """A cluster saga's numbered per-SKU entries (``n``, the line) merged into line order,
    without their numbers, as a single node's script answers them."""
    return [{k: v for k, v in e.items() if k != "n"} for e in sorted(entries, key=lambda e: e["n"])]


def public_status(status: str, exp: str) -> str:
    if status.startswith("settling:"):
        return status.removeprefix("settling:")
    if status == "held" and int(exp) <= int(datetime.now(UTC).timestamp() * 1000):
        return "expired"  # overdue; the sweeper releases it within a second
    return status


def outcome(
    rid: str, result: ReserveResult, script_error: Callable[[str], GatewayError]
) -> Outcome:
    """What a reservation's script result answers the API."""
    if type(result) is Held:
        return Outcome(
            Reservation(
                reservation_id=rid,
                status="held",
                expires_at=iso(result.expires_ms),
                # The script's answer is already the API's JSON for these lines.
                lines=msgspec.Raw(result.lines),
            ),
        )
    if type(result) is Short:
        return Outcome(shortfalls=shortfalls(result.shortfalls))
    if type(result) is Failed:
        # This reservation's script step raised; the others of its call went on. Redis
        # refusing a write (out of memory, a replica, a failover) is a 503 the adapter
        # names; damaged data or a defect, not the client's doing, a 500, logged.
        error = script_error(result.message)
        if isinstance(error, Unavailable):
            raise error
        raise GatewayError(f"reservation {rid!r} failed in Redis: {result.message}")
    if type(result) is Mismatch:
        raise Conflict(
            "idempotency_conflict",
            f"reservation {rid!r} was already made with a different body",
        )
    assert type(result) is Replayed
    # A replay: answer what the first call answered, with the status as it is now.
    if result.status == "rejected":
        return Outcome(shortfalls=shortfalls(result.answer), replayed=True)
    return Outcome(
        Reservation(
            reservation_id=rid,
            status=public_status(result.status, result.expires_ms),  # type: ignore[arg-type]
            expires_at=iso(result.expires_ms),
            lines=held_lines(result.answer),
        ),
        replayed=True,
    )


def unknown(rid: str, cause: GatewayError) -> OutcomeUnknown:
    """A failure after a write of the request had been applied: not "nothing was applied"."""
    return OutcomeUnknown(
        f"reservation {rid!r} was being written when Redis failed ({cause.detail}); retry with "
        "the same reservation_id to learn the outcome",
        reservation_id=rid,
        dependency="redis",
        retry_after=RETRY_AFTER,
    )
