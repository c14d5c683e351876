"""``gateway demo`` as ``./run demo`` runs it: its own ERP simulator process, the writers pointed
at it, snapshots pushed back through the feed key, and both stopped together."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from gateway.dev.demo import DEMO_KEYS
from gateway.dev.services import free_port, reachable
from tests.helpers import eventually

STOREFRONT = {"Authorization": "Bearer demo-storefront"}
OPS = {"Authorization": "Bearer demo-ops"}
LINE = {"sku": "SKU-0001", "location": "DC-EAST", "quantity": 2}


async def test_the_demo_sends_orders_to_its_erp_simulator(
    redis_url: str, redis: aioredis.Redis, postgres_dsn: str, pg: asyncpg.Connection
) -> None:
    port, sim_port = free_port(), free_port()
    base, sim = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{sim_port}"
    environ = {
        **os.environ,
        "GATEWAY_PORT": str(port),
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_POSTGRES_DSN": postgres_dsn,
        "GATEWAY_API_KEYS": DEMO_KEYS,
        "GATEWAY_LOG_LEVEL": "warning",
    }
    environ.pop("GATEWAY_ERP_URL", None)  # an ERP named here would replace the simulator
    with tempfile.TemporaryFile() as out:
        demo = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "demo", "--erp-sim-port", str(sim_port)),
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            async with aiohttp.ClientSession() as session:

                async def get(url: str, **kwargs: Any) -> Any:
                    async with session.get(url, **kwargs) as resp:
                        assert resp.status == 200, await resp.text()
                        return await resp.json()

                async def ready() -> bool:
                    assert demo.returncode is None, _printed(out)
                    try:
                        async with session.get(f"{base}/readyz") as resp:
                            return resp.status == 200
                    except aiohttp.ClientError:
                        return False

                await eventually(ready, 30, "the demo serving")
                printed = _printed(out)
                assert f"ERP simulator on {sim}" in printed
                assert f"curl -s {sim}/_sim/received" in printed
                assert f"{base}/v1/ops/erp" in printed

                async def on_hand() -> int:
                    params = {"sku": LINE["sku"], "location": LINE["location"]}
                    reply = await get(f"{base}/v1/availability", params=params, headers=STOREFRONT)
                    return int(reply["items"][0]["on_hand"])

                before = await on_hand()
                # As the printed curl line does: the lines in the order too, for the ERP's ledger.
                body = {"order_id": "demo-1", "lines": [LINE], "order": {"lines": [LINE]}}
                async with session.post(f"{base}/v1/orders", json=body, headers=STOREFRONT) as r:
                    assert r.status == 202, await r.text()

                async def accepted() -> bool:
                    view = await get(f"{base}/v1/orders/demo-1", headers=STOREFRONT)
                    return bool(view["status"] == "accepted")

                await eventually(accepted, 10, "the order accepted by the demo's ERP")
                got = await get(f"{sim}/_sim/received")
                assert [(o["key"], o["deliveries"]) for o in got["orders"]] == [("demo-1", 1)]
                flow = await get(f"{base}/v1/ops/erp", headers=OPS)  # as the demo prints it
                assert (flow["buffer_depth"], flow["breaker"]) == (0, "closed")
                assert flow["sent_per_second"] > 0

                async def snapshot_pushed() -> bool:
                    return await on_hand() == before - 2

                await eventually(snapshot_pushed, 10, "the simulator's snapshot applied")
            demo.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(demo.wait(), 20) == 0, _printed(out)
            assert not reachable("127.0.0.1", sim_port)  # the simulator stopped with it
        finally:
            if demo.returncode is None:
                demo.kill()
                await demo.wait()


def _printed(out: Any) -> str:
    fd = out.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode()
