"""Redis connections: one client for a single node or a Redis Cluster, and Lua scripts from files.

The rest of the gateway talks to :class:`RedisPort`; it does not care whether a cluster routes
its commands. On a single node (no TLS) batches go through the lean multiplexed
:class:`RespConnection`; on a cluster, through redis-py, which routes by slot. Script calls
reach it through :class:`gateway.adapters.scripts.ScriptRegistry` only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    MaxConnectionsError,
    RedisClusterException,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.adapters.gate import DependencyGate
from gateway.adapters.lua import CallLimiter, LuaScript, lua_source
from gateway.adapters.redis_errors import (
    NoAnswer,
    classify,
    combine,
    has_writes,
    no_reply,
    not_sent,
    raise_for_replies,
)
from gateway.adapters.resp import REPLY_TIMEOUT, RespConnection
from gateway.errors import DependencyDown, GatewayError

# Bounds how many single-slot script calls a cluster client has in flight for one request.
_CLUSTER_FANOUT: Final = 64
# redis-py calls in flight at once, per port: a burst beyond waits its turn (up to the Redis
# timeout, then 503 overloaded) instead of exhausting a node's pool, where redis-py's cluster
# client raises MaxConnectionsError (a 500) rather than wait. Each call holds at most one
# connection of any one node (a pipeline one per node), so the pools never run dry.
REDIS_PY_CONCURRENCY: Final = 64
# Connections a pool may open beyond the calls let through: the gate's probe, readiness.
_POOL_SPARE: Final = 4

ScriptCall = tuple[Sequence[str], Sequence[str | int | bytes]]
_PING: Final = (("PING",),)
_EVALSHA: Final = (("EVALSHA",),)
_T = TypeVar("_T")


class RedisPort:
    """The gateway's Redis: pipelined command batches and Lua scripts, single node or cluster.

    Every failure leaves here as a gateway error (see :mod:`gateway.adapters.redis_errors`).
    ``gate`` is closed while Redis is known down or stalled: calls then fail at once with 503
    ``dependency_unavailable`` and nothing is sent, until its probe gets an answer."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        fast: RespConnection | None,
        *,
        timeout: float = REPLY_TIMEOUT,
        concurrency: int = REDIS_PY_CONCURRENCY,
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.timeout = timeout
        self._fast = fast
        self.gate = DependencyGate("redis", self._probe, timeout=timeout)
        if fast is not None:
            fast.gate = self.gate
        self._limiter = CallLimiter(concurrency)

    @classmethod
    def from_url(cls, url: str, *, cluster: bool, timeout: float = REPLY_TIMEOUT) -> RedisPort:
        # No retries inside redis-py: a retried call doubles the wait past the timeout (and
        # the cluster client retried ten times), and a failed call is answered 503 at once.
        options: dict[str, Any] = {
            "decode_responses": False,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "max_connections": REDIS_PY_CONCURRENCY + _POOL_SPARE,
            "retry": Retry(NoBackoff(), 0),
        }
        if cluster:
            return cls(RedisCluster.from_url(url, **options), None, timeout=timeout)
        fast = (
            None
            if url.startswith("rediss://")
            else RespConnection(url, timeout, connect_timeout=timeout)
        )
        return cls(aioredis.Redis.from_url(url, **options), fast, timeout=timeout)

    def script(self, package: str, name: str) -> LuaScript:
        """Load ``name`` from ``package``, after the libs it builds on (see :func:`lua_source`)."""
        return LuaScript(self.client, lua_source(package, name))

    async def execute(
        self,
        commands: Sequence[Sequence[Any]],
        since: float | None = None,
        *,
        raise_on_error: bool = True,
    ) -> list[Any]:
        """Send commands in one round trip per node. With ``raise_on_error=False`` a failed
        command's slot holds its error reply instead. ``since``: when the request started
        waiting (``time.monotonic()``, e.g. queued in the batcher), now if not given; the
        timeout is counted from then, turn and reply together."""
        gate = self.gate
        if not gate.up:
            gate.check()
        fast = self._fast
        if fast is not None:
            replies = await fast.execute(commands, since)
        else:
            replies = await self._library_execute(commands, since)
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise_for_replies(replies, commands)
        return replies

    def _deadline(self, since: float | None) -> float:
        """The loop time by which a call must be answered: the timeout after its request
        started waiting. A request that has waited that long already is not sent at all."""
        budget = self.timeout
        if since is not None:
            budget -= time.monotonic() - since
            if budget <= 0:
                raise not_sent(f"waited more than {self.timeout} s to be sent")
        return asyncio.get_running_loop().time() + budget

    async def _call(
        self, deadline: float, call: Callable[[], Awaitable[_T]], commands: Sequence[Sequence[Any]]
    ) -> _T:
        """One redis-py call: its turn (beside the pool's other users) and its answer within
        one ``deadline``, so that a wait for a slot is not followed by a full timeout more."""
        await self._limiter.acquire(deadline)
        try:
            self.gate.check()  # it may have closed while this call waited its turn
            loop = asyncio.get_running_loop()
            started = loop.time()
            scope = asyncio.timeout_at(deadline)
            try:
                async with scope:
                    return await call()
            except TimeoutError:
                if not scope.expired():
                    raise
                ran = loop.time() - started
                reason = f"no reply from redis within {self.timeout} s"
                # Redis left the call unanswered for most of a timeout: a stall, as a socket
                # timeout would say. A call cut short because its turn came late is not one.
                if ran >= self.timeout / 2:
                    self.gate.trip(reason)
                raise no_reply(reason, commands) from None
        finally:
            self._limiter.release()

    async def _library_execute(
        self, commands: Sequence[Sequence[Any]], since: float | None = None
    ) -> list[Any]:
        deadline = self._deadline(since)
        pipe: Any = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        try:
            replies: list[Any] = await self._call(
                deadline, lambda: pipe.execute(raise_on_error=False), commands
            )
        except GatewayError:
            raise  # not sent (gate, turn) or out of time: classified already
        except Exception as exc:  # every failure leaves as the gateway error it means
            error = self._failed(exc, commands)
            if (
                self.cluster
                and len(commands) > 1
                and isinstance(error, DependencyDown)
                and not isinstance(exc, RedisClusterException)  # failed before any node
                and has_writes(commands)
            ):
                # A cluster pipeline goes to each node at once: one node unreachable says
                # nothing of the writes the others may have applied.
                error = NoAnswer.because(f"{error.detail}; other nodes may have written")
            raise error from exc
        for reply in replies:
            # A cluster pipeline puts a node's timeout in place of its commands' replies.
            if isinstance(reply, (RedisConnectionError, RedisTimeoutError)):
                self.gate.trip(f"{type(reply).__name__}: {reply}")
                break
        return replies

    def _failed(self, exc: BaseException, commands: Sequence[Sequence[Any]]) -> GatewayError:
        # A node that cannot be reached or did not answer in time closes the gate; a full
        # pool is load, not an outage.
        if isinstance(
            exc, (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException)
        ) and not isinstance(exc, MaxConnectionsError):
            self.gate.trip(f"{type(exc).__name__}: {exc}")
        return classify(exc, commands)

    async def run_on_cluster(self, script: LuaScript, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run one script per call, each routed to the node of its keys (in parallel)."""
        fanout = asyncio.Semaphore(_CLUSTER_FANOUT)
        deadline = self._deadline(None)  # the calls of one request share one

        async def one(keys: Sequence[str], args: Sequence[str | int | bytes]) -> Any:
            async with fanout:
                try:
                    return await self._call(
                        deadline, lambda: script.wrapper(keys=keys, args=args), _EVALSHA
                    )
                except GatewayError as exc:
                    return exc
                except Exception as exc:  # noqa: BLE001 - every failure is classified
                    return self._failed(exc, _EVALSHA)

        # Every call runs to its end, even when one fails: what the others did must be known
        # to answer honestly (none ran: dependency_unavailable; some did: outcome_unknown).
        results = list(await asyncio.gather(*(one(k, a) for k, a in calls)))
        errors = [r for r in results if isinstance(r, GatewayError)]
        if errors:
            raise combine(results, _EVALSHA * len(results), errors)
        return results

    def send_now(self, commands: Sequence[Sequence[Any]]) -> asyncio.Future[list[Any]] | None:
        """Write commands at once on the lean connection and return the future of their
        replies (an error reply as an exception in its place). None where that cannot be done
        now (a cluster, TLS, a connection not yet open). While the gate is closed, raises 503
        at once: nothing is sent."""
        gate = self.gate
        if not gate.up:
            gate.check()
        if self._fast is None:
            return None
        return self._fast.send_now(commands)

    async def ping(self) -> bool:
        """Whether Redis answers now (every primary of a cluster); a gateway error if not."""
        if not self.cluster:
            await self.execute(_PING)
            return True
        self.gate.check()
        client = self.client
        assert isinstance(client, RedisCluster)
        try:
            await self._call(
                self._deadline(None),
                lambda: client.ping(target_nodes=RedisCluster.PRIMARIES),
                _PING,
            )
        except GatewayError:
            raise
        except Exception as exc:
            raise self._failed(exc, _PING) from exc
        return True

    async def _probe(self) -> None:
        """The gate's question, asked while it is closed: does Redis answer again?"""
        if self._fast is not None:
            await self._fast.probe()
        elif isinstance(self.client, RedisCluster):
            await self.client.ping(target_nodes=RedisCluster.PRIMARIES)
        else:
            await self.client.ping()

    async def close(self) -> None:
        await self.gate.close()
        if self._fast is not None:
            await self._fast.close()
        await self.client.aclose()
