"""The ERP simulator's state and rules, without HTTP (``gateway.dev.erp_sim`` serves them).

What one ``POST /orders`` meets, in this order, all in one synchronous step after the added
latency (so no other request interleaves between a check and what it records):

1. down (the ``outage`` knob, an ``outage_windows`` entry, or the record full): 503;
2. over ``rate_limit_per_second`` in this wall-clock second: 429 (counts only requests let in);
3. a random ``error_rate`` failure: 503;
4. a key already accepted: 409 with the first answer, ``deliveries`` + 1;
5. otherwise accepted: 201, recorded, the stock ledger decremented, snapshots queued.

None of 1-3 records or accepts the order.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import msgspec
from msgspec import UNSET, Meta, UnsetType

from gateway.atp.schemas import MAX_QUANTITY, Code, StockEvent

# A sim left under a load test for hours must not eat the machine: beyond this many orders it
# answers 503 until POST /_sim/reset.
MAX_ORDERS: Final = 1_000_000
Millis = Annotated[float, Meta(ge=0, le=60_000)]
Offset = Annotated[float, Meta(ge=0)]


class Knobs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the ERP misbehaves; every field is optional in a ``PUT /_sim/knobs``."""

    latency_ms: Millis = 0.0
    # Uniform in [-jitter, +jitter] around latency_ms, never below 0.
    latency_jitter_ms: Millis = 0.0
    error_rate: Annotated[float, Meta(ge=0, le=1)] = 0.0
    rate_limit_per_second: Annotated[int, Meta(ge=0, le=1_000_000)] = 0  # 0: no limit
    outage: bool = False
    # [start_s, end_s) offsets from the sim's start (or its last reset).
    outage_windows: tuple[tuple[Offset, Offset], ...] = ()

    def __post_init__(self) -> None:
        for index, (start, end) in enumerate(self.outage_windows):
            if end <= start:
                raise ValueError(f"outage_windows[{index}]: end must be after start")


class KnobsPatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    latency_ms: Millis | UnsetType = UNSET
    latency_jitter_ms: Millis | UnsetType = UNSET
    error_rate: Annotated[float, Meta(ge=0, le=1)] | UnsetType = UNSET
    rate_limit_per_second: Annotated[int, Meta(ge=0, le=1_000_000)] | UnsetType = UNSET
    outage: bool | UnsetType = UNSET
    outage_windows: tuple[tuple[Offset, Offset], ...] | UnsetType | None = UNSET


def patched(knobs: Knobs, patch: KnobsPatch) -> Knobs:
    """``knobs`` with the fields ``patch`` sets; raises msgspec.ValidationError if they clash."""
    changes: dict[str, Any] = {
        name: value
        for name in patch.__struct_fields__
        if (value := getattr(patch, name)) is not UNSET
    }
    if "outage_windows" in changes and changes["outage_windows"] is None:
        changes["outage_windows"] = ()
    return msgspec.convert({**msgspec.structs.asdict(knobs), **changes}, Knobs)


class OrderLine(msgspec.Struct, frozen=True, kw_only=True):
    """What the ledger reads of an order's line; other fields of the line are ignored."""

    sku: str
    location: str
    quantity: Annotated[int, Meta(ge=0, le=MAX_QUANTITY)]


