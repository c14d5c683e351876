-- Set the shared limit (ops): KEYS[1] limits  KEYS[2] flow  KEYS[3] in-flight
-- ARGV[1] rate  ARGV[2] burst  ARGV[3] max_concurrency  ARGV[4] paused ('1' | '0' | '' to keep)
-- ARGV[5] the version of ops' record these are ('' : none, set as they are)
-- ARGV[6] '1': set even over a newer version (the record itself went back)
-- A version older than the one held is not set: a copy read from the record before a change
-- must not undo that change when it lands after it. A lower burst caps the tokens at once.
-- returns 1 when set, 0 when a newer version is held
if ARGV[5] ~= '' then
  local held = tonumber(redis.call('HGET', KEYS[1], LIM.version)) or 0
  if tonumber(ARGV[5]) < held and ARGV[6] ~= '1' then return 0 end
  redis.call('HSET', KEYS[1], LIM.version, ARGV[5])
end
redis.call('HSET', KEYS[1], LIM.rate, ARGV[1], LIM.burst, ARGV[2], LIM.concurrency, ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], LIM.paused, ARGV[4]) end
local tokens = tonumber(redis.call('HGET', KEYS[2], FLOW.tokens))
if tokens and tokens > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[2], FLOW.tokens, ARGV[2])
end
return 1
