"""Serving an app: uvloop, the gateway's runner and a graceful stop on SIGTERM/SIGINT.

Its own module so that ``cli`` (which offers ``demo``) and ``dev.demo`` (which serves) do not
import each other."""

from __future__ import annotations

import asyncio
import signal

import structlog
import uvloop
from aiohttp import web

from gateway.app import create_app
from gateway.http.wire import GatewayRunner
from gateway.logs import configure_logging
from gateway.metrics import set_worker
from gateway.settings import Settings


def serve(
    settings: Settings, app: web.Application | None = None, *, worker_index: int | None = None
) -> None:
    """Serve until SIGTERM/SIGINT. ``worker_index``: this process is that worker of a group
    (``gateway.workers``): it shares the port with its siblings and says which one it is in
    its log lines and CPU metric."""
    configure_logging(settings.log_level)
    if worker_index is not None:
        structlog.contextvars.bind_contextvars(worker=worker_index)
        set_worker(worker_index)
    app = app if app is not None else create_app(settings)
    uvloop.run(_serve(app, settings, reuse_port=worker_index is not None))


async def _serve(app: web.Application, settings: Settings, *, reuse_port: bool = False) -> None:
    """What ``web.run_app`` did, with the gateway's runner (``run_app`` takes none): requests
    the HTTP parser refuses are answered as problems. SIGTERM and SIGINT end the wait; cleanup
    then drains in-flight requests within the shutdown timeout, as before."""
    runner = GatewayRunner(
        app,
        access_log=None,
        keepalive_timeout=75.0,  # run_app's default (a bare runner's is an hour)
        shutdown_timeout=settings.shutdown_timeout_seconds,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
