"""PostgreSQL: a bounded port over asyncpg connections.

Bounds. Waiting for a connection, connecting, and every statement of one unit of work share one
deadline, ``GATEWAY_POSTGRES_TIMEOUT_SECONDS``. A unit that misses it, or whose connection fails,
has its connection *terminated*: closed at once, never waited on. asyncpg's own way out of a late
query sends a CancelRequest over a second connection and waits for the first to answer; against a
black-holed server that wait never ends, and it is what kept a pool's connections stuck and
``/readyz`` waiting 11 s behind a 1 s timeout. The server rolls back whatever the terminated
connection had open when it sees the socket close, at the latest after
``idle_in_transaction_session_timeout`` (set on every connection). A bulk read (the copy of the
whole ops config) has :data:`BULK_FACTOR` times that deadline: a big table is slow, not down.

Known down. While PostgreSQL is known to be down or stalled, calls fail at once with 503
``dependency_unavailable`` instead of queueing behind it (:class:`DependencyGate`), and a probe on
a fresh connection reopens the gate when it answers. What closes the gate is evidence about the
server, not about load: a lost connection, a refusal that every session would meet (shutting
down, credentials or database gone), or no answer to a call that had the server to itself for at
least half the deadline. Not: a full pool (503 ``overloaded``, the caller waited its turn), a
unit that got its connection late and ran out of time, a bulk read, or a lock held by another
session (``lock_timeout``, below the deadline, makes the server answer that it is busy).

Honest outcomes. A failure before COMMIT was sent applied nothing: :class:`DependencyDown`.
After it, only an ERROR the server answered proves the commit failed; anything else (no answer,
a lost connection, a FATAL, a cancel) is :class:`OutcomeUnknown`.

Start-up. :meth:`Postgres.start` waits at most one timeout for the first attempt to migrate
(``gateway.adapters.migrations``) and open the pool; an owned task finishes that attempt and
keeps trying, and until it succeeds calls answer 503 naming PostgreSQL. A gateway whose database
is down, or whose migration lock another session holds, serves what does not need it and says
what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

import asyncpg
import structlog

from gateway.adapters.gate import DependencyGate
from gateway.adapters.migrations import migrate_dsn
from gateway.adapters.postgres_errors import (
    describe,
    is_outage,
    is_request_error,
    proves_not_applied,
)
from gateway.errors import RETRY_AFTER, DependencyDown, GatewayError, OutcomeUnknown, Overloaded
from gateway.metrics import DEPENDENCY_UP

log = structlog.get_logger(__name__)

T = TypeVar("T")
Work = Callable[[asyncpg.Connection], Awaitable[T]]

NAME: Final = "postgres"
POOL_SIZE: Final = 10
# An idle connection older than this is closed rather than used (asyncpg's pool did the same).
IDLE_LIFETIME: Final = 300.0
# A bulk read's deadline, in timeouts (30 s at the default 3 s).
BULK_FACTOR: Final = 10
# A bulk read's own limits on the server, for its transaction only.
_BULK_LIMITS: Final = (
    "SELECT set_config('statement_timeout', $1, true), set_config('lock_timeout', $2, true)"
)
# Retries of the start-up connection: soon at first, then every few seconds.
_CONNECT_RETRY_FIRST: Final = 0.25
_CONNECT_RETRY_MAX: Final = 5.0


class Connections:
    """The port's connections, opened on demand and kept idle (last in, first out) for the
    next unit; how many are in use at once is the port's to bound (its slots).

    In place of asyncpg's pool, which did the same with a queue, a proxy object per acquire, a
    task per release (``asyncio.shield``) and an idle timer per connection: about 30 µs of CPU a
    unit of work, measured, where this costs a list pop and append. Nothing else of that pool
    was used: a unit that fails terminates its own connection, and none leaves session state
    behind, so a released connection needs no reset.

    Each connection is bounded on both ends. Here: ``timeout`` bounds each connect. Statements
    carry no asyncpg timeout (see the module docstring: :class:`Postgres` bounds them itself
    and terminates late connections). On the server: ``statement_timeout`` and
    ``idle_in_transaction_session_timeout`` make PostgreSQL give up on the work of a client that
    has gone, so no lock outlives its request for long; ``lock_timeout`` (half the deadline)
    makes a wait behind another session's lock end in an answer from the server before the
    deadline, not in a silence that looks like a stall.
    """

    def __init__(self, dsn: str, timeout_seconds: float = 3.0) -> None:
        self._dsn = dsn
        self._timeout = timeout_seconds
        self._settings = _limits(math.ceil(timeout_seconds * 1000))
        # (connection, loop time it was released), the most recent last.
        self._idle: list[tuple[asyncpg.Connection, float]] = []
        self._in_use: set[asyncpg.Connection] = set()
        self._connecting = 0
        # Set by close: its wait for the units in flight ends when the last one is done.
        self._all_done: asyncio.Event | None = None

    def _closed(self) -> bool:
        return self._all_done is not None

    async def acquire(self) -> asyncpg.Connection:
        if self._closed():
            raise _closing()
        idle = self._idle
        if idle:
            self._expire(asyncio.get_running_loop().time())
        while idle:
            conn, _ = idle.pop()
            if not conn.is_closed():  # the server may have closed it while it waited
                self._in_use.add(conn)
                return conn
            conn.terminate()  # an aborted protocol may not have cleaned up
        self._connecting += 1
        try:
            conn = await asyncpg.connect(
                self._dsn,
                timeout=self._timeout,
                command_timeout=None,
                server_settings=self._settings,
            )
        finally:
            self._connecting -= 1
            self._check_done()
        if self._closed():  # closing began while it connected
            conn.terminate()
            raise _closing()
        self._in_use.add(conn)
        return conn

    def release(self, conn: asyncpg.Connection) -> None:
        """Keep a connection its unit is done with; one left in a transaction (a unit must
        not leave one open for the next) or closed is dropped."""
        self._in_use.discard(conn)
        if conn.is_closed() or conn.is_in_transaction() or self._closed():
            conn.terminate()
        else:
            now = asyncio.get_running_loop().time()
            self._idle.append((conn, now))
            self._expire(now)
        self._check_done()

    def discard(self, conn: asyncpg.Connection) -> None:
        """Close a connection at once, never waiting on it (a late or broken unit's)."""
        self._in_use.discard(conn)
        conn.terminate()
        self._check_done()

    def _expire(self, now: float) -> None:
        """Close connections idle longer than :data:`IDLE_LIFETIME` (the oldest are first): a
        middlebox may have dropped them silently, and the server keeps a backend for each."""
        idle = self._idle
        while idle and now - idle[0][1] > IDLE_LIFETIME:
            idle.pop(0)[0].terminate()

    def _check_done(self) -> None:
        if self._all_done is not None and not self._in_use and not self._connecting:
            self._all_done.set()

    async def close(self) -> None:
        """Refuse new units, wait for those in flight, then close every connection politely;
        the caller bounds the wait and terminates what is left (:meth:`terminate`)."""
        self._all_done = asyncio.Event()
        try:
            self._check_done()
            await self._all_done.wait()
            await asyncio.gather(*(c.close() for c, _ in self._idle), return_exceptions=True)
        except BaseException:
            self.terminate()
            raise
        self._idle.clear()

    def terminate(self) -> None:
        for conn in (*(c for c, _ in self._idle), *self._in_use):
            conn.terminate()
        self._idle.clear()
        self._in_use.clear()


def _closing() -> DependencyDown:
    return DependencyDown(
        "postgres: the gateway is shutting down; nothing was applied",
        dependency=NAME,
        retry_after=RETRY_AFTER,
    )


def _limits(ms: int) -> dict[str, str]:
    return {
        "statement_timeout": str(2 * ms),
        "lock_timeout": str(max(ms // 2, 1)),
        "idle_in_transaction_session_timeout": str(max(4 * ms, 2000)),
    }


class Postgres:
    """The gateway's PostgreSQL: units of work bounded by one deadline, failures as 503s."""

    def __init__(self, dsn: str, timeout_seconds: float) -> None:
        self._dsn = dsn
        self.timeout = timeout_seconds
        self.bulk_timeout = BULK_FACTOR * timeout_seconds
        self._pool: Connections | None = None
        # How many connections are in use at once (Connections opens them on demand): waiting
        # for a slot (load) and connecting (the server) are told apart.
        self._slots = asyncio.Semaphore(POOL_SIZE)
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
        """Migrate and open the pool, waiting for that at most one timeout; what is left (a
        long migration, a lock another session holds, PostgreSQL not there) an owned task
        finishes and retries (:meth:`close` cancels it)."""
        attempt = asyncio.create_task(self._connect(), name="postgres-connect-first")
        try:
            await asyncio.wait([attempt], timeout=self.timeout)
        except asyncio.CancelledError:
            attempt.cancel()
            raise
        if not (attempt.done() and attempt.result()):
            self._connector = asyncio.create_task(
                self._connect_until_done(attempt), name="postgres-connect"
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

    async def _connect_until_done(self, first: asyncio.Task[bool]) -> None:
        # Awaiting the first attempt makes it this task's: cancelling this cancels it.
        done = await first
        delay = _CONNECT_RETRY_FIRST
        while not done:
            await asyncio.sleep(delay)
            done = await self._connect()
            delay = min(delay * 2, _CONNECT_RETRY_MAX)

    async def _connect(self) -> bool:
        try:
            # The lock: waited for no longer than a timeout, then tried again later.
            await migrate_dsn(self._dsn, self.timeout, lock_wait=self.timeout)
            self._pool = Connections(self._dsn, self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever it is, PostgreSQL is not usable yet
            self._not_connected = f"connecting: {describe(exc)}"
            DEPENDENCY_UP.labels(NAME).set(0)
            log.warning("postgres_connect_failed", error=describe(exc))
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

    async def read(self, work: Work[T], *, snapshot: bool = False, bulk: bool = False) -> T:
        """Run ``work`` on one connection: in one REPEATABLE READ snapshot with ``snapshot``;
        with ``bulk``, under the bulk deadline, whose timeout does not close the gate."""
        if snapshot or bulk:
            isolation = "repeatable_read" if snapshot else "read_committed"
            return await self._unit(work, isolation, readonly=True, bulk=bulk)
        return await self._unit(work, None)

    async def write(self, work: Work[T]) -> T:
        """Run ``work`` in one transaction and commit it.

        Raises :class:`DependencyDown` when nothing was applied (the failure came before COMMIT
        was sent, or the server answered the COMMIT with an error) and :class:`OutcomeUnknown`
        when COMMIT was sent and its fate is unknown."""
        return await self._unit(work, "read_committed")

    async def write_statement(self, work: Work[T]) -> T:
        """Run ``work``, one atomic statement, on its own: no BEGIN and COMMIT round trips.
        From the moment it is sent, a failure the server did not answer is
        :class:`OutcomeUnknown`, as for :meth:`write`."""
        return await self._unit(work, None, writes=True)

    # fetch and fetchval are for reads: a failure is DependencyDown, whenever it came.
    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._unit(lambda conn: conn.fetch(query, *args), None)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._unit(lambda conn: conn.fetchval(query, *args), None)

    async def executemany(self, query: str, args: Iterable[Sequence[Any]]) -> None:
        """One statement per row, all or none (asyncpg runs them in one transaction): once
        sent, a failure the server did not answer is :class:`OutcomeUnknown`."""
        await self._unit(lambda conn: conn.executemany(query, args), None, writes=True)

    async def ping(self) -> None:
        await self.fetchval("SELECT 1")

    def _usable(self) -> Connections:
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
        bulk: bool = False,
    ) -> T:
        """Run ``work`` under one deadline: in a transaction of ``isolation``, or on its own
        (``None``; ``writes``: one atomic statement that commits as it runs, so from the moment
        it is sent a failure is :class:`OutcomeUnknown` unless the server answered it)."""
        pool = self._usable()
        loop = asyncio.get_running_loop()
        budget = self.bulk_timeout if bulk else self.timeout
        deadline = loop.time() + budget
        slot_at: float | None = None
        conn: asyncpg.Connection | None = None
        commit_sent = False
        try:
            # One deadline for the turn, connecting (maybe), every statement and the COMMIT.
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
                slot_at = loop.time()
                conn = await pool.acquire()  # a slot is ours: this waits only on the server
                if isolation is None:
                    commit_sent = writes
                    result = await work(conn)
                else:
                    transaction = conn.transaction(isolation=isolation, readonly=readonly)
                    await transaction.start()
                    if bulk:
                        await conn.execute(_BULK_LIMITS, *_bulk_limits(budget))
                    result = await work(conn)
                    # A read-only transaction changes nothing, whatever becomes of its COMMIT.
                    commit_sent = not readonly
                    await transaction.commit()
        except BaseException as exc:
            if conn is not None:
                # Never wait on it: a late or broken connection is closed at once, which makes
                # the server roll back.
                pool.discard(conn)
            if slot_at is not None:
                self._slots.release()
            if isinstance(exc, asyncio.CancelledError):
                raise
            # A timeout says the server is stalled only if it had the call to itself for at
            # least half the deadline: not when the unit waited its turn most of the time.
            had_server = not bulk and slot_at is not None and deadline - slot_at >= budget / 2
            raise self._failure(
                exc, budget, commit_sent=commit_sent, queued=slot_at is None, stall=had_server
            ) from exc
        try:
            pool.release(conn)
        finally:
            self._slots.release()
        return result

    def _failure(
        self, exc: BaseException, budget: float, *, commit_sent: bool, queued: bool, stall: bool
    ) -> BaseException:
        """What a failed unit of work tells the caller. ``queued``: it never got a connection
        (every one was in use); ``stall``: a timeout of it is evidence of a stalled server."""
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, TimeoutError) and queued:
            return Overloaded(
                f"postgres: all {POOL_SIZE} connections stayed busy for {budget:g}s; nothing "
                "was applied",
                retry_after=RETRY_AFTER,
            )
        unknown = commit_sent and not proves_not_applied(exc)
        if not unknown and is_request_error(exc):
            # The request's fault or a defect of ours (a constraint, a syntax error): nothing
            # was applied, and it would fail again. An error of its own, 500 unless mapped.
            return exc
        reason = f"no answer within {budget:g}s" if isinstance(exc, TimeoutError) else describe(exc)
        if is_outage(exc, stall):
            self.gate.trip(reason)
        if unknown:
            return OutcomeUnknown(
                f"postgres: COMMIT was sent and its outcome is unknown ({reason}); the change "
                "may have been applied. Retrying the same request is safe",
                dependency=NAME,
                retry_after=RETRY_AFTER,
            )
        return DependencyDown(
            f"postgres: {reason}; nothing was applied", dependency=NAME, retry_after=RETRY_AFTER
        )


def _bulk_limits(budget: float) -> tuple[str, str]:
    limits = _limits(math.ceil(budget * 1000))
    return limits["statement_timeout"], limits["lock_timeout"]
