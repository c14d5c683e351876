"""Availability (and reservation) throughput at saturation by wrk, then latency by the open-loop
generator at half of each one's saturation rate."""

from __future__ import annotations

import math
import statistics
from typing import Any

from benchmarks.common import SEED_SKUS, Run, availability, say, snapshot
from benchmarks.load import Target, profiled, run_openloop, run_wrk
from benchmarks.measure import attempts, redis_commandstats
from benchmarks.procs import Processes


def seed(base: str) -> None:
    """The availability SKUs' stock, unless an earlier phase of the run seeded this Redis."""
    if availability(base, "SKU-00007")["on_hand"] == 107:
        return
    snapshot(base, {f"SKU-{i:05d}": 100 + i for i in range(SEED_SKUS)}, "seed")
    if availability(base, "SKU-00007")["on_hand"] != 107:
        raise RuntimeError("availability check after seeding failed")


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
