-- Take back a confirm whose order row was never committed (single node): the committed
-- quantities count as reserved again and the reservation is held, with its old expiry (the
-- sweeper expires it if that has passed). Only the move stamped ARGV[2] in the unverified
-- index: a confirm that restamped it since (a retry writing the row) keeps it.
-- KEYS[1] record  KEYS[2] expiry index  KEYS[3] unverified index  KEYS[4..] (position, holds)
-- per SKU  ARGV[1] reservation id  ARGV[2] the stamp  ARGV[3] the record's skus JSON as read
-- returns {'held'} | {'kept'} (restamped or no longer listed) | {'retry'} (other SKUs than
-- sent) | {status} (not confirmed: unlisted, nothing else changes)
local rec, idx, unverified, rid = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local stamp = redis.call('ZSCORE', unverified, rid)
if not stamp or tonumber(stamp) ~= tonumber(ARGV[2]) then return {'kept'} end
local f = redis.call('HMGET', rec, REC.status, REC.expires, REC.skus)
if f[1] ~= 'confirmed' then
  redis.call('ZREM', unverified, rid)
  return {f[1] or 'missing'}
end
if (f[3] or '') ~= ARGV[3] then return {'retry'} end
for i = 4, #KEYS, 2 do
  local pos, holds = KEYS[i], KEYS[i + 1]
  local held = redis.call('HGET', holds, COMMITTED .. rid)
  if held then
    redis.call('HDEL', holds, COMMITTED .. rid)
    redis.call('HSET', holds, rid, held)
    for loc, q in string.gmatch(held, '([^;=]+)=(%d+)') do
      local names = position_fields(loc)
      redis.call('HINCRBY', pos, names.com, -tonumber(q))
      redis.call('HINCRBY', pos, names.res, tonumber(q))
    end
  end
end
redis.call('HSET', rec, REC.status, 'held')
redis.call('PERSIST', rec)
redis.call('ZADD', idx, f[2], rid)
redis.call('ZREM', unverified, rid)
return {'held'}
