"""The one middleware: request id, role check, error mapping to problems, metrics.

Everything here runs on every request, so it is kept to dict lookups and integer arithmetic:
the role of a handler is registered once by :func:`requires`, the request id is a process prefix
plus a counter, and metrics are plain counters exported at scrape time.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.errors import GatewayError, ShuttingDown
from gateway.http import problems
from gateway.http.auth import Authenticator
from gateway.http.request_metrics import REQUEST_METRICS
from gateway.lifecycle import Lifecycle
from gateway.logs import REQUEST_ID
from gateway.settings import Settings

log = structlog.get_logger("gateway.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_INCOMING_ID: Final = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\Z")
# Unique across processes (random prefix) and cheap within one (a counter): uuid4 reads
# os.urandom, a syscall per request.
_ID_PREFIX: Final = os.urandom(6).hex() + "-"
_ids = itertools.count(1)
# Probes and scrapes keep answering while the gateway drains.
_ALWAYS_OPEN: Final = frozenset({"/healthz", "/readyz", "/metrics"})
_ROLES: dict[Handler, str] = {}


def requires(role: str) -> Callable[[Handler], Handler]:
    """Register the role a handler's callers must hold; the middleware enforces it."""

    def register(handler: Handler) -> Handler:
        _ROLES[handler] = role
        return handler

    return register


def make_middleware(lifecycle: Lifecycle, auth: Authenticator, settings: Settings) -> Middleware:
    """The middleware, closed over the objects it reads on every request."""
    access_log = settings.access_log

    @web.middleware
    async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        incoming = request.headers.get("X-Request-ID")
        if incoming and _INCOMING_ID.match(incoming):
            request_id = incoming
        else:
            request_id = f"{_ID_PREFIX}{next(_ids):x}"
        match_info = request.match_info
        route = match_info.route.resource
        route_name = route.canonical if route is not None else "unmatched"
        token = REQUEST_ID.set(request_id)
        try:
            if lifecycle.draining and request.path not in _ALWAYS_OPEN:
                raise ShuttingDown("the gateway is shutting down; retry on another", retry_after=1)
            role = _ROLES.get(match_info.handler)
            if role is not None:
                auth.require(request.headers.get("Authorization"), role)
            response = await handler(request)
        except GatewayError as exc:
            if exc.http_status >= 500:
                log.warning("request_failed", code=exc.code, detail=exc.detail, path=request.path)
            response = problems.from_error(exc, request_id)
        except web.HTTPException as exc:
            response = problems.from_http_exception(exc, request_id)
        except Exception:
            log.exception("unhandled_error", path=request.path, method=request.method)
            response = problems.problem_response(
                500,
                "internal_error",
                "Internal error",
                "unexpected error; see the gateway log",
                request_id=request_id,
            )
        finally:
            REQUEST_ID.reset(token)
        response.headers["X-Request-ID"] = request_id
        elapsed = time.perf_counter() - started
        REQUEST_METRICS.observe(route_name, request.method, response.status, elapsed)
        if access_log:
            log.info(
                "http_request",
                request_id=request_id,
                method=request.method,
                path=request.path,
                status=response.status,
                ms=round(elapsed * 1000, 3),
            )
        return response

    return gateway_middleware
