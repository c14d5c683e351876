"""Wire schemas of ops' control of the ERP flow: its state, dead letters, replays, the audit.

The body of ``PUT /v1/ops/erp/limits`` is :class:`gateway.buffering.store.Limits`, bounds and
all: the limit Redis holds and the one ops send are one type.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from gateway.buffering.schemas import OrderId
from gateway.buffering.store import Limits

# Pages are bounded: a listing is one indexed range read, never the whole table.
MAX_PAGE: Final = 500
DEFAULT_PAGE: Final = 100
MAX_REPLAY_IDS: Final = 1000


class ErpView(msgspec.Struct, frozen=True, kw_only=True):
    """The ERP flow now: what ops set, what the writers make of it, what waits for it."""

    limits: Limits
    paused: bool
    # The configured rate times the adaptive factor (lowered on 429s and slow answers); 0 while
    # paused.
    effective_rate_per_second: float
    in_flight: int
    breaker: str  # closed | open | half_open
    buffer_depth: int
    oldest_age_seconds: float
    dead_letters: int
    sent_per_second: float  # accepted by the ERP, over the last ten seconds
    version: int  # of ops' record (PostgreSQL) Redis holds; 0: never changed, the defaults


class ReplayRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Either ``order_ids`` or ``"all": true`` (the service checks that it is exactly one).
    Absent is not null: ``{"all": true, "order_ids": null}`` is refused, as its schema says."""

    order_ids: (
        Annotated[list[OrderId], msgspec.Meta(min_length=1, max_length=MAX_REPLAY_IDS)]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    everything: Literal[True] | msgspec.UnsetType = msgspec.field(name="all", default=msgspec.UNSET)


class ReplayResult(msgspec.Struct, frozen=True, kw_only=True):
    replayed: int
    not_dead_letters: list[str]  # ids asked for that were not dead letters (any longer)
    more: bool  # "all" stopped at its bound with dead letters left: ask again


class DeadLetterView(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    reservation_id: str
    attempts: int
    last_error: str | None
    created_at: str
    updated_at: str


class DeadLetterDetailView(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v1/ops/dead-letters/{order_id}``: the dead letter and what was sent."""

    order_id: str
    reservation_id: str
    attempts: int
    last_error: str | None
    created_at: str
    updated_at: str
    lines: msgspec.Raw
    order: msgspec.Raw


class DeadLetterPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[DeadLetterView]
    next: int | None  # the ``after`` of the next page; null on the last


class AuditView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    at: str
    action: str  # limits | pause | resume | replay
    key_fingerprint: str
    request_id: str
    before: msgspec.Raw | None
    after: msgspec.Raw | None


class AuditPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[AuditView]
    next: int | None  # the ``before`` of the next (older) page; null on the last
