"""``gateway serve --workers N``: N real processes on one port under a supervising parent.

What is checked from outside, as an operator sees it: a scrape of any worker shows the whole
group's counts (never one worker's share), a worker killed outright is replaced while the others
serve on, and SIGTERM to the parent under load drains every worker: each request a worker read
got its real answer, the rest were refused before any work was done, and nothing hangs."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.reservation import keys as reservation_keys
from tests.conftest import auth
from tests.gateway_proc import GatewayProcess
from tests.helpers import event
from tests.helpers import metric_sum as total

WORKERS = 2


def children(pid: int) -> set[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


async def eventually_exists(path: Path) -> None:
    """Until ``path`` exists: a worker's counter file appears once its app has started."""
    for _ in range(300):
        if await asyncio.to_thread(path.exists):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path.name} never appeared: the replacement did not start")


def alive(pids: set[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


async def scrape(session: aiohttp.ClientSession, url: str) -> str:
    # A fresh connection each time: the kernel may hand it to any worker.
    async with session.get(url + "/metrics", headers={"Connection": "close"}) as resp:
        assert resp.status == 200
        return await resp.text()


async def group_up(session: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
    """Until every worker has reported in (each one's CPU counter shows in the shared files)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = await scrape(session, gateway.url)
        workers = set(re.findall(r'gateway_worker_cpu_seconds_total\{worker="(\d+)"\}', text))
        if workers == {str(i) for i in range(WORKERS)} and len(children(gateway.proc.pid)) == 2:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the group never came up whole: {gateway.log_text()[-2000:]}")


def per_worker_requests(metrics_dir: Path, pid: int, route: str) -> float:
    """One worker's own count, read from its files alone."""
    own = metrics_dir.parent / f"only-{pid}"
    own.mkdir()
    for path in metrics_dir.glob(f"*_{pid}.db"):
        shutil.copy(path, own / path.name)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(own))  # type: ignore[no-untyped-call]
    return total(generate_latest(registry).decode(), "gateway_http_requests_total", route=route)


async def test_a_scrape_shows_the_whole_group(
    redis_url: str, postgres_dsn: str, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    gateway = GatewayProcess(
        redis_url,
        postgres_dsn,
        GATEWAY_WORKERS=str(WORKERS),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    try:
        async with aiohttp.ClientSession() as session:
            await group_up(session, gateway)
            sent = 300
            for _ in range(sent):
                async with session.get(
                    gateway.url + "/healthz", headers={"Connection": "close"}
                ) as resp:
                    assert resp.status == 200
            await asyncio.sleep(1.5)  # every worker's files have caught up (flushed each second)
            # Whichever worker answers the scrape, it shows all of them.
            for _ in range(10):
                text = await scrape(session, gateway.url)
                assert total(text, "gateway_http_requests_total", route="/healthz") == sent
            # And the work really was shared: each worker's own files hold a part of it.
            shares = [
                per_worker_requests(metrics_dir, pid, "/healthz")
                for pid in children(gateway.proc.pid)
            ]
            assert sum(shares) == sent
            assert all(share > 0 for share in shares), shares
    finally:
        assert gateway.stop() == 0


async def test_a_killed_worker_is_replaced_and_the_others_serve_on(
    redis_url: str, postgres_dsn: str, tmp_path: Path
) -> None:
    gateway = GatewayProcess(
        redis_url,
        postgres_dsn,
        GATEWAY_WORKERS=str(WORKERS),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
    )
    try:
        async with aiohttp.ClientSession() as session:
            await group_up(session, gateway)
            for _ in range(50):
                async with session.get(gateway.url + "/healthz") as resp:
                    assert resp.status == 200
            await asyncio.sleep(1.5)
            before = total(await scrape(session, gateway.url), "gateway_http_requests_total")
            victim, survivor = sorted(children(gateway.proc.pid))
            os.kill(victim, signal.SIGKILL)
            # The survivor answers while the victim's slot restarts (a refused connect went to
            # the dead worker's socket before the kernel dropped it: try again).
            answered = 0
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    async with session.get(
                        gateway.url + "/healthz", headers={"Connection": "close"}
                    ) as resp:
                        assert resp.status == 200
                        answered += 1
                except aiohttp.ClientConnectionError:
                    pass
                now = children(gateway.proc.pid)
                if len(now) == WORKERS and victim not in now:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the killed worker was not replaced")
            assert survivor in children(gateway.proc.pid)
            assert answered > 0
            (replacement,) = children(gateway.proc.pid) - {survivor}
            await eventually_exists(tmp_path / f"counter_{replacement}.db")
            # Counts the dead worker had flushed stay in the totals: they never go back.
            after = total(await scrape(session, gateway.url), "gateway_http_requests_total")
            assert after >= before + answered
            assert '"event": "worker_died"' in gateway.log_text().replace('":"', '": "')
    finally:
        assert gateway.stop() == 0


REFUSED = "refused"  # the request never reached a worker that read it: nothing was done


async def test_sigterm_to_the_parent_under_load_loses_no_request(
    redis_url: str, redis: aioredis.Redis, postgres_dsn: str
) -> None:
    gateway = GatewayProcess(redis_url, postgres_dsn, GATEWAY_WORKERS=str(WORKERS))
    run = uuid.uuid4().hex[:8]
    sku, location = f"W-{run}", "L1"
    outcomes: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as session:
            await group_up(session, gateway)
            body = {"events": [event(f"w-{run}", "snapshot", 1_000_000, 0, sku=sku)]}
            async with session.post(
                gateway.url + "/v1/stock-events", json=body, headers=auth("feed")
            ) as resp:
                assert resp.status == 200

            async def shopper(n: int) -> None:
                # Keep-alive connections, like a storefront's pool, until the group is gone.
                async with aiohttp.ClientSession() as own:
                    for i in range(100_000):
                        rid = f"w-{run}-{n}-{i}"
                        lines = [{"sku": sku, "location": location, "quantity": 1}]
                        try:
                            async with own.post(
                                gateway.url + "/v1/reservations",
                                json={"reservation_id": rid, "lines": lines},
                                headers=auth("storefront"),
                                timeout=aiohttp.ClientTimeout(total=15),
                            ) as resp:
                                payload = await resp.json(content_type=None)
                                outcomes[rid] = (resp.status, payload.get("code"))
                        except aiohttp.ClientConnectionError:
                            outcomes[rid] = (REFUSED, None)
                            if gateway.proc.poll() is not None:
                                return
                            await asyncio.sleep(0.01)

            shoppers = [asyncio.create_task(shopper(n)) for n in range(32)]
            await asyncio.sleep(2.0)
            assert not any(s.done() for s in shoppers)
            workers = children(gateway.proc.pid)
            gateway.proc.send_signal(signal.SIGTERM)
            status = await asyncio.to_thread(gateway.proc.wait, 40)
            await asyncio.wait_for(asyncio.gather(*shoppers), 20)
        assert status == 0
        # The parent waited for its workers: none is left serving unsupervised.
        assert alive(workers) == []
    finally:
        gateway.stop()

    held = {rid for rid, (status, _) in outcomes.items() if status == 201}
    refused = {rid for rid, (status, _) in outcomes.items() if status == REFUSED}
    others = {(status, code) for status, code in outcomes.values() if status not in (201, REFUSED)}
    assert len(held) > 100, "the load never got going"
    # Only the drain's refusal; never a 500, a timeout or another error.
    assert others <= {(503, "shutting_down")}, others
    # Every 201 is a hold in Redis; every request refused left nothing behind: no request was
    # done without its answer.
    for rid in held:
        assert await redis.exists(reservation_keys.record(rid)), f"{rid} answered 201, not held"
    for rid in refused:
        assert not await redis.exists(reservation_keys.record(rid)), f"{rid} done, not answered"


pytestmark = pytest.mark.timeout(120)


def test_a_worker_that_cannot_start_stops_the_group(redis_url: str, postgres_dsn: str) -> None:
    """The port held by another program: every worker dies at start; the parent gives up with
    status 1 after a few tries instead of restarting them forever."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: nobody may share it
        squatter.listen()
        port = squatter.getsockname()[1]
        env = {
            **os.environ,
            "GATEWAY_PORT": str(port),
            "GATEWAY_WORKERS": str(WORKERS),
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_POSTGRES_DSN": postgres_dsn,
            "GATEWAY_LOG_LEVEL": "warning",
        }
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve"],
            env=env,
            capture_output=True,
            timeout=90,
            check=False,
        )
    assert done.returncode == 1
    assert b"workers_failing" in done.stderr
    assert time.monotonic() - started < 60
