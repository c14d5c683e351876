"""Process lifecycle: the flag that stops intake, the health of background workers, and the
readiness checks of the dependencies."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from gateway.errors import GatewayError
from gateway.metrics import DEPENDENCY_UP

CHECK_TIMEOUT: Final = 1.0


@dataclasses.dataclass(slots=True)
class Lifecycle:
    # Set when shutdown begins: new work is refused with 503 while in-flight work drains.
    draining: bool = False
    # Named background workers and whether they are running; readiness reports them.
    workers: dict[str, str] = dataclasses.field(default_factory=dict)


Check = Callable[[], Awaitable[object]]


class Readiness:
    """Checks each dependency and answers within ``timeout``, whatever the dependencies do.

    Each check runs as a task with its own timeout, and the answer waits for the tasks up to
    ``timeout``, not for their ends: a client library may take long to unwind a cancelled call
    (asyncpg once made a 1 s check take 11 s). A check still running then is reported down and
    stays owned here; the next request waits on it instead of starting another, so a stalled
    dependency costs one check at a time, and :meth:`close` cancels what is left.
    """

    def __init__(self, checks: Mapping[str, Check], timeout: float = CHECK_TIMEOUT) -> None:
        self._checks = dict(checks)
        self._timeout = timeout
        self._running: dict[str, asyncio.Task[None]] = {}

    async def check(self) -> dict[str, str]:
        """``{name: "up" | "down: <why>"}`` for every dependency, within the timeout."""
        tasks: dict[str, asyncio.Task[None]] = {}
        for name, check in self._checks.items():
            task = self._running.get(name)
            if task is None or task.done():
                task = asyncio.create_task(self._bounded(check), name=f"ready-{name}")
                self._running[name] = task
            tasks[name] = task
        await asyncio.wait(tasks.values(), timeout=self._timeout)
        results: dict[str, str] = {}
        for name, task in tasks.items():
            if not task.done():
                results[name] = f"down: no answer within {self._timeout:g}s"
            else:
                if self._running.get(name) is task:  # a concurrent request may have done it
                    del self._running[name]
                results[name] = _outcome(task)
            DEPENDENCY_UP.labels(name).set(1 if results[name] == "up" else 0)
        return results

    async def _bounded(self, check: Check) -> None:
        async with asyncio.timeout(self._timeout):
            await check()

    async def close(self) -> None:
        tasks = list(self._running.values())
        self._running.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded even here: a check that will not unwind is abandoned to the loop's close.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await asyncio.gather(*tasks, return_exceptions=True)


def _outcome(task: asyncio.Task[None]) -> str:
    if task.cancelled():
        return "down: check cancelled"
    exc = task.exception()
    if exc is None:
        return "up"
    if isinstance(exc, GatewayError):
        return f"down: {exc.detail}"
    if isinstance(exc, TimeoutError):
        return "down: no answer in time"
    text = str(exc).strip()
    return f"down: {type(exc).__name__}: {text}" if text else f"down: {type(exc).__name__}"
