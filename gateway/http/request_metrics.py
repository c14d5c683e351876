"""Per-request HTTP metrics, counted with plain dict arithmetic and exported at scrape time.

prometheus-client's labelled children cost a lock and a label lookup per ``inc``/``observe``:
several µs on a request that costs ~50 µs in all. The hot path here only bumps integers in dicts;
a custom collector turns them into the same Prometheus families when ``/metrics`` is read.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Final

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from gateway.metrics import MULTIPROCESS, on_flush

BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class _Latency:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0


_REQUESTS_HELP: Final = "HTTP requests answered"
_LATENCY_HELP: Final = "Time to answer an HTTP request"
_PROBLEMS_HELP: Final = "Problem responses (RFC 9457) by route and error code"


class RequestMetrics(Collector):
    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, int], int] = {}
        self._latency: dict[str, _Latency] = {}
        self._problems: dict[tuple[str, str], int] = {}
        if MULTIPROCESS:
            self._files = _Files()
            on_flush(self.flush)

    def flush(self) -> None:
        """Copy the growth since the last flush into the worker group's files."""
        self._files.copy(self._requests, self._latency, self._problems)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        latency = self._latency.get(route)
        if latency is None:
            latency = self._latency[route] = _Latency()
        latency.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        latency.total += seconds

    def problem(self, route: str, code: str) -> None:
        """A problem response (any 4xx/5xx the gateway answers) by its stable ``code``."""
        key = (route, code)
        self._problems[key] = self._problems.get(key, 0) + 1

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "gateway_http_requests", _REQUESTS_HELP, labels=["route", "method", "status"]
        )
        for (route, method, status), count in list(self._requests.items()):
            requests.add_metric([route, method, str(status)], count)
        yield requests
        latency = HistogramMetricFamily(
            "gateway_http_request_duration_seconds", _LATENCY_HELP, labels=["route"]
        )
        for route, hist in list(self._latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*BUCKETS, float("inf")), hist.counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            latency.add_metric([route], buckets, hist.total)
        yield latency
        problems = CounterMetricFamily(
            "gateway_http_problems", _PROBLEMS_HELP, labels=["route", "code"]
        )
        for (route, code), count in list(self._problems.items()):
            problems.add_metric([route, code], count)
        yield problems


class _Files:
    """The same families in prometheus-client's multiprocess files, fed by differences.

    A histogram takes one observation at a time; the bucket counts kept here are added to its
    per-bucket values directly (``_buckets``, ``_sum``: prometheus-client's own fields, stable
    since 0.4; tests/test_workers.py checks the sums a scrape shows)."""

    def __init__(self) -> None:
        self._requests = Counter(
            "gateway_http_requests", _REQUESTS_HELP, ["route", "method", "status"], registry=None
        )
        self._latency = Histogram(
            "gateway_http_request_duration_seconds",
            _LATENCY_HELP,
            ["route"],
            buckets=BUCKETS,
            registry=None,
        )
        self._copied_requests: dict[tuple[str, str, int], int] = {}
        self._problems = Counter(
            "gateway_http_problems", _PROBLEMS_HELP, ["route", "code"], registry=None
        )
        self._copied_latency: dict[str, _Latency] = {}
        self._copied_problems: dict[tuple[str, str], int] = {}

    def copy(
        self,
        requests: dict[tuple[str, str, int], int],
        latency: dict[str, _Latency],
        problems: dict[tuple[str, str], int],
    ) -> None:
        for pair, count in list(problems.items()):
            delta = count - self._copied_problems.get(pair, 0)
            if delta:
                self._problems.labels(*pair).inc(delta)
                self._copied_problems[pair] = count
        for key, count in list(requests.items()):
            delta = count - self._copied_requests.get(key, 0)
            if delta:
                route, method, status = key
                self._requests.labels(route, method, str(status)).inc(delta)
                self._copied_requests[key] = count
        for route, hist in list(latency.items()):
            copied = self._copied_latency.get(route)
            if copied is None:
                copied = self._copied_latency[route] = _Latency()
            if hist.total == copied.total and hist.counts == copied.counts:
                continue
            child = self._latency.labels(route)
            for i, (now, then) in enumerate(zip(hist.counts, copied.counts, strict=True)):
                if now != then:
                    child._buckets[i].inc(now - then)
            child._sum.inc(hist.total - copied.total)
            copied.counts[:] = hist.counts
            copied.total = hist.total


REQUEST_METRICS: Final = RequestMetrics()
REGISTRY.register(REQUEST_METRICS)
