"""A hypothesis state machine: reserve / release / confirm / extend / expire / stock events,
checked step by step against a plain-Python model of the same rules."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from gateway.adapters.batcher import CommandBatcher
from gateway.adapters.records import RedisRecords
from gateway.adapters.redis import RedisPort
from gateway.adapters.reserve_coalescer import ReserveCoalescer
from gateway.adapters.scripts import ScriptRegistry
from gateway.atp import keys as atp_keys
from gateway.atp.events import EventApplier
from gateway.atp.schemas import StockEvent
from gateway.errors import Conflict, NotFound
from gateway.reservation import keys
from gateway.reservation.expiry import sweep_once
from gateway.reservation.schemas import LineRequest, ReservationRequest, lines_of
from gateway.reservation.service import ReservationService

SKUS = ("A", "B")
LOCATIONS = ("L1", "L2")
SAFETY = {"L1": 0, "L2": 1}
GROUP = "G"  # L1, L2 in that order


@dataclass
class Model:
    on_hand: dict[tuple[str, str], int] = field(
        default_factory=lambda: {(s, loc): 0 for s in SKUS for loc in LOCATIONS}
    )
    reserved: dict[tuple[str, str], int] = field(
        default_factory=lambda: {(s, loc): 0 for s in SKUS for loc in LOCATIONS}
    )
    committed: dict[tuple[str, str], int] = field(
        default_factory=lambda: {(s, loc): 0 for s in SKUS for loc in LOCATIONS}
    )
    # id -> (status, [(sku, location, qty)])
    reservations: dict[str, tuple[str, list[tuple[str, str, int]]]] = field(default_factory=dict)

    def available(self, pos: tuple[str, str], taken: dict[tuple[str, str], int]) -> int:
        return (
            self.on_hand[pos]
            - self.reserved[pos]
            - self.committed[pos]
            - SAFETY[pos[1]]
            - taken.get(pos, 0)
        )

    def reserve(
        self, lines: list[tuple[str, str | None, int]]
    ) -> list[tuple[str, str, int]] | None:
        taken: dict[tuple[str, str], int] = {}
        plan: list[tuple[str, str, int]] = []
        for sku, location, qty in lines:
            members = [location] if location else list(LOCATIONS)
            cands = [(self.available((sku, m), taken), i, m) for i, m in enumerate(members)]
            cands = [c for c in cands if c[0] > 0]
            if sum(c[0] for c in cands) < qty:
                return None
            cands.sort(key=lambda c: (-c[0], c[1]))
            if cands[0][0] >= qty:
                chosen = [(cands[0][2], qty)]
            else:
                chosen, left = [], qty
                for a, _, m in cands:
                    if left <= 0:
                        break
                    chosen.append((m, min(a, left)))
                    left -= min(a, left)
            for m, q in chosen:
                taken[(sku, m)] = taken.get((sku, m), 0) + q
                plan.append((sku, m, q))
        for sku, m, q in plan:
            self.reserved[(sku, m)] += q
        return plan


class ReservationMachine(RuleBasedStateMachine):
    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.model = Model()
        self.clock = datetime.now(UTC) - timedelta(hours=1)
        self.counter = 0
        self.run(self._setup())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _setup(self) -> None:
        url = ReservationMachine.redis_url
        self.redis = aioredis.Redis.from_url(url, decode_responses=True)
        await self.redis.flushdb()
        self.port = RedisPort.from_url(url, cluster=False)
        self.batcher = CommandBatcher(functools.partial(self.port.execute, raise_on_error=False))
        self.batcher_task = asyncio.get_running_loop().create_task(self.batcher.run())
        self.applier = EventApplier(ScriptRegistry(self.port, "gateway.atp"), horizon_seconds=86400)
        self.service = ReservationService(
            ScriptRegistry(self.port, "gateway.reservation", self.batcher),
            RedisRecords(self.batcher),
            ReserveCoalescer(ScriptRegistry(self.port, "gateway.reservation", self.batcher)),
            cluster=False,
            max_ttl_seconds=3600,
        )
        await self.redis.hset(
            atp_keys.LOCATION_SAFETY_STOCK, mapping={k: v for k, v in SAFETY.items()}
        )
        await self.redis.set(atp_keys.location_group(GROUP), ",".join(LOCATIONS))

    def teardown(self) -> None:
        async def close() -> None:
            self.batcher_task.cancel()
            await asyncio.gather(self.batcher_task, return_exceptions=True)
            await self.port.close()
            await self.redis.aclose()

        self.run(close())
        self.loop.close()

    @rule(sku=st.sampled_from(SKUS), location=st.sampled_from(LOCATIONS), qty=st.integers(0, 12))
    def stock_snapshot(self, sku: str, location: str, qty: int) -> None:
        self.counter += 1
        self.clock += timedelta(seconds=1)
        event = StockEvent(
            event_id=f"ev{self.counter}",
            type="snapshot",
            sku=sku,
            location=location,
            quantity=qty,
            occurred_at=self.clock,
        )
        assert self.run(self.applier.apply([event])).applied == 1
        self.model.on_hand[(sku, location)] = qty

    @rule(
        target=reservations,
        lines=st.lists(
            st.tuples(
                st.sampled_from(SKUS), st.sampled_from([*LOCATIONS, None]), st.integers(1, 6)
            ),
            min_size=1,
            max_size=3,
            unique_by=lambda t: (t[0], t[1]),
        ),
    )
    def reserve(self, lines: list[tuple[str, str | None, int]]) -> str:
        self.counter += 1
        rid = f"r{self.counter}"
        request = ReservationRequest(
            reservation_id=rid,
            lines=[
                LineRequest(sku=s, quantity=q, location=loc, location_group=None if loc else GROUP)
                for s, loc, q in lines
            ],
        )
        outcome = self.run(self.service.reserve(request))
        expected = self.model.reserve(lines)
        if expected is None:
            assert outcome.reservation is None, outcome
            assert outcome.shortfalls
        else:
            assert outcome.reservation is not None, (outcome, expected)
            got = [(ln.sku, ln.location, ln.quantity) for ln in lines_of(outcome.reservation)]
            assert got == expected
            self.model.reservations[rid] = ("held", expected)
        # A retry answers the same and holds nothing more.
        again = self.run(self.service.reserve(request))
        assert (again.reservation is None) == (outcome.reservation is None)
        return rid

    def _settle_model(self, rid: str, final: str) -> None:
        status, lines = self.model.reservations.get(rid, ("missing", []))
        if status != "held":
            return
        for sku, loc, q in lines:
            self.model.reserved[(sku, loc)] -= q
            if final == "confirmed":
                self.model.committed[(sku, loc)] += q
        self.model.reservations[rid] = (final, lines)

    @rule(rid=reservations)
    def release(self, rid: str) -> None:
        status = self.model.reservations.get(rid, ("missing", []))[0]
        if status == "missing":
            with pytest.raises(NotFound):
                self.run(self.service.release(rid))
            return
        if status == "confirmed":
            with pytest.raises(Conflict):
                self.run(self.service.release(rid))
            return
        result = self.run(self.service.release(rid))
        self._settle_model(rid, "released")
        assert result.status == self.model.reservations[rid][0]

    @rule(rid=reservations)
    def confirm(self, rid: str) -> None:
        status = self.model.reservations.get(rid, ("missing", []))[0]
        if status == "missing":
            with pytest.raises(NotFound):
                self.run(self.service.confirm(rid))
            return
        result = self.run(self.service.confirm(rid))
        self._settle_model(rid, "confirmed")
        assert result == self.model.reservations[rid][0]

    @rule(rid=reservations, ttl=st.integers(1, 3600))
    def extend(self, rid: str, ttl: int) -> None:
        status = self.model.reservations.get(rid, ("missing", []))[0]
        if status == "held":
            assert self.run(self.service.extend(rid, ttl)).status == "held"
        else:
            with pytest.raises((NotFound, Conflict)):
                self.run(self.service.extend(rid, ttl))

    @rule(rid=consumes(reservations))
    def expire(self, rid: str) -> None:
        status = self.model.reservations.get(rid, ("missing", []))[0]

        async def force() -> int:
            if await self.redis.exists(keys.record(rid)) and status == "held":
                # Expiry is due now: move the deadline into the past, then let the sweeper run.
                await self.redis.hset(keys.record(rid), "exp", 1)
                await self.redis.zadd(keys.expiry_index(keys.bucket(rid)), {rid: 1})
            return await sweep_once(self.service, RedisRecords(self.batcher))

        expired = self.run(force())
        if status == "held":
            assert expired == 1
            self._settle_model(rid, "expired")
        else:
            assert expired == 0

    @invariant()
    def figures_match_the_model(self) -> None:
        async def read() -> dict[tuple[str, str], tuple[int, int]]:
            out = {}
            for sku in SKUS:
                for loc in LOCATIONS:
                    res, com = await self.redis.hmget(
                        atp_keys.position(sku), f"res:{loc}", f"com:{loc}"
                    )
                    out[(sku, loc)] = (int(res or 0), int(com or 0))
            return out

        actual = self.run(read())
        for pos, (res, com) in actual.items():
            assert (res, com) == (self.model.reserved[pos], self.model.committed[pos]), pos
            assert res >= 0


@pytest.fixture
def machine_redis(redis_url: str) -> str:
    ReservationMachine.redis_url = redis_url  # type: ignore[attr-defined]
    return redis_url


def test_reservations_match_the_model(machine_redis: str) -> None:
    state_machine = ReservationMachine.TestCase
    state_machine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
    state_machine().runTest()
