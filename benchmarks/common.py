"""What every benchmark shares: paths, cores, API keys, the run's record, starting Redis and
the gateway, and blocking HTTP for setup and polling."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks.procs import Processes, Started
from gateway.dev.services import free_port, reachable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PYTHON = sys.executable
SERVER_CORE, LOAD_CORE = 0, 1
KEYS = {"storefront": "bench-sf", "feed": "bench-feed", "ops": "bench-ops"}
LOCATION = "DC1"
SEED_SKUS = 1000

# Reservations: their own SKUs (RSV-00000..), each with far more stock than a run can hold, and a
# TTL longer than a run, so no hold expires (and the sweeper has nothing to do) while measuring.
RESERVATION_STOCK = 10**9
RESERVATION_TTL = 600
FLASH_UNITS = 100


@dataclass
class Config:
    duration: float
    warmup: float
    rounds: int
    openloop_duration: float
    http_events: int
    kafka_events: int
    kafka_partitions: int
    http_connections: int
    redis_requests: int
    postgres_dsn: str
    phases: frozenset[str]
    profile: bool
    wait_quiet: float
    retries: int
    retry_budget: float
    reservation_ttl: int = RESERVATION_TTL
    # ERP writer accuracy (benchmarks/erp_writer.py)
    writer_rates: tuple[float, ...] = (50.0, 500.0, 2000.0)
    writer_warmup: float = 2.0
    writer_window: float = 10.0
    erp_latency_ms: float = 20.0
    burst_ms: float = 50.0
    # The PostgreSQL baseline and scaling (benchmarks/baseline.py, benchmarks/scaling.py)
    baseline_pool: int = 16
    workers: tuple[int, ...] = (1, 2)


@dataclass
class Row:
    figure: str
    value: str
    ceiling: str
    ratio: str
    target: str
    met: str


@dataclass
class Run:
    config: Config
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    machine: dict[str, Any] = field(default_factory=dict)
    saturation: dict[str, Any] = field(default_factory=dict)
    openloop: dict[str, Any] = field(default_factory=dict)
    ingest: dict[str, Any] = field(default_factory=dict)
    redis_benchmark: dict[str, Any] = field(default_factory=dict)
    reservations: dict[str, Any] = field(default_factory=dict)
    redis_commandstats: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)
    orders: dict[str, Any] = field(default_factory=dict)
    erp_writer: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    scaling: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # retries of disturbed measurements stop at this time.monotonic() value
    deadline: float = math.inf


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def http(
    method: str, url: str, body: bytes | None = None, key: str | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(
    url: str, proc: Started, processes: Processes, what: str, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited (code {proc.proc.returncode}):\n" + processes.log_tail(proc)
            )
        with contextlib.suppress(OSError):
            status, _ = http("GET", url, timeout=1)
            if status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(
        f"{what} not ready at {url} after {timeout:.0f}s:\n" + processes.log_tail(proc)
    )


def wait_port(port: int, proc: Started, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reachable("127.0.0.1", port, 0.2):
            return
        if proc.proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start (code {proc.proc.returncode})")
        time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on port {port}")


def start_redis(processes: Processes) -> tuple[Started, int]:
    port = free_port()
    binary = shutil.which("redis-server") or "redis-server"
    proc = processes.start(
        "redis",
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cores={LOAD_CORE},
    )
    wait_port(port, proc, "redis-server")
    return proc, port


def start_gateway(
    processes: Processes,
    name: str,
    redis_port: int,
    dsn: str,
    extra: dict[str, str] | None = None,
    cores: set[int] | None = None,
) -> tuple[Started, int]:
    """A gateway on a free port, pinned to ``cores`` (default: the server core)."""
    port = free_port()
    # Only this run's settings: a GATEWAY_* variable of the caller's shell must not leak in.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "GATEWAY_POSTGRES_DSN": dsn,
        "GATEWAY_API_KEYS": ",".join(f"{role}:{key}" for role, key in KEYS.items()),
        "GATEWAY_LOG_LEVEL": "warning",
        "GATEWAY_SHUTDOWN_TIMEOUT_SECONDS": "1",
        **(extra or {}),
    }
    where = {SERVER_CORE} if cores is None else cores
    proc = processes.start(name, [PYTHON, "-m", "gateway", "serve"], cores=where, env=env)
    return proc, port


def snapshot(base: str, stock: dict[str, int], tag: str) -> None:
    """Set on-hand of each SKU at ``LOCATION`` by snapshot events (at most 1000)."""
    stamp = datetime.now(UTC).replace(microsecond=0).isoformat()
    events = [
        {
            "event_id": f"{tag}-{sku}",
            "type": "snapshot",
            "sku": sku,
            "location": LOCATION,
            "quantity": quantity,
            "occurred_at": stamp,
        }
        for sku, quantity in stock.items()
    ]
    status, body = http(
        "POST", f"{base}/v1/stock-events", orjson.dumps({"events": events}), KEYS["feed"]
    )
    if status != 200 or orjson.loads(body)["applied"] != len(events):
        raise RuntimeError(f"seeding failed: {status} {body[:300]!r}")


def availability(base: str, sku: str) -> dict[str, Any]:
    status, body = http(
        "GET", f"{base}/v1/availability?sku={sku}&location={LOCATION}", key=KEYS["storefront"]
    )
    if status != 200:
        raise RuntimeError(f"availability of {sku} failed: {status} {body[:300]!r}")
    item: dict[str, Any] = orjson.loads(body)["items"][0]
    return item
