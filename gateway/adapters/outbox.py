"""The order buffer in PostgreSQL: the SQL behind :class:`gateway.ports.OrderOutbox`.

Bounds and honest outcomes are :class:`Postgres`'s: a failure before COMMIT was sent is
``dependency_unavailable`` (nothing applied), an unanswered COMMIT ``outcome_unknown``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

import asyncpg

from gateway.adapters.postgres import Postgres
from gateway.ports import BufferDepth, ClaimedOrder, NewOrder, StoredOrder

_COLUMNS: Final = (
    "order_id, reservation_id, status, hold_state, attempts, last_error, erp_order_id,"
    " accepted_at, created_at, updated_at"
)
_INSERT: Final = f"""
    INSERT INTO orders (order_id, reservation_id, customer_id, body, lines)
    VALUES ($1, $2, $3, $4, $5::jsonb)
    ON CONFLICT DO NOTHING
    RETURNING {_COLUMNS}"""
_BY_ID: Final = f"SELECT {_COLUMNS} FROM orders WHERE order_id = $1"
_BY_RESERVATION: Final = f"SELECT {_COLUMNS} FROM orders WHERE reservation_id = $1"
_HOLD_MOVED: Final = """
    UPDATE orders SET hold_state = 'moved', updated_at = now()
    WHERE order_id = $1 AND hold_state = 'pending'"""
_DISCARD: Final = "DELETE FROM orders WHERE order_id = $1 AND hold_state = 'pending'"
_HOLDS_PENDING: Final = f"""
    SELECT {_COLUMNS} FROM orders
    WHERE hold_state = 'pending' AND created_at <= now() - make_interval(secs => $1)
    ORDER BY created_at LIMIT $2"""


def _stored(row: asyncpg.Record | None) -> StoredOrder | None:
    return None if row is None else StoredOrder(*row.values())


class PostgresOutbox:
    """:class:`gateway.ports.OrderOutbox` on the gateway's PostgreSQL port."""

    def __init__(self, db: Postgres) -> None:
        self._db = db

    async def add(self, order: NewOrder) -> StoredOrder | None:
        async def insert(conn: asyncpg.Connection) -> StoredOrder | None:
            row = await conn.fetchrow(_INSERT, *order[:4], order.lines.decode())
            return _stored(row)

        return await self._db.write(insert)

    async def find(self, order_id: str) -> StoredOrder | None:
        return await self._db.read(_fetch_one(_BY_ID, order_id))

    async def find_by_reservation(self, reservation_id: str) -> StoredOrder | None:
        return await self._db.read(_fetch_one(_BY_RESERVATION, reservation_id))

    async def hold_moved(self, order_id: str) -> None:
        async def update(conn: asyncpg.Connection) -> None:
            await conn.execute(_HOLD_MOVED, order_id)

        await self._db.write(update)

    async def discard(self, order_id: str) -> bool:
        async def delete(conn: asyncpg.Connection) -> bool:
            return str(await conn.execute(_DISCARD, order_id)) == "DELETE 1"

        return await self._db.write(delete)

    async def holds_pending(self, older_than_seconds: float, limit: int) -> list[StoredOrder]:
        async def select(conn: asyncpg.Connection) -> list[StoredOrder]:
            rows = await conn.fetch(_HOLDS_PENDING, older_than_seconds, limit)
            return [StoredOrder(*row.values()) for row in rows]

        return await self._db.read(select)


def _fetch_one(query: str, *args: Any) -> Any:
    async def fetch(conn: asyncpg.Connection) -> StoredOrder | None:
        return _stored(await conn.fetchrow(query, *args))

    return fetch


_CLAIM: Final = """
    WITH next AS (
        SELECT o.order_id FROM orders o
        WHERE o.hold_state = 'moved'
          AND ((o.status = 'queued' AND o.next_attempt_at <= now())
               OR (o.status = 'sending' AND o.lease_until < now()))
          AND NOT EXISTS (
              SELECT 1 FROM orders e
              WHERE e.customer_id = o.customer_id AND e.seq < o.seq
                AND e.status IN ('queued', 'sending'))
        ORDER BY o.seq
        LIMIT $1
        FOR UPDATE SKIP LOCKED)
    UPDATE orders SET status = 'sending', attempts = orders.attempts + 1,
        lease_until = now() + make_interval(secs => $2), updated_at = now()
    FROM next WHERE orders.order_id = next.order_id
    RETURNING orders.order_id, orders.body, orders.attempts"""
_ACCEPTED: Final = """
    UPDATE orders SET status = 'accepted', erp_order_id = $2, accepted_at = $3,
        lease_until = NULL, last_error = NULL, updated_at = now()
    WHERE order_id = $1 AND status <> 'accepted'"""
_RETRY: Final = """
    UPDATE orders SET status = 'queued', lease_until = NULL, last_error = $3,
        next_attempt_at = now() + make_interval(secs => $2), updated_at = now()
    WHERE order_id = $1 AND status = 'sending'"""
_FAIL: Final = """
    UPDATE orders SET status = 'failed', lease_until = NULL, last_error = $2, updated_at = now()
    WHERE order_id = $1 AND status = 'sending'"""
_DEPTH: Final = """
    SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)
    FROM orders WHERE status IN ('queued', 'sending') AND hold_state = 'moved'"""


_DRAINED: Final = """
    SELECT count(*) FROM orders
    WHERE status IN ('accepted', 'failed') AND updated_at > now() - make_interval(secs => $1)"""


class PostgresOrderQueue:
    """:class:`gateway.ports.OrderQueue` on the gateway's PostgreSQL port."""

    def __init__(self, db: Postgres) -> None:
        self._db = db

    async def claim(self, limit: int, lease_seconds: float) -> list[ClaimedOrder]:
        async def claim(conn: asyncpg.Connection) -> list[ClaimedOrder]:
            rows = await conn.fetch(_CLAIM, limit, lease_seconds)
            return [ClaimedOrder(r[0], bytes(r[1]), r[2]) for r in rows]

        return await self._db.write(claim)

    async def accepted(self, order_id: str, erp_order_id: str | None, at: datetime) -> None:
        await self._execute(_ACCEPTED, order_id, erp_order_id, at)

    async def retry(self, order_id: str, delay_seconds: float, error: str) -> None:
        await self._execute(_RETRY, order_id, delay_seconds, error[:2000])

    async def fail(self, order_id: str, error: str) -> None:
        await self._execute(_FAIL, order_id, error[:2000])

    async def depth(self) -> BufferDepth:
        async def read(conn: asyncpg.Connection) -> BufferDepth:
            row = await conn.fetchrow(_DEPTH)
            return BufferDepth(int(row[0]), float(row[1]))

        return await self._db.read(read)

    async def drain_rate(self, window_seconds: float) -> float:
        count = await self._db.fetchval(_DRAINED, window_seconds)
        return int(count) / window_seconds

    async def _execute(self, query: str, *args: Any) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            await conn.execute(query, *args)

        await self._db.write(run)
