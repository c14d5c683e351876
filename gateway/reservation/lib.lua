--! include gateway.atp
-- Shared functions of the reservation scripts. The gateway prepends this file to each script,
-- after gateway/atp/lib.lua (the line above), so every rule lives in one place: the position
-- fields and the availability formula are atp's (position_fields, available).
--
-- Data: per SKU (hash tag {sku}) the position hash atp:{sku}:p (atp/lib.lua) and the holds hash
-- atp:{sku}:h, field <reservation id> = "<loc>=<qty>;<loc>=<qty>..." (what that reservation
-- holds of the SKU). Per reservation the record hash atp:rsv:{rsvN}:<id> with the fields REC
-- names below and, per bucket N, the expiry index atp:rsv-expiry:{rsvN}.
-- gateway/reservation/keys.py names the same record fields for the Python side.

local REC = {status = 'st', fingerprint = 'fp', answer = 'resp', expires = 'exp', skus = 'skus'}

-- A confirmed reservation's entry in the holds hash, under this prefix: what it committed of
-- the SKU, by location, kept until the ERP accepts the order (accept.lua). No reservation id
-- starts with a control character, so it never meets a hold's field. keys.py: COMMITTED_FIELD.
local COMMITTED = '\31'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(n)
  return string.format('%d', n)
end

local function by_most_available(x, y)
  if x.a ~= y.a then return x.a > y.a end
  return x.i < y.i
end

