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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, cast

import hiredis
from redis.connection import parse_url
from redis.exceptions import ResponseError

from gateway.adapters.redis_errors import no_reply, not_sent

if TYPE_CHECKING:
    from gateway.adapters.gate import DependencyGate

# Redis answers in micro- to milliseconds. A reply this late means a stalled server or a
# connection that died without a word (a half-open TCP link): drop it, fail its waiters (503)
# and open a new one, rather than let requests wait forever. The gateway passes its setting
# (GATEWAY_REDIS_TIMEOUT_SECONDS); this is the default of direct users.
REPLY_TIMEOUT: Final = 2.0
# How often the one timer of a connection looks at its waiters, at most: a stall, or a reply
# overdue, is noticed within the timeout plus this.
_WATCH_EVERY: Final = 0.25
# future, replies so far, how many, when sent, the commands (to classify a failure, never read
# on success), when its request started waiting (the batcher's queue counts: the timeout is the
# request's whole wait, not the reply's alone)
_Waiter = tuple[asyncio.Future[list[Any]], list[Any], int, float, Sequence[Sequence[Any]], float]


class _Protocol(asyncio.Protocol):
    def __init__(
        self, reply_timeout: float = REPLY_TIMEOUT, on_stall: Callable[[str], None] | None = None
    ) -> None:
        self._reader = hiredis.Reader()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._transport: asyncio.WriteTransport | None = None
        self._reply_timeout = reply_timeout
        self._watch_every = min(reply_timeout / 4, _WATCH_EVERY)
        self._on_stall = on_stall
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
            self._watch_every, self._check_replies
        )

    def _check_replies(self) -> None:
        waiters = self._waiters
        if waiters:
            now = time.monotonic()
            timeout = self._reply_timeout
            # Silence counts from the later of the oldest waiter's send and the last bytes
            # read: Redis answers a pipelined chunk only when it has run all of it, so a busy
            # server still making progress is not taken for a dead one.
            if now - max(waiters[0][3], self._last_reply) > timeout:
                self.lost = TimeoutError(f"no reply from redis within {timeout} s")
                if self._on_stall is not None:
                    self._on_stall(str(self.lost))  # before the waiters hear: retries fail fast
                if self._transport is not None:
                    self._transport.abort()  # connection_lost fails every waiter
                return
            # Busy but answering (a fork or fsync stall, a heavy script, a backlog): no
            # request waits past its timeout. Its commands were written and may still run,
            # so a write is an unknown outcome; it keeps its place, for the replies to match.
            for future, _, _, _, commands, since in waiters:
                if now - since > timeout and not future.done():
                    future.set_exception(
                        no_reply(f"redis did not answer within {timeout} s (busy)", commands)
                    )
        self._watch()

    def send(
        self, payload: bytes, commands: Sequence[Sequence[Any]], since: float | None = None
    ) -> asyncio.Future[list[Any]]:
        """Write ``commands`` (packed in ``payload``); ``since``: when their request started
        waiting (``time.monotonic()``), now if not given."""
        if self._transport is None or self.lost is not None:
            raise not_sent(f"connection lost: {self.lost}")
        now = time.monotonic()
        waiters = self._waiters
        timeout = self._reply_timeout
        # Nothing is added behind replies overdue by more than the timeout: it would only wait
        # its own timeout out too (and grow Redis's backlog). Sending resumes once Redis has
        # caught up with what it was sent.
        if waiters and now - waiters[0][3] > timeout:
            raise not_sent(f"redis is more than {timeout} s behind with its replies")
        if since is None:
            since = now
        elif now - since > timeout:
            raise not_sent(f"waited more than {timeout} s to be sent")
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        waiters.append((future, [], len(commands), now, commands, since))
        self._transport.write(payload)
        return future

    def data_received(self, data: bytes) -> None:
        self._last_reply = time.monotonic()
        self._reader.feed(data)
        while self._waiters:
            future, replies, count, _, _, _ = self._waiters[0]
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
        reason = f"connection lost: {self.lost}"
        while self._waiters:
            future, _, _, _, commands, _ = self._waiters.popleft()
            if not future.done():
                # Written, not answered: a write may still run (a stalled server reads what
                # was sent when it wakes), so it is an unknown outcome, not a refusal.
                future.set_exception(no_reply(reason, commands))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class RespConnection:
    """One pipelined connection, opened lazily and reopened after it is lost.

    Failures come out as gateway errors (:mod:`gateway.adapters.redis_errors`): a connection
    that cannot be opened is ``dependency_unavailable``; commands written and not answered are
    ``outcome_unknown`` when they write. A failed connect or a stall trips ``gate`` (when set),
    so that the callers waiting behind it, and those after, fail at once. A server slow but
    answering trips nothing: each request stops waiting at its timeout, and while replies are
    overdue by more than the timeout nothing new is written (``dependency_unavailable``)."""

    def __init__(
        self,
        url: str,
        reply_timeout: float = REPLY_TIMEOUT,
        *,
        connect_timeout: float | None = None,
        gate: DependencyGate | None = None,
    ) -> None:
        self._params: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self._reply_timeout = reply_timeout
        self._connect_timeout = connect_timeout if connect_timeout is not None else reply_timeout
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()
        self.gate = gate

    def _stalled(self, reason: str) -> None:
        if self.gate is not None:
            self.gate.trip(reason)

    async def _connect(self) -> _Protocol:
        try:
            return await self._open()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, timed out, setup failed: all "down"
            reason = f"cannot connect: {type(exc).__name__}: {exc}".rstrip(": ")
            self._stalled(reason)
            raise not_sent(reason) from exc

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        params = self._params
        factory = functools.partial(_Protocol, self._reply_timeout, self._stalled)
        setup: list[tuple[Any, ...]] = []
        if params.get("password"):
            # The one-argument form also works on servers without ACLs (Redis < 6).
            user = params.get("username")
            setup.append(
                ("AUTH", user, params["password"]) if user else ("AUTH", params["password"])
            )
        if params.get("db"):
            setup.append(("SELECT", params["db"]))
        # A server that will not serve this connection (a password required or rotated, no
        # room for another client) says so in its first reply: hear it here, where it closes
        # the gate and is "not sent", rather than in place of a batch's first reply.
        setup.append(("PING",))
        async with asyncio.timeout(self._connect_timeout):
            if "path" in params:
                _, protocol = await loop.create_unix_connection(factory, params["path"])
            else:
                _, protocol = await loop.create_connection(
                    factory, params.get("host", "127.0.0.1"), params.get("port", 6379)
                )
            try:
                replies = await protocol.send(_pack(setup), setup)
                errors = [r for r in replies if isinstance(r, ResponseError)]
                if errors:
                    raise ConnectionError(f"redis connection setup failed: {errors[0]}")
            except BaseException:
                protocol.close()  # a timeout or a refusal must not leave the socket open
                raise
        return protocol

    async def execute(
        self, commands: Sequence[Sequence[Any]], since: float | None = None
    ) -> list[Any]:
        """Send the commands in one write; error replies come back as exceptions in place.
        ``since``: when their request started waiting (``time.monotonic()``); the timeout
        counts from then, and commands already older are not sent."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            async with self._connecting:
                protocol = self._protocol
                if protocol is None or protocol.lost is not None:
                    # Those queued behind a connect that failed do not each try again.
                    if self.gate is not None:
                        self.gate.check()
                    protocol = self._protocol = await self._connect()
        return await protocol.send(_pack(commands), commands, since)

    def send_now(self, commands: Sequence[Sequence[Any]]) -> asyncio.Future[list[Any]] | None:
        """Write the commands at once, in this step of the caller, and return the future of
        their replies (error replies as exceptions in place); None while not connected, when
        :meth:`execute` must open the connection first."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            return None
        return protocol.send(_pack(commands), commands)

    async def probe(self) -> None:
        """A fresh connection (its set-up PINGs: LOADING, MASTERDOWN... fail it); when it
        answers, it replaces the current one. A connection that stalled once is never trusted
        again, and a probe never queues behind commands a stalled server has not answered."""
        protocol = await self._connect()
        old, self._protocol = self._protocol, protocol
        if old is not None:
            old.close()

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
