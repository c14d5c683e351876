-- Unlist confirms whose order rows are committed (single node), and let their records expire
-- as settled ones do (settle.lua keeps a listed one).
-- KEYS[1] unverified index  KEYS[2..] their records  ARGV[1] seconds to keep a settled record
-- ARGV[2..] the reservation ids, in the records' order  returns how many were listed
local listed = 0
for i = 2, #KEYS do
  listed = listed + redis.call('ZREM', KEYS[1], ARGV[i])
  if redis.call('HGET', KEYS[i], REC.status) == 'confirmed' then
    redis.call('EXPIRE', KEYS[i], ARGV[1])
  end
end
return listed
