-- extend_v1: renew the leases of reservations still in flight.
-- requires: lib_windows, lib_leases
--
-- KEYS[1] budget  hash  'reserved' (nanos)
-- KEYS[2] leases  zset  reservation id -> expiry (ms)
-- KEYS[3] lease   hash  reservation id -> 'amount tokens minute[ key]'
-- KEYS[4] rl      hash  per key with limits of its own, 'c:<key>': requests in flight
-- ARGV[1] now (ms; '0': the Redis clock)   ARGV[2] lease (ms)   ARGV[3..] reservation ids
-- Returns the number of leases renewed (a lapsed lease stays lapsed).

local budget, leases, lease, rl = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = clock_ms(ARGV[1])
local expires = int(now + tonumber(ARGV[2]))

expire_leases(budget, leases, lease, rl, now)
local renewed = 0
for i = 3, #ARGV do
  if redis.call('ZSCORE', leases, ARGV[i]) then
    redis.call('ZADD', leases, 'XX', expires, ARGV[i])
    renewed = renewed + 1
  end
end
return renewed