-- Hold the lines of one or more SKUs, all or nothing. pairs_from: index in KEYS of the first
-- position key; lines: decoded JSON, each an array {line number, pair index, sku, quantity,
-- label (location or group), 1 for a group else 0, {{location, default safety stock?}, ...}}
-- (arrays, not objects: cheaper to encode, send and decode); with null for the members, the
-- label is the line's one location.
-- Returns true and the allocations as JSON in line order, as the API answers them
-- ([{sku, location, quantity}...], each with its line number n too when `numbered`: a cluster
-- saga merges SKUs' answers by it), or false and the shortfalls as JSON (in line order, also
-- numbered when asked).
-- ss_key: on a single node, the hash of location safety-stock defaults, read here (a member's
-- default then need not be sent); on a cluster it lives in another slot and the caller sends
-- each member's default instead.
local function hold_lines(rid, lines, pairs_from, ss_key, numbered)
  local allocation = numbered and '{"n":%d,"sku":"%s","location":"%s","quantity":%d}'
    or '{"sku":"%s","location":"%s","quantity":%d}'

  local taken = {}
  local defaults = {}
  local function avail(pos, loc, default_ss)
    local names = position_fields(loc)
    local f = redis.call('HMGET', pos, names.oh, names.res, names.com, names.ss)
    local ss = tonumber(f[4])
    if not ss then
      if default_ss == nil and ss_key then
        if defaults[loc] == nil then
          defaults[loc] = tonumber(redis.call('HGET', ss_key, loc)) or 0
        end
        default_ss = defaults[loc]
      end
      ss = default_ss or 0
    end
    -- Clamped before what this call took is counted: a location below zero stays short.
    return available(tonumber(f[1]) or 0, tonumber(f[2]) or 0, tonumber(f[3]) or 0, ss)
      - (taken[pos .. '|' .. loc] or 0)
  end
  local allocations, short = {}, {}
  local plan = {}
  local function take(pos, k, n, sku, loc, q)
    local key = pos .. '|' .. loc
    taken[key] = (taken[key] or 0) + q
    plan[#plan + 1] = {k = k, loc = loc, q = q}
    -- SKUs and locations are codes ([A-Za-z0-9._:-], checked by the gateway): nothing to
    -- escape, and formatting by hand skips cjson's float printing of every number.
    if numbered then
      allocations[#allocations + 1] = string.format(allocation, n, sku, loc, q)
    else
      allocations[#allocations + 1] = string.format(allocation, sku, loc, q)
    end
  end
  for _, line in ipairs(lines) do
    local n, k, sku, q, members = line[1], line[2], line[3], line[4], line[7]
    local pos = KEYS[pairs_from + 2 * (k - 1)]
    if members == cjson.null then members = nil end
    if not members or #members == 1 then
      -- A location (or a group of one): nothing to rank or split.
      local loc, default_ss = line[5], nil
      if members then loc, default_ss = members[1][1], members[1][2] end
      local a = avail(pos, loc, default_ss)
      if a < q then
        short[#short + 1] = {line = line, available = a}
      else
        take(pos, k, n, sku, loc, q)
      end
    else
      local cands = {}
      local total = 0
      for i, member in ipairs(members) do
        local a = avail(pos, member[1], member[2])
        if a > 0 then
          -- Summed only while short of the line: 500 members' stock could pass 2^53, where
          -- Lua's doubles stop counting units exactly (each member's own stays below).
          if total < q then total = total + a end
          cands[#cands + 1] = {loc = member[1], a = a, i = i}
        end
      end
      if total < q then
        short[#short + 1] = {line = line, available = total}
      else
        -- Most available first; ties keep the group's order. One member that covers the
        -- whole line takes it; otherwise split in that order.
        table.sort(cands, by_most_available)
        if cands[1].a >= q then
          take(pos, k, n, sku, cands[1].loc, q)
        else
          local left = q
          for _, c in ipairs(cands) do
            if left <= 0 then break end
            local part = math.min(left, c.a)
            take(pos, k, n, sku, c.loc, part)
            left = left - part
          end
        end
      end
    end
  end
  if #short > 0 then
    local out = {}
    for _, s in ipairs(short) do
      local line = s.line
      local entry = {sku = line[3], requested = line[4], available = math.max(0, s.available)}
      if numbered then entry.n = line[1] end
      if line[6] == 1 then entry.location_group = line[5] else entry.location = line[5] end
      table.insert(out, entry)
    end
    return false, cjson.encode(out)
  end
  local per_pair = {}
  for _, p in ipairs(plan) do
    per_pair[p.k] = (per_pair[p.k] and per_pair[p.k] .. ';' or '') .. p.loc .. '=' .. fmt(p.q)
  end
  -- The hold entries go first: the holds hashes are the only keys not read above, so a wrong
  -- type there fails before any stock is held (an entry alone holds nothing). One call holds
  -- all of a SKU's lines, and a reservation id reaches here once (the record is claimed
  -- first), so the entry is new: no read-modify-write.
  for k, held in pairs(per_pair) do
    redis.call('HSET', KEYS[pairs_from + 2 * (k - 1) + 1], rid, held)
  end
  for _, p in ipairs(plan) do
    redis.call('HINCRBY', KEYS[pairs_from + 2 * (p.k - 1)], position_fields(p.loc).res, fmt(p.q))
  end
  return true, '[' .. table.concat(allocations, ',') .. ']'
end

-- A holds hash entry's quantities: location -> units, summed (one location may appear twice).
local function held_by_location(held)
  local by_loc, order = {}, {}
  for loc, q in string.gmatch(held, '([^;=]+)=(%d+)') do
    if not by_loc[loc] then table.insert(order, loc); by_loc[loc] = 0 end
    by_loc[loc] = by_loc[loc] + tonumber(q)
  end
  return by_loc, order
end

-- Undo (release) or convert (confirm) what a reservation holds of the SKUs in KEYS from
-- pairs_from on. Idempotent: the hold entry is removed the first time, so a repeat does nothing.
-- A confirm keeps the entry under COMMITTED: the quantity counts as committed until the ERP
-- accepted the order and a snapshot taken after that includes it (accept.lua, apply_events.lua).
local function settle_holds(rid, pairs_from, action)
  for i = pairs_from, #KEYS, 2 do
    local pos, holds = KEYS[i], KEYS[i + 1]
    local held = redis.call('HGET', holds, rid)
    if held then
      redis.call('HDEL', holds, rid)
      for loc, q in string.gmatch(held, '([^;=]+)=(%d+)') do
        local names = position_fields(loc)
        redis.call('HINCRBY', pos, names.res, -tonumber(q))
        if action == 'confirm' then
          redis.call('HINCRBY', pos, names.com, tonumber(q))
        end
      end
      if action == 'confirm' then
        redis.call('HSET', holds, COMMITTED .. rid, held)
      end
    end
  end
end
