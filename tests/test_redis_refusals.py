"""Redis refusing this gateway's connection (a password missing or rotated, the server full of
clients) is the dependency unable to serve now: 503 ``dependency_unavailable``, nothing applied,
on the lean connection and on redis-py's path (a cluster, TLS) alike. Never a 500, and never an
unknown outcome: a refused command did not run."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.adapters.redis import RedisPort
from gateway.adapters.redis_errors import classify, error_reply
from gateway.dev.services import _spawn_redis, _wait_for, free_port, stop_process
from gateway.errors import DependencyDown

PASSWORD = "s3cret"


def _lean(url: str) -> RedisPort:
    return RedisPort.from_url(url, cluster=False, timeout=0.5)


def _library(url: str) -> RedisPort:
    return RedisPort(aioredis.Redis.from_url(url), None, timeout=0.5)


PATHS = [pytest.param(_lean, id="lean"), pytest.param(_library, id="redis-py")]


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[int]:
    binary = shutil.which("redis-server")
    assert binary is not None
    number = free_port()
    proc = _spawn_redis(binary, number, *request.param)
    try:
        _wait_for("127.0.0.1", number, proc, "redis-server")
        yield number
    finally:
        stop_process(proc)


@pytest.fixture
async def direct(server: int) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(f"redis://:{PASSWORD}@127.0.0.1:{server}/0")
    yield client
    await client.aclose()


async def _refused(port: RedisPort) -> DependencyDown:
    try:
        with pytest.raises(DependencyDown) as refused:
            await asyncio.wait_for(port.execute([("SET", "k", "written")]), 5)
    finally:
        await port.close()
    return refused.value


@pytest.mark.parametrize("server", [("--requirepass", PASSWORD)], indirect=True)
@pytest.mark.parametrize("make", PATHS)
@pytest.mark.parametrize("password", ["", ":wrong@"], ids=["NOAUTH", "WRONGPASS"])
async def test_a_refused_password_is_dependency_unavailable(
    server: int, direct: aioredis.Redis, make: Callable[[str], RedisPort], password: str
) -> None:
    error = await _refused(make(f"redis://{password}127.0.0.1:{server}/0"))
    assert error.http_status == 503
    assert await direct.get("k") is None


@pytest.mark.parametrize(
    "server", [("--maxclients", "1", "--requirepass", PASSWORD)], indirect=True
)
@pytest.mark.parametrize("make", PATHS)
async def test_a_server_full_of_clients_is_dependency_unavailable(
    server: int, direct: aioredis.Redis, make: Callable[[str], RedisPort]
) -> None:
    for _ in range(50):  # the one client it takes (once it has let go of the readiness check)
        try:
            assert await direct.ping()
            break
        except RedisConnectionError:
            await asyncio.sleep(0.02)
    await _refused(make(f"redis://:{PASSWORD}@127.0.0.1:{server}/0"))
    assert await direct.get("k") is None


@pytest.mark.parametrize(
    "message",
    [
        "NOAUTH Authentication required.",
        "WRONGPASS invalid username-password pair or user is disabled.",
        "ERR max number of clients reached",
        "LOADING Redis is loading the dataset in memory",
    ],
)
def test_refusal_replies_are_classified_unavailable(message: str) -> None:
    assert isinstance(error_reply(ResponseError(message)), DependencyDown)
    assert isinstance(classify(ResponseError(message), [("SET", "k", "v")]), DependencyDown)
