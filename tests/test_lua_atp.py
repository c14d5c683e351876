"""Each stock script on its own against real Redis: the KEYS/ARGV/returns contract in its
header, its normal answers and its failure answers (duplicate, stale, rejected, shortfall; a
lost compare-and-set). Loaded as the gateway loads them (the package's ``lib.lua`` first, when
it has one) and called with a plain EVAL; the keys are the caller's to name."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import redis.asyncio as aioredis

import gateway.atp
from gateway.adapters.lua import lua_libs, lua_source
from gateway.atp import keys as atp_keys
from gateway.atp.availability import compute_available

POS, IDS = "t:{A}:p", "t:{A}:ids"
ADJ_L1, ADJ_L2 = "t:{A}:adj:L1", "t:{A}:adj:L2"
ACC_L1, ACC_L2 = "t:{A}:acc:L1", "t:{A}:acc:L2"
HOUR_US = 3600 * 1_000_000
APPLIED, DUPLICATE, STALE, REJECTED = 0, 1, 2, 3


def script(name: str) -> str:
    return lua_source("gateway.atp", name)


async def run(redis: aioredis.Redis, name: str, keys: list[str], args: list[Any]) -> Any:
    return await redis.eval(script(name), len(keys), *keys, *args)


async def now_us(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1_000_000 + int(micros)


async def apply(redis: aioredis.Redis, *events: tuple[int, str, int, str, int]) -> Any:
    """One group (SKU A, locations L1 and L2); each event (location index, kind, occurred_at
    µs, event id, quantity). Returns that group's [codes, shortfalls]."""
    args: list[Any] = [HOUR_US, 2, len(events), "L1", "L2"]
    for event in events:
        args += event
    (group,) = await run(
        redis, "apply_events.lua", [POS, IDS, ADJ_L1, ADJ_L2, ACC_L1, ACC_L2], args
    )
    return group


async def test_apply_snapshot_then_adjustments(redis: aioredis.Redis) -> None:
    t = await now_us(redis)
    codes, short = await apply(
        redis, (1, "s", t, "e1", 10), (1, "a", t + 1, "e2", -3), (2, "a", t + 2, "e3", 4)
    )
    assert (codes, short) == ([APPLIED] * 3, [])
    assert await redis.hmget(POS, "oh:L1", "b:L1", "as:L1", "ag:L1", "bt:L1", "bi:L1") == [
        "7",
        "10",
        "-3",
        "3",
        str(t),
        "e1",
    ]
    assert await redis.hmget(POS, "oh:L2", "bt:L2") == ["4", None]  # no snapshot yet
    assert await redis.zrange(ADJ_L1, 0, -1) == ["-3|e2"]
    # A newer snapshot replaces the base and drops the adjustments it covers.
    codes, _ = await apply(redis, (1, "s", t + 5, "e4", 20))
    assert codes == [APPLIED]
    assert await redis.hmget(POS, "oh:L1", "as:L1", "ag:L1") == ["20", "0", "0"]
    assert await redis.zcard(ADJ_L1) == 0


async def test_apply_duplicate_and_stale(redis: aioredis.Redis) -> None:
    t = await now_us(redis)
    await apply(redis, (1, "s", t, "e1", 10))
    codes, _ = await apply(
        redis,
        (1, "s", t, "e1", 99),  # seen: duplicate
        (1, "s", t - 1, "e2", 99),  # older than the snapshot held
        (1, "a", t, "e3", 5),  # an adjustment not after the snapshot
        (1, "s", t, "e0", 99),  # same time, smaller id: the held one wins
        (1, "a", t - 2 * HOUR_US, "e5", 5),  # behind the horizon, never seen
    )
    assert codes == [DUPLICATE, STALE, STALE, STALE, STALE]
    assert await redis.hget(POS, "oh:L1") == "10"
    # Behind the horizon: a duplicate while its id is remembered; ids themselves are forgotten
    # once their time falls behind it.
    await redis.zadd(IDS, {"kept": t, "gone": t - 2 * HOUR_US})
    old = t - 2 * HOUR_US
    codes, _ = await apply(redis, (1, "a", old, "kept", 5), (1, "a", old, "gone", 5))
    assert codes == [DUPLICATE, STALE]
    assert await redis.zscore(IDS, "gone") is None


async def test_apply_refuses_what_it_cannot_sum_exactly(redis: aioredis.Redis) -> None:
    t = await now_us(redis)
    limit = 10**15
    codes, _ = await apply(
        redis,
        (1, "a", t, "big", limit + 1),
        (1, "a", t + 1, "ok", limit - 10),
        (1, "a", t + 2, "x", -11),  # the magnitudes count too, not only on-hand
    )
    assert codes == [REJECTED, APPLIED, REJECTED]
    assert await redis.hmget(POS, "oh:L1", "ag:L1") == [str(limit - 10)] * 2
    # Refused ids are forgotten: a corrected retry is not taken for a duplicate.
    assert await redis.zscore(IDS, "big") is None
    codes, _ = await apply(redis, (1, "a", t + 3, "big", 5))
    assert codes == [APPLIED]
    assert await redis.hget(POS, "oh:L1") == str(limit - 5)


