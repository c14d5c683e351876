"""The gateway served in-process as ``gateway serve`` serves it (``GatewayRunner``)."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from gateway.http.wire import GatewayRunner


class GatewayTestServer(TestServer):
    """aiohttp's test server on the gateway's runner: parser errors answered as problems,
    bodies decoded by the codec, handlers not cancelled when their client hangs up."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return GatewayRunner(self.app, **kwargs)
