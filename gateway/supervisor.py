"""Owned, supervised background tasks: restarted with backoff when they crash, cancelled on exit."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Final

import structlog

from gateway.errors import Unavailable
from gateway.lifecycle import Lifecycle

log = structlog.get_logger(__name__)
# A worker that fails because a dependency is down is retried at least this often, so it is back
# within seconds of the dependency (the sweeper, the consumer).
_MAX_BACKOFF: Final = 5.0
_FIRST_BACKOFF: Final = 0.1
# A worker that ran this long before failing starts its backoff over: one failure a day must not
# inherit the delays of yesterday's outage.
_STABLE_SECONDS: Final = 10.0


async def _supervise(
    name: str, factory: Callable[[], Coroutine[Any, Any, None]], lifecycle: Lifecycle
) -> None:
    backoff = _FIRST_BACKOFF
    while True:
        lifecycle.workers[name] = "running"
        started = time.monotonic()
        try:
            await factory()
        except asyncio.CancelledError:
            lifecycle.workers[name] = "stopped"
            raise
        except Unavailable as exc:
            # A dependency down: expected during an outage, one line, no trace.
            log.warning("worker_waiting", worker=name, error=exc.detail, restart_in=backoff)
        except Exception:
            log.exception("worker_crashed", worker=name, restart_in=backoff)
        else:
            log.warning("worker_returned", worker=name, restart_in=backoff)
        if time.monotonic() - started >= _STABLE_SECONDS:
            backoff = _FIRST_BACKOFF
        lifecycle.workers[name] = f"restarting in {backoff:.1f}s"
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, _MAX_BACKOFF)


@contextlib.asynccontextmanager
async def supervised(
    name: str, factory: Callable[[], Coroutine[Any, Any, None]], lifecycle: Lifecycle
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``factory()`` for the life of the block, restarting it if it fails."""
    task = asyncio.create_task(_supervise(name, factory, lifecycle), name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
