"""The location config's record in PostgreSQL: the SQL behind :class:`LocationConfigRecord`.

Every save bumps the one-row ``config_version`` in its own transaction, so a gateway comparing
the record's version with the Redis copy's marker sees every change (see
``gateway.atp.config_store``). Bounds and honest outcomes are :class:`Postgres`'s: a failure
before COMMIT was sent is ``dependency_unavailable``, an unanswered COMMIT ``outcome_unknown``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import asyncpg

from gateway.adapters.postgres import Postgres
from gateway.ports import ConfigSnapshot, SafetyStockRow

_BUMP_VERSION: Final = "UPDATE config_version SET version = version + 1 RETURNING version"
_UPSERT_GROUP: Final = """
    INSERT INTO location_groups (group_name, locations) VALUES ($1, $2)
    ON CONFLICT (group_name)
    DO UPDATE SET locations = EXCLUDED.locations, updated_at = now()"""
_UPSERT_SAFETY_STOCK: Final = """
    INSERT INTO safety_stock (location, sku, quantity) VALUES ($1, $2, $3)
    ON CONFLICT (location, sku)
    DO UPDATE SET quantity = EXCLUDED.quantity, updated_at = now()"""


class PostgresConfigRecord:
    """:class:`gateway.ports.LocationConfigRecord` on the gateway's PostgreSQL port."""

    def __init__(self, db: Postgres) -> None:
        self._db = db

    async def version(self) -> int:
        return await self._db.read(_read_version)

    async def snapshot(self) -> ConfigSnapshot:
        # A bulk read: a big config may take longer to read than a request may wait, and a
        # slow read is not an outage, so it must not mark PostgreSQL down for every other call.
        return await self._db.read(_read_all, snapshot=True, bulk=True)

    async def save_group(self, group: str, locations: Sequence[str]) -> int:
        members = list(locations)

        async def save(conn: asyncpg.Connection) -> int:
            await conn.execute(_UPSERT_GROUP, group, members)
            return int(await conn.fetchval(_BUMP_VERSION))

        return await self._db.write(save)

    async def save_safety_stock(self, rows: Sequence[SafetyStockRow]) -> int:
        async def save(conn: asyncpg.Connection) -> int:
            await conn.executemany(_UPSERT_SAFETY_STOCK, rows)
            return int(await conn.fetchval(_BUMP_VERSION))

        return await self._db.write(save)


async def _read_version(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT version FROM config_version"))


async def _read_all(conn: asyncpg.Connection) -> ConfigSnapshot:
    version = await _read_version(conn)
    groups = await conn.fetch("SELECT group_name, locations FROM location_groups")
    stock = await conn.fetch("SELECT location, sku, quantity FROM safety_stock")
    return ConfigSnapshot(
        version,
        [(r["group_name"], r["locations"]) for r in groups],
        [SafetyStockRow(r["location"], r["sku"], r["quantity"]) for r in stock],
    )