async def test_apply_reports_holds_above_on_hand(redis: aioredis.Redis) -> None:
    t = await now_us(redis)
    await redis.hset(POS, mapping={"res:L1": 6, "com:L1": 2, "com:L2": 9})
    codes, short = await apply(redis, (1, "s", t, "e1", 5), (2, "s", t, "e2", 1))
    assert codes == [APPLIED, APPLIED]
    # L1: 6 + 2 held and committed over 5 on hand; L2 holds nothing (committed only): silent.
    assert short == ["L1", "3"]
    assert await redis.hget(POS, "res:L1") == "6"  # holds are never dropped


async def test_apply_folds_adjustments_behind_the_horizon(redis: aioredis.Redis) -> None:
    t = await now_us(redis)
    await apply(redis, (1, "s", t, "e1", 10), (1, "a", t + 1, "e2", -4))
    # Age the adjustment past the horizon: the next call folds it into the base.
    await redis.zadd(ADJ_L1, {"-4|e2": t - 2 * HOUR_US})
    codes, _ = await apply(redis, (2, "a", t + 2, "e3", 1))
    assert codes == [APPLIED]
    assert await redis.hmget(POS, "b:L1", "as:L1", "ag:L1", "oh:L1") == ["6", "0", "0", "6"]
    assert await redis.zcard(ADJ_L1) == 0


async def test_apply_groups_answer_in_order(redis: aioredis.Redis) -> None:
    t = await now_us(redis)
    keys = [POS, IDS, ADJ_L1, ACC_L1, "t:{B}:p", "t:{B}:ids", "t:{B}:adj:L9", "t:{B}:acc:L9"]
    args = [
        HOUR_US,
        1,
        1,
        "L1",
        1,
        "s",
        t,
        "a1",
        3,
        1,
        2,
        "L9",
        1,
        "a",
        t,
        "b1",
        2,
        1,
        "a",
        t,
        "b1",
        2,
    ]
    assert await run(redis, "apply_events.lua", keys, args) == [
        [[APPLIED], []],
        [[APPLIED, DUPLICATE], []],
    ]
    assert await redis.hget("t:{B}:p", "oh:L9") == "2"


async def test_config_marker_compare_and_set(redis: aioredis.Redis) -> None:
    assert await run(redis, "config_marker.lua", ["t:marker"], ["", "v1"]) == 0
    assert await redis.get("t:marker") == "dirty"  # nobody can vouch for the copy now
    await redis.set("t:marker", "v1")
    assert await run(redis, "config_marker.lua", ["t:marker"], ["v1", "v2"]) == 1
    assert await redis.get("t:marker") == "v2"
    assert await run(redis, "config_marker.lua", ["t:marker"], ["v1", "v3"]) == 0
    assert await redis.get("t:marker") == "dirty"


async def test_lib_names_the_fields_and_formula_keys_py_does(redis: aioredis.Redis) -> None:
    """lib.lua and gateway/atp/keys.py are the two homes of the layout: they must agree, and
    Lua's availability formula must answer as Python's."""
    body = (
        "local f = position_fields(ARGV[1])\n"
        "return {f.oh, f.res, f.com, f.ss, f.b, f.bt, f.bi, f.as, f.ag,"
        " available(10, 2, 3, 1), available(1, 2, 3, 4), shortfall(1, 2, 3), shortfall(9, 2, 3)}"
    )
    reply = await redis.eval(lua_libs("gateway.atp") + body, 0, "L7")
    assert reply[:9] == [
        *atp_keys.figure_fields("L7"),
        *(
            prefix + "L7"
            for prefix in (
                atp_keys.BASE,
                atp_keys.BASE_TIME,
                atp_keys.BASE_EVENT_ID,
                atp_keys.ADJUSTMENT_SUM,
                atp_keys.ADJUSTMENT_GROSS,
            )
        ),
    ]
    assert reply[9:11] == [compute_available(10, 2, 3, 1), compute_available(1, 2, 3, 4)]
    assert reply[11:] == [4, 0]


def test_field_names_are_spelled_only_in_keys_py() -> None:
    """No other module of gateway/atp spells a key or hash-field name of the layout."""
    spelled = re.compile(r"""["'](atp:|oh:|res:|com:|ss:|b:|bt:|bi:|as:|ag:)""")
    root = pathlib.Path(gateway.atp.__file__).parent
    offenders = [
        f"{path.name}:{n}"
        for path in sorted(root.glob("*.py"))
        if path.name != "keys.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if spelled.search(line) or "PREFIX}:" in line
    ]
    assert offenders == []
