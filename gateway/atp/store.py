"""The availability domain's scripts, called from here only; their replies come back typed.

``apply_events.lua`` answers positional arrays (see its header); this module is the one place
that knows their shape, so the services read fields, never indexes. ``config_marker.lua`` is
called here too (:meth:`AtpStore.swap_config_marker`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import msgspec

from gateway.atp import keys
from gateway.ports import Scripts

APPLY_SCRIPT: Final = "apply_events.lua"
MARKER_SCRIPT: Final = "config_marker.lua"


class Shortfall(msgspec.Struct, frozen=True):
    """Holds (reserved plus committed) above on-hand at a location, by ``units``."""

    location: str
    units: int


class SkuOutcome(msgspec.Struct, frozen=True):
    """What one SKU's share of a call did: one outcome code per event, in the order sent
    (``gateway.atp.events.OUTCOMES`` names them), and the shortfalls it left."""

    codes: list[int]
    shortfalls: list[Shortfall]


class ApplyCall(msgspec.Struct, frozen=True):
    """One script call: the keys and arguments of one or more SKUs (apply_events.lua's header)."""

    keys: list[str]
    args: list[str]


class AtpStore:
    def __init__(self, scripts: Scripts) -> None:
        self._scripts = scripts

    async def apply_events(self, calls: Sequence[ApplyCall]) -> list[SkuOutcome]:
        """Run the calls; one outcome per SKU group, in the order the calls hold them."""
        replies = await self._scripts.run(APPLY_SCRIPT, [(c.keys, c.args) for c in calls])
        return [
            SkuOutcome(
                codes=[int(code) for code in codes],
                shortfalls=[
                    Shortfall(short[i].decode(), int(short[i + 1])) for i in range(0, len(short), 2)
                ],
            )
            for reply in replies
            for codes, short in reply
        ]

    async def swap_config_marker(self, expected: str, new: str) -> bool:
        """Set the config marker to ``new`` if it holds ``expected``; else leave it ``dirty``
        and answer False (see config_marker.lua)."""
        (done,) = await self._scripts.run(MARKER_SCRIPT, [([keys.CONFIG_MARKER], [expected, new])])
        return bool(done)
