"""Coalesce the Redis reads of one event-loop tick into one pipelined round trip.

Each redis-py call costs 100-200 µs of Python; a pipeline of many commands costs little more
than one. Requests submitted while a batch is in flight wait for the next batch, so the batch
size grows with load and the round trips per second stay bounded. Identical commands within a
batch (the hot SKU of a flash sale, a location's safety stock) are sent once. A request still
queued when the Redis timeout has passed is not sent at all, and the timeout of one that is
sent counts from when it was queued: its whole wait is bounded, queue and reply together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import structlog

from gateway.adapters.redis_errors import classify, error_reply, narrow, not_sent
from gateway.adapters.resp import REPLY_TIMEOUT
from gateway.errors import RETRY_AFTER, Overloaded, Unavailable
from gateway.metrics import REDIS_BATCH_SIZE

log = structlog.get_logger(__name__)

Command = tuple[Any, ...]
# Sends a batch, given when its oldest request started waiting (``time.monotonic()``: the
# Redis timeout counts from then); raises the gateway error of the batch (see
# gateway.adapters.redis_errors) or returns the replies, error replies in place.
Executor = Callable[[Sequence[Command], float], Awaitable[list[Any]]]
_DEFAULT_MAX_PENDING: Final = 20_000
_SCRIPT_COST: Final = 16


# commands, the waiter, dedupe, raise_on_error, cost, when queued (the tick's stamp)
_Entry = tuple[Sequence[Command], "asyncio.Future[list[Any]]", bool, bool, int, float]


class CommandBatcher:
    """``max_wait``: the Redis timeout. A command still queued when it is this old is not sent
    (503 ``dependency_unavailable``): Redis is answering too slowly for it to be worth it."""

    def __init__(
        self,
        execute: Executor,
        *,
        max_pending: int = _DEFAULT_MAX_PENDING,
        in_flight: int = 8,
        slice_cost: int = 512,
        max_wait: float = REPLY_TIMEOUT,
    ) -> None:
        self._execute = execute
        self._max_pending = max_pending
        self._slice_cost = slice_cost
        self._max_wait = max_wait
        self._pending: list[_Entry] = []
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(in_flight)
        self._tasks: dict[asyncio.Task[None], list[_Entry]] = {}
        # When this tick's first command was queued; None until then. One clock read a tick,
        # not one a request: the requests of a tick share it (they queue within microseconds).
        self._stamp: float | None = None

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
            raise Overloaded("too many Redis commands waiting", retry_after=RETRY_AFTER)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if cost is None:
            cost = len(commands) if dedupe else _SCRIPT_COST * len(commands)
        stamp = self._stamp
        if stamp is None:
            stamp = self._stamp = time.monotonic()
            loop.call_soon(self._next_tick)
        self._pending.append((commands, future, dedupe, raise_on_error, cost, stamp))
        self._wakeup.set()
        return await future

    def _next_tick(self) -> None:
        self._stamp = None

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
            # Entries queue in order, so the first is the oldest: one clock read a slice.
            since = batch[0][5]
            if time.monotonic() - since > self._max_wait:
                batch = self._expire(batch)
                if not batch:
                    return
                since = batch[0][5]
            # Position of each entry's commands in what is sent; identical reads share one slot.
            unique: dict[Command, int] = {}
            sent: list[Command] = []
            slots: list[list[int]] = []
            for commands, _, dedupe, _, _, _ in batch:
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
                replies = await self._execute(sent, since)
            except asyncio.CancelledError:
                for entry in batch:
                    entry[1].cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
                self._fail(batch, exc, sent)
                return
            # Error replies are rare: find them once per batch, not once per waiter.
            failed = {i for i, r in enumerate(replies) if isinstance(r, Exception)}
            for (commands, future, _, raise_on_error, _, _), mine in zip(batch, slots, strict=True):
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

    def _expire(self, batch: list[_Entry]) -> list[_Entry]:
        """Fail the entries queued longer than the timeout (nothing of theirs was sent) and
        return the others. Redis being this far behind is its slowness, not the gateway's
        load (one Redis core runs far more than one gateway process sends): hence
        ``dependency_unavailable``, not ``overloaded``."""
        cutoff = time.monotonic() - self._max_wait
        fresh = []
        for entry in batch:
            if entry[5] < cutoff:
                entry[1].set_exception(
                    not_sent(f"queued more than {self._max_wait} s: redis answers too slowly")
                )
            else:
                fresh.append(entry)
        return fresh

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
