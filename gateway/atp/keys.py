"""Redis key and hash-field names of the availability aggregate, all in one place.

``lib.lua`` names the same fields for the scripts. Every key that belongs to a SKU carries the
``{sku}`` hash tag, so one SKU's keys share a Redis Cluster slot and a Lua script may touch all
of them atomically.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Final

PREFIX: Final = "atp"
# Location defaults for safety stock: few, rarely written, read with every availability query.
LOCATION_SAFETY_STOCK: Final = f"{PREFIX}:ss"
# The config version Redis's copy of the location config reflects (see config_store); absent
# only when Redis has lost the copy and it is not back yet.
CONFIG_MARKER: Final = f"{PREFIX}:config:version"
# The marker's value while a full copy is being written: its keys are not all there yet.
CONFIG_RESTORING: Final = b"pending:restore:"


def config_copy_missing(marker: bytes | None) -> bool:
    """Whether Redis's copy of the location config may lack a group that exists: the marker is
    gone (Redis lost the copy), or names no version (a copy or a write in progress, or a write
    that could not be vouched for). Then a missing group is "retry", not "no such group"."""
    return marker is None or not bytes(marker).isdigit()


def position(sku: str) -> str:
    """Hash of every location's figures for one SKU (fields ``<figure>:<location>``)."""
    return f"{PREFIX}:{{{sku}}}:p"


def positions(skus: Iterable[str]) -> list[str]:
    """``position`` of each SKU: one call per request on the read path, not one per SKU."""
    return [f"{PREFIX}:{{{sku}}}:p" for sku in skus]


def event_ids(sku: str) -> str:
    """Sorted set of event ids seen for the SKU within the horizon, scored by occurrence."""
    return f"{PREFIX}:{{{sku}}}:ids"


def adjustments(sku: str, location: str) -> str:
    """Sorted set of adjustments newer than the position's snapshot, scored by occurrence."""
    return f"{PREFIX}:{{{sku}}}:adj:{location}"


def accepted_commitments(sku: str, location: str) -> str:
    """Sorted set of what orders the ERP accepted commit at the location, scored by acceptance
    (members ``<units>|<reservation id>``): counted until a snapshot at or after that time."""
    return f"{PREFIX}:{{{sku}}}:acc:{location}"


def location_group(group: str) -> str:
    return f"{PREFIX}:lg:{group}"


# Hash fields of a position, each ``<figure>:<location>``. What readers use: on-hand,
# reserved, committed, SKU-specific safety stock (wins over LOCATION_SAFETY_STOCK).
ON_HAND: Final = "oh:"
RESERVED: Final = "res:"
COMMITTED: Final = "com:"
SAFETY_STOCK: Final = "ss:"
# The event rule's own (apply_events.lua): base (the newest snapshot plus adjustments folded at
# the horizon), that snapshot's time and event id, sum and gross of the adjustments kept.
BASE: Final = "b:"
BASE_TIME: Final = "bt:"
BASE_EVENT_ID: Final = "bi:"
ADJUSTMENT_SUM: Final = "as:"
ADJUSTMENT_GROSS: Final = "ag:"


@functools.lru_cache(maxsize=4096)
def figure_fields(location: str) -> tuple[str, str, str, str]:
    """On-hand, reserved, committed and safety-stock fields of a location, in that order."""
    # Cached: every availability read asks for them, and locations are few.
    return (
        ON_HAND + location,
        RESERVED + location,
        COMMITTED + location,
        SAFETY_STOCK + location,
    )


def safety_stock_field(location: str) -> str:
    return SAFETY_STOCK + location
