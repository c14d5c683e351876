"""The domain's record ports (:mod:`gateway.ports`) on Redis: reads in the batcher's next round
trip, writes sent at once, each translated to the commands they are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from gateway.ports import FieldsRead, FieldWrite, ValueWrite


class CommandSender(Protocol):
    """Sends commands in a shared round trip (:class:`gateway.adapters.batcher.CommandBatcher`)."""

    async def call_many(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]: ...


class CommandWriter(Protocol):
    """Sends commands now, in order (:class:`gateway.adapters.redis.RedisPort`)."""

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]: ...


class RedisRecords:
    """:class:`gateway.ports.Records` on a command batcher."""

    def __init__(self, sender: CommandSender) -> None:
        self._sender = sender

    async def fields(self, reads: Sequence[FieldsRead]) -> list[list[Any]]:
        return await self._sender.call_many([("HMGET", key, *names) for key, names in reads])

    async def values(self, keys: Sequence[str]) -> list[Any]:
        return await self._sender.call_many([("GET", key) for key in keys])

    async def value(self, key: str) -> Any:
        (reply,) = await self._sender.call_many((("GET", key),))
        return reply

    async def now_ms(self) -> int:
        ((seconds, micros),) = await self._sender.call_many((("TIME",),))
        return int(seconds) * 1000 + int(micros) // 1000

    async def due(self, indexes: Sequence[str], until_ms: int, limit: int) -> list[list[str]]:
        replies = await self._sender.call_many(
            [("ZRANGEBYSCORE", index, "-inf", until_ms, "LIMIT", 0, limit) for index in indexes]
        )
        return [[bytes(member).decode() for member in members] for members in replies]

    async def count_live(self, index: str) -> int:
        now = await self.now_ms()
        (count,) = await self._sender.call_many((("ZCOUNT", index, f"({now}", "+inf"),))
        return int(count)


class RedisRecordWriter:
    """:class:`gateway.ports.RecordWriter` on the Redis port: sent at once, in order."""

    def __init__(self, writer: CommandWriter) -> None:
        self._writer = writer

    async def write(self, writes: Sequence[ValueWrite | FieldWrite]) -> None:
        await self._writer.execute(
            [("SET", w.key, w.value) if isinstance(w, ValueWrite) else ("HSET", *w) for w in writes]
        )
