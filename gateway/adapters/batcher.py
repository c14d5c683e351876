"""Coalesce the Redis reads of one event-loop tick into one pipelined round trip.

Each redis-py call costs 100-200 µs of Python; a pipeline of many commands costs little more
than one. Requests submitted while a batch is in flight wait for the next batch, so the batch
size grows with load and the round trips per second stay bounded. Identical commands within a
batch (the hot SKU of a flash sale, a location's safety stock) are sent once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import structlog

from gateway.adapters.redis_errors import classify, error_reply, narrow
from gateway.errors import Overloaded, Unavailable
from gateway.metrics import REDIS_BATCH_SIZE

log = structlog.get_logger(__name__)

Command = tuple[Any, ...]
# Sends a batch; raises the gateway error of the batch (see gateway.adapters.redis_errors) or
# returns the replies, error replies in place.
Executor = Callable[[Sequence[Command]], Awaitable[list[Any]]]
_DEFAULT_MAX_PENDING: Final = 20_000
_SCRIPT_COST: Final = 16


# commands, the waiter, dedupe, raise_on_error, cost
_Entry = tuple[Sequence[Command], "asyncio.Future[list[Any]]", bool, bool, int]


class CommandBatcher:
    def __init__(
        self,
        execute: Executor,
        *,
        max_pending: int = _DEFAULT_MAX_PENDING,
        in_flight: int = 8,
        slice_cost: int = 512,
    ) -> None:
        self._execute = execute
        self._max_pending = max_pending
        self._slice_cost = slice_cost
        self._pending: list[_Entry] = []
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(in_flight)
        self._tasks: dict[asyncio.Task[None], list[_Entry]] = {}

    async def call_many(
        self,
        commands: Sequence[Command],
        *,
        dedupe: bool = True,
        raise_on_error: bool = True,
        cost: int | None = None,
    ) -> list[Any]:
        """Send commands in the next batch and return their replies.

        ``dedupe=False`` for commands with effects (scripts that hold stock): each one runs.
        ``raise_on_error=False`` returns a failed command's exception in its place.
        ``cost``: the Redis work, in simple reads; by default 1 a read, 16 a script.
        """
        if len(self._pending) >= self._max_pending:
            raise Overloaded("too many Redis commands waiting", retry_after=1)
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if cost is None:
            cost = len(commands) if dedupe else _SCRIPT_COST * len(commands)
        self._pending.append((commands, future, dedupe, raise_on_error, cost))
        self._wakeup.set()
        return await future

    async def call(self, *command: Any) -> Any:
        """Send one command in the next batch and return its reply."""
        return (await self.call_many((command,)))[0]

    async def run(self) -> None:
        """The owner task: send what the ticks gathered, in slices, up to ``in_flight`` at once."""
        try:
            while True:
                await self._wakeup.wait()
                await self._slots.acquire()
                # A tick's requests go out in slices: Redis works on the first slice while the
                # gateway still encodes the next or answers the previous, instead of the two
                # taking turns over one large batch (what limits script-heavy traffic).
                cut = self._slice_end()
                batch = self._pending[:cut]
                del self._pending[:cut]
                if not self._pending:
                    self._wakeup.clear()
                if not batch:
                    self._slots.release()
                    continue
                task = asyncio.create_task(self._send(batch))
                self._tasks[task] = batch
                task.add_done_callback(self._tasks.pop)
        finally:
            # A task cancelled before its first step never reaches its own handlers: its
            # waiters are cancelled here, with those that never left the queue.
            for task, batch in list(self._tasks.items()):
                task.cancel()
                for entry in batch:
                    entry[1].cancel()
            for entry in self._pending:
                entry[1].cancel()

    def _slice_end(self) -> int:
        """How many pending entries go in the next slice, by the Redis work they ask for."""
        total = 0
        for n, entry in enumerate(self._pending):
            total += entry[4]
            if total >= self._slice_cost:
                return n + 1
        return len(self._pending)

    async def _send(self, batch: list[_Entry]) -> None:
        try:
            # A waiter that is gone (its request was cancelled) is not sent: a write must never
            # run after its request stopped waiting for it.
            batch = [entry for entry in batch if not entry[1].done()]
            if not batch:
                return
            # Position of each entry's commands in what is sent; identical reads share one slot.
            unique: dict[Command, int] = {}
            sent: list[Command] = []
            slots: list[list[int]] = []
            for commands, _, dedupe, _, _ in batch:
                mine = []
                for command in commands:
                    if dedupe:
                        index = unique.get(command)
                        if index is None:
                            index = unique[command] = len(sent)
                            sent.append(command)
                    else:
                        index = len(sent)
                        sent.append(command)
                    mine.append(index)
                slots.append(mine)
            REDIS_BATCH_SIZE.observe(len(sent))
            try:
                replies = await self._execute(sent)
            except asyncio.CancelledError:
                for entry in batch:
                    entry[1].cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
                self._fail(batch, exc, sent)
                return
            # Error replies are rare: find them once per batch, not once per waiter.
            failed = {i for i, r in enumerate(replies) if isinstance(r, Exception)}
            for (commands, future, _, raise_on_error, _), mine in zip(batch, slots, strict=True):
                if future.done():
                    continue  # its request was cancelled
                results = [replies[i] for i in mine]
                bad = next((i for i in mine if i in failed), None) if failed else None
                if bad is not None and raise_on_error:
                    future.set_exception(narrow(error_reply(replies[bad]), commands))
                else:
                    future.set_result(results)
        finally:
            self._slots.release()

    @staticmethod
    def _fail(batch: list[_Entry], exc: Exception, sent: Sequence[Command]) -> None:
        error = classify(exc, sent)
        if not isinstance(error, Unavailable):
            log.warning("redis_batch_failed", error=repr(exc), size=len(sent))
        for commands, future, *_ in batch:
            if not future.done():
                # Each waiter hears what the failure means for its own commands: a read that
                # shared a batch with writes changed nothing whatever became of the writes.
                future.set_exception(narrow(error, commands))
