"""The gateway side by side with the baseline a retailer would otherwise build
(``baseline_pg.py``: aiohttp + asyncpg, ``SELECT ... FOR UPDATE``), same client, same concurrency,
same pinning: each server on the server core, wrk (``-c64 -t1``) on the load core with Redis and
PostgreSQL's backends.

Figures, each measured for the gateway and then for the baseline:

- ``avail_1``: ``GET /v1/availability`` of 1 SKU, cycling over 1,000 seeded SKUs;
- ``res_1``: ``POST /v1/reservations`` of 1 unit of one of 1,000 SKUs with ample stock (plain
  traffic: little contention);
- ``hot``: every request reserving 1 unit of the same SKU with ample stock: every answer a 201,
  every reservation contending for one position (hot-SKU traffic);
- ``flash``: a fresh SKU with 100 units per wrk run, every request reserving 1: 100 201s, then
  409s; checked for oversell after each run exactly as the gateway's flash sale is.

plus the ceilings of the same run: the plain aiohttp handler (measured here unless an earlier
phase did) and PostgreSQL's one-row-INSERT commit rate over the baseline's pool size
(``pg_ceiling.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks import baseline_pg
from benchmarks.ceilings import start_ceiling
from benchmarks.common import (
    FLASH_UNITS,
    KEYS,
    LOAD_CORE,
    LOCATION,
    PYTHON,
    RESERVATION_STOCK,
    SEED_SKUS,
    SERVER_CORE,
    Run,
    availability,
    say,
    snapshot,
    start_gateway,
    wait_http,
)
from benchmarks.load import Target, run_generator, run_wrk, write_paths
from benchmarks.measure import attempts
from benchmarks.noise import KernelShare
from benchmarks.orders import PostgresCpu
from benchmarks.procs import CpuReport, Processes
from benchmarks.reservations import (
    reservation_sku,
    reservations_held,
    seed_reservations,
    write_bodies,
    write_reservation_bodies,
)
from benchmarks.saturation import saturation, seed
from gateway.dev.services import free_port

HOT_SKU = "HOT-AMPLE"  # the hot SKU with ample stock: every request a 201
SERVERS = ("gateway", "baseline")
FIGURES = ("avail_1", "res_1", "hot")
# Pinned to the load core but part of the systems under test: a load core full of them is the
# system's limit on these two cores, not a disturbance (``measure.load_core_percent``).
SYSTEM = ("postgres", "redis")


# --- seeding both servers with the same stock --------------------------------------------------
def seed_gateway(base: str) -> None:
    """The seeded SKUs, unless an earlier phase of this run (same Redis) seeded them already:
    seeding twice would be refused as duplicate events."""
    seed(base)
    seed_reservations(base)
    if availability(base, HOT_SKU)["on_hand"] != RESERVATION_STOCK:
        snapshot(base, {HOT_SKU: RESERVATION_STOCK}, "hot-ample")


async def _seed_baseline(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await baseline_pg.reset(conn)
        await baseline_pg.set_stock(
            conn, LOCATION, {f"SKU-{i:05d}": 100 + i for i in range(SEED_SKUS)}
        )
        stock = {reservation_sku(i): RESERVATION_STOCK for i in range(SEED_SKUS)}
        await baseline_pg.set_stock(conn, LOCATION, {**stock, HOT_SKU: RESERVATION_STOCK})
        await conn.execute("ANALYZE baseline_positions")
    finally:
        await conn.close()


async def _aux_pids(conn: asyncpg.Connection) -> list[int]:
    """PostgreSQL's own processes (WAL writer, checkpointer, ...): they work for the run."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE backend_type <> 'client backend'"
    )
    return [int(r[0]) for r in rows]


class Attribution:
    """Before each measurement: PostgreSQL's backends pinned to the load core and counted as
    ``postgres``; the kernel's work for the run (fsyncs, loopback) and PostgreSQL's own
    processes told from other people's work (``noise.py``)."""

    def __init__(self, run: Run) -> None:
        self.dsn = run.config.postgres_dsn
        self.pg = PostgresCpu(self.dsn)
        self.noise = KernelShare(lambda: _sql(self.dsn, _aux_pids))

    def begin(self) -> None:
        self.pg.begin()
        self.noise.begin()

    def attribute(self, report: CpuReport) -> None:
        self.pg.attribute(report)
        self.noise.attribute(report)


def _sql(dsn: str, work: Callable[[asyncpg.Connection], Any]) -> Any:
    async def go() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


# --- the ceilings ------------------------------------------------------------------------------
def ensure_ceiling(run: Run, processes: Processes, work: Path) -> None:
    """The plain aiohttp ceiling of this run, unless an earlier phase measured it."""
    if "ceiling" in run.saturation:
        return
    ceiling, port = start_ceiling(processes)
    try:
        paths = write_paths(work / "paths-1sku.txt", 1)
        target = Target(f"http://127.0.0.1:{port}", None, paths)
        saturation(run, processes, {"ceiling": target}, ceiling.pid, 0)
    finally:
        processes.stop(ceiling)


