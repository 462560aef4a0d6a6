-- idem_finish_v1: store the completed response of an idempotency key for replay.
-- requires: lib_windows
--
-- KEYS[1] idem  hash  'fp', 'done', 'expires' (ms), 'record'
-- ARGV[1] now (ms; '0': the Redis clock)   ARGV[2] record (bytes)   ARGV[3] keep for (ms)
-- ARGV[4] fingerprint of the request body
-- The key is (re)written even if the claim's lease lapsed while the request ran: the
-- response exists and a retry must replay it, not run it again.
-- Returns 1.

local key = KEYS[1]
local now = clock_ms(ARGV[1])
local ttl = tonumber(ARGV[3])

redis.call('HSET', key, 'fp', ARGV[4], 'done', '1', 'record', ARGV[2], 'expires', int(now + ttl))
redis.call('PEXPIRE', key, int(math.max(ttl, 1)))
return 1
