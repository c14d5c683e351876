"""Which orders' commitments still count, in PostgreSQL: the SQL behind
:class:`gateway.ports.CommitmentLedger`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import asyncpg

from gateway.adapters.postgres import Postgres
from gateway.ports import BufferDepth, CommittedOrder

_COLUMNS: Final = "seq, order_id, reservation_id, lines::text, accepted_at"
_ACCEPTED: Final = f"""
    SELECT {_COLUMNS} FROM orders
    WHERE status = 'accepted' AND commitment = $1 AND seq > $2
    ORDER BY seq LIMIT $3"""
_COUNTING: Final = f"""
    SELECT {_COLUMNS} FROM orders o
    WHERE commitment <> 'cleared' AND seq > $1
      AND NOT EXISTS (SELECT 1 FROM order_holds_pending p WHERE p.order_id = o.order_id)
    ORDER BY seq LIMIT $2"""
_MARK: Final = """
    UPDATE orders SET commitment = $2, updated_at = now()
    WHERE order_id = ANY($1::text[]) AND commitment <> $2 AND commitment <> 'cleared'"""
_WAITING: Final = """
    SELECT count(*), coalesce(extract(epoch FROM now() - min(accepted_at)), 0)
    FROM orders WHERE status = 'accepted' AND commitment <> 'cleared'"""


def _rows(rows: list[asyncpg.Record]) -> list[CommittedOrder]:
    return [CommittedOrder(r[0], r[1], r[2], r[3].encode(), r[4]) for r in rows]


class PostgresCommitments:
    def __init__(self, db: Postgres) -> None:
        self._db = db

    async def accepted(self, commitment: str, after_seq: int, limit: int) -> list[CommittedOrder]:
        return await self._select(_ACCEPTED, commitment, after_seq, limit)

    async def counting(self, after_seq: int, limit: int) -> list[CommittedOrder]:
        return await self._select(_COUNTING, after_seq, limit)

    async def mark(self, waiting: Sequence[str], cleared: Sequence[str]) -> None:
        async def update(conn: asyncpg.Connection) -> None:
            if waiting:
                await conn.execute(_MARK, list(waiting), "waiting")
            if cleared:
                await conn.execute(_MARK, list(cleared), "cleared")

        if waiting or cleared:
            await self._db.write(update)

    async def waiting(self) -> BufferDepth:
        async def read(conn: asyncpg.Connection) -> BufferDepth:
            row = await conn.fetchrow(_WAITING)
            return BufferDepth(int(row[0]), float(row[1]))

        return await self._db.read(read)

    async def _select(self, query: str, *args: object) -> list[CommittedOrder]:
        async def select(conn: asyncpg.Connection) -> list[CommittedOrder]:
            return _rows(await conn.fetch(query, *args))

        return await self._db.read(select)
