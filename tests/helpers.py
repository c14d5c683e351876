"""What several test modules share: builders, HTTP calls of the contract, private servers.

Test modules import from here (and from the other non-test modules of ``tests/``), never from
one another: a test module's helpers are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from aiohttp.test_utils import TestClient

from gateway.adapters.migrations import migrate_dsn
from gateway.atp.schemas import StockEvent
from gateway.dev.services import _spawn_redis, _wait_for, free_port
from gateway.reservation import keys
from tests.conftest import auth

Client = TestClient[Any, Any]
# The sweeper releases a reservation within a second of its expiry (README); plus room for a
# loaded machine.
SWEEP_PROMISE = 1.5

# Moves a held reservation's expiry earlier, in its record (the time settle.lua compares with
# now) and in its bucket's index (what the sweeper reads), together: same slot, one script.
_BACKDATE = """
local exp = tonumber(redis.call('HGET', KEYS[1], 'exp'))
if not exp then return 0 end
local earlier = string.format('%d', exp - tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'exp', earlier)
return redis.call('ZADD', KEYS[2], 'XX', 'CH', earlier, ARGV[1])
"""

NOW = datetime.now(UTC).replace(microsecond=0)

# The orders with the state of their holds as the gateway reads it: pending while the order has
# a row in order_holds_pending (migration 0007). Use in place of ``orders`` in a FROM clause.
ORDER_HOLDS = (
    "(SELECT o.*, CASE WHEN p.order_id IS NULL THEN 'moved' ELSE 'pending' END AS hold_state"
    " FROM orders o LEFT JOIN order_holds_pending p USING (order_id)) AS orders"
)


async def insert_pending_order(
    pg: asyncpg.Connection, order_id: str, reservation_id: str, age_seconds: float = 0.0
) -> None:
    """An order row whose hold did not move, as a crash between the two writes leaves it."""
    await pg.execute(
        """WITH new AS (
               INSERT INTO orders (order_id, reservation_id, body, lines, created_at)
               VALUES ($1, $2, '{}', '[]', now() - make_interval(secs => $3))
               RETURNING order_id, created_at)
           INSERT INTO order_holds_pending (order_id, created_at)
           SELECT order_id, created_at FROM new""",
        order_id,
        reservation_id,
        age_seconds,
    )


def at(seconds: float) -> str:
    """RFC 3339 time ``seconds`` after the run's reference time (recent: inside the horizon)."""
    return (NOW + timedelta(seconds=seconds)).isoformat()


def event(
    event_id: str,
    kind: str,
    quantity: int,
    t: float,
    *,
    sku: str = "SKU-1",
    location: str = "L1",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "type": kind,
        "sku": sku,
        "location": location,
        "quantity": quantity,
        "occurred_at": at(t),
        **extra,
    }


async def post_events(client: Client, events: list[dict[str, Any]]) -> dict[str, Any]:
    resp = await client.post("/v1/stock-events", json={"events": events}, headers=auth("feed"))
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def availability(client: Client, **params: Any) -> dict[str, Any]:
    resp = await client.get("/v1/availability", params=params, headers=auth("storefront"))
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


def assert_problem(body: dict[str, Any], status: int, code: str) -> None:
    assert body["status"] == status
    assert body["code"] == code
    assert {"type", "title", "detail"} <= body.keys()


async def stock(client: Client, **positions: int) -> None:
    """Positions as SKU__LOC=qty."""
    await post_events(
        client,
        [
            event(
                f"stock-{name}",
                "snapshot",
                qty,
                0,
                sku=name.split("__")[0],
                location=name.split("__")[1],
            )
            for name, qty in positions.items()
        ],
    )


async def reserve(client: Client, rid: str, lines: list[dict[str, Any]], **extra: Any) -> Any:
    return await client.post(
        "/v1/reservations",
        json={"reservation_id": rid, "lines": lines, **extra},
        headers=auth("storefront"),
    )


@contextlib.asynccontextmanager
async def private_database(dsn: str) -> AsyncIterator[str]:
    """A migrated database of the test's own on the same server, for faults that would disturb
    other tests sharing the server's ``test`` database: locks held, a table that refuses rows,
    the database dropped. (Advisory locks are per database too.)"""
    name = f"atp_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        private = urlsplit(dsn)._replace(path=f"/{name}").geturl()
        await migrate_dsn(private)
        yield private
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


def stock_event(event_id: str, kind: str, qty: int, when: datetime) -> StockEvent:
    return StockEvent(
        event_id=event_id,
        type=kind,
        sku="H",
        location="L",
        quantity=qty,  # type: ignore[arg-type]
        occurred_at=when,
    )


class OwnRedis:
    """A redis-server this test may stop, resume, kill and start again on the same port."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        proc = _spawn_redis(self.binary, self.port)
        _wait_for("127.0.0.1", self.port, proc, "redis-server")
        return proc

    def stall(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.resume()
        self.proc.kill()
        self.proc.wait(5)

    def restart(self) -> None:
        self.proc = self._start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            self.proc.wait(5)


async def backdate_expiry(redis: Any, reservation_id: str, seconds: float) -> None:
    """Let ``seconds`` pass for one held reservation: expiry is tested without sleeping past
    real TTLs. ``redis``: a client of the gateway's Redis, single node or cluster."""
    n = keys.bucket(reservation_id)
    changed = await redis.eval(
        _BACKDATE,
        2,
        keys.record(reservation_id),
        keys.expiry_index(n),
        reservation_id,
        str(int(seconds * 1000)),
    )
    assert changed == 1, f"{reservation_id} is not a held reservation in its expiry index"


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Poll ``check`` until it holds; fails after ``within`` seconds. Returns the wait."""
    start = time.monotonic()
    while not await check():
        waited = time.monotonic() - start
        assert waited < within, f"not within {within} s: {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def metric_sum(metrics: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in a Prometheus text scrape whose labels include
    ``labels`` (all of them when none are given)."""
    found = 0.0
    for line in metrics.splitlines():
        head, _, value = line.rpartition(" ")
        if head != name and not head.startswith(name + "{"):
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if all(have.get(k) == v for k, v in labels.items()):
            found += float(value)
    return found
