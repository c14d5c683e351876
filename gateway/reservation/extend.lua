-- Move the expiry of a held reservation (single node and cluster: the record's slot only).
-- KEYS[1] record  KEYS[2] expiry index  ARGV[1] reservation id  ARGV[2] new ttl ms
-- returns {'held', expires ms} | {status} when it is not held (or already overdue: 'expired')
--       | {'missing'}
local rec, idx, rid = KEYS[1], KEYS[2], ARGV[1]
local f = redis.call('HMGET', rec, REC.status, REC.expires)
local st = f[1]
if not st or st == 'rejected' or st == 'pending' then return {'missing'} end
if st ~= 'held' then return {st} end
local now = now_ms()
if tonumber(f[2]) <= now then return {'expired'} end
local exp = fmt(now + tonumber(ARGV[2]))
redis.call('HSET', rec, REC.expires, exp)
redis.call('ZADD', idx, exp, rid)
return {'held', exp}
