-- cache_admit_v1: cache_lookup_v1, then, for the caller that now leads the single
-- flight (it will call upstream), admit_v1, in one round trip instead of two. A hit
-- and a caller that waits for another's answer are not admitted here: they are
-- admitted later, at what they may be charged.
-- requires: lib_windows, lib_leases, lib_admit, lib_cache
--
-- KEYS[1] cache   string  '<expiry ms>:<value>'   (the tenant's hash tag, as KEYS[3..])
-- KEYS[2] flight  string  the lease's expiry (ms)
-- KEYS[3..] admit_v1's KEYS
-- ARGV[1] the single flight's lease (ms)   ARGV[2..] admit_v1's ARGV (ARGV[2]: now)
-- Returns {1, value} on a hit; {0, 0} when another caller leads; {0, 1, admit_v1's
-- reply} when this caller now leads (the lease is taken even if the admission is
-- refused: the caller ends the flight as after any failure).

local now = clock_ms(ARGV[2])
local found = cache_lookup(KEYS[1], KEYS[2], now, tonumber(ARGV[1]))
if found[1] == 1 or found[2] == 0 then
  return found
end
local K = {KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]}
local A = {now}
for i = 3, #ARGV do
  A[i - 1] = ARGV[i]
end
found[3] = admit(K, A)
return found
