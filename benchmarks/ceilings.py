"""The ceilings every figure is compared with: the plain aiohttp server (``ceiling.py``) and
Redis' own EVALSHA rate; and the check of the open-loop generator against the ceiling."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.common import LOAD_CORE, PYTHON, SERVER_CORE, Run, say, wait_http
from benchmarks.load import Target, run_openloop, write_paths
from benchmarks.measure import attempts
from benchmarks.procs import Processes, Started
from gateway.dev.services import free_port


def start_ceiling(processes: Processes) -> tuple[Started, int]:
    port = free_port()
    proc = processes.start(
        "ceiling", [PYTHON, "-m", "benchmarks.ceiling", str(port)], cores={SERVER_CORE}
    )
    wait_http(f"http://127.0.0.1:{port}/healthz", proc, processes, "ceiling server")
    return proc, port


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
