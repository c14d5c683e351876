"""Group commit: the writes of many concurrent callers in one PostgreSQL statement.

One commit costs a WAL flush whatever it holds (FACTS.md: one-row commits ~2,200/s on one
connection, 100 rows per transaction ~39,000 rows/s), so the order buffer gathers what its
callers write and commits it together. No timer: a write starts at once when no batch is in
flight; while ``max_in_flight`` batches are, the writes that arrive meanwhile wait and go
together in the next. An idle gateway writes with no added latency, a busy one in batches as
large as its load makes them.

A batch is one statement per kind of write (rows written by ``unnest`` of arrays), each atomic
and committed on its own; a kind may carry another's writes in its statement (the order
buffer's new rows carry the moved marks of earlier ones). Each caller gets its own row's
result, or its statement's failure with the port's honest outcome
(:meth:`gateway.adapters.postgres.Postgres.write_statement`): ``dependency_unavailable`` when
nothing was applied, ``outcome_unknown`` when the statement was sent and not answered. Each
statement takes its row locks in key order, so two in flight never wait on each other in
opposite orders.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Generic, TypeVar

import asyncpg

from gateway.adapters.postgres import NAME, Postgres
from gateway.errors import RETRY_AFTER, DependencyDown, OutcomeUnknown, Overloaded
from gateway.metrics import POSTGRES_BATCH_SIZE

A = TypeVar("A")
R = TypeVar("R")
MAX_BATCH: Final = 500
MAX_IN_FLIGHT: Final = 2
# Writes waiting for a batch, at most: beyond, 503 ``overloaded`` at once (nothing written)
# rather than a wait no deadline bounds (each batch has one; the queue before it would not).
MAX_PENDING: Final = 20 * MAX_BATCH


class Statement(Generic[A, R]):
    """One kind of write: ``run`` writes every argument of a batch on one connection and
    answers one result per argument, in their order. ``carries``: another kind whose writes,
    when a batch holds both, go in this one's statement (one round trip and one WAL flush
    instead of two). ``rides_for``: how long its own writes may wait for a carrier."""

    def __init__(
        self,
        name: str,
        run: Callable[[asyncpg.Connection, Sequence[A]], Awaitable[list[R]]],
        carries: Carry[A, R] | None = None,
        *,
        rides_for: float = 0.0,
    ) -> None:
        self.name = name
        self.run = run
        self.carries = carries
        # Writes nobody waits on (the moved marks) may wait this long for a batch that carries
        # them rather than take a commit slot of their own, which new rows would wait behind.
        self.rides_for = rides_for


class Carry(Generic[A, R]):
    """``run`` writes a batch of the carrying kind and one of ``statement``'s in one
    statement, and answers the results of each."""

    def __init__(
        self,
        statement: Statement[Any, Any],
        run: Callable[
            [asyncpg.Connection, Sequence[A], Sequence[Any]], Awaitable[tuple[list[R], list[Any]]]
        ],
    ) -> None:
        self.statement = statement
        self.run = run


class _Write:
    __slots__ = ("arg", "future", "send_by", "statement")

    def __init__(
        self,
        statement: Statement[Any, Any],
        arg: Any,
        future: asyncio.Future[Any],
        send_by: float | None = None,
    ):
        self.statement = statement
        self.arg = arg
        self.future = future
        self.send_by = send_by


class GroupCommit:
    def __init__(
        self, db: Postgres, *, max_batch: int = MAX_BATCH, max_in_flight: int = MAX_IN_FLIGHT
    ) -> None:
        self._db = db
        self._max_batch = max_batch
        self._slots = asyncio.Semaphore(max_in_flight)
        self._pending: list[_Write] = []
        self._flusher_waiting = False
        self._flushes: set[asyncio.Task[None]] = set()
        self._riders_due: asyncio.TimerHandle | None = None

    async def write(self, statement: Statement[A, R], arg: A, *, send_by: float | None = None) -> R:
        """``send_by``: the loop time after which the write is not sent at all (503
        ``dependency_unavailable``, nothing applied), for a caller that must know its write
        cannot commit later than some bound (the statement itself is bounded by PostgreSQL's
        ``statement_timeout``)."""
        return await self.submit(statement, arg, send_by=send_by)

    def submit(
        self, statement: Statement[A, R], arg: A, *, send_by: float | None = None
    ) -> asyncio.Future[R]:
        """Queue a write; its future answers as :meth:`write` does. For a caller that does not
        wait: no task of its own per write (the future is the committer's until it answers).
        Raises ``overloaded`` when :data:`MAX_PENDING` writes wait already."""
        if len(self._pending) >= MAX_PENDING:
            raise Overloaded(
                "postgres: too many writes waiting for a batch; nothing was applied",
                retry_after=RETRY_AFTER,
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append(_Write(statement, arg, future, send_by))
        if self._flusher_waiting:
            pass  # the next batch takes it
        elif statement.rides_for > 0:
            if self._riders_due is None:
                self._riders_due = loop.call_later(statement.rides_for, self._flush_riders)
        else:
            self._start_flush()
        return future

    async def close(self) -> None:
        """Write what waits, and wait for the batches in flight (each bounded by the port's
        deadline)."""
        if self._pending and not self._flusher_waiting:
            self._start_flush()
        while self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    def _flush_riders(self) -> None:
        self._riders_due = None
        if self._pending and not self._flusher_waiting:
            self._start_flush()

    def _start_flush(self) -> None:
        if self._riders_due is not None:  # this batch takes them along
            self._riders_due.cancel()
            self._riders_due = None
        self._flusher_waiting = True
        task = asyncio.create_task(self._flush(), name="group-commit")
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        async with self._slots:
            # From here on, a new write needs a flusher of its own (it waits for a slot too,
            # gathering what arrives meanwhile).
            self._flusher_waiting = False
            batch = [w for w in self._pending[: self._max_batch] if not w.future.done()]
            del self._pending[: self._max_batch]
            batch = _in_time(batch)
            if self._pending and not self._flusher_waiting:
                self._start_flush()
            if not batch:
                return
            by_statement: dict[Statement[Any, Any], list[_Write]] = {}
            for w in batch:
                by_statement.setdefault(w.statement, []).append(w)
            commits = []
            for statement in list(by_statement):
                carry = statement.carries
                if carry is not None and statement in by_statement:
                    carried = by_statement.pop(carry.statement, [])
                    commits.append(self._commit(statement, by_statement.pop(statement), carried))
            commits += [self._commit(st, ws, []) for st, ws in by_statement.items()]
            if len(commits) == 1:
                await commits[0]  # the usual batch: no task of its own for gather to wrap
            else:
                # Side by side, each on a connection of its own.
                await asyncio.gather(*commits)

    async def _commit(
        self, statement: Statement[Any, Any], writes: list[_Write], carried: list[_Write]
    ) -> None:
        # One statement, atomic on its own: it commits without the round trips of BEGIN and
        # COMMIT, and holds its row locks only while it runs, so writes of different kinds
        # never wait on each other in a cycle.
        args = [w.arg for w in writes]
        POSTGRES_BATCH_SIZE.observe(len(writes) + len(carried))
        carry = statement.carries
        try:
            if carried and carry is not None:
                more = [w.arg for w in carried]
                results, carried_results = await self._db.write_statement(
                    lambda conn: carry.run(conn, args, more)
                )
            else:
                results = await self._db.write_statement(lambda conn: statement.run(conn, args))
                carried_results = []
        except BaseException as exc:
            told = exc if isinstance(exc, Exception) else _interrupted()
            for w in (*writes, *carried):
                if not w.future.done():
                    w.future.set_exception(told)
            if told is not exc:
                raise  # cancelled (shutdown): the callers were told above
            return
        for w, result in zip((*writes, *carried), (*results, *carried_results), strict=True):
            if not w.future.done():  # a caller that went away does not want its answer
                w.future.set_result(result)


def _in_time(batch: list[_Write]) -> list[_Write]:
    """The writes still due to be sent; the others are told nothing was applied."""
    now = asyncio.get_running_loop().time()
    if all(w.send_by is None or w.send_by >= now for w in batch):
        return batch
    due = []
    for w in batch:
        if w.send_by is None or w.send_by >= now:
            due.append(w)
        else:
            w.future.set_exception(
                DependencyDown(
                    "postgres: the write waited for a batch past its deadline; nothing was applied",
                    dependency=NAME,
                    retry_after=RETRY_AFTER,
                )
            )
    return due


def _interrupted() -> OutcomeUnknown:
    return OutcomeUnknown(
        "postgres: the gateway stopped while this write was in flight; it may have been "
        "applied. Retrying the same request is safe",
        dependency=NAME,
    )
