"""The one middleware: request id, error mapping to problems, metrics; and the role guard."""

from __future__ import annotations

import functools
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
from aiohttp import web

from gateway.errors import GatewayError, ShuttingDown
from gateway.http import problems
from gateway.http.state import AUTH, LIFECYCLE, SETTINGS
from gateway.metrics import HTTP_LATENCY, HTTP_REQUESTS

log = structlog.get_logger("gateway.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Probes and scrapes keep answering while the gateway drains.
_ALWAYS_OPEN: Final = frozenset({"/healthz", "/readyz", "/metrics"})


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    incoming = request.headers.get("X-Request-ID")
    request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        if request.app[LIFECYCLE].draining and request.path not in _ALWAYS_OPEN:
            raise ShuttingDown("the gateway is shutting down; retry on another", retry_after=1)
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
        structlog.contextvars.unbind_contextvars("request_id")
    response.headers["X-Request-ID"] = request_id
    elapsed = time.perf_counter() - started
    HTTP_REQUESTS.labels(route_name, request.method, str(response.status)).inc()
    HTTP_LATENCY.labels(route_name).observe(elapsed)
    if request.app[SETTINGS].access_log:
        log.info(
            "http_request",
            request_id=request_id,
            method=request.method,
            path=request.path,
            status=response.status,
            ms=round(elapsed * 1000, 3),
        )
    return response


def requires(role: str) -> Callable[[Handler], Handler]:
    """Guard a handler: the request's API key must carry ``role``."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            request.app[AUTH].require(request.headers.get("Authorization"), role)
            return await handler(request)

        return guarded

    return decorate
