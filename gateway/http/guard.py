"""What wraps every handler: request id, role check, errors as problems, metrics, access log.

It is applied per route when the routes are registered, not as an aiohttp middleware: a
middleware makes aiohttp add a second layer of its own to every request, and the route's name
and role are known at registration, so nothing is looked up per request. A catch-all route, last
in the table, answers paths no route matches (404) and known paths asked with the wrong method
(405) as problems too.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Final

import structlog
from aiohttp import hdrs, web
from multidict import istr

from gateway.errors import ClientGone, GatewayError, RequestTimeout, ShuttingDown
from gateway.http import problems
from gateway.http.auth import Authenticator
from gateway.http.request_metrics import REQUEST_METRICS
from gateway.lifecycle import Lifecycle
from gateway.logs import REQUEST_ID
from gateway.settings import Settings

log = structlog.get_logger("gateway.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Header names as istr: multidict looks them up without folding their case per request.
X_REQUEST_ID: Final = istr("X-Request-ID")
_INCOMING_ID: Final = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\Z")
# Unique across processes (random prefix) and cheap within one (a counter): uuid4 reads
# os.urandom, a syscall per request.
_ID_PREFIX: Final = os.urandom(6).hex() + "-"
_ids = itertools.count(1)
# Probes and scrapes keep answering while the gateway drains.
_ALWAYS_OPEN: Final = frozenset({"/healthz", "/readyz", "/metrics"})
_ROLES: dict[Handler, str] = {}
_UNMATCHED: Final = "unmatched"
_PATTERN: Final = re.compile(r"\{(\w+):[^}]*\}")
# The metrics' status for a request whose client hung up before its answer (nginx's code).
CLIENT_GONE: Final = ClientGone.http_status


# At most one ``request_failed`` line per (code, route) this often: during an outage the gates
# fail requests in microseconds, and a client's retry loop would otherwise turn into thousands
# of synchronous log writes a second on the event loop. Every failure is still counted in
# ``gateway_http_requests_total`` by status.
FAILURE_LOG_INTERVAL: Final = 1.0


class LogThrottle:
    """Admits one event per key per ``interval`` seconds and counts the ones it turns away.

    Keys are few by construction (error codes x route names), so the maps stay small.
    """

    __slots__ = ("_clock", "_interval", "_next", "_suppressed")

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._interval = interval
        self._next: dict[Hashable, float] = {}
        self._suppressed: dict[Hashable, int] = {}

    def admit(self, key: Hashable) -> int | None:
        """``None`` to leave this one out; else how many were left out since the last one."""
        now = self._clock()
        if now < self._next.get(key, 0.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._next[key] = now + self._interval
        return self._suppressed.pop(key, 0)


def new_request_id() -> str:
    """A fresh request id (the guard inlines the same expression on its hot path)."""
    return f"{_ID_PREFIX}{next(_ids):x}"


def requires(role: str) -> Callable[[Handler], Handler]:
    """Mark the role a handler's callers must hold; the guard enforces it."""

    def register(handler: Handler) -> Handler:
        _ROLES[handler] = role
        return handler

    return register


class Guard:
    def __init__(self, lifecycle: Lifecycle, auth: Authenticator, settings: Settings) -> None:
        self._lifecycle = lifecycle
        self._auth = auth
        self._access_log = settings.access_log
        self._failures = LogThrottle(FAILURE_LOG_INTERVAL)

    def add_routes(self, app: web.Application, tables: Iterable[web.RouteTableDef]) -> None:
        """Register every route wrapped, then the catch-all for 404 and 405."""
        for table in tables:
            for route in table:
                assert isinstance(route, web.RouteDef)
                name = _PATTERN.sub(r"{\1}", route.path)  # a metric label without the regex
                wrapped = self.wrap(route.handler, name, _ROLES.get(route.handler))
                app.router.add_route(route.method, route.path, wrapped, **route.kwargs)
        app.router.add_route("*", "/{_unmatched:.*}", self.wrap(_not_routed, _UNMATCHED, None))

    def wrap(self, handler: Handler, route_name: str, role: str | None) -> Handler:
        lifecycle, auth, access_log = self._lifecycle, self._auth, self._access_log
        failures = self._failures

        async def guarded(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            incoming = request.headers.get(X_REQUEST_ID)
            if incoming and _INCOMING_ID.match(incoming):
                request_id = incoming
            else:
                request_id = f"{_ID_PREFIX}{next(_ids):x}"
            token = REQUEST_ID.set(request_id)
            close = False
            try:
                if lifecycle.draining and request.path not in _ALWAYS_OPEN:
                    raise ShuttingDown(
                        "the gateway is shutting down; retry on another", retry_after=1
                    )
                if role is not None:
                    auth.require(request.headers.get(hdrs.AUTHORIZATION), role)
                response = await handler(request)
            except GatewayError as exc:
                if exc.http_status >= 500:
                    suppressed = failures.admit((exc.code, route_name))
                    if suppressed is not None:
                        log.warning(
                            "request_failed",
                            code=exc.code,
                            detail=exc.detail,
                            route=route_name,
                            path=request.path,
                            suppressed=suppressed,
                        )
                response = problems.from_error(exc, request_id)
                if isinstance(exc, RequestTimeout):
                    close = True
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
            response.headers[X_REQUEST_ID] = request_id
            elapsed = time.perf_counter() - started
            status = response.status
            if request.transport is None:
                # Hung up before its answer (mid-body included): nothing reaches anyone, and
                # it is the client's doing, so it is counted apart and not logged as an error.
                status = CLIENT_GONE
                log.debug("client_gone", request_id=request_id, path=request.path)
            REQUEST_METRICS.observe(route_name, request.method, status, elapsed)
            if status >= 400:
                code = response.get(problems.PROBLEM_CODE)
                if code is not None:
                    REQUEST_METRICS.problem(route_name, code)
            if access_log:
                log.info(
                    "http_request",
                    request_id=request_id,
                    method=request.method,
                    path=request.path,
                    status=status,
                    ms=round(elapsed * 1000, 3),
                )
            if close:
                await _answer_and_close(request, response)
            return response

        return guarded


async def _answer_and_close(request: web.Request, response: web.StreamResponse) -> None:
    """Send ``response`` and close the connection at once.

    Returned normally, a response to a request whose body is unread makes aiohttp read and
    discard the rest for up to 10 s ("lingering close") before it closes: a client too slow to
    send its body in time would hold its connection that much longer. Sent here, with the
    connection then closed, aiohttp finds the answer written and the connection gone.
    """
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # gone meanwhile: closing is all there is left to do
    finally:
        request.protocol.force_close()


async def _not_routed(request: web.Request) -> web.StreamResponse:
    """404, or 405 with ``Allow`` when another method of this path has a route."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical == "/{_unmatched}":
            continue
        match, methods = await resource.resolve(request)
        if match is None:
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))
    raise web.HTTPNotFound(text=f"no route for {request.path}")
