"""What the reservation scripts answer, as tagged results: :mod:`gateway.reservation.store` reads
each reply into one of these, and the service and the saga match on them."""

from __future__ import annotations

import msgspec

# --- reserve.lua (single node) and cluster_begin.lua -------------------------------------------


class Held(msgspec.Struct, tag=True):
    """Held: ``lines`` is already the API's JSON for the held lines."""

    lines: bytes | str
    expires_ms: bytes | str


class Short(msgspec.Struct, tag=True):
    """Refused: ``shortfalls`` is the JSON of the lines that could not be held, in line order."""

    shortfalls: bytes | str


class Replayed(msgspec.Struct, tag=True):
    """The id was used before with this body: the record as it stands (``status`` as stored,
    ``answer`` the stored JSON)."""

    status: str
    answer: bytes | str
    expires_ms: str


class Mismatch(msgspec.Struct, tag=True):
    """The id was used before with another body."""


class Failed(msgspec.Struct, tag=True):
    """This reservation's script step raised (the others of its call went on): Redis's
    message."""

    message: str


class Begun(msgspec.Struct, tag=True):
    """A cluster reservation's id is claimed by this request; its SKUs are not held yet."""


ReserveResult = Held | Short | Replayed | Mismatch | Failed
BeginResult = Begun | Replayed | Mismatch


# --- settling, extending, marking ---------------------------------------------------------------


class Settled(msgspec.Struct, tag=True):
    """The record's status after the call (``released``, ``confirmed``, ``expired``, ``held``:
    an expiry not due yet, or another status the action leaves as it is). A tracked confirm
    (see ``settle.lua``) also says when the move was stamped in the unverified index, and
    whether this call moved the hold (else it only restamped an earlier move)."""

    status: str
    stamp: str | None = None
    moved: bool = False
    lines: bytes | None = None  # a tracked confirm's held lines (JSON), as stored


class Missing(msgspec.Struct, tag=True):
    """No such reservation (or only a refused or unfinished one)."""


class Retry(msgspec.Struct, tag=True):
    """The record changed between reading its SKUs and the script: read and run again."""


class Extended(msgspec.Struct, tag=True):
    expires_ms: str


class Marked(msgspec.Struct, tag=True):
    """A cluster reservation recorded as held, until ``expires_ms``."""

    expires_ms: str


class NotHeld(msgspec.Struct, tag=True):
    """Extending found the reservation in another status (``expired`` when it is overdue)."""

    status: str


class Go(msgspec.Struct, tag=True):
    """A cluster settlement is marked: release or confirm the SKUs' holds, then mark it done."""

    final: str
    skus: list[str]


class SkuHeld(msgspec.Struct, tag=True):
    """One SKU of a cluster reservation held: its numbered per-line answers (JSON)."""

    entries: bytes | str


class SkuShort(msgspec.Struct, tag=True):
    """One SKU of a cluster reservation refused: its numbered shortfalls (JSON)."""

    entries: bytes | str


SettleResult = Settled | Missing | Retry
ExtendResult = Extended | NotHeld | Missing
MarkResult = Go | Settled | Missing
FinishResult = Marked | Settled | Missing
SkuResult = SkuHeld | SkuShort
