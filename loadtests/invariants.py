"""The invariants checked after a run, each ``ok``, ``broken`` or ``not checked`` (with why).

1. ``no oversell``: no availability sample showed committed + reserved above on-hand minus
   safety stock, and after the drain the ERP simulator's ledger agrees: per position, what the
   ERP sold never exceeds the seeded on-hand minus safety stock, and equals what the gateway
   counts as committed (the simulator pushes no snapshots here, so nothing clears it).
2. ``exactly once``: every order answered 202/200 reached the simulator, under one key once
   (re-deliveries, answered 409 by its idempotency, are listed), and it got nothing no user sent.
3. ``ERP rate``: no second of arrivals at the simulator above rate + burst of the limits in force
   around that second, and the simulator's own limit never answered 429.
4. ``contract``: every answer the users saw is one the contract allows (``loadtests.contract``):
   no 500, no connection error, no other 409/503 code.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from loadtests.config import Limits
from loadtests.contract import allowed
from loadtests.seed import Position, Seeded

OK, BROKEN, NOT_CHECKED = "ok", "broken", "not checked"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


@dataclass(kw_only=True)
class RunData:
    local: bool
    seeded: Seeded | None
    sampled_violations: list[dict[str, Any]]
    samples: int
    final_stock: list[dict[str, Any]] | None
    attempted: set[str]
    acked: set[str]
    received: list[dict[str, Any]] | None
    ledger: dict[Position, int] | None
    per_second: dict[str, Any] | None
    rejected_429: int | None
    limits: list[tuple[float, float, Limits]]  # (from, to, limits) in wall-clock seconds
    outcomes: Counter[tuple[str, int, str]]
    drained: bool
    notes: list[str] = field(default_factory=list)


def sold_by_erp(received: list[dict[str, Any]]) -> Counter[Position]:
    sold: Counter[Position] = Counter()
    for order in received:
        body = order.get("body") or {}
        for line in body.get("lines", []) if isinstance(body, dict) else []:
            sold[line["sku"], line["location"]] += int(line["quantity"])
    return sold


def check_oversell(data: RunData) -> Check:
    name = "no oversell"
    problems: list[str] = []
    if data.sampled_violations:
        first = data.sampled_violations[0]
        problems.append(
            f"{len(data.sampled_violations)} sampled positions over on-hand - safety stock, "
            f"first {first['sku']}@{first['location']}: reserved {first['reserved']} + committed "
            f"{first['committed']} > on-hand {first['on_hand']} - safety {first['safety_stock']}"
        )
    if data.samples == 0:
        problems.append("no availability sample was taken")
    checked = f"{data.samples} samples of every order position"
    if data.ledger is None or data.seeded is None or data.received is None:
        why = "no ERP simulator ledger (--host)" if not data.local else "the ledger was not read"
        status = BROKEN if problems else OK
        return Check(
            name, status, "; ".join(problems or [checked]) + f"; ledger not checked: {why}"
        )
    sold = sold_by_erp(data.received)
    committed = {(i["sku"], i["location"]): int(i["committed"]) for i in (data.final_stock or [])}
    over, disagree, gateway_differs = [], [], []
    for position, start in data.seeded.on_hand.items():
        limit = start - data.seeded.safety_stock[position]
        ledger = data.ledger.get(position, start)
        if start - ledger > limit:
            over.append(f"{position[0]}@{position[1]} sold {start - ledger} of {limit}")
        if start - ledger != sold.get(position, 0):
            disagree.append(f"{position[0]}@{position[1]}")
        if committed and committed.get(position, 0) != sold.get(position, 0):
            gateway_differs.append(
                f"{position[0]}@{position[1]} committed {committed.get(position, 0)} "
                f"vs ERP {sold.get(position, 0)}"
            )
    if over:
        problems.append(f"the ERP ledger shows {len(over)} oversold positions: {over[:5]}")
    if disagree:
        problems.append(f"ledger and received orders disagree at {disagree[:5]}")
    if gateway_differs:
        problems.append(
            f"gateway and ERP counts differ at {len(gateway_differs)}: {gateway_differs[:5]}"
        )
    units = sum(sold.values())
    detail = f"{checked}; ERP ledger: {units} units sold over {len(sold)} positions, none beyond"
    return Check(name, BROKEN if problems else OK, "; ".join(problems) or detail)


def check_exactly_once(data: RunData) -> Check:
    name = "exactly once"
    if data.received is None:
        return Check(name, NOT_CHECKED, "no ERP simulator to ask (--host)")
    keys = Counter(str(o["key"]) for o in data.received)
    missing = sorted(data.acked - keys.keys())
    unknown = sorted(keys.keys() - data.attempted)
    doubled = sorted(k for k, n in keys.items() if n > 1)
    redelivered = sum(1 for o in data.received if int(o.get("deliveries", 1)) > 1)
    problems = []
    if missing:
        drained = "" if data.drained else " (the drain timed out)"
        problems.append(
            f"{len(missing)} acknowledged orders never reached the ERP{drained}: {missing[:5]}"
        )
    if unknown:
        problems.append(f"{len(unknown)} orders at the ERP that no user sent: {unknown[:5]}")
    if doubled:
        problems.append(f"{len(doubled)} keys recorded twice: {doubled[:5]}")
    extra = len(keys.keys() & data.attempted - data.acked)
    detail = (
        f"{len(data.acked)} acknowledged orders, all at the ERP once; {redelivered} delivered "
        f"again (409 by key); {extra} cut off by the end of the run reached it too"
    )
    return Check(name, BROKEN if problems else OK, "; ".join(problems) or detail)


def cap_at(second: int, limits: list[tuple[float, float, Limits]]) -> float:
    """rate + burst of every limit in force at any moment of [second - 1, second + 2): a change
    lands within a second on every process, and the bucket may still hold the old burst."""
    caps = [
        lim.per_second_cap for start, end, lim in limits if start < second + 2 and end > second - 1
    ]
    return max(caps) if caps else math.inf


def check_rate(data: RunData) -> Check:
    name = "ERP rate"
    if data.per_second is None:
        return Check(name, NOT_CHECKED, "no ERP simulator to ask (--host)")
    arrivals = {int(s): int(n) for s, n in data.per_second.get("requests", {}).items()}
    over = [
        f"{s}: {n} > {cap_at(s, data.limits):g}"
        for s, n in sorted(arrivals.items())
        if n > cap_at(s, data.limits)
    ]
    problems = []
    if over:
        problems.append(f"{len(over)} seconds above rate + burst: {over[:5]}")
    if data.rejected_429:
        problems.append(f"the ERP's own limit answered 429 {data.rejected_429} times")
    busiest = max(arrivals.items(), key=lambda kv: kv[1], default=(0, 0))
    detail = (
        f"busiest second {busiest[1]} calls (cap then {cap_at(busiest[0], data.limits):g}); "
        "no 429 from the ERP"
    )
    return Check(name, BROKEN if problems else OK, "; ".join(problems) or detail)


def check_contract(data: RunData) -> Check:
    name = "contract"
    bad = {k: n for k, n in data.outcomes.items() if not allowed(*k)}
    total = sum(data.outcomes.values())
    if total == 0:
        return Check(name, BROKEN, "the users recorded no answers at all")
    if bad:
        listed = ", ".join(f"{e} HTTP {s} {c}: {n}" for (e, s, c), n in sorted(bad.items())[:8])
        return Check(
            name, BROKEN, f"{sum(bad.values())} answers the contract does not allow: {listed}"
        )
    return Check(name, OK, f"all {total} answers allowed (no 500, no connection error)")


def check_all(data: RunData) -> list[Check]:
    return [check_oversell(data), check_exactly_once(data), check_rate(data), check_contract(data)]
