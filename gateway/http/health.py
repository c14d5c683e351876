"""Liveness, readiness (which dependency is down) and Prometheus metrics; all open."""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.http import problems
from gateway.http.codec import json_response
from gateway.http.state import LIFECYCLE, PG_POOL, REDIS
from gateway.metrics import DEPENDENCY_UP

_CHECK_TIMEOUT: Final = 1.0

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _check(name: str, probe: asyncio.Future[object] | object) -> tuple[str, str]:
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT):
            await probe  # type: ignore[misc]
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means "down", with its reason
        DEPENDENCY_UP.labels(name).set(0)
        return name, f"down: {type(exc).__name__}: {exc}".strip()
    DEPENDENCY_UP.labels(name).set(1)
    return name, "up"


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    app = request.app
    results = dict(
        await asyncio.gather(
            _check("redis", app[REDIS].ping()),
            _check("postgres", app[PG_POOL].fetchval("SELECT 1")),
        )
    )
    workers = dict(app[LIFECYCLE].workers)
    down = [name for name, state in results.items() if state != "up"]
    if app[LIFECYCLE].draining:
        down.append("gateway (draining)")
    if down:
        return problems.problem_response(
            503,
            "not_ready",
            "Not ready",
            f"unavailable: {', '.join(down)}",
            checks=results,
            workers=workers,
        )
    return json_response({"status": "ready", "checks": results, "workers": workers})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})
