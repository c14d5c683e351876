"""``gateway erp-sim``: a stand-in for a retailer's ERP that the order writers POST orders to.

Its own aiohttp process and port. The rules one order meets are in ``gateway.dev.erp_sim_state``.

Endpoints (JSON in and out):

- ``POST /orders`` (any JSON object, ``Idempotency-Key: <order_id>``): 201
  ``{"erp_order_id", "accepted_at"}``; 409 with the first answer for a key already accepted;
  400 without the key or with a body that is not a JSON object; 429 / 503 as the knobs say.
- ``GET | PUT /_sim/knobs``: read, or partly update (422 on a bad value), the :class:`Knobs`.
- ``GET /_sim/received``: the accepted orders (key, id, time, deliveries, body) and counters.
- ``GET /_sim/per_second``: ``{"seconds": {unix second: accepted}, "requests": {...: arrived}}``.
- ``GET | PUT /_sim/stock``: the ERP's on-hand ledger ``{"items": [{sku, location, on_hand}]}``;
  a PUT sets the positions it names. Each accepted order's ``lines`` decrement the positions the
  ledger holds.
- ``POST /_sim/reset``: forget orders, counters, ledger; the knobs stay.
- ``GET /healthz``.

With a gateway URL and a feed key, the positions accepted orders touched are pushed to the
gateway as snapshots (``POST /v1/stock-events``), at most every ``push_interval`` seconds; a push
that fails is logged and retried on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final, TypeVar

import aiohttp
import msgspec
import structlog
import uvloop
from aiohttp import web

from gateway.atp.schemas import MAX_EVENTS, StockEvent, StockEventBatch
from gateway.dev.erp_sim_state import (
    Created,
    Duplicate,
    Knobs,
    KnobsPatch,
    OrderLine,
    Refused,
    SimState,
    StockLedger,
    patched,
)
from gateway.logs import configure_logging

__all__ = ["STATE", "Knobs", "KnobsError", "create_sim_app", "knobs_from", "run_sim"]

_T = TypeVar("_T")
log = structlog.get_logger(__name__)
STATE: Final = web.AppKey("erp_sim_state", SimState)
PUSH_INTERVAL: Final = 0.5
PUSH_TIMEOUT: Final = 5.0
MAX_KEY_LENGTH: Final = 256
_JSON: Final = "application/json"
_encoder: Final = msgspec.json.Encoder()
_order_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
_lines_decoder: Final = msgspec.json.Decoder(list[OrderLine])
_patch_decoder: Final = msgspec.json.Decoder(KnobsPatch)
_stock_decoder: Final = msgspec.json.Decoder(StockLedger)

routes = web.RouteTableDef()


class KnobsError(ValueError):
    """Knobs given on the command line that the sim cannot take."""


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_encoder.encode(value), status=status, content_type=_JSON, headers=headers
    )


def _problem(status: int, error: str, detail: str, *, retry_after: bool = False) -> web.Response:
    headers = {"Retry-After": "1"} if retry_after else None
    return _json({"error": error, "detail": detail}, status, headers)


def _decode(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T | web.Response:
    """``body`` decoded, or the answer to send: 422 for a bad value, 400 for no JSON."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        return _problem(422, "invalid", str(exc))
    except msgspec.DecodeError as exc:
        return _problem(400, "malformed_json", str(exc))


@routes.post("/orders")
async def post_order(request: web.Request) -> web.Response:
    key = request.headers.get("Idempotency-Key", "").strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        detail = f"send 'Idempotency-Key: <order_id>' (1 to {MAX_KEY_LENGTH} characters)"
        return _problem(400, "missing_idempotency_key", detail)
    body = await request.read()
    order = _decode(_order_decoder, body)
    if isinstance(order, web.Response):
        return _problem(400, "bad_body", "the body must be a JSON object")
    lines: list[OrderLine] = []
    if "lines" in order:
        try:
            lines = _lines_decoder.decode(order["lines"])
        except msgspec.DecodeError as exc:
            # The ERP takes any order; only its ledger cannot follow this one.
            log.warning("erp_sim_lines_ignored", key=key, error=str(exc))
    state = request.app[STATE]
    delay = state.latency()
    if delay > 0:
        await asyncio.sleep(delay)
    outcome = state.submit(key, body, lines)
    match outcome:
        case Created(reply):
            log.debug("erp_sim_accepted", key=key, erp_order_id=reply.erp_order_id)
            return _json(reply, 201)
        case Duplicate(reply):
            log.info("erp_sim_duplicate", key=key, erp_order_id=reply.erp_order_id)
            return _json(reply, 409)
        case Refused(status, reason, retry_after):
            return _problem(status, reason, "simulated", retry_after=retry_after)


@routes.get("/_sim/knobs")
async def get_knobs(request: web.Request) -> web.Response:
    return _json(request.app[STATE].knobs)


@routes.put("/_sim/knobs")
async def put_knobs(request: web.Request) -> web.Response:
    patch = _decode(_patch_decoder, await request.read())
    if isinstance(patch, web.Response):
        return patch
    state = request.app[STATE]
    try:
        state.knobs = patched(state.knobs, patch)
    except msgspec.ValidationError as exc:
        return _problem(422, "invalid", str(exc))
    log.info("erp_sim_knobs", **msgspec.structs.asdict(state.knobs))
    return _json(state.knobs)


@routes.get("/_sim/received")
async def get_received(request: web.Request) -> web.Response:
    return _json(request.app[STATE].received())


