"""What the availability domain needs from the outside, as protocols the adapters implement."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol


class CommandSender(Protocol):
    """Sends Redis commands, coalesced with others by the adapter into one round trip."""

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


class CommandWriter(Protocol):
    """Sends a batch of Redis commands now, in one round trip per node; raises on any error."""

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]: ...
