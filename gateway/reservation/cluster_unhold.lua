-- Cluster: release or confirm what a reservation holds of one SKU (one slot); idempotent.
-- KEYS[1] position  KEYS[2] holds  ARGV[1] reservation id  ARGV[2] release | confirm
-- returns 1
settle_holds(ARGV[1], 1, ARGV[2])
return 1
