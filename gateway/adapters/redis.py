"""Redis connections: one client for a single node or a Redis Cluster, and Lua scripts from files.

The rest of the gateway talks to :class:`RedisPort`; it does not care whether a cluster routes
its commands. On a single node (no TLS) batches go through the lean multiplexed
:class:`RespConnection`; on a cluster, through redis-py, which routes by slot. Scripts are loaded
from ``.lua`` files and re-loaded after NOSCRIPT (a restart or a failover).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from gateway.adapters.batcher import CommandBatcher
from gateway.adapters.resp import RespConnection

# Bounds how many single-slot script calls a cluster client has in flight for one request.
_CLUSTER_FANOUT: Final = 64

_LIB: Final = "lib.lua"
ScriptCall = tuple[Sequence[str], Sequence[str | int | bytes]]


class LuaScript:
    """One script file: its text, its SHA1 and redis-py's wrapper for cluster routing."""

    def __init__(self, client: aioredis.Redis | RedisCluster, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
        self.wrapper: AsyncScript = client.register_script(text)


class RedisPort:
    """The gateway's Redis: pipelined command batches and Lua scripts, single node or cluster."""

    def __init__(self, client: aioredis.Redis | RedisCluster, fast: RespConnection | None) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self._fast = fast

    @classmethod
    def from_url(cls, url: str, *, cluster: bool, timeout: float = 2.0) -> RedisPort:
        if cluster:
            return cls(RedisCluster.from_url(url, decode_responses=False), None)
        fast = None if url.startswith("rediss://") else RespConnection(url)
        client = aioredis.Redis.from_url(url, decode_responses=False, max_connections=64)
        return cls(client, fast)

    def script(self, package: str, name: str) -> LuaScript:
        """Load ``name`` from ``package``, after the package's ``lib.lua`` when it has one."""
        files = resources.files(package)
        lib = files.joinpath(_LIB)
        prefix = lib.read_text() + "\n" if lib.is_file() else ""
        return LuaScript(self.client, prefix + files.joinpath(name).read_text())

    async def execute(
        self, commands: Sequence[Sequence[Any]], *, raise_on_error: bool = True
    ) -> list[Any]:
        """Send commands in one round trip per node. With ``raise_on_error=False`` a failed
        command's slot holds its exception instead."""
        if self._fast is not None:
            replies = await self._fast.execute(commands)
            if raise_on_error:
                for reply in replies:
                    if isinstance(reply, Exception):
                        raise reply
            return replies
        pipe: Any = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=raise_on_error)  # type: ignore[no-any-return]

    async def run_script(
        self,
        script: LuaScript,
        calls: Sequence[ScriptCall],
        batcher: CommandBatcher | None = None,
        cost: int | None = None,
    ) -> list[Any]:
        """Run one script per call: pipelined on a single node (in the batcher's next batch when
        one is given); on a cluster each call is routed to the node of its keys."""
        if not calls:
            return []
        if self.cluster:
            gate = asyncio.Semaphore(_CLUSTER_FANOUT)

            async def one(keys: Sequence[str], args: Sequence[str | int | bytes]) -> Any:
                async with gate:
                    return await script.wrapper(keys=keys, args=args)

            return list(await asyncio.gather(*(one(k, a) for k, a in calls)))
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls]

        async def send(batch: Sequence[tuple[Any, ...]]) -> list[Any]:
            if batcher is None:
                return await self.execute(batch, raise_on_error=False)
            return await batcher.call_many(batch, dedupe=False, raise_on_error=False, cost=cost)

        replies = await send(commands)
        missing = [i for i, r in enumerate(replies) if is_noscript(r)]
        if missing:
            # The server lost its script cache: load once, then run only what did not run.
            await self.execute([("SCRIPT", "LOAD", script.text)])
            again = await send([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def script_now(
        self, script: LuaScript, keys: Sequence[str], args: Sequence[str | int | bytes]
    ) -> asyncio.Future[list[Any]] | None:
        """Write one script call at once on the lean connection and return the future of its
        one-element reply list (an error reply, NOSCRIPT included, as an exception in it).
        None where that cannot be done now (a cluster, TLS, a connection not yet open): use
        :meth:`run_script`."""
        if self._fast is None:
            return None
        return self._fast.send_now([("EVALSHA", script.sha, len(keys), *keys, *args)])

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        if self._fast is not None:
            await self._fast.close()
        await self.client.aclose()


def is_noscript(reply: Any) -> bool:
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")
    )


class ScriptRegistry:
    """Lua scripts of one package, by file name, run through a :class:`RedisPort`."""

    def __init__(
        self, port: RedisPort, package: str, batcher: CommandBatcher | None = None
    ) -> None:
        self._port = port
        self._package = package
        self._batcher = batcher
        self._scripts: dict[str, LuaScript] = {}

    async def run(
        self, name: str, calls: Sequence[ScriptCall], cost: int | None = None
    ) -> list[Any]:
        return await self._port.run_script(self._script(name), calls, self._batcher, cost)

    def run_now(
        self, name: str, keys: Sequence[str], args: Sequence[str | int | bytes]
    ) -> asyncio.Future[list[Any]] | None:
        """Start one call of ``name`` at once (see :meth:`RedisPort.script_now`), or None."""
        return self._port.script_now(self._script(name), keys, args)

    @staticmethod
    def must_rerun(reply: Any) -> bool:
        return is_noscript(reply)

    def _script(self, name: str) -> LuaScript:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self._port.script(self._package, name)
        return script
