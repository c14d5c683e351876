"""``python -m loadtests SCENARIO``: one whole load run, headless, in bounded time.

Starts what is missing (Redis, PostgreSQL, the ERP simulator, the gateway), seeds stock, runs
Locust (several worker processes), samples the stack once a second, drains the buffer, checks
the invariants and writes the report folder. Exit status: 0 when every invariant holds, 1 when
one breaks (summary.md and the last lines printed say which), 2 when the run could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from loadtests.config import ENV_VAR, LimitChange, Limits, RunConfig
from loadtests.invariants import BROKEN, NOT_CHECKED, OK, Check, RunData, check_all
from loadtests.plots import plot_erp, plot_load
from loadtests.report import (
    orders,
    outcome_timeline,
    outcome_totals,
    read_jsonl,
    retry_after_stats,
    write_summary,
)
from loadtests.sampler import Sampler
from loadtests.scenarios import SCENARIOS, Scenario
from loadtests.seed import Seeded, order_positions, seed
from loadtests.shapes import SPIKE_AT
from loadtests.stack import GatewayOptions, LocalStack, SimOptions, StackError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/loadtest"
DEMO_KEYS = {"storefront": "demo-storefront", "feed": "demo-feed", "ops": "demo-ops"}
LOCUST_GRACE = 60.0  # beyond the duration: spawning, stopping, writing the report


def seconds(text: str) -> float:
    """``60``, ``60s``, ``2m``, ``1h`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    factor = units.get(text[-1:])
    value = float(text[:-1] if factor else text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value * (factor or 1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="./run loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--users", type=int, help="peak users (scenario default otherwise)")
    p.add_argument(
        "--spawn-rate", type=float, help="users started per second (default: all within 10 s)"
    )
    p.add_argument("--duration", type=seconds, help="e.g. 60s, 2m")
    p.add_argument("--host", help="a deployed gateway: no local stack, no simulator checks")
    p.add_argument(
        "--out", type=Path, help="report folder (default loadtests/results/<scenario>-<time>)"
    )
    p.add_argument("--processes", type=int, default=2, help="Locust worker processes (default 2)")
    p.add_argument("--hot-skus", type=int, help="flash sale: how many hot SKUs")
    p.add_argument("--hot-units", type=int, help="flash sale: units of each hot SKU")
    p.add_argument("--hot-location", default="DC-EAST")
    p.add_argument(
        "--think", type=float, nargs=2, metavar=("MIN", "MAX"), help="seconds between clicks"
    )
    p.add_argument(
        "--seed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="seed groups, safety stock and stock (default on; --no-seed for --host)",
    )
    p.add_argument(
        "--operator",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the operator changes the ERP limits mid-run (default on)",
    )
    p.add_argument("--feed-events-per-second", type=int)
    p.add_argument("--erp-rate", type=float, help="GATEWAY_ERP_RATE_PER_SECOND for the run")
    p.add_argument("--erp-burst", type=int, help="GATEWAY_ERP_BURST for the run")
    p.add_argument(
        "--erp-sim-rate-limit",
        type=int,
        help="the simulator's own limit (default: the highest rate + burst the run "
        "configures; lower it to see the ERP-rate invariant break)",
    )
    p.add_argument("--erp-sim-latency-ms", type=float)
    p.add_argument("--buffer-max-depth", type=int, help="GATEWAY_BUFFER_MAX_DEPTH for the run")
    p.add_argument("--drain-timeout", type=seconds)
    p.add_argument(
        "--gateway-workers",
        type=int,
        default=2,
        help="gateway processes on one port (GATEWAY_WORKERS, when supported)",
    )
    p.add_argument(
        "--postgres-dsn",
        default=os.environ.get("LOADTEST_POSTGRES_DSN", DEFAULT_DSN),
        help=f"its database is reset at start (default {DEFAULT_DSN})",
    )
    p.add_argument(
        "--force-reset", action="store_true", help="reset a database without 'load' in its name"
    )
    for role, key in DEMO_KEYS.items():
        p.add_argument(f"--{role}-key", default=key, help=f"with --host (default {key})")
    return p


def build_config(
    args: argparse.Namespace, scenario: Scenario, host: str, keys: dict[str, str], out: Path
) -> RunConfig:
    users = args.users or scenario.users
    duration = args.duration or scenario.duration_s
    rate = args.erp_rate or scenario.erp_rate
    base = Limits(
        rate_per_second=rate,
        burst=args.erp_burst or scenario.erp_burst,
        max_concurrency=scenario.erp_concurrency,
    )
    changes = []
    if args.operator:
        changes = [
            LimitChange(at=round(duration * scenario.lower_at, 1), rate_factor=scenario.lower_to),
            LimitChange(at=round(duration * scenario.restore_at, 1), rate_factor=1.0),
        ]
    hot = args.hot_skus if args.hot_skus is not None else scenario.hot_skus
    think = tuple(args.think) if args.think else scenario.think
    return RunConfig(
        scenario=args.scenario,
        shape=scenario.shape,
        host=host,
        users=users,
        spawn_rate=args.spawn_rate or max(1.0, users / scenario.ramp_s),
        duration_s=duration,
        out_dir=str(out),
        run_id=f"lt{uuid.uuid4().hex[:8]}",
        started_at=0.0,
        storefront_key=keys["storefront"],
        feed_key=keys["feed"],
        ops_key=keys["ops"],
        mix=scenario.mix,
        flow=scenario.flow,
        think_min_s=think[0],
        think_max_s=think[1],
        hot_skus=[f"FLASH-{n:02d}" for n in range(1, hot + 1)],
        hot_units=args.hot_units or scenario.hot_units,
        hot_location=args.hot_location,
        feed_users=scenario.feed_users,
        feed_events_per_second=args.feed_events_per_second or scenario.feed_events_per_second,
        operator=args.operator,
        erp_limits=base,
        limit_changes=changes,
    )


def limits_timeline(
    config: RunConfig, ops_rows: list[dict[str, Any]], end: float
) -> list[tuple[float, float, Limits]]:
    """(from, to, limits) in force: the start's until each change was answered; a change counts
    from when it was sent (either may be in force while the PUT is under way)."""
    spans: list[tuple[float, float, Limits]] = []
    current, since = config.erp_limits, 0.0
    for row in sorted(ops_rows, key=lambda r: r["sent"]):
        if row["status"] != 200:
            continue
        spans.append((since, row["answered"], current))
        current = Limits(
            rate_per_second=row["rate_per_second"],
            burst=row["burst"],
            max_concurrency=row["max_concurrency"],
        )
        since = row["sent"]
    spans.append((since, end + 3600, current))
    return spans


async def run_locust(config: RunConfig, processes: int, out: Path) -> int:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtests" / "locustfile.py"),
        "--headless",
        "--host",
        config.host,
        "--csv",
        str(out / "locust"),
        "--csv-full-history",
        "--html",
        str(out / "locust.html"),
        "--only-summary",
        "--exit-code-on-error",
        "0",
        "--loglevel",
        "WARNING",
    ]
    if processes > 1:
        command += ["--processes", str(processes)]
    env = {**os.environ, ENV_VAR: str(out / "config.json"), "PYTHONPATH": str(ROOT)}
    with (out / "locust.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True
        )
        try:
            return await asyncio.wait_for(proc.wait(), config.duration_s + LOCUST_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            return -9
        except BaseException:
            # Ctrl-C or a cancel: Locust runs in its own session, so it would outlive us.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise


async def drain(
    session: aiohttp.ClientSession,
    config: RunConfig,
    sim_url: str | None,
    acked: set[str],
    limit_s: float,
) -> tuple[bool, float]:
    """Wait until the buffer is empty and every acknowledged order is at the ERP (bounded)."""
    ops = {"Authorization": f"Bearer {config.ops_key}"}
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        try:
            async with session.get(f"{config.host}/v1/ops/erp", headers=ops) as resp:
                flow = await resp.json()
            empty = flow["buffer_depth"] == 0 and flow["in_flight"] == 0
            if empty and sim_url is None:
                return True, time.monotonic() - started
            if empty and sim_url is not None:
                async with session.get(f"{sim_url}/_sim/received") as resp:
                    got = {o["key"] for o in (await resp.json())["orders"]}
                if acked <= got:
                    return True, time.monotonic() - started
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
            pass
        await asyncio.sleep(0.5)
    return False, time.monotonic() - started


def run_check(code: int, config: RunConfig, died: list[str] | None) -> Check:
    """The run itself: Locust ended on its own within the bound, and nothing it drove died."""
    if code == -9:
        limit = config.duration_s + LOCUST_GRACE
        return Check("the run", BROKEN, f"Locust ran past {limit:g} s and was killed")
    if code != 0:
        return Check("the run", BROKEN, f"Locust exited with {code} (see locust.log)")
    if died:
        return Check("the run", BROKEN, f"died during the run: {died}")
    return Check("the run", OK, "Locust finished in time; the stack stayed up")


async def _get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        resp.raise_for_status()
        return await resp.json()


async def drive(
    args: argparse.Namespace,
    config: RunConfig,
    out: Path,
    stack: LocalStack | None,
    facts: dict[str, Any],
) -> int:
    scenario = SCENARIOS[args.scenario]
    sim_url = stack.sim_url if stack else None
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        seeded: Seeded | None = None
        if args.seed:
            seeded = await seed(session, config, sim_url)
        config = replace(config, started_at=time.time())
        config.write(out / "config.json")
        sampler = Sampler(
            session,
            config.host,
            config.ops_key,
            config.storefront_key,
            sim_url,
            order_positions(config),
            out / "samples.jsonl",
        )
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stop))
        try:
            code = await run_locust(config, args.processes, out)
            _, acked = orders(out)
            drained, drain_s = await drain(
                session, config, sim_url, acked, args.drain_timeout or scenario.drain_timeout_s
            )
        finally:
            stop.set()
            await sampling
        facts |= {"locust exit": code, "drained": f"{drained} in {drain_s:.1f} s"}
        received = ledger = per_second = None
        rejected_429 = None
        if sim_url is not None:
            got = await _get(session, f"{sim_url}/_sim/received")
            received, rejected_429 = got["orders"], got["rejected_429"]
            stock = await _get(session, f"{sim_url}/_sim/stock")
            ledger = {(i["sku"], i["location"]): int(i["on_hand"]) for i in stock["items"]}
            per_second = await _get(session, f"{sim_url}/_sim/per_second")
            facts |= {
                "ERP accepted": got["accepted"],
                "ERP duplicates": got["duplicates"],
                "ERP 429": got["rejected_429"],
                "ERP 503": got["errors_503"],
            }
        final_stock = await sampler.stock()
    if stack is not None and (dead := stack.alive()):
        facts["died during the run"] = dead
    attempted, acked = orders(out)
    outcome_rows = read_jsonl(out, "outcomes-")
    totals = outcome_totals(outcome_rows)
    ops_rows = read_jsonl(out, "ops-")
    limits = limits_timeline(config, ops_rows, time.time())
    data = RunData(
        local=stack is not None,
        seeded=seeded,
        sampled_violations=sampler.violations,
        samples=sampler.samples,
        final_stock=final_stock,
        attempted=attempted,
        acked=acked,
        received=received,
        ledger=ledger,
        per_second=per_second,
        rejected_429=rejected_429,
        limits=limits,
        outcomes=totals,
        drained=drained,
    )
    checks = check_all(data)
    checks.append(run_check(code, config, facts.get("died during the run")))
    samples = read_jsonl(out, "samples")
    timeline = outcome_timeline(outcome_rows)
    marks = [(c["sent"], f"limits -> {c['rate_per_second']:g}/s") for c in ops_rows]
    if config.shape == "promotion":
        marks.append((config.started_at + SPIKE_AT * config.duration_s, "the drop"))
    plots = [
        plot_load(out, config.started_at, timeline, marks),
        plot_erp(
            out,
            config.started_at,
            samples,
            per_second,
            limits,
            args.buffer_max_depth or scenario.buffer_max_depth if stack else None,
            marks,
        ),
    ]
    facts |= {"samples": sampler.samples, "samples missed": sampler.missed}
    summary = write_summary(
        out,
        config,
        checks,
        facts=facts,
        totals=totals,
        waits=retry_after_stats(outcome_rows),
        timeline=timeline,
        samples=samples,
        per_second=per_second,
        received=received,
        plots=plots,
    )
    for check in checks:
        print(f"{check.status:>11}  {check.name}: {check.detail}")
    print(f"report: {summary}")
    (out / "invariants.json").write_text(json.dumps([c.__dict__ for c in checks], indent=2))
    broken = [c for c in checks if c.status not in ("ok", NOT_CHECKED)]
    return 1 if broken else 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out: Path = (args.out or ROOT / "loadtests" / "results" / f"{args.scenario}-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.jsonl"), *out.glob("locust*")]:
        stale.unlink()  # a reused folder: the users append, so start their files afresh
    stack: LocalStack | None = None
    facts: dict[str, Any] = {"Locust processes": args.processes}
    try:
        if args.host:
            keys = {role: getattr(args, f"{role}_key") for role in DEMO_KEYS}
            config = build_config(args, scenario, args.host.rstrip("/"), keys, out)
            config = replace(config, local_stack=False)
            facts["gateway"] = f"deployed at {args.host}"
        else:
            stack = LocalStack(out)
            provisional = build_config(args, scenario, "", DEMO_KEYS, out)
            caps = [c.applied_to(provisional.erp_limits) for c in provisional.limit_changes]
            caps.append(provisional.erp_limits)
            sim_limit = args.erp_sim_rate_limit
            if sim_limit is None:
                sim_limit = math.ceil(max(lim.per_second_cap for lim in caps))
            stack.start(
                args.postgres_dsn,
                SimOptions(
                    rate_limit_per_second=sim_limit,
                    latency_ms=args.erp_sim_latency_ms
                    if args.erp_sim_latency_ms is not None
                    else scenario.sim_latency_ms,
                    latency_jitter_ms=scenario.sim_jitter_ms,
                ),
                GatewayOptions(
                    workers=args.gateway_workers,
                    rate_per_second=provisional.erp_limits.rate_per_second,
                    burst=provisional.erp_limits.burst,
                    max_concurrency=provisional.erp_limits.max_concurrency,
                    buffer_max_depth=args.buffer_max_depth or scenario.buffer_max_depth,
                ),
                force_reset=args.force_reset,
            )
            config = replace(
                provisional,
                host=stack.gateway_url,
                storefront_key=stack.keys["storefront"],
                feed_key=stack.keys["feed"],
                ops_key=stack.keys["ops"],
            )
            facts |= {
                "gateway processes": stack.workers,
                "ERP simulator limit": f"{sim_limit}/s",
                "buffer max depth": args.buffer_max_depth or scenario.buffer_max_depth,
            }
        return asyncio.run(drive(args, config, out, stack, facts))
    except StackError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    finally:
        if stack is not None:
            stack.stop()
