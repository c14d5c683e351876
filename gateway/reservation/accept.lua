-- The ERP accepted an order: from now on what it committed of one SKU waits for a stock snapshot
-- of its location that occurred at or after the acceptance (the ERP's count then includes it);
-- apply_events.lua (gateway/atp) clears it then. Idempotent, and also the settler's probe.
-- KEYS[1] position  KEYS[2] holds  KEYS[3..] accepted commitments of each location in ARGV[3..]
-- ARGV[1] reservation id  ARGV[2] accepted at (µs since the epoch)  ARGV[3..] the locations
-- returns the number of locations whose commitment still waits for a snapshot, or -1 when the
--         committed entry names a location not sent (nothing changed then)
local pos, holds, rid, at_s = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local at = tonumber(at_s)
local acc_of = {}
for i = 3, #ARGV do acc_of[ARGV[i]] = KEYS[i] end

local field = COMMITTED .. rid
local held = redis.call('HGET', holds, field)
if held then
  local by_loc, order = held_by_location(held)
  for _, loc in ipairs(order) do
    if not acc_of[loc] then return -1 end
  end
  redis.call('HDEL', holds, field)
  for _, loc in ipairs(order) do
    local names = position_fields(loc)
    local q = by_loc[loc]
    local bt = tonumber(redis.call('HGET', pos, names.bt))
    if bt and bt >= at then
      -- A snapshot at or after the acceptance is in already: it counts the order.
      redis.call('HINCRBY', pos, names.com, -q)
    else
      redis.call('ZADD', acc_of[loc], at_s, fmt(q) .. '|' .. rid)
    end
  end
end

local suffix = '|' .. rid
local waiting = 0
for i = 3, #ARGV do
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i], at_s, at_s)) do
    if string.sub(member, -#suffix) == suffix then waiting = waiting + 1; break end
  end
end
return waiting
