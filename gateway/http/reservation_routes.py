"""Reservation handlers (role storefront). Thin: the service decides, these translate."""

from __future__ import annotations

from aiohttp import web

from gateway.errors import InsufficientStock, ValidationFailed
from gateway.http.codec import json_response, read_json
from gateway.http.middleware import requires
from gateway.http.state import RESERVATIONS_SERVICE
from gateway.metrics import RESERVATIONS
from gateway.reservation.schemas import ExtendRequest, ReservationRequest

routes = web.RouteTableDef()
_MAX_ID = 128


def _rid(request: web.Request) -> str:
    rid = request.match_info["reservation_id"]
    if not 1 <= len(rid) <= _MAX_ID or not rid.isprintable():
        raise ValidationFailed(
            [{"field": "reservation_id", "message": "1-128 printable characters"}]
        )
    return rid


@routes.post("/v1/reservations")
@requires("storefront")
async def post_reservation(request: web.Request) -> web.Response:
    body = await read_json(request, ReservationRequest)
    outcome = await request.app[RESERVATIONS_SERVICE].reserve(body)
    if outcome.reservation is None:
        RESERVATIONS.labels("refused").inc()
        raise InsufficientStock(
            "not every line fits into what is available; nothing was held",
            reservation_id=body.reservation_id,
            lines=outcome.shortfalls,
        )
    RESERVATIONS.labels("held").inc()
    return json_response(outcome.reservation, status=201)


@routes.get("/v1/reservations/{reservation_id}")
@requires("storefront")
async def get_reservation(request: web.Request) -> web.Response:
    return json_response(await request.app[RESERVATIONS_SERVICE].get(_rid(request)))


@routes.delete("/v1/reservations/{reservation_id}")
@requires("storefront")
async def delete_reservation(request: web.Request) -> web.Response:
    reservation = await request.app[RESERVATIONS_SERVICE].release(_rid(request))
    RESERVATIONS.labels("released").inc()
    return json_response(reservation)


@routes.post("/v1/reservations/{reservation_id}/extend")
@requires("storefront")
async def extend_reservation(request: web.Request) -> web.Response:
    rid = _rid(request)
    body = await read_json(request, ExtendRequest)
    return json_response(await request.app[RESERVATIONS_SERVICE].extend(rid, body.ttl_seconds))
