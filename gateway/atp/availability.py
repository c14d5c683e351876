"""Availability reads: what can be promised per SKU at a location or across a location group.

``available = max(0, on_hand - reserved - committed - safety_stock)``; a SKU-specific safety stock
wins over the location's default. All reads of a request go out in the batch of the current
event-loop tick, so a 20-SKU query costs one Redis round trip shared with its neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.atp import keys
from gateway.atp.schemas import (
    GroupAvailability,
    LocationAvailability,
    PositionAvailability,
)
from gateway.errors import ConfigNotCopied, NotFound
from gateway.ports import FieldsRead, Records


def _int(raw: Any) -> int:
    return int(raw) if raw is not None else 0


def compute_available(on_hand: int, reserved: int, committed: int, safety_stock: int) -> int:
    """The availability formula, the only one on the Python side (``lib.lua`` is its Lua twin)."""
    # A comparison, not max(): this runs for every SKU and location of every storefront query.
    available = on_hand - reserved - committed - safety_stock
    return available if available > 0 else 0


class AvailabilityReader:
    def __init__(self, records: Records) -> None:
        self._records = records

    async def at_location(self, skus: Sequence[str], location: str) -> list[PositionAvailability]:
        fields = keys.figure_fields(location)
        default_ss, *rows = await self._records.fields(
            [
                FieldsRead(keys.LOCATION_SAFETY_STOCK, (location,)),
                *[FieldsRead(position, fields) for position in keys.positions(skus)],
            ]
        )
        default = int(default_ss[0]) if default_ss[0] is not None else 0
        items = []
        # Parsing inlined: this loop runs for every SKU of every storefront query.
        for sku, (oh, res, com, ss) in zip(skus, rows, strict=True):
            on_hand = int(oh) if oh is not None else 0
            reserved = int(res) if res is not None else 0
            committed = int(com) if com is not None else 0
            safety = int(ss) if ss is not None else default
            items.append(
                PositionAvailability(
                    sku=sku,
                    location=location,
                    on_hand=on_hand,
                    reserved=reserved,
                    committed=committed,
                    safety_stock=safety,
                    available=compute_available(on_hand, reserved, committed, safety),
                )
            )
        return items

    async def in_group(self, skus: Sequence[str], group: str) -> list[GroupAvailability]:
        members = await self.group_members(group)
        if members is None:
            raise NotFound(f"location group {group!r} does not exist", group=group)
        fields = [f for location in members for f in keys.figure_fields(location)]
        default_ss, *rows = await self._records.fields(
            [
                FieldsRead(keys.LOCATION_SAFETY_STOCK, members),
                *[FieldsRead(position, fields) for position in keys.positions(skus)],
            ]
        )
        defaults = [_int(v) for v in default_ss]
        items = []
        for sku, values in zip(skus, rows, strict=True):
            per_location = []
            for i, location in enumerate(members):
                oh, res, com, ss = values[4 * i : 4 * i + 4]
                safety = int(ss) if ss is not None else defaults[i]
                per_location.append(
                    LocationAvailability(
                        location=location,
                        available=compute_available(_int(oh), _int(res), _int(com), safety),
                    )
                )
            items.append(
                GroupAvailability(
                    sku=sku,
                    location_group=group,
                    available=sum(p.available for p in per_location),
                    locations=per_location,
                )
            )
        return items

    async def group_members(self, group: str) -> list[str] | None:
        key = keys.location_group(group)
        raw = await self._records.value(key)
        if raw is None:
            # Rare: only now is the config marker worth a round trip. The group is read again
            # beside it, so that a copy landing between the two reads cannot make a group that
            # exists look unknown.
            raw, marker = await self._records.values([key, keys.CONFIG_MARKER])
            if raw is None:
                if keys.config_copy_missing(marker):
                    raise ConfigNotCopied()
                return None
        return bytes(raw).decode().split(",")
