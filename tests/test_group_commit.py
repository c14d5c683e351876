"""Group commit: concurrent writes share transactions, each caller gets its own answer or the
batch's honest failure, and racing confirms still make exactly one order per reservation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway.adapters.group_commit import MAX_PENDING, GroupCommit, Statement
from gateway.adapters.outbox import PostgresOutbox
from gateway.adapters.postgres import Postgres
from gateway.errors import DependencyDown, Overloaded
from gateway.ports import NewOrder
from tests.conftest import auth
from tests.helpers import ORDER_HOLDS, reserve, stock

Client = TestClient[Any, Any]


async def delete_orders(conn: asyncpg.Connection, pattern: str) -> None:
    await conn.execute("DELETE FROM order_holds_pending WHERE order_id LIKE $1", pattern)
    await conn.execute("DELETE FROM orders WHERE order_id LIKE $1", pattern)


def count_statements(db: Postgres) -> list[object]:
    """Each statement the port sends from now on (one transaction each) adds an entry."""
    sent: list[object] = []
    write_statement = db.write_statement

    async def counted(work: Any) -> Any:
        sent.append(work)
        return await write_statement(work)

    db.write_statement = counted  # type: ignore[method-assign]
    return sent


async def confirm(client: Client, rid: str, order_id: str) -> Any:
    body = {"order_id": order_id, "order": {"customer_id": "c1"}}
    return await client.post(
        f"/v1/reservations/{rid}/confirm", json=body, headers=auth("storefront")
    )


async def _txid(conn: asyncpg.Connection, args: Sequence[int]) -> list[tuple[int, int]]:
    txid = int(await conn.fetchval("SELECT txid_current()"))
    return [(arg, txid) for arg in args]


TXID = Statement("txid", _txid)


async def test_concurrent_writes_share_transactions(postgres_dsn: str) -> None:
    db = Postgres(postgres_dsn, 3.0)
    await db.start()
    commits = GroupCommit(db, max_batch=50)
    try:
        answers = await asyncio.gather(*(commits.write(TXID, i) for i in range(200)))
        assert [arg for arg, _ in answers] == list(range(200))  # each its own answer
        transactions = {txid for _, txid in answers}
        assert len(transactions) <= 5  # 200 writes in batches of at most 50
        # An idle committer writes at once, alone.
        (arg, txid) = await commits.write(TXID, 7)
        assert arg == 7
        assert txid not in transactions
    finally:
        await commits.close()
        await db.close()


async def test_the_queue_before_a_batch_is_bounded(postgres_dsn: str) -> None:
    """Past MAX_PENDING waiting writes, one more is refused at once (nothing written); the
    ones taken all get their answers."""
    db = Postgres(postgres_dsn, 3.0)
    await db.start()
    commits = GroupCommit(db)
    try:
        taken = [commits.submit(TXID, i) for i in range(MAX_PENDING)]  # one tick: none flushed
        with pytest.raises(Overloaded):
            commits.submit(TXID, -1)
        answers = await asyncio.gather(*taken)
        assert [arg for arg, _ in answers] == list(range(MAX_PENDING))
    finally:
        await commits.close()
        await db.close()


async def test_a_write_not_sent_by_its_deadline_is_not_sent_at_all(postgres_dsn: str) -> None:
    """A write queued behind a batch past its ``send_by`` is refused, nothing applied (a
    confirm that moved its hold first must know its row cannot land later); the others of its
    batch go."""
    db = Postgres(postgres_dsn, 3.0)
    await db.start()
    commits = GroupCommit(db)
    sent = count_statements(db)
    try:
        now = asyncio.get_running_loop().time()
        # One tick, one batch: the deadline of one has passed by the time the batch forms.
        late = commits.submit(TXID, 1, send_by=now - 0.001)
        due = commits.submit(TXID, 2, send_by=now + 60)
        free = commits.submit(TXID, 3)
        with pytest.raises(DependencyDown):
            await late
        assert [(await due)[0], (await free)[0]] == [2, 3]
        assert len(sent) == 1  # the others' statement; the late write was in none
    finally:
        await commits.close()
        await db.close()


async def test_every_caller_of_a_failed_batch_hears_it(postgres_dsn: str) -> None:
    db = Postgres("postgresql://postgres@127.0.0.1:1/none", 0.5)
    await db.start()
    commits = GroupCommit(db)
    try:
        answers = await asyncio.gather(
            *(commits.write(TXID, i) for i in range(20)), return_exceptions=True
        )
        assert all(isinstance(a, DependencyDown) for a in answers)
    finally:
        await commits.close()
        await db.close()


async def test_racing_confirms_in_one_batch_make_one_order_per_reservation(
    client: Client, pg: asyncpg.Connection
) -> None:
    """Per reservation, at once: the same confirm three times and a confirm under another order
    id. Exactly one order per reservation; one 202 for it, the repeats of the winner 200 with
    the same body, everything else 409 idempotency_conflict."""
    await stock(client, A__L1=1000)
    rids = [f"r{i}" for i in range(40)]
    for rid in rids:
        assert (
            await reserve(client, rid, [{"sku": "A", "location": "L1", "quantity": 1}])
        ).status == 201
    calls = []
    for rid in rids:
        calls += [(rid, f"o-{rid}")] * 3 + [(rid, f"x-{rid}")]
    answers = await asyncio.gather(*(confirm(client, rid, oid) for rid, oid in calls))
    bodies = [await a.json() for a in answers]
    rows = dict(await pg.fetch("SELECT reservation_id, order_id FROM orders"))
    assert sorted(rows) == sorted(rids)
    for rid in rids:
        winner = rows[rid]
        mine = [
            (a.status, b) for (r, _), a, b in zip(calls, answers, bodies, strict=True) if r == rid
        ]
        assert sorted(s for s, _ in mine).count(202) == 1
        for (status, body), (_, oid) in zip(mine, [c for c in calls if c[0] == rid], strict=True):
            if oid == winner:
                assert status in (200, 202)
                assert body == {"order_id": winner, "reservation_id": rid, "status": "queued"}
            else:
                assert status == 409
                assert body["code"] == "idempotency_conflict"


async def test_new_rows_carry_the_moved_marks_of_earlier_ones(postgres_dsn: str) -> None:
    """Marks queued with new rows go in the rows' statement (one statement, one transaction),
    each caller with its own answer; a mark with no rows beside it is written on its own."""
    db = Postgres(postgres_dsn, 3.0)
    await db.start()
    statements = count_statements(db)
    commits = GroupCommit(db)
    outbox = PostgresOutbox(db, commits)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await delete_orders(conn, "gc-carry-%")

        def order(i: int) -> NewOrder:
            return NewOrder(f"gc-carry-{i:03d}", f"gc-carry-r{i:03d}", None, b"{}", b"[]")

        first = await asyncio.gather(*(outbox.add(order(i)) for i in range(10)))
        assert all(stored is not None for stored in first)
        statements.clear()
        # Both slots taken, as by batches in flight: what follows waits and goes together.
        async with commits._slots, commits._slots:
            pending = [outbox.add(order(i)) for i in range(10, 20)]
            pending += [outbox.hold_moved(f"gc-carry-{i:03d}") for i in range(10)]
            tasks = [asyncio.ensure_future(p) for p in pending]
            await asyncio.sleep(0.05)
            assert not any(t.done() for t in tasks)
        answers = await asyncio.gather(*tasks)
        assert all(a is not None for a in answers[:10])  # the new rows, each its own row
        assert [a.order_id for a in answers[:10] if a is not None] == [
            f"gc-carry-{i:03d}" for i in range(10, 20)
        ]
        rows = await conn.fetch(
            f"SELECT order_id, hold_state FROM {ORDER_HOLDS} "
            "WHERE order_id LIKE 'gc-carry-%' ORDER BY order_id"
        )
        assert [r["hold_state"] for r in rows] == ["moved"] * 10 + ["pending"] * 10
        assert len(statements) == 1  # one statement, one transaction
        # Alone, a mark still goes (its own statement).
        await outbox.hold_moved("gc-carry-015")
        state = await conn.fetchval(
            f"SELECT hold_state FROM {ORDER_HOLDS} WHERE order_id = 'gc-carry-015'"
        )
        assert state == "moved"
    finally:
        await delete_orders(conn, "gc-carry-%")
        await conn.close()
        await commits.close()
        await db.close()


async def test_a_mark_waits_briefly_for_new_rows_to_ride_with(postgres_dsn: str) -> None:
    """A mark alone does not take a commit of its own at once: rows that come within its wait
    carry it (one transaction); with none, it is written when the wait is over."""
    db = Postgres(postgres_dsn, 3.0)
    await db.start()
    statements = count_statements(db)
    commits = GroupCommit(db)
    outbox = PostgresOutbox(db, commits)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await delete_orders(conn, "gc-ride-%")

        def order(i: int) -> NewOrder:
            return NewOrder(f"gc-ride-{i}", f"gc-ride-r{i}", None, b"{}", b"[]")

        await outbox.add(order(1))
        statements.clear()
        mark = asyncio.ensure_future(outbox.hold_moved("gc-ride-1"))
        await asyncio.sleep(0.01)  # well within the mark's wait
        assert not mark.done()
        await outbox.add(order(2))
        await mark
        rows = await conn.fetch(
            f"SELECT order_id, hold_state FROM {ORDER_HOLDS} "
            "WHERE order_id LIKE 'gc-ride-%' ORDER BY order_id"
        )
        assert [r["hold_state"] for r in rows] == ["moved", "pending"]
        assert len(statements) == 1  # the new row carried the mark
        # Alone, the mark is written once its wait is over.
        started = asyncio.get_running_loop().time()
        await outbox.hold_moved("gc-ride-2")
        assert asyncio.get_running_loop().time() - started < 1.0
        state = await conn.fetchval(
            f"SELECT hold_state FROM {ORDER_HOLDS} WHERE order_id = 'gc-ride-2'"
        )
        assert state == "moved"
    finally:
        await delete_orders(conn, "gc-ride-%")
        await conn.close()
        await commits.close()
        await db.close()


async def test_a_pending_row_left_without_its_order_does_not_fail_a_batch(
    postgres_dsn: str,
) -> None:
    """A hand-made delete from orders can leave its pending row behind: an order of that id
    written later is pending (the row is its own now), and the others of its batch stand."""
    db = Postgres(postgres_dsn, 3.0)
    await db.start()
    outbox = PostgresOutbox(db, GroupCommit(db))
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await delete_orders(conn, "gc-orphan-%")
        await conn.execute(
            "INSERT INTO order_holds_pending (order_id, created_at)"
            " VALUES ('gc-orphan-1', now() - interval '1 hour')"
        )
        answers = await asyncio.gather(
            *(
                outbox.add(NewOrder(f"gc-orphan-{i}", f"gc-orphan-r{i}", None, b"{}", b"[]"))
                for i in (1, 2)
            )
        )
        assert [a.hold_state if a else None for a in answers] == ["pending", "pending"]
        age = await conn.fetchval(
            "SELECT extract(epoch FROM now() - created_at) FROM order_holds_pending"
            " WHERE order_id = 'gc-orphan-1'"
        )
        assert age < 60  # the new order's, not the orphan's hour-old stamp
    finally:
        await delete_orders(conn, "gc-orphan-%")
        await conn.close()
        await db.close()
