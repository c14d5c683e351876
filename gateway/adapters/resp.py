"""A minimal multiplexed Redis connection for the read hot path (single node only).

redis-py spends 100-200 µs of Python per call; the availability path sends thousands of tiny
reads a second. This connection packs a whole batch with ``hiredis.pack_command``, writes it in
one syscall and parses replies with ``hiredis.Reader`` (both C), matching replies to waiters in
FIFO order: Redis answers one connection's commands in order. Batches come from the command
batcher; reservation scripts may also be written at once (:meth:`RespConnection.send_now`) so
Redis starts on them while the gateway still works on the rest of the tick.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Sequence
from typing import Any, Final, cast

import hiredis
from redis.connection import parse_url
from redis.exceptions import ResponseError

_CONNECT_TIMEOUT: Final = 2.0


# Redis answers in micro- to milliseconds. A reply this late means a stalled server or a
# connection that died without a word (a half-open TCP link): drop it, fail its waiters (503)
# and open a new one, rather than let requests wait forever.
REPLY_TIMEOUT: Final = 5.0
_Waiter = tuple[asyncio.Future[list[Any]], list[Any], int, float]  # future, replies, count, sent


class _Protocol(asyncio.Protocol):
    def __init__(self, reply_timeout: float = REPLY_TIMEOUT) -> None:
        self._reader = hiredis.Reader()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._transport: asyncio.WriteTransport | None = None
        self._reply_timeout = reply_timeout
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_reply = time.monotonic()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, so this is a cast, not a check.
        self._transport = cast(asyncio.WriteTransport, transport)
        self._watch()

    def _watch(self) -> None:
        # One timer a connection, not one a command: it looks at the oldest waiter only.
        self._watchdog = asyncio.get_running_loop().call_later(
            self._reply_timeout / 4, self._check_replies
        )

    def _check_replies(self) -> None:
        # Silence counts from the later of the oldest waiter's send and the last bytes read:
        # Redis answers a pipelined chunk only when it has run all of it, so a busy server
        # still making progress is not taken for a dead one.
        if self._waiters and (
            time.monotonic() - max(self._waiters[0][3], self._last_reply) > self._reply_timeout
        ):
            self.lost = TimeoutError(f"no reply from redis within {self._reply_timeout} s")
            if self._transport is not None:
                self._transport.abort()  # connection_lost fails every waiter
            return
        self._watch()

    def send(self, payload: bytes, count: int) -> asyncio.Future[list[Any]]:
        if self._transport is None or self.lost is not None:
            raise ConnectionError(f"redis connection lost: {self.lost}")
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((future, [], count, time.monotonic()))
        self._transport.write(payload)
        return future

    def data_received(self, data: bytes) -> None:
        self._last_reply = time.monotonic()
        self._reader.feed(data)
        while self._waiters:
            future, replies, count, _ = self._waiters[0]
            while len(replies) < count:
                reply = self._reader.gets()
                if reply is False:
                    return
                if isinstance(reply, hiredis.ReplyError):
                    reply = ResponseError(str(reply))
                replies.append(reply)
            self._waiters.popleft()
            if not future.done():
                future.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.lost = self.lost or exc or ConnectionError("closed by server")
        while self._waiters:
            future = self._waiters.popleft()[0]
            if not future.done():
                future.set_exception(ConnectionError(f"redis connection lost: {self.lost}"))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class RespConnection:
    """One pipelined connection, opened lazily and reopened after it is lost."""

    def __init__(self, url: str, reply_timeout: float = REPLY_TIMEOUT) -> None:
        self._params: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self._reply_timeout = reply_timeout
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        params = self._params
        factory = functools.partial(_Protocol, self._reply_timeout)
        setup: list[tuple[Any, ...]] = []
        if params.get("password"):
            # The one-argument form also works on servers without ACLs (Redis < 6).
            user = params.get("username")
            setup.append(
                ("AUTH", user, params["password"]) if user else ("AUTH", params["password"])
            )
        if params.get("db"):
            setup.append(("SELECT", params["db"]))
        async with asyncio.timeout(_CONNECT_TIMEOUT):
            if "path" in params:
                _, protocol = await loop.create_unix_connection(factory, params["path"])
            else:
                _, protocol = await loop.create_connection(
                    factory, params.get("host", "127.0.0.1"), params.get("port", 6379)
                )
            try:
                if setup:
                    replies = await protocol.send(_pack(setup), len(setup))
                    errors = [r for r in replies if isinstance(r, ResponseError)]
                    if errors:
                        raise ConnectionError(f"redis connection setup failed: {errors[0]}")
            except BaseException:
                protocol.close()  # a timeout or a refusal must not leave the socket open
                raise
        return protocol

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send the commands in one write; error replies come back as exceptions in place."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            async with self._connecting:
                protocol = self._protocol
                if protocol is None or protocol.lost is not None:
                    protocol = self._protocol = await self._connect()
        return await protocol.send(_pack(commands), len(commands))

    def send_now(self, commands: Sequence[Sequence[Any]]) -> asyncio.Future[list[Any]] | None:
        """Write the commands at once, in this step of the caller, and return the future of
        their replies (error replies as exceptions in place); None while not connected, when
        :meth:`execute` must open the connection first."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            return None
        return protocol.send(_pack(commands), len(commands))

    async def close(self) -> None:
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None


# Encoded reads, by command: a storefront asks for the same few thousand positions over and
# over, and encoding costs ~0.4 µs a command against ~0.05 µs for a lookup. Bounded: cleared
# when full. Writes and scripts (unique arguments) are never kept.
_CACHED_VERBS: Final = frozenset({"HMGET", "GET"})
_CACHE_LIMIT: Final = 50_000
_encoded: dict[Sequence[Any], bytes] = {}


def _pack(commands: Sequence[Sequence[Any]]) -> bytes:
    out = []
    for command in commands:
        data = _encoded.get(command)
        if data is None:
            data = hiredis.pack_command(tuple(command))
            if command[0] in _CACHED_VERBS:
                if len(_encoded) >= _CACHE_LIMIT:
                    _encoded.clear()
                _encoded[command] = data
        out.append(data)
    return b"".join(out)
