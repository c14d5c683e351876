"""Liveness, readiness (which dependency is down) and Prometheus metrics; all open."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.http import problems
from gateway.http.codec import json_response
from gateway.http.state import LIFECYCLE, POSTGRES, READINESS, REDIS
from gateway.metrics import MULTIPROCESS, exposition, flush

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """200 when every dependency answers; else 503 naming those that do not, with each gate's
    state (a dependency whose gate is down fails requests at once until its probe answers).
    Answers within the check timeout: see :class:`gateway.lifecycle.Readiness`."""
    app = request.app
    results = await app[READINESS].check()
    workers = dict(app[LIFECYCLE].workers)
    down = [name for name, state in results.items() if state != "up"]
    if app[LIFECYCLE].draining:
        down.append("gateway (draining)")
    if down:
        redis_gate = app[REDIS].gate
        gates = {
            "redis": "up" if redis_gate.up else f"down: {redis_gate.reason}",
            "postgres": app[POSTGRES].state(),
        }
        return problems.problem_response(
            503,
            "not_ready",
            "Not ready",
            f"unavailable: {', '.join(down)}",
            checks=results,
            gates=gates,
            workers=workers,
        )
    # All up: the gates are too (a gate is down only while its probe fails), and the 200 body's
    # schema is closed.
    return json_response({"status": "ready", "checks": results, "workers": workers})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    flush()  # this worker's share is current; the others' is at most a second old
    # One process: its registry, in memory. Workers: every worker's files, read off the loop.
    body = await asyncio.to_thread(exposition) if MULTIPROCESS else exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
