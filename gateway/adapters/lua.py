"""Lua scripts as the Redis port holds them, and the bound on redis-py calls in flight."""

from __future__ import annotations

import asyncio
import hashlib
import re
from importlib import resources
from typing import Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from gateway.errors import RETRY_AFTER, Overloaded

_LIB: Final = "lib.lua"
# A lib.lua may build on another package's: ``--! include gateway.atp`` as a line of its own.
_INCLUDE: Final = re.compile(r"^--! include ([\w.]+)$", re.MULTILINE)


def lua_source(package: str, name: str) -> str:
    """A script's text as Redis runs it: the libs it builds on, its package's ``lib.lua``, then
    the script itself (Redis cannot include one script from another)."""
    return lua_libs(package) + resources.files(package).joinpath(name).read_text()


def lua_libs(package: str) -> str:
    """The libs a package's scripts run after: those its ``lib.lua`` includes, then its own."""
    return "".join(_lib_chain(package, set()))


def _lib_chain(package: str, seen: set[str]) -> list[str]:
    if package in seen:
        return []
    seen.add(package)
    lib = resources.files(package).joinpath(_LIB)
    if not lib.is_file():
        return []
    text = lib.read_text()
    chain = [part for base in _INCLUDE.findall(text) for part in _lib_chain(base, seen)]
    return [*chain, text + "\n"]


class LuaScript:
    """One script file: its text, its SHA1 and redis-py's wrapper for cluster routing."""

    def __init__(self, client: aioredis.Redis | RedisCluster, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
        self.wrapper: AsyncScript = client.register_script(text)


class CallLimiter:
    """At most ``size`` calls at once; a caller waits until its deadline at most, then 503."""

    def __init__(self, size: int) -> None:
        self._slots = asyncio.Semaphore(size)

    async def acquire(self, deadline: float) -> None:
        """Take a slot by ``deadline`` (loop time) or raise 503 ``overloaded``."""
        slots = self._slots
        if not slots.locked():
            await slots.acquire()  # free: no timer
            return
        try:
            async with asyncio.timeout_at(deadline):
                await slots.acquire()
        except TimeoutError:
            raise Overloaded(
                "too many Redis calls waiting; retry shortly", retry_after=RETRY_AFTER
            ) from None

    def release(self) -> None:
        self._slots.release()
