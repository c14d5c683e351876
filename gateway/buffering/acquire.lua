-- Take up to ARGV[1] permits to call the ERP, under the shared limit.
-- KEYS[1] limits  KEYS[2] flow  KEYS[3] in-flight
-- ARGV[1] permits wanted  ARGV[2] permit id prefix (ids are prefix:1..n)  ARGV[3] lease ms
-- ARGV[4..6] default rate, burst, max_concurrency (used until ops set their own)
-- returns {granted, wait ms before asking again (when 0 granted; when some were granted, until
--         the bucket holds a whole token again, 0 if it still does), reason, and when granted
--         the effective rate per second and the burst}
-- reason: ok | paused | open (breaker) | probing (half open, a probe is out) | rate | concurrency
--         | unsynced (Redis holds no copy of ops' settings: it lost its data, and the gateways'
--           sync has not put them back yet; sending on defaults could undo a pause)
-- The bucket holds at most `burst` tokens and fills at rate * factor per second, so no second
-- sees more than rate + burst calls begin.
if redis.call('HEXISTS', KEYS[1], LIM.version) == 0 then return {0, 200, 'unsynced'} end
local now, gone = clock_ms()
local rate, burst, concurrency, paused = limits(4)
if paused then return {0, 200, 'paused'} end
local f = redis.call('HMGET', KEYS[2], FLOW.tokens, FLOW.ts, FLOW.factor, FLOW.state,
  FLOW.open_until, FLOW.probe_until)
local want = tonumber(ARGV[1])
local state = f[4] or 'closed'
if state == 'open' then
  local open_until = tonumber(f[5]) or 0
  if now < open_until then return {0, open_until - now, 'open'} end
  state = 'half_open'
  redis.call('HSET', KEYS[2], FLOW.state, state, FLOW.probe, '', FLOW.probe_until, 0)
  f[6] = '0'
end
if state == 'half_open' then
  if (tonumber(f[6]) or 0) > now then return {0, 50, 'probing'} end
  want = 1
end
local effective = rate * (tonumber(f[3]) or 1)
local tokens = tonumber(f[1]) or burst
local ts = tonumber(f[2]) or now
if now > ts then tokens = math.min(burst, tokens + (now - ts) * effective / 1000) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local free = concurrency - redis.call('ZCARD', KEYS[3])
local granted = math.min(want, math.floor(tokens), free)
if granted < 1 then
  redis.call('HSET', KEYS[2], FLOW.tokens, tostring(tokens), FLOW.ts, now)
  if free < 1 then return {0, 10, 'concurrency'} end
  return {0, tostring(math.ceil((1 - tokens) * 1000 / effective) - gone), 'rate'}
end
tokens = tokens - granted
redis.call('HSET', KEYS[2], FLOW.tokens, tostring(tokens), FLOW.ts, now)
-- A writer that asked for more than it got asks again when the next token is whole, not a
-- guess later: with a burst of one, every millisecond past that is a token's time lost.
local next_ms = 0
if tokens < 1 then next_ms = math.ceil((1 - tokens) * 1000 / effective) - gone end
local lease_end = now + tonumber(ARGV[3])
for i = 1, granted do
  redis.call('ZADD', KEYS[3], lease_end, ARGV[2] .. ':' .. i)
end
if state == 'half_open' then
  redis.call('HSET', KEYS[2], FLOW.probe, ARGV[2] .. ':1', FLOW.probe_until, lease_end)
end
-- The rate the permits were granted at: the writer spaces its calls by it (as strings: Redis
-- turns a Lua number into an integer).
return {granted, tostring(next_ms), 'ok', tostring(effective), burst}
