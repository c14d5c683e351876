"""One run of every benchmark of the gateway, each figure printed beside its ceiling.

    .venv/bin/python -m benchmarks.run              # ~12 minutes
    .venv/bin/python -m benchmarks.run --quick      # ~4 minutes, shorter and smaller
    .venv/bin/python -m benchmarks.run --only orders,writer   # the order buffer and its writer
    .venv/bin/python -m benchmarks.run --only baseline,scaling   # vs PostgreSQL FOR UPDATE; workers

What it starts (all on loopback, all stopped at the end, Ctrl-C included): a private redis-server,
the plain aiohttp ceiling server (``benchmarks/ceiling.py``), the gateway (``python -m gateway
serve``), later a tansu Kafka broker and a second gateway that consumes it; for orders a gateway
without an ERP, for the writer the ERP simulator and a gateway per rate; for the baseline the
PostgreSQL ``SELECT ... FOR UPDATE`` server (``baseline_pg.py``) beside a gateway, for scaling a
gateway per ``--workers`` count. PostgreSQL must be
running already (``--postgres-dsn``, a database of the benchmark's own: the orders phases
truncate ``orders``). The server under test runs on core 0; wrk, the open-loop generator, the
ingest client, Redis, tansu and this script run on core 1.

Results: a table on stdout, the same as Markdown, and JSON in ``benchmarks/results/latest.json``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

import orjson

from benchmarks.baseline import baseline
from benchmarks.baseline_report import baseline_rows, scaling_rows
from benchmarks.ceilings import generator_check, redis_benchmark, start_ceiling
from benchmarks.common import (
    KEYS,
    LOAD_CORE,
    PYTHON,
    RESULTS,
    ROOT,
    SERVER_CORE,
    Run,
    say,
    start_gateway,
    start_redis,
    wait_http,
)
from benchmarks.erp_writer import erp_writer, writer_rows
from benchmarks.ingest import ingest_http
from benchmarks.kafka import ingest_kafka
from benchmarks.load import Target, write_paths
from benchmarks.measure import redis_commandstats
from benchmarks.options import parse_args
from benchmarks.orders import order_rows, orders, truncate_orders
from benchmarks.procs import Processes, machine_busy_seconds, pin_self
from benchmarks.report import build_rows, machine_info, print_report
from benchmarks.reservations import flash_sale, seed_reservations, write_reservation_bodies
from benchmarks.saturation import open_loop, saturation, seed
from benchmarks.scaling import scaling

QUIET_PERCENT = 15.0  # machine-wide CPU (of one core) above which another job is running


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
        if "orders" in phases:
            ceiling, ceiling_port = start_ceiling(processes)
            paths1 = write_paths(work / "paths-1sku.txt", 1)
            target = Target(f"http://127.0.0.1:{ceiling_port}", None, paths1)
            with redis_commandstats(run, "orders", redis_port):
                orders(run, processes, redis_port, target, work)
            processes.stop(ceiling)
        if "writer" in phases:
            erp_writer(run, processes)
        if "baseline" in phases:
            baseline(run, processes, redis_port, work)
        if "scaling" in phases:
            scaling(run, processes, redis, redis_port, work)
    finally:
        processes.stop_all()


def create_database(dsn: str) -> None:
    """Make the benchmark's database when it is not there yet."""
    import asyncio

    import asyncpg

    async def go() -> None:
        try:
            conn = await asyncpg.connect(dsn)
        except asyncpg.InvalidCatalogNameError:
            base, _, name = dsn.partition("?")[0].rpartition("/")
            admin = await asyncpg.connect(f"{base}/postgres")
            try:
                await admin.execute(f'CREATE DATABASE "{name}"')
            finally:
                await admin.close()
            say(f"made database {name!r}")
            return
        await conn.close()

    asyncio.run(go())


def _own(dsn: str) -> bool:
    """Whether ``dsn`` names a database of the benchmark's own (a name with 'bench' in it)."""
    return "bench" in dsn.rsplit("/", 1)[-1].split("?", 1)[0]


def migrate(dsn: str) -> None:
    """The orders phases truncate and fill ``orders``: only in a database of the benchmark's own.
    Its tables are made by the gateway's migrations first."""
    name = dsn.rsplit("/", 1)[-1].split("?", 1)[0]
    if not _own(dsn):
        raise SystemExit(
            f"the orders, writer and baseline benchmarks truncate tables of {name!r}: give "
            "--postgres-dsn a database of the benchmark's own (a name with 'bench' in it)"
        )
    create_database(dsn)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_POSTGRES_DSN"] = dsn
    out = subprocess.run(
        [PYTHON, "-m", "gateway", "migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        raise RuntimeError(f"gateway migrate failed:\n{out.stdout}\n{out.stderr}")


def _json(value: object) -> object:
    if isinstance(value, frozenset | set):
        return sorted(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv, __doc__)
    check_tools()
    if cfg.phases & {"orders", "writer", "baseline", "scaling"} or _own(cfg.postgres_dsn):
        migrate(cfg.postgres_dsn)  # refuses a database that is not the benchmark's own
        # A run starts from an empty buffer: orders an earlier run left would come back into
        # this run's fresh Redis as commitments (the gateway restores them from the outbox on
        # its own) and change the availability of the stock every phase seeds.
        truncate_orders(cfg.postgres_dsn)
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
    run.rows += order_rows(run) + writer_rows(run) + baseline_rows(run) + scaling_rows(run)
    run.notes.append(f"run took {time.perf_counter() - started:.0f}s")
    json_path = RESULTS / "latest.json"
    data = asdict(run)
    del data["deadline"]
    json_path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=_json))
    print_report(run, json_path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
