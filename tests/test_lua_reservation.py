"""Each reservation script on its own against real Redis: the KEYS/ARGV/returns contract in its
header, its normal answers and its failure answers (short, conflict, replay, missing, retry,
error). The scripts are loaded as the gateway loads them (``lua_source``: the libs first) and
called with a plain EVAL; the keys are the caller's to name, so these use short ones of
their own."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import redis.asyncio as aioredis

import gateway.reservation
from gateway.adapters.lua import lua_libs, lua_source
from gateway.reservation import keys as rsv_keys

REC, IDX, SS = "t:{r}:rec", "t:{r}:idx", "t:ss"
UNV = "t:unverified"
POS, HOLDS = "t:{A}:p", "t:{A}:h"
POS_B, HOLDS_B = "t:{B}:p", "t:{B}:h"
DAY = "86400"


def script(name: str) -> str:
    return lua_source("gateway.reservation", name)


async def run(redis: aioredis.Redis, name: str, keys: list[str], args: list[Any]) -> Any:
    return await redis.eval(script(name), len(keys), *keys, *args)


def line(
    n: int, k: int, sku: str, quantity: int, label: str, members: Any = None, *, group: bool = False
) -> list[Any]:
    """One line as the scripts take it (see ``Line`` in gateway/reservation/replies.py)."""
    return [n, k, sku, quantity, label, 1 if group else 0, members]


def one_reservation(
    rid: str, lines: list[list[Any]], skus: list[str], *, fp: str = "fp1", ttl_ms: int = 60_000
) -> tuple[list[str], list[Any]]:
    """reserve.lua's keys and values for one reservation of SKU A (and B when asked)."""
    pairs = {"A": [POS, HOLDS], "B": [POS_B, HOLDS_B]}
    keys = [REC, IDX, SS, *(k for sku in skus for k in pairs[sku])]
    values = [rid, fp, ttl_ms, json.dumps(lines), json.dumps(skus), DAY, len(keys)]
    return keys, values


async def reserve(redis: aioredis.Redis, rid: str, quantity: int, **kw: Any) -> Any:
    keys, values = one_reservation(rid, [line(0, 1, "A", quantity, "L1")], ["A"], **kw)
    (reply,) = await run(redis, "reserve.lua", keys, [1, *values])
    return reply


# --- reserve.lua --------------------------------------------------------------------------------


async def test_reserve_holds_records_and_indexes(redis: aioredis.Redis) -> None:
    await redis.hset(POS, mapping={"oh:L1": 10, "res:L1": 2, "com:L1": 1, "ss:L1": 1})
    kind, answer, exp = await reserve(redis, "r1", 6)
    assert kind == "held"
    assert json.loads(answer) == [{"sku": "A", "location": "L1", "quantity": 6}]
    assert await redis.hget(POS, "res:L1") == "8"
    assert await redis.hget(HOLDS, "r1") == "L1=6"
    assert await redis.zscore(IDX, "r1") == int(exp)
    record = await redis.hgetall(REC)
    assert record == {"st": "held", "fp": "fp1", "resp": answer, "exp": exp, "skus": '["A"]'}


async def test_reserve_short_holds_nothing_and_keeps_the_refusal(redis: aioredis.Redis) -> None:
    # available = 10 - 2 - 1 - 1 = 6 (the SKU's own safety stock beats the location default)
    await redis.hset(POS, mapping={"oh:L1": 10, "res:L1": 2, "com:L1": 1, "ss:L1": 1})
    await redis.hset(SS, "L1", 5)
    kind, answer = await reserve(redis, "r1", 7)
    assert kind == "short"
    assert json.loads(answer) == [{"sku": "A", "location": "L1", "requested": 7, "available": 6}]
    assert await redis.hget(POS, "res:L1") == "2"
    assert await redis.exists(HOLDS) == 0
    assert await redis.zscore(IDX, "r1") is None
    assert await redis.hgetall(REC) == {"st": "rejected", "fp": "fp1", "resp": answer}
    assert 0 < await redis.ttl(REC) <= 86400
    # Replayed: the same refusal, with nothing held.
    assert await reserve(redis, "r1", 7) == ["replay", "rejected", answer, ""]


async def test_reserve_replay_and_conflict(redis: aioredis.Redis) -> None:
    await redis.hset(POS, "oh:L1", 10)
    _, answer, exp = await reserve(redis, "r1", 3)
    assert await reserve(redis, "r1", 3) == ["replay", "held", answer, exp]
    assert await reserve(redis, "r1", 3, fp="other") == ["conflict"]
    assert await redis.hget(POS, "res:L1") == "3"  # neither held again


