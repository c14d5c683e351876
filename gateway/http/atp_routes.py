"""Handlers of the availability side: stock events in, availability out. Thin by design."""

from __future__ import annotations

import re
from typing import Final

from aiohttp import web

from gateway.atp.schemas import CODE_PATTERN, AvailabilityResponse
from gateway.atp.validation import decode_batch
from gateway.errors import ValidationFailed
from gateway.http.codec import json_response
from gateway.http.middleware import requires
from gateway.http.state import APPLIER, AVAILABILITY
from gateway.metrics import STOCK_EVENTS

MAX_SKUS: Final = 100
_CODE: Final = re.compile(CODE_PATTERN)
_QUERY_PARAMS: Final = frozenset({"sku", "location", "location_group"})

routes = web.RouteTableDef()


@routes.post("/v1/stock-events")
@requires("feed")
async def post_stock_events(request: web.Request) -> web.Response:
    events = decode_batch(await request.read())
    result = await request.app[APPLIER].apply(events)
    STOCK_EVENTS.labels("http", "applied").inc(result.applied)
    STOCK_EVENTS.labels("http", "duplicate").inc(result.duplicate)
    STOCK_EVENTS.labels("http", "stale").inc(result.stale)
    return json_response(result)


@routes.get("/v1/availability")
@requires("storefront")
async def get_availability(request: web.Request) -> web.Response:
    query = request.query
    skus = query.getall("sku", [])
    errors = [
        {"field": name, "message": "unknown query parameter"}
        for name in query.keys() - _QUERY_PARAMS
    ]
    if not 1 <= len(skus) <= MAX_SKUS:
        errors.append({"field": "sku", "message": f"give 1 to {MAX_SKUS} sku parameters"})
    errors += (
        {"field": f"sku[{i}]", "message": f"must match {CODE_PATTERN}"}
        for i, sku in enumerate(skus)
        if not _CODE.match(sku)
    )
    locations = query.getall("location", [])
    groups = query.getall("location_group", [])
    if len(locations) + len(groups) != 1:
        errors.append(
            {"field": "location", "message": "give exactly one of location or location_group"}
        )
    for name, values in (("location", locations), ("location_group", groups)):
        errors += (
            {"field": name, "message": f"must match {CODE_PATTERN}"}
            for v in values
            if not _CODE.match(v)
        )
    if errors:
        raise ValidationFailed(errors)
    reader = request.app[AVAILABILITY]
    if locations:
        items = await reader.at_location(skus, locations[0])
        return json_response(AvailabilityResponse(items=list(items)))
    group_items = await reader.in_group(skus, groups[0])
    return json_response(AvailabilityResponse(items=list(group_items)))
