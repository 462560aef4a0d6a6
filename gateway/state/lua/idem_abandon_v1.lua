-- idem_abandon_v1: release an in-flight claim whose request failed, so a retry retries.
--
-- KEYS[1] idem  hash  'fp', 'done' ('0' in flight, '1' completed), 'expires', 'record'
-- Returns 1 if a claim was released, 0 otherwise (a completed key is kept).

if redis.call('HGET', KEYS[1], 'done') == '0' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
