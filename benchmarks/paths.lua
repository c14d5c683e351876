-- wrk script: cycle through request paths read from a file (one a line), so a closed-loop run
-- asks for the same varied SKUs as the open-loop generator; print a parsable summary line.
--   wrk -c64 -t1 -d10 -H 'Authorization: Bearer k' -s benchmarks/paths.lua URL -- PATHS_FILE
local requests = {}
local count = 0
local index = 0

function init(args)
  local file = assert(io.open(args[1], "r"), "cannot open paths file " .. tostring(args[1]))
  for line in file:lines() do
    if #line > 0 then
      count = count + 1
      requests[count] = wrk.format("GET", line)
    end
  end
  file:close()
  assert(count > 0, "no paths in " .. args[1])
end

function request()
  index = index % count + 1
  return requests[index]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d status=%d connect=%d read=%d write=%d timeout=%d "
      .. "p50_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
