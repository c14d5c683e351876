"""Order handlers (role storefront): confirm a reservation into an order, order without a
hold, read an order. Thin: the intake decides, these translate."""

from __future__ import annotations

from aiohttp import web

from gateway.buffering.schemas import ConfirmRequest, OrderRequest
from gateway.errors import Conflict, InsufficientStock, NotFound, ValidationFailed
from gateway.http.codec import json_response, read_json
from gateway.http.guard import requires
from gateway.http.reservation_routes import PATH_ID, rid_of
from gateway.http.state import ORDER_INTAKE
from gateway.metrics import ORDERS_IN

routes = web.RouteTableDef()
# Children looked up once: labels() costs a lock and a dict lookup per request.
_CONFIRM = {
    outcome: ORDERS_IN.labels("confirm", outcome) for outcome in ("accepted", "repeated", "refused")
}
_DIRECT = {
    outcome: ORDERS_IN.labels("direct", outcome) for outcome in ("accepted", "repeated", "refused")
}
_ORDER_PATH = "{order_id:[^/]+}"


@routes.post(f"/v1/reservations/{PATH_ID}/confirm")
@requires("storefront")
async def confirm_reservation(request: web.Request) -> web.Response:
    rid = rid_of(request)
    body = await read_json(request, ConfirmRequest)
    try:
        done = await request.app[ORDER_INTAKE].confirm(rid, body)
    except (Conflict, NotFound):
        _CONFIRM["refused"].inc()
        raise
    _CONFIRM["accepted" if done.status == 202 else "repeated"].inc()
    return json_response(done.receipt, status=done.status)


@routes.post("/v1/orders")
@requires("storefront")
async def post_order(request: web.Request) -> web.Response:
    body = await read_json(request, OrderRequest)
    try:
        done = await request.app[ORDER_INTAKE].place(body)
    except (Conflict, InsufficientStock, NotFound):
        _DIRECT["refused"].inc()
        raise
    _DIRECT["accepted" if done.status == 202 else "repeated"].inc()
    return json_response(done.receipt, status=done.status)


@routes.get(f"/v1/orders/{_ORDER_PATH}")
@requires("storefront")
async def get_order(request: web.Request) -> web.Response:
    order_id = request.match_info["order_id"]
    if not 1 <= len(order_id) <= 128:
        raise ValidationFailed([{"field": "order_id", "message": "1-128 characters"}])
    return json_response(await request.app[ORDER_INTAKE].get(order_id))
