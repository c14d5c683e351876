"""``gateway demo``: start what is missing, seed a small catalogue and serve it.

Unless ``GATEWAY_ERP_URL`` names an ERP already, the demo also starts the ERP simulator
(``gateway erp-sim``, its own process) and points the order writers at it; the simulator's stock
ledger starts as the demo's stock, and it pushes snapshots of what it sold back through the
feed key. The simulator stops with the demo.
"""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
from datetime import UTC, datetime
from typing import Final

import aiohttp
from aiohttp import web

from gateway.app import create_app
from gateway.atp.schemas import SafetyStockEntry, StockEvent
from gateway.dev.services import (
    ServiceMissing,
    _wait_for,
    ensure_postgres,
    ensure_redis,
    free_port,
    reachable,
    stop_process,
)
from gateway.http.state import APPLIER, LOCATION_CONFIG, SETTINGS
from gateway.server import serve
from gateway.settings import Settings, SettingsError

DEMO_KEYS: Final = "storefront:demo-storefront,feed:demo-feed,ops:demo-ops"
SKUS: Final = [f"SKU-{n:04d}" for n in range(1, 301)]
DCS: Final = ["DC-EAST", "DC-WEST"]
STORES: Final = [f"STORE-{n:02d}" for n in range(1, 11)]
GROUPS: Final = {
    "east": ["DC-EAST", *STORES[:5]],
    "west": ["DC-WEST", *STORES[5:]],
    "stores": STORES,
    "dcs": DCS,
}
ERP_SIM_PORT: Final = 8081
_SIM_TIMEOUT: Final = aiohttp.ClientTimeout(total=10)


class ErpSim:
    """The simulator process the demo started: where it listens, and the process to stop."""

    def __init__(self, port: int, gateway_url: str, feed_key: str | None) -> None:
        # Another demo (or anything) on the port: take a free one rather than fail.
        self.port = port if port and not reachable("127.0.0.1", port) else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "gateway", "erp-sim", "--port", str(self.port)]
        if feed_key is not None:
            command += ["--gateway-url", gateway_url, "--feed-key", feed_key]
        self.proc = subprocess.Popen(
            [*command, "--log-level", "warning"], stdout=subprocess.DEVNULL
        )
        try:
            _wait_for("127.0.0.1", self.port, self.proc, "the ERP simulator")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc)


async def _seed(app: web.Application, sim: ErpSim | None = None) -> None:
    rng = random.Random(42)
    now = datetime.now(UTC)
    run = int(now.timestamp())
    events = [
        StockEvent(
            # A fresh id per run: a rerun's snapshots are newer and reset the demo stock.
            event_id=f"demo-{run}-{sku}-{loc}",
            type="snapshot",
            sku=sku,
            location=loc,
            quantity=rng.randint(200, 2000) if loc in DCS else rng.randint(0, 40),
            occurred_at=now,
            source="demo",
        )
        for sku in SKUS
        for loc in (*DCS, *STORES)
    ]
    for start in range(0, len(events), 1000):
        await app[APPLIER].apply(events[start : start + 1000])
    config = app[LOCATION_CONFIG]
    for group, members in GROUPS.items():
        await config.put_group(group, members)
    await config.put_safety_stock(
        [
            SafetyStockEntry(location=loc, quantity=10 if loc in DCS else 2)
            for loc in (*DCS, *STORES)
        ]
    )
    if sim is not None:
        # The ERP's count is the demo's count, so the snapshots it pushes after each order
        # carry on from the stock the gateway shows.
        ledger = [{"sku": e.sku, "location": e.location, "on_hand": e.quantity} for e in events]
        async with (
            aiohttp.ClientSession(timeout=_SIM_TIMEOUT) as session,
            session.put(f"{sim.url}/_sim/stock", json={"items": ledger}) as resp,
        ):
            resp.raise_for_status()
    _print_examples(app[SETTINGS], len(events), sim)


