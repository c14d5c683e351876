"""Pacer: granted items leave at the rate, bunched by no more than half the burst.

Release times are read with ``time.monotonic`` as the pacer lets each item go, and every sliding
window of them is checked against rate * window + burst / 2 (+1 for rounding). Timing bounds are
generous where a slow machine could only make things later; the cap on bunching is exact. The
pacing cases run under both the default event loop and uvloop (its timers are milliseconds).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from gateway.buffering.pacer import Pacer

T = TypeVar("T")

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
both_loops = pytest.mark.parametrize("loop", sorted(LOOPS))


def run(loop: str, main: Callable[[], Coroutine[Any, Any, T]], limit: float = 15.0) -> T:
    """``main()`` on a fresh loop of the named kind (never the session's loop), bounded."""

    async def bounded() -> T:
        async with asyncio.timeout(limit):
            return await main()

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(bounded())


class Recorder:
    """The ``release`` callback: what left and when; ``wait_for(n)`` until n items have."""

    def __init__(self, on_release: Callable[[int], None] | None = None) -> None:
        self.items: list[Any] = []
        self.times: list[float] = []
        self._on_release = on_release
        self._changed = asyncio.Event()

    def __call__(self, item: Any) -> None:
        self.times.append(time.monotonic())
        self.items.append(item)
        self._changed.set()
        if self._on_release is not None:
            self._on_release(len(self.items))

    async def wait_for(self, count: int) -> None:
        while len(self.items) < count:
            self._changed.clear()
            await self._changed.wait()


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def most_in_window(times: list[float], window: float) -> int:
    """The most releases in any closed window of ``window`` seconds."""
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] > window:
            first += 1
        most = max(most, last - first + 1)
    return most


def assert_paced(times: list[float], rate: float, burst: int) -> None:
    for window in (1.0, 0.5, 0.1, 0.01):
        allowed = rate * window + burst / 2 + 1
        most = most_in_window(times, window)
        assert most <= allowed, f"{most} releases in {window} s, at most {allowed} allowed"