class StockItem(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    sku: Code
    location: Code
    on_hand: Annotated[int, Meta(ge=0, le=MAX_QUANTITY)]  # the ledger may go below 0 later


class StockLedger(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    items: list[StockItem]


class Accepted(msgspec.Struct, frozen=True, kw_only=True):
    erp_order_id: str
    accepted_at: str


class OrderRecord(msgspec.Struct, kw_only=True):
    key: str
    erp_order_id: str
    accepted_at: str
    deliveries: int
    body: msgspec.Raw

    def reply(self) -> Accepted:
        return Accepted(erp_order_id=self.erp_order_id, accepted_at=self.accepted_at)


class Received(msgspec.Struct, frozen=True, kw_only=True):
    orders: list[OrderRecord]
    accepted: int
    duplicates: int
    rejected_429: int
    errors_503: int


class Created(msgspec.Struct, frozen=True):
    reply: Accepted


class Duplicate(msgspec.Struct, frozen=True):
    reply: Accepted


class Refused(msgspec.Struct, frozen=True):
    status: int
    reason: str
    retry_after: bool


Outcome = Created | Duplicate | Refused


def rfc3339_ms(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SimState:
    """Everything the sim knows. ``clock`` is wall time (per-second buckets, accept times);
    ``monotonic`` measures the outage windows."""

    def __init__(
        self,
        knobs: Knobs,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.knobs = knobs
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng if rng is not None else random.Random()
        # A fresh prefix per process, so snapshot ids never repeat across sim restarts.
        self._run = uuid.uuid4().hex[:12]
        self._event_seq = 0
        self.ledger: dict[tuple[str, str], int] = {}
        # Set when snapshots wait to be pushed; the pusher (if any) waits on it.
        self.snapshots_waiting = asyncio.Event()
        self.generation = 0  # + 1 per reset
        self.reset()

    def reset(self) -> None:
        """Forget orders, counters, the ledger and unpushed snapshots; the knobs stay, the
        outage windows count from now."""
        self.restart_clock()
        self.generation += 1
        self._orders: dict[str, OrderRecord] = {}
        self._next_id = 1
        self.accepted = self.duplicates = self.rejected_429 = self.errors_503 = 0
        self.per_second: dict[int, int] = {}
        self.requests_per_second: dict[int, int] = {}
        self._window = (-1, 0)  # (second, requests let in during it)
        self.ledger.clear()
        self._snapshots: dict[tuple[str, str], StockEvent] = {}
        self.snapshots_waiting.clear()

    def restart_clock(self) -> None:
        self.started = self._monotonic()

    def uptime(self) -> float:
        return self._monotonic() - self.started

    def latency(self) -> float:
        """Seconds to wait before answering this request."""
        mean, jitter = self.knobs.latency_ms, self.knobs.latency_jitter_ms
        if jitter:
            mean += self._rng.uniform(-jitter, jitter)
        return max(mean, 0.0) / 1000

    def down(self) -> bool:
        if self.knobs.outage:
            return True
        offset = self.uptime()
        return any(start <= offset < end for start, end in self.knobs.outage_windows)

    def submit(self, key: str, body: bytes, lines: list[OrderLine]) -> Outcome:
        """Decide and record one ``POST /orders`` (the module docstring lists the order)."""
        now = self._clock()
        second = int(now)
        self.requests_per_second[second] = self.requests_per_second.get(second, 0) + 1
        reason = "outage" if self.down() else "sim_full" if len(self._orders) >= MAX_ORDERS else ""
        if reason:
            self.errors_503 += 1
            return Refused(503, reason, retry_after=True)
        limit = self.knobs.rate_limit_per_second
        if limit:
            window_second, count = self._window
            if window_second != second:
                count = 0
            if count >= limit:
                self.rejected_429 += 1
                return Refused(429, "rate_limited", retry_after=True)
            self._window = (second, count + 1)
        if self.knobs.error_rate and self._rng.random() < self.knobs.error_rate:
            self.errors_503 += 1
            return Refused(503, "erp_error", retry_after=False)
        record = self._orders.get(key)
        if record is not None:
            record.deliveries += 1
            self.duplicates += 1
            return Duplicate(record.reply())
        moment = datetime.fromtimestamp(now, UTC)
        moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
        record = OrderRecord(
            key=key,
            erp_order_id=f"ERP-{self._next_id}",
            accepted_at=rfc3339_ms(moment),
            deliveries=1,
            body=msgspec.Raw(body),
        )
        self._next_id += 1
        self._orders[key] = record
        self.accepted += 1
        self.per_second[second] = self.per_second.get(second, 0) + 1
        self._take_stock(lines, moment)
        return Created(record.reply())

    def _take_stock(self, lines: list[OrderLine], moment: datetime) -> None:
        """Decrement the ledger for the positions it holds (others are not the ERP's) and queue
        one snapshot per touched position, the newest replacing an unpushed older one."""
        for line in lines:
            position = (line.sku, line.location)
            if position not in self.ledger:
                continue
            self.ledger[position] -= line.quantity
            self._event_seq += 1
            self._snapshots[position] = StockEvent(
                event_id=f"erp-sim-{self._run}-{self._event_seq}",
                type="snapshot",
                sku=line.sku,
                location=line.location,
                # A gateway takes no negative snapshot: an oversold ERP has none left.
                quantity=max(self.ledger[position], 0),
                occurred_at=moment,
                source="erp-sim",
            )
            self.snapshots_waiting.set()

    def set_stock(self, items: list[StockItem]) -> None:
        for item in items:
            self.ledger[item.sku, item.location] = item.on_hand

    def stock(self) -> StockLedger:
        # Built without validation: an oversold position shows its negative on-hand.
        return StockLedger(
            items=[
                StockItem(sku=sku, location=location, on_hand=on_hand)
                for (sku, location), on_hand in sorted(self.ledger.items())
            ]
        )

    def take_snapshots(self) -> list[StockEvent]:
        events = list(self._snapshots.values())
        self._snapshots.clear()
        return events

    def return_snapshots(self, events: list[StockEvent], generation: int) -> None:
        """Put back snapshots that failed to push, unless a newer one replaced them since or a
        reset (another ``generation``) forgot them."""
        if generation != self.generation:
            return
        for event in events:
            self._snapshots.setdefault((event.sku, event.location), event)
        if self._snapshots:
            self.snapshots_waiting.set()

    def received(self) -> Received:
        return Received(
            orders=list(self._orders.values()),
            accepted=self.accepted,
            duplicates=self.duplicates,
            rejected_429=self.rejected_429,
            errors_503=self.errors_503,
        )
