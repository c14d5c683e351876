-- Set the shared limit (ops): KEYS[1] limits  KEYS[2] flow  KEYS[3] in-flight
-- ARGV[1] rate  ARGV[2] burst  ARGV[3] max_concurrency  ARGV[4] paused ('1' | '0' | '' to keep)
-- A lower burst caps the tokens at once. returns 1
redis.call('HSET', KEYS[1], LIM.rate, ARGV[1], LIM.burst, ARGV[2], LIM.concurrency, ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], LIM.paused, ARGV[4]) end
local tokens = tonumber(redis.call('HGET', KEYS[2], FLOW.tokens))
if tokens and tokens > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[2], FLOW.tokens, ARGV[2])
end
return 1
