-- admit_v1: check rate limits and every budget window, then count and reserve, at once.
-- The same algorithm as Accounts.admit in gateway/state/accounts.py, step for step.
-- requires: lib_windows, lib_leases
--
-- KEYS[1] budget  hash  spend per period id ('d20261126', 'm202611', 't'), 'reserved'
-- KEYS[2] leases  zset  reservation id -> expiry (ms)
-- KEYS[3] lease   hash  reservation id -> 'amount tokens minute'
-- KEYS[4] rl      hash  'minute', 'requests', 'tokens' of the current rate-limit minute
-- ARGV[1] now (ms; '0': the Redis clock)     ARGV[2] reservation id
-- ARGV[3] amount (nanos)  ARGV[4] tokens  ARGV[5] lease (ms)
-- ARGV[6] min_amount (nanos; '': all or nothing)   ARGV[7] '1' to count the request
-- ARGV[8..10] rpm, tpm, concurrent; ARGV[11..13] daily, monthly, total budget (nanos);
--   '' means no limit
-- Returns {ok (1/0), granted (nanos), now (ms), rejected_by ('' | 'rpm' | 'tpm' |
--   'concurrent' | 'budget'), window ('' | 'daily' | 'monthly' | 'total'),
--   retry_after (ms), spent daily, spent monthly, spent total, reserved (nanos),
--   rate-limit minute, requests, tokens}

local budget, leases, lease, rl = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = clock_ms(ARGV[1])
local id = ARGV[2]
local amount, tokens, lease_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local min_amount = tonumber(ARGV[6])
local count = ARGV[7] == '1'
local rpm, tpm, concurrent = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local limits = {tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])}
local WINDOWS = {'daily', 'monthly', 'total'}

expire_leases(budget, leases, lease, now)
local ids = period_ids(now)
local spent, reserved = budget_state(budget, ids)

local m = minute_of(now)
local rl_state = redis.call('HMGET', rl, 'minute', 'requests', 'tokens')
local requests, used = 0, 0
if tonumber(rl_state[1]) == m then
  requests, used = tonumber(rl_state[2]), tonumber(rl_state[3])
end

local function reply(ok, granted, by, window, retry)
  return {ok, granted, now, by, window, retry, spent[1], spent[2], spent[3], reserved,
    m, requests, used}
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
  delta = granted - lease_parse(old)
end
redis.call('ZADD', leases, int(now + lease_ms), id)
redis.call('HSET', lease, id, int(granted) .. ' ' .. int(tokens) .. ' ' .. int(m))
reserved = tonumber(redis.call('HINCRBY', budget, 'reserved', int(delta)))
return reply(1, granted, '', '', 0)