def pg_ceiling(run: Run, processes: Processes) -> None:
    """One-row INSERT commits/s over the baseline's pool size, client on the server core."""
    cfg = run.config
    last: dict[str, Any] = {}
    argv = [
        "taskset",
        "-c",
        str(SERVER_CORE),
        PYTHON,
        "-m",
        "benchmarks.pg_ceiling",
        "--dsn",
        cfg.postgres_dsn,
        "--connections",
        str(cfg.baseline_pool),
        "--duration",
        str(min(cfg.duration, 5.0)),
        "--warmup",
        "1",
        "--backend-core",
        str(LOAD_CORE),
    ]

    def measure() -> dict[str, Any]:
        last.clear()
        last.update(run_generator(argv, min(cfg.duration, 5.0) + 1))
        return dict(last)

    noise = Attribution(run)

    def attribute(report: CpuReport) -> None:
        # Its backends are the server here, not noise; its client runs on the server core (a
        # waited-for child: counted as load generator), so it is not noise there either.
        moved = last.get("postgres_cpu_percent", 0.0)
        report.percent["postgres"] = moved
        report.percent["unattributed"] = report.percent.get("unattributed", 0.0) - moved
        client = last.get("client_cpu_percent", 0.0)
        others = report.percent.get("server core, others", 0.0)
        report.percent["server core, others"] = max(0.0, others - client)
        noise.noise.attribute(report)

    result = attempts(
        run,
        processes,
        "postgres insert ceiling",
        "postgres",
        False,
        measure,
        noise.begin,
        attribute,
    )
    run.baseline["pg_ceiling"] = result
    say(
        f"PostgreSQL one-row INSERT per commit, {cfg.baseline_pool} connections: "
        f"{result['rows_per_s']:,.0f} rows/s (client {result['client_cpu_percent']:.0f}%, "
        f"backends {result['postgres_cpu_percent']:.0f}% of a core)"
    )


# --- the phase ---------------------------------------------------------------------------------
def baseline(run: Run, processes: Processes, redis_port: int, work: Path) -> None:
    cfg = run.config
    dsn = cfg.postgres_dsn
    ensure_ceiling(run, processes, work)
    pg_ceiling(run, processes)
    asyncio.run(_seed_baseline(dsn))
    say("starting the gateway and the PostgreSQL baseline")
    gateway, gport = start_gateway(processes, "gateway", redis_port, dsn)
    gw = f"http://127.0.0.1:{gport}"
    wait_http(f"{gw}/readyz", gateway, processes, "gateway")
    bport = free_port()
    server = processes.start(
        "baseline",
        [
            PYTHON,
            "-m",
            "benchmarks.baseline_pg",
            "--port",
            str(bport),
            "--dsn",
            dsn,
            "--pool-size",
            str(cfg.baseline_pool),
            "--api-key",
            KEYS["storefront"],
        ],
        cores={SERVER_CORE},
    )
    bl = f"http://127.0.0.1:{bport}"
    wait_http(f"{bl}/healthz", server, processes, "baseline server")
    seed_gateway(gw)
    pg = Attribution(run)
    paths = write_paths(work / "paths-1sku.txt", 1)
    res_bodies = write_reservation_bodies(work / "bodies-1line.txt", 1, cfg.reservation_ttl)
    hot_bodies = write_bodies(work / "bodies-hot.txt", [[HOT_SKU]], cfg.reservation_ttl)
    bases = {"gateway": gw, "baseline": bl}
    key = KEYS["storefront"]
    # Rounds interleave the two servers, so a noisy minute hurts both alike; medians are kept.
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for round_no in range(1, cfg.rounds + 1):
        for figure in FIGURES:
            for name in SERVERS:
                base = bases[name]
                if figure == "avail_1":
                    target = Target(base, key, paths)
                else:
                    bodies = res_bodies if figure == "res_1" else hot_bodies
                    target = Target(f"{base}/v1/reservations", key, bodies=bodies)
                phase = f"{figure} {name} #{round_no}"
                result = _saturate(run, processes, pg, phase, name, target)
                samples.setdefault(figure, {}).setdefault(name, []).append(result)
    for figure, by_server in samples.items():
        run.baseline[figure] = {name: median_of(results) for name, results in by_server.items()}
    for name in SERVERS:
        run.baseline.setdefault("flash", {})[name] = flash(
            run, processes, pg, name, bases[name], work
        )
    processes.stop(server)
    processes.stop(gateway)


