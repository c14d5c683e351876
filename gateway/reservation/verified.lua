-- Unlist confirms whose order rows are committed (single node).
-- KEYS[1] unverified index  ARGV the reservation ids  returns how many were listed
return redis.call('ZREM', KEYS[1], unpack(ARGV))
