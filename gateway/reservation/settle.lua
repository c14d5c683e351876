-- Release, confirm or expire a reservation on a single Redis node, atomically.
-- KEYS[1] record  KEYS[2] expiry index  KEYS[3..] (position, holds) per SKU of the reservation
-- ARGV[1] reservation id  ARGV[2] action: release | confirm | expire  ARGV[3] seconds to keep
-- the record once settled  ARGV[4] the record's skus JSON as the caller read it ('' for none)
-- returns {status after the call}: released | confirmed | expired | held (expire: not due yet)
--       | missing | retry. A held reservation past its expiry is expired whatever the action.
-- 'retry': the record's SKUs are not those whose keys were sent (the reservation was made
-- after the caller read them): read them again and call again.
local rec, idx, rid, action = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local f = redis.call('HMGET', rec, REC.status, REC.expires, REC.skus)
local st, exp = f[1], tonumber(f[2])
if not st or st == 'rejected' then
  redis.call('ZREM', idx, rid)
  return {'missing'}
end
if st ~= 'held' then
  redis.call('ZREM', idx, rid)
  return {st}
end
if (f[3] or '') ~= ARGV[4] then return {'retry'} end
local overdue = exp <= now_ms()
if action == 'expire' and not overdue then return {'held'} end
local final = 'expired'
if not overdue then final = (action == 'confirm') and 'confirmed' or 'released' end
settle_holds(rid, 3, final == 'confirmed' and 'confirm' or 'release')
redis.call('HSET', rec, REC.status, final)
redis.call('ZREM', idx, rid)
redis.call('EXPIRE', rec, ARGV[3])
return {final}