def median_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds of one server and figure: median rate and p99, errors and noise of any."""
    summary = (
        dict(results[0])
        if len(results) == 1
        else {
            "requests_per_s": statistics.median(r["requests_per_s"] for r in results),
            "p50_ms": statistics.median(r["p50_ms"] for r in results),
            "p99_ms": statistics.median(r["p99_ms"] for r in results),
            "errors": sum(r["errors"] for r in results),
        }
    )
    for key in (
        "server_cpu_us_per_request",
        "postgres_cpu_us_per_request",
        "redis_cpu_us_per_request",
    ):
        if len(results) > 1 and all(key in r for r in results):
            summary[key] = statistics.median(r[key] for r in results)
    if any(r.get("disturbed") for r in results):
        summary["disturbed"] = "; ".join(r["disturbed"] for r in results if r.get("disturbed"))
    summary["rounds"] = [
        {k: r[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "errors") if k in r}
        for r in results
    ]
    return summary


def _saturate(
    run: Run, processes: Processes, pg: Attribution, phase: str, server: str, target: Target
) -> dict[str, Any]:
    cfg = run.config

    def warm() -> None:
        if cfg.warmup > 0:
            run_wrk(target, cfg.warmup, f"{phase}-warm".replace(" ", "-"))
        pg.begin()

    def measure() -> dict[str, Any]:
        return run_wrk(target, cfg.duration, phase.replace(" ", "-"))

    result = attempts(
        run, processes, f"baseline {phase}", server, True, measure, warm, pg.attribute, SYSTEM
    )
    cpu = run.cpu.get(f"baseline {phase}", {})
    for process in (server, "postgres", "redis"):
        if result["requests_per_s"] > 0 and process in cpu:
            label = "server" if process == server else process
            result[f"{label}_cpu_us_per_request"] = round(
                cpu[process] / 100 / result["requests_per_s"] * 1e6, 1
            )
    say(
        f"{phase}: {result['requests_per_s']:,.0f} req/s, p99 {result['p99_ms']:.1f} ms, "
        f"errors {result['errors']}"
    )
    return result


def flash(
    run: Run, processes: Processes, pg: Attribution, name: str, base: str, work: Path
) -> dict[str, Any]:
    """The flash sale of ``reservations.flash_sale`` against either server: a fresh SKU with
    FLASH_UNITS units per wrk run, then proof of no oversell after each run."""
    cfg = run.config
    numbers = itertools.count(1)
    checks: list[dict[str, Any]] = []

    def held(sku: str) -> int:
        if name == "gateway":
            return round(reservations_held(base))
        return int(_sql(cfg.postgres_dsn, lambda c: baseline_pg.held_units(c, sku, LOCATION)))

    def race(duration: float, tag: str) -> dict[str, Any]:
        sku = f"FLASH-{name[:2].upper()}-{next(numbers):03d}"
        if name == "gateway":
            snapshot(base, {sku: FLASH_UNITS}, "flash")
            before = held(sku)
        else:
            _sql(cfg.postgres_dsn, lambda c: baseline_pg.set_stock(c, LOCATION, {sku: FLASH_UNITS}))
            before = 0
        bodies = write_bodies(work / f"bodies-{sku}.txt", [[sku]], cfg.reservation_ttl)
        target = Target(f"{base}/v1/reservations", KEYS["storefront"], bodies=bodies)
        result = run_wrk(target, duration, f"flash-{name}-{tag}")
        time.sleep(0.3)  # wrk may close connections with requests in flight
        item = availability(base, sku)
        holds = held(sku) - before
        check = {
            "run": tag,
            "sku": sku,
            "on_hand": item["on_hand"],
            "reserved": item["reserved"],
            "status_201": result["status_201"],
            "holds_counted": holds,
            "oversold": max(
                0, item["reserved"] - item["on_hand"], result["status_201"] - FLASH_UNITS
            ),
            "consistent": result["status_201"] <= holds == item["reserved"],
        }
        checks.append(check)
        result["check"] = check
        result["errors"] = result["status_other"] + result["socket_errors"]
        return result

    def warm() -> None:
        if cfg.warmup > 0:
            race(cfg.warmup, "warm")
        pg.begin()

    result = attempts(
        run,
        processes,
        f"baseline flash {name}",
        name,
        True,
        lambda: race(cfg.duration, "measure"),
        warm,
        pg.attribute,
        SYSTEM,
    )
    worst = max(checks, key=lambda c: (c["oversold"], not c["consistent"]))
    result.update(
        oversold_max=worst["oversold"],
        all_consistent=all(c["consistent"] for c in checks),
        runs_checked=checks,
        units=FLASH_UNITS,
    )
    check = result["check"]
    say(
        f"flash sale {name}: {result['requests_per_s']:,.0f} req/s, p99 {result['p99_ms']:.1f} "
        f"ms, 201s {check['status_201']}, reserved {check['reserved']} of {check['on_hand']}; "
        f"oversold {worst['oversold']} over {len(checks)} run(s)"
    )
    return result
