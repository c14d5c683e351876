"""Wire schemas of reservations."""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from gateway.atp.schemas import CODE_PATTERN, MAX_QUANTITY, CodeLength, is_code

MAX_LINES: Final = 100
# The bound of every quantity: the scripts' sums stay exact (gateway.atp.schemas).
MAX_LINE_QUANTITY: Final = MAX_QUANTITY
DEFAULT_TTL_SECONDS: Final = 900

RESERVATION_ID_PATTERN: Final = r"^[^\x00-\x1f\x7f-\x9f]{1,128}\Z"
ReservationId = Annotated[
    str, msgspec.Meta(pattern=RESERVATION_ID_PATTERN, min_length=1, max_length=128)
]
Status = Literal["held", "confirmed", "released", "expired"]


class LineRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    sku: CodeLength
    quantity: Annotated[int, msgspec.Meta(ge=1, le=MAX_LINE_QUANTITY)]
    location: CodeLength | None = None
    location_group: CodeLength | None = None

    def __post_init__(self) -> None:
        # CODE_PATTERN's characters (msgspec checked the length); a ValueError here becomes
        # msgspec's ValidationError at this line's path.
        if not is_code(self.sku):
            raise ValueError(f"sku must match {CODE_PATTERN}")
        if self.location is not None and not is_code(self.location):
            raise ValueError(f"location must match {CODE_PATTERN}")
        if self.location_group is not None and not is_code(self.location_group):
            raise ValueError(f"location_group must match {CODE_PATTERN}")


class ReservationRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reservation_id: ReservationId
    lines: Annotated[list[LineRequest], msgspec.Meta(min_length=1, max_length=MAX_LINES)]
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] | None = None
    channel: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class ExtendRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1)]


class HeldLine(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    location: str
    quantity: int


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    reservation_id: str
    status: Status
    expires_at: str
    # Raw: the JSON of the lines as a fresh hold's script produced it (see lib.lua).
    lines: list[HeldLine] | msgspec.Raw


HELD_LINES: Final = msgspec.json.Decoder(list[HeldLine])


def lines_of(reservation: Reservation) -> list[HeldLine]:
    """A reservation's lines as structs, whether decoded already or still the script's JSON."""
    if isinstance(reservation.lines, msgspec.Raw):
        return HELD_LINES.decode(reservation.lines)
    return reservation.lines
