"""Ops configuration of availability: location groups and safety stock.

PostgreSQL is the record, Redis the copy that reads use. A write commits to PostgreSQL first,
then updates Redis, so its answer is honest: a failure before COMMIT was sent is
``dependency_unavailable`` (nothing applied); a COMMIT sent and not answered, or a committed
change whose Redis half failed, is ``outcome_unknown`` (the record may hold it, and if it does,
the sync below brings it to Redis).

Keeping the copy: every write bumps a one-row counter (``config_version``) in its transaction,
and the Redis copy carries a marker naming the version it reflects. Each gateway compares the two
about once a second (:meth:`LocationConfig.keep_in_sync`) and copies the record back when they
differ: Redis lost its data (a FLUSHALL, a failover to an empty replica), or a write's Redis half
failed. No restart needed.

The marker protocol, so that a copy is vouched for only when it is whole. Writers (ops writes and
copies, from any gateway) may interleave, and on a cluster their keys live on different nodes, so
no write is atomic with its marker. Instead each writer:

1. claims the marker with a token of its own (an ops write of version v only if the marker says
   v-1, i.e. Redis held exactly the version its change applies to; a copy unconditionally);
2. writes its keys, waiting for every reply;
3. swaps its token for its version, compare-and-set; if the marker no longer holds its token, it
   is left ``dirty``.

A failed compare-and-set leaves ``dirty`` too (``config_marker.lua``). So the marker names a
version only if no other writer's keys landed between that writer's claim and its swap, and a
writer that lands later disturbs it: any interleaving ends with a marker that is ``dirty``, a
stale token, or a version that differs from the record's, and the next sync copies the record.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import structlog

from gateway.atp import keys
from gateway.atp.schemas import LocationGroupOut, SafetyStockEntry
from gateway.atp.store import AtpStore
from gateway.errors import (
    RETRY_AFTER,
    ConfigNotCopied,
    NotFound,
    OutcomeUnknown,
    ValidationFailed,
)
from gateway.metrics import CONFIG_RESTORES
from gateway.ports import (
    FieldWrite,
    LocationConfigRecord,
    Records,
    RecordWriter,
    SafetyStockRow,
    ValueWrite,
)

log = structlog.get_logger(__name__)

MARKER: Final = keys.CONFIG_MARKER
_PENDING: Final = b"pending:"
_CHUNK: Final = 5000
SYNC_INTERVAL: Final = 1.0
# Its own generator: the global one is shared state (and property tests watch it).
_JITTER: Final = random.Random()


class LocationConfig:
    def __init__(
        self,
        record: LocationConfigRecord,
        store: AtpStore,
        writer: RecordWriter,
        records: Records,
        *,
        redis_check: Callable[[], None] | None = None,
    ) -> None:
        self._record = record
        self._store = store
        self._writer = writer
        self._records = records
        # Raises DependencyDown while Redis is known down: a write then fails before it
        # touches the record, and answers "nothing applied" instead of "outcome unknown".
        self._redis_check = redis_check
        self._pending_seen: bytes | None = None
        self._sync_failing = False

    # -- writes ------------------------------------------------------------------------------

    async def put_group(self, group: str, locations: Sequence[str]) -> LocationGroupOut:
        seen: set[str] = set()
        errors = []
        for index, location in enumerate(locations):
            if location in seen:
                errors.append({"field": f"locations[{index}]", "message": "duplicate location"})
            seen.add(location)
        if errors:
            raise ValidationFailed(errors)
        members = list(locations)
        await self._write(
            [ValueWrite(keys.location_group(group), ",".join(members))],
            lambda: self._record.save_group(group, members),
        )
        log.info("location_group_updated", group=group, members=len(members))
        return LocationGroupOut(group=group, locations=members)

    async def put_safety_stock(self, items: Sequence[SafetyStockEntry]) -> int:
        rows = [SafetyStockRow(i.location, i.sku or "", i.quantity) for i in items]
        await self._write(
            [_safety_write(*row) for row in rows], lambda: self._record.save_safety_stock(rows)
        )
        log.info("safety_stock_updated", items=len(rows))
        return len(rows)

    async def _write(
        self, writes: list[ValueWrite | FieldWrite], save: Callable[[], Awaitable[int]]
    ) -> None:
        if self._redis_check is not None:
            self._redis_check()
        version = await save()  # DependencyDown / OutcomeUnknown as they are
        try:
            token = _token()
            await self._swap(str(version - 1), token)
            await self._send(writes)
            await self._swap(token, str(version))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Committed: whatever Redis did or did not do, the sync makes the copy whole.
            log.warning("config_copy_failed", version=version, error=f"{type(exc).__name__}: {exc}")
            raise OutcomeUnknown(
                "the change is in the record (PostgreSQL) but Redis did not confirm its copy; "
                "gateways copy the record to Redis within seconds. Retrying is safe",
                dependency="redis",
                retry_after=RETRY_AFTER,
            ) from exc

    # -- reads -------------------------------------------------------------------------------

    async def get_group(self, group: str) -> LocationGroupOut:
        raw, marker = await self._records.values([keys.location_group(group), MARKER])
        if raw is None:
            if keys.config_copy_missing(marker):
                raise ConfigNotCopied()
            raise NotFound(f"location group {group!r} does not exist", group=group)
        return LocationGroupOut(group=group, locations=bytes(raw).decode().split(","))

    # -- keeping the copy --------------------------------------------------------------------

    async def keep_in_sync(self, interval: float = SYNC_INTERVAL) -> None:
        """Owned worker: compare the copy with the record about every ``interval`` seconds
        (jittered, so gateways started together do not copy at the same moment)."""
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a dependency is down: try on the next tick
                if not self._sync_failing:
                    log.warning("config_sync_failed", error=f"{type(exc).__name__}: {exc}")
                self._sync_failing = True
            else:
                if self._sync_failing:
                    log.info("config_sync_recovered")
                self._sync_failing = False
            await asyncio.sleep(interval * _JITTER.uniform(0.5, 1.5))

    async def sync(self) -> bool:
        """Copy the record to Redis if Redis does not hold its version; True if it copied."""
        version = await self._record.version()
        marker = await self._records.value(MARKER)
        if marker is not None and bytes(marker) == str(version).encode():
            self._pending_seen = None
            return False
        if (
            marker is not None
            and bytes(marker).startswith(_PENDING)
            and bytes(marker) != self._pending_seen
        ):
            # A writer is between its claim and its swap: give it a tick before taking over.
            self._pending_seen = bytes(marker)
            return False
        self._pending_seen = None
        await self.restore()
        return True

    async def restore(self) -> int:
        """Copy the whole record to Redis (one snapshot of it); returns the version copied."""
        version, groups, stock = await self._record.snapshot()
        writes: list[ValueWrite | FieldWrite] = [
            ValueWrite(keys.location_group(group), ",".join(members)) for group, members in groups
        ]
        writes += [_safety_write(*row) for row in stock]
        # A restore's own token: until the swap, readers know a missing group may not be back yet.
        token = keys.CONFIG_RESTORING.decode() + uuid.uuid4().hex
        await self._send([ValueWrite(MARKER, token)])
        await self._send(writes)
        vouched = await self._swap(token, str(version))
        CONFIG_RESTORES.inc()
        log.info(
            "location_config_restored",
            version=version,
            groups=len(groups),
            safety_stock=len(stock),
            vouched=vouched,
        )
        return version

    async def _send(self, writes: Sequence[ValueWrite | FieldWrite]) -> None:
        for start in range(0, len(writes), _CHUNK):
            await self._writer.write(writes[start : start + _CHUNK])

    async def _swap(self, expected: str, new: str) -> bool:
        return await self._store.swap_config_marker(expected, new)


def _token() -> str:
    return f"{_PENDING.decode()}{uuid.uuid4().hex}"


def _safety_write(location: str, sku: str, quantity: int) -> FieldWrite:
    if sku:
        return FieldWrite(keys.position(sku), keys.safety_stock_field(location), quantity)
    return FieldWrite(keys.LOCATION_SAFETY_STOCK, location, quantity)