@both_loops
def test_releases_keep_to_the_rate_plus_half_the_burst(loop: str) -> None:
    rate, burst, count = 200, 20, 400

    async def main() -> tuple[float, Recorder]:
        pacer: Pacer[int] = Pacer()
        recorder = Recorder()
        task = asyncio.create_task(pacer.run(recorder))
        await asyncio.sleep(0.1)  # rested long enough to fill the local bucket
        started = time.monotonic()
        pacer.push(list(range(count)), rate, burst)
        try:
            await recorder.wait_for(count)
        finally:
            await stop(task)
        return started, recorder

    started, recorder = run(loop, main)
    assert recorder.items == list(range(count))  # all of them, in order
    assert_paced(recorder.times, rate, burst)
    ideal = (count - burst / 2) / rate  # half the burst at once, the rest at the rate
    took = recorder.times[-1] - started
    assert took >= 0.8 * ideal, f"{count} left in {took:.2f} s: not paced ({ideal:.2f} s ideal)"
    assert took < 3 * ideal
    # A rested pacer does let half the burst go at once.
    assert recorder.times[burst // 2 - 1] - started < 0.05


@both_loops
def test_a_stalled_loop_does_not_release_a_clump_afterwards(loop: str) -> None:
    rate, burst, count, stall = 200, 20, 200, 0.3

    async def main() -> Recorder:
        pacer: Pacer[int] = Pacer()
        recorder = Recorder()
        task = asyncio.create_task(pacer.run(recorder))
        pacer.push(list(range(count)), rate, burst)
        # Blocks the whole loop while items wait: the pacer's timer comes due meanwhile.
        asyncio.get_running_loop().call_later(0.3, time.sleep, stall)
        try:
            await recorder.wait_for(count)
        finally:
            await stop(task)
        return recorder

    recorder = run(loop, main)
    times = recorder.times
    assert recorder.items == list(range(count))
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    after = gaps.index(max(gaps)) + 1  # the first release after the stall
    assert max(gaps) >= stall - 0.05, "the stall did not hold items back: the test proves nothing"
    # Tokens for 60 items came due during the stall; half the burst of them may go at once.
    at_once = sum(1 for at in times[after:] if at - times[after] <= 0.002)
    assert at_once <= burst // 2
    assert_paced(times, rate, burst)


def test_take_all_returns_what_is_left_and_nothing_more_leaves() -> None:
    async def main() -> tuple[list[int], Recorder, int, float, int]:
        pacer: Pacer[int] = Pacer()
        recorder = Recorder()
        task = asyncio.create_task(pacer.run(recorder))
        pacer.push(list(range(100)), 100, 2)
        try:
            await recorder.wait_for(5)
            left = pacer.take_all()
            released = len(recorder.items)
            await asyncio.sleep(0.15)  # 15 more would have left by now
            assert len(recorder.items) == released
            queued, backlog = len(pacer), pacer.backlog_seconds
            pacer.push([1000, 1001], 100, 2)  # still runs after take_all
            await recorder.wait_for(released + 2)
        finally:
            await stop(task)
        return left, recorder, queued, backlog, released

    left, recorder, queued, backlog, released = run("asyncio", main)
    assert 5 <= released < 100
    assert recorder.items[:released] + left == list(range(100))  # every item exactly once
    assert (queued, backlog) == (0, 0.0)
    assert recorder.items[released:] == [1000, 1001]


@both_loops
def test_a_later_push_at_a_lower_rate_slows_the_rest(loop: str) -> None:
    fast, slow, switch_at, count = 1000, 100, 20, 60

    async def main() -> Recorder:
        pacer: Pacer[Any] = Pacer()

        def on_release(released: int) -> None:
            if released == switch_at:
                pacer.push(["late"], slow, 2)

        recorder = Recorder(on_release)
        task = asyncio.create_task(pacer.run(recorder))
        pacer.push(list(range(count)), fast, 2)
        try:
            await recorder.wait_for(count + 1)
        finally:
            await stop(task)
        return recorder

    recorder = run(loop, main)
    assert recorder.items == [*range(count), "late"]
    before, after = recorder.times[:switch_at], recorder.times[switch_at - 1 :]
    rest = count + 1 - switch_at
    assert before[-1] - before[0] < 0.8 * rest / slow  # the first ones did go fast
    took = after[-1] - after[0]
    assert took >= 0.8 * rest / slow, f"{rest} left in {took:.2f} s after the rate fell to {slow}"
    assert_paced(after, slow, 2)


def test_backlog_seconds_is_the_queue_at_the_newest_rate() -> None:
    pacer: Pacer[int] = Pacer()
    assert (len(pacer), pacer.backlog_seconds) == (0, 0.0)
    pacer.push([], 10, 2)  # nothing granted: nothing changes
    assert pacer.backlog_seconds == 0.0
    pacer.push(list(range(100)), 50, 10)
    assert (len(pacer), pacer.backlog_seconds) == (100, 2.0)
    pacer.push(list(range(100)), 400, 10)
    assert (len(pacer), pacer.backlog_seconds) == (200, 0.5)
    assert pacer.take_all() == [*range(100), *range(100)]
    assert (len(pacer), pacer.backlog_seconds) == (0, 0.0)


def test_trim_takes_back_what_would_wait_too_long() -> None:
    """After a rate cut, what would wait past the bound comes out from the tail (the newest),
    in order; what stays is what leaves first."""

    async def main() -> tuple[list[int], list[int]]:
        pacer: Pacer[int] = Pacer()
        pacer.push(list(range(100)), rate=1000.0, burst=2)
        pacer.push([100, 101], rate=10.0, burst=2)  # the rate is cut with 102 queued
        late = pacer.trim(1.0)  # 1 s at 10/s: 10 stay
        return late, pacer.take_all()

    late, kept = asyncio.run(main())
    assert kept == list(range(10))
    assert late == list(range(10, 102))
