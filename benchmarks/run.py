"""One run of every benchmark of the gateway, each figure printed beside its ceiling.

    .venv/bin/python -m benchmarks.run              # ~4 minutes
    .venv/bin/python -m benchmarks.run --quick      # ~1.5 minutes, shorter and smaller

What it starts (all on loopback, all stopped at the end, Ctrl-C included): a private redis-server,
the plain aiohttp ceiling server (``benchmarks/ceiling.py``), the gateway (``python -m gateway
serve``), later a tansu Kafka broker and a second gateway that consumes it. PostgreSQL must be
running already (``--postgres-dsn``). The server under test runs on core 0; wrk, the open-loop
generator, the ingest client, Redis, tansu and this script run on core 1.

Results: a table on stdout, the same as Markdown, and JSON in ``benchmarks/results/latest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks.events import make_events
from benchmarks.procs import (
    CpuReport,
    Processes,
    Started,
    cpu_phase,
    machine_busy_seconds,
    pin_self,
    process_cpu_seconds,
)
from gateway.dev.services import free_port, reachable, tansu_binary

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PYTHON = sys.executable
SERVER_CORE, LOAD_CORE = 0, 1
KEYS = {"storefront": "bench-sf", "feed": "bench-feed", "ops": "bench-ops"}
LOCATION = "DC1"
SEED_SKUS = 1000
QUIET_PERCENT = 15.0  # machine-wide CPU (of one core) above which another job is running
# A saturation run is disturbed (and retried) when the server got less than SATURATED_PERCENT
# of its core; a latency or ingest run when other processes and the kernel took more than
# NOISY_PERCENT of a core, or SERVER_CORE_NOISY_PERCENT of the server's. On a quiet machine
# loopback networking and the kernel stay under ~30% and ~5%.
SATURATED_PERCENT = 90.0
LOAD_CORE_FULL_PERCENT = 90.0
NOISY_PERCENT = 50.0
SERVER_CORE_NOISY_PERCENT = 15.0

# The targets.
TARGET_RATIO_1 = 0.60
TARGET_RATIO_20 = 0.35
TARGET_P99_MS = 10.0
TARGET_KAFKA = 50_000
TARGET_HTTP = 30_000
TARGET_RES_RATIO_1 = 0.40
TARGET_RES_RATIO_5 = 0.30
TARGET_RES_P99_MS = 15.0

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
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # retries of disturbed measurements stop at this time.monotonic() value
    deadline: float = math.inf


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- small HTTP helpers (blocking; only for setup and polling) ----------------------------------
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


# --- the servers ----------------------------------------------------------------------------
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
    processes: Processes, name: str, redis_port: int, dsn: str, extra: dict[str, str] | None = None
) -> tuple[Started, int]:
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
    proc = processes.start(name, [PYTHON, "-m", "gateway", "serve"], cores={SERVER_CORE}, env=env)
    return proc, port


def start_ceiling(processes: Processes) -> tuple[Started, int]:
    port = free_port()
    proc = processes.start(
        "ceiling", [PYTHON, "-m", "benchmarks.ceiling", str(port)], cores={SERVER_CORE}
    )
    wait_http(f"http://127.0.0.1:{port}/healthz", proc, processes, "ceiling server")
    return proc, port


# --- load generators ------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What one figure loads: GETs of a paths file against ``url`` (a base URL), or POSTs of a
    bodies file to ``url`` (the full URL), each body's ``%ID%`` made unique per request."""

    url: str
    key: str | None
    paths: Path | None = None
    bodies: Path | None = None


_WRK_RESULT = re.compile(r"WRK_RESULT (.*)")
_run_ids = itertools.count(1)


def unique_prefix(tag: str) -> str:
    """A reservation id prefix no other load of this run uses (one Redis per run)."""
    return f"{tag}-{next(_run_ids)}-"


def run_wrk(target: Target, duration: float, tag: str = "wrk") -> dict[str, Any]:
    if target.bodies is not None:
        script, script_args = "reserve.lua", [str(target.bodies), unique_prefix(tag)]
    else:
        assert target.paths is not None
        script, script_args = "paths.lua", [str(target.paths)]
    argv = [
        "wrk",
        "-c64",
        "-t1",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(ROOT / "benchmarks" / script),
    ]
    if target.key:
        argv += ["-H", f"Authorization: Bearer {target.key}"]
    argv += [target.url, "--", *script_args]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=duration + 60)
    match = _WRK_RESULT.search(out.stdout)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    values = {k: int(v) for k, v in (p.split("=") for p in match.group(1).split())}
    seconds = values["duration_us"] / 1e6
    errors = sum(values[k] for k in ("status", "connect", "read", "write", "timeout"))
    result = {
        "requests_per_s": values["requests"] / seconds,
        "requests": values["requests"],
        "seconds": seconds,
        "errors": errors,
        "non_2xx": values["status"],  # wrk counts statuses >= 400
        "p50_ms": values["p50_us"] / 1000,
        "p99_ms": values["p99_us"] / 1000,
        "max_ms": values["max_us"] / 1000,
    }
    if "created" in values:  # reserve.lua counts answers: 201, 409, anything else
        socket_errors = errors - values["status"]
        result.update(
            {
                "status_201": values["created"],
                "status_409": values["refused"],
                "status_other": values["other"],
                "socket_errors": socket_errors,
                # every answer should be a 201 (a new hold); a 200 or a 409 is an error here
                "errors": socket_errors + values["refused"] + values["other"],
            }
        )
    return result


