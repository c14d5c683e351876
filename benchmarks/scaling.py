"""Scaling: availability and reservations with 1, 2, ... gateway workers (``GATEWAY_WORKERS=N``:
N processes on one port by ``SO_REUSEPORT`` under a supervising parent), wrk ``-c64 -t1`` as
everywhere else.

Pinning: 1 worker sits on the server core as in every other phase. N > 1 workers get cores
0..N-1 and the load (wrk, Redis, this script) moves to the cores above them when the machine
has more than N cores; on a machine with N cores or fewer (2 workers here) the gateway is not
pinned at all and shares every core with the load generator and Redis, which the table says.
The workers' CPU is counted with the parent's (they are its children), so a run counts as
disturbed only by work outside the gateway, wrk and Redis.

    python -m benchmarks.run --only scaling --workers 1,2,4      # on a machine with >= 5 cores
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.baseline import ensure_ceiling, median_of, seed_gateway
from benchmarks.common import KEYS, LOAD_CORE, SERVER_CORE, Run, say, start_gateway, wait_http
from benchmarks.load import Target, run_wrk, write_paths
from benchmarks.measure import attempts
from benchmarks.noise import KernelShare
from benchmarks.procs import CpuReport, Processes, Started, descendants, process_cpu_seconds
from benchmarks.reservations import write_reservation_bodies


def split(workers: int, cores: int) -> tuple[set[int], set[int], bool]:
    """Server cores, load cores, and whether the two are apart."""
    if workers == 1:
        return {SERVER_CORE}, {LOAD_CORE}, True
    if cores > workers:
        return set(range(workers)), set(range(workers, cores)), True
    return set(range(cores)), {LOAD_CORE}, False


class TreeCpu:
    """The CPU of a gateway's workers (children of the started parent): ``cpu_phase`` sees only
    the parent, so their share is moved from ``unattributed`` to the gateway's name."""

    def __init__(self, name: str, parent: int, apart: bool) -> None:
        self.name, self.parent, self.apart = name, parent, apart
        self.noise = KernelShare()
        self.pids: list[int] = []
        self._start = 0.0

    def seconds(self) -> float:
        return sum(process_cpu_seconds(pid) for pid in self.pids)

    def begin(self) -> None:
        self.pids = descendants(self.parent)
        self._start = self.seconds()
        self.noise.begin()

    def attribute(self, report: CpuReport) -> None:
        if report.wall_s <= 0:
            return
        percent = 100 * (self.seconds() - self._start) / report.wall_s
        report.percent[self.name] = report.percent.get(self.name, 0.0) + percent
        report.percent["unattributed"] = report.percent.get("unattributed", 0.0) - percent
        if not self.apart:
            # The gateway runs on the server core too: what else ran there is not measurable.
            report.percent.pop("server core, others", None)
        self.noise.attribute(report)


def _wait_workers(gateway: Started, workers: int, timeout: float = 60.0) -> None:
    """Until the parent has its workers (each is a fresh interpreter: seconds to start)."""
    if workers == 1:
        return
    deadline = time.monotonic() + timeout
    while len(descendants(gateway.pid)) < workers:
        if time.monotonic() > deadline or gateway.proc.poll() is not None:
            raise RuntimeError(f"the gateway did not start {workers} workers")
        time.sleep(0.2)


def scaling(run: Run, processes: Processes, redis: Started, redis_port: int, work: Path) -> None:
    cfg = run.config
    ensure_ceiling(run, processes, work)  # the table's ratios: this run's aiohttp ceiling
    paths = write_paths(work / "paths-1sku.txt", 1)
    bodies = write_reservation_bodies(work / "bodies-1line.txt", 1, cfg.reservation_ttl)
    key = KEYS["storefront"]
    total = os.cpu_count() or 1
    for n in cfg.workers:
        server_cores, load_cores, apart = split(n, total)
        name = f"gateway-{n}w"
        say(f"starting the gateway with {n} worker(s) on cores {sorted(server_cores)}")
        gateway, port = start_gateway(
            processes,
            name,
            redis_port,
            cfg.postgres_dsn,
            {"GATEWAY_WORKERS": str(n)},
            cores=server_cores,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{base}/readyz", gateway, processes, name, timeout=60)
            _wait_workers(gateway, n)
            time.sleep(1.0)  # the last worker to bind: let it finish its start-up
            seed_gateway(base)
            os.sched_setaffinity(0, load_cores)
            os.sched_setaffinity(redis.pid, load_cores)
            tree = TreeCpu(name, gateway.pid, apart)
            figures = {
                "avail_1": Target(base, key, paths),
                "res_1": Target(f"{base}/v1/reservations", key, bodies=bodies),
            }
            samples: dict[str, list[dict[str, Any]]] = {figure: [] for figure in figures}
            for round_no in range(1, cfg.rounds + 1):
                for figure, target in figures.items():
                    phase = f"scaling {figure} {n}w #{round_no}"
                    samples[figure].append(_measure(run, processes, tree, phase, target, n))
            for figure, results in samples.items():
                result = median_of(results)
                result["gateway_cpu_percent"] = statistics.median(
                    r["gateway_cpu_percent"] for r in results
                )
                result["server_cores"] = sorted(server_cores)
                result["load_cores"] = sorted(load_cores)
                result["apart"] = apart
                run.scaling.setdefault(figure, {})[str(n)] = result
        finally:
            os.sched_setaffinity(0, {LOAD_CORE})
            if redis.proc.poll() is None:
                os.sched_setaffinity(redis.pid, {LOAD_CORE})
            processes.stop(gateway, timeout=20)


def _measure(
    run: Run, processes: Processes, tree: TreeCpu, phase: str, target: Target, workers: int
) -> dict[str, Any]:
    cfg = run.config

    def warm() -> None:
        if cfg.warmup > 0:
            run_wrk(target, cfg.warmup, f"{phase}-warm".replace(" ", "-"))
        tree.begin()

    def measure() -> dict[str, Any]:
        return run_wrk(target, cfg.duration, phase.replace(" ", "-"))

    # One pinned worker should fill its core; N workers share cores with wrk and Redis here,
    # so only work outside them counts as a disturbance.
    result = attempts(run, processes, phase, tree.name, workers == 1, measure, warm, tree.attribute)
    result["gateway_cpu_percent"] = run.cpu.get(phase, {}).get(tree.name, float("nan"))
    say(
        f"{phase}: {result['requests_per_s']:,.0f} req/s, p99 {result['p99_ms']:.1f} ms, "
        f"gateway CPU {result['gateway_cpu_percent']:.0f}% of a core, errors {result['errors']}"
    )
    return result
