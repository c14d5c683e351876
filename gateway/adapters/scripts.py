"""Every script call's one path to Redis: by file name, as EVALSHA, re-loaded after NOSCRIPT.

A :class:`ScriptRegistry` is what a domain's store holds as its :class:`gateway.ports.Scripts`.
On a single node its calls go out through the command batcher when it has one (sharing a round
trip with the tick's other commands) or at once on the port; on a cluster each call is routed to
the node of its keys. :meth:`ScriptRegistry.run_now` is the reservation coalescer's fast lane:
the same EVALSHA written on the lean connection without waiting for the next batch, falling back
to :meth:`ScriptRegistry.run` where that cannot be done (or the script must be loaded first).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

from redis.exceptions import NoScriptError, ResponseError

from gateway.adapters.batcher import CommandBatcher
from gateway.adapters.lua import LuaScript
from gateway.adapters.redis import RedisPort, ScriptCall
from gateway.adapters.redis_errors import classify, combine, error_reply, raise_for_replies
from gateway.errors import RETRY_AFTER, GatewayError, Overloaded

_EVALSHA: Final = (("EVALSHA",),)
# run_at_once calls awaiting their replies, at most (the batcher's own bound is 20,000 commands).
MAX_AT_ONCE: Final = 10_000


def is_noscript(reply: Any) -> bool:
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")
    )


class ScriptRegistry:
    """Lua scripts of one package, by file name (loaded after the libs they build on)."""

    def __init__(
        self, port: RedisPort, package: str, batcher: CommandBatcher | None = None
    ) -> None:
        self._port = port
        self._package = package
        self._batcher = batcher
        self._scripts: dict[str, LuaScript] = {}
        self._at_once = 0  # run_at_once calls written and not answered yet

    async def run(
        self, name: str, calls: Sequence[ScriptCall], cost: int | None = None
    ) -> list[Any]:
        """One run of ``name`` per (keys, args) call; the replies in order. ``cost``: the
        batcher's measure of the Redis work, when the caller knows it better."""
        if not calls:
            return []
        script = self._script(name)
        if self._port.cluster:
            return await self._port.run_on_cluster(script, calls)
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls]
        replies = await self._send(commands, cost)
        missing = [i for i, r in enumerate(replies) if is_noscript(r)]
        if missing:
            # The server lost its script cache: load once, then run only what did not run.
            try:
                await self._port.execute([("SCRIPT", "LOAD", script.text)])
                again = await self._send([commands[i] for i in missing], cost)
            except GatewayError as exc:
                if len(missing) == len(commands):
                    raise
                # The calls that did run may not be taken back.
                raise combine(replies, commands, [exc]) from exc
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise_for_replies(replies, commands)
        return replies

    async def _send(self, commands: Sequence[tuple[Any, ...]], cost: int | None) -> list[Any]:
        if self._batcher is None:
            return await self._port.execute(commands, raise_on_error=False)
        return await self._batcher.call_many(
            commands, dedupe=False, raise_on_error=False, cost=cost
        )

    async def run_at_once(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One call of ``name``, written within the caller's step instead of with the
        batcher's next batch. That batch leaves two loop turns later, and under load each turn
        is long (every connection's requests of the tick run in it): a confirm waited ~2 ms
        for its settle at 64 connections, with the gateway a quarter idle meanwhile. Costs one
        write per call; for the calls a request waits on, not for sweeps of many."""
        if self._port.cluster:
            (reply,) = await self.run(name, [(keys, args)])
            return reply
        # The batcher's bound on what waits for Redis, kept for these calls too: past it, 503
        # at once (nothing written) rather than a connection that only grows its backlog.
        if self._at_once >= MAX_AT_ONCE:
            raise Overloaded("too many script calls waiting for Redis", retry_after=RETRY_AFTER)
        sent = self.run_now(name, keys, args)
        if sent is None:  # not connected: the general path connects first
            (reply,) = await self.run(name, [(keys, args)])
            return reply
        self._at_once += 1
        try:
            (reply,) = await sent
        except GatewayError:
            raise
        except Exception as exc:  # what it means for this call
            raise self.failure(exc) from exc
        finally:
            self._at_once -= 1
        if is_noscript(reply):  # it never ran: the general path loads the script
            (reply,) = await self.run(name, [(keys, args)])
        elif isinstance(reply, Exception):
            raise self.script_error(str(reply))
        return reply

    def run_now(
        self, name: str, keys: Sequence[str], args: Sequence[str | int | bytes]
    ) -> asyncio.Future[list[Any]] | None:
        """Write one call of ``name`` at once and return the future of its one-element reply
        list (NOSCRIPT included, as an exception: see :meth:`must_rerun`), or None where that
        cannot be done now (use :meth:`run`). While Redis is known down, raises 503 at once."""
        script = self._script(name)
        return self._port.send_now([("EVALSHA", script.sha, len(keys), *keys, *args)])

    @property
    def timeout(self) -> float:
        return self._port.timeout

    @staticmethod
    def must_rerun(reply: Any) -> bool:
        """Whether a :meth:`run_now` reply says the script was not loaded (run it again with
        :meth:`run`, which loads it)."""
        return is_noscript(reply)

    @staticmethod
    def failure(error: BaseException) -> GatewayError:
        """What a failed script call answers one of the requests that shared it, as a fresh
        exception (one shared by many would collect every raiser's traceback)."""
        return classify(error, _EVALSHA)

    @staticmethod
    def script_error(message: str) -> GatewayError:
        """What an error a script caught and answered means: Redis refusing a write it could
        make later (503, nothing written) or damaged data or a defect (500)."""
        return error_reply(ResponseError(message))

    def _script(self, name: str) -> LuaScript:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self._port.script(self._package, name)
        return script
