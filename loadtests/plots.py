"""PNG plots of a run over time (matplotlib, no display): ``load.png`` (users, requests/s by
outcome, latency percentiles) and ``erp.png`` (buffer depth, ERP calls/s against the limit,
held and committed units). Vertical lines mark the promotion's drop and the operator's changes.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from loadtests.config import Limits
from loadtests.invariants import cap_at


def _history(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open() as f:
        return [row for row in csv.DictReader(f) if row.get("Name") == "Aggregated"]


def _num(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "N/A") else None
    except ValueError:
        return None


def _marks(ax: Any, t0: float, marks: list[tuple[float, str]]) -> None:
    for at, label in marks:
        ax.axvline(at - t0, color="grey", linestyle=":", linewidth=1)
        ax.text(at - t0, ax.get_ylim()[1], label, fontsize=7, rotation=90, va="top", ha="right")


def plot_load(
    out: Path,
    t0: float,
    outcomes: dict[int, dict[str, int]],
    marks: list[tuple[float, str]],
) -> Path:
    history = _history(out / "locust_stats_history.csv")
    fig, (ax_users, ax_rps, ax_lat) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    xs = [float(r["Timestamp"]) - t0 for r in history]
    ax_users.plot(xs, [_num(r.get("User Count")) for r in history], color="black")
    ax_users.set_ylabel("users")
    seconds = sorted(outcomes)
    classes = ("2xx", "409", "503", "failed")
    colours = {"2xx": "tab:green", "409": "tab:orange", "503": "tab:red", "failed": "black"}
    for cls in classes:
        ax_rps.plot(
            [s - t0 for s in seconds],
            [outcomes[s].get(cls, 0) for s in seconds],
            label=cls,
            color=colours[cls],
        )
    ax_rps.set_ylabel("answers / s (users' view)")
    ax_rps.legend(loc="upper left", fontsize=8)
    for pct, style in (("50%", "-"), ("95%", "--"), ("99%", ":")):
        ax_lat.plot(xs, [_num(r.get(pct)) for r in history], style, label=f"p{pct[:-1]}")
    ax_lat.set_ylabel("latency ms (Locust, 10 s window)")
    ax_lat.set_yscale("log")
    ax_lat.legend(loc="upper left", fontsize=8)
    ax_lat.set_xlabel("seconds since start")
    for ax in (ax_users, ax_rps, ax_lat):
        _marks(ax, t0, marks)
    fig.tight_layout()
    path = out / "load.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_erp(
    out: Path,
    t0: float,
    samples: list[dict[str, Any]],
    per_second: dict[str, Any] | None,
    limits: list[tuple[float, float, Limits]],
    buffer_max: int | None,
    marks: list[tuple[float, str]],
) -> Path:
    fig, (ax_buf, ax_erp, ax_units) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    erp = [(s["t"] - t0, s["erp"]) for s in samples if s.get("erp")]
    ax_buf.plot([x for x, _ in erp], [e["buffer_depth"] for _, e in erp], label="buffer depth")
    deepest = max((e["buffer_depth"] for _, e in erp), default=0)
    if buffer_max and buffer_max <= 5 * max(deepest, 1):  # else it flattens the curve
        ax_buf.axhline(
            buffer_max, color="tab:red", linestyle="--", label="GATEWAY_BUFFER_MAX_DEPTH"
        )
    ax_buf.set_ylabel("orders waiting")
    ax_buf.legend(loc="upper left", fontsize=8)
    series: dict[str, dict[int, int]] = defaultdict(dict)
    for kind in ("requests", "seconds"):
        for second, n in (per_second or {}).get(kind, {}).items():
            series[kind][int(second)] = int(n)
    arrivals = sorted(series["requests"])
    if arrivals:
        span = range(min(arrivals), max(arrivals) + 1)
        ax_erp.step(
            [s - t0 for s in span],
            [series["requests"].get(s, 0) for s in span],
            where="post",
            label="ERP calls/s (arrived)",
        )
        ax_erp.step(
            [s - t0 for s in span],
            [series["seconds"].get(s, 0) for s in span],
            where="post",
            label="accepted/s",
            alpha=0.6,
        )
        ax_erp.step(
            [s - t0 for s in span],
            [cap_at(s, limits) for s in span],
            where="post",
            color="tab:red",
            linestyle="--",
            label="rate + burst in force",
        )
    ax_erp.plot(
        [x for x, _ in erp],
        [e["effective_rate_per_second"] for _, e in erp],
        color="tab:purple",
        label="effective rate",
    )
    ax_erp.set_ylabel("ERP calls / s")
    ax_erp.legend(loc="upper left", fontsize=8)
    stock = [(s["t"] - t0, s["stock"]) for s in samples if s.get("stock")]
    ax_units.plot([x for x, _ in stock], [v["reserved"] for _, v in stock], label="held (reserved)")
    ax_units.plot([x for x, _ in stock], [v["committed"] for _, v in stock], label="committed")
    ax_units.set_ylabel("units at order positions")
    ax_units.set_xlabel("seconds since start")
    ax_units.legend(loc="upper left", fontsize=8)
    for ax in (ax_buf, ax_erp, ax_units):
        _marks(ax, t0, marks)
    fig.tight_layout()
    path = out / "erp.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
