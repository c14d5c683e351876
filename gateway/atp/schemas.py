"""Wire schemas of the availability side: stock events in, availability out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Final, Literal

import msgspec

# \Z, not $: Python's $ also matches before a trailing newline ("SKU-1\n" would pass).
CODE_PATTERN: Final = r"^[A-Za-z0-9._:\-]{1,64}\Z"
# Printable: anything but C0/C1 control characters (and DEL).
EVENT_ID_PATTERN: Final = r"^[^\x00-\x1f\x7f-\x9f]{1,128}\Z"
MAX_EVENTS: Final = 1000
# Bounds that keep the event rule exact: Redis runs it in Lua, whose numbers are doubles, exact
# for integers up to 2^53 (about 9.007e15).
# - A quantity (snapshot, adjustment, safety stock; a reservation line's too) is at most 10^9.
# - A position stays within MAX_POSITION: apply_events.lua refuses an adjustment (outcome
#   ``rejected``) that would take on-hand beyond +-10^15 or the sum of the magnitudes of the
#   adjustments it keeps (those after its snapshot, within the horizon) beyond 10^15. Then every
#   sum the scripts form (on-hand, reserved + committed + safety stock, what is left to hold, the
#   adjustments a snapshot or the horizon drops) stays below 5 * 10^15.
# - occurred_at lies between OCCURRED_AT_FLOOR and the gateway's clock plus
#   GATEWAY_MAX_CLOCK_SKEW_SECONDS: microseconds since 1970 below 2^53 (that is year 2255).
MAX_QUANTITY: Final = 10**9
MAX_POSITION: Final = 10**15
OCCURRED_AT_FLOOR: Final = datetime(2000, 1, 1, tzinfo=UTC)

Code = Annotated[str, msgspec.Meta(pattern=CODE_PATTERN, min_length=1, max_length=64)]
# The same rule in two parts, for structs with many codes (a 100-line cart): msgspec checks the
# length, ``is_code`` the characters, ~10x cheaper than a regex per field.
CodeLength = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_CODE_CHARS: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"


def is_code(text: str) -> bool:
    """Whether every character of ``text`` is one CODE_PATTERN allows (the length aside)."""
    return not text.strip(_CODE_CHARS)


EventId = Annotated[str, msgspec.Meta(pattern=EVENT_ID_PATTERN, min_length=1, max_length=128)]
Quantity = Annotated[int, msgspec.Meta(ge=-MAX_QUANTITY, le=MAX_QUANTITY)]
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=MAX_QUANTITY)]


class StockEvent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One stock event. A snapshot carries the absolute on-hand; an adjustment a signed delta."""

    event_id: EventId
    type: Literal["snapshot", "adjustment"]
    sku: Code
    location: Code
    quantity: Quantity
    occurred_at: datetime
    source: Annotated[str, msgspec.Meta(max_length=128)] | None = None


class StockEventBatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    events: Annotated[list[StockEvent], msgspec.Meta(min_length=1, max_length=MAX_EVENTS)]


class RawStockEventBatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The batch with each event left undecoded, so every bad event can be reported."""

    events: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=MAX_EVENTS)]


class IngestResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    applied: int
    duplicate: int
    stale: int
    # Adjustments refused because the position would leave MAX_POSITION (see above); in the
    # answer only when there are some, which a sane feed never meets.
    rejected: int = 0


class LocationAvailability(msgspec.Struct, frozen=True, kw_only=True):
    location: str
    available: int


class PositionAvailability(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    location: str
    on_hand: int
    reserved: int
    committed: int
    safety_stock: int
    available: int


class GroupAvailability(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    location_group: str
    available: int
    locations: list[LocationAvailability]


class AvailabilityResponse(msgspec.Struct, frozen=True, kw_only=True):
    items: list[PositionAvailability] | list[GroupAvailability]


class LocationGroup(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    locations: Annotated[list[Code], msgspec.Meta(min_length=1, max_length=500)]


class LocationGroupOut(msgspec.Struct, frozen=True, kw_only=True):
    group: str
    locations: list[str]


class SafetyStockEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    location: Code
    quantity: NonNegative
    sku: Code | None = None


class SafetyStockRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    items: Annotated[list[SafetyStockEntry], msgspec.Meta(min_length=1, max_length=1000)]


class SafetyStockResult(msgspec.Struct, frozen=True, kw_only=True):
    updated: int
