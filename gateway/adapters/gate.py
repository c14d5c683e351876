"""Whether a dependency is known to be down, so that requests fail at once instead of queueing.

A stalled Redis or PostgreSQL accepts connections and then says nothing: every request sent to
it waits out its whole timeout, and the next wave does the same. Once one call has timed out (or
a connect failed), the gate closes: calls fail at once with 503 ``dependency_unavailable`` (they
were never sent, so nothing was applied), while one probe task asks the dependency, with its own
timeout, every ``interval`` until it answers. Then the gate opens again.

The probe task is owned by the gate and cancelled by :meth:`DependencyGate.close`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from gateway.errors import RETRY_AFTER, DependencyDown, GatewayError
from gateway.metrics import DEPENDENCY_UP

log = structlog.get_logger(__name__)

Probe = Callable[[], Awaitable[object]]


class DependencyGate:
    def __init__(self, name: str, probe: Probe, *, timeout: float, interval: float = 0.25) -> None:
        self.name = name
        self._probe = probe
        self._timeout = timeout
        self._interval = interval
        self._reason = ""
        self._since = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.up = True

    @property
    def reason(self) -> str:
        return self._reason

    def check(self) -> None:
        """Raise 503 ``dependency_unavailable`` at once while the dependency is known down."""
        if not self.up:
            raise DependencyDown(
                f"{self.name} is unavailable ({self._reason}); nothing was applied",
                dependency=self.name,
                retry_after=RETRY_AFTER,
            )

    def trip(self, reason: str) -> None:
        """Mark the dependency down (a timeout, a refused connection) and start probing it."""
        if self.up:
            log.warning("dependency_down", dependency=self.name, reason=reason)
            self._since = time.monotonic()
            DEPENDENCY_UP.labels(self.name).set(0)
        self.up = False
        self._reason = reason
        if not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(
                self._probe_until_up(), name=f"{self.name}-probe"
            )

    def mark_up(self) -> None:
        if not self.up:
            log.info(
                "dependency_up",
                dependency=self.name,
                down_for=round(time.monotonic() - self._since, 3),
            )
        self.up = True
        self._reason = ""
        DEPENDENCY_UP.labels(self.name).set(1)

    async def _probe_until_up(self) -> None:
        while not self.up:
            try:
                async with asyncio.timeout(self._timeout):
                    await self._probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: still down, ask again later
                if not isinstance(exc, GatewayError):
                    # A probe's own gateway error already carries this gate's reason in its
                    # detail: nesting it would repeat the message inside itself.
                    self._reason = f"{type(exc).__name__}: {exc}".rstrip(": ") or self._reason
                await asyncio.sleep(self._interval)
            else:
                self.mark_up()

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait(), not await: a cancellation of close()'s own caller must reach it.
            await asyncio.wait([task])