def _print_examples(settings: Settings, n_events: int, sim: ErpSim | None) -> None:
    base = f"http://{settings.host}:{settings.port}"
    keys = {k.role: k.key for k in settings.api_keys}
    sf, feed, ops = keys.get("storefront", "?"), keys.get("feed", "?"), keys.get("ops", "?")
    now = datetime.now(UTC).isoformat()
    print(
        f"""
atp-gateway demo on {base}: {len(SKUS)} SKUs x {len(DCS)} DCs + {len(STORES)} stores \
({n_events} snapshots), groups {", ".join(GROUPS)}.
Try:
  curl -s '{base}/v1/availability?sku=SKU-0001&sku=SKU-0002&location=DC-EAST' \\
       -H 'Authorization: Bearer {sf}'
  curl -s '{base}/v1/availability?sku=SKU-0001&location_group=east' -H 'Authorization: Bearer {sf}'
  curl -s -X POST {base}/v1/stock-events -H 'Authorization: Bearer {feed}' \\
       -H 'Content-Type: application/json' -d '{{"events": [{{"event_id": "sale-1", \
"type": "adjustment", "sku": "SKU-0001", "location": "DC-EAST", "quantity": -3, \
"occurred_at": "{now}"}}]}}'
  curl -s -X POST {base}/v1/reservations -H 'Authorization: Bearer {sf}' \\
       -H 'Content-Type: application/json' -d '{{"reservation_id": "cart-1", \
"ttl_seconds": 300, "lines": [{{"sku": "SKU-0001", "location_group": "east", "quantity": 3}}]}}'
  curl -s -X DELETE {base}/v1/reservations/cart-1 -H 'Authorization: Bearer {sf}'
  curl -s -X PUT {base}/v1/location-groups/north -H 'Authorization: Bearer {ops}' \\
       -H 'Content-Type: application/json' -d '{{"locations": ["STORE-01", "STORE-02"]}}'
  curl -s {base}/readyz ; curl -s {base}/metrics | head
{_order_examples(base, sf, ops, settings.erp_url, sim)}Stop with Ctrl-C.
""",
        flush=True,
    )


def _order_examples(base: str, sf: str, ops: str, erp_url: str, sim: ErpSim | None) -> str:
    erp = f"the ERP simulator on {sim.url}" if sim else f"the ERP at {erp_url}"
    lines = '[{"sku": "SKU-0001", "location": "DC-EAST", "quantity": 2}]'
    text = f"""Orders flow to {erp}; watch them:
  curl -s -X POST {base}/v1/orders -H 'Authorization: Bearer {sf}' \\
       -H 'Content-Type: application/json' -d '{{"order_id": "ord-1", "lines": {lines}, \
"order": {{"customer_id": "cust-1", "lines": {lines}}}}}'
  curl -s {base}/v1/orders/ord-1 -H 'Authorization: Bearer {sf}'
  curl -s {base}/v1/ops/erp -H 'Authorization: Bearer {ops}'
"""
    if sim is None:
        return text
    return (
        text
        + f"""  curl -s {sim.url}/_sim/received ; curl -s {sim.url}/_sim/per_second
  curl -s -X PUT {sim.url}/_sim/knobs -H 'Content-Type: application/json' \\
       -d '{{"latency_ms": 800, "rate_limit_per_second": 5}}'    # a slow, strict ERP
"""
    )


def run_demo(config_file: str | None, erp_sim_port: int = ERP_SIM_PORT) -> int:
    """``erp_sim_port``: where the simulator listens (a free port if taken; 0: any)."""
    environ = dict(os.environ)
    environ.setdefault("GATEWAY_API_KEYS", DEMO_KEYS)
    sim: ErpSim | None = None
    try:
        settings = Settings.from_env(environ, config_file)
        redis_url = ensure_redis(settings.redis_url)
        postgres_dsn = ensure_postgres(settings.postgres_dsn)
        if not settings.erp_url:
            sim = ErpSim(erp_sim_port, _gateway_url(settings), _feed_key(settings))
    except (SettingsError, ServiceMissing) as exc:
        print(f"gateway demo: {exc}", file=sys.stderr)
        return 2
    try:
        environ["GATEWAY_REDIS_URL"] = redis_url
        environ["GATEWAY_POSTGRES_DSN"] = postgres_dsn
        if sim is not None:
            environ["GATEWAY_ERP_URL"] = sim.url
        settings = Settings.from_env(environ, config_file)
        app = create_app(settings)
        app.on_startup.append(functools.partial(_seed, sim=sim))
        serve(settings, app)
    finally:
        if sim is not None:
            sim.stop()
    return 0


def _gateway_url(settings: Settings) -> str:
    # A gateway bound to every interface is reached on loopback.
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}"


def _feed_key(settings: Settings) -> str | None:
    """The key the simulator pushes snapshots with; without one it pushes none."""
    return next((k.key for k in settings.api_keys if k.role == "feed"), None)
