"""Applying stock events to the aggregate: the event rule, one atomic script per SKU.

The rule (per sku and location): on-hand is the quantity of the newest snapshot (greatest
``occurred_at``; a tie goes to the greater ``event_id``) plus every adjustment that occurred
strictly after it. ``apply_events.lua`` keeps the newest snapshot and the adjustments after it,
so the rule holds whatever order events arrive in and however often each is delivered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import structlog

from gateway.atp import keys
from gateway.atp.schemas import IngestResult, StockEvent
from gateway.atp.store import ApplyCall, AtpStore
from gateway.atp.validation import parse_timestamp
from gateway.metrics import STOCK_SHORTFALL
from gateway.ports import Scripts

log = structlog.get_logger(__name__)

APPLIED, DUPLICATE, STALE, REJECTED = 0, 1, 2, 3
# Indexed by the script's outcome codes. ``rejected``: an adjustment that would take its position
# beyond the bounds the script can sum exactly (see apply_events.lua); never applied, id not kept.
OUTCOMES: Final = ("applied", "duplicate", "stale", "rejected")
# Events per script call on a single node: ~15 µs of Redis each, so a call stays under ~4 ms.
_EVENTS_PER_CALL: Final = 256


class EventApplier:
    def __init__(
        self, scripts: Scripts, *, horizon_seconds: int, shared_slots: bool = True
    ) -> None:
        """``shared_slots``: one script may touch several SKUs (a single Redis node). On a
        cluster each SKU's keys live in their own slot, so each SKU is a call of its own."""
        self._store = AtpStore(scripts)
        self._horizon_us = str(horizon_seconds * 1_000_000)
        self._events_per_call = _EVENTS_PER_CALL if shared_slots else 1

    async def apply(self, events: Sequence[StockEvent]) -> IngestResult:
        """Apply events in the order given; each SKU's share atomically."""
        codes = await self.apply_codes(events)
        return IngestResult(
            applied=codes.count(APPLIED),
            duplicate=codes.count(DUPLICATE),
            stale=codes.count(STALE),
            rejected=codes.count(REJECTED),
        )

    async def apply_codes(self, events: Sequence[StockEvent]) -> list[int]:
        by_sku: dict[str, list[int]] = {}
        for index, event in enumerate(events):
            by_sku.setdefault(event.sku, []).append(index)
        # SKU groups are packed into calls of up to _EVENTS_PER_CALL events: the script's fixed
        # cost is paid once per call, and one call stays short enough not to stall Redis.
        calls: list[ApplyCall] = []
        call_keys: list[str] = []
        args: list[str] = []
        in_call = 0
        for sku, indexes in by_sku.items():
            if in_call and in_call + len(indexes) > self._events_per_call:
                calls.append(ApplyCall(call_keys, args))
                call_keys, args, in_call = [], [], 0
            if not args:
                args.append(self._horizon_us)
            locations: dict[str, int] = {}
            event_args: list[str] = []
            for index in indexes:
                event = events[index]
                slot = locations.setdefault(event.location, len(locations) + 1)
                event_args += (
                    str(slot),
                    "s" if event.type == "snapshot" else "a",
                    str(parse_timestamp(event.occurred_at)),
                    event.event_id,
                    str(event.quantity),
                )
            args += (str(len(locations)), str(len(indexes)), *locations, *event_args)
            call_keys += (keys.position(sku), keys.event_ids(sku))
            call_keys += (keys.adjustments(sku, loc) for loc in locations)
            call_keys += (keys.accepted_commitments(sku, loc) for loc in locations)
            in_call += len(indexes)
        if args:
            calls.append(ApplyCall(call_keys, args))
        outcomes = await self._store.apply_events(calls)
        codes = [0] * len(events)
        for (sku, indexes), outcome in zip(by_sku.items(), outcomes, strict=True):
            for index, code in zip(indexes, outcome.codes, strict=True):
                codes[index] = code
                if codes[index] == REJECTED:
                    event = events[index]
                    log.warning(
                        "stock_event_rejected",
                        sku=sku,
                        location=event.location,
                        event_id=event.event_id,
                        reason="the position would leave the bounds the event rule sums exactly",
                    )
            for short in outcome.shortfalls:
                STOCK_SHORTFALL.inc()
                log.warning(
                    "stock_below_holds", sku=sku, location=short.location, short_by=short.units
                )
        return codes