async def test_reserve_group_splits_by_most_available_with_default_safety_stock(
    redis: aioredis.Redis,
) -> None:
    # L1: 5 on hand less the location default 1 = 4; L2: 3. No member covers 6: split, most
    # available first. Line 1 (SKU B) is a plain location line.
    await redis.hset(POS, mapping={"oh:L1": 5, "oh:L2": 3})
    await redis.hset(POS_B, "oh:L1", 2)
    await redis.hset(SS, "L1", 1)
    lines = [line(0, 1, "A", 6, "G", [["L2"], ["L1"]], group=True), line(1, 2, "B", 1, "L1")]
    keys, values = one_reservation("r1", lines, ["A", "B"])
    ((kind, answer, _),) = await run(redis, "reserve.lua", keys, [1, *values])
    assert kind == "held"
    assert json.loads(answer) == [
        {"sku": "A", "location": "L1", "quantity": 4},
        {"sku": "A", "location": "L2", "quantity": 2},
        {"sku": "B", "location": "L1", "quantity": 1},
    ]
    assert await redis.hget(HOLDS, "r1") == "L1=4;L2=2"
    assert await redis.hget(HOLDS_B, "r1") == "L1=1"
    # Short of a group: the group is named, with what all its members have.
    await redis.delete(REC)
    keys, values = one_reservation(
        "r2", [line(0, 1, "A", 2, "G", [["L1"], ["L2"]], group=True)], ["A"]
    )
    ((kind, answer),) = await run(redis, "reserve.lua", keys, [1, *values])
    assert kind == "short"
    assert json.loads(answer) == [
        {"sku": "A", "location_group": "G", "requested": 2, "available": 1}
    ]


async def test_reserve_error_fails_one_reservation_alone(redis: aioredis.Redis) -> None:
    await redis.hset(POS, "oh:L1", 10)
    await redis.set(HOLDS, "not a hash")  # damaged data: the holds hash is a string
    bad_keys, bad = one_reservation("bad", [line(0, 1, "A", 1, "L1")], ["A"])
    good_keys = ["t:{r}:rec2", IDX, SS, "t:{C}:p", "t:{C}:h"]
    await redis.hset("t:{C}:p", "oh:L1", 1)
    good = ["good", "fp", 60_000, json.dumps([line(0, 1, "C", 1, "L1")]), '["C"]', DAY, 5]
    replies = await run(redis, "reserve.lua", [*bad_keys, *good_keys], [2, *bad, *good])
    assert replies[0][0] == "error"
    assert "WRONGTYPE" in replies[0][1]
    assert replies[1][0] == "held"
    # The failed one wrote nothing: no stock held, no record, no index entry.
    assert await redis.hget(POS, "res:L1") is None
    assert await redis.exists(REC) == 0
    assert await redis.zscore(IDX, "bad") is None


# --- settle.lua ---------------------------------------------------------------------------------


async def settle(
    redis: aioredis.Redis, rid: str, action: str, skus: str = '["A"]', track: bool = False
) -> Any:
    keys = [REC, IDX, UNV, POS, HOLDS] if skus else [REC, IDX, UNV]
    return await run(redis, "settle.lua", keys, [rid, action, DAY, skus, "1" if track else ""])


async def unconfirm(redis: aioredis.Redis, rid: str, stamp: str, skus: str = '["A"]') -> Any:
    return await run(redis, "unconfirm.lua", [REC, IDX, UNV, POS, HOLDS], [rid, stamp, skus])


async def test_settle_release_and_confirm(redis: aioredis.Redis) -> None:
    await redis.hset(POS, "oh:L1", 10)
    await reserve(redis, "r1", 3)
    assert await settle(redis, "r1", "expire") == ["held"]  # not due yet: nothing moves
    assert await settle(redis, "r1", "release") == ["released"]
    assert await redis.hget(POS, "res:L1") == "0"
    assert await redis.hexists(HOLDS, "r1") == 0
    assert await redis.zscore(IDX, "r1") is None
    assert await redis.hget(REC, "st") == "released"
    assert 0 < await redis.ttl(REC) <= 86400
    # Settled already: answers its status and moves nothing.
    assert await settle(redis, "r1", "confirm") == ["released"]
    assert await redis.hget(POS, "com:L1") is None

    await redis.delete(REC)
    await reserve(redis, "r1", 4)
    assert await settle(redis, "r1", "confirm") == ["confirmed"]
    assert await redis.hmget(POS, "res:L1", "com:L1") == ["0", "4"]


