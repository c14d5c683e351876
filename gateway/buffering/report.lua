-- Report how a permit's ERP call went; frees its in-flight place.
-- KEYS[1] limits  KEYS[2] flow  KEYS[3] in-flight
-- ARGV[1] permit id  ARGV[2] outcome: ok | throttled (429/503) | slow (answered, but slowly)
--   | failed (5xx, timeout, connection) | unused (no order to send: the token goes back)
-- ARGV[3..5] default rate, burst, max_concurrency
-- returns the breaker state after
local now = clock_ms()
local outcome = ARGV[2]
redis.call('ZREM', KEYS[3], ARGV[1])
local f = redis.call('HMGET', KEYS[2], FLOW.factor, FLOW.state, FLOW.fails, FLOW.probe,
  FLOW.tokens)
local factor, state, fails = tonumber(f[1]) or 1, f[2] or 'closed', tonumber(f[3]) or 0
local probe = f[4] == ARGV[1]
if outcome == 'unused' then
  local _, burst = limits(3)
  local tokens = math.min(burst, (tonumber(f[5]) or burst) + 1)
  redis.call('HSET', KEYS[2], FLOW.tokens, tostring(tokens))
  if probe then redis.call('HSET', KEYS[2], FLOW.probe_until, 0) end
  return state
end
if outcome == 'ok' or outcome == 'slow' then
  fails = 0
  if outcome == 'ok' then factor = math.min(1, factor + FACTOR_STEP)
  else factor = math.max(FACTOR_MIN, factor * SLOW_CUT) end
  if state == 'half_open' and probe then state = 'closed' end
elseif outcome == 'throttled' then
  factor = math.max(FACTOR_MIN, factor * FACTOR_CUT)
  if state == 'half_open' and probe then state = 'closed' end
else
  fails = fails + 1
  if (state == 'half_open' and probe) or (state == 'closed' and fails >= BREAK_AFTER) then
    state = 'open'
    fails = 0
    redis.call('HSET', KEYS[2], FLOW.open_until, now + OPEN_MS)
  end
end
redis.call('HSET', KEYS[2], FLOW.factor, tostring(factor), FLOW.state, state, FLOW.fails, fails)
return state
