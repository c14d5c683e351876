"""``gateway demo``: start what is missing, seed a small catalogue and serve it."""

from __future__ import annotations

import os
import random
import sys
from datetime import UTC, datetime
from typing import Final

from aiohttp import web

from gateway.app import create_app
from gateway.atp.schemas import SafetyStockEntry, StockEvent
from gateway.dev.services import ServiceMissing, ensure_postgres, ensure_redis
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


async def _seed(app: web.Application) -> None:
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
    _print_examples(app[SETTINGS], len(events))


def _print_examples(settings: Settings, n_events: int) -> None:
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
Stop with Ctrl-C.
""",
        flush=True,
    )


def run_demo(config_file: str | None) -> int:
    environ = dict(os.environ)
    environ.setdefault("GATEWAY_API_KEYS", DEMO_KEYS)
    try:
        settings = Settings.from_env(environ, config_file)
        redis_url = ensure_redis(settings.redis_url)
        postgres_dsn = ensure_postgres(settings.postgres_dsn)
    except (SettingsError, ServiceMissing) as exc:
        print(f"gateway demo: {exc}", file=sys.stderr)
        return 2
    environ["GATEWAY_REDIS_URL"] = redis_url
    environ["GATEWAY_POSTGRES_DSN"] = postgres_dsn
    settings = Settings.from_env(environ, config_file)
    app = create_app(settings)
    app.on_startup.append(_seed)
    serve(settings, app)
    return 0
