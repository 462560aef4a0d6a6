-- end_user_usage_v1: an end user's spend per period, reservations and balance now.
-- requires: lib_windows, lib_leases
--
-- KEYS[1..4] the tenant's budget, leases, lease, rl (see admit_v1); KEYS[5] the end
-- user's hash
-- ARGV[1] now (ms; '0': the Redis clock)
-- Returns {now (ms), spent daily, spent monthly, spent total, reserved, requests in
--   flight, balance (nanos)}

local now = clock_ms(ARGV[1])
expire_leases(KEYS[1], KEYS[2], KEYS[3], KEYS[4], now)
local st = end_user_state(KEYS[5], period_ids(now), minute_of(now))
return {now, st.spent[1], st.spent[2], st.spent[3], st.reserved, st.live, st.balance}
