-- Compare-and-set of the marker that says which version of the ops config Redis holds.
-- KEYS[1] the marker
-- ARGV[1] the value the caller expects it to hold
-- ARGV[2] the value to set if it does
-- returns 1 when set; else 0, and the marker is left 'dirty': another writer came in between,
-- so neither can vouch for the copy and the next sync copies the record again.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
redis.call('SET', KEYS[1], 'dirty')
return 0
