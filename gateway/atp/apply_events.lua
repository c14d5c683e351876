-- Apply stock events of one or more SKUs, in the order given, atomically.
-- The call holds G groups, one per SKU (on a cluster G = 1: a script touches one slot).
-- KEYS, per group: position hash (atp:{sku}:p), event ids seen (atp:{sku}:ids), then the
--           adjustments of each of the group's locations (atp:{sku}:adj:<location>), then the
--           accepted commitments of each (atp:{sku}:acc:<location>)
-- ARGV[1]   horizon in microseconds; then per group: n (locations), m (events), the n location
--           names, and 5 values per event: location index (1..n), kind ('s'|'a'),
--           occurred_at (µs), event_id, quantity
-- returns   per group {codes, shortfalls}: one code per event (0 applied, 1 duplicate,
--           2 stale, 3 rejected), and location, units pairs where reserved + committed
--           exceed on-hand
--
-- Position fields: see lib.lua (prepended to this script), which names them.
-- Accepted commitments: orders the ERP accepted, members '<units>|<reservation id>' scored by
-- the acceptance time (µs). They count in com: until a snapshot of their location occurred at or
-- after that time, because the ERP's count includes them from then on (gateway.reservation's
-- accept.lua puts them there).
-- Validation happened in the gateway: a Lua error half-way would keep the writes before it.
--
-- Exactness: Lua numbers are doubles, exact for integers up to 2^53 (~9.007e15). The gateway
-- bounds quantities (|q| <= 1e9) and times (microseconds < 2^53); here an adjustment that would
-- take |on-hand| or ag beyond LIMIT is refused (3, and its id is not kept). So |as| <= ag
-- <= LIMIT, |b| <= 2 * LIMIT + 1e9, and every sum formed here or in the reservation scripts
-- stays below 5e15. LIMIT is gateway.atp.schemas.MAX_POSITION.

local LIMIT = 1000000000000000
local t = redis.call('TIME')
local cutoff = (tonumber(t[1]) * 1000000 + tonumber(t[2])) - tonumber(ARGV[1])
local cutoff_s = string.format('%d', cutoff)

local function quantity_of(member)
  return tonumber(string.match(member, '^(-?%d+)|'))
end

-- Sum and drop the adjustments at or before a time; each one is dropped once, so this is
-- amortised. Returns their sum and the sum of their magnitudes (both <= ag: exact).
local function drop_until(adj, score)
  local gone = redis.call('ZRANGEBYSCORE', adj, '-inf', score)
  if #gone == 0 then return 0, 0 end
  local sum, gross = 0, 0
  for _, member in ipairs(gone) do
    local q = quantity_of(member)
    sum = sum + q
    gross = gross + math.abs(q)
  end
  redis.call('ZREMRANGEBYSCORE', adj, '-inf', score)
  return sum, gross
end

-- Byte order, as the gateway compares event ids: Lua's '<' follows the server's locale.
local function bytes_less(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

local function apply_group(key, arg)
  local pos, ids = KEYS[key], KEYS[key + 1]
  local nloc, nev = tonumber(ARGV[arg]), tonumber(ARGV[arg + 1])
  redis.call('ZREMRANGEBYSCORE', ids, '-inf', cutoff_s)

  local state = {}
  for i = 1, nloc do
    local loc = ARGV[arg + 1 + i]
    local names = position_fields(loc)
    local f = redis.call('HMGET', pos, names.b, names.bt, names.bi, names.as, names.res,
                         names.com, names.ag)
    local st = {loc = loc, names = names, adj = KEYS[key + 1 + i],
                acc = KEYS[key + 1 + nloc + i], base = tonumber(f[1]) or 0,
                bt = tonumber(f[2]), bi = f[3] or '', asum = tonumber(f[4]) or 0,
                res = tonumber(f[5]) or 0, com = tonumber(f[6]) or 0,
                gross = tonumber(f[7]) or 0, dirty = false}
    -- Fold what fell behind the horizon into the base: nothing older can be applied any more.
    local folded, folded_gross = drop_until(st.adj, cutoff_s)
    if folded_gross ~= 0 then
      st.base = st.base + folded
      st.asum = st.asum - folded
      st.gross = st.gross - folded_gross
      st.dirty = true
    end
    state[i] = st
  end

  local codes = {}
  local off = arg + 1 + nloc
  for e = 0, nev - 1 do
    local k = off + e * 5
    local st = state[tonumber(ARGV[k + 1])]
    local kind, ts_s, id, qty_s = ARGV[k + 2], ARGV[k + 3], ARGV[k + 4], ARGV[k + 5]
    local ts = tonumber(ts_s)
    local code
    if ts <= cutoff then
      code = redis.call('ZSCORE', ids, id) and 1 or 2
    elseif redis.call('ZADD', ids, 'NX', ts_s, id) == 0 then
      code = 1
    else
      if kind == 's' then
        if st.bt and (ts < st.bt or (ts == st.bt and bytes_less(id, st.bi))) then
          code = 2
        else
          local dropped, dropped_gross = drop_until(st.adj, ts_s)
          st.asum = st.asum - dropped
          st.gross = st.gross - dropped_gross
          st.base, st.bt, st.bi = tonumber(qty_s), ts, id
          st.com = st.com - drop_until(st.acc, ts_s)
          st.dirty = true
          code = 0
        end
      elseif st.bt and ts <= st.bt then
        code = 2
      else
        local qty = tonumber(qty_s)
        local gross = st.gross + math.abs(qty)
        local on_hand = st.base + st.asum + qty
        if gross > LIMIT or on_hand > LIMIT or on_hand < -LIMIT then
          -- Not applied: its id is forgotten, so a retry is not taken for a duplicate.
          redis.call('ZREM', ids, id)
          code = 3
        else
          redis.call('ZADD', st.adj, ts_s, qty_s .. '|' .. id)
          st.asum = st.asum + qty
          st.gross = gross
          st.dirty = true
          code = 0
        end
      end
    end
    codes[e + 1] = code
  end

  local short = {}
  for i = 1, nloc do
    local st = state[i]
    if st.dirty then
      local names = st.names
      local on_hand = st.base + st.asum
      -- Holds are never dropped when stock falls below them: report the shortfall instead.
      local gap = shortfall(on_hand, st.res, st.com)
      if gap > 0 and st.res > 0 then
        table.insert(short, st.loc); table.insert(short, string.format('%d', gap))
      end
      local fields = {names.b, string.format('%d', st.base), names.as,
                      string.format('%d', st.asum), names.ag, string.format('%d', st.gross),
                      names.oh, string.format('%d', on_hand), names.com,
                      string.format('%d', st.com)}
      if st.bt then
        table.insert(fields, names.bt); table.insert(fields, string.format('%d', st.bt))
        table.insert(fields, names.bi); table.insert(fields, st.bi)
      end
      redis.call('HSET', pos, unpack(fields))
    end
  end
  return {codes, short}, key + 2 + 2 * nloc, off + nev * 5 + 1
end

local out = {}
local key, arg = 1, 2
while arg <= #ARGV do
  local result
  result, key, arg = apply_group(key, arg)
  table.insert(out, result)
end
return out