async def test_settle_overdue_expires_whatever_the_action(redis: aioredis.Redis) -> None:
    await redis.hset(POS, "oh:L1", 10)
    await reserve(redis, "r1", 3)
    await redis.hset(REC, "exp", 1)
    assert await settle(redis, "r1", "confirm") == ["expired"]
    assert await redis.hmget(POS, "res:L1", "com:L1") == ["0", None]


async def test_settle_missing_and_retry(redis: aioredis.Redis) -> None:
    await redis.zadd(IDX, {"gone": 1})
    assert await settle(redis, "gone", "expire", "") == ["missing"]
    assert await redis.zscore(IDX, "gone") is None  # a stale index entry is dropped
    await redis.hset(POS, "oh:L1", 10)
    await reserve(redis, "r1", 3)
    # The caller read no SKUs (the record did not exist yet): read again, call again.
    assert await settle(redis, "r1", "release", "") == ["retry"]
    assert await redis.hget(POS, "res:L1") == "3"
    await redis.hset(REC, "st", "rejected")
    assert await settle(redis, "r1", "release") == ["missing"]


async def test_a_tracked_confirm_is_listed_restamped_and_taken_back(
    redis: aioredis.Redis,
) -> None:
    await redis.hset(POS, "oh:L1", 10)
    await reserve(redis, "r1", 3)
    expires = await redis.hget(REC, "exp")
    status, stamp, moved, lines = await settle(redis, "r1", "confirm", track=True)
    assert (status, moved) == ("confirmed", 1)
    assert json.loads(lines) == [{"sku": "A", "location": "L1", "quantity": 3}]
    assert await redis.zscore(UNV, "r1") == float(stamp)
    assert await redis.hmget(POS, "res:L1", "com:L1") == ["0", "3"]
    assert await redis.ttl(REC) == -1  # kept while listed: a take-back needs it
    # A confirm again (a retry writing the row) moves nothing and restamps the move, so a
    # take-back of the stamp read before it misses.
    await redis.zadd(UNV, {"r1": 5})
    again, restamp, moved, lines_again = await settle(redis, "r1", "confirm", track=True)
    assert (again, moved, lines_again) == ("confirmed", 0, lines)
    assert int(restamp) >= int(stamp)
    assert await unconfirm(redis, "r1", "5") == ["kept"]
    assert await redis.hmget(POS, "res:L1", "com:L1") == ["0", "3"]
    # Its own stamp: held again, as before the confirm, and due for expiry again.
    assert await unconfirm(redis, "r1", restamp) == ["held"]
    assert await redis.hmget(POS, "res:L1", "com:L1") == ["3", "0"]
    assert await redis.hget(HOLDS, "r1") == "L1=3"
    assert await redis.hexists(HOLDS, "\x1fr1") == 0
    assert await redis.hmget(REC, "st", "exp") == ["held", expires]
    assert await redis.ttl(REC) == -1
    assert await redis.zscore(IDX, "r1") == float(expires)
    assert await redis.zscore(UNV, "r1") is None
    assert await unconfirm(redis, "r1", restamp) == ["kept"]  # unlisted: nothing more
    # A confirm of a confirmed reservation that is not listed lists it (a retry writing a
    # row the mender must then find before it takes anything back).
    await settle(redis, "r1", "confirm")
    assert await redis.zscore(UNV, "r1") is None
    assert await redis.ttl(REC) > 0
    _, stamp, moved, _ = await settle(redis, "r1", "confirm", track=True)
    assert (moved, await redis.zscore(UNV, "r1")) == (0, float(stamp))
    assert await redis.ttl(REC) == -1
    # Its row is there: unlisted, and the record expires as a settled one does.
    assert await run(redis, "verified.lua", [UNV, REC], [DAY, "r1"]) == 1
    assert await redis.zscore(UNV, "r1") is None
    assert 0 < await redis.ttl(REC) <= 86400
    await redis.delete(REC, HOLDS)
    await redis.hset(POS, mapping={"res:L1": 0, "com:L1": 0})
    await reserve(redis, "r1", 3)
    # The reservation is an ordinary hold again: it can be released, or confirmed.
    assert await settle(redis, "r1", "release") == ["released"]
    assert await redis.hget(POS, "res:L1") == "0"


