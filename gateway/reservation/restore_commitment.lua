-- Put back what a confirmed order commits of one SKU, from the order buffer, after Redis lost
-- it (a flush, a failover without the last writes). Idempotent: what is there stays as it is.
-- KEYS[1] position  KEYS[2] holds  KEYS[3..] accepted commitments of each location in ARGV
-- ARGV[1] reservation id  ARGV[2] accepted at (µs), or '' while the ERP has not accepted it
-- ARGV[3..] location, units pairs (each location once; KEYS[3..] in the same order)
-- returns the number of locations whose commitment counts again
local pos, holds, rid, at_s = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local restored = 0
if at_s == '' then
  local parts = {}
  for i = 3, #ARGV, 2 do table.insert(parts, ARGV[i] .. '=' .. ARGV[i + 1]) end
  if redis.call('HSETNX', holds, COMMITTED .. rid, table.concat(parts, ';')) == 1 then
    for i = 3, #ARGV, 2 do
      redis.call('HINCRBY', pos, position_fields(ARGV[i]).com, ARGV[i + 1])
      restored = restored + 1
    end
  end
  return restored
end

-- Not put back as accepted while its committed entry is still there: accept.lua moves it.
if redis.call('HEXISTS', holds, COMMITTED .. rid) == 1 then return 0 end
local at = tonumber(at_s)
local suffix = '|' .. rid
for i = 3, #ARGV, 2 do
  local loc, q, acc = ARGV[i], ARGV[i + 1], KEYS[3 + (i - 3) / 2]
  local names = position_fields(loc)
  local bt = tonumber(redis.call('HGET', pos, names.bt))
  local present = false
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', acc, at_s, at_s)) do
    if string.sub(member, -#suffix) == suffix then present = true; break end
  end
  -- A snapshot at or after the acceptance counts the order already: nothing to put back.
  if not present and not (bt and bt >= at) then
    redis.call('ZADD', acc, at_s, q .. '|' .. rid)
    redis.call('HINCRBY', pos, names.com, q)
    restored = restored + 1
  end
end
return restored
