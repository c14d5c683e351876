-- Reserve on a single Redis node: idempotency check, every line, record and expiry, atomically,
-- for each of one or more reservations (the gateway merges those of one event-loop tick).
-- Each reservation is all or nothing on its own; they are taken in the order given.
-- ARGV[1] number of reservations; then per reservation 7 values: reservation id, body
-- fingerprint, ttl ms, lines JSON, SKUs JSON, seconds a refused record is kept (replays answer
-- the same 409), and its number of keys
-- KEYS, per reservation: record, expiry index, location safety-stock defaults, then
-- (position, holds) per SKU
-- returns, per reservation, {'held', answer, expires ms} | {'short', shortfalls}
--       | {'replay', status, answer, exp} | {'conflict'} | {'error', message}
-- A reservation whose step raises (damaged data, a defect) answers 'error' alone; the others
-- of the call go on.
local now = now_ms()

local function reserve_one(k, a)
  local rec, idx, rid, fp = KEYS[k], KEYS[k + 1], ARGV[a], ARGV[a + 1]
  local seen = redis.call('HMGET', rec, REC.fingerprint, REC.status, REC.answer, REC.expires)
  if seen[1] then
    if seen[1] ~= fp then return {'conflict'} end
    return {'replay', seen[2], seen[3], seen[4] or ''}
  end
  -- A key of the wrong type must fail before anything is written: the record and positions
  -- are read before any write, the index (written last) here, the holds hashes are written
  -- before any stock moves (hold_lines).
  redis.call('ZSCORE', idx, rid)
  local ok, answer = hold_lines(rid, cjson.decode(ARGV[a + 3]), k + 3, KEYS[k + 2])
  if not ok then
    redis.call('HSET', rec, REC.status, 'rejected', REC.fingerprint, fp, REC.answer, answer)
    redis.call('EXPIRE', rec, ARGV[a + 5])
    return {'short', answer}
  end
  local exp = fmt(now + tonumber(ARGV[a + 2]))
  redis.call('HSET', rec, REC.status, 'held', REC.fingerprint, fp, REC.answer, answer,
    REC.expires, exp, REC.skus, ARGV[a + 4])
  redis.call('ZADD', idx, exp, rid)
  return {'held', answer, exp}
end

local out = {}
local k, a = 1, 2
for i = 1, tonumber(ARGV[1]) do
  local ok, reply = pcall(reserve_one, k, a)
  out[i] = ok and reply or {'error', tostring(reply)}
  k = k + tonumber(ARGV[a + 6])
  a = a + 7
end
return out
