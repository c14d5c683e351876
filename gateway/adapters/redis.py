"""Redis connections: one client for a single node or a Redis Cluster, and Lua scripts from files.

The rest of the gateway talks to :class:`RedisPort`; it does not care whether a cluster routes
its commands. Scripts are registered once with redis-py, which reloads them after NOSCRIPT
(a restart or a failover).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

# Bounds how many single-slot script calls a cluster client has in flight for one request.
_CLUSTER_FANOUT: Final = 64

ScriptCall = tuple[Sequence[str], Sequence[str | int | bytes]]


class RedisPort:
    """The gateway's Redis: pipelined command batches and Lua scripts, single node or cluster."""

    def __init__(self, client: aioredis.Redis | RedisCluster) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)

    @classmethod
    def from_url(cls, url: str, *, cluster: bool) -> RedisPort:
        if cluster:
            return cls(RedisCluster.from_url(url, decode_responses=False))
        # One pipelined batch per event-loop tick needs few connections; the cap bounds them.
        return cls(aioredis.Redis.from_url(url, decode_responses=False, max_connections=64))

    def script(self, package: str, name: str) -> AsyncScript:
        text = resources.files(package).joinpath(name).read_text()
        return self.client.register_script(text)

    async def execute(
        self, commands: Sequence[Sequence[Any]], *, raise_on_error: bool = True
    ) -> list[Any]:
        """Send commands in one round trip per node. With ``raise_on_error=False`` a failed
        command's slot holds its exception instead."""
        pipe: Any = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=raise_on_error)  # type: ignore[no-any-return]

    async def run_script(self, script: AsyncScript, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run one script per call, pipelined on a single node; on a cluster each call is routed
        to the node of its keys (they share one hash tag)."""
        if not calls:
            return []
        if self.cluster:
            gate = asyncio.Semaphore(_CLUSTER_FANOUT)

            async def one(keys: Sequence[str], args: Sequence[str | int | bytes]) -> Any:
                async with gate:
                    return await script(keys=keys, args=args)

            return list(await asyncio.gather(*(one(k, a) for k, a in calls)))
        pipe: Any = self.client.pipeline(transaction=False)
        for keys, args in calls:
            await script(keys=keys, args=args, client=pipe)
        return await pipe.execute()  # type: ignore[no-any-return]

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


class ScriptRegistry:
    """Lua scripts of one package, by file name, run through a :class:`RedisPort`."""

    def __init__(self, port: RedisPort, package: str) -> None:
        self._port = port
        self._package = package
        self._scripts: dict[str, AsyncScript] = {}

    async def run(self, name: str, calls: Sequence[ScriptCall]) -> list[Any]:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self._port.script(self._package, name)
        return await self._port.run_script(script, calls)
