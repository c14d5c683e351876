"""Handlers of the availability side: stock events in, availability out. Thin by design."""

from __future__ import annotations

import time

from aiohttp import web

from gateway.atp.schemas import AvailabilityResponse
from gateway.atp.validation import decode_batch
from gateway.http.availability_query import parse_query
from gateway.http.codec import json_response, read_body
from gateway.http.guard import requires
from gateway.http.state import APPLIER, AVAILABILITY, SETTINGS
from gateway.metrics import STOCK_EVENTS, STOCK_LAST_EVENT

routes = web.RouteTableDef()


@routes.post("/v1/stock-events")
@requires("feed")
async def post_stock_events(request: web.Request) -> web.Response:
    skew = request.app[SETTINGS].max_clock_skew_seconds
    events = decode_batch(await read_body(request), max_skew_seconds=skew)
    result = await request.app[APPLIER].apply(events)
    if events:
        STOCK_LAST_EVENT.labels("http").set(time.time())
    STOCK_EVENTS.labels("http", "applied").inc(result.applied)
    STOCK_EVENTS.labels("http", "duplicate").inc(result.duplicate)
    STOCK_EVENTS.labels("http", "stale").inc(result.stale)
    if result.rejected:
        STOCK_EVENTS.labels("http", "rejected").inc(result.rejected)
    return json_response(result)


@routes.get("/v1/availability")
@requires("storefront")
async def get_availability(request: web.Request) -> web.Response:
    skus, location, group = parse_query(request.query_string, lambda: request.query)
    reader = request.app[AVAILABILITY]
    if location is not None:
        items = await reader.at_location(skus, location)
        return json_response(AvailabilityResponse(items=items))
    assert group is not None
    group_items = await reader.in_group(skus, group)
    return json_response(AvailabilityResponse(items=group_items))
