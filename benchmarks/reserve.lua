-- wrk script: POST a JSON body per request, each with an id of its own, and count the answers.
--   wrk -c64 -t1 -d10 -H 'Authorization: Bearer k' -s benchmarks/reserve.lua \
--       http://HOST:PORT/v1/reservations -- BODIES_FILE ID_PREFIX
-- BODIES_FILE holds one body a line (the same file as `openloop.py --bodies-file`), used in turn;
-- the literal %ID% in a body becomes ID_PREFIX .. <thread> .. "-" .. <request number>, so no two
-- requests of a run share a reservation id (a repeated id would be an idempotent replay, which
-- costs the gateway less). Pass an ID_PREFIX of its own to every wrk run against one Redis.
-- Prints the summary line of paths.lua plus the number of 201, 409 and other answers.
local threads = {}
local heads, tails = {}, {}
local count, index, n = 0, 0, 0
local prefix = ""
-- Globals of each thread's Lua state, read by done() through thread:get().
created, refused, other = 0, 0, 0

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  local file = assert(io.open(args[1], "r"), "cannot open bodies file " .. tostring(args[1]))
  for line in file:lines() do
    if #line > 0 then
      local at = line:find("%ID%", 1, true)
      count = count + 1
      if at then
        heads[count], tails[count] = line:sub(1, at - 1), line:sub(at + 4)
      else
        heads[count], tails[count] = line, nil
      end
    end
  end
  file:close()
  assert(count > 0, "no bodies in " .. args[1])
  prefix = (args[2] or "wrk-") .. tostring(tid or 1) .. "-"
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  index = index % count + 1
  local tail = tails[index]
  if tail == nil then
    return wrk.format(nil, nil, nil, heads[index])
  end
  n = n + 1
  return wrk.format(nil, nil, nil, heads[index] .. prefix .. n .. tail)
end

function response(status, _, _)
  if status == 201 then
    created = created + 1
  elseif status == 409 then
    refused = refused + 1
  else
    other = other + 1
  end
end

function done(summary, latency, _)
  local c, r, o = 0, 0, 0
  for _, thread in ipairs(threads) do
    c = c + thread:get("created")
    r = r + thread:get("refused")
    o = o + thread:get("other")
  end
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d status=%d connect=%d read=%d write=%d timeout=%d "
      .. "p50_us=%d p99_us=%d max_us=%d created=%d refused=%d other=%d\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, c, r, o))
end
