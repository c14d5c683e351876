"""The buffer's depth, read from the counts its statements keep (migration 0008), equals a count
over the waiting orders after any mix of what changes it: group-committed confirms side by
side, moved marks, discards, claims, every writer outcome, replays, deletes by hand, TRUNCATE;
and its oldest order's age is the oldest waiting, acknowledged order's."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.adapters.erp_control_record import PostgresErpControl
from gateway.adapters.group_commit import GroupCommit
from gateway.adapters.outbox import PostgresOrderQueue, PostgresOutbox
from gateway.adapters.postgres import Postgres
from gateway.ports import Caller, NewOrder
from tests.helpers import insert_pending_order

# What the depth was before the counts: every waiting order whose hold moved (acknowledged).
REFERENCE = """
    SELECT count(*) FROM orders o WHERE status IN ('queued', 'sending')
      AND NOT EXISTS (SELECT 1 FROM order_holds_pending p WHERE p.order_id = o.order_id)"""
REFERENCE_AGE = """
    SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0) FROM orders o
    WHERE status IN ('queued', 'sending')
      AND NOT EXISTS (SELECT 1 FROM order_holds_pending p WHERE p.order_id = o.order_id)"""

OPS = st.sampled_from(
    [
        "add",
        "move",
        "discard",
        "claim",
        "accept",
        "retry",
        "fail",
        "hand_back",
        "replay",
        "delete",
        "pending_by_hand",
        "truncate",
    ]
)


class Buffer:
    def __init__(self, db: Postgres, conn: asyncpg.Connection) -> None:
        commits = GroupCommit(db)
        self.outbox = PostgresOutbox(db, commits)
        self.queue = PostgresOrderQueue(db, commits)
        self.control = PostgresErpControl(db)
        self.conn = conn
        self.made = 0

    async def ids(self, where: str, n: int) -> list[str]:
        rows = await self.conn.fetch(
            f"SELECT order_id FROM orders o WHERE {where} ORDER BY seq LIMIT {n}"
        )
        return [r[0] for r in rows]

    async def run(self, op: str, n: int) -> None:
        pending = "EXISTS (SELECT 1 FROM order_holds_pending p WHERE p.order_id = o.order_id)"
        if op == "add":
            # What came before is 10 s older than the new batch, whatever its state: an age
            # taken from a row it should not look at is off by 10 s or more.
            await self.conn.execute("UPDATE orders SET created_at = created_at - interval '10s'")
            first, self.made = self.made, self.made + n
            await asyncio.gather(
                *(
                    self.outbox.add(
                        NewOrder(f"depth-{i}", f"depth-r{i}", f"c{i % 3}", b"{}", b"[]")
                    )
                    for i in range(first, self.made)
                )
            )
            # All but the newest acknowledged, as intake leaves them: the writers' to take.
            for i in range(first, self.made - 1):
                await self.outbox.hold_moved(f"depth-{i}")
        elif op == "move":
            for order_id in await self.ids(pending, n):
                await self.outbox.hold_moved(order_id)
        elif op == "discard":
            for order_id in await self.ids(pending, n):
                await self.outbox.discard(order_id)
        elif op == "claim":
            await self.queue.claim(n, 30.0)
        elif op in ("accept", "retry", "fail"):
            await self.queue.claim(n, 30.0)
            for order_id in await self.ids("status = 'sending'", n):
                if op == "accept":
                    await self.queue.accepted(order_id, f"erp-{order_id}", datetime.now(UTC))
                elif op == "retry":
                    await self.queue.retry(order_id, 0.0, "503")
                else:
                    await self.queue.fail(order_id, "422")
        elif op == "hand_back":
            await self.queue.claim(n, 30.0)
            await self.queue.hand_back(await self.ids("status = 'sending'", n))
        elif op == "replay":
            caller = Caller("test", "depth")
            await self.control.replay(await self.ids("status = 'failed'", n), caller)
        elif op == "delete":
            await self.conn.execute(
                "DELETE FROM orders WHERE order_id = ANY($1::text[])",
                await self.ids("true", n),
            )
        elif op == "pending_by_hand":
            first, self.made = self.made, self.made + 1
            await insert_pending_order(self.conn, f"depth-{first}", f"depth-r{first}")
        else:
            await self.conn.execute("TRUNCATE orders, order_holds_pending")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(st.tuples(OPS, st.integers(1, 6)), min_size=1, max_size=25))
# Always tried: an older row the writer settled must not count as the oldest waiting one.
@example(steps=[("add", 2), ("add", 1), ("accept", 1)])
async def test_the_depth_counts_every_waiting_order_after_any_mix_of_changes(
    postgres_dsn: str, pg: asyncpg.Connection, steps: list[tuple[str, int]]
) -> None:
    await pg.execute("TRUNCATE orders, order_holds_pending")
    db = Postgres(postgres_dsn, 3.0)
    await db.start()
    try:
        buffer = Buffer(db, pg)
        for op, n in steps:
            await buffer.run(op, n)
            depth = await buffer.queue.depth()
            assert depth.depth == await pg.fetchval(REFERENCE), (op, steps)
            oldest = float(await pg.fetchval(REFERENCE_AGE))
            assert abs(depth.oldest_age_seconds - oldest) < 1.0, (op, steps)
    finally:
        await db.close()


# What reading the order buffer's table and its indexes has cost so far, in rows.
ROWS_READ = """
    SELECT (SELECT coalesce(seq_tup_read, 0) FROM pg_stat_user_tables WHERE relname = 'orders')
         + (SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes
            WHERE relname = 'orders')"""


async def _flush_stats(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_stat_force_next_flush()")


async def test_the_depth_read_stays_cheap_when_the_buffer_filled_after_its_first_read(
    postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    """Back-pressure reads the depth twice a second in every process, deepest buffer first: a
    read planned on the empty buffer a gateway starts with must not scan every waiting order
    once it is deep."""
    db = Postgres(postgres_dsn, 5.0)
    await db.start()
    try:
        queue = PostgresOrderQueue(db)
        assert (await queue.depth()).depth == 0  # its first read meets an empty buffer
        deep = 20_000
        await pg.execute(
            "INSERT INTO orders (order_id, reservation_id, body, lines)"
            " SELECT 'deep-' || i, 'deep-r' || i, '\\x7b7d', '[]'"
            f" FROM generate_series(1, {deep}) AS i"
        )
        await insert_pending_order(pg, "deep-pending", "deep-r-pending")
        await db.read(_flush_stats)  # the port's own backend: sequential reads reuse it
        before = await pg.fetchval(ROWS_READ)
        depth = await queue.depth()
        await db.read(_flush_stats)
        read = await pg.fetchval(ROWS_READ) - before
        assert depth.depth == deep  # the pending one is not acknowledged: not counted
        # The front of the queue and the pending row's key: a few hundred rows, not 20,000.
        assert read < 1_000, read
    finally:
        await db.close()
