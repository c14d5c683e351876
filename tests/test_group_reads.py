"""Group reads ask Redis for the config marker only when a group is missing: the hot path (an
availability read or a reservation over a group that exists) sends no extra command, and a
missing group is still 503 while Redis lacks the config copy, 404 / 422 once it has it."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.adapters.batcher import CommandBatcher
from gateway.adapters.records import RedisRecords
from gateway.adapters.redis import RedisPort
from gateway.adapters.reserve_coalescer import ReserveCoalescer
from gateway.adapters.scripts import ScriptRegistry
from gateway.atp import keys
from gateway.atp.availability import AvailabilityReader
from gateway.errors import ConfigNotCopied, NotFound, ValidationFailed
from gateway.reservation.schemas import LineRequest, ReservationRequest
from gateway.reservation.service import ReservationService


class Recording:
    """A command sender that remembers every command it passes on (to a real Redis)."""

    def __init__(self, batcher: CommandBatcher) -> None:
        self._batcher = batcher
        self.sent: list[tuple[Any, ...]] = []

    async def call_many(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        self.sent += commands
        return await self._batcher.call_many(commands)

    async def call(self, *command: Any) -> Any:
        return (await self.call_many((command,)))[0]

    def asked_for_marker(self) -> bool:
        return any(keys.CONFIG_MARKER in command for command in self.sent)


@pytest.fixture
async def sender(redis_url: str, redis: aioredis.Redis) -> AsyncIterator[Recording]:
    port = RedisPort.from_url(redis_url, cluster=False)
    batcher = CommandBatcher(functools.partial(port.execute, raise_on_error=False))
    runner = asyncio.create_task(batcher.run())
    await redis.set(keys.location_group("g"), "L1,L2")
    await redis.set(keys.CONFIG_MARKER, "7")
    await redis.hset(keys.position("A"), mapping={"oh:L1": 5, "oh:L2": 3})
    yield Recording(batcher)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    await port.close()


@pytest.fixture
async def service(sender: Recording, redis_url: str) -> AsyncIterator[ReservationService]:
    port = RedisPort.from_url(redis_url, cluster=False)
    svc = ReservationService(
        ScriptRegistry(port, "gateway.reservation"),
        RedisRecords(sender),
        ReserveCoalescer(ScriptRegistry(port, "gateway.reservation")),
        cluster=False,
        max_ttl_seconds=3600,
    )
    yield svc
    await svc.close()
    await port.close()


def _request(rid: str, group: str) -> ReservationRequest:
    return ReservationRequest(
        reservation_id=rid, lines=[LineRequest(sku="A", location_group=group, quantity=1)]
    )


async def test_an_availability_read_over_a_group_sends_no_marker_read(
    sender: Recording, redis: aioredis.Redis
) -> None:
    reader = AvailabilityReader(RedisRecords(sender))
    (item,) = await reader.in_group(["A"], "g")
    assert item.available == 8
    assert not sender.asked_for_marker()
    with pytest.raises(NotFound):  # the copy is whole (the marker names a version): no group
        await reader.in_group(["A"], "missing")
    assert sender.asked_for_marker()
    await redis.delete(keys.CONFIG_MARKER)  # Redis lost the copy: the group may exist
    with pytest.raises(ConfigNotCopied):
        await reader.in_group(["A"], "missing")


async def test_a_reservation_over_a_group_sends_no_marker_read(
    sender: Recording, service: ReservationService, redis: aioredis.Redis
) -> None:
    made = await service.reserve(_request("r1", "g"))
    assert made.reservation is not None
    assert not sender.asked_for_marker()
    with pytest.raises(ValidationFailed):
        await service.reserve(_request("r2", "missing"))
    assert sender.asked_for_marker()
    await redis.set(keys.CONFIG_MARKER, "pending:restore:x")  # a copy being written
    with pytest.raises(ConfigNotCopied):
        await service.reserve(_request("r3", "missing"))
