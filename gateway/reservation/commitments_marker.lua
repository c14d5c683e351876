-- Whether Redis's copy of the commitments is whole: the marker is 'whole' once a restore from
-- the order buffer finished (or found nothing to do); absent when Redis lost its data.
-- KEYS[1] the marker  ARGV[1] state | claim | whole  ARGV[2] claim: lease (ms)
-- returns state: whole | restoring | lost
--         claim: claimed (this caller restores now) | whole | restoring (another one does)
--         whole: whole
local marker, action = KEYS[1], ARGV[1]
local v = redis.call('GET', marker)
if action == 'whole' then
  redis.call('SET', marker, 'whole')
  return 'whole'
end
if action == 'claim' then
  if v then return v end
  -- A lease, not a lock forever: a gateway that dies restoring leaves it to another.
  redis.call('SET', marker, 'restoring', 'PX', ARGV[2])
  return 'claimed'
end
return v or 'lost'
