-- flight_begin_v1: become the one request computing a cache entry (single flight).
-- requires: lib_windows
--
-- KEYS[1] flight  string  the lease's expiry (ms)
-- ARGV[1] now (ms; '0': the Redis clock)   ARGV[2] lease (ms)
-- Returns 1 if this caller leads, 0 if a live lease is held by another.
-- The stored expiry decides (so an injected clock is obeyed); the TTL collects garbage.

local now = clock_ms(ARGV[1])
local lease_ms = tonumber(ARGV[2])
local held = tonumber(redis.call('GET', KEYS[1]))
if held and held > now then
  return 0
end
redis.call('SET', KEYS[1], int(now + lease_ms), 'PX', int(math.max(lease_ms, 1)))
return 1
