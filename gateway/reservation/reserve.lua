-- Reserve on a single Redis node: idempotency check, every line, record and expiry, atomically.
-- KEYS[1] record  KEYS[2] expiry index  KEYS[3] location safety-stock defaults
-- KEYS[4..] (position, holds) per SKU
-- ARGV[1] reservation id  ARGV[2] body fingerprint  ARGV[3] ttl ms  ARGV[4] lines JSON
-- ARGV[5] SKUs JSON  ARGV[6] seconds a refused record is kept (replays answer the same 409)
-- returns {'held', answer, expires ms} | {'short', shortfalls} | {'replay', status, answer, exp}
--       | {'conflict'}
local rec, idx, rid = KEYS[1], KEYS[2], ARGV[1]
local seen = redis.call('HMGET', rec, 'fp', 'st', 'resp', 'exp')
if seen[1] then
  if seen[1] ~= ARGV[2] then return {'conflict'} end
  return {'replay', seen[2], seen[3], seen[4] or ''}
end
local ok, out = hold_lines(rid, cjson.decode(ARGV[4]), 4, KEYS[3])
local answer = cjson.encode(out)
if not ok then
  redis.call('HSET', rec, 'st', 'rejected', 'fp', ARGV[2], 'resp', answer)
  redis.call('EXPIRE', rec, ARGV[6])
  return {'short', answer}
end
local exp = fmt(now_ms() + tonumber(ARGV[3]))
redis.call('HSET', rec, 'st', 'held', 'fp', ARGV[2], 'resp', answer, 'exp', exp, 'skus', ARGV[5])
redis.call('ZADD', idx, exp, rid)
return {'held', answer, exp}
