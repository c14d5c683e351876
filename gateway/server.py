"""Serving an app: uvloop, the gateway's runner and a graceful stop on SIGTERM/SIGINT.

Its own module so that ``cli`` (which offers ``demo``) and ``dev.demo`` (which serves) do not
import each other."""

from __future__ import annotations

import asyncio
import signal

import uvloop
from aiohttp import web

from gateway.app import create_app
from gateway.http.wire import GatewayRunner
from gateway.logs import configure_logging
from gateway.settings import Settings


def serve(settings: Settings, app: web.Application | None = None) -> None:
    configure_logging(settings.log_level)
    uvloop.run(_serve(app if app is not None else create_app(settings), settings))


async def _serve(app: web.Application, settings: Settings) -> None:
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
        await web.TCPSite(runner, settings.host, settings.port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
