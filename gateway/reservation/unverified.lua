-- The confirms listed longer than ARGV[1] ms by Redis's clock (the one that stamped them, in µs).
-- KEYS[1] unverified index  ARGV[1] age ms  ARGV[2] at most this many
-- returns {reservation id, stamp, ...}, oldest first
local t = redis.call('TIME')
local until_us = tonumber(t[1]) * 1000000 + tonumber(t[2]) - tonumber(ARGV[1]) * 1000
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', until_us),
  'WITHSCORES', 'LIMIT', 0, ARGV[2])
