-- cache_lookup_v1: a cached answer, or else the single-flight lease for computing it,
-- in one round trip (cache_get then flight_begin).
-- requires: lib_windows, lib_cache
--
-- KEYS[1] cache   string  '<expiry ms>:<value>'
-- KEYS[2] flight  string  the lease's expiry (ms)
-- ARGV[1] now (ms; '0': the Redis clock)   ARGV[2] lease (ms)
-- Returns {1, value} on a hit; {0, 1} when this caller now leads the single flight;
-- {0, 0} when another caller holds a live lease (wait, then look again).

return cache_lookup(KEYS[1], KEYS[2], clock_ms(ARGV[1]), tonumber(ARGV[2]))
