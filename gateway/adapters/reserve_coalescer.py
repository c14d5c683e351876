"""Merge the reservations of one event-loop tick into few script calls (single Redis node):
the :class:`gateway.ports.ReservationHolder` the reservation service holds through.

A reservation script has a fixed cost (dispatch, set-up, the clock) beside its per-line work, and
each call costs the gateway a command to encode and a reply to match. Under load many carts
reserve in the same tick; one call for several of them pays the fixed costs once. Each
reservation stays all or nothing on its own, and they run in arrival order, exactly as separate
calls would.

A call is written to Redis the moment it is full, within the step of the request that filled
it, not at the end of the tick: Redis then works on it while the gateway still parses and plans
the tick's other requests. Waiting for the end of the tick made the two take turns, and the
gateway sat idle while Redis ran the whole tick's scripts.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from gateway.adapters.scripts import ScriptRegistry
from gateway.errors import RETRY_AFTER, Overloaded, ShuttingDown
from gateway.metrics import RESERVATIONS_PER_CALL

MAX_PER_CALL: Final = 32
# Reservations waiting for a call or in one; beyond it new ones are refused (503, retry).
MAX_PENDING: Final = 10_000
_SCRIPT: Final = "reserve.lua"
# Measured: ~8 µs of Redis a reservation plus ~8 µs a location checked, against ~1 µs a read.
_COST_PER_RESERVATION: Final = 8
_COST_PER_LOCATION: Final = 8

# Redis work a call may ask for, in plain reads (~1 µs each): about 150 µs.
MAX_CALL_COST: Final = 150


class _Call:
    """One script call in the making: its reservations' waiters, keys and arguments."""

    __slots__ = ("args", "cost", "futures", "keys", "settled")

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[Any]] = []
        self.keys: list[str] = []
        self.args: list[Any] = [0]  # ARGV[1]: how many reservations
        self.cost = 0
        self.settled = False

    def add(self, keys: list[str], values: list[Any], cost: int) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        self.keys += keys
        self.args += (*values, len(keys))
        self.args[0] += 1
        self.cost += cost
        return future


class ReserveCoalescer:
    def __init__(self, scripts: ScriptRegistry) -> None:
        self._scripts = scripts
        self._open: _Call | None = None
        self._waiting = 0
        self._closed = False
        self._tasks: dict[asyncio.Task[None], _Call] = {}

    def hold(self, keys: list[str], values: list[Any], locations: int) -> asyncio.Future[Any]:
        """Put one reservation (its keys, its 7 values, how many locations its lines check) in
        a shared call; the future of its reply. Not a coroutine: the caller awaits the future
        itself, one frame less to resume."""
        if self._closed:
            raise ShuttingDown(
                "the gateway is shutting down; retry on another", retry_after=RETRY_AFTER
            )
        if self._waiting >= MAX_PENDING:
            raise Overloaded("too many reservations waiting for Redis", retry_after=RETRY_AFTER)
        call = self._open
        if call is None:
            call = self._open = _Call()
            # What is left at the end of the tick goes then, whatever its size.
            asyncio.get_running_loop().call_soon(self._flush, call)
        future = call.add(keys, values, _COST_PER_RESERVATION + _COST_PER_LOCATION * locations)
        self._waiting += 1
        if call.cost >= MAX_CALL_COST or len(call.futures) >= MAX_PER_CALL:
            self._flush(call)
        return future

    def _flush(self, call: _Call) -> None:
        if self._open is not call:
            return  # sent already, when it filled up
        self._open = None
        RESERVATIONS_PER_CALL.observe(len(call.futures))
        try:
            sent = self._scripts.run_now(_SCRIPT, call.keys, call.args)
        except Exception as exc:  # noqa: BLE001 - a failed write fails its waiters, no one else
            self._fail(call, exc)
            return
        if sent is None:
            self._start_task(call)
        else:
            sent.add_done_callback(lambda done: self._sent(call, done))

    def _sent(self, call: _Call, sent: asyncio.Future[list[Any]]) -> None:
        if sent.cancelled():
            self._cancel(call)
            return
        error = sent.exception()
        if error is not None:
            self._fail(call, error)
            return
        (reply,) = sent.result()
        if self._scripts.must_rerun(reply):
            # The script never ran (a restarted Redis lost it): the general path loads it and
            # runs the call again.
            self._start_task(call)
        elif isinstance(reply, Exception):
            # Redis refused the call (BUSY, LOADING, OOM...: a 503, nothing ran) or it failed
            # outside any one reservation (a defect, a 500): never run again what may have
            # started; every waiter hears of it.
            self._fail(call, self._scripts.script_error(str(reply)))
        else:
            self._deliver(call, reply)

    def _start_task(self, call: _Call) -> None:
        if self._closed:
            self._cancel(call)
            return
        task = asyncio.create_task(self._send(call))
        self._tasks[task] = call
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        call = self._tasks.pop(task)
        # A task cancelled before its first step never reached its own handlers.
        if task.cancelled():
            self._cancel(call)

    async def _send(self, call: _Call) -> None:
        if all(future.done() for future in call.futures):
            # Every request of the call stopped waiting (cancelled) before it could be sent:
            # nothing may be written on their behalf now.
            self._settle(call)
            return
        try:
            (reply,) = await self._scripts.run(_SCRIPT, [(call.keys, call.args)], call.cost)
        except asyncio.CancelledError:
            self._cancel(call)
            raise
        except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
            self._fail(call, exc)
            return
        self._deliver(call, reply)

    def _settle(self, call: _Call) -> bool:
        if call.settled:
            return False
        call.settled = True
        self._waiting -= len(call.futures)
        return True

    def _deliver(self, call: _Call, replies: list[Any]) -> None:
        if self._settle(call):
            for future, reply in zip(call.futures, replies, strict=True):
                if not future.done():  # its request may have been cancelled
                    future.set_result(reply)

    def _fail(self, call: _Call, error: BaseException) -> None:
        if self._settle(call):
            failure = self._scripts.failure
            for future in call.futures:
                if not future.done():
                    # What the adapter says it means (not sent: dependency_unavailable; sent,
                    # no answer: outcome_unknown), one exception each.
                    future.set_exception(failure(error))

    def _cancel(self, call: _Call) -> None:
        if self._settle(call):
            for future in call.futures:
                future.cancel()

    async def close(self) -> None:
        """Refuse new reservations and cancel the calls that wait on the general path (those
        written already end with the connection)."""
        self._closed = True
        if self._open is not None:
            call, self._open = self._open, None
            self._cancel(call)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
