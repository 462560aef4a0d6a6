-- cache_store_v1: store an answer and end the single flight, in one round trip.
-- requires: lib_windows
--
-- KEYS[1] cache   string  '<expiry ms>:<value>' (expires by TTL: evictable)
-- KEYS[2] flight  string  the lease's expiry (ms)
-- ARGV[1] now (ms; '0': the Redis clock)   ARGV[2] keep for (ms; '0': store nothing)
-- ARGV[3] the value   ARGV[4] '1' to end the single flight
-- Returns 1.

local now = clock_ms(ARGV[1])
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], int(now + ttl) .. ':' .. ARGV[3], 'PX', int(ttl))
end
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[2])
end
return 1
