"""Redis key names of the availability aggregate, all in one place.

Every key that belongs to a SKU carries the ``{sku}`` hash tag, so one SKU's keys share a
Redis Cluster slot and a Lua script may touch all of them atomically.
"""

from __future__ import annotations

import functools
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


def event_ids(sku: str) -> str:
    """Sorted set of event ids seen for the SKU within the horizon, scored by occurrence."""
    return f"{PREFIX}:{{{sku}}}:ids"


def adjustments(sku: str, location: str) -> str:
    """Sorted set of adjustments newer than the position's snapshot, scored by occurrence."""
    return f"{PREFIX}:{{{sku}}}:adj:{location}"


def location_group(group: str) -> str:
    return f"{PREFIX}:lg:{group}"


# Hash fields of a position: on-hand, reserved, committed, sku-specific safety stock.
@functools.lru_cache(maxsize=4096)
def figure_fields(location: str) -> tuple[str, str, str, str]:
    # Cached: every availability read asks for them, and locations are few.
    return (f"oh:{location}", f"res:{location}", f"com:{location}", f"ss:{location}")


def safety_stock_field(location: str) -> str:
    return f"ss:{location}"
