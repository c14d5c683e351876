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
from gateway.adapters.postgres import Postgres
from gateway.errors import DependencyDown, Overloaded
from tests.conftest import auth
from tests.helpers import reserve, stock

Client = TestClient[Any, Any]


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
