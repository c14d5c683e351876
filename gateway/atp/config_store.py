"""Ops configuration of availability: location groups and safety stock.

PostgreSQL is the record, Redis the copy that reads use. A write commits to PostgreSQL first, then
updates Redis; if Redis loses its data, :meth:`LocationConfig.restore` copies the record back
(each gateway does so at start when Redis lacks the marker key).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import asyncpg
import structlog

from gateway.atp import keys
from gateway.atp.ports import CommandSender, CommandWriter
from gateway.atp.schemas import LocationGroupOut, SafetyStockEntry
from gateway.errors import NotFound, ValidationFailed

log = structlog.get_logger(__name__)
_RESTORED_MARKER: Final = f"{keys.PREFIX}:config:restored"


class LocationConfig:
    def __init__(self, pool: asyncpg.Pool, redis: CommandWriter, batcher: CommandSender) -> None:
        self._pool = pool
        self._redis = redis
        self._batcher = batcher

    async def put_group(self, group: str, locations: Sequence[str]) -> LocationGroupOut:
        seen: set[str] = set()
        errors = []
        for index, location in enumerate(locations):
            if location in seen:
                errors.append({"field": f"locations[{index}]", "message": "duplicate location"})
            seen.add(location)
        if errors:
            raise ValidationFailed(errors)
        await self._pool.execute(
            """INSERT INTO location_groups (group_name, locations) VALUES ($1, $2)
               ON CONFLICT (group_name)
               DO UPDATE SET locations = EXCLUDED.locations, updated_at = now()""",
            group,
            list(locations),
        )
        await self._redis.execute([("SET", keys.location_group(group), ",".join(locations))])
        log.info("location_group_updated", group=group, members=len(locations))
        return LocationGroupOut(group=group, locations=list(locations))

    async def get_group(self, group: str) -> LocationGroupOut:
        raw = await self._batcher.call("GET", keys.location_group(group))
        if raw is None:
            raise NotFound(f"location group {group!r} does not exist", group=group)
        return LocationGroupOut(group=group, locations=bytes(raw).decode().split(","))

    async def put_safety_stock(self, items: Sequence[SafetyStockEntry]) -> int:
        rows = [(i.location, i.sku or "", i.quantity) for i in items]
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                """INSERT INTO safety_stock (location, sku, quantity) VALUES ($1, $2, $3)
                   ON CONFLICT (location, sku)
                   DO UPDATE SET quantity = EXCLUDED.quantity, updated_at = now()""",
                rows,
            )
        await self._redis.execute([_safety_command(*row) for row in rows])
        log.info("safety_stock_updated", items=len(rows))
        return len(rows)

    async def restore(self, *, force: bool = False) -> bool:
        """Copy the record into Redis when Redis has lost it (or when forced)."""
        if not force and await self._batcher.call("EXISTS", _RESTORED_MARKER):
            return False
        groups = await self._pool.fetch("SELECT group_name, locations FROM location_groups")
        commands: list[tuple[Any, ...]] = [
            ("SET", keys.location_group(r["group_name"]), ",".join(r["locations"])) for r in groups
        ]
        async with self._pool.acquire() as conn, conn.transaction():
            async for r in conn.cursor("SELECT location, sku, quantity FROM safety_stock"):
                commands.append(_safety_command(r["location"], r["sku"], r["quantity"]))
                if len(commands) >= 5000:
                    await self._redis.execute(commands)
                    commands = []
        commands.append(("SET", _RESTORED_MARKER, "1"))
        await self._redis.execute(commands)
        log.info("location_config_restored", groups=len(groups))
        return True


def _safety_command(location: str, sku: str, quantity: int) -> tuple[Any, ...]:
    if sku:
        return ("HSET", keys.position(sku), keys.safety_stock_field(location), quantity)
    return ("HSET", keys.LOCATION_SAFETY_STOCK, location, quantity)
