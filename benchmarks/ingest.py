"""Ingest over HTTP: ``ingest_http.py`` posts pre-built batches; applied events per second."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from benchmarks.common import KEYS, PYTHON, ROOT, Run, say
from benchmarks.load import profiled
from benchmarks.measure import flag_disturbed, per_event, record_cpu
from benchmarks.procs import Processes, cpu_phase, process_cpu_seconds


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
