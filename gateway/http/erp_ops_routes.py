"""Ops handlers of the ERP flow: its state, limits, pause and resume, dead letters, the audit.

Thin: :class:`gateway.buffering.control.ErpControl` decides and records; these parse, name the
caller for the audit (a fingerprint of their key and the request id) and answer.
"""

from __future__ import annotations

from typing import Final

from aiohttp import hdrs, web
from multidict import MultiMapping

from gateway.buffering.control_schemas import DEFAULT_PAGE, MAX_PAGE, ReplayRequest
from gateway.buffering.store import Limits
from gateway.errors import ValidationFailed
from gateway.http.auth import key_fingerprint
from gateway.http.codec import json_response, read_json
from gateway.http.guard import requires
from gateway.http.state import ERP_CONTROL
from gateway.logs import REQUEST_ID
from gateway.ports import Caller

routes = web.RouteTableDef()
_MAX_CURSOR: Final = 2**63 - 1  # a PostgreSQL bigint


def _caller(request: web.Request) -> Caller:
    return Caller(key_fingerprint(request.headers.get(hdrs.AUTHORIZATION)), REQUEST_ID.get() or "")


def _page(query: MultiMapping[str], cursor: str) -> tuple[int, int | None]:
    """``limit`` and the cursor named ``cursor``, each at most once; every problem listed."""
    errors = [
        {"field": name, "message": "unknown query parameter"}
        for name in sorted(query.keys() - {"limit", cursor})
    ]
    values: dict[str, int | None] = {}
    for name, low, high in (("limit", 1, MAX_PAGE), (cursor, 0, _MAX_CURSOR)):
        given = query.getall(name, [])
        values[name] = None
        if len(given) > 1:
            errors.append({"field": name, "message": "give it at most once"})
        elif given:
            text = given[0]
            if text.isascii() and text.isdigit() and low <= int(text) <= high:
                values[name] = int(text)
            else:
                errors.append({"field": name, "message": f"an integer from {low} to {high}"})
    if errors:
        raise ValidationFailed(errors)
    return values["limit"] or DEFAULT_PAGE, values[cursor]


@routes.get("/v1/ops/erp")
@requires("ops")
async def get_erp(request: web.Request) -> web.Response:
    return json_response(await request.app[ERP_CONTROL].view())


@routes.put("/v1/ops/erp/limits")
@requires("ops")
async def put_erp_limits(request: web.Request) -> web.Response:
    limits = await read_json(request, Limits)
    return json_response(await request.app[ERP_CONTROL].set_limits(limits, _caller(request)))


@routes.post("/v1/ops/erp/pause")
@requires("ops")
async def pause_erp(request: web.Request) -> web.Response:
    return json_response(await request.app[ERP_CONTROL].pause(_caller(request)))


@routes.post("/v1/ops/erp/resume")
@requires("ops")
async def resume_erp(request: web.Request) -> web.Response:
    return json_response(await request.app[ERP_CONTROL].resume(_caller(request)))


@routes.get("/v1/ops/dead-letters")
@requires("ops")
async def get_dead_letters(request: web.Request) -> web.Response:
    limit, after = _page(request.query, "after")
    return json_response(await request.app[ERP_CONTROL].dead_letters(after or 0, limit))


@routes.get("/v1/ops/dead-letters/{order_id:[^/]+}")
@requires("ops")
async def get_dead_letter(request: web.Request) -> web.Response:
    order_id = request.match_info["order_id"]
    if not 1 <= len(order_id) <= 128:
        raise ValidationFailed([{"field": "order_id", "message": "1-128 characters"}])
    return json_response(await request.app[ERP_CONTROL].dead_letter(order_id))


@routes.post("/v1/ops/dead-letters/replay")
@requires("ops")
async def replay_dead_letters(request: web.Request) -> web.Response:
    body = await read_json(request, ReplayRequest)
    return json_response(await request.app[ERP_CONTROL].replay(body, _caller(request)))


@routes.get("/v1/ops/audit")
@requires("ops")
async def get_audit(request: web.Request) -> web.Response:
    limit, before = _page(request.query, "before")
    return json_response(await request.app[ERP_CONTROL].audit(before, limit))
