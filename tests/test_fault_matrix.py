"""The fault matrix: every endpoint x {Redis down, Redis stalled, PostgreSQL down, PostgreSQL
stalled}, against real processes.

Redis is a private ``redis-server`` behind a TCP proxy: "down" cuts the proxy (connections
closed, new ones refused), "stalled" SIGSTOPs the server itself. PostgreSQL is the shared server
behind a proxy: "down" cuts it, "stalled" black-holes it (connections accepted, nothing answered).

During the fault, two rounds of requests hit every endpoint at once. Each answer must come
within the configured timeout plus one second; an endpoint that needs the failed dependency
answers 503 with ``Retry-After`` and ``dependency_unavailable`` (nothing applied) or, for a
write that was sent and not answered, ``outcome_unknown``; the others answer as usual. After
recovery the state must agree with what was answered: every ``dependency_unavailable`` write
is retried and must turn out never applied (a fresh 201, ``applied`` not ``duplicate``, the old
value still in place), every ``outcome_unknown`` retried answers its true outcome, and the held
units add up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.dev.services import start_redis
from tests.conftest import auth, make_settings
from tests.helpers import event
from tests.proxy import TcpProxy

TIMEOUT = 0.5
BOUND = TIMEOUT + 1.0
SKU, LOC = "SKU-M", "L1"
STOCK = 100

REDIS, POSTGRES = "redis", "postgres"


@dataclass
class Answer:
    name: str
    status: int
    code: str | None
    seconds: float
    retry_after: str | None
    body: Any


@dataclass
class Fault:
    name: str
    dependency: str
    start: Callable[[], Awaitable[None]]
    end: Callable[[], Awaitable[None]]


@dataclass
class Env:
    client: TestClient[Any, Any]
    redis_proxy: TcpProxy
    pg_proxy: TcpProxy
    redis_proc: subprocess.Popen[bytes]
    answers: list[Answer] = field(default_factory=list)


@pytest.fixture
async def env(postgres_dsn: str, pg: Any) -> AsyncIterator[Env]:
    redis_url, redis_proc = start_redis()
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    redis_proxy = TcpProxy("127.0.0.1", redis_port)
    pg_proxy = TcpProxy("127.0.0.1", 5432)
    await redis_proxy.start()
    await pg_proxy.start()
    settings = make_settings(
        f"redis://127.0.0.1:{redis_proxy.port}/0",
        postgres_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{pg_proxy.port}"),
        redis_timeout_seconds=TIMEOUT,
        postgres_timeout_seconds=TIMEOUT,
    )
    try:
        async with TestClient(TestServer(create_app(settings))) as client:
            yield Env(client, redis_proxy, pg_proxy, redis_proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(redis_proc.pid, signal.SIGCONT)
        await redis_proxy.close()
        await pg_proxy.close()
        redis_proc.terminate()
        redis_proc.wait(5)


def _faults(env: Env) -> dict[str, Fault]:
    async def sigstop() -> None:
        os.kill(env.redis_proc.pid, signal.SIGSTOP)

    async def sigcont() -> None:
        os.kill(env.redis_proc.pid, signal.SIGCONT)

    async def pg_blackhole() -> None:
        env.pg_proxy.blackhole()

    return {
        "redis_down": Fault("redis_down", REDIS, env.redis_proxy.cut, env.redis_proxy.heal),
        "redis_stalled": Fault("redis_stalled", REDIS, sigstop, sigcont),
        "postgres_down": Fault("postgres_down", POSTGRES, env.pg_proxy.cut, env.pg_proxy.heal),
        "postgres_stalled": Fault("postgres_stalled", POSTGRES, pg_blackhole, env.pg_proxy.heal),
    }


async def _call(
    env: Env, name: str, method: str, path: str, role: str | None, body: Any = None
) -> Answer:
    started = time.perf_counter()
    headers = auth(role) if role else {}
    async with env.client.request(method, path, json=body, headers=headers) as resp:
        data = await resp.json(content_type=None)
        elapsed = time.perf_counter() - started
        code = data.get("code") if isinstance(data, dict) else None
        answer = Answer(name, resp.status, code, elapsed, resp.headers.get("Retry-After"), data)
    env.answers.append(answer)
    return answer


def _reservation(rid: str, quantity: int = 1) -> dict[str, Any]:
    return {
        "reservation_id": rid,
        "ttl_seconds": 600,
        "lines": [{"sku": SKU, "location": LOC, "quantity": quantity}],
    }


async def _availability(env: Env) -> dict[str, Any]:
    answer = await _call(
        env, "check", "GET", f"/v1/availability?sku={SKU}&location={LOC}", "storefront"
    )
    assert answer.status == 200, answer
    return answer.body["items"][0]  # type: ignore[no-any-return]


async def _group(env: Env, group: str) -> Answer:
    """A group read once the config copy has settled: right after a fault a write's Redis half
    may be missing, and the group reads 503 (retry) until the sync task has copied it back."""
    deadline = time.monotonic() + 5
    while True:
        answer = await _call(env, "check", "GET", f"/v1/location-groups/{group}", "ops")
        if answer.status != 503 or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.1)


async def _wait_ready(env: Env) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        async with env.client.get("/readyz") as resp:
            if resp.status == 200:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("the gateway did not become ready after the fault ended")


# What each endpoint needs: an endpoint answers 503 only when a dependency it needs is down.
NEEDS = {
    "stock_events": {REDIS},
    "availability": {REDIS},
    "reserve": {REDIS},
    "get_reservation": {REDIS},
    "release": {REDIS},
    "extend": {REDIS},
    "put_group": {REDIS, POSTGRES},
    "get_group": {REDIS},
    "put_safety_stock": {REDIS, POSTGRES},
}
WRITES = {"stock_events", "reserve", "release", "extend", "put_group", "put_safety_stock"}
OK_STATUS = {"reserve": 201}


async def _round(env: Env, tag: str) -> dict[str, Answer]:
    """Every endpoint once, all at once; what each answered, by endpoint."""
    calls = {
        "stock_events": _call(
            env,
            "stock_events",
            "POST",
            "/v1/stock-events",
            "feed",
            {"events": [event(f"ev-{tag}", "adjustment", 5, 10, sku=SKU, location=LOC)]},
        ),
        "availability": _call(
            env,
            "availability",
            "GET",
            f"/v1/availability?sku={SKU}&location={LOC}",
            "storefront",
        ),
        "reserve": _call(
            env, "reserve", "POST", "/v1/reservations", "storefront", _reservation(f"new-{tag}")
        ),
        "get_reservation": _call(
            env, "get_reservation", "GET", "/v1/reservations/kept", "storefront"
        ),
        "release": _call(env, "release", "DELETE", f"/v1/reservations/rel-{tag}", "storefront"),
        "extend": _call(
            env,
            "extend",
            "POST",
            f"/v1/reservations/ext-{tag}/extend",
            "storefront",
            {"ttl_seconds": 1200},
        ),
        "put_group": _call(
            env,
            "put_group",
            "PUT",
            f"/v1/location-groups/g-{tag}",
            "ops",
            {"locations": [LOC, "L2"]},
        ),
        "get_group": _call(env, "get_group", "GET", "/v1/location-groups/base", "ops"),
        "put_safety_stock": _call(
            env,
            "put_safety_stock",
            "PUT",
            "/v1/safety-stock",
            "ops",
            {"items": [{"location": f"SS-{tag}", "quantity": 3}]},
        ),
    }
    answers = await asyncio.gather(*calls.values())
    return dict(zip(calls, answers, strict=True))


async def _seed(env: Env, tags: list[str]) -> None:
    seed = await _call(
        env,
        "seed",
        "POST",
        "/v1/stock-events",
        "feed",
        {"events": [event("seed", "snapshot", STOCK, 0, sku=SKU, location=LOC)]},
    )
    assert seed.status == 200, seed
    group = await _call(env, "seed", "PUT", "/v1/location-groups/base", "ops", {"locations": [LOC]})
    assert group.status == 200, group
    rids = ["kept"] + [f"{kind}-{tag}" for tag in tags for kind in ("rel", "ext")]
    for rid in rids:
        held = await _call(env, "seed", "POST", "/v1/reservations", "storefront", _reservation(rid))
        assert held.status == 201, held


@pytest.mark.parametrize(
    "fault_name", ["redis_down", "redis_stalled", "postgres_down", "postgres_stalled"]
)
async def test_fault_matrix(env: Env, fault_name: str) -> None:
    tags = [f"{fault_name}-1", f"{fault_name}-2"]
    await _seed(env, tags)
    extended_before = {
        tag: (await _call(env, "seed", "GET", f"/v1/reservations/ext-{tag}", "storefront")).body[
            "expires_at"
        ]
        for tag in tags
    }
    fault = _faults(env)[fault_name]

    await fault.start()
    try:
        rounds = [await _round(env, tag) for tag in tags]
        ready_started = time.perf_counter()
        async with env.client.get("/readyz") as resp:
            ready = await resp.json(content_type=None)
            ready_status, ready_seconds = resp.status, time.perf_counter() - ready_started
    finally:
        await fault.end()

    # Every answer in time, and the right one for what the endpoint needs.
    wrong = []
    for answers in rounds:
        for name, answer in answers.items():
            if answer.seconds > BOUND:
                wrong.append(f"{name}: {answer.seconds:.2f} s")
            if fault.dependency in NEEDS[name]:
                allowed = {"dependency_unavailable"}
                if name in WRITES:
                    allowed.add("outcome_unknown")
                if answer.status != 503 or answer.code not in allowed or not answer.retry_after:
                    wrong.append(f"{name}: {answer.status} {answer.code} {answer.retry_after}")
            elif answer.status != OK_STATUS.get(name, 200):
                wrong.append(f"{name}: {answer.status} {answer.code} (should not need it)")
    assert not wrong, wrong
    assert ready_status == 503, ready
    assert ready_seconds <= BOUND, ready_seconds
    assert ready["checks"][fault.dependency] != "up", ready

    await _wait_ready(env)
    await _check_state(env, tags, rounds, extended_before)


async def _check_state(
    env: Env, tags: list[str], rounds: list[dict[str, Answer]], extended_before: dict[str, str]
) -> None:
    """After recovery, what is in place agrees with what was answered."""
    for tag, answers in zip(tags, rounds, strict=True):
        # Stock events: never applied -> a retry applies them; unknown -> applied or duplicate.
        events = answers["stock_events"]
        retry = await _call(
            env,
            "retry",
            "POST",
            "/v1/stock-events",
            "feed",
            {"events": [event(f"ev-{tag}", "adjustment", 5, 10, sku=SKU, location=LOC)]},
        )
        assert retry.status == 200, retry
        if events.status == 200 or events.code == "dependency_unavailable":
            expect = "duplicate" if events.status == 200 else "applied"
            assert retry.body[expect] == 1, (tag, events, retry)

        # A new reservation: never made -> 404 before the retry; then held either way.
        reserve = answers["reserve"]
        before = await _call(env, "check", "GET", f"/v1/reservations/new-{tag}", "storefront")
        if reserve.code == "dependency_unavailable":
            assert before.status == 404, (tag, before)
        elif reserve.status == 201:
            assert before.body["status"] == "held", before
        again = await _call(
            env, "retry", "POST", "/v1/reservations", "storefront", _reservation(f"new-{tag}")
        )
        assert again.status == 201, again

        # Release: never applied -> still held; then released either way.
        release = answers["release"]
        state = await _call(env, "check", "GET", f"/v1/reservations/rel-{tag}", "storefront")
        if release.code == "dependency_unavailable":
            assert state.body["status"] == "held", (tag, state)
        elif release.status == 200:
            assert state.body["status"] == "released", (tag, state)
        released = await _call(env, "retry", "DELETE", f"/v1/reservations/rel-{tag}", "storefront")
        assert released.body["status"] == "released", released

        # Extend: never applied -> the old expiry.
        if answers["extend"].code == "dependency_unavailable":
            state = await _call(env, "check", "GET", f"/v1/reservations/ext-{tag}", "storefront")
            assert state.body["expires_at"] == extended_before[tag], (tag, state)

        # Ops writes: never applied -> nothing there; a retry then puts them in place.
        put = answers["put_group"]
        group = await _group(env, f"g-{tag}")
        if put.code == "dependency_unavailable":
            assert group.status == 404, (tag, group)
        elif put.status == 200:
            assert group.status == 200, (tag, group)
        again = await _call(
            env, "retry", "PUT", f"/v1/location-groups/g-{tag}", "ops", {"locations": [LOC, "L2"]}
        )
        assert again.status == 200, again
        group = await _group(env, f"g-{tag}")
        assert group.status == 200, group

        safety = answers["put_safety_stock"]
        path = f"/v1/availability?sku={SKU}&location=SS-{tag}"
        if safety.code == "dependency_unavailable":
            item = (await _call(env, "check", "GET", path, "storefront")).body["items"][0]
            assert item["safety_stock"] == 0, (tag, item)
        again = await _call(
            env,
            "retry",
            "PUT",
            "/v1/safety-stock",
            "ops",
            {"items": [{"location": f"SS-{tag}", "quantity": 3}]},
        )
        assert again.status == 200, again
        item = (await _call(env, "check", "GET", path, "storefront")).body["items"][0]
        assert item["safety_stock"] == 3, (tag, item)

    # Held units add up: the seeded "kept" and "ext-*", plus the "new-*" retried above.
    item = await _availability(env)
    assert item["reserved"] == 1 + 2 * len(tags), item
    assert item["on_hand"] == STOCK + 5 * len(tags), item
