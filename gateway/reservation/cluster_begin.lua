-- Cluster, step 1 of reserving: claim the reservation id in its record's slot.
-- KEYS[1] record  KEYS[2] expiry index  ARGV[1] reservation id  ARGV[2] body fingerprint
-- ARGV[3] lease ms (a crashed request's holds are released by the sweeper after it)
-- ARGV[4] SKUs JSON
-- returns {'new'} | {'replay', status, answer, exp} | {'conflict'}
local rec, idx, rid = KEYS[1], KEYS[2], ARGV[1]
local seen = redis.call('HMGET', rec, REC.fingerprint, REC.status, REC.answer, REC.expires)
if seen[1] then
  if seen[1] ~= ARGV[2] then return {'conflict'} end
  return {'replay', seen[2], seen[3] or '', seen[4] or ''}
end
local lease = fmt(now_ms() + tonumber(ARGV[3]))
redis.call('HSET', rec, REC.status, 'pending', REC.fingerprint, ARGV[2], REC.expires, lease,
  REC.skus, ARGV[4])
redis.call('ZADD', idx, lease, rid)
return {'new'}
