"""What the availability domain needs from the outside, as protocols the adapters implement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol


class CommandSender(Protocol):
    """Sends Redis commands, coalesced with others by the adapter into one round trip.

    Every port here fails with gateway errors only: 503 ``dependency_unavailable`` when nothing
    was sent (or only reads), 503 ``outcome_unknown`` when a write was sent and not answered."""

    async def call_many(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]: ...

    async def call(self, *command: Any) -> Any: ...


class ScriptRunner(Protocol):
    """Runs a named Lua script once per (keys, args) call and returns the replies in order."""

    async def run(
        self,
        name: str,
        calls: Sequence[tuple[Sequence[str], Sequence[Any]]],
        cost: int | None = None,
    ) -> list[Any]: ...


class CommandWriter(Protocol):
    """Sends a batch of Redis commands now, in one round trip per node; raises on any error."""

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]: ...


class SafetyStockRow(NamedTuple):
    """One safety-stock setting: ``sku`` empty for the location's default."""

    location: str
    sku: str
    quantity: int


class ConfigSnapshot(NamedTuple):
    """The whole location config as of one version, read in one snapshot."""

    version: int
    groups: Sequence[tuple[str, Sequence[str]]]
    safety_stock: Sequence[SafetyStockRow]


class LocationConfigRecord(Protocol):
    """The durable record of the location config (groups and safety stock) and its version.

    Each save applies its change and bumps the version in one transaction and returns the new
    version. Failures are gateway errors: 503 ``dependency_unavailable`` when nothing was
    applied (failed before COMMIT was sent), 503 ``outcome_unknown`` when COMMIT was sent and
    not answered."""

    async def version(self) -> int:
        """The version the record holds now."""
        ...

    async def snapshot(self) -> ConfigSnapshot:
        """Everything, in one consistent read. May be slow for its size: it has a longer
        deadline of its own, and its timeout says nothing about the record's health."""
        ...

    async def save_group(self, group: str, locations: Sequence[str]) -> int: ...

    async def save_safety_stock(self, rows: Sequence[SafetyStockRow]) -> int: ...
