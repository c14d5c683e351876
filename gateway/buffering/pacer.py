"""When each granted order leaves for the ERP: at the granted rate, bunched by no more than a burst.

The shared bucket in Redis grants permits at ``rate`` with at most ``burst`` at once, but a grant
is only a licence: the ERP counts calls when they arrive. Grants answered together (two asks in
flight, both late because the event loop was busy) or calls held up by a stalled loop would
reach the ERP in a clump and could put more than rate + burst into one of its seconds. So the
writer hands its granted orders to this pacer, which lets them go through a local bucket of the
same rate and half the burst: however late they come in, no second sees more than the rate plus
half the burst leave this process, and the other half is left for the way to the ERP.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Final, Generic, TypeVar

T = TypeVar("T")
_TICK: Final = 0.001  # the finest step between releases (timers are milliseconds under uvloop)


class Pacer(Generic[T]):
    def __init__(self) -> None:
        self._queue: collections.deque[T] = collections.deque()
        self._wakeup = asyncio.Event()
        self._rate = 0.0
        self._burst = 1.0
        self._tokens = 1.0
        self._stamp = time.monotonic()

    def push(self, items: list[T], rate: float, burst: int) -> None:
        """Queue granted items, under the rate and burst they were granted at (the newest
        grant's limits apply to everything queued: a lower rate slows the rest too)."""
        if not items:
            return
        self._rate = rate
        self._burst = max(1.0, burst / 2)
        self._queue.extend(items)
        self._wakeup.set()

    @property
    def backlog_seconds(self) -> float:
        """How long what is queued takes to leave at the current rate."""
        return len(self._queue) / self._rate if self._rate > 0 else 0.0

    def __len__(self) -> int:
        return len(self._queue)

    def trim(self, seconds: float) -> list[T]:
        """What would wait longer than ``seconds`` at the current rate, out of the pacer (the
        rate was cut while much was queued: those go back rather than outlive their leases)."""
        keep = max(1, int(seconds * self._rate)) if self._rate > 0 else len(self._queue)
        excess: list[T] = []
        while len(self._queue) > keep:
            excess.append(self._queue.pop())
        excess.reverse()
        return excess

    def take_all(self) -> list[T]:
        """Everything still queued, out of the pacer (on stop: handed back, not sent)."""
        items = list(self._queue)
        self._queue.clear()
        return items

    async def run(self, release: Callable[[T], None]) -> None:
        """Owned loop: ``release`` each item when the local bucket allows it."""
        queue = self._queue
        while True:
            if not queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            now = time.monotonic()
            rate = self._rate
            tokens = self._tokens + (now - self._stamp) * rate if rate > 0 else self._burst
            tokens = min(self._burst, tokens)
            self._stamp = now
            n = min(len(queue), int(tokens))
            self._tokens = tokens - n
            for _ in range(n):
                release(queue.popleft())
            if queue:
                wait = (1 - self._tokens) / rate if rate > 0 else _TICK
                await asyncio.sleep(max(_TICK, wait))