async def test_an_untracked_confirm_is_not_listed_and_a_listed_one_not_confirmed_goes(
    redis: aioredis.Redis,
) -> None:
    await redis.hset(POS, "oh:L1", 10)
    await reserve(redis, "r1", 2)
    assert await settle(redis, "r1", "confirm") == ["confirmed"]
    assert await redis.zcard(UNV) == 0
    await redis.delete(REC)
    await reserve(redis, "r2", 2)
    await redis.zadd(UNV, {"r2": 7})
    assert await unconfirm(redis, "r2", "7") == ["held"]  # not confirmed: only unlisted
    assert await redis.zscore(UNV, "r2") is None
    assert await redis.hmget(POS, "res:L1", "com:L1") == ["2", "2"]


# --- extend.lua ---------------------------------------------------------------------------------


async def extend(redis: aioredis.Redis, rid: str, ttl_ms: int) -> Any:
    return await run(redis, "extend.lua", [REC, IDX], [rid, ttl_ms])


async def test_extend_moves_the_expiry(redis: aioredis.Redis) -> None:
    await redis.hset(POS, "oh:L1", 10)
    _, _, exp = await reserve(redis, "r1", 3, ttl_ms=1000)
    kind, new_exp = await extend(redis, "r1", 600_000)
    assert kind == "held"
    assert int(new_exp) > int(exp) + 500_000
    assert await redis.hget(REC, "exp") == new_exp
    assert await redis.zscore(IDX, "r1") == int(new_exp)


async def test_extend_failure_answers(redis: aioredis.Redis) -> None:
    assert await extend(redis, "r1", 1000) == ["missing"]
    await redis.hset(REC, mapping={"st": "pending", "exp": 1})
    assert await extend(redis, "r1", 1000) == ["missing"]  # a cluster saga still making it
    await redis.hset(REC, mapping={"st": "held", "exp": 1})
    assert await extend(redis, "r1", 1000) == ["expired"]  # overdue: not revived
    assert await redis.hget(REC, "exp") == "1"
    await redis.hset(REC, "st", "confirmed")
    assert await extend(redis, "r1", 1000) == ["confirmed"]


# --- cluster scripts ----------------------------------------------------------------------------


async def begin(redis: aioredis.Redis, rid: str, fp: str = "fp1", lease: int = 30_000) -> Any:
    return await run(redis, "cluster_begin.lua", [REC, IDX], [rid, fp, lease, '["A","B"]'])


async def mark(redis: aioredis.Redis, rid: str, action: str, *finish: Any) -> Any:
    state, answer, ttl = finish or ("", "", 0)
    return await run(redis, "cluster_mark.lua", [REC, IDX], [rid, action, state, answer, ttl, DAY])


async def test_cluster_begin_claims_once(redis: aioredis.Redis) -> None:
    assert await begin(redis, "r1") == ["new"]
    record = await redis.hgetall(REC)
    assert record["st"] == "pending"
    assert record["skus"] == '["A","B"]'
    assert await redis.zscore(IDX, "r1") == int(record["exp"])  # the lease
    assert await begin(redis, "r1") == ["replay", "pending", "", record["exp"]]
    assert await begin(redis, "r1", fp="other") == ["conflict"]


async def test_cluster_hold_answers_numbered_lines(redis: aioredis.Redis) -> None:
    # On a cluster each member carries its default safety stock (no ss key in the slot).
    await redis.hset(POS, mapping={"oh:L1": 5, "oh:L2": 2})
    lines = [
        line(0, 1, "A", 1, "L2", [["L2", 1]]),
        line(2, 1, "A", 4, "G", [["L1", 0]], group=True),
    ]
    kind, answer = await run(redis, "cluster_hold.lua", [POS, HOLDS], ["r1", json.dumps(lines)])
    assert kind == "held"
    assert json.loads(answer) == [
        {"n": 0, "sku": "A", "location": "L2", "quantity": 1},
        {"n": 2, "sku": "A", "location": "L1", "quantity": 4},
    ]
    assert await redis.hget(HOLDS, "r1") == "L2=1;L1=4"
    lines = [line(3, 1, "A", 2, "L1", [["L1", 0]])]
    kind, answer = await run(redis, "cluster_hold.lua", [POS, HOLDS], ["r2", json.dumps(lines)])
    assert kind == "short"
    assert json.loads(answer) == [
        {"n": 3, "sku": "A", "location": "L1", "requested": 2, "available": 1}
    ]
    assert await redis.hexists(HOLDS, "r2") == 0


