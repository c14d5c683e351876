-- wrk script: orders into the buffer, each request an order of its own, answers counted.
--   confirm: POST /v1/reservations/<R><n>/confirm of pre-made held reservations
--     wrk -c64 -t1 -d10 -H 'Authorization: Bearer k' -s benchmarks/orders.lua \
--         http://HOST:PORT -- confirm RES_PREFIX ORDER_PREFIX FIRST COUNT
--     request n (0, 1, ...) confirms reservation RES_PREFIX .. %010d(FIRST + n) as order
--     ORDER_PREFIX .. %010d(FIRST + n); past COUNT reservations it keeps sending (the answers
--     are 404s) and counts them as `exhausted`: the run outran the reservations made for it.
--   place: POST /v1/orders (hold and confirm in one step)
--     ... http://HOST:PORT/v1/orders -- place BODIES_FILE ID_PREFIX
--     bodies as reserve.lua reads them: %ID% becomes ID_PREFIX .. <n>.
-- Use -t1: the request numbers are one thread's. Prints the summary line of paths.lua plus the
-- number of 202 (a new order), 200 (a repeat), 409, 503 and other answers.
local heads, tails = {}, {}
local count, index, n = 0, 0, 0
local mode, prefix, order_prefix, first, available = "place", "", "", 0, 0
-- Globals of the thread's Lua state, read by done() through thread:get().
accepted, repeated, conflict, full, other, exhausted = 0, 0, 0, 0, 0, 0
local thread_ref

function setup(thread)
  thread_ref = thread
end

local function read_bodies(path)
  local file = assert(io.open(path, "r"), "cannot open bodies file " .. tostring(path))
  for line in file:lines() do
    if #line > 0 then
      local at = line:find("%ID%", 1, true)
      count = count + 1
      if at then
        heads[count], tails[count] = line:sub(1, at - 1), line:sub(at + 4)
      else
        heads[count], tails[count] = line, ""
      end
    end
  end
  file:close()
  assert(count > 0, "no bodies in " .. path)
end

function init(args)
  mode = args[1] or "place"
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if mode == "confirm" then
    prefix, order_prefix = args[2], args[3]
    first, available = tonumber(args[4]), tonumber(args[5])
  else
    read_bodies(args[2])
    prefix = args[3] or "wrk-"
  end
end

function request()
  if mode == "confirm" then
    local number = string.format("%010d", first + n)
    n = n + 1
    if n > available then
      exhausted = exhausted + 1
    end
    local body = '{"order_id":"' .. order_prefix .. number .. '","order":{"customer_id":"C'
      .. number .. '","currency":"EUR","total":"42.50","channel":"web",'
      .. '"shipping":{"method":"standard","country":"DE","postcode":"10115"}}}'
    return wrk.format(nil, "/v1/reservations/" .. prefix .. number .. "/confirm", nil, body)
  end
  index = index % count + 1
  n = n + 1
  return wrk.format(nil, nil, nil, heads[index] .. prefix .. n .. tails[index])
end

function response(status, _, _)
  if status == 202 then
    accepted = accepted + 1
  elseif status == 200 then
    repeated = repeated + 1
  elseif status == 409 then
    conflict = conflict + 1
  elseif status == 503 then
    full = full + 1
  else
    other = other + 1
  end
end

function done(summary, latency, _)
  local t = thread_ref
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d status=%d connect=%d read=%d write=%d timeout=%d "
      .. "p50_us=%d p99_us=%d max_us=%d accepted=%d repeated=%d conflict=%d full=%d other=%d "
      .. "exhausted=%d\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, t:get("accepted"),
    t:get("repeated"), t:get("conflict"), t:get("full"), t:get("other"), t:get("exhausted")))
end
