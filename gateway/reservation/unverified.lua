-- The confirms listed longer than ARGV[1] ms by Redis's clock (the one that stamped them).
-- KEYS[1] unverified index  ARGV[1] age ms  ARGV[2] at most this many
-- returns {reservation id, stamp, ...}, oldest first
local until_ms = now_ms() - tonumber(ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', until_ms, 'WITHSCORES', 'LIMIT', 0, ARGV[2])
