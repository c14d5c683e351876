"""The order buffer in PostgreSQL: the SQL behind :class:`gateway.ports.OrderOutbox`.

Bounds and honest outcomes are :class:`Postgres`'s: a failure before COMMIT was sent is
``dependency_unavailable`` (nothing applied), an unanswered COMMIT ``outcome_unknown``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg

from gateway.adapters.group_commit import Carry, GroupCommit, Statement
from gateway.adapters.postgres import Postgres
from gateway.ports import BufferDepth, ClaimedOrder, NewOrder, StoredOrder

# An order's hold is pending while its row in ``order_holds_pending`` exists (migration 0007).
_PENDING: Final = (
    "CASE WHEN EXISTS (SELECT 1 FROM order_holds_pending p WHERE p.order_id = orders.order_id)"
    " THEN 'pending' ELSE 'moved' END"
)
_COLUMNS: Final = (
    f"order_id, reservation_id, status, {_PENDING}, attempts, last_error, erp_order_id,"
    " accepted_at, created_at, updated_at"
)
# A new row's hold is pending: its row in order_holds_pending is written in the same statement.
_INSERTED: Final = (
    "order_id, reservation_id, status, 'pending', attempts, last_error, erp_order_id,"
    " accepted_at, created_at, updated_at"
)
# The new rows and their pending marks, as the CTEs of a statement that answers from ``new``.
_NEW_ROWS: Final = """
    new AS (
        INSERT INTO orders (order_id, reservation_id, customer_id, body, lines)
        SELECT u.order_id, u.reservation_id, u.customer_id, u.body, u.lines::jsonb
        FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[])
            AS u(order_id, reservation_id, customer_id, body, lines)
        ON CONFLICT DO NOTHING
        RETURNING order_id, reservation_id, status, attempts, last_error, erp_order_id,
            accepted_at, created_at, updated_at),
    pending AS (
        INSERT INTO order_holds_pending (order_id, created_at)
        SELECT order_id, created_at FROM new
        -- A row left by a hand-made delete from orders (no foreign key: it would cost a lock
        -- on every new row) is the new order's now, rather than fail the whole batch.
        ON CONFLICT (order_id) DO UPDATE SET created_at = excluded.created_at)"""
_INSERT: Final = f"WITH {_NEW_ROWS} SELECT {_INSERTED} FROM new"
# The rows of confirms whose holds moved first (single node: gateway.buffering.intake): no
# pending mark to write, nor to delete afterwards.
_INSERT_MOVED: Final = """
    INSERT INTO orders (order_id, reservation_id, customer_id, body, lines)
    SELECT u.order_id, u.reservation_id, u.customer_id, u.body, u.lines::jsonb
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[])
        AS u(order_id, reservation_id, customer_id, body, lines)
    ON CONFLICT DO NOTHING
    RETURNING order_id, reservation_id"""
# Locked in key order first (the plan of a plain DELETE decides its own order).
_MOVED: Final = """
    DELETE FROM order_holds_pending
    WHERE order_id IN (
        SELECT order_id FROM order_holds_pending
        WHERE order_id = ANY({ids}::text[])
        ORDER BY order_id FOR UPDATE)"""
# New rows and the moved marks of earlier ones in one statement: the marks of one batch's
# confirms are queued when its rows have committed and its holds moved, so under load they meet
# the next batch's rows, and one round trip and one WAL flush carry both. The marked rows are
# committed ones, never among those inserted, so neither part sees the other's rows.
_INSERT_AND_MARK: Final = f"""
    WITH moved AS ({_MOVED.format(ids="$6")}), {_NEW_ROWS}
    SELECT {_INSERTED} FROM new"""
_BY_ID: Final = f"SELECT {_COLUMNS} FROM orders WHERE order_id = $1"
_BY_RESERVATION: Final = f"SELECT {_COLUMNS} FROM orders WHERE reservation_id = $1"
_HOLD_MOVED: Final = _MOVED.format(ids="$1")
# Only a row whose hold is still pending: its pending mark goes with it, in one statement.
_DISCARD: Final = """
    WITH gone AS (DELETE FROM order_holds_pending WHERE order_id = $1 RETURNING order_id)
    DELETE FROM orders o USING gone WHERE o.order_id = gone.order_id"""
_WITH_ROWS: Final = "SELECT reservation_id FROM orders WHERE reservation_id = ANY($1::text[])"
_HOLDS_PENDING: Final = f"""
    SELECT {_INSERTED} FROM orders
    WHERE order_id IN (
        SELECT p.order_id FROM order_holds_pending p JOIN orders o USING (order_id)
        WHERE p.created_at <= now() - make_interval(secs => $1)
        ORDER BY p.created_at LIMIT $2)
    ORDER BY created_at"""


def _stored(row: asyncpg.Record | None) -> StoredOrder | None:
    return None if row is None else StoredOrder(*row.values())


async def _insert(conn: asyncpg.Connection, orders: Sequence[NewOrder]) -> list[StoredOrder | None]:
    return await _insert_marking(conn, orders, ())


async def _insert_and_mark(
    conn: asyncpg.Connection, orders: Sequence[NewOrder], moved: Sequence[str]
) -> tuple[list[StoredOrder | None], list[None]]:
    return await _insert_marking(conn, orders, moved), [None] * len(moved)


async def _insert_moved(conn: asyncpg.Connection, orders: Sequence[NewOrder]) -> list[bool]:
    # The ids alone come back: the confirm answers from what it sent, and decoding every
    # column of every row (three timestamps each) cost more than the rest of the answer.
    inserted = await conn.fetch(_INSERT_MOVED, *_columns(orders))
    won = {row[0]: row[1] for row in inserted}
    return [_won(won, o) for o in orders]


async def _insert_marking(
    conn: asyncpg.Connection, orders: Sequence[NewOrder], moved: Sequence[str]
) -> list[StoredOrder | None]:
    if moved:
        inserted = await conn.fetch(_INSERT_AND_MARK, *_columns(orders), sorted(moved))
    else:
        inserted = await conn.fetch(_INSERT, *_columns(orders))
    rows = {row[0]: StoredOrder(*row.values()) for row in inserted}
    won = {order_id: row.reservation_id for order_id, row in rows.items()}
    return [rows[o.order_id] if _won(won, o) else None for o in orders]


def _columns(orders: Sequence[NewOrder]) -> list[list[Any]]:
    """The statement's arrays: ids, reservations, customers, bodies, lines, rows in key order
    (the lock order: see group_commit)."""
    rows = sorted(orders, key=lambda o: o.order_id)
    return [*([o[i] for o in rows] for i in range(4)), [o.lines.decode() for o in rows]]


def _won(won: dict[str, str], order: NewOrder) -> bool:
    """Whether the row inserted for ``order``'s id is this caller's. A row is one caller's: the
    first that asked for it with its reservation. A racing request for the same order (or the
    same id and another reservation) lost, and learns what won by reading it, as if it had come
    in a later batch."""
    if won.get(order.order_id) != order.reservation_id:
        return False
    del won[order.order_id]
    return True


async def _hold_moved(conn: asyncpg.Connection, order_ids: Sequence[str]) -> list[None]:
    await conn.execute(_HOLD_MOVED, sorted(order_ids))
    return [None] * len(order_ids)


# Marks wait up to 50 ms for new rows to ride with: under load they always find some.
HOLD_MOVED: Final = Statement("hold-moved", _hold_moved, rides_for=0.05)
INSERT: Final = Statement("insert-order", _insert, carries=Carry(HOLD_MOVED, _insert_and_mark))
INSERT_MOVED: Final = Statement("insert-moved-order", _insert_moved)


class PostgresOutbox:
    """:class:`gateway.ports.OrderOutbox` on the gateway's PostgreSQL port; the writes of
    concurrent confirms commit together (:class:`GroupCommit`)."""

    def __init__(self, db: Postgres, commits: GroupCommit | None = None) -> None:
        self._db = db
        self._commits = commits or GroupCommit(db)

    async def add(self, order: NewOrder) -> StoredOrder | None:
        return await self._commits.write(INSERT, order)

    async def add_moved(self, order: NewOrder, send_by: float) -> bool:
        return await self._commits.write(INSERT_MOVED, order, send_by=send_by)

    async def find(self, order_id: str) -> StoredOrder | None:
        return await self._db.read(_fetch_one(_BY_ID, order_id))

    async def find_by_reservation(self, reservation_id: str) -> StoredOrder | None:
        return await self._db.read(_fetch_one(_BY_RESERVATION, reservation_id))

    async def hold_moved(self, order_id: str) -> None:
        await self._commits.write(HOLD_MOVED, order_id)

    def hold_moved_soon(self, order_id: str) -> asyncio.Future[None]:
        return self._commits.submit(HOLD_MOVED, order_id)

    async def discard(self, order_id: str) -> bool:
        async def delete(conn: asyncpg.Connection) -> bool:
            return str(await conn.execute(_DISCARD, order_id)) == "DELETE 1"

        return await self._db.write(delete)

    async def holds_pending(self, older_than_seconds: float, limit: int) -> list[StoredOrder]:
        async def select(conn: asyncpg.Connection) -> list[StoredOrder]:
            rows = await conn.fetch(_HOLDS_PENDING, older_than_seconds, limit)
            return [StoredOrder(*row.values()) for row in rows]

        return await self._db.read(select)

    async def with_rows(self, reservation_ids: Sequence[str]) -> set[str]:
        async def select(conn: asyncpg.Connection) -> set[str]:
            rows = await conn.fetch(_WITH_ROWS, list(reservation_ids))
            return {row[0] for row in rows}

        return await self._db.read(select)


def _fetch_one(query: str, *args: Any) -> Any:
    async def fetch(conn: asyncpg.Connection) -> StoredOrder | None:
        return _stored(await conn.fetchrow(query, *args))

    return fetch


_CLAIM: Final = """
    WITH next AS (
        SELECT o.order_id FROM orders o
        WHERE NOT EXISTS (SELECT 1 FROM order_holds_pending p WHERE p.order_id = o.order_id)
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
    UPDATE orders o SET status = 'accepted', erp_order_id = u.erp_order_id,
        accepted_at = u.accepted_at, lease_until = NULL, last_error = NULL, updated_at = now()
    FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS u(order_id, erp_order_id, accepted_at)
    WHERE o.order_id = u.order_id AND o.status <> 'accepted'"""
_RETRY: Final = """
    UPDATE orders o SET status = 'queued', lease_until = NULL, last_error = u.error,
        next_attempt_at = now() + make_interval(secs => u.delay), updated_at = now()
    FROM unnest($1::text[], $2::float8[], $3::text[]) AS u(order_id, delay, error)
    WHERE o.order_id = u.order_id AND o.status = 'sending'"""
_FAIL: Final = """
    UPDATE orders o SET status = 'failed', lease_until = NULL, last_error = u.error,
        updated_at = now()
    FROM unnest($1::text[], $2::text[]) AS u(order_id, error)
    WHERE o.order_id = u.order_id AND o.status = 'sending'"""


def _outcomes(query: str) -> Statement[tuple[Any, ...], None]:
    """A writer's outcome for many orders in one statement, rows in key order (lock order)."""

    async def run(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> list[None]:
        ordered = sorted(rows, key=lambda row: str(row[0]))
        await conn.execute(query, *([row[i] for row in ordered] for i in range(len(rows[0]))))
        return [None] * len(rows)

    return Statement(query, run)


_HAND_BACK: Final = """
    UPDATE orders o SET status = 'queued', lease_until = NULL, attempts = o.attempts - 1,
        next_attempt_at = now(), updated_at = now()
    FROM unnest($1::text[]) AS u(order_id)
    WHERE o.order_id = u.order_id AND o.status = 'sending'"""
ACCEPTED: Final = _outcomes(_ACCEPTED)
HAND_BACK: Final = _outcomes(_HAND_BACK)
RETRY: Final = _outcomes(_RETRY)
FAIL: Final = _outcomes(_FAIL)
# The depth without a count over the waiting orders (migration 0008 keeps the counts): all
# waiting orders, less those whose hold is still pending (not acknowledged yet; a few, for
# milliseconds), counted from the pending rows with one key lookup each. The oldest is found
# from the front of the queue by ``seq``: rows of statements that ran side by side may take
# their ``seq`` out of ``created_at`` order, never by more than the few rows a look at the front
# covers.
#
# Back-pressure reads this twice a second in every process, and most often when the buffer is
# deepest, so neither part may grow with the depth. Left to itself the planner may sort every
# waiting order to find the front: whenever it thinks few orders wait (no statistics yet, or
# taken when the buffer was empty), and a statement without parameters keeps the plan of its
# first run (a new gateway's, on an empty buffer). That took 16-89 ms of PostgreSQL CPU a read
# as a benchmark filled the buffer to 58,000. So the front is read in index order, always.
_FRONT_IN_INDEX_ORDER: Final = "SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off"
_DEPTH: Final = """
    SELECT greatest(0,
        (SELECT sum(waiting) FROM order_buffer_counts)
        - (SELECT count(*) FROM order_holds_pending p
           WHERE (SELECT o.status FROM orders o WHERE o.order_id = p.order_id)
               IN ('queued', 'sending'))),
      coalesce((
        SELECT extract(epoch FROM now() - min(created_at)) FROM (
            SELECT created_at FROM orders o WHERE status IN ('queued', 'sending')
              AND NOT EXISTS (SELECT 1 FROM order_holds_pending p WHERE p.order_id = o.order_id)
            ORDER BY seq LIMIT 100) AS front), 0)"""


_DRAINED: Final = """
    SELECT count(*) FROM orders
    WHERE status IN ('accepted', 'failed') AND updated_at > now() - make_interval(secs => $1)"""


class PostgresOrderQueue:
    """:class:`gateway.ports.OrderQueue` on the gateway's PostgreSQL port; the writers'
    outcomes commit together (:class:`GroupCommit`)."""

    def __init__(self, db: Postgres, commits: GroupCommit | None = None) -> None:
        self._db = db
        self._commits = commits or GroupCommit(db)

    async def claim(self, limit: int, lease_seconds: float) -> list[ClaimedOrder]:
        async def claim(conn: asyncpg.Connection) -> list[ClaimedOrder]:
            rows = await conn.fetch(_CLAIM, limit, lease_seconds)
            return [ClaimedOrder(r[0], bytes(r[1]), r[2]) for r in rows]

        return await self._db.write(claim)

    async def accepted(self, order_id: str, erp_order_id: str | None, at: datetime) -> None:
        await self._commits.write(ACCEPTED, (order_id, erp_order_id, at))

    async def retry(self, order_id: str, delay_seconds: float, error: str) -> None:
        await self._commits.write(RETRY, (order_id, delay_seconds, error[:2000]))

    async def fail(self, order_id: str, error: str) -> None:
        await self._commits.write(FAIL, (order_id, error[:2000]))

    async def hand_back(self, order_ids: Sequence[str]) -> None:
        await asyncio.gather(*(self._commits.write(HAND_BACK, (oid,)) for oid in order_ids))

    async def depth(self) -> BufferDepth:
        async def read(conn: asyncpg.Connection) -> BufferDepth:
            await conn.execute(_FRONT_IN_INDEX_ORDER)
            row = await conn.fetchrow(_DEPTH)
            return BufferDepth(int(row[0]), float(row[1]))

        return await self._db.read(read, snapshot=True)  # a transaction, for SET LOCAL

    async def drain_rate(self, window_seconds: float) -> float:
        count = await self._db.fetchval(_DRAINED, window_seconds)
        return int(count) / window_seconds
