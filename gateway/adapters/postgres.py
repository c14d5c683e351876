"""PostgreSQL: the connection pool and the migration runner.

Migrations are plain numbered ``.sql`` files in ``gateway/migrations``; each runs in its own
transaction and is recorded in ``schema_migrations``. Several gateways may start at once, so the
runner holds a session advisory lock while it applies what is pending.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Final

import asyncpg
import structlog

log = structlog.get_logger(__name__)

# Arbitrary, fixed: every gateway process must contend for the same lock.
_MIGRATION_LOCK_ID: Final = 0x617470_6D6967
_FILE_NAME: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("gateway.migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations; returns the versions applied by this call."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in available_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("migration_applied", version=migration.version, name=migration.name)
            applied_now.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_ID)
    return applied_now


async def create_pool(dsn: str, timeout_seconds: float = 3.0) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10, command_timeout=10)
    assert pool is not None
    return pool


async def migrate_dsn(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
