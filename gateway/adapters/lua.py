"""Lua scripts as the Redis port holds them, and the bound on redis-py calls in flight."""

from __future__ import annotations

import asyncio
import hashlib

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from gateway.errors import RETRY_AFTER, Overloaded


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
