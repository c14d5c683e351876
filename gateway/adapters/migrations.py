"""The migration runner: plain numbered ``.sql`` files in ``gateway/migrations``.

Each migration runs in its own transaction and is recorded in ``schema_migrations``. Several
gateways may start at once, so the runner holds a session advisory lock while it applies what is
pending. Every wait is bounded:

- the lock: at most ``lock_wait`` seconds, enforced by the server (``lock_timeout``), so a lock
  held by a session that went silent (a partitioned gateway, whose session the server keeps until
  TCP gives up on it) ends in :class:`MigrationLockBusy`, not in a wait without end;
- the bookkeeping statements: ``answer_within`` seconds each step;
- a pending migration: :data:`MIGRATION_DEADLINE` (one may legitimately run long: an index on a
  big table).

A gateway starting up waits for the lock no longer than its PostgreSQL timeout and leaves further
tries to its background connector (``gateway.adapters.postgres``); ``gateway migrate``, a one-shot
command, waits longer (``--lock-wait``, :data:`CLI_LOCK_WAIT` by default).
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass
from importlib import resources
from typing import Final

import asyncpg
import structlog

log = structlog.get_logger(__name__)

# Arbitrary, fixed: every gateway process must contend for the same lock (per database).
MIGRATION_LOCK_ID: Final = 0x617470_6D6967
MIGRATION_DEADLINE: Final = 300.0
CLI_LOCK_WAIT: Final = 300.0
_FILE_NAME: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationLockBusy(Exception):
    """Another session held the migration lock for the whole wait."""


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


async def migrate(
    conn: asyncpg.Connection, *, lock_wait: float = CLI_LOCK_WAIT, answer_within: float = 10.0
) -> list[int]:
    """Apply pending migrations; returns the versions applied by this call.

    On failure the caller should terminate ``conn``: that also releases the lock."""
    await _lock(conn, lock_wait, answer_within)
    # No unlock on failure: the connection may be what failed; ending it releases the lock.
    async with asyncio.timeout(answer_within):
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await conn.fetch("SELECT version FROM schema_migrations")
    done = {r["version"] for r in rows}
    applied_now: list[int] = []
    for migration in available_migrations():
        if migration.version in done:
            continue
        # Not ``async with conn.transaction()``: on a timeout it would wait for a ROLLBACK that
        # a stalled server never answers. Ending the connection rolls back instead.
        async with asyncio.timeout(MIGRATION_DEADLINE):
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            await transaction.commit()
        log.info("migration_applied", version=migration.version, name=migration.name)
        applied_now.append(migration.version)
    async with asyncio.timeout(answer_within):
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied_now


async def _lock(conn: asyncpg.Connection, lock_wait: float, answer_within: float) -> None:
    # lock_timeout bounds the wait on the server, which answers when it ends: a client-side
    # timeout alone could not tell "the lock is busy" from "the server is stalled".
    ms = max(1, math.ceil(lock_wait * 1000))
    try:
        async with asyncio.timeout(lock_wait + answer_within):
            await conn.execute(f"SET lock_timeout = {ms}")
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
            await conn.execute("RESET lock_timeout")  # a migration's own statements may wait
    except asyncpg.LockNotAvailableError:
        raise MigrationLockBusy(
            f"another session held the migration lock for the whole {lock_wait:g}s wait "
            "(a migration still running, or a session that died holding it: see pg_locks)"
        ) from None


async def migrate_dsn(
    dsn: str, timeout_seconds: float = 10.0, *, lock_wait: float | None = None
) -> list[int]:
    """Connect (within ``timeout_seconds``) and apply pending migrations, waiting at most
    ``lock_wait`` seconds (default ``timeout_seconds``) for another process's migration.

    A connection that fails or stalls is terminated, not waited on, so this always returns or
    raises."""
    conn = await asyncpg.connect(dsn, timeout=timeout_seconds)
    try:
        applied = await migrate(
            conn,
            lock_wait=timeout_seconds if lock_wait is None else lock_wait,
            answer_within=timeout_seconds,
        )
    finally:
        conn.terminate()  # nothing is pending on it: no goodbye to wait for
    return applied
