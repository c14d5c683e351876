"""Read what the users and the sampler wrote, and write ``summary.md``.

The summary: the run's parameters and machine, per endpoint requests/s and p50/p95/p99 (Locust's
stats), every answer by status and problem ``code`` (allowed or not), Locust's failures, a
timeline in 5-second steps (users, answers/s, p95, 503s, buffer depth, ERP calls/s), the ERP
side, the flash sale's sold units per hot SKU, and the invariants.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from loadtests.config import RunConfig
from loadtests.contract import allowed
from loadtests.invariants import Check, sold_by_erp


def read_jsonl(out: Path, prefix: str) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(out.glob(f"{prefix}*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def outcome_totals(rows: list[dict[str, Any]]) -> Counter[tuple[str, int, str]]:
    totals: Counter[tuple[str, int, str]] = Counter()
    for r in rows:
        totals[r["endpoint"], int(r["status"]), r["code"]] += int(r["n"])
    return totals


def retry_after_stats(
    rows: list[dict[str, Any]],
) -> dict[tuple[str, int, str], tuple[float, float]]:
    """Per (endpoint, status, code): the mean and the largest ``Retry-After`` seen."""
    sums: dict[tuple[str, int, str], list[float]] = {}
    for r in rows:
        if "ra_sum" in r:
            got = sums.setdefault((r["endpoint"], int(r["status"]), r["code"]), [0.0, 0.0, 0.0])
            got[0] += float(r["ra_sum"])
            got[1] = max(got[1], float(r["ra_max"]))
            got[2] += int(r["n"])
    return {k: (v[0] / v[2], v[1]) for k, v in sums.items() if v[2]}


def outcome_timeline(rows: list[dict[str, Any]]) -> dict[int, dict[str, int]]:
    """Per second: answers by class (2xx, 409, 503, failed: not allowed)."""
    timeline: dict[int, Counter[str]] = defaultdict(Counter)
    for r in rows:
        status, n = int(r["status"]), int(r["n"])
        if not allowed(r["endpoint"], status, r["code"]):
            cls = "failed"
        elif status < 300:
            cls = "2xx"
        else:
            cls = str(status)
        timeline[int(r["t"])][cls] += n
    return {s: dict(c) for s, c in timeline.items()}


def orders(out: Path) -> tuple[set[str], set[str]]:
    attempted, acked = set(), set()
    for row in read_jsonl(out, "orders-"):
        if "a" in row:
            attempted.add(row["a"])
        if "k" in row:
            acked.add(row["k"])
    return attempted, acked


def _csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _f(value: str | None, digits: int = 1) -> str:
    try:
        return f"{float(value or 'nan'):.{digits}f}"
    except ValueError:
        return str(value)


def _endpoint_table(out: Path) -> list[str]:
    lines = [
        "| endpoint | requests | failures | req/s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in _csv(out / "locust_stats.csv"):
        name = row.get("Name") or row.get("Type", "")
        lines.append(
            f"| {name} | {row['Request Count']} | {row['Failure Count']} | "
            f"{_f(row['Requests/s'])} | {row['50%']} | {row['95%']} | {row['99%']} | "
            f"{_f(row['Max Response Time'], 0)} |"
        )
    return lines


def _outcome_table(
    totals: Counter[tuple[str, int, str]],
    waits: dict[tuple[str, int, str], tuple[float, float]],
) -> list[str]:
    lines = [
        "| endpoint | status | code | answers | allowed | Retry-After s (mean / max) |",
        "|---|---:|---|---:|---|---|",
    ]
    for key, n in sorted(totals.items()):
        endpoint, status, code = key
        verdict = "yes" if allowed(endpoint, status, code) else "**NO**"
        wait = f"{waits[key][0]:.1f} / {waits[key][1]:g}" if key in waits else "-"
        lines.append(f"| {endpoint} | {status} | {code or '-'} | {n} | {verdict} | {wait} |")
    return lines


def _findings(
    t0: float,
    totals: Counter[tuple[str, int, str]],
    timeline: dict[int, dict[str, int]],
    samples: list[dict[str, Any]],
    out: Path,
) -> list[str]:
    """What the gateway did under the load, in a few lines: when latency peaked, when the
    buffer pushed back and how, and whether anything failed outright."""
    lines = []
    history = [r for r in _csv(out / "locust_stats_history.csv") if r.get("Name") == "Aggregated"]
    p95 = [(float(r["Timestamp"]), float(r["95%"])) for r in history if r["95%"] not in ("", "N/A")]
    if p95:
        when, worst = max(p95, key=lambda x: x[1])
        calm = sorted(v for _, v in p95)[len(p95) // 2]
        lines.append(
            f"- latency: p95 (Locust's 10 s window) peaked at {worst:g} ms at t = "
            f"{when - t0:.0f} s; its median over the run was {calm:g} ms"
        )
    full = sorted(s for s, c in timeline.items() if c.get("503"))
    rejected = sum(n for (_, status, code), n in totals.items() if status == 503)
    if full:
        depths = [
            s["erp"]["buffer_depth"] for s in samples if s.get("erp") and abs(s["t"] - full[0]) < 2
        ]
        lines.append(
            f"- back-pressure: the first 503 at t = {full[0] - t0:.0f} s (buffer depth "
            f"{max(depths) if depths else '?'}), the last at t = {full[-1] - t0:.0f} s: "
            f"{rejected} answers 503, each with Retry-After (the contract check says if not)"
        )
    else:
        lines.append("- back-pressure: no 503 (the buffer never reached its maximum)")
    deepest = max((s["erp"]["buffer_depth"] for s in samples if s.get("erp")), default=0)
    lines.append(f"- deepest buffer sampled: {deepest} orders")
    failed = sum(n for (e, st, c), n in totals.items() if not allowed(e, st, c))
    errors = sum(n for (_, st, _), n in totals.items() if st == 0 or (st >= 500 and st != 503))
    lines.append(
        f"- answers the contract does not allow: {failed}; 5xx other than 503 and "
        f"connection errors or timeouts: {errors}"
    )
    return lines


def _failure_table(out: Path) -> list[str]:
    rows = _csv(out / "locust_failures.csv")
    if not rows:
        return ["None: Locust counted no failure."]
    lines = ["| method | name | error | occurrences |", "|---|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['Method']} | {r['Name']} | {r['Error']} | {r['Occurrences']} |")
    return lines


def _timeline(
    out: Path,
    t0: float,
    timeline: dict[int, dict[str, int]],
    samples: list[dict[str, Any]],
    per_second: dict[str, Any] | None,
    step: int = 5,
) -> list[str]:
    history = [r for r in _csv(out / "locust_stats_history.csv") if r.get("Name") == "Aggregated"]
    arrivals = {int(k): int(v) for k, v in (per_second or {}).get("requests", {}).items()}
    end = max([*timeline, *(int(s["t"]) for s in samples), int(t0)])
    lines = [
        "| t (s) | users | answers/s | 409/s | 503/s | failed/s | p95 ms | buffer depth "
        "| ERP calls/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for start in range(int(t0), end + 1, step):
        secs = range(start, start + step)
        got = [timeline.get(s, {}) for s in secs]
        total = sum(sum(g.values()) for g in got) / step
        c409 = sum(g.get("409", 0) for g in got) / step
        c503 = sum(g.get("503", 0) for g in got) / step
        failed = sum(g.get("failed", 0) for g in got) / step
        hist = [r for r in history if start <= float(r["Timestamp"]) < start + step]
        users = hist[-1]["User Count"] if hist else "-"
        p95 = hist[-1]["95%"] if hist else "-"
        depth = [
            s["erp"]["buffer_depth"]
            for s in samples
            if s.get("erp") and start <= s["t"] < start + step
        ]
        erp = sum(arrivals.get(s, 0) for s in secs) / step
        lines.append(
            f"| {start - int(t0)} | {users} | {total:.0f} | {c409:.1f} | {c503:.1f} | "
            f"{failed:.1f} | {p95} | {max(depth) if depth else '-'} | {erp:.1f} |"
        )
    return lines


def write_summary(
    out: Path,
    config: RunConfig,
    checks: list[Check],
    *,
    facts: dict[str, Any],
    totals: Counter[tuple[str, int, str]],
    waits: dict[tuple[str, int, str], tuple[float, float]],
    timeline: dict[int, dict[str, int]],
    samples: list[dict[str, Any]],
    per_second: dict[str, Any] | None,
    received: list[dict[str, Any]] | None,
    plots: list[Path],
) -> Path:
    broken = [c for c in checks if c.status == "broken"]
    verdict = (
        "ALL INVARIANTS HOLD" if not broken else "BROKEN: " + ", ".join(c.name for c in broken)
    )
    lines = [
        f"# Load run `{config.scenario}`: {verdict}",
        "",
        f"- shape `{config.shape}`, {config.users} users (+ {config.feed_users} feed, "
        f"{int(config.operator)} operator), spawn rate {config.spawn_rate:g}/s, "
        f"{config.duration_s:g} s, think time {config.think_min_s:g}-{config.think_max_s:g} s",
        f"- host {config.host}; machine: {os.cpu_count()} cores; "
        + ", ".join(f"{k} {v}" for k, v in facts.items()),
        f"- user mix (weights): {config.mix}; checkout: {config.flow}",
        f"- ERP limits at start: "
        f"{config.erp_limits if config.local_stack else 'as deployed'}; operator changes: "
        + (
            ", ".join(f"at {c.at:g} s the rate x {c.rate_factor:g}" for c in config.limit_changes)
            or "none"
        ),
    ]
    if config.hot_skus:
        lines.append(
            f"- flash sale: {len(config.hot_skus)} hot SKUs x {config.hot_units} units at "
            f"{config.hot_location}"
        )
    lines += ["", "## Invariants", "", "| invariant | result | detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {c.status} | {c.detail} |" for c in checks]
    lines += [
        "",
        "## What happened",
        "",
        *_findings(config.started_at, totals, timeline, samples, out),
    ]
    lines += ["", "## Per endpoint (Locust)", "", *_endpoint_table(out)]
    lines += [
        "",
        "## Answers by status and problem code (users' view)",
        "",
        *_outcome_table(totals, waits),
    ]
    lines += ["", "## Failures in Locust's stats", "", *_failure_table(out)]
    if received is not None and config.hot_skus:
        sold = sold_by_erp(received)
        lines += ["", "## Flash sale: units the ERP got per hot SKU", ""]
        lines += [
            "| SKU | sold | of |",
            "|---|---:|---:|",
            *(
                f"| {s} | {sold.get((s, config.hot_location), 0)} | {config.hot_units} |"
                for s in config.hot_skus
            ),
        ]
    lines += ["", "## Timeline (5 s steps)", ""]
    lines += _timeline(out, config.started_at, timeline, samples, per_second)
    lines += ["", "## Plots", "", *(f"![{p.stem}]({p.name})" for p in plots)]
    lines += [
        "",
        "Files: `locust.html`, `locust_*.csv` (Locust), `samples.jsonl` (once a second: "
        "`/metrics`, `GET /v1/ops/erp`, the simulator, availability), `outcomes-*.jsonl`, "
        "`orders-*.jsonl`, `ops-*.jsonl` (the users), `*.log`.",
    ]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
