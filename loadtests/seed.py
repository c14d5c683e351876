"""Seed a run through the public API (so ``--host`` can seed a deployed stack the same way):
location groups and safety stock with the ops key, snapshots with the feed key, and the ERP
simulator's ledger for the positions orders are taken from.

Stock: the demo's catalogue (``SKU-0001``..``SKU-0300`` at two DCs and ten stores); the first
ten online SKUs are scarce at the DCs (12-30 units, 2-20 above safety stock), so carts race and
409s happen in every scenario; the hot SKUs of a flash sale have ``hot_units`` each at the hot
location, with no safety stock, so exactly that many units can be sold.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp

from loadtests.config import (
    CATALOGUE,
    DCS,
    GROUPS,
    LOCATIONS,
    ONLINE_SKUS,
    SAFETY_STOCK,
    RunConfig,
)

Position = tuple[str, str]
SCARCE = ONLINE_SKUS[:10]


@dataclass(frozen=True)
class Seeded:
    """What the run started from: on-hand and safety stock of every position orders can take."""

    on_hand: dict[Position, int]
    safety_stock: dict[Position, int]


def stock_plan(config: RunConfig) -> dict[Position, int]:
    rng = random.Random(42)
    plan: dict[Position, int] = {}
    for sku in CATALOGUE:
        for location in LOCATIONS:
            if location in DCS:
                plan[sku, location] = (
                    rng.randint(12, 30) if sku in SCARCE else rng.randint(200, 2000)
                )
            else:
                plan[sku, location] = rng.randint(0, 40)
    for sku in config.hot_skus:
        plan[sku, config.hot_location] = config.hot_units
    return plan


def order_positions(config: RunConfig) -> list[Position]:
    """Every position a hold or an order can land on (the oversell checks watch these)."""
    return [(s, loc) for s in ONLINE_SKUS for loc in DCS] + [
        (s, config.hot_location) for s in config.hot_skus
    ]


def safety_of(config: RunConfig, position: Position) -> int:
    return 0 if position[0] in config.hot_skus else SAFETY_STOCK[position[1]]


async def _send(
    session: aiohttp.ClientSession, method: str, url: str, key: str, body: object
) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with session.request(method, url, json=body, headers=headers) as resp:
        if resp.status >= 300:
            raise RuntimeError(
                f"seeding: {method} {url} answered {resp.status}: {await resp.text()}"
            )


async def seed(session: aiohttp.ClientSession, config: RunConfig, sim_url: str | None) -> Seeded:
    base = config.host
    for group, members in GROUPS.items():
        await _send(
            session,
            "PUT",
            f"{base}/v1/location-groups/{group}",
            config.ops_key,
            {"locations": members},
        )
    items: list[dict[str, object]] = [
        {"location": loc, "quantity": qty} for loc, qty in SAFETY_STOCK.items()
    ]
    items += [{"location": config.hot_location, "sku": s, "quantity": 0} for s in config.hot_skus]
    await _send(session, "PUT", f"{base}/v1/safety-stock", config.ops_key, {"items": items})
    plan = stock_plan(config)
    now = datetime.now(UTC).isoformat()
    events = [
        {
            "event_id": f"{config.run_id}-seed-{sku}-{loc}",
            "type": "snapshot",
            "sku": sku,
            "location": loc,
            "quantity": qty,
            "occurred_at": now,
            "source": "loadtest-seed",
        }
        for (sku, loc), qty in plan.items()
    ]
    for start in range(0, len(events), 1000):
        await _send(
            session,
            "POST",
            f"{base}/v1/stock-events",
            config.feed_key,
            {"events": events[start : start + 1000]},
        )
    positions = order_positions(config)
    seeded = Seeded(
        on_hand={p: plan[p] for p in positions},
        safety_stock={p: safety_of(config, p) for p in positions},
    )
    if sim_url is not None:
        ledger = [{"sku": s, "location": loc, "on_hand": plan[s, loc]} for s, loc in positions]
        await _send(session, "POST", f"{sim_url}/_sim/reset", "-", {})
        await _send(session, "PUT", f"{sim_url}/_sim/stock", "-", {"items": ledger})
    return seeded