def run_openloop(
    target: Target, rate: float, duration: float, warmup: float, tag: str = "openloop"
) -> dict[str, Any]:
    argv = [
        PYTHON,
        "-m",
        "benchmarks.openloop",
        "--url",
        target.url,
        "--rate",
        f"{rate:.1f}",
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--json",
    ]
    if target.bodies is not None:
        argv += ["--bodies-file", str(target.bodies), "--id-prefix", unique_prefix(tag)]
    elif target.paths is not None:
        argv += ["--paths-file", str(target.paths)]
    if target.key:
        argv += ["-H", f"Authorization: Bearer {target.key}"]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + warmup + 60, cwd=ROOT
    )
    if out.returncode != 0:
        raise RuntimeError(f"open-loop generator failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def write_paths(path: Path, skus_per_request: int, count: int = 1000, seed: int = 7) -> Path:
    """Request paths over the seeded SKUs, distinct SKUs within one request, in random order."""
    rng = random.Random(seed + skus_per_request)
    with path.open("w") as f:
        for _ in range(count):
            skus = rng.sample(range(SEED_SKUS), skus_per_request)
            query = "&".join(f"sku=SKU-{s:05d}" for s in skus)
            f.write(f"/v1/availability?{query}&location={LOCATION}\n")
    return path


def reservation_sku(i: int) -> str:
    return f"RSV-{i:05d}"


def write_bodies(path: Path, requests: Sequence[Sequence[str]], ttl: int) -> Path:
    """Reservation bodies, one a line, each holding 1 unit of each SKU given at ``LOCATION``;
    ``%ID%`` is where the load generator puts a reservation id of the request's own."""
    with path.open("wb") as f:
        for skus in requests:
            body = {
                "reservation_id": "%ID%",
                "ttl_seconds": ttl,
                "lines": [{"sku": s, "location": LOCATION, "quantity": 1} for s in skus],
            }
            f.write(orjson.dumps(body) + b"\n")
    return path


def write_reservation_bodies(
    path: Path, lines: int, ttl: int, count: int = 1000, seed: int = 11
) -> Path:
    """Reservations of ``lines`` distinct SKUs each over the seeded reservation SKUs."""
    rng = random.Random(seed + lines)
    picks = [
        [reservation_sku(s) for s in rng.sample(range(SEED_SKUS), lines)] for _ in range(count)
    ]
    return write_bodies(path, picks, ttl)


# --- py-spy (optional) ----------------------------------------------------------------------
@contextlib.contextmanager
def profiled(run: Run, name: str, pid: int, seconds: float) -> Iterator[None]:
    """Sample the gateway with py-spy while the block runs; keep the top functions."""
    spy = shutil.which("py-spy", path=str(Path(PYTHON).parent)) or shutil.which("py-spy")
    if not run.config.profile or spy is None:
        if run.config.profile:
            run.notes.append("--profile: py-spy not found (pip install py-spy into the venv)")
        yield
        return
    out = RESULTS / f"profile-{name}.txt"
    proc = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, int(seconds))),
            "--rate",
            "200",
            "--nonblocking",
            "--format",
            "raw",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        try:
            proc.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if out.exists():
        run.profiles[name] = {"file": str(out.relative_to(ROOT)), **top_functions(out)}


def top_functions(path: Path, count: int = 15) -> dict[str, Any]:
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        frame = stack.split(";")[-1]
        own[frame] = own.get(frame, 0) + int(n)
    top = sorted(own.items(), key=lambda kv: -kv[1])[:count]
    return {"samples": total, "self_percent": {f: round(100 * n / total, 1) for f, n in top}}


# --- phases ---------------------------------------------------------------------------------
def record_cpu(run: Run, phase: str, report: CpuReport) -> None:
    run.cpu[phase] = {k: round(max(0.0, v), 1) for k, v in report.percent.items()}


def redis_benchmark(run: Run, processes: Processes, redis: Started, port: int) -> None:
    """Redis' own ceiling: a trivial script by EVALSHA, unpipelined and pipelined by 16, with the
    server moved to core 0 (where the gateway runs otherwise) and redis-benchmark on core 1."""
    import redis as redis_py

    client = redis_py.Redis(port=port)
    sha = client.script_load("return 1")
    client.close()
    n = run.config.redis_requests
    os.sched_setaffinity(redis.pid, {SERVER_CORE})
    try:
        cases: list[tuple[str, list[str], int]] = [
            ("evalsha_c50", [], n),
            ("evalsha_c50_P16", ["-P", "16"], n * 5),
        ]
        for name, extra, requests in cases:
            argv = [
                "redis-benchmark",
                "-p",
                str(port),
                "-n",
                str(requests),
                "-c",
                "50",
                *extra,
                "--csv",
                "EVALSHA",
                sha,
                "0",
            ]

            def measure(argv: list[str] = argv) -> dict[str, Any]:
                out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120)
                rows = [ln for ln in out.stdout.splitlines() if ln and not ln.startswith('"test"')]
                fields = rows[-1].replace('"', "").split(",")
                return {
                    "ops_per_s": float(fields[1]),
                    "p50_ms": float(fields[5]),
                    "p99_ms": float(fields[7]),
                }

            # Unpipelined, redis-benchmark's one thread (on the load core) is the limit, not
            # Redis: only other work on the machine counts as a disturbance.
            result = attempts(run, processes, f"redis-benchmark {name}", "redis", False, measure)
            run.redis_benchmark[name] = result
            say(
                f"redis-benchmark EVALSHA {' '.join(extra) or 'unpipelined'}: "
                f"{result['ops_per_s']:,.0f} ops/s"
            )
    finally:
        os.sched_setaffinity(redis.pid, {LOAD_CORE})


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


def seed(base: str) -> None:
    snapshot(base, {f"SKU-{i:05d}": 100 + i for i in range(SEED_SKUS)}, "seed")
    if availability(base, "SKU-00007")["on_hand"] != 107:
        raise RuntimeError("availability check after seeding failed")


def seed_reservations(base: str) -> None:
    snapshot(base, {reservation_sku(i): RESERVATION_STOCK for i in range(SEED_SKUS)}, "rseed")
    if availability(base, reservation_sku(7))["available"] != RESERVATION_STOCK:
        raise RuntimeError("availability check after seeding reservation SKUs failed")


def disturbance(report: CpuReport, server: str, saturating: bool) -> str | None:
    """Why a measurement looks disturbed by other work on the machine, or None.

    At saturation the server should keep its core busy. When it used less, the run is disturbed
    if something explains it: other work on the server's core, a full load core (a starved load
    generator) or other work on the machine. Otherwise the server is not CPU-bound (reservations:
    it waits on Redis), which is a property of the server, not noise; ``attempts`` notes it.
    Latency and ingest are disturbed by anything else running, on the server's core above all."""
    if saturating:
        server_cpu = report.percent.get(server, 100.0)
        if server_cpu >= SATURATED_PERCENT:
            return None
        short = f"the server used only {server_cpu:.0f}% of its core"
        on_core = report.percent.get("server core, others", 0.0)
        if on_core > SERVER_CORE_NOISY_PERCENT:
            return f"{short}; {on_core:.0f}% of it went to other processes or the kernel"
        load = load_core_percent(report, server)
        if load > LOAD_CORE_FULL_PERCENT:
            return f"{short}; the load core was {load:.0f}% busy"
        other = report.percent.get("unattributed", 0.0)
        if other > NOISY_PERCENT:
            return f"{short}; {other:.0f}% of a core in other processes or the kernel"
        return None
    on_core = report.percent.get("server core, others", 0.0)
    if on_core > SERVER_CORE_NOISY_PERCENT:
        return f"{on_core:.0f}% of the server's core went to other processes or the kernel"
    other = report.percent.get("unattributed", 0.0)
    if other > NOISY_PERCENT:
        return f"{other:.0f}% of a core in other processes or the kernel"
    return None


