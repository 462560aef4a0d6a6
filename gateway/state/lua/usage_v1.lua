-- usage_v1: spend in the current daily, monthly and total periods, and what is reserved.
-- requires: lib_windows, lib_leases
--
-- KEYS[1] budget  hash  spend per period id, 'reserved'
-- KEYS[2] leases  zset  reservation id -> expiry (ms)
-- KEYS[3] lease   hash  reservation id -> 'amount tokens minute[ key]'
-- KEYS[4] rl      hash  per key with limits of its own, 'c:<key>': requests in flight
-- ARGV[1] now (ms; '0': the Redis clock)
-- Returns {now (ms), spent daily, spent monthly, spent total, reserved} (nanos)

local budget, leases, lease, rl = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = clock_ms(ARGV[1])

expire_leases(budget, leases, lease, rl, now)
local spent, reserved = budget_state(budget, period_ids(now))
return {now, spent[1], spent[2], spent[3], reserved}
