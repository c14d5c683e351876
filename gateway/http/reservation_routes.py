"""Reservation handlers (role storefront). Thin: the service decides, these translate."""

from __future__ import annotations

import re
from typing import Final

from aiohttp import web

from gateway.errors import InsufficientStock, ValidationFailed
from gateway.http import problems
from gateway.http.codec import json_response, read_json
from gateway.http.guard import requires
from gateway.http.state import RESERVATIONS_SERVICE
from gateway.logs import REQUEST_ID
from gateway.metrics import RESERVATIONS
from gateway.reservation.schemas import (
    RESERVATION_ID_PATTERN,
    ExtendRequest,
    ReservationRequest,
)

routes = web.RouteTableDef()
_ID: Final = re.compile(RESERVATION_ID_PATTERN)
# aiohttp's default {name} excludes braces, which ids may contain.
PATH_ID: Final = "{reservation_id:[^/]+}"


def rid_of(request: web.Request) -> str:
    # The same rule as the body's reservation_id, so every id that can be made can be addressed.
    rid = request.match_info["reservation_id"]
    if not _ID.match(rid):
        raise ValidationFailed(
            [{"field": "reservation_id", "message": "1-128 characters, no control characters"}]
        )
    return rid


@routes.post("/v1/reservations")
@requires("storefront")
async def post_reservation(request: web.Request) -> web.Response:
    body = await read_json(request, ReservationRequest)
    outcome = await request.app[RESERVATIONS_SERVICE].reserve(body)
    RESERVATIONS.inc(
        "replayed" if outcome.replayed else "held" if outcome.reservation else "refused"
    )
    if outcome.reservation is None:
        refusal = InsufficientStock(
            "not every line fits into what is available; nothing was held",
            reservation_id=body.reservation_id,
            lines=outcome.shortfalls,
        )
        # Returned, not raised: in a flash sale this is nearly every answer, and a raise
        # through the guard costs a traceback each.
        return problems.from_error(refusal, REQUEST_ID.get())
    return json_response(outcome.reservation, status=201)


@routes.get(f"/v1/reservations/{PATH_ID}")
@requires("storefront")
async def get_reservation(request: web.Request) -> web.Response:
    return json_response(await request.app[RESERVATIONS_SERVICE].get(rid_of(request)))


@routes.delete(f"/v1/reservations/{PATH_ID}")
@requires("storefront")
async def delete_reservation(request: web.Request) -> web.Response:
    reservation = await request.app[RESERVATIONS_SERVICE].release(rid_of(request))
    RESERVATIONS.inc("released")
    return json_response(reservation)


@routes.post(f"/v1/reservations/{PATH_ID}/extend")
@requires("storefront")
async def extend_reservation(request: web.Request) -> web.Response:
    rid = rid_of(request)
    body = await read_json(request, ExtendRequest)
    return json_response(await request.app[RESERVATIONS_SERVICE].extend(rid, body.ttl_seconds))
