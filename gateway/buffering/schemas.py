"""Wire schemas of orders: confirming a reservation, ordering without a hold, reading one."""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from gateway.reservation.schemas import MAX_LINES, LineRequest, ReservationId

# The order document goes to the ERP as is; bounded so one order cannot fill the buffer.
MAX_ORDER_BYTES: Final = 256 * 1024
OrderId = ReservationId  # the same rule: 1-128 characters, no control characters


class ConfirmRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    order_id: OrderId
    # Kept raw: passed to the ERP byte for byte (checked to be a JSON object, and its size).
    order: msgspec.Raw


class OrderRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An order without a hold first (marketplaces, POS): held and confirmed in one step."""

    order_id: OrderId
    lines: Annotated[list[LineRequest], msgspec.Meta(min_length=1, max_length=MAX_LINES)]
    order: msgspec.Raw


class OrderReceipt(msgspec.Struct, frozen=True, kw_only=True):
    """What intake answers: the order is in the buffer (202), or was already (200)."""

    order_id: str
    reservation_id: str
    status: Literal["queued"] = "queued"


class OrderView(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    order_id: str
    reservation_id: str
    status: Literal["queued", "sending", "accepted", "failed"]
    attempts: int
    created_at: str
    updated_at: str
    erp_order_id: str | None = None
    accepted_at: str | None = None
    last_error: str | None = None


class _Customer(msgspec.Struct):
    customer_id: str | int | None = None


_CUSTOMER: Final = msgspec.json.Decoder(_Customer)


def customer_of(order: msgspec.Raw) -> str | None:
    """The order's ``customer_id`` (its orders reach the ERP in confirm order), if it names one."""
    try:
        found = _CUSTOMER.decode(order).customer_id
    except msgspec.ValidationError:
        return None
    return None if found is None else str(found)
