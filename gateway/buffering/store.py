"""The ERP flow's scripts, called from here only: permits under the shared limit, outcomes that
steer it (adaptive rate, breaker), and ops' limit changes. Replies come back typed.

Ops' settings carry the version of their record in PostgreSQL (:mod:`gateway.buffering.control`);
Redis keeps the newest version it was given, so a late copy never undoes a change."""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from gateway.buffering import keys
from gateway.ports import FieldsRead, FlowSettings, Records, Scripts

Outcome = Literal["ok", "throttled", "slow", "failed", "unused"]
_KEYS: Final = list(keys.KEYS)


class Limits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The shared limit, as ops set it (``PUT /v1/ops/erp/limits``) within the bounds of its
    settings (``GATEWAY_ERP_*``). A burst of at least one: the bucket holds at most ``burst``
    tokens, and an empty one would stop the flow for good (pausing is how to stop it)."""

    rate_per_second: Annotated[float, msgspec.Meta(ge=0.1, le=100_000)]
    burst: Annotated[int, msgspec.Meta(ge=1, le=100_000)]
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=10_000)]


class Grant(msgspec.Struct, frozen=True):
    """Permits granted (ids ``prefix:1..granted``); when none, how long to wait and why."""

    granted: int
    # When none were granted: before asking again. When some were: until the bucket holds a
    # whole token again (0 while it still does).
    wait_seconds: float
    reason: str
    rate: float = 0.0  # per second, when granted: the bucket's refill rate now
    burst: int = 1  # when granted: the most tokens the bucket holds


class FlowState(msgspec.Struct, frozen=True, kw_only=True):
    limits: Limits
    paused: bool
    effective_rate: float
    breaker: str
    in_flight: int
    version: int  # of ops' record these limits reflect; 0: never set


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
        (reply,) = await self._scripts.run("acquire.lua", [(_KEYS, args)])
        if len(reply) > 4:
            rate, burst = float(reply[3]), int(reply[4])
        else:
            rate, burst = 0.0, 1
        return Grant(int(reply[0]), float(reply[1]) / 1000, _text(reply[2]) or "", rate, burst)

    async def report(self, permit: str, outcome: Outcome) -> str:
        (state,) = await self._scripts.run(
            "report.lua", [(_KEYS, [permit, outcome, *self._defaults])]
        )
        return _text(state) or "closed"

    async def apply(self, settings: FlowSettings, *, force: bool = False) -> bool:
        """Set ops' settings of one version of their record; False when Redis holds a newer
        one already (and ``force`` is off: with it, any version is set)."""
        args = [
            str(settings.rate_per_second),
            str(settings.burst),
            str(settings.max_concurrency),
            "1" if settings.paused else "0",
            str(settings.version),
            "1" if force else "",
        ]
        (applied,) = await self._scripts.run("limits.lua", [(_KEYS, args)])
        return bool(applied)

    async def held_version(self) -> int:
        """The version of ops' record Redis holds; -1 when it holds none (never copied, or
        lost with Redis's data): then no permit is granted (``acquire.lua``)."""
        ((version,),) = await self._records.fields([FieldsRead(keys.LIMITS, (keys.VERSION,))])
        return int(version) if version is not None else -1

    async def state(self) -> FlowState:
        (limits, flow) = await self._records.fields(
            [
                FieldsRead(
                    keys.LIMITS,
                    (keys.RATE, keys.BURST, keys.CONCURRENCY, keys.PAUSED, keys.VERSION),
                ),
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
            version=int(limits[4]) if limits[4] is not None else 0,
        )