async def test_cluster_unhold_is_idempotent(redis: aioredis.Redis) -> None:
    await redis.hset(POS, mapping={"oh:L1": 5, "res:L1": 3})
    await redis.hset(HOLDS, "r1", "L1=3")
    assert await run(redis, "cluster_unhold.lua", [POS, HOLDS], ["r1", "confirm"]) == 1
    assert await run(redis, "cluster_unhold.lua", [POS, HOLDS], ["r1", "confirm"]) == 1
    assert await redis.hmget(POS, "res:L1", "com:L1") == ["0", "3"]
    assert await redis.hexists(HOLDS, "r1") == 0


async def test_cluster_mark_finish(redis: aioredis.Redis) -> None:
    assert await mark(redis, "r1", "finish", "held", "[]", 60_000) == ["missing"]
    await begin(redis, "r1")
    assert await mark(redis, "r1", "release") == ["pending"]  # its saga is still running
    kind, exp = await mark(redis, "r1", "finish", "held", "[1]", 60_000)
    assert kind == "held"
    assert await redis.hmget(REC, "st", "resp", "exp") == ["held", "[1]", exp]
    assert await redis.zscore(IDX, "r1") == int(exp)
    assert await mark(redis, "r1", "finish", "held", "[2]", 60_000) == ["held"]  # once only
    assert await mark(redis, "r1", "expire") == ["held", exp]  # not due

    await redis.delete(REC)
    await begin(redis, "r2")
    assert await mark(redis, "r2", "finish", "rejected", "[3]", 0) == ["rejected"]
    assert await redis.zscore(IDX, "r2") is None
    assert 0 < await redis.ttl(REC) <= 86400
    assert await mark(redis, "r2", "release") == ["missing"]


async def test_cluster_mark_settles_in_two_steps(redis: aioredis.Redis) -> None:
    await begin(redis, "r1")
    await mark(redis, "r1", "finish", "held", "[]", 60_000)
    assert await mark(redis, "r1", "confirm") == ["go", "confirmed", '["A","B"]']
    assert await redis.hget(REC, "st") == "settling:confirmed"
    # A retry resumes the settlement it finds, whatever it asks.
    assert await mark(redis, "r1", "release") == ["go", "confirmed", '["A","B"]']
    assert await mark(redis, "r1", "done") == ["confirmed"]
    assert await redis.zscore(IDX, "r1") is None
    assert await mark(redis, "r1", "done") == ["confirmed"]
    assert await mark(redis, "r1", "release") == ["confirmed"]


async def test_cluster_mark_expires_a_dead_saga_after_its_lease(redis: aioredis.Redis) -> None:
    await begin(redis, "r1", lease=-1)
    assert await mark(redis, "r1", "release") == ["pending"]
    assert await mark(redis, "r1", "expire") == ["go", "expired", '["A","B"]']
    assert await mark(redis, "r1", "done") == ["expired"]
    # Finishing after the sweeper took it: not held any more.
    assert await mark(redis, "r1", "finish", "held", "[]", 60_000) == ["expired"]


async def test_rec_names_the_record_fields_keys_py_does(redis: aioredis.Redis) -> None:
    """REC in lib.lua and gateway/reservation/keys.py are the two homes of the record's fields."""
    lib = lua_libs("gateway.reservation")
    body = "return {REC.status, REC.fingerprint, REC.answer, REC.expires, REC.skus, COMMITTED}"
    assert await redis.eval(lib + body, 0) == [
        rsv_keys.STATUS,
        rsv_keys.FINGERPRINT,
        rsv_keys.ANSWER,
        rsv_keys.EXPIRES,
        rsv_keys.SKUS,
        rsv_keys.COMMITTED_PREFIX,
    ]


def test_scripts_spell_no_field_name_of_their_own() -> None:
    """Position fields come from atp's lib.lua, record fields from REC: no reservation script
    (lib.lua included) spells one, nor an availability formula of its own."""
    spelled = re.compile(r"""'(oh|res|com|ss):|'(st|fp|resp|exp|skus)'""")
    root = pathlib.Path(gateway.reservation.__file__).parent
    offenders = [
        f"{path.name}:{n}"
        for path in sorted(root.glob("*.lua"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if spelled.search(line) and not line.startswith("local REC = ")
    ]
    assert offenders == []
