"""The baseline a retailer would otherwise build: availability and reservations served straight
from PostgreSQL rows, by aiohttp + asyncpg, with ``SELECT ... FOR UPDATE`` ordered by key.

It speaks the gateway's ``GET /v1/availability`` and ``POST /v1/reservations`` as far as the load
scripts use them (the same wrk and open-loop bodies drive both): 201 ``{"reservation_id",
"status": "held", "expires_at", "lines"}``, 409 ``insufficient_stock`` with the short lines, an
idempotent replay of a ``reservation_id`` already held. Its tables live in the benchmark's
database, prefixed ``baseline_``::

    baseline_positions(sku, location, on_hand, reserved, safety)        one row per position
    baseline_reservations(reservation_id, status, expires_at, created_at)
    baseline_reservation_lines(reservation_id, sku, location, quantity)

A reservation is one transaction: lock the positions of its lines (``FOR UPDATE``, ordered by
``(sku, location)`` so two carts with the same SKUs in another order never deadlock), check each
line against ``on_hand - reserved - safety`` in Python, then in one statement add the holds and
record the reservation and its lines, and commit (``synchronous_commit`` as the server has it:
on by default, so the row lock is held through the WAL flush). A short line rolls back: 409.
The lock is what makes it correct under concurrency (``tests/test_benchmarks_baseline.py``: 300
claims at once on 100 units); there is deliberately no ``CHECK (reserved <= on_hand)`` to catch
a mistake in it. Expired holds are not swept (the benchmark's TTL outlives a run).

    python -m benchmarks.baseline_pg --port PORT --dsn postgresql://.../test_bench \\
        [--pool-size 16] [--api-key KEY]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import asyncpg
import msgspec
import orjson
import uvloop
from aiohttp import web

POOL_SIZE = 16  # like FACTS.md's 16 connections: enough for PostgreSQL to group its commits

SCHEMA = """
CREATE TABLE IF NOT EXISTS baseline_positions (
    sku text NOT NULL,
    location text NOT NULL,
    on_hand bigint NOT NULL DEFAULT 0,
    reserved bigint NOT NULL DEFAULT 0,
    safety bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (sku, location)
);
CREATE TABLE IF NOT EXISTS baseline_reservations (
    reservation_id text PRIMARY KEY,
    status text NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS baseline_reservation_lines (
    reservation_id text NOT NULL REFERENCES baseline_reservations ON DELETE CASCADE,
    sku text NOT NULL,
    location text NOT NULL,
    quantity bigint NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (reservation_id, sku, location)
);
"""

_READ = """
SELECT sku, on_hand, reserved, safety FROM baseline_positions
WHERE location = $2 AND sku = ANY($1::text[])
"""
# Lines arrive as parallel arrays; rows are locked in key order whatever the cart's order.
_LOCK = """
SELECT p.sku, p.location, p.on_hand, p.reserved, p.safety
FROM baseline_positions p
JOIN unnest($1::text[], $2::text[]) AS l(sku, location) USING (sku, location)
ORDER BY p.sku, p.location
FOR UPDATE OF p
"""
# The holds, the reservation and its lines in one round trip while the rows are locked.
_HOLD = """
WITH held AS (
    UPDATE baseline_positions p SET reserved = p.reserved + l.quantity
    FROM unnest($2::text[], $3::text[], $4::bigint[]) AS l(sku, location, quantity)
    WHERE p.sku = l.sku AND p.location = l.location
), reservation AS (
    INSERT INTO baseline_reservations (reservation_id, status, expires_at)
    VALUES ($1, 'held', $5)
)
INSERT INTO baseline_reservation_lines (reservation_id, sku, location, quantity)
SELECT $1, sku, location, quantity FROM unnest($2::text[], $3::text[], $4::bigint[])
    AS l(sku, location, quantity)
"""
_REPLAY = """
SELECT r.status, r.expires_at, l.sku, l.location, l.quantity
FROM baseline_reservations r JOIN baseline_reservation_lines l USING (reservation_id)
WHERE r.reservation_id = $1
ORDER BY l.sku, l.location
"""

POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool", asyncpg.Pool)
API_KEY: web.AppKey[str] = web.AppKey("api_key", str)

Code = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class Line(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sku: Code
    location: Code
    quantity: Annotated[int, msgspec.Meta(gt=0)]


class ReservationRequest(msgspec.Struct, frozen=True):
    reservation_id: Code
    lines: Annotated[list[Line], msgspec.Meta(min_length=1, max_length=100)]
    ttl_seconds: Annotated[int, msgspec.Meta(gt=0, le=3600)] = 900


_decode = msgspec.json.Decoder(ReservationRequest).decode


class Short(Exception):
    """Some line does not fit: roll back and answer 409."""

    def __init__(self, lines: list[dict[str, Any]]) -> None:
        super().__init__("insufficient stock")
        self.lines = lines


def _json(status: int, body: object, problem: bool = False) -> web.Response:
    kind = "application/problem+json" if problem else "application/json"
    return web.Response(status=status, body=orjson.dumps(body), content_type=kind)


def _problem(status: int, code: str, title: str, **extra: object) -> web.Response:
    return _json(
        status,
        {"type": "about:blank", "title": title, "status": status, "code": code, **extra},
        problem=True,
    )


def _authorized(request: web.Request) -> bool:
    key = request.app[API_KEY]
    return not key or request.headers.get("Authorization") == f"Bearer {key}"


def _item(sku: str, location: str, on_hand: int, reserved: int, safety: int) -> dict[str, Any]:
    return {
        "sku": sku,
        "location": location,
        "on_hand": on_hand,
        "reserved": reserved,
        "committed": 0,
        "safety_stock": safety,
        "available": max(0, on_hand - reserved - safety),
    }


async def availability(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _problem(401, "unauthorized", "Missing or unknown API key")
    skus = request.query.getall("sku", [])
    location = request.query.get("location", "")
    if not skus or len(skus) > 100 or not location:
        return _problem(422, "validation_error", "1-100 sku and one location")
    rows = await request.app[POOL].fetch(_READ, skus, location)
    found = {r["sku"]: r for r in rows}
    items = []
    for sku in skus:  # in the order asked; unknown positions read as zeros
        r = found.get(sku)
        items.append(
            _item(sku, location, r["on_hand"], r["reserved"], r["safety"])
            if r
            else _item(sku, location, 0, 0, 0)
        )
    return _json(200, {"items": items})


def _held_body(reservation_id: str, expires_at: datetime, lines: Iterable[Line]) -> bytes:
    return orjson.dumps(
        {
            "reservation_id": reservation_id,
            "status": "held",
            "expires_at": expires_at.isoformat().replace("+00:00", "Z"),
            "lines": [
                {"sku": ln.sku, "location": ln.location, "quantity": ln.quantity} for ln in lines
            ],
        }
    )


async def _hold(conn: asyncpg.Connection, req: ReservationRequest, expires_at: datetime) -> None:
    """The transaction's body: lock, check, hold and record; ``Short`` when a line is short."""
    skus = [ln.sku for ln in req.lines]
    locations = [ln.location for ln in req.lines]
    rows = await conn.fetch(_LOCK, skus, locations)
    have = {(r["sku"], r["location"]): r["on_hand"] - r["reserved"] - r["safety"] for r in rows}
    short = [
        {
            "sku": ln.sku,
            "location": ln.location,
            "requested": ln.quantity,
            "available": max(0, have.get((ln.sku, ln.location), 0)),
        }
        for ln in req.lines
        if have.get((ln.sku, ln.location), 0) < ln.quantity
    ]
    if short:
        raise Short(short)
    quantities = [ln.quantity for ln in req.lines]
    await conn.execute(_HOLD, req.reservation_id, skus, locations, quantities, expires_at)


async def _replay(conn: asyncpg.Connection, req: ReservationRequest) -> web.Response | None:
    """The first outcome again for a ``reservation_id`` already held, else None."""
    rows = await conn.fetch(_REPLAY, req.reservation_id)
    if not rows:
        return None
    stored = sorted((r["sku"], r["location"], r["quantity"]) for r in rows)
    if stored != sorted((ln.sku, ln.location, ln.quantity) for ln in req.lines):
        return _problem(
            409, "idempotency_conflict", "Conflict", detail="reservation_id used with another body"
        )
    body = _held_body(
        req.reservation_id, rows[0]["expires_at"], [Line(s, loc, q) for s, loc, q in stored]
    )
    return web.Response(status=201, body=body, content_type="application/json")


async def reserve(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _problem(401, "unauthorized", "Missing or unknown API key")
    try:
        req = _decode(await request.read())
    except msgspec.ValidationError as exc:
        return _problem(422, "validation_error", "Invalid request", detail=str(exc))
    except msgspec.DecodeError:
        return _problem(400, "malformed_json", "Malformed JSON")
    keys = [(ln.sku, ln.location) for ln in req.lines]
    if len(set(keys)) != len(keys):
        return _problem(422, "validation_error", "a SKU at most once per location")
    expires_at = datetime.now(UTC) + timedelta(seconds=req.ttl_seconds)
    async with request.app[POOL].acquire() as conn:
        replay = await _replay(conn, req)
        if replay is not None:
            return replay
        try:
            async with conn.transaction():
                await _hold(conn, req, expires_at)
        except Short as short:
            return _problem(
                409, "insufficient_stock", "Not enough stock for every line", lines=short.lines
            )
        except asyncpg.UniqueViolationError:
            # The same reservation_id made concurrently: it was rolled back here, so the other
            # one's outcome is the answer.
            return await _replay(conn, req) or _problem(409, "idempotency_conflict", "Conflict")
    body = _held_body(req.reservation_id, expires_at, req.lines)
    return web.Response(status=201, body=body, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    await request.app[POOL].fetchval("SELECT 1")
    return _json(200, {"status": "ok"})


def create_app(dsn: str, pool_size: int = POOL_SIZE, api_key: str = "") -> web.Application:
    async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
        # All connections opened up front: the benchmark pins their backends before measuring.
        pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)
        async with pool.acquire() as conn:
            await conn.execute(SCHEMA)
        app[POOL] = pool
        yield
        await pool.close()

    app = web.Application()
    app[API_KEY] = api_key
    app.cleanup_ctx.append(pool_ctx)
    app.router.add_get("/v1/availability", availability)
    app.router.add_post("/v1/reservations", reserve)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", healthz)
    return app


# --- for the benchmark and the test: the schema, the stock, and what was held ------------------
async def reset(conn: asyncpg.Connection) -> None:
    """The baseline's tables, made if missing and emptied."""
    await conn.execute(SCHEMA)
    await conn.execute(
        "TRUNCATE baseline_reservation_lines, baseline_reservations, baseline_positions"
    )


async def set_stock(
    conn: asyncpg.Connection, location: str, stock: dict[str, int], safety: int = 0
) -> None:
    """Set on-hand of each SKU at ``location`` (nothing reserved)."""
    await conn.execute(
        """
        INSERT INTO baseline_positions (sku, location, on_hand, reserved, safety)
        SELECT sku, $2, on_hand, 0, $4 FROM unnest($1::text[], $3::bigint[]) AS s(sku, on_hand)
        ON CONFLICT (sku, location)
        DO UPDATE SET on_hand = EXCLUDED.on_hand, reserved = 0, safety = EXCLUDED.safety
        """,
        list(stock),
        location,
        list(stock.values()),
        safety,
    )


async def held_units(conn: asyncpg.Connection, sku: str, location: str) -> int:
    """Units of ``sku`` the recorded reservation lines hold (the baseline's own count of holds)."""
    value = await conn.fetchval(
        "SELECT coalesce(sum(quantity), 0) FROM baseline_reservation_lines "
        "WHERE sku = $1 AND location = $2",
        sku,
        location,
    )
    return int(value)


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline_pg")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--pool-size", type=int, default=POOL_SIZE)
    parser.add_argument("--api-key", default="", help="require 'Authorization: Bearer KEY'")
    a = parser.parse_args(argv)
    uvloop.install()
    app = create_app(a.dsn, a.pool_size, a.api_key)
    web.run_app(app, host=a.host, port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main(sys.argv[1:])
