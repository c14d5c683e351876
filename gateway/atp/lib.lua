-- Shared names and rules of the availability scripts. The gateway prepends this file to each
-- script of gateway/atp (Redis cannot include one script from another); gateway/atp/keys.py
-- names the same fields for the Python side.
--
-- Position hash atp:{sku}:p, fields <figure>:<location>. What readers use: oh: on-hand
-- (b + as), res: reserved, com: committed, ss: SKU safety stock (wins over the location's
-- default in atp:ss). The event rule's own: b: base (the newest snapshot plus adjustments folded
-- at the horizon), bt:/bi: that snapshot's time and event id, as: sum of the adjustments kept in
-- the location's adjustment set, ag: sum of their magnitudes.

-- A location's field names, built once per script call, not once per event.
local position_field_names = {}
local function position_fields(loc)
  local f = position_field_names[loc]
  if not f then
    f = {oh = 'oh:' .. loc, res = 'res:' .. loc, com = 'com:' .. loc, ss = 'ss:' .. loc,
         b = 'b:' .. loc, bt = 'bt:' .. loc, bi = 'bi:' .. loc, as = 'as:' .. loc,
         ag = 'ag:' .. loc}
    position_field_names[loc] = f
  end
  return f
end

-- What can be promised: the formula gateway.atp.availability.compute_available computes too.
local function available(on_hand, reserved, committed, safety_stock)
  local a = on_hand - reserved - committed - safety_stock
  if a > 0 then return a end
  return 0
end

-- By how much holds (reserved plus committed) exceed on-hand; 0 when they do not.
local function shortfall(on_hand, reserved, committed)
  local gap = reserved + committed - on_hand
  if gap > 0 then return gap end
  return 0
end