@routes.get("/_sim/per_second")
async def get_per_second(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return _json({"seconds": state.per_second, "requests": state.requests_per_second})


@routes.post("/_sim/reset")
async def post_reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    log.info("erp_sim_reset")
    return _json({"reset": True})


@routes.get("/_sim/stock")
async def get_stock(request: web.Request) -> web.Response:
    return _json(request.app[STATE].stock())


@routes.put("/_sim/stock")
async def put_stock(request: web.Request) -> web.Response:
    ledger = _decode(_stock_decoder, await request.read())
    if isinstance(ledger, web.Response):
        return ledger
    state = request.app[STATE]
    state.set_stock(ledger.items)
    return _json(state.stock())


@routes.get("/healthz")
async def get_healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok", "uptime_s": round(request.app[STATE].uptime(), 3)})


class _Pusher:
    """Pushes queued snapshots to the gateway; owned by the app's cleanup context."""

    def __init__(self, gateway_url: str, feed_key: str, interval: float) -> None:
        self._url = gateway_url.rstrip("/") + "/v1/stock-events"
        self._headers = {"Authorization": f"Bearer {feed_key}"}
        self._interval = interval

    def __repr__(self) -> str:  # the key stays out of any log
        return f"_Pusher({self._url!r})"

    async def context(self, app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=PUSH_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            task = asyncio.create_task(self._run(app[STATE], session), name="erp_sim_pusher")
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self, state: SimState, session: aiohttp.ClientSession) -> None:
        while True:
            await state.snapshots_waiting.wait()
            state.snapshots_waiting.clear()
            generation = state.generation
            events = state.take_snapshots()
            try:
                unsent = await self._push(session, events)
            except Exception:
                log.exception("erp_sim_push_crashed", events=len(events))
                unsent = events
            if unsent:
                state.return_snapshots(unsent, generation)
            await asyncio.sleep(self._interval)

    async def _push(
        self, session: aiohttp.ClientSession, events: list[StockEvent]
    ) -> list[StockEvent]:
        """Send ``events``; return those to retry (refused outright ones are logged, dropped)."""
        unsent: list[StockEvent] = []
        for start in range(0, len(events), MAX_EVENTS):
            chunk = events[start : start + MAX_EVENTS]
            body = _encoder.encode(StockEventBatch(events=chunk))
            headers = {**self._headers, "Content-Type": _JSON}
            try:
                async with session.post(self._url, data=body, headers=headers) as resp:
                    status, text = resp.status, (await resp.text())[:500]
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("erp_sim_push_failed", error=repr(exc), events=len(chunk))
                unsent += chunk
                continue
            if 200 <= status < 300:
                log.info("erp_sim_pushed", events=len(chunk), answer=text)
            elif status in (408, 429) or status >= 500:
                log.warning("erp_sim_push_failed", status=status, answer=text, events=len(chunk))
                unsent += chunk
            else:
                log.error("erp_sim_push_refused", status=status, answer=text, events=len(chunk))
        return unsent


def create_sim_app(
    knobs: Knobs,
    *,
    gateway_url: str | None = None,
    feed_key: str | None = None,
    push_interval: float = PUSH_INTERVAL,
) -> web.Application:
    """The sim's app; with ``gateway_url`` and ``feed_key`` it also pushes snapshots."""
    if (gateway_url is None) != (feed_key is None):
        raise ValueError("gateway_url and feed_key go together")
    app = web.Application()
    app[STATE] = SimState(knobs)
    app.add_routes(routes)

    async def start_clock(app: web.Application) -> None:
        app[STATE].restart_clock()  # outage windows count from serving, not from building

    app.on_startup.append(start_clock)
    if gateway_url is not None and feed_key is not None:
        app.cleanup_ctx.append(_Pusher(gateway_url, feed_key, push_interval).context)
    return app


def knobs_from(
    *,
    latency_ms: float = 0.0,
    latency_jitter_ms: float = 0.0,
    error_rate: float = 0.0,
    rate_limit_per_second: int = 0,
    outage: bool = False,
    outage_windows: Sequence[str] = (),
) -> Knobs:
    """Knobs from command-line values; ``outage_windows`` as ``START:END`` seconds."""
    windows = []
    for text in outage_windows:
        start, _, end = text.partition(":")
        try:
            windows.append((float(start), float(end)))
        except ValueError:
            raise KnobsError(f"outage window {text!r}: want START:END in seconds") from None
    values = {
        "latency_ms": latency_ms,
        "latency_jitter_ms": latency_jitter_ms,
        "error_rate": error_rate,
        "rate_limit_per_second": rate_limit_per_second,
        "outage": outage,
        "outage_windows": windows,
    }
    try:
        return msgspec.convert(values, Knobs)
    except msgspec.ValidationError as exc:
        raise KnobsError(str(exc)) from None


def run_sim(
    host: str,
    port: int,
    knobs: Knobs,
    gateway_url: str | None = None,
    feed_key: str | None = None,
    *,
    log_level: str = "info",
) -> None:
    """Serve the sim until SIGINT or SIGTERM."""
    configure_logging(log_level)
    app = create_sim_app(knobs, gateway_url=gateway_url, feed_key=feed_key)
    uvloop.run(_serve(app, host, port, pushing_to=gateway_url))


async def _serve(app: web.Application, host: str, port: int, pushing_to: str | None) -> None:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        knobs = msgspec.structs.asdict(app[STATE].knobs)
        log.info("erp_sim_listening", url=f"http://{host}:{port}", pushing_to=pushing_to, **knobs)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("erp_sim_stopping")
    finally:
        await runner.cleanup()
    log.info("erp_sim_stopped")
