"""Ops handlers: location groups and safety stock."""

from __future__ import annotations

import re
from typing import Final

from aiohttp import web

from gateway.atp.schemas import (
    CODE_PATTERN,
    LocationGroup,
    SafetyStockRequest,
    SafetyStockResult,
)
from gateway.errors import ValidationFailed
from gateway.http.codec import json_response, read_json
from gateway.http.guard import requires
from gateway.http.state import LOCATION_CONFIG

_CODE: Final = re.compile(CODE_PATTERN)

routes = web.RouteTableDef()


def _group_name(request: web.Request) -> str:
    group = request.match_info["group"]
    if not _CODE.match(group):
        raise ValidationFailed([{"field": "group", "message": f"must match {CODE_PATTERN}"}])
    return group


@routes.put("/v1/location-groups/{group}")
@requires("ops")
async def put_location_group(request: web.Request) -> web.Response:
    group = _group_name(request)
    body = await read_json(request, LocationGroup)
    return json_response(await request.app[LOCATION_CONFIG].put_group(group, body.locations))


@routes.get("/v1/location-groups/{group}")
@requires("ops")
async def get_location_group(request: web.Request) -> web.Response:
    return json_response(await request.app[LOCATION_CONFIG].get_group(_group_name(request)))


@routes.put("/v1/safety-stock")
@requires("ops")
async def put_safety_stock(request: web.Request) -> web.Response:
    body = await read_json(request, SafetyStockRequest)
    updated = await request.app[LOCATION_CONFIG].put_safety_stock(body.items)
    return json_response(SafetyStockResult(updated=updated))
