"""How the gateway is served over HTTP: the runner ``gateway serve`` uses.

Requests aiohttp's HTTP parser refuses (a header over 8190 bytes, a malformed chunk,
Content-Length with Transfer-Encoding, a request line that is not HTTP) never reach a route, so
the guard cannot answer them: aiohttp's ``RequestHandler.handle_error`` does, in ``text/plain``.
:class:`ProblemRequestHandler` answers them as problems with an ``X-Request-ID`` instead.

It also bounds the headers: aiohttp has no timeout for them, and the body deadline starts only
once a handler runs, so a client sending a header byte now and then held its connection for as
long as it liked (up to ``keepalive_timeout``, an hour on a bare runner). Headers must be
complete within ``GATEWAY_BODY_TIMEOUT_SECONDS`` (the same setting: the headers and the body
are each a read of one request) counted from the request's first byte; otherwise the answer is
408 ``request_timeout`` and the connection closes. A connection with no request under way (just
opened, or between keep-alive requests) is not bounded by it: ``keepalive_timeout`` is.

aiohttp offers no setting for the protocol class: ``web.Server`` (the protocol factory)
instantiates ``RequestHandler`` by name, and ``AppRunner`` builds a plain ``web.Server``. So
:class:`GatewayRunner` builds, from the plain server ``AppRunner`` makes, a
:class:`ProblemServer` whose factory makes :class:`ProblemRequestHandler`, for this runner only:
no global patch of aiohttp, and a test server that wants the same behaviour uses this runner.
What this relies on of aiohttp's internals (3.14) is pinned by ``tests/test_wire.py``
which fails loudly if an upgrade changes it.

What aiohttp does not allow, even so:

- The request's own ``X-Request-ID`` cannot be echoed: the parser drops the headers of a request
  it refuses (the handler gets an empty placeholder request), so the answer carries a fresh id.
- An error found after the answer began (the output already written) cannot be answered: aiohttp
  closes the connection.
- A malformed chunk that arrives after the request was handed to its route does not fail the
  request's body: aiohttp stops feeding it, and the body deadline answers 408.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from gateway.http import problems
from gateway.http.guard import X_REQUEST_ID, new_request_id
from gateway.http.request_metrics import REQUEST_METRICS
from gateway.http.state import SETTINGS

log = structlog.get_logger("gateway.http")
# The route label of requests answered by the parser's error path.
UNPARSED: Final = "unparsed"
# Bodies are decoded by the codec (``gateway.http.codec``), which answers a bad or unknown
# Content-Encoding as a problem; aiohttp would raise past the handler (or before routing).
HANDLER_ARGS: Final[dict[str, Any]] = {"auto_decompress": False}
# The handler keyword carrying the header deadline (seconds); aiohttp's own take no such thing.
HEADER_TIMEOUT: Final = "header_timeout"
_DEFAULT_HEADER_TIMEOUT: Final = 10.0
# aiohttp's parsing, called without ``super()``'s lookup: it runs for every read of every
# request (measured: the override costs ~70 ns a read, against ~100 us a request).
_parse: Final = RequestHandler.data_received


class ProblemRequestHandler(RequestHandler):
    """aiohttp's HTTP protocol, answering the requests it cannot route as problems, and the
    requests whose headers do not arrive in time as 408."""

    __slots__ = ("_header_timeout", "_headers_due")

    def __init__(
        self, manager: web.Server, *, header_timeout: float = _DEFAULT_HEADER_TIMEOUT, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._headers_due: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._close or self._force_close:
            # aiohttp drops every byte once a connection is closing; see _drain_body.
            self._drain_body(data)
            return
        _parse(self, data)
        # On the hot path (a request whole in one read) this is two attribute reads: the waiter
        # is then done, or None while a request is handled.
        waiter = self._waiter
        if (waiter is not None and not waiter.done()) or self._request_count == 0:
            # No request parsed from what came since the last one (``_request_count == 0``:
            # the first request, possibly before ``start`` waits): these are header bytes.
            if self._headers_due is None and data and not (self._close or self._force_close):
                self._headers_due = self._loop.call_later(self._header_timeout, self._headers_late)
        elif self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def _drain_body(self, data: bytes) -> None:
        """Feed the body of the request being handled, though the connection is closing.

        Shutdown closes every connection (``Server.pre_shutdown``, then ``shutdown``) before it
        waits for their handlers, and aiohttp's ``data_received`` ignores whatever arrives once
        closing: a handler reading its body when SIGTERM came got no more of it and answered
        408 at its body deadline, past the drain. Only that body is parsed: a request
        pipelined behind it is never served, as ``start`` stops after the current one.
        """
        request = self._current_request
        if request is None or request.content.is_eof() or self.transport is None:
            return
        close, force_close = self._close, self._force_close
        self._close = self._force_close = False
        try:
            _parse(self, data)
        finally:
            self._close, self._force_close = close, force_close

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        """Headers not complete in time: answer 408 through the error path and close.

        The answer is queued as a parser error is, so ``start`` writes it (with its id and
        metrics) and closes the connection, as it does for any request ``handle_error`` answers.
        """
        self._headers_due = None
        if self.transport is None or self._close or self._force_close or self._messages:
            return
        self._close = True  # parse nothing more: the connection ends after this answer
        detail = f"request headers not complete within {self._header_timeout:g} s"
        self._messages.append(
            (_ErrInfo(status=408, exc=TimeoutError(detail), message=detail), EMPTY_PAYLOAD)
        )
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # As aiohttp's own: some of an answer is out, another cannot follow.
            raise ConnectionError("response already started; cannot send an error after it")
        request_id = new_request_id()
        if status >= 500:
            log.error("http_error", status=status, request_id=request_id, exc_info=exc)
        else:
            # A client's malformed or late request: not the gateway's error, and cheap to flood.
            log.debug("bad_http_request", status=status, request_id=request_id, error=message)
        code = "bad_encoding" if isinstance(exc, ContentEncodingError) else None
        detail = (message or "").strip().split("\n", 1)[0][:200] or "malformed HTTP request"
        response = problems.for_status(status, detail, request_id, code=code)
        response.headers[X_REQUEST_ID] = request_id
        response.force_close()
        REQUEST_METRICS.observe(UNPARSED, request.method, status, 0.0)
        REQUEST_METRICS.problem(UNPARSED, response[problems.PROBLEM_CODE])
        return response


class ProblemServer(web.Server):
    """``web.Server`` whose connections are :class:`ProblemRequestHandler`."""

    def __init__(
        self,
        handler: Any,
        *,
        request_factory: Any = None,
        handler_cancellation: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            handler,
            request_factory=request_factory,
            handler_cancellation=handler_cancellation,
            loop=loop,
            **kwargs,
        )
        # Kept here, not read back from aiohttp's private attributes on every connection.
        self._handler_loop = loop or asyncio.get_running_loop()
        self._handler_kwargs = kwargs

    @classmethod
    def like(cls, server: web.Server, **handler_kwargs: Any) -> ProblemServer:
        """A new server serving what ``server`` serves, with the same handler arguments."""
        return cls(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            # The arguments aiohttp collected (debug, access log class, handler_args, runner
            # kwargs); no public accessor exists. Pinned by tests/test_wire.py.
            **{**server._kwargs, **handler_kwargs},
        )

    def __call__(self) -> RequestHandler:
        return ProblemRequestHandler(self, loop=self._handler_loop, **self._handler_kwargs)


class GatewayRunner(web.AppRunner):
    """``AppRunner`` serving with :class:`ProblemRequestHandler` and the gateway's settings.

    Handlers are never cancelled when their client disconnects (whatever the caller passes,
    e.g. aiohttp's test server): a write half-done by a cancelled handler would leave an outcome
    nobody learns, while a finished one is counted (499) and its effect is what a retry with
    the same id finds. The header deadline is the app's ``body_timeout_seconds``.
    """

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **{**kwargs, **HANDLER_ARGS, "handler_cancellation": False})

    async def _make_server(self) -> web.Server:
        # AppRunner's own runs the app's start-up and builds the plain server; this one serves
        # the same app and arguments with the gateway's protocol.
        plain = await super()._make_server()
        settings = self.app.get(SETTINGS)
        timeout = settings.body_timeout_seconds if settings else _DEFAULT_HEADER_TIMEOUT
        return ProblemServer.like(plain, **{HEADER_TIMEOUT: timeout})
