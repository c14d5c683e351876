"""How the gateway is served over HTTP: the runner ``gateway serve`` uses.

Requests aiohttp's HTTP parser refuses (a header over 8190 bytes, a malformed chunk,
Content-Length with Transfer-Encoding, a request line that is not HTTP) never reach a route, so
the guard cannot answer them: aiohttp's ``RequestHandler.handle_error`` does, in ``text/plain``.
:class:`ProblemRequestHandler` answers them as problems with an ``X-Request-ID`` instead.

aiohttp offers no setting for the protocol class: ``web.Server`` (the protocol factory)
instantiates ``RequestHandler`` by name, and ``AppRunner`` builds a plain ``web.Server``. So
:class:`GatewayRunner` turns the server it builds into one whose factory makes
:class:`ProblemRequestHandler`, for this runner only: no global patch of aiohttp, and a test
server that wants the same behaviour uses this runner.

What aiohttp does not allow, even so:

- The request's own ``X-Request-ID`` cannot be echoed: the parser drops the headers of a request
  it refuses (the handler gets an empty placeholder request), so the answer carries a fresh id.
- An error found after the answer began (the output already written) cannot be answered: aiohttp
  closes the connection.
- A malformed chunk that arrives after the request was handed to its route does not fail the
  request's body: aiohttp stops feeding it, and the body deadline answers 408.
"""

from __future__ import annotations

from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.http import problems
from gateway.http.guard import X_REQUEST_ID, new_request_id
from gateway.http.request_metrics import REQUEST_METRICS

log = structlog.get_logger("gateway.http")
# The route label of requests answered by the parser's error path.
UNPARSED: Final = "unparsed"
# Bodies are decoded by the codec (``gateway.http.codec``), which answers a bad or unknown
# Content-Encoding as a problem; aiohttp would raise past the handler (or before routing).
HANDLER_ARGS: Final[dict[str, Any]] = {"auto_decompress": False}


class ProblemRequestHandler(RequestHandler):
    """aiohttp's HTTP protocol, answering the requests it cannot route as problems."""

    __slots__ = ()

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
            # A client's malformed request: not the gateway's error, and cheap to flood.
            log.debug("bad_http_request", status=status, request_id=request_id, error=message)
        code = "bad_encoding" if isinstance(exc, ContentEncodingError) else None
        detail = (message or "").strip().split("\n", 1)[0][:200] or "malformed HTTP request"
        response = problems.for_status(status, detail, request_id, code=code)
        response.headers[X_REQUEST_ID] = request_id
        response.force_close()
        REQUEST_METRICS.observe(UNPARSED, request.method, status, 0.0)
        return response


class _ProblemServer(web.Server):
    def __call__(self) -> RequestHandler:
        return ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``AppRunner`` serving with :class:`ProblemRequestHandler` and the gateway's settings.

    Handlers are never cancelled when their client disconnects (whatever the caller passes,
    e.g. aiohttp's test server): a write half-done by a cancelled handler would leave an outcome
    nobody learns, while a finished one is counted (499) and its effect is what a retry with
    the same id finds.
    """

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **{**kwargs, **HANDLER_ARGS, "handler_cancellation": False})

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The same object, with the protocol factory above: AppRunner has no parameter for it.
        server.__class__ = _ProblemServer
        return server
