-- Shared names and rules of the ERP flow scripts; gateway/buffering/keys.py names the same
-- fields for the Python side. KEYS of every flow script: limits, flow, in-flight (one slot).
--
-- limits: what ops set (rate per second, burst, max_concurrency, paused '1'/'0') and the version
-- of ops' record (PostgreSQL) they reflect.
-- flow: the token bucket (tokens, ts ms), the adaptive factor (effective rate = rate * factor),
-- the breaker (state closed | open | half_open, open_until ms, probe: the one call let through
-- while half open, probe_until ms, fails: consecutive failures).
-- in-flight: a sorted set of permits, scored by when their lease ends.
local LIM = {rate = 'rate', burst = 'burst', concurrency = 'max_concurrency', paused = 'paused',
             version = 'version'}
local FLOW = {tokens = 'tokens', ts = 'ts', factor = 'factor', state = 'state',
              open_until = 'open_until', probe = 'probe', probe_until = 'probe_until',
              fails = 'fails'}
-- Consecutive failures that open the breaker, and how long it stays open before one probe.
local BREAK_AFTER, OPEN_MS = 5, 5000
-- The adaptive factor's floor, its cut on a 429 or a slow answer, and its climb per success.
local FACTOR_MIN, FACTOR_CUT, SLOW_CUT, FACTOR_STEP = 0.05, 0.5, 0.9, 0.02

-- Whole milliseconds (stored and compared), and the fraction of the current one already gone
-- (a wait named to the caller ends on the millisecond the bucket will count, not up to 1 ms past).
local function clock_ms()
  local t = redis.call('TIME')
  local us = tonumber(t[2])
  return tonumber(t[1]) * 1000 + math.floor(us / 1000), (us % 1000) / 1000
end

-- The limits in force: ops' values, else the defaults the caller sends (ARGV from ARGV[d]).
local function limits(d)
  local l = redis.call('HMGET', KEYS[1], LIM.rate, LIM.burst, LIM.concurrency, LIM.paused)
  return tonumber(l[1]) or tonumber(ARGV[d]), tonumber(l[2]) or tonumber(ARGV[d + 1]),
    tonumber(l[3]) or tonumber(ARGV[d + 2]), l[4] == '1'
end
