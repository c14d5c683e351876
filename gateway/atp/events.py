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
from gateway.atp.ports import ScriptRunner
from gateway.atp.schemas import IngestResult, StockEvent
from gateway.atp.validation import parse_timestamp
from gateway.metrics import STOCK_SHORTFALL

log = structlog.get_logger(__name__)

APPLY_SCRIPT: Final = "apply_events.lua"
APPLIED, DUPLICATE, STALE = 0, 1, 2
OUTCOMES: Final = ("applied", "duplicate", "stale")


class EventApplier:
    def __init__(self, scripts: ScriptRunner, *, horizon_seconds: int) -> None:
        self._scripts = scripts
        self._horizon_us = str(horizon_seconds * 1_000_000)

    async def apply(self, events: Sequence[StockEvent]) -> IngestResult:
        """Apply events in the order given; each SKU's share in one atomic script call."""
        codes = await self.apply_codes(events)
        return IngestResult(
            applied=codes.count(APPLIED), duplicate=codes.count(DUPLICATE), stale=codes.count(STALE)
        )

    async def apply_codes(self, events: Sequence[StockEvent]) -> list[int]:
        by_sku: dict[str, list[int]] = {}
        for index, event in enumerate(events):
            by_sku.setdefault(event.sku, []).append(index)
        calls = []
        for sku, indexes in by_sku.items():
            locations: dict[str, int] = {}
            args: list[str] = [self._horizon_us, ""]
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
            args[1] = str(len(locations))
            args += locations
            args += event_args
            call_keys = [keys.position(sku), keys.event_ids(sku)]
            call_keys += (keys.adjustments(sku, loc) for loc in locations)
            calls.append((call_keys, args))
        replies = await self._scripts.run(APPLY_SCRIPT, calls)
        codes = [0] * len(events)
        for (sku, indexes), (sku_codes, short) in zip(by_sku.items(), replies, strict=True):
            for index, code in zip(indexes, sku_codes, strict=True):
                codes[index] = int(code)
            for i in range(0, len(short), 2):
                location, units = short[i].decode(), int(short[i + 1])
                STOCK_SHORTFALL.inc()
                log.warning("stock_below_holds", sku=sku, location=location, short_by=units)
        return codes
