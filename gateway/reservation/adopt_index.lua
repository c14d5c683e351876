-- Move a bucket's expiry index from where versions before 2026-12 kept it to its own key, once.
-- Both keys share the bucket's slot. The old key is moved only if it is a sorted set: under
-- the old names a reservation called "expiry" had its record (a hash) there.
-- KEYS[1] old index  KEYS[2] index
-- returns how many entries were moved
if redis.call('TYPE', KEYS[1]).ok ~= 'zset' then return 0 end
local moved = redis.call('ZCARD', KEYS[1])
redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[2], KEYS[1], 'AGGREGATE', 'MAX')
redis.call('DEL', KEYS[1])
return moved
