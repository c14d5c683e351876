"""What the availability domain needs from the outside, as protocols the adapters implement."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from gateway.errors import GatewayError


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


class ImmediateScriptRunner(ScriptRunner, Protocol):
    """A script runner that can also write one call at once, within the caller's step."""

    def run_now(
        self, name: str, keys: Sequence[str], args: Sequence[Any]
    ) -> asyncio.Future[list[Any]] | None: ...

    def must_rerun(self, reply: Any) -> bool:
        """Whether a reply of ``run_now`` says the script did not run and ``run`` must retry."""
        ...

    def script_error(self, message: str) -> GatewayError:
        """What an error a script step caught and answered as data means: Redis refusing a
        write (a 503 to retry) or damaged data or a defect (a 500)."""
        ...


class CommandWriter(Protocol):
    """Sends a batch of Redis commands now, in one round trip per node; raises on any error."""

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]: ...
