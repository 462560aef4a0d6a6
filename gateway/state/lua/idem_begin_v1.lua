-- idem_begin_v1: claim an idempotency key, or report who holds it.
-- requires: lib_windows
--
-- KEYS[1] idem  hash  'fp' (request fingerprint), 'done' ('0' in flight, '1' completed),
--                     'expires' (ms), 'record' (the stored response, once done)
-- ARGV[1] now (ms; '0': the Redis clock)   ARGV[2] fingerprint   ARGV[3] claim lease (ms)
-- Returns {'new'} | {'done', record} | {'inflight'} | {'mismatch'}
-- 'expires' decides (so an injected clock is obeyed); the key's TTL only collects garbage.

local key = KEYS[1]
local now = clock_ms(ARGV[1])
local fingerprint, lease_ms = ARGV[2], tonumber(ARGV[3])

local held = redis.call('HMGET', key, 'fp', 'done', 'expires')
if held[1] and (tonumber(held[3]) or 0) > now then
  if held[1] ~= fingerprint then
    return {'mismatch'}
  end
  if held[2] == '1' then
    return {'done', redis.call('HGET', key, 'record')}
  end
  return {'inflight'}
end
redis.call('DEL', key)
redis.call('HSET', key, 'fp', fingerprint, 'done', '0', 'expires', int(now + lease_ms))
redis.call('PEXPIRE', key, int(math.max(lease_ms, 1)))
return {'new'}
