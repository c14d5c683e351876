"""Reservations: the bodies wrk and the open-loop generator post, the stock they draw on, and the
flash sale with its oversell check."""

from __future__ import annotations

import itertools
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import (
    FLASH_UNITS,
    KEYS,
    LOCATION,
    RESERVATION_STOCK,
    SEED_SKUS,
    Run,
    availability,
    http,
    say,
    snapshot,
)
from benchmarks.load import Target, profiled, run_wrk
from benchmarks.measure import attempts
from benchmarks.procs import Processes


def reservation_sku(i: int) -> str:
    return f"RSV-{i:05d}"


def write_bodies(path: Path, requests: Sequence[Sequence[str]], ttl: int) -> Path:
    """Reservation bodies, one a line, each holding 1 unit of each SKU given at ``LOCATION``;
    ``%ID%`` is where the load generator puts a reservation id of the request's own."""
    with path.open("wb") as f:
        for skus in requests:
            body = {
                "reservation_id": "%ID%",
                "ttl_seconds": ttl,
                "lines": [{"sku": s, "location": LOCATION, "quantity": 1} for s in skus],
            }
            f.write(orjson.dumps(body) + b"\n")
    return path


def write_reservation_bodies(
    path: Path, lines: int, ttl: int, count: int = 1000, seed: int = 11
) -> Path:
    """Reservations of ``lines`` distinct SKUs each over the seeded reservation SKUs."""
    rng = random.Random(seed + lines)
    picks = [
        [reservation_sku(s) for s in rng.sample(range(SEED_SKUS), lines)] for _ in range(count)
    ]
    return write_bodies(path, picks, ttl)


def seed_reservations(base: str) -> None:
    """The reservation SKUs' stock, unless an earlier phase of the run seeded this Redis: the
    same snapshot events again would be refused as duplicates."""
    if availability(base, reservation_sku(7))["on_hand"] == RESERVATION_STOCK:
        return
    snapshot(base, {reservation_sku(i): RESERVATION_STOCK for i in range(SEED_SKUS)}, "rseed")
    if availability(base, reservation_sku(7))["available"] != RESERVATION_STOCK:
        raise RuntimeError("availability check after seeding reservation SKUs failed")


_HELD = re.compile(r'^gateway_reservations_total\{[^}]*outcome="held"[^}]*\}\s+(\S+)', re.MULTILINE)


def reservations_held(base: str) -> float:
    status, body = http("GET", f"{base}/metrics", timeout=5)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    match = _HELD.search(body.decode())
    return float(match.group(1)) if match else 0.0


def flash_sale(run: Run, processes: Processes, base: str, gateway_pid: int, work: Path) -> None:
    """One SKU with FLASH_UNITS units at one location, every request reserving 1 of it: the rate
    (all but the first FLASH_UNITS answers are 409) and, after each run, proof of no oversell:
    the SKU's reserved never exceeds its on-hand, and no more than FLASH_UNITS 201s came back.

    Every run (warm-up, each attempt, the profiled one) races for a fresh SKU, so the race for
    the units happens inside the measured run and each run is checked on its own."""
    cfg = run.config
    url = f"{base}/v1/reservations"
    numbers = itertools.count(1)
    checks: list[dict[str, Any]] = []

    def race(duration: float, tag: str) -> dict[str, Any]:
        sku = f"HOT-{next(numbers):03d}"
        snapshot(base, {sku: FLASH_UNITS}, "hot")
        bodies = write_bodies(work / f"bodies-{sku}.txt", [[sku]], cfg.reservation_ttl)
        held_before = reservations_held(base)
        result = run_wrk(Target(url, KEYS["storefront"], bodies=bodies), duration, f"flash-{tag}")
        # wrk may close connections with requests in flight; let the gateway finish them.
        time.sleep(0.3)
        item = availability(base, sku)
        held = round(reservations_held(base) - held_before)
        check = {
            "run": tag,
            "sku": sku,
            "on_hand": item["on_hand"],
            "reserved": item["reserved"],
            "available": item["available"],
            "status_201": result["status_201"],
            "held_metric_delta": held,
            "oversold": max(
                0, item["reserved"] - item["on_hand"], result["status_201"] - FLASH_UNITS
            ),
            # The 201s wrk saw, the holds the gateway counted and Redis' reserved must agree
            # (no hold expires within a run: the TTL is longer).
            "consistent": result["status_201"] <= held == item["reserved"],
        }
        checks.append(check)
        result["check"] = check
        # A 409 is the expected answer here; only other statuses and broken sockets are errors.
        result["errors"] = result["status_other"] + result["socket_errors"]
        return result

    def warm() -> object:
        return race(cfg.warmup, "warm") if cfg.warmup > 0 else None

    result = attempts(
        run, processes, "flash sale", "gateway", True, lambda: race(cfg.duration, "measure"), warm
    )
    if cfg.profile:
        with profiled(run, "wrk-flash", gateway_pid, cfg.duration - 1):
            race(cfg.duration, "profile")
    worst = max(checks, key=lambda c: (c["oversold"], not c["consistent"]))
    run.reservations["flash"] = {
        **{k: v for k, v in result.items() if k != "check"},
        "units": FLASH_UNITS,
        "check": result["check"],
        "oversold_max": worst["oversold"],
        "all_consistent": all(c["consistent"] for c in checks),
        "runs_checked": checks,
    }
    check = result["check"]
    say(
        f"flash sale: {result['requests_per_s']:,.0f} req/s, 201s {check['status_201']}, 409s "
        f"{result['status_409']:,}, reserved {check['reserved']} of {check['on_hand']}; "
        f"oversold {worst['oversold']} over {len(checks)} run(s)"
    )
