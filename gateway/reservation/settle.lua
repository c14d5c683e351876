-- Release, confirm or expire a reservation on a single Redis node, atomically.
-- KEYS[1] record  KEYS[2] expiry index  KEYS[3] unverified index  KEYS[4..] (position, holds)
-- per SKU of the reservation
-- ARGV[1] reservation id  ARGV[2] action: release | confirm | expire  ARGV[3] seconds to keep
-- the record once settled  ARGV[4] the record's skus JSON as the caller read it ('' for none)
-- ARGV[5] '1': a confirm whose order row may not be committed yet (intake.py writes both at
-- once): a move is listed in the unverified index, scored with the time it was made, until the
-- caller (or the mender, from the order buffer) says the row is there; a confirm that finds
-- the reservation confirmed already lists it afresh (a retry writing the row, or a repeat the
-- mender then finds a row for), so the mender's take-back of an older stamp misses.
-- returns {status after the call}: released | confirmed | expired | held (expire: not due yet)
--       | missing | retry; a tracked confirm answers {'confirmed', stamp, moved: 1 | 0, the
--       held lines as the reservation answered them (what the order row keeps)}.
-- A held reservation past its expiry is expired whatever the action.
-- 'retry': the record's SKUs are not those whose keys were sent (the reservation was made
-- after the caller read them): read them again and call again.
local rec, idx, unverified, rid, action = KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2]

-- Now in µs (below 2^53 for centuries: exact in a score), later than the listed stamp if any.
local function next_stamp(index, member)
  local t = redis.call('TIME')
  local stamp = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local old = tonumber(redis.call('ZSCORE', index, member) or '0')
  if old >= stamp then stamp = old + 1 end
  return stamp
end
local track = ARGV[5] == '1'
local f = redis.call('HMGET', rec, REC.status, REC.expires, REC.skus, REC.answer)
local st, exp = f[1], tonumber(f[2])
if not st or st == 'rejected' then
  redis.call('ZREM', idx, rid)
  return {'missing'}
end
if st ~= 'held' then
  redis.call('ZREM', idx, rid)
  if track and st == 'confirmed' then
    local stamp = fmt(next_stamp(unverified, rid))
    redis.call('ZADD', unverified, stamp, rid)
    redis.call('PERSIST', rec)  -- kept while listed: a take-back needs it
    return {st, stamp, 0, f[4]}
  end
  return {st}
end
if (f[3] or '') ~= ARGV[4] then return {'retry'} end
local now = now_ms()
local overdue = exp <= now
if action == 'expire' and not overdue then return {'held'} end
local final = 'expired'
if not overdue then final = (action == 'confirm') and 'confirmed' or 'released' end
settle_holds(rid, 4, final == 'confirmed' and 'confirm' or 'release')
redis.call('HSET', rec, REC.status, final)
redis.call('ZREM', idx, rid)
if track and final == 'confirmed' then
  -- No expiry while listed (verified.lua sets it): a take-back needs the record, however
  -- long the mender waits for PostgreSQL.
  local stamp = fmt(next_stamp(unverified, rid))
  redis.call('ZADD', unverified, stamp, rid)
  return {final, stamp, 1, f[4]}
end
redis.call('EXPIRE', rec, ARGV[3])
return {final}
