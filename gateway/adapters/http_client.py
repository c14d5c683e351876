"""A lean HTTP/1.1 client for one origin: keep-alive connections, one request at a time each.

Why not aiohttp's client: at the ERP rates ops ask for (thousands of orders a second from one
process) its per-request machinery (request and response objects, payload registry, timers,
tracing hooks, the connector's bookkeeping) was ~45% of the writer's CPU, more than the rest of
an order's trip together. The writer needs one thing: POST a body to one origin with a few
headers and read the status, ``Retry-After`` and the body. This does that on asyncio protocols
with ``httptools`` (llhttp, the parser Node.js uses) reading the responses; TLS is asyncio's.

Connections are pooled (LIFO, so a quiet pool lets the oldest go idle and expire) and never
shared by two requests at once. A connection idle longer than ``idle_seconds`` is closed rather
than reused: servers close idle keep-alive connections on their own timers (Node's default is
5 s), and a request written into one the server is closing would fail. Should a reused
connection still fail before any byte of the answer, the request is written once more on a new
connection: nothing was answered, and the ERP de-duplicates by ``Idempotency-Key`` anyway.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Final, NamedTuple, cast

import httptools
from yarl import URL

_DEFAULT_IDLE_SECONDS: Final = 4.0
_BREAKS: Final = frozenset("\r\n\0")


class HttpAnswer(NamedTuple):
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes


class ConnectionLostError(ConnectionError):
    """The connection closed before the whole answer came; ``answered`` if part of it did."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the parser's callbacks fill the answer being read."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[HttpAnswer] | None = None
        self._headers: dict[str, str] = {}
        self._header_name = ""
        self._body: list[bytes] = []
        self._answered = False  # a byte of the current answer came
        self._headers_done = False
        self._until_eof = False  # no length, not chunked: the body ends with the connection
        self._stray = False  # an answer began that no request asked for
        self.reusable = True

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._answered = True
        if self._waiter is None:  # bytes nobody asked for: the stream cannot be trusted
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionLostError(f"bad HTTP answer: {exc}", answered=True))
            self.close()
            return
        if self._stray:  # more came after the answer, in the same read: not to be trusted
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._until_eof and self._headers_done:
            self._complete()
            return
        reason = f"connection closed: {exc}" if exc else "connection closed by the server"
        self._fail(ConnectionLostError(reason, answered=self._answered))

    # httptools callbacks

    def on_message_begin(self) -> None:
        # A fresh dict per answer: one handed out is never written to again.
        self._headers = {}
        self._body = []
        self._headers_done = self._until_eof = False
        if self._waiter is None:
            self._stray = True
            self.reusable = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._stray:
            self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True
        headers = self._headers
        self._until_eof = (
            "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        )

    def on_body(self, body: bytes) -> None:
        if not self._stray:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._stray:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # interim (100 Continue, 103 Early Hints): the answer follows
        self.reusable = status != 101 and self._parser.should_keep_alive()
        self._complete()

    # the request

    def start(self, request: bytes) -> asyncio.Future[HttpAnswer]:
        assert self.transport is not None
        self._waiter = waiter = self._loop.create_future()
        self._answered = False
        self.transport.write(request)
        return waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            status = self._parser.get_status_code()
            waiter.set_result(HttpAnswer(status, self._headers, b"".join(self._body)))

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class OriginClient:
    """POSTs to one origin (``scheme://host:port``) over a pool of keep-alive connections."""

    def __init__(
        self,
        origin: str,
        *,
        user_agent: str = "atp-gateway",
        idle_seconds: float = _DEFAULT_IDLE_SECONDS,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = URL(origin)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"not an http(s) origin: {origin!r}")
        self._host = url.host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if url.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        host = url.host if url.is_default_port() else f"{url.host}:{self._port}"
        if ":" in url.host and not url.host.startswith("["):  # an IPv6 literal
            host = f"[{url.host}]" + ("" if url.is_default_port() else f":{self._port}")
        if _BREAKS.intersection(user_agent):
            raise ValueError("the user agent holds a line break")
        self._fixed = f"Host: {host}\r\nUser-Agent: {user_agent}\r\n".encode("latin-1")
        self._idle_seconds = idle_seconds
        self._idle: collections.deque[_Connection] = collections.deque()
        self._busy: set[_Connection] = set()
        self._closed = False

    async def post(
        self, path: str, headers: dict[str, str], body: bytes, timeout_seconds: float
    ) -> HttpAnswer:
        """The answer, or TimeoutError / OSError (ConnectionLostError among them) when none
        came. The timeout covers connecting, writing and the whole answer."""
        if self._closed:
            raise ConnectionLostError("the client is closed", answered=False)
        if _BREAKS.intersection(path) or " " in path:
            raise ValueError("the path holds a space or a line break")
        request = self._request(path, headers, body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, request, deadline)
            except ConnectionLostError as exc:
                if exc.answered or self._closed:
                    raise
                # A kept connection the server had closed: once more on a fresh one.
        conn = await self._connect(deadline)
        return await self._exchange(conn, request, deadline)

    async def close(self) -> None:
        self._closed = True
        for conn in (*self._idle, *self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()

    def _request(self, path: str, headers: dict[str, str], body: bytes) -> bytes:
        for name, value in headers.items():
            if _BREAKS.intersection(name) or _BREAKS.intersection(value):
                raise ValueError(f"header {name!r} holds a line break")
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        return b"".join(
            (
                b"POST ",
                path.encode("ascii"),
                b" HTTP/1.1\r\n",
                self._fixed,
                head.encode("latin-1"),
                b"Content-Length: %d\r\n\r\n" % len(body),
                body,
            )
        )

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest still open
            if conn.closed:
                continue
            if now - conn.idle_since > self._idle_seconds:
                conn.close()
                # Older ones are older still: close them all now.
                while idle:
                    idle.popleft().close()
                return None
            return conn
        return None

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError("no time left to connect")
        async with asyncio.timeout(left):
            _, conn = await loop.create_connection(
                lambda: _Connection(loop),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )
        return conn

    async def _exchange(self, conn: _Connection, request: bytes, deadline: float) -> HttpAnswer:
        loop = asyncio.get_running_loop()
        self._busy.add(conn)
        waiter = conn.start(request)
        # A plain timer rather than asyncio.timeout: no context manager or task lookup per call.
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            answer = await waiter
        except BaseException:
            # Timed out, cancelled or cut: the stream's state is unknown, so it goes.
            conn.close()
            raise
        finally:
            timer.cancel()
            self._busy.discard(conn)
        if conn.reusable and not conn.closed and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        return answer


def _expire(waiter: asyncio.Future[HttpAnswer]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no answer in time"))
