"""Back-pressure into checkout: intake stops taking orders while the buffer is too deep or too
old, and starts again below a low-water mark.

The depth and the oldest order's age are read from the buffer (PostgreSQL, shared by every
gateway) by an owned task about twice a second, so a request pays no query for them. Between two
reads the process counts what it admits itself (orders being written, and orders written since
the read began), so one gateway never takes the buffer past its maximum depth; several gateways
can together pass it by what the others admitted since the last read (each about half a second
of its intake). Refusing is honest: ``buffer_full`` with ``Retry-After`` from the current drain
rate, and the hold stays so checkout can retry.
"""

from __future__ import annotations

import asyncio
import math
from typing import Final

import structlog

from gateway.errors import BufferFull, GatewayError
from gateway.metrics import BUFFER_DEPTH, BUFFER_DRAIN_RATE, BUFFER_OLDEST_AGE, BUFFER_REJECTIONS
from gateway.ports import OrderQueue

log = structlog.get_logger(__name__)
INTERVAL: Final = 0.5
# Intake resumes once depth and age are both below this share of their limits.
LOW_WATER: Final = 0.8
_RETRY_MAX: Final = 60
_RATE_WINDOW: Final = 10.0


class Admission:
    """One order's place in the buffer, from the check until its row is written or not."""

    __slots__ = ("_open", "_pressure")

    def __init__(self, pressure: BackPressure | None) -> None:
        self._pressure = pressure
        self._open = True

    def close(self, added: bool) -> None:
        """The row was written (``added``) or will not be; the second call does nothing."""
        if self._open and self._pressure is not None:
            self._pressure.in_flight -= 1
            if added:
                self._pressure.admitted += 1
        self._open = False


class BackPressure:
    def __init__(self, queue: OrderQueue, *, max_depth: int, max_age_seconds: float) -> None:
        self._queue = queue
        self._max_depth = max_depth
        self._max_age = max_age_seconds
        self.full = False
        self.depth = 0
        self.oldest_age = 0.0
        self.drain_rate = 0.0  # orders leaving the buffer per second, lately
        self.in_flight = 0  # admitted here, their rows being written
        self.admitted = 0  # rows written here that the last read may not have counted

    def admit(self) -> Admission:
        """Take a place in the buffer for one order, or raise ``buffer_full``."""
        self.check()
        self.in_flight += 1
        return Admission(self)

    def check(self) -> None:
        """Raise ``buffer_full`` while the buffer is past its limits, counting what this
        process admitted since the last read."""
        if not self.full and self.depth + self.admitted + self.in_flight >= self._max_depth:
            self.full = True
            log.warning("buffer_full", depth=self.depth + self.admitted + self.in_flight)
        if self.full:
            BUFFER_REJECTIONS.inc()
            raise BufferFull(
                f"the order buffer holds {self.depth} orders (oldest {self.oldest_age:.0f} s);"
                " the hold stays in place: retry after the time given",
                retry_after=self.retry_after(),
            )

    def retry_after(self) -> int:
        """Seconds until the drain brings the depth below the low-water mark, at its rate."""
        excess = self.depth - self._max_depth * LOW_WATER
        if self.drain_rate <= 0:
            return _RETRY_MAX if excess > 0 else 1
        return max(1, min(_RETRY_MAX, math.ceil(excess / self.drain_rate)))

    async def watch(self) -> None:
        """Owned worker: refresh the figures; a dependency down keeps the last ones."""
        while True:
            try:
                await self.refresh()
            except GatewayError as exc:
                log.debug("buffer_watch_skipped", reason=exc.detail)
            await asyncio.sleep(INTERVAL)

    async def refresh(self) -> None:
        # Rows written before the read began are in it; those written while it runs may not
        # be, and stay counted (a little too much is safe, too little is not).
        counted = self.admitted
        depth, age = await self._queue.depth()
        self.admitted -= counted
        self.drain_rate = await self._queue.drain_rate(_RATE_WINDOW)
        self.depth, self.oldest_age = depth, age
        depth += self.admitted + self.in_flight
        over = depth >= self._max_depth or age >= self._max_age
        under = depth < self._max_depth * LOW_WATER and age < self._max_age * LOW_WATER
        if over and not self.full:
            log.warning("buffer_full", depth=depth, oldest_age=round(age, 1))
        if self.full and under:
            log.info("buffer_room_again", depth=depth, oldest_age=round(age, 1))
        self.full = over or (self.full and not under)
        BUFFER_DEPTH.set(depth)
        BUFFER_OLDEST_AGE.set(age)
        BUFFER_DRAIN_RATE.set(self.drain_rate)
