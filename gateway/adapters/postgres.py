"""PostgreSQL: a bounded port over an asyncpg pool, and the migration runner.

Bounds. Acquiring a connection (connecting, when the pool has none free) and every statement of
one unit of work share one deadline, ``GATEWAY_POSTGRES_TIMEOUT_SECONDS``. A unit that misses it,
or whose connection fails, has its connection *terminated*: closed at once, never waited on.
asyncpg's own way out of a late query sends a CancelRequest over a second connection and waits
for the first to answer; against a black-holed server that wait never ends, and it is what kept
a pool's connections stuck and ``/readyz`` waiting 11 s behind a 1 s timeout. The server rolls
back whatever the terminated connection had open when it sees the socket close, at the latest
after ``idle_in_transaction_session_timeout`` (set on every connection).

Known down. A timeout or a lost connection closes the gate (:class:`DependencyGate`): while
PostgreSQL is known to be down or stalled, calls fail at once with 503 ``dependency_unavailable``
instead of queueing behind it, and a probe on a fresh connection reopens the gate when it answers.

Honest outcomes. :meth:`Postgres.write` knows whether COMMIT was sent: a failure before it is
:class:`DependencyDown` (nothing applied), no answer to it :class:`OutcomeUnknown`.

Start-up. :meth:`Postgres.start` tries once to migrate and open the pool; if PostgreSQL is not
there, an owned task keeps trying, and until it succeeds calls answer 503 naming PostgreSQL. A
gateway whose database is down starts, serves what does not need it and says what is missing.

Migrations are plain numbered ``.sql`` files in ``gateway/migrations``; each runs in its own
transaction and is recorded in ``schema_migrations``. Several gateways may start at once, so the
runner holds a session advisory lock while it applies what is pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, TypeVar

import asyncpg
import structlog

from gateway.adapters.gate import RETRY_AFTER, DependencyGate
from gateway.errors import DependencyDown, GatewayError, OutcomeUnknown
from gateway.metrics import DEPENDENCY_UP

log = structlog.get_logger(__name__)

T = TypeVar("T")
Work = Callable[[asyncpg.Connection], Awaitable[T]]

NAME: Final = "postgres"
# Arbitrary, fixed: every gateway process must contend for the same lock.
_MIGRATION_LOCK_ID: Final = 0x617470_6D6967
_FILE_NAME: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Migrations may legitimately run long (an index on a big table); a server that stalls mid-way
# still must not hold the start-up forever.
_MIGRATION_DEADLINE: Final = 300.0
POOL_SIZE: Final = 10
# Retries of the start-up connection: soon at first, then every few seconds.
_CONNECT_RETRY_FIRST: Final = 0.25
_CONNECT_RETRY_MAX: Final = 5.0
# SQLSTATE classes that say "the database cannot serve this now" rather than "this request is
# wrong": connection exceptions, transaction rollback (serialization, deadlock), insufficient
# resources, operator intervention (admin shutdown, cannot connect now, statement timeout).
_UNAVAILABLE_CLASSES: Final = frozenset({"08", "40", "53", "57"})
# ...and of those, the ones that say the server itself is gone or stalled.
_DOWN_CLASSES: Final = frozenset({"08", "57"})


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("gateway.migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations; returns the versions applied by this call."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in available_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("migration_applied", version=migration.version, name=migration.name)
            applied_now.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_ID)
    return applied_now


async def migrate_dsn(dsn: str, timeout_seconds: float = 10.0) -> list[int]:
    """Connect (within ``timeout_seconds``) and apply pending migrations.

    A connection that stalls is terminated, not waited on, so this always returns or raises."""
    conn = await asyncpg.connect(dsn, timeout=timeout_seconds)
    try:
        async with asyncio.timeout(_MIGRATION_DEADLINE):
            applied = await migrate(conn)
    except BaseException:
        conn.terminate()
        raise
    conn.terminate()  # nothing is pending on it: no goodbye to wait for
    return applied


async def create_pool(dsn: str, timeout_seconds: float = 3.0) -> asyncpg.Pool:
    """A pool whose connections are bounded on both ends.

    Here: ``timeout`` bounds each connect. Statements carry no asyncpg timeout (see the module
    docstring: :class:`Postgres` bounds them itself and terminates late connections). On the
    server: ``statement_timeout`` and ``idle_in_transaction_session_timeout`` make PostgreSQL
    give up on the work of a client that has gone, so no lock outlives its request for long.
    """
    ms = math.ceil(timeout_seconds * 1000)
    pool = await asyncpg.create_pool(
        dsn,
        # No floor: asyncpg would keep reconnecting to restore one while PostgreSQL is down,
        # logging a traceback each time. Connections open on demand and stay while in use
        # (the migration that runs first has already shown PostgreSQL answers).
        min_size=0,
        max_size=POOL_SIZE,
        timeout=timeout_seconds,
        command_timeout=None,
        reset=_no_reset,
        server_settings={
            "statement_timeout": str(2 * ms),
            "idle_in_transaction_session_timeout": str(max(4 * ms, 2000)),
        },
    )
    assert pool is not None
    return pool


async def _no_reset(conn: asyncpg.Connection) -> None:
    """asyncpg resets a released connection with a round trip (``RESET ALL``, ``UNLISTEN``...)
    that nothing bounds; this gateway leaves no session state behind (every failure terminates
    the connection), so release does no I/O at all."""


class Postgres:
    """The gateway's PostgreSQL: units of work bounded by one deadline, failures as 503s."""

    def __init__(self, dsn: str, timeout_seconds: float) -> None:
        self._dsn = dsn
        self.timeout = timeout_seconds
        self._pool: asyncpg.Pool | None = None
        self._not_connected = "not connected yet"
        self._connector: asyncio.Task[None] | None = None
        self.gate = DependencyGate(NAME, self._probe, timeout=timeout_seconds)

    @property
    def connected(self) -> bool:
        return self._pool is not None

    def state(self) -> str:
        """``up``, or ``down: <why>`` (not connected yet, or known down since a failure)."""
        if self._pool is None:
            return f"down: {self._not_connected}"
        if not self.gate.up:
            return f"down: {self.gate.reason}"
        return "up"

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Migrate and open the pool; if PostgreSQL is not there, an owned task keeps trying
        (:meth:`close` cancels it) and this returns at once."""
        if not await self._connect():
            self._connector = asyncio.create_task(
                self._connect_until_done(), name="postgres-connect"
            )

    async def close(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        await self.gate.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                async with asyncio.timeout(self.timeout):
                    await pool.close()
            except TimeoutError:
                pool.terminate()

    async def _connect_until_done(self) -> None:
        delay = _CONNECT_RETRY_FIRST
        while True:
            await asyncio.sleep(delay)
            if await self._connect():
                return
            delay = min(delay * 2, _CONNECT_RETRY_MAX)

    async def _connect(self) -> bool:
        try:
            await migrate_dsn(self._dsn, self.timeout)
            self._pool = await create_pool(self._dsn, self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever it is, PostgreSQL is not usable yet
            self._not_connected = f"connecting: {_describe(exc)}"
            DEPENDENCY_UP.labels(NAME).set(0)
            log.warning("postgres_connect_failed", error=_describe(exc))
            return False
        log.info("postgres_connected")
        DEPENDENCY_UP.labels(NAME).set(1)
        return True

    async def _probe(self) -> None:
        """Ask on a fresh connection: the pool's may be the ones that are stuck."""
        conn = await asyncpg.connect(self._dsn, timeout=self.timeout)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            conn.terminate()

    # -- units of work -----------------------------------------------------------------------

    async def read(self, work: Work[T], *, snapshot: bool = False) -> T:
        """Run ``work`` on one connection (in one REPEATABLE READ snapshot with ``snapshot``)."""
        if snapshot:
            return await self._unit(work, "repeatable_read", readonly=True)
        return await self._unit(work, None)

    async def write(self, work: Work[T]) -> T:
        """Run ``work`` in one transaction and commit it.

        Raises :class:`DependencyDown` when nothing was applied (the failure came before COMMIT
        was sent, or the server refused the COMMIT) and :class:`OutcomeUnknown` when COMMIT was
        sent and not answered."""
        return await self._unit(work, "read_committed")

    async def execute(self, query: str, *args: Any) -> str:
        """One statement, committed on its own: no answer to it is :class:`OutcomeUnknown`."""
        return await self._unit(lambda conn: conn.execute(query, *args), None, writes=True)

    # fetch and fetchval are for reads: a failure is DependencyDown, whenever it came.
    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._unit(lambda conn: conn.fetch(query, *args), None)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._unit(lambda conn: conn.fetchval(query, *args), None)

    async def executemany(self, query: str, args: Iterable[Sequence[Any]]) -> None:
        """One statement per row, all or none (asyncpg runs them in one transaction)."""
        await self._unit(lambda conn: conn.executemany(query, args), None, writes=True)

    async def ping(self) -> None:
        await self.fetchval("SELECT 1")

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection for work the caller bounds itself (``asyncio.timeout``).

        Acquiring is bounded here and fails as :meth:`write` does. Whatever ends the block with
        an exception, the caller's timeout included, terminates the connection instead of
        waiting on it (``async with pool.acquire()`` would wait for a cancelled query to be
        cancelled on the server, which a stalled server never confirms)."""
        pool = self._usable()
        full = _full(pool)
        try:
            async with asyncio.timeout(self.timeout):
                conn = await pool.acquire()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self._failure(exc, commit_sent=False, pool_full=full) from exc
        try:
            yield conn
        except BaseException:
            conn.terminate()
            raise
        if conn.is_in_transaction():
            conn.terminate()
        await pool.release(conn)

    def _usable(self) -> asyncpg.Pool:
        pool = self._pool
        if pool is None:
            raise DependencyDown(
                f"postgres is unavailable ({self._not_connected}); nothing was applied",
                dependency=NAME,
                retry_after=RETRY_AFTER,
            )
        self.gate.check()
        return pool

    async def _unit(
        self,
        work: Work[T],
        isolation: str | None,
        *,
        readonly: bool = False,
        writes: bool = False,
    ) -> T:
        """Run ``work`` under one deadline: in a transaction of ``isolation``, or on its own
        (``None``; ``writes``: its statements commit as they run, so from the moment they are
        sent a failure is :class:`OutcomeUnknown`)."""
        pool = self._usable()
        full = _full(pool)
        conn: asyncpg.Connection | None = None
        commit_sent = False
        try:
            # One deadline for acquiring (connecting, maybe), every statement and the COMMIT.
            async with asyncio.timeout(self.timeout):
                conn = await pool.acquire()
                if isolation is None:
                    commit_sent = writes
                    result = await work(conn)
                else:
                    transaction = conn.transaction(isolation=isolation, readonly=readonly)
                    await transaction.start()
                    result = await work(conn)
                    # A read-only transaction changes nothing, whatever becomes of its COMMIT.
                    commit_sent = not readonly
                    await transaction.commit()
        except BaseException as exc:
            if conn is not None:
                # Never wait on it: a late or broken connection is closed at once, which also
                # returns its slot to the pool and makes the server roll back.
                conn.terminate()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self._failure(exc, commit_sent, pool_full=full and conn is None) from exc
        assert conn is not None
        if conn.is_in_transaction():  # a unit must not leave one open for the next user
            conn.terminate()
        await pool.release(conn)
        return result

    def _failure(
        self, exc: BaseException, commit_sent: bool, *, pool_full: bool = False
    ) -> BaseException:
        """What a failed unit of work tells the caller. ``pool_full``: it failed waiting for a
        connection while every one was in use (load, not a sign that the server is down)."""
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, TimeoutError) and pool_full:
            return DependencyDown(
                f"postgres: every connection of the pool stayed busy for {self.timeout:g}s; "
                "nothing was applied",
                dependency=NAME,
                retry_after=RETRY_AFTER,
            )
        if isinstance(exc, asyncpg.PostgresError) and not isinstance(
            exc, asyncpg.PostgresConnectionError
        ):
            # The server answered with an error: whatever it was, it was not applied.
            sqlstate = str(getattr(exc, "sqlstate", "") or "")
            if sqlstate[:2] not in _UNAVAILABLE_CLASSES:
                # A bug of ours (a constraint, a syntax error): a 500 with its trace.
                server_error: BaseException = exc
                return server_error
            if sqlstate[:2] in _DOWN_CLASSES:
                self.gate.trip(_describe(exc))
            return DependencyDown(
                f"postgres: {_describe(exc)}; nothing was applied",
                dependency=NAME,
                retry_after=RETRY_AFTER,
            )
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {self.timeout:g}s"
        elif isinstance(exc, OSError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError):
            reason = _describe(exc)
        else:
            return exc
        self.gate.trip(reason)
        if commit_sent:
            return OutcomeUnknown(
                f"postgres: COMMIT was sent and not answered ({reason}); the change may have "
                "been applied. Retrying the same request is safe",
                dependency=NAME,
                retry_after=RETRY_AFTER,
            )
        return DependencyDown(
            f"postgres: {reason}; nothing was applied", dependency=NAME, retry_after=RETRY_AFTER
        )


def _full(pool: asyncpg.Pool) -> bool:
    return bool(pool.get_idle_size() == 0 and pool.get_size() >= pool.get_max_size())


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
