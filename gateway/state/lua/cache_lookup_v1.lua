-- cache_lookup_v1: a cached answer, or else the single-flight lease for computing it,
-- in one round trip (cache_get then flight_begin).
-- requires: lib_windows
--
-- KEYS[1] cache   string  '<expiry ms>:<value>'
-- KEYS[2] flight  string  the lease's expiry (ms)
-- ARGV[1] now (ms; '0': the Redis clock)   ARGV[2] lease (ms)
-- Returns {1, value} on a hit; {0, 1} when this caller now leads the single flight;
-- {0, 0} when another caller holds a live lease (wait, then look again).

local now = clock_ms(ARGV[1])
local entry = redis.call('GET', KEYS[1])
if entry then
  local sep = string.find(entry, ':', 1, true)
  if sep and tonumber(string.sub(entry, 1, sep - 1)) > now then
    return {1, string.sub(entry, sep + 1)}
  end
end
local held = tonumber(redis.call('GET', KEYS[2]))
if held and held > now then
  return {0, 0}
end
local lease_ms = tonumber(ARGV[2])
redis.call('SET', KEYS[2], int(now + lease_ms), 'PX', int(math.max(lease_ms, 1)))
return {0, 1}
