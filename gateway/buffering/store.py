"""The ERP flow's scripts, called from here only: permits under the shared limit, outcomes that
steer it (adaptive rate, breaker), and ops' limit changes. Replies come back typed."""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from gateway.buffering import keys
from gateway.ports import FieldsRead, Records, Scripts

Outcome = Literal["ok", "throttled", "slow", "failed", "unused"]
_KEYS: Final = list(keys.KEYS)


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    rate_per_second: float
    burst: int
    max_concurrency: int


class Grant(msgspec.Struct, frozen=True):
    """Permits granted (ids ``prefix:1..granted``); when none, how long to wait and why."""

    granted: int
    wait_seconds: float
    reason: str


class FlowState(msgspec.Struct, frozen=True, kw_only=True):
    limits: Limits
    paused: bool
    effective_rate: float
    breaker: str
    in_flight: int


def _text(raw: bytes | str | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


class FlowStore:
    def __init__(self, scripts: Scripts, records: Records, defaults: Limits) -> None:
        self._scripts = scripts
        self._records = records
        self._defaults = [
            str(defaults.rate_per_second),
            str(defaults.burst),
            str(defaults.max_concurrency),
        ]
        self.defaults = defaults

    async def acquire(self, want: int, prefix: str, lease_ms: int) -> Grant:
        args = [str(want), prefix, str(lease_ms), *self._defaults]
        ((granted, wait_ms, reason),) = await self._scripts.run("acquire.lua", [(_KEYS, args)])
        return Grant(int(granted), int(wait_ms) / 1000, _text(reason) or "")

    async def report(self, permit: str, outcome: Outcome) -> str:
        (state,) = await self._scripts.run(
            "report.lua", [(_KEYS, [permit, outcome, *self._defaults])]
        )
        return _text(state) or "closed"

    async def set_limits(self, limits: Limits, paused: bool | None = None) -> None:
        flag = "" if paused is None else "1" if paused else "0"
        args = [str(limits.rate_per_second), str(limits.burst), str(limits.max_concurrency), flag]
        await self._scripts.run("limits.lua", [(_KEYS, args)])

    async def state(self) -> FlowState:
        (limits, flow) = await self._records.fields(
            [
                FieldsRead(keys.LIMITS, (keys.RATE, keys.BURST, keys.CONCURRENCY, keys.PAUSED)),
                FieldsRead(keys.FLOW, (keys.FACTOR, keys.STATE)),
            ]
        )
        d = self.defaults
        configured = Limits(
            rate_per_second=float(limits[0]) if limits[0] is not None else d.rate_per_second,
            burst=int(limits[1]) if limits[1] is not None else d.burst,
            max_concurrency=int(limits[2]) if limits[2] is not None else d.max_concurrency,
        )
        factor = float(flow[0]) if flow[0] is not None else 1.0
        in_flight = await self._records.count_live(keys.IN_FLIGHT)
        return FlowState(
            limits=configured,
            paused=_text(limits[3]) == "1",
            effective_rate=round(configured.rate_per_second * factor, 3),
            breaker=_text(flow[1]) or "closed",
            in_flight=in_flight,
        )
