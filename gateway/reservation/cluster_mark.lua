-- Cluster: claim a settlement (or finish step 3 of reserving) in the record's slot.
-- KEYS[1] record  KEYS[2] expiry index  ARGV[1] reservation id
-- ARGV[2] action: release | confirm | expire | finish
-- ARGV[3] for finish: held | rejected;  ARGV[4] answer JSON;  ARGV[5] ttl ms
-- ARGV[6] seconds to keep a settled record
-- A settlement moves 'held' to 'settling:<final>' so a concurrent extend cannot revive it; the
-- caller then settles each SKU and calls with action 'done'. A pending record past its lease
-- (its request died) is expired the same way.
-- returns {'go', final, skus JSON} | {'held', exp} | {status} | {'missing'}
local rec, idx, rid, action = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local f = redis.call('HMGET', rec, REC.status, REC.expires, REC.skus)
local st, exp, skus = f[1], tonumber(f[2]), f[3]
if not st or st == 'rejected' then return {'missing'} end
local now = now_ms()
if action == 'finish' then
  if st ~= 'pending' then return {st} end
  if ARGV[3] == 'rejected' then
    redis.call('HSET', rec, REC.status, 'rejected', REC.answer, ARGV[4])
    redis.call('ZREM', idx, rid)
    redis.call('EXPIRE', rec, ARGV[6])
    return {'rejected'}
  end
  local new_exp = fmt(now + tonumber(ARGV[5]))
  redis.call('HSET', rec, REC.status, 'held', REC.answer, ARGV[4], REC.expires, new_exp)
  redis.call('ZADD', idx, new_exp, rid)
  return {'held', new_exp}
end
if action == 'done' then
  local final = string.match(st, '^settling:(.+)$')
  if not final then return {st} end
  redis.call('HSET', rec, REC.status, final)
  redis.call('ZREM', idx, rid)
  redis.call('EXPIRE', rec, ARGV[6])
  return {final}
end
local resume = string.match(st, '^settling:(.+)$')
if resume then return {'go', resume, skus} end
if st == 'pending' then
  if action == 'expire' and exp <= now then
    redis.call('HSET', rec, REC.status, 'settling:expired')
    return {'go', 'expired', skus}
  end
  return {'pending'}
end
if st ~= 'held' then
  redis.call('ZREM', idx, rid)
  return {st}
end
local overdue = exp <= now
if action == 'expire' and not overdue then return {'held', f[2]} end
local final = 'expired'
if not overdue then final = (action == 'confirm') and 'confirmed' or 'released' end
redis.call('HSET', rec, REC.status, 'settling:' .. final)
return {'go', final, skus}
