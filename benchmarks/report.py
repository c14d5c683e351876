"""The printed report: the targets, one row per figure beside its ceiling, the text and Markdown
tables, the machine it ran on."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.common import (
    FLASH_UNITS,
    LOAD_CORE,
    LOCATION,
    RESERVATION_STOCK,
    SEED_SKUS,
    SERVER_CORE,
    Row,
    Run,
)

# The targets.
TARGET_RATIO_1 = 0.60
TARGET_RATIO_20 = 0.35
TARGET_P99_MS = 10.0
TARGET_KAFKA = 50_000
TARGET_HTTP = 30_000
TARGET_RES_RATIO_1 = 0.40
TARGET_RES_RATIO_5 = 0.30
TARGET_RES_P99_MS = 15.0


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