def load_core_percent(report: CpuReport, server: str) -> float:
    """How busy the load core was: all the machine did but the server and its core's others."""
    on_core = report.percent.get("server core, others", 0.0)
    total = sum(v for k, v in report.percent.items() if k != "server core, others")
    return total - report.percent.get(server, 0.0) - on_core


def _noise(report: CpuReport, server: str, saturating: bool) -> float:
    if saturating:
        return SATURATED_PERCENT - report.percent.get(server, 100.0)
    return report.percent.get("unattributed", 0.0) + 3 * report.percent.get(
        "server core, others", 0.0
    )


def flag_disturbed(run: Run, phase: str, report: CpuReport, result: dict[str, Any]) -> None:
    """Ingest is not repeated (it takes long); a disturbed figure is only marked."""
    why = disturbance(report, "", False)
    if why is not None:
        result["disturbed"] = why
        run.notes.append(f"{phase}: disturbed ({why}); the figure is unreliable")


def attempts(
    run: Run,
    processes: Processes,
    phase: str,
    server: str,
    saturating: bool,
    measure: Callable[[], dict[str, Any]],
    warm: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Measure; while disturbed, retry up to ``--retries`` times and keep the least disturbed."""
    best: tuple[float, dict[str, Any], CpuReport] | None = None
    tries = 1 + run.config.retries
    for attempt in range(1, tries + 1):
        if warm is not None:
            warm()
        with cpu_phase(processes) as report:
            result = measure()
        why = disturbance(report, server, saturating)
        noise = _noise(report, server, saturating)
        if best is None or noise < best[0]:
            best = (noise, result, report)
        if why is None:
            break
        again = attempt < tries and time.monotonic() < run.deadline
        say(f"{phase}: disturbed ({why}){'; again' if again else ''}")
        if not again:
            break
    assert best is not None
    _, result, report = best
    result["attempts"] = attempt
    why = disturbance(report, server, saturating)
    if why is not None:
        result["disturbed"] = why
        run.notes.append(f"{phase}: disturbed in every attempt ({why}); the figure is unreliable")
    elif saturating and report.percent.get(server, 100.0) < SATURATED_PERCENT:
        busy = report.percent.get(server, 100.0)
        result["not_cpu_bound"] = f"{server} {busy:.0f}% of its core"
        run.notes.append(
            f"{phase}: the {server} used {busy:.0f}% of its core, the load core "
            f"{load_core_percent(report, server):.0f}% (redis "
            f"{report.percent.get('redis', 0.0):.0f}%), the machine otherwise quiet: not "
            "CPU-bound, not noise"
        )
    record_cpu(run, phase, report)
    return result


def _server(name: str) -> str:
    return "ceiling" if name == "ceiling" else "gateway"


def saturation(
    run: Run,
    processes: Processes,
    targets: dict[str, Target],
    gateway_pid: int,
    redis_port: int,
) -> None:
    cfg = run.config
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for round_no in range(cfg.rounds):
        for name, target in targets.items():
            phase = f"saturation {name} #{round_no + 1}"

            def warm(target: Target = target, name: str = name) -> object:
                return run_wrk(target, cfg.warmup, f"{name}-warm") if cfg.warmup > 0 else None

            def measure(target: Target = target, name: str = name) -> dict[str, Any]:
                if target.bodies is None:
                    return run_wrk(target, cfg.duration, name)
                # Reservations: Redis' own account of each script call, per figure.
                with redis_commandstats(run, f"saturation {name}", redis_port):
                    return run_wrk(target, cfg.duration, name)

            result = attempts(run, processes, phase, _server(name), True, measure, warm)
            cpu = run.cpu.get(phase, {})
            result["server_cpu_percent"] = cpu.get(_server(name), math.nan)
            for process in ("redis", "gateway"):
                if name != "ceiling" and result["requests_per_s"] > 0:
                    result[f"{process}_cpu_us_per_request"] = round(
                        cpu.get(process, 0.0) / 100 / result["requests_per_s"] * 1e6, 1
                    )
            samples[name].append(result)
            say(
                f"wrk -c64 {name}: {result['requests_per_s']:,.0f} req/s, errors {result['errors']}"
            )
    if cfg.profile:  # an extra run, not measured: py-spy takes CPU on the load core
        for name, target in targets.items():
            if name != "ceiling":
                with profiled(run, f"wrk-{name}", gateway_pid, cfg.duration - 1):
                    run_wrk(target, cfg.duration, f"{name}-profile")
    for name, results in samples.items():
        rates = [r["requests_per_s"] for r in results]
        summary: dict[str, Any] = {
            "requests_per_s": statistics.median(rates),
            "rounds": rates,
            "errors": sum(r["errors"] for r in results),
            "disturbed": any("disturbed" in r for r in results),
            "latency_p50_ms_at_c64": statistics.median(r["p50_ms"] for r in results),
            "latency_p99_ms_at_c64": statistics.median(r["p99_ms"] for r in results),
        }
        for key in (
            "redis_cpu_us_per_request",
            "gateway_cpu_us_per_request",
            "server_cpu_percent",
        ):
            if all(key in r for r in results):
                summary[key] = statistics.median(r[key] for r in results)
        for key in ("status_201", "status_409", "status_other"):
            if all(key in r for r in results):
                summary[key] = sum(r[key] for r in results)
        run.saturation[name] = summary


def open_loop(run: Run, processes: Processes, targets: dict[str, Target]) -> None:
    cfg = run.config
    for name, target in targets.items():
        rate = run.saturation[name]["requests_per_s"] / 2

        def measure(
            target: Target = target, rate: float = rate, name: str = name
        ) -> dict[str, Any]:
            return run_openloop(target, rate, cfg.openloop_duration, 1.0, f"{name}-openloop")

        result = attempts(run, processes, f"open loop {name}", _server(name), False, measure)
        run.openloop[name] = result
        say(
            f"open loop {name} at {rate:,.0f}/s: p50 {result['p50_ms']:.2f} ms, p99 "
            f"{result['p99_ms']:.2f} ms, errors {result['errors']}, send lag p99 "
            f"{result['send_lag_p99_ms']:.2f} ms, generator CPU {result['cpu_percent']:.0f}%"
        )


_HELD = re.compile(r'^gateway_reservations_total\{[^}]*outcome="held"[^}]*\}\s+(\S+)', re.MULTILINE)


def reservations_held(base: str) -> float:
    status, body = http("GET", f"{base}/metrics", timeout=5)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    match = _HELD.search(body.decode())
    return float(match.group(1)) if match else 0.0


def flash_sale(run: Run, processes: Processes, base: str, gateway_pid: int, work: Path) -> None:
    """One SKU with FLASH_UNITS units at one location, every request reserving 1 of it: the rate
    (all but the first FLASH_UNITS answers are 409) and, after each run, proof of no oversell:
    the SKU's reserved never exceeds its on-hand, and no more than FLASH_UNITS 201s came back.

    Every run (warm-up, each attempt, the profiled one) races for a fresh SKU, so the race for
    the units happens inside the measured run and each run is checked on its own."""
    cfg = run.config
    url = f"{base}/v1/reservations"
    numbers = itertools.count(1)
    checks: list[dict[str, Any]] = []

    def race(duration: float, tag: str) -> dict[str, Any]:
        sku = f"HOT-{next(numbers):03d}"
        snapshot(base, {sku: FLASH_UNITS}, "hot")
        bodies = write_bodies(work / f"bodies-{sku}.txt", [[sku]], cfg.reservation_ttl)
        held_before = reservations_held(base)
        result = run_wrk(Target(url, KEYS["storefront"], bodies=bodies), duration, f"flash-{tag}")
        # wrk may close connections with requests in flight; let the gateway finish them.
        time.sleep(0.3)
        item = availability(base, sku)
        held = round(reservations_held(base) - held_before)
        check = {
            "run": tag,
            "sku": sku,
            "on_hand": item["on_hand"],
            "reserved": item["reserved"],
            "available": item["available"],
            "status_201": result["status_201"],
            "held_metric_delta": held,
            "oversold": max(
                0, item["reserved"] - item["on_hand"], result["status_201"] - FLASH_UNITS
            ),
            # The 201s wrk saw, the holds the gateway counted and Redis' reserved must agree
            # (no hold expires within a run: the TTL is longer).
            "consistent": result["status_201"] <= held == item["reserved"],
        }
        checks.append(check)
        result["check"] = check
        # A 409 is the expected answer here; only other statuses and broken sockets are errors.
        result["errors"] = result["status_other"] + result["socket_errors"]
        return result

    def warm() -> object:
        return race(cfg.warmup, "warm") if cfg.warmup > 0 else None

    result = attempts(
        run, processes, "flash sale", "gateway", True, lambda: race(cfg.duration, "measure"), warm
    )
    if cfg.profile:
        with profiled(run, "wrk-flash", gateway_pid, cfg.duration - 1):
            race(cfg.duration, "profile")
    worst = max(checks, key=lambda c: (c["oversold"], not c["consistent"]))
    run.reservations["flash"] = {
        **{k: v for k, v in result.items() if k != "check"},
        "units": FLASH_UNITS,
        "check": result["check"],
        "oversold_max": worst["oversold"],
        "all_consistent": all(c["consistent"] for c in checks),
        "runs_checked": checks,
    }
    check = result["check"]
    say(
        f"flash sale: {result['requests_per_s']:,.0f} req/s, 201s {check['status_201']}, 409s "
        f"{result['status_409']:,}, reserved {check['reserved']} of {check['on_hand']}; "
        f"oversold {worst['oversold']} over {len(checks)} run(s)"
    )


def generator_check(run: Run, processes: Processes, work: Path) -> None:
    """The open-loop generator against the ceiling server, at a low and a high rate: its send
    lag, its CPU and the latency floor it reports when the server is nearly idle."""
    ceiling, port = start_ceiling(processes)
    target = Target(f"http://127.0.0.1:{port}", None, paths=write_paths(work / "paths-1sku.txt", 1))
    try:
        for rate in (1000, 15_000):

            def measure(rate: float = rate) -> dict[str, Any]:
                return run_openloop(target, rate, run.config.openloop_duration, 1.0)

            result = attempts(run, processes, f"generator at {rate:,}/s", "ceiling", False, measure)
            run.openloop[f"generator_check_{rate}"] = result
            say(
                f"generator vs ceiling at {rate:,}/s: achieved {result['achieved_rate']:,.0f}/s, "
                f"p50 {result['p50_ms']:.2f} p99 {result['p99_ms']:.2f} ms, service p50 "
                f"{result['service_p50_ms']:.2f} p99 {result['service_p99_ms']:.2f} ms, send lag "
                f"p50 {result['send_lag_p50_ms']:.2f} p99 {result['send_lag_p99_ms']:.2f} ms, "
                f"generator CPU {result['cpu_percent']:.0f}%, connections {result['connections']}"
            )
    finally:
        processes.stop(ceiling)


def per_event(
    result: dict[str, Any], report: CpuReport, names: dict[str, str], events: float
) -> None:
    """CPU µs per applied event of Redis and of the gateway: where ingest spends its time."""
    for label, name in names.items():
        percent = report.percent.get(name)
        if percent is not None and events > 0:
            result[f"{label}_cpu_us_per_event"] = round(
                percent / 100 * report.wall_s / events * 1e6, 2
            )


@contextlib.contextmanager
def redis_commandstats(run: Run, phase: str, port: int) -> Iterator[None]:
    """Redis' own account of where its time went (scripts' inner commands included)."""
    import redis as redis_py

    client = redis_py.Redis(port=port)
    try:
        client.config_resetstat()
        yield
        stats = client.info("commandstats")
    finally:
        client.close()
    rows = sorted(
        ((name.removeprefix("cmdstat_"), v) for name, v in stats.items()),
        key=lambda kv: -int(kv[1]["usec"]),
    )
    run.redis_commandstats[phase] = {
        name: {
            "calls": int(v["calls"]),
            "usec": int(v["usec"]),
            "usec_per_call": float(v["usec_per_call"]),
        }
        for name, v in rows[:8]
    }


def ingest_http(run: Run, processes: Processes, base: str, gateway_pid: int) -> None:
    cfg = run.config
    argv = [
        PYTHON,
        "-m",
        "benchmarks.ingest_http",
        "--url",
        base,
        "--key",
        KEYS["feed"],
        "--events",
        str(cfg.http_events),
        "--connections",
        str(cfg.http_connections),
        "--prefix",
        "H-",
        "--wait-go",
    ]
    client = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert client.stdin is not None
    assert client.stdout is not None
    try:
        # The client builds its bodies first; CPU is counted from when it starts sending.
        if client.stdout.readline().strip() != "READY":
            raise RuntimeError("HTTP ingest client did not get ready")
        building = process_cpu_seconds(client.pid)
        with (
            cpu_phase(processes) as report,
            profiled(run, "ingest-http", gateway_pid, cfg.http_events / 40_000),
        ):
            client.stdin.write("go\n")
            client.stdin.flush()
            out, err = client.communicate(timeout=600)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    if not out.strip():
        raise RuntimeError(f"HTTP ingest client failed:\n{err[-3000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    report.discount_load(building)
    record_cpu(run, "ingest http", report)
    flag_disturbed(run, "ingest http", report, result)
    per_event(result, report, {"redis": "redis", "gateway": "gateway"}, result["applied"])
    run.ingest["http"] = result
    say(
        f"ingest over HTTP: {result['events_per_s']:,.0f} events/s ({result['applied']:,} applied, "
        f"{result['duplicate']} duplicate, {result['stale']} stale, {result['errors']} errors)"
    )


_APPLIED_KAFKA = re.compile(
    r'^gateway_stock_events_total\{(?=[^}]*source="kafka")(?=[^}]*outcome="applied")[^}]*\}\s+(\S+)',
    re.MULTILINE,
)


def kafka_applied(base: str) -> float:
    with contextlib.suppress(OSError):
        status, body = http("GET", f"{base}/metrics", timeout=2)
        if status == 200:
            match = _APPLIED_KAFKA.search(body.decode())
            return float(match.group(1)) if match else 0.0
    return -1.0


async def produce(bootstrap: str, topic: str, partitions: int, count: int) -> float:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )
    finally:
        await admin.close()
    values = [orjson.dumps(e) for e in make_events(count, prefix="K-")]
    # tansu rejects aiokafka's idempotent producer; whole batches per partition are fastest.
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, max_batch_size=1 << 20
    )
    await producer.start()
    started = time.perf_counter()
    try:
        pending = []
        i, n = 0, len(values)
        while i < n:
            for partition in range(partitions):
                batch = producer.create_batch()
                while i < n and batch.append(key=None, value=values[i], timestamp=None) is not None:
                    i += 1
                batch.close()
                pending.append(await producer.send_batch(batch, topic, partition=partition))
                if i >= n:
                    break
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return n / (time.perf_counter() - started)


def ingest_kafka(run: Run, processes: Processes, redis_port: int) -> None:
    cfg = run.config
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    broker = processes.start(
        "tansu",
        [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
        cores={LOAD_CORE},
    )
    wait_port(port, broker, "tansu")
    bootstrap = f"127.0.0.1:{port}"
    topic = f"bench-events-{os.getpid()}"
    produce_rate = asyncio.run(produce(bootstrap, topic, cfg.kafka_partitions, cfg.kafka_events))
    say(
        f"produced {cfg.kafka_events:,} events to {cfg.kafka_partitions} partitions "
        f"({produce_rate:,.0f} msg/s); starting a consuming gateway"
    )
    spawned = time.perf_counter()
    gateway, gport = start_gateway(
        processes,
        "gateway-kafka",
        redis_port,
        cfg.postgres_dsn,
        {
            "GATEWAY_KAFKA_BOOTSTRAP": bootstrap,
            "GATEWAY_KAFKA_TOPICS": topic,
            "GATEWAY_KAFKA_GROUP": f"bench-{os.getpid()}",
            "GATEWAY_KAFKA_SESSION_TIMEOUT_MS": "6000",
        },
    )
    base = f"http://127.0.0.1:{gport}"
    target = cfg.kafka_events
    first: tuple[float, float] | None = None
    last: tuple[float, float] = (0.0, 0.0)
    deadline = time.perf_counter() + 60 + target / 10_000
    timeline: list[tuple[float, float]] = []
    with contextlib.ExitStack() as stack:
        report: CpuReport | None = None
        while time.perf_counter() < deadline:
            if gateway.proc.poll() is not None:
                raise RuntimeError("the Kafka gateway exited:\n" + processes.log_tail(gateway))
            count = kafka_applied(base)
            now = time.perf_counter()
            if count > 0 and first is None:
                first = (now, count)
                report = stack.enter_context(cpu_phase(processes))
                stack.enter_context(profiled(run, "ingest-kafka", gateway.pid, target / 60_000))
            if count >= 0:
                timeline.append((round(now - spawned, 2), count))
            if count >= target:
                last = (now, count)
                break
            time.sleep(0.05)
    result: dict[str, Any] = {
        "events": target,
        "partitions": cfg.kafka_partitions,
        "produce_msgs_per_s": produce_rate,
        "timeline": timeline[-200:],
    }
    if report is not None and first is not None:
        record_cpu(run, "ingest kafka (from first applied)", report)
        flag_disturbed(run, "ingest kafka", report, result)
        per_event(
            result,
            report,
            {"redis": "redis", "gateway": "gateway-kafka"},
            max(c for _, c in timeline) - first[1],
        )
    if first is None or last[1] < target:
        result.update(
            {
                "events_per_s": 0.0,
                "applied": max((c for _, c in timeline), default=0),
                "error": "not all events applied before the deadline",
            }
        )
    else:
        elapsed = last[0] - first[0]
        result.update(
            {
                "applied": last[1],
                "applied_at_first_sample": first[1],
                "elapsed_s": elapsed,
                "events_per_s": (last[1] - first[1]) / elapsed if elapsed > 0 else 0.0,
                "start_to_first_applied_s": first[0] - spawned,
                "start_to_all_applied_s": last[0] - spawned,
            }
        )
    run.ingest["kafka"] = result
    say(
        f"ingest over Kafka: {result['events_per_s']:,.0f} events/s "
        f"({result.get('applied', 0):,.0f} applied; first applied "
        f"{result.get('start_to_first_applied_s', math.nan):.1f}s after start)"
    )
    processes.stop(gateway)
    processes.stop(broker)


# --- the report -----------------------------------------------------------------------------
def _num(v: float) -> str:
    return f"{v:,.0f}"


def _ratio(v: float, c: float) -> str:
    return f"{v / c:.0%}" if c > 0 and not math.isnan(v) else "-"


def _yes(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def _flags(*results: dict[str, Any]) -> str:
    """A suffix for the met? column when a figure came with errors or was disturbed."""
    marks = []
    if any(r.get("errors", 0) or r.get("unfinished", 0) for r in results):
        marks.append("errors")
    if any(r.get("disturbed") for r in results):
        marks.append("noisy")
    return f" ({', '.join(marks)})" if marks else ""


def build_rows(run: Run) -> None:
    sat, ol, ing, rb = run.saturation, run.openloop, run.ingest, run.redis_benchmark
    rows = run.rows
    ceiling = sat["ceiling"]["requests_per_s"] if sat else math.nan
    if sat:
        rows.append(
            Row(
                "plain aiohttp JSON handler (ceiling), req/s at c64",
                _num(ceiling),
                "-",
                "-",
                "-",
                "-" + _flags(sat["ceiling"]),
            )
        )
    for name, label, target in (
        ("avail_1", "1 SKU", TARGET_RATIO_1),
        ("avail_20", "20 SKUs", TARGET_RATIO_20),
    ):
        if name not in sat:
            continue
        value = sat[name]["requests_per_s"]
        flags = _flags(sat[name], sat["ceiling"])
        rows.append(
            Row(
                f"availability {label}, req/s at saturation (wrk c64)",
                _num(value),
                _num(ceiling),
                _ratio(value, ceiling),
                f">= {target:.0%} of ceiling",
                _yes(not sat[name]["errors"] and value >= target * ceiling) + flags,
            )
        )
    if "ceiling" in ol:
        c = ol["ceiling"]
        rows.append(
            Row(
                f"ceiling p50 / p99 ms, open loop at half saturation ({c['target_rate']:,.0f}/s)",
                f"{c['p50_ms']:.2f} / {c['p99_ms']:.2f}",
                "-",
                "-",
                "-",
                "-" + _flags(c),
            )
        )
    for name, label in (("avail_1", "1 SKU"), ("avail_20", "20 SKUs")):
        if name not in ol:
            continue
        c, g = ol["ceiling"], ol[name]
        clean = not g["errors"] and not g["unfinished"]
        rows.append(
            Row(
                f"availability {label}, p50 / p99 ms, open loop at half saturation "
                f"({g['target_rate']:,.0f}/s)",
                f"{g['p50_ms']:.2f} / {g['p99_ms']:.2f}",
                f"{c['p50_ms']:.2f} / {c['p99_ms']:.2f}",
                f"p99 {g['p99_ms'] / c['p99_ms']:.1f}x" if c["p99_ms"] > 0 else "-",
                f"p99 <= {TARGET_P99_MS:g} ms",
                _yes(clean and g["p99_ms"] <= TARGET_P99_MS) + _flags(g),
            )
        )
    reservation_rows(run, ceiling)
    redis_ops = rb.get("evalsha_c50", {}).get("ops_per_s", math.nan)
    redis_label = f"{_num(redis_ops)} (EVALSHA c50)" if not math.isnan(redis_ops) else "-"
    for kind, label, target in (
        (
            "http",
            f"HTTP, events/s ({run.config.http_connections} conns, 1000-event batches)",
            TARGET_HTTP,
        ),
        (
            "kafka",
            f"Kafka, events/s ({run.config.kafka_partitions} partitions, pre-produced)",
            TARGET_KAFKA,
        ),
    ):
        if kind not in ing:
            continue
        r = ing[kind]
        rows.append(
            Row(
                f"ingest over {label}",
                _num(r["events_per_s"]),
                redis_label,
                _ratio(r["events_per_s"], redis_ops),
                f">= {_num(target)}/s",
                _yes(not r.get("errors") and r["events_per_s"] >= target) + _flags(r),
            )
        )
        if "redis_cpu_us_per_event" in r:
            rows.append(
                Row(
                    f"ingest over {kind.upper() if kind == 'http' else 'Kafka'}: CPU per event, "
                    "Redis / gateway",
                    f"{r['redis_cpu_us_per_event']:.1f} / "
                    f"{r.get('gateway_cpu_us_per_event', 0):.1f} µs",
                    "-",
                    "-",
                    "-",
                    "-",
                )
            )
    if "evalsha_c50" in rb:
        rows.append(
            Row(
                "redis-benchmark EVALSHA 'return 1', -c 50 unpipelined, ops/s",
                _num(rb["evalsha_c50"]["ops_per_s"]),
                "-",
                "-",
                "-",
                "-" + _flags(rb["evalsha_c50"]),
            )
        )
    if "evalsha_c50_P16" in rb:
        rows.append(
            Row(
                "redis-benchmark EVALSHA 'return 1', -P 16, ops/s",
                _num(rb["evalsha_c50_P16"]["ops_per_s"]),
                "-",
                "-",
                "-",
                "-",
            )
        )


def reservation_rows(run: Run, ceiling: float) -> None:
    sat, ol, rows = run.saturation, run.openloop, run.rows
    for name, label, target in (
        ("res_1", "1 line", TARGET_RES_RATIO_1),
        ("res_5", "5 lines", TARGET_RES_RATIO_5),
    ):
        if name not in sat:
            continue
        value = sat[name]["requests_per_s"]
        rows.append(
            Row(
                f"reservation {label}, req/s at saturation (wrk c64, a new id each, all 201)",
                _num(value),
                _num(ceiling),
                _ratio(value, ceiling),
                f">= {target:.0%} of ceiling",
                _yes(not sat[name]["errors"] and value >= target * ceiling)
                + _flags(sat[name], sat["ceiling"]),
            )
        )
    for name, label in (("res_1", "1 line"), ("res_5", "5 lines")):
        if name not in ol or "ceiling" not in ol:
            continue
        c, g = ol["ceiling"], ol[name]
        clean = not g["errors"] and not g["unfinished"]
        rows.append(
            Row(
                f"reservation {label}, p50 / p99 ms, open loop at half saturation "
                f"({g['target_rate']:,.0f}/s)",
                f"{g['p50_ms']:.2f} / {g['p99_ms']:.2f}",
                f"{c['p50_ms']:.2f} / {c['p99_ms']:.2f}",
                f"p99 {g['p99_ms'] / c['p99_ms']:.1f}x" if c["p99_ms"] > 0 else "-",
                f"p99 <= {TARGET_RES_P99_MS:g} ms",
                _yes(clean and g["p99_ms"] <= TARGET_RES_P99_MS) + _flags(g),
            )
        )
    flash = run.reservations.get("flash")
    if flash is not None:
        value = flash["requests_per_s"]
        one_line = sat.get("res_1", {}).get("requests_per_s", math.nan)
        rows.append(
            Row(
                f"flash sale, 1 SKU with {flash['units']} units, every request reserving 1: "
                f"req/s (wrk c64; {flash['status_409']:,} x 409)",
                _num(value) + (f" ({value / one_line:.2f}x 1 line)" if one_line > 0 else ""),
                _num(ceiling),
                _ratio(value, ceiling),
                f">= {TARGET_RES_RATIO_1:.0%} of ceiling (as 1 line)",
                _yes(not flash["errors"] and value >= TARGET_RES_RATIO_1 * ceiling)
                + _flags(flash, sat.get("ceiling", {})),
            )
        )
        check, oversold = flash["check"], flash["oversold_max"]
        created = check["status_201"]
        rows.append(
            Row(
                f"flash sale: oversell, {len(flash['runs_checked'])} run(s) checked "
                f"(reserved {check['reserved']} of on-hand {check['on_hand']})",
                f"oversell: {oversold} (201s = {created} "
                f"{'<=' if created <= flash['units'] else '>'} {flash['units']})",
                "-",
                "-",
                "oversell 0",
                _yes(oversold == 0 and flash["all_consistent"])
                + ("" if flash["all_consistent"] else " (201s, holds, reserved disagree)"),
            )
        )
    parts = [
        f"{label} {sat[name]['redis_cpu_us_per_request']:.0f} / "
        f"{sat[name]['gateway_cpu_us_per_request']:.0f} µs"
        for name, label in (("res_1", "1 line"), ("res_5", "5 lines"))
        if "redis_cpu_us_per_request" in sat.get(name, {})
    ]
    busy = [
        f"{sat[name]['server_cpu_percent']:.0f}%"
        for name in ("res_1", "res_5")
        if "server_cpu_percent" in sat.get(name, {})
    ]
    if parts:
        rows.append(
            Row(
                "reservation at saturation: CPU per request, Redis / gateway "
                f"(gateway busy {' / '.join(busy)} of its core)",
                "; ".join(parts),
                "-",
                "-",
                "-",
                "-",
            )
        )


HEADERS = ("figure", "value", "ceiling", "ratio", "target", "met?")


def text_table(rows: Sequence[Row]) -> str:
    cells = [HEADERS, *[tuple(asdict(r).values()) for r in rows]]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(HEADERS))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(str(v) for v in asdict(r).values()) + " |" for r in rows]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for module in ("aiohttp", "uvloop", "redis", "aiokafka", "msgspec", "orjson"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[module] = version(module)
    with contextlib.suppress(Exception):
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        versions["redis-server"] = out.stdout.split()[2].removeprefix("v=")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "split": f"server under test (gateway or ceiling) on core {SERVER_CORE}; wrk, open-loop "
        "generator, ingest client, redis-server, tansu and this script on core "
        f"{LOAD_CORE}; redis-benchmark: redis-server on core {SERVER_CORE}, "
        f"redis-benchmark on core {LOAD_CORE}",
    }


def print_report(run: Run, json_path: Path) -> None:
    cfg = run.config
    m = run.machine
    print()
    print(
        f"atp-gateway benchmarks, {run.started_at}, {m['cpu']} x{m['cores']}, Python {m['python']}"
    )
    print(f"core split: {m['split']}")
    print(
        f"wrk: -c64 -t1 -d{cfg.duration:g}s after a {cfg.warmup:g}s warm-up, median of "
        f"{cfg.rounds} round(s); requests cycle through 1,000 pre-drawn random SKU sets "
        f"(of {SEED_SKUS} seeded SKUs at {LOCATION}); open loop {cfg.openloop_duration:g}s "
        "after 1s, latency from the intended send time"
    )
    if "reservations" in cfg.phases:
        print(
            f"reservations: POST /v1/reservations, a new reservation_id per request, "
            f"ttl_seconds {cfg.reservation_ttl} (no hold expires during the run), 1 unit of "
            f"each of 1 or 5 distinct SKUs of {SEED_SKUS} seeded with {RESERVATION_STOCK:,} at "
            f"{LOCATION}; flash sale: a fresh SKU with {FLASH_UNITS} units per wrk run"
        )
    print()
    print(text_table(run.rows))
    print()
    print("CPU, % of one core, per phase:")
    for phase, usage in run.cpu.items():
        parts = ", ".join(f"{k} {v:.0f}" for k, v in usage.items() if v >= 0.5)
        print(f"  {phase}: {parts}")
    for phase, stats in run.redis_commandstats.items():
        parts = ", ".join(
            f"{name} {v['calls']:,} x {v['usec_per_call']:.1f} µs"
            for name, v in list(stats.items())[:6]
        )
        print(
            f"Redis commandstats, {phase} (a script's time includes the commands it calls): {parts}"
        )
    for name, prof in run.profiles.items():
        print(f"py-spy {name} ({prof['samples']} samples, {prof['file']}): top self time")
        for frame, pct in list(prof["self_percent"].items())[:10]:
            print(f"  {pct:5.1f}%  {frame}")
    for note in run.notes:
        print(f"note: {note}")
    print()
    print("Markdown:")
    print()
    print(markdown_table(run.rows))
    print()
    print(f"JSON: {json_path}")


# --- main -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="about a minute: shorter, smaller")
    parser.add_argument("--duration", type=float, help="seconds per wrk measurement (10; quick 4)")
    parser.add_argument("--warmup", type=float, help="wrk warm-up seconds before each (2; quick 1)")
    parser.add_argument("--rounds", type=int, help="wrk rounds, the median is kept (2; quick 1)")
    parser.add_argument("--openloop-duration", type=float, help="seconds (10; quick 4)")
    parser.add_argument("--http-events", type=int, help="events posted (300000; quick 100000)")
    parser.add_argument("--kafka-events", type=int, help="events produced (300000; quick 100000)")
    parser.add_argument("--kafka-partitions", type=int, default=4)
    parser.add_argument("--http-connections", type=int, default=4)
    parser.add_argument(
        "--postgres-dsn",
        default=os.environ.get(
            "GATEWAY_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--skip-kafka", action="store_true", help="no Kafka ingest figure")
    parser.add_argument(
        "--only",
        metavar="PHASES",
        help=f"comma-separated subset of {','.join(PHASES)} (openloop runs wrk "
        "first: it needs the saturation rates; reservations runs the ceiling and redis "
        "too); 'generator' checks the open-loop generator against the ceiling at a low "
        "and a high rate",
    )
    parser.add_argument(
        "--reservation-ttl",
        type=int,
        default=RESERVATION_TTL,
        metavar="SECONDS",
        help=f"ttl_seconds of the benchmark's reservations ({RESERVATION_TTL}: longer than a "
        "run, so the expiry sweeper has nothing to release while measuring)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the gateway with py-spy (if installed) during each load",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="repeat a latency or saturation measurement disturbed by other "
        "work on the machine up to this many times (2)",
    )
    parser.add_argument(
        "--retry-budget",
        type=float,
        metavar="SECONDS",
        help="no more retries once the run is this old (150; quick 45)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for other work on the machine to stop",
    )
    a = parser.parse_args(argv)
    quick = a.quick
    return Config(
        duration=a.duration or (4.0 if quick else 10.0),
        warmup=a.warmup if a.warmup is not None else (1.0 if quick else 2.0),
        rounds=a.rounds or (1 if quick else 2),
        openloop_duration=a.openloop_duration or (4.0 if quick else 10.0),
        http_events=a.http_events or (100_000 if quick else 300_000),
        kafka_events=a.kafka_events or (100_000 if quick else 300_000),
        kafka_partitions=a.kafka_partitions,
        http_connections=a.http_connections,
        redis_requests=200_000 if quick else 500_000,
        postgres_dsn=a.postgres_dsn,
        phases=_phases(a.only, a.skip_kafka, parser),
        profile=a.profile,
        wait_quiet=a.wait_quiet,
        retries=a.retries,
        retry_budget=a.retry_budget or (45.0 if quick else 150.0),
        reservation_ttl=a.reservation_ttl,
    )


PHASES = ("redis", "wrk", "openloop", "reservations", "http", "kafka")
EXTRA_PHASES = ("generator",)  # only when asked for by --only


def _phases(only: str | None, skip_kafka: bool, parser: argparse.ArgumentParser) -> frozenset[str]:
    chosen = set(PHASES) if only is None else {p.strip() for p in only.split(",") if p.strip()}
    unknown = chosen - set(PHASES) - set(EXTRA_PHASES)
    if unknown:
        parser.error(
            f"unknown phase(s) {', '.join(sorted(unknown))}; choose from {PHASES + EXTRA_PHASES}"
        )
    if "openloop" in chosen:
        chosen.add("wrk")
    if "reservations" in chosen:  # its figures sit beside redis-benchmark's
        chosen.add("redis")
    if skip_kafka:
        chosen.discard("kafka")
    return frozenset(chosen)


def check_tools() -> None:
    missing = [t for t in ("wrk", "redis-server", "redis-benchmark") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"benchmarks need {', '.join(missing)} on PATH")
    if len(os.sched_getaffinity(0)) < 2 or not {SERVER_CORE, LOAD_CORE} <= os.sched_getaffinity(0):
        raise SystemExit(f"benchmarks need cores {SERVER_CORE} and {LOAD_CORE} to pin to")


def machine_load(seconds: float = 1.0) -> float:
    """% of one core the whole machine was busy over ``seconds`` (this script is idle)."""
    before = machine_busy_seconds()
    time.sleep(seconds)
    return 100 * (machine_busy_seconds() - before) / seconds


def check_quiet(run: Run) -> None:
    """Other work on this 2-core box skews every figure: wait for it, or say it was there."""
    deadline = time.monotonic() + run.config.wait_quiet
    load = machine_load()
    while load > QUIET_PERCENT and time.monotonic() < deadline:
        say(f"machine busy ({load:.0f}% of a core in other processes); waiting")
        load = machine_load(2.0)
    run.machine["load_before_start_percent"] = round(load, 1)
    if load > QUIET_PERCENT:
        run.notes.append(
            f"other processes used {load:.0f}% of a core just before the run: "
            "figures are skewed; see 'unattributed' per phase"
        )


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def execute(run: Run) -> None:
    cfg = run.config
    processes = Processes(RESULTS / "logs")
    work = RESULTS / "work"
    work.mkdir(parents=True, exist_ok=True)
    phases = cfg.phases
    try:
        if "generator" in phases:
            generator_check(run, processes, work)
        redis, redis_port = start_redis(processes)
        if "redis" in phases:
            redis_benchmark(run, processes, redis, redis_port)
        if phases & {"wrk", "http", "reservations"}:
            say("starting the gateway")
            gateway, gport = start_gateway(processes, "gateway", redis_port, cfg.postgres_dsn)
            base = f"http://127.0.0.1:{gport}"
            wait_http(f"{base}/readyz", gateway, processes, "gateway")
            if phases & {"wrk", "reservations"}:
                ceiling, ceiling_port = start_ceiling(processes)
                paths1 = write_paths(work / "paths-1sku.txt", 1)
                targets = {"ceiling": Target(f"http://127.0.0.1:{ceiling_port}", None, paths1)}
                if "wrk" in phases:
                    seed(base)
                    paths20 = write_paths(work / "paths-20sku.txt", 20)
                    targets["avail_1"] = Target(base, KEYS["storefront"], paths1)
                    targets["avail_20"] = Target(base, KEYS["storefront"], paths20)
                if "reservations" in phases:
                    seed_reservations(base)
                    url, ttl = f"{base}/v1/reservations", cfg.reservation_ttl
                    for n in (1, 5):
                        bodies = write_reservation_bodies(work / f"bodies-{n}line.txt", n, ttl)
                        targets[f"res_{n}"] = Target(url, KEYS["storefront"], bodies=bodies)
                saturation(run, processes, targets, gateway.pid, redis_port)
                # Half-saturation latency: availability with "openloop", reservations always.
                latency = {
                    name: target
                    for name, target in targets.items()
                    if name == "ceiling" or name.startswith("res_") or "openloop" in phases
                }
                if len(latency) > 1:
                    open_loop(run, processes, latency)
                processes.stop(ceiling)
                if "reservations" in phases:
                    flash_sale(run, processes, base, gateway.pid, work)
            if "http" in phases:
                with redis_commandstats(run, "ingest http", redis_port):
                    ingest_http(run, processes, base, gateway.pid)
            processes.stop(gateway)
        if "kafka" in phases:
            with redis_commandstats(run, "ingest kafka", redis_port):
                ingest_kafka(run, processes, redis_port)
    finally:
        processes.stop_all()


def _json(value: object) -> object:
    if isinstance(value, frozenset | set):
        return sorted(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    check_tools()
    signal.signal(signal.SIGTERM, _terminate)
    pin_self({LOAD_CORE})
    os.chdir(ROOT)
    RESULTS.mkdir(parents=True, exist_ok=True)
    run = Run(config=cfg, machine=machine_info())
    check_quiet(run)
    started = time.perf_counter()
    run.deadline = time.monotonic() + cfg.retry_budget
    try:
        execute(run)
    except KeyboardInterrupt:
        say("interrupted; servers stopped")
        return 130
    build_rows(run)
    run.notes.append(f"run took {time.perf_counter() - started:.0f}s")
    json_path = RESULTS / "latest.json"
    data = asdict(run)
    del data["deadline"]
    json_path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=_json))
    print_report(run, json_path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
