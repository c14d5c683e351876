"""Once a second during the run: the gateway's ``/metrics`` and ``GET /v1/ops/erp``, the ERP
simulator's ``/_sim/per_second``, and the availability of every position orders can take
(held and committed units, and the oversell check on each sample).

Each sample is one line of ``samples.jsonl``; a source that does not answer within the second
leaves its field null (the plots show a gap, the report counts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from loadtests.seed import Position

TIMEOUT = aiohttp.ClientTimeout(total=2.0)
_METRIC = re.compile(r"^(gateway_[a-z_]+)(?:\{([^}]*)\})? ([0-9.eE+-]+|NaN)$", re.M)
WATCHED = (
    "gateway_buffer_depth",
    "gateway_buffer_rejections_total",
    "gateway_erp_calls_total",
    "gateway_orders_in_total",
)
MAX_SKUS = 100  # per availability read


def parse_metrics(text: str) -> dict[str, float]:
    """The watched families, each summed over its label sets."""
    sums: dict[str, float] = defaultdict(float)
    for name, _labels, value in _METRIC.findall(text):
        if name in WATCHED and value != "NaN":
            sums[name] += float(value)
    return dict(sums)


def oversold(item: dict[str, Any]) -> bool:
    """committed + reserved above on-hand minus safety stock: more promised than there is."""
    promised = int(item["reserved"]) + int(item["committed"])
    return promised > 0 and promised > int(item["on_hand"]) - int(item["safety_stock"])


class Sampler:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        gateway_url: str,
        ops_key: str,
        storefront_key: str,
        sim_url: str | None,
        positions: list[Position],
        out: Path,
    ) -> None:
        self._session = session
        self._gateway = gateway_url
        self._ops = {"Authorization": f"Bearer {ops_key}"}
        self._sf = {"Authorization": f"Bearer {storefront_key}"}
        self._sim = sim_url
        by_location: dict[str, list[str]] = defaultdict(list)
        for sku, location in positions:
            by_location[location].append(sku)
        self._reads = [
            (location, skus[i : i + MAX_SKUS])
            for location, skus in by_location.items()
            for i in range(0, len(skus), MAX_SKUS)
        ]
        self._out = out
        self.per_second: dict[str, Any] | None = None
        self.violations: list[dict[str, Any]] = []
        self.samples = 0
        self.missed = 0

    async def _json(self, url: str, headers: dict[str, str] | None = None) -> Any:
        async with self._session.get(url, headers=headers, timeout=TIMEOUT) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def _metrics(self) -> dict[str, float]:
        async with self._session.get(f"{self._gateway}/metrics", timeout=TIMEOUT) as resp:
            resp.raise_for_status()
            return parse_metrics(await resp.text())

    async def stock(self) -> list[dict[str, Any]]:
        """Every watched position as availability reads it now."""
        replies = await asyncio.gather(
            *(
                self._json(
                    f"{self._gateway}/v1/availability?"
                    + urlencode([*(("sku", s) for s in skus), ("location", location)]),
                    self._sf,
                )
                for location, skus in self._reads
            )
        )
        return [item for reply in replies for item in reply["items"]]

    async def _guarded(self, what: Any) -> Any:
        try:
            return await what
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            self.missed += 1
            return None

    async def sample(self) -> dict[str, Any]:
        now = time.time()
        erp, metrics, stock, per_second = await asyncio.gather(
            self._guarded(self._json(f"{self._gateway}/v1/ops/erp", self._ops)),
            self._guarded(self._metrics()),
            self._guarded(self.stock()),
            self._guarded(self._json(f"{self._sim}/_sim/per_second"))
            if self._sim
            else asyncio.sleep(0),
        )
        if per_second is not None:
            self.per_second = per_second
        row: dict[str, Any] = {"t": now, "erp": erp, "metrics": metrics, "stock": None}
        if stock is not None:
            bad = [i for i in stock if oversold(i)]
            for item in bad[:20]:
                self.violations.append({"t": now, **item})
            row["stock"] = {
                "on_hand": sum(int(i["on_hand"]) for i in stock),
                "reserved": sum(int(i["reserved"]) for i in stock),
                "committed": sum(int(i["committed"]) for i in stock),
                "available": sum(int(i["available"]) for i in stock),
                "oversold": len(bad),
            }
        self.samples += 1
        return row

    async def run(self, stop: asyncio.Event) -> None:
        with self._out.open("a") as out:
            while not stop.is_set():
                started = time.monotonic()
                row = await self.sample()
                out.write(json.dumps(row) + "\n")
                out.flush()
                left = 1.0 - (time.monotonic() - started)
                if left > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), left)
