-- Cluster, step 2: hold the lines of one SKU (one slot), all or nothing.
-- KEYS[1] position  KEYS[2] holds  ARGV[1] reservation id  ARGV[2] lines JSON (pair index 1)
-- returns {'held', allocations JSON (numbered)} | {'short', shortfalls JSON}
local ok, answer = hold_lines(ARGV[1], cjson.decode(ARGV[2]), 1, nil, true)
return {ok and 'held' or 'short', answer}
