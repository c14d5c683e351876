"""The guard's log lines under a flood of failures: an outage answered fast (the gates fail in
microseconds) must not turn a client's retry loop into a log line per request, each a
synchronous write on the event loop. Every failure still counts in the metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from gateway.errors import DependencyDown, OutcomeUnknown
from gateway.http import guard
from gateway.http.auth import Authenticator
from gateway.http.guard import Guard
from gateway.lifecycle import Lifecycle
from tests.conftest import make_settings

INTERVAL = 0.3


async def _down(request: web.Request) -> web.StreamResponse:
    raise DependencyDown("redis: known down; retry shortly", retry_after=1)


async def _unknown(request: web.Request) -> web.StreamResponse:
    raise OutcomeUnknown("redis: no answer in time", retry_after=1)


def _count(route: str, status: int) -> float:
    labels = {"route": route, "method": "GET", "status": str(status)}
    return REGISTRY.get_sample_value("gateway_http_requests_total", labels) or 0.0


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch) -> Guard:
    monkeypatch.setattr(guard, "FAILURE_LOG_INTERVAL", INTERVAL)
    return Guard(Lifecycle(), Authenticator(()), make_settings())


async def test_a_burst_of_503s_logs_a_handful_of_lines(guarded: Guard) -> None:
    down = guarded.wrap(_down, "/t/down", None)
    unknown = guarded.wrap(_unknown, "/t/down", None)
    other_route = guarded.wrap(_down, "/t/other", None)
    counted = _count("/t/down", 503)
    request = make_mocked_request("GET", "/t/down")
    with capture_logs() as logs:
        for _ in range(1000):
            assert (await down(request)).status == 503
        # Another code, or another route, is news of its own: its first failure is logged.
        assert (await unknown(request)).status == 503
        assert (await other_route(request)).status == 503
        await asyncio.sleep(INTERVAL * 1.2)
        assert (await down(request)).status == 503
    lines = [entry for entry in logs if entry["event"] == "request_failed"]
    summary: list[tuple[Any, ...]] = [(e["code"], e["route"], e["suppressed"]) for e in lines]
    assert summary == [
        ("dependency_unavailable", "/t/down", 0),
        ("outcome_unknown", "/t/down", 0),
        ("dependency_unavailable", "/t/other", 0),
        # The first line after the quiet interval says how many were left out.
        ("dependency_unavailable", "/t/down", 999),
    ]
    assert all(e["log_level"] == "warning" for e in lines)
    assert _count("/t/down", 503) == counted + 1002  # all counted, none lost


def test_throttle_admits_one_per_key_per_interval() -> None:
    now = [100.0]
    throttle = guard.LogThrottle(1.0, clock=lambda: now[0])
    assert throttle.admit("a") == 0
    assert [throttle.admit("a") for _ in range(5)] == [None] * 5
    assert throttle.admit("b") == 0
    now[0] += 0.999
    assert throttle.admit("a") is None
    now[0] += 0.002
    assert throttle.admit("a") == 6
    assert throttle.admit("a") is None
    now[0] += 5
    assert throttle.admit("a") == 1
    assert throttle.admit("b") == 0
