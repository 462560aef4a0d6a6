-- admit_v1: check rate limits and every budget window, then count and reserve, at once.
-- The same algorithm as Accounts.admit in gateway/state/accounts.py, step for step.
-- requires: lib_windows, lib_leases
--
-- KEYS[1] budget  hash  spend per period id ('d20261126', 'm202611', 't'), 'reserved'
-- KEYS[2] leases  zset  reservation id -> expiry (ms)
-- KEYS[3] lease   hash  reservation id -> 'amount tokens minute'
-- KEYS[4] rl      hash  'minute', 'requests', 'tokens' of the current rate-limit minute;
--                       per key with limits of its own: 'k:<key>' -> 'minute requests
--                       tokens', 'c:<key>' -> requests in flight
-- ARGV[1] now (ms; '0': the Redis clock)     ARGV[2] reservation id
-- ARGV[3] amount (nanos)  ARGV[4] tokens  ARGV[5] lease (ms)
-- ARGV[6] min_amount (nanos; '': all or nothing)   ARGV[7] '1' to count the request
-- ARGV[8..10] rpm, tpm, concurrent; ARGV[11..13] daily, monthly, total budget (nanos);
--   '' means no limit
-- ARGV[14] the key's fingerprint when the key has limits of its own, else ''
-- ARGV[15..17] the key's rpm, tpm, concurrent ('' means no limit)
-- Returns {ok (1/0), granted (nanos), now (ms), rejected_by ('' | 'rpm' | 'tpm' |
--   'concurrent' | 'key_rpm' | 'key_tpm' | 'key_concurrent' | 'budget'),
--   window ('' | 'daily' | 'monthly' | 'total'), retry_after (ms), spent daily,
--   spent monthly, spent total, reserved (nanos), rate-limit minute, requests, tokens,
--   the key's requests and tokens this minute}

local budget, leases, lease, rl = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = clock_ms(ARGV[1])
local id = ARGV[2]
local amount, tokens, lease_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local min_amount = tonumber(ARGV[6])
local count = ARGV[7] == '1'
local rpm, tpm, concurrent = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local limits = {tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])}
local key = ARGV[14]
local key_rpm, key_tpm, key_concurrent = tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17])
local WINDOWS = {'daily', 'monthly', 'total'}

expire_leases(budget, leases, lease, rl, now)
local ids = period_ids(now)
local spent, reserved = budget_state(budget, ids)

local m = minute_of(now)
local rl_state = redis.call('HMGET', rl, 'minute', 'requests', 'tokens')
local requests, used = 0, 0
if tonumber(rl_state[1]) == m then
  requests, used = tonumber(rl_state[2]), tonumber(rl_state[3])
end

local key_requests, key_used = 0, 0
if key ~= '' then
  local s = redis.call('HGET', rl, 'k:' .. key)
  if s then
    local km, kr, kt = string.match(s, '^(%S+) (%S+) (%S+)$')
    if tonumber(km) == m then
      key_requests, key_used = tonumber(kr), tonumber(kt)
    end
  end
end

local function reply(ok, granted, by, window, retry)
  return {ok, granted, now, by, window, retry, spent[1], spent[2], spent[3], reserved,
    m, requests, used, key_requests, key_used}
end

local until_next_minute = (m + 1) * MINUTE_MS - now
if count and rpm and requests + 1 > rpm then
  return reply(0, 0, 'rpm', '', until_next_minute)
end
if tpm and used + tokens > tpm then
  return reply(0, 0, 'tpm', '', until_next_minute)
end
if concurrent and redis.call('ZCARD', leases) + 1 > concurrent then
  return reply(0, 0, 'concurrent', '', 1000)
end
if key ~= '' then
  if count and key_rpm and key_requests + 1 > key_rpm then
    return reply(0, 0, 'key_rpm', '', until_next_minute)
  end
  if key_tpm and key_used + tokens > key_tpm then
    return reply(0, 0, 'key_tpm', '', until_next_minute)
  end
  local live = tonumber(redis.call('HGET', rl, 'c:' .. key)) or 0
  if key_concurrent and live + 1 > key_concurrent then
    return reply(0, 0, 'key_concurrent', '', 1000)
  end
end

local granted = amount
for i = 1, 3 do
  if limits[i] then
    local room = limits[i] - spent[i] - reserved
    if granted > room then
      if min_amount and room >= min_amount then
        granted = room
      else
        return reply(0, 0, 'budget', WINDOWS[i], 0)
      end
    end
  end
end

if count then
  requests = requests + 1
end
used = used + tokens
redis.call('HSET', rl, 'minute', int(m), 'requests', int(requests), 'tokens', int(used))

-- An id admitted twice replaces its lease instead of leaking the first amount.
local old = redis.call('HGET', lease, id)
local delta = granted
if old then
  local old_amount, _, _, old_key = lease_parse(old)
  delta = granted - old_amount
  key_done(rl, old_key)
end
local held = int(granted) .. ' ' .. int(tokens) .. ' ' .. int(m)
if key ~= '' then
  if count then
    key_requests = key_requests + 1
  end
  key_used = key_used + tokens
  redis.call('HSET', rl, 'k:' .. key, int(m) .. ' ' .. int(key_requests) .. ' ' .. int(key_used))
  redis.call('HINCRBY', rl, 'c:' .. key, 1)
  held = held .. ' ' .. key
end
redis.call('ZADD', leases, int(now + lease_ms), id)
redis.call('HSET', lease, id, held)
reserved = tonumber(redis.call('HINCRBY', budget, 'reserved', int(delta)))
return reply(1, granted, '', '', 0)
