"""Owned, supervised background tasks: restarted with backoff when they crash, cancelled on exit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Final

import structlog

from gateway.lifecycle import Lifecycle

log = structlog.get_logger(__name__)
_MAX_BACKOFF: Final = 30.0


async def _supervise(
    name: str, factory: Callable[[], Coroutine[Any, Any, None]], lifecycle: Lifecycle
) -> None:
    backoff = 0.1
    while True:
        lifecycle.workers[name] = "running"
        try:
            await factory()
        except asyncio.CancelledError:
            lifecycle.workers[name] = "stopped"
            raise
        except Exception:
            log.exception("worker_crashed", worker=name, restart_in=backoff)
        else:
            log.warning("worker_returned", worker=name, restart_in=backoff)
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
